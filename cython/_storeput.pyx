# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._storeput — the store's PUT request path and the group commit's per-item work in C.

:class:`Item` is the group-commit item of every put and delete (the store's
``_Item``): typed fields instead of a Python object's slots. An item queued by
:meth:`PutPath.put_nowait` is its own completion (``done()`` /
``set_result()`` / ``set_exception()``, calling the caller's
``done(None, error)`` once), so a PUT costs one object instead of an item, a
completion and a memoryview.

:class:`PutPath` is created by the store once it is open. It does:

* :meth:`PutPath.put_nowait` — what ``BlobStore.put_nowait`` documents: key
  check, BLAKE3, allocation at the write cursor (the checkpoint reserve
  computed in C), the item queued and the committer woken;
* :meth:`PutPath.put_leased_nowait` — ``BlobStore.put_leased_nowait``: a large
  value received into leased fixed buffers (the daemon's large PUT), its
  digest checked, extent allocated, one WRITE_FIXED per buffer queued with the
  adapter's ``run_nowait`` — or, for a value with a stream (:meth:`PutPath.stream`,
  :class:`_StreamWrite`), each buffer's write already queued as it filled, into
  an extent allocated when the buffers were leased; the write's completion (:class:`_LeasedWrite`)
  releases the buffers and queues the item (no coroutine, no future, no Task:
  ``put_1m_c8`` went from 540 to 497 µs of daemon CPU per MiB and 1,650 to
  1,800 MiB/s, medians of 14 alternating A/B runs on the 2-CPU bench VM);
* :meth:`PutPath.pack_round` — the committer's packing of queued items into
  one journal batch (records encoded with ``ringblob._format``, the fixed
  buffers and write ops a round may take simulated);
* :meth:`PutPath.stage` — the values copied (``memcpy``) into the leased fixed
  buffers, zero padded, neighbouring writes merged into one op;
* :meth:`PutPath.apply_round` — after the round's fdatasync: index updates,
  counters, the replaced extents queued for freeing;
* :meth:`PutPath.process_frees` and :func:`settle` (acknowledge the items and
  flush waiters of a round).

The round structure — the two phases, their pipelining, one fdatasync per
round, failure handling — stays in the store's Python
(``BlobStore._commit_round`` / ``_commit_items`` / ``_finish_round``), which
calls these for the per-item loops. Rare paths (a key that is not ``bytes``,
no room, not writable) call back into the store's Python, so messages, logs
and counters are the ones the Python path produces. It knows nothing of
sockets. It took the daemon's CPU per 4 KiB PUT (sync=True, 32 concurrent)
from 30.8 to 26.5 µs on the 2-CPU bench VM (medians of six alternating A/B
runs); what remains in the store is mostly the allocator's ``free`` and
BLAKE3 (about 2 µs per 4 KiB value).
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_SetItem
from cpython.list cimport PyList_GET_SIZE
from libc.string cimport memcpy, memset

import logging

from blake3 import blake3 as _blake3

from ringblob.digest import PARALLEL_MIN as _PARALLEL_MIN_PY, digest as _digest

from ringblob._format import encode_delete as _encode_delete
from ringblob._format import encode_put as _encode_put
from ringblob.errors import DigestMismatch, IOFailed, NoSpace
from ringblob._aiocore import check_result as _check_result

cdef Py_ssize_t _PARALLEL_MIN = _PARALLEL_MIN_PY  # values this large go to ringblob.digest.digest

log = logging.getLogger("ringblob.store")

#: item kinds (the store's _PUT / _DELETE)
PUT = 1
DELETE = 2
cdef int _PUT = 1
cdef int _DELETE = 2


