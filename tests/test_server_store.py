"""The server over the real BlobStore in one process: I/O errors, read-only, corruption, as clients see them.

The store runs on a real O_DIRECT file under .test-tmp/ with its engine
wrapped by :class:`ringblob.engine.faulty.FaultyEngine` (a dying disk, not a
mock); the metrics the operator would alert on are checked alongside.
"""

from __future__ import annotations

import asyncio
import os

from ringblob import errors
from ringblob import protocol as P
from ringblob import server as S
from ringblob.engine.faulty import FaultyEngine
from ringblob.metrics import Metrics
from ringblob.store import BlobStore

# the workdir fixture (a fresh directory under .test-tmp/) is tests/conftest.py's


class Conn:
    def __init__(self, r, w):
        self.r, self.w, self.dec = r, w, P.FrameDecoder()

    async def call(self, frame: bytes) -> P.Frame:
        self.w.write(frame)
        while (f := self.dec.next_frame()) is None:
            data = await asyncio.wait_for(self.r.read(1 << 20), 10)
            assert data, "connection closed"
            self.dec.feed(data)
        return f


async def serve(workdir, wrap=None, **config):
    metrics = Metrics()
    store = await BlobStore.open(os.path.join(workdir, "d.data"), create_size=16 << 20, observer=metrics,
                                 wrap_engine=wrap)
    srv = S.Server(store, S.ServerConfig(socket_path=os.path.join(workdir, "s.sock"), metrics_addr="",
                                         socket_activation=False, **config), metrics=metrics)
    await srv.start()
    r, w = await asyncio.open_unix_connection(srv.socket_path)
    return srv, store, Conn(r, w)


def value_of(metrics: Metrics, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    raise KeyError(name)


def test_failed_fdatasync_turns_the_store_read_only_and_reads_go_on(workdir):
    faulty = {}

    def wrap(e):
        faulty["e"] = FaultyEngine(e)
        return faulty["e"]

    async def main():
        srv, store, c = await serve(workdir, wrap)
        P.raise_for_status(await c.call(P.encode_put(1, b"before", b"durable", sync=True)))
        assert value_of(srv.metrics, "ringblob_read_only") == 0
        faulty["e"].fail_next("fdatasync")
        f = await c.call(P.encode_put(2, b"doomed", b"x", sync=True))
        assert f.status in (errors.IOFailed.code, errors.ReadOnly.code), f
        # the store is read-only now: writes fail with ReadOnly, reads go on
        f = await c.call(P.encode_put(3, b"later", b"y"))
        assert isinstance(P.reply_error(f), errors.ReadOnly)
        assert (await c.call(P.encode_get(4, b"before"))).body == b"durable"
        st = P.decode_stat_reply((await c.call(P.encode_stat(5))).body)
        assert st["read_only"] is True
        assert value_of(srv.metrics, "ringblob_read_only") == 1
        assert srv.metrics.request_count("put", "read_only") == 1
        c.w.close()
        await srv.shutdown()  # closing a read-only store must not hang or raise
        assert store.closed

    asyncio.run(main())


def test_corrupt_blob_is_reported_never_served(workdir):
    async def main():
        srv, store, c = await serve(workdir)
        P.raise_for_status(await c.call(P.encode_put(1, b"victim", b"v" * 5000, sync=True)))
        P.raise_for_status(await c.call(P.encode_put(2, b"bystander", b"b" * 100, sync=True)))
        page, length, _digest = store._index.get(b"victim")  # where the bytes live (test-only peek)
        page_size = store.stat()["page_size"]
        fd = os.open(store.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 64, page * page_size + 100)
            os.fsync(fd)
        finally:
            os.close(fd)
        f = await c.call(P.encode_get(3, b"victim"))
        assert isinstance(P.reply_error(f), errors.Corrupt)
        assert b"v" * 64 not in f.body
        res = P.decode_mget_reply((await c.call(P.encode_mget(4, [b"victim", b"bystander"]))).body)
        assert isinstance(res[0], errors.Corrupt) and res[1] == b"b" * 100
        assert value_of(srv.metrics, "ringblob_checksum_failures_total") == 2
        assert srv.metrics.request_count("get", "corrupt") == 1
        c.w.close()
        await srv.shutdown()

    asyncio.run(main())


def test_gets_read_without_a_coroutine_keep_to_the_reply_byte_budget(workdir):
    """GETs of values that fit a fixed buffer go through the store's get_nowait, which is told
    how many reply bytes the connection may still reserve (reads in flight count against the
    write high-water mark): a client that sends many GETs and reads nothing makes the daemon
    stop, not read every value into memory."""
    value = os.urandom(200 * 1024)  # under one fixed buffer (256 KiB): the get_nowait path
    n = 200  # 40 MiB of replies if the daemon read them all

    async def main():
        srv, store, c = await serve(workdir, write_high_water=512 * 1024, max_in_flight_per_conn=64)
        P.raise_for_status(await c.call(P.encode_put(1, b"v", value, sync=True)))
        told = []
        real = store.get_nowait

        def spy(key, done, max_size=None):
            told.append(max_size)
            return real(key, done, max_size)

        srv._get_nowait = spy
        c.w.write(b"".join(P.encode_get(10 + i, b"v") for i in range(n)))
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.01)
            (conn,) = srv.connections
            peak = max(peak, conn.reply_reserved + conn.transport.get_write_buffer_size())
        assert srv.metrics.request_count("get", "ok") < n  # it stopped reading the client
        assert peak < (1 << 20) + 3 * (len(value) + 64), peak
        assert told[0] is None  # nothing reserved yet: no limit
        assert any(m is not None and m < 512 * 1024 for m in told)  # reads in flight shrink the room
        got = []
        while len(got) < n:
            while (f := c.dec.next_frame()) is None:
                c.dec.feed(await asyncio.wait_for(c.r.read(1 << 20), 10))
            got.append(f)
        assert sorted(f.request_id for f in got) == list(range(10, 10 + n))
        assert all(f.status == 0 and bytes(f.body) == value for f in got)
        (conn,) = srv.connections
        assert conn.reply_reserved == 0 and conn.in_flight == 0 and not store._pins
        assert srv.metrics.request_count("get", "ok") == n
        c.w.close()
        await srv.shutdown()

    asyncio.run(main())
