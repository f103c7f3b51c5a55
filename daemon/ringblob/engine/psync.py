"""The ``psync`` engine: the engine contract over a thread pool of pread/pwrite.

Chosen with ``--engine psync`` or by ``auto`` where the kernel refuses
io_uring. It keeps the contract of :mod:`ringblob.engine` exactly (fixed
buffers from one page-aligned anonymous mmap, tags, links, an eventfd that
signals completions, ``OSError`` results naming the operation) so the store
cannot tell the engines apart except by speed.

A *chain* (ops joined by ``link=True``) runs in order on one worker thread; an
op that fails cancels the rest of its chain with ``ECANCELED``, as io_uring
does. Independent chains run concurrently on up to ``threads`` workers.
"""

from __future__ import annotations

import collections
import errno as _errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..errors import BufferBusy, Busy, EngineClosed, Misaligned, NoBuffers

__all__ = ["PsyncEngine", "PsyncBuffer"]

_READ, _WRITE, _FSYNC = 0, 1, 2
_OPNAMES = ("read_fixed", "write_fixed", "fdatasync")


def _oserror(op: int, err: int, offset: int | None) -> OSError:
    name = _errno.errorcode.get(err, str(err))
    where = f" at offset {offset}" if offset is not None else ""
    return OSError(err, f"{_OPNAMES[op]}: {name} ({os.strerror(err)}){where}")


class PsyncBuffer:
    """One fixed buffer of the psync pool: ``index``, ``size`` (bytes), ``view``.

    ``view`` is a writable memoryview over page-aligned memory; ``in_flight``
    counts operations on it not yet reaped.
    """

    __slots__ = ("index", "size", "view", "in_flight", "leased", "_engine")

    def __init__(self, engine: "PsyncEngine", index: int, view: memoryview):
        self._engine = engine
        self.index = index
        self.size = len(view)
        self.view = view
        self.in_flight = 0
        self.leased = False

    def __repr__(self) -> str:
        return f"<PsyncBuffer {self.index} size={self.size} in_flight={self.in_flight}>"

    def tobytes(self, length: int) -> bytes:
        """The first ``length`` bytes as new ``bytes``; ``ValueError`` outside ``0..size``."""
        if length < 0 or length > self.size:
            raise ValueError(f"tobytes: {length} bytes of a {self.size}-byte buffer")
        with self.view[:length] as v:
            return bytes(v)


class _Op:
    __slots__ = ("kind", "buf", "offset", "length", "tag", "buf_offset", "file_index", "link", "flags")

    def __init__(self, kind, buf, offset, length, tag, buf_offset, file_index, link, flags=0):
        self.kind = kind
        self.buf = buf
        self.offset = offset
        self.length = length
        self.tag = tag
        self.buf_offset = buf_offset
        self.file_index = file_index
        self.link = link
        self.flags = flags  # pwritev2 flags: os.RWF_DSYNC for a dsync write


