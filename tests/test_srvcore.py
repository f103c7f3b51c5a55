"""The server's request path in C (cython/_srvcore.pyx): small GET/PUT frames taken straight out
of a socket read, HAS and PING answered there, the decoder path for everything else, the C completion and metrics."""

from __future__ import annotations

import asyncio
import os
import time

import blake3

from ringblob import _srvcore
from ringblob import errors
from ringblob import protocol as P
from ringblob import server as S
from ringblob.metrics import Metrics
from ringblob.store import BlobStore

# the workdir fixture (a fresh directory under .test-tmp/) is tests/conftest.py's


async def _serve(workdir, **config):
    metrics = Metrics()
    store = await BlobStore.open(os.path.join(workdir, "d.data"), create_size=16 << 20, observer=metrics)
    srv = S.Server(store, S.ServerConfig(socket_path=os.path.join(workdir, "s.sock"), metrics_addr="",
                                         socket_activation=False, **config), metrics=metrics)
    await srv.start()
    r, w = await asyncio.open_unix_connection(srv.socket_path)
    return srv, store, r, w


async def _replies(r, n: int, dec: P.FrameDecoder | None = None) -> list[P.Frame]:
    dec = dec or P.FrameDecoder()
    got: list[P.Frame] = []
    while len(got) < n:
        f = dec.next_frame()
        if f is None:
            data = await asyncio.wait_for(r.read(1 << 20), 10)
            assert data, f"connection closed after {len(got)} of {n} replies"
            dec.feed(data)
            continue
        got.append(f)
    return got


def _record_parses(monkeypatch) -> list:
    """The request ids of the frames that go through ``parse_request`` (the decoder path) from now
    on; the C path takes the others without it."""
    parsed: list = []
    real_parse = P.parse_request

    def parse(frame):
        parsed.append(frame.request_id)
        return real_parse(frame)

    monkeypatch.setattr(P, "parse_request", parse)
    return parsed


def test_a_read_of_mixed_frames_is_answered_like_the_decoder_path(workdir, monkeypatch):
    """Fast frames, frames the decoder path takes (NEEDS_FLUSH, a bad digest, a flag GET does not define),
    and a frame split across reads: every reply, status and count as before."""
    v = os.urandom(4096)
    parsed = _record_parses(monkeypatch)
    digest = blake3.blake3(v).digest()

    async def main():
        srv, store, r, w = await _serve(workdir)
        try:
            first = b"".join([
                P.encode_put(1, b"a", v, sync=True),
                P.encode_put(2, digest, v, verify=True),
                P.encode_put(3, b"\x00" * 32, v, verify=True),  # digest mismatch: raised by put_nowait
                P.encode_frame(P.Op.NEEDS_FLUSH, 4, b""),  # not taken in C: the decoder path from here
                P.encode_put(5, b"b", b"xyz"),
            ])
            w.write(first)
            got = {f.request_id: f for f in await _replies(r, 5)}
            assert [got[i].status for i in (1, 2, 4, 5)] == [0, 0, 0, 0]
            assert got[3].status == errors.DigestMismatch.code
            assert bytes(got[4].body) in (b"\x00", b"\x01")
            second = b"".join([
                P.encode_get(6, b"a"),
                P.encode_get(7, b"missing"),
                P.encode_get(8, digest),
            ])
            tail = P.encode_get(10, b"b")
            w.write(second + tail[:7])  # the read ends inside a frame: the decoder keeps the tail
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(tail[7:] + P.encode_get(11, b"b")
                    + P.encode_frame(P.Op.GET, 9, b"\x01a", flags=P.FLAG_SYNC))  # flags GET does not define
            got = {f.request_id: f for f in await _replies(r, 6)}  # the bad flags close the connection
            assert bytes(got[6].body) == v and got[6].status == 0
            assert got[7].status == errors.NotFound.code
            assert bytes(got[8].body) == v
            assert bytes(got[10].body) == bytes(got[11].body) == b"xyz"
            assert got[9].status == errors.ProtocolError.code and b"flags" in bytes(got[9].body)
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed after the error reply
            assert 4 in parsed and 9 in parsed and 1 not in parsed  # the C path took what it could
            m = srv.metrics
            assert m.request_count("put", "ok") == 3 and m.request_count("get", "ok") == 4
            assert m.request_count("get", "not_found") == 1 and m.request_count("needs_flush", "ok") == 1
            assert m.requests_in_flight == 0 and srv.in_flight == 0 and not srv._eager
        finally:
            w.close()
            await srv.shutdown()

    asyncio.run(main())


