"""Unit tests of the sans-I/O wire codec (ringblob.protocol)."""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringblob import errors
from ringblob import protocol as p

keys = st.binary(min_size=1, max_size=255)
values = st.binary(max_size=2048)


def decode_all(data: bytes, max_frame_size: int = p.DEFAULT_MAX_FRAME_SIZE) -> list[p.Frame]:
    dec = p.FrameDecoder(max_frame_size)
    dec.feed(data)
    return list(dec)


def one_request(data: bytes) -> p.Request:
    (frame,) = decode_all(data)
    return p.parse_request(frame)


def test_header_layout_matches_the_spec():
    raw = p.encode_put(7, b"k", b"hi", sync=True)
    assert raw.hex(" ") == "52 42 4c 42 01 01 01 00 07 00 00 00 00 00 00 00 04 00 00 00 01 6b 68 69"
    assert p.HEADER_SIZE == 20
    magic, version, opcode, flags, rid, length = struct.unpack("<4sBBHQI", raw[:20])
    assert (magic, version, opcode, flags, rid, length) == (b"RBLB", 1, 1, 1, 7, 4)


@given(key=keys, value=values, sync=st.booleans(), verify=st.booleans(), rid=st.integers(0, 2**64 - 1))
@settings(max_examples=60, deadline=None)
def test_put_round_trip(key, value, sync, verify, rid):
    req = one_request(p.encode_put(rid, key, value, sync=sync, verify=verify))
    assert (req.op, req.request_id, req.key, req.value, req.sync, req.verify) == (
        p.Op.PUT, rid, key, value, sync, verify,
    )


@given(key=keys, sync=st.booleans())
@settings(max_examples=30, deadline=None)
def test_key_ops_round_trip(key, sync):
    assert one_request(p.encode_get(1, key)).key == key
    assert one_request(p.encode_has(2, key)).op is p.Op.HAS
    req = one_request(p.encode_delete(3, key, sync=sync))
    assert (req.op, req.key, req.sync) == (p.Op.DELETE, key, sync)


@given(prefix=st.binary(max_size=255), start=st.one_of(st.none(), keys), limit=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_list_round_trip(prefix, start, limit):
    req = one_request(p.encode_list(5, prefix, start, limit))
    assert (req.prefix, req.start_after, req.limit) == (prefix, start, limit)


@given(items=st.lists(st.tuples(keys, values), max_size=20), sync=st.booleans())
@settings(max_examples=40, deadline=None)
def test_mput_round_trip(items, sync):
    req = one_request(p.encode_mput(9, items, sync=sync))
    assert req.items == items and req.sync == sync


@given(ks=st.lists(keys, max_size=30))
@settings(max_examples=40, deadline=None)
def test_mget_round_trip(ks):
    assert one_request(p.encode_mget(10, ks)).keys == ks


def test_empty_body_ops_and_ping():
    for enc, op in [
        (p.encode_flush, p.Op.FLUSH),
        (p.encode_stat, p.Op.STAT),
        (p.encode_needs_flush, p.Op.NEEDS_FLUSH),
    ]:
        req = one_request(enc(3))
        assert req.op is op and req.request_id == 3
    assert one_request(p.encode_ping(4, b"echo me")).value == b"echo me"


def test_byte_by_byte_feed_yields_every_frame_in_order():
    stream = b"".join(
        [
            p.encode_put(1, b"a", b"x" * 1000),
            p.encode_get(2, b"a"),
            p.encode_ping(3),
            p.encode_mget(4, [b"a", b"b"]),
        ]
    )
    dec = p.FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got.extend(dec)
    assert [f.request_id for f in got] == [1, 2, 3, 4]
    assert p.parse_request(got[0]).value == b"x" * 1000
    assert dec.buffered == 0


@given(split=st.lists(st.integers(1, 50), max_size=30))
@settings(max_examples=50, deadline=None)
def test_arbitrary_splits(split):
    stream = b"".join(p.encode_put(i, b"k%d" % i, b"v" * i) for i in range(1, 8))
    dec = p.FrameDecoder()
    got, pos = [], 0
    for n in split:
        dec.feed(stream[pos : pos + n])
        pos += n
        got.extend(dec)
    dec.feed(stream[pos:])
    got.extend(dec)
    assert [p.parse_request(f).value for f in got] == [b"v" * i for i in range(1, 8)]


def test_replies_round_trip_and_errors_map_back_to_their_class():
    frames = decode_all(
        p.encode_reply(p.Op.GET, 9, b"value")
        + p.encode_error_reply(p.Op.GET, 10, errors.NotFound("no blob under key b'x'"))
        + p.encode_error_reply(p.Op.PUT, 11, OSError(5, "Input/output error"))
        + p.encode_error_reply(p.Op.PUT, 12, errors.DigestMismatch("digest mismatch"))
    )
    assert p.raise_for_status(frames[0]).body == b"value"
    with pytest.raises(errors.NotFound, match="no blob"):
        p.raise_for_status(frames[1])
    assert frames[1].status == errors.NotFound.code
    assert isinstance(p.reply_error(frames[2]), errors.IOFailed)
    assert isinstance(p.reply_error(frames[3]), errors.DigestMismatch)
    assert p.reply_error(frames[0]) is None


def test_every_error_class_survives_the_wire():
    for cls in set(errors._BY_CODE.values()):
        try:
            exc = cls("boom")
        except TypeError:
            continue
        (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 1, exc))
        got = p.reply_error(frame)
        assert type(got) is cls and str(got) == "boom"


