"""The ringblob daemon's server: asyncio over a Unix socket, one event loop, one ring.

Data path: a connection's bytes go to the shared sans-I/O codec
(:mod:`ringblob.protocol`; the connection is a ``BufferedProtocol``, so a
large request body is read straight into a buffer of its own size, and a
large PUT's value straight into fixed buffers of the store's engine, see
:class:`_Connection`); every
frame decoded from one read is dispatched before the loop turns. A GET or
PUT of a value that fits one fixed buffer goes to the store's ``get_nowait``
/ ``put_nowait``, a PUT whose value was received into leased fixed buffers to
``put_leased_nowait``: the read, the value's write or the group-commit item
is queued at once and a callback answers it (no coroutine, no future, no
Task). Anything else runs its coroutine (``store.get``, else the server's
handler), started at once and stepped by hand — no Task; its SQEs are queued
in the turn that decoded it.
Requests answered without I/O (PING, HAS, STAT, NEEDS_FLUSH) are answered
inline. The per-request path is in C (``ringblob._srvcore``, the base classes
of :class:`Server` and :class:`_Connection`): while a connection's decoder
holds nothing, complete small GET and PUT frames are taken straight out of the
socket read (no decoder copy, no ``Frame`` or ``Request`` per request) and
started as above; everything else — other opcodes, partial, large or
malformed frames, a limit reached — goes through the decoder and
:meth:`_Connection._dispatch` below, from the first frame C does not take.
Completions, reply headers, counters and metrics are counted in C too. The engine submits the turn's SQEs with one
``io_uring_enter``; completions wake the loop through the ring's eventfd.
Replies completed in the same loop turn are written to their connection with
one ``writelines`` (headers and values as separate buffers, no join).

Limits and backpressure (see :class:`ServerConfig`): maximum frame size,
requests in flight per connection and in total (the server stops reading a
connection — ``pause_reading`` — while at a limit), maximum connections
(refused with a ``Busy`` frame), idle timeout, and a write high-water mark
per connection (a client that sends but does not read stops being read).
A malformed or oversized frame gets one error reply and its connection is
closed once the replies to its earlier requests are out; nothing else is
affected.

Access: socket file mode and group, and an optional allowlist of peer uids /
gids checked with ``SO_PEERCRED``. A stale socket file (nobody accepting) is
replaced; a live one is not.

Lifecycle: :meth:`Server.start` (bind or adopt a socket-activated listener,
start the /metrics listener), :meth:`Server.serve_forever` (until
:meth:`Server.request_stop`, wired to SIGTERM / SIGINT by
:func:`run_server`), :meth:`Server.shutdown` (stop accepting, finish
requests in flight, ``store.close()`` = flush + checkpoint + close the ring).
systemd: ``READY=1`` once the store is open and the socket listens,
``STOPPING=1`` on shutdown, ``WATCHDOG=1`` every half ``WatchdogSec``.

Entry points for ``ringblob serve``: :func:`run` (synchronous; picks the
event loop, opens the store through a callback, serves, returns the exit
status) and :func:`run_server` (inside a running loop). A development entry
``python -m ringblob.server --data PATH --socket PATH`` runs the real store.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import functools
import grp
import inspect
import json
import logging
import os
import resource
import signal
import socket
import stat as stat_mod
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from . import __version__
from . import protocol as P
from .errors import (
    AccessDenied,
    Busy,
    ConfigError,
    FrameTooLarge,
    ProtocolError,
    ServerShuttingDown,
    TooLarge,
)
from .metrics import Metrics, serve_metrics

try:
    from ._srvcore import ConnCore, ServerCore
except ImportError as exc:  # pragma: no cover - only in a checkout whose extensions are not built
    raise ImportError(
        f"ringblob's compiled request path (ringblob._srvcore) does not import ({exc}); build the extensions "
        "with `make build` (or `python setup.py build_ext --inplace`)"
    ) from exc

__all__ = ["ServerConfig", "Server", "run_server", "run", "new_event_loop", "main"]

log = logging.getLogger("ringblob.server")

try:  # H2's systemd helpers (sd_notify, watchdog); absent -> notifications are no-ops
    from . import systemd as _systemd
except ImportError:  # pragma: no cover - only before ringblob.systemd exists
    _systemd = None


def _sd_notify(state: str) -> None:
    if _systemd is not None:
        _systemd.notify(state)


def _sd_watchdog_interval() -> float | None:
    if _systemd is not None:
        return _systemd.watchdog_interval()
    return None


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_OP_NAMES = {op: P.op_name(op) for op in P.Op}
_GET = P.Op.GET
_PUT = P.Op.PUT
_MGET = P.Op.MGET
_HEADER_PACK = P.HEADER.pack
_MAGIC, _VERSION, _HEADER_SIZE = P.MAGIC, P.VERSION, P.HEADER_SIZE
_perf_counter = time.perf_counter
_current_task = asyncio.current_task

# cap on the bytes all connections together hold in large request-body buffers allocated from a
# frame header before the body arrived (protocol.ReceiveBudget); 64 bodies of 4 MiB
RECEIVE_BUDGET = 256 * 1024 * 1024
# the read that follows a large body received in place: a frame header and a PUT's key with room
# to spare, so the next large value is read in place rather than copied from the scratch buffer
SCRATCH_HEAD = 4096


@dataclass
class ServerConfig:
    """Settings of the server (sizes in bytes, times in seconds).

    ``socket_path``            Unix socket to bind (ignored when a listening socket is passed,
                               e.g. from systemd socket activation). Default ``./var/ringblob.sock``.
    ``socket_mode``            file mode of the socket, default ``0o600`` (owner only).
    ``socket_group``           group owning the socket file: a name, a numeric gid (int or
                               digits), or ``None``/``""`` to keep the daemon's group.
    ``allow_uids``/``allow_gids``  peer uids / gids (``SO_PEERCRED``) allowed to connect; both
                               empty = anyone who can open the socket. When either is set, a peer
                               must match one uid or one gid, else it gets ``AccessDenied``.
    ``max_frame_size``         largest frame (header + body) accepted, default 72 MiB; larger
                               ones get ``FrameTooLarge`` and the connection closes.
    ``max_receive_bytes``      bytes all connections together may hold in request frames received
                               and not yet dispatched (partial bodies included), default 1 GiB.
                               Over it, the connections holding such bytes are read one at a time
                               (each in turn until its frame is complete), so memory stays bounded
                               by about this much + one ``max_frame_size`` + one socket read per
                               connection, whatever the clients send, and every frame still
                               completes. Large-body buffers allocated ahead of their bodies have a
                               cap of their own (``RECEIVE_BUDGET``).
    ``max_connections``        connections open at once; more get ``Busy`` and are closed.
    ``max_in_flight_per_conn`` requests in flight on one connection before it stops being read.
    ``max_in_flight_total``    requests in flight over all connections before reading stops.
    ``idle_timeout``           close a connection with nothing in flight and no traffic this long
                               (seconds; 0 disables).
    ``metrics_addr``           ``HOST:PORT`` for ``/metrics`` (``[::1]:9464`` for IPv6), or a
                               ``(host, port)`` tuple; ``""``/``None`` disables it. Default
                               ``127.0.0.1:9464``; port 0 picks a free port (see
                               ``Server.metrics_address``).
    ``socket_activation``      take the listening socket from systemd (``LISTEN_FDS``) when
                               started that way (then ``socket_path`` is not bound).
    ``write_high_water``       unsent reply bytes on one connection above which the server stops
                               reading it until the client has read (backpressure); also the
                               budget of GET/MGET value bytes being read for one connection.
    ``list_page_max``          most keys in one LIST reply.
    ``shutdown_timeout``       seconds to wait for requests in flight at shutdown.
    ``loop``                   ``"auto"`` (uvloop when installed), ``"uvloop"`` or ``"asyncio"``.
    ``backlog``                listen(2) backlog.
    """

    socket_path: str = "./var/ringblob.sock"
    socket_mode: int = 0o600
    socket_group: str | int | None = None
    allow_uids: Sequence[int] = field(default_factory=tuple)
    allow_gids: Sequence[int] = field(default_factory=tuple)
    max_frame_size: int = P.DEFAULT_MAX_FRAME_SIZE
    max_receive_bytes: int = 1 << 30
    max_connections: int = 1024
    max_in_flight_per_conn: int = 256
    max_in_flight_total: int = 4096
    idle_timeout: float | None = 300.0
    metrics_addr: str | tuple | None = "127.0.0.1:9464"
    socket_activation: bool = True
    write_high_water: int = 4 * 1024 * 1024
    list_page_max: int = 1000
    shutdown_timeout: float = 30.0
    loop: str = "auto"
    backlog: int = 512

    def validate(self) -> "ServerConfig":
        """Check ranges; return ``self``. Raises :class:`~ringblob.errors.ConfigError` naming the field."""
        if self.max_frame_size < 4096:
            raise ConfigError(f"max_frame_size: {self.max_frame_size} is below the minimum 4096 bytes")
        if self.max_receive_bytes < 1 << 20:
            raise ConfigError(f"max_receive_bytes: {self.max_receive_bytes} is below the minimum 1 MiB")
        for name in ("max_connections", "max_in_flight_per_conn", "max_in_flight_total", "list_page_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.idle_timeout is None:
            self.idle_timeout = 0.0
        if self.idle_timeout < 0:
            raise ConfigError(f"idle_timeout: must be >= 0 seconds (0 disables), got {self.idle_timeout}")
        if self.loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError(f"loop: {self.loop!r} is not one of auto, uvloop, asyncio")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"socket_mode: {oct(self.socket_mode)} is outside 0000..0777")
        parse_metrics_addr(self.metrics_addr)
        return self


def parse_metrics_addr(value: str | tuple | None) -> tuple[str, int] | None:
    """``"HOST:PORT"`` or ``(host, port)`` -> ``(host, port)``; ``""``/``None`` -> ``None``. Raises ConfigError."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"metrics_addr: expected (host, port), got {value!r}")
        return str(value[0]), int(value[1])
    text = (value or "").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics_addr: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464; \"\" disables it)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _resolve_gid(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r} on this host; create it or use a numeric gid") from None


