"""The ringblob wire protocol: a sans-I/O codec shared by the server and the clients.

Nothing here touches a socket. :class:`FrameDecoder` is a state machine fed
bytes (``feed``) that hands out complete :class:`Frame` objects
(``next_frame``); the ``encode_*`` functions build frames; ``parse_request``
and the ``decode_*_reply`` functions interpret frame bodies. The exact format
is specified in docs/PROTOCOL.md; in short:

* every frame starts with a 20-byte little-endian header ``<4sBBHQI``:
  magic ``b"RBLB"``, version (1), opcode, flags (requests) or status
  (replies), request id (u64) and body length (u32);
* replies carry the opcode and request id of their request and may arrive in
  any order (requests are pipelined);
* status 0 is success; any other status is the ``code`` of a
  :mod:`ringblob.errors` class and the body is its UTF-8 message, ending
  with ``" [errno=N]"`` when the error carries an errno (``IOFailed``).

Errors: a malformed frame raises :class:`~ringblob.errors.ProtocolError`
(a frame over the size limit :class:`~ringblob.errors.FrameTooLarge`); the
exception carries ``request_id`` and ``opcode`` attributes (0 when the header
itself was unreadable) so the server can address its error reply.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from .errors import (
    FrameTooLarge,
    InvalidKey,
    IOFailed,
    ProtocolError,
    RingblobError,
    error_for_code,
)

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER",
    "HEADER_SIZE",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_KEY_SIZE",
    "STATUS_OK",
    "FLAG_SYNC",
    "FLAG_VERIFY",
    "LIST_MORE",
    "Op",
    "Frame",
    "Request",
    "FrameDecoder",
    "ReceiveBudget",
    "ValueSink",
    "encode_frame",
    "encode_frame_parts",
    "encode_put",
    "encode_get",
    "encode_has",
    "encode_delete",
    "encode_list",
    "encode_flush",
    "encode_stat",
    "encode_ping",
    "encode_mput",
    "encode_mget",
    "encode_needs_flush",
    "encode_reply",
    "encode_reply_parts",
    "encode_error_reply",
    "list_reply_body",
    "mget_reply_body",
    "bool_body",
    "parse_request",
    "reply_error",
    "split_errno",
    "raise_for_status",
    "decode_bool_reply",
    "decode_list_reply",
    "decode_mget_reply",
    "decode_stat_reply",
]

MAGIC = b"RBLB"
VERSION = 1
HEADER = struct.Struct("<4sBBHQI")
HEADER_SIZE = HEADER.size  # 20 bytes
DEFAULT_MAX_FRAME_SIZE = 72 * 1024 * 1024  # header + body; a 64 MiB value fits
MAX_KEY_SIZE = 255
STATUS_OK = 0

FLAG_SYNC = 0x0001  # PUT, DELETE, MPUT: acknowledge only once durable (fdatasync)
FLAG_VERIFY = 0x0002  # PUT: the key is the BLAKE3 digest of the value; check it
LIST_MORE = 0x01  # LIST reply flags: more keys follow; ask again with start_after

_HEADER_UNPACK_FROM = HEADER.unpack_from
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_MGET_ITEM = struct.Struct("<HI")


class Op(IntEnum):
    """Operation codes (the header's opcode byte)."""

    PUT = 1
    GET = 2
    HAS = 3
    DELETE = 4
    LIST = 5
    FLUSH = 6
    STAT = 7
    PING = 8
    MPUT = 9
    MGET = 10
    NEEDS_FLUSH = 11


_KNOWN_OPS = frozenset(int(o) for o in Op)
_OP_BY_CODE = {int(o): o for o in Op}  # opcode byte -> Op without Op()'s enum machinery
_KEY_OPS = frozenset((Op.GET, Op.HAS, Op.DELETE))
_FLAGS_ALLOWED = {
    Op.PUT: FLAG_SYNC | FLAG_VERIFY,
    Op.DELETE: FLAG_SYNC,
    Op.MPUT: FLAG_SYNC,
}


def op_name(opcode: int) -> str:
    """Lower-case name of ``opcode`` (``"put"``), or ``"op<N>"`` for an unknown one."""
    try:
        return Op(opcode).name.lower()
    except ValueError:
        return f"op{opcode}"


@dataclass(slots=True)
class Frame:
    """One decoded frame.

    ``flags`` is the header's u16: request flags in a request, the status in
    a reply (also readable as ``status``). ``body`` is ``body_length`` bytes,
    except for a large PUT whose value was received into a :class:`ValueSink`
    (``FrameDecoder(value_sink=...)``): then ``sink`` holds the value and
    ``body`` only the key_len byte and the key.
    """

    opcode: int
    flags: int
    request_id: int
    body: bytes
    sink: Any = None

    @property
    def status(self) -> int:
        return self.flags


def _protocol_error(cls, message: str, request_id: int = 0, opcode: int = 0) -> ProtocolError:
    exc = cls(message)
    exc.request_id = request_id
    exc.opcode = opcode
    return exc


LARGE_BODY = 64 * 1024  # bodies from this size on are gathered apart from the stream buffer
_PREALLOC_MAX = 4 * 1024 * 1024 + 4096  # view_bodies: bodies up to this size are received in place
_PUT_CODE = 1  # Op.PUT (defined below)
_PUT_FLAGS = FLAG_SYNC | FLAG_VERIFY


class ValueSink(Protocol):
    """Where a large PUT's value is received, handed out by ``FrameDecoder(value_sink=...)``
    (the daemon's: fixed buffers of the store's engine, ``ringblob.store.LeasedValue``).

    The decoder fills it in order, either in place — :meth:`target` is the writable view
    the next socket read may land in, :meth:`advance` says how many bytes were read into it —
    or by copying received bytes with :meth:`write`. :meth:`release` gives its memory back
    (idempotent); the decoder calls it when the stream ends mid-value (``discard``), the
    consumer of the finished frame otherwise.
    """

    def target(self) -> memoryview | None: ...

    def advance(self, nbytes: int) -> None: ...

    def write(self, data: memoryview) -> int: ...

    def release(self) -> None: ...


class ReceiveBudget:
    """Bytes that decoders may hold in body buffers allocated ahead of the body (shared by all of
    a server's connections).

    A ``FrameDecoder(view_bodies=True)`` allocates a large body's whole buffer when its header
    arrives; without a shared cap, clients sending only headers could make the daemon allocate
    ~4 MiB per connection. Over the budget a decoder gathers the body as it arrives instead
    (memory then grows only with bytes actually received). ``limit`` and ``used`` are bytes.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"ReceiveBudget: limit must be >= 0 bytes, got {limit}")
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when that would pass the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Return ``n`` bytes reserved by :meth:`take`."""
        self.used -= n


class FrameDecoder:
    """Incremental frame decoder: feed it bytes, take out complete frames.

    ``max_frame_size`` bounds header + body in bytes; a header announcing a
    larger frame raises :class:`~ringblob.errors.FrameTooLarge` as soon as the
    header is read (before the body is buffered). A bad magic or version
    raises :class:`~ringblob.errors.ProtocolError`. Errors are sticky: after
    one, every further ``next_frame`` raises the same error, since the byte
    stream can no longer be framed.

    Large bodies (``LARGE_BODY`` = 64 KiB and more) do not go through the
    stream buffer: with the default ``view_bodies=False`` their pieces are kept
    as received (``bytes`` fed in are kept without a copy) and joined once into
    the frame's ``bytes`` body. With ``view_bodies=True`` (the server) a body
    of up to ~4 MiB is received into a ``bytearray`` of exactly its size —
    :meth:`recv_target` hands out the unfilled part so a socket read
    (``BufferedProtocol.get_buffer``) lands there directly, with no copy at
    all — and such a frame's ``body`` is a read-only ``memoryview``
    (slicing it copies nothing; nothing writes to it afterwards). ``budget``
    (a :class:`ReceiveBudget` shared by several decoders) caps the bytes held
    in such buffers before their bodies arrived; call :meth:`discard` when the
    stream ends so a body left unfinished gives its share back.

    ``value_sink`` (the server passes the store's ``lease_value``): a callable
    taking a value length in bytes and returning a :class:`ValueSink` or
    ``None``. For a large PUT (allowed flags only) the decoder then first
    receives the key_len byte and the key (:meth:`recv_target` hands out just
    those bytes), asks ``value_sink(len(value))`` and receives the value into
    the sink, piece by piece (in place through :meth:`recv_target`, else
    copied); the frame comes out with ``body`` = key_len + key and ``sink`` =
    the filled sink, which its consumer must release. ``None`` from the
    callable means the ordinary path above. :meth:`discard` releases a sink
    being filled (or filled and not yet taken out).

    Usage::

        dec = FrameDecoder()
        dec.feed(data)
        while (frame := dec.next_frame()) is not None:
            ...
    """

    # ringblob._srvcore (the server's request path in C) reads ``_buf``, ``_pos``, ``_big_len`` and
    # ``_error``: it takes frames out of a socket read only while ``len(_buf) == _pos``, ``_big_len``
    # and ``_error`` are None (nothing buffered, no large frame under way: ``recv_target()`` is None),
    # as tests/test_srvcore.py checks. While a value sink is filled (``_sink`` set) it does what
    # recv_target / received_in_place / buffered do for it itself: the sink's target(), the
    # ``_big_fill`` vs ``_big_len`` check, sink.advance(), ``_big_fill += n``; when the value is
    # complete it reads ``_big_head`` and ``_pre_body`` (key_len + key) and takes the frame with
    # ``_finish_big()`` (tests/test_srvcore.py)
    __slots__ = ("max_frame_size", "_buf", "_pos", "_error", "_views", "_big_len", "_big_fill", "_big_head",
                 "_big", "_big_mv", "_chunks", "_budget", "_held", "_sinks", "_sink", "_pre", "_pre_len",
                 "_pre_body")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *, view_bodies: bool = False,
                 budget: ReceiveBudget | None = None,
                 value_sink: Callable[[int], ValueSink | None] | None = None):
        if max_frame_size < HEADER_SIZE:
            raise ValueError(f"max_frame_size must be at least {HEADER_SIZE} bytes, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None
        self._views = view_bodies
        self._big_len: int | None = None  # body length of the large frame being gathered, else None
        self._big_fill = 0  # its body bytes received so far
        self._big_head: tuple[int, int, int] = (0, 0, 0)  # its opcode, flags, request id
        self._big: bytearray | None = None  # view_bodies: the body, filled in place
        self._big_mv: memoryview | None = None
        self._chunks: list = []  # otherwise: the body's pieces, joined once at the end
        self._budget = budget
        self._held = 0  # bytes of ``budget`` that ``_big`` holds
        self._sinks = value_sink
        self._sink: ValueSink | None = None  # the large PUT's value is being received into it
        self._pre: bytearray | None = None  # a large PUT's key_len + key while they arrive (then None)
        self._pre_len = 0
        self._pre_body: bytes | None = None  # key_len + key of the PUT whose value goes to _sink

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        n = len(self._buf) - self._pos
        if self._big_len is not None:
            n += HEADER_SIZE + self._big_fill
        return n

    @property
    def error(self) -> ProtocolError | None:
        """The sticky decoding error, or ``None``."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (any split: one byte at a time works).

        ``bytes`` may be kept by reference (they are immutable); a
        ``bytearray`` or ``memoryview`` is copied, so the caller may reuse it.
        """
        if self._big_len is not None or (self._pos == len(self._buf) and len(data) >= HEADER_SIZE
                                         and self._error is None):
            owned = type(data) is bytes
            with memoryview(data) as mv:
                if mv.format != "B" or mv.ndim != 1:
                    with mv.cast("B") as flat:
                        self._feed_view(flat, owned)
                else:
                    self._feed_view(mv, owned)
            return
        self._append(data)

    def _append(self, data) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def _feed_view(self, mv: memoryview, owned: bool) -> None:
        pos = 0
        n = len(mv)
        if self._big_len is None:  # nothing buffered: a large frame may start right here
            head = self._large_header(mv)
            if head is None:
                self._append(mv)
                return
            self._start_big(*head)
            pos = HEADER_SIZE
        take = min(n - pos, self._big_len - self._big_fill)  # type: ignore[operator]
        if take > 0:
            with mv[pos : pos + take] as part:
                self._put_big(part, owned)
            pos += take
        if pos < n:
            with mv[pos:] as rest:
                self._append(rest)

    def _large_header(self, mv) -> tuple[int, int, int, int] | None:
        """The header at the start of ``mv`` when it is valid and announces a large body (else None:
        the ordinary path decides, and raises for a bad header)."""
        magic, version, opcode, flags, request_id, length = HEADER.unpack_from(mv, 0)
        if (length < LARGE_BODY or magic != MAGIC or version != VERSION
                or HEADER_SIZE + length > self.max_frame_size):
            return None
        return opcode, flags, request_id, length

    def _start_big(self, opcode: int, flags: int, request_id: int, length: int) -> None:
        self._big_head = (opcode, flags, request_id)
        self._big_len = length
        self._big_fill = 0
        if self._sinks is not None and opcode == _PUT_CODE and not flags & ~_PUT_FLAGS:
            # the key first: the value must start at offset 0 of the sink's (aligned) buffers
            self._pre = bytearray(1 + MAX_KEY_SIZE)
            self._pre_len = 0
            return
        self._alloc_big(length)

    def _alloc_big(self, length: int) -> None:
        if self._views and length <= _PREALLOC_MAX:
            if self._budget is not None:
                if not self._budget.take(length):
                    return  # over the shared budget: gather the body as it arrives
                self._held = length
            self._big = bytearray(length)
            self._big_mv = memoryview(self._big)

    def _pre_need(self) -> int:
        """Bytes of key_len + key: 1 until the key_len byte is in."""
        return 1 + self._pre[0] if self._pre_len else 1  # type: ignore[index]

    def _take_pre(self, part: memoryview) -> int:
        """Take what ``part`` holds of the PUT's key_len + key; returns the bytes taken."""
        n = len(part)
        k = 0
        while k < n and self._pre is not None:
            need = self._pre_need()
            t = min(need - self._pre_len, n - k)
            self._pre[self._pre_len : self._pre_len + t] = part[k : k + t]
            self._pre_len += t
            self._big_fill += t
            k += t
            if self._pre_len == self._pre_need():
                self._pre_done()
        return k

    def _pre_done(self) -> None:
        """The PUT's key is in: ask for a sink for its value, else take the ordinary path."""
        pre = bytes(self._pre[: self._pre_len])  # type: ignore[index]
        self._pre = None
        sink = self._sinks(self._big_len - len(pre))  # type: ignore[misc, operator]
        if sink is not None:
            self._sink = sink
            self._pre_body = pre
            return
        self._alloc_big(self._big_len)  # type: ignore[arg-type]
        self._big_fill = 0
        with memoryview(pre) as mv:
            self._store(mv, True)

    def _give_back(self) -> None:
        if self._held:
            self._budget.give(self._held)  # type: ignore[union-attr]
            self._held = 0

    def discard(self) -> None:
        """The stream ended: drop a body being received, return its share of the budget and
        release its value sink (idempotent)."""
        self._give_back()
        if self._big_mv is not None:
            self._big_mv.release()
        self._big = self._big_mv = None
        self._chunks = []
        sink, self._sink = self._sink, None
        self._pre = self._pre_body = None
        self._big_len = None
        self._big_fill = 0
        if sink is not None:
            sink.release()

    def _put_big(self, part: memoryview, owned: bool) -> None:
        if self._pre is not None:
            k = self._take_pre(part)
            if k < len(part):
                with part[k:] as rest:
                    self._store(rest, owned)
            return
        self._store(part, owned)

    def _store(self, part: memoryview, owned: bool) -> None:
        n = len(part)
        if self._sink is not None:
            self._sink.write(part)
        elif self._big is not None:
            self._big_mv[self._big_fill : self._big_fill + n] = part  # type: ignore[index]
        else:  # a piece of immutable bytes is kept by reference (a view that outlives ``part``)
            self._chunks.append(part[:] if owned else bytes(part))
        self._big_fill += n

    def recv_target(self) -> memoryview | None:
        """Where the next socket read may land directly, or ``None`` (read elsewhere and
        :meth:`feed`): the unfilled rest of a large body being received in place
        (``view_bodies``), the missing bytes of a large PUT's key_len + key, or the unfilled rest
        of the current buffer of its value sink (``value_sink``).

        Report the bytes read into it with :meth:`received_in_place`.
        """
        if self._sink is not None:
            return self._sink.target()
        if self._pre is not None:
            with memoryview(self._pre) as mv:
                return mv[self._pre_len : self._pre_need()]
        if self._big is None or self._big_fill >= len(self._big):
            return None
        return self._big_mv[self._big_fill :]  # type: ignore[index]

    def received_in_place(self, nbytes: int) -> bool:
        """``nbytes`` were read into the buffer :meth:`recv_target` returned; returns True when
        they completed the large body (its frame is ready for :meth:`next_frame`).

        Raises ``ValueError`` when they cannot have fit it (nothing is changed then).
        """
        if self._sink is not None:
            if nbytes < 0 or self._big_fill + nbytes > self._big_len:  # type: ignore[operator]
                raise ValueError(f"received_in_place: {nbytes} bytes do not fit the value being received")
            self._sink.advance(nbytes)
            self._big_fill += nbytes
            return self._big_fill == self._big_len
        if self._pre is not None:
            if nbytes < 0 or self._pre_len + nbytes > self._pre_need():
                raise ValueError(f"received_in_place: {nbytes} bytes do not fit the key being received")
            self._pre_len += nbytes
            self._big_fill += nbytes
            if nbytes and self._pre_len == self._pre_need():
                self._pre_done()
            return False  # the value follows (at least LARGE_BODY - 256 bytes of it)
        if self._big is None or nbytes < 0 or self._big_fill + nbytes > len(self._big):
            raise ValueError(f"received_in_place: {nbytes} bytes do not fit the body being received")
        self._big_fill += nbytes
        return self._big_fill == self._big_len

    def _finish_big(self) -> Frame:
        opcode, flags, request_id = self._big_head
        if self._sink is not None:
            frame = Frame(opcode, flags, request_id, self._pre_body, self._sink)  # type: ignore[arg-type]
            self._sink = self._pre_body = None
            self._big_len = None
            self._big_fill = 0
            return frame
        if self._big is not None:
            body = self._big_mv.toreadonly()  # type: ignore[union-attr]
            self._big_mv.release()  # type: ignore[union-attr]
            self._big = self._big_mv = None
            self._give_back()
        else:
            chunks, self._chunks = self._chunks, []
            body = b"".join(chunks)  # the one copy of the body
            if self._views:
                body = memoryview(body)
        self._big_len = None
        self._big_fill = 0
        return Frame(opcode, flags, request_id, body)

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises :class:`~ringblob.errors.ProtocolError` or
        :class:`~ringblob.errors.FrameTooLarge` on a malformed stream.
        """
        if self._error is not None:
            raise self._error
        if self._big_len is not None:
            if self._big_fill < self._big_len:
                return None
            return self._finish_big()
        buf = self._buf
        pos = self._pos
        n = len(buf)
        avail = n - pos
        if avail >= HEADER_SIZE:  # the common case first: a well-formed small frame, all there
            magic, version, opcode, flags, request_id, length = _HEADER_UNPACK_FROM(buf, pos)
            end = pos + HEADER_SIZE + length
            if (end <= n and length < LARGE_BODY and magic == MAGIC and version == VERSION
                    and HEADER_SIZE + length <= self.max_frame_size):
                body = bytes(buf[pos + HEADER_SIZE : end])
                if end == n:
                    buf.clear()
                    self._pos = 0
                else:
                    self._pos = end
                return Frame(opcode, flags, request_id, body)
        if avail < HEADER_SIZE:
            if avail and buf[pos : pos + min(avail, 4)] != MAGIC[: min(avail, 4)]:
                self._fail(ProtocolError, "bad magic: not a ringblob frame (expected b'RBLB')", 0, 0)
            return None
        magic, version, opcode, flags, request_id, length = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            self._fail(ProtocolError, f"bad magic {bytes(magic)!r}: not a ringblob frame (expected b'RBLB')", 0, 0)
        if version != VERSION:
            self._fail(
                ProtocolError,
                f"unsupported protocol version {version}; this side speaks version {VERSION}",
                request_id,
                opcode,
            )
        if HEADER_SIZE + length > self.max_frame_size:
            self._fail(
                FrameTooLarge,
                f"frame of {HEADER_SIZE + length} bytes is over the maximum frame size of "
                f"{self.max_frame_size} bytes; send smaller values or raise max_frame_size",
                request_id,
                opcode,
            )
        if length >= LARGE_BODY:  # move what arrived of the body out of the stream buffer
            self._start_big(opcode, flags, request_id, length)
            start = pos + HEADER_SIZE
            take = min(len(buf) - start, length)
            if take:
                with memoryview(buf) as mv, mv[start : start + take] as part:
                    self._put_big(part, False)
            after = start + take
            if after >= len(buf):
                buf.clear()
            else:
                del buf[:after]
            self._pos = 0
            if self._big_fill < length:
                return None
            return self._finish_big()
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as mv:  # one copy of the body, and the view is released before any resize
            body = bytes(mv[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return Frame(opcode, flags, request_id, body)

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def _fail(self, cls, message: str, request_id: int, opcode: int) -> None:
        self._error = _protocol_error(cls, message, request_id, opcode)
        raise self._error


# -- encoding ------------------------------------------------------------------


def _check_key(key: bytes, what: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidKey(f"{what} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if not 1 <= len(key) <= MAX_KEY_SIZE:
        raise InvalidKey(f"{what} must be 1 to {MAX_KEY_SIZE} bytes long, got {len(key)}")
    return key


def _short(data: bytes, what: str) -> bytes:
    data = bytes(data)
    if len(data) > MAX_KEY_SIZE:
        raise InvalidKey(f"{what} must be at most {MAX_KEY_SIZE} bytes long, got {len(data)}")
    return _U8.pack(len(data)) + data


def encode_frame_parts(opcode: int, request_id: int, body_parts: Sequence[bytes] = (), flags: int = 0) -> list:
    """Header plus ``body_parts`` as a list (no copy of the parts; for ``writelines``/``sendmsg``)."""
    length = 0
    for part in body_parts:
        length += len(part)
    if length > 0xFFFFFFFF:
        raise FrameTooLarge(f"frame body of {length} bytes cannot be encoded (the limit is 4 GiB - 1)")
    return [HEADER.pack(MAGIC, VERSION, opcode, flags, request_id, length), *body_parts]


def encode_frame(opcode: int, request_id: int, body: bytes = b"", flags: int = 0) -> bytes:
    """One frame as bytes: 20-byte header + ``body``."""
    if len(body) > 0xFFFFFFFF:
        raise FrameTooLarge(f"frame body of {len(body)} bytes cannot be encoded (the limit is 4 GiB - 1)")
    return HEADER.pack(MAGIC, VERSION, opcode, flags, request_id, len(body)) + body


def encode_put(request_id: int, key: bytes, value: bytes, *, sync: bool = False, verify: bool = False) -> bytes:
    """PUT request. ``verify``: the key is the BLAKE3 digest of ``value``; the server checks it."""
    key = _check_key(key)
    flags = (FLAG_SYNC if sync else 0) | (FLAG_VERIFY if verify else 0)
    return b"".join(encode_frame_parts(Op.PUT, request_id, [_U8.pack(len(key)), key, value], flags))


def encode_get(request_id: int, key: bytes) -> bytes:
    """GET request; the reply body is the value."""
    key = _check_key(key)
    return encode_frame(Op.GET, request_id, _U8.pack(len(key)) + key)


def encode_has(request_id: int, key: bytes) -> bytes:
    """HAS request; the reply body is one byte, 1 if the key is stored."""
    key = _check_key(key)
    return encode_frame(Op.HAS, request_id, _U8.pack(len(key)) + key)


def encode_delete(request_id: int, key: bytes, *, sync: bool = False) -> bytes:
    """DELETE request (deleting a missing key succeeds)."""
    key = _check_key(key)
    return encode_frame(Op.DELETE, request_id, _U8.pack(len(key)) + key, FLAG_SYNC if sync else 0)


def encode_list(request_id: int, prefix: bytes = b"", start_after: bytes | None = None, limit: int = 0) -> bytes:
    """LIST request: keys starting with ``prefix``, greater than ``start_after``, ascending.

    ``limit`` 0 asks for the server's page size; the server may return fewer.
    """
    if not 0 <= limit <= 0xFFFFFFFF:
        raise ValueError(f"limit must be 0 to 2**32-1, got {limit}")
    body = _short(prefix, "prefix") + _short(start_after or b"", "start_after") + _U32.pack(limit)
    return encode_frame(Op.LIST, request_id, body)


def encode_flush(request_id: int) -> bytes:
    """FLUSH request: every earlier acknowledged write is durable once the reply arrives."""
    return encode_frame(Op.FLUSH, request_id)


def encode_stat(request_id: int) -> bytes:
    """STAT request; the reply body is a UTF-8 JSON object."""
    return encode_frame(Op.STAT, request_id)


def encode_ping(request_id: int, payload: bytes = b"") -> bytes:
    """PING request; the reply echoes ``payload``."""
    return encode_frame(Op.PING, request_id, bytes(payload))


def encode_needs_flush(request_id: int) -> bytes:
    """NEEDS_FLUSH request; the reply body is one byte, 1 if a flush has work to do."""
    return encode_frame(Op.NEEDS_FLUSH, request_id)


def encode_mput(request_id: int, items: Iterable[tuple[bytes, bytes]], *, sync: bool = False) -> bytes:
    """MPUT request: many ``(key, value)`` pairs in one frame."""
    parts: list = [b""]
    count = 0
    for key, value in items:
        key = _check_key(key)
        parts += [_U8.pack(len(key)), key, _U32.pack(len(value)), value]
        count += 1
    parts[0] = _U32.pack(count)
    return b"".join(encode_frame_parts(Op.MPUT, request_id, parts, FLAG_SYNC if sync else 0))


def encode_mget(request_id: int, keys: Iterable[bytes]) -> bytes:
    """MGET request: many keys; the reply reports each key's value or error individually."""
    parts: list = [b""]
    count = 0
    for key in keys:
        key = _check_key(key)
        parts += [_U8.pack(len(key)), key]
        count += 1
    parts[0] = _U32.pack(count)
    return encode_frame(Op.MGET, request_id, b"".join(parts))


def encode_reply_parts(opcode: int, request_id: int, body_parts: Sequence[bytes] = (), status: int = STATUS_OK) -> list:
    """A reply frame as a list of buffers (header first)."""
    return encode_frame_parts(opcode, request_id, body_parts, status)


def encode_reply(opcode: int, request_id: int, body: bytes = b"", status: int = STATUS_OK) -> bytes:
    """A reply frame as bytes."""
    return encode_frame(opcode, request_id, body, status)


# An error message may end with the errno trailer " [errno=N]" (N: 1 to 65535, decimal, no
# leading zero): the error's operating-system error number (docs/PROTOCOL.md, "Errno").
_ERRNO_TRAILER = re.compile(r" \[errno=([1-9][0-9]{0,4})\]\Z")
_MAX_WIRE_ERRNO = 0xFFFF


def _wire_errno(exc: BaseException) -> int | None:
    """The errno an error carries onto the wire (``IOFailed.errno``, ``OSError.errno``), or None."""
    en = getattr(exc, "errno", None)
    if type(en) is int and 0 < en <= _MAX_WIRE_ERRNO:
        return en
    return None


def _error_status(exc: BaseException) -> tuple[int, str]:
    """``(status, message)`` of an error reply; the message ends with the errno trailer when the
    error carries an errno. A message without an errno never ends in the trailer's form (a "."
    is added), so a client never reads an errno that is not there."""
    if isinstance(exc, RingblobError):
        status, message = exc.code, str(exc) or type(exc).__name__
    elif isinstance(exc, OSError):
        status, message = IOFailed.code, f"I/O error: {exc}"
    else:
        status, message = RingblobError.code, f"internal error: {type(exc).__name__}: {exc}"
    en = _wire_errno(exc)
    if en is not None:
        return status, f"{message} [errno={en}]"
    if message.endswith("]") and _ERRNO_TRAILER.search(message):
        return status, message + "."
    return status, message


def split_errno(message: str) -> tuple[str, int | None]:
    """Split an error reply's message into ``(message, errno)``.

    The errno trailer ``" [errno=N]"`` at the end of the message (docs/PROTOCOL.md)
    is removed and N returned; without it the errno is ``None`` and the message
    is returned unchanged (a daemon older than the trailer sends none).
    """
    if message.endswith("]"):
        m = _ERRNO_TRAILER.search(message)
        if m is not None:
            return message[: m.start()], int(m.group(1))
    return message, None


def encode_error_reply(opcode: int, request_id: int, exc: BaseException) -> bytes:
    """An error reply: status = the error's ``code``, body = its UTF-8 message.

    ``OSError`` maps to :class:`~ringblob.errors.IOFailed`, anything else to
    :class:`~ringblob.errors.RingblobError` (code 1). An error with an
    ``errno`` (``IOFailed``, ``OSError``; 1 to 65535) ends its message with
    the errno trailer ``" [errno=N]"`` (see :func:`split_errno`).
    """
    status, message = _error_status(exc)
    return encode_frame(opcode, request_id, message.encode("utf-8", "replace"), status)


def bool_body(value: bool) -> bytes:
    """One byte, 1 or 0 (HAS and NEEDS_FLUSH replies)."""
    return b"\x01" if value else b"\x00"


def list_reply_body(keys: Sequence[bytes], more: bool) -> bytes:
    """LIST reply body: u8 flags (bit 0 = more), u32 count, count x (u8 len, key)."""
    parts = [_U8.pack(LIST_MORE if more else 0), _U32.pack(len(keys))]
    for key in keys:
        parts += [_U8.pack(len(key)), key]
    return b"".join(parts)


def mget_reply_body(results: Sequence) -> list:
    """MGET reply body as buffers: u32 count, then per key u16 status, u32 length, bytes.

    ``results`` holds, per requested key in order, the value (bytes) or an
    exception (its code and message are sent).
    """
    parts: list = [_U32.pack(len(results))]
    for res in results:
        if isinstance(res, BaseException):
            status, message = _error_status(res)
            data = message.encode("utf-8", "replace")
        else:
            status, data = STATUS_OK, res
        parts += [_MGET_ITEM.pack(status, len(data)), data]
    return parts


# -- request parsing (server side) -------------------------------------------------


@dataclass(slots=True)
class Request:
    """A parsed request. Which fields are set depends on ``op``:

    PUT: key, value (or, for a value received into a :class:`ValueSink`,
    ``sink``, with ``value`` empty: the consumer must release it); GET/HAS/DELETE:
    key; LIST: prefix, start_after (None when absent), limit; PING: value (the
    payload); MPUT: items (list of ``(key, value)``); MGET: keys.
    ``sync``/``verify`` come from the flags.
    """

    op: Op
    request_id: int
    flags: int = 0
    key: bytes = b""
    value: bytes = b""
    prefix: bytes = b""
    start_after: bytes | None = None
    limit: int = 0
    items: list | None = None
    keys: list | None = None
    sink: Any = None

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def verify(self) -> bool:
        return bool(self.flags & FLAG_VERIFY)


class _Reader:
    __slots__ = ("data", "pos", "frame")

    def __init__(self, frame: Frame):
        self.data = frame.body
        self.pos = 0
        self.frame = frame

    def fail(self, message: str):
        f = self.frame
        raise _protocol_error(
            ProtocolError, f"malformed {op_name(f.opcode).upper()} request {f.request_id}: {message}", f.request_id, f.opcode
        )

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            self.fail(f"body ends inside {what} (needs {end} bytes, has {len(self.data)})")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def short(self, what: str) -> bytes:
        out = self.take(self.u8(what + " length"), what)
        return out if type(out) is bytes else bytes(out)  # keys are bytes even from a memoryview body

    def rest(self) -> bytes:
        out = self.data[self.pos :] if self.pos else self.data
        self.pos = len(self.data)
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            self.fail(f"{len(self.data) - self.pos} unexpected bytes after the body")


def parse_request(frame: Frame) -> Request:
    """Interpret a request frame's body.

    Raises :class:`~ringblob.errors.ProtocolError` (with ``request_id`` and
    ``opcode``) for an unknown opcode, flags the opcode does not define, or a
    body that is truncated or has trailing bytes. Key *validity* (empty keys)
    is left to the store, which answers :class:`~ringblob.errors.InvalidKey`.
    A frame's ``sink`` (a PUT value received apart) becomes the request's
    ``sink``; when this raises, the caller still owns (and releases) it.
    """
    opcode = frame.opcode
    op = _OP_BY_CODE.get(opcode)
    if op is None:
        raise _protocol_error(
            ProtocolError, f"unknown opcode {opcode} in request {frame.request_id}", frame.request_id, opcode
        )
    body = frame.body
    if not frame.flags:  # fast paths of the hot requests; anything unusual takes the checked path below
        if op in _KEY_OPS:
            n = len(body)
            if n > 1 and body[0] == n - 1:
                key = body[1:]
                return Request(op, frame.request_id, 0, key if type(key) is bytes else bytes(key))
        elif op is Op.PING:
            return Request(op, frame.request_id, 0, value=body)
    if op is Op.PUT and body and len(body) > body[0] and not frame.flags & ~_FLAGS_ALLOWED[op]:
        k = body[0] + 1
        key = body[1:k]
        key = key if type(key) is bytes else bytes(key)
        if frame.sink is not None:  # the value went to a sink; the body is key_len + key
            if len(body) != k:
                _Reader(frame).fail(f"{len(body) - k} unexpected bytes after the key of a PUT whose value "
                                    "was received apart")
            return Request(op, frame.request_id, frame.flags, key, b"", sink=frame.sink)
        # a large body arrives as a read-only memoryview (see FrameDecoder): the value stays a view
        return Request(op, frame.request_id, frame.flags, key, body[k:])
    return _parse_checked(frame, op)


def _parse_checked(frame: Frame, op: Op) -> Request:
    """The general request parser (every op, every error); :func:`parse_request` takes
    shortcuts for well-formed GET/HAS/DELETE/PING/PUT bodies that give the same result."""
    opcode = frame.opcode
    if frame.flags & ~_FLAGS_ALLOWED.get(op, 0):
        raise _protocol_error(
            ProtocolError,
            f"flags 0x{frame.flags:04x} are not defined for {op.name} (request {frame.request_id})",
            frame.request_id,
            opcode,
        )
    req = Request(op, frame.request_id, frame.flags)
    r = _Reader(frame)
    if op is Op.PUT:
        req.key = r.short("key")
        if frame.sink is not None:
            req.sink = frame.sink  # the value was received apart: nothing may follow the key
        else:
            req.value = r.rest()
    elif op in (Op.GET, Op.HAS, Op.DELETE):
        req.key = r.short("key")
    elif op is Op.LIST:
        req.prefix = r.short("prefix")
        start_after = r.short("start_after")
        req.start_after = start_after or None
        req.limit = r.u32("limit")
    elif op is Op.PING:
        req.value = r.rest()
    elif op is Op.MPUT:
        count = r.u32("item count")
        if count > len(frame.body) // 6 + 1:
            r.fail(f"item count {count} does not fit a body of {len(frame.body)} bytes")
        items = []
        for _ in range(count):
            key = r.short("key")
            value = r.take(r.u32("value length"), "value")
            items.append((key, value))
        req.items = items
    elif op is Op.MGET:
        count = r.u32("key count")
        if count > len(frame.body) // 2 + 1:
            r.fail(f"key count {count} does not fit a body of {len(frame.body)} bytes")
        req.keys = [r.short("key") for _ in range(count)]
    r.end()
    return req


# -- reply decoding (client side) ----------------------------------------------------


def reply_error(frame: Frame) -> RingblobError | None:
    """The exception a reply frame carries (``None`` for status 0).

    The class comes from :func:`ringblob.errors.error_for_code`, so a client
    raises the same class the store raised; the message is the body, less
    the errno trailer, whose number becomes the exception's ``errno``
    (:class:`~ringblob.errors.IOFailed` takes it as its ``errno`` argument;
    ``IOFailed.errno`` is ``None`` when the reply carries none).
    """
    if frame.flags == STATUS_OK:
        return None
    cls = error_for_code(frame.flags)
    message, en = split_errno(frame.body.decode("utf-8", "replace"))
    if issubclass(cls, IOFailed):
        return cls(message, en)
    try:
        exc = cls(message)
    except TypeError:  # a class with an unusual constructor
        exc = RingblobError(message)
    if en is not None:
        exc.errno = en
    return exc


def raise_for_status(frame: Frame) -> Frame:
    """Raise the reply's error if its status is not 0; else return the frame."""
    exc = reply_error(frame)
    if exc is not None:
        raise exc
    return frame


def _reply_fail(message: str) -> ProtocolError:
    return _protocol_error(ProtocolError, f"malformed reply: {message}")


def decode_bool_reply(body: bytes) -> bool:
    """HAS / NEEDS_FLUSH reply body -> bool."""
    if len(body) != 1 or body[0] > 1:
        raise _reply_fail(f"expected one byte 0 or 1, got {bytes(body[:8])!r}")
    return body[0] == 1


def decode_list_reply(body: bytes) -> tuple[list[bytes], bool]:
    """LIST reply body -> ``(keys, more)``. When ``more``, ask again with ``start_after=keys[-1]``."""
    if len(body) < 5:
        raise _reply_fail("LIST reply shorter than 5 bytes")
    flags = body[0]
    (count,) = _U32.unpack_from(body, 1)
    pos = 5
    keys = []
    for _ in range(count):
        if pos >= len(body):
            raise _reply_fail("LIST reply ends inside a key")
        n = body[pos]
        end = pos + 1 + n
        if end > len(body):
            raise _reply_fail("LIST reply ends inside a key")
        keys.append(bytes(body[pos + 1 : end]))
        pos = end
    if pos != len(body):
        raise _reply_fail("trailing bytes after the LIST keys")
    return keys, bool(flags & LIST_MORE)


def decode_mget_reply(body: bytes) -> list:
    """MGET reply body -> list (in request order) of values (bytes) or exceptions (e.g. NotFound)."""
    if len(body) < 4:
        raise _reply_fail("MGET reply shorter than 4 bytes")
    (count,) = _U32.unpack_from(body, 0)
    pos = 4
    out: list = []
    for _ in range(count):
        if pos + _MGET_ITEM.size > len(body):
            raise _reply_fail("MGET reply ends inside an item header")
        status, length = _MGET_ITEM.unpack_from(body, pos)
        pos += _MGET_ITEM.size
        if pos + length > len(body):
            raise _reply_fail("MGET reply ends inside an item")
        data = bytes(body[pos : pos + length])
        pos += length
        if status == STATUS_OK:
            out.append(data)
        else:
            out.append(reply_error(Frame(Op.MGET, status, 0, data)))
    if pos != len(body):
        raise _reply_fail("trailing bytes after the MGET items")
    return out


def decode_stat_reply(body: bytes) -> dict:
    """STAT reply body (UTF-8 JSON object) -> dict."""
    try:
        out = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _reply_fail(f"STAT reply is not UTF-8 JSON: {exc}") from None
    if not isinstance(out, dict):
        raise _reply_fail("STAT reply is not a JSON object")
    return out
