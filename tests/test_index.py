"""The compiled key index (ringblob._index.Index, re-exported as ringblob.store.index.Index).

Probing, tombstones and growth (with ``_collide=True`` every key hashes alike,
so every lookup walks one probe chain and compares keys byte by byte), every
key length, the order's chunk splits and cached prefixes, compaction, checkpoint
entry bytes and their reload, error cases, and a Hypothesis state machine
against a dict + sorted list model. ``Index._check()`` verifies every internal
invariant (table counts, order, cached maxima, totals) in O(n).
"""

from __future__ import annotations

import random
import sys
from bisect import bisect_left, bisect_right

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ringblob.store import index as index_mod
from ringblob.store.index import CHUNK, Index, pack_value, unpack_value

D = bytes(range(32))


def entry(key: bytes, page: int, length: int, digest: bytes = D) -> bytes:
    return bytes([len(key)]) + key + pack_value(page, length, digest)


def all_keys(ix: Index) -> list[bytes]:
    return ix.keys_after(None, False, 1 << 30)


def test_module_reexports_the_compiled_class():
    from ringblob import _index

    assert index_mod.Index is _index.Index
    assert index_mod.VALUE_SIZE == _index.VALUE_SIZE == 44 and CHUNK == Index.CHUNK == 512
    assert unpack_value(pack_value(1 << 40, 7, D)) == (1 << 40, 7, D)


def test_colliding_keys_probe_and_reuse_tombstones():
    ix = Index(_collide=True)
    keys = [b"k%03d" % i for i in range(40)]
    for i, k in enumerate(keys):
        assert ix.set(k, i, i * 10, D) is None
    ix._check()
    assert all(ix.get(k) == (i, i * 10, D) for i, k in enumerate(keys))
    assert ix.get(b"k999") is None and b"k999" not in ix and ix.value_length(b"k999") is None
    # remove every other key: tombstones in the middle of the one probe chain
    for k in keys[::2]:
        assert ix.remove(k) is not None
    used = ix._used
    assert used == 40  # 20 live + 20 tombstones
    assert all(ix.get(k) is None for k in keys[::2])
    assert all(ix.get(k) == (i, i * 10, D) for i, k in enumerate(keys) if i % 2)  # found past tombstones
    ix._check()
    # a new key takes the first tombstone on the chain: no slot is consumed
    assert ix.set(b"new", 1, 2, D) is None
    assert ix._used == used and ix.get(b"new") == (1, 2, D)
    # an update in place neither consumes a slot nor changes the order
    assert ix.set(b"k001", 9, 9, b"\x01" * 32) == (1, 10, D)
    assert ix._used == used and ix.get(b"k001") == (9, 9, b"\x01" * 32)
    ix._check()
    assert all_keys(ix) == sorted([k for i, k in enumerate(keys) if i % 2] + [b"new"])


def test_colliding_keys_that_share_a_prefix_compare_in_full():
    ix = Index(_collide=True)
    keys = [b"x" * n for n in range(1, 60)] + [b"x" * 20 + bytes([b]) for b in range(0, 256, 17)]
    for k in keys:
        ix.set(k, len(k), len(k), D)
    assert all(ix.get(k) == (len(k), len(k), D) for k in keys)
    assert ix.get(b"x" * 60) is None and ix.get(b"x" * 19 + b"y") is None
    ix._check()


@pytest.mark.parametrize("collide", [False, True])
def test_growth_rehash_keeps_every_key(collide):
    n = 3000 if collide else 100_000
    ix = Index(_collide=collide)
    caps = set()
    rnd = random.Random(3)
    keys = list({rnd.randbytes(rnd.randrange(1, 24)) for _ in range(n)})
    for i, k in enumerate(keys):
        ix.set(k, i, i & 0xFFFF, D)
        caps.add(ix._capacity)
    assert len(caps) > 5  # grew several times
    cap = ix._capacity
    assert cap & (cap - 1) == 0 and len(ix) * 10 <= cap * 7 and len(ix) == len(keys)
    assert all(ix.get(k) == (i, i & 0xFFFF, D) for i, k in enumerate(keys))
    assert all_keys(ix) == sorted(keys)
    ix._check()


