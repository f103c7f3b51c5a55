"""In-process tests of ringblob.server: framing, limits, backpressure, access, lifecycle.

The server runs in the test's event loop over a small in-memory store with
the BlobStore async API (``FakeStore`` below, test-only), so these tests can
hold requests in flight at will (``gate``). The end-to-end tests against the
real store in a daemon process are in tests/test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import uuid

import blake3
import pytest

from ringblob import errors
from ringblob import protocol as P
from ringblob import server as S
from ringblob.metrics import Metrics

TMP_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".test-tmp")


class FakeStore:
    """In-memory stand-in with BlobStore's async API (test-only)."""

    def __init__(self):
        self.data: dict[bytes, bytes] = {}
        self.dirty = False
        self.closed = False
        self.flushes = 0
        self.gate: asyncio.Event | None = None  # when set: puts wait for it
        self.active = 0
        self.max_active = 0
        self.started = 0

    @staticmethod
    def _check(key):
        if not isinstance(key, bytes) or not 1 <= len(key) <= 255:
            raise errors.InvalidKey(f"key must be 1 to 255 bytes, got {len(key)}")

    async def put(self, key, value, *, sync=False, verify=False):
        self._check(key)
        if verify and blake3.blake3(value).digest() != key:
            raise errors.DigestMismatch("BLAKE3 digest of the value does not match the key; nothing stored")
        if self.closed:
            raise errors.EngineClosed("store is closed")
        self.started += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            self.data[key] = bytes(value)
            self.dirty = not sync or self.dirty
        finally:
            self.active -= 1

    async def put_many(self, items, *, sync=False):
        for k, v in items:
            await self.put(k, v, sync=sync)

    async def get(self, key):
        self._check(key)
        await asyncio.sleep(0)
        try:
            return self.data[key]
        except KeyError:
            raise errors.NotFound(f"no blob under key {key!r}") from None

    async def get_many(self, keys):
        return [await self.get(k) for k in keys]

    async def get_each(self, keys):  # BlobStore.get_each: each key's value or its own error
        return list(await asyncio.gather(*(self.get(k) for k in keys), return_exceptions=True))

    def has(self, key):  # synchronous, like BlobStore.has
        self._check(key)
        return key in self.data

    async def delete(self, key, *, sync=False):
        self._check(key)
        if self.data.pop(key, None) is not None and not sync:
            self.dirty = True

    async def list(self, prefix=b"", start_after=None, limit=None):
        n = 0
        for k in sorted(self.data):
            if not k.startswith(prefix) or (start_after is not None and k <= start_after):
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            yield k
            await asyncio.sleep(0)

    async def flush(self):
        self.flushes += 1
        self.dirty = False

    @property
    def needs_flush(self):
        return self.dirty

    def stat(self):
        return {
            "blob_count": len(self.data),
            "used_bytes": sum(len(v) for v in self.data.values()),
            "free_bytes": 1 << 20,
            "journal_bytes": 0,
            "checkpoints": 0,
            "read_only": False,
            "needs_flush": self.dirty,
            "counters": {"fdatasyncs": 0, "engine": {"sqes": 0, "cqes": 0, "enters": 0}},
        }

    async def close(self):
        await self.flush()
        self.closed = True


@pytest.fixture
def sockdir():
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, "srv-" + uuid.uuid4().hex[:8])
    os.mkdir(d)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def run(coro, loop_kind="asyncio"):
    loop = S.new_event_loop(loop_kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 30))
    finally:
        loop.close()


