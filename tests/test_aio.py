"""AsyncEngine: one submit per loop turn, buffer and queue-depth backpressure, helpers."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid

import pytest

from ringblob.direct import open_direct
from ringblob.engine import open_engine
from ringblob.engine.aio import AsyncEngine
from ringblob.errors import Misaligned

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_ROOT = os.path.join(REPO, ".test-tmp")


def _engines():
    out = ["psync"]
    try:
        from ringblob._uring import Ring  # noqa: F401

        out.append("uring")
    except ImportError:
        pass
    return out


@pytest.fixture(params=_engines())
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