def test_churn_purges_tombstones_without_growing():
    ix = Index()
    for i in range(1000):
        ix.set(b"live%04d" % i, i, 1, D)
    cap = ix._capacity
    for r in range(50):  # 50,000 short-lived keys: tombstones pile up, rehashes purge them
        for i in range(1000):
            ix.set(b"tmp%02d-%04d" % (r, i), i, 1, D)
        for i in range(1000):
            ix.remove(b"tmp%02d-%04d" % (r, i))
    assert ix._capacity <= 4 * cap and ix._used * 10 <= ix._capacity * 7
    assert len(ix) == 1000 and all(ix.get(b"live%04d" % i) == (i, 1, D) for i in range(1000))
    ix._check()


def test_every_key_length_and_prefix_ties():
    """Lengths 0..255; keys equal in their first 8 bytes (the order caches that prefix) and keys
    that are prefixes of one another with trailing zero bytes."""
    keys = [bytes([n % 251 + 1]) * n for n in range(0, 256)]
    keys += [b"prefix00" + bytes([b]) for b in range(256)]
    keys += [b"a" + b"\x00" * n for n in range(0, 20)] + [b"\x00" * n for n in range(1, 20)]
    keys = list(dict.fromkeys(keys))
    random.Random(1).shuffle(keys)
    ix = Index()
    for i, k in enumerate(keys):
        assert ix.set(k, i, len(k), D) is None
    srt = sorted(keys)
    assert all_keys(ix) == srt
    assert all(ix.get(k) == (i, len(k), D) for i, k in enumerate(keys))
    for k in srt[::7]:
        j = srt.index(k)
        assert ix.keys_after(k, False, 3) == srt[j + 1 : j + 4]
        assert ix.keys_after(k, True, 3) == srt[j : j + 3]
        probe = k + b"\x00"  # between k and its successor (or equal to the successor)
        assert ix.keys_after(probe, True, 2) == srt[bisect_left(srt, probe) : bisect_left(srt, probe) + 2]
    entries = b"".join(ix.iter_entries())
    assert entries == b"".join(entry(k, keys.index(k), len(k)) for k in srt)
    assert len(entries) == ix.entries_size()
    ix._check()
    with pytest.raises(ValueError, match="255"):
        ix.set(b"z" * 256, 1, 1, D)
    assert ix.get(b"z" * 256) is None and ix.remove(b"z" * 256) is None and b"z" * 256 not in ix