class PsyncEngine:
    """Thread-pool engine with the interface of :class:`ringblob._uring.Ring`.

    ``fds``: open file descriptors (not closed by the engine). ``block_size``:
    alignment unit in bytes. ``buffer_size`` x ``buffer_count``: the buffer
    pool in bytes. ``queue_depth``: the most ops queued at once (pending plus
    in flight); ``threads``: worker threads (default ``min(queue_depth, 32)``);
    ``threads=0`` runs every chain inline in ``submit()``, in queue order, so a
    run is deterministic (the power-loss simulator replays seeds with it).

    Raises ``ValueError`` for sizes that are not positive multiples of the
    page size / block size.
    """

    name = "psync"

    def __init__(
        self,
        fds: Sequence[int],
        *,
        block_size: int = 4096,
        buffer_size: int = 256 * 1024,
        buffer_count: int = 64,
        queue_depth: int = 128,
        threads: int | None = None,
    ):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"psync engine: block_size {block_size} is not a power of two")
        if buffer_size <= 0 or buffer_size % mmap.PAGESIZE or buffer_size % block_size:
            raise ValueError(
                f"psync engine: buffer_size {buffer_size} must be a positive multiple of the "
                f"page size ({mmap.PAGESIZE}) and the block size ({block_size})"
            )
        if buffer_count <= 0 or queue_depth <= 0:
            raise ValueError("psync engine: buffer_count and queue_depth must be positive")
        self._fds = list(fds)
        self.block_size = block_size
        self.buffer_size = buffer_size
        self.buffer_count = buffer_count
        self.queue_depth = queue_depth
        self._mem = mmap.mmap(-1, buffer_size * buffer_count, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = memoryview(self._mem)
        self._buffers = [
            PsyncBuffer(self, i, whole[i * buffer_size : (i + 1) * buffer_size]) for i in range(buffer_count)
        ]
        self._free = collections.deque(self._buffers)
        self._pending: list[_Op] = []
        self._done: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._counters = dict.fromkeys(
            ("enters", "sqes", "cqes", "fdatasyncs", "retries", "short_continuations", "link_resubmits"), 0
        )
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if threads is None:
            threads = min(queue_depth, 32)
        self._pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ringblob-psync") if threads > 0 else None
        )

    # -- properties ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def free_buffers(self) -> int:
        return len(self._free)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise EngineClosed(f"{what}: the psync engine is closed")

    # -- buffers ------------------------------------------------------------

    def lease(self) -> PsyncBuffer:
        """Lease a free buffer. Raises :class:`NoBuffers` when all are leased."""
        self._check_open("lease")
        if not self._free:
            raise NoBuffers(
                f"lease: all {self.buffer_count} buffers of {self.buffer_size} bytes are leased; "
                "release one or configure a larger buffer pool"
            )
        buf = self._free.popleft()
        buf.leased = True
        return buf

    def release(self, buf: PsyncBuffer) -> None:
        """Return a leased buffer. Raises :class:`BufferBusy` while an op on it is in flight."""
        self._check_open("release")
        self._own(buf, "release")
        if not buf.leased:
            raise ValueError(f"release: buffer {buf.index} is not leased")
        if buf.in_flight:
            raise BufferBusy(f"release: buffer {buf.index} has {buf.in_flight} operation(s) in flight")
        buf.leased = False
        self._free.append(buf)

    def _own(self, buf: Any, what: str) -> None:
        if not isinstance(buf, PsyncBuffer) or buf._engine is not self:
            raise ValueError(f"{what}: buffer does not belong to this engine")

    # -- queueing -----------------------------------------------------------

    def _queue(self, kind, buf, offset, length, tag, buf_offset, file_index, link, flags=0) -> None:
        name = _OPNAMES[kind]
        self._check_open(name)
        if self._in_flight + len(self._pending) >= self.queue_depth:
            raise Busy(f"{name}: queue depth {self.queue_depth} reached; reap completions first")
        if kind != _FSYNC:
            self._own(buf, name)
            if not buf.leased:
                raise ValueError(f"{name}: buffer {buf.index} is not leased")
            bs = self.block_size
            if offset < 0 or length <= 0 or buf_offset < 0:
                raise Misaligned(f"{name}: offset {offset}, length {length}, buf_offset {buf_offset} must be positive")
            if offset % bs or length % bs or buf_offset % bs:
                raise Misaligned(
                    f"{name}: offset {offset}, length {length} and buf_offset {buf_offset} must be "
                    f"multiples of the logical block size {bs} (O_DIRECT)"
                )
            if buf_offset + length > buf.size:
                raise ValueError(
                    f"{name}: buf_offset {buf_offset} + length {length} exceeds the buffer size {buf.size}"
                )
            buf.in_flight += 1
        self._pending.append(_Op(kind, buf, offset, length, tag, buf_offset, file_index, link, flags))

    def read_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False) -> None:
        """Queue a read of ``length`` bytes at file ``offset`` into ``buf[buf_offset:]``."""
        self._queue(_READ, buf, offset, length, tag, buf_offset, file_index, link)

    def write_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False, dsync=False) -> None:
        """Queue a write of ``buf[buf_offset:buf_offset+length]`` at file ``offset``; ``dsync=True``:
        ``pwritev2`` with ``RWF_DSYNC`` (durable when it completes)."""
        self._queue(_WRITE, buf, offset, length, tag, buf_offset, file_index, link, os.RWF_DSYNC if dsync else 0)

    def fdatasync(self, tag, *, file_index=0, link=False) -> None:
        """Queue an fdatasync of file ``file_index``."""
        self._queue(_FSYNC, None, None, 0, tag, 0, file_index, link)

    def submit(self) -> int:
        """Hand every queued op to the workers; returns how many were submitted."""
        self._check_open("submit")
        ops, self._pending = self._pending, []
        if not ops:
            return 0
        chain: list[_Op] = []
        for op in ops:
            chain.append(op)
            if not op.link:
                self._start(chain)
                chain = []
        if chain:  # a link flag on the last op links to nothing
            self._start(chain)
        self._counters["enters"] += 1
        self._counters["sqes"] += len(ops)
        return len(ops)

    def _start(self, chain: list[_Op]) -> None:
        with self._cond:
            self._in_flight += len(chain)
        if self._pool is None:
            self._run_chain(chain)
        else:
            self._pool.submit(self._run_chain, chain)

    # -- workers ------------------------------------------------------------

    def _run_chain(self, chain: list[_Op]) -> None:
        failed = False
        for op in chain:
            if failed:
                result: Any = _oserror(op.kind, _errno.ECANCELED, op.offset)
            else:
                try:
                    result = self._run_op(op)
                except Exception as exc:  # never leave an op without a completion
                    result = OSError(_errno.EIO, f"{_OPNAMES[op.kind]}: internal error in the psync worker: {exc!r}")
                failed = isinstance(result, OSError)
            with self._cond:
                self._done.append((op, result))
                self._cond.notify_all()
                # under the lock, as reap drains it: the eventfd is readable exactly while
                # results are left (a write after a reap took the result would wake the loop
                # for nothing)
                try:
                    os.eventfd_write(self.eventfd, 1)
                except OSError:  # closed under us during shutdown; nobody is watching
                    pass

    def _run_op(self, op: _Op):
        if op.file_index < 0 or op.file_index >= len(self._fds):
            return OSError(_errno.EBADF, f"{_OPNAMES[op.kind]}: EBADF (no registered file at index {op.file_index})")
        fd = self._fds[op.file_index]
        if op.kind == _FSYNC:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                return _oserror(op.kind, exc.errno, None)
            self._count("fdatasyncs")
            return 0
        done = 0
        view = op.buf.view
        while done < op.length:
            chunk = view[op.buf_offset + done : op.buf_offset + op.length]
            try:
                if op.kind == _READ:
                    n = os.preadv(fd, [chunk], op.offset + done)
                else:
                    n = os.pwritev(fd, [chunk], op.offset + done, op.flags)
            except OSError as exc:
                if exc.errno == _errno.EAGAIN:
                    self._count("retries")
                    continue
                return _oserror(op.kind, exc.errno, op.offset + done)
            finally:
                chunk.release()
            if n == 0:
                if op.kind == _READ:
                    break  # end of file: a short read is the answer
                return _oserror(op.kind, _errno.EIO, op.offset + done)
            done += n
            if done < op.length:
                self._count("short_continuations")
        return done

    def _count(self, name: str) -> None:
        """Count one event from a worker thread (workers run concurrently)."""
        with self._cond:
            self._counters[name] += 1

    # -- completions --------------------------------------------------------

    def _collect_locked(self, max_cqes: int) -> list:
        """Take up to ``max_cqes`` results, and drain the eventfd once none is left (while some
        are, it stays readable: each result wrote it, and only this drains it); the caller holds
        ``_cond`` (workers append and write the eventfd under it too)."""
        out = []
        while self._done and len(out) < max_cqes:
            op, result = self._done.popleft()
            self._in_flight -= 1
            if op.buf is not None:
                op.buf.in_flight -= 1
            out.append((op.tag, result))
        self._counters["cqes"] += len(out)
        if not self._done:
            self._drain_eventfd()
        return out

    def _drain_eventfd(self) -> None:
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass

    def reap(self, max_cqes: int = 256) -> list:
        """Return up to ``max_cqes`` completed ``(tag, result)`` pairs without blocking."""
        self._check_open("reap")
        with self._cond:
            return self._collect_locked(max_cqes)

    def wait(self, min_complete: int = 1, timeout: float | None = None) -> list:
        """Block until ``min_complete`` completions are ready (or ``timeout`` seconds pass).

        ``min_complete`` is capped at the number of ops in flight, so waiting
        never blocks for completions that cannot come. Returns every ready pair.
        """
        self._check_open("wait")
        with self._cond:
            need = min(min_complete, self._in_flight)
            self._cond.wait_for(lambda: len(self._done) >= need, timeout)
            return self._collect_locked(1 << 30)

    def counters(self) -> dict[str, int]:
        """Counts since creation: enters, sqes, cqes, fdatasyncs, retries, ..."""
        with self._cond:
            return dict(self._counters)

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Wait for ops in flight, drop queued ops, stop the workers, free the pool.

        Results not reaped are discarded. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for op in self._pending:
            if op.buf is not None:
                op.buf.in_flight -= 1
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        os.close(self.eventfd)
        self.eventfd = -1
        self._done.clear()
        for buf in self._buffers:
            buf.in_flight = 0
        # The views handed out may still be referenced; the mmap is freed once
        # the last of them is gone (never while a worker could write it).

    def __enter__(self) -> "PsyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass
