"""ringblob.Client and ringblob.AsyncClient end to end against a real daemon subprocess.

The daemon is ``ringblob serve`` on a data file under .test-tmp/ (ext4, so
O_DIRECT behaves as in production) with metrics disabled. A few tests use a
scripted peer speaking the protocol codec to provoke what a well-behaved
daemon never does (replies out of order, a connection dropped mid-request).

``Daemon``, ``make_tmp`` and the ``daemon`` fixture come from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import blake3
import pytest

import ringblob
from ringblob import protocol
from ringblob.errors import (
    ConnectionLost,
    DigestMismatch,
    InvalidKey,
    NotFound,
    RingblobError,
    TooLarge,
)

from conftest import ROOT, Daemon, make_tmp  # noqa: E402  (shared with the other daemon tests)


def unique(name: str) -> bytes:
    return f"{name}-{time.monotonic_ns()}".encode()


# -- blocking client ---------------------------------------------------------------


def test_sync_put_get_has_delete(daemon):
    with ringblob.Client(daemon.socket) as c:
        key = unique("a")
        assert not c.has(key)
        c.put(key, b"hello")
        assert c.has(key)
        assert c.get(key) == b"hello"
        c.put(key, b"world" * 1000, sync=True)  # overwrite, durable
        assert c.get(key) == b"world" * 1000
        c.put(key.decode() + "-empty", b"")  # str keys are UTF-8; empty values are fine
        assert c.get(key + b"-empty") == b""
        c.delete(key)
        assert not c.has(key)
        c.delete(key)  # deleting a missing key is not an error
        with pytest.raises(NotFound) as info:
            c.get(key)
        assert isinstance(info.value, KeyError)
        c.delete(key + b"-empty", sync=True)


def test_sync_unicode_and_binary_keys(daemon):
    with ringblob.Client(daemon.socket) as c:
        c.put("clé-ünïcode", b"1")
        assert c.get("clé-ünïcode".encode("utf-8")) == b"1"
        binkey = bytes(range(256))[1:200]
        c.put(binkey, b"2")
        assert c.get(binkey) == b"2"


def test_sync_large_value_with_progress(daemon):
    value = os.urandom(3 * 1024 * 1024 + 123)
    seen_put: list[tuple[int, int]] = []
    seen_get: list[tuple[int, int]] = []
    with ringblob.Client(daemon.socket) as c:
        key = unique("big")
        c.put(key, value, progress=lambda d, t: seen_put.append((d, t)))
        assert c.get(key, progress=lambda d, t: seen_get.append((d, t))) == value
    assert seen_put and seen_put[-1][0] == seen_put[-1][1] >= len(value)
    assert seen_get and seen_get[-1][0] == seen_get[-1][1] >= len(value)
    assert [d for d, _ in seen_get] == sorted(d for d, _ in seen_get)


def test_sync_put_cas(daemon):
    data = os.urandom(10000)
    with ringblob.Client(daemon.socket) as c:
        digest = c.put_cas(data, sync=True)
        assert digest == blake3.blake3(data).digest()
        assert c.get(digest) == data
        assert c.has(digest)
        # a digest that is not the value's: nothing stored
        bad = blake3.blake3(b"something else").digest()
        with pytest.raises(DigestMismatch):
            c.put(bad, data, verify=True)
        assert not c.has(bad)


def test_sync_list_pages(daemon):
    prefix = unique("list") + b"/"
    keys = sorted(prefix + b"%05d" % i for i in range(2500))  # more than one 1000-key page
    with ringblob.Client(daemon.socket) as c:
        c.put_many([(k, k[-5:]) for k in keys])
        c.put(prefix[:-1] + b"0", b"outside the prefix")
        assert list(c.list(prefix)) == keys
        assert list(c.list(prefix, page_size=7))[:20] == keys[:20]
        assert list(c.list(prefix.decode() + "0001")) == [k for k in keys if k.startswith(prefix + b"0001")]
        everything = list(c.list())
        assert everything == sorted(everything)
        assert set(keys) <= set(everything)
        assert list(c.list(b"no-such-prefix-" + prefix)) == []


def test_sync_put_many_get_many(daemon):
    prefix = unique("many")
    items = {prefix + b"%d" % i: os.urandom(i * 37) for i in range(300)}
    with ringblob.Client(daemon.socket) as c:
        c.put_many(items, sync=True)
        missing = prefix + b"-missing"
        keys = list(items) + [missing]
        values = c.get_many(keys)
        assert values[:-1] == list(items.values())
        assert values[-1] is None
        assert c.get_many([]) == []


def test_sync_put_many_splits_frames(daemon):
    # a small client-side frame limit forces several MPUT/MGET frames
    prefix = unique("split")
    items = [(prefix + b"%d" % i, bytes([i]) * 3000) for i in range(40)]
    with ringblob.Client(daemon.socket, max_frame_size=16384) as c:
        c.put_many(items)
        assert c.get_many([k for k, _ in items]) == [v for _, v in items]


def test_sync_flush_needs_flush_stat_ping(daemon):
    with ringblob.Client(daemon.socket) as c:
        c.put(unique("nf"), b"x")  # not sync: durable at the next flush
        assert c.needs_flush() is True
        c.flush()
        assert c.needs_flush() is False
        c.flush()  # nothing to do: fine
        assert c.ping() == b""
        assert c.ping(b"echo") == b"echo"
        st = c.stat()
        for field in ("blob_count", "used_bytes", "free_bytes", "read_only", "needs_flush"):
            assert field in st, st
        assert st["blob_count"] >= 1
        assert st["read_only"] is False


def test_sync_errors_map_to_store_classes(daemon):
    with ringblob.Client(daemon.socket) as c:
        with pytest.raises(InvalidKey):
            c.put(b"k" * 256, b"x")  # refused before sending
        with pytest.raises(InvalidKey):
            c.get(b"")
        with pytest.raises(InvalidKey):
            c.get(12)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            c.get(unique("absent"))
        # connection still usable after errors
        c.put(b"after-errors", b"ok")
        assert c.get(b"after-errors") == b"ok"


def test_too_large_value(daemon):
    # a dedicated daemon with small limits: TooLarge from the store, FrameTooLarge from the server
    workdir = make_tmp("tl-")
    d = Daemon(workdir, "--max-blob-size", "64K", "--max-frame-size", "256K").start()
    try:
        with ringblob.Client(d.socket) as c:
            with pytest.raises(TooLarge):
                c.put(b"big", b"x" * (64 * 1024 + 1))
            c.put(b"fits", b"x" * 64 * 1024)
            assert c.get(b"fits") == b"x" * 64 * 1024
        with ringblob.Client(d.socket) as c:
            # over the frame limit: the daemon answers FrameTooLarge (a ProtocolError) and closes
            # this connection only (the client may see the close first: ConnectionLost)
            with pytest.raises((protocol.FrameTooLarge, ConnectionLost)):
                c.put(b"huge", b"x" * (1024 * 1024))
            with pytest.raises(ConnectionLost):
                c.ping()
        with ringblob.Client(d.socket) as c:  # the daemon is unaffected
            assert c.get(b"fits") == b"x" * 64 * 1024
    finally:
        assert d.stop() == 0, d.output()
        shutil.rmtree(workdir, ignore_errors=True)


def test_connect_errors():
    workdir = make_tmp("ce-")
    try:
        with pytest.raises(FileNotFoundError):
            ringblob.Client(workdir / "nothing.sock")
        # a socket file nobody listens on
        path = workdir / "dead.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
        with pytest.raises(ConnectionRefusedError):
            ringblob.Client(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_default_socket_path(monkeypatch):
    monkeypatch.setenv("RINGBLOB_SOCKET", "/run/ringblob/x.sock")
    assert ringblob.client.default_socket_path() == "/run/ringblob/x.sock"
    monkeypatch.delenv("RINGBLOB_SOCKET")
    assert ringblob.client.default_socket_path() == "./var/ringblob.sock"


@pytest.mark.parametrize("cls", ["Client", "AsyncClient"])
def test_both_clients_check_and_default_their_arguments_alike(cls, monkeypatch):
    make = getattr(ringblob, cls)
    bad = [
        (dict(timeout=0), ValueError, "timeout"),
        (dict(timeout=-1.5), ValueError, "timeout"),
        (dict(timeout=float("nan")), ValueError, "timeout"),
        (dict(timeout="5"), TypeError, None),
        (dict(max_frame_size=19), ValueError, "max_frame_size must be at least 20"),
        (dict(max_reply_size=0), ValueError, "max_reply_size must be at least 20"),
        (dict(max_frame_size=1.5e6), TypeError, "max_frame_size must be an int"),
        (dict(max_reply_size=True), TypeError, "max_reply_size must be an int"),
    ]
    for kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):  # refused before anything connects
            make("/nonexistent/ringblob.sock", **kwargs)
    # defaults: $RINGBLOB_SOCKET, then ./var/ringblob.sock; the protocol's frame limit
    workdir = make_tmp("df-")
    listeners = []
    try:
        for path in (workdir / "env.sock", workdir / "var" / "ringblob.sock"):  # something to connect to
            path.parent.mkdir(exist_ok=True)
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ls.bind(str(path))
            ls.listen()
            listeners.append(ls)
        monkeypatch.chdir(workdir)
        defaults = (None, protocol.DEFAULT_MAX_FRAME_SIZE, ringblob.client.DEFAULT_MAX_REPLY_SIZE)

        def attrs(c):
            out = (c.socket_path, c.timeout, c.max_frame_size, c.max_reply_size)
            if cls == "Client":
                c.close()
            return out

        monkeypatch.setenv("RINGBLOB_SOCKET", str(workdir / "env.sock"))
        assert attrs(make()) == (str(workdir / "env.sock"), *defaults)
        monkeypatch.delenv("RINGBLOB_SOCKET")
        assert attrs(make()) == ("./var/ringblob.sock", *defaults)
        assert attrs(make(workdir / "env.sock", timeout=2, max_frame_size=20, max_reply_size=4096)) == (
            str(workdir / "env.sock"), 2, 20, 4096)
    finally:
        for ls in listeners:
            ls.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_client_attributes_after_connecting(daemon):
    with ringblob.Client(str(daemon.socket), timeout=7.5, max_frame_size=1 << 16, max_reply_size=1 << 20) as c:
        assert (c.socket_path, c.timeout, c.max_frame_size, c.max_reply_size) == (
            str(daemon.socket), 7.5, 1 << 16, 1 << 20)
        c.put_many({b"attr-a": b"1" * 40000, b"attr-b": b"2" * 40000})  # two frames under 64 KiB
        assert c.get_many([b"attr-a", b"attr-b"]) == [b"1" * 40000, b"2" * 40000]


# -- asyncio client -----------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


def test_async_every_method(daemon):
    async def main():
        async with ringblob.AsyncClient(daemon.socket) as c:
            key = unique("async")
            assert not await c.has(key)
            await c.put(key, b"v1")
            assert await c.has(key)
            assert await c.get(key) == b"v1"
            await c.put(key, b"v2", sync=True)
            assert await c.get(key.decode()) == b"v2"
            data = os.urandom(5000)
            digest = await c.put_cas(data)
            assert digest == blake3.blake3(data).digest()
            assert await c.get(digest) == data
            with pytest.raises(DigestMismatch):
                await c.put(blake3.blake3(b"other").digest(), data, verify=True)
            await c.delete(key, sync=True)
            await c.delete(key)
            with pytest.raises(NotFound):
                await c.get(key)
            prefix = unique("alist") + b"/"
            keys = [prefix + b"%04d" % i for i in range(1500)]
            await c.put_many({k: k for k in keys})
            assert [k async for k in c.list(prefix)] == keys
            assert await c.get_many(keys[:3] + [prefix + b"x"]) == keys[:3] + [None]
            assert await c.needs_flush() is True
            await c.flush()
            assert await c.needs_flush() is False
            st = await c.stat()
            assert st["blob_count"] >= len(keys)
            assert await c.ping(b"p") == b"p"
            with pytest.raises(InvalidKey):
                await c.get(b"")
            assert c.in_flight == 0

    run(main())


def test_async_pipelining_200_requests(daemon):
    async def main():
        async with ringblob.AsyncClient(daemon.socket) as c:
            prefix = unique("pipe")
            values = {prefix + b"%d" % i: os.urandom(100 + i) for i in range(200)}
            await asyncio.gather(*(c.put(k, v, sync=(i % 4 == 0)) for i, (k, v) in enumerate(values.items())))
            got = await asyncio.gather(*(c.get(k) for k in values))
            assert got == list(values.values())
            # mixed operations in flight together, some failing: each gets its own answer
            calls = []
            for i, k in enumerate(values):
                calls.append(c.has(k) if i % 3 else c.get(k + b"-missing"))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, res in enumerate(results):
                if i % 3:
                    assert res is True
                else:
                    assert isinstance(res, NotFound)
            assert c.in_flight == 0

    run(main())


def test_async_concurrent_clients(daemon):
    async def worker(n: int):
        async with ringblob.AsyncClient(daemon.socket) as c:
            keys = [unique(f"cc{n}-{i}") for i in range(50)]
            await asyncio.gather(*(c.put(k, k * 3) for k in keys))
            assert await asyncio.gather(*(c.get(k) for k in keys)) == [k * 3 for k in keys]

    async def main():
        await asyncio.gather(*(worker(n) for n in range(8)))

    run(main())


def test_async_cancelled_call_leaves_connection_usable(daemon):
    async def main():
        async with ringblob.AsyncClient(daemon.socket) as c:
            task = asyncio.ensure_future(c.get(b"whatever"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await c.ping(b"still") == b"still"
            await asyncio.sleep(0.05)
            assert c.in_flight == 0

    run(main())


def test_async_not_connected_and_closed(daemon):
    async def main():
        c = ringblob.AsyncClient(daemon.socket)
        with pytest.raises(ConnectionLost):
            await c.ping()
        await c.connect()
        assert await c.ping() == b""
        await c.close()
        with pytest.raises(ConnectionLost):
            await c.ping()
        await c.close()  # idempotent

    run(main())


# -- scripted peer: what a well-behaved daemon never does ---------------------------


class ScriptedPeer:
    """A Unix-socket server thread that runs ``script(conn, decoder)`` for one connection."""

    def __init__(self, script):
        self.dir = make_tmp("sp-")
        self.path = self.dir / "peer.sock"
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(self.path))
        self.srv.listen(1)
        self.script = script
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.srv.accept()
            with conn:
                self.script(conn, protocol.FrameDecoder())
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    @staticmethod
    def read_frames(conn, decoder, n):
        frames = []
        while len(frames) < n:
            while (f := decoder.next_frame()) is not None:
                frames.append(f)
            if len(frames) >= n:
                break
            data = conn.recv(65536)
            if not data:
                break
            decoder.feed(data)
        return frames

    def close(self):
        self.thread.join(10)
        self.srv.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.error:
            raise self.error


def test_async_replies_out_of_order_are_matched_by_id():
    def script(conn, dec):
        frames = ScriptedPeer.read_frames(conn, dec, 10)
        replies = [protocol.encode_reply(f.opcode, f.request_id, protocol.parse_request(f).key) for f in reversed(frames)]
        conn.sendall(b"".join(replies))
        ScriptedPeer.read_frames(conn, dec, 1)  # wait for the client to close

    peer = ScriptedPeer(script)

    async def main():
        async with ringblob.AsyncClient(peer.path) as c:
            keys = [b"k%d" % i for i in range(10)]
            return await asyncio.gather(*(c.get(k) for k in keys))

    try:
        assert run(main()) == [b"k%d" % i for i in range(10)]
    finally:
        peer.close()


def test_async_calls_of_one_loop_turn_go_out_together_and_in_order():
    """Requests made in one loop turn reach the socket in one write (a burst of pipelined calls
    costs one send, not one each), in the order they were made; a frame of 64 KiB or more goes
    at once, after the ones before it."""
    seen = []

    def script(conn, dec):
        frames = ScriptedPeer.read_frames(conn, dec, 51)
        seen.extend((f.opcode, f.request_id) for f in frames)
        conn.sendall(b"".join(protocol.encode_reply(f.opcode, f.request_id,
                                                    f.body if f.opcode == protocol.Op.PING else b"")
                              for f in frames))
        ScriptedPeer.read_frames(conn, dec, 1)  # wait for the client to close

    peer = ScriptedPeer(script)
    writes = []

    async def main():
        async with ringblob.AsyncClient(peer.path) as c:
            w = c._writer
            plain_write, plain_writelines = w.write, w.writelines
            w.write = lambda data: (writes.append(1), plain_write(data))[1]
            w.writelines = lambda datas: (writes.append(len(datas)), plain_writelines(datas))[1]
            calls = [c.ping(b"%d" % i) for i in range(25)] + [c.put(b"big", bytes(100_000))]
            calls += [c.ping(b"%d" % i) for i in range(25, 50)]
            return await asyncio.gather(*calls)

    try:
        results = run(main())
        assert results[:25] + results[26:] == [b"%d" % i for i in range(50)] and results[25] is None
        assert writes == [25, 1, 25]  # the pings before the big PUT, the PUT alone, the rest
        ids = [rid for _, rid in seen]
        assert ids == sorted(ids) and [op for op, _ in seen].count(protocol.Op.PUT) == 1
        assert seen[25][0] == protocol.Op.PUT
    finally:
        peer.close()


def test_async_close_with_requests_queued_fails_them_cleanly(daemon):
    async def main():
        c = await ringblob.AsyncClient(daemon.socket).connect()
        calls = [asyncio.ensure_future(c.ping(b"%d" % i)) for i in range(10)]
        await asyncio.sleep(0)  # queued for the end of the turn, not written yet
        await c.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ConnectionLost) for r in results), results
        async with ringblob.AsyncClient(daemon.socket) as c2:  # the daemon is unaffected
            assert await c2.ping(b"after") == b"after"

    run(main())


def test_connection_lost_mid_request():
    def script(conn, dec):
        frames = ScriptedPeer.read_frames(conn, dec, 3)
        # answer the first, then drop the connection with two requests in flight
        conn.sendall(protocol.encode_reply(frames[0].opcode, frames[0].request_id, b"first"))

    peer = ScriptedPeer(script)

    async def main():
        async with ringblob.AsyncClient(peer.path) as c:
            results = await asyncio.gather(c.get(b"a"), c.get(b"b"), c.get(b"c"), return_exceptions=True)
            with pytest.raises(ConnectionLost):
                await c.ping()
            return results

    try:
        results = run(main())
        assert results[0] == b"first"
        assert all(isinstance(r, ConnectionLost) for r in results[1:]), results
    finally:
        peer.close()

    def script_sync(conn, dec):
        ScriptedPeer.read_frames(conn, dec, 1)  # read the request, never answer, hang up

    peer = ScriptedPeer(script_sync)
    try:
        with ringblob.Client(peer.path) as c:
            with pytest.raises(ConnectionLost, match="closed the connection"):
                c.get(b"x")
            with pytest.raises(ConnectionLost):
                c.ping()
    finally:
        peer.close()


def test_error_status_carries_class_and_message():
    def script(conn, dec):
        frames = ScriptedPeer.read_frames(conn, dec, 2)
        conn.sendall(protocol.encode_error_reply(frames[0].opcode, frames[0].request_id, ringblob.errors.ReadOnly("store is read-only after EIO")))
        conn.sendall(protocol.encode_frame(frames[1].opcode, frames[1].request_id, b"from the future", 999))
        ScriptedPeer.read_frames(conn, dec, 1)

    peer = ScriptedPeer(script)

    async def main():
        async with ringblob.AsyncClient(peer.path) as c:
            return await asyncio.gather(c.put(b"a", b"1"), c.flush(), return_exceptions=True)

    try:
        ro, unknown = run(main())
        assert type(ro) is ringblob.errors.ReadOnly and "EIO" in str(ro)
        assert type(unknown) is RingblobError and "from the future" in str(unknown)
    finally:
        peer.close()


# -- a daemon whose disk fails: the errno reaches the client ------------------------


def serve_faulty_store(data: str, sock: str) -> int:
    """Run the real server (``run_server``) over the real store, its engine wrapped by
    :class:`~ringblob.engine.faulty.FaultyEngine` (a dying disk, not a mock). For
    :func:`test_io_errors_reach_both_clients_with_their_errno`, in a subprocess.

    SIGUSR2 fails the next read with EBADMSG, SIGUSR1 the next fdatasync with EIO (the store
    runs with ``sync_method="fdatasync"``, so a sync PUT's round ends with one). Prints ``READY`` once serving; SIGTERM stops it (exit status 0).
    """
    import errno

    from ringblob.engine.faulty import FaultyEngine
    from ringblob.metrics import Metrics
    from ringblob.server import ServerConfig, run_server
    from ringblob.store import BlobStore

    async def amain() -> int:
        holder = {}

        def wrap(e):
            holder["e"] = FaultyEngine(e)
            return holder["e"]

        def arm(kind: str, err: int) -> None:
            holder["e"].err = err
            holder["e"].fail_next(kind)

        metrics = Metrics()
        store = await BlobStore.open(data, create_size=16 << 20, observer=metrics, wrap_engine=wrap,
                                     sync_method="fdatasync")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, arm, "fdatasync", errno.EIO)
        loop.add_signal_handler(signal.SIGUSR2, arm, "read", errno.EBADMSG)
        cfg = ServerConfig(socket_path=sock, metrics_addr="", socket_activation=False)
        return await run_server(store, cfg, metrics=metrics, on_ready=lambda srv: print("READY", flush=True))

    return asyncio.run(amain())


def test_io_errors_reach_both_clients_with_their_errno():
    """IOFailed raised by the store in a daemon process arrives with ``.errno`` set (the errno
    trailer of docs/PROTOCOL.md), for a GET, a get_many item and a sync PUT, on both clients."""
    import errno

    workdir = make_tmp("eio-")
    sock = str(workdir / "rb.sock")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_client; "
            "sys.exit(test_client.serve_faulty_store(sys.argv[2], sys.argv[3]))")
    log = open(workdir / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), str(workdir / "d.data"), sock],
                            stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line == b"READY\n", f"the daemon did not start: {line!r}\n{(workdir / 'daemon.log').read_text()}"
        with ringblob.Client(sock, timeout=20) as c:
            c.put(b"k", b"v" * 9000, sync=True)
            proc.send_signal(signal.SIGUSR2)  # the next read fails with EBADMSG
            assert c.ping(b"x") == b"x"  # the signal is handled before the next request
            with pytest.raises(ringblob.errors.IOFailed) as ei:
                c.get(b"k")
            assert ei.value.errno == errno.EBADMSG
            assert "EBADMSG" in str(ei.value) and "[errno=" not in str(ei.value)
            proc.send_signal(signal.SIGUSR2)
            assert c.ping(b"x") == b"x"
            with pytest.raises(ringblob.errors.IOFailed) as ei:  # MGET: the item's error is raised
                c.get_many([b"k"])
            assert ei.value.errno == errno.EBADMSG
            assert c.get(b"k") == b"v" * 9000  # one read failed, not the disk

            async def on_async_client():
                async with ringblob.AsyncClient(sock, timeout=20) as ac:
                    proc.send_signal(signal.SIGUSR2)
                    assert await ac.ping(b"x") == b"x"
                    with pytest.raises(ringblob.errors.IOFailed) as ei:
                        await ac.get(b"k")
                    assert ei.value.errno == errno.EBADMSG
                    proc.send_signal(signal.SIGUSR1)  # the next fdatasync fails with EIO
                    assert await ac.ping(b"x") == b"x"
                    with pytest.raises(ringblob.errors.IOFailed) as ei:
                        await ac.put(b"doomed", b"x", sync=True)
                    assert ei.value.errno == errno.EIO
                    assert "fdatasync" in str(ei.value) and "[errno=" not in str(ei.value)
                    with pytest.raises(ringblob.errors.ReadOnly) as ro:  # no errno of its own
                        await ac.put(b"later", b"y")
                    assert getattr(ro.value, "errno", None) is None

            run(on_async_client())
            assert c.get(b"k") == b"v" * 9000  # reads go on
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (workdir / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- properties and lifecycle -------------------------------------------------------


from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402


@given(
    st.dictionaries(
        st.binary(min_size=1, max_size=40).map(lambda k: b"prop/" + k),
        st.binary(max_size=9000),
        max_size=12,
    )
)
@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_keys_and_values_round_trip(daemon, items):
    with ringblob.Client(daemon.socket) as c:
        for k in list(c.list(b"prop/")):
            c.delete(k)
        for k, v in items.items():
            c.put(k, v)
        assert list(c.list(b"prop/")) == sorted(items)
        assert c.get_many(sorted(items)) == [items[k] for k in sorted(items)]
        for k, v in items.items():
            assert c.get(k) == v


def test_threads_share_a_sync_client(daemon):
    errors: list[BaseException] = []
    with ringblob.Client(daemon.socket) as c:

        def work(n: int):
            try:
                for i in range(50):
                    key = b"thr/%d/%d" % (n, i)
                    c.put(key, key)
                    assert c.get(key) == key
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors


def test_daemon_stopping_loses_connections_cleanly():
    workdir = make_tmp("ds-")
    d = Daemon(workdir).start()
    try:
        sync_client = ringblob.Client(d.socket)
        sync_client.put(b"k", b"v", sync=True)

        async def main():
            c = await ringblob.AsyncClient(d.socket).connect()
            await c.put(b"k2", b"v2")
            assert d.stop() == 0, d.output()  # SIGTERM with idle connections open: clean exit
            with pytest.raises(ConnectionLost):
                await c.get(b"k")
            await c.close()

        run(main())
        with pytest.raises(ConnectionLost):
            sync_client.get(b"k")
        with pytest.raises(ConnectionLost):
            sync_client.ping()
        sync_client.close()
        # both writes were acknowledged before SIGTERM: they survive the restart
        d.start()
        with ringblob.Client(d.socket) as c:
            assert c.get_many([b"k", b"k2"]) == [b"v", b"v2"]
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_async_pipelined_large_values(daemon):
    """Many large puts in flight at once: sent under backpressure, all stored, replies matched."""

    async def main():
        async with ringblob.AsyncClient(daemon.socket) as c:
            prefix = unique("bigpipe")
            values = {prefix + b"%d" % i: os.urandom(256 * 1024 + i) for i in range(48)}
            await asyncio.gather(*(c.put(k, v) for k, v in values.items()))
            got = await asyncio.gather(*(c.get(k) for k in values))
            assert got == list(values.values())
            await asyncio.gather(*(c.delete(k) for k in values))

    run(main())

    async def with_uvloop():
        async with ringblob.AsyncClient(daemon.socket) as c:
            return await asyncio.gather(*(c.ping(b"%d" % i) for i in range(100)))

    uvloop = pytest.importorskip("uvloop")
    assert uvloop.run(with_uvloop()) == [b"%d" % i for i in range(100)]


def test_get_many_splits_a_batch_whose_reply_passes_the_frame_limit():
    """The daemon refuses an MGET whose reply would pass max_frame_size (TooLarge, nothing read);
    both clients split such a batch in halves, down to single GETs, and return every value."""
    workdir = make_tmp("mg-")
    d = Daemon(workdir, "--max-frame-size", "1M").start()
    try:
        values = {f"big{i}".encode(): os.urandom(300 * 1024) for i in range(8)}
        keys = list(values) + [b"missing"]
        with ringblob.Client(d.socket, max_frame_size=1 << 20) as c:
            for k, v in values.items():
                c.put(k, v)
            with pytest.raises(TooLarge, match="max_frame_size"):
                c._call(protocol.Op.MGET, protocol.encode_mget(999, list(values)))
            assert c.get_many(keys) == list(values.values()) + [None]

        async def via_async():
            async with ringblob.AsyncClient(d.socket, max_frame_size=1 << 20) as ac:
                return await ac.get_many(keys)

        assert asyncio.run(via_async()) == list(values.values()) + [None]
    finally:
        assert d.stop() == 0
        shutil.rmtree(workdir, ignore_errors=True)


# -- the benchmark's native load generator (bench/loadgen.c), a client too ------------------


def test_loadgen_send_buffer_option(daemon):
    """bench/loadgen.c builds warning-free, keeps the kernel's SO_SNDBUF by default and with
    --sndbuf 0, sets --sndbuf N (capped by net.core.wmem_max, doubled by the kernel), reports
    the size in effect as "sndbuf" in its JSON line, and its PUTs succeed either way."""
    import json

    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build bench/loadgen.c")
    workdir = make_tmp("lg-")
    try:
        binary = str(workdir / "loadgen")
        subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, os.path.join(ROOT, "bench", "loadgen.c")],
                       check=True, capture_output=True, text=True)
        with open("/proc/sys/net/core/wmem_default") as f:
            default = int(f.read())
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem_max = int(f.read())

        def run_loadgen(op: str, size: int, *extra: str) -> dict:
            argv = [binary, "--socket", str(daemon.socket), "--op", op, "--size", str(size), "--share", "2",
                    "--keys", "4", "--warmup", "0", "--duration", "0.3", *extra]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            doc = json.loads(proc.stdout.splitlines()[-1])
            assert doc["ops"] > 0 and doc["errors"] == 0, doc
            return doc

        assert run_loadgen("put_big", 1 << 20)["sndbuf"] == default
        assert run_loadgen("put_big", 1 << 20, "--sndbuf", "0")["sndbuf"] == default
        assert run_loadgen("put_big", 256 << 10, "--sndbuf", str(1 << 20))["sndbuf"] == 2 * min(1 << 20, wmem_max)
        assert run_loadgen("put_sync", 4096, "--sndbuf", str(300_000))["sndbuf"] == 2 * min(300_000, wmem_max)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
