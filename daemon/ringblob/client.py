"""Clients of the ringblob daemon: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak the protocol of docs/PROTOCOL.md over the daemon's Unix socket,
framing every request and reply with the shared codec of
:mod:`ringblob.protocol`. Both offer the same operations::

    with ringblob.Client("./var/ringblob.sock") as c:
        c.put(b"page:1", data, sync=True)
        digest = c.put_cas(data)          # key = BLAKE3 digest, checked by the daemon
        c.get(b"page:1"); c.has(digest); c.delete(b"page:1")
        for key in c.list(prefix=b"page:"): ...
        if c.needs_flush(): c.flush()

    async with ringblob.AsyncClient("./var/ringblob.sock") as c:
        values = await asyncio.gather(*(c.get(k) for k in keys))   # pipelined

Keys are ``bytes`` (1 to 255 of them) or ``str`` (encoded as UTF-8). Errors
are the store's own classes (:mod:`ringblob.errors`; the reply status is the
class's ``code``), so ``NotFound`` (also a ``KeyError``), ``DigestMismatch``,
``TooLarge``, ``ReadOnly``... come back as raised by the daemon. A connection
that closes before a reply arrives raises
:class:`~ringblob.errors.ConnectionLost`, and so does every later call on
that client. Failing to connect raises the ``OSError`` of ``connect(2)``
(``FileNotFoundError`` when nothing is at the path, ``ConnectionRefusedError``
when no daemon listens there).

:class:`Client` has one request in flight at a time (use one per thread);
:class:`AsyncClient` pipelines: any number of requests may be in flight on
its one connection, replies are matched to them by request id and may arrive
in any order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

import blake3

from . import protocol
from .errors import ConnectionLost, InvalidKey, NotFound, RingblobError, TooLarge, values_or_raise
from .protocol import DEFAULT_MAX_FRAME_SIZE, HEADER, HEADER_SIZE, FrameDecoder, Op

__all__ = ["Client", "AsyncClient", "DEFAULT_SOCKET", "default_socket_path"]

DEFAULT_SOCKET = "./var/ringblob.sock"
DEFAULT_MAX_REPLY_SIZE = 1 << 30  # largest reply frame a client accepts (bytes): MGET replies can be big
_CHUNK = 1 << 20  # bytes per send/recv call when reporting progress
_SEND_ALONE = 64 * 1024  # AsyncClient: request frames this large are written at once, not queued
_MPUT_ITEM_OVERHEAD = 1 + 4  # u8 key length + u32 value length
_MGET_ITEM_OVERHEAD = 1 + 6  # u8 key length in the request; u16 status + u32 length in the reply

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def default_socket_path() -> str:
    """``$RINGBLOB_SOCKET`` when set, else ``./var/ringblob.sock`` (the daemon's embedded default)."""
    return os.environ.get("RINGBLOB_SOCKET") or DEFAULT_SOCKET


def _key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidKey(f"a key is bytes or str, not {type(key).__name__}")


def _value(value: Any) -> bytes | bytearray | memoryview:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    raise TypeError(f"a value is bytes-like, not {type(value).__name__}")


def _items(items: Mapping | Iterable) -> list[tuple[bytes, Any]]:
    pairs = items.items() if isinstance(items, Mapping) else items
    return [(_key(k), _value(v)) for k, v in pairs]


def _batches(items: list[tuple[bytes, Any]], max_frame_size: int) -> Iterator[list[tuple[bytes, Any]]]:
    """Split MPUT items so each frame stays under ``max_frame_size`` (one oversized item goes alone)."""
    budget = max_frame_size - HEADER_SIZE - 4
    batch: list = []
    used = 0
    for key, value in items:
        size = _MPUT_ITEM_OVERHEAD + len(key) + len(value)
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append((key, value))
        used += size
    if batch:
        yield batch


def _key_batches(keys: list[bytes], max_frame_size: int, max_keys: int = 4096) -> Iterator[list[bytes]]:
    """Split MGET keys so each request frame stays under ``max_frame_size``."""
    budget = max_frame_size - HEADER_SIZE - 4
    batch: list = []
    used = 0
    for key in keys:
        size = _MGET_ITEM_OVERHEAD + len(key)
        if batch and (used + size > budget or len(batch) >= max_keys):
            yield batch
            batch, used = [], 0
        batch.append(key)
        used += size
    if batch:
        yield batch


class _ClientBase:
    """What :class:`Client` and :class:`AsyncClient` share: the constructor's arguments,
    checked and defaulted in one place, the request-id counter and the lost-connection reason.

    Raises ``ValueError`` for a ``timeout`` that is not ``None`` or positive
    (seconds) and for a ``max_frame_size`` / ``max_reply_size`` below the
    20-byte frame header; ``TypeError`` for arguments of the wrong type.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike | None,
        timeout: float | None,
        max_frame_size: int,
        max_reply_size: int,
    ):
        if timeout is not None and not timeout > 0:  # TypeError for a non-number; NaN fails too
            raise ValueError(f"timeout must be None (wait forever) or a positive number of seconds, got {timeout!r}")
        for name, size in (("max_frame_size", max_frame_size), ("max_reply_size", max_reply_size)):
            if not isinstance(size, int) or isinstance(size, bool):
                raise TypeError(f"{name} must be an int (bytes), not {type(size).__name__}")
            if size < HEADER_SIZE:
                raise ValueError(f"{name} must be at least {HEADER_SIZE} bytes (one frame header), got {size}")
        self.socket_path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.max_reply_size = max_reply_size
        self._ids = itertools.count(1)
        self._lost: str | None = None


class Client(_ClientBase):
    """A blocking client over one Unix-socket connection to the daemon.

    ``socket_path``: the daemon's socket (default :func:`default_socket_path`).
    ``timeout``: seconds to wait for each send or receive (``None`` waits
    forever); a timeout raises ``TimeoutError`` and closes the connection
    (its reply stream can no longer be trusted). ``max_frame_size``: the size
    ``put_many``/``get_many`` request frames are cut to (bytes; keep it at or
    below the daemon's ``max_frame_size``). ``max_reply_size``: the largest
    reply frame accepted (bytes; a larger one raises FrameTooLarge and drops
    the connection). A ``timeout`` that is not ``None`` or positive, or a size
    below the 20-byte frame header, raises ``ValueError`` (before connecting).

    Connects at construction (raising ``OSError`` from ``connect(2)``). Use
    it as a context manager or call :meth:`close`. One request is in flight
    at a time; threads sharing a client take turns (a lock), so give each
    thread its own client, or use :class:`AsyncClient`, for concurrency.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike | None = None,
        *,
        timeout: float | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
    ):
        super().__init__(socket_path, timeout, max_frame_size, max_reply_size)
        self._decoder = FrameDecoder(max_reply_size)
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    # -- plumbing --------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent). Later calls raise ConnectionLost."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._lost is None:
                self._lost = "the client was closed"
            sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def _broken(self, why: str) -> ConnectionLost:
        self._lost = why
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        return ConnectionLost(why)

    def _call(self, opcode: int, frame: bytes, progress: Progress | None = None, *, receive_progress: bool = False):
        """Send one request frame and return its (successful) reply frame; raise its error otherwise."""
        with self._lock:
            return self._call_locked(opcode, frame, progress, receive_progress)

    def _call_locked(self, opcode: int, frame: bytes, progress: Progress | None, receive_progress: bool):
        sock = self._sock
        if sock is None:
            raise ConnectionLost(f"connection to the daemon at {self.socket_path} is closed ({self._lost})")
        request_id = HEADER.unpack_from(frame)[4]
        name = Op(opcode).name
        try:
            self._send(sock, frame, None if receive_progress else progress)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # the daemon may have answered (e.g. FrameTooLarge) before closing: prefer its reason
            reply = self._salvage(sock)
            lost = self._broken(
                f"the daemon at {self.socket_path} closed the connection while {name} request "
                f"{request_id} was being sent ({exc.strerror or exc})"
            )
            if reply is not None and reply.request_id in (request_id, 0):
                protocol.raise_for_status(reply)
            raise lost from None
        except TimeoutError:
            raise self._broken(f"timed out sending {name} request {request_id}") from None
        try:
            reply = self._receive(sock, request_id, name, progress if receive_progress else None)
        except TimeoutError:
            self._broken(f"timed out waiting for the reply to {name} request {request_id}")
            raise
        except protocol.ProtocolError:
            self._broken(f"the reply stream to {name} request {request_id} was malformed")
            raise
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._broken(
                f"the connection to the daemon at {self.socket_path} was reset before the reply to "
                f"{name} request {request_id} ({exc.strerror or exc})"
            ) from None
        if reply.request_id != request_id:
            # request id 0: an error the daemon could not address (it closes the connection next)
            lost = self._broken(
                f"the daemon answered request {reply.request_id} while {name} request {request_id} was awaited"
            )
            if reply.request_id == 0:
                protocol.raise_for_status(reply)
            raise lost
        return protocol.raise_for_status(reply)

    @staticmethod
    def _send(sock: socket.socket, frame: bytes, progress: Progress | None) -> None:
        if progress is None:
            sock.sendall(frame)
            return
        view = memoryview(frame)
        total = len(view)
        for start in range(0, total, _CHUNK):
            sock.sendall(view[start : start + _CHUNK])
            progress(min(start + _CHUNK, total), total)

    def _receive(self, sock: socket.socket, request_id: int, name: str, progress: Progress | None):
        decoder = self._decoder
        head = b""
        total = 0
        got = 0
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            data = sock.recv(_CHUNK)
            if not data:
                raise self._broken(
                    f"the daemon at {self.socket_path} closed the connection before replying to "
                    f"{name} request {request_id}"
                )
            decoder.feed(data)
            if progress is not None:
                got += len(data)
                if len(head) < HEADER_SIZE:
                    head += data[: HEADER_SIZE - len(head)]
                    if len(head) == HEADER_SIZE:
                        total = HEADER_SIZE + HEADER.unpack(head)[5]
                if total:
                    progress(min(got, total), total)

    def _salvage(self, sock: socket.socket):
        """After a failed send, read a reply the daemon may have sent before closing (or None)."""
        try:
            sock.settimeout(0.5)
            while True:
                frame = self._decoder.next_frame()
                if frame is not None:
                    return frame
                data = sock.recv(65536)
                if not data:
                    return None
                self._decoder.feed(data)
        except (OSError, RingblobError):
            return None

    # -- operations --------------------------------------------------------------

    def put(self, key: bytes | str, value, *, sync: bool = False, verify: bool = False, progress: Progress | None = None) -> None:
        """Store ``value`` (bytes-like) under ``key``.

        ``sync``: return only once the blob and its journal record are durable
        (fdatasync, shared by concurrent syncs: group commit); otherwise it is
        durable at the next :meth:`flush`. ``verify``: the key is the 32-byte
        BLAKE3 digest of the value and the daemon checks it (DigestMismatch,
        nothing stored). ``progress(done, total)`` is called as bytes are sent.
        Raises TooLarge, NoSpace, ReadOnly, InvalidKey, DigestMismatch, ConnectionLost.
        """
        frame = protocol.encode_put(next(self._ids), _key(key), _value(value), sync=sync, verify=verify)
        self._call(Op.PUT, frame, progress)

    def put_cas(self, value, *, sync: bool = False, progress: Progress | None = None) -> bytes:
        """Store ``value`` under its BLAKE3 digest (computed here, checked by the daemon); return the 32-byte digest."""
        digest = blake3.blake3(_value(value)).digest()
        self.put(digest, value, sync=sync, verify=True, progress=progress)
        return digest

    def get(self, key: bytes | str, *, progress: Progress | None = None) -> bytes:
        """The value stored under ``key``. Raises NotFound (a KeyError), Corrupt, ConnectionLost.

        ``progress(done, total)`` is called as the reply arrives.
        """
        frame = protocol.encode_get(next(self._ids), _key(key))
        return self._call(Op.GET, frame, progress, receive_progress=True).body

    def has(self, key: bytes | str) -> bool:
        """Whether a blob is stored under ``key`` (answered from the index; the blob is not read)."""
        reply = self._call(Op.HAS, protocol.encode_has(next(self._ids), _key(key)))
        return protocol.decode_bool_reply(reply.body)

    def delete(self, key: bytes | str, *, sync: bool = False) -> None:
        """Delete the blob under ``key``; deleting a missing key is not an error. ``sync`` as in :meth:`put`."""
        self._call(Op.DELETE, protocol.encode_delete(next(self._ids), _key(key), sync=sync))

    def list(self, prefix: bytes | str = b"", *, page_size: int = 0) -> Iterator[bytes]:
        """Iterate over the keys starting with ``prefix`` in ascending byte order.

        Fetches one page (``page_size`` keys; 0 = the daemon's page size) per
        LIST request, lazily, resuming after the last key of the previous page.
        """
        prefix = _key(prefix) if prefix else b""
        start_after = None
        while True:
            frame = protocol.encode_list(next(self._ids), prefix, start_after, page_size)
            keys, more = protocol.decode_list_reply(self._call(Op.LIST, frame).body)
            yield from keys
            if not more or not keys:
                return
            start_after = keys[-1]

    def flush(self) -> None:
        """Make every earlier acknowledged write durable (a no-op without fdatasync when nothing is pending)."""
        self._call(Op.FLUSH, protocol.encode_flush(next(self._ids)))

    def needs_flush(self) -> bool:
        """The daemon's conservative hint: True when a :meth:`flush` has work to do."""
        reply = self._call(Op.NEEDS_FLUSH, protocol.encode_needs_flush(next(self._ids)))
        return protocol.decode_bool_reply(reply.body)

    def stat(self) -> dict:
        """The daemon's state as a dict (engine, blob count, used and free bytes, ...)."""
        return protocol.decode_stat_reply(self._call(Op.STAT, protocol.encode_stat(next(self._ids))).body)

    def ping(self, payload: bytes = b"") -> bytes:
        """Round-trip a PING; returns the echoed ``payload``."""
        return self._call(Op.PING, protocol.encode_ping(next(self._ids), payload)).body

    def put_many(self, items: Mapping | Iterable[tuple[bytes | str, Any]], *, sync: bool = False) -> None:
        """Store many ``(key, value)`` pairs (or a mapping) with MPUT frames.

        Items are cut into frames of at most ``max_frame_size`` bytes. ``sync``
        makes each frame's items durable before its reply. On an error the
        items of earlier frames are stored; what the failing frame stored is
        up to the daemon (see docs/PROTOCOL.md).
        """
        for batch in _batches(_items(items), self.max_frame_size):
            self._call(Op.MPUT, protocol.encode_mput(next(self._ids), batch, sync=sync))

    def get_many(self, keys: Iterable[bytes | str]) -> list[bytes | None]:
        """The values of ``keys`` in order, ``None`` for a key with no blob (MGET).

        Any other per-key error (e.g. Corrupt) is raised. A batch whose reply
        the daemon refuses as too large for a frame (TooLarge) is split in
        halves, down to single GETs.
        """
        out: list[bytes | None] = []
        for batch in _key_batches([_key(k) for k in keys], self.max_frame_size):
            out += self._mget(batch)
        return out

    def _mget(self, batch: list[bytes]) -> list[bytes | None]:
        try:
            reply = self._call(Op.MGET, protocol.encode_mget(next(self._ids), batch))
        except TooLarge:
            if len(batch) == 1:
                try:
                    return [self.get(batch[0])]
                except NotFound:
                    return [None]
            mid = len(batch) // 2
            return self._mget(batch[:mid]) + self._mget(batch[mid:])
        return values_or_raise(protocol.decode_mget_reply(reply.body))


class AsyncClient(_ClientBase):
    """An asyncio client with pipelining over one Unix-socket connection.

    Any number of requests may be in flight at once (``asyncio.gather`` them);
    each carries a request id and its reply completes it, in whatever order
    the daemon answers. Writes wait for the socket's buffer to drain, so a
    fast producer is held back (backpressure) rather than buffering without
    bound. Arguments as :class:`Client`; ``timeout`` applies to connecting only
    (wrap calls in ``asyncio.timeout`` for per-request limits).

    Connect with ``await client.connect()`` or ``async with AsyncClient(path)
    as client``. Cancelling a call abandons its reply (the connection stays
    usable).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike | None = None,
        *,
        timeout: float | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
    ):
        super().__init__(socket_path, timeout, max_frame_size, max_reply_size)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        # request frames queued in this loop turn, sent together at its end (see _send)
        self._out: list = []
        self._out_bytes = 0
        self._out_handle: asyncio.Handle | None = None

    async def connect(self) -> "AsyncClient":
        """Open the connection (``OSError`` from ``connect(2)`` if nothing listens); returns ``self``."""
        if self._writer is not None:
            return self
        coro = asyncio.open_unix_connection(self.socket_path, limit=_CHUNK)
        if self.timeout is not None:
            reader, writer = await asyncio.wait_for(coro, self.timeout)
        else:
            reader, writer = await coro
        self._reader, self._writer = reader, writer
        self._lost = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"ringblob-client {self.socket_path}")
        return self

    async def close(self) -> None:
        """Close the connection; calls still waiting raise ConnectionLost. Idempotent."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._drop_out()
        self._fail_all("the client was closed")
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    # -- plumbing --------------------------------------------------------------

    def _send(self, writer: asyncio.StreamWriter, frame) -> None:
        """Hand ``frame`` to the socket in order: frames of one loop turn are queued and written
        together by one ``writelines`` at the turn's end (one ``send`` for a burst of pipelined
        calls instead of one each); a frame of ``_SEND_ALONE`` bytes or more goes at once, after
        those queued before it."""
        if len(frame) >= _SEND_ALONE:
            self._flush_out()
            writer.write(frame)
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_handle is None:
            self._out_handle = asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Write the frames queued by :meth:`_send` (a ``call_soon`` callback, or before a frame
        that goes at once)."""
        out = self._drop_out()
        writer = self._writer
        if out and writer is not None and self._lost is None:
            writer.writelines(out)

    def _drop_out(self) -> list:
        """Take the queued frames out of the queue (and its pending flush); returns them. Alone,
        it forgets them: the connection is closing and their calls fail."""
        handle, self._out_handle = self._out_handle, None
        if handle is not None:
            handle.cancel()
        out, self._out = self._out, []
        self._out_bytes = 0
        return out

    def _fail_all(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(why))

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self.max_reply_size)
        reader = self._reader
        assert reader is not None
        last_error: BaseException | None = None
        why = f"the daemon at {self.socket_path} closed the connection"
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    fut = self._pending.pop(frame.request_id, None)
                    if fut is None:
                        # a reply to a cancelled call, or an error the daemon could not address
                        if frame.status:
                            last_error = protocol.reply_error(frame)
                        continue
                    if fut.done():
                        continue
                    if frame.status:
                        fut.set_exception(protocol.reply_error(frame))
                    else:
                        fut.set_result(frame)
        except protocol.ProtocolError as exc:
            why = f"the daemon at {self.socket_path} sent a malformed reply ({exc}); the connection was dropped"
        except OSError as exc:
            why = f"the connection to the daemon at {self.socket_path} failed: {exc.strerror or exc}"
        except asyncio.CancelledError:
            why = "the client was closed"
            raise
        finally:
            if last_error is not None:
                why += f" (its last word: {type(last_error).__name__}: {last_error})"
            self._fail_all(why + " before the reply arrived")
            writer = self._writer
            if writer is not None and why != "the client was closed":
                writer.close()

    async def _call(self, frame: bytes):
        writer = self._writer
        if writer is None or self._lost is not None:
            if writer is None and self._lost is None:
                raise ConnectionLost(f"the client for {self.socket_path} is not connected; use `await client.connect()` or `async with`")
            raise ConnectionLost(f"connection to the daemon at {self.socket_path} is lost ({self._lost})")
        request_id = HEADER.unpack_from(frame)[4]
        fut = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            # backpressure: while the socket's send buffer is over its high-water mark, wait
            # before adding to it, so many calls in flight do not pile their frames up in memory
            transport = writer.transport
            while (transport.get_write_buffer_size() + self._out_bytes > self._high_water(transport)
                   and not transport.is_closing()):
                self._flush_out()
                await writer.drain()
            self._send(writer, frame)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            # The daemon may have answered (e.g. FrameTooLarge) before closing; the read loop
            # delivers that reply, or ConnectionLost at EOF. Wait briefly for either.
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except TimeoutError:
                self._pending.pop(request_id, None)
                raise ConnectionLost(
                    f"the daemon at {self.socket_path} closed the connection while a request was being sent "
                    f"({getattr(exc, 'strerror', None) or exc})"
                ) from None
        try:
            return await fut
        except asyncio.CancelledError:
            self._pending.pop(request_id, None)
            raise

    @staticmethod
    def _high_water(transport) -> int:
        try:
            return transport.get_write_buffer_limits()[1]
        except (AttributeError, NotImplementedError):
            return 64 * 1024

    # -- operations --------------------------------------------------------------

    async def put(self, key: bytes | str, value, *, sync: bool = False, verify: bool = False) -> None:
        """Store ``value`` under ``key``; as :meth:`Client.put`."""
        await self._call(protocol.encode_put(next(self._ids), _key(key), _value(value), sync=sync, verify=verify))

    async def put_cas(self, value, *, sync: bool = False) -> bytes:
        """Store ``value`` under its BLAKE3 digest (checked by the daemon); return the 32-byte digest."""
        digest = blake3.blake3(_value(value)).digest()
        await self.put(digest, value, sync=sync, verify=True)
        return digest

    async def get(self, key: bytes | str) -> bytes:
        """The value under ``key``; raises NotFound (a KeyError), Corrupt, ConnectionLost."""
        return (await self._call(protocol.encode_get(next(self._ids), _key(key)))).body

    async def has(self, key: bytes | str) -> bool:
        """Whether a blob is stored under ``key``."""
        reply = await self._call(protocol.encode_has(next(self._ids), _key(key)))
        return protocol.decode_bool_reply(reply.body)

    async def delete(self, key: bytes | str, *, sync: bool = False) -> None:
        """Delete the blob under ``key`` (a missing key is not an error)."""
        await self._call(protocol.encode_delete(next(self._ids), _key(key), sync=sync))

    async def list(self, prefix: bytes | str = b"", *, page_size: int = 0) -> AsyncIterator[bytes]:
        """``async for key in client.list(prefix)``: keys in ascending byte order, one LIST page at a time."""
        prefix = _key(prefix) if prefix else b""
        start_after = None
        while True:
            reply = await self._call(protocol.encode_list(next(self._ids), prefix, start_after, page_size))
            keys, more = protocol.decode_list_reply(reply.body)
            for key in keys:
                yield key
            if not more or not keys:
                return
            start_after = keys[-1]

    async def flush(self) -> None:
        """Make every earlier acknowledged write durable."""
        await self._call(protocol.encode_flush(next(self._ids)))

    async def needs_flush(self) -> bool:
        """The daemon's conservative hint: True when a flush has work to do."""
        reply = await self._call(protocol.encode_needs_flush(next(self._ids)))
        return protocol.decode_bool_reply(reply.body)

    async def stat(self) -> dict:
        """The daemon's state as a dict."""
        return protocol.decode_stat_reply((await self._call(protocol.encode_stat(next(self._ids)))).body)

    async def ping(self, payload: bytes = b"") -> bytes:
        """Round-trip a PING; returns the echoed ``payload``."""
        return (await self._call(protocol.encode_ping(next(self._ids), payload))).body

    async def put_many(self, items: Mapping | Iterable[tuple[bytes | str, Any]], *, sync: bool = False) -> None:
        """Store many pairs with MPUT frames (cut to ``max_frame_size``, sent pipelined)."""
        frames = [
            protocol.encode_mput(next(self._ids), batch, sync=sync)
            for batch in _batches(_items(items), self.max_frame_size)
        ]
        results = await asyncio.gather(*(self._call(f) for f in frames), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def get_many(self, keys: Iterable[bytes | str]) -> list[bytes | None]:
        """The values of ``keys`` in order, ``None`` where no blob is stored (MGET, pipelined).

        A batch whose reply the daemon refuses as too large for a frame
        (TooLarge) is split in halves, down to single GETs.
        """
        batches = _key_batches([_key(k) for k in keys], self.max_frame_size)
        parts = await asyncio.gather(*(self._mget(b) for b in batches))
        return [v for part in parts for v in part]

    async def _mget(self, batch: list[bytes]) -> list[bytes | None]:
        try:
            reply = await self._call(protocol.encode_mget(next(self._ids), batch))
        except TooLarge:
            if len(batch) == 1:
                try:
                    return [await self.get(batch[0])]
                except NotFound:
                    return [None]
            mid = len(batch) // 2
            left, right = await asyncio.gather(self._mget(batch[:mid]), self._mget(batch[mid:]))
            return left + right
        return values_or_raise(protocol.decode_mget_reply(reply.body))