def test_errno_crosses_the_wire_as_a_message_trailer():
    eio = errors.IOFailed("d.data: the commit failed: fdatasync: EIO; the store is now read-only", errno.EIO)
    (frame,) = decode_all(p.encode_error_reply(p.Op.PUT, 3, eio))
    assert frame.status == errors.IOFailed.code
    # the body stays a readable UTF-8 message for a client that does not know the trailer
    assert frame.body == b"d.data: the commit failed: fdatasync: EIO; the store is now read-only [errno=5]"
    got = p.reply_error(frame)
    assert type(got) is errors.IOFailed and got.errno == errno.EIO and str(got) == str(eio)
    # a bare OSError (mapped to IOFailed) keeps its errno too
    (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 4, OSError(errno.ENOSPC, "No space left on device")))
    got = p.reply_error(frame)
    assert type(got) is errors.IOFailed and got.errno == errno.ENOSPC
    assert str(got) == "I/O error: [Errno 28] No space left on device"
    # no errno: no trailer, IOFailed.errno is None
    (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 5, errors.IOFailed("unknown cause")))
    assert frame.body == b"unknown cause"
    assert p.reply_error(frame).errno is None
    # an errno that does not fit (0, negative, over 65535, not an int) is not sent
    for bad in (0, -5, 70000, "5", 5.0):
        exc = errors.IOFailed("odd", bad)
        (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 6, exc))
        assert frame.body == b"odd" and p.reply_error(frame).errno is None


def test_errno_trailer_is_never_read_from_a_message_without_one():
    # a message that happens to end like the trailer is sent with a "." so it is not taken for one
    (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 1, errors.NotFound("no blob under key b'[errno=5]' [errno=5]")))
    got = p.reply_error(frame)
    assert type(got) is errors.NotFound and str(got) == "no blob under key b'[errno=5]' [errno=5]."
    assert not hasattr(got, "errno")
    (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 1, errors.IOFailed("x [errno=7]")))
    assert p.reply_error(frame).errno is None
    # forms that are not the trailer stay in the message
    for body in ("x [errno=05]", "x [errno=]", "x[errno=5]", "x [errno=5] ", "x [errno=123456]", "[errno=5]"):
        assert p.split_errno(body) == (body, None)
    assert p.split_errno("x [errno=5]") == ("x", 5)
    assert p.split_errno(" [errno=65535]") == ("", 65535)


@settings(max_examples=300, deadline=None)
@given(message=st.text(max_size=60) | st.builds(lambda a, n: f"{a} [errno={n}]", st.text(max_size=20),
                                                 st.integers(0, 10**6)),
       en=st.none() | st.integers(1, 65535))
def test_errno_trailer_round_trips_any_message(message, en):
    (frame,) = decode_all(p.encode_error_reply(p.Op.GET, 1, errors.IOFailed(message, en)))
    got = p.reply_error(frame)
    assert got.errno == en
    expected = message.encode("utf-8", "replace").decode("utf-8", "replace") or "IOFailed"
    if en is None:
        assert str(got) in (expected, expected + ".")
    else:
        assert str(got) == expected


