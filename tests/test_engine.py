"""The engine contract (ringblob.engine), run against both engines: psync and uring.

Every test uses real files opened with O_DIRECT on the repository's ext4 file
system (.test-tmp/), never tmpfs, so alignment and end-of-file behave as on a
data file. Ring-specific tests (setup flags, thread ownership, setup errors,
link resubmission counters) are at the end.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import select
import shutil
import threading
import uuid

import pytest

from ringblob.direct import describe_write_cache, open_direct, write_cache_of
from ringblob.engine import open_engine
from ringblob.engine.psync import PsyncEngine
from ringblob.errors import BufferBusy, Busy, EngineClosed, Misaligned, NoBuffers

from ringblob._uring import Buffer, Ring  # noqa: E402  (io_uring works on the test hosts: never skip)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_ROOT = os.path.join(REPO, ".test-tmp")
BS = 4096
ENGINES = ["psync", "uring"]


@pytest.fixture
def tmpdir_ext4():
    d = os.path.join(TMP_ROOT, f"engine-{uuid.uuid4().hex[:12]}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def datafile(tmpdir_ext4):
    """A 4 MiB data file opened with O_DIRECT (fd, size)."""
    f = open_direct(os.path.join(tmpdir_ext4, "data"), create_size=4 << 20)
    yield f
    f.close()


def make_engine(kind: str, fds, **kw):
    if kind == "uring":
        return Ring(fds, **kw)
    return PsyncEngine(fds, **kw)


@pytest.fixture(params=ENGINES)
def kind(request):
    return request.param


@pytest.fixture
def engine(kind, datafile):
    eng = make_engine(kind, [datafile.fd], buffer_size=64 * 1024, buffer_count=16, queue_depth=64)
    yield eng
    eng.close()


def collect(eng, n: int, timeout: float = 10.0) -> dict:
    """Wait for ``n`` results; return {tag: result}."""
    out: dict = {}
    while len(out) < n:
        got = eng.wait(n - len(out), timeout=timeout)
        if not got:
            raise AssertionError(f"timed out with {len(out)} of {n} results")
        for tag, res in got:
            assert tag not in out, f"result for {tag!r} delivered twice"
            out[tag] = res
    return out


def open_fds() -> int:
    """Descriptors open in this process, after collecting garbage from earlier tests
    (an engine dropped by an earlier test may close its eventfd at any later GC)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# -- data through fixed buffers ---------------------------------------------------


