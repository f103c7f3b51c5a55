# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._aiocore — the request path of :class:`ringblob.engine.aio.AsyncEngine` in C.

:class:`AsyncCore` is the base class of ``AsyncEngine``: it holds the state the
adapter shares between its Python methods and its hot paths (the op table
``_futs`` of tag -> future or read op, the tags queued for this loop turn's
submit, the deferred buffers, the waiter queues, the counters) as typed fields,
and implements the methods every small read goes through:

* :meth:`AsyncCore.read_nowait` — lease one fixed buffer, queue a READ_FIXED,
  remember the op in a :class:`_ReadOp` (a C struct-like object, not a future);
* :meth:`AsyncCore._on_ready` — the eventfd reader: reap CQEs in batches and
  deliver each result to its future (``set_result``) or its read op (copy the
  bytes out, give the buffer back, call ``done(data, error)``);
* :meth:`AsyncCore._flush` — the turn's one ``engine.submit()``;
  :meth:`AsyncCore.submit_now` makes it at once (the group commit's writes and
  fdatasync: on the critical path of every sync PUT of a round; submitting
  them when queued instead of at the turn's end took sync 4 KiB PUTs at 32
  concurrent from ~40k to ~55k/s and 22 to 16 µs of daemon CPU each).

Like the rest of the adapter it knows nothing of keys, and it works over any
engine with the contract of :mod:`ringblob.engine` (``uring``, ``psync``, the
fault-injecting and crash-simulating wrappers): it calls the engine's Python
methods (``lease``, ``read_fixed``, ``submit``, ``reap``, ``release``,
``Buffer.tobytes``), never its C internals. Compiling the same Python code
with Cython gained nothing; what is saved here is the bytecode and the object
and attribute machinery around those calls. With ``ringblob._storeget`` (the
store's side) it took the daemon's CPU per 4 KiB GET at 32 concurrent from
18.3 to 14.7 µs on the 2-CPU bench VM (medians of three A/B rounds).
"""

cimport cython
from cpython.dict cimport PyDict_GetItem, PyDict_DelItem, PyDict_SetItem
from cpython.ref cimport PyObject

import errno as _errno

from ringblob.errors import BufferBusy, EngineClosed
from ringblob.errors import Misaligned as _Misaligned

#: read_nowait submits at once when this many ops wait for the turn's submit
SUBMIT_EARLY = 8
cdef Py_ssize_t _SUBMIT_EARLY = SUBMIT_EARLY
#: the most CQEs one ``_on_ready`` call (one loop turn) reaps and delivers; the engine keeps its
#: eventfd readable while more are left, so the next turn takes the next group
REAP_TURN = 16
cdef int _REAP_TURN = REAP_TURN


def check_result(res, want=None, str what="io"):
    """Raise the ``OSError`` a CQE carried; raise ``OSError(EIO)`` for a short transfer.

    ``want``: the byte count the op asked for (None: any). Returns the result.
    """
    if isinstance(res, BaseException):
        raise res
    if want is not None and res != want:
        raise OSError(_errno.EIO, f"{what}: short transfer of {res} of {want} bytes (past the end of the file?)")
    return res


@cython.final
@cython.freelist(64)
cdef class _ReadOp:
    """A read queued by :meth:`AsyncCore.read_nowait`: completed by a call, not a future.

    ``buf``: the leased buffer; ``offset``/``alen``: the byte range read (block
    multiples); ``length``: the bytes handed to ``done``."""

    cdef readonly object buf
    cdef readonly long long offset
    cdef readonly long long alen
    cdef readonly Py_ssize_t length
    cdef readonly object done


@cython.final
@cython.freelist(16)
cdef class _BatchOp:
    """Ops queued together by :meth:`AsyncCore.run_nowait`: completed by one call once every
    one of them has its CQE. Their tags are consecutive from ``first_tag``; ``results`` holds
    one result per op (an ``int`` or the exception), ``remaining`` the ops still in flight."""

    cdef list results
    cdef Py_ssize_t remaining
    cdef long long first_tag
    cdef object done


cdef class AsyncCore:
    """The typed state and hot paths of ``AsyncEngine`` (see the module docstring).

    Not used on its own: ``AsyncEngine.__init__`` fills every field. All
    methods must be called from the event loop's thread.
    """

    cdef public object engine
    cdef public object loop
    cdef public dict _futs
    cdef public list _unsubmitted
    cdef public object _flush_handle
    cdef public object _buf_waiters
    cdef public object _slot_waiters
    cdef public list _deferred
    cdef public bint _closed
    cdef public object _tags
    cdef public long long submits
    cdef public long long ops
    cdef public long long block_size
    cdef public long long buffer_size
    cdef public long long buffer_count
    cdef public long long queue_depth
    cdef object _flush_cb
    # the engine's methods the hot paths call, bound once (the engine is never replaced)
    cdef object _e_lease
    cdef object _e_read_fixed
    cdef object _e_release
    cdef object _e_reap
    cdef object _e_submit
    cdef object _call_soon

    def _init_core(self):
        """Cache what the hot paths call (after the fields are set)."""
        self._flush_cb = self._flush
        eng = self.engine
        self._e_lease = eng.lease
        self._e_read_fixed = eng.read_fixed
        self._e_release = eng.release
        self._e_reap = eng.reap
        self._e_submit = eng.submit
        self._call_soon = self.loop.call_soon

    # -- the turn's submit ------------------------------------------------------

    def _flush(self):
        """The turn's one ``engine.submit()`` for every op queued since the last one; a refused
        submit fails the ops it carried (their futures get the ``OSError``, read ops their ``done``)."""
        cdef list tags
        self._flush_handle = None
        if self._closed or not self._unsubmitted:
            return
        tags = self._unsubmitted
        self._unsubmitted = []
        try:
            self._e_submit()
            self.submits += 1
        except Exception as exc:  # the batch did not reach the kernel: fail its ops
            for t in tags:
                err = OSError(getattr(exc, "errno", None) or _errno.EIO, f"submit: {exc}")
                self._deliver(t, self._futs.pop(t, None), err, False)

    def submit_now(self):
        """Submit the ops queued for this loop turn now, instead of at the turn's end (the group
        commit's fdatasync, queued from the completion call of its round's last write, goes out
        before the rest of the turn's callbacks run). Same errors as the turn's submit: a refused
        submit fails the ops it carried."""
        h = self._flush_handle
        if h is not None:
            h.cancel()
        self._flush()

    cdef inline void _schedule_flush(self):
        if self._flush_handle is None:
            self._flush_handle = self._call_soon(self._flush_cb)

    # -- completions --------------------------------------------------------------

    def _on_ready(self):
        """The eventfd is readable: reap up to ``REAP_TURN`` CQEs and deliver each result; then
        return buffers whose release was deferred and wake the queue-depth waiters.

        Why not every CQE at once: the 32 reads of a burst tend to complete together, and
        delivering them all in one turn (verify, reply) before the loop reads the clients' next
        requests ran the daemon's work and the disk's one after the other, in lockstep (32 CQEs
        per reap, ~700 µs per round trip of the burst at 32 concurrent on the bench VM). Groups
        of ``REAP_TURN`` let each turn's replies go out (one ``writelines`` per connection) and
        the requests they bring back be read and submitted while the rest of the burst is
        still being delivered: the disk gets work sooner. The engine keeps its eventfd readable
        while CQEs are left, so the loop comes back at once. Measured (5 A/B rounds, loaded
        2-CPU VM): 4 KiB GET at 32 concurrent 39.1k -> 48.5k/s (median), p50 732 -> 591 µs, for
        ~4 µs more daemon CPU per GET (12.0 -> 15.8 µs: more loop turns, writev and eventfd calls); groups of
        4 and 8 did no better, all at once (the old way) worst.

        Why 16, not the 6 of that measurement: each turn has fixed costs (an ``epoll_wait``, a
        ``writev`` per connection that wakes its client, a ``read`` of the requests, an
        ``io_uring_enter`` whose virtio kick is a VM exit), and on a host where those cost more
        small groups spend the daemon's one core on them. On a second 2-CPU VM (fio's own CPU per
        4 KiB read 8.9 µs against 5.2 on the first), alternating 3 s runs of GET at 32
        concurrent (medians): groups of 6 28.0k/s at 27-31 µs of daemon CPU per GET (14 runs),
        12 37.0k (7), 16 37.3k at 17-25 µs (15), 32 33.9k (9); the write workloads level. On
        the first VM 8 and 12 had cut CPU per GET at level throughput. Two groups per burst of
        32 keep the overlap (bench/results/analysis.md, "Session 14")."""
        cdef list cqes
        cdef object fut
        cdef PyObject *p
        if self._closed:
            return
        eng = self.engine
        try:
            cqes = self._e_reap(_REAP_TURN)
            for item in cqes:
                tag, res = item
                p = PyDict_GetItem(self._futs, tag)
                if p == NULL:
                    continue
                fut = <object>p
                PyDict_DelItem(self._futs, tag)
                self._deliver(tag, fut, res, False)
        except EngineClosed:
            return
        if self._deferred:
            keep = []
            for buf in self._deferred:
                if buf.in_flight:
                    keep.append(buf)
                else:
                    eng.release(buf)
            self._deferred = keep
            self._wake_buffers()
        if self._slot_waiters:
            for fut in self._slot_waiters:
                if not fut.done():
                    fut.set_result(None)

    def _fail_ops(self, err):
        """Fail every op in flight with ``err`` (close): futures get it as their exception, read
        ops their ``done(None, err)``."""
        futs = self._futs
        self._futs = {}
        for tag, fut in futs.items():
            self._deliver(tag, fut, err, True)

    cdef int _deliver(self, tag, fut, res, bint fail) except -1:
        """Hand ``res`` (a CQE result, or the error that ends the op) to the op ``fut`` queued
        under ``tag``: a read op's ``done``, a batch's part, or a future (``res`` as its
        exception when ``fail``, else as its result; a done future or None is skipped)."""
        if type(fut) is _ReadOp:
            self._complete_read(<_ReadOp>fut, res)
        elif type(fut) is _BatchOp:
            self._complete_part(<_BatchOp>fut, tag, res)
        elif fut is not None and not fut.done():
            if fail:
                fut.set_exception(res)
            else:
                fut.set_result(res)
        return 0

    cdef int _complete_read(self, _ReadOp op, object res) except -1:
        """Finish a :meth:`read_nowait` op with its CQE result (or an exception): copy the
        bytes out, give the buffer back, then call its ``done``."""
        data = None
        err = None
        buf = op.buf
        try:
            if type(res) is int and <long long>res == op.alen:
                data = buf.tobytes(op.length)
            elif isinstance(res, BaseException):
                err = res
            else:
                try:
                    check_result(res, op.alen, f"read_fixed at offset {op.offset}")
                except OSError as exc:
                    err = exc
        finally:
            if buf.in_flight or self._closed or self._buf_waiters:
                self._release_bufs([buf])
            else:  # the common case, inline
                try:
                    self._e_release(buf)
                except BufferBusy:
                    self._deferred.append(buf)
        done = op.done
        op.done = None
        op.buf = None
        try:
            done(data, err)
        except Exception as exc:  # the caller's bug must not stop the reap of other ops
            self.loop.call_exception_handler({
                "message": "AsyncEngine.read_nowait: the completion callback raised", "exception": exc})
        return 0

    cdef int _complete_part(self, _BatchOp op, object tag, object res) except -1:
        """One op of a :meth:`run_nowait` batch completed with ``res``; the last one calls ``done``."""
        cdef long long i = <long long>tag - op.first_tag
        if i < 0 or i >= len(op.results) or op.done is None:
            return 0
        op.results[i] = res
        op.remaining -= 1
        if op.remaining > 0:
            return 0
        done = op.done
        op.done = None
        try:
            done(op.results)
        except Exception as exc:  # the caller's bug must not stop the reap of other ops
            self.loop.call_exception_handler({
                "message": "AsyncEngine.run_nowait: the completion callback raised", "exception": exc})
        return 0

    # -- buffers --------------------------------------------------------------------

    cdef int _release_bufs(self, list bufs) except -1:
        eng = self.engine
        if self._closed:
            return 0
        for b in bufs:
            if b.in_flight:
                self._deferred.append(b)
            else:
                try:
                    eng.release(b)
                except BufferBusy:  # a wrapper engine that still counts it busy: at the next CQE
                    self._deferred.append(b)
        if self._buf_waiters:
            self._wake_buffers()
        return 0

    def _release_now(self, list bufs):
        """Return buffers whose ops completed (the common case) to the pool, deferring any still
        in flight to their CQE."""
        self._release_bufs(bufs)

    # -- the read path of a small value ------------------------------------------

    def read_nowait(self, long long offset, long long length, done):
        """Queue a read of ``length`` bytes (1 to ``buffer_size``) at ``offset`` for this loop
        turn's submit, completed by a call instead of a future: the cheapest way to read a
        small value (no future, no coroutine, no callback scheduled through the loop).

        ``done(data, error)`` is called exactly once, on the loop's thread, from the CQE reap
        (or from :meth:`close`): ``data`` is the ``bytes`` read and ``error`` None, or ``data``
        is None and ``error`` the ``OSError`` (EIO for a short read, :class:`EngineClosed`
        after close). An exception ``done`` raises is reported to the loop's exception
        handler, never to other ops. Returns False, having queued nothing (``done`` is never
        called), when the read does not fit one fixed buffer or a buffer or a queue slot is
        not free at once, or others already wait for them (fair to :meth:`read`'s waiters):
        the caller takes the awaiting path, :meth:`read`. Raises :class:`Misaligned` for an
        ``offset`` that is not a block multiple, :class:`EngineClosed` after :meth:`close`.
        When ``SUBMIT_EARLY`` ops wait for the turn's submit, they are submitted now (a
        refused submit fails nothing here: the turn's submit tries again).
        """
        cdef _ReadOp op
        cdef long long bs, alen
        if length <= 0 or length > self.buffer_size:
            return False
        if self._closed:
            raise EngineClosed("read: the async engine is closed")
        eng = self.engine
        if (self._buf_waiters or self._slot_waiters or eng.free_buffers < 1
                or eng.in_flight + eng.pending + 1 > self.queue_depth):
            return False
        buf = self._e_lease()
        bs = self.block_size
        alen = (length + bs - 1) // bs * bs
        tag = next(self._tags)
        try:
            self._e_read_fixed(buf, offset, alen, tag)
        except BaseException:
            self._release_bufs([buf])
            raise
        op = _ReadOp.__new__(_ReadOp)
        op.buf = buf
        op.offset = offset
        op.alen = alen
        op.length = <Py_ssize_t>length
        op.done = done
        PyDict_SetItem(self._futs, tag, op)
        unsubmitted = self._unsubmitted
        unsubmitted.append(tag)
        self.ops += 1
        if self._flush_handle is None:
            self._flush_handle = self._call_soon(self._flush_cb)
        elif len(unsubmitted) >= _SUBMIT_EARLY:
            # a burst of reads: the first ones go to the disk now, while the rest of the burst
            # is still being decoded (the turn's flush submits the remainder)
            try:
                self._e_submit()
            except Exception:
                pass  # they stay queued: the turn's _flush tries again and fails them if it must
            else:
                self.submits += 1
                self._unsubmitted = []
        return True

    # -- a batch of writes (and fdatasyncs) completed by a call -------------------------

    def run_nowait(self, list ops, done, bint dsync=False):
        """Queue ``ops`` unlinked for this loop turn's submit, completed by ONE call instead of
        a future per op: the group commit's writes and its fdatasync (no future, no coroutine).

        Each op is ``("write", buf, offset, length, buf_offset)`` (offset, length and
        buf_offset block multiples, length > 0, within the buffer) or ``("fdatasync",)``.
        ``dsync=True`` queues every write with RWF_DSYNC (durable when it completes; the
        engine's ``write_fixed(dsync=True)``).
        ``done(results)`` is called exactly once, on the loop's thread, once every op has its
        CQE (or from :meth:`close`): ``results`` holds one result per op, in order, an ``int``
        (bytes transferred; short writes are the caller's to check) or the exception (an
        ``OSError`` from the kernel or a refused submit, :class:`EngineClosed` after close). An
        exception ``done`` raises is reported to the loop's exception handler. Returns False,
        having queued nothing (``done`` is never called), when ``ops`` is empty or the queue
        depth has no room for all of them at once or others wait for it: the caller takes the
        awaiting path (:meth:`run`). Raises :class:`Misaligned` / ``ValueError`` for a bad op
        and :class:`EngineClosed` after close, before anything is queued.
        """
        cdef _BatchOp op
        cdef Py_ssize_t n = len(ops), i
        cdef long long bs = self.block_size
        cdef long long off, ln, boff
        if self._closed:
            raise EngineClosed("run: the async engine is closed")
        eng = self.engine
        if n == 0 or self._slot_waiters or eng.in_flight + eng.pending + n > self.queue_depth:
            return False
        for o in ops:
            kind = o[0]
            if kind == "fdatasync":
                continue
            if kind != "write":
                raise ValueError(f"run_nowait: unknown op {kind!r} (write or fdatasync)")
            off = o[2]
            ln = o[3]
            boff = o[4]
            if off % bs or ln % bs or boff % bs or ln <= 0:
                raise _Misaligned(
                    f"write: offset {off}, length {ln}, buf_offset {boff} must be positive "
                    f"multiples of the logical block size {bs} (O_DIRECT)")
            if boff + ln > o[1].size:
                raise ValueError(f"write: buf_offset {boff} + length {ln} exceeds the buffer size {o[1].size}")
        op = _BatchOp.__new__(_BatchOp)
        op.results = [None] * n
        op.remaining = n
        op.done = done
        futs = self._futs
        unsubmitted = self._unsubmitted
        for i in range(n):
            o = ops[i]
            tag = next(self._tags)
            if i == 0:
                op.first_tag = tag
            try:
                if o[0] == "write":
                    eng.write_fixed(o[1], o[2], o[3], tag, buf_offset=o[4], dsync=dsync)
                else:
                    eng.fdatasync(tag)
            except BaseException as exc:
                if i == 0:
                    raise  # nothing queued: done is never called
                # the first ops are in the ring: they complete the batch, the rest failed
                for j in range(i, n):
                    op.results[j] = exc if isinstance(exc, Exception) else OSError(_errno.EIO, f"{exc!r}")
                op.remaining = i
                break
            PyDict_SetItem(futs, tag, op)
            unsubmitted.append(tag)
            self.ops += 1
        if self._flush_handle is None:
            self._flush_handle = self._call_soon(self._flush_cb)
        return True