def test_errno_trailer_on_a_status_of_another_class_sets_errno():
    # a newer daemon may send an errno with another status: the class is kept, errno is an attribute
    (frame,) = decode_all(p.encode_reply(p.Op.PUT, 1, b"read-only after EIO [errno=5]", status=errors.ReadOnly.code))
    got = p.reply_error(frame)
    assert type(got) is errors.ReadOnly and str(got) == "read-only after EIO" and got.errno == 5


def test_mget_items_carry_their_errno():
    body = b"".join(p.mget_reply_body([errors.IOFailed("reading k failed: EIO", errno.EIO), errors.NotFound("missing"),
                                       b"v"]))
    res = p.decode_mget_reply(body)
    assert type(res[0]) is errors.IOFailed and res[0].errno == errno.EIO and str(res[0]) == "reading k failed: EIO"
    assert type(res[1]) is errors.NotFound and res[2] == b"v"


def test_unknown_status_maps_to_the_base_error():
    (frame,) = decode_all(p.encode_reply(p.Op.GET, 1, b"from the future", status=999))
    got = p.reply_error(frame)
    assert type(got) is errors.RingblobError and str(got) == "from the future"


def test_reply_bodies():
    assert p.decode_bool_reply(p.bool_body(True)) is True
    assert p.decode_bool_reply(p.bool_body(False)) is False
    with pytest.raises(errors.ProtocolError):
        p.decode_bool_reply(b"\x02")
    ks = [b"a", b"b" * 255, b"\x00"]
    assert p.decode_list_reply(p.list_reply_body(ks, True)) == (ks, True)
    assert p.decode_list_reply(p.list_reply_body([], False)) == ([], False)
    res = p.decode_mget_reply(b"".join(p.mget_reply_body([b"v1", errors.NotFound("missing"), b""])))
    assert res[0] == b"v1" and res[2] == b""
    assert isinstance(res[1], errors.NotFound) and str(res[1]) == "missing"
    assert p.decode_stat_reply(json.dumps({"blob_count": 3}).encode()) == {"blob_count": 3}
    for bad in (b"[]", b"\xff"):
        with pytest.raises(errors.ProtocolError):
            p.decode_stat_reply(bad)


def test_bad_magic_is_detected_before_a_full_header():
    dec = p.FrameDecoder()
    dec.feed(b"GET ")
    with pytest.raises(errors.ProtocolError, match="magic") as ei:
        dec.next_frame()
    assert ei.value.request_id == 0
    with pytest.raises(errors.ProtocolError):  # sticky
        dec.next_frame()


def test_bad_version_names_both_versions():
    raw = bytearray(p.encode_ping(77))
    raw[4] = 9
    dec = p.FrameDecoder()
    dec.feed(raw)
    with pytest.raises(errors.ProtocolError, match="version 9.*version 1") as ei:
        dec.next_frame()
    assert ei.value.request_id == 77


def test_oversized_frame_is_refused_from_its_header():
    dec = p.FrameDecoder(max_frame_size=1024)
    dec.feed(p.encode_put(5, b"k", b"x" * 2000)[:20])  # only the header
    with pytest.raises(errors.FrameTooLarge) as ei:
        dec.next_frame()
    assert ei.value.request_id == 5 and ei.value.opcode == p.Op.PUT
    assert isinstance(ei.value, errors.ProtocolError)
    # exactly at the limit is fine
    dec = p.FrameDecoder(max_frame_size=1024)
    dec.feed(p.encode_ping(1, b"x" * (1024 - 20)))
    assert dec.next_frame().body == b"x" * 1004


def test_default_limit_fits_a_64_mib_value():
    assert p.HEADER_SIZE + 1 + 255 + 64 * 1024 * 1024 <= p.DEFAULT_MAX_FRAME_SIZE


