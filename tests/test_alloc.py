"""The page allocator (ringblob._alloc.Allocator) against a pure-Python model, and its edges.

The model keeps the free extents as a sorted list and implements the documented
semantics directly: best fit = smallest extent that holds ``n`` pages; among
equals the lowest start when they have at least ``BIN_PAGES`` pages, any of them
below that (the allocator's bins are newest-first lists); the write cursor is a
page, valid while a free extent starts there; a new run starts in the best fit
for ``max(n, RUN_MIN)`` pages (chosen as above), else allocate_run is allocate
and drops the cursor; and allocate_run is allocate, dropping the cursor,
whenever more than ``RUN_MAX_FRAGMENTATION`` of the free pages lie outside the
largest free extent.
"""

from __future__ import annotations

import random
import re

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ringblob import _alloc
from ringblob.errors import NoSpace
from ringblob.store.alloc import Allocator

BIN = _alloc.BIN_PAGES


class Model:
    """Free extents as a sorted list of ``[start, n]``; O(n) everything.

    Where the documented semantics allow a choice (among free extents of equal size
    below ``BIN_PAGES`` pages, whichever the allocator's bin holds first), the model
    returns every admissible start and is told which one the allocator took.
    """

    def __init__(self, first: int, count: int, free: list[tuple[int, int]], run_min: int):
        self.first, self.count, self.run_min = first, count, run_min
        self.ext = sorted([s, n] for s, n in free)
        self.run = None

    def _take(self, i: int, n: int) -> int:
        s, size = self.ext[i]
        if size > n:
            self.ext[i] = [s + n, size - n]
        else:
            del self.ext[i]
        return s

    def _of_size(self, size: int) -> list[int]:
        """Admissible starts among the extents of ``size`` pages: any small one, else the lowest."""
        starts = [s for s, m in self.ext if m == size]
        return starts if size < BIN else starts[:1]

    def allocate_choices(self, n: int) -> list[int]:
        fits = [size for _, size in self.ext if size >= n]
        if not fits:
            raise NoSpace("model")
        return self._of_size(min(fits))

    def allocate_run_choices(self, n: int) -> tuple[list[int], bool]:
        """Admissible starts, and whether the allocation is a run (sets the cursor)."""
        free = sum(size for _, size in self.ext)
        if max((size for _, size in self.ext), default=0) < (1 - _alloc.RUN_MAX_FRAGMENTATION) * free:
            self.run = None  # fragmented: best fit fills the holes
            return self.allocate_choices(n), False
        i = next((i for i, (s, _) in enumerate(self.ext) if s == self.run), None)
        if i is not None and self.ext[i][1] >= n:
            return [self.run], True
        fits = [size for _, size in self.ext if size >= max(n, self.run_min)]
        if not fits:
            self.run = None
            return self.allocate_choices(n), False
        return self._of_size(min(fits)), True

    def take(self, start: int, n: int, run: bool = False) -> None:
        """The allocator took ``n`` pages at ``start`` (the front of a free extent)."""
        i = next(i for i, (s, _) in enumerate(self.ext) if s == start)
        size = self.ext[i][1]
        self._take(i, n)
        if run:
            self.run = start + n if size > n else None

    def free(self, start: int, n: int) -> None:
        end = start + n
        if start < self.first or end > self.first + self.count:
            raise ValueError("outside")
        if any(s < end and start < s + m for s, m in self.ext):
            raise ValueError("double free")
        self.ext.append([start, n])
        self.ext.sort()
        merged: list[list[int]] = []
        for s, m in self.ext:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1][1] += m
            else:
                merged.append([s, m])
        self.ext = merged

    def extents(self) -> list[tuple[int, int]]:
        return [(s, n) for s, n in self.ext]


