"""BlobStore behaviour: API, durability vocabulary, recovery, torn tails, corruption, faults.

Data files live under /work/main/.test-tmp (ext4) so O_DIRECT behaves as on a
real disk. Every test runs with the psync engine and, when the extension has
``Ring``, with the io_uring engine too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid

import blake3
import pytest

from ringblob import digest
from ringblob.direct import write_cache_of
from ringblob.engine.faulty import FaultyEngine
from ringblob.errors import (
    ConfigError,
    Corrupt,
    DigestMismatch,
    EngineClosed,
    InvalidKey,
    IOFailed,
    NoSpace,
    NotFound,
    ReadOnly,
    StoreLocked,
    TooLarge,
)
from ringblob.store import BlobStore
from ringblob.store import format as F
from ringblob.store.alloc import Allocator
from ringblob.store.blobstore import choose_sync_method

from conftest import ENGINES, TMP_ROOT

MiB = 1 << 20


@pytest.fixture
def tdir():
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, f"store-{uuid.uuid4().hex[:10]}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(params=["off", "on"])
def parallel_hash(request):
    """ringblob.digest's mode for large values (the daemon's parallel_hash setting), restored after:
    off (every digest on the loop's thread) and on (BLAKE3's pool and the hash worker; auto is
    one of the two, per CPU count: tests/test_digest.py)."""
    was = digest.mode()
    digest.configure(request.param)
    yield request.param
    digest.configure(was)


def run(coro):
    return asyncio.run(coro)


def flip_bit(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))
        f.flush()
        os.fsync(f.fileno())


def write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- API basics -------------------------------------------------------------------


def test_put_get_has_delete_list(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        assert s.stat()["engine"] == engine
        await s.put(b"a", b"1")
        await s.put(b"b", b"")
        await s.put(b"c", os.urandom(300_000))  # larger than one fixed buffer
        assert await s.get(b"a") == b"1"
        assert await s.get(b"b") == b""
        assert s.has(b"a") and not s.has(b"zz")
        assert s.value_size(b"c") == 300_000 and s.value_size(b"b") == 0 and s.value_size(b"zz") is None
        with pytest.raises(NotFound):
            await s.get(b"zz")
        with pytest.raises(KeyError):
            await s.get(b"zz")
        await s.put(b"a", b"2" * 5000)
        assert await s.get(b"a") == b"2" * 5000
        await s.delete(b"a")
        await s.delete(b"a")  # missing: not an error
        await s.delete(b"never")
        assert not s.has(b"a")
        assert [k async for k in s.list()] == [b"b", b"c"]
        st = s.stat()
        assert st["blob_count"] == 2
        assert st["used_bytes"] == 77 * 4096  # replaced/deleted extents wait for a durable record
        await s.flush()  # the replacing records are durable ...
        assert s.stat()["used_bytes"] == 77 * 4096
        await s.put(b"z", b"", sync=True)  # ... and a durable batch now says so: the old extents are free
        assert s.stat()["used_bytes"] == 74 * 4096  # 300_000 bytes -> 74 pages; empty values none
        await s.close()
        await s.close()

    run(main())


def test_keys_and_sizes_are_checked(tdir):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine="psync", max_blob_size=10_000)
        for bad in (b"", b"x" * 256, "str", 5):
            with pytest.raises(InvalidKey):
                await s.put(bad, b"v")
        await s.put(b"x" * 255, b"ok")
        with pytest.raises(TooLarge, match=r"value of 10001 bytes exceeds max_blob_size \(10000 bytes\).*--max-blob-size"):
            await s.put(b"k", bytes(10_001))
        with pytest.raises(TooLarge, match=r"for key b'big'"):  # put_many names the key
            await s.put_many([(b"ok", b"v"), (b"big", bytes(10_001))])
        assert not s.has(b"ok")  # and stores none of them
        await s.put(b"k", bytes(10_000))
        assert len(await s.get(b"k")) == 10_000
        await s.put(b"ba", bytearray(b"from a bytearray"))
        await s.put(b"mv", memoryview(b"0123456789")[2:5])
        assert await s.get(b"mv") == b"234"
        await s.close()

    run(main())


def test_verify_and_put_cas(tdir):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine="psync")
        v = b"content addressed"
        d = blake3.blake3(v).digest()
        await s.put(d, v, verify=True)
        assert await s.get(d) == v
        with pytest.raises(DigestMismatch):
            await s.put(b"\0" * 32, v, verify=True)
        assert not s.has(b"\0" * 32)
        with pytest.raises(DigestMismatch):
            await s.put(b"short", v, verify=True)
        used = s.stat()["used_bytes"]
        d2 = await s.put_cas(b"other bytes")
        assert d2 == blake3.blake3(b"other bytes").digest()
        assert await s.get(d2) == b"other bytes"
        assert s.stat()["used_bytes"] == used + 4096
        await s.close()

    run(main())


@pytest.mark.parametrize("sync_method", ["dsync", "fdatasync"])
def test_put_many_sync_is_one_ring_turn_and_get_many(tdir, engine, sync_method):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 16 * MiB, engine=engine, sync_method=sync_method)
        items = [(b"p%03d" % i, os.urandom(100 + i * 37)) for i in range(40)]
        before = s.stat()["engine_counters"]
        d0 = s.stat()["dsync_commits"]
        await s.put_many(items, sync=True)
        after = s.stat()["engine_counters"]
        if sync_method == "fdatasync":
            assert after["fdatasyncs"] - before["fdatasyncs"] == 1
            # the data writes and the journal write in one submit, the fdatasync in a second
            assert after["enters"] - before["enters"] == 2
            assert s.stat()["dsync_commits"] == d0
        else:
            # the writes carry RWF_DSYNC: one submit, no fdatasync
            assert after["fdatasyncs"] == before["fdatasyncs"]
            assert after["enters"] - before["enters"] == 1
            assert s.stat()["dsync_commits"] == d0 + 1
        assert not s.needs_flush
        got = await s.get_many([k for k, _ in items] + [b"missing"])
        assert got[:-1] == [v for _, v in items] and got[-1] is None
        with pytest.raises(InvalidKey):
            await s.put_many([(b"ok", b"1"), (b"", b"2")])
        assert not s.has(b"ok")  # checked before anything was written
        await s.close()

    run(main())


@pytest.mark.parametrize("sync_method", ["dsync", "fdatasync"])
def test_group_commit_shares_fdatasyncs(tdir, engine, sync_method):
    seen = []

    class Obs:
        def on_group_commit(self, n):
            seen.append(n)

    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 16 * MiB, engine=engine, observer=Obs(),
                                   sync_method=sync_method)
        f0, d0 = s.stat()["fdatasyncs"], s.stat()["dsync_commits"]
        await asyncio.gather(*(s.put(b"g%d" % i, b"v" * i, sync=True) for i in range(64)))
        st = s.stat()
        rounds = (st["fdatasyncs"] - f0) + (st["dsync_commits"] - d0)
        assert 0 < rounds < 64
        # nothing unsynced before them: with dsync no round needs an fdatasync
        assert (st["fdatasyncs"] - f0 if sync_method == "dsync" else st["dsync_commits"] - d0) == 0
        assert st["group_commit_writes"] == 64
        assert st["group_commits"] == rounds
        assert sum(seen) == 64 and max(seen) > 1
        for i in range(64):
            assert await s.get(b"g%d" % i) == b"v" * i
        await s.close()

    run(main())


def test_needs_flush_transitions_and_noop_flush(tdir, engine):
    skipped = []

    class Obs:
        def on_flush_skipped(self):
            skipped.append(1)

    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine=engine, observer=Obs())
        assert not s.needs_flush
        c0 = s.stat()["engine_counters"]
        await s.flush()  # nothing to do: no syscall
        c1 = s.stat()["engine_counters"]
        assert c1["enters"] == c0["enters"] and c1["fdatasyncs"] == c0["fdatasyncs"]
        assert skipped == [1]
        await s.put(b"k", b"v")
        assert s.needs_flush
        await s.flush()
        assert not s.needs_flush
        c2 = s.stat()["engine_counters"]
        assert c2["fdatasyncs"] == c1["fdatasyncs"] + 1
        await s.delete(b"k")
        assert s.needs_flush
        await s.put(b"k2", b"v", sync=True)  # a sync write makes the earlier ones durable too
        assert not s.needs_flush
        await s.delete(b"k2", sync=True)
        assert not s.needs_flush
        c3 = s.stat()["engine_counters"]
        await s.flush()
        assert s.stat()["engine_counters"]["enters"] == c3["enters"]
        await s.close()

    run(main())


def test_list_order_prefix_paging(tdir):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 16 * MiB, engine="psync")
        keys = sorted({os.urandom(1 + i % 5) for i in range(700)} | {b"pre/a", b"pre/b", b"pre/c", b"pre"})
        await s.put_many([(k, b"") for k in keys])
        assert [k async for k in s.list()] == keys
        assert [k async for k in s.list(limit=10)] == keys[:10]
        mid = keys[300]
        assert [k async for k in s.list(start_after=mid)] == keys[301:]
        assert [k async for k in s.list(prefix=b"pre")] == [k for k in keys if k.startswith(b"pre")]
        assert [k async for k in s.list(prefix=b"pre/", start_after=b"pre/a")] == [b"pre/b", b"pre/c"]
        assert [k async for k in s.list(prefix=b"pre/", limit=2)] == [b"pre/a", b"pre/b"]
        assert [k async for k in s.list(limit=0)] == []
        # paging the way a client does
        got, after = [], None
        while True:
            page = [k async for k in s.list(start_after=after, limit=64)]
            if not page:
                break
            got += page
            after = page[-1]
        assert got == keys
        await s.close()

    run(main())


def test_reader_sees_whole_old_or_new_value(tdir, engine):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 32 * MiB, engine=engine)
        vals = [bytes([i]) * (200_000 + i) for i in range(6)]
        await s.put(b"k", vals[0])
        seen = set()

        async def reader():
            for _ in range(30):
                v = await s.get(b"k")
                assert v in vals
                seen.add(v[0])

        async def writer():
            for v in vals[1:]:
                await s.put(b"k", v)

        await asyncio.gather(reader(), reader(), writer())
        assert await s.get(b"k") == vals[-1]
        await s.close()

    run(main())


# -- persistence, checkpoints ---------------------------------------------------------


def test_reopen_after_close_and_after_crash(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"a", b"A" * 10_000, sync=True)
        await s.put(b"b", b"B")
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert s.stat()["checkpoints"] == 1
        assert await s.get(b"a") == b"A" * 10_000 and await s.get(b"b") == b"B"
        await s.put(b"c", b"C", sync=True)
        await s.delete(b"a", sync=True)
        await s.abandon()  # crash: no checkpoint, the journal tail must be replayed
        s = await BlobStore.open(p, engine=engine)
        assert s.stat()["recovered_records"] == 2
        assert not s.has(b"a") and await s.get(b"c") == b"C" and await s.get(b"b") == b"B"
        await s.close()

    run(main())


def test_many_checkpoints_bound_replay_and_keep_data(tdir, engine):
    events = []

    class Obs:
        def on_checkpoint(self, seconds):
            events.append(("checkpoint", seconds))

        def on_fdatasync(self, seconds):
            events.append(("fdatasync", seconds))

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, journal_size=256 * 1024, engine=engine,
                                   checkpoint_threshold=16 * 4096, observer=Obs())
        model = {}
        for i in range(300):
            k = b"k%d" % (i % 37)
            if i % 7 == 3:
                await s.delete(k, sync=True)
                model.pop(k, None)
            else:
                v = os.urandom(i % 9000)
                await s.put(k, v, sync=i % 2 == 0)
                model[k] = v
        st = s.stat()
        assert st["checkpoints"] >= 5
        assert st["journal_bytes"] <= 256 * 1024
        assert sum(1 for e in events if e[0] == "checkpoint") == st["checkpoints"]
        assert sum(1 for e in events if e[0] == "fdatasync") == st["fdatasyncs"]
        assert all(sec >= 0 for _n, sec in events)
        await s.abandon()
        s = await BlobStore.open(p, engine=engine)
        assert s.stat()["recovered_records"] <= 40  # bounded tail, not 300
        assert {k: await s.get(k) for k in [k async for k in s.list()]} == model
        used_pages = sum(-(-len(v) // 4096) for v in model.values())
        st = s.stat()
        ck = (len(s._ckpt_extents) + len(s._prev_ckpt_extents))
        assert st["used_bytes"] >= used_pages * 4096
        assert ck <= 2 * 2 and st["used_bytes"] <= (used_pages + 2 * 2) * 4096  # no leaked extents
        await s.close()

    run(main())


def test_journal_wraps_many_times(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, journal_size=256 * 1024, engine="psync")
        for i in range(400):
            await s.put(b"w%d" % (i % 10), b"%d" % i, sync=True)
        assert s.stat()["journal_bytes_written"] > 3 * 256 * 1024
        await s.abandon()
        s = await BlobStore.open(p, engine="psync")
        for j in range(10):
            assert await s.get(b"w%d" % j) == b"%d" % (390 + j)
        await s.close()

    run(main())


def test_create_refuses_existing_and_open_create_size(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.open(p, create_size=8 * MiB, engine="psync")  # absent: formats
        await s.put(b"k", b"v")
        await s.close()
        with pytest.raises(ConfigError):
            await BlobStore.create(p, 8 * MiB, engine="psync")
        s = await BlobStore.open(p, create_size=8 * MiB, engine="psync")  # present: opens
        assert await s.get(b"k") == b"v"
        await s.close()
        s = await BlobStore.create(p, 8 * MiB, engine="psync", force=True)
        assert not s.has(b"k")
        await s.close()
        with pytest.raises(FileNotFoundError):
            await BlobStore.open(os.path.join(tdir, "nope"), engine="psync")
        junk = os.path.join(tdir, "junk")
        with open(junk, "wb") as f:
            f.write(os.urandom(1 * MiB))
        with pytest.raises(Corrupt):
            await BlobStore.open(junk, engine="psync")

    run(main())


def test_read_only_open(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"k", b"v", sync=True)
        await s.abandon()
        s = await BlobStore.open(p, engine="psync", read_only=True)
        assert await s.get(b"k") == b"v"
        with pytest.raises(ReadOnly):
            await s.put(b"x", b"y")
        with pytest.raises(ReadOnly):
            await s.delete(b"k")
        assert s.stat()["read_only"]
        await s.close()

    run(main())


# -- torn journal tails ------------------------------------------------------------------


def _journal_tail(s) -> tuple[int, int]:
    """(file offset of the last batch, its length) — read from the store's own state."""
    return s._joff + (s._last_batch_pos % s._jbytes), s._last_batch_len


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zeroed", "header-bit"])
def test_torn_journal_tail_recovers_valid_prefix(tdir, damage, caplog):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        for i in range(5):
            await s.put(b"k%d" % i, b"v%d" % i, sync=True)
        await s.put_many([(b"t%d" % i, b"x" * 3000) for i in range(200)], sync=True)  # one multi-block batch
        await s.put(b"k0", b"new", sync=True)  # replaces k0 in the last batch
        off, ln = _journal_tail(s)
        await s.abandon()
        if damage == "truncated":
            write_at(p, off + F.BATCH_HEADER_SIZE + 10, bytes(60))  # the record's tail never landed
        elif damage == "garbage":
            write_at(p, off, os.urandom(4096))
        elif damage == "zeroed":
            write_at(p, off, bytes(4096))
        else:
            flip_bit(p, off + 20, 3)
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"k0") == b"v0"  # the old value: the torn batch is dropped
        for i in range(1, 5):
            assert await s.get(b"k%d" % i) == b"v%d" % i
        assert await s.get(b"t199") == b"x" * 3000
        # the store goes on writing over the dropped tail
        await s.put(b"after", b"ok", sync=True)
        await s.abandon()
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"after") == b"ok" and await s.get(b"k0") == b"v0"
        await s.close()

    with caplog.at_level("INFO", logger="ringblob.store"):
        run(main())
    assert any("journal" in r.getMessage() for r in caplog.records)