@pytest.mark.parametrize(
    "frame, match",
    [
        (p.Frame(99, 0, 1, b""), "unknown opcode 99"),
        (p.Frame(p.Op.GET, p.FLAG_SYNC, 1, b"\x01k"), "flags"),
        (p.Frame(p.Op.PUT, 0x8000, 1, b"\x01k"), "flags"),
        (p.Frame(p.Op.GET, 0, 1, b"\x05ab"), "ends inside key"),
        (p.Frame(p.Op.GET, 0, 1, b"\x01ab"), "unexpected bytes"),
        (p.Frame(p.Op.PUT, 0, 1, b""), "ends inside key length"),
        (p.Frame(p.Op.LIST, 0, 1, b"\x00\x00\x01"), "limit"),
        (p.Frame(p.Op.MPUT, 0, 1, b"\x02\x00\x00\x00\x01k\x05\x00\x00\x00ab"), "count|value"),
        (p.Frame(p.Op.MGET, 0, 1, b"\xff\xff\xff\xff"), "count"),
        (p.Frame(p.Op.FLUSH, 0, 1, b"x"), "unexpected bytes"),
    ],
)
def test_malformed_bodies_raise_protocol_error(frame, match):
    with pytest.raises(errors.ProtocolError, match=match) as ei:
        p.parse_request(frame)
    assert ei.value.request_id == 1 and ei.value.opcode == frame.opcode


def test_empty_key_parses_so_the_store_can_say_invalid_key():
    assert p.parse_request(p.Frame(p.Op.GET, 0, 1, b"\x00")).key == b""


def test_encoders_reject_bad_keys():
    with pytest.raises(errors.InvalidKey):
        p.encode_get(1, b"")
    with pytest.raises(errors.InvalidKey):
        p.encode_put(1, b"k" * 256, b"")
    with pytest.raises(errors.InvalidKey):
        p.encode_get(1, "text")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidKey):
        p.encode_list(1, prefix=b"p" * 256)


@given(st.binary(max_size=400))
@settings(max_examples=400, deadline=None)
def test_fuzz_decoder_only_raises_protocol_error(data):
    dec = p.FrameDecoder(max_frame_size=256)
    try:
        dec.feed(data)
        for frame in dec:
            try:
                p.parse_request(frame)
            except errors.ProtocolError:
                pass
    except errors.ProtocolError:
        pass


@given(
    st.lists(st.sampled_from(list(p.Op)), min_size=1, max_size=6),
    st.data(),
)
@settings(max_examples=150, deadline=None)
def test_fuzz_mutated_valid_frames(ops, data):
    """Valid headers with random bodies/flags: parse_request only raises ProtocolError."""
    dec = p.FrameDecoder()
    for i, op in enumerate(ops):
        body = data.draw(st.binary(max_size=80))
        flags = data.draw(st.integers(0, 3))
        dec.feed(p.encode_frame(op, i, body, flags))
    for frame in dec:
        try:
            req = p.parse_request(frame)
        except errors.ProtocolError as exc:
            assert exc.request_id == frame.request_id
        else:
            assert req.op == frame.opcode


def _same_request(a: p.Request, b: p.Request) -> bool:
    fields = ("op", "request_id", "flags", "key", "prefix", "start_after", "limit", "items", "keys")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and bytes(a.value) == bytes(b.value)


@given(
    st.sampled_from([int(o) for o in p.Op] + [0, 12, 200]),
    st.sampled_from([0, p.FLAG_SYNC, p.FLAG_VERIFY, p.FLAG_SYNC | p.FLAG_VERIFY, 0x8000]),
    st.one_of(
        st.binary(max_size=40),
        st.builds(lambda k, v: bytes([len(k)]) + k + v, st.binary(max_size=20), st.binary(max_size=20)),
    ),
    st.booleans(),
)
@settings(max_examples=600, deadline=None)
def test_parse_request_fast_paths_agree_with_the_checked_parser(opcode, flags, body, as_view):
    # the server's large frames arrive as read-only memoryviews; the fast paths must give the same request
    frame = p.Frame(opcode, flags, 9, memoryview(body).toreadonly() if as_view else body)
    try:
        got = p.parse_request(frame)
    except errors.ProtocolError as exc:
        got = exc
    try:
        want = p._parse_checked(frame, p.Op(opcode)) if opcode in p._OP_BY_CODE else None
    except errors.ProtocolError as exc:
        want = exc
    if want is None:
        assert isinstance(got, errors.ProtocolError) and "unknown opcode" in str(got)
    elif isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
    else:
        assert _same_request(got, want)
        assert type(got.key) is bytes


def test_put_value_of_a_view_body_stays_a_view():
    body = memoryview(b"\x01k" + b"v" * 100000).toreadonly()
    req = p.parse_request(p.Frame(p.Op.PUT, p.FLAG_SYNC, 3, body))
    assert req.key == b"k" and isinstance(req.value, memoryview) and bytes(req.value) == b"v" * 100000