# -- the listening socket ---------------------------------------------------------------


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True  # EAGAIN (backlog full) etc.: someone is there
    else:
        return True
    finally:
        probe.close()


def bind_unix_socket(path: str, mode: int = 0o600, group: str | int | None = None, backlog: int = 512) -> socket.socket:
    """Create, bind and listen on a Unix stream socket at ``path`` with ``mode`` and ``group``.

    A stale socket file (nothing accepting on it: a dead daemon's) is removed
    and replaced. Raises :class:`~ringblob.errors.ConfigError` when a live
    daemon answers on ``path`` or ``path`` exists and is not a socket, and
    ``OSError`` for other failures (missing directory, permissions).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat_mod.S_ISSOCK(st.st_mode):
            raise ConfigError(f"socket: {path} exists and is not a socket; remove it or choose another --socket")
        if _socket_is_live(path):
            raise ConfigError(
                f"socket: {path} is in use by a running daemon (it accepted a connection); "
                "stop that daemon or choose another --socket"
            )
        log.info("replacing stale socket file %s (nothing is listening on it)", path)
        os.unlink(path)
    gid = _resolve_gid(group)
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"socket: the path {path!r} is longer than the 107 bytes a Unix socket address holds; "
                          "use a shorter (e.g. relative) path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # never more open than 0600 between bind and chmod
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except PermissionError as exc:
                raise ConfigError(
                    f"socket_group: cannot give {path} to group {group!r} (gid {gid}): {exc.strerror}; "
                    "the daemon's user must be a member of that group"
                ) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


FD_RESERVE = 64  # descriptors the daemon needs besides its client connections (data file, ring, metrics, ...)


def ensure_fd_limit(max_connections: int, reserve: int = FD_RESERVE) -> int:
    """Raise the soft RLIMIT_NOFILE to ``max_connections + reserve`` (at most the hard limit); return it.

    Without this, a soft limit below ``max_connections`` (1024 is a common
    default) makes accept(2) fail with EMFILE before the daemon can answer the
    extra connections with ``Busy``: uvloop then closes them without a word and
    the asyncio loop leaves them waiting in the backlog. When even the hard
    limit is too low, a warning says how to fix it.
    """
    need = max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:  # pragma: no cover - refused by a sandbox
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, new, exc)
            new = soft
        else:
            log.info("raised the file descriptor limit (RLIMIT_NOFILE) from %d to %d for max_connections %d",
                     soft, new, max_connections)
    if new < need:
        log.warning("the file descriptor limit (RLIMIT_NOFILE %d) is below max_connections %d + %d: connections "
                    "past it are dropped without a Busy frame; raise LimitNOFILE= (systemd) or ulimit -n, or lower "
                    "max_connections", new, max_connections, reserve)
    return new


# -- one client connection ----------------------------------------------------------------

_P_CONN = 1  # this connection's in-flight limit
_P_TOTAL = 2  # the daemon's in-flight limit
_P_WRITE = 4  # too many unsent reply bytes (transport pause_writing)
_P_BYTES = 8  # the replies being produced would pass the connection's reply-byte budget
_P_RECV = 16  # received frames of all connections hold over max_receive_bytes, and it is not this one's turn


class _Connection(ConnCore, asyncio.BufferedProtocol):
    """asyncio protocol of one client: decode, dispatch, coalesce replies.

    A ``BufferedProtocol``: socket reads land in the server's shared scratch
    buffer (consumed before the next read of any connection), except while
    a large request body is being received, when they land directly where
    the decoder says (``FrameDecoder.recv_target``). A PUT value larger than
    one fixed buffer of the store's engine is received into fixed buffers the
    store leases for it (``FrameDecoder(value_sink=store.lease_value)``; the
    key first, then the value buffer by buffer, each buffer hashed with
    BLAKE3 when full) and written from there by ``store.put_leased_nowait``
    (a callback answers it, as for ``put_nowait``; ``store.put_leased`` when
    it declines): no per-request buffer, no copy between the socket and the disk. When the
    store declines (values held in buffers at its cap, the pool short) or for
    other large bodies, the body goes into a ``bytearray`` of its own size
    (``view_bodies=True``), read in place too. A connection lost mid-body
    releases what it held (``connection_lost`` → ``decoder.discard()``).
    """

    def __init__(self, server: "Server"):
        self.server = server
        self.loop = server._loop
        self.decoder = P.FrameDecoder(server.config.max_frame_size, view_bodies=True,
                                      budget=server._recv_budget, value_sink=server._value_sink)
        self._in_place = False  # the buffer get_buffer handed out is the decoder's large body
        self._head_next = False  # the next read into the scratch buffer reads one frame head only
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.reply_reserved = 0  # bytes of GET/MGET replies dispatched and not yet queued for writing
        self.held: P.Request | None = None  # decoded, waiting for the reply-byte budget
        self.recv_held = 0  # bytes of received frames the decoder holds (Server._recv_total counts them)
        self.out: list = []
        self.out_bytes = 0  # reply body bytes queued this loop turn, not yet handed to the transport
        self.out_total = 0  # the same with the frame headers: what the next writelines sends
        self.stalled = False
        self.flush_scheduled = False
        self.paused = 0
        self.reading_paused = False
        self.closing = False  # dispatch no more requests; close once replies are out
        self.eof = False  # the client half-closed: serve what was received, then close
        self.closed = False
        self.rejected = False
        self.peer: tuple[int, int, int] | None = None
        self.last_activity = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self.server
        self.transport = transport  # type: ignore[assignment]
        self.peer = _peer_credentials(transport)
        if srv.stopping:
            self._reject(ServerShuttingDown("the daemon is shutting down; retry when it is back"), "shutting_down")
            return
        if len(srv.connections) >= srv.config.max_connections:
            self._reject(
                Busy(f"too many connections ({srv.config.max_connections} open, the max_connections limit); retry later"),
                "busy",
            )
            return
        if not srv._peer_allowed(self.peer):
            pid, uid, gid = self.peer or (0, -1, -1)
            self._reject(
                AccessDenied(f"peer uid {uid} gid {gid} (pid {pid}) is not on the daemon's allow_uids/allow_gids list"),
                "access_denied",
            )
            return
        srv.connections.add(self)
        srv.metrics.connections.set(len(srv.connections))
        srv.metrics.connections_accepted.inc()
        transport.set_write_buffer_limits(high=srv.config.write_high_water)  # type: ignore[attr-defined]
        self.last_activity = self.loop.time()
        if srv.config.idle_timeout > 0:
            self.idle_handle = self.loop.call_at(self.last_activity + srv.config.idle_timeout, self._idle_check)

    def _reject(self, exc: Exception, reason: str) -> None:
        self.rejected = True
        self.closing = True
        if reason in ("busy", "access_denied"):
            self.server.metrics.connections_rejected.labels(reason).inc()
        log.info("refusing connection from %s: %s", _fmt_peer(self.peer), exc)
        assert self.transport is not None
        self.transport.write(P.encode_error_reply(0, 0, exc))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Bytes from a transport that does not use the buffered protocol interface."""
        if self.closing:
            return
        self.server.metrics.bytes_received += len(data)
        self.last_activity = self.loop.time()
        self.decoder.feed(data)
        self._pump()  # (accounts what the decoder holds now)

    def eof_received(self) -> bool | None:
        # the client will send nothing more: answer every request received, then close
        self.eof = True
        self._maybe_close()
        return True  # keep the transport open for our replies

    def pause_writing(self) -> None:
        self._pause(_P_WRITE)

    def resume_writing(self) -> None:
        self._unpause(_P_WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self.decoder.discard()  # a body cut short gives its share of the receive budget (its buffers) back
        self._account_received()
        self.out.clear()
        self.out_bytes = self.out_total = 0
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        srv = self.server
        srv._waiting.discard(self)
        if not self.rejected:
            srv.connections.discard(self)
            srv.metrics.connections.set(len(srv.connections))
        if self.in_flight:
            log.debug("client %s went away with %d requests in flight; their replies are dropped",
                      _fmt_peer(self.peer), self.in_flight)
        srv._conn_closed.set()

    # -- reading and dispatch --

    def _pump(self) -> None:
        """Dispatch every complete buffered frame, up to the in-flight limits; then account the
        bytes the decoder still holds (``max_receive_bytes``)."""
        try:
            self._dispatch()
        finally:
            if self.decoder.buffered != self.recv_held:
                self._account_received()

    def _account_received(self) -> None:
        """Tell the server how many bytes of received frames this connection holds now."""
        n = 0 if self.closed else self.decoder.buffered
        old, self.recv_held = self.recv_held, n
        if n != old:
            self.server._received_changed(self, n - old)

    def _dispatch(self) -> None:
        srv = self.server
        cfg = srv.config
        value_size = srv._value_size
        get_nowait = srv._get_nowait
        while not self.closing:
            # replies pile up unsent, or over the write high water (stalled: go on once they are
            # written), or an in-flight limit: dispatch nothing more for now (ConnCore._limits_ok)
            if not self._may_dispatch():
                return
            if self.held is not None:
                req, self.held = self.held, None
            else:
                frame = None
                try:
                    frame = self.decoder.next_frame()
                    if frame is None:
                        break
                    req = P.parse_request(frame)
                except ProtocolError as exc:
                    if frame is not None and frame.sink is not None:
                        frame.sink.release()
                    self._protocol_error(exc)
                    return
            op = req.op
            if op is _GET and get_nowait is not None and not srv.stopping and self._get_now(req, get_nowait):
                self.paused &= ~_P_BYTES
                continue
            if srv.stopping:
                cost = 0
            elif op is _GET and value_size is not None:  # Server._reply_cost of a GET, inline
                try:
                    cost = (value_size(req.key) or 0) + _HEADER_SIZE
                except Exception:
                    cost = _HEADER_SIZE
            elif op is _MGET:
                cost = srv._reply_cost(req)
            else:
                cost = 0
            if cost and self.reply_reserved and self.reply_reserved + cost > cfg.write_high_water:
                # the values being read for this client would pass its budget: wait for them
                self.held = req
                self._pause(_P_BYTES)
                return
            self.paused &= ~_P_BYTES
            if srv.stopping:
                if req.sink is not None:
                    req.sink.release()
                self._queue_reply(req.op, req.request_id, [b"the daemon is shutting down; retry when it is back"],
                                  ServerShuttingDown.code)
                srv.metrics.observe_request(_OP_NAMES[req.op], ServerShuttingDown.code, 0.0)
                continue
            inline = srv._inline.get(op)
            if inline is not None:  # answered without touching the ring: no task needed
                self._serve_inline(inline, req)
                continue
            self.in_flight += 1
            srv.in_flight += 1
            srv.metrics.requests_in_flight += 1
            self.reply_reserved += cost
            if op is not _GET or srv._eager_get:  # no Task: the request's SQEs are queued in this very turn
                self._start(req, cost)
                continue
            # the task leaves srv._tasks itself when _serve ends (no done callback per request)
            srv._tasks.add(self.loop.create_task(self._serve(req, cost)))
        self._unpause(_P_CONN | _P_TOTAL)
        if self.eof:
            self._maybe_close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        srv = self.server
        reason = "too_large" if isinstance(exc, FrameTooLarge) else "malformed"
        srv.metrics.rejected_frames.labels(reason).inc()
        log.info("closing connection from %s: %s", _fmt_peer(self.peer), exc)
        self.closing = True
        self._pause_reading_now()
        rid = getattr(exc, "request_id", 0)
        op = getattr(exc, "opcode", 0)
        status, message = P._error_status(exc)
        self._queue_reply(op if 0 <= op <= 255 else 0, rid, [message.encode("utf-8", "replace")], status)

    def _serve_inline(self, handler: Callable[[P.Request], list], req: P.Request) -> None:
        t0 = time.perf_counter()
        try:
            parts = handler(req)
            status = 0
        except Exception as exc:
            status, message = P._error_status(exc)
            if status == 1:
                log.exception("internal error serving %s request %d", req.op.name, req.request_id)
            parts = [message.encode("utf-8", "replace")]
        self.server.metrics.observe_request(_OP_NAMES[req.op], status, time.perf_counter() - t0)
        self._queue_reply(req.op, req.request_id, parts, status)

    async def _serve(self, req: P.Request, cost: int = 0) -> None:
        srv = self.server
        t0 = _perf_counter()
        try:
            if req.op is _GET:  # the hot path: Server._op_get without its own coroutine
                parts = [await srv.store.get(req.key)]
            else:
                parts = await srv._handlers[req.op](req)
            status = 0
        except asyncio.CancelledError:
            srv._tasks.discard(_current_task())
            parts, status = [b"request cancelled: the daemon is shutting down"], ServerShuttingDown.code
            self._finish(req, parts, status, t0, cost)
            raise
        except Exception as exc:
            status, message = P._error_status(exc)
            if status == 1:
                log.exception("internal error serving %s request %d", req.op.name, req.request_id)
            parts = [message.encode("utf-8", "replace")]
        srv._tasks.discard(_current_task())
        self._finish(req, parts, status, t0, cost)

    # -- requests without a Task: the handler's coroutine is stepped by hand --

    def _start(self, req: P.Request, cost: int) -> None:
        """Serve a request. A PUT whose value fits one fixed buffer goes to the store's
        ``put_nowait`` (the group-commit item is queued now and a ``_srvcore.Done`` answers it: no
        coroutine, no future; GETs take the same way earlier, in :meth:`_get_now`); a PUT whose
        value was received into fixed buffers (``req.sink``) to ``put_leased_nowait`` (the data
        write and then the group-commit item queued by C callbacks), else (the store declines:
        no room yet, a value over one submit window) to ``store.put_leased`` through the PUT
        handler. Anything else runs its coroutine (``store.get`` for a
        GET, else the Server's handler) up to its first suspension now — the store's work and its SQEs happen in the
        turn that decoded the request, in decoding order — and resuming it from the done callback
        of the future it awaits, as a Task would, without a Task's cost.

        Consequence for the code such a coroutine runs (the Server's handlers, ``store.get``
        and every store method a handler awaits): ``asyncio.current_task()`` is ``None``
        there, so it must not use ``asyncio.timeout()``, ``TaskGroup`` or anything else that
        needs the current Task; awaiting futures, other coroutines, ``gather`` and
        ``sleep(0)`` are fine. (A store whose ``get`` is not a coroutine function is served
        with a Task per GET instead.)"""
        srv = self.server
        t0 = _perf_counter()
        op = req.op
        # the store takes a PUT with no coroutine if it can: put_nowait, or put_leased_nowait for a
        # value received into leased buffers (a sink); else the handler's coroutine (put_leased)
        if op is _PUT:
            if req.sink is None:
                put_nowait = srv._put_nowait
                value = req.value
            else:
                put_nowait = srv._put_leased_nowait
                value = req.sink
            if put_nowait is not None:
                done = self._new_done(req, cost, t0)
                try:
                    queued = put_nowait(req.key, value, done, sync=req.sync, verify=req.verify)
                except Exception as err:
                    self._failed(req, err, t0, cost)
                    return
                if queued:
                    srv._eager[done] = None  # in flight (shutdown waits for it); done() removes it
                    return
        self._start_coro(req, cost, t0)

    def _start_coro(self, req: P.Request, cost: int, t0: float) -> None:
        """Run ``req``'s coroutine (``store.get`` for a GET, else the Server's handler) up to its first
        suspension now (see :meth:`_start`); ``t0``: when the request was started (perf_counter s)."""
        srv = self.server
        coro = srv.store.get(req.key) if req.op is _GET else srv._handlers[req.op](req)
        srv._eager[coro] = None
        self._step(coro, req, cost, t0, None)

    def _step(self, coro, req: P.Request, cost: int, t0: float, exc: BaseException | None) -> None:
        srv = self.server
        try:
            y = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration as stop:
            del srv._eager[coro]
            self._finish(req, [stop.value] if req.op is _GET else stop.value, 0, t0, cost)
            return
        except asyncio.CancelledError:
            del srv._eager[coro]
            self._finish(req, [b"request cancelled: the daemon is shutting down"], ServerShuttingDown.code, t0, cost)
            return
        except Exception as err:
            del srv._eager[coro]
            self._failed(req, err, t0, cost)
            return
        if getattr(y, "_asyncio_future_blocking", None):  # awaiting a future (Task.__step's protocol)
            y._asyncio_future_blocking = False
            srv._eager[coro] = y
            y.add_done_callback(functools.partial(self._resumed, coro, req, cost, t0))
        elif y is None:  # a bare yield (asyncio.sleep(0)): go on in the next turn
            srv._eager[coro] = None
            self.loop.call_soon(self._step, coro, req, cost, t0, None)
        else:
            self._step(coro, req, cost, t0, RuntimeError(f"serving {req.op.name}: the coroutine yielded {y!r}, "
                                                          "not a future"))

    def _failed(self, req: P.Request, err: BaseException, t0: float, cost: int) -> None:
        """Answer ``req`` with the status and message of the error serving it raised."""
        status, message = P._error_status(err)
        if status == 1:
            log.error("internal error serving %s request %d", req.op.name, req.request_id, exc_info=err)
        self._finish(req, [message.encode("utf-8", "replace")], status, t0, cost)

    def _resumed(self, coro, req: P.Request, cost: int, t0: float, fut: asyncio.Future) -> None:
        self._step(coro, req, cost, t0, None)  # the coroutine's await takes the future's result or error

    def _maybe_close(self) -> None:
        if self.closed or self.in_flight or self.out or self.flush_scheduled:
            return
        if not self.closing and (self.paused or self.stalled):
            return  # half-closed, but received frames may still wait for dispatch
        assert self.transport is not None
        self.transport.close()  # flushes what is buffered, then closes

    # -- flow control --

    def begin_shutdown(self) -> None:
        """Stop reading; answer frames received but not started with ServerShuttingDown;
        close once every request in flight is answered."""
        self._pause_reading_now()
        if not self.closing and not self.closed:
            if self.held is not None:
                req, self.held = self.held, None
                self._queue_reply(req.op, req.request_id,
                                  [b"the daemon is shutting down; this request was not started"],
                                  ServerShuttingDown.code)
            try:
                while (frame := self.decoder.next_frame()) is not None:
                    if frame.sink is not None:
                        frame.sink.release()
                    self._queue_reply(frame.opcode, frame.request_id,
                                      [b"the daemon is shutting down; this request was not started"],
                                      ServerShuttingDown.code)
            except ProtocolError:
                pass
        self.closing = True
        self._maybe_close()

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed:
            return
        timeout = self.server.config.idle_timeout
        now = self.loop.time()
        deadline = self.last_activity + timeout
        if self.in_flight == 0 and not self.out and now >= deadline:
            log.debug("closing idle connection from %s (idle %.0f s)", _fmt_peer(self.peer), now - self.last_activity)
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self.idle_handle = self.loop.call_at(max(deadline, now + min(timeout, 1.0)), self._idle_check)


def _peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    return _PEERCRED.unpack(raw)


def _fmt_peer(peer: tuple[int, int, int] | None) -> str:
    if not peer:
        return "an unknown peer"
    return f"pid {peer[0]} (uid {peer[1]}, gid {peer[2]})"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


# -- the server ---------------------------------------------------------------------------


class Server(ServerCore):
    """Serves one store over a Unix socket.

    ``store`` is an open :class:`ringblob.store.BlobStore` (or anything with
    its async API); the server closes it in :meth:`shutdown`. ``listen_sock``
    is an already listening socket (systemd socket activation); without it,
    :meth:`start` binds ``config.socket_path``. ``metrics`` is the
    :class:`~ringblob.metrics.Metrics` the store was opened with as its
    observer (a new one is made when omitted).
    """

    def __init__(self, store: Any, config: ServerConfig | None = None, *, metrics: Metrics | None = None,
                 listen_sock: socket.socket | None = None):
        self.store = store
        # the store's index lookup of a value's length, for the reply-byte budget (None: no budget)
        self._value_size = getattr(store, "value_size", None)
        self.config = (config or ServerConfig()).validate()
        self.metrics = metrics or Metrics()
        self.metrics.attach_store(store)
        self.listen_sock = listen_sock
        # where socket reads land (one read is decoded before the next starts, on any connection)
        self._scratch = memoryview(bytearray(256 * 1024))
        self._scratch_head = self._scratch[:SCRATCH_HEAD]
        # bytes all connections may hold in large-body buffers allocated when a header arrives,
        # before the body did (over it, bodies are gathered as they arrive)
        self._recv_budget = P.ReceiveBudget(RECEIVE_BUDGET)
        # large PUT values go straight into fixed buffers the store leases (store.lease_value,
        # capped and never waited for by the store), written by store.put_leased
        self._value_sink = (getattr(store, "lease_value", None)
                            if inspect.iscoroutinefunction(getattr(store, "put_leased", None)) else None)
        self.connections: set[_Connection] = set()
        self.in_flight = 0
        self.stopping = False
        self.socket_path: str | None = None  # the path we bound (and unlink at shutdown)
        self.metrics_address: tuple[str, int] | None = None
        self._socket_ino: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        # requests served without a Task (see _Connection._start): coroutine -> the future it awaits
        self._eager: dict = {}
        self._eager_get = inspect.iscoroutinefunction(getattr(store, "get", None))
        # the store's GET without a coroutine (BlobStore.get_nowait), when it has one
        self._get_nowait = getattr(store, "get_nowait", None) if self._eager_get else None
        self._put_nowait = getattr(store, "put_nowait", None)
        # a large PUT's value received into leased buffers, written and queued with no coroutine
        self._put_leased_nowait = getattr(store, "put_leased_nowait", None) if self._value_sink else None
        self._waiting: set[_Connection] = set()
        # max_receive_bytes: bytes of received, undispatched frames over all connections; over the
        # cap one connection (the owner) goes on reading until its frame is complete, the others
        # that take in more wait in FIFO order (see _received_changed)
        self._recv_total = 0
        self._recv_owner: _Connection | None = None
        self._recv_waiters: collections.deque[_Connection] = collections.deque()
        self.receive_pauses = 0  # connections paused because of max_receive_bytes (cumulative)
        self._stop_requested: asyncio.Event | None = None
        self._conn_closed: asyncio.Event | None = None
        self._watchdog: asyncio.Task | None = None
        self._shutdown_task: asyncio.Task | None = None
        allow_u = frozenset(int(u) for u in (self.config.allow_uids or ()))
        allow_g = frozenset(int(g) for g in (self.config.allow_gids or ()))
        self._allow = (allow_u, allow_g) if (allow_u or allow_g) else None
        # operations answered synchronously (no I/O): no task, no in-flight slot
        self._inline: dict[P.Op, Callable[[P.Request], list]] = {
            P.Op.PING: self._op_ping_now,
            P.Op.NEEDS_FLUSH: self._op_needs_flush_now,
            P.Op.STAT: self._op_stat_now,
        }
        has = getattr(store, "has", None)
        has_is_plain = not inspect.iscoroutinefunction(has)
        if has_is_plain:
            self._inline[P.Op.HAS] = self._op_has_now
        # HAS and PING of a plain read are answered in C (ConnCore._take_scratch) the same way
        self._has_now = has if has_is_plain and callable(has) else None
        self._handlers: dict[P.Op, Callable[[P.Request], Awaitable[list]]] = {
            P.Op.PUT: self._op_put,
            P.Op.GET: self._op_get,
            P.Op.HAS: self._op_has,
            P.Op.DELETE: self._op_delete,
            P.Op.LIST: self._op_list,
            P.Op.FLUSH: self._op_flush,
            P.Op.MPUT: self._op_mput,
            P.Op.MGET: self._op_mget,
        }

    # -- lifecycle --

    async def start(self) -> None:
        """Listen on the socket and start /metrics (and the systemd watchdog when configured).

        Raises :class:`~ringblob.errors.ConfigError` (a live daemon owns the
        socket path, bad group or metrics address) or ``OSError``.
        """
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._conn_closed = asyncio.Event()
        cfg = self.config
        maddr = parse_metrics_addr(cfg.metrics_addr)
        ensure_fd_limit(cfg.max_connections)
        sock = self.listen_sock
        if sock is None:
            sock = bind_unix_socket(cfg.socket_path, cfg.socket_mode, cfg.socket_group, cfg.backlog)
            self.socket_path = cfg.socket_path
            st = os.stat(cfg.socket_path)
            self._socket_ino = (st.st_dev, st.st_ino)
        else:
            sock.setblocking(False)
        try:
            self._server = await self._loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=cfg.backlog)
            if maddr is not None:
                try:
                    self._metrics_server = await serve_metrics(self.metrics, *maddr)
                except OSError as exc:
                    raise ConfigError(
                        f"metrics_addr: cannot listen on {cfg.metrics_addr} ({exc.strerror or exc}); "
                        "choose another HOST:PORT or \"\" to disable metrics"
                    ) from exc
                self.metrics_address = self._metrics_server.sockets[0].getsockname()[:2]
        except BaseException:
            await self._close_listeners()
            raise
        interval = _sd_watchdog_interval()
        if interval:
            self._watchdog = self._loop.create_task(self._watchdog_loop(interval))
        where = self.socket_path or _sock_name(sock)
        log.info("listening on %s (%s event loop)%s", where, type(self._loop).__module__.split(".")[0],
                 f"; metrics on http://{_fmt_addr(self.metrics_address)}/metrics" if self.metrics_address else "")

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (signal-safe via ``loop.add_signal_handler``)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve_forever(self) -> None:
        """Serve until :meth:`request_stop`, then :meth:`shutdown`."""
        assert self._stop_requested is not None, "call start() first"
        await self._stop_requested.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, answer requests in flight, close connections, close the store.

        ``store.close()`` flushes (every acknowledged write becomes durable),
        writes a checkpoint and closes the ring. Idempotent.
        """
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        self.stopping = True
        _sd_notify("STOPPING=1")
        log.info("shutting down: %d connections, %d requests in flight", len(self.connections), self.in_flight)
        if self._server is not None:
            self._server.close()
        self._unlink_socket()
        for conn in list(self.connections):
            conn.begin_shutdown()
        deadline = time.monotonic() + self.config.shutdown_timeout
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_timeout)
            if pending:
                log.warning("%d requests still in flight after %.0f s; cancelling them", len(pending),
                            self.config.shutdown_timeout)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=5)
        while self._eager and time.monotonic() < deadline:  # requests in flight without a Task
            await asyncio.sleep(0.01)
        if self._eager:
            log.warning("%d requests still in flight after %.0f s; cancelling them", len(self._eager),
                        self.config.shutdown_timeout)
            for fut in list(self._eager.values()):
                if fut is not None:
                    fut.cancel()
            end = time.monotonic() + 5
            while self._eager and time.monotonic() < end:
                await asyncio.sleep(0.01)
        # let queued replies go out and the transports close
        deadline = time.monotonic() + 5.0
        while self.connections and time.monotonic() < deadline:
            self._conn_closed.clear()
            for conn in list(self.connections):
                if conn.closed:
                    self.connections.discard(conn)
                else:
                    conn._maybe_close()
            if not self.connections:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._conn_closed.wait(), timeout=0.2)
        for conn in list(self.connections):
            if conn.transport is not None and not conn.closed:
                conn.transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.metrics.detach_store()
        try:
            await self.store.close()
        finally:
            await self._close_listeners()
            log.info("shutdown complete: store flushed, checkpointed and closed")

    async def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._metrics_server.wait_closed(), 2)
        self._unlink_socket()

    def _unlink_socket(self) -> None:
        path = self.socket_path
        if path is None or self._socket_ino is None:
            return
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._socket_ino:  # still ours, not a successor's
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._socket_ino = None

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            _sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- helpers used by connections --

    def _peer_allowed(self, peer: tuple[int, int, int] | None) -> bool:
        if self._allow is None:
            return True
        if peer is None:
            return False
        uids, gids = self._allow
        return peer[1] in uids or peer[2] in gids

    def _received_changed(self, conn: _Connection, delta: int) -> None:
        """``conn`` holds ``delta`` more (or fewer) bytes of received frames: keep the sum over
        all connections under ``max_receive_bytes``.

        Under the cap everyone reads. Over it, one connection, the owner, goes on reading until
        its frame is complete (its holding shrinks: a frame came out) or it goes away, then
        hands the turn to the first waiter; any other connection that takes in more bytes
        stops being read and queues. Every frame completes (the owner's always can), and
        memory stays bounded by the cap + one frame + one socket read per connection."""
        self._recv_total += delta
        cap = self.config.max_receive_bytes
        if self._recv_total <= cap:
            self._recv_owner = None
            if self._recv_waiters:
                waiters, self._recv_waiters = self._recv_waiters, collections.deque()
                for c in waiters:
                    c._unpause(_P_RECV)
            return
        owner = self._recv_owner
        if conn is owner:
            if delta < 0 or conn.closed:  # its frame is complete: the next one's turn
                self._recv_owner = None
                self._next_receiver()
            return
        if delta < 0 or conn.closed:
            return
        if owner is None or owner.closed:
            if owner is None:
                log.info("received request frames hold %d bytes, over max_receive_bytes (%d): reading the "
                         "connections that hold them one at a time", self._recv_total, cap)
            self._recv_owner = conn
            return
        if not conn.paused & _P_RECV:
            self.receive_pauses += 1
            self._recv_waiters.append(conn)
            conn._pause(_P_RECV)

    def _next_receiver(self) -> None:
        """Give the receive turn to the first connection waiting for it (if any still lives)."""
        while self._recv_waiters:
            c = self._recv_waiters.popleft()
            if not c.closed and c.paused & _P_RECV:
                self._recv_owner = c
                c._unpause(_P_RECV)
                return

    def _wake_waiting(self) -> None:
        waiting = list(self._waiting)
        self._waiting.clear()
        for conn in waiting:
            if not conn.closed:
                conn._pump()

    # -- operations: each returns the reply body as a list of buffers --

    async def _op_put(self, req: P.Request) -> list:
        if req.sink is not None:  # the value is in fixed buffers; put_leased releases them in every case
            await self.store.put_leased(req.key, req.sink, sync=req.sync, verify=req.verify)
        else:
            await self.store.put(req.key, req.value, sync=req.sync, verify=req.verify)
        return []

    async def _op_get(self, req: P.Request) -> list:
        return [await self.store.get(req.key)]

    async def _op_has(self, req: P.Request) -> list:
        res = self.store.has(req.key)  # BlobStore.has is synchronous (index only); accept a coroutine too
        if inspect.isawaitable(res):
            res = await res
        return [P.bool_body(bool(res))]

    async def _op_delete(self, req: P.Request) -> list:
        await self.store.delete(req.key, sync=req.sync)
        return []

    async def _op_list(self, req: P.Request) -> list:
        cap = self.config.list_page_max
        limit = min(req.limit, cap) if req.limit else cap
        keys: list[bytes] = []
        async for key in self.store.list(prefix=req.prefix, start_after=req.start_after, limit=limit + 1):
            keys.append(bytes(key))
            if len(keys) > limit:
                break
        more = len(keys) > limit
        return [P.list_reply_body(keys[:limit], more)]

    async def _op_flush(self, req: P.Request) -> list:
        await self.store.flush()
        return []

    def _op_ping_now(self, req: P.Request) -> list:
        return [req.value]

    def _op_needs_flush_now(self, req: P.Request) -> list:
        return [P.bool_body(bool(self.store.needs_flush))]

    def _op_has_now(self, req: P.Request) -> list:
        return [P.bool_body(bool(self.store.has(req.key)))]

    def _op_stat_now(self, req: P.Request) -> list:
        st = dict(self.store.stat())
        st["server"] = {
            "version": __version__,
            "protocol_version": P.VERSION,
            "connections": len(self.connections),
            "in_flight": self.in_flight,
            "loop": type(self._loop).__module__.split(".")[0],
            "received_bytes_held": self._recv_total,
            "receive_pauses": self.receive_pauses,
        }
        return [json.dumps(st, default=_json_default, sort_keys=True).encode()]

    async def _op_mput(self, req: P.Request) -> list:
        await self.store.put_many(req.items, sync=req.sync)
        return []

    def _size_or_zero(self, key: bytes) -> int:
        """The stored value's length, 0 when absent or the key is invalid (its item reports that)."""
        try:
            return self._value_size(key) or 0  # type: ignore[misc]
        except Exception:
            return 0

    def _reply_cost(self, req: P.Request) -> int:
        """Bytes of reply a GET or MGET will hold in memory, from the store's index (0 for other ops,
        or when the store cannot tell). The connection's reply-byte budget is charged with it."""
        if self._value_size is None:
            return 0
        if req.op == P.Op.GET:
            return self._size_or_zero(req.key) + P.HEADER_SIZE
        if req.op == P.Op.MGET:
            return sum(self._size_or_zero(k) + 6 for k in req.keys) + P.HEADER_SIZE + 4
        return 0

    async def _op_mget(self, req: P.Request) -> list:
        if self._value_size is not None:
            total = P.HEADER_SIZE + 4 + sum(6 + self._size_or_zero(k) for k in req.keys)
            if total > self.config.max_frame_size:
                raise TooLarge(
                    f"the MGET reply would be {total} bytes, over the daemon's max_frame_size "
                    f"({self.config.max_frame_size} bytes); ask for fewer keys per request")
        # each key's value or its own error (the store's get_each: no task per key)
        return P.mget_reply_body(await self.store.get_each(req.keys))


def _sock_name(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    return f"{name} (fd {sock.fileno()}, socket-activated)"


def _fmt_addr(addr: tuple[str, int] | None) -> str:
    if not addr:
        return ""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- entry points ---------------------------------------------------------------------------


async def run_server(store: Any, config: ServerConfig | None = None, *, metrics: Metrics | None = None,
                     listen_sock: socket.socket | None = None, stop: asyncio.Event | None = None,
                     on_ready: Callable[["Server"], None] | None = None,
                     install_signal_handlers: bool = True) -> int:
    """Serve ``store`` until SIGTERM/SIGINT (or ``stop`` is set), shut down cleanly, return 0.

    Call inside the running loop once the store is open (recovery finished):
    binds the socket (or adopts ``listen_sock``; with ``config.socket_activation``
    and no ``listen_sock``, a socket passed by systemd in ``LISTEN_FDS`` is
    used), calls ``on_ready(server)`` (e.g. to print ``server.socket_path`` and
    ``server.metrics_address``) and sends ``READY=1`` to systemd, serves, and on
    the signal sends ``STOPPING=1``, finishes requests in flight and closes the
    store (flush + checkpoint + ring). ``metrics`` should be the object the
    store was opened with as ``observer`` (so fdatasync / group-commit /
    checkpoint histograms fill). If :meth:`Server.start` fails, the store is
    closed and the error propagates (``ConfigError`` for a live socket, ``OSError``).
    """
    if isinstance(store, ServerConfig):  # tolerate run_server(config, store)
        store, config = config, store
    config = config or ServerConfig()
    loop = asyncio.get_running_loop()
    if listen_sock is None and config.socket_activation and _systemd is not None:
        socks = _systemd.listen_fds()
        if socks:
            listen_sock = socks[0]
            for extra in socks[1:]:
                log.warning("socket activation: ignoring extra socket %s; ringblob serves one", _sock_name(extra))
                extra.close()
    server = Server(store, config, metrics=metrics, listen_sock=listen_sock)
    try:
        await server.start()
    except BaseException:
        server.metrics.detach_store()
        await store.close()
        raise
    installed = []
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, server.request_stop)
                installed.append(sig)
    relay = None
    if stop is not None:
        if stop.is_set():
            server.request_stop()
        else:
            relay = loop.create_task(_relay(stop, server))
    status = f"serving on {server.socket_path or 'a socket-activated listener'}"
    if server.metrics_address:
        status += f"; metrics on http://{_fmt_addr(server.metrics_address)}/metrics"
    if on_ready is not None:
        on_ready(server)
    _sd_notify(f"READY=1\nSTATUS={status}")
    try:
        await server.serve_forever()
    finally:
        if relay is not None:
            relay.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


async def _relay(stop: asyncio.Event, server: Server) -> None:
    await stop.wait()
    server.request_stop()


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop: ``"uvloop"`` (ConfigError if not installed), ``"asyncio"``, or ``"auto"``."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ConfigError("loop: uvloop is not installed; `pip install uvloop` or use loop = \"asyncio\"") from None
        else:
            return uvloop.new_event_loop()
    elif kind != "asyncio":
        raise ConfigError(f"loop: {kind!r} is not one of auto, uvloop, asyncio")
    return asyncio.new_event_loop()