def test_order_chunks_split_and_stay_sorted():
    ix = Index()
    rnd = random.Random(9)
    keys = [rnd.randbytes(6) for _ in range(20 * CHUNK)]
    keys += [b"same-prefix-%06d" % i for i in range(3 * CHUNK)]  # ties on the cached 8-byte prefix
    keys = list(dict.fromkeys(keys))
    rnd.shuffle(keys)
    for k in keys:
        ix.set(k, 1, 1, D)
    assert ix._nchunks >= len(keys) // CHUNK
    srt = sorted(keys)
    assert all_keys(ix) == srt
    ix._check()
    # ascending appends (the common key pattern) and removals down to empty chunks
    for i in range(3 * CHUNK):
        ix.set(b"\xff%08d" % i, 2, 2, D)
    ix._check()
    for k in srt[: len(srt) // 2]:
        ix.remove(k)
    ix._check()
    assert all_keys(ix) == sorted(srt[len(srt) // 2 :] + [b"\xff%08d" % i for i in range(3 * CHUNK)])


def test_keys_after_edges():
    ix = Index()
    assert ix.keys_after(None, False, 10) == [] and ix.keys_after(b"a", True, 10) == []
    for k in (b"b", b"d", b"f"):
        ix.set(k, 0, 0, D)
    assert ix.keys_after(None, False, 0) == [] and ix.keys_after(None, False, -1) == []
    assert ix.keys_after(b"f", False, 10) == [] and ix.keys_after(b"g", True, 10) == []
    assert ix.keys_after(b"f", True, 10) == [b"f"]
    assert ix.keys_after(b"a", False, 2) == [b"b", b"d"]
    assert ix.keys_after(b"c", False, 10) == [b"d", b"f"]
    assert ix.keys_after(b"d", True, 1) == [b"d"]
    assert ix.keys_after(b"", False, 10) == [b"b", b"d", b"f"]


def test_compaction_rewrites_arena_and_keeps_everything():
    ix = Index()
    model = {}
    for i in range(30_000):
        k = b"key-%08d-" % i + b"p" * 30
        v = (i, i * 3, D)
        ix.set(k, *v)
        model[k] = v
    arena = len(ix._arena)
    for i in range(0, 30_000):
        if i % 10:
            k = b"key-%08d-" % i + b"p" * 30
            assert ix.remove(k) == model.pop(k)
    assert ix._garbage < 1 << 20 and len(ix._arena) < arena  # compacted (garbage > live and > 1 MiB)
    ix._check()
    assert all(ix.get(k) == v for k, v in model.items())
    assert all_keys(ix) == sorted(model)
    assert ix._nchunks <= -(-len(model) // (CHUNK // 2)) + 1  # the order was rebuilt in half-full chunks


def test_iter_entries_refuses_a_changed_order_but_sees_value_updates():
    ix = Index()
    for i in range(5):
        ix.set(b"k%d" % i, i, i, D)
    it = ix.iter_entries()
    assert next(it) == entry(b"k0", 0, 0)
    ix.set(b"k1", 100, 7, D)  # in place: fine
    assert next(it) == entry(b"k1", 100, 7)
    ix.set(b"k9", 9, 9, D)  # a new key: the walk would be inconsistent
    with pytest.raises(RuntimeError, match="added or removed"):
        next(it)
    it = ix.iter_entries()
    del ix  # the iterator keeps the index alive
    assert len(list(it)) == 6


def test_take_packs_whole_entries_up_to_a_cap_as_next_would_give_them():
    """EntryIter.take (the checkpoint's chunk packing): whole entries in key order while they fit
    the cap, the same bytes as next() joined, across the order's chunks; 0 entries when the next
    one alone passes the cap; refuses a changed order like next()."""
    ix = Index()
    rng = random.Random(5)
    keys = {bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(3 * CHUNK)}
    for i, k in enumerate(keys):
        ix.set(k, i, i, D)
    want = list(ix.iter_entries())
    it = ix.iter_entries()
    got, counts = [], []
    caps = [len(want[0]) - 1, 1, 200, 10_000, 1 << 20]
    assert it.take(caps[0]) == (b"", 0) and not it.exhausted  # the first entry alone passes the cap
    for cap in caps[1:] * 3:
        body, n = it.take(cap)
        assert len(body) <= cap
        got.append(body)
        counts.append(n)
    assert it.exhausted and it.take(1 << 30) == (b"", 0)
    assert b"".join(got) == b"".join(want) and sum(counts) == len(want)
    # each take stops right before the first entry that would pass its cap
    it = ix.iter_entries()
    body, n = it.take(200)
    assert body == b"".join(want[:n]) and len(body) + len(want[n]) > 200
    assert next(it) == want[n]  # take and next share the position
    ix.remove(next(iter(keys)))
    with pytest.raises(RuntimeError, match="added or removed"):
        it.take(1000)
    assert Index().iter_entries().exhausted


def test_set_rejects_bad_values_and_leaves_the_index_unchanged():
    ix = Index()
    ix.set(b"k", 1, 2, D)
    before = ix._arena
    with pytest.raises(ValueError, match="32 bytes"):
        ix.set(b"k", 1, 2, D[:31])
    with pytest.raises(ValueError, match="32 bytes"):
        ix.set(b"new", 1, 2, D + b"x")
    with pytest.raises(OverflowError):
        ix.set(b"new", -1, 2, D)
    with pytest.raises(OverflowError):
        ix.set(b"new", 1, 1 << 32, D)
    with pytest.raises(OverflowError):
        ix.set(b"new", 1 << 64, 1, D)
    with pytest.raises(TypeError):
        ix.set("new", 1, 1, D)
    with pytest.raises(TypeError):
        ix.get(bytearray(b"k"))
    with pytest.raises(TypeError):
        ix.get(None)
    with pytest.raises(TypeError):
        None in ix
    assert ix._arena == before and len(ix) == 1 and ix.get(b"k") == (1, 2, D)
    assert ix.set(b"max", (1 << 64) - 1, (1 << 32) - 1, D) is None
    assert ix.get(b"max") == ((1 << 64) - 1, (1 << 32) - 1, D) and ix.value_length(b"max") == (1 << 32) - 1
    ix._check()


def test_extents_and_load_entries_with_large_pages():
    ix = Index()
    ix.set(b"a", 5, 4097, D)
    ix.set(b"b", 1 << 40, 1, D)  # page >= 2**32: the extent is a Python int past 64 bits
    ix.set(b"c", 9, 0, D)  # empty: no extent
    want = [5 << 32 | 2, (1 << 40) << 32 | 1]
    assert sorted(ix.extents(4096)) == sorted(want)
    blob = b"".join(ix.iter_entries())
    ix2 = Index()
    assert sorted(ix2.load_entries(blob, 3, 4096)) == sorted(want)
    assert ix2.load_entries(bytearray(blob), 3) == []  # no page size: no extents; bytearray accepted
    assert ix2.load_entries(memoryview(blob), 3) == []
    assert [ix2.get(k) for k in (b"a", b"b", b"c")] == [ix.get(k) for k in (b"a", b"b", b"c")]
    assert ix2.value_bytes == 4098 and ix2.key_bytes == 3
    ix2._check()
    with pytest.raises(ValueError):
        ix.extents(0)


@pytest.mark.parametrize("bad, count, match", [
    (lambda b: b[:-1], 3, "fill|cut short"),
    (lambda b: b[:5], 3, "need at least"),
    (lambda b: b + b"\x00", 3, "fill"),
    (lambda b: b, 4, "need at least"),
    (lambda b: b + entry(b"d", 1, 1)[:-2], 4, "cut short"),
    (lambda b: b, 1 << 40, "need at least"),
    (lambda b: b, 2, "fill"),
    (lambda b: entry(b"b", 1, 1) + entry(b"a", 1, 1), 2, "out of order"),
    (lambda b: entry(b"a", 1, 1) + entry(b"a", 1, 1), 2, "out of order"),
    (lambda b: bytes([200]) + b"x" * 100, 1, "cut short"),
    (lambda b: b, -1, ">= 0"),
])
def test_load_entries_refuses_malformed_input_and_keeps_the_old_content(bad, count, match):
    src = Index()
    for k in (b"a", b"b", b"c"):
        src.set(k, 1, 1, D)
    blob = b"".join(src.iter_entries())
    ix = Index()
    ix.set(b"old", 7, 7, D)
    with pytest.raises(ValueError, match=match):
        ix.load_entries(bad(blob), count, 4096)
    assert all_keys(ix) == [b"old"] and ix.get(b"old") == (7, 7, D) and len(ix) == 1
    ix._check()


def test_empty_index_and_empty_load():
    ix = Index()
    assert len(ix) == 0 and ix.get(b"a") is None and ix.remove(b"a") is None
    assert list(ix.iter_entries()) == [] and ix.extents(4096) == [] and ix.entries_size() == 0
    assert ix.load_entries(b"", 0, 4096) == [] and len(ix) == 0
    ix.set(b"a", 1, 1, D)
    assert ix.get(b"a") == (1, 1, D)
    ix._check()


def test_memory_per_key_meets_the_target():
    n = 200_000
    rnd = random.Random(2)
    keys = sorted({rnd.randbytes(16) for _ in range(n)})
    blob = b"".join(entry(k, i, 4096) for i, k in enumerate(keys))
    ix = Index()
    ix.load_entries(blob, len(keys))
    per_key = sys.getsizeof(ix) / len(keys) - 16
    assert per_key <= 100, per_key
    assert ix.memory_bytes() <= sys.getsizeof(ix)


# -- a model-based state machine ------------------------------------------------------

KEYS = st.binary(min_size=0, max_size=12) | st.sampled_from(
    [b"a", b"a\x00", b"a\x00\x00", b"abcdefgh", b"abcdefgh\x00", b"abcdefghi", b"\xff" * 255, b"\x00"])
VALUES = st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.binary(min_size=32, max_size=32))


class IndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ix = Index()
        self.model: dict[bytes, tuple[int, int, bytes]] = {}

    @initialize(collide=st.booleans())
    def start(self, collide):
        self.ix = Index(_collide=collide)

    @rule(key=KEYS, value=VALUES)
    def set(self, key, value):
        assert self.ix.set(key, *value) == self.model.get(key)
        self.model[key] = value

    @rule(n=st.integers(1, 3 * CHUNK), seed=st.integers(0, 1 << 30))
    def set_many(self, n, seed):
        rnd = random.Random(seed)
        for _ in range(n):
            k = rnd.randbytes(rnd.randrange(1, 10))
            v = (rnd.randrange(1 << 40), rnd.randrange(1 << 20), D)
            assert self.ix.set(k, *v) == self.model.get(k)
            self.model[k] = v

    @rule(key=KEYS)
    def remove(self, key):
        assert self.ix.remove(key) == self.model.pop(key, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove_present(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.ix.remove(key) == self.model.pop(key)

    @precondition(lambda self: len(self.model) > 100)
    @rule(frac=st.floats(0.5, 1.0))
    def remove_most(self, frac):
        for k in sorted(self.model)[: int(len(self.model) * frac)]:
            assert self.ix.remove(k) == self.model.pop(k)

    @rule(key=KEYS)
    def lookup(self, key):
        assert self.ix.get(key) == self.model.get(key)
        assert (key in self.ix) == (key in self.model)
        assert self.ix.value_length(key) == (self.model[key][1] if key in self.model else None)

    @rule(start=st.none() | KEYS, inclusive=st.booleans(), limit=st.integers(-1, 40))
    def keys_after(self, start, inclusive, limit):
        srt = sorted(self.model)
        if start is None:
            i = 0
        else:
            i = (bisect_left if inclusive else bisect_right)(srt, start)
        assert self.ix.keys_after(start, inclusive, limit) == srt[i : i + max(limit, 0)]

    @rule(collide=st.booleans())
    def reload(self, collide):
        blob = b"".join(self.ix.iter_entries())
        assert blob == b"".join(entry(k, *self.model[k]) for k in sorted(self.model))
        fresh = Index(_collide=collide)
        used = fresh.load_entries(blob, len(self.model), 4096)
        assert sorted(used) == sorted(self.ix.extents(4096)) == sorted(
            v[0] << 32 | -(-v[1] // 4096) for v in self.model.values() if v[1])
        self.ix = fresh

    @invariant()
    def consistent(self):
        assert len(self.ix) == len(self.model)
        assert self.ix.key_bytes == sum(map(len, self.model))
        assert self.ix.value_bytes == sum(v[1] for v in self.model.values())
        assert self.ix.entries_size() == sum(1 + len(k) + 44 for k in self.model)
        self.ix._check()


IndexMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_index_state_machine = IndexMachine.TestCase