def test_has_and_ping_are_answered_in_c_like_the_decoder_path(workdir, monkeypatch):
    """HAS of a well-formed key and PING are answered straight out of the read (no parse_request),
    with the replies and counts of _serve_inline; a HAS the C path does not take (flags it does not
    define, a key length that disagrees with the body) goes to the decoder path and its error."""
    parsed = _record_parses(monkeypatch)

    async def main():
        srv, store, r, w = await _serve(workdir)
        try:
            await store.put(b"here", b"v", sync=True)
            w.write(b"".join([
                P.encode_frame(P.Op.PING, 1, b""),
                P.encode_frame(P.Op.HAS, 2, b"\x04here"),
                P.encode_frame(P.Op.HAS, 3, b"\x07missing"),
                P.encode_frame(P.Op.PING, 4, b"echo me"),
                P.encode_put(5, b"k", b"x"),
                P.encode_frame(P.Op.HAS, 6, b"\x04here", flags=P.FLAG_SYNC),  # not taken in C
            ]))
            got = {f.request_id: f for f in await _replies(r, 6)}
            assert [got[i].status for i in (1, 2, 3, 4, 5)] == [0] * 5
            assert bytes(got[1].body) == b"" and bytes(got[4].body) == b"echo me"
            assert bytes(got[2].body) == b"\x01" and bytes(got[3].body) == b"\x00"
            assert got[6].status == errors.ProtocolError.code and b"flags" in bytes(got[6].body)
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed after the protocol error
            assert parsed == [6]  # only the one with flags went through parse_request
            m = srv.metrics
            assert m.request_count("ping", "ok") == 2 and m.request_count("has", "ok") == 2
            r2, w2 = await asyncio.open_unix_connection(srv.socket_path)
            w2.write(P.encode_frame(P.Op.HAS, 7, b"\x09short"))  # key length 9, 5 bytes follow
            (f,) = await _replies(r2, 1)
            assert f.status == errors.ProtocolError.code and 7 in parsed
            w2.close()
        finally:
            w.close()
            await srv.shutdown()

    asyncio.run(main())


def test_fast_frames_stop_at_the_in_flight_limit_and_go_on_when_answered(workdir):
    v = os.urandom(4096)

    async def main():
        srv, store, r, w = await _serve(workdir, max_in_flight_per_conn=2)
        try:
            await store.put(b"k", v)
            n = 64
            w.write(b"".join(P.encode_get(100 + i, b"k") for i in range(n))
                    + b"".join(P.encode_put(200 + i, b"p%d" % i, v, sync=True) for i in range(n)))
            got = await _replies(r, 2 * n)
            assert sorted(f.request_id for f in got) == [*range(100, 100 + n), *range(200, 200 + n)]
            assert all(f.status == 0 for f in got)
            assert all(bytes(f.body) == v for f in got if f.request_id < 200)
            (conn,) = srv.connections
            assert conn.in_flight == 0 and conn.reply_reserved == 0 and conn.recv_held == 0
            assert srv._recv_total == 0 and not srv._eager
            assert await store.get(b"p63") == v
        finally:
            w.close()
            await srv.shutdown()

    asyncio.run(main())


def test_observe_in_c_counts_as_metrics_observe_request():
    a, b = Metrics(), Metrics()
    core = _srvcore.ServerCore()
    core.metrics = a
    samples = [0.0, 1e-9, 0.00005, 0.0000500001, 0.0001, 0.003, 1.0, 10.0, 99.0]
    for s in samples:
        core._observe_request(int(P.Op.GET), 0, s)
        b.observe_request("get", 0, s)
    core._observe_request(int(P.Op.GET), errors.NotFound.code, 0.001)  # an error status: the Python method
    b.observe_request("get", errors.NotFound.code, 0.001)
    core._observe_request(int(P.Op.PUT), 0, 0.002)
    b.observe_request("put", 0, 0.002)
    assert a._req_counts == b._req_counts
    assert a._durations == b._durations


def test_the_c_clock_is_perf_counter():
    # request latencies mix t0 taken in Python (time.perf_counter) and C (_srvcore.perf_counter)
    t = time.perf_counter()
    c = _srvcore.perf_counter()
    t2 = time.perf_counter()
    assert t <= c <= t2