@cython.final
@cython.freelist(64)
cdef class Item:
    """One put or delete queued for the group commit.

    ``Item(kind, key, page, npages, length, digest, data, sync, fut)``: ``kind``
    1 (put) or 2 (delete); ``key`` bytes; the extent ``page`` / ``npages``
    (pages); ``length`` (bytes); ``digest`` (32 bytes); ``data``: the value
    still to be staged by the committer (bytes-like of ``length`` bytes), or
    None; ``sync``; ``fut``: the future the committer resolves. An item made by
    :meth:`PutPath.put_nowait` has no future: ``fut`` is the item itself, whose
    ``set_result`` / ``set_exception`` call its ``done(None, error)`` once.
    """

    cdef public int kind
    cdef public bytes key
    cdef public long long page
    cdef public long long npages
    cdef public long long length
    cdef public object digest
    cdef public object data
    cdef public bint sync
    cdef public long long seq
    cdef object _fut
    cdef object _fn
    cdef bint _called

    def __init__(self, int kind, bytes key, long long page, long long npages, long long length, digest, data,
                 bint sync, fut):
        self.kind = kind
        self.key = key
        self.page = page
        self.npages = npages
        self.length = length
        self.digest = digest
        self.data = data
        self.sync = sync
        self.seq = 0
        self._fut = fut

    @property
    def fut(self):
        """The future to resolve (``await``-able for items of ``put``/``delete``), or the item itself."""
        return self if self._fut is None else self._fut

    def done(self):
        """(An item of ``put_nowait``, as its own completion) True once answered."""
        return self._called

    def set_result(self, _result):
        """Answer: committed (``done(None, None)``); a second answer is ignored."""
        self._call(None)

    def set_exception(self, exc):
        """Answer: failed with ``exc`` (``done(None, exc)``); a second answer is ignored."""
        self._call(exc)

    cdef int _call(self, exc) except -1:
        if self._called:
            return 0
        self._called = True
        fn = self._fn
        self._fn = None
        if fn is None:
            return 0
        try:
            fn(None, exc)
        except Exception:  # the caller's bug must not stop the committer settling the others
            log.exception("store: a put_nowait completion callback failed")
        return 0


cdef inline int _settle_one(object f, object exc) except -1:
    cdef Item it
    if type(f) is Item:
        it = <Item>f
        if it._fut is None:
            if not it._called:
                it._call(exc)
            return 0
        f = it._fut
    if not f.done():
        if exc is None:
            f.set_result(None)
        else:
            f.set_exception(exc)
    return 0


def settle(items, flushers, exc=None):
    """Resolve the futures of a round's ``items`` (:class:`Item`) and then its ``flushers`` (futures)
    that are still pending: with ``None`` (committed) or, given ``exc``, with that exception."""
    for it in list(items):
        _settle_one(it, exc)
    for f in list(flushers):
        _settle_one(f, exc)


cdef object _write_error(PutPath path, tuple op, r, long long length):
    """The error a data write op ``("write", buf, offset, length, buf_offset)`` of a put of
    ``length`` bytes ended with (its CQE result or exception ``r``), or None when it wrote every
    byte. A failed or short write turns the store read-only (``IOFailed``); any other exception
    (the engine's ``EngineClosed``) is the error as it is."""
    if type(r) is int and <long long>r == <long long>op[3]:
        return None
    if isinstance(r, OSError) or type(r) is int:
        try:
            _check_result(r, op[3], f"write_fixed at offset {op[2]}")
        except OSError as exc:
            r = exc
        store = path.store
        store._go_read_only(f"a failed data write ({r})")
        err = IOFailed(f"{store.path}: writing {length} bytes for a put failed: {r}", r.errno)
        err.__cause__ = r
        return err
    return r if isinstance(r, BaseException) else RuntimeError(f"write: unexpected result {r!r}")


cdef tuple _buffer_op(PutPath path, list bufs, long long page, long long length, Py_ssize_t i):
    """The WRITE_FIXED op of buffer ``i`` of a leased value of ``length`` bytes whose extent starts
    at ``page``: every buffer full but the last, which is zero-padded to a block (O_DIRECT)."""
    cdef Py_ssize_t nb = PyList_GET_SIZE(bufs)
    cdef long long off = page * path.P + i * path.bsz
    if i < nb - 1:
        return ("write", bufs[i], off, path.bsz, 0)
    return ("write", bufs[i], off, path.aio._pad(bufs[i], length - path.bsz * (nb - 1)), 0)


