# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._leased — :class:`LeasedValue` in C (re-exported by :mod:`ringblob.store.leased`).

A large PUT's value is received by many socket reads (about ten per MiB over a
Unix socket: the sender's socket buffer holds ~200 KiB), and each read asks
:meth:`LeasedValue.target` where to land and tells :meth:`LeasedValue.advance`
how much arrived. As a Python class those two calls were Python frames per
read; here they are C methods with typed fields. The BLAKE3 digest is updated
once per filled buffer (256 KiB, still in the CPU cache) instead of once per
read: unaligned ~100 KB pieces make BLAKE3 hash smaller subtrees
(bench/leased_micro.py: 245 -> 200 µs per MiB received in 100 KB reads,
copy included). With the hash worker (``ringblob.digest``:
``parallel_hash`` auto on 2+ CPUs, or on) a filled buffer is queued to it
instead, which hashes it while the caller receives the next:
:meth:`LeasedValue.digest` waits for the worker's last job of the value and
:meth:`LeasedValue.release` for all of them (the worker reads the buffers
until then). A ``writer`` the store attaches (``PutPath.stream``) is told
each time a buffer holds its final bytes, so the store can write it while the
rest arrives. It knows nothing of sockets or keys.
"""

cimport cython

from _thread import allocate_lock as _allocate_lock

from blake3 import blake3 as _blake3

from ringblob.digest import hash_worker as _hash_worker, worker_put as _worker_put


cdef class LeasedValue:
    """``length`` bytes (>= 1) to be received into ``bufs`` (leased fixed buffers of
    ``buffer_size`` bytes each, ``ceil(length / buffer_size)`` of them): every buffer full but
    the last, each from its start (offset 0: O_DIRECT needs the data aligned).

    Fill it with :meth:`target` (a writable view of where the next bytes go) and
    :meth:`advance` (how many were written there; each buffer is hashed when it is full, and the
    last when the value is complete), or
    :meth:`write` (copies). :meth:`release` gives the buffers back (idempotent; ``on_release``
    is called once with them); :meth:`BlobStore.put_leased` releases them itself.
    Attributes: ``length`` and ``received`` (bytes), ``complete``, ``released``, and ``writer``:
    None, or an object whose ``buffer_full(index)`` is called each time buffer ``index`` holds its
    final bytes (every buffer once, in order: a full one as it fills, the last when the value is
    complete; they must not change from then on) and whose ``abandon()`` is called by
    :meth:`release` before the buffers go back (the store's ``PutPath.stream`` sets it).

    ``ValueError`` from the constructor when the buffers cannot hold exactly ``length`` bytes.
    """

    cdef readonly Py_ssize_t length
    cdef readonly Py_ssize_t received
    cdef list _bufs  # None once released
    cdef list _views  # per buffer, the part the value fills: all of it but in the last one
    cdef Py_ssize_t _i  # the buffer being filled
    cdef Py_ssize_t _off  # bytes of it filled
    cdef Py_ssize_t _cur_len  # len(_views[_i]) (0 once complete)
    cdef Py_ssize_t _bsz
    cdef object _hasher
    cdef object _update  # _hasher.update
    cdef object _on_release
    cdef object _put  # the hash worker's queue put (ringblob.digest.hash_worker()), else None
    cdef object _pending  # a lock held while the worker has jobs of this value left (else None)
    cdef bytes _digest  # computed by the worker
    cdef object _error  # what the worker's hashing raised, if anything
    cdef public object writer  # told of each buffer with its final bytes (see the class docstring)

    def __init__(self, bufs, Py_ssize_t length, Py_ssize_t buffer_size, on_release):
        bufs = list(bufs)
        cdef Py_ssize_t n = len(bufs)
        if length < 1 or buffer_size < 1 or n != (length + buffer_size - 1) // buffer_size:
            raise ValueError(f"LeasedValue: {n} buffers of {buffer_size} bytes cannot hold exactly "
                             f"{length} bytes")
        self.length = length
        self.received = 0
        self._bsz = buffer_size
        self._bufs = bufs
        views = [b.view[:buffer_size] for b in bufs[: n - 1]]
        views.append(bufs[n - 1].view[: length - buffer_size * (n - 1)])
        self._views = views
        self._i = 0
        self._off = 0
        self._cur_len = len(views[0])
        # one thread, whatever ringblob.digest's parallel_hash mode: per 256 KiB buffer, BLAKE3's
        # thread pool measured no faster end to end and ~8x the CPU (bench/results/analysis.md);
        # with the hash worker (parallel_hash auto on 2+ CPUs, or on), that thread is the worker's
        self._hasher = _blake3()
        self._update = self._hasher.update
        self._on_release = on_release
        self._put = _worker_put() if _hash_worker() else None
        self._pending = None
        self._digest = None
        self._error = None
        self.writer = None

    @property
    def complete(self):
        """All ``length`` bytes were received."""
        return self.received == self.length

    @property
    def released(self):
        """The buffers were given back (:meth:`release`)."""
        return self._bufs is None

    @property
    def buffers(self):
        """The leased buffers, in value order (``ValueError`` once released)."""
        if self._bufs is None:
            raise ValueError("LeasedValue: its buffers were released")
        return self._bufs

    def target(self):
        """A writable view of where the next bytes go: the unfilled rest of the current buffer,
        never past the value's end (at most ``buffer_size`` bytes); ``None`` once complete or
        released. Report what was written into it with :meth:`advance`."""
        if self.received >= self.length or self._bufs is None:
            return None
        return self._views[self._i][self._off :]

    def advance(self, Py_ssize_t nbytes):
        """``nbytes`` were written into the view :meth:`target` returned; when they fill the
        current buffer (or complete the value) it is hashed, whole, now (queued to the hash worker
        instead where ``ringblob.digest.hash_worker()``: keep the bytes unchanged until :meth:`release`),
        and then the ``writer``, if any, is told (``buffer_full``).

        Raises ``ValueError`` when they do not fit that view (or the value was released).
        """
        if self._bufs is None or nbytes < 0 or self.received >= self.length:
            raise ValueError(f"LeasedValue.advance: {nbytes} bytes cannot be taken (released, complete or "
                             "negative)")
        cdef Py_ssize_t off = self._off
        cdef Py_ssize_t end = off + nbytes
        if end > self._cur_len:
            raise ValueError(f"LeasedValue.advance: {nbytes} bytes at {self.received} pass the current "
                             f"buffer's end ({self._cur_len - off} bytes left in it)")
        if nbytes == 0:
            return None
        self.received += nbytes
        if end == self._cur_len:
            # the buffer is full (or the value complete): hash it whole (BLAKE3 hashes 256 KiB in
            # one call faster than the same bytes in socket-read-sized pieces; they are still in
            # the CPU cache)
            if self._put is None:
                self._update(self._views[self._i])
            else:
                if self._pending is None:
                    self._pending = _allocate_lock()
                    self._pending.acquire()
                self._put((self._hash_job, self._views[self._i]))
                if self.received == self.length:
                    self._put((self._finish_job, self._pending))
            if self.writer is not None:
                self.writer.buffer_full(self._i)
            self._i += 1
            self._off = 0
            self._cur_len = len(self._views[self._i]) if self.received < self.length else 0
        else:
            self._off = end
        return None

    def write(self, data):
        """Copy ``data`` (bytes-like, format ``B``) in, across buffers; returns the bytes taken
        (fewer than ``len(data)`` only when the value is complete)."""
        cdef Py_ssize_t taken = 0, n, k
        with memoryview(data) as mv:
            n = len(mv)
            while taken < n:
                t = self.target()
                if t is None:
                    break
                k = min(len(t), n - taken)
                t[:k] = mv[taken : taken + k]
                t.release()
                self.advance(k)
                taken += k
        return taken

    def _hash_job(self, view):
        # on the hash worker's thread, in order
        if self._error is None:
            try:
                self._update(view)
            except BaseException as exc:
                self._error = exc

    def _finish_job(self, pending):
        # on the hash worker's thread, after every _hash_job of this value
        try:
            if self._error is None and self.received == self.length:
                self._digest = self._hasher.digest()
        except BaseException as exc:
            self._error = exc
        finally:
            pending.release()

    cdef int _wait(self) except -1:
        """Wait until the hash worker ran every job of this value (at once when it has none)."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            if self.received != self.length:  # released before complete: no finish job was put
                self._put((self._finish_job, pending))
            pending.acquire()
        return 0

    def digest(self):
        """The BLAKE3 digest (32 bytes) of the value. ``ValueError`` before it is complete.

        With the hash worker (``ringblob.digest.hash_worker()``), the value's buffers were hashed there
        (:func:`ringblob.digest.worker_put`): this waits for its last one, which is what a large
        PUT's data write overlaps; ``RuntimeError`` if that hashing failed.
        """
        if self.received != self.length:
            raise ValueError(f"LeasedValue: {self.received} of {self.length} bytes received; the digest "
                             "needs the whole value")
        if self._put is None:
            return self._hasher.digest()
        self._wait()
        if self._error is not None:
            raise RuntimeError(f"LeasedValue: hashing the value on the hash worker failed: {self._error!r}")
        return self._digest

    def release(self):
        """Give the buffers back (idempotent; the ``writer``'s ``abandon()`` first). After it,
        nothing may write into views of them."""
        bufs, self._bufs = self._bufs, None
        if bufs is not None:
            self._wait()  # the hash worker reads the buffers until then
            w, self.writer = self.writer, None
            if w is not None:
                w.abandon()  # (a write still in flight keeps its buffer: the engine defers it to its CQE)
            self._views = []
            self._on_release(bufs)

    def __repr__(self):
        state = "released" if self._bufs is None else f"{len(self._bufs)} buffers"
        return f"<LeasedValue {self.received}/{self.length} bytes, {state}>"