# -- large bodies: gathered apart from the stream buffer; view_bodies receives them in place -----

_SIZES = [0, 7, p.LARGE_BODY - 1, p.LARGE_BODY, p.LARGE_BODY + 4097, 300_000]


def _large_stream(sizes):
    frames = [p.encode_put(i + 1, b"k%d" % i, bytes([i % 251]) * n, sync=bool(i % 2)) for i, n in enumerate(sizes)]
    return frames, b"".join(frames)


@given(
    st.lists(st.sampled_from(_SIZES), min_size=1, max_size=5),
    st.lists(st.integers(1, 200_000), max_size=12),
    st.sampled_from(["bytes", "bytearray", "memoryview"]),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=120, deadline=None)
def test_large_bodies_any_split_any_input_type(sizes, split, kind, views, in_place):
    frames, stream = _large_stream(sizes)
    dec = p.FrameDecoder(view_bodies=views)
    got, pos, returned = [], 0, 0
    cuts = iter(split)
    while pos < len(stream):
        n = next(cuts, len(stream))  # the given splits, then whatever is left
        target = dec.recv_target() if in_place else None
        if target is not None:  # what BufferedProtocol.get_buffer does: the read lands in the body
            k = min(len(target), n, len(stream) - pos)
            target[:k] = stream[pos : pos + k]
            target.release()
            dec.received_in_place(k)
            pos += k
        else:
            chunk = stream[pos : pos + n]
            if kind == "bytearray":
                chunk = bytearray(chunk)
            elif kind == "memoryview":
                chunk = memoryview(bytearray(chunk))
            dec.feed(chunk)
            if kind != "bytes":  # the caller may reuse its buffer: the decoder copied what it keeps
                (chunk if kind == "bytearray" else chunk.obj)[:] = b"\xee" * len(chunk)
            pos += len(chunk)
        for f in dec:
            got.append(f)
            returned += p.HEADER_SIZE + len(f.body)
        assert dec.buffered == pos - returned
    assert dec.buffered == 0 and len(got) == len(sizes)
    for i, (f, n) in enumerate(zip(got, sizes)):
        req = p.parse_request(f)
        assert (f.request_id, req.key, req.sync) == (i + 1, b"k%d" % i, bool(i % 2))
        assert bytes(req.value) == bytes([i % 251]) * n
        if n + 1 + len(req.key) >= p.LARGE_BODY and views:
            assert isinstance(f.body, memoryview) and f.body.readonly
        else:
            assert type(f.body) is bytes


def test_view_bodies_receive_a_large_body_in_place():
    frame = p.encode_put(5, b"key", b"z" * 1_000_000)
    dec = p.FrameDecoder(view_bodies=True)
    dec.feed(frame[:30000])  # the header and the start of the body
    assert dec.next_frame() is None
    target = dec.recv_target()
    assert target is not None and len(target) == len(frame) - 30000  # exactly the rest of the body
    target[:] = frame[30000:]
    target.release()
    dec.received_in_place(len(frame) - 30000)
    assert dec.recv_target() is None
    f = dec.next_frame()
    req = p.parse_request(f)
    assert req.key == b"key" and isinstance(req.value, memoryview) and req.value.readonly
    assert req.value == b"z" * 1_000_000
    with pytest.raises(ValueError):
        dec.received_in_place(1)  # no body is being received in place now


def test_large_frame_over_the_limit_is_refused_from_its_header_in_every_path():
    for views in (False, True):
        frame = p.encode_ping(9, b"x" * 200_000)
        dec = p.FrameDecoder(max_frame_size=100_000, view_bodies=views)
        dec.feed(frame[:50])
        with pytest.raises(errors.FrameTooLarge) as ei:
            dec.next_frame()
        assert ei.value.request_id == 9 and dec.recv_target() is None


def test_view_bodies_over_the_in_place_cap_are_joined_once():
    value = b"q" * (p._PREALLOC_MAX + 10)
    frame = p.encode_put(1, b"k", value)
    dec = p.FrameDecoder(view_bodies=True)
    dec.feed(frame[:100])
    assert dec.next_frame() is None and dec.recv_target() is None  # gathered in pieces, not preallocated
    dec.feed(frame[100:])
    f = dec.next_frame()
    assert isinstance(f.body, memoryview) and f.body.readonly and bytes(p.parse_request(f).value) == value


