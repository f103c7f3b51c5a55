# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._alloc — the store's page allocator in C (re-exported as :class:`ringblob.store.alloc.Allocator`).

Free space of a page range as extents ``(start, npages)`` of contiguous free
pages, neighbours always merged. Page numbers are absolute, signed 64-bit
(page ``p`` starts at byte ``p * page_size`` of the data file).

Each free extent is one node of a C array (a pool, recycled through a free
list) that sits in two **treaps** (binary search trees balanced by a random
priority per node; expected depth O(log n)):

* the **address tree**, ordered by ``start``: a free finds both neighbours
  with two descents (and sees any overlap with a free extent: a double free);
* the **size tree**, ordered by ``(npages, start)``: best fit is one descent
  (the smallest extent that holds ``n`` pages; among equal sizes the lowest
  start), the largest extent is the rightmost path.

Carving pages off the front of an extent, or growing an extent at either end
by a merge, keeps its place in the address tree (no other extent lies between
its neighbours), so only the size tree is re-linked: allocate and free are a
few O(log n) descents with no Python object per extent.

The write cursor of :meth:`Allocator.allocate_run` is a page number (as in the
pure-Python allocator this replaces): it is valid while a free extent starts
there. The node found last is cached, so the common case (the cursor's extent
still holds the request) costs no descent.

