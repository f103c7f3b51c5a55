"""AsyncEngine: one submit per loop turn, buffer and queue-depth backpressure, helpers."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import time
import uuid

import pytest

from ringblob.direct import open_direct
from ringblob.engine import open_engine
from ringblob.engine.aio import REAP_TURN, SUBMIT_EARLY, AsyncEngine
from ringblob.errors import Misaligned

from conftest import ENGINES, TMP_ROOT


@pytest.fixture(params=ENGINES)
def kind(request):
    return request.param


@pytest.fixture
def dfile():
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, f"aio-{uuid.uuid4().hex[:10]}")
    os.makedirs(d)
    p = os.path.join(d, "f")
    data = os.urandom(4 << 20)
    with open(p, "wb") as f:
        f.write(data)
    df = open_direct(p)
    yield df, data
    df.close()
    shutil.rmtree(d, ignore_errors=True)


def make(kind, df, **kw):
    return AsyncEngine(open_engine(kind, [df.fd], block_size=df.block_size, **kw))


def test_one_submit_per_loop_turn(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=32)
        e0 = aio.engine.counters()["enters"]
        got = await asyncio.gather(*(aio.read(i * 4096, 4096) for i in range(20)))
        assert got == [data[i * 4096 : (i + 1) * 4096] for i in range(20)]
        assert aio.submits == 1
        assert aio.engine.counters()["enters"] - e0 == 1
        aio.close()

    asyncio.run(main())


def test_works_under_uvloop(dfile, kind):
    uvloop = pytest.importorskip("uvloop")
    df, data = dfile

    async def main():
        aio = make(kind, df)
        got = await asyncio.gather(*(aio.read(i * 8192, 5000) for i in range(10)))
        assert got == [data[i * 8192 : i * 8192 + 5000] for i in range(10)]
        assert aio.submits == 1
        aio.close()

    uvloop.run(main())


def test_buffer_exhaustion_waits_instead_of_failing(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=2, buffer_size=65536)
        got = await asyncio.gather(*(aio.read(i * 65536, 65536) for i in range(12)))
        assert got == [data[i * 65536 : (i + 1) * 65536] for i in range(12)]
        assert aio.buffer_waits > 0
        assert aio.engine.free_buffers == 2
        aio.close()

    asyncio.run(main())


def test_queue_depth_backpressure(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=32, queue_depth=4)
        got = await asyncio.gather(*(aio.read(i * 4096, 4096) for i in range(24)))
        assert got == [data[i * 4096 : (i + 1) * 4096] for i in range(24)]
        assert aio.queue_waits > 0
        with pytest.raises(ValueError):
            await aio.run([("fdatasync",)] * 5)
        aio.close()

    asyncio.run(main())


def test_write_chunks_large_and_padding_and_read_back(dfile, kind):
    df, _ = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536)  # window of 1 buffer: many rounds
        payload = os.urandom(1_000_003)
        n = await aio.write_chunks(8192, payload, sync=True)
        assert n == -(-len(payload) // df.block_size) * df.block_size
        assert await aio.read(8192, len(payload)) == payload  # the large (bytearray) path
        tail = await aio.read(8192 + (len(payload) // 4096) * 4096, 4096)
        cut = len(payload) % 4096
        assert tail[:cut] == payload[-cut:]
        assert tail[cut : -(-cut // df.block_size) * df.block_size] == bytes(-(-cut // df.block_size) * df.block_size - cut)
        aio.close()

    asyncio.run(main())


@pytest.mark.parametrize("length", [1, 4095, 4096, 65536, 65537, 3 * 65536 - 4096, 3 * 65536 - 1, 3 * 65536,
                                    5 * 65536 + 4097])
def test_write_leased_writes_buffers_filled_in_place_without_a_copy(dfile, kind, length):
    """Bytes put straight into leased buffers (as the daemon receives a PUT value) go to the file
    as they lie there: every buffer full but the last, whose tail is zero-padded to a block inside
    it (the garbage past the value in that block is overwritten); the caller keeps the buffers."""
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)  # window of 2 buffers: several submits
        payload = os.urandom(length)
        bufs = aio.try_lease(-(-length // 65536))
        assert bufs is not None
        for i, b in enumerate(bufs):
            b.view[:] = b"\xee" * 65536  # garbage the padding must overwrite
            piece = payload[i * 65536 : (i + 1) * 65536]
            b.view[: len(piece)] = piece
        s0 = aio.submits
        n = await aio.write_leased(8192, bufs, length, sync=True)
        alen = -(-length // df.block_size) * df.block_size
        assert n == alen and aio.submits - s0 == -(-len(bufs) // 2)
        assert [b.view[0] for b in bufs] == [payload[i * 65536] for i in range(len(bufs))]  # still ours
        aio.release(*bufs)
        assert aio.engine.free_buffers == 8
        with open(df.path, "rb") as f:
            f.seek(8192)
            on_disk = f.read(alen + 4096)
        assert on_disk[:length] == payload
        assert on_disk[length:alen] == bytes(alen - length)
        assert on_disk[alen:] == data[8192 + alen : 8192 + alen + 4096]  # nothing written past the last block
        with pytest.raises(ValueError):
            await aio.write_leased(0, bufs[:1], 65537)  # one buffer cannot hold 65537 bytes
        aio.close()

    asyncio.run(main())


def test_try_lease_never_waits_nor_jumps_the_queue(dfile, kind):
    df, _ = dfile

    async def main():
        aio = make(kind, df, buffer_count=4)
        held = aio.try_lease(3)
        assert held is not None and len(held) == 3 and aio.engine.free_buffers == 1
        assert aio.try_lease(2) is None  # only one free: no partial lease, no wait
        waiter = asyncio.ensure_future(aio.lease(2))
        await asyncio.sleep(0)
        assert not waiter.done()
        assert aio.try_lease(1) is None  # the free buffer is owed to the waiter, first come first served
        aio.release(held[0])
        got = await waiter
        assert len(got) == 2 and aio.engine.free_buffers == 0
        aio.release(*got, *held[1:])
        assert aio.engine.free_buffers == 4
        with pytest.raises(ValueError):
            aio.try_lease(0)
        aio.close()
        assert aio.try_lease(1) is None  # closed

    asyncio.run(main())


def test_write_batch_with_data_sync_is_one_linked_submit(dfile, kind):
    df, _ = dfile

    async def main():
        aio = make(kind, df)
        c0 = aio.engine.counters()
        items = [(i * 4096, bytes([i]) * (100 + i)) for i in range(8)]
        await aio.write_batch_with_data_sync(items)
        c1 = aio.engine.counters()
        assert c1["enters"] - c0["enters"] == 1 and c1["fdatasyncs"] - c0["fdatasyncs"] == 1
        for off, v in items:
            assert await aio.read(off, len(v)) == v
        aio.close()

    asyncio.run(main())


def test_misaligned_raises_before_queueing_and_cancel_releases_buffer(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=4)
        (b,) = await aio.lease(1)
        with pytest.raises(Misaligned):
            await aio.run([("read", b, 100, 4096, 0)])
        assert aio.engine.pending == 0
        aio.release(b)
        t = asyncio.ensure_future(aio.read(0, 4 << 20))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(200):  # the buffers come back once their CQEs arrive
            if aio.engine.free_buffers == 4:
                break
            await asyncio.sleep(0.01)
        assert aio.engine.free_buffers == 4
        assert await aio.read(0, 4096) == data[:4096]
        aio.close()

    asyncio.run(main())


# -- AsyncEngine.read fast path (one buffer; several buffers within a quarter of the pool) ----------


def test_read_fast_path_takes_no_wait_and_returns_the_buffer(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)
        assert await aio.read(12288, 100) == data[12288:12388]  # one buffer, rounded up to a block
        assert await aio.read(0, 65536) == data[:65536]  # exactly one buffer
        assert await aio.read(65536, 2 * 65536 - 4096) == data[65536 : 65536 + 2 * 65536 - 4096]  # two buffers
        assert aio.buffer_waits == 0 and aio.queue_waits == 0
        assert aio.engine.free_buffers == 8 and aio.engine.in_flight == 0
        aio.close()

    asyncio.run(main())


def test_read_fast_path_falls_back_to_waiting_when_the_pool_is_short(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536)
        held = await aio.lease(4)
        t = asyncio.ensure_future(aio.read(4096, 4096))
        await asyncio.sleep(0)
        assert not t.done() and aio.buffer_waits == 1
        aio.release(held[0])
        assert await t == data[4096:8192]
        aio.release(*held[1:])
        assert aio.engine.free_buffers == 4
        aio.close()

    asyncio.run(main())


def test_read_fast_path_misaligned_offset_raises_and_keeps_the_pool(dfile, kind):
    df, _ = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)
        with pytest.raises(Misaligned):
            await aio.read(100, 4096)
        with pytest.raises(Misaligned):
            await aio.read(100, 3 * 65536)
        assert aio.engine.pending == 0 and aio.engine.free_buffers == 8
        aio.close()

    asyncio.run(main())


def test_read_fast_path_short_read_past_eof_is_eio(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)
        end = len(data)
        with pytest.raises(OSError) as ei:
            await aio.read(end - 4096, 8192)  # one buffer, half of it past the end of the file
        assert ei.value.errno == errno.EIO and "short" in str(ei.value)
        with pytest.raises(OSError) as ei:
            await aio.read(end - 65536, 3 * 65536)  # several buffers, the last two past the end
        assert ei.value.errno == errno.EIO
        assert aio.engine.free_buffers == 8 and aio.engine.in_flight == 0
        assert await aio.read(end - 4096, 4096) == data[-4096:]
        aio.close()

    asyncio.run(main())


def test_read_fast_path_failed_cqe_raises_its_oserror(dfile, kind):
    from ringblob.engine.faulty import FaultyEngine

    df, data = dfile

    async def main():
        eng = FaultyEngine(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=8, buffer_size=65536))
        aio = AsyncEngine(eng)
        eng.fail_next("read")
        with pytest.raises(OSError) as ei:
            await aio.read(8192, 4096)
        assert ei.value.errno == errno.EIO
        eng.fail_next("read", 2)  # the second buffer's op of a two-buffer read
        with pytest.raises(OSError) as ei:
            await aio.read(0, 2 * 65536)
        assert ei.value.errno == errno.EIO
        assert await aio.read(8192, 4096) == data[8192:12288]
        assert eng.free_buffers >= 7  # the wrapper keeps one scratch buffer after injecting
        aio.close()

    asyncio.run(main())


def test_read_fast_path_cancelled_read_returns_its_buffer_after_the_cqe(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536)
        t = asyncio.ensure_future(aio.read(0, 4096))
        await asyncio.sleep(0)  # queued (and submitted at the end of this turn)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(200):
            if aio.engine.free_buffers == 4 and aio.engine.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert aio.engine.free_buffers == 4
        assert await aio.read(4096, 4096) == data[4096:8192]
        aio.close()

    asyncio.run(main())


def test_read_after_close_raises_engine_closed(dfile, kind):
    from ringblob.errors import EngineClosed

    df, _ = dfile

    async def main():
        aio = make(kind, df)
        aio.close()
        with pytest.raises(EngineClosed):
            await aio.read(0, 4096)
        with pytest.raises(EngineClosed):
            await aio.read(0, 3 * aio.buffer_size)

    asyncio.run(main())


def test_run_cancelled_while_waiting_cancels_its_other_futures_and_the_engine_goes_on(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)
        bufs = await aio.lease(3)
        ops = [("read", b, i * 65536, 65536, 0) for i, b in enumerate(bufs)]
        t = asyncio.ensure_future(aio.run(ops))
        await asyncio.sleep(0)  # queued
        futs = [aio._futs[tag] for tag in list(aio._futs)]
        assert len(futs) == 3
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert all(f.cancelled() for f in futs)  # as asyncio.gather would leave them
        aio.release(*bufs)  # in flight: returned when their CQEs arrive
        for _ in range(200):
            if aio.engine.in_flight == 0 and aio.engine.free_buffers == 8:
                break
            await asyncio.sleep(0.01)
        assert aio.engine.free_buffers == 8 and not aio._futs
        assert await aio.read(0, 3 * 65536) == data[: 3 * 65536]
        aio.close()

    asyncio.run(main())


# -- read_nowait: a read completed by a call, not a future ----------------------------------------


def _collector(loop):
    """A ``done(data, error)`` that records its calls and resolves a future on the first."""
    calls = []
    fut = loop.create_future()

    def done(data, err):
        calls.append((data, err))
        if not fut.done():
            fut.set_result(None)

    return done, calls, fut


def test_read_nowait_calls_done_once_with_the_bytes_and_returns_the_buffer(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=16, buffer_size=65536)
        loop = asyncio.get_running_loop()
        dones = [_collector(loop) for _ in range(SUBMIT_EARLY + 1)]
        for i, (done, _calls, _f) in enumerate(dones[:-1]):
            assert aio.read_nowait(i * 8192, 5000, done) is True
            # the first SUBMIT_EARLY - 1 wait for the turn's submit; the next one sends the burst at once
            assert aio.submits == (0 if i < SUBMIT_EARLY - 1 else 1)
        assert aio.engine.in_flight + aio.engine.pending == SUBMIT_EARLY
        assert aio.read_nowait(SUBMIT_EARLY * 8192, 5000, dones[-1][0]) is True
        assert aio.engine.free_buffers == 16 - SUBMIT_EARLY - 1 and aio.submits == 1
        await asyncio.gather(*(f for _d, _c, f in dones))
        for i, (_d, calls, _f) in enumerate(dones):
            assert calls == [(data[i * 8192 : i * 8192 + 5000], None)]
        assert aio.submits == 2  # the early one and the turn's, for the rest
        assert aio.engine.free_buffers == 16 and aio.engine.in_flight == 0
        await asyncio.sleep(0.01)
        assert all(len(c) == 1 for _d, c, _f in dones)  # never called twice
        aio.close()

    asyncio.run(main())


def test_a_burst_of_completions_is_delivered_reap_turn_per_loop_turn(dfile, kind):
    """Completions that are all ready at once are delivered in groups of REAP_TURN, one group per
    loop turn, with the eventfd left readable in between, so the loop serves other work (the
    replies of the group, new requests) before it delivers the rest; none is lost or repeated."""
    df, data = dfile

    async def main():
        n = 3 * REAP_TURN + 1
        aio = make(kind, df, buffer_count=n + 1, buffer_size=65536)
        loop = asyncio.get_running_loop()
        dones = [_collector(loop) for _ in range(n)]
        for i, (done, _calls, _f) in enumerate(dones):
            assert aio.read_nowait(i * 8192, 4096, done) is True
        aio._flush()
        time.sleep(0.3)  # (the loop does not run: every read completes before the first reap)
        aio._on_ready()
        assert sum(len(c) for _d, c, _f in dones) == REAP_TURN
        assert select.select([aio.engine.eventfd], [], [], 0)[0]  # the loop comes back for the rest
        await asyncio.gather(*(f for _d, _c, f in dones))
        await asyncio.sleep(0.01)
        for i, (_d, calls, _f) in enumerate(dones):
            assert calls == [(data[i * 8192 : i * 8192 + 4096], None)]
        assert aio.engine.free_buffers == n + 1 and aio.engine.in_flight == 0
        aio.close()

    asyncio.run(main())


def test_read_nowait_declines_what_it_cannot_do_at_once(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=2, buffer_size=65536)
        loop = asyncio.get_running_loop()
        done, calls, _f = _collector(loop)
        assert aio.read_nowait(0, 65536 + 1, done) is False  # more than one buffer
        assert aio.read_nowait(0, 0, done) is False
        held = await aio.lease(2)
        assert aio.read_nowait(0, 4096, done) is False  # no free buffer: the caller awaits read()
        aio.release(*held)
        assert aio.read_nowait(0, 4096, done) is True
        await _f
        assert calls == [(data[:4096], None)]
        assert aio.engine.pending == 0 and aio.engine.free_buffers == 2
        aio.close()

    asyncio.run(main())


def test_read_nowait_misaligned_raises_and_short_read_is_eio(dfile, kind):
    df, data = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536)
        loop = asyncio.get_running_loop()
        done, calls, fut = _collector(loop)
        with pytest.raises(Misaligned):
            aio.read_nowait(100, 4096, done)
        assert aio.engine.free_buffers == 4 and aio.engine.pending == 0 and calls == []
        assert aio.read_nowait(len(data) - 4096, 8192, done) is True  # half of it past the end of the file
        await fut
        ((got, err),) = calls
        assert got is None and isinstance(err, OSError) and err.errno == errno.EIO and "short" in str(err)
        assert aio.engine.free_buffers == 4
        aio.close()

    asyncio.run(main())


def test_read_nowait_failed_cqe_and_a_raising_callback_spare_the_other_ops(dfile, kind):
    from ringblob.engine.faulty import FaultyEngine

    df, data = dfile

    async def main():
        eng = FaultyEngine(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=8, buffer_size=65536))
        aio = AsyncEngine(eng)
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        eng.fail_next("read")
        d1, c1, f1 = _collector(loop)

        def bad(data, err):
            raise RuntimeError("a buggy callback")

        d3, c3, f3 = _collector(loop)
        assert aio.read_nowait(0, 4096, d1) and aio.read_nowait(4096, 4096, bad) and aio.read_nowait(8192, 4096, d3)
        await asyncio.gather(f1, f3)
        for _ in range(500):  # the engine may reap the three completions in different turns
            if reported:
                break
            await asyncio.sleep(0.01)
        assert c1[0][0] is None and c1[0][1].errno == errno.EIO
        assert c3 == [(data[8192:12288], None)]
        assert [str(r["exception"]) for r in reported] == ["a buggy callback"]
        assert eng.free_buffers >= 7
        aio.close()

    asyncio.run(main())


def test_read_nowait_in_flight_at_close_gets_engine_closed(dfile, kind):
    from ringblob.errors import EngineClosed

    df, _ = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536)
        loop = asyncio.get_running_loop()
        done, calls, _f = _collector(loop)
        assert aio.read_nowait(0, 4096, done) is True
        aio.close()  # before the turn's submit: the op never reached the kernel
        assert len(calls) == 1 and calls[0][0] is None and isinstance(calls[0][1], EngineClosed)
        with pytest.raises(EngineClosed):
            aio.read_nowait(0, 4096, done)

    asyncio.run(main())


def test_read_nowait_early_submit_refused_leaves_the_burst_to_the_turn(dfile, kind):
    """io_uring_enter refusing the early submit fails nothing at once (no callback runs inside
    read_nowait); the reads stay queued and the turn's submit sends them."""
    df, data = dfile

    class RefuseOnce:
        def __init__(self, inner):
            self._inner, self.refused = inner, 0

        def submit(self):
            if not self.refused:
                self.refused += 1
                raise OSError(errno.EAGAIN, "io_uring_enter: try again")
            return self._inner.submit()

        def __getattr__(self, name):
            return getattr(self._inner, name)

    async def main():
        eng = RefuseOnce(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=16, buffer_size=65536))
        aio = AsyncEngine(eng)
        loop = asyncio.get_running_loop()
        dones = [_collector(loop) for _ in range(SUBMIT_EARLY)]
        for i, (done, calls, _f) in enumerate(dones):
            assert aio.read_nowait(i * 4096, 4096, done) is True
        assert eng.refused == 1 and aio.submits == 0 and all(c == [] for _d, c, _f in dones)
        await asyncio.gather(*(f for _d, _c, f in dones))
        assert [c for _d, c, _f in dones] == [[(data[i * 4096 : (i + 1) * 4096], None)] for i in range(SUBMIT_EARLY)]
        assert aio.submits == 1 and eng.free_buffers == 16
        aio.close()

    asyncio.run(main())