def test_stale_batch_after_torn_one_is_not_replayed(tdir):
    """A shorter batch written over a dropped tail must not chain into the old batches after it."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"a", b"1", sync=True)
        await s.put_many([(b"m%d" % i, b"y") for i in range(150)], sync=True)  # a 2-block batch
        off, ln = _journal_tail(s)
        assert ln >= 8192
        await s.put(b"stale", b"must not come back", sync=True)
        await s.abandon()
        write_at(p, off, bytes(4096))  # tear the big batch: 'stale' follows it on disk
        s = await BlobStore.open(p, engine="psync")
        assert not s.has(b"stale") and not s.has(b"m0")
        await s.put(b"b", b"2", sync=True)  # a 1-block batch where the torn one began
        await s.put(b"c", b"3", sync=True)  # lands on the torn batch's second block
        await s.abandon()
        s = await BlobStore.open(p, engine="psync")
        assert not s.has(b"stale")
        assert await s.get(b"b") == b"2" and await s.get(b"c") == b"3"
        await s.close()

    run(main())


# -- corruption -----------------------------------------------------------------------------


def test_flipped_data_bit_is_corrupt_on_get_and_scrub(tdir, engine, parallel_hash):
    failures = []

    class Obs:
        def on_checksum_failure(self, key):
            failures.append(key)

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine=engine, observer=Obs())
        await s.put(b"good", b"g" * 5000)
        await s.put(b"bad", b"b" * 5000)
        await s.put(b"big", os.urandom(400_000), sync=True)
        page = s._index.get(b"bad")[0]
        bpage = s._index.get(b"big")[0]
        await s.close()
        flip_bit(p, page * 4096 + 1234, 5)
        flip_bit(p, bpage * 4096 + 300_000, 1)
        s = await BlobStore.open(p, engine=engine, observer=Obs())
        assert await s.get(b"good") == b"g" * 5000
        with pytest.raises(Corrupt) as ei:
            await s.get(b"bad")
        assert ei.value.keys == [b"bad"]
        with pytest.raises(Corrupt):
            await s.get(b"big")
        assert s.stat()["parallel_hash"] is (parallel_hash == "on")
        assert s.stat()["hash_worker"] is (parallel_hash == "on")
        rep = await s.scrub()
        assert sorted(rep["bad_keys"]) == [b"bad", b"big"]
        assert rep["checked"] == 3
        assert s.stat()["checksum_failures"] == 4
        assert failures.count(b"bad") == 2
        await s.delete(b"bad")  # the way out: delete and restore
        await s.put(b"bad", b"fixed")
        assert (await s.scrub())["bad_keys"] == [b"big"]
        await s.close()

    run(main())


@pytest.mark.parametrize("slot", ["newer", "older"])
def test_flipped_superblock_bit_falls_back_to_other_slot(tdir, slot, caplog):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"a", b"1")
        await s.close()  # checkpoint 1 (generation 2)
        s = await BlobStore.open(p, engine="psync")
        await s.put(b"b", b"2")
        await s.close()  # checkpoint 2 (generation 3)
        gens = []
        for i in (0, 1):
            with open(p, "rb") as f:
                f.seek(i * 4096)
                gens.append(F.Superblock.decode(f.read(4096)).generation)
        newer = gens.index(max(gens))
        target = newer if slot == "newer" else 1 - newer
        flip_bit(p, target * 4096 + 50, 2)
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"a") == b"1" and await s.get(b"b") == b"2"
        await s.put(b"c", b"3")
        await s.close()  # the next checkpoint rewrites a slot; both are valid again
        s = await BlobStore.open(p, engine="psync")
        assert [k async for k in s.list()] == [b"a", b"b", b"c"]
        await s.close()

    with caplog.at_level("WARNING", logger="ringblob.store"):
        run(main())
    assert any("superblock slot" in r.getMessage() for r in caplog.records)


def test_both_superblocks_damaged_is_corrupt(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.close()
        flip_bit(p, 100)
        flip_bit(p, 4096 + 100)
        with pytest.raises(Corrupt):
            await BlobStore.open(p, engine="psync")

    run(main())


# -- space -----------------------------------------------------------------------------------


def test_nospace_changes_nothing_and_store_stays_usable(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 4 * MiB, journal_size=256 * 1024, engine="psync")
        free = s.stat()["free_bytes"]
        with pytest.raises(NoSpace):
            await s.put(b"huge", bytes(free + 4096))
        assert not s.has(b"huge") and s.stat()["free_bytes"] == free
        i = 0
        with pytest.raises(NoSpace):
            while True:
                await s.put(b"f%d" % i, os.urandom(100_000))
                i += 1
        assert i > 5
        st = s.stat()
        assert not st["read_only"]
        c = st["checkpoints"]
        await s.checkpoint()  # the space a checkpoint needs was kept back from the puts
        st = s.stat()
        assert st["checkpoints"] == c + 1 and not st["read_only"]
        with pytest.raises(NoSpace):
            await s.put_many([(b"x1", b"1"), (b"x2", bytes(st["free_bytes"] + 4096))])
        assert not s.has(b"x1") and s.stat()["free_bytes"] == st["free_bytes"]
        assert len(await s.get(b"f0")) == 100_000
        await s.delete(b"f0")
        await s.delete(b"f1")
        await s.put(b"again", os.urandom(150_000), sync=True)  # space given back by the deletes
        assert s.stat()["fragmentation"] >= 0.0
        await s.close()
        s = await BlobStore.open(p, engine="psync")
        assert len(await s.get(b"again")) == 150_000
        await s.close()

    run(main())


def test_allocator_best_fit_merge_and_fragmentation():
    a = Allocator(10, 100)
    assert a.free_pages == 100 and a.fragmentation() == 0.0
    x, y, z = a.allocate(10), a.allocate(20), a.allocate(5)
    assert (x, y, z) == (10, 20, 40)
    a.free(y, 20)
    assert a.extents == 2 and a.fragmentation() == pytest.approx(1 - 65 / 85)
    assert a.allocate(3) == 20  # best fit: the 20-page hole, not the 65-page tail
    a.free(20, 3)
    a.free(x, 10)
    a.free(z, 5)
    assert list(a.free_extents()) == [(10, 100)]


def test_allocator_best_fit_prefers_smallest_hole():
    a = Allocator(0, 100)
    exts = [a.allocate(10) for _ in range(10)]
    a.free(exts[2], 10)  # hole of 10 at 20
    a.free(exts[5], 10)
    a.free(exts[6], 10)  # hole of 20 at 50 (merged)
    assert a.extents == 2
    assert a.allocate(10) == 20  # exact fit, not the 20-page hole
    assert a.allocate(15) == 50
    a.free(20, 10)
    a.free(50, 15)
    with pytest.raises(NoSpace):
        a.allocate(25)
    assert a.free_pages == 30
    for e in exts:
        if e not in (20, 50, 60):
            a.free(e, 10)
    assert list(a.free_extents()) == [(0, 100)] and a.fragmentation() == 0.0
    with pytest.raises(ValueError):
        a.free(0, 10)  # double free
    b = Allocator.from_used(0, 50, [(10, 5), (30, 10)])
    assert list(b.free_extents()) == [(0, 10), (15, 15), (40, 10)]
    with pytest.raises(ValueError):
        Allocator.from_used(0, 50, [(10, 5), (12, 5)])



def test_allocator_run_keeps_small_allocations_side_by_side():
    a = Allocator(0, 1000)
    a.RUN_MIN = 64
    filler = a.allocate(100)  # [0, 100) used, free: [100, 1000)
    a.free(40, 10)  # a 10-page hole at 40: best fit would take it first
    assert filler == 0
    pages = [a.allocate_run(1) for _ in range(5)] + [a.allocate_run(3), a.allocate_run(1)]
    assert pages == [100, 101, 102, 103, 104, 105, 108]  # consecutive, not the hole
    assert a.free_pages == 900 + 10 - 9
    # freeing the page before the cursor merges into its extent: the next run starts at the largest
    a.free(108, 1)
    assert a.allocate_run(2) == 108
    # the cursor's extent runs out: a new run in the largest extent (>= RUN_MIN pages)
    b = Allocator(0, 300)
    b.RUN_MIN = 64
    b.allocate(100)
    b.free(0, 70)  # free: [0, 70) and [100, 300)
    assert b.allocate_run(150) == 100 and b.allocate_run(50) == 250
    assert b.allocate_run(10) == 0  # [0, 70) is now the largest
    # no extent of RUN_MIN pages: best fit fills the smallest hole that holds it
    c = Allocator(0, 100)
    c.RUN_MIN = 64
    used = [c.allocate(10) for _ in range(10)]
    c.free(used[3], 10)
    c.free(used[7], 10)
    c.free(used[8], 10)
    assert c.allocate_run(5) == 30
    with pytest.raises(NoSpace):
        c.allocate_run(30)
    assert c.free_pages == 25
    with pytest.raises(ValueError):
        c.allocate_run(0)
    # every page handed out once, free space intact: allocate everything by runs and give it back
    d = Allocator(0, 500)
    d.RUN_MIN = 64
    got = []
    with pytest.raises(NoSpace):
        while True:
            got.append((d.allocate_run(3), 3))
    assert d.free_pages == 500 - 3 * len(got) < 3
    assert len({p for p, _ in got}) == len(got)
    for p, n in got:
        d.free(p, n)
    assert list(d.free_extents()) == [(0, 500)]


# -- I/O errors ------------------------------------------------------------------------------


def _faulty_open(p, engine, **kw):
    holder = {}

    def wrap(e):
        holder["e"] = FaultyEngine(e, **kw)
        return holder["e"]

    return holder, wrap


@pytest.mark.parametrize("kind", ["fdatasync", "write"])
def test_eio_turns_store_read_only_and_reopen_recovers(tdir, engine, kind):
    reasons = []

    class Obs:
        def on_read_only(self, reason):
            reasons.append(reason)

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine=engine)
        await s.put(b"kept", b"durable", sync=True)
        await s.close()
        holder, wrap = _faulty_open(p, engine)
        s = await BlobStore.open(p, engine=engine, wrap_engine=wrap, observer=Obs())
        await s.put(b"acked", b"not yet durable")
        holder["e"].fail_next(kind)
        results = await asyncio.gather(*(s.put(b"s%d" % i, b"v", sync=True) for i in range(5)),
                                       return_exceptions=True)
        errs = [r for r in results if isinstance(r, Exception)]
        assert errs and all(isinstance(e, (IOFailed, ReadOnly)) for e in errs)
        io = [e for e in errs if isinstance(e, IOFailed)]
        assert io and io[0].errno in (errno.EIO, errno.ECANCELED)
        assert s.read_only and s.stat()["read_only"] and reasons
        with pytest.raises(ReadOnly):
            await s.put(b"later", b"x")
        with pytest.raises(ReadOnly):
            await s.delete(b"kept")
        with pytest.raises(ReadOnly):
            await s.flush()  # 'acked' can no longer be made durable
        assert await s.get(b"kept") == b"durable"  # reads go on
        assert await s.get(b"acked") == b"not yet durable"
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"kept") == b"durable"
        assert not s.read_only
        await s.put(b"later", b"x", sync=True)
        for i in range(5):  # failed requests: absent or their full value, never anything else
            if s.has(b"s%d" % i):
                assert await s.get(b"s%d" % i) == b"v"
        await s.close()

    run(main())


class _OrderRecorder:
    """Engine wrapper that records, per op, its kind, link flag and which writes had completed
    (been reaped) when it was queued."""

    def __init__(self, inner):
        self._inner = inner
        self.log = []  # ("write"|"fdatasync", link, tag, frozenset of reaped write tags)
        self._queued = set()
        self._reaped = set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write_fixed(self, buf, offset, length, tag, **kw):
        self.log.append(("write", kw.get("link", False), tag, frozenset(self._reaped)))
        self._queued.add(tag)
        return self._inner.write_fixed(buf, offset, length, tag, **kw)

    def fdatasync(self, tag, **kw):
        self.log.append(("fdatasync", kw.get("link", False), tag, frozenset(self._reaped)))
        return self._inner.fdatasync(tag, **kw)

    def _seen(self, cqes):
        for tag, res in cqes:
            if tag in self._queued and not isinstance(res, BaseException):
                self._reaped.add(tag)
        return cqes

    def reap(self, max_cqes=256):
        return self._seen(self._inner.reap(max_cqes))

    def wait(self, min_complete=1, timeout=None):
        return self._seen(self._inner.wait(min_complete, timeout))


def test_group_commit_writes_unlinked_then_fdatasync_after_all_completed(tdir, engine):
    """The round's data and journal writes go out unlinked (they may run in parallel); its
    fdatasync is queued only after every one of them completed."""
    holder = {}

    def wrap(e):
        holder["e"] = _OrderRecorder(e)
        return holder["e"]

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, wrap_engine=wrap)
        rec = holder["e"]
        rec.log.clear()
        await asyncio.gather(*(s.put(b"k%03d" % i, os.urandom(5000 + 3 * i), sync=True) for i in range(24)))
        await s.put_many([(b"m%d" % i, os.urandom(200)) for i in range(10)], sync=True)
        await s.put(b"lazy", b"x")
        await s.flush()
        writes = [e for e in rec.log if e[0] == "write"]
        syncs = [e for e in rec.log if e[0] == "fdatasync"]
        assert len(writes) >= 3 and syncs
        assert not any(e[1] for e in rec.log), "no op of a commit is linked"
        for i, e in enumerate(rec.log):
            if e[0] == "fdatasync":
                before = {w[2] for w in rec.log[:i] if w[0] == "write"}
                assert before <= e[3], "an fdatasync went out before every earlier write completed"
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert len(await s.get(b"k023")) == 5000 + 3 * 23 and await s.get(b"lazy") == b"x"
        await s.close()

    run(main())


def test_failed_data_write_issues_no_fdatasync(tdir, engine):
    """A write of the round fails: the fdatasync is never issued, every request of the round
    fails with IOFailed and the store turns read-only; reopening drops the round's records
    (their data did not land) and keeps everything durable before it."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine=engine)
        await s.put(b"kept", b"durable", sync=True)
        await s.close()
        holder, wrap = _faulty_open(p, engine)
        s = await BlobStore.open(p, engine=engine, wrap_engine=wrap)
        fe = holder["e"]
        syncs = fe.fdatasyncs
        fe.fail_next("write")  # the first write of the round: a data write (the journal write comes last)
        results = await asyncio.gather(*(s.put(b"s%d" % i, b"v%d" % i * 700, sync=True) for i in range(4)),
                                       return_exceptions=True)
        assert all(isinstance(r, (IOFailed, ReadOnly)) for r in results)
        assert any(isinstance(r, IOFailed) and r.errno == errno.EIO for r in results)
        assert fe.fdatasyncs == syncs, "an fdatasync was issued after a failed write"
        assert s.read_only
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"kept") == b"durable"
        for i in range(4):  # absent, or (a value that landed after all) its full bytes
            if s.has(b"s%d" % i):
                assert await s.get(b"s%d" % i) == b"v%d" % i * 700
        await s.put(b"after", b"x", sync=True)
        await s.close()

    run(main())


