"""Hand-written bad input against a real ``ringblob serve`` (the bad-input suite, issue #6).

Each case sends something a well-behaved client never would and checks that
it gets a clear error status (a frame with a non-empty UTF-8 message) or a
closed connection, that the daemon keeps serving other clients (a canary
connection opened before the case is answered after it) and that nothing of
theirs is lost (the canary's keys verify after every case).

H4's tests/test_server_e2e.py already covers: an HTTP request as bad magic, one
oversized header with a body behind it, one malformed body after a valid
request, one truncated PUT, and ``--max-connections 2``. This file extends
that: every kind of header damage, every cut point, the empty and the 256-byte
key on every opcode, batch counts larger than their body, garbage between valid
frames, clients that never read their replies (GET, PING, STAT), an MGET reply
too large for a frame, 2000 idle connections, the idle timeout, a soft fd limit
below max_connections and a daemon out of file descriptors. The reply memory of
a non-reading client and of an MGET naming a big value many times stays bounded
(the per-connection reply-byte budget; MGET replies over max_frame_size are refused).
The random version of all this is tests/fuzzwire.py.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import threading
import time

import pytest

from fuzzwire import Raw, ServeDaemon, make_workdir, raise_nofile
from ringblob import errors
from ringblob import protocol as P

PE = errors.ProtocolError.code
TOO_LARGE = errors.FrameTooLarge.code


class Canary:
    """A client that keeps a few keys and checks the daemon still serves them exactly."""

    def __init__(self, d: ServeDaemon):
        self.d = d
        self.c = Raw(d.sock, timeout=10)
        self.vals: dict[bytes, bytes] = {}
        self.rid = 0

    def _id(self) -> int:
        self.rid += 1
        return self.rid

    def round(self) -> None:
        """Put a new key (sync), read every key back, ping."""
        assert self.d.alive(), self.d.output()[-3000:]
        key = b"canary/%04d" % len(self.vals)
        val = os.urandom(100 + 37 * len(self.vals))
        self.c.ok(P.encode_put(self._id(), key, val, sync=True))
        self.vals[key] = val
        for k, v in self.vals.items():
            assert self.c.ok(P.encode_get(self._id(), k)) == v, k
        assert self.c.ok(P.encode_ping(self._id(), b"alive")) == b"alive"

    def close(self) -> None:
        self.c.close()


@pytest.fixture(scope="module")
def shared():
    """One daemon for the cases that need no special settings (default max_frame_size etc.)."""
    wd = make_workdir("badinput")
    d = ServeDaemon(wd, size=str(64 << 20)).start()
    canary = Canary(d)
    canary.round()
    yield d, canary
    canary.round()
    canary.close()
    assert d.stop() == 0
    shutil.rmtree(wd, ignore_errors=True)


@pytest.fixture
def daemon(shared):
    """The shared daemon; the canary must be served before and after the case."""
    d, canary = shared
    canary.round()
    yield d
    assert d.alive(), d.output()[-3000:]
    canary.round()


@pytest.fixture
def own():
    """Start daemons with special settings; they are killed and removed after the test."""
    started: list[tuple[ServeDaemon, str]] = []

    def start(*args: str, **kw) -> ServeDaemon:
        wd = make_workdir("badinput")
        d = ServeDaemon(wd, *args, size=str(kw.pop("size", 32 << 20)), **kw).start()
        started.append((d, wd))
        return d

    yield start
    for d, wd in started:
        d.kill()
        shutil.rmtree(wd, ignore_errors=True)


def error_then_close(c: Raw, status: int, request_id: int | None = None, opcode: int | None = None) -> P.Frame:
    """The next frame is an error with ``status`` (a clear UTF-8 message), then the daemon closes."""
    f = c.recv()
    assert f is not None, "closed without an error frame"
    assert f.status == status, (f.status, f.body)
    assert f.body.decode("utf-8").strip(), "error frame without a message"
    if request_id is not None:
        assert f.request_id == request_id
    if opcode is not None:
        assert f.opcode == opcode
    assert c.recv() is None, "the connection stayed open after a malformed frame"
    return f


def read_until_close(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            return out
        out += chunk
    return out


def header(op: int, rid: int, length: int, flags: int = 0, version: int = P.VERSION, magic: bytes = P.MAGIC) -> bytes:
    return P.HEADER.pack(magic, version, op, flags, rid, length)


# -- header damage -------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"RBX",  # three bytes: refused before a whole header arrives
    b"\x00" * 20,
    b"RBLC" + P.encode_get(1, b"k")[4:],
    b"rblb" + P.encode_get(1, b"k")[4:],
    b"\xff",
])
def test_wrong_magic_is_refused_at_once_even_with_the_connection_left_open(daemon, garbage):
    c = Raw(daemon.sock, timeout=10)
    c.send(garbage)  # no half-close: the daemon must answer and close by itself
    error_then_close(c, PE, 0, 0)
    c.close()


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_answered_in_version_1_with_the_request_id(daemon, version):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.sock)
    frame = bytearray(P.encode_get(4242, b"key"))
    frame[4] = version
    s.sendall(frame)
    raw = read_until_close(s)
    s.close()
    assert raw[:4] == P.MAGIC and raw[4] == P.VERSION  # the server's own version: the client learns what to speak
    dec = P.FrameDecoder()
    dec.feed(raw)
    f = dec.next_frame()
    assert (f.status, f.request_id, f.opcode) == (PE, 4242, P.Op.GET)
    assert f"version {version}" in f.body.decode() and dec.next_frame() is None


@pytest.mark.parametrize("op", [0, 12, 13, 100, 255])
def test_unknown_opcode_after_a_valid_request(daemon, op):
    c = Raw(daemon.sock, timeout=10)
    c.send(P.encode_put(1, b"before-op%d" % op, b"ok"), P.encode_frame(op, 77, b"abc"))
    frames = {f.request_id: f for f in (c.recv(), c.recv())}
    assert frames[1].status == 0
    f = frames[77]
    assert (f.status, f.opcode) == (PE, op) and "unknown opcode" in f.body.decode()
    assert c.recv() is None
    c.close()


@pytest.mark.parametrize("op,flags", [(P.Op.GET, 1), (P.Op.PUT, 4), (P.Op.PING, 0x8000), (P.Op.MPUT, 2)])
def test_undefined_flag_bits(daemon, op, flags):
    c = Raw(daemon.sock, timeout=10)
    body = {P.Op.GET: b"\x01k", P.Op.PUT: b"\x01kv", P.Op.PING: b"", P.Op.MPUT: b"\x00\x00\x00\x00"}[op]
    c.send(P.encode_frame(op, 9, body, flags))
    f = error_then_close(c, PE, 9, op)
    assert "flags" in f.body.decode()
    c.close()


# -- lengths ---------------------------------------------------------------------------------------


def test_length_larger_than_the_frame_then_half_close(daemon):
    """The header promises 100 body bytes, 2 arrive, the client half-closes: no reply, a close."""
    c = Raw(daemon.sock, timeout=10)
    c.send(header(P.Op.GET, 5, 100) + b"\x01k")
    c.s.shutdown(socket.SHUT_WR)
    assert c.recv() is None
    c.close()


def test_length_larger_than_the_frame_swallows_the_next_frame(daemon):
    """A GET whose length covers the PUT behind it: the body has trailing bytes; the PUT never runs."""
    put = P.encode_put(6, b"swallowed", b"x")
    get_body = b"\x01k"
    c = Raw(daemon.sock, timeout=10)
    c.send(header(P.Op.GET, 5, len(get_body) + len(put)) + get_body + put)
    f = error_then_close(c, PE, 5, P.Op.GET)
    assert "unexpected bytes" in f.body.decode()
    c.close()
    probe = Raw(daemon.sock)
    assert not P.decode_bool_reply(probe.ok(P.encode_has(1, b"swallowed")))
    probe.close()


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_shorter_than_the_body(daemon, length):
    """The key length byte says 5 but the frame ends first."""
    c = Raw(daemon.sock, timeout=10)
    body = b"\x05hello"
    c.send(header(P.Op.GET, 8, length) + body[:length] + body[length:])
    f = error_then_close(c, PE, 8, P.Op.GET)
    assert "ends inside" in f.body.decode()
    c.close()


def test_huge_declared_lengths_are_refused_from_the_header_without_allocating(daemon):
    """100 connections each announce a 4 GiB - 1 body (and other sizes over the limit) and send none of it."""
    rss0 = daemon.rss()
    lengths = [0xFFFFFFFF, 0x80000000, P.DEFAULT_MAX_FRAME_SIZE - P.HEADER_SIZE + 1, 0xFFFFFFFF - P.HEADER_SIZE]
    conns = []
    for i in range(100):
        c = Raw(daemon.sock, timeout=10)
        c.send(header(P.Op.PUT, 1000 + i, lengths[i % len(lengths)]))
        conns.append(c)
    for i, c in enumerate(conns):
        f = error_then_close(c, TOO_LARGE, 1000 + i, P.Op.PUT)
        assert "maximum frame size" in f.body.decode()
        c.close()
    assert daemon.rss() - rss0 < 16 << 20  # not one 4 GiB (or 72 MiB) buffer was made


def test_a_frame_exactly_at_the_limit_is_read_not_refused(daemon):
    """body_length = max_frame_size - 20 is legal: the daemon waits for the body (only what arrives is held)."""
    c = Raw(daemon.sock, timeout=0.5)
    c.send(header(P.Op.PING, 3, P.DEFAULT_MAX_FRAME_SIZE - P.HEADER_SIZE) + b"p" * 65536)
    with pytest.raises(socket.timeout):
        c.recv()  # no error: the frame is within the limit
    c.close()


@pytest.mark.parametrize("op,body", [
    (P.Op.MPUT, (0xFFFFFFFF).to_bytes(4, "little") + b"\x01k\x00\x00\x00\x00"),
    (P.Op.MGET, (0xFFFFFFFF).to_bytes(4, "little") + b"\x01k"),
    (P.Op.MPUT, (1).to_bytes(4, "little") + b"\x01k" + (0xFFFFFFFF).to_bytes(4, "little") + b"tiny"),
    (P.Op.MGET, (3).to_bytes(4, "little") + b"\x01a\x01b"),
    (P.Op.LIST, b"\x00\x00\x01"),  # limit cut short
])
def test_batch_counts_and_inner_lengths_larger_than_the_body(daemon, op, body):
    """Counts of 4 G items or a 4 GiB value inside a small body: refused from the body's size, no allocation."""
    rss0 = daemon.rss()
    c = Raw(daemon.sock, timeout=10)
    c.send(P.encode_frame(op, 31, body))
    f = error_then_close(c, PE, 31, op)
    assert "does not fit" in f.body.decode() or "ends inside" in f.body.decode()
    c.close()
    assert daemon.rss() - rss0 < 16 << 20