class _Refusing:
    """An engine whose submit() is refused (ENOMEM, as io_uring_enter can) while ``refuse`` is set;
    everything else goes to the wrapped engine."""

    def __init__(self, inner, refuse=False):
        self._inner, self.refuse = inner, refuse

    def submit(self):
        if self.refuse:
            raise OSError(errno.ENOMEM, "io_uring_enter: out of memory")
        return self._inner.submit()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_refused_turn_submit_fails_read_ops_by_call_and_futures_by_result(dfile, kind):
    """When the turn's one submit is refused, every op it carried fails: a read_nowait op through
    its done (with the errno kept, its buffer back in the pool), a run() op with the OSError as
    its result; the next turn works again."""
    df, data = dfile

    async def main():
        eng = _Refusing(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=8, buffer_size=65536), refuse=True)
        aio = AsyncEngine(eng)
        loop = asyncio.get_running_loop()
        done, calls, fut = _collector(loop)
        assert aio.read_nowait(0, 4096, done) is True
        (buf,) = await aio.lease(1)
        res = await aio.run([("read", buf, 4096, 4096, 0)])
        await fut
        assert len(calls) == 1 and calls[0][0] is None
        err = calls[0][1]
        assert isinstance(err, OSError) and err.errno == errno.ENOMEM and "submit" in str(err)
        assert isinstance(res[0], OSError) and res[0].errno == errno.ENOMEM
        assert not aio._futs and aio.submits == 0
        aio.release(buf)  # (an engine that still holds the refused ops queued keeps it until their CQEs)
        eng.refuse = False
        done, calls, fut = _collector(loop)
        assert aio.read_nowait(8192, 4096, done) is True
        await fut
        assert calls == [(data[8192:12288], None)] and aio.submits == 1
        for _ in range(100):
            if eng.free_buffers == 8:
                break
            await asyncio.sleep(0.001)
        assert eng.free_buffers == 8 and not aio._deferred
        aio.close()

    asyncio.run(main())