Every method runs with the GIL held; the store uses its allocator from its
event loop thread only.
"""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from ringblob.errors import NoSpace

__all__ = ["Allocator"]

cdef extern from *:
    """
    #define RB_XS_MUL 0x2545F4914F6CDD1DULL
    #define RB_XS_SEED 0x9E3779B97F4A7C15ULL
    """
    const uint64_t RB_XS_MUL
    const uint64_t RB_XS_SEED

cdef struct Node:
    int64_t start    # first page
    int64_t n        # pages; 0 while the node is on the free list
    uint32_t prio    # heap order: a parent's prio >= its children's
    int32_t al, ar   # address tree children (0: none)
    int32_t zl, zr   # size tree children (0: none); zl links the pool's free list


cdef inline bint _zless(const Node *a, const Node *b) noexcept nogil:
    """Whether ``a`` sorts before ``b`` in the size tree: by (npages, start)."""
    return a.n < b.n or (a.n == b.n and a.start < b.start)


cdef class _Allocator:
    """The C core of :class:`Allocator` (see the module docstring for the layout)."""

    cdef Node *nodes          # nodes[0] is the null node
    cdef int32_t cap          # nodes allocated (including the null node)
    cdef int32_t used         # high-water mark of node indices
    cdef int32_t free_list    # recycled nodes, linked through zl
    cdef int32_t aroot, zroot
    cdef uint64_t rng
    cdef int64_t nfree        # free pages
    cdef int64_t nextents     # free extents
    cdef int64_t run          # the write cursor (a page), -1 for none
    cdef int32_t run_node     # the node that started at ``run`` when last seen
    cdef readonly int64_t first
    cdef readonly int64_t count

    def __cinit__(self, *args, **kwargs):
        self.nodes = NULL
        self.cap = 0
        self.used = 1
        self.free_list = 0
        self.aroot = 0
        self.zroot = 0
        self.rng = RB_XS_SEED
        self.nfree = 0
        self.nextents = 0
        self.run = -1
        self.run_node = 0

    def __init__(self, int64_t first, int64_t count, *, bint free_all=True):
        if first < 0 or count < 0 or first > (1 << 62) - count:
            raise ValueError(f"allocator: page range [{first}, {first} + {count}) is not within [0, 2**62)")
        self.first = first
        self.count = count
        if free_all and count:
            self._insert(first, count)

    def __dealloc__(self):
        PyMem_RawFree(self.nodes)
        self.nodes = NULL

    # -- node pool ----------------------------------------------------------------

    cdef int32_t _new_node(self, int64_t start, int64_t n) except -1:
        cdef int32_t x
        cdef Node *nn
        cdef size_t newcap
        if self.free_list:
            x = self.free_list
            self.free_list = self.nodes[x].zl
        else:
            if self.used >= self.cap:
                newcap = 64 if self.cap == 0 else <size_t>self.cap * 2
                if newcap > 0x7FFFFFFF:
                    raise MemoryError("allocator: more than 2**31 free extents")
                nn = <Node *>PyMem_RawRealloc(self.nodes, newcap * sizeof(Node))
                if nn == NULL:
                    raise MemoryError(f"allocator: cannot grow the extent pool to {newcap} nodes")
                self.nodes = nn
                self.cap = <int32_t>newcap
            x = self.used
            self.used += 1
        # xorshift64*: the priorities need only be independent of the keys
        self.rng ^= self.rng >> 12
        self.rng ^= self.rng << 25
        self.rng ^= self.rng >> 27
        cdef Node *p = &self.nodes[x]
        p.start = start
        p.n = n
        p.prio = <uint32_t>((self.rng * RB_XS_MUL) >> 32)
        p.al = p.ar = p.zl = p.zr = 0
        return x

    cdef inline void _drop_node(self, int32_t x) noexcept nogil:
        self.nodes[x].n = 0
        self.nodes[x].zl = self.free_list
        self.free_list = x

    # -- address tree (by start) ----------------------------------------------------------

    cdef void _asplit(self, int32_t t, int64_t key, int32_t *l, int32_t *r) noexcept nogil:
        """Split subtree ``t`` into starts < key (``l``) and >= key (``r``)."""
        cdef Node *N = self.nodes
        if t == 0:
            l[0] = 0
            r[0] = 0
        elif N[t].start < key:
            self._asplit(N[t].ar, key, &N[t].ar, r)
            l[0] = t
        else:
            self._asplit(N[t].al, key, l, &N[t].al)
            r[0] = t

    cdef int32_t _amerge(self, int32_t l, int32_t r) noexcept nogil:
        cdef Node *N = self.nodes
        if l == 0:
            return r
        if r == 0:
            return l
        if N[l].prio >= N[r].prio:
            N[l].ar = self._amerge(N[l].ar, r)
            return l
        N[r].al = self._amerge(l, N[r].al)
        return r

    cdef int32_t _ainsert(self, int32_t t, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        if t == 0:
            return x
        if N[x].prio > N[t].prio:
            self._asplit(t, N[x].start, &N[x].al, &N[x].ar)
            return x
        if N[x].start < N[t].start:
            N[t].al = self._ainsert(N[t].al, x)
        else:
            N[t].ar = self._ainsert(N[t].ar, x)
        return t

    cdef int32_t _aerase(self, int32_t t, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        if t == x:
            return self._amerge(N[t].al, N[t].ar)
        if N[x].start < N[t].start:
            N[t].al = self._aerase(N[t].al, x)
        else:
            N[t].ar = self._aerase(N[t].ar, x)
        return t

    cdef int32_t _abelow(self, int64_t key) noexcept nogil:
        """The node with the largest start < key (0: none)."""
        cdef Node *N = self.nodes
        cdef int32_t t = self.aroot, best = 0
        while t:
            if N[t].start < key:
                best = t
                t = N[t].ar
            else:
                t = N[t].al
        return best

    cdef int32_t _aat_least(self, int64_t key) noexcept nogil:
        """The node with the smallest start >= key (0: none)."""
        cdef Node *N = self.nodes
        cdef int32_t t = self.aroot, best = 0
        while t:
            if N[t].start >= key:
                best = t
                t = N[t].al
            else:
                t = N[t].ar
        return best

    # -- size tree (by npages, start) -------------------------------------------------------

    cdef void _zsplit(self, int32_t t, const Node *key, int32_t *l, int32_t *r) noexcept nogil:
        cdef Node *N = self.nodes
        if t == 0:
            l[0] = 0
            r[0] = 0
        elif _zless(&N[t], key):
            self._zsplit(N[t].zr, key, &N[t].zr, r)
            l[0] = t
        else:
            self._zsplit(N[t].zl, key, l, &N[t].zl)
            r[0] = t

    cdef int32_t _zmerge(self, int32_t l, int32_t r) noexcept nogil:
        cdef Node *N = self.nodes
        if l == 0:
            return r
        if r == 0:
            return l
        if N[l].prio >= N[r].prio:
            N[l].zr = self._zmerge(N[l].zr, r)
            return l
        N[r].zl = self._zmerge(l, N[r].zl)
        return r

    cdef int32_t _zinsert(self, int32_t t, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        if t == 0:
            N[x].zl = N[x].zr = 0
            return x
        if N[x].prio > N[t].prio:
            self._zsplit(t, &N[x], &N[x].zl, &N[x].zr)
            return x
        if _zless(&N[x], &N[t]):
            N[t].zl = self._zinsert(N[t].zl, x)
        else:
            N[t].zr = self._zinsert(N[t].zr, x)
        return t

    cdef int32_t _zerase(self, int32_t t, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        if t == x:
            return self._zmerge(N[t].zl, N[t].zr)
        if _zless(&N[x], &N[t]):
            N[t].zl = self._zerase(N[t].zl, x)
        else:
            N[t].zr = self._zerase(N[t].zr, x)
        return t

    cdef int32_t _zfit(self, int64_t n) noexcept nogil:
        """The smallest node of at least ``n`` pages, lowest start among equals (0: none)."""
        cdef Node *N = self.nodes
        cdef int32_t t = self.zroot, best = 0
        while t:
            if N[t].n >= n:
                best = t
                t = N[t].zl
            else:
                t = N[t].zr
        return best

    cdef inline int64_t _largest(self) noexcept nogil:
        cdef Node *N = self.nodes
        cdef int32_t t = self.zroot
        if t == 0:
            return 0
        while N[t].zr:
            t = N[t].zr
        return N[t].n

    # -- extents ----------------------------------------------------------------------

    cdef int _insert(self, int64_t start, int64_t n) except -1:
        """Add the free extent ``(start, n)`` (no neighbour checks: the caller merged)."""
        cdef int32_t x = self._new_node(start, n)
        self.aroot = self._ainsert(self.aroot, x)
        self.zroot = self._zinsert(self.zroot, x)
        self.nfree += n
        self.nextents += 1
        return 0

    cdef inline void _resize(self, int32_t x, int64_t start, int64_t n) noexcept nogil:
        """Move extent ``x`` to ``(start, n)``, which keeps its place in address order."""
        self.zroot = self._zerase(self.zroot, x)
        self.nodes[x].start = start
        self.nodes[x].n = n
        self.zroot = self._zinsert(self.zroot, x)

    cdef inline void _erase(self, int32_t x) noexcept nogil:
        self.aroot = self._aerase(self.aroot, x)
        self.zroot = self._zerase(self.zroot, x)
        self.nextents -= 1
        self._drop_node(x)

    cdef int64_t _take(self, int32_t x, int64_t n) noexcept nogil:
        """Carve ``n`` pages off the front of extent ``x`` (which holds them); returns the first page."""
        cdef int64_t start = self.nodes[x].start, size = self.nodes[x].n
        self.nfree -= n
        if size > n:
            self._resize(x, start + n, size - n)
        else:
            self._erase(x)
        return start

    cdef int32_t _cursor(self) noexcept nogil:
        """The node of the free extent that starts at the write cursor (0: none)."""
        cdef int32_t x = self.run_node
        if self.run < 0:
            return 0
        if x and self.nodes[x].n and self.nodes[x].start == self.run:
            return x
        x = self._aat_least(self.run)
        if x and self.nodes[x].start == self.run:
            self.run_node = x
            return x
        return 0

    # -- API ------------------------------------------------------------------------------

    def allocate(self, int64_t n):
        """Take ``n`` contiguous pages (best fit); returns the first page.

        Best fit is the smallest free extent that holds ``n`` pages, the one at
        the lowest page among equal sizes; the pages are its first ``n``.
        Raises ``ValueError`` when ``n <= 0`` and :class:`~ringblob.errors.NoSpace`
        (changing nothing) when no free extent holds ``n`` pages.
        """
        if n <= 0:
            raise ValueError(f"allocate: {n} pages (want at least 1)")
        cdef int32_t x = self._zfit(n)
        if x == 0:
            raise NoSpace(
                f"no free extent of {n} pages: {self.nfree} pages free, the largest free extent "
                f"has {self._largest()} pages; delete blobs or create a larger data file"
            )
        return self._take(x, n)

    def allocate_run(self, int64_t n):
        """Take ``n`` contiguous pages at the write cursor; returns the first page.

        Consecutive calls get consecutive pages (each carved from the front of the
        free extent the cursor is in), so small values allocated together — the
        items of one group commit — are neighbours in the file and go out as one
        write. When the cursor's extent has fewer than ``n`` pages left (or no
        free extent starts at the cursor any more, e.g. a free merged the pages
        before it), a new run starts at the largest free extent (the lowest
        such) if it has at least :attr:`RUN_MIN` (and ``n``) pages; otherwise
        this is :meth:`allocate` (best fit, filling holes) and the cursor is
        dropped. Raises ``ValueError`` when ``n <= 0`` and
        :class:`~ringblob.errors.NoSpace` (changing nothing) like :meth:`allocate`.
        """
        if n <= 0:
            raise ValueError(f"allocate_run: {n} pages (want at least 1)")
        cdef int32_t x = self._cursor()
        cdef int64_t big, start
        if x == 0 or self.nodes[x].n < n:
            big = self._largest()
            if big < n or big < self.RUN_MIN:
                self.run = -1
                return self.allocate(n)
            x = self._zfit(big)
        start = self._take(x, n)
        if self.nodes[x].n and self.nodes[x].start == start + n:  # x survived: the rest of the extent
            self.run = start + n
            self.run_node = x
        else:
            self.run = -1
        return start

    def free(self, int64_t start, int64_t n):
        """Give back ``n`` pages at ``start``, merging with free neighbours (nothing when ``n <= 0``).

        Raises ``ValueError`` (changing nothing) when the extent lies outside
        ``[first, first + count)`` or overlaps a free extent (a double free).
        """
        if n <= 0:
            return
        cdef int64_t end
        if start < self.first or n > self.count or start > self.first + self.count - n:
            raise ValueError(f"free: extent ({start}, {n}) outside the data area "
                             f"[{self.first}, {self.first + self.count})")
        end = start + n
        cdef Node *N = self.nodes
        cdef int32_t p = self._abelow(end), q
        if p and N[p].start + N[p].n > start:
            raise ValueError(f"free: extent ({start}, {n}) overlaps the free extent ({N[p].start}, {N[p].n}) "
                             "(double free)")
        q = self._aat_least(end)
        self.nfree += n
        if p and N[p].start + N[p].n == start:
            if q and N[q].start == end:
                n += N[q].n
                self._erase(q)
            self._resize(p, N[p].start, N[p].n + n)
        elif q and N[q].start == end:
            self._resize(q, start, N[q].n + n)
        else:
            self.nfree -= n
            self._insert(start, n)

    def largest(self):
        """Pages in the largest free extent (0 when full)."""
        return self._largest()

    @property
    def free_pages(self):
        """Free pages in all (an int)."""
        return self.nfree

    @property
    def extents(self):
        """Number of free extents."""
        return self.nextents

    def fragmentation(self):
        """``1 - largest free extent / free pages``: 0.0 when the free space is one extent (or none)."""
        if not self.nfree:
            return 0.0
        return 1.0 - <double>self._largest() / <double>self.nfree

    def free_extents(self):
        """Iterate free extents ``(start, npages)`` in address order (for checks and tests)."""
        out = []
        cdef int32_t t = self.aroot
        cdef list stack = []
        while stack or t:
            while t:
                stack.append(t)
                t = self.nodes[t].al
            t = stack.pop()
            out.append((self.nodes[t].start, self.nodes[t].n))
            t = self.nodes[t].ar
        return iter(out)

    def _check(self):
        """Assert every invariant (tree orders, heap order, no adjacent or overlapping extents,
        counters); raises ``AssertionError``. For tests: O(n)."""
        exts = list(self.free_extents())
        assert len(exts) == self.nextents, (len(exts), self.nextents)
        assert sum(n for _, n in exts) == self.nfree
        for (s0, n0), (s1, n1) in zip(exts, exts[1:]):
            assert s0 + n0 < s1, f"extents ({s0}, {n0}) and ({s1}, {n1}) touch or overlap"
        for s, n in exts:
            assert n > 0 and s >= self.first and s + n <= self.first + self.count
        zs = []
        cdef int32_t t = self.zroot
        cdef list stack = []
        while stack or t:
            while t:
                stack.append(t)
                t = self.nodes[t].zl
            t = stack.pop()
            zs.append((self.nodes[t].n, self.nodes[t].start))
            t = self.nodes[t].zr
        assert zs == sorted((n, s) for s, n in exts), "size tree out of order"
        self._check_heap(self.aroot, True)
        self._check_heap(self.zroot, False)

    cdef _check_heap(self, int32_t t, bint addr):
        cdef int32_t c
        if t == 0:
            return
        for c in ((self.nodes[t].al, self.nodes[t].ar) if addr else (self.nodes[t].zl, self.nodes[t].zr)):
            if c:
                assert self.nodes[c].prio <= self.nodes[t].prio, "heap order"
                self._check_heap(c, addr)


class Allocator(_Allocator):
    """Free space of a page range ``[first, first + count)`` as extents ``(start, npages)``.

    ``Allocator(first, count, free_all=True)``: all pages free, or none with
    ``free_all=False``. Pages are absolute page numbers (``0 <= first``,
    ``first + count < 2**62``; ``ValueError`` otherwise). Allocate and free
    are O(log n) in the number of free extents (C treaps, see
    ``cython/_alloc.pyx``). :attr:`RUN_MIN` may be set on the class or on
    one allocator.
    """

    #: :meth:`allocate_run` starts a new run only in a free extent of at least this many pages
    RUN_MIN = 64

    @classmethod
    def from_used(cls, first: int, count: int, used) -> "Allocator":
        """Build from an iterable of used extents ``(start, npages)`` (any order, no overlaps).

        Raises ``ValueError`` when two used extents overlap or one lies outside the range.
        """
        return cls.from_used_packed(first, count, [start << 32 | n for start, n in used if n > 0])

    @classmethod
    def from_used_packed(cls, first: int, count: int, used: list) -> "Allocator":
        """Like :meth:`from_used` with each extent packed as ``start << 32 | npages`` (sorted in place;
        ``npages < 2**32``). Raises ``ValueError`` like :meth:`from_used`."""
        used.sort()
        self = cls(first, count, free_all=False)
        _fill(self, used)
        return self


cdef _fill(_Allocator self, list used):
    """Insert the gaps between the sorted packed used extents as free extents."""
    cdef int64_t pos = self.first, end_all = self.first + self.count, start, n
    for e in used:
        if e < 0 or e >> 32 > end_all:
            raise ValueError(f"allocator: used extent ({e >> 32}, {e & 0xFFFFFFFF}) lies outside "
                             f"pages [{self.first}, {end_all})")
        start = e >> 32
        n = e & 0xFFFFFFFF
        if start < pos or start + n > end_all:
            raise ValueError(f"allocator: used extent ({start}, {n}) overlaps another or lies outside "
                             f"pages [{self.first}, {end_all})")
        if start > pos:
            self._insert(pos, start - pos)
        pos = start + n
    if pos < end_all:
        self._insert(pos, end_all - pos)