def test_receive_budget_caps_bodies_allocated_ahead_over_several_decoders():
    """Decoders sharing a ReceiveBudget allocate a large body's buffer from its header only while
    the budget has room; over it the body is gathered as it arrives (and decodes the same); a
    finished body and a discarded stream give their share back."""
    budget = p.ReceiveBudget(3 * 1024 * 1024)
    frames = [p.encode_put(i + 1, b"k%d" % i, bytes([i]) * 2_000_000) for i in range(2)]
    a = p.FrameDecoder(view_bodies=True, budget=budget)
    b = p.FrameDecoder(view_bodies=True, budget=budget)
    a.feed(frames[0][:100])
    assert a.recv_target() is not None and budget.used == len(frames[0]) - p.HEADER_SIZE
    b.feed(frames[1][:100])  # only headers sent: no second 2 MB buffer
    assert b.recv_target() is None and budget.used == len(frames[0]) - p.HEADER_SIZE
    a.feed(frames[0][100:])
    b.feed(frames[1][100:])
    for dec, i in ((a, 0), (b, 1)):
        req = p.parse_request(dec.next_frame())
        assert bytes(req.value) == bytes([i]) * 2_000_000 and req.value.readonly
    assert budget.used == 0
    c = p.FrameDecoder(view_bodies=True, budget=budget)
    c.feed(frames[0][:5000])  # a client that goes away in the middle of a body
    assert budget.used > 0
    c.discard()
    assert budget.used == 0 and c.recv_target() is None
    c.discard()  # idempotent
    assert budget.used == 0
    with pytest.raises(ValueError):
        p.ReceiveBudget(-1)


# -- value_sink: a large PUT's value received into memory the consumer provides --------------