# -- run_nowait: a batch of writes and an fdatasync completed by one call --------------------------


def _batch_collector(loop):
    """A ``done(results)`` that records its calls and resolves a future on the first."""
    calls = []
    fut = loop.create_future()

    def done(results):
        calls.append(list(results))
        if not fut.done():
            fut.set_result(None)

    return done, calls, fut


def test_run_nowait_writes_and_fdatasync_complete_by_one_call_in_order(dfile, kind):
    df, _data = dfile

    async def main():
        aio = make(kind, df, buffer_count=8, buffer_size=65536)
        loop = asyncio.get_running_loop()
        bufs = await aio.lease(2)
        bufs[0].view[:8192] = b"a" * 8192
        bufs[1].view[:4096] = b"b" * 4096
        done, calls, fut = _batch_collector(loop)
        ops = [("write", bufs[0], 65536, 8192, 0), ("write", bufs[1], 0, 4096, 0), ("fdatasync",)]
        assert aio.run_nowait(ops, done) is True
        assert aio.submits == 0 and calls == []  # queued for the turn's one submit, nothing called yet
        await fut
        assert calls == [[8192, 4096, 0]] and aio.submits == 1 and not aio._futs
        aio.release(*bufs)
        assert await aio.read(65536, 8192) == b"a" * 8192 and await aio.read(0, 4096) == b"b" * 4096
        await asyncio.sleep(0.01)
        assert len(calls) == 1  # never called twice
        aio.close()

    asyncio.run(main())


