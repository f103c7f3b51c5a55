"""The server over the real BlobStore in one process: I/O errors, read-only, corruption, as clients see them.

The store runs on a real O_DIRECT file under .test-tmp/ with its engine
wrapped by :class:`ringblob.engine.faulty.FaultyEngine` (a dying disk, not a
mock); the metrics the operator would alert on are checked alongside.
"""

from __future__ import annotations

import asyncio
import os

import blake3
import pytest

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


async def serve(workdir, wrap=None, store_opts=None, **config):
    metrics = Metrics()
    store = await BlobStore.open(os.path.join(workdir, "d.data"), create_size=16 << 20, observer=metrics,
                                 wrap_engine=wrap, **(store_opts or {}))
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


@pytest.mark.parametrize("sync_method, failing", [("fdatasync", "fdatasync"), ("dsync", "write")])
def test_failed_fdatasync_turns_the_store_read_only_and_reads_go_on(workdir, sync_method, failing):
    """A sync PUT whose commit fails — its fdatasync, or with sync_method=dsync its RWF_DSYNC
    write (where a failed flush shows) — gets IOFailed; the store turns read-only, reads go on."""
    faulty = {}

    def wrap(e):
        faulty["e"] = FaultyEngine(e)
        return faulty["e"]

    async def main():
        srv, store, c = await serve(workdir, wrap, store_opts={"sync_method": sync_method})
        P.raise_for_status(await c.call(P.encode_put(1, b"before", b"durable", sync=True)))
        assert value_of(srv.metrics, "ringblob_read_only") == 0
        faulty["e"].fail_next(failing)
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


# -- large PUT values received straight into the store's fixed buffers ----------------------

BSZ = 256 * 1024  # the store's default fixed-buffer size
MiB = 1 << 20


async def serve_opts(workdir, size=32 << 20, **opts):
    metrics = Metrics()
    store = await BlobStore.open(os.path.join(workdir, "d.data"), create_size=size, observer=metrics,
                                 zero_fill=False, **opts)
    srv = S.Server(store, S.ServerConfig(socket_path=os.path.join(workdir, "s.sock"), metrics_addr="",
                                         socket_activation=False), metrics=metrics)
    await srv.start()
    r, w = await asyncio.open_unix_connection(srv.socket_path)
    c = Conn(r, w)
    P.raise_for_status(await c.call(P.encode_put(1, b"first", b"1")))  # the committer holds its buffer now
    return srv, store, c


async def settle(store, free0, free_bytes=None) -> None:
    """Wait (briefly) until every fixed buffer but the committer's is back in the pool (and, given
    ``free_bytes``, the store's free space is at least that again: no extent of a value given up
    is kept)."""
    for _ in range(100):
        st = store.stat()
        if (store._aio.engine.free_buffers == free0 and st["receive_buffers_held"] == 0
                and (free_bytes is None or st["free_bytes"] >= free_bytes)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"buffers or space leaked: {store._aio.engine.free_buffers} free of {free0}, "
                         f"{store.stat()['receive_buffers_held']} held by values being received, "
                         f"{store.stat()['free_bytes']} bytes free (want {free_bytes})")