@cython.final
cdef class _LeasedWrite:
    """The data write of a :meth:`PutPath.put_leased_nowait`: called once with the write ops'
    results (``AsyncEngine.run_nowait``, or a :class:`_StreamWrite` once the last of its writes
    completed); releases the value's buffers, then queues the put's item for the group commit
    (or answers ``done`` with the error)."""

    cdef PutPath path
    cdef bytes key
    cdef long long page
    cdef long long npages
    cdef long long length
    cdef object digest
    cdef bint sync
    cdef object done
    cdef object value
    cdef list ops

    def __call__(self, results):
        cdef PutPath path = self.path
        err = None
        value, self.value = self.value, None
        done, self.done = self.done, None
        ops, self.ops = self.ops, None
        try:
            for op, r in zip(ops, results):
                err = _write_error(path, <tuple>op, r, self.length)
                if err is not None:
                    break
            if err is None and self.digest is None:
                # the hash worker's digest (put_leased_nowait did not wait for it): by now it has
                # almost always hashed the last buffer
                try:
                    self.digest = value.digest()
                except Exception as exc:  # its hashing failed: nothing refers to the extent yet
                    path.alloc_free(self.page, self.npages)
                    err = exc
        finally:
            value.release()  # a buffer still in flight (a failed batch) goes back at its CQE
        if err is None:
            try:
                path._writable()
            except Exception as exc:
                err = exc
        if err is not None:
            done(None, err)
            return
        path.counters["bytes_written"] += self.length
        path._queue_put(self.key, self.page, self.npages, self.length, self.digest, None, self.sync, done)


@cython.final
@cython.freelist(8)
cdef class _StreamPart:
    """The completion (``run_nowait``'s ``done``) of the writes of buffers ``first`` on of a
    :class:`_StreamWrite`."""

    cdef _StreamWrite stream
    cdef Py_ssize_t first

    def __call__(self, results):
        s, self.stream = self.stream, None
        if s is not None:
            s._part_done(self.first, results)


@cython.final
cdef class _StreamWrite:
    """A large PUT's data write issued buffer by buffer while the value is still arriving: the
    ``writer`` :meth:`PutPath.stream` attaches to a ``LeasedValue``.

    The extent (``page``, ``npages``) is allocated when the value's buffers are leased, before
    its key is known; each buffer's WRITE_FIXED is queued (``run_nowait``, this loop turn's
    submit) as soon as the buffer holds its final bytes (``buffer_full``, in order), so the disk
    writes the first 256 KiB while the socket still delivers the rest. The extent is free space
    until the put's journal record commits, so these writes change nothing a reader or a
    recovery sees. Then either :meth:`PutPath.put_leased_nowait` takes the value (``take``: the
    put's :class:`_LeasedWrite` is called once every write completed, with every buffer's
    result), or the value is given up (``abandon``, from ``LeasedValue.release``: a bad key, a
    wrong digest, the client gone) and the extent is freed once the writes already issued have
    completed — never before, or another put could be given it and then have it overwritten by a
    stale write. A failed write turns the store read-only when it completes. When a write cannot
    be queued at once (no queue slots) the stream stops and the put queues the remaining
    buffers itself.

    Read-only attributes: ``page`` and ``npages`` (the extent), ``issued`` (buffers whose write
    was queued), ``inflight`` (of those, not completed yet), ``stopped``.
    """

    cdef PutPath path
    cdef list bufs
    cdef readonly long long page  # the extent: its first page ...
    cdef readonly long long npages  # ... and pages
    cdef long long length
    cdef Py_ssize_t nb
    cdef readonly Py_ssize_t issued  # buffers (a prefix) whose write was queued
    cdef readonly Py_ssize_t inflight  # of those, writes not yet completed
    cdef readonly bint stopped  # a write could not be queued (or failed): the put queues the rest
    cdef bint abandoned  # the value was given up: the extent is freed once inflight == 0
    cdef bint freed
    cdef object err  # what the first failed write ended with (IOFailed, EngineClosed)
    cdef list ops  # per buffer: its write op once queued, None before
    cdef list results  # per buffer: its write's result (int or exception), None before
    cdef object fin  # the put's _LeasedWrite once take() was called
    cdef list idle  # futures of wait_idle()

    cdef bint _issue(self, Py_ssize_t first, Py_ssize_t last) except? -1:
        """Queue the writes of buffers ``first`` to ``last - 1``; False when there is no room."""
        cdef _StreamPart part = _StreamPart.__new__(_StreamPart)
        cdef Py_ssize_t i
        part.stream = self
        part.first = first
        ops = [_buffer_op(self.path, self.bufs, self.page, self.length, i) for i in range(first, last)]
        if not self.path.run_nowait(ops, part):
            return False
        self.ops[first:last] = ops
        self.issued = last
        self.inflight += last - first
        return True

    def buffer_full(self, Py_ssize_t i):
        """``LeasedValue.advance``: buffer ``i`` holds its final bytes; queue its write (never
        raises: a write that cannot go now is left for the put)."""
        if self.stopped or self.abandoned or self.fin is not None:
            return
        if i != self.issued:
            self.stopped = True
            return
        try:
            if not self._issue(i, i + 1):
                self.stopped = True
        except Exception:  # the engine closed: the put finds out (and says so) itself
            self.stopped = True

    def abandon(self):
        """``LeasedValue.release``: the value is given up, unless a put took it; free the extent
        once no write of it is in flight."""
        if self.fin is not None or self.abandoned:
            return
        self.abandoned = True
        if self.inflight == 0:
            self._settle()

    cdef int _part_done(self, Py_ssize_t first, list results) except -1:
        cdef Py_ssize_t k, i
        for k in range(len(results)):
            i = first + k
            r = results[k]
            self.results[i] = r
            # a failed write turns the store read-only now, whether or not the value is still
            # wanted (ringblob's rule for failed writes); the put answers with this error
            err = _write_error(self.path, <tuple>self.ops[i], r, self.length)
            if err is not None:
                self.stopped = True
                if self.err is None:
                    self.err = err
        self.inflight -= len(results)
        if self.inflight == 0:
            self._settle()
        return 0

    cdef int _settle(self) except -1:
        """No write in flight: free an abandoned value's extent, or hand a taken one's results
        to its put; then wake :meth:`wait_idle`."""
        if self.abandoned:
            if not self.freed:
                self.freed = True
                self.path.alloc_free(self.page, self.npages)
        elif self.fin is not None and self.issued == self.nb:
            fin, self.fin = self.fin, None
            fin(self.results)
        waiters, self.idle = self.idle, None
        if waiters:
            for f in waiters:
                if not f.done():
                    f.set_result(None)
        return 0

    cdef int take(self, _LeasedWrite w) except -1:
        """A put took the value (every write queued): ``w`` is called with the results once the
        last write completed — on a later loop turn, even when they all completed already."""
        self.fin = w
        if self.inflight == 0:
            self.path.aio.loop.call_soon(self._settle_soon)
        return 0

    def _settle_soon(self):
        if self.inflight == 0 and self.fin is not None:
            self._settle()

    def wait_idle(self):
        """None when no write of the stream is in flight, else a future resolved once none is
        (after an abandoned value's extent was freed)."""
        if self.inflight == 0:
            return None
        f = self.path.aio.loop.create_future()
        if self.idle is None:
            self.idle = []
        self.idle.append(f)
        return f


