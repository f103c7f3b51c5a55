# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._uring — the io_uring engine (the contract is in :mod:`ringblob.engine`).

One :class:`Ring` owns one io_uring instance, a pool of page-aligned buffers
registered with ``io_uring_register_buffers`` (fixed buffers), the data
file(s) registered with ``io_uring_register_files`` (fixed files) and an
eventfd registered with ``io_uring_register_eventfd`` so an asyncio loop can
watch completions with ``add_reader``.

Design notes
------------

* Queueing (``read_fixed``/``write_fixed``/``fdatasync``) only records the op
  in a C-side op table; SQEs are prepared and handed to the kernel by
  ``submit()`` with one ``io_uring_enter``. Keeping SQEs out of the SQ ring
  until then lets the engine resubmit retried ops (EAGAIN, short I/O, broken
  links) at any time without splicing them into a half-queued user chain.
* ``user_data`` is the op's slot in the table, never a Python pointer; the
  caller's tag lives in a list at the same slot until the result is delivered.
* Ring setup tries ``IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN``
  (with ``IORING_SETUP_TASKRUN_FLAG``) first and drops flags step by step on
  EINVAL (older kernels), as fio does; ``Ring.setup_flags`` names what was
  taken. With DEFER_TASKRUN, completions are posted only when the owning
  thread enters the kernel; the kernel still signals the registered eventfd
  when completion work is queued, and :meth:`Ring.reap` runs
  ``io_uring_get_events`` (when the kernel flags pending work) before peeking
  CQEs. SINGLE_ISSUER means only the thread that created the ring may submit
  or reap; the engine checks this and raises ``RuntimeError`` otherwise
  (pass ``single_issuer=False`` for a ring shared between threads; then the
  ring fd is not registered, as that registration is per thread). Whatever
  the mode, the kernel cancels the pending requests of a thread that exits,
  so submit only from threads that outlive their ops.
* The buffer pool is an anonymous mmap owned by a small buffer-protocol
  object; buffers' memoryviews keep it alive, so ``close()`` never leaves a
  dangling view: the mapping is unmapped when the last view is gone.