class ChunkSink:
    """A test sink over buffers of ``chunk`` bytes (as the store's LeasedValue over fixed
    buffers): target() never crosses a buffer end, advance() checks the view it was given."""

    def __init__(self, length: int, chunk: int, log: list):
        self.length, self.chunk = length, chunk
        self.bufs = [bytearray(chunk) for _ in range(-(-length // chunk))]
        self.received = 0
        self.released = False
        log.append(self)

    def _span(self):
        i, off = divmod(self.received, self.chunk)
        return i, off, min(self.chunk, self.length - i * self.chunk)

    def target(self):
        if self.received >= self.length:
            return None
        i, off, end = self._span()
        return memoryview(self.bufs[i])[off:end]

    def advance(self, n):
        i, off, end = self._span()
        if n < 0 or off + n > end:
            raise ValueError("past the view")
        self.received += n

    def write(self, data):
        taken = 0
        while taken < len(data) and (t := self.target()) is not None:
            k = min(len(t), len(data) - taken)
            t[:k] = data[taken : taken + k]
            self.advance(k)
            taken += k
        return taken

    def release(self):
        self.released = True

    def value(self) -> bytes:
        return b"".join(self.bufs)[: self.length]


_SINK_SIZES = [7, p.LARGE_BODY - 300, p.LARGE_BODY + 4097, 200_000, 3 * 65536]


@given(
    st.lists(st.tuples(st.sampled_from(_SINK_SIZES), st.sampled_from([0, 1, 2, 255]), st.booleans()),
             min_size=1, max_size=4),
    st.lists(st.one_of(st.integers(1, 30), st.integers(1, 150_000)), max_size=16),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_value_sink_receives_large_put_values_any_split(reqs, split, in_place, views):
    """With value_sink, a large PUT's key is received first, then its value goes into the sink
    (in place through recv_target or copied from fed bytes), whatever the split; a None from
    value_sink (here: every third value) and the other frames take the ordinary path."""
    asked, sinks = [], []

    def value_sink(length):
        asked.append(length)
        return None if len(asked) % 3 == 0 else ChunkSink(length, 65536, sinks)

    frames = []
    for i, (n, klen, sync) in enumerate(reqs):
        value = bytes([i + 1]) * n
        body = bytes([klen]) + b"k" * klen + value
        frames.append(p.encode_frame(p.Op.PUT, i + 1, body, p.FLAG_SYNC if sync else 0))
    frames.append(p.encode_ping(99, b"x" * 70_000))  # a large body of another op: never a sink
    stream = b"".join(frames)
    dec = p.FrameDecoder(view_bodies=views, value_sink=value_sink)
    got, pos = [], 0
    cuts = iter(split)
    while pos < len(stream):
        n = next(cuts, len(stream))
        target = dec.recv_target() if in_place else None
        if target is not None:
            k = min(len(target), n, len(stream) - pos)
            target[:k] = stream[pos : pos + k]
            target.release()
            done = dec.received_in_place(k)
            pos += k
            if done:  # the large body is complete: its frame is ready
                assert dec.recv_target() is None and dec.buffered > 0
        else:
            dec.feed(stream[pos : pos + n])
            pos += n
        got += list(dec)
    assert dec.buffered == 0 and [f.request_id for f in got] == [i + 1 for i in range(len(reqs))] + [99]
    large = [1 + klen + n >= p.LARGE_BODY for n, klen, _ in reqs]
    assert len(asked) == sum(large) and all(not s.released for s in sinks)
    for i, (f, (n, klen, sync)) in enumerate(zip(got, reqs)):
        req = p.parse_request(f)
        assert (req.op, req.key, req.sync) == (p.Op.PUT, b"k" * klen, sync)
        if f.sink is not None:
            assert req.sink is f.sink and req.value == b"" and bytes(f.body) == bytes([klen]) + b"k" * klen
            assert f.sink.value() == bytes([i + 1]) * n and f.sink.length == n
        else:
            assert req.sink is None and bytes(req.value) == bytes([i + 1]) * n
    assert bytes(got[-1].body) == b"x" * 70_000 and got[-1].sink is None


def test_value_sink_is_asked_only_for_puts_with_defined_flags_and_released_by_discard():
    asked, sinks = [], []

    def value_sink(length):
        asked.append(length)
        return ChunkSink(length, 65536, sinks)

    dec = p.FrameDecoder(view_bodies=True, value_sink=value_sink)
    bad = p.encode_frame(p.Op.PUT, 1, b"\x01k" + b"v" * 100_000, 0x80)  # undefined flag: the checked path
    dec.feed(bad)
    with pytest.raises(errors.ProtocolError):
        p.parse_request(dec.next_frame())
    assert asked == []
    frame = p.encode_put(2, b"key", b"w" * 300_000)
    dec.feed(frame[:22])  # the header, the key length and one byte of the key
    assert asked == [] and bytes(dec.recv_target()) == b"\x00\x00"  # exactly the rest of the key
    dec.feed(frame[22:1000])
    assert asked == [300_000] and len(dec.recv_target()) == 65536 - (1000 - 24)
    dec.discard()  # the client went away mid-value: the sink goes back
    assert sinks[0].released and dec.recv_target() is None and dec.buffered == 0
    dec.discard()
    # a finished frame not yet taken out is released by discard too
    dec2 = p.FrameDecoder(view_bodies=True, value_sink=value_sink)
    dec2.feed(frame)
    assert not sinks[1].released
    dec2.discard()
    assert sinks[1].released and dec2.next_frame() is None
    # the key received in place, byte by byte where the client sends it so
    dec3 = p.FrameDecoder(view_bodies=True, value_sink=value_sink)
    dec3.feed(frame[:20])
    for i in range(20, 24):
        t = dec3.recv_target()
        assert len(t) == (1 if i == 20 else 24 - i)
        t[:1] = frame[i : i + 1]
        assert dec3.received_in_place(1) is False
    with pytest.raises(ValueError):
        dec3.received_in_place(65537)  # more than the sink's current buffer
    dec3.feed(frame[24:])
    f = dec3.next_frame()
    assert f.sink is sinks[2] and f.sink.value() == b"w" * 300_000 and p.parse_request(f).key == b"key"


def test_a_sink_frame_with_bytes_after_the_key_is_malformed():
    sink = ChunkSink(10, 65536, [])
    with pytest.raises(errors.ProtocolError):
        p.parse_request(p.Frame(p.Op.PUT, 0, 5, b"\x01kX", sink))
    with pytest.raises(errors.ProtocolError):
        p.parse_request(p.Frame(p.Op.PUT, 0x80, 5, b"\x01k", sink))
    req = p.parse_request(p.Frame(p.Op.PUT, p.FLAG_VERIFY, 5, b"\x01k", sink))
    assert req.sink is sink and req.verify and req.value == b""