class Conn:
    """A raw test client: asyncio streams + the shared codec."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.dec = P.FrameDecoder()

    @classmethod
    async def open(cls, path):
        r, w = await asyncio.open_unix_connection(path)
        return cls(r, w)

    def send(self, *frames: bytes):
        self.writer.write(b"".join(frames))

    async def recv(self, timeout=10) -> P.Frame | None:
        """Next frame, or None at EOF."""
        while True:
            f = self.dec.next_frame()
            if f is not None:
                return f
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            if not data:
                return None
            self.dec.feed(data)

    async def call(self, frame: bytes) -> P.Frame:
        self.send(frame)
        f = await self.recv()
        assert f is not None
        return f

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass


async def start(sockdir, store=None, **cfg) -> S.Server:
    cfg.setdefault("metrics_addr", "")
    cfg.setdefault("socket_activation", False)
    srv = S.Server(store or FakeStore(), S.ServerConfig(socket_path=os.path.join(sockdir, "s.sock"), **cfg))
    await srv.start()
    return srv


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_every_operation_and_error(sockdir, loop_kind):
    async def main():
        srv = await start(sockdir)
        c = await Conn.open(srv.socket_path)
        assert P.raise_for_status(await c.call(P.encode_put(1, b"k1", b"v1"))).body == b""
        f = await c.call(P.encode_get(2, b"k1"))
        assert (f.opcode, f.request_id, f.status, f.body) == (P.Op.GET, 2, 0, b"v1")
        assert P.decode_bool_reply((await c.call(P.encode_has(3, b"k1"))).body) is True
        assert P.decode_bool_reply((await c.call(P.encode_has(4, b"zz"))).body) is False
        assert P.decode_bool_reply((await c.call(P.encode_needs_flush(5))).body) is True
        P.raise_for_status(await c.call(P.encode_flush(6)))
        assert P.decode_bool_reply((await c.call(P.encode_needs_flush(7))).body) is False
        with pytest.raises(errors.NotFound):
            P.raise_for_status(await c.call(P.encode_get(8, b"missing")))
        # an empty key reaches the store, which says InvalidKey; the connection stays usable
        f = await c.call(P.encode_frame(P.Op.GET, 9, b"\x00"))
        assert f.status == errors.InvalidKey.code
        digest = blake3.blake3(b"content").digest()
        P.raise_for_status(await c.call(P.encode_put(10, digest, b"content", verify=True)))
        with pytest.raises(errors.DigestMismatch):
            P.raise_for_status(await c.call(P.encode_put(11, digest, b"other", verify=True)))
        P.raise_for_status(await c.call(P.encode_mput(12, [(b"a%d" % i, b"x" * i) for i in range(5)], sync=True)))
        res = P.decode_mget_reply((await c.call(P.encode_mget(13, [b"a1", b"nope", b"a4"]))).body)
        assert res[0] == b"x" and res[2] == b"xxxx" and isinstance(res[1], errors.NotFound)
        keys, more = P.decode_list_reply((await c.call(P.encode_list(14, b"a", None, 2))).body)
        assert keys == [b"a0", b"a1"] and more
        keys, more = P.decode_list_reply((await c.call(P.encode_list(15, b"a", b"a1", 0))).body)
        assert keys == [b"a2", b"a3", b"a4"] and not more
        P.raise_for_status(await c.call(P.encode_delete(16, b"a0", sync=True)))
        P.raise_for_status(await c.call(P.encode_delete(17, b"a0")))  # missing: not an error
        assert (await c.call(P.encode_ping(18, b"hello"))).body == b"hello"
        st = P.decode_stat_reply((await c.call(P.encode_stat(19))).body)
        assert st["blob_count"] == 6 and st["server"]["connections"] == 1
        assert st["server"]["loop"] == ("uvloop" if loop_kind == "uvloop" else "asyncio")
        await c.close()
        await srv.shutdown()
        assert srv.store.closed

    run(main(), loop_kind)


def test_pipelined_requests_and_out_of_order_replies(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        # a slow put, then 200 pings in the same write: the pings overtake the put
        c.send(P.encode_put(1, b"slow", b"v"), *(P.encode_ping(i, b"%d" % i) for i in range(2, 202)))
        got = [await c.recv() for _ in range(200)]
        assert sorted(f.request_id for f in got) == list(range(2, 202))
        assert all(f.body == b"%d" % f.request_id for f in got)
        store.gate.set()
        f = await c.recv()
        assert (f.request_id, f.status) == (1, 0)
        await c.close()
        await srv.shutdown()

    run(main())


def test_replies_of_one_turn_are_written_together(sockdir, monkeypatch):
    writes = []
    orig = S._Connection._flush_out

    def counting(self):
        if self.out:
            writes.append(len(self.out) // 2)  # header + body per reply
        orig(self)

    monkeypatch.setattr(S._Connection, "_flush_out", counting)

    async def main():
        srv = await start(sockdir)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_ping(i, b"x") for i in range(1, 101)))
        for _ in range(100):
            assert (await c.recv()).status == 0
        await c.close()
        await srv.shutdown()

    run(main())
    assert sum(writes) == 100
    assert len(writes) <= 5, writes  # 100 replies from one read leave in a few writes, not 100


def test_per_connection_in_flight_limit_pauses_reading(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store, max_in_flight_per_conn=4)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c.send(*(P.encode_put(i, b"k%d" % i, b"v") for i in range(1, 41)))
        await asyncio.sleep(0.2)
        assert store.started == 4 and srv.in_flight == 4
        store.gate.set()
        got = [await c.recv() for _ in range(40)]
        assert sorted(f.request_id for f in got) == list(range(1, 41))
        assert all(f.status == 0 for f in got)
        assert store.max_active == 4 and len(store.data) == 40
        await c.close()
        await srv.shutdown()

    run(main())


def test_total_in_flight_limit_spans_connections(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store, max_in_flight_total=6, max_in_flight_per_conn=100)
        c1, c2 = await Conn.open(srv.socket_path), await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c1.send(*(P.encode_put(i, b"a%d" % i, b"v") for i in range(1, 11)))
        c2.send(*(P.encode_put(i, b"b%d" % i, b"v") for i in range(1, 11)))
        await asyncio.sleep(0.2)
        assert store.started == 6
        store.gate.set()
        for c in (c1, c2):
            got = [await c.recv() for _ in range(10)]
            assert all(f.status == 0 for f in got)
        assert store.max_active == 6 and len(store.data) == 20
        await c1.close()
        await c2.close()
        await srv.shutdown()

    run(main())


def test_max_connections_refuses_with_busy(sockdir):
    async def main():
        srv = await start(sockdir, max_connections=2)
        c1, c2 = await Conn.open(srv.socket_path), await Conn.open(srv.socket_path)
        assert (await c1.call(P.encode_ping(1))).status == 0
        assert (await c2.call(P.encode_ping(1))).status == 0
        c3 = await Conn.open(srv.socket_path)
        f = await c3.recv()
        assert (f.opcode, f.request_id, f.status) == (0, 0, errors.Busy.code)
        assert "max_connections" in f.body.decode()
        assert await c3.recv() is None  # closed
        assert (await c1.call(P.encode_ping(2))).status == 0
        await c1.close()
        await asyncio.sleep(0.1)
        c4 = await Conn.open(srv.socket_path)  # a slot is free again
        assert (await c4.call(P.encode_ping(1))).status == 0
        assert srv.metrics.connections_rejected.labels("busy")._value.get() == 1
        for c in (c2, c3, c4):
            await c.close()
        await srv.shutdown()

    run(main())


@pytest.mark.parametrize(
    "bad, status",
    [
        (b"HTTP/1.1 GET /\r\n\r\n", errors.ProtocolError.code),  # bad magic
        (P.encode_frame(99, 7, b""), errors.ProtocolError.code),  # unknown opcode
        (P.encode_frame(P.Op.GET, 7, b"\x09k"), errors.ProtocolError.code),  # truncated body
        (P.HEADER.pack(P.MAGIC, 2, P.Op.PING, 0, 7, 0), errors.ProtocolError.code),  # version
        (P.HEADER.pack(P.MAGIC, 1, P.Op.PUT, 0, 7, 10 << 20), errors.FrameTooLarge.code),  # oversized
    ],
)
def test_malformed_frame_gets_error_reply_and_close(sockdir, bad, status):
    async def main():
        srv = await start(sockdir, max_frame_size=1 << 20)
        other = await Conn.open(srv.socket_path)
        P.raise_for_status(await other.call(P.encode_put(1, b"keep", b"me")))
        c = await Conn.open(srv.socket_path)
        c.send(P.encode_ping(1, b"before"), bad, P.encode_ping(2, b"after"))
        got = [await c.recv(), await c.recv()]  # replies may come in any order
        (f1,) = [f for f in got if f.status == 0]
        (f2,) = [f for f in got if f.status != 0]
        assert (f1.request_id, f1.body) == (1, b"before")  # the request before the bad frame is answered
        assert f2.status == status
        if status == errors.FrameTooLarge.code or bad[:4] == P.MAGIC and bad[4] == 1:
            assert f2.request_id == 7
        assert await c.recv() is None  # the server closed the connection
        # the other client and the daemon are unaffected
        assert (await other.call(P.encode_get(2, b"keep"))).body == b"me"
        c2 = await Conn.open(srv.socket_path)
        assert (await c2.call(P.encode_ping(3, b"ok"))).body == b"ok"
        reason = "too_large" if status == errors.FrameTooLarge.code else "malformed"
        assert srv.metrics.rejected_frames.labels(reason)._value.get() == 1
        for x in (c, c2, other):
            await x.close()
        await srv.shutdown()

    run(main())


def test_truncated_frame_then_disconnect_leaves_the_daemon_serving(sockdir):
    async def main():
        srv = await start(sockdir)
        c = await Conn.open(srv.socket_path)
        c.send(P.encode_put(1, b"k", b"v" * 1000)[:500])
        await asyncio.sleep(0.05)
        await c.close()
        c2 = await Conn.open(srv.socket_path)
        assert P.raise_for_status(await c2.call(P.encode_has(1, b"k"))).body == b"\x00"
        await c2.close()
        await srv.shutdown()

    run(main())


def test_client_disconnecting_mid_request(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c.send(P.encode_put(1, b"k", b"v"), P.encode_get(2, b"nothing"))
        await asyncio.sleep(0.05)
        await c.close()
        await asyncio.sleep(0.05)
        store.gate.set()
        await asyncio.sleep(0.05)
        assert store.data == {b"k": b"v"}  # the request finished; its reply was dropped
        assert srv.in_flight == 0 and not srv.connections
        c2 = await Conn.open(srv.socket_path)
        assert (await c2.call(P.encode_get(3, b"k"))).body == b"v"
        await c2.close()
        await srv.shutdown()

    run(main())


def test_half_close_gets_every_reply_then_eof(sockdir):
    async def main():
        srv = await start(sockdir, max_in_flight_per_conn=3)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_ping(i, b"p") for i in range(1, 21)))
        c.writer.write_eof()
        got = [await c.recv() for _ in range(20)]
        assert sorted(f.request_id for f in got) == list(range(1, 21))
        assert await c.recv() is None
        await c.close()
        await srv.shutdown()

    run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_backpressure_bounds_buffered_replies(sockdir, loop_kind):
    value = b"v" * (256 * 1024)
    n = 400  # 100 MiB of replies if the daemon buffered them all

    async def main():
        store = FakeStore()
        store.data[b"big"] = value
        srv = await start(sockdir, store, write_high_water=1 << 20, max_in_flight_per_conn=16)
        c = await Conn.open(srv.socket_path)
        frames = b"".join(P.encode_get(i, b"big") for i in range(1, n + 1))
        writer = asyncio.get_running_loop().create_task(_write_all(c, frames))
        peak = 0
        for _ in range(20):
            await asyncio.sleep(0.02)
            (conn,) = srv.connections
            peak = max(peak, conn.transport.get_write_buffer_size())
        # the client is not reading: the daemon stopped reading it instead of buffering 100 MiB
        assert peak < (1 << 20) + 17 * (len(value) + 64)
        served = srv.metrics.request_count("get", "ok")
        assert served < n
        got = 0
        while got < n:
            f = await c.recv()
            assert f.status == 0 and len(f.body) == len(value)
            got += 1
        await writer
        await c.close()
        await srv.shutdown()

    run(main(), loop_kind)


async def _write_all(c: Conn, data: bytes):
    c.writer.write(data)
    await c.writer.drain()


def test_idle_timeout_closes_quiet_connections(sockdir):
    async def main():
        srv = await start(sockdir, idle_timeout=0.3)
        c = await Conn.open(srv.socket_path)
        assert (await c.call(P.encode_ping(1))).status == 0
        t0 = asyncio.get_running_loop().time()
        assert await c.recv(timeout=5) is None
        assert asyncio.get_running_loop().time() - t0 >= 0.25
        await c.close()
        await srv.shutdown()

    run(main())


def test_peer_credentials_allowlist(sockdir):
    async def main():
        srv = await start(sockdir, allow_uids=[os.getuid() + 12345])
        c = await Conn.open(srv.socket_path)
        f = await c.recv()
        assert (f.request_id, f.status) == (0, errors.AccessDenied.code)
        assert f"uid {os.getuid()}" in f.body.decode()
        assert await c.recv() is None
        await c.close()
        await srv.shutdown()
        srv = await start(sockdir, allow_uids=[os.getuid() + 12345], allow_gids=[os.getgid()])
        c = await Conn.open(srv.socket_path)
        assert (await c.call(P.encode_ping(1))).status == 0
        await c.close()
        await srv.shutdown()

    run(main())


def test_socket_mode_and_stale_and_live_socket_files(sockdir):
    async def main():
        path = os.path.join(sockdir, "s.sock")
        # a stale socket file: bound, never listening (a dead daemon's)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.close()
        srv = await start(sockdir)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # a second server on the live socket refuses and leaves it alone
        with pytest.raises(errors.ConfigError, match="in use by a running daemon"):
            await start(sockdir)
        c = await Conn.open(path)
        assert (await c.call(P.encode_ping(1))).status == 0
        await c.close()
        await srv.shutdown()
        assert not os.path.exists(path)  # unlinked at shutdown
        srv = await start(sockdir, socket_mode=0o660, socket_group=os.getgid())
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        await srv.shutdown()
        with open(path, "w") as fh:
            fh.write("not a socket")
        with pytest.raises(errors.ConfigError, match="not a socket"):
            await start(sockdir)

    run(main())


def test_shutdown_finishes_requests_in_flight_then_closes_the_store(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c.send(P.encode_put(1, b"k", b"v"))
        await asyncio.sleep(0.05)
        down = asyncio.get_running_loop().create_task(srv.shutdown())
        await asyncio.sleep(0.05)
        assert not os.path.exists(srv.config.socket_path)  # no longer accepting
        assert not store.closed
        store.gate.set()
        f = await c.recv()
        assert (f.request_id, f.status) == (1, 0)
        assert await c.recv() is None
        await down
        assert store.closed and store.data == {b"k": b"v"} and not store.dirty

    run(main())


def test_run_server_with_a_preopened_socket_and_stop_event(sockdir):
    """Socket activation path: the listener is passed in; READY via on_ready; stop -> exit 0."""

    async def main():
        path = os.path.join(sockdir, "act.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(8)
        stop = asyncio.Event()
        ready = asyncio.Event()
        store = FakeStore()
        cfg = S.ServerConfig(socket_path=os.path.join(sockdir, "unused.sock"), metrics_addr="")
        task = asyncio.get_running_loop().create_task(
            S.run_server(store, cfg, listen_sock=lsock, stop=stop, on_ready=lambda srv: ready.set(), install_signal_handlers=False)
        )
        await asyncio.wait_for(ready.wait(), 5)
        c = await Conn.open(path)
        P.raise_for_status(await c.call(P.encode_put(1, b"a", b"b")))
        assert not os.path.exists(cfg.socket_path)
        stop.set()
        assert await task == 0
        assert store.closed
        await c.close()

    run(main())


def test_metrics_http_endpoint_in_process(sockdir):
    from prometheus_client.parser import text_string_to_metric_families

    async def main():
        srv = await start(sockdir, metrics_addr="127.0.0.1:0")
        host, port = srv.metrics_address
        c = await Conn.open(srv.socket_path)
        P.raise_for_status(await c.call(P.encode_put(1, b"k", b"v")))
        await c.call(P.encode_get(2, b"nope"))
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await r.read()
        w.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
        assert samples[("ringblob_requests_total", (("op", "put"), ("status", "ok")))] == 1
        assert samples[("ringblob_requests_total", (("op", "get"), ("status", "not_found")))] == 1
        assert samples[("ringblob_blobs", ())] == 1
        assert samples[("ringblob_connections", ())] == 1
        await c.close()
        await srv.shutdown()

    run(main())


def test_shutdown_answers_frames_not_yet_started_with_server_shutting_down(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store, max_in_flight_per_conn=2)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c.send(*(P.encode_put(i, b"k%d" % i, b"v") for i in range(1, 11)))
        await asyncio.sleep(0.05)
        down = asyncio.get_running_loop().create_task(srv.shutdown())
        await asyncio.sleep(0.05)
        store.gate.set()
        got = [await c.recv() for _ in range(10)]
        assert await c.recv() is None
        ok = sorted(f.request_id for f in got if f.status == 0)
        refused = [f for f in got if f.status != 0]
        assert ok == [1, 2]
        assert {f.status for f in refused} == {errors.ServerShuttingDown.code} and len(refused) == 8
        await down
        assert set(store.data) == {b"k1", b"k2"}

    run(main())


def test_internal_errors_and_os_errors_become_statuses(sockdir):
    class Broken(FakeStore):
        async def get(self, key):
            if key == b"eio":
                raise OSError(5, "Input/output error")
            if key == b"ro":
                raise errors.ReadOnly("store is read-only after EIO; restart the daemon")
            raise RuntimeError("bug")

    async def main():
        srv = await start(sockdir, Broken())
        c = await Conn.open(srv.socket_path)
        assert isinstance(P.reply_error(await c.call(P.encode_get(1, b"eio"))), errors.IOFailed)
        assert isinstance(P.reply_error(await c.call(P.encode_get(2, b"ro"))), errors.ReadOnly)
        f = await c.call(P.encode_get(3, b"x"))
        assert f.status == 1 and "internal error" in f.body.decode()
        assert (await c.call(P.encode_ping(4, b"still"))).body == b"still"
        await c.close()
        await srv.shutdown()

    run(main())


def test_random_garbage_never_hurts_the_daemon(sockdir):
    """Random bytes, random valid headers with random bodies: error replies or closes, never a crash."""
    import random

    rng = random.Random(1234)

    async def main():
        store = FakeStore()
        srv = await start(sockdir, store, max_frame_size=64 * 1024)
        keeper = await Conn.open(srv.socket_path)
        P.raise_for_status(await keeper.call(P.encode_put(1, b"keep", b"safe")))
        for i in range(60):
            c = await Conn.open(srv.socket_path)
            if i % 2:
                payload = rng.randbytes(rng.randint(1, 300))
            else:
                body = rng.randbytes(rng.randint(0, 80))
                payload = P.encode_frame(rng.randint(0, 14), i, body, rng.randint(0, 3))
            c.send(payload)
            c.writer.write_eof()
            while (f := await c.recv()) is not None:
                assert f.status in (0, errors.ProtocolError.code, errors.FrameTooLarge.code,
                                    errors.InvalidKey.code, errors.NotFound.code, errors.DigestMismatch.code)
            await c.close()
        assert (await keeper.call(P.encode_get(2, b"keep"))).body == b"safe"
        assert srv.in_flight == 0 and len(srv.connections) == 1
        await keeper.close()
        await srv.shutdown()

    run(main(), "uvloop")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_half_close_under_backpressure_still_gets_every_reply(sockdir, loop_kind):
    async def main():
        store = FakeStore()
        store.data[b"big"] = b"b" * (128 * 1024)
        srv = await start(sockdir, store, write_high_water=256 * 1024, max_in_flight_per_conn=4)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_get(i, b"big") for i in range(1, 61)))
        c.writer.write_eof()
        await asyncio.sleep(0.2)  # let the daemon hit its write high-water mark before we read
        got = [await c.recv() for _ in range(60)]
        assert sorted(f.request_id for f in got) == list(range(1, 61))
        assert all(len(f.body) == 128 * 1024 for f in got)
        assert await c.recv() is None
        await c.close()
        await srv.shutdown()

    run(main(), loop_kind)


def test_idle_timeout_spares_connections_with_requests_in_flight(sockdir):
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store, idle_timeout=0.15)
        c = await Conn.open(srv.socket_path)
        store.gate = asyncio.Event()
        c.send(P.encode_put(1, b"slow", b"v"))
        await asyncio.sleep(0.5)  # longer than the idle timeout, with a request in flight
        store.gate.set()
        f = await c.recv()
        assert (f.request_id, f.status) == (1, 0)
        assert await c.recv(timeout=5) is None  # idle after the reply: closed
        await c.close()
        await srv.shutdown()

    run(main())


def test_list_pages_are_capped_by_the_server(sockdir):
    async def main():
        store = FakeStore()
        store.data.update({b"k%02d" % i: b"" for i in range(10)})
        srv = await start(sockdir, store, list_page_max=4)
        c = await Conn.open(srv.socket_path)
        keys, more = P.decode_list_reply((await c.call(P.encode_list(1, b"", None, 0))).body)
        assert keys == [b"k00", b"k01", b"k02", b"k03"] and more
        keys, more = P.decode_list_reply((await c.call(P.encode_list(2, b"", b"k03", 1000))).body)
        assert keys == [b"k04", b"k05", b"k06", b"k07"] and more
        keys, more = P.decode_list_reply((await c.call(P.encode_list(3, b"", b"k07", 2))).body)
        assert keys == [b"k08", b"k09"] and not more
        keys, more = P.decode_list_reply((await c.call(P.encode_list(4, b"zz", None, 0))).body)
        assert keys == [] and not more
        await c.close()
        await srv.shutdown()

    run(main())


def test_served_requests_leave_the_task_set_and_counters_at_zero(sockdir):
    # request tasks remove themselves from Server._tasks when they end (no done callback per request)
    async def main():
        store = FakeStore()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_put(i, b"k%d" % i, b"v%d" % i) for i in range(1, 21)))
        got = {}
        for _ in range(20):  # acknowledged before the GETs go out (replies may overtake each other)
            f = await c.recv()
            got[f.request_id] = f
        c.send(*(P.encode_get(100 + i, b"k%d" % i) for i in range(1, 21)))
        c.send(P.encode_get(200, b"missing"), P.encode_frame(P.Op.GET, 201, b"\x00"))  # empty key
        for _ in range(22):
            f = await c.recv()
            got[f.request_id] = f
        assert all(got[i].status == 0 for i in range(1, 21))
        assert all(got[100 + i].body == b"v%d" % i for i in range(1, 21))
        assert got[200].status == errors.NotFound.code and got[201].status == errors.InvalidKey.code
        await asyncio.sleep(0)
        assert not srv._tasks and srv.in_flight == 0
        conn = next(iter(srv.connections))
        assert conn.in_flight == 0 and conn.reply_reserved == 0 and conn.out_total == 0
        await c.close()
        await srv.shutdown()

    run(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_large_put_bodies_reach_the_store_without_a_copy_and_intact(sockdir, loop_kind):
    # large request bodies are read into a buffer of their own size and handed to the store as a
    # read-only memoryview; small frames around them (and split anywhere) still decode
    seen = []

    class ViewStore(FakeStore):
        async def put(self, key, value, *, sync=False, verify=False):
            seen.append((key, type(value), getattr(value, "readonly", True)))
            await super().put(key, value, sync=sync, verify=verify)

    async def main():
        store = ViewStore()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        values = {b"big%d" % i: os.urandom(n) for i, n in enumerate([P.LARGE_BODY, 1 << 20, 3 * (1 << 20) + 5])}
        frames = []
        rid = 0
        for k, v in values.items():
            rid += 1
            frames.append(P.encode_put(rid, k, v, sync=True))
            rid += 1
            frames.append(P.encode_ping(rid, b"p"))
        stream = b"".join(frames)
        for cut in range(0, len(stream), 777_777):  # pieces that split headers and bodies anywhere
            c.writer.write(stream[cut : cut + 777_777])
            await c.writer.drain()
        got = [await c.recv() for _ in range(rid)]
        assert all(f.status == 0 for f in got), [P.reply_error(f) for f in got]
        for k, v in values.items():
            f = await c.call(P.encode_get(100, k))
            assert f.status == 0 and f.body == v
        assert [(k, t, ro) for k, t, ro in seen] == [(k, memoryview, True) for k in values]
        await c.close()
        await srv.shutdown()

    run(main(), loop_kind)


class _GatedGetStore(FakeStore):
    """get() waits on a future the test controls (like a read waiting for its CQE)."""

    def __init__(self):
        super().__init__()
        self.waiting: list[asyncio.Future] = []
        self.tasks_seen: list = []

    async def get(self, key):
        self._check(key)
        self.tasks_seen.append(asyncio.current_task())
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        await fut
        return self.data[key]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_get_runs_without_a_task_and_resumes_from_its_future(sockdir, loop_kind):
    async def main():
        store = _GatedGetStore()
        store.data[b"k"] = b"value"
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_get(i, b"k") for i in range(1, 6)))
        for _ in range(100):
            if len(store.waiting) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(store.waiting) == 5 and not srv._tasks and len(srv._eager) == 5 and srv.in_flight == 5
        assert store.tasks_seen == [None] * 5  # stepped by hand in the turn that decoded them
        for fut in store.waiting:
            fut.set_result(None)
        got = sorted([await c.recv() for _ in range(5)], key=lambda f: f.request_id)
        assert [(f.request_id, f.status, f.body) for f in got] == [(i, 0, b"value") for i in range(1, 6)]
        assert not srv._eager and srv.in_flight == 0 and srv.metrics.request_count("get") == 5
        store.waiting.clear()
        c.send(P.encode_get(9, b"k"))  # the awaited future fails: its error is the reply
        for _ in range(100):
            if store.waiting:
                break
            await asyncio.sleep(0.01)
        store.waiting[0].set_exception(errors.IOFailed("read failed: EIO"))
        f = await c.recv()
        assert (f.request_id, f.status) == (9, errors.IOFailed.code) and b"EIO" in f.body
        await c.close()
        await srv.shutdown()

    run(main(), loop_kind)


def test_get_awaiting_something_else_than_a_future_is_an_internal_error(sockdir):
    class Odd:
        def __await__(self):
            yield 42  # not a future: a Task would fail it the same way

    class OddStore(FakeStore):
        async def get(self, key):
            await Odd()

    async def main():
        srv = await start(sockdir, OddStore())
        c = await Conn.open(srv.socket_path)
        f = await c.call(P.encode_get(1, b"k"))
        assert f.status == 1 and b"RuntimeError" in f.body
        assert not srv._eager and srv.in_flight == 0
        await c.close()
        await srv.shutdown()

    run(main())


def test_shutdown_waits_for_task_less_gets_then_cancels_them(sockdir):
    async def main():
        store = _GatedGetStore()
        store.data[b"k"] = b"v"
        srv = await start(sockdir, store, shutdown_timeout=0.3)
        c = await Conn.open(srv.socket_path)
        c.send(P.encode_get(1, b"k"), P.encode_get(2, b"k"))
        for _ in range(100):
            if len(store.waiting) == 2:
                break
            await asyncio.sleep(0.01)
        store.waiting[0].set_result(None)  # one completes, the other never would
        t0 = asyncio.get_running_loop().time()
        await srv.shutdown()
        assert asyncio.get_running_loop().time() - t0 >= 0.25  # it waited for the GET in flight
        got = {}
        while (f := await c.recv()) is not None:
            got[f.request_id] = f
        assert got[1].status == 0 and got[1].body == b"v"
        assert got[2].status == errors.ServerShuttingDown.code
        assert not srv._eager and store.waiting[1].cancelled()
        await c.close()

    run(main())


def test_puts_run_without_a_task_in_decoding_order_and_shutdown_waits_for_them(sockdir):
    order = []

    class OrderStore(FakeStore):
        async def put(self, key, value, *, sync=False, verify=False):
            order.append((key, asyncio.current_task()))
            await super().put(key, value, sync=sync, verify=verify)

    async def main():
        store = OrderStore()
        store.gate = asyncio.Event()
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        c.send(*(P.encode_put(i, b"k%d" % i, b"v") for i in range(1, 9)))
        for _ in range(100):
            if store.started == 8:
                break
            await asyncio.sleep(0.01)
        assert order == [(b"k%d" % i, None) for i in range(1, 9)]  # started in order, no Task
        assert not srv._tasks and len(srv._eager) == 8
        stopping = asyncio.ensure_future(srv.shutdown())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waits for the PUTs in flight
        store.gate.set()
        await stopping
        got = []
        while (f := await c.recv()) is not None:
            got.append(f)
        assert sorted((f.request_id, f.status) for f in got) == [(i, 0) for i in range(1, 9)]
        assert set(store.data) == {b"k%d" % i for i in range(1, 9)} and not srv._eager
        await c.close()

    run(main())


def test_headers_of_large_bodies_cannot_make_the_server_allocate_past_its_receive_budget(sockdir, monkeypatch):
    # a large body's buffer is allocated when its header arrives; clients sending only headers
    # hold at most the server's receive budget, their bodies still arrive intact past it, and a
    # client that goes away mid-body gives its share back
    monkeypatch.setattr(S, "RECEIVE_BUDGET", 3 * (1 << 20))

    async def main():
        store = FakeStore()
        srv = await start(sockdir, store)
        assert srv._recv_budget.limit == 3 * (1 << 20)
        value = b"w" * (2 << 20)
        frames = [P.encode_put(1, b"k%d" % i, value) for i in range(4)]
        conns = [await Conn.open(srv.socket_path) for _ in range(4)]
        for c, f in zip(conns, frames):
            c.writer.write(f[:100])  # the header and a little of the body
            await c.writer.drain()
        await asyncio.sleep(0.1)
        assert 0 < srv._recv_budget.used <= srv._recv_budget.limit
        for c, f in zip(conns[:3], frames[:3]):
            c.writer.write(f[100:])
            await c.writer.drain()
        for c in conns[:3]:
            assert P.raise_for_status(await c.recv()).status == 0
        await conns[3].close()  # leaves mid-body
        await asyncio.sleep(0.1)
        assert srv._recv_budget.used == 0
        assert [store.data.get(b"k%d" % i) == value for i in range(4)] == [True, True, True, False]
        for c in conns[:3]:
            await c.close()
        await srv.shutdown()

    run(main())


class SinkValue:
    """Test stand-in for the store's LeasedValue: a bytearray filled in place."""

    def __init__(self, store, length):
        self.store, self.length = store, length
        self.buf = bytearray(length)
        self.received = 0
        self.released = False
        store.outstanding += 1

    def target(self):
        return memoryview(self.buf)[self.received :] if self.received < self.length else None

    def advance(self, n):
        assert 0 <= n <= self.length - self.received and not self.released
        self.received += n

    def write(self, data):
        k = min(len(data), self.length - self.received)
        self.buf[self.received : self.received + k] = data[:k]
        self.received += k
        return k

    def release(self):
        if not self.released:
            self.released = True
            self.store.outstanding -= 1