def test_large_puts_are_received_into_fixed_buffers_and_round_trip(workdir):
    """Values around buffer boundaries (buffer_size ± 1 block, ± 1 byte, exactly n buffers), key
    lengths 1 and 255, sync and not, verify with the right and a wrong key: received into leased
    buffers (values_leased counts them), stored, read back intact; no buffer left behind."""

    async def main():
        srv, store, c = await serve_opts(workdir)
        free0 = store._aio.engine.free_buffers
        sizes = [BSZ + 1, BSZ + 4095, BSZ + 4096, BSZ + 4097, 2 * BSZ - 4096, 2 * BSZ - 1, 2 * BSZ,
                 2 * BSZ + 1, 3 * BSZ, 4 * BSZ, 4 * BSZ + 4096]
        rid = 10
        for i, n in enumerate(sizes):
            v = os.urandom(n)
            key = (b"K" * 255) if i % 2 else bytes([65 + i])
            P.raise_for_status(await c.call(P.encode_put(rid, key, v, sync=bool(i % 3))))
            f = P.raise_for_status(await c.call(P.encode_get(rid + 1, key)))
            assert f.body == v, n
            rid += 2
        assert store.stat()["values_leased"] == len(sizes)
        v = os.urandom(MiB)
        digest = blake3.blake3(v).digest()
        P.raise_for_status(await c.call(P.encode_put(rid, digest, v, verify=True, sync=True)))
        space = store.stat()["free_bytes"]
        f = await c.call(P.encode_put(rid + 1, b"\x01" * 32, v, verify=True))
        assert isinstance(P.reply_error(f), errors.DigestMismatch)
        assert (await c.call(P.encode_get(rid + 2, digest))).body == v
        assert isinstance(P.reply_error(await c.call(P.encode_get(rid + 3, b"\x01" * 32))), errors.NotFound)
        st = store.stat()
        assert st["values_leased"] == st["values_streamed"] == len(sizes) + 2 and st["lease_value_refused"] == 0
        await settle(store, free0, space)  # the wrong digest's extent: freed, as nothing was stored
        c.w.close()
        await srv.shutdown()
        # durable across a restart (the close checkpoints; the journal records are the same)
        store = await BlobStore.open(os.path.join(workdir, "d.data"))
        assert await store.get(digest) == v
        await store.close()

    asyncio.run(main())


def test_client_leaving_mid_body_gives_every_buffer_back(workdir):
    """A client that disconnects while its PUT's key or value is arriving (in the key, in the
    first buffer, on a buffer boundary, in the last buffer) leaves no buffer leased, and the
    extent its value was being written into (buffer by buffer, a stream) is free again."""

    async def main():
        srv, store, c = await serve_opts(workdir)
        free0 = store._aio.engine.free_buffers
        space0 = store.stat()["free_bytes"]
        frame = P.encode_put(1, b"gone", os.urandom(3 * BSZ + 5))
        head = P.HEADER_SIZE + 1 + 4
        for cut in (P.HEADER_SIZE + 1, head + 1, head + BSZ, head + 2 * BSZ + 100, len(frame) - 1):
            r, w = await asyncio.open_unix_connection(srv.socket_path)
            w.write(frame[:cut])
            await w.drain()
            for _ in range(100):  # until the daemon has read it all
                if srv.metrics.bytes_received >= cut and (cut <= head or store.stat()["receive_buffers_held"]):
                    break
                await asyncio.sleep(0.01)
            if cut > head:
                assert store.stat()["free_bytes"] < space0  # the value's extent, taken when it was leased
            w.close()
            await settle(store, free0, space0)
            srv.metrics.bytes_received = 0
        assert not store.has(b"gone") and store.stat()["values_streamed"] == 4
        P.raise_for_status(await c.call(P.encode_put(9, b"after", b"a" * (2 * BSZ), sync=True)))
        assert (await c.call(P.encode_get(10, b"after"))).body == b"a" * (2 * BSZ)
        await settle(store, free0)
        c.w.close()
        await srv.shutdown()

    asyncio.run(main())