def test_the_decoder_fields_the_c_path_reads_mean_what_it_assumes():
    """_srvcore takes frames out of a read only while the decoder is idle, judged from its fields:
    idle <=> nothing buffered, and no large frame under way => no recv_target; a large PUT whose
    value completed in its sink is _big_head / _pre_body (key_len + key), taken by _finish_big()."""
    budget = P.ReceiveBudget(1 << 20)
    leased = []

    class Sink:
        def __init__(self, n):
            self.buf, self.fill = bytearray(n), 0
            leased.append(self)

        def target(self):
            return memoryview(self.buf)[self.fill:] if self.fill < len(self.buf) else None

        def advance(self, n):
            self.fill += n

        def write(self, data):
            self.buf[self.fill:self.fill + len(data)] = data
            self.fill += len(data)
            return len(data)

        def release(self):
            pass

    dec = P.FrameDecoder(view_bodies=True, budget=budget, value_sink=Sink)
    big = os.urandom(P.LARGE_BODY + 100)
    stream = b"".join([P.encode_get(1, b"k"), P.encode_put(2, b"big", big), P.encode_frame(P.Op.PING, 3, big),
                       P.encode_put(4, b"s", b"x"), P.encode_get(5, b"k")])

    def check():
        idle = len(dec._buf) == dec._pos and dec._big_len is None and dec._error is None
        assert idle == (dec.buffered == 0), (dec.buffered, dec._big_len)
        if dec._big_len is None:
            assert dec.recv_target() is None

    ids = []
    pos = 0
    for step in (7, 20, 1000, 30000, 70000, 50, 5, 100000, 200000):
        while True:
            check()
            t = dec.recv_target()
            if t is not None:
                n = min(len(t), step, len(stream) - pos)
                t[:n] = stream[pos:pos + n]
                pos += n
                dec.received_in_place(n)
            else:
                dec.feed(stream[pos:pos + step])
                pos += step
            check()
            if dec._sink is not None and dec._big_fill == dec._big_len:
                # what ConnCore._big_put_c reads, and calls to take the frame, when a value completes
                head, pre, sink = dec._big_head, dec._pre_body, dec._sink
                f = dec._finish_big()
                assert (f.opcode, f.flags, f.request_id) == head == (int(P.Op.PUT), 0, 2)
                assert f.body == pre == b"\x03big" and f.sink is sink and bytes(sink.buf) == big
                assert dec._big_len is None and dec._sink is None
                ids.append(f.request_id)
                check()
            while (f := dec.next_frame()) is not None:
                ids.append(f.request_id)
                check()
            if pos >= len(stream) or step < 1000:
                break
        if pos >= len(stream):
            break
    assert ids == [1, 2, 3, 4, 5] and dec.buffered == 0 and leased