"""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cimport liburing as u
cimport linux as lx
from linux cimport EAGAIN, EINTR, EBUSY, ECANCELED, EIO, ETIME, EINVAL

import errno as _errno
import os as _os
import time as _time

from ringblob.errors import BufferBusy, Busy, EngineClosed, Misaligned, NoBuffers

__all__ = ["Ring", "Buffer"]

cdef enum:
    # op kinds
    K_READ = 0
    K_WRITE = 1
    K_FSYNC = 2
    # op states
    S_FREE = 0
    S_PENDING = 1     # queued by the caller, not yet submitted
    S_INFLIGHT = 2    # an SQE for it is in the kernel
    S_HOLD = 3        # short / EAGAIN: the remainder waits for its cancelled followers
    S_PARKED = 4      # cancelled (-ECANCELED) by a broken link; waits to be resubmitted
    S_RESUB = 5       # in the resubmit list, SQE not yet prepared
    # what a follower learns when its predecessor in a chain is resolved
    F_NONE = 0
    F_FAIL = 1        # predecessor failed: a cancelled follower is delivered as ECANCELED
    F_RESUBMIT = 2    # predecessor succeeded but broke the link (short read at EOF)
    CQE_BATCH = 64


cdef long long CLOSE_GRACE_NS = 1000000000   # close(): 1 s for ops in flight to finish before cancel
cdef uint64_t CANCEL_UD = 0xFFFFFFFFFFFFFFFE     # user_data of close()'s cancel SQE

_OPNAMES = ("read_fixed", "write_fixed", "fdatasync")

ctypedef struct op_t:
    uint64_t offset       # file offset of the whole op (bytes)
    uint32_t length       # requested length (bytes)
    uint32_t done         # bytes transferred so far
    uint32_t buf_offset   # offset into the fixed buffer (bytes)
    int32_t buf_index     # fixed buffer index, -1 for fdatasync
    int32_t file_index    # fixed file index
    int32_t next          # slot of the op linked after this one, -1 if none
    int32_t prev          # slot of the op this one is linked after, -1 if none
    uint8_t kind
    uint8_t state
    uint8_t fate
    uint8_t dsync         # a write with RWF_DSYNC: durable when it completes


cdef object _oserror(int kind, int err, object offset):
    name = _errno.errorcode.get(err, str(err))
    where = f" at offset {offset}" if offset is not None else ""
    return OSError(err, f"{_OPNAMES[kind]}: {name} ({_os.strerror(err)}){where}")


cdef object _setup_error(str step, int err, str hint=""):
    name = _errno.errorcode.get(err, str(err))
    msg = f"{step}: {name} ({_os.strerror(err)})"
    if hint:
        msg += "; " + hint
    return OSError(err, msg)


cdef class _Pool:
    """Page-aligned anonymous memory exported through the buffer protocol.

    Unmapped only when the pool object dies, i.e. after the ring dropped it
    and the last memoryview of it was released.
    """

    cdef char *addr
    cdef Py_ssize_t size

    def __cinit__(self, Py_ssize_t size):
        cdef void *p = lx.mmap(NULL, <size_t>size, lx.PROT_READ | lx.PROT_WRITE,
                               lx.MAP_PRIVATE | lx.MAP_ANONYMOUS | lx.MAP_POPULATE, -1, 0)
        if p == lx.MAP_FAILED:
            err = lx.errno
            raise _setup_error("mmap", err, f"could not map a buffer pool of {size} bytes")
        self.addr = <char *>p
        self.size = size

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.addr, self.size, 0, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __dealloc__(self):
        if self.addr != NULL:
            lx.munmap(self.addr, <size_t>self.size)
            self.addr = NULL


cdef class Buffer:
    """One registered (fixed) buffer of a :class:`Ring`'s pool.

    ``index``: its fixed-buffer index; ``size``: bytes; ``view``: a writable
    memoryview of the whole buffer (no copy); ``in_flight``: ops queued or in
    flight on it; ``leased``: whether it is leased.
    """

    cdef readonly int index
    cdef readonly Py_ssize_t size
    cdef readonly object view
    cdef readonly int in_flight
    cdef readonly bint leased
    cdef Ring _ring

    def __repr__(self):
        return f"<ringblob._uring.Buffer {self.index} size={self.size} in_flight={self.in_flight}>"

    def tobytes(self, Py_ssize_t length):
        """The first ``length`` bytes of the buffer as new ``bytes`` (one copy, no memoryview).

        Raises ``ValueError`` for a length outside ``0..size``, :class:`EngineClosed`
        once the ring is closed (the pool is gone).
        """
        if length < 0 or length > self.size:
            raise ValueError(f"tobytes: {length} bytes of a {self.size}-byte buffer")
        if self._ring._closed or self._ring.base == NULL:
            raise EngineClosed("tobytes: the ring is closed")
        return PyBytes_FromStringAndSize(self._ring.base + <Py_ssize_t>self.index * self.size, length)


# no_gc_clear: when a forgotten ring is collected as part of a cycle (it and its
# buffers reference each other), __dealloc__ still finds the pool and waits for
# the kernel before anything is released.
@cython.no_gc_clear
cdef class Ring:
    """The io_uring engine (see :mod:`ringblob.engine` for the contract).

    ``Ring(fds, *, block_size=4096, buffer_size=262144, buffer_count=64,
    queue_depth=128, single_issuer=True)``

    ``fds``: open file descriptors (normally opened with O_DIRECT), registered
    as fixed files and addressed by ``file_index``; not closed by the ring.
    ``block_size``: alignment unit in bytes (the logical block size).
    ``buffer_size`` x ``buffer_count``: the registered pool in bytes.
    ``queue_depth``: the most ops queued plus in flight. ``single_issuer``:
    try IORING_SETUP_SINGLE_ISSUER/DEFER_TASKRUN (then only the creating
    thread may submit, reap, wait or close with waiting).

    Raises ``ValueError`` for bad sizes and ``OSError`` (errno kept; the
    message names the failing step, e.g. ``io_uring_queue_init_params: EPERM
    ...``) when the kernel refuses a setup step.
    """

    name = "uring"

    cdef u.io_uring ring
    cdef bint ring_ok
    cdef op_t *ops
    cdef int32_t *free_slots
    cdef int nfree_slots
    cdef int32_t *pend
    cdef int npend
    cdef int32_t *resub
    cdef int nresub
    cdef int32_t *free_bufs
    cdef int nfree_bufs
    cdef int kinflight          # SQEs handed to the kernel whose CQE is not yet seen
    cdef int nactive            # ops submitted and not yet delivered
    cdef bint last_link         # the last pending op asked for link=True
    cdef char *base
    cdef uint64_t bs_mask
    cdef int nfds
    cdef list _tags
    cdef list _buffers
    cdef list _stash            # results taken from the CQ but not yet returned
    cdef _Pool _pool
    cdef bint _closed
    cdef bint _defer
    cdef bint _taskrun_flag
    cdef bint _efd_set          # this engine wrote the eventfd and nothing drained it since
    cdef bint _single
    cdef unsigned long _owner
    cdef int _busy
    cdef uint64_t c_enters, c_sqes, c_cqes, c_fdatasyncs, c_retries, c_short, c_link

    cdef readonly int block_size
    cdef readonly Py_ssize_t buffer_size
    cdef readonly int buffer_count
    cdef readonly int queue_depth
    cdef readonly int eventfd
    cdef readonly list setup_flags
    cdef readonly unsigned int sq_entries
    cdef readonly unsigned int cq_entries

    def __cinit__(self):
        self.ring_ok = False
        self.ops = NULL
        self.free_slots = NULL
        self.pend = NULL
        self.resub = NULL
        self.free_bufs = NULL
        self.eventfd = -1
        self._closed = True

    def __init__(self, fds, *, int block_size=4096, Py_ssize_t buffer_size=262144,
                 int buffer_count=64, int queue_depth=128, bint single_issuer=True):
        cdef long pagesize = lx.sysconf(lx._SC_PAGESIZE)
        cdef int i, ret
        cdef u.io_uring_params params
        cdef u.iovec *iov = NULL
        cdef int *cfds = NULL
        if self.ring_ok:
            raise RuntimeError("Ring.__init__ called twice")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"uring engine: block_size {block_size} is not a power of two")
        if buffer_size <= 0 or buffer_size % pagesize or buffer_size % block_size or buffer_size >= (1 << 31):
            raise ValueError(
                f"uring engine: buffer_size {buffer_size} must be a positive multiple of the "
                f"page size ({pagesize}) and the block size ({block_size}), below 2 GiB"
            )
        if buffer_count <= 0 or buffer_count > 16384 or queue_depth <= 0 or queue_depth > 32768:
            raise ValueError("uring engine: buffer_count (1..16384) and queue_depth (1..32768) must be in range")
        fdlist = [int(fd) for fd in fds]
        if not fdlist:
            raise ValueError("uring engine: at least one file descriptor is needed")
        self.block_size = block_size
        self.bs_mask = <uint64_t>(block_size - 1)
        self.buffer_size = buffer_size
        self.buffer_count = buffer_count
        self.queue_depth = queue_depth
        self.nfds = len(fdlist)

        self.ops = <op_t *>calloc(queue_depth, sizeof(op_t))
        self.free_slots = <int32_t *>calloc(queue_depth, sizeof(int32_t))
        self.pend = <int32_t *>calloc(queue_depth, sizeof(int32_t))
        self.resub = <int32_t *>calloc(queue_depth, sizeof(int32_t))
        self.free_bufs = <int32_t *>calloc(buffer_count, sizeof(int32_t))
        if not (self.ops and self.free_slots and self.pend and self.resub and self.free_bufs):
            raise MemoryError("uring engine: cannot allocate the op table")
        for i in range(queue_depth):
            self.free_slots[i] = queue_depth - 1 - i
        self.nfree_slots = queue_depth
        for i in range(buffer_count):
            self.free_bufs[i] = buffer_count - 1 - i
        self.nfree_bufs = buffer_count
        self._tags = [None] * queue_depth
        self._stash = []

        self._pool = _Pool(buffer_size * buffer_count)
        self.base = self._pool.addr
        whole = memoryview(self._pool)
        bufs = []
        cdef Buffer b
        for i in range(buffer_count):
            b = Buffer.__new__(Buffer)
            b.index = i
            b.size = buffer_size
            b.view = whole[i * buffer_size:(i + 1) * buffer_size]
            b.in_flight = 0
            b.leased = False
            b._ring = self
            bufs.append(b)
        self._buffers = bufs
        whole.release()

        # -- the ring: newest setup flags first, dropped step by step on EINVAL
        ladder = []
        if single_issuer:
            ladder.append((u.IORING_SETUP_SINGLE_ISSUER | u.IORING_SETUP_DEFER_TASKRUN | u.IORING_SETUP_TASKRUN_FLAG,
                           ["SINGLE_ISSUER", "DEFER_TASKRUN", "TASKRUN_FLAG"]))
            ladder.append((u.IORING_SETUP_SINGLE_ISSUER | u.IORING_SETUP_DEFER_TASKRUN,
                           ["SINGLE_ISSUER", "DEFER_TASKRUN"]))
            ladder.append((u.IORING_SETUP_SINGLE_ISSUER | u.IORING_SETUP_COOP_TASKRUN | u.IORING_SETUP_TASKRUN_FLAG,
                           ["SINGLE_ISSUER", "COOP_TASKRUN", "TASKRUN_FLAG"]))
        ladder.append((u.IORING_SETUP_COOP_TASKRUN | u.IORING_SETUP_TASKRUN_FLAG, ["COOP_TASKRUN", "TASKRUN_FLAG"]))
        ladder.append((u.IORING_SETUP_COOP_TASKRUN, ["COOP_TASKRUN"]))
        ladder.append((0, []))
        ret = -EINVAL
        for flags, names in ladder:
            memset(&params, 0, sizeof(params))
            params.flags = <uint32_t>flags
            ret = u.io_uring_queue_init_params(<unsigned>queue_depth, &self.ring, &params)
            if ret == 0:
                self.setup_flags = list(names)
                break
            if ret != -EINVAL:
                break
        if ret < 0:
            raise _setup_error("io_uring_queue_init_params", -ret,
                               "the kernel refused to create an io_uring instance")
        self.ring_ok = True
        self._closed = False
        self.sq_entries = params.sq_entries
        self.cq_entries = params.cq_entries
        self._defer = "DEFER_TASKRUN" in self.setup_flags
        self._taskrun_flag = "TASKRUN_FLAG" in self.setup_flags
        self._single = "SINGLE_ISSUER" in self.setup_flags
        self._owner = PyThread_get_thread_ident()
        try:
            if self._single:
                # optional (5.18+): cheaper io_uring_enter. The registration is per thread,
                # so only a ring that one thread drives may use it.
                u.io_uring_register_ring_fd(&self.ring)

            iov = <u.iovec *>calloc(buffer_count, sizeof(u.iovec))
            if iov == NULL:
                raise MemoryError()
            for i in range(buffer_count):
                iov[i].iov_base = self.base + <Py_ssize_t>i * buffer_size
                iov[i].iov_len = <size_t>buffer_size
            ret = u.io_uring_register_buffers(&self.ring, iov, <unsigned>buffer_count)
            if ret < 0:
                raise _setup_error("io_uring_register_buffers", -ret,
                                   f"registering {buffer_count} fixed buffers of {buffer_size} bytes "
                                   "(raise RLIMIT_MEMLOCK / LimitMEMLOCK, or use a smaller pool)")

            cfds = <int *>calloc(self.nfds, sizeof(int))
            if cfds == NULL:
                raise MemoryError()
            for i in range(self.nfds):
                cfds[i] = fdlist[i]
            ret = u.io_uring_register_files(&self.ring, cfds, <unsigned>self.nfds)
            if ret < 0:
                raise _setup_error("io_uring_register_files", -ret, f"registering the fds {fdlist}")

            ret = lx.eventfd(0, lx.EFD_NONBLOCK | lx.EFD_CLOEXEC)
            if ret < 0:
                raise _setup_error("eventfd", lx.errno)
            self.eventfd = ret
            ret = u.io_uring_register_eventfd(&self.ring, self.eventfd)
            if ret < 0:
                raise _setup_error("io_uring_register_eventfd", -ret)
        except BaseException:
            self._teardown(False)
            self._closed = True
            raise
        finally:
            free(iov)
            free(cfds)

    # -- properties -------------------------------------------------------------

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def in_flight(self):
        """Operations submitted and not yet reaped."""
        return self.nactive

    @property
    def pending(self):
        """Operations queued and not yet submitted."""
        return self.npend

    @property
    def free_buffers(self):
        """Buffers not leased."""
        return self.nfree_bufs

    def __repr__(self):
        state = "closed" if self._closed else f"in_flight={self.nactive} pending={self.npend}"
        return f"<ringblob._uring.Ring {state} flags={self.setup_flags}>"

    cdef inline int _check(self, str what) except -1:
        if self._closed:
            raise EngineClosed(f"{what}: the io_uring engine is closed")
        if self._busy:
            raise RuntimeError(f"{what}: another thread is waiting on this ring; use it from one thread")
        if self._single and PyThread_get_thread_ident() != self._owner:
            raise RuntimeError(
                f"{what}: this ring was created with IORING_SETUP_SINGLE_ISSUER by another thread; "
                "submit and reap only from the thread that created it (or create it with single_issuer=False)"
            )
        return 0

    # -- buffers ------------------------------------------------------------------

    def lease(self):
        """Lease a free buffer (a :class:`Buffer`). Raises :class:`NoBuffers` when all are leased."""
        if self._closed:
            raise EngineClosed("lease: the io_uring engine is closed")
        if self.nfree_bufs == 0:
            raise NoBuffers(
                f"lease: all {self.buffer_count} buffers of {self.buffer_size} bytes are leased; "
                "release one or configure a larger buffer pool"
            )
        self.nfree_bufs -= 1
        cdef Buffer b = <Buffer>self._buffers[self.free_bufs[self.nfree_bufs]]
        b.leased = True
        return b

    def release(self, buf):
        """Return a leased buffer. Raises :class:`BufferBusy` while an op on it is queued or in flight."""
        if self._closed:
            raise EngineClosed("release: the io_uring engine is closed")
        if type(buf) is not Buffer or (<Buffer>buf)._ring is not self:
            raise ValueError("release: buffer does not belong to this engine")
        cdef Buffer b = <Buffer>buf
        if not b.leased:
            raise ValueError(f"release: buffer {b.index} is not leased")
        if b.in_flight:
            raise BufferBusy(f"release: buffer {b.index} has {b.in_flight} operation(s) in flight")
        b.leased = False
        self.free_bufs[self.nfree_bufs] = b.index
        self.nfree_bufs += 1

    # -- queueing -----------------------------------------------------------------

    cdef int _queue(self, int kind, object buf, long long offset, long long length, object tag,
                    long long buf_offset, int file_index, bint link, bint dsync=False) except -1:
        cdef Buffer b
        cdef int32_t slot, prevslot
        cdef op_t *op
        if self._closed:
            raise EngineClosed(f"{_OPNAMES[kind]}: the io_uring engine is closed")
        if self.npend + self.nactive >= self.queue_depth:
            raise Busy(f"{_OPNAMES[kind]}: queue depth {self.queue_depth} reached; reap completions first")
        if kind != K_FSYNC:
            if type(buf) is not Buffer or (<Buffer>buf)._ring is not self:
                raise ValueError(f"{_OPNAMES[kind]}: buffer does not belong to this engine")
            b = <Buffer>buf
            if not b.leased:
                raise ValueError(f"{_OPNAMES[kind]}: buffer {b.index} is not leased")
            if offset < 0 or length <= 0 or buf_offset < 0:
                raise Misaligned(f"{_OPNAMES[kind]}: offset {offset}, length {length}, "
                                 f"buf_offset {buf_offset} must be positive")
            if (<uint64_t>offset | <uint64_t>length | <uint64_t>buf_offset) & self.bs_mask:
                raise Misaligned(
                    f"{_OPNAMES[kind]}: offset {offset}, length {length} and buf_offset {buf_offset} must be "
                    f"multiples of the logical block size {self.block_size} (O_DIRECT)"
                )
            if buf_offset + length > self.buffer_size:
                raise ValueError(f"{_OPNAMES[kind]}: buf_offset {buf_offset} + length {length} exceeds "
                                 f"the buffer size {self.buffer_size}")
            b.in_flight += 1
        self.nfree_slots -= 1
        slot = self.free_slots[self.nfree_slots]
        op = &self.ops[slot]
        op.kind = <uint8_t>kind
        op.state = S_PENDING
        op.fate = F_NONE
        op.offset = <uint64_t>offset
        op.length = <uint32_t>length
        op.done = 0
        op.buf_offset = <uint32_t>buf_offset
        op.buf_index = b.index if kind != K_FSYNC else -1
        op.file_index = file_index
        op.dsync = dsync
        op.next = -1
        op.prev = -1
        if self.npend and self.last_link:
            prevslot = self.pend[self.npend - 1]
            self.ops[prevslot].next = slot
            op.prev = prevslot
        self.last_link = link
        self.pend[self.npend] = slot
        self.npend += 1
        self._tags[slot] = tag
        return 0

    def read_fixed(self, buf, long long offset, long long length, tag, *,
                   long long buf_offset=0, int file_index=0, bint link=False):
        """Queue a read of ``length`` bytes at file ``offset`` into ``buf.view[buf_offset:]`` (READ_FIXED).

        Raises :class:`Misaligned` (offset/length/buf_offset not multiples of
        ``block_size``), ``ValueError`` (foreign or unleased buffer, range past
        the buffer), :class:`Busy` (queue depth reached), :class:`EngineClosed`.
        """
        self._queue(K_READ, buf, offset, length, tag, buf_offset, file_index, link)

    def write_fixed(self, buf, long long offset, long long length, tag, *,
                    long long buf_offset=0, int file_index=0, bint link=False, bint dsync=False):
        """Queue a write of ``buf.view[buf_offset:buf_offset+length]`` at file ``offset`` (WRITE_FIXED).

        ``dsync=True`` sets RWF_DSYNC on the SQE (per-write O_DSYNC): the write
        completes only once its data, and the metadata needed to read it back,
        are on stable storage (a FUA write, or a cache flush the kernel issues
        after it). Errors as :meth:`read_fixed`.
        """
        self._queue(K_WRITE, buf, offset, length, tag, buf_offset, file_index, link, dsync)

    def fdatasync(self, tag, *, int file_index=0, bint link=False):
        """Queue an fdatasync (IORING_OP_FSYNC with IORING_FSYNC_DATASYNC) of file ``file_index``."""
        self._queue(K_FSYNC, None, 0, 0, tag, 0, file_index, link)

    # -- submission -----------------------------------------------------------------

    cdef int _prep(self, int32_t slot) except -1:
        cdef op_t *op = &self.ops[slot]
        cdef u.io_uring_sqe *sqe = u.io_uring_get_sqe(&self.ring)
        cdef int tries = 0
        while sqe == NULL:      # SQ ring full (only after a failed enter): push what is there
            self._enter()
            sqe = u.io_uring_get_sqe(&self.ring)
            tries += 1
            if sqe == NULL and tries > 1000:
                raise OSError(EBUSY, "submit: the SQ ring stays full; the kernel is not consuming SQEs")
        if op.kind == K_READ:
            u.io_uring_prep_read_fixed(sqe, op.file_index,
                                       self.base + <Py_ssize_t>op.buf_index * self.buffer_size + op.buf_offset + op.done,
                                       op.length - op.done, op.offset + op.done, op.buf_index)
        elif op.kind == K_WRITE:
            u.io_uring_prep_write_fixed(sqe, op.file_index,
                                        self.base + <Py_ssize_t>op.buf_index * self.buffer_size + op.buf_offset + op.done,
                                        op.length - op.done, op.offset + op.done, op.buf_index)
            if op.dsync:  # the remainder of a short write keeps it too
                sqe.rw_flags = u.RWF_DSYNC
        else:
            u.io_uring_prep_fsync(sqe, op.file_index, u.IORING_FSYNC_DATASYNC)
        sqe.flags = u.IOSQE_FIXED_FILE | (u.IOSQE_IO_LINK if op.next >= 0 else 0)
        sqe.user_data = <uint64_t>slot
        op.state = S_INFLIGHT
        self.kinflight += 1
        return 0

    cdef int _enter(self) except -1:
        """io_uring_enter until the SQ ring is empty; EBUSY/EAGAIN: reap into the stash and retry."""
        cdef int ret
        cdef int stuck = 0
        while u.io_uring_sq_ready(&self.ring) > 0:
            ret = u.io_uring_submit(&self.ring)
            self.c_enters += 1
            if ret > 0:
                self.c_sqes += <uint64_t>ret
                stuck = 0
                continue
            if ret == -EINTR:
                continue
            if ret == 0 or ret == -EBUSY or ret == -EAGAIN:
                # completion queue full or kernel short of memory: make room, then retry
                self.c_retries += 1
                stuck += 1
                if self._process(self._stash, 1 << 30) == 0:
                    with nogil:
                        lx.usleep(100 if stuck < 100 else 1000)
                if stuck > 10000:
                    raise _setup_error("submit: io_uring_enter", -ret if ret else EBUSY,
                                       "the kernel keeps refusing SQEs")
                continue
            raise _setup_error("submit: io_uring_enter", -ret)
        if self._stash:
            self._set_eventfd()
        return 0

    cdef int _flush(self) except -1:
        cdef int i = 0, n
        while i < self.nresub:      # (a nested reap on a refused enter may append more)
            self._prep(self.resub[i])
            i += 1
        self.nresub = 0
        n = self.npend
        self.npend = 0
        self.last_link = False
        for i in range(n):
            self._prep(self.pend[i])
        self.nactive += n
        self._enter()
        return 0

    def submit(self):
        """Hand every queued op to the kernel with one ``io_uring_enter``; returns how many were submitted.

        Raises :class:`EngineClosed`, ``OSError`` when io_uring_enter fails
        (the ops stay in the SQ ring and go with the next submit).
        """
        self._check("submit")
        cdef int n = self.npend
        if n == 0 and self.nresub == 0 and u.io_uring_sq_ready(&self.ring) == 0:
            return 0
        self._flush()       # (also retries SQEs a refused io_uring_enter left in the SQ ring)
        return n

    # -- completion ----------------------------------------------------------------

    cdef inline void _free_slot(self, int32_t slot):
        cdef op_t *op = &self.ops[slot]
        cdef Buffer b
        if op.buf_index >= 0:
            b = <Buffer>self._buffers[op.buf_index]
            b.in_flight -= 1
        op.state = S_FREE
        self._tags[slot] = None
        self.free_slots[self.nfree_slots] = slot
        self.nfree_slots += 1

    cdef int _deliver(self, int32_t slot, object result, list out) except -1:
        cdef op_t *op = &self.ops[slot]
        if op.prev >= 0 and self.ops[op.prev].next == slot:
            self.ops[op.prev].next = -1
        out.append((self._tags[slot], result))
        self.nactive -= 1
        self._free_slot(slot)
        return 0

    cdef int _deliver_error(self, int32_t slot, int err, list out) except -1:
        cdef op_t *op = &self.ops[slot]
        where = None if op.kind == K_FSYNC else op.offset + op.done
        return self._deliver(slot, _oserror(op.kind, err, where), out)

    cdef int _fail_followers(self, int32_t n, list out) except -1:
        """The op before ``n`` failed: parked followers are delivered as ECANCELED; the rest learn it."""
        cdef int32_t nxt
        while n >= 0:
            self.ops[n].prev = -1
            self.ops[n].fate = F_FAIL
            if self.ops[n].state != S_PARKED:
                break                     # still in the kernel: its -ECANCELED CQE decides
            nxt = self.ops[n].next
            self._deliver_error(n, ECANCELED, out)
            n = nxt
        return 0

    cdef int _try_resume(self, int32_t r) except -1:
        """``r`` needs (re)submission (held remainder or parked root); go once all its followers are parked."""
        cdef int32_t n = self.ops[r].next
        cdef int nparked = 0
        while n >= 0:
            if self.ops[n].state != S_PARKED:
                return 0
            n = self.ops[n].next
        n = r
        while n >= 0:
            if n != r or self.ops[r].state == S_PARKED:
                nparked += 1
            self.ops[n].state = S_RESUB
            self.resub[self.nresub] = n
            self.nresub += 1
            n = self.ops[n].next
        self.ops[r].fate = F_NONE
        self.c_link += <uint64_t>nparked
        return 0

    cdef int _complete(self, uint64_t ud, int res, list out) except -1:
        cdef int32_t slot, r
        cdef op_t *op
        if ud >= <uint64_t>self.queue_depth:
            return 0
        slot = <int32_t>ud
        op = &self.ops[slot]
        if op.state != S_INFLIGHT:
            return 0
        self.kinflight -= 1
        if res == -ECANCELED and (op.prev >= 0 or op.fate == F_RESUBMIT):
            op.state = S_PARKED
            if op.prev < 0:
                return self._try_resume(slot)
            r = op.prev
            while self.ops[r].state == S_PARKED and self.ops[r].prev >= 0:
                r = self.ops[r].prev
            if self.ops[r].state == S_HOLD or (self.ops[r].state == S_PARKED and self.ops[r].fate == F_RESUBMIT):
                self._try_resume(r)
            return 0
        if res == -EAGAIN or res == -EINTR:
            self.c_retries += 1
            op.state = S_HOLD
            return self._try_resume(slot)
        if res < 0:
            r = op.next
            self._deliver_error(slot, -res, out)
            return self._fail_followers(r, out)
        r = op.next
        if op.kind == K_FSYNC:
            self.c_fdatasyncs += 1
            if r >= 0:
                self.ops[r].prev = -1
            return self._deliver(slot, 0, out)
        op.done += <uint32_t>res
        if op.done >= op.length:
            if r >= 0:
                self.ops[r].prev = -1
            return self._deliver(slot, op.done, out)
        if res == 0:
            if op.kind == K_READ:       # end of file: the short count is the answer
                self._deliver(slot, op.done, out)
                if r >= 0:              # the short result broke the link: followers run after all
                    self.ops[r].prev = -1
                    self.ops[r].fate = F_RESUBMIT
                    if self.ops[r].state == S_PARKED:
                        self._try_resume(r)
                return 0
            self._deliver_error(slot, EIO, out)     # a write that transfers nothing
            return self._fail_followers(r, out)
        self.c_short += 1                # short read/write: continue with the remainder
        op.state = S_HOLD
        return self._try_resume(slot)

    cdef int _process(self, list out, int max_cqes) except -1:
        """Run deferred completion work, then take up to ``max_cqes`` CQEs in batches."""
        cdef u.io_uring_cqe *cqes[CQE_BATCH]
        cdef uint64_t uds[CQE_BATCH]
        cdef int res[CQE_BATCH]
        cdef unsigned n, i, want
        cdef int total = 0
        if self._defer and (not self._taskrun_flag or (self.ring.sq.kflags[0] & u.IORING_SQ_TASKRUN)):
            u.io_uring_get_events(&self.ring)
        while total < max_cqes:
            want = <unsigned>(max_cqes - total) if max_cqes - total < CQE_BATCH else CQE_BATCH
            n = u.io_uring_peek_batch_cqe(&self.ring, cqes, want)
            if n == 0:
                break
            for i in range(n):
                uds[i] = cqes[i].user_data
                res[i] = cqes[i].res
            u.io_uring_cq_advance(&self.ring, n)
            self.c_cqes += n
            total += <int>n
            for i in range(n):
                self._complete(uds[i], res[i], out)
        return total

    cdef inline int _drain_eventfd(self) except -1:
        cdef lx.eventfd_t v
        lx.eventfd_read(self.eventfd, &v)
        self._efd_set = False
        return 0

    cdef inline int _set_eventfd(self) except -1:
        if not self._efd_set:
            lx.eventfd_write(self.eventfd, 1)
            self._efd_set = True
        return 0

    cdef bint _work_ready(self) noexcept:
        """Whether CQEs, or completion work that will post them, wait for a reap (after a drain)."""
        if self._defer:
            if not self._taskrun_flag:
                u.io_uring_get_events(&self.ring)    # no flag to look at: run the work now
            elif self.ring.sq.kflags[0] & u.IORING_SQ_TASKRUN:
                return True
        return u.io_uring_cq_ready(&self.ring) > 0

    def reap(self, int max_cqes=256):
        """Return up to about ``max_cqes`` completed ``(tag, result)`` pairs without blocking.

        Whenever completions are left for a later call, the eventfd is left
        readable so an event loop comes back: while they are left it is not
        drained (and written once, if this engine has not written it since the
        last drain), so a burst delivered in several calls costs two eventfd
        syscalls, not two per call. Once nothing is left it is drained, and
        written again if completion work arrived meanwhile. Retried, continued
        and resubmitted ops go back to the kernel here (no result for them yet).
        """
        self._check("reap")
        cdef list out
        if self._stash:
            out = self._stash
            self._stash = []
        else:
            out = []
        self._process(out, max_cqes)
        if self.nresub:
            try:
                self._flush()
            except BaseException:
                self._stash = out + self._stash   # results are not lost with the error
                self._set_eventfd()
                raise
        if u.io_uring_cq_ready(&self.ring) or self._stash:
            self._set_eventfd()
            return out
        # no CQE left: drain, then look again, as completion work queued since the last
        # peek (or since _process ran the deferred work) had its signal drained with the rest
        self._drain_eventfd()
        if self._work_ready():
            self._set_eventfd()
        return out

    def wait(self, int min_complete=1, timeout=None):
        """Block (GIL released) until ``min_complete`` results are ready or ``timeout`` seconds pass.

        ``min_complete`` is capped at the ops in flight, so waiting never
        blocks for completions that cannot come. Returns every ready
        ``(tag, result)`` pair (possibly fewer than ``min_complete`` on timeout).
        """
        self._check("wait")
        cdef list out
        cdef int need, ret, want
        cdef u.io_uring_cqe *cqe
        cdef u.__kernel_timespec ts
        cdef u.__kernel_timespec *tsp = NULL
        cdef double deadline = 0.0, left
        self._drain_eventfd()
        if self._stash:
            out = self._stash
            self._stash = []
        else:
            out = []
        need = min(min_complete, self.nactive + len(out))
        self._process(out, 1 << 30)
        if self.nresub or u.io_uring_sq_ready(&self.ring):
            # resubmissions, or SQEs a refused enter left behind: never wait for ops
            # the kernel has not been given
            try:
                self._flush()
            except BaseException:
                self._stash = out + self._stash   # results are not lost with the error
                raise
        if timeout is not None:
            deadline = _time.monotonic() + float(timeout)
        while len(out) < need and self.kinflight > 0:
            if timeout is not None:
                left = deadline - _time.monotonic()
                if left <= 0:
                    break
                ts.tv_sec = <long long>left
                ts.tv_nsec = <long long>((left - <double>ts.tv_sec) * 1e9)
                tsp = &ts
            want = need - len(out)
            if want > self.kinflight:
                want = self.kinflight
            self._busy = 1
            with nogil:
                ret = u.io_uring_wait_cqes(&self.ring, &cqe, <unsigned>want, tsp, NULL)
            self._busy = 0
            self._process(out, 1 << 30)
            if self.nresub:
                self._flush()
            if ret == -EINTR:
                try:
                    PyErr_CheckSignals()
                except BaseException:
                    self._stash = out + self._stash   # keep the results for the next call
                    raise
            elif ret < 0 and ret != -ETIME and ret != -EAGAIN and ret != -EBUSY:
                self._stash = out + self._stash
                raise _setup_error("wait: io_uring_wait_cqes", -ret)
        return out

    def counters(self):
        """Counts since creation: enters (io_uring_enter calls that submit), sqes, cqes, fdatasyncs,
        retries (EAGAIN/EINTR results and refused submits), short_continuations, link_resubmits."""
        return {
            "enters": self.c_enters,
            "sqes": self.c_sqes,
            "cqes": self.c_cqes,
            "fdatasyncs": self.c_fdatasyncs,
            "retries": self.c_retries,
            "short_continuations": self.c_short,
            "link_resubmits": self.c_link,
        }

    # -- lifetime -------------------------------------------------------------------

    cdef void _drain_kernel(self) noexcept nogil:
        """Wait until every SQE handed to the kernel has its CQE; results are dropped.

        Ops get CLOSE_GRACE_NS to finish on their own (data-file I/O takes
        milliseconds, and psync also lets running ops finish); whatever is
        still in flight then (an op that may never complete) is cancelled with
        IORING_ASYNC_CANCEL_ANY, and the wait goes on until the kernel has
        posted a CQE for every op, so no memory it may write is released early.
        """
        cdef u.io_uring_cqe *cqes[CQE_BATCH]
        cdef u.io_uring_cqe *cqe
        cdef u.io_uring_sqe *sqe
        cdef u.__kernel_timespec ts
        cdef timespec now
        cdef unsigned n, i
        cdef uint64_t ud
        cdef long long deadline, left
        cdef int ret, failures = 0
        cdef bint cancelled = False
        if u.io_uring_sq_ready(&self.ring) > 0:
            ret = u.io_uring_submit(&self.ring)
            if ret < 0:         # never reached the kernel: nothing to wait for
                self.kinflight -= <int>u.io_uring_sq_ready(&self.ring)
        clock_gettime(CLOCK_MONOTONIC, &now)
        deadline = <long long>now.tv_sec * 1000000000 + now.tv_nsec + CLOSE_GRACE_NS
        while self.kinflight > 0:
            if self._defer:
                u.io_uring_get_events(&self.ring)
            n = u.io_uring_peek_batch_cqe(&self.ring, cqes, CQE_BATCH)
            if n:
                for i in range(n):
                    ud = cqes[i].user_data
                    if ud < <uint64_t>self.queue_depth and self.ops[ud].state == S_INFLIGHT:
                        self.ops[ud].state = S_HOLD      # reaped; freed by the caller
                        self.kinflight -= 1
                u.io_uring_cq_advance(&self.ring, n)
                continue
            if cancelled:
                ret = u.io_uring_wait_cqes(&self.ring, &cqe, 1, NULL, NULL)
            else:
                clock_gettime(CLOCK_MONOTONIC, &now)
                left = deadline - (<long long>now.tv_sec * 1000000000 + now.tv_nsec)
                if left <= 0:
                    sqe = u.io_uring_get_sqe(&self.ring)
                    if sqe != NULL:
                        u.io_uring_prep_cancel64(sqe, 0, u.IORING_ASYNC_CANCEL_ANY)
                        sqe.user_data = CANCEL_UD
                        u.io_uring_submit(&self.ring)
                    cancelled = True
                    continue
                ts.tv_sec = left // 1000000000
                ts.tv_nsec = left % 1000000000
                ret = u.io_uring_wait_cqes(&self.ring, &cqe, 1, &ts, NULL)
            if ret < 0 and ret != -EINTR and ret != -EAGAIN and ret != -ETIME:
                failures += 1
                if failures > 1000:
                    break   # cannot reap here; io_uring_queue_exit lets the kernel cancel and wait

    cdef void _teardown(self, bint can_wait) noexcept:
        if self.ring_ok:
            if can_wait and self.kinflight > 0:
                with nogil:
                    self._drain_kernel()
            u.io_uring_queue_exit(&self.ring)
            self.ring_ok = False
        if self.eventfd >= 0:
            lx.close(self.eventfd)
            self.eventfd = -1

    def close(self):
        """Wait for ops in flight (GIL released), drop queued ops, free the ring. Idempotent.

        Results not reaped are discarded. Buffers' memoryviews stay valid
        (the pool is unmapped once the last of them is gone); every other
        method raises :class:`EngineClosed` afterwards.
        """
        cdef int i
        cdef bint same_thread
        if self._closed:
            return
        while self._busy:     # another thread is inside wait(): let it come back
            with nogil:
                lx.usleep(1000)
        if self._closed:
            return
        self._closed = True
        same_thread = (not self._single) or PyThread_get_thread_ident() == self._owner
        self._teardown(same_thread)
        for i in range(self.queue_depth):
            if self.ops[i].state != S_FREE:
                self._free_slot(i)
        self.npend = 0
        self.nresub = 0
        self.nactive = 0
        self.kinflight = 0
        self._stash = []
        for b in self._buffers:
            (<Buffer>b).in_flight = 0
        self._pool = None
        self.base = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        cdef bint same_thread = (not self._single) or PyThread_get_thread_ident() == self._owner
        self._teardown(same_thread)
        free(self.ops)
        free(self.free_slots)
        free(self.pend)
        free(self.resub)
        free(self.free_bufs)