# -- keys -----------------------------------------------------------------------------------------


def test_zero_length_keys_get_invalid_key_and_the_connection_stays_open(daemon):
    c = Raw(daemon.sock, timeout=10)
    for rid, (op, body, flags) in enumerate([
        (P.Op.PUT, b"\x00value", 0),
        (P.Op.PUT, b"\x00value", P.FLAG_SYNC | P.FLAG_VERIFY),
        (P.Op.GET, b"\x00", 0),
        (P.Op.HAS, b"\x00", 0),
        (P.Op.DELETE, b"\x00", P.FLAG_SYNC),
    ], start=1):
        f = c.call(P.encode_frame(op, rid, body, flags))
        assert (f.request_id, f.status) == (rid, errors.InvalidKey.code), (op, f)
        assert "1 to 255 bytes" in f.body.decode()
    # MPUT with one empty key among good ones: InvalidKey, and none of them is stored
    mput = (3).to_bytes(4, "little") + b"".join(
        bytes([len(k)]) + k + len(v).to_bytes(4, "little") + v for k, v in [(b"m1", b"a"), (b"", b"b"), (b"m3", b"c")])
    f = c.call(P.encode_frame(P.Op.MPUT, 20, mput, P.FLAG_SYNC))
    assert f.status == errors.InvalidKey.code
    res = P.decode_mget_reply(c.ok(P.encode_mget(21, [b"m1", b"m3"])))
    assert len(res) == 2 and all(isinstance(r, errors.NotFound) for r in res)
    # MGET with an empty key: that item is InvalidKey, the others are answered
    c.ok(P.encode_put(22, b"present", b"P", sync=True))
    body = (3).to_bytes(4, "little") + b"\x07present" + b"\x00" + b"\x04gone"
    res = P.decode_mget_reply(c.ok(P.encode_frame(P.Op.MGET, 23, body)))
    assert res[0] == b"P" and isinstance(res[1], errors.InvalidKey) and isinstance(res[2], errors.NotFound)
    # LIST with an empty prefix and start_after is legal
    keys, _ = P.decode_list_reply(c.ok(P.encode_list(24, b"", None, 0)))
    assert b"present" in keys and b"" not in keys
    assert c.ok(P.encode_ping(25, b"still open")) == b"still open"
    c.close()