class LeasingStore(FakeStore):
    """FakeStore with the store's lease_value / put_leased pair (declines while ``decline``)."""

    def __init__(self):
        super().__init__()
        self.outstanding = 0
        self.leased = 0
        self.decline = False
        self.sinks: list[SinkValue] = []

    def lease_value(self, length):
        if self.decline:
            return None
        self.leased += 1
        self.sinks.append(SinkValue(self, length))
        return self.sinks[-1]

    async def put_leased(self, key, value, *, sync=False, verify=False):
        try:
            assert value.received == value.length
            await self.put(key, bytes(value.buf), sync=sync, verify=verify)
        finally:
            value.release()


async def until(cond, timeout: float = 1.0) -> None:
    """Poll ``cond()`` every 10 ms until it is true or ``timeout`` seconds passed (the
    caller's assertions say what was expected)."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_large_put_values_go_to_the_store_sink_and_every_sink_is_released(sockdir, loop_kind):
    """The server hands large PUT values to the store's lease_value sink (read in place on either
    loop); sinks of requests never started at shutdown and of a client gone mid-value are released."""

    async def main():
        store = LeasingStore()
        srv = await start(sockdir, store, max_in_flight_total=1)
        c = await Conn.open(srv.socket_path)
        v = os.urandom(300_000)
        assert (await c.call(P.encode_put(1, b"big", v, sync=True))).status == 0
        assert (await c.call(P.encode_get(2, b"big"))).body == v and store.leased == 1
        store.decline = True
        assert (await c.call(P.encode_put(3, b"declined", v))).status == 0  # received into a bytearray
        assert store.leased == 1 and store.data[b"declined"] == v
        store.decline = False
        gone = await Conn.open(srv.socket_path)
        frame = P.encode_put(4, b"gone", v)
        gone.send(frame[:200_000])
        await gone.writer.drain()
        await until(lambda: store.outstanding)
        assert store.outstanding == 1
        await gone.close()
        await until(lambda: not store.outstanding)
        assert store.outstanding == 0 and b"gone" not in store.data
        # a large PUT received whole while the daemon's in-flight limit (1) is taken by another
        # connection's put: it waits in the decoder with its sink, and shutdown answers and releases it
        a = await Conn.open(srv.socket_path)
        v = v[:70_000]  # the rest after the first 1000 bytes arrives in one socket read
        frame = P.encode_put(6, b"queued", v)
        a.send(frame[:1000])
        await a.writer.drain()
        await until(lambda: store.outstanding)
        store.gate = asyncio.Event()
        c.send(P.encode_put(5, b"held", b"h"))
        await until(lambda: store.active)
        a.send(frame[1000:])
        await until(lambda: store.sinks[-1].received == len(v))
        assert store.sinks[-1].received == len(v) and not store.sinks[-1].released and srv.in_flight == 1
        stop = asyncio.ensure_future(srv.shutdown())
        f = await a.recv()
        assert (f.request_id, f.status) == (6, errors.ServerShuttingDown.code)
        assert store.outstanding == 0 and b"queued" not in store.data
        store.gate.set()
        f = await c.recv()
        assert (f.request_id, f.status) == (5, 0)
        await stop
        await c.close()
        await a.close()

    run(main(), loop_kind)