def test_large_puts_over_the_receive_cap_take_the_copying_path_and_succeed(workdir):
    """With receive_buffers=8 (two 1 MiB values), six clients half-way through their bodies: two
    values sit in leased buffers, the other four were declined (never waited for) and are
    gathered the ordinary way; every PUT succeeds and every buffer comes back."""

    async def main():
        srv, store, c = await serve_opts(workdir, receive_buffers=8)
        free0 = store._aio.engine.free_buffers
        values = [os.urandom(MiB) for _ in range(6)]
        frames = [P.encode_put(i + 1, b"c%d" % i, v, sync=bool(i % 2)) for i, v in enumerate(values)]
        conns = []
        for f in frames:
            r, w = await asyncio.open_unix_connection(srv.socket_path)
            w.write(f[: len(f) // 2])
            await w.drain()
            conns.append(Conn(r, w))
        for _ in range(200):
            st = store.stat()
            if st["values_leased"] + st["lease_value_refused"] == 6:
                break
            await asyncio.sleep(0.01)
        st = store.stat()
        assert st["values_leased"] == 2 and st["lease_value_refused"] == 4 and st["receive_buffers_held"] == 8
        for cn, f in zip(conns, frames):
            cn.w.write(f[len(f) // 2 :])
        for cn in conns:
            while (reply := cn.dec.next_frame()) is None:
                data = await asyncio.wait_for(cn.r.read(1 << 20), 10)
                assert data
                cn.dec.feed(data)
            P.raise_for_status(reply)
        for i, v in enumerate(values):
            assert (await c.call(P.encode_get(100 + i, b"c%d" % i))).body == v
        await settle(store, free0)
        for cn in conns:
            cn.w.close()
        c.w.close()
        await srv.shutdown()

    asyncio.run(main())


def test_a_full_store_answers_nospace_for_a_received_value_and_leaks_nothing(workdir):
    async def main():
        srv, store, c = await serve_opts(workdir, size=8 << 20)
        free0 = store._aio.engine.free_buffers
        st0 = store.stat()
        f = await c.call(P.encode_put(2, b"huge", os.urandom(st0["free_bytes"] + 4 * 4096)))
        assert isinstance(P.reply_error(f), errors.NoSpace), f
        st = store.stat()
        assert st["values_leased"] == 1 and st["free_bytes"] == st0["free_bytes"]
        assert st["bytes_written"] == st0["bytes_written"] and not st["read_only"]
        await settle(store, free0)
        P.raise_for_status(await c.call(P.encode_put(3, b"fits", b"f" * (2 * BSZ), sync=True)))
        assert (await c.call(P.encode_get(4, b"fits"))).body == b"f" * (2 * BSZ)
        await settle(store, free0)
        c.w.close()
        await srv.shutdown()

    asyncio.run(main())


def test_received_bytes_over_max_receive_bytes_are_read_one_connection_at_a_time(workdir):
    """Three clients each send part of a 1.5 MiB PUT with max_receive_bytes at 1 MiB: the one
    whose bytes crossed the cap goes on alone, the others stop being read (STAT counts the
    pauses, the bytes held stay bounded); when its frame is complete the turn passes to the
    first one waiting, and everyone reads again once the bytes held are under the cap. Every
    PUT succeeds (the one that went on alone first), nothing is held after."""
    MiB = 1 << 20
    size = 3 * MiB // 2
    cut = 700 * 1024

    async def main():
        srv, store, c = await serve(workdir, max_receive_bytes=MiB)
        try:
            conns, frames = {}, {}
            for name in "ABC":
                conns[name] = await asyncio.open_unix_connection(srv.socket_path)
                frames[name] = P.encode_put(1, name.encode(), name.encode() * size)
            done: list[str] = []

            async def reply(name):
                r = conns[name][0]
                dec = P.FrameDecoder()
                while (f := dec.next_frame()) is None:
                    data = await asyncio.wait_for(r.read(1 << 16), 10)
                    assert data, f"{name}: connection closed"
                    dec.feed(data)
                P.raise_for_status(f)
                done.append(name)

            waiting = [asyncio.create_task(reply(n)) for n in "ABC"]

            async def send(name, part):
                conns[name][1].write(part)
                await asyncio.sleep(0.1)  # the server reads what it will

            async def stat():
                return P.decode_stat_reply((await c.call(P.encode_stat(9))).body)["server"]

            await send("A", frames["A"][:cut])
            assert (await stat())["receive_pauses"] == 0  # under the cap: nobody waits
            await send("B", frames["B"][:cut])  # B crosses the cap: B goes on alone
            await send("C", frames["C"][:cut])  # C takes in more: it waits
            await send("A", frames["A"][cut:])  # so does A, behind C
            await send("C", frames["C"][cut:])
            st = await stat()
            assert st["receive_pauses"] == 2, st
            assert MiB < st["received_bytes_held"] <= MiB + len(frames["B"]) + 2 * 256 * 1024, st
            assert done == []
            await send("B", frames["B"][cut:])  # B's frame completes: C's turn, then A's
            await asyncio.wait_for(asyncio.gather(*waiting), 10)
            assert done[0] == "B" and sorted(done) == ["A", "B", "C"], done
            for name in "ABC":
                assert await store.get(name.encode()) == name.encode() * size
            st = await stat()
            # (A may wait twice: woken when the bytes held dipped under the cap, it read again
            # while C was on its turn)
            assert st["received_bytes_held"] == 0 and st["receive_pauses"] >= 2, st
            for _r, w in conns.values():
                w.close()
        finally:
            await srv.shutdown()

    asyncio.run(main())


def test_a_large_value_after_an_idle_socket_is_received_in_place(workdir, monkeypatch):
    """After a large PUT completes in place the next read takes only a frame head, so the next
    value lands in fixed buffers too. uvloop reads until the socket is empty (EAGAIN, with no
    buffer_updated): that empty read must not turn the next one into a full 256 KiB scratch
    read whose value bytes are then copied (LeasedValue.write) into the fixed buffers."""
    uvloop = __import__("pytest").importorskip("uvloop")
    from ringblob.store import blobstore, leased

    copied: list[int] = []
    made: list[int] = []

    class CountingValue(leased.LeasedValue):  # (the C class itself cannot be patched)
        def __init__(self, bufs, length, *args):
            super().__init__(bufs, length, *args)
            made.append(length)

        def write(self, data):
            n = super().write(data)
            copied.append(n)
            return n

    monkeypatch.setattr(blobstore, "LeasedValue", CountingValue)

    async def main():
        srv, store, c = await serve_opts(workdir)
        free0 = store._aio.engine.free_buffers
        values = [os.urandom(MiB + 4096 * i + 7) for i in range(4)]
        for i, v in enumerate(values):
            # each PUT is sent alone and answered before the next: the daemon drains the socket
            # (its last read finds it empty) between two values
            P.raise_for_status(await c.call(P.encode_put(1 + i, b"idle-%d" % i, v)))
            if i == 0:
                copied.clear()  # a connection's first read is a full scratch read: not the point here
        st = store.stat()
        assert st["values_leased"] == 4 and len(made) == 4
        # what shared a head read is at most a 4 KiB head's tail, never a scratch buffer's worth
        assert len(copied) <= 3 and sum(copied) < 3 * 4096, copied
        for i, v in enumerate(values):
            assert (await c.call(P.encode_get(10 + i, b"idle-%d" % i))).body == v
        await settle(store, free0)
        c.w.close()
        await srv.shutdown()

    uvloop.run(main())


def test_large_puts_take_put_leased_nowait_and_errors_answer_the_client(workdir):
    """A large PUT received in place is written and queued by the store's put_leased_nowait (no
    coroutine: put_leased is never called), round-trips and survives a restart; a client that
    closes right after sending its PUT still gets it stored; a failed data write answers that
    client IOFailed and every buffer goes back to the pool."""
    holder = {}

    def wrap(e):
        holder["e"] = FaultyEngine(e)
        return holder["e"]

    async def main():
        srv, store, c = await serve_opts(workdir, wrap_engine=wrap)
        free0 = store._aio.engine.free_buffers
        calls = []
        nowait = srv._put_leased_nowait

        def counted(*a, **kw):
            calls.append(a[0])
            return nowait(*a, **kw)

        async def no_coroutine(*a, **kw):
            raise AssertionError("put_leased must not be used")

        srv._put_leased_nowait = counted
        store.put_leased = no_coroutine
        v = os.urandom(MiB + 4097)
        P.raise_for_status(await c.call(P.encode_put(2, b"big", v, sync=True)))
        assert (await c.call(P.encode_get(3, b"big"))).body == v and calls == [b"big"]
        # a client gone right after its PUT: the value is stored all the same
        r, w = await asyncio.open_unix_connection(srv.socket_path)
        w.write(P.encode_put(1, b"gone", v))
        await w.drain()
        w.close()
        for _ in range(200):
            if store.has(b"gone"):
                break
            await asyncio.sleep(0.01)
        assert store.has(b"gone") and calls == [b"big", b"gone"]
        await settle(store, free0)
        holder["e"].fail_next("write", 2)
        f = await c.call(P.encode_put(4, b"bad", v))
        assert isinstance(P.reply_error(f), errors.IOFailed) and store.read_only
        stand_in = 1 if holder["e"]._scratch is not None else 0  # the wrapper's buffer for the failed op
        await settle(store, free0 - stand_in)
        assert (await c.call(P.encode_get(5, b"gone"))).body == v
        c.w.close()
        await srv.shutdown()
        store = await BlobStore.open(os.path.join(workdir, "d.data"))
        assert await store.get(b"big") == v and await store.get(b"gone") == v and not store.has(b"bad")
        await store.close()

    asyncio.run(main())