def test_a_completed_large_put_is_started_in_c_and_answered_like_the_decoder_path(workdir, monkeypatch):
    """A large PUT whose value completes in its sink goes to put_leased_nowait from C (no
    parse_request, no _pump: ConnCore._big_put_c, and the head's _pump_idle_c); a verify mismatch
    raised there, a store that declines (the put_leased coroutine takes it) and an empty key (the
    decoder path: the store's InvalidKey) are answered as before, and the in-flight and
    max_receive_bytes accounting ends at zero."""
    parsed = _record_parses(monkeypatch)
    pumps = []
    real_pump = S._Connection._pump

    def pump(self):
        pumps.append(1)
        return real_pump(self)

    monkeypatch.setattr(S._Connection, "_pump", pump)

    async def main():
        srv, store, r, w = await _serve(workdir)
        try:
            bsz = store._aio.buffer_size
            v = os.urandom(3 * bsz + 777)
            digest = blake3.blake3(v).digest()
            for rid, frame in ((1, P.encode_put(1, b"big1", v, sync=True)),
                               (2, P.encode_put(2, digest, v, verify=True)),
                               (3, P.encode_put(3, b"\x00" * 32, v, verify=True))):
                w.write(frame)
                (got,) = await _replies(r, 1)
                assert got.request_id == rid
            assert got.status == errors.DigestMismatch.code and b"digest" in bytes(got.body)
            assert parsed == [] and pumps == []  # every one taken in C
            assert await store.get(b"big1") == v and await store.get(digest) == v
            assert not store.has(b"\x00" * 32)

            declined = []
            real_nowait = srv._put_leased_nowait

            def decline(key, value, done, *args, **kw):
                declined.append(key)
                return False

            srv._put_leased_nowait = decline
            try:
                w.write(P.encode_put(4, b"big4", v))
                (got,) = await _replies(r, 1)
            finally:
                srv._put_leased_nowait = real_nowait
            assert got.request_id == 4 and got.status == 0 and declined == [b"big4"]
            assert await store.get(b"big4") == v

            # an empty key: the sink is leased for it, the decoder path answers (InvalidKey)
            w.write(P.encode_frame(P.Op.PUT, 5, b"\x00" + v))
            (got,) = await _replies(r, 1)
            assert got.request_id == 5 and got.status == errors.InvalidKey.code
            assert 5 in parsed and pumps
            m = srv.metrics
            assert m.request_count("put", "ok") == 3
            (conn,) = srv.connections
            assert conn.in_flight == 0 and srv.in_flight == 0 and m.requests_in_flight == 0
            assert conn.recv_held == 0 and srv._recv_total == 0 and not srv._eager
            for _ in range(100):
                if store.stat()["receive_buffers_held"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert store.stat()["receive_buffers_held"] == 0
        finally:
            w.close()
            await srv.shutdown()

    asyncio.run(main())


def test_a_large_value_in_reads_of_any_size_is_received_in_place_and_accounted(workdir):
    """The C path for reads into a large PUT's value sink (ConnCore.get_buffer / buffer_updated),
    driven as the event loop does: reads of 1 byte to a whole buffer, ending on and across the
    256 KiB buffer ends, land in the leased buffers; after each one the connection's recv_held
    is the decoder's buffered and the server's _recv_total their sum; the value round-trips. A
    client that goes away mid-value gives every buffer back."""

    async def main():
        srv, store, r, w = await _serve(workdir)
        try:
            await asyncio.sleep(0.05)
            (conn,) = srv.connections
            free0 = store._aio.engine.free_buffers
            bsz = store._aio.buffer_size
            v = os.urandom(4 * bsz + 12345)
            stream = P.encode_put(7, b"big", v)
            pos = 0
            steps = [20, 1, 3, 1, 4096, bsz - 4096 - 1, 1, 2, bsz, 100_003, 7, bsz, bsz, 1 << 20]
            in_place = 0
            while pos < len(stream):
                buf = conn.get_buffer(-1)
                k = min(len(buf), steps[0] if steps else 1 << 20, len(stream) - pos)
                if steps:
                    steps.pop(0)
                buf[:k] = stream[pos : pos + k]
                held = conn.decoder._sink is not None
                in_place += held
                conn.buffer_updated(k)
                pos += k
                assert conn.recv_held == conn.decoder.buffered and srv._recv_total == conn.recv_held
                if held and pos < 20 + 4 + len(v):
                    assert store.stat()["receive_buffers_held"] == 5
            assert in_place >= 10  # (the 1 MiB + 12345 value took 11 reads)
            (put,) = await _replies(r, 1)
            assert put.request_id == 7 and put.status == 0
            assert store.stat()["values_leased"] == 1 and await store.get(b"big") == v

            # cut off mid-value: the buffers go back
            for _ in range(50):
                await asyncio.sleep(0.01)
                if store._aio.engine.free_buffers == free0:
                    break
            assert store._aio.engine.free_buffers == free0
            part = P.encode_put(9, b"cut", os.urandom(3 * bsz))[: 20 + 4 + bsz + 100]
            pos = 0
            while pos < len(part):
                buf = conn.get_buffer(-1)
                k = min(len(buf), 50_000, len(part) - pos)
                buf[:k] = part[pos : pos + k]
                conn.buffer_updated(k)
                pos += k
            assert conn.decoder._sink is not None and store.stat()["receive_buffers_held"] == 3
            assert srv._recv_total == conn.recv_held == len(part)
            w.close()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if conn.closed:
                    break
            assert conn.closed and srv._recv_total == 0
            assert store.stat()["receive_buffers_held"] == 0 and store._aio.engine.free_buffers == free0
            assert not store.has(b"cut")
        finally:
            w.close()
            await srv.shutdown()

    asyncio.run(main())