def test_random_roundtrip_at_random_aligned_offsets(engine, datafile):
    rng = random.Random(1234)
    size = datafile.size
    expected: dict[int, bytes] = {}
    for _round in range(6):
        bufs = [engine.lease() for _ in range(8)]
        slots = [4 * s for s in rng.sample(range(size // BS // 4 - 4), 8)]  # 4-block slots: no overlap
        for i, (buf, slot) in enumerate(zip(bufs, slots)):
            nblocks = rng.randint(1, 4)
            data = rng.randbytes(nblocks * BS)
            boff = rng.randrange(0, buf.size // BS - nblocks + 1) * BS
            buf.view[boff : boff + len(data)] = data  # written in place, no copy into the engine
            off = slot * BS
            engine.write_fixed(buf, off, len(data), ("w", i), buf_offset=boff)
            for k in range(nblocks):
                expected[off + k * BS] = data[k * BS : (k + 1) * BS]
        assert engine.pending == 8
        assert engine.submit() == 8
        res = collect(engine, 8)
        assert all(isinstance(r, int) and r > 0 for r in res.values()), res
        for buf in bufs:
            engine.release(buf)
    # read every written block back at a random buffer offset
    buf = engine.lease()
    items = list(expected.items())
    rng.shuffle(items)
    for start in range(0, len(items), 12):
        batch = items[start : start + 12]
        for j, (off, _data) in enumerate(batch):
            engine.read_fixed(buf, off, BS, off, buf_offset=j * BS)
        engine.submit()
        res = collect(engine, len(batch))
        for j, (off, data) in enumerate(batch):
            assert res[off] == BS
            assert buf.view[j * BS : (j + 1) * BS] == data, f"block at {off} differs"
    engine.release(buf)
    assert engine.free_buffers == engine.buffer_count
    assert engine.in_flight == 0 and engine.pending == 0


def test_linked_writes_and_fdatasync_go_in_one_submit(engine, datafile):
    bufs = [engine.lease() for _ in range(4)]
    for i, b in enumerate(bufs):
        b.view[:BS] = bytes([i + 1]) * BS
    before = engine.counters()
    for i, b in enumerate(bufs):
        engine.write_fixed(b, i * BS, BS, f"w{i}", link=True)
    engine.fdatasync("sync")
    assert engine.submit() == 5
    after = engine.counters()
    assert after["enters"] == before["enters"] + 1
    res = collect(engine, 5)
    assert res == {"w0": BS, "w1": BS, "w2": BS, "w3": BS, "sync": 0}
    assert engine.counters()["fdatasyncs"] == before["fdatasyncs"] + 1
    with open(datafile.path, "rb") as f:
        head = f.read(4 * BS)
    assert head == b"".join(bytes([i + 1]) * BS for i in range(4))
    for b in bufs:
        engine.release(b)


def _block_dev_sysfs(path: str) -> str | None:
    """The sysfs directory of the block device holding ``path`` (None if there is none)."""
    st = os.stat(path)
    d = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return os.path.realpath(d) if os.path.exists(d) else None


def _flushes(sysdir: str) -> int:
    """Cache flushes the device completed (field 16 of its ``stat``, Linux >= 5.5)."""
    with open(os.path.join(sysdir, "stat")) as f:
        return int(f.read().split()[15])


def test_dsync_write_completes_on_stable_storage(engine, datafile):
    """``write_fixed(dsync=True)`` (RWF_DSYNC) writes like any write, and reaches the kernel as
    per-write O_DSYNC: on a device with a volatile write cache and no FUA (the bench VM's virtio
    disk), each such write completes only after a cache flush, so sixteen of them, one at a
    time, show sixteen flushes in the device's counters."""
    sysdir = _block_dev_sysfs(datafile.path)
    buf = engine.lease()
    before = _flushes(sysdir) if sysdir else 0
    for i in range(16):
        buf.view[:BS] = bytes([0x40 + i]) * BS
        engine.write_fixed(buf, i * BS, BS, f"d{i}", dsync=True)
        engine.submit()
        assert collect(engine, 1) == {f"d{i}": BS}
    after = _flushes(sysdir) if sysdir else 0
    engine.release(buf)
    with open(datafile.path, "rb") as f:
        assert f.read(16 * BS) == b"".join(bytes([0x40 + i]) * BS for i in range(16))
    cache = write_cache_of(datafile.path)
    if sysdir is None or cache is None:
        pytest.skip("no block device with a known write cache under the test directory: cannot count flushes")
    if cache != (True, False):
        pytest.skip(f"the device needs no flush after a RWF_DSYNC write ({describe_write_cache(cache)})")
    assert after - before >= 16, f"{after - before} cache flushes for 16 RWF_DSYNC writes"


def test_failed_linked_write_cancels_its_fdatasync(engine):
    buf = engine.lease()
    engine.write_fixed(buf, 0, BS, "w", file_index=5, link=True)  # no file registered at 5
    engine.fdatasync("sync")
    engine.submit()
    res = collect(engine, 2)
    assert isinstance(res["w"], OSError) and res["w"].errno == errno.EBADF
    assert "write_fixed" in str(res["w"])
    assert isinstance(res["sync"], OSError) and res["sync"].errno == errno.ECANCELED
    assert "fdatasync" in str(res["sync"])
    engine.release(buf)


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["read", "write", "fdatasync"])
def test_bad_file_index_is_ebadf(engine, op):
    buf = engine.lease()
    if op == "read":
        engine.read_fixed(buf, 0, BS, "x", file_index=1)
    elif op == "write":
        engine.write_fixed(buf, 0, BS, "x", file_index=1)
    else:
        engine.fdatasync("x", file_index=7)
    engine.submit()
    res = collect(engine, 1)["x"]
    assert isinstance(res, OSError)
    assert res.errno == errno.EBADF
    assert res.strerror.startswith({"read": "read_fixed", "write": "write_fixed", "fdatasync": "fdatasync"}[op])
    engine.release(buf)


def test_reads_at_and_across_end_of_file(engine, datafile):
    buf = engine.lease()
    size = datafile.size
    engine.read_fixed(buf, size, BS, "at_eof")
    engine.read_fixed(buf, size - BS, 4 * BS, "across", buf_offset=4 * BS)
    engine.read_fixed(buf, size + 64 * BS, BS, "beyond", buf_offset=8 * BS)
    engine.submit()
    res = collect(engine, 3)
    assert res == {"at_eof": 0, "across": BS, "beyond": 0}
    engine.release(buf)


def test_write_past_end_of_file_extends_it(engine, datafile):
    buf = engine.lease()
    buf.view[:BS] = b"z" * BS
    engine.write_fixed(buf, datafile.size + BS, BS, "w")
    engine.submit()
    assert collect(engine, 1) == {"w": BS}
    assert os.fstat(datafile.fd).st_size == datafile.size + 2 * BS
    engine.release(buf)


@pytest.mark.parametrize(
    "offset,length,buf_offset",
    [(1, BS, 0), (0, 100, 0), (0, BS, 512), (BS + 512, BS, 0), (-BS, BS, 0), (0, 0, 0), (0, -BS, 0)],
)
def test_misaligned_rejected_before_queueing(engine, offset, length, buf_offset):
    buf = engine.lease()
    for fn in (engine.read_fixed, engine.write_fixed):
        with pytest.raises(Misaligned) as info:
            fn(buf, offset, length, "m", buf_offset=buf_offset)
        assert isinstance(info.value, ValueError)
    assert engine.pending == 0 and buf.in_flight == 0
    engine.release(buf)


def test_range_past_buffer_and_foreign_buffer_rejected(kind, engine, datafile):
    buf = engine.lease()
    with pytest.raises(ValueError, match="exceeds the buffer size"):
        engine.read_fixed(buf, 0, BS, "x", buf_offset=buf.size)
    with pytest.raises(ValueError, match="exceeds the buffer size"):
        engine.write_fixed(buf, 0, buf.size + BS, "x")
    other = make_engine(kind, [datafile.fd], buffer_size=64 * 1024, buffer_count=2)
    try:
        foreign = other.lease()
        with pytest.raises(ValueError, match="does not belong"):
            engine.write_fixed(foreign, 0, BS, "x")
        with pytest.raises(ValueError, match="does not belong"):
            engine.release(foreign)
        with pytest.raises(ValueError):
            engine.read_fixed(b"\0" * BS, 0, BS, "x")
    finally:
        other.close()
    assert engine.pending == 0
    engine.release(buf)
    with pytest.raises(ValueError, match="not leased"):
        engine.release(buf)
    with pytest.raises(ValueError, match="not leased"):
        engine.read_fixed(buf, 0, BS, "x")


def test_queue_depth_and_buffer_pool_limits(kind, datafile):
    eng = make_engine(kind, [datafile.fd], buffer_size=8192, buffer_count=2, queue_depth=4)
    try:
        a, b = eng.lease(), eng.lease()
        with pytest.raises(NoBuffers):
            eng.lease()
        for i in range(4):
            eng.read_fixed(a, i * BS, BS, i)
        with pytest.raises(Busy):
            eng.fdatasync("one too many")
        eng.submit()
        with pytest.raises(Busy):  # in flight counts too
            eng.read_fixed(b, 0, BS, "x")
        assert set(collect(eng, 4)) == {0, 1, 2, 3}
        eng.read_fixed(b, 0, BS, "again")
        eng.submit()
        assert collect(eng, 1) == {"again": BS}
        eng.release(a)
        eng.release(b)
        assert eng.free_buffers == 2
    finally:
        eng.close()


# -- buffer lifetime and close ------------------------------------------------------


def test_release_while_in_flight_is_refused(engine):
    buf = engine.lease()
    engine.write_fixed(buf, 0, 16 * BS, "w")
    assert buf.in_flight == 1
    with pytest.raises(BufferBusy):
        engine.release(buf)  # queued, not yet submitted
    engine.submit()
    with pytest.raises(BufferBusy):
        engine.release(buf)  # in flight (or completed but not reaped)
    assert collect(engine, 1) == {"w": 16 * BS}
    assert buf.in_flight == 0
    engine.release(buf)


def test_close_with_ops_in_flight_then_use_raises_engine_closed(kind, datafile):
    fds_before = open_fds()
    eng = make_engine(kind, [datafile.fd], buffer_size=256 * 1024, buffer_count=8, queue_depth=64)
    bufs = [eng.lease() for _ in range(8)]
    views = [b.view for b in bufs]
    for i, b in enumerate(bufs):
        b.view[:] = bytes([i]) * b.size
        eng.write_fixed(b, i * b.size, b.size, i, link=(i % 2 == 0))
    eng.fdatasync("sync")
    eng.submit()
    eng.read_fixed(bufs[0], 0, BS, "never submitted")
    eng.close()  # waits for the writes; drops the queued read
    assert eng.closed
    eng.close()  # idempotent
    for call in (
        eng.lease,
        lambda: eng.release(bufs[0]),
        lambda: eng.read_fixed(bufs[0], 0, BS, "x"),
        lambda: eng.write_fixed(bufs[0], 0, BS, "x"),
        lambda: eng.fdatasync("x"),
        eng.submit,
        eng.reap,
        eng.wait,
    ):
        with pytest.raises(EngineClosed):
            call()
    # the views handed out stay valid memory after close (no dangling mapping)
    for i, v in enumerate(views):
        assert v[0] == i and v[-1] == i
        v[:4] = b"safe"
    assert open_fds() == fds_before
    # the writes finished before close returned
    with open(datafile.path, "rb") as f:
        for i in range(8):
            f.seek(i * 256 * 1024)
            assert f.read(BS) == bytes([i]) * BS


EVENTFD_SCENARIOS = {
    # name: (queue ops on (engine, buf, size), expected results)
    "read": (lambda e, b, size: e.read_fixed(b, 0, BS, "r"), {"r": BS}),
    "fdatasync": (lambda e, b, size: e.fdatasync("s"), {"s": 0}),
    "bad file index": (lambda e, b, size: e.read_fixed(b, 0, BS, "x", file_index=5), {"x": errno.EBADF}),
    "read at end of file": (lambda e, b, size: e.read_fixed(b, size, BS, "e"), {"e": 0}),
    "short read resubmitted chain": (
        lambda e, b, size: (e.read_fixed(b, size - BS, 2 * BS, "sc", link=True), e.fdatasync("s2")),
        {"sc": BS, "s2": 0},
    ),
}


@pytest.mark.parametrize("scenario", list(EVENTFD_SCENARIOS))
def test_eventfd_becomes_readable_on_completion(engine, datafile, scenario):
    """Only the eventfd is watched (as an asyncio loop does); every completion, including
    ones the engine had to resubmit internally, must make it readable until reaped."""
    queue, expected = EVENTFD_SCENARIOS[scenario]
    buf = engine.lease()
    efd = engine.eventfd
    engine.reap()  # start from a drained eventfd
    r, _, _ = select.select([efd], [], [], 0)
    assert not r
    queue(engine, buf, datafile.size)
    engine.submit()
    got: dict = {}
    for _spin in range(1000):
        if len(got) == len(expected):
            break
        r, _, _ = select.select([efd], [], [], 10)
        assert r == [efd], f"eventfd not readable; results so far {got}"
        for tag, res in engine.reap():
            got[tag] = res.errno if isinstance(res, OSError) else res
    assert got == expected
    engine.reap()  # nothing left: the eventfd ends drained
    r, _, _ = select.select([efd], [], [], 0)
    assert not r
    engine.release(buf)


def test_reap_with_small_max_keeps_eventfd_readable(engine):
    """Results taken two at a time keep the eventfd readable while any are left, and the reap
    that takes the last leaves it drained. Many rounds: psync's workers complete concurrently
    with the reaps (its eventfd once stayed set after the last result, 1 round in ~80)."""
    buf = engine.lease()
    for rnd in range(300):
        for i in range(8):
            engine.read_fixed(buf, i * BS, BS, i, buf_offset=i * BS)
        engine.submit()
        got: list = []
        while len(got) < 8:
            r, _, _ = select.select([engine.eventfd], [], [], 10)
            assert r, f"round {rnd}: eventfd not readable with {8 - len(got)} results outstanding"
            part = engine.reap(max_cqes=2)
            assert len(part) <= 2
            got += part
        assert sorted(t for t, _ in got) == list(range(8))
        # the reap that took the last results drained the eventfd: an event loop does not spin
        r, _, _ = select.select([engine.eventfd], [], [], 0)
        assert not r, f"round {rnd}: the eventfd is readable with no result left"
    engine.release(buf)


def test_eventfd_readable_while_partial_reaps_interleave_with_submits(engine):
    """Ops submitted while earlier results are still left (a burst taken a few CQEs per loop
    turn, new requests read in between) keep the eventfd readable until every result is
    reaped, and the eventfd ends drained."""
    buf = engine.lease()
    per_buf = engine.buffer_size // BS
    submitted = got = 0
    results: list = []
    for wave in range(6):
        for i in range(5):
            engine.read_fixed(buf, (submitted % per_buf) * BS, BS, submitted, buf_offset=(submitted % per_buf) * BS)
            submitted += 1
        engine.submit()
        r, _, _ = select.select([engine.eventfd], [], [], 10)
        assert r, f"eventfd not readable with {submitted - got} results outstanding (wave {wave})"
        part = engine.reap(max_cqes=3)
        got += len(part)
        results += part
    while got < submitted:
        r, _, _ = select.select([engine.eventfd], [], [], 10)
        assert r, f"eventfd not readable with {submitted - got} results outstanding"
        part = engine.reap(max_cqes=3)
        got += len(part)
        results += part
    assert sorted(t for t, _ in results) == list(range(submitted))
    assert all(res == BS for _, res in results)
    r, _, _ = select.select([engine.eventfd], [], [], 0)
    assert not r
    engine.release(buf)


def test_wait_timeout_and_nothing_in_flight(engine):
    assert engine.wait() == []  # nothing in flight: returns at once
    assert engine.wait(5, timeout=0.01) == []
    buf = engine.lease()
    engine.read_fixed(buf, 0, BS, "r")
    engine.submit()
    assert engine.wait(10, timeout=10) == [("r", BS)]  # capped at what is in flight
    engine.release(buf)


def test_twenty_thousand_ops_leak_no_buffers_or_fds(kind, datafile):
    fds_before = open_fds()
    eng = make_engine(kind, [datafile.fd], buffer_size=BS * 4, buffer_count=40, queue_depth=32)
    rng = random.Random(7)
    nblocks = datafile.size // BS
    total, done, errors = 20000, 0, 0
    inflight: dict[int, Buffer] = {}
    seq = 0
    try:
        while done < total:
            while seq < total and len(inflight) < 32:
                buf = eng.lease()
                off = rng.randrange(nblocks) * BS
                if seq % 3 == 0:
                    eng.write_fixed(buf, off, BS, seq)
                elif seq % 97 == 0:
                    eng.fdatasync(seq)
                else:
                    eng.read_fixed(buf, off, BS, seq)
                inflight[seq] = buf
                seq += 1
            eng.submit()
            for tag, res in eng.wait(1):
                done += 1
                if not (res == BS or (res == 0 and tag % 97 == 0 and tag % 3)):
                    errors += 1
                eng.release(inflight.pop(tag))
        assert errors == 0
        assert eng.free_buffers == eng.buffer_count
        assert eng.in_flight == 0 and eng.pending == 0
        c = eng.counters()
        assert c["sqes"] >= total
    finally:
        eng.close()
    assert open_fds() == fds_before


def test_linked_chain_after_short_read_at_eof_still_runs_in_order(kind, datafile):
    """A read crossing end of file comes back short, which breaks an io_uring link:
    the engine must still run the linked ops after it (psync runs them anyway)."""
    eng = make_engine(kind, [datafile.fd], buffer_size=64 * 1024, buffer_count=4)
    try:
        size = datafile.size
        buf, wbuf = eng.lease(), eng.lease()
        wbuf.view[:BS] = b"L" * BS
        eng.read_fixed(buf, size - BS, 3 * BS, "short", link=True)
        eng.write_fixed(wbuf, 0, BS, "w", link=True)
        eng.fdatasync("sync")
        eng.submit()
        res = collect(eng, 3)
        assert res == {"short": BS, "w": BS, "sync": 0}
        with open(datafile.path, "rb") as f:
            assert f.read(BS) == b"L" * BS
        if kind == "uring":
            c = eng.counters()
            assert c["short_continuations"] >= 1
            assert c["link_resubmits"] >= 2  # the write and the fdatasync went again
        eng.release(buf)
        eng.release(wbuf)
    finally:
        eng.close()


def test_open_engine_kinds(datafile):
    for kind, cls in (("psync", PsyncEngine), ("uring", Ring), ("auto", Ring)):
        eng = open_engine(kind, [datafile.fd], buffer_size=8192, buffer_count=2)
        try:
            assert isinstance(eng, cls)
            assert eng.name == ("psync" if cls is PsyncEngine else "uring")
            assert eng.block_size == 4096 and eng.buffer_size == 8192 and eng.buffer_count == 2
        finally:
            eng.close()


# -- Ring-specific -----------------------------------------------------------------


KNOWN_FLAGS = {"SINGLE_ISSUER", "DEFER_TASKRUN", "TASKRUN_FLAG", "COOP_TASKRUN"}


def test_ring_reports_setup_flags(datafile):
    with Ring([datafile.fd], buffer_size=8192, buffer_count=2) as ring:
        assert isinstance(ring.setup_flags, list)
        assert set(ring.setup_flags) <= KNOWN_FLAGS
        # this kernel (>= 6.1) takes the newest mode
        assert {"SINGLE_ISSUER", "DEFER_TASKRUN"} <= set(ring.setup_flags)
    with Ring([datafile.fd], buffer_size=8192, buffer_count=2, single_issuer=False) as ring:
        assert "SINGLE_ISSUER" not in ring.setup_flags and "DEFER_TASKRUN" not in ring.setup_flags


def test_single_issuer_ring_refuses_other_threads(datafile):
    with Ring([datafile.fd], buffer_size=8192, buffer_count=2) as ring:
        buf = ring.lease()
        ring.read_fixed(buf, 0, BS, "r")
        errs: list = []

        def other():
            try:
                ring.submit()
            except RuntimeError as exc:
                errs.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errs and "SINGLE_ISSUER" in str(errs[0])
        ring.submit()
        assert collect(ring, 1) == {"r": BS}


def test_shared_ring_can_submit_and_wait_in_other_threads(datafile):
    """single_issuer=False: submit from one thread and wait (GIL released, inside the kernel)
    in another; the op is a pipe read, so the waiting thread really enters the kernel.

    The submitting thread stays alive until the op completes: the kernel cancels a thread's
    pending io_uring requests when that thread exits."""
    import time

    pr, pw = os.pipe()
    try:
        with Ring([datafile.fd, pr], buffer_size=8192, buffer_count=2, single_issuer=False) as ring:
            buf = ring.lease()
            for round_ in range(2):
                ring.read_fixed(buf, 0, BS, round_, file_index=1)
                out: dict = {}
                submitted, finished = threading.Event(), threading.Event()

                def submitter():
                    out["submit"] = ring.submit()
                    submitted.set()
                    finished.wait(20)

                def waiter():
                    out["wait"] = ring.wait(1, timeout=10)

                ts = threading.Thread(target=submitter)
                ts.start()
                assert submitted.wait(10)
                tw = threading.Thread(target=waiter)
                tw.start()
                time.sleep(0.1)
                os.write(pw, bytes([65 + round_]) * BS)
                tw.join()
                finished.set()
                ts.join()
                assert out == {"submit": 1, "wait": [(round_, BS)]}
                assert buf.view[:BS] == bytes([65 + round_]) * BS
    finally:
        os.close(pr)
        os.close(pw)


def test_ring_setup_failure_names_the_step_and_leaks_nothing(tmpdir_ext4):
    fds_before = open_fds()
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # a descriptor number that is no longer open
    with pytest.raises(OSError) as info:
        Ring([r], buffer_size=8192, buffer_count=2)
    assert info.value.errno == errno.EBADF
    assert info.value.strerror.startswith("io_uring_register_files: EBADF")
    assert open_fds() == fds_before


def test_ring_rejects_bad_sizes(datafile):
    with pytest.raises(ValueError):
        Ring([datafile.fd], block_size=3000)
    with pytest.raises(ValueError):
        Ring([datafile.fd], buffer_size=1000)
    with pytest.raises(ValueError):
        Ring([datafile.fd], buffer_count=0)
    with pytest.raises(ValueError):
        Ring([])


def test_ring_buffer_view_is_the_registered_memory(datafile):
    """A write from a buffer's view needs no copy: bytes put in the view land on disk."""
    with Ring([datafile.fd], buffer_size=8192, buffer_count=2) as ring:
        buf = ring.lease()
        assert isinstance(buf, Buffer) and buf.size == 8192 and len(buf.view) == 8192
        assert not buf.view.readonly
        buf.view[BS : 2 * BS] = b"q" * BS
        ring.write_fixed(buf, 3 * BS, BS, "w", buf_offset=BS)
        ring.submit()
        assert collect(ring, 1) == {"w": BS}
        with open(datafile.path, "rb") as f:
            f.seek(3 * BS)
            assert f.read(BS) == b"q" * BS


DENY = os.path.join(REPO, "tests", "deny_io_uring.py")
_DENIED_PROBE = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from ringblob._uring import Ring
from ringblob.engine import open_engine
from ringblob.errors import EngineUnavailable
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
out = {}
try:
    Ring([fd], buffer_size=8192, buffer_count=2)
except OSError as exc:
    out["ring"] = [exc.errno, exc.strerror]
eng = open_engine("auto", [fd], buffer_size=8192, buffer_count=2)
out["auto"] = eng.name
eng.close()
try:
    open_engine("uring", [fd])
except EngineUnavailable as exc:
    out["uring"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("err", ["EPERM", "ENOSYS"])
def test_refused_io_uring_setup_raises_oserror_and_auto_falls_back(tmpdir_ext4, err):
    """Under a seccomp filter refusing io_uring_setup (Docker's default profile), Ring raises
    OSError with that errno naming the step, and open_engine('auto') falls back to psync."""
    import json
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, DENY, "--errno", err, "--", sys.executable, "-c", _DENIED_PROBE,
         os.path.join(tmpdir_ext4, "f")],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    code = getattr(errno, err)
    assert out["ring"][0] == code
    assert out["ring"][1].startswith(f"io_uring_queue_init_params: {err}")
    assert out["auto"] == "psync"
    assert "using psync, not io_uring" in p.stderr and err in p.stderr
    assert err in out["uring"]


def test_kernel_io_error_surfaces_with_errno_and_offset(kind, tmpdir_ext4):
    """On a device with 4096-byte logical sectors, an engine told block_size=512 lets a
    512-aligned op through; the kernel refuses it with EINVAL, delivered as the op's result."""
    import subprocess

    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a 4096-byte-sector loop device")
    backing = os.path.join(tmpdir_ext4, "backing")
    with open(backing, "wb") as f:
        f.truncate(4 << 20)
    p = subprocess.run(["losetup", "-b", "4096", "-f", "--show", backing], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        df = open_direct(dev)
        try:
            assert df.block_size == 4096
            eng = make_engine(kind, [df.fd], block_size=512, buffer_size=8192, buffer_count=2)
            try:
                buf = eng.lease()
                eng.write_fixed(buf, 512, 512, "bad", link=True)
                eng.fdatasync("sync")
                eng.read_fixed(buf, 4096, 4096, "good")
                eng.submit()
                res = collect(eng, 3)
                assert isinstance(res["bad"], OSError) and res["bad"].errno == errno.EINVAL
                assert res["bad"].strerror == "write_fixed: EINVAL (Invalid argument) at offset 512"
                assert isinstance(res["sync"], OSError) and res["sync"].errno == errno.ECANCELED
                assert res["good"] == 4096
                eng.release(buf)
            finally:
                eng.close()
        finally:
            df.close()
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _run_script(eng, script, size):
    """Queue ``script`` (list of (op, block, nblocks, bad_fd, link)) in one submit; results by index."""
    buf = eng.lease()
    for i, (op, block, nblocks, bad, link) in enumerate(script):
        fi = 3 if bad else 0
        if op == "r":
            eng.read_fixed(buf, block * BS, nblocks * BS, i, file_index=fi, link=link)
        elif op == "w":
            eng.write_fixed(buf, block * BS, nblocks * BS, i, file_index=fi, link=link)
        else:
            eng.fdatasync(i, file_index=fi, link=link)
    eng.submit()
    res = collect(eng, len(script))
    eng.release(buf)
    return {i: (r if isinstance(r, int) else ("err", r.errno)) for i, r in res.items()}


def test_random_linked_chains_give_the_same_results_on_both_engines(datafile):
    """Differential test of the chain logic: random chains of reads (some crossing or past end
    of file: short results that break io_uring links), writes, fdatasyncs and ops on a bad file
    index (failures that cancel the rest of their chain) give identical results on psync and uring."""
    size_blocks = datafile.size // BS
    rng = random.Random(99)
    engines = {k: make_engine(k, [datafile.fd], buffer_size=64 * 1024, buffer_count=2, queue_depth=64)
               for k in ENGINES}
    try:
        for _round in range(25):
            script = []
            for _ in range(rng.randint(1, 24)):
                op = rng.choice("rrrwwf")
                nblocks = rng.randint(1, 4)
                where = rng.random()
                if op == "r" and where < 0.3:
                    block = size_blocks - rng.randint(0, 2)  # at or across the end of file
                elif op == "r" and where < 0.4:
                    block = size_blocks + rng.randint(1, 50)  # past it
                else:
                    block = rng.randrange(0, size_blocks - 4)
                script.append((op, block, nblocks, rng.random() < 0.08, rng.random() < 0.6))
            results = {k: _run_script(e, script, datafile.size) for k, e in engines.items()}
            assert results["uring"] == results["psync"], script
        c = engines["uring"].counters()
        assert c["short_continuations"] > 0 and c["link_resubmits"] > 0
    finally:
        for e in engines.values():
            e.close()


def test_ring_dropped_with_ops_in_flight_is_collected_without_leaks(datafile):
    """A ring and its buffers reference each other; forgetting one with writes in flight
    (no close) must neither crash nor leak the ring fd or the eventfd once collected."""
    import gc

    before = open_fds()
    for _ in range(5):
        ring = Ring([datafile.fd], buffer_size=64 * 1024, buffer_count=8)
        bufs = [ring.lease() for _ in range(8)]
        for j, b in enumerate(bufs):
            b.view[:] = bytes([j]) * b.size
            ring.write_fixed(b, j * b.size, b.size, j)
        ring.submit()
        del ring, bufs, b
        gc.collect()
    assert open_fds() == before
    with open(datafile.path, "rb") as f:
        for j in range(8):
            f.seek(j * 64 * 1024)
            assert f.read(BS) == bytes([j]) * BS


def test_ring_wait_releases_the_gil(datafile):
    """wait() blocks in io_uring_enter with the GIL released: another Python thread runs and
    feeds the pipe the ring is reading from (a pipe read completes only when data arrives)."""
    import time

    pr, pw = os.pipe()
    try:
        with Ring([datafile.fd, pr], buffer_size=8192, buffer_count=2) as ring:
            buf = ring.lease()
            ring.read_fixed(buf, 0, BS, "pipe", file_index=1)
            ring.submit()

            def feed():
                time.sleep(0.2)
                os.write(pw, b"p" * BS)

            t = threading.Thread(target=feed)
            t.start()
            got = ring.wait(1, timeout=10)
            t.join()
            assert got == [("pipe", BS)]
            assert buf.view[:BS] == b"p" * BS
    finally:
        os.close(pr)
        os.close(pw)


def test_ring_close_cancels_an_op_that_never_completes(datafile):
    """close() gives ops in flight a grace period, then cancels what is left (a read on an
    empty pipe) and waits for its CQE: it returns, and leaks nothing."""
    import time

    before = open_fds()
    pr, pw = os.pipe()
    try:
        ring = Ring([datafile.fd, pr], buffer_size=8192, buffer_count=2)
        buf = ring.lease()
        ring.read_fixed(buf, 0, BS, "never", file_index=1)
        ring.submit()
        t0 = time.monotonic()
        ring.close()
        assert time.monotonic() - t0 < 10
        assert ring.closed and buf.in_flight == 0
        with pytest.raises(EngineClosed):
            ring.wait()
    finally:
        os.close(pr)
        os.close(pw)
    assert open_fds() == before


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_driven_by_an_event_loop_through_the_eventfd(kind, datafile, loop_kind):
    """The way the store uses an engine: loop.add_reader(engine.eventfd) and reap() on
    readiness, never wait(). 2000 reads and writes at QD 16 all complete."""
    import asyncio

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    async def main():
        eng = make_engine(kind, [datafile.fd], buffer_size=BS, buffer_count=16, queue_depth=16)
        rng = random.Random(5)
        results: dict = {}
        todo = list(range(2000))
        done = asyncio.Event()
        bufs = {}

        def start(tag):
            buf = eng.lease()
            bufs[tag] = buf
            off = rng.randrange(datafile.size // BS) * BS
            (eng.write_fixed if tag % 2 else eng.read_fixed)(buf, off, BS, tag)

        def on_ready():
            for tag, res in eng.reap(max_cqes=8):
                results[tag] = res
                eng.release(bufs.pop(tag))
                if todo:
                    start(todo.pop())
            eng.submit()
            if len(results) == 2000:
                done.set()

        for _ in range(16):
            start(todo.pop())
        loop.add_reader(eng.eventfd, on_ready)
        eng.submit()
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            loop.remove_reader(eng.eventfd)
            eng.close()
        return results

    try:
        results = loop.run_until_complete(main())
    finally:
        loop.close()
    assert len(results) == 2000 and all(r == BS for r in results.values())


_MEMLOCK_PROBE = r"""
import json, logging, os, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from ringblob._uring import Ring
from ringblob.engine import open_engine
import ringblob.engine.psync  # imported before the uid drop (nobody may not read the stdlib here)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
if os.geteuid() == 0:  # drop CAP_IPC_LOCK, or the limit does not apply
    os.setgid(65534)
    os.setuid(65534)
out = {}
before = len(os.listdir("/proc/self/fd"))
try:
    Ring([fd], buffer_size=262144, buffer_count=64)  # 16 MiB of fixed buffers > 1 MiB
except OSError as exc:
    out["ring"] = [exc.errno, exc.strerror]
out["fds_leaked"] = len(os.listdir("/proc/self/fd")) - before
small = Ring([fd], buffer_size=4096, buffer_count=16)  # 64 KiB fits
out["small"] = small.name
small.close()
eng = open_engine("auto", [fd], buffer_size=262144, buffer_count=64)
out["auto"] = eng.name
eng.close()
print(json.dumps(out))
"""


def test_fixed_buffers_over_memlock_limit_raise_enomem_and_auto_falls_back(tmpdir_ext4):
    """An unprivileged process whose RLIMIT_MEMLOCK is below the buffer pool: registering the
    fixed buffers fails with ENOMEM naming the step and the fix; nothing leaks; open_engine('auto')
    falls back to psync with its WARNING line."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _MEMLOCK_PROBE, os.path.join(tmpdir_ext4, "f")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ring"][0] == errno.ENOMEM
    assert out["ring"][1].startswith("io_uring_register_buffers: ENOMEM")
    assert "LimitMEMLOCK" in out["ring"][1]
    assert out["fds_leaked"] == 0
    assert out["small"] == "uring"
    assert out["auto"] == "psync"
    assert "RLIMIT_MEMLOCK" in p.stderr and "using psync" in p.stderr


def test_buffer_tobytes_copies_the_first_bytes(kind, datafile):
    eng = make_engine(kind, [datafile.fd], buffer_size=64 * 1024, buffer_count=4, queue_depth=8)
    b = eng.lease()
    data = os.urandom(64 * 1024)
    b.view[:] = data
    assert b.tobytes(5000) == data[:5000] and type(b.tobytes(1)) is bytes
    assert b.tobytes(0) == b"" and b.tobytes(b.size) == data
    out = b.tobytes(4096)
    b.view[:4096] = bytes(4096)
    assert out == data[:4096]  # a copy, not a view
    for bad in (-1, b.size + 1):
        with pytest.raises(ValueError):
            b.tobytes(bad)
    eng.release(b)
    eng.close()
    if kind == "uring":
        with pytest.raises(EngineClosed):
            b.tobytes(10)