def test_eio_on_large_value_data_write(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, "psync")
        s = await BlobStore.create(p, 8 * MiB, engine="psync", wrap_engine=wrap)
        await s.put(b"a", b"1", sync=True)
        holder["e"].fail_next("write")
        with pytest.raises(IOFailed):
            await s.put(b"big", os.urandom(1 * MiB), sync=True)
        assert s.read_only
        assert await s.get(b"a") == b"1"
        await s.close()

    run(main())


def test_faulty_engine_cancels_linked_ops(tdir):
    from ringblob.direct import open_direct
    from ringblob.engine.aio import AsyncEngine
    from ringblob.engine.psync import PsyncEngine

    async def main():
        df = open_direct(os.path.join(tdir, "f"), create_size=1 * MiB)
        fe = FaultyEngine(PsyncEngine([df.fd], block_size=df.block_size), fail_write=2)
        aio = AsyncEngine(fe)
        (b,) = await aio.lease(1)
        b.view[:4096] = b"a" * 4096
        res = await aio.run([("write", b, 0, 4096, 0), ("write", b, 4096, 4096, 0), ("write", b, 8192, 4096, 0),
                             ("fdatasync",)], link=True)
        assert res[0] == 4096
        assert isinstance(res[1], OSError) and res[1].errno == errno.EIO
        assert all(isinstance(r, OSError) and r.errno == errno.ECANCELED for r in res[2:])
        aio.release(b)
        aio.close()
        df.close()
        with open(os.path.join(tdir, "f"), "rb") as f:
            data = f.read(12288)
        assert data[:4096] == b"a" * 4096 and data[4096:] == bytes(8192)  # lost writes left no trace
        assert fe.injected == 3

    run(main())


# -- locking --------------------------------------------------------------------------------