cdef class PutPath:
    """The PUT fast path and the commit's per-item loops of one open store (see the module docstring).

    ``store``: the :class:`~ringblob.store.blobstore.BlobStore` (its ``_queue``,
    ``_pending_free``, ``_pins``, ``_free_on_unpin``, ``_counters``,
    ``_index`` and ``_alloc`` are shared, never replaced); ``page_size``,
    ``block_size``, ``buffer_size`` in bytes; ``max_blob_size`` in bytes;
    ``entry_size``: bytes of an index entry after its key (``ENTRY.size``);
    ``chunk_header_size``: bytes of a checkpoint chunk's header; ``check_key``
    and ``as_view``: the store's key check and value view (called for a key
    that is not ``bytes`` of 1..255 bytes, a value that is not ``bytes``).
    """

    cdef object store
    cdef list queue
    cdef object pending_free
    cdef dict pins
    cdef dict free_on_unpin
    cdef dict counters
    cdef object alloc
    cdef object alloc_run
    cdef object alloc_any
    cdef object alloc_free
    cdef object index_set
    cdef object index_remove
    cdef object entries_size
    cdef object check_key
    cdef object as_view
    cdef long long P
    cdef long long bs
    cdef long long bsz
    cdef long long max_blob
    cdef long long entry_size
    cdef long long ck_min_pages
    cdef long long ck_cap
    cdef object aio
    cdef object run_nowait
    cdef long long window

    def __init__(self, store, long long page_size, long long block_size, long long buffer_size,
                 long long max_blob_size, long long entry_size, long long chunk_header_size, check_key, as_view):
        self.store = store
        self.queue = store._queue
        self.pending_free = store._pending_free
        self.pins = store._pins
        self.free_on_unpin = store._free_on_unpin
        self.counters = store._counters
        self.alloc = store._alloc
        self.alloc_run = store._alloc.allocate_run
        self.alloc_any = store._alloc.allocate
        self.alloc_free = store._alloc.free
        self.index_set = store._index.set
        self.index_remove = store._index.remove
        self.entries_size = store._index.entries_size
        self.check_key = check_key
        self.as_view = as_view
        self.P = page_size
        self.bs = block_size
        self.bsz = buffer_size
        self.max_blob = max_blob_size
        self.entry_size = entry_size
        # BlobStore._ckpt_reserve_pages: pages of the smallest checkpoint chunk, entry bytes it holds
        cdef long long one = 1 + 255 + entry_size
        self.ck_min_pages = (chunk_header_size + one + page_size - 1) // page_size
        self.ck_cap = self.ck_min_pages * page_size - chunk_header_size - one
        aio = store._aio
        self.aio = aio
        self.run_nowait = aio.run_nowait
        self.window = aio._window()

    # -- the request path ----------------------------------------------------------

    def put_nowait(self, key, value, done, sync=False, verify=False):
        """:meth:`BlobStore.put_nowait` (same arguments, result and errors; ``sync`` and
        ``verify`` may also be passed by position: the server's C path does, a call with no
        keyword arguments being the cheaper one)."""
        cdef long long length, n, page, extra, need, reserve
        key = self._put_key(key)
        if type(value) is bytes:
            data = value
            length = PyBytes_GET_SIZE(value)
        else:
            data = self.as_view(value)
            length = len(data)
        if length > self.bsz or length > self.max_blob:
            return False
        digest = _digest(data) if length >= _PARALLEL_MIN else _blake3(data).digest()
        if verify and digest != key:
            raise DigestMismatch(f"put: the BLAKE3 digest of the value is {digest.hex()}, not the key "
                                 f"{key.hex()}; nothing was stored")
        n = (length + self.P - 1) // self.P
        page = 0
        if n:
            got = self._allocate(key, n)
            if got is None:
                return False  # put() waits for the reclaim
            page = got
        self._queue_put(key, page, n, length, digest, data if length else None, sync, done)
        return True

    cdef int _queue_put(self, bytes key, long long page, long long npages, long long length, digest, data,
                        bint sync, done) except -1:
        """Queue a PUT's group-commit item (``data``: the value to copy into the round's
        buffers, or None when it is already written or empty) and wake the committer: the last
        step of both put paths."""
        cdef Item it = Item.__new__(Item)
        it.kind = _PUT
        it.key = key
        it.page = page
        it.npages = npages
        it.length = length
        it.digest = digest
        it.data = data
        it.sync = sync
        it._fn = done
        self.queue.append(it)
        w = self.store._wake
        if w is not None and not w.done():
            w.set_result(None)
        return 0

    cdef inline object _put_key(self, key):
        """``key`` checked for a PUT (``InvalidKey`` from ``check_key``), after the store was
        found writable (``_check_writable`` raises ``ReadOnly`` or ``StoreClosed``): the checks
        both put paths make before anything is allocated."""
        cdef Py_ssize_t klen
        if type(key) is not bytes:
            key = self.check_key(key)
        else:
            klen = PyBytes_GET_SIZE(key)
            if klen < 1 or klen > 255:
                key = self.check_key(key)
        self._writable()
        return key

    cdef inline int _writable(self) except -1:
        """Raise what ``BlobStore._check_writable`` raises (``ReadOnly``, ``StoreClosed``) when the
        store cannot take a put now; the common case (writable) without the call."""
        store = self.store
        if store._closed or store._opened_read_only or store._read_only is not None:
            store._check_writable()
        return 0

    cdef object _allocate(self, bytes key, long long n):
        """``BlobStore._allocate(n, 1 + len(key) + ENTRY.size)`` without waiting: the first page
        of ``n`` (> 0) pages, or None when there is no room until pending frees are reclaimed.
        Raises the store's :class:`NoSpace` when a reclaim would not help."""
        return self._allocate_n(n, 1 + PyBytes_GET_SIZE(key) + self.entry_size)

    cdef object _allocate_n(self, long long n, long long extra):
        """:meth:`_allocate` for an index entry of ``extra`` bytes."""
        cdef long long need, reserve
        store = self.store
        try:
            need = self.entries_size() + extra
            reserve = (need + self.ck_cap - 1) // self.ck_cap * self.ck_min_pages + 1
            if self.alloc.free_pages - n < reserve:
                return store._take_pages(n, extra)  # raises its NoSpace
            if n * self.P <= self.bsz:
                # at the write cursor: the values of one round are neighbours in the file
                return self.alloc_run(n)
            return self.alloc_any(n)
        except NoSpace:
            if not store._pending_free and not self.queue:
                raise
            return None

    def stream(self, value):
        """Make ``value`` (a ``LeasedValue`` of :meth:`BlobStore.lease_value`, nothing received
        yet) write itself as it arrives: allocate its extent now and attach a
        :class:`_StreamWrite` as its ``writer`` (see there). Returns True when attached; False,
        changing nothing, when the value has more buffers than one submit window or there is no
        room for it now without waiting (its put then allocates and writes at the end, as
        without a stream). The room is reckoned for the longest key (255 bytes): the key is not
        known yet."""
        cdef long long length = value.length, n
        cdef Py_ssize_t nb
        cdef _StreamWrite s
        bufs = value.buffers
        nb = PyList_GET_SIZE(bufs)
        if value.received or value.writer is not None or nb > self.window or length > self.max_blob:
            return False
        n = (length + self.P - 1) // self.P
        try:
            page = self._allocate_n(n, 1 + 255 + self.entry_size)
        except NoSpace:
            return False
        if page is None:
            return False
        s = _StreamWrite.__new__(_StreamWrite)
        s.path = self
        s.bufs = list(bufs)
        s.page = page
        s.npages = n
        s.length = length
        s.nb = nb
        s.ops = [None] * nb
        s.results = [None] * nb
        value.writer = s
        return True

    def put_leased_nowait(self, key, value, done, sync=False, verify=False):
        """:meth:`BlobStore.put_leased_nowait`: a value received into leased fixed buffers
        (``value``: a complete ``LeasedValue``) written from them and queued for the group
        commit with no coroutine and no future (``sync`` and ``verify`` may go by position).

        A value with a stream (:meth:`stream`: its ``writer``) was written buffer by buffer as
        it arrived: the put takes the stream's extent, queues the writes not yet queued, and
        its item is queued once the last write completed.

        Returns False, having changed nothing (``value`` is still the caller's), when only
        ``put_leased`` can do it: the value incomplete or over ``max_blob_size``, more buffers
        than one submit window, no room until pending frees are reclaimed, or no queue slots
        free at once. Raises, with ``value`` released (a stream's extent is freed once its
        writes in flight completed), what ``put_leased`` raises before anything is stored:
        :class:`InvalidKey`, :class:`DigestMismatch` (``verify=True``), :class:`NoSpace`,
        :class:`ReadOnly`, and a stream's :class:`IOFailed` when one of its writes failed
        already (the store is read-only since). Else returns True: ``done(None, error)`` is called
        exactly once, later, on the loop's thread (``error`` None once acknowledged, else
        :class:`IOFailed` for a failed data write, :class:`ReadOnly`, or the engine's
        :class:`EngineClosed`); the buffers are released when the data write completes."""
        cdef long long length, n, nb, i, pg
        cdef list bufs, ops
        cdef _LeasedWrite w
        cdef _StreamWrite st = None
        if not value.complete:
            return False
        length = value.length
        if length > self.max_blob or length <= 0:
            return False
        bufs = value.buffers
        nb = PyList_GET_SIZE(bufs)
        if nb > self.window or nb != (length + self.bsz - 1) // self.bsz:
            return False
        wr = value.writer
        if type(wr) is _StreamWrite and (<_StreamWrite>wr).path is self:
            st = <_StreamWrite>wr  # its extent is allocated and (most of) its writes issued
        try:
            if st is not None and type(st.err) is IOFailed:
                raise st.err  # a write of the value failed already (the store is read-only since)
            key = self._put_key(key)
            # the hash worker (ringblob.digest.hash_worker()) may still be hashing its last buffer
            # (ringblob._leased): wait for it only to check the digest now, else once the data
            # write completed (_LeasedWrite), which overlaps it
            digest = value.digest() if verify else None
            if verify and digest != key:
                raise DigestMismatch(f"put: the BLAKE3 digest of the value is {digest.hex()}, not the key "
                                     f"{key.hex()}; nothing was stored")
            if st is not None:
                if st.issued < st.nb and not st._issue(st.issued, st.nb):
                    return False  # no queue slots: put_leased gives the stream up and writes anew
                page = st.page
                n = st.npages
            else:
                n = (length + self.P - 1) // self.P
                page = self._allocate(key, n)
        except BaseException:
            value.release()  # a stream's extent is freed once its writes in flight completed
            raise
        if page is None:
            return False
        pg = page
        w = _LeasedWrite.__new__(_LeasedWrite)
        w.path = self
        w.key = key
        w.page = pg
        w.npages = n
        w.length = length
        w.digest = digest
        w.sync = sync
        w.done = done
        w.value = value
        if st is not None:
            w.ops = st.ops  # every buffer's write is queued by now
            value.writer = None  # the put owns the extent now
            st.take(w)
            return True
        ops = [_buffer_op(self, bufs, pg, length, i) for i in range(nb)]
        w.ops = ops
        try:
            queued = self.run_nowait(ops, w)
        except BaseException:
            self.alloc_free(pg, n)
            value.release()
            raise
        if not queued:
            self.alloc_free(pg, n)
            return False
        return True

    # -- the committer ----------------------------------------------------------------

    def pack_round(self, list recs, list items, long long seq, long long rec_bytes, long long cap,
                   long long max_ops, long long max_data_bufs):
        """Take the queued items one journal batch holds (``BlobStore._commit_round``).

        Appends to ``recs`` each item's encoded record (``bytes``) and to
        ``items`` the item (its ``seq`` set from ``seq`` on), while the records
        fit ``cap`` bytes (beyond ``rec_bytes`` already in ``recs``) and the
        values fit ``max_data_bufs`` fixed buffers and ``max_ops`` write ops
        (the first item is always taken); removes them from the queue.
        Returns ``(next seq, fixed buffers the values need)``.
        """
        cdef list q = self.queue
        cdef Py_ssize_t i = 0, nq
        cdef long long nbufs = 0, boff = self.bsz, n_ops = 0, prev_end = -1
        cdef long long nb, bo, ops, pe, alen, whole
        cdef long long P = self.P, bs = self.bs, bsz = self.bsz
        cdef Py_ssize_t rl
        cdef Item it
        nq = PyList_GET_SIZE(q)
        while i < nq:
            it = <Item?>q[i]
            if it.kind == _PUT:
                r = _encode_put(seq, it.key, it.page, it.length, it.digest)
            else:
                r = _encode_delete(seq, it.key)
            rl = PyBytes_GET_SIZE(r)
            if rec_bytes + rl > cap and items:
                break
            nb, bo, ops, pe = nbufs, boff, n_ops, prev_end
            if it.data is not None:
                whole = it.npages * P
                alen = whole if whole <= bsz else (it.length + bs - 1) // bs * bs
                if bo + alen > bsz:
                    nb, bo = nb + 1, 0
                    pe = -1
                if pe != it.page:  # else the write merges with the previous item's
                    ops += 1
                bo += alen
                pe = it.page + it.npages if alen == whole else -1
                if (nb > max_data_bufs or ops > max_ops) and items:
                    break
            nbufs, boff, n_ops, prev_end = nb, bo, ops, pe
            it.seq = seq
            seq += 1
            recs.append(r)
            rec_bytes += rl
            items.append(it)
            i += 1
        del q[:i]
        return seq, nbufs

    def stage(self, list items, list bufs, write):
        """Copy the values of ``items`` (those with ``data``) into the leased fixed ``bufs``, as
        ``pack_round`` simulated: each at its whole pages (or whole blocks where a page does not
        fit a buffer), zero padded, a value that does not fit the rest of a buffer in the next one.
        Returns the write ops ``(write, buf, file offset, length, buffer offset)``, values that
        neighbour in the file and in a buffer merged into one op."""
        cdef list ops = []
        cdef Py_ssize_t bi = -1, nbufs = PyList_GET_SIZE(bufs)
        cdef long long bo = self.bsz, alen, ln, whole, foff
        cdef long long P = self.P, bs = self.bs, bsz = self.bsz
        cdef long long cur_off = -1, cur_len = 0, cur_bo = 0
        cdef Py_ssize_t cur_bi = -1
        cdef Py_buffer dst
        cdef Py_buffer src
        cdef bint have_dst = False
        cdef char *d = NULL
        cdef Item it
        try:
            for x in items:
                it = <Item?>x
                data = it.data
                if data is None:
                    continue
                ln = it.length
                whole = it.npages * P
                alen = whole if whole <= bsz else (ln + bs - 1) // bs * bs
                if bo + alen > bsz:
                    bi += 1
                    bo = 0
                    if bi >= nbufs:
                        raise RuntimeError("stage: the values need more fixed buffers than were leased")
                    if have_dst:
                        PyBuffer_Release(&dst)
                        have_dst = False
                    PyObject_GetBuffer(bufs[bi].view, &dst, PyBUF_WRITABLE)
                    have_dst = True
                    d = <char *>dst.buf
                    if dst.len < bsz:
                        raise RuntimeError(f"stage: a fixed buffer of {dst.len} bytes (want {bsz})")
                if type(data) is bytes:
                    if PyBytes_GET_SIZE(data) != ln:
                        raise RuntimeError("stage: an item's value changed length")
                    memcpy(d + bo, PyBytes_AS_STRING(data), ln)
                else:
                    PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)  # contiguous: see the store's _as_view
                    try:
                        if src.len != ln:
                            raise RuntimeError("stage: an item's value changed length")
                        memcpy(d + bo, src.buf, ln)
                    finally:
                        PyBuffer_Release(&src)
                if alen > ln:
                    memset(d + bo + ln, 0, alen - ln)
                foff = it.page * P
                if cur_bi == bi and cur_bo + cur_len == bo and cur_off + cur_len == foff:
                    cur_len += alen  # contiguous in file and buffer
                else:
                    if cur_bi >= 0:
                        ops.append((write, bufs[cur_bi], cur_off, cur_len, cur_bo))
                    cur_bi, cur_off, cur_len, cur_bo = bi, foff, alen, bo
                bo += alen
            if cur_bi >= 0:
                ops.append((write, bufs[cur_bi], cur_off, cur_len, cur_bo))
        finally:
            if have_dst:
                PyBuffer_Release(&dst)
        return ops

    def apply_round(self, list items):
        """Make a durable round visible (``BlobStore._finish_round``): each put sets its key in the
        index, each delete removes it, the extents they replace are queued for freeing
        ``(seq, page, npages)``; counts puts, deletes and the bytes of staged values. Returns the
        number of ``sync`` items."""
        cdef long long puts = 0, deletes = 0, written = 0, nsync = 0, oln
        cdef long long P = self.P
        cdef Item it
        index_set = self.index_set
        index_remove = self.index_remove
        pending = self.pending_free
        counters = self.counters
        try:
            for x in items:
                it = <Item?>x
                if it.kind == _PUT:
                    old = index_set(it.key, it.page, it.length, it.digest)
                    puts += 1
                    if it.data is not None:
                        written += it.length
                        it.data = None
                else:
                    old = index_remove(it.key)
                    deletes += 1
                if old is not None:
                    oln = (<tuple>old)[1]
                    if oln:
                        pending.append((it.seq, (<tuple>old)[0], (oln + P - 1) // P))
                if it.sync:
                    nsync += 1
        finally:
            if puts:
                counters["puts"] += puts
            if written:
                counters["bytes_written"] += written
            if deletes:
                counters["deletes"] += deletes
        return nsync

    cdef int _release(self, page, long long n) except -1:
        if not n:
            return 0
        if PyDict_Contains(self.pins, page):
            PyDict_SetItem(self.free_on_unpin, page, n)
        else:
            self.alloc_free(page, n)
        return 0

    def release_extent(self, page, long long n):
        """``BlobStore._release_extent``: free an extent now, or once its last reader unpins it."""
        self._release(page, n)

    def process_frees(self):
        """``BlobStore._process_frees``: free the replaced extents whose replacing record the durable
        point recorded on disk covers (the queue is in sequence order)."""
        q = self.pending_free
        d = self.store._disk_durable
        while q and q[0][0] <= d:
            e = q.popleft()
            self._release(e[1], e[2])