def test_run_nowait_declines_without_room_and_refuses_bad_ops_before_queueing(dfile, kind):
    from ringblob.errors import EngineClosed

    df, _ = dfile

    async def main():
        aio = make(kind, df, buffer_count=4, buffer_size=65536, queue_depth=4)
        loop = asyncio.get_running_loop()
        (buf,) = await aio.lease(1)
        done, calls, _fut = _batch_collector(loop)
        assert aio.run_nowait([], done) is False
        assert aio.run_nowait([("fdatasync",)] * 5, done) is False  # more than the queue depth has room for
        with pytest.raises(Misaligned):
            aio.run_nowait([("write", buf, 0, 4096, 0), ("write", buf, 100, 4096, 0)], done)
        with pytest.raises(ValueError):
            aio.run_nowait([("write", buf, 0, 2 * 65536, 0)], done)
        with pytest.raises(ValueError):
            aio.run_nowait([("read", buf, 0, 4096, 0)], done)
        assert aio.engine.pending == 0 and not aio._futs and calls == []
        assert aio.run_nowait([("write", buf, 0, 4096, 0)], done) is True
        aio.close()  # before the turn's submit: the op never reached the kernel
        assert len(calls) == 1 and isinstance(calls[0][0], EngineClosed)
        with pytest.raises(EngineClosed):
            aio.run_nowait([("fdatasync",)], done)

    asyncio.run(main())