def run(config: ServerConfig, open_store: Callable[[Metrics], Awaitable[Any]], *,
        listen_sock: socket.socket | None = None, on_ready: Callable[["Server"], None] | None = None) -> int:
    """Run the daemon to completion; return the exit status (0 after a clean shutdown).

    ``open_store(metrics)`` is awaited inside the new event loop and must
    return the open store; pass ``metrics`` to it as the store's observer
    (``BlobStore.open(..., observer=metrics)``). ``on_ready(server)`` is called
    once the store is open and the socket listens, just before ``READY=1``
    (see :func:`run_server`). SIGTERM / SIGINT arriving
    while the store opens stop the daemon as soon as it is open.
    Errors from opening the store or binding the socket propagate
    (``StoreLocked``, ``ConfigError``, ``OSError``).
    """
    config.validate()
    loop = new_event_loop(config.loop)
    stop = asyncio.Event()

    async def main_coro() -> int:
        lp = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                lp.add_signal_handler(sig, stop.set)
        metrics = Metrics()
        store = await open_store(metrics)
        # run_server replaces these handlers; until then a signal sets `stop`
        return await run_server(store, config, metrics=metrics, listen_sock=listen_sock, stop=stop,
                                on_ready=on_ready)

    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main_coro())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Development entry: ``python -m ringblob.server --data PATH --socket PATH [...]``.

    Opens the real store (formatting ``--size`` bytes when the file is
    absent) and serves it; ``ringblob serve`` is the production command.
    """
    ap = argparse.ArgumentParser(prog="python -m ringblob.server", description="ringblob daemon (development entry)")
    ap.add_argument("--data", required=True, help="data file")
    ap.add_argument("--socket", required=True, help="Unix socket path")
    ap.add_argument("--size", type=int, default=64 << 20, help="bytes of a new data file (default 64 MiB)")
    ap.add_argument("--engine", default="auto", choices=("auto", "uring", "psync"))
    from .config import PARALLEL_HASH_MODES, SYNC_METHODS

    ap.add_argument("--sync-method", default="auto", choices=SYNC_METHODS,
                    help="how a group commit is made durable (the store's sync_method; default auto)")
    ap.add_argument("--parallel-hash", default="auto", choices=PARALLEL_HASH_MODES,
                    help="which thread hashes large values: auto (default) = a large PUT's buffers by a hash "
                         "worker thread on 2+ CPUs; on = that, and whole values of 128 KiB or more by BLAKE3's "
                         "thread pool; off = all on the event loop's thread")
    ap.add_argument("--max-blob-size", type=int, default=None, help="largest value in bytes (store default when omitted)")
    ap.add_argument("--metrics-addr", default="", help="HOST:PORT for /metrics ('' disables; default disabled)")
    ap.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    ap.add_argument("--max-frame-size", type=int, default=P.DEFAULT_MAX_FRAME_SIZE)
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--max-in-flight-per-conn", type=int, default=256)
    ap.add_argument("--max-in-flight-total", type=int, default=4096)
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--allow-uid", type=int, action="append", default=[])
    ap.add_argument("--allow-gid", type=int, action="append", default=[])
    ap.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig(
        socket_path=args.socket, socket_mode=args.socket_mode, metrics_addr=args.metrics_addr, loop=args.loop,
        max_frame_size=args.max_frame_size, max_connections=args.max_connections,
        max_in_flight_per_conn=args.max_in_flight_per_conn, max_in_flight_total=args.max_in_flight_total,
        idle_timeout=args.idle_timeout, allow_uids=tuple(args.allow_uid), allow_gids=tuple(args.allow_gid),
    )

    async def open_store(metrics: Metrics) -> Any:
        from . import digest
        from .store import BlobStore

        digest.configure(args.parallel_hash)

        extra = {"max_blob_size": args.max_blob_size} if args.max_blob_size else {}
        return await BlobStore.open(args.data, engine=args.engine, create_size=args.size, observer=metrics,
                                    sync_method=args.sync_method, **extra)

    try:
        return run(cfg, open_store)
    except Exception as exc:
        from .errors import RingblobError

        if isinstance(exc, (RingblobError, OSError)):
            print(f"ringblob server: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
