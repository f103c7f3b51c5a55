"""asyncio adapter over any engine (``uring`` or ``psync``): futures for SQEs.

:class:`AsyncEngine` watches the engine's ``eventfd`` with ``loop.add_reader``,
reaps CQEs in groups of at most ``REAP_TURN`` (16) per loop turn and resolves one
asyncio future per op tag (the engine keeps its eventfd readable while CQEs are
left, so the next turn takes the next group). A burst of reads completes
together; delivering it in groups lets each group's replies go out and the
requests they bring back be submitted while the rest is still delivered, instead
of the daemon's work and the disk's alternating in lockstep. Ops queued
during one loop turn go to the kernel together: the first op of a turn
schedules a single ``call_soon`` flush, which makes ONE ``engine.submit()``
(one ``io_uring_enter``) for everything queued in that turn. The one
exception is a burst of :meth:`AsyncEngine.read_nowait` reads: once
``SUBMIT_EARLY`` (8) wait, they are submitted at once, so the disk starts on
them while the rest of the burst is still being decoded — 32 GETs arriving
together take 4 ``io_uring_enter`` calls instead of 1 (at 32 GETs in flight
on the bench VM: +7 % GET/s, p50 800 → 690 µs, for ~0.7 µs more CPU per
GET; groups of 4 gave +15 % in two rounds but twice the syscalls). The other:
``AsyncCore.submit_now`` submits what is queued at once, for ops on the critical
path of many requests (the group commit's writes and its fdatasync, which would
otherwise wait for every other callback of the turn: sync 4 KiB PUTs at 32
concurrent ~41k -> ~54k/s).

It knows nothing of keys. It adds what the engine leaves to its caller:

* buffer leasing with async waiting (FIFO) when the fixed-buffer pool is
  exhausted (``NoBuffers`` becomes a wait for a release), or
  :meth:`try_lease` without waiting, for holders that must not queue;
* queue-depth backpressure (``Busy`` becomes a wait for completions);
* release of a buffer whose op is still in flight (its awaiting task was
  cancelled) is deferred until the CQE arrives, so the kernel never writes
  into a buffer that was handed to someone else;
* helpers that lease, copy and release: :meth:`read`, :meth:`write_chunks`,
  :meth:`write_batch_with_data_sync`, :meth:`fdatasync`; and
  :meth:`write_leased` for bytes that already lie in leased buffers.

Copies: :meth:`write_chunks` copies the value once into fixed buffers
(O_DIRECT needs aligned memory) and pads the tail with zeros to whole blocks;
:meth:`write_leased` writes buffers that were filled in place (the daemon
receives a large PUT value straight into them) and copies nothing; a read copies once out
of the fixed buffers into the returned ``bytes`` (values larger than a quarter
of the pool take a second copy through a ``bytearray``).

The hot paths — :meth:`AsyncEngine.read_nowait` (a small read completed by a
call), ``run_nowait`` (a group of unlinked writes and fdatasyncs completed by
one call when the last CQE arrives: the store's group-commit rounds), the CQE
reap and dispatch (``_on_ready``) and the turn's submit (``_flush``) — live in
the base class :class:`ringblob._aiocore.AsyncCore` (``cython/_aiocore.pyx``),
which also holds the state they share with the methods here as typed fields.

Works on any asyncio loop, uvloop included. All methods must be called from
the loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any, Sequence

from ..errors import BufferBusy, EngineClosed, Misaligned, NoBuffers

try:
    from .._aiocore import REAP_TURN, SUBMIT_EARLY, AsyncCore, check_result
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled engine adapter core (ringblob._aiocore) does not import ({exc}); build the "
        "extensions with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = ["AsyncEngine", "check_result", "REAP_TURN", "SUBMIT_EARLY"]

READ, WRITE, FSYNC = "read", "write", "fdatasync"


class AsyncEngine(AsyncCore):
    """Drive ``engine`` from the running asyncio loop (see the module docstring).

    ``engine``: any object with the engine contract of :mod:`ringblob.engine`.
    Counters (ints): ``submits`` (``engine.submit()`` calls), ``ops``,
    ``buffer_waits``, ``queue_waits``.
    """

    def __init__(self, engine, *, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        self.block_size = engine.block_size
        self.buffer_size = engine.buffer_size
        self.buffer_count = engine.buffer_count
        self.queue_depth = engine.queue_depth
        self._tags = itertools.count(1)
        self._futs: dict[int, asyncio.Future] = {}
        self._unsubmitted: list[int] = []
        self._flush_handle: asyncio.Handle | None = None
        self._buf_waiters: collections.deque = collections.deque()  # (n, future)
        self._slot_waiters: collections.deque = collections.deque()  # future
        self._deferred: list = []  # buffers released while in flight
        self._closed = False
        self._fd = engine.eventfd
        self.submits = 0
        self.ops = 0
        self.buffer_waits = 0
        self.queue_waits = 0
        self._init_core()
        self.loop.add_reader(self._fd, self._on_ready)

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", "?")

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise EngineClosed(f"{what}: the async engine is closed")

    # -- buffers --------------------------------------------------------------

    async def lease(self, n: int = 1) -> list:
        """Lease ``n`` fixed buffers at once (FIFO wait while the pool is short).

        Leasing several at once avoids two tasks each holding half the pool.
        Raises ``ValueError`` when ``n`` exceeds the pool, :class:`EngineClosed` after close.
        """
        self._check_open("lease")
        if n < 1 or n > self.buffer_count:
            raise ValueError(f"lease: {n} buffers asked, the pool has {self.buffer_count}")
        if not self._buf_waiters and self.engine.free_buffers >= n:
            return [self.engine.lease() for _ in range(n)]
        fut = self.loop.create_future()
        self._buf_waiters.append((n, fut))
        self.buffer_waits += 1
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for b in fut.result():  # leased for us after all: give back
                    self.release(b)
            else:
                try:
                    self._buf_waiters.remove((n, fut))
                except ValueError:
                    pass
            raise

    def release(self, *bufs) -> None:
        """Return buffers to the pool; one with an op in flight is returned when its CQE arrives."""
        for buf in bufs:
            if buf is None:
                continue
            if self._closed:
                continue
            if buf.in_flight:
                self._deferred.append(buf)
                continue
            try:
                self.engine.release(buf)
            except BufferBusy:
                self._deferred.append(buf)
        self._wake_buffers()

    def _wake_buffers(self) -> None:
        while self._buf_waiters:
            n, fut = self._buf_waiters[0]
            if fut.done():
                self._buf_waiters.popleft()
                continue
            if self.engine.free_buffers < n:
                break
            self._buf_waiters.popleft()
            try:
                fut.set_result([self.engine.lease() for _ in range(n)])
            except NoBuffers:  # pragma: no cover - free_buffers said otherwise
                break

    # -- queueing ---------------------------------------------------------------

    async def _reserve(self, n: int) -> None:
        eng = self.engine
        if not self._slot_waiters and eng.in_flight + eng.pending + n <= self.queue_depth:
            return
        self.queue_waits += 1
        while True:
            fut = self.loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            finally:
                try:
                    self._slot_waiters.remove(fut)
                except ValueError:
                    pass
            if eng.in_flight + eng.pending + n <= self.queue_depth:
                return

    def _validate(self, ops: Sequence[tuple]) -> None:
        bs = self.block_size
        for op in ops:
            if op[0] == FSYNC:
                continue
            if op[0] not in (READ, WRITE):
                raise ValueError(f"unknown op {op[0]!r}")
            _, buf, offset, length, boff = op
            if offset % bs or length % bs or boff % bs or length <= 0:
                raise Misaligned(
                    f"{op[0]}: offset {offset}, length {length}, buf_offset {boff} must be positive "
                    f"multiples of the logical block size {bs} (O_DIRECT)"
                )
            if boff + length > buf.size:
                raise ValueError(f"{op[0]}: buf_offset {boff} + length {length} exceeds the buffer size {buf.size}")

    def _queue(self, ops: Sequence[tuple], link: bool, dsync: bool = False) -> list[asyncio.Future]:
        eng = self.engine
        futs = []
        last = len(ops) - 1
        for i, op in enumerate(ops):
            tag = next(self._tags)
            lk = link and i < last
            if op[0] == READ:
                eng.read_fixed(op[1], op[2], op[3], tag, buf_offset=op[4], link=lk)
            elif op[0] == WRITE:
                eng.write_fixed(op[1], op[2], op[3], tag, buf_offset=op[4], link=lk, dsync=dsync)
            else:
                eng.fdatasync(tag, link=lk)
            fut = self.loop.create_future()
            self._futs[tag] = fut
            self._unsubmitted.append(tag)
            futs.append(fut)
        self.ops += len(ops)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        return futs

    async def run(self, ops: Sequence[tuple], *, link: bool = False, dsync: bool = False) -> list:
        """Queue ``ops`` and wait for all their CQEs; returns one result per op.

        Each op is ``("read"|"write", buf, offset, length, buf_offset)`` or
        ``("fdatasync",)``. ``link=True`` chains them (IOSQE_IO_LINK): each
        starts after the previous succeeded, a failure cancels the rest
        (``OSError(ECANCELED)``). ``dsync=True`` queues every write with
        RWF_DSYNC (durable when it completes). They go to the kernel in this
        turn's single submit. A result is an ``int`` (bytes) or an ``OSError`` (not raised).
        Waits (backpressure) while the queue depth would be exceeded; raises
        ``ValueError`` for more ops than the queue depth, :class:`Misaligned`
        for misaligned ops (before anything is queued).
        """
        self._check_open("run")
        if len(ops) > self.queue_depth:
            raise ValueError(f"run: {len(ops)} ops exceed the queue depth {self.queue_depth}")
        self._validate(ops)
        await self._reserve(len(ops))
        self._check_open("run")
        futs = self._queue(ops, link, dsync)
        return await self._gather(futs)

    @staticmethod
    async def _gather(futs: list) -> list:
        """Await ``futs`` in order (cheaper than ``asyncio.gather``: no wrapper future, no
        callback per op); on cancellation the rest are cancelled too, as gather would."""
        out = []
        try:
            for fut in futs:
                out.append(await fut)
        except BaseException:
            for fut in futs:
                fut.cancel()  # no-op for those already done; _on_ready skips cancelled ones
            raise
        return out

    # -- helpers ----------------------------------------------------------------

    def _window(self) -> int:
        """Buffers (and ops) one helper call uses at a time: a quarter of the pool, below the queue depth."""
        return max(1, min(self.buffer_count // 4, self.queue_depth - 1))

    def _try_lease(self, n: int) -> list | None:
        """``n`` buffers now when the pool has them, nobody waits for buffers and the queue
        depth has room for ``n`` more ops; else ``None`` (take the awaiting path)."""
        eng = self.engine
        if (self._buf_waiters or self._slot_waiters or self._closed or eng.free_buffers < n
                or eng.in_flight + eng.pending + n > self.queue_depth):
            return None
        if n == 1:
            return [eng.lease()]
        return [eng.lease() for _ in range(n)]

    def _queue_reads(self, bufs: list, offset: int, alen: int) -> list:
        """Queue one READ_FIXED per buffer for ``alen`` bytes at ``offset`` (block multiples, as
        the caller computed them: the engine itself refuses a misaligned op with
        :class:`Misaligned` before queueing it); returns one future per op, in order."""
        eng = self.engine
        loop = self.loop
        futs = []
        bsz = self.buffer_size
        pos = 0
        for b in bufs:
            cl = alen - pos if alen - pos < bsz else bsz
            tag = next(self._tags)
            eng.read_fixed(b, offset + pos, cl, tag)
            fut = loop.create_future()
            self._futs[tag] = fut
            self._unsubmitted.append(tag)
            futs.append(fut)
            pos += cl
        self.ops += len(bufs)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return futs

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (a multiple of the block size) into new ``bytes``.

        The read is rounded up to whole blocks. A read that fits a quarter of
        the pool takes the fast path: its buffers are leased without waiting
        when the pool has them, one READ_FIXED per buffer is queued for this
        loop turn's submit and its future awaited directly, and the buffers
        are copied once into the returned ``bytes``. Larger reads go window by
        window through a ``bytearray``. Raises ``OSError`` (EIO for a read
        past the end of the file or a short read), :class:`Misaligned` for an
        ``offset`` that is not a block multiple, :class:`EngineClosed` after
        :meth:`close`.
        """
        if length <= 0:
            if length == 0:
                return b""
            raise ValueError(f"read: negative length {length}")
        bs, bsz = self.block_size, self.buffer_size
        alen = -(-length // bs) * bs
        if alen <= bsz:  # one buffer: the 4 KiB GET
            bufs = self._try_lease(1)
            if bufs is None:
                self._check_open("read")
                bufs = await self.lease(1)
                try:
                    await self._reserve(1)
                    self._check_open("read")
                except BaseException:
                    self.release(*bufs)
                    raise
            try:
                (fut,) = self._queue_reads(bufs, offset, alen)
                res = await fut
                if res != alen:
                    check_result(res, alen, f"read_fixed at offset {offset}")
                with bufs[0].view[:length] as v:
                    return bytes(v)
            finally:
                self._release_now(bufs)
        n = -(-alen // bsz)
        if n <= self._window():
            bufs = self._try_lease(n)
            if bufs is None:
                self._check_open("read")
                bufs = await self.lease(n)
                try:
                    await self._reserve(n)
                    self._check_open("read")
                except BaseException:
                    self.release(*bufs)
                    raise
            try:
                futs = self._queue_reads(bufs, offset, alen)
                res = await self._gather(futs)
                for i, r in enumerate(res):
                    cl = min(bsz, alen - i * bsz)
                    if r != cl:
                        check_result(r, cl, f"read_fixed at offset {offset + i * bsz}")
                views = [b.view[: min(bsz, length - i * bsz)] for i, b in enumerate(bufs)]
                try:
                    return b"".join(views)  # the one copy out of the fixed buffers
                finally:
                    for v in views:
                        v.release()
            finally:
                self._release_now(bufs)
        out = bytearray(length)
        w = self._window()
        pos = 0
        while pos < alen:
            bufs = await self.lease(min(w, -(-(alen - pos) // bsz)))
            try:
                ops = []
                p = pos
                for b in bufs:
                    cl = min(bsz, alen - p)
                    ops.append((READ, b, offset + p, cl, 0))
                    p += cl
                res = await self.run(ops)
                for op, r in zip(ops, res):
                    check_result(r, op[3], f"read_fixed at offset {op[2]}")
                for op, b in zip(ops, bufs):
                    start = op[2] - offset
                    take = min(op[3], length - start)
                    if take > 0:
                        out[start : start + take] = b.view[:take]
                pos = p
            finally:
                self.release(*bufs)
        return bytes(out)

    def _pad(self, buf, end: int) -> int:
        """Zero ``buf`` from ``end`` up to the next block boundary (O_DIRECT writes whole blocks);
        returns that boundary (``end`` rounded up to a block multiple)."""
        pad = -end % self.block_size
        if pad:
            buf.view[end : end + pad] = bytes(pad)
        return end + pad

    def _fill(self, buf, boff: int, data, start: int, n: int) -> int:
        """Copy ``data[start:start+n]`` into ``buf`` at ``boff``, zero-pad to a block; returns padded length."""
        buf.view[boff : boff + n] = data[start : start + n]
        return self._pad(buf, boff + n) - boff

    async def _write_filled(self, offset: int, bufs: list, lengths: list, sync: bool) -> int:
        """Write ``bufs[i][:lengths[i]]`` (block multiples, each buffer from its start) back to back
        at ``offset``, in one submit; with ``sync`` an fdatasync linked after the last write.

        The per-buffer submit and check shared by :meth:`write_chunks` and
        :meth:`write_leased`; the caller owns (and releases) the buffers.
        Returns the bytes written; raises the ``OSError`` of the first failed
        op (``EIO`` for a short write).
        """
        ops = []
        pos = offset
        for b, n in zip(bufs, lengths):
            ops.append((WRITE, b, pos, n, 0))
            pos += n
        if sync:
            ops.append((FSYNC,))
        res = await self.run(ops, link=sync)
        written = 0
        for op, r in zip(ops, res):
            if op[0] == WRITE:
                check_result(r, op[3], f"write_fixed at offset {op[2]}")
                written += r
            else:
                check_result(r, None, "fdatasync")
        return written

    async def write_chunks(self, offset: int, data, *, sync: bool = False) -> int:
        """Write ``data`` (bytes-like) at ``offset``, split across fixed buffers and ops.

        Copies ``data`` into leased fixed buffers, a window (a quarter of the
        pool) at a time. The tail is zero-padded to a whole block. With
        ``sync=True`` an fdatasync is linked after the last window's writes.
        Returns the bytes written (padded). Raises ``OSError`` from the first
        failed op.
        """
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        total = len(mv)
        bsz = self.buffer_size
        w = self._window()
        pos = 0
        written = 0
        if total == 0:
            if sync:
                await self.fdatasync()
            return 0
        while pos < total:
            nbuf = min(w, -(-(total - pos) // bsz))
            bufs = await self.lease(nbuf)
            try:
                start = pos
                lengths = []
                for b in bufs:
                    n = min(bsz, total - pos)
                    lengths.append(self._fill(b, 0, mv, pos, n))
                    pos += n
                written += await self._write_filled(offset + start, bufs, lengths, sync and pos >= total)
            finally:
                self.release(*bufs)
        return written

    def try_lease(self, n: int) -> list | None:
        """``n`` fixed buffers now, without waiting, or ``None`` when the pool has fewer free or
        a caller already waits for buffers (a newcomer never jumps that FIFO queue).

        For callers that hold buffers for an unbounded time (a value being
        received from a client) and must not wait for nor starve the others:
        they cap how many they hold and fall back to other memory on ``None``.
        Give the buffers back with :meth:`release`. Raises ``ValueError`` for
        ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"try_lease: {n} buffers asked; ask for at least one")
        eng = self.engine
        if self._closed or self._buf_waiters or eng.free_buffers < n:
            return None
        return [eng.lease() for _ in range(n)]

    async def write_leased(self, offset: int, bufs: Sequence, length: int, *, sync: bool = False) -> int:
        """Write ``length`` bytes already held in the leased ``bufs`` at ``offset``, without a copy.

        The bytes lie in order: every buffer full (``buffer_size`` bytes)
        but the last, which holds the rest from its start (so
        ``len(bufs) == ceil(length / buffer_size)``, else ``ValueError``).
        The tail is zero-padded to a whole block inside the last buffer. The
        buffers go out a window (a quarter of the pool) per submit, one
        WRITE_FIXED each; with ``sync=True`` an fdatasync is linked after the
        last window's writes. The caller keeps the buffers (release them with
        :meth:`release`; one still in flight after a cancellation is returned
        when its CQE arrives). Returns the bytes written (padded); raises the
        ``OSError`` of the first failed op, :class:`EngineClosed` after close.
        """
        bsz = self.buffer_size
        if length <= 0 or len(bufs) != -(-length // bsz):
            raise ValueError(f"write_leased: {len(bufs)} buffers cannot hold exactly {length} bytes "
                             f"({bsz} bytes each, all full but the last)")
        lengths = [bsz] * (len(bufs) - 1)
        lengths.append(self._pad(bufs[-1], length - bsz * (len(bufs) - 1)))
        w = self._window()
        written = 0
        for i in range(0, len(bufs), w):
            last = i + w >= len(bufs)
            written += await self._write_filled(offset + i * bsz, list(bufs[i : i + w]), lengths[i : i + w],
                                                sync and last)
        return written

    async def write_batch_with_data_sync(self, items: Sequence[tuple[int, Any]]) -> int:
        """Write each ``(offset, data)`` and an fdatasync as ONE linked chain in one submit.

        Every item must fit in one fixed buffer and all of them in a quarter of
        the pool (else ``ValueError``; use :meth:`write_chunks` then
        :meth:`fdatasync`). Returns the bytes written. Raises ``OSError``.
        """
        if not items:
            await self.fdatasync()
            return 0
        if len(items) > self._window() or len(items) + 1 > self.queue_depth:
            raise ValueError(f"write_batch_with_data_sync: {len(items)} items exceed the pool window {self._window()}")
        bufs = await self.lease(len(items))
        try:
            ops = []
            for (off, data), b in zip(items, bufs):
                mv = memoryview(data).cast("B")
                if len(mv) > self.buffer_size or len(mv) == 0:
                    raise ValueError(f"write_batch_with_data_sync: an item of {len(mv)} bytes does not fit a buffer")
                ops.append((WRITE, b, off, self._fill(b, 0, mv, 0, len(mv)), 0))
            ops.append((FSYNC,))
            res = await self.run(ops, link=True)
            total = 0
            for op, r in zip(ops, res):
                check_result(r, op[3] if op[0] == WRITE else None, op[0])
                total += r
            return total
        finally:
            self.release(*bufs)

    async def fdatasync(self) -> None:
        """One fdatasync of the data file. Raises ``OSError``."""
        (r,) = await self.run([(FSYNC,)])
        check_result(r, None, "fdatasync")

    # -- lifetime ---------------------------------------------------------------

    def close(self, *, close_engine: bool = True) -> None:
        """Stop watching the eventfd, fail waiting ops with :class:`EngineClosed`, close the engine.

        The engine's own close waits for ops in flight. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self._fd)
        except Exception:
            pass
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        err = EngineClosed("the async engine was closed with this operation in flight")
        self._fail_ops(err)
        for _n, fut in self._buf_waiters:
            if not fut.done():
                fut.set_exception(err)
        self._buf_waiters.clear()
        for fut in self._slot_waiters:
            if not fut.done():
                fut.set_exception(err)
        if close_engine:
            self.engine.close()