def test_keys_at_and_over_the_255_byte_limit(daemon):
    c = Raw(daemon.sock, timeout=10)
    k255 = bytes(range(255))
    c.ok(P.encode_put(1, k255, b"longest key", sync=True))
    assert c.ok(P.encode_get(2, k255)) == b"longest key"
    assert k255 in P.decode_list_reply(c.ok(P.encode_list(3, k255[:200])))[0]
    # the client codec refuses a 256-byte key before anything is sent
    for enc in (lambda: P.encode_get(4, k255 + b"x"), lambda: P.encode_put(4, k255 + b"x", b""),
                lambda: P.encode_list(4, k255 + b"x")):
        with pytest.raises(errors.InvalidKey, match="255"):
            enc()
    # a raw 256-byte key: its length byte wraps to 0
    k256 = k255 + b"\xff"
    # PUT: key_len 0 -> the empty key (the 256 bytes become the value): InvalidKey, nothing stored
    f = c.call(P.encode_frame(P.Op.PUT, 5, b"\x00" + k256))
    assert f.status == errors.InvalidKey.code
    # key_len 255 followed by 256 bytes on a GET: one byte too many -> malformed, closed
    c.send(P.encode_frame(P.Op.GET, 6, b"\xff" + k256))
    f = error_then_close(c, PE, 6, P.Op.GET)
    assert "unexpected bytes" in f.body.decode()
    c.close()
    # key_len 255 with only 254 key bytes: truncated -> malformed, closed
    c = Raw(daemon.sock, timeout=10)
    c.send(P.encode_frame(P.Op.HAS, 7, b"\xff" + k255[:254]))
    f = error_then_close(c, PE, 7, P.Op.HAS)
    assert "ends inside key" in f.body.decode()
    c.close()


# -- truncation and garbage -----------------------------------------------------------------------------


def test_every_cut_point_of_a_sync_put_then_close(daemon):
    """A PUT cut after each of its bytes, then a close (half or full): no reply, nothing stored."""
    frame = P.encode_put(11, b"torn-put", bytes(range(256)) * 2, sync=True)
    for cut in range(1, len(frame)):
        c = Raw(daemon.sock, timeout=10)
        c.send(frame[:cut])
        if cut % 2:
            c.s.shutdown(socket.SHUT_WR)
            assert c.recv() is None, cut  # answered nothing, closed
        c.close()
    probe = Raw(daemon.sock)
    assert not P.decode_bool_reply(probe.ok(P.encode_has(1, b"torn-put")))
    st = P.decode_stat_reply(probe.ok(P.encode_stat(2)))
    assert st["server"]["in_flight"] == 0
    probe.close()


@pytest.mark.parametrize("garbage", [
    b"\x00",
    b"RBLB\x02" + b"\x00" * 15,  # a header in another version
    bytes(range(37)),
    b"RBLB",  # the magic alone, then a valid frame: the frame's bytes become a bad header
])
def test_garbage_between_valid_frames(daemon, garbage):
    """Valid, valid, garbage, valid: the first two are answered, then one error frame and the close;
    the frame after the garbage never runs."""
    c = Raw(daemon.sock, timeout=10)
    c.ok(P.encode_put(1, b"g/before", b"B", sync=True))
    c.send(P.encode_put(2, b"g/first", b"1"), P.encode_get(3, b"g/before"), garbage,
           P.encode_put(4, b"g/after", b"A", sync=True))
    frames = []
    while (f := c.recv()) is not None:
        frames.append(f)
    ok = {f.request_id: f for f in frames if f.status == 0}
    bad = [f for f in frames if f.status != 0]
    assert set(ok) == {2, 3} and ok[3].body == b"B"
    assert len(bad) == 1 and bad[0].status == PE and bad[0].body.decode().strip()
    c.close()
    probe = Raw(daemon.sock)
    assert probe.ok(P.encode_get(1, b"g/first")) == b"1"
    assert not P.decode_bool_reply(probe.ok(P.encode_has(2, b"g/after")))
    probe.ok(P.encode_delete(3, b"g/first"))
    probe.close()


def test_garbage_before_any_frame_runs_nothing(daemon):
    c = Raw(daemon.sock, timeout=10)
    c.send(b"\r\n" + P.encode_put(1, b"never", b"x", sync=True))
    error_then_close(c, PE, 0, 0)
    c.close()
    probe = Raw(daemon.sock)
    assert not P.decode_bool_reply(probe.ok(P.encode_has(1, b"never")))
    probe.close()


# -- a client that never reads its replies ----------------------------------------------------------------


def _never_reading_client(d: ServeDaemon, value_size: int, gets: int = 200_000):
    """Store one value, then send ``gets`` GETs of it without reading a reply. Returns measurements."""
    setup = Raw(d.sock)
    setup.ok(P.encode_put(1, b"big", os.urandom(value_size), sync=True))
    setup.close()
    canary = Canary(d)
    canary.round()
    m0 = d.scrape()
    rss0 = d.rss()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.sock)
    s.settimeout(1)
    frames = b"".join(P.encode_get(i + 1, b"big") for i in range(gets))
    sent = 0
    try:
        while sent < len(frames):
            sent += s.send(frames[sent: sent + 65536])
    except socket.timeout:
        pass  # the daemon stopped reading: our send blocks
    time.sleep(1.0)
    peak = d.rss()
    canary.round()  # other clients are served while this one is stuck
    m1 = d.scrape()
    received = m1[("ringblob_received_bytes_total", ())] - m0[("ringblob_received_bytes_total", ())]
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = P.decode_stat_reply(canary.c.ok(P.encode_stat(canary._id())))
        if st["server"]["connections"] == 1 and st["server"]["in_flight"] == 0:
            break
        time.sleep(0.1)
    canary.round()
    canary.close()
    return {"sent": sent, "total": len(frames), "received": received, "growth": peak - rss0, "stat": st}


def test_a_client_that_never_reads_is_throttled_not_buffered(own):
    """GETs of a 64 KiB value, never read: the daemon stops reading that client; memory stays bounded
    (by the connection's reply-byte budget and the write high-water mark); others are served."""
    d = own()
    r = _never_reading_client(d, 64 << 10)
    assert r["sent"] < r["total"], "the daemon read everything: no backpressure"
    assert r["received"] < 2 << 20, r  # it read ~a socket buffer's worth, not 4.8 MB of GETs
    assert r["growth"] < 256 * (64 << 10) + (4 << 20) + (32 << 20), r
    assert r["stat"]["server"] == {**r["stat"]["server"], "connections": 1, "in_flight": 0}
    assert d.stop() == 0


def test_never_read_ping_and_stat_replies_are_throttled(own):
    """PING and STAT are answered inline (no in-flight slot): a client flooding them without reading must
    still be stopped by the write high-water mark, with the daemon's memory bounded."""
    d = own()
    canary = Canary(d)
    canary.round()
    rss0 = d.rss()
    flood = []
    for frames in ([P.encode_ping(i + 1, os.urandom(1 << 20)) for i in range(300)], [P.encode_stat(7) * 1000] * 200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.sock)
        s.settimeout(1)
        n = 0
        try:
            for fr in frames:
                s.sendall(fr)
                n += 1
        except socket.timeout:
            pass
        assert n < len(frames), "the daemon read the whole flood: no backpressure"
        flood.append(s)
    time.sleep(0.5)
    assert d.rss() - rss0 < 48 << 20
    canary.round()
    for s in flood:
        s.close()
    canary.round()
    canary.close()
    assert d.stop() == 0


def test_a_client_that_never_reads_costs_about_the_write_high_water_mark(own):
    d = own(size=64 << 20)
    r = _never_reading_client(d, 1 << 20, gets=100_000)
    assert r["sent"] < r["total"] and r["stat"]["server"]["in_flight"] == 0
    assert r["growth"] < (4 << 20) + (32 << 20), f"VmRSS grew {r['growth'] >> 20} MiB for one non-reading client"


# -- many connections --------------------------------------------------------------------------------------


def _open(path: str, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)  # blocking: waits while the listen backlog is full
        socks.append(s)
    return socks


def _outcomes(socks: list[socket.socket], wait: float, settle: float = 3.0) -> tuple[int, int, int]:
    """(Busy frames, closes, still open): sockets are watched until all closed, or nothing happened
    for ``settle`` seconds, or ``wait`` seconds passed."""
    busy = closed = 0
    pending = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + wait
    last_event = time.monotonic()
    bufs: dict[int, bytes] = {}
    while pending and time.monotonic() < deadline and time.monotonic() - last_event < settle:
        po = select.poll()
        for fd in pending:
            po.register(fd, select.POLLIN)
        for fd, _ev in po.poll(200):
            last_event = time.monotonic()
            s = pending[fd]
            try:
                data = s.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if data:
                bufs[fd] = bufs.get(fd, b"") + data
                continue
            closed += 1
            del pending[fd]
            raw = bufs.get(fd, b"")
            if raw:
                dec = P.FrameDecoder()
                dec.feed(raw)
                f = dec.next_frame()
                assert f is not None and (f.opcode, f.request_id, f.status) == (0, 0, errors.Busy.code), raw[:100]
                assert "max_connections" in f.body.decode()
                busy += 1
        if not pending:
            break
    return busy, closed, len(pending)


def test_2000_idle_connections_busy_beyond_max_connections(own):
    n = 2000
    have = raise_nofile(n + 256)
    n = min(n, have - 128)
    d = own("--max-connections", "1024", "--idle-timeout", "0")
    canary = Canary(d)
    canary.round()
    rss0, fds0 = d.rss(), d.fds()
    socks = _open(d.sock, n)
    try:
        busy, closed, still = _outcomes(socks, wait=30)
        assert still == min(n, 1023)  # 1024 minus the canary stay open, idle
        assert busy == closed == n - still  # every excess connection: one Busy frame, then the close
        canary.round()  # the daemon answers while holding 1024 connections
        st = P.decode_stat_reply(canary.c.ok(P.encode_stat(canary._id())))
        assert st["server"]["connections"] == min(n, 1023) + 1
        assert d.rss() - rss0 < 64 << 20
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while d.fds() > fds0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.fds() <= fds0  # every connection's fd is released
    canary.round()
    assert P.decode_stat_reply(canary.c.ok(P.encode_stat(canary._id())))["server"]["connections"] == 1
    m = d.scrape()
    assert m.get(("ringblob_connections_rejected_total", (("reason", "busy"),)), 0) == max(0, n - 1023)
    canary.close()
    assert d.stop() == 0


def test_idle_timeout_closes_idle_and_half_sent_connections(own):
    raise_nofile(600)
    d = own("--idle-timeout", "1")
    socks = _open(d.sock, 300)
    for s in socks[::3]:
        s.sendall(P.encode_put(1, b"half", b"x" * 100)[:30])  # a frame begun and never finished
    t0 = time.monotonic()
    busy, closed, still = _outcomes(socks, wait=10)
    assert (busy, closed, still) == (0, 300, 0)  # closed without a frame
    assert time.monotonic() - t0 < 8
    for s in socks:
        s.close()
    c = Raw(d.sock)
    assert c.ok(P.encode_ping(1, b"fresh")) == b"fresh"
    assert not P.decode_bool_reply(c.ok(P.encode_has(2, b"half")))
    assert P.decode_stat_reply(c.ok(P.encode_stat(3)))["server"]["connections"] == 1
    c.close()
    assert d.stop() == 0


def test_a_low_soft_fd_limit_is_raised_to_cover_max_connections(own):
    """Started with RLIMIT_NOFILE soft 160 (hard limit higher) and max_connections 300: the daemon raises its
    soft limit, so connection 301 gets Busy instead of an EMFILE from accept(2) (uvloop: closed without a
    word; the asyncio loop: left waiting in the backlog)."""
    raise_nofile(800)
    d = own("--max-connections", "300", "--idle-timeout", "0", nofile=160)
    canary = Canary(d)
    canary.round()
    socks = _open(d.sock, 400)
    try:
        busy, closed, still = _outcomes(socks, wait=20)
        assert (busy, closed, still) == (101, 101, 299)
        canary.round()
    finally:
        for s in socks:
            s.close()
    canary.close()
    assert d.stop() == 0


def test_daemon_out_of_file_descriptors_keeps_serving(own):
    """RLIMIT_NOFILE soft = hard = 160 but max_connections 1024: accept(2) fails with EMFILE. The daemon keeps
    serving the connections it has (the ones it cannot take are closed by uvloop, or wait in the backlog
    with the asyncio loop), logs it, and takes new connections once descriptors are free again."""
    raise_nofile(800)
    d = own("--max-connections", "1024", "--idle-timeout", "0", nofile=(160, 160))
    canary = Canary(d)
    canary.round()
    socks = _open(d.sock, 400)
    try:
        busy, closed, still = _outcomes(socks, wait=10)
        assert busy == 0 and still + closed == 400 and d.fds() <= 160
        canary.round()
        assert "below max_connections 1024" in d.output()  # the operator is told how to fix it
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    later = [Raw(d.sock) for _ in range(50)]
    for i, c in enumerate(later):
        assert c.ok(P.encode_ping(i + 1, b"back")) == b"back"
        c.close()
    canary.round()
    canary.close()
    assert d.stop() == 0


# -- replies too large for a frame -------------------------------------------------------------------------


def test_an_mget_reply_over_4_gib_is_an_error_reply_not_a_stuck_request(tmp_path):
    """Two 2.1 GiB values in one MGET: the reply cannot be framed (u32 body_length). The client must get an
    error reply and the request must leave the in-flight count (it used to raise inside the reply path:
    no reply, the request counted in flight forever, the connection never closing). In process with H4's
    FakeStore holding an anonymous mmap (virtual memory only: nothing of the 4.2 GiB is touched)."""
    import asyncio
    import mmap

    from test_server_unit import Conn, FakeStore, run, start

    sockdir = make_workdir("badinput-srv")
    huge = mmap.mmap(-1, (1 << 31) + (100 << 20))  # 2.1 GiB, untouched

    async def main():
        store = FakeStore()
        store.data[b"huge"] = huge
        srv = await start(sockdir, store)
        c = await Conn.open(srv.socket_path)
        f = await c.call(P.encode_mget(1, [b"huge", b"huge"]))
        assert f.request_id == 1 and f.status == errors.TooLarge.code, (f.status, f.body[:200])
        assert "4 GiB" in f.body.decode() and "fewer keys" in f.body.decode()
        assert srv.in_flight == 0
        assert (await c.call(P.encode_ping(2, b"next"))).body == b"next"  # the connection goes on
        await c.close()
        srv.request_stop()
        await asyncio.wait_for(srv.serve_forever(), 20)

    try:
        run(main())
    finally:
        huge.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_an_mget_naming_one_big_key_many_times_costs_bounded_memory(own):
    d = own("--max-frame-size", str(4 << 20), size=64 << 20)
    c = Raw(d.sock, timeout=30)
    c.ok(P.encode_put(1, b"big", os.urandom(1 << 20), sync=True))
    rss0 = d.rss()
    peak = [rss0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], d.rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        f = c.call(P.encode_mget(2, [b"big"] * 64))
    finally:
        done.set()
        t.join()
    assert f.request_id == 2 and d.alive()
    assert f.status == errors.TooLarge.code and "max_frame_size" in f.body.decode(), (f.status, f.body[:200])
    assert peak[0] - rss0 < 32 << 20, f"VmRSS grew {(peak[0] - rss0) >> 20} MiB for one 260-byte MGET"
    c.close()
