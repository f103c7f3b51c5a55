# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._storeget — the store's GET request path in C (:meth:`BlobStore.get_nowait`).

:class:`GetPath` is created by the store once it is open. Its
:meth:`GetPath.get_nowait` does what ``BlobStore.get_nowait`` documents — key
check, index lookup, pin the extent, queue the read with the engine adapter's
``read_nowait`` — and its completion (a :class:`_GetRead`, one small C object
per GET instead of a ``functools.partial`` over a bound method) unpins the
extent, verifies the BLAKE3 digest, counts the get and calls the caller's
``done(value, error)``.

It knows the store's in-memory state (the index, the pin counts, the extents
waiting for their last reader, the counters) and nothing of sockets. The rare
paths — an invalid key, a failed read, a digest mismatch — call back into the
store's Python methods, so their messages, logs, counters and observer calls
are the ones :meth:`BlobStore.get` produces.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_DelItem
from cpython.ref cimport PyObject

from blake3 import blake3 as _blake3

from ringblob.digest import PARALLEL_MIN as _PARALLEL_MIN_PY, digest as _digest

from ringblob.errors import EngineClosed, NotFound

cdef Py_ssize_t _PARALLEL_MIN = _PARALLEL_MIN_PY  # values this large go to ringblob.digest.digest


@cython.final
@cython.freelist(64)
cdef class _GetRead:
    """The completion of one :meth:`GetPath.get_nowait` read: ``read(data, error)``."""

    cdef GetPath path
    cdef object key
    cdef object page
    cdef Py_ssize_t length
    cdef object digest
    cdef object done

    def __call__(self, data, err):
        path = self.path
        done = self.done
        self.path = None
        self.done = None
        if path is None:
            raise RuntimeError("a store GET completion was called twice")
        path._got(self, data, err, done)


cdef class GetPath:
    """The GET fast path of one open store (see the module docstring).

    ``store``: the :class:`~ringblob.store.blobstore.BlobStore`; ``index``,
    ``read_nowait``, ``pins``, ``free_on_unpin``, ``alloc_free``, ``counters``:
    its key index, its engine adapter's ``read_nowait``, its pin counts
    (page -> readers in flight), its extents freed once unpinned (page ->
    pages), its allocator's ``free`` and its counters dict; ``page_size`` in
    bytes; ``check_key``: the store's key check (called for a key that is not
    ``bytes`` of 1 to 255 bytes, to raise its error or convert it).
    """

    cdef object store
    cdef object index_get
    cdef object read_nowait
    cdef dict pins
    cdef dict free_on_unpin
    cdef object alloc_free
    cdef dict counters
    cdef long long page_size
    cdef object check_key
    cdef object k_gets
    cdef object k_bytes_read

    def __init__(self, store, index, read_nowait, dict pins, dict free_on_unpin, alloc_free, dict counters,
                 long long page_size, check_key):
        self.store = store
        self.index_get = index.get
        self.read_nowait = read_nowait
        self.pins = pins
        self.free_on_unpin = free_on_unpin
        self.alloc_free = alloc_free
        self.counters = counters
        self.page_size = page_size
        self.check_key = check_key
        self.k_gets = "gets"
        self.k_bytes_read = "bytes_read"

    cdef inline int _pin(self, page) except -1:
        cdef PyObject *p = PyDict_GetItem(self.pins, page)
        PyDict_SetItem(self.pins, page, 1 if p == NULL else <object>p + 1)
        return 0

    cdef int _unpin(self, page) except -1:
        c = self.pins[page] - 1
        if c:
            PyDict_SetItem(self.pins, page, c)
            return 0
        PyDict_DelItem(self.pins, page)
        n = self.free_on_unpin.pop(page, None)
        if n is not None:
            self.alloc_free(page, n)
        return 0

    def get_nowait(self, key, done, max_size=None):
        """:meth:`BlobStore.get_nowait` (same arguments, result and errors)."""
        cdef Py_ssize_t klen
        cdef long long length
        cdef _GetRead op
        if type(key) is not bytes:
            key = self.check_key(key)
        else:
            klen = len(<bytes>key)
            if klen < 1 or klen > 255:
                key = self.check_key(key)
        store = self.store
        if store._closed:
            raise EngineClosed(f"{store.path}: the store is closed")
        e = self.index_get(key)
        if e is None:
            raise NotFound(f"no blob under key {key!r}")
        page, ln, digest = <tuple>e
        length = ln
        if length == 0 or (max_size is not None and length > max_size):
            return 0
        op = _GetRead.__new__(_GetRead)
        op.path = self
        op.key = key
        op.page = page
        op.length = <Py_ssize_t>length
        op.digest = digest
        op.done = done
        self._pin(page)  # the extent is not reused while the read is in flight
        try:
            queued = self.read_nowait(page * self.page_size, length, op)
        except BaseException:
            op.path = None
            op.done = None
            self._unpin(page)
            raise
        if not queued:
            op.path = None
            op.done = None
            self._unpin(page)
            return 0
        return length

    cdef int _got(self, _GetRead op, data, err, done) except -1:
        """Unpin, verify and count, then hand the value (or the error) to ``done``."""
        cdef dict counters = self.counters
        self._unpin(op.page)
        if err is not None:
            if isinstance(err, OSError):
                err = self.store._read_failed(op.key, op.page, op.length, err)
            done(None, err)
            return 0
        if (_digest(data) if op.length >= _PARALLEL_MIN else _blake3(data).digest()) != op.digest:
            done(None, self.store._corrupt(op.key, op.page, op.length))
            return 0
        counters[self.k_gets] += 1
        counters[self.k_bytes_read] += op.length
        done(data, None)
        return 0