def test_run_nowait_failed_op_is_its_result_and_a_raising_callback_is_reported(dfile, kind):
    from ringblob.engine.faulty import FaultyEngine

    df, _ = dfile

    async def main():
        eng = FaultyEngine(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=8, buffer_size=65536))
        aio = AsyncEngine(eng)
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        bufs = await aio.lease(2)
        eng.fail_next("fdatasync")
        done, calls, fut = _batch_collector(loop)
        assert aio.run_nowait([("write", bufs[0], 0, 4096, 0), ("fdatasync",)], done) is True
        await fut
        assert calls[0][0] == 4096 and isinstance(calls[0][1], OSError) and calls[0][1].errno == errno.EIO

        def bad(results):
            raise RuntimeError("a buggy callback")

        d2, c2, f2 = _batch_collector(loop)
        assert aio.run_nowait([("write", bufs[1], 4096, 4096, 0)], bad)
        assert aio.run_nowait([("write", bufs[1], 8192, 4096, 0)], d2)
        await f2
        for _ in range(500):
            if reported:
                break
            await asyncio.sleep(0.01)
        assert c2 == [[4096]] and [str(r["exception"]) for r in reported] == ["a buggy callback"]
        aio.release(*bufs)
        aio.close()

    asyncio.run(main())


def test_submit_now_submits_at_once_in_place_of_the_turns_submit(dfile, kind):
    """submit_now() hands the ops queued so far to the kernel at once (not at the loop turn's end)
    and drops the turn's scheduled submit; ops queued after it get a turn submit of their own;
    a refused submit_now fails the ops it carried through their done call, before it returns."""
    df, _data = dfile

    async def main():
        eng = _Refusing(open_engine(kind, [df.fd], block_size=df.block_size, buffer_count=8, buffer_size=65536))
        aio = AsyncEngine(eng)
        loop = asyncio.get_running_loop()
        (buf,) = await aio.lease(1)
        buf.view[:4096] = b"n" * 4096
        done, calls, fut = _batch_collector(loop)
        assert aio.run_nowait([("write", buf, 0, 4096, 0)], done) is True
        assert aio.submits == 0 and aio._flush_handle is not None
        aio.submit_now()
        assert aio.submits == 1 and aio._flush_handle is None and not aio._unsubmitted
        await fut
        assert calls == [[4096]]
        await asyncio.sleep(0)
        assert aio.submits == 1  # the turn's submit was dropped: nothing was left for it
        d2, c2, f2 = _batch_collector(loop)
        assert aio.run_nowait([("fdatasync",)], d2) is True
        await f2
        assert c2 == [[0]] and aio.submits == 2  # the turn's own submit
        eng.refuse = True
        d3, c3, _f3 = _batch_collector(loop)
        assert aio.run_nowait([("fdatasync",)], d3) is True
        aio.submit_now()
        assert len(c3) == 1 and isinstance(c3[0][0], OSError) and c3[0][0].errno == errno.ENOMEM
        assert not aio._futs and aio.submits == 2
        eng.refuse = False
        aio.release(buf)
        assert await aio.read(0, 4096) == b"n" * 4096
        aio.close()

    asyncio.run(main())