def test_second_opener_is_refused_with_pid(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        code = (
            "import asyncio,sys\n"
            "from ringblob.store import BlobStore\n"
            "from ringblob.errors import StoreLocked\n"
            "async def m():\n"
            "    try:\n"
            f"        await BlobStore.open({p!r}, engine='psync')\n"
            "    except StoreLocked as e:\n"
            "        print('LOCKED', e); return\n"
            "    print('OPENED')\n"
            "asyncio.run(m())\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "LOCKED" in out.stdout, out.stdout + out.stderr
        assert f"pid {os.getpid()}" in out.stdout
        with pytest.raises(StoreLocked):
            await BlobStore.open(p, engine="psync")
        await s.close()
        s = await BlobStore.open(p, engine="psync")  # released on close
        await s.close()

    run(main())


# -- format unit checks ---------------------------------------------------------------------


def test_format_roundtrips_and_crc_checks():
    sb = F.Superblock(store_id=7, generation=3, page_size=4096, batch_max=65536, total_pages=100,
                      journal_page=2, journal_pages=16, data_page=18, replay_pos=12345, next_seq=9)
    raw = sb.encode(4096)
    assert len(raw) == 4096 and F.Superblock.decode(raw) == sb
    bad = bytearray(raw)
    bad[30] ^= 1
    assert F.Superblock.decode(bytes(bad)) is None
    recs = [F.encode_put(5, b"key", 99, 1234, b"d" * 32), F.encode_delete(6, b"key"),
            F.encode_checkpoint(7, 2, 4)]
    batch, hcrc = F.encode_batch(7, 5, recs, 4, 0xABC, 4096)
    h = F.decode_batch_header(batch)
    assert (h.first_seq, h.nrec, h.durable_seq, h.prev_crc, h.hdr_crc, h.nblocks) == (5, 3, 4, 0xABC, hcrc, 1)
    got, problem = F.decode_records(batch[F.BATCH_HEADER_SIZE:F.BATCH_HEADER_SIZE + h.payload_len], 5, 3)
    assert problem is None
    assert got[0] == (F.REC_PUT, 5, b"key", 99, 1234, b"d" * 32)
    assert got[1][:3] == (F.REC_DELETE, 6, b"key") and got[2][:4] == (F.REC_CHECKPOINT, 7, None, 2)
    torn = bytearray(batch)
    torn[F.BATCH_HEADER_SIZE + len(recs[0]) + 12] ^= 0xFF  # a seq byte of record 6
    got, problem = F.decode_records(torn[F.BATCH_HEADER_SIZE:F.BATCH_HEADER_SIZE + h.payload_len], 5, 3)
    assert len(got) == 1 and "CRC32C" in problem


# -- the compact index -------------------------------------------------------------------


def test_index_against_dict_with_compaction_and_reload():
    import random

    from ringblob.store.index import Index

    rnd = random.Random(5)
    ix = Index()
    model = {}
    keys = [rnd.randbytes(rnd.randrange(1, 40)) for _ in range(3000)] + [b"\x00", b"\xff" * 255]
    for step in range(60000):
        k = rnd.choice(keys)
        if rnd.random() < 0.6:
            v = (rnd.randrange(1 << 40), rnd.randrange(1 << 31), rnd.randbytes(32))
            assert ix.set(k, *v) == model.get(k)
            model[k] = v
        else:
            assert ix.remove(k) == model.pop(k, None)
        if step % 5000 == 0:
            assert ix.keys_after(None, False, 1 << 30) == sorted(model)
    # force a compaction: delete most keys
    for k in list(model)[: len(model) * 9 // 10]:
        ix.remove(k)
        del model[k]
    big = [(rnd.randbytes(200), (7, 9, b"d" * 32)) for _ in range(12000)]
    for k, v in big:
        ix.set(k, *v)
        model[k] = v
    for k, _ in big[:11000]:
        ix.remove(k)
        del model[k]
    assert ix._garbage < len(ix._arena)  # compacted at least once
    assert len(ix) == len(model)
    srt = sorted(model)
    assert ix.keys_after(None, False, 1 << 30) == srt
    assert all(ix.get(k) == model[k] for k in srt) and ix.get(b"absent") is None
    mid = srt[len(srt) // 2]
    assert ix.keys_after(mid, False, 5) == srt[len(srt) // 2 + 1 : len(srt) // 2 + 6]
    assert ix.keys_after(mid, True, 5) == srt[len(srt) // 2 : len(srt) // 2 + 5]
    assert ix.key_bytes == sum(map(len, model)) and ix.value_bytes == sum(v[1] for v in model.values())
    blob = b"".join(ix.iter_entries())
    assert len(blob) == ix.entries_size()
    ix2 = Index()
    ix2.load_entries(blob, len(ix))
    assert ix2.keys_after(None, False, 1 << 30) == srt
    assert all(ix2.get(k) == model[k] for k in srt)
    assert sorted(ix2.extents(4096)) == sorted(v[0] << 32 | -(-v[1] // 4096) for v in model.values() if v[1])
    with pytest.raises(ValueError):
        Index().load_entries(blob[:-1], len(ix))


def test_in_flight_read_pins_the_old_extent(tdir, engine):
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 16 * MiB, engine=engine)
        old = os.urandom(2 * MiB)
        await s.put(b"k", old, sync=True)
        page = s._index.get(b"k")[0]
        s._pin(page)  # what get() does around its read (white-box: a read that takes forever)
        await s.put(b"k", os.urandom(2 * MiB), sync=True)  # the replacing record is durable ...
        await s.put(b"other", b"", sync=True)  # ... and recorded so in a durable batch
        assert not any(st <= page < st + n for st, n in s._alloc.free_extents())
        assert page in s._free_on_unpin  # ... but the extent waits for the read
        assert bytes(await s._aio.read(page * 4096, len(old))) == old  # nobody wrote over it
        s._unpin(page)
        assert any(st <= page < st + n for st, n in s._alloc.free_extents())
        # a real get pins and unpins around its read
        reader = asyncio.ensure_future(s.get(b"k"))
        await asyncio.sleep(0)
        assert s._index.get(b"k")[0] in s._pins
        await reader
        assert not s._pins
        await s.close()

    run(main())


def test_failed_read_is_ioerror_not_read_only(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, "psync")
        s = await BlobStore.create(p, 8 * MiB, engine="psync", wrap_engine=wrap)
        await s.put(b"k", b"v" * 9000, sync=True)
        holder["e"].fail_next("read")
        with pytest.raises(IOFailed) as ei:
            await s.get(b"k")
        assert ei.value.errno == errno.EIO
        assert not s.read_only
        assert await s.get(b"k") == b"v" * 9000
        await s.put(b"k2", b"w", sync=True)
        await s.close()

    run(main())


def test_store_under_uvloop(tdir, engine):
    uvloop = pytest.importorskip("uvloop")

    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine=engine)
        await asyncio.gather(*(s.put(b"u%d" % i, b"x" * (i * 100), sync=True) for i in range(50)))
        assert s.stat()["group_commit_writes"] == 50
        assert await s.get_many([b"u3", b"u49"]) == [b"x" * 300, b"x" * 4900]
        await s.close()

    uvloop.run(main())


def test_tiny_pool_and_queue_depth_still_work(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, buffer_count=3, buffer_size=65536, queue_depth=4)
        vals = {b"t%d" % i: os.urandom(i * 7919 % 300_000) for i in range(30)}
        await asyncio.gather(*(s.put(k, v, sync=bool(i % 2)) for i, (k, v) in enumerate(vals.items())))
        await s.put_many(list(vals.items())[:10], sync=True)
        got = await s.get_many(list(vals))
        assert got == list(vals.values())
        await s.close()
        with pytest.raises(ConfigError):
            await BlobStore.open(p, engine=engine, queue_depth=2)

    run(main())


def test_record_whose_data_never_landed_ends_the_journal(tdir, caplog):
    """A record past the last durable point whose extent does not hash to its digest is never
    served: replay stops at its batch, so later records (never durable either) go too."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"a", b"durable", sync=True)
        await s.put(b"obj", b"O" * 6000)  # sync=False: record and data written, not durable
        page = s._index.get(b"obj")[0]
        await s.put(b"manifest", b"refers to obj")  # a later batch
        await s.abandon()
        write_at(p, page * 4096, bytes(8192))  # the power cut lost obj's data but kept the records
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"a") == b"durable"
        assert not s.has(b"obj") and not s.has(b"manifest")  # a visible manifest implies its objects
        assert s.stat()["recovery_dropped_records"] == 2
        await s.put(b"next", b"n", sync=True)  # written where the dropped batches began
        await s.abandon()
        s = await BlobStore.open(p, engine="psync")
        assert [k async for k in s.list()] == [b"a", b"next"]
        assert s.stat()["recovery_dropped_records"] == 0
        await s.close()

    with caplog.at_level("WARNING", logger="ringblob.store"):
        run(main())
    assert any("did not reach the medium" in r.getMessage() for r in caplog.records)


def test_read_error_while_verifying_the_tail_refuses_the_open(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"base", b"b" * 100, sync=True)
        await s.put(b"k", b"v" * 5000)
        await s.flush()  # acknowledged durable, but no durable batch records it yet
        page = s._index.get(b"k")[0]
        await s.abandon()
        holder = {}

        def wrap(e):
            holder["e"] = FaultyEngine(e)
            holder["e"].fail_range("read", page * 4096, page * 4096 + 5000)  # a bad spot
            return holder["e"]

        with pytest.raises(IOFailed) as ei:
            await BlobStore.open(p, engine="psync", wrap_engine=wrap)
        assert holder["e"].hits == 2  # tried twice, then refused the open
        assert "verify" in str(ei.value) and ei.value.errno == errno.EIO
        s = await BlobStore.open(p, engine="psync")  # nothing was dropped
        assert await s.get(b"k") == b"v" * 5000
        await s.close()

    run(main())


def test_failed_checkpoint_is_IOFailed_and_close_logs_it(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, "psync")
        s = await BlobStore.create(p, 8 * MiB, engine="psync", wrap_engine=wrap)
        await s.put(b"a", b"1" * 5000, sync=True)
        await s.put(b"b", b"2")
        holder["e"].fail_next("fdatasync")
        with pytest.raises(IOFailed) as ei:
            await s.checkpoint()
        assert ei.value.errno == errno.EIO and s.read_only
        await s.close()
        holder2, wrap2 = _faulty_open(p, "psync")
        s = await BlobStore.open(p, engine="psync", wrap_engine=wrap2)
        assert await s.get(b"a") == b"1" * 5000
        await s.put(b"c", b"3", sync=True)
        holder2["e"].fail_next("write")  # the checkpoint chunk close() writes
        await s.close()  # logged, not raised
        assert s.closed
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"a") == b"1" * 5000 and await s.get(b"c") == b"3"
        await s.close()

    run(main())


def test_extents_freed_by_replay_are_reused_only_after_the_durable_point_is_recorded(tdir, monkeypatch):
    """Replay frees the extents of records it superseded. If a put reused one before the
    recovered durable point was on disk, a crash that lost that put's journal batch would make
    the next recovery verify the superseded record against the reused pages and end the
    journal there, dropping later acknowledged writes."""
    monkeypatch.setattr(Allocator, "RUN_MIN", 1 << 40)  # no write cursor: best fit reuses the freed hole

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine="psync")
        await s.put(b"k", b"1" * 6000)  # R1: not durable when written
        e1 = s._index.get(b"k")[0]
        await s.put(b"k", b"2" * 6000, sync=True)  # R2: acknowledged durable; no batch records it
        await s.abandon()
        s = await BlobStore.open(p, engine="psync")  # verifies R1 and R2, frees R1's extent
        assert await s.get(b"k") == b"2" * 6000
        await s.put(b"x", b"X" * 6000)  # may land on R1's old extent
        assert s._index.get(b"x")[0] == e1  # (it does: best fit, lowest page)
        off, _ln = _journal_tail(s)
        await s.abandon()
        write_at(p, off, bytes(4096))  # the power cut kept x's data but not its journal batch
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"k") == b"2" * 6000  # the acknowledged write survives
        assert not s.has(b"x")
        await s.close()

    run(main())


# -- zero fill at format time -------------------------------------------------------------


def _unwritten_extents(path: str) -> int | None:
    """Extents of ``path`` flagged unwritten (FIEMAP), or None when the file system has no FIEMAP."""
    import fcntl
    import struct

    fs_ioc_fiemap = 0xC020660B
    count = 4096
    hdr = struct.Struct("=QQIIII")
    ext = struct.Struct("=QQQQQIIII")
    buf = bytearray(hdr.size + count * ext.size)
    hdr.pack_into(buf, 0, 0, 0xFFFFFFFFFFFFFFFF, 1, 0, count, 0)  # FIEMAP_FLAG_SYNC
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, fs_ioc_fiemap, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    mapped = hdr.unpack_from(buf, 0)[3]
    return sum(1 for i in range(mapped) if ext.unpack_from(buf, hdr.size + i * ext.size)[5] & 0x800)


@pytest.mark.parametrize("zero_fill", [True, False])
def test_format_zero_fills_a_regular_file(tdir, engine, zero_fill, caplog):
    """A new regular data file is written with zeros in full at format time (no unwritten extent
    left, one log line with the time); zero_fill=False leaves the fallocated extents as they are."""
    import logging

    async def main():
        p = os.path.join(tdir, "d")
        with caplog.at_level(logging.INFO, logger="ringblob.store"):
            s = await BlobStore.create(p, 32 * MiB, engine=engine, zero_fill=zero_fill)
        await s.put(b"a", os.urandom(10000), sync=True)
        await s.close()
        logged = [r.getMessage() for r in caplog.records if "zero-filled" in r.getMessage()]
        unwritten = _unwritten_extents(p)
        if zero_fill:
            assert len(logged) == 1 and "32 MiB in" in logged[0]
            if unwritten is not None:
                assert unwritten == 0
            with open(p, "rb") as f:
                f.seek(20 * MiB)
                assert f.read(MiB) == bytes(MiB)  # the data area reads as zeros
        else:
            assert not logged
            if unwritten is not None and _fs_type(p) == "ext4":
                assert unwritten > 0  # the check above can fail: fallocate leaves unwritten extents
        s = await BlobStore.open(p, engine=engine)
        assert len(await s.get(b"a")) == 10000
        await s.close()

    run(main())


def _fs_type(path: str) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()
    return "ext4" if out in ("ext2/ext3", "ext4") else out


def test_failed_zero_fill_fails_create_and_the_next_open_formats_again(tdir):
    """A write error while zero-filling: create raises IOFailed and writes no superblock, so the
    next open(create_size=...) formats the file again."""

    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, "psync", fail_write=5)
        with pytest.raises(IOFailed):
            await BlobStore.create(p, 16 * MiB, engine="psync", wrap_engine=wrap)
        with open(p, "rb") as f:
            assert not any(f.read(8192))  # no superblock in either slot
        s = await BlobStore.open(p, engine="psync", create_size=16 * MiB)
        await s.put(b"k", b"v", sync=True)
        await s.close()
        s = await BlobStore.open(p, engine="psync")
        assert await s.get(b"k") == b"v"
        await s.close()

    run(main())


# -- large values and BLAKE3 ------------------------------------------------------------------


def test_large_values_round_trip_and_put_cas_hashes_once(tdir, engine, monkeypatch):
    """Values larger than a fixed buffer (streamed before their record) round-trip through put,
    put_many and put_cas, before and after a reopen; put_cas hashes its value once."""
    from ringblob.store import blobstore as B

    hashed = []
    real = B.blake3.blake3

    def spy(data=b"", *a, **kw):
        hashed.append(len(data))
        return real(data, *a, **kw)

    monkeypatch.setattr(B.blake3, "blake3", spy)
    big, mid, small = os.urandom(3 * MiB + 5), os.urandom(256 * 1024 + 1), os.urandom(4096)

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 32 * MiB, engine=engine)
        await s.put(b"big", big, sync=True)
        await s.put(blake3.blake3(mid).digest(), mid, verify=True)
        want = real(big).digest()
        hashed.clear()
        d = await s.put_cas(big)
        assert hashed == [len(big)] and d == want
        await s.put_many([(b"m1", mid), (b"m2", small), (b"m3", big)], sync=True)
        assert await s.get(b"big") == big and await s.get(d) == big and await s.get(b"m3") == big
        assert await s.get(b"m1") == mid and await s.get(b"m2") == small
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        for k, v in ((b"big", big), (b"m1", mid), (b"m3", big), (d, big), (blake3.blake3(mid).digest(), mid)):
            assert await s.get(k) == v
        await s.close()

    run(main())


def test_large_put_verify_mismatch_writes_nothing(tdir, engine):
    """verify=True checks the digest of a large value before anything is written."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        v = os.urandom(2 * MiB)
        before = s.stat()
        with pytest.raises(DigestMismatch):
            await s.put(b"\x00" * 32, v, verify=True)
        after = s.stat()
        assert after["bytes_written"] == before["bytes_written"]
        assert after["free_bytes"] == before["free_bytes"] and not s.has(b"\x00" * 32)
        await s.put(blake3.blake3(v).digest(), v, verify=True, sync=True)
        assert await s.get(blake3.blake3(v).digest()) == v
        await s.close()

    run(main())


def test_large_value_with_a_flipped_bit_is_corrupt(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        v = os.urandom(MiB + 100)
        await s.put(b"big", v, sync=True)
        page = s._index.get(b"big")[0]
        await s.close()
        flip_bit(p, page * 4096 + 700 * 1024, 3)
        s = await BlobStore.open(p, engine=engine)
        with pytest.raises(Corrupt):
            await s.get(b"big")
        assert s.stat()["checksum_failures"] == 1
        await s.close()

    run(main())


def test_zero_fill_extends_the_systemd_start_timeout(tdir, monkeypatch):
    """Under systemd (NOTIFY_SOCKET) a zero fill sends EXTEND_TIMEOUT_USEC as it goes, so a large
    new data file does not hit TimeoutStartSec; without NOTIFY_SOCKET nothing is sent."""
    import socket

    from ringblob.store import blobstore as B

    sock_path = os.path.join(tdir, "notify.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(sock_path)
    rx.setblocking(False)
    monkeypatch.setattr(B, "_EXTEND_EVERY", 0.0)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)

    async def main(name):
        s = await BlobStore.create(os.path.join(tdir, name), 8 * MiB, engine="psync")
        await s.close()

    try:
        run(main("d1"))
        got = []
        while True:
            try:
                got.append(rx.recv(4096).decode())
            except BlockingIOError:
                break
        assert got and all(m == "EXTEND_TIMEOUT_USEC=60000000" for m in got)
        monkeypatch.delenv("NOTIFY_SOCKET")
        run(main("d2"))
        with pytest.raises(BlockingIOError):
            rx.recv(4096)
    finally:
        rx.close()


class _GatedSync:
    """Engine wrapper that holds every fdatasync back until the test releases it (oldest first),
    so a test can look at the store while a round's fdatasync is "in flight"."""

    def __init__(self, inner):
        self._inner = inner
        self.armed = False  # (formatting and opening pass their fdatasyncs on)
        self.held = []  # (tag, kw) of fdatasyncs the store queued, not yet passed on

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def fdatasync(self, tag, **kw):
        if not self.armed:
            return self._inner.fdatasync(tag, **kw)
        self.held.append((tag, kw))

    def let_go(self):
        tag, kw = self.held.pop(0)
        self._inner.fdatasync(tag, **kw)
        self._inner.submit()


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def _pipelined_rounds(tdir, engine, fail_first_sync: bool):
    holder = {}

    def wrap(e):
        holder["f"] = FaultyEngine(e)
        holder["g"] = _GatedSync(holder["f"])
        return holder["g"]

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, wrap_engine=wrap, sync_method="fdatasync")
        g, fe = holder["g"], holder["f"]
        g.armed = True
        batches = s.stat()["journal_batches"]
        r1 = [asyncio.ensure_future(s.put(b"a%d" % i, b"A%d" % i * 300, sync=True)) for i in range(4)]
        await _until(lambda: len(g.held) == 1, "round 1's fdatasync")
        r2 = [asyncio.ensure_future(s.put(b"b%d" % i, b"B%d" % i * 300, sync=True)) for i in range(4)]
        # round 2's data and journal writes go out while round 1's fdatasync is in flight ...
        await _until(lambda: s.stat()["journal_batches"] == batches + 2, "round 2's writes")
        await asyncio.sleep(0.01)
        # ... but its fdatasync waits for round 1's, and nothing is acknowledged before it is durable
        assert len(g.held) == 1
        assert not any(f.done() for f in r1 + r2)
        assert not s.has(b"a0") and not s.has(b"b0")
        if fail_first_sync:
            fe.fail_next("fdatasync")
        g.let_go()
        if fail_first_sync:
            res = await asyncio.gather(*r1, *r2, return_exceptions=True)
            assert all(isinstance(r, IOFailed) and r.errno == errno.EIO for r in res), res
            assert not g.held, "a later round issued its fdatasync after an earlier one failed"
            assert s.read_only
            with pytest.raises(ReadOnly):
                await s.flush()
        else:
            await asyncio.gather(*r1)  # round 1 acknowledged first, round 2 still waiting for its own
            await _until(lambda: len(g.held) == 1, "round 2's fdatasync")
            await asyncio.sleep(0.01)
            assert not any(f.done() for f in r2)
            g.let_go()
            await asyncio.gather(*r2)
            assert await s.get(b"b3") == b"B3" * 300
        g.armed = False
        g.held.clear()
        await s.abandon()
        s = await BlobStore.open(p, engine=engine)
        for i in range(4):
            for k, v in ((b"a%d" % i, b"A%d" % i * 300), (b"b%d" % i, b"B%d" % i * 300)):
                if fail_first_sync:  # not acknowledged: absent or whole
                    assert not s.has(k) or await s.get(k) == v
                else:
                    assert await s.get(k) == v
        await s.put(b"after", b"x", sync=True)
        await s.close()

    run(main())


def test_pipelined_rounds_overlap_and_acknowledge_in_order(tdir, engine):
    """A round's writes go out while the previous round's fdatasync is in flight; its own
    fdatasync waits for that one, and each round is acknowledged only once durable, in order."""
    _pipelined_rounds(tdir, engine, fail_first_sync=False)


def test_failed_fdatasync_fails_the_round_in_flight_behind_it(tdir, engine):
    """Round 1's fdatasync fails while round 2's writes are out: both rounds fail with EIO,
    round 2 issues no fdatasync (a later success would prove nothing), the store turns read-only."""
    _pipelined_rounds(tdir, engine, fail_first_sync=True)


# -- get_nowait: the request path's GET, completed by a call ------------------------------------


def _get_nowait(s, key):
    """``s.get_nowait(key, done)`` as an awaitable of ``(queued, value, error)``."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    calls = []

    def done(value, err):
        calls.append((value, err))
        fut.set_result((value, err))

    queued = s.get_nowait(key, done)
    return queued, fut, calls


def test_get_nowait_verifies_pins_and_answers_once(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine=engine)
        await s.put(b"a", b"x" * 5000, sync=True)
        await s.put(b"bad", b"b" * 4096, sync=True)
        await s.put(b"empty", b"", sync=True)
        await s.put(b"big", os.urandom(3 * s._aio.buffer_size), sync=True)
        gets0 = s.stat()["gets"]
        assert s.get_nowait(b"a", lambda v, e: None, 4999) == 0  # over max_size: nothing done
        assert not s._pins
        queued, fut, calls = _get_nowait(s, b"a")
        assert queued == 5000  # the value's length
        assert s._index.get(b"a")[0] in s._pins  # pinned while the read is in flight
        assert await fut == (b"x" * 5000, None)
        assert not s._pins and calls == [(b"x" * 5000, None)]
        assert s.stat()["gets"] == gets0 + 1
        with pytest.raises(NotFound):
            s.get_nowait(b"nope", lambda v, e: None)
        with pytest.raises(InvalidKey):
            s.get_nowait(b"", lambda v, e: None)
        # what it does not take: the caller awaits get()
        assert s.get_nowait(b"empty", lambda v, e: None) == 0
        assert s.get_nowait(b"big", lambda v, e: None) == 0
        assert not s._pins
        page = s._index.get(b"bad")[0]
        await s.close()
        flip_bit(p, page * 4096 + 17, 3)
        s = await BlobStore.open(p, engine=engine)
        queued, fut, calls = _get_nowait(s, b"bad")
        value, err = await fut
        assert queued == 4096 and value is None and isinstance(err, Corrupt) and err.keys == [b"bad"]
        assert s.stat()["checksum_failures"] == 1 and not s._pins
        await s.close()

    run(main())


def test_get_each_answers_every_key_in_order_without_a_task_per_small_value(tdir, engine):
    """get_each (the daemon's MGET, and get_many): each key's value or its own error, in order,
    whatever the mix — more small values than fixed buffers, missing and invalid keys, an empty
    and a large value, a value whose bytes fail their digest — with the small values read through
    get_nowait (a task only for the empty and the large one), nothing left pinned, and other
    readers of the same buffer pool served meanwhile."""
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, buffer_count=6)
        values = {b"v%03d" % i: os.urandom(100 + 37 * i) for i in range(120)}
        await s.put_many(list(values.items()), sync=True)
        await s.put(b"empty", b"", sync=True)
        big = os.urandom(2 * s._aio.buffer_size + 5)
        await s.put(b"big", big, sync=True)
        await s.put(b"bad", b"b" * 3000, sync=True)
        bad_page = s._index.get(b"bad")[0]
        await s.close()
        flip_bit(p, bad_page * 4096 + 99, 2)
        s = await BlobStore.open(p, engine=engine, buffer_count=6)
        keys = list(values)
        keys[5:5] = [b"missing", b"", b"empty", b"big", b"bad"]
        tasks = 0
        loop = asyncio.get_running_loop()

        def counting(lp, coro, **kw):
            nonlocal tasks
            tasks += 1
            return asyncio.Task(coro, loop=lp, **kw)

        def check(got):
            assert len(got) == len(keys)
            for k, r in zip(keys, got):
                if k == b"missing":
                    assert isinstance(r, NotFound)
                elif k == b"":
                    assert isinstance(r, InvalidKey)
                elif k == b"empty":
                    assert r == b""
                elif k == b"big":
                    assert r == big
                elif k == b"bad":
                    assert isinstance(r, Corrupt) and r.keys == [b"bad"]
                else:
                    assert r == values[k], k

        loop.set_task_factory(counting)
        try:
            check(await s.get_each(keys))
        finally:
            loop.set_task_factory(None)
        assert tasks == 2  # the empty and the large value; none for the 120 small ones
        assert not s._pins
        # beside other readers of the 6 buffers (then keys may also go the awaiting way): all served
        others = [asyncio.ensure_future(s.get(b"v%03d" % i)) for i in range(0, 120, 7)]
        more = asyncio.ensure_future(s.get_each(keys))
        await asyncio.sleep(0)
        check(await s.get_each(keys))
        check(await more)
        assert [await o for o in others] == [values[b"v%03d" % i] for i in range(0, 120, 7)]
        assert not s._pins
        # a caller that goes away (an MGET whose connection closed) stops the starting of reads
        gets0 = s.stat()["gets"]
        gone = asyncio.ensure_future(s.get_each(list(values)))
        await asyncio.sleep(0)  # its first reads are in flight
        gone.cancel()
        for _ in range(500):
            if not s._pins:
                break
            await asyncio.sleep(0.01)
        assert not s._pins and s.stat()["gets"] - gets0 <= 6  # at most the six buffers' worth
        assert await s.get_each([]) == []
        # get_many on top of it: None for a missing key, the first other error raised
        assert await s.get_many([b"v001", b"missing", b"empty"]) == [values[b"v001"], None, b""]
        with pytest.raises(Corrupt):
            await s.get_many([b"v001", b"bad"])
        with pytest.raises(InvalidKey):
            await s.get_many([b"v001", b""])
        await s.close()
        # a closed store: every key answers EngineClosed
        assert all(isinstance(r, EngineClosed) for r in await s.get_each([b"v001", b"v002"]))

    run(main())


def test_get_nowait_failed_read_is_ioerror(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, "psync")
        s = await BlobStore.create(p, 8 * MiB, engine="psync", wrap_engine=wrap)
        await s.put(b"k", b"v" * 3000, sync=True)
        holder["e"].fail_next("read")
        queued, fut, _calls = _get_nowait(s, b"k")
        value, err = await fut
        assert queued and value is None and isinstance(err, IOFailed) and err.errno == errno.EIO
        assert not s.read_only and not s._pins
        queued, fut, _calls = _get_nowait(s, b"k")
        assert await fut == (b"v" * 3000, None)
        await s.close()

    run(main())


def test_get_nowait_frees_an_extent_replaced_in_flight_only_after_its_read(tdir, engine):
    """An extent released while a get_nowait read is in flight goes back to the allocator when
    that read completes (the completion unpins it), not before; a bytearray key is taken as bytes."""
    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine=engine)
        await s.put(b"k", b"q" * 8192, sync=True)
        page = s._index.get(b"k")[0]
        queued, fut, calls = _get_nowait(s, bytearray(b"k"))
        assert queued == 8192 and s._pins == {page: 1}
        free0 = s._alloc.free_pages
        s._release_extent(page, 2)  # what a committed overwrite does once its record is durable
        assert s._free_on_unpin == {page: 2} and s._alloc.free_pages == free0  # still being read
        assert await fut == (b"q" * 8192, None)
        assert not s._pins and not s._free_on_unpin and s._alloc.free_pages == free0 + 2
        assert calls == [(b"q" * 8192, None)]
        await s.close()

    run(main())


def test_get_nowait_in_flight_at_close_and_a_raising_done(tdir, engine):
    """A done callback that raises is reported to the loop's exception handler and spares the
    other reads; a read still in flight when the store closes is answered once, and a get_nowait
    after close raises EngineClosed."""
    async def main():
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine=engine)
        await s.put(b"a", b"1" * 4096, sync=True)
        await s.put(b"b", b"2" * 4096, sync=True)

        def bad(value, err):
            raise RuntimeError("the caller's bug")

        assert s.get_nowait(b"a", bad) == 4096
        queued, fut, calls = _get_nowait(s, b"b")
        assert queued and await fut == (b"2" * 4096, None)
        for _ in range(100):
            if reported:
                break
            await asyncio.sleep(0.001)
        assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)
        assert "completion callback raised" in reported[0]["message"]
        assert not s._pins and s.stat()["gets"] == 2
        queued, fut, calls = _get_nowait(s, b"a")
        assert queued == 4096
        await s.close()  # answered before the engine closes (close awaits a flush) or with EngineClosed
        value, err = await fut
        assert len(calls) == 1 and (value, err) in ((b"1" * 4096, None), (None, err)) and not s._pins
        assert err is None or isinstance(err, EngineClosed)
        with pytest.raises(EngineClosed):
            s.get_nowait(b"a", lambda v, e: None)

    run(main())


# -- put_nowait: the request path's PUT, completed by a call -------------------------------------


def _put_nowait(s, key, value, **kw):
    """``s.put_nowait(key, value, done, **kw)`` -> ``(queued, future of the error, calls)``."""
    fut = asyncio.get_running_loop().create_future()
    calls = []

    def done(value, err):
        calls.append((value, err))
        fut.set_result(err)

    return s.put_nowait(key, value, done, **kw), fut, calls


def test_put_nowait_commits_like_put_and_answers_once(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, engine=engine)
        rounds0 = s.stat()["group_commits"]
        pending = [_put_nowait(s, b"k%d" % i, b"v%d" % i * 500, sync=True) for i in range(6)]
        assert all(q is True for q, _f, _c in pending)
        assert [await f for _q, f, _c in pending] == [None] * 6  # acknowledged: durable
        assert all(c == [(None, None)] for _q, _f, c in pending)
        assert 1 <= s.stat()["group_commits"] - rounds0 <= 2  # one group commit (two with a pipelined round)
        assert s.stat()["puts"] >= 6
        q, f, _c = _put_nowait(s, b"empty", b"")
        assert q and await f is None
        digest = blake3.blake3(b"content").digest()
        q, f, _c = _put_nowait(s, digest, b"content", verify=True)
        assert q and await f is None
        with pytest.raises(DigestMismatch):
            s.put_nowait(b"x" * 32, b"content", lambda v, e: None, verify=True)
        with pytest.raises(InvalidKey):
            s.put_nowait(b"", b"v", lambda v, e: None)
        # what only put() does: values written before they are queued
        assert s.put_nowait(b"big", os.urandom(s._aio.buffer_size + 1), lambda v, e: None) is False
        assert not s.has(b"big")
        await asyncio.sleep(0.01)
        assert all(len(c) == 1 for _q, _f, c in pending)
        await s.close()  # a crash after the acknowledgement loses nothing: reopen and read
        s = await BlobStore.open(p, engine=engine)
        for i in range(6):
            assert await s.get(b"k%d" % i) == b"v%d" % i * 500
        assert await s.get(b"empty") == b"" and await s.get(digest) == b"content"
        await s.close()

    run(main())


def test_mixed_size_overwrites_leave_room_for_large_values(tdir):
    """A store about half full, its 4 KiB to 256 KiB values overwritten at random in batches of
    24, each batch flushed (so the extents it replaced come back): a value of 1/32 of the free
    space (the allocator keeps the largest free extent at about a twentieth of it) still fits,
    and every value reads back as last written. (When runs at the write cursor always started
    in the largest free extent, it fell to 128 pages within 25 batches here and puts of 256 KiB
    failed with NoSpace.)"""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 48 * MiB, engine="uring")
        rnd = random.Random(11)
        classes = [(4096, 2048, 4), (64 * 1024, 32, 1), (128 * 1024, 32, 1), (256 * 1024, 32, 1)]
        keys = [(b"c%d-%d" % (c, i), size) for c, (size, count, _) in enumerate(classes) for i in range(count)]
        by_class = [[k for k in keys if k[1] == size] for size, _, _ in classes]
        version: dict = {}

        def value(key: bytes, size: int) -> bytes:
            return (b"%s:%d;" % (key, version[key])).ljust(64, b".") * (size // 64)

        async def put_all(batch):
            for key, _ in batch:
                version[key] = version.get(key, 0) + 1
            await asyncio.gather(*(s.put(key, value(key, size)) for key, size in batch))

        order = rnd.sample(keys, len(keys))
        for i in range(0, len(order), 32):
            await put_all(order[i:i + 32])
        await s.flush()
        live = sum(size for _, size in keys)
        assert 0.45 < live / (live + s.stat()["free_bytes"]) < 0.6
        for _ in range(250):
            batch = {}
            for _ in range(24):
                c = rnd.choices(range(len(classes)), [w for *_, w in classes])[0]
                key, size = rnd.choice(by_class[c])
                batch[key] = size
            await put_all(list(batch.items()))
            await s.flush()
        await s.put(b"z", b"", sync=True)  # a durable batch: every replaced extent is free now
        st = s.stat()
        big = st["free_bytes"] // 32 // 4096 * 4096
        assert big >= 512 * 1024
        await s.put(b"big", os.urandom(big), sync=True)
        for key, size in keys:
            assert await s.get(key) == value(key, size), key
        await s.close()

    run(main())


def test_put_nowait_nospace_and_read_only_raise_at_once(tdir):
    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 2 * MiB, engine="psync")
        with pytest.raises(NoSpace):
            for i in range(10_000):
                assert s.put_nowait(b"f%d" % i, b"z" * 4096, lambda v, e: None, sync=False) in (True, False)
                await asyncio.sleep(0)
        await s.flush()
        await s.close()
        s = await BlobStore.open(p, engine="psync", read_only=True)
        with pytest.raises(ReadOnly):
            s.put_nowait(b"k", b"v", lambda v, e: None)
        await s.close()

    run(main())


def test_put_nowait_failed_fdatasync_fails_the_round_and_a_raising_callback_spares_it(tdir, engine):
    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, engine)
        s = await BlobStore.create(p, 8 * MiB, engine=engine, wrap_engine=wrap, sync_method="fdatasync")
        await s.put(b"kept", b"durable", sync=True)
        holder["e"].fail_next("fdatasync")

        def bad(value, err):
            raise RuntimeError("a buggy callback")

        assert s.put_nowait(b"b", b"bbb", bad, sync=True)
        pending = [_put_nowait(s, b"s%d" % i, b"v" * 700, sync=True) for i in range(3)]
        errs = [await f for _q, f, _c in pending]
        assert all(isinstance(e, (IOFailed, ReadOnly)) for e in errs), errs
        assert s.read_only
        with pytest.raises(ReadOnly):
            s.put_nowait(b"late", b"v", lambda v, e: None)
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"kept") == b"durable"
        await s.close()

    run(main())


@pytest.mark.parametrize("page_size", [4096, 16384])
def test_put_nowait_stages_values_at_buffer_page_and_block_boundaries(tdir, engine, page_size):
    """Values queued by put_nowait are copied into the fixed buffers by the C committer: empty,
    one byte, around block and page sizes and exactly one buffer, from bytes, a bytearray (a
    snapshot: later changes are not stored) and a strided memoryview; more values than one
    round's buffers take several rounds; every one reads back byte for byte, also after a
    crash (sync=True)."""

    async def main():
        p = os.path.join(tdir, "d")
        bsz = 65536
        s = await BlobStore.create(p, 32 * MiB, page_size=page_size, engine=engine, buffer_count=8,
                                   buffer_size=bsz)
        batches0 = s.stat()["journal_batches"]
        lengths = [0, 1, 511, 512, 4095, 4096, 4097, page_size - 1, page_size, page_size + 1, bsz - 1, bsz,
                   bsz, bsz, bsz, bsz, 3, bsz - 4096]
        vals = {b"b%02d" % i: os.urandom(n) for i, n in enumerate(lengths)}
        pending = [_put_nowait(s, k, v, sync=True) for k, v in vals.items()]
        mutable = bytearray(b"m" * 5000)
        pending.append(_put_nowait(s, b"mutable", mutable, sync=True))
        mutable[:] = b"X" * 5000  # after the put returned: not what is stored
        strided = memoryview(bytes(range(200)) * 40)[::3]
        pending.append(_put_nowait(s, b"strided", strided, sync=True))
        assert s.put_nowait(b"over", os.urandom(bsz + 1), lambda v, e: None) is False
        assert all(q is True for q, _f, _c in pending)
        assert [await f for _q, f, _c in pending] == [None] * len(pending)
        assert all(len(c) == 1 for _q, _f, c in pending)
        # 6 values of a whole buffer cannot share one round's (8 - 1) // 2 = 3 data buffers
        assert s.stat()["journal_batches"] - batches0 >= 2
        vals[b"mutable"] = b"m" * 5000
        vals[b"strided"] = bytes(strided)
        for k, v in vals.items():
            assert await s.get(k) == v, k
            assert s.value_size(k) == len(v)
        assert s.stat()["bytes_written"] >= sum(len(v) for v in vals.values())
        await s.abandon()  # a crash right after the acknowledgements
        s = await BlobStore.open(p, engine=engine)
        for k, v in vals.items():
            assert await s.get(k) == v, k
        await s.close()

    run(main())


def test_put_nowait_failed_data_write_fails_the_round_and_turns_read_only(tdir, engine):
    """A data write of a round of put_nowait items fails: every item of it is answered once with
    IOFailed (errno EIO), the store turns read-only, and after a restart a key reads back its
    value or is absent, never other bytes."""

    async def main():
        p = os.path.join(tdir, "d")
        holder, wrap = _faulty_open(p, engine)
        s = await BlobStore.create(p, 8 * MiB, engine=engine, wrap_engine=wrap)
        await s.put(b"kept", b"durable", sync=True)
        await s.put(b"w0", b"old", sync=True)
        holder["e"].fail_next("write")
        vals = {b"w%d" % i: os.urandom(3000 + i) for i in range(5)}
        pending = [_put_nowait(s, k, v, sync=True) for k, v in vals.items()]
        errs = [await f for _q, f, _c in pending]
        assert all(isinstance(e, IOFailed) and e.errno == errno.EIO for e in errs), errs
        assert all(len(c) == 1 for _q, _f, c in pending)
        assert s.read_only and s.stat()["read_only"]
        assert await s.get(b"w0") == b"old"  # reads go on; the failed round never became visible
        with pytest.raises(ReadOnly):
            s.put_nowait(b"late", b"v", lambda v, e: None)
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"kept") == b"durable"
        for k, v in vals.items():
            try:
                got = await s.get(k)
            except NotFound:
                continue
            assert got in (v, b"old" if k == b"w0" else v)
        await s.close()

    run(main())


def test_put_nowait_nospace_with_pending_frees_hands_over_to_put(tdir):
    """No room while replaced extents wait for a durable point: put_nowait returns False having
    changed nothing (the caller takes put(), which reclaims them); with nothing to reclaim it
    raises NoSpace; a successful put_nowait right after stores its value."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 2 * MiB, engine="psync")
        n = 0
        with pytest.raises(NoSpace):
            while True:
                await s.put(b"f%d" % n, b"z" * 4096, sync=True)
                n += 1
        assert n > 10
        free0 = s.stat()["free_bytes"]
        with pytest.raises(NoSpace):  # nothing queued, nothing to reclaim
            s.put_nowait(b"new", b"y" * 4096, lambda v, e: None, sync=True)
        for i in range(4):
            await s.delete(b"f%d" % i)  # sync=False: the extents wait for a durable point
        assert s._pending_free
        assert s.put_nowait(b"new", b"y" * 4096, lambda v, e: None, sync=True) is False
        assert not s.has(b"new") and s.stat()["free_bytes"] == free0
        await s.put(b"new", b"y" * 4096, sync=True)  # reclaims the frees first
        assert await s.get(b"new") == b"y" * 4096
        q, f, _c = _put_nowait(s, b"new2", b"x" * 100, sync=True)
        assert q and await f is None and await s.get(b"new2") == b"x" * 100
        await s.close()

    run(main())


def test_commit_items_answer_once_and_a_raising_done_is_logged(caplog):
    """The C group-commit item: a put_nowait item is its own completion (done/set_result/
    set_exception answer its callback once); settle resolves items and flush waiters that are
    still pending and logs a callback that raises without stopping the others."""
    from ringblob._storeput import Item, settle

    calls = []
    it = Item(1, b"k", 0, 0, 0, b"d" * 32, None, True, None)
    assert it.fut is it and not it.done()

    async def main():
        loop = asyncio.get_running_loop()
        fut_item = Item(2, b"k", 0, 0, 0, b"", None, False, loop.create_future())
        assert fut_item.fut is not fut_item
        flusher = loop.create_future()
        done_fl = loop.create_future()
        done_fl.set_result(None)
        err = RuntimeError("boom")
        settle([fut_item], [flusher, done_fl], err)
        assert fut_item.fut.exception() is err and flusher.exception() is err
        settle([fut_item], [flusher])  # already answered: nothing changes
        assert fut_item.fut.exception() is err

    run(main())
    # an item with no callback set (built from Python) answers nothing, but is marked done
    it.set_result(None)
    assert it.done()
    assert calls == []

# -- values received into leased fixed buffers (lease_value / put_leased) ------------------

BSZ = 256 * 1024  # the default fixed-buffer size


def _receive(lv, data: bytes, piece: int = 100_003) -> None:
    """Fill ``lv`` as the daemon's decoder does: socket reads of up to ``piece`` bytes land in
    its target() views (never past a buffer's end), each reported with advance()."""
    pos = 0
    while pos < len(data):
        t = lv.target()
        k = min(len(t), piece, len(data) - pos)
        t[:k] = data[pos : pos + k]
        t.release()
        lv.advance(k)
        pos += k
    assert lv.target() is None and lv.complete


@pytest.mark.parametrize("length", [BSZ + 1, BSZ + 4095, BSZ + 4096, BSZ + 4097, 2 * BSZ - 1, 2 * BSZ,
                                    2 * BSZ + 1, 4 * BSZ - 4096, 4 * BSZ])
def test_put_leased_round_trips_values_around_buffer_and_block_boundaries(tdir, engine, length, parallel_hash):
    """A value received straight into leased buffers is written from them (no copy), hashed as
    it arrived, and reads back identical, before and after a crash (sync=True) and after a
    reopen; every buffer goes back to the pool."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"first", b"1")  # the committer holds its journal buffer from here on
        free0 = s._aio.engine.free_buffers
        v = os.urandom(length)
        for key, sync in ((b"k", True), (b"K" * 255, False)):
            lv = s.lease_value(length)
            assert lv is not None and len(lv.buffers) == -(-length // BSZ)
            assert s.stat()["receive_buffers_held"] == len(lv.buffers)
            _receive(lv, v)
            assert lv.digest() == blake3.blake3(v).digest()
            await s.put_leased(key, lv, sync=sync)
            assert lv.released and s._aio.engine.free_buffers == free0
            assert await s.get(key) == v and s.value_size(key) == length
        st = s.stat()
        assert st["values_leased"] == 2 and st["receive_buffers_held"] == 0 and st["puts"] == 3
        assert s.needs_flush  # the second one was sync=False
        await s.abandon()  # crash: the sync=True put must be there
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v
        await s.put(b"k2", v)  # the copying path still agrees
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v and await s.get(b"k2") == v
        await s.close()

    run(main())


def test_put_leased_errors_write_nothing_and_return_every_buffer(tdir, engine):
    """verify=True with a wrong key (DigestMismatch), a bad key (InvalidKey), an incomplete value
    (ValueError) and a full store (NoSpace) store nothing, write nothing and release the buffers;
    the right digest with verify=True is stored."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, journal_size=256 * 1024, engine=engine)
        await s.put(b"first", b"1")  # the committer holds its journal buffer from here on
        free0 = s._aio.engine.free_buffers
        v = os.urandom(MiB + 1)

        async def refused(exc, key, value=v, **kw):
            before = s.stat()
            lv = s.lease_value(len(value))
            _receive(lv, value)
            with pytest.raises(exc):
                await s.put_leased(key, lv, **kw)
            after = s.stat()
            assert lv.released and s._aio.engine.free_buffers == free0 and after["receive_buffers_held"] == 0
            assert after["bytes_written"] == before["bytes_written"] and after["free_bytes"] == before["free_bytes"]
            assert not key or not s.has(key)

        await refused(DigestMismatch, b"\x00" * 32, verify=True)
        await refused(InvalidKey, b"")
        lv = s.lease_value(len(v))
        lv.write(v[:1000])
        with pytest.raises(ValueError):
            await s.put_leased(b"short", lv)
        assert lv.released and s._aio.engine.free_buffers == free0 and not s.has(b"short")
        digest = blake3.blake3(v).digest()
        lv = s.lease_value(len(v))
        assert lv.write(v + b"extra") == len(v)  # write() takes no more than the value
        await s.put_leased(digest, lv, verify=True, sync=True)
        assert await s.get(digest) == v
        free = s.stat()["free_bytes"]
        await refused(NoSpace, b"huge", os.urandom(free + 4096))
        assert not s.stat()["read_only"]
        await s.put(b"after", b"still writable", sync=True)
        await s.close()

    run(main())


def test_lease_value_declines_small_values_past_the_cap_and_when_not_writable(tdir):
    """lease_value never waits: None for a value that fits one buffer (it rides with the journal
    write), past max_blob_size, past receive_buffers, with the pool short, or when the store is not
    writable; the caller then takes put(). Declines over the buffer size are counted."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine="psync", buffer_count=16, receive_buffers=6,
                                   max_blob_size=4 * MiB)
        await s.put(b"first", b"1")  # the committer holds its journal buffer from here on
        assert s.lease_value(BSZ) is None and s.lease_value(100) is None
        assert s.lease_value(4 * MiB + 1) is None
        a = s.lease_value(3 * BSZ)
        b = s.lease_value(2 * BSZ + 1)
        assert a is not None and b is not None and s.stat()["receive_buffers_held"] == 6
        assert s.lease_value(BSZ + 1) is None  # 2 more would pass receive_buffers=6
        st = s.stat()
        assert st["values_leased"] == 2 and st["lease_value_refused"] == 1
        a.release()
        a.release()  # idempotent
        assert s.stat()["receive_buffers_held"] == 3
        held = await s._aio.lease(s._aio.engine.free_buffers - 1)  # the pool nearly drained by others
        assert s.lease_value(BSZ + 1) is None
        s._aio.release(*held)
        c = s.lease_value(BSZ + 1)
        assert c is not None
        b.release()
        c.release()
        assert s.stat()["receive_buffers_held"] == 0 and s._aio.engine.free_buffers == 16 - 1  # the journal's
        await s.close()
        s = await BlobStore.open(p, engine="psync", read_only=True)
        assert s.lease_value(MiB) is None
        await s.close()
        s = await BlobStore.open(p, engine="psync", receive_buffers=0)
        assert s.lease_value(MiB) is None
        await s.close()
        with pytest.raises(ConfigError):
            await BlobStore.open(p, engine="psync", receive_buffers=-1)

    run(main())


async def _received_on_faulty_store(tdir, engine, failing_write=1):
    """A store on a fault-injecting engine holding ``a`` -> ``1`` (durable), and a 1 MiB value
    received into leased buffers whose writes (queued buffer by buffer as they filled: a
    stream) include one that fails, the ``failing_write``-th: ``(holder, store, free buffers before the
    lease, value, leased)``."""
    p = os.path.join(tdir, "d")
    holder, wrap = _faulty_open(p, engine)
    s = await BlobStore.create(p, 8 * MiB, engine=engine, wrap_engine=wrap)
    await s.put(b"a", b"1", sync=True)
    free0 = s._aio.engine.free_buffers
    v = os.urandom(MiB)
    lv = s.lease_value(len(v))
    assert lv.writer is not None
    holder["e"].fail_next("write", failing_write)
    _receive(lv, v)
    return holder, s, free0, v, lv


def test_put_leased_write_error_turns_read_only_and_releases(tdir, engine):
    async def main():
        holder, s, free0, v, lv = await _received_on_faulty_store(tdir, engine)
        with pytest.raises(IOFailed):
            await s.put_leased(b"big", lv, sync=True)
        stand_in = 1 if holder["e"]._scratch is not None else 0  # the wrapper's buffer for the failed op
        assert s.read_only and lv.released and s._aio.engine.free_buffers == free0 - stand_in
        assert s.stat()["receive_buffers_held"] == 0
        assert s.lease_value(len(v)) is None  # read-only: the daemon takes put(), which answers ReadOnly
        assert await s.get(b"a") == b"1" and not s.has(b"big")
        await s.close()

    run(main())


def test_a_rounds_fdatasync_is_queued_and_submitted_by_its_writes_completion(tdir, engine):
    """The group commit's fdatasync goes out from the completion call of the round's writes (the
    same loop turn, no hop through the committer), submitted before that call returns; the
    writes themselves are submitted by the committer at once, not at the turn's end."""

    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 4 * MiB, engine=engine, sync_method="fdatasync")
        aio = s._aio
        real = aio.run_nowait
        seen = []  # (ops kind, inside the writes' completion call)
        inside = [False]

        def run_nowait(ops, done, dsync=False):
            assert not dsync
            kinds = tuple(o[0] for o in ops)
            seen.append((kinds, inside[0]))
            if kinds[0] != "write":
                return real(ops, done)

            def wrapped(results):
                inside[0] = True
                try:
                    done(results)
                    seen.append(("after", not aio._unsubmitted))
                finally:
                    inside[0] = False

            ok = real(ops, wrapped)
            if ok:
                aio.submit_now = _record(aio, aio.submit_now, seen)
            return ok

        aio.run_nowait = run_nowait
        await s.put(b"k", b"v" * 5000, sync=True)
        del aio.run_nowait
        aio.__dict__.pop("submit_now", None)
        assert seen[0] == (("write", "write"), False)
        assert ("submit_now", 2) in seen  # the writes: submitted by the committer at once
        assert (("fdatasync",), True) in seen and ("after", True) in seen
        assert await s.get(b"k") == b"v" * 5000 and s.stat()["fdatasyncs"] >= 1
        await s.close()

    run(main())


def _record(aio, real, seen):
    """A submit_now that records how many ops it found queued (once), then restores itself."""

    def submit_now():
        seen.append(("submit_now", len(aio._unsubmitted)))
        aio.__dict__.pop("submit_now", None)
        return real()

    return submit_now


class _PlainBuf:
    """A stand-in for a fixed buffer (its ``view``) for LeasedValue tests without a store."""

    def __init__(self, n):
        self.view = memoryview(bytearray(n))


def test_leased_value_takes_pieces_in_order_and_refuses_what_does_not_fit(parallel_hash):
    """LeasedValue (C) over plain buffers: targets never pass a buffer's end nor the value's,
    pieces of any size (1 byte, across buffer ends by write) hash to the value's digest (on
    the caller's thread, or on the hash worker with parallel_hash on), and advance / digest /
    the constructor refuse what cannot be."""
    from ringblob.store.leased import LeasedValue

    bsz = 4096
    length = 3 * bsz - 5
    v = os.urandom(length)
    released = []
    with pytest.raises(ValueError):
        LeasedValue([_PlainBuf(bsz), _PlainBuf(bsz)], length, bsz, released.append)
    with pytest.raises(ValueError):
        LeasedValue([_PlainBuf(bsz)] * 4, length, bsz, released.append)
    with pytest.raises(ValueError):
        LeasedValue([], 0, bsz, released.append)
    bufs = [_PlainBuf(bsz) for _ in range(3)]
    lv = LeasedValue(bufs, length, bsz, released.append)
    assert lv.length == length and lv.received == 0 and not lv.complete and lv.buffers == bufs
    pos = 0
    for step in (1, 4094, 1, 3, 100, 5000, 1):  # the 5000 is cut at the first buffer's end
        t = lv.target()
        assert len(t) == min(bsz - pos % bsz, length - pos)
        with pytest.raises(ValueError):
            lv.advance(len(t) + 1)  # past the view: nothing taken
        with pytest.raises(ValueError):
            lv.advance(-1)
        k = min(step, len(t))
        t[:k] = v[pos : pos + k]
        t.release()
        lv.advance(k)
        pos += k
        assert lv.received == pos
    lv.advance(0)
    with pytest.raises(ValueError):
        lv.digest()  # not complete
    assert lv.write(v[pos:] + b"extra") == length - pos  # copies across the buffer ends
    assert lv.complete and lv.target() is None and lv.write(b"more") == 0
    with pytest.raises(ValueError):
        lv.advance(1)
    assert lv.digest() == blake3.blake3(v).digest()
    assert b"".join(bytes(b.view) for b in bufs)[:length] == v
    lv.release()
    lv.release()
    assert released == [bufs] and lv.released and lv.target() is None
    with pytest.raises(ValueError):
        lv.buffers
    with pytest.raises(ValueError):
        lv.advance(0)


def test_parallel_hash_on_hashes_a_leased_value_on_the_hash_worker_and_release_waits_for_it():
    """With parallel_hash on, a filled buffer is queued to the hash worker (advance returns while
    the worker is busy elsewhere); digest() waits for the worker's last job of the value; and
    release() of a value given up half way does not hand its buffers back while the worker may
    still read them."""
    from ringblob.store.leased import LeasedValue

    was = digest.mode()
    digest.configure("on")
    try:
        put = digest.worker_put()
        bsz = 64 * 1024
        v = os.urandom(3 * bsz - 7)
        gate = threading.Event()
        put((lambda _: gate.wait(10), None))  # the worker is busy until the gate opens
        lv = LeasedValue([_PlainBuf(bsz) for _ in range(3)], len(v), bsz, lambda bufs: None)
        _receive(lv, v)  # every buffer filled and queued, none hashed yet
        got = []
        t = threading.Thread(target=lambda: got.append(lv.digest()))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not got  # digest() waits for the worker
        gate.set()
        t.join(10)
        assert got == [blake3.blake3(v).digest()]
        assert lv.digest() == got[0]  # asked again: the same, at once

        gate2 = threading.Event()
        put((lambda _: gate2.wait(10), None))
        released = []
        lv2 = LeasedValue([_PlainBuf(bsz) for _ in range(3)], len(v), bsz, released.append)
        t = lv2.target()
        t[:] = v[:bsz]
        t.release()
        lv2.advance(bsz)  # one buffer queued for the worker; the connection then goes away
        r = threading.Thread(target=lv2.release)
        r.start()
        r.join(0.3)
        assert r.is_alive() and released == []  # the worker has not read the buffer yet
        gate2.set()
        r.join(10)
        assert len(released) == 1 and lv2.released
        assert any(th.name == "ringblob-hash" and th.daemon for th in threading.enumerate())
    finally:
        digest.configure(was)


# -- put_leased_nowait: the request path's large PUT, with no coroutine ----------------------


@pytest.mark.parametrize("length", [BSZ + 1, BSZ + 4096, 2 * BSZ - 1, 4 * BSZ, 4 * BSZ + 4097])
def test_put_leased_nowait_round_trips_and_survives_a_crash_and_reopen(tdir, engine, length, parallel_hash):
    """put_leased_nowait writes the leased buffers, releases them once the write completed and
    queues the item (with the hash worker, the digest taken then): done(None, None) once, the
    value reads back, the sync=True one survives a crash and both a reopen; every buffer goes
    back to the pool."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"first", b"1")  # the committer holds its journal buffer from here on
        free0 = s._aio.engine.free_buffers
        v = os.urandom(length)
        loop = asyncio.get_running_loop()
        for key, sync in ((b"k", True), (b"K" * 255, False)):
            lv = s.lease_value(length)
            _receive(lv, v)
            calls = []
            fut = loop.create_future()

            def done(value, err, calls=calls, fut=fut):
                calls.append((value, err))
                fut.set_result(None)

            assert s.put_leased_nowait(key, lv, done, sync=sync) is True
            assert not lv.released  # the write is queued, not done
            await fut
            await asyncio.sleep(0.01)
            assert calls == [(None, None)] and lv.released and s._aio.engine.free_buffers == free0
            assert await s.get(key) == v and s.value_size(key) == length
        st = s.stat()
        assert st["receive_buffers_held"] == 0 and st["puts"] == 3 and st["bytes_written"] >= 2 * length
        await s.abandon()  # crash: the sync=True put must be there
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v and await s.get(b"K" * 255) == v
        await s.close()

    run(main())


def test_put_leased_nowait_refusals_and_errors_release_or_keep_the_buffers(tdir, engine, parallel_hash):
    """A bad key, verify with a wrong digest and no space raise at once with the buffers released
    and nothing written; an incomplete value or one over a submit window is declined (False) with
    the value still the caller's; the right digest with verify=True is stored."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 8 * MiB, journal_size=256 * 1024, engine=engine)
        await s.put(b"first", b"1")
        free0 = s._aio.engine.free_buffers
        v = os.urandom(MiB + 1)

        def never(value, err):
            raise AssertionError("done must not be called")

        for exc, key, kw in ((DigestMismatch, b"\x00" * 32, {"verify": True}), (InvalidKey, b"", {})):
            before = s.stat()
            lv = s.lease_value(len(v))
            stream = lv.writer  # its buffers are written as they fill (a stream)
            assert stream is not None and s.stat()["free_bytes"] < before["free_bytes"]
            _receive(lv, v)
            with pytest.raises(exc):
                s.put_leased_nowait(key, lv, never, **kw)
            assert lv.released and lv.writer is None
            await _stream_idle(stream)  # the writes in flight complete, then the extent is freed
            after = s.stat()
            assert lv.released and s._aio.engine.free_buffers == free0 and after["receive_buffers_held"] == 0
            assert after["bytes_written"] == before["bytes_written"] and after["free_bytes"] == before["free_bytes"]
        lv = s.lease_value(len(v))
        lv.write(v[:1000])
        assert s.put_leased_nowait(b"short", lv, never) is False and not lv.released
        lv.release()
        big = os.urandom(s._aio._window() * BSZ + 1)  # more buffers than one submit window
        lv = s.lease_value(len(big))
        if lv is not None:  # (within receive_buffers)
            _receive(lv, big)
            assert s.put_leased_nowait(b"big", lv, never) is False and not lv.released
            await s.put_leased(b"big", lv)  # the awaiting path takes it
            assert await s.get(b"big") == big
        digest = blake3.blake3(v).digest()
        lv = s.lease_value(len(v))
        _receive(lv, v)
        fut = asyncio.get_running_loop().create_future()
        assert s.put_leased_nowait(digest, lv, lambda value, err: fut.set_result(err), verify=True, sync=True)
        assert await fut is None and await s.get(digest) == v
        free = s.stat()["free_bytes"]
        huge = os.urandom(free + 4096)
        lv = s.lease_value(len(huge))
        if lv is not None:
            _receive(lv, huge)
            with pytest.raises(NoSpace):
                s.put_leased_nowait(b"huge", lv, never)
            assert lv.released and s.stat()["free_bytes"] == free
        assert not s.stat()["read_only"]
        await s.close()

    run(main())


async def _stream_idle(stream) -> None:
    """Wait until no write of a value's stream (its ``writer``) is in flight."""
    f = stream.wait_idle()
    if f is not None:
        await f


def _lease_values_whose_digest_fails(monkeypatch):
    """Make the store lease values whose digest() raises as a failed hash worker's does; returns
    their class (a subclass: the C class itself cannot be patched)."""
    from ringblob.store import blobstore, leased

    class FailingDigest(leased.LeasedValue):
        def digest(self):
            raise RuntimeError("LeasedValue: hashing the value on the hash worker failed: test")

    monkeypatch.setattr(blobstore, "LeasedValue", FailingDigest)
    return FailingDigest


def test_put_leased_nowait_digest_failing_after_the_write_frees_the_extent(tdir, engine, monkeypatch):
    """The digest put_leased_nowait did not wait for (the hash worker's) fails when the data write
    has completed: done gets that error, the extent goes back to the free space, nothing is
    stored, the buffers go back to the pool and the store stays writable."""
    FailingDigest = _lease_values_whose_digest_fails(monkeypatch)

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"first", b"1")
        free0, st0 = s._aio.engine.free_buffers, s.stat()
        v = os.urandom(MiB + 5)
        lv = s.lease_value(len(v))
        assert isinstance(lv, FailingDigest)
        _receive(lv, v)
        fut = asyncio.get_running_loop().create_future()
        assert s.put_leased_nowait(b"k", lv, lambda value, err: fut.set_result(err), sync=True) is True
        err = await fut
        assert isinstance(err, RuntimeError) and "hash worker failed" in str(err)
        st = s.stat()
        assert lv.released and s._aio.engine.free_buffers == free0 and st["receive_buffers_held"] == 0
        assert st["free_bytes"] == st0["free_bytes"] and st["blob_count"] == 1 and not st["read_only"]
        assert not s.has(b"k")
        await s.put(b"k", v, sync=True)  # the same space, taken again
        assert await s.get(b"k") == v
        await s.close()

    run(main())


@pytest.mark.parametrize("digest_fails", [False, True])
def test_put_leased_nowait_failed_data_write_answers_ioerror_and_releases(tdir, engine, digest_fails, monkeypatch):
    """EIO on the value's data write: done gets IOFailed, the store turns read-only, the buffers go
    back to the pool and reads go on — also when the digest taken after the write (the hash
    worker's) would have failed too: the failed write decides."""
    if digest_fails:
        _lease_values_whose_digest_fails(monkeypatch)

    async def main():
        holder, s, free0, v, lv = await _received_on_faulty_store(tdir, engine, 2)
        fut = asyncio.get_running_loop().create_future()
        assert s.put_leased_nowait(b"big", lv, lambda value, err: fut.set_result(err), sync=True)
        err = await fut
        assert isinstance(err, IOFailed) and s.read_only
        await asyncio.sleep(0.01)
        stand_in = 1 if holder["e"]._scratch is not None else 0  # the wrapper's buffer for the failed op
        assert lv.released and s._aio.engine.free_buffers == free0 - stand_in
        assert s.stat()["receive_buffers_held"] == 0 and not s.has(b"big") and await s.get(b"a") == b"1"
        lv = s.lease_value(len(v))
        assert lv is None  # read-only: nothing is leased
        await s.close()

    run(main())


# -- sync_method: RWF_DSYNC rounds and when a round still needs its fdatasync ---------------------


class _SyncLog:
    """Engine wrapper that logs, once armed, each write's RWF_DSYNC flag and each fdatasync, in
    queue order: ("write", dsync) / ("fdatasync", None)."""

    def __init__(self, inner):
        self._inner = inner
        self.armed = False
        self.log = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write_fixed(self, buf, offset, length, tag, **kw):
        if self.armed:
            self.log.append(("write", bool(kw.get("dsync", False))))
        return self._inner.write_fixed(buf, offset, length, tag, **kw)

    def fdatasync(self, tag, **kw):
        if self.armed:
            self.log.append(("fdatasync", None))
        return self._inner.fdatasync(tag, **kw)

    def take(self) -> list:
        out, self.log = self.log, []
        return out


def test_dsync_rounds_skip_the_fdatasync_only_where_nothing_earlier_needs_it(tdir, engine):
    """sync_method="dsync": a sync round whose predecessors are all durable (or sync rounds in
    flight) writes with RWF_DSYNC and issues no fdatasync; a sync round after a sync=False round
    ends with an fdatasync (it must cover the earlier writes too), and so does a round holding a
    value written ahead of it (larger than a fixed buffer); a flush after sync=False writes is an
    fdatasync. Every acknowledged sync write survives a crash (abandon, reopen)."""
    holder = {}

    def wrap(e):
        holder["w"] = _SyncLog(e)
        return holder["w"]

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, wrap_engine=wrap, buffer_size=65536,
                                   sync_method="dsync")
        w = holder["w"]
        w.armed = True
        c0 = s.stat()

        await s.put(b"a", b"A" * 5000, sync=True)
        first = w.take()
        assert first and all(k == "write" and d for k, d in first), first  # data + journal, RWF_DSYNC

        await s.put(b"b", b"B" * 100)  # sync=False: plain writes, durable at a later fdatasync
        assert [x for x in w.take()] == [("write", False)] * 2 and s.needs_flush
        await s.put(b"c", b"C" * 100, sync=True)
        log = w.take()
        assert log[-1] == ("fdatasync", None) and not any(d for k, d in log if k == "write"), log
        assert not s.needs_flush

        await s.put(b"d", b"D" * 100, sync=True)  # all durable again: back to RWF_DSYNC
        assert w.take() == [("write", True)] * 2

        big = os.urandom(200_000)  # > the 64 KiB buffers: written ahead of its round
        await s.put(b"big", big, sync=True)
        log = w.take()
        assert log[-1] == ("fdatasync", None) and not any(d for k, d in log if k == "write"), log

        await s.put_many([(b"e%d" % i, b"E" * i) for i in range(20)], sync=True)
        log = w.take()  # one round: the values (merged where neighbours) and the journal
        assert len(log) >= 2 and all(x == ("write", True) for x in log), log

        await s.put(b"f", b"F")  # sync=False, then a flush: the fdatasync covers it
        w.take()
        await s.flush()
        assert w.take() == [("fdatasync", None)]
        await s.delete(b"a", sync=True)
        assert w.take() == [("write", True)]  # a delete round: the journal write alone

        st = s.stat()
        assert st["dsync_commits"] - c0["dsync_commits"] == 4
        assert st["group_commits"] - c0["group_commits"] == 6
        assert st["fdatasyncs"] - c0["fdatasyncs"] == 3  # c's round, big's round, the flush
        await s.abandon()  # a crash right after the acknowledgements
        s = await BlobStore.open(p, engine=engine)
        assert not s.has(b"a") and await s.get(b"big") == big
        for k, v in ((b"b", b"B" * 100), (b"c", b"C" * 100), (b"d", b"D" * 100), (b"f", b"F"), (b"e19", b"E" * 19)):
            assert await s.get(k) == v, k
        await s.close()

    run(main())


def test_fdatasync_method_never_writes_with_dsync(tdir, engine):
    holder = {}

    def wrap(e):
        holder["w"] = _SyncLog(e)
        return holder["w"]

    async def main():
        s = await BlobStore.create(os.path.join(tdir, "d"), 8 * MiB, engine=engine, wrap_engine=wrap,
                                   sync_method="fdatasync")
        w = holder["w"]
        w.armed = True
        await asyncio.gather(*(s.put(b"k%d" % i, b"v" * 3000, sync=True) for i in range(10)))
        log = w.take()
        assert log and not any(d for k, d in log if k == "write") and log[-1] == ("fdatasync", None)
        assert s.stat()["dsync_commits"] == 0
        await s.close()
        with pytest.raises(ConfigError, match="sync_method"):
            await BlobStore.open(os.path.join(tdir, "d"), engine=engine, sync_method="osync")

    run(main())


def test_auto_sync_method_follows_the_devices_write_cache():
    """auto takes dsync only where a RWF_DSYNC write needs no cache flush of its own."""
    assert choose_sync_method("auto", (True, True))[0] == "dsync"  # volatile cache with FUA
    assert choose_sync_method("auto", (False, False))[0] == "dsync"  # no volatile cache (e.g. PLP)
    method, why = choose_sync_method("auto", (True, False))  # the bench VM's virtio disk
    assert method == "fdatasync" and "without FUA" in why
    assert choose_sync_method("auto", None) == ("fdatasync", "auto: the device's write cache is unknown")
    for given in ("dsync", "fdatasync"):
        for cache in ((True, False), (False, True), None):
            assert choose_sync_method(given, cache) == (given, "as configured")
    with pytest.raises(ConfigError, match="sync_method 'osync'"):
        choose_sync_method("osync", None)


def test_write_cache_of_reads_sysfs_and_follows_a_partition(tmp_path):
    """write_cache_of finds the queue of the device under a path (a partition's in its disk's
    directory) and answers None where sysfs says nothing."""
    st = os.stat(TMP_ROOT)
    maj, mn = os.major(st.st_dev), os.minor(st.st_dev)
    disk = tmp_path / "devices" / "vdz"
    part = disk / "vdz1"
    (disk / "queue").mkdir(parents=True)
    part.mkdir()
    (disk / "queue" / "write_cache").write_text("write back\n")
    (disk / "queue" / "fua").write_text("1\n")
    (tmp_path / "dev" / "block").mkdir(parents=True)
    os.symlink(part, tmp_path / "dev" / "block" / f"{maj}:{mn}")
    assert write_cache_of(TMP_ROOT, sysfs=str(tmp_path)) == (True, True)
    (disk / "queue" / "write_cache").write_text("write through\n")
    (disk / "queue" / "fua").write_text("0\n")
    assert write_cache_of(TMP_ROOT, sysfs=str(tmp_path)) == (False, False)
    (disk / "queue" / "fua").unlink()
    assert write_cache_of(TMP_ROOT, sysfs=str(tmp_path)) is None
    assert write_cache_of(TMP_ROOT, sysfs=str(tmp_path / "absent")) is None


def test_store_resolves_auto_for_its_device_and_says_so(tdir, caplog):
    async def main():
        p = os.path.join(tdir, "d")
        with caplog.at_level(logging.INFO, logger="ringblob.store"):
            s = await BlobStore.create(p, 8 * MiB, engine="psync")
        want, why = choose_sync_method("auto", write_cache_of(p))
        assert s.sync_method == want and s.stat()["sync_method"] == want
        assert any(f"sync_method {want} ({why})" in r.getMessage() for r in caplog.records)
        await s.put(b"k", b"v", sync=True)
        assert s.stat()["dsync_commits" if want == "dsync" else "fdatasyncs"] >= 1
        await s.close()
        s = await BlobStore.open(p, engine="psync", sync_method="dsync")
        assert s.sync_method == "dsync" and s.stat()["sync_method"] == "dsync"
        await s.close()

    run(main())


async def _writes_done(stream) -> None:
    """Let the loop turn's submit go out and wait until no write of ``stream`` is in flight."""
    await asyncio.sleep(0)
    await _stream_idle(stream)


def test_a_leased_value_is_written_buffer_by_buffer_while_it_arrives(tdir, engine, parallel_hash):
    """lease_value allocates the value's extent at once (a stream: values_streamed), and each
    buffer is on the disk as soon as it is full, before the rest of the value has arrived; the
    put then takes that extent: the value reads back, survives a crash and a reopen, and every
    buffer goes back to the pool."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"first", b"1")
        free0, space0 = s._aio.engine.free_buffers, s.stat()["free_bytes"]
        v = os.urandom(3 * BSZ + 5000)
        lv = s.lease_value(len(v))
        stream = lv.writer
        assert stream is not None and s.stat()["values_streamed"] == 1
        extent = stream.npages * s.page_size
        assert extent == -(-len(v) // s.page_size) * s.page_size and s.stat()["free_bytes"] == space0 - extent
        offset = stream.page * s.page_size
        lv.write(v[: BSZ + 100])  # the first buffer full, the second begun
        assert stream.issued == 1
        await _writes_done(stream)
        with open(p, "rb") as f:
            assert os.pread(f.fileno(), BSZ, offset) == v[:BSZ]  # on the disk, the value incomplete
        lv.write(v[BSZ + 100 :])
        assert lv.complete and stream.issued == 4 and not stream.stopped
        fut = asyncio.get_running_loop().create_future()
        assert s.put_leased_nowait(b"k", lv, lambda _r, err: fut.set_result(err), sync=True)
        assert lv.writer is None  # the put took the stream's extent
        assert await fut is None and await s.get(b"k") == v
        assert s.stat()["free_bytes"] == space0 - extent and s.stat()["bytes_written"] >= len(v)
        assert lv.released and s._aio.engine.free_buffers == free0
        with open(p, "rb") as f:
            assert os.pread(f.fileno(), len(v), offset) == v
        await s.abandon()  # crash: acknowledged with sync=True
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v
        await s.close()

    run(main())


def test_a_value_given_up_frees_its_extent_only_once_its_writes_completed(tdir, engine):
    """A value released half way (the client went away) while its buffers' writes are in flight
    keeps its extent until they completed — an extent freed earlier could be given to the next
    put and then overwritten by the stale write — and then frees it; the space is taken again by
    later puts, which read back their own bytes."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        await s.put(b"first", b"1")
        free0, space0 = s._aio.engine.free_buffers, s.stat()["free_bytes"]
        v = os.urandom(4 * BSZ)
        lv = s.lease_value(len(v))
        stream = lv.writer
        lv.write(v[: 2 * BSZ + 7])  # two buffers' writes queued
        assert stream.issued == 2 and stream.inflight == 2
        lv.release()
        assert lv.released and lv.writer is None
        assert s.stat()["free_bytes"] == space0 - 4 * BSZ  # not yet: its writes are in flight
        await _writes_done(stream)
        assert stream.inflight == 0 and s.stat()["free_bytes"] == space0
        assert s._aio.engine.free_buffers == free0 and s.stat()["receive_buffers_held"] == 0
        w = os.urandom(4 * BSZ)
        lv2 = s.lease_value(len(w))
        _receive(lv2, w)
        await s.put_leased(b"w", lv2, sync=True)
        await s.put(b"x", os.urandom(3000), sync=True)
        assert await s.get(b"w") == w and not s.has(b"v")
        # given up before any buffer was full: nothing in flight, the extent is free at once
        lv3 = s.lease_value(len(v))
        lv3.write(v[:100])
        before = s.stat()["free_bytes"]
        lv3.release()
        assert s.stat()["free_bytes"] == before + 4 * BSZ
        await s.close()

    run(main())


def test_a_stream_that_finds_no_queue_slots_is_finished_by_the_put(tdir, engine):
    """queue_depth 4: a second value's buffer writes find the slots taken by the first's, so its
    stream stops; put_leased_nowait declines (its last writes find no slots either) and
    put_leased gives the stream up (its extent freed once its write completed) and writes the
    value anew. Both values read back, and no space or buffer is left behind."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, queue_depth=4, buffer_count=16)
        await s.put(b"first", b"1")
        free0, space0 = s._aio.engine.free_buffers, s.stat()["free_bytes"]
        a, b = os.urandom(3 * BSZ), os.urandom(3 * BSZ - 1)
        la, lb = s.lease_value(len(a)), s.lease_value(len(b))
        _receive(la, a)
        _receive(lb, b)
        assert la.writer.issued == 3 and not la.writer.stopped
        assert lb.writer.issued == 1 and lb.writer.stopped
        assert s.put_leased_nowait(b"b", lb, lambda _r, _e: None) is False and lb.writer is not None
        await s.put_leased(b"b", lb, sync=True)
        await s.put_leased(b"a", la, sync=True)
        assert await s.get(b"a") == a and await s.get(b"b") == b
        assert s.stat()["free_bytes"] == space0 - 6 * BSZ
        assert s._aio.engine.free_buffers == free0 and s.stat()["receive_buffers_held"] == 0
        await s.close()

    run(main())


def test_a_store_closed_while_a_value_streams_fails_its_writes_and_its_put(tdir, engine):
    """close() with a value half received and two of its writes in flight: the writes end (with
    the engine, or completed while close() ran: the disk may be that fast), the rest of the value
    is still taken with no write queued any more (the stream stops), releasing it is safe, and a
    put of a value leased before the close answers that the store is closed."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine)
        v = os.urandom(4 * BSZ)
        lv = s.lease_value(len(v))
        stream = lv.writer
        lv.write(v[: 2 * BSZ + 1])
        assert stream.inflight == 2
        late = s.lease_value(len(v))
        late.write(v)
        await s.close()
        assert stream.inflight == 0
        lv.write(v[2 * BSZ + 1 :])
        assert lv.complete and stream.issued == 2 and stream.stopped
        lv.release()
        with pytest.raises(EngineClosed, match="closed"):
            await s.put_leased(b"late", late)
        assert late.released
        s = await BlobStore.open(p, engine=engine)
        assert s.stat()["blob_count"] == 0 and not s.has(b"late")
        await s.close()

    run(main())


def test_stream_writes_off_writes_a_leased_value_once_complete(tdir, engine):
    """stream_writes=False: lease_value allocates nothing and attaches no writer (no write before
    the value is complete; values_streamed stays 0), and the value is written and stored by the
    put as before, reading back after a reopen."""

    async def main():
        p = os.path.join(tdir, "d")
        s = await BlobStore.create(p, 16 * MiB, engine=engine, stream_writes=False)
        space0 = s.stat()["free_bytes"]
        v = os.urandom(3 * BSZ + 1)
        lv = s.lease_value(len(v))
        assert lv is not None and lv.writer is None and s.stat()["free_bytes"] == space0
        ops0 = s._aio.ops
        lv.write(v[: 2 * BSZ])
        await asyncio.sleep(0)
        assert s._aio.ops == ops0  # nothing written yet
        lv.write(v[2 * BSZ :])
        await s.put_leased(b"k", lv, sync=True)
        st = s.stat()
        assert st["stream_writes"] is False and st["values_leased"] == 1 and st["values_streamed"] == 0
        await s.close()
        s = await BlobStore.open(p, engine=engine)
        assert await s.get(b"k") == v and s.stat()["stream_writes"] is True  # the default again
        await s.close()

    run(main())