# large offsets: page numbers beyond 2**32 must work
FIRSTS = st.sampled_from([0, 7, (1 << 33) + 5])


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / allocate_run / free / rebuild (from_used) sequences, compared step by step."""

    @initialize(first=FIRSTS, count=st.integers(1, 400), run_min=st.sampled_from([1, 8, 64, 1 << 40]))
    def start(self, first, count, run_min):
        self.a = Allocator(first, count)
        self.a.RUN_MIN = run_min
        self.m = Model(first, count, [(first, count)], run_min)
        self.used: list[tuple[int, int]] = []

    def _check_alloc(self, fn, n):
        try:
            if fn == "allocate":
                want, run = self.m.allocate_choices(n), False
            else:
                want, run = self.m.allocate_run_choices(n)
        except NoSpace:
            before = list(self.a.free_extents())
            with pytest.raises(NoSpace):
                getattr(self.a, fn)(n)
            assert list(self.a.free_extents()) == before
            return
        got = getattr(self.a, fn)(n)
        assert got in want, (fn, n, got, want)
        self.m.take(got, n, run)
        self.used.append((got, n))

    @rule(n=st.integers(1, 40))
    def allocate(self, n):
        self._check_alloc("allocate", n)

    @rule(n=st.integers(1, 12))
    def allocate_run(self, n):
        self._check_alloc("allocate_run", n)

    @rule(data=st.data())
    def free_used(self, data):
        if not self.used:
            return
        i = data.draw(st.integers(0, len(self.used) - 1))
        start, n = self.used.pop(i)
        # sometimes free only a part (the rest stays used): splits are legal frees too
        k = data.draw(st.integers(0, n - 1))
        if k:
            self.used.append((start, k))
        self.m.free(start + k, n - k)
        self.a.free(start + k, n - k)

    @rule(data=st.data())
    def bad_free(self, data):
        """A free overlapping a free extent, or outside the range: ValueError, nothing changes."""
        first, count = self.a.first, self.a.count
        start = data.draw(st.integers(first - 5, first + count + 5))
        n = data.draw(st.integers(1, 20))
        try:
            self.m.free(start, n)
        except ValueError:
            before = list(self.a.free_extents())
            with pytest.raises(ValueError):
                self.a.free(start, n)
            assert list(self.a.free_extents()) == before
            return
        self.a.free(start, n)
        # the model accepted it (all pages were used): keep the bookkeeping of used pages exact
        self.used = _subtract(self.used, start, n)

    @rule()
    def rebuild(self):
        """from_used (as a store open does) yields the same free extents; the cursor starts unset."""
        run_min = self.m.run_min
        self.a = Allocator.from_used(self.a.first, self.a.count, self.used)
        self.a.RUN_MIN = run_min
        self.m = Model(self.m.first, self.m.count, self.m.extents(), run_min)

    @invariant()
    def same(self):
        assert list(self.a.free_extents()) == self.m.extents()
        total = sum(n for _, n in self.m.ext)
        assert self.a.free_pages == total and self.a.extents == len(self.m.ext)
        assert self.a.largest() == max((n for _, n in self.m.ext), default=0)
        self.a._check()


def _subtract(used, start, n):
    """Used extents minus the pages ``[start, start + n)``."""
    out = []
    end = start + n
    for s, m in used:
        e = s + m
        if e <= start or s >= end:
            out.append((s, m))
            continue
        if s < start:
            out.append((s, start - s))
        if e > end:
            out.append((end, e - end))
    return out


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_allocator_state_machine = AllocatorMachine.TestCase


def test_module_reexports_the_compiled_class():
    assert Allocator is _alloc.Allocator


def test_run_min_is_settable_on_class_and_instance(monkeypatch):
    a = Allocator(0, 100)
    a.allocate(10)
    a.free(0, 5)  # free: [0, 5) and [10, 100)
    monkeypatch.setattr(Allocator, "RUN_MIN", 1000)
    b = Allocator.from_used(0, 100, [(5, 5)])
    assert b.allocate_run(2) == 0  # no extent of RUN_MIN pages: best fit
    b.RUN_MIN = 10
    assert b.allocate_run(2) == 10  # a run in the best fit for 10 pages
    assert b.allocate_run(2) == 12  # ... going on at the cursor


def test_allocate_run_fills_holes_once_the_free_space_is_fragmented():
    """Runs are taken only while the largest free extent holds at least a twentieth of the free
    pages (RUN_MAX_FRAGMENTATION 0.95); past that, allocate_run is best fit (the holes) and
    drops the cursor."""
    holes = [(10 * i, 1) for i in range(1, 91)]  # 90 one-page holes in [0, 910)
    used = [(0, 10)] + [(p + 1, 9) for p, _ in holes]
    a = Allocator.from_used(0, 1200, used)  # free: the holes and [910, 1200)
    assert a.largest() == 290 and a.free_pages == 380 and a.fragmentation() <= _alloc.RUN_MAX_FRAGMENTATION
    assert [a.allocate_run(1) for _ in range(3)] == [910, 911, 912]  # a run: neighbours in the file
    b = Allocator.from_used(0, 1200, used + [(910, 286)])  # free: the holes and [1196, 1200): 90 + 4
    assert b.fragmentation() > _alloc.RUN_MAX_FRAGMENTATION
    got = [b.allocate_run(1) for _ in range(5)]
    assert all(p in {h for h, _ in holes} for p in got), got  # holes filled, the 4-page extent kept
    assert b.largest() == 4 and b.free_pages == 89
    a._check()
    b._check()


def _churn(a: Allocator, classes, ops: int, seed: int):
    """Overwrite random keys of the size classes ``[(pages, keys, weight)]`` as the store does
    (values of up to 64 pages at the write cursor, larger ones by best fit; the old extent
    freed after the new one is taken); returns the NoSpace count and the smallest
    largest-free-extent seen after the fill."""
    rnd = random.Random(seed)
    where: dict = {}
    keys = [(c, n, i) for c, (n, count, _) in enumerate(classes) for i in range(count)]
    by_class = [[k for k in keys if k[0] == c] for c in range(len(classes))]

    def put(k) -> bool:
        try:
            p = a.allocate_run(k[1]) if k[1] <= 64 else a.allocate(k[1])
        except NoSpace:
            return False
        if k in where:
            a.free(where[k], k[1])
        where[k] = p
        return True

    for k in rnd.sample(keys, len(keys)):
        assert put(k)
    fails, low = 0, a.largest()
    for _ in range(ops):
        c = rnd.choices(range(len(classes)), [w for *_, w in classes])[0]
        fails += not put(rnd.choice(by_class[c]))
        low = min(low, a.largest())
    return fails, low


@pytest.mark.parametrize("classes", [
    [(1, 2048, 4), (16, 64, 1), (32, 64, 1), (64, 64, 1)],   # 4 KiB .. 256 KiB values, ~56 % full
    [(1, 4096, 8), (256, 16, 1)],                              # 4 KiB and 1 MiB values, ~50 % full
], ids=["4k-256k", "4k-1m"])
def test_mixed_size_overwrites_keep_large_extents(classes):
    """Small values overwritten at random beside larger ones, the store about half full: every
    put still finds room and the largest free extent keeps a good share of the free space.
    (Runs that kept carving the largest extent while holes piled up left no free extent of 64
    pages within a few thousand overwrites here, and puts of 64 pages and more failed.)"""
    pages = 16384
    a = Allocator(0, pages)
    fails, low = _churn(a, classes, 12_000, seed=3)
    live = sum(n * count for n, count, _ in classes)
    assert 0.45 < live / pages < 0.6
    assert fails == 0
    assert low >= 256, f"the largest free extent fell to {low} pages"
    a._check()


def test_pages_beyond_2_to_the_32_and_range_checks():
    first = 5 << 32
    a = Allocator.from_used_packed(first, 1 << 34, [(first + 10) << 32 | 5, first << 32 | 3])
    assert list(a.free_extents()) == [(first + 3, 7), (first + 15, (1 << 34) - 15)]
    assert a.allocate(7) == first + 3
    with pytest.raises(ValueError, match="outside"):
        a.free(first - 1, 2)
    with pytest.raises(ValueError, match="outside"):
        a.free(first + (1 << 34) - 1, 2)
    with pytest.raises(ValueError, match="double free"):
        a.free(first + 20, 1)  # inside a free extent, neither end shared with it
    with pytest.raises(ValueError, match="overlaps"):
        Allocator.from_used_packed(0, 100, [90 << 32 | 20])
    with pytest.raises(ValueError):
        Allocator(-1, 10)
    a.free(first + 10, 5)
    a.free(first, 3)
    a.free(first + 3, 7)
    assert list(a.free_extents()) == [(first, 1 << 34)] and a.fragmentation() == 0.0
    a._check()


def test_many_extents_stay_balanced_and_consistent():
    a = Allocator(0, 200_000)
    pages = [a.allocate_run(1) for _ in range(200_000)]
    assert pages == list(range(200_000)) and a.free_pages == 0 and a.largest() == 0
    for p in pages[::2]:
        a.free(p, 1)
    assert a.extents == 100_000 and a.largest() == 1
    a._check()
    for p in pages[1::2]:
        a.free(p, 1)
    assert list(a.free_extents()) == [(0, 200_000)]
    a._check()


# -- the layout: bins, start map and page bits for small extents, treaps for large ones ---------


def _full(first: int, count: int, run_min: int = 1 << 40) -> Allocator:
    """An allocator with every page used (and no write cursor runs unless ``run_min`` allows)."""
    a = Allocator(first, count, free_all=False)
    a.RUN_MIN = run_min
    return a


@pytest.mark.parametrize("first", [0, (1 << 33) + 5])
def test_small_extents_merge_with_both_neighbours_across_chunks(first):
    a = _full(first, 1000)
    base = first - first % 64 + 64  # a chunk boundary inside the range
    for p in (base - 2, base + 1):  # one page each side of the boundary, one used page between
        a.free(p, 1)
    a.free(base - 1, 1)  # merges on the left only: (base - 2, 2), its end on the boundary
    assert list(a.free_extents()) == [(base - 2, 2), (base + 1, 1)]
    a._check()
    a.free(base, 1)  # both sides: the left one's start is found by walking back over the chunk
    assert list(a.free_extents()) == [(base - 2, 4)] and a.extents == 1
    a._check()
    a.free(base + 2, 3)  # right of it: grows at its end
    a.free(base - 10, 8)  # left of it: (base - 10, 8) + (base - 2, 7)
    assert list(a.free_extents()) == [(base - 10, 15)] and a.largest() == 15
    a._check()
    a.free(base + 20, 5)
    a.free(base + 17, 3)  # right neighbour only: it moves to the freed start
    assert list(a.free_extents()) == [(base - 10, 15), (base + 17, 8)]
    a._check()
    a.free(base + 5, 12)  # both
    assert list(a.free_extents()) == [(base - 10, 35)]
    a._check()


def test_extents_move_between_bins_and_trees():
    a = _full(0, 1000)
    a.free(200, 40)
    a.free(241, 29)
    a.free(240, 1)  # 40 + 1 + 29 = 70 pages: leaves the bins for the treaps
    assert list(a.free_extents()) == [(200, 70)] and a.largest() == 70
    a._check()
    assert a.allocate(10) == 200  # the rest, (210, 60), is small again
    assert a.largest() == 60
    a._check()
    a.free(200, 10)
    assert list(a.free_extents()) == [(200, 70)]
    # a large extent absorbs small neighbours on both sides
    a.free(190, 5)
    a.free(280, 3)
    a.free(195, 5)
    a.free(270, 10)
    assert list(a.free_extents()) == [(190, 93)]
    a._check()
    # two large extents joined by a small free
    a.free(300, 100)
    a.free(283, 17)
    assert list(a.free_extents()) == [(190, 210)] and a.extents == 1
    a._check()
    # a run carves the large extent down into a bin
    a.RUN_MIN = 64
    assert [a.allocate_run(50) for _ in range(3)] == [190, 240, 290]
    assert list(a.free_extents()) == [(340, 60)]
    a._check()
    assert a.allocate_run(60) == 340 and a.free_pages == 0 and a.extents == 0
    a._check()


def test_bins_are_newest_first_and_lose_members_from_the_middle():
    a = _full(0, 1000)
    for p in (10, 20, 30):
        a.free(p, 1)  # bin 1: 30, 20, 10
    a.free(21, 1)  # (20, 2): out of the middle of bin 1, into bin 2
    a._check()
    assert a.allocate(1) == 30 and a.allocate(1) == 10  # newest first
    assert a.allocate(1) == 20  # bin 1 is empty: the next bin that holds it, its front page
    assert list(a.free_extents()) == [(21, 1)]
    a._check()
    a.free(100, 3)
    a.free(110, 5)
    a.free(120, 63)
    a.free(200, 64)
    assert a.allocate(4) == 110  # the smallest bin that holds 4 pages
    assert a.allocate(63) == 120  # the last bin
    assert a.allocate(63) == 200  # no bin holds it: the large extent
    assert list(a.free_extents()) == [(21, 1), (100, 3), (114, 1), (263, 1)]
    a._check()


def test_equal_large_extents_go_lowest_start_first():
    a = _full(0, 2000)
    for p in (1500, 900, 100):
        a.free(p, 80)
    assert [a.allocate(70) for _ in range(3)] == [100, 900, 1500]
    b = Allocator.from_used(0, 1000, [(64, 100), (300, 100)])  # free: (0, 64), (164, 136), (400, 600)
    b.RUN_MIN = 64
    assert b.allocate_run(1) == 0  # a run in the best fit for 64 pages, not in the largest extent
    assert b.allocate_run(70) == 164  # 70 pages: the best fit for them (the cursor's extent is too small)
    a._check()
    b._check()


def test_maps_grow_rehash_and_delete_from_probe_runs():
    """20,000 one-page holes at random pages, nearly all in a 64-page chunk of their own: the
    start map and the chunk map double many times, their keys collide (sequential keys would
    spread without a collision), and draining them deletes entries from the middle of probe runs."""
    first = (1 << 40) + 3
    holes = 20_000
    a = _full(first, 1 << 36)
    pages = sorted(random.Random(7).sample(range(first, first + a.count, 3), holes))
    for i, p in enumerate(pages):
        a.free(p, 1)
        if i % 5000 == 0:
            a._check()
    assert a.extents == holes and a.largest() == 1
    a._check()
    got = [a.allocate(1) for _ in range(holes // 2)]
    taken = set(got)
    assert taken <= set(pages) and len(taken) == len(got)
    a._check()
    for p in pages:  # the rest, and each lookup must still find what it looks for
        if p not in taken:
            with pytest.raises(ValueError, match="double free"):
                a.free(p, 1)
    for p in got:
        a.free(p, 1)
    a._check()
    for _ in range(holes):
        a.allocate(1)
    assert a.extents == 0 and a.free_pages == 0
    a._check()
    # one extent again: fill every gap
    prev = first
    for p in pages:
        if p > prev:
            a.free(prev, p - prev)
        a.free(p, 1)
        prev = p + 1
    a.free(prev, first + a.count - prev)
    assert list(a.free_extents()) == [(first, a.count)]
    a._check()


def test_double_free_detection_names_the_free_extent():
    a = _full(0, 100_000)
    a.free(70, 5)  # small: (70, 5)
    a.free(1000, 200)  # large
    before = list(a.free_extents())
    for s, n, hit in [(72, 1, "(70, 5)"), (74, 3, "(70, 5)"), (60, 11, "(70, 5)"), (60, 20, "(70, 5)"),
                      (1100, 1, "(1000, 200)"), (990, 11, "(1000, 200)"), (1199, 5, "(1000, 200)"),
                      (0, 50_000, "(70, 5)"),  # a long range: the page bits are scanned by entry
                      (2, 90_000, "(70, 5)")]:
        with pytest.raises(ValueError, match=r"overlaps the free extent " + re.escape(hit) + r" \(double free\)"):
            a.free(s, n)
        assert list(a.free_extents()) == before
    a._check()
    a.free(75, 925)  # touches both: one extent (70, 1130)
    assert list(a.free_extents()) == [(70, 1130)]
    a._check()


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_against_a_page_map(seed):
    """Thousands of random allocate / allocate_run / free / bad frees against a byte per page,
    the free extents read off it with a regular expression after every step."""
    rnd = random.Random(seed)
    first = rnd.choice([0, 13, (1 << 35) + 1])
    count = rnd.choice([700, 3000])
    a = Allocator(first, count)
    a.RUN_MIN = rnd.choice([1, 16, 64, 1 << 40])
    pagemap = bytearray(b"\x01") * count  # 1: free
    used: list[tuple[int, int]] = []

    def extents():
        return [(first + m.start(), m.end() - m.start()) for m in re.finditer(b"\x01+", pagemap)]

    for step in range(2500):
        op = rnd.random()
        if op < 0.45:
            n = rnd.choice([1, 1, 1, 2, 3, 5, 8, 40, 70])
            fn = a.allocate if rnd.random() < 0.5 else a.allocate_run
            exts = extents()
            try:
                p = fn(n)
            except NoSpace:
                assert all(m < n for _, m in exts)
                continue
            size = dict(exts).get(p)
            assert size is not None and size >= n, (p, n)  # the front of a free extent
            if fn == a.allocate:
                assert size == min(m for _, m in exts if m >= n)  # best fit
            assert pagemap[p - first:p - first + n] == b"\x01" * n
            pagemap[p - first:p - first + n] = bytes(n)
            used.append((p, n))
        elif op < 0.9 and used:
            p, n = used.pop(rnd.randrange(len(used)))
            k = rnd.randrange(n)  # sometimes only the tail: the head stays used
            if k:
                used.append((p, k))
            a.free(p + k, n - k)
            pagemap[p + k - first:p + n - first] = b"\x01" * (n - k)
        else:
            s = rnd.randrange(first - 3, first + count + 3)
            n = rnd.choice([1, 2, 10, 100])
            inside = first <= s and s + n <= first + count
            if inside and not any(pagemap[s - first:s + n - first]):
                continue  # all used: a legal free, not a bad one
            with pytest.raises(ValueError, match="outside" if not inside else "double free"):
                a.free(s, n)
        assert list(a.free_extents()) == extents()
        assert a.free_pages == pagemap.count(1) and a.extents == len(extents())
        if step % 100 == 0:
            a._check()
    a._check()
