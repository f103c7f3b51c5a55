# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._alloc — the store's page allocator in C (re-exported as :class:`ringblob.store.alloc.Allocator`).

Free space of a page range as extents ``(start, npages)`` of contiguous free
pages, neighbours always merged. Page numbers are absolute, signed 64-bit
(page ``p`` starts at byte ``p * page_size`` of the data file).

Each free extent is one 32-byte node of a C array (a pool, recycled through a
free list). Extents come in two classes by size, split at :data:`BIN_PAGES`
(64 pages, a constant of this module):

* **small** extents (``1 .. BIN_PAGES - 1`` pages) — in a fragmented store,
  nearly all of them: each sits in the **bin** of its exact size, a doubly
  linked list threaded through the nodes (``zl`` / ``zr``; removal from the
  middle is O(1)), newest first; a 64-bit mask says which bins are non-empty.
  A hash map (open addressing, linear probing, node indices) finds a small
  extent by its ``start``; a second one, keyed by 64-page chunk
  (``page >> 6``), holds a 64-bit mask per chunk of the pages that are free in
  small extents (only chunks with such a page have an entry). The bits are the
  boundary tags: a free tests the page before and after it for its
  neighbours and the pages it frees for a double free, and walks back over
  set bits (at most 63) to the start of a small left neighbour.
* **large** extents (``>= BIN_PAGES`` pages: the ones a write cursor runs in,
  and few of them) sit in two **treaps** (binary search trees balanced by a
  pseudo-random priority per node, a hash of the node's index; expected depth
  O(log n)): the **address tree** by ``start`` and the **size tree** by
  ``(npages, start)``.

``free`` is a few O(1) expected hash probes, plus one descent of the address
tree of the large extents (to see an overlap with one, a double free, and a
large neighbour); ``allocate`` of fewer than ``BIN_PAGES`` pages takes the
first extent of the smallest non-empty bin that holds them (a mask scan),
otherwise it descends the size tree. Carving pages off the front of a large
extent keeps its place in the address tree, so only the size tree is
re-linked. Among small extents of the best size, the one freed (or last
changed) most recently is taken, not the lowest-addressed one; among large
ones of equal size the lowest start wins.

The write cursor of :meth:`Allocator.allocate_run` is a page number: it is
valid while a free extent starts there. The node found last is cached, so the
common case (the cursor's extent still holds the request) costs no lookup.
A run starts in the best fit for ``RUN_MIN`` pages (the smallest extent that
holds them), so runs use up the middling extents that overwrites free and leave
the largest to values too large for a run; and while the free space is
fragmented (the largest free extent holds less than a twentieth of the free pages:
:data:`RUN_MAX_FRAGMENTATION`) no run is taken at all: small values fill holes
by best fit. Runs that always started in the largest extent, while the holes
they left stayed unused, shredded every large extent: under a mixed-size
overwrite workload a store half empty had no free extent of 64 pages left
(simulated with this allocator, and seen on a daemon: a 1 MiB put refused with
955 MiB free in holes of at most 768 KiB).

Memory: 32 bytes per node, 4-byte start-map slots at a load of at most 1/2,
and a 16-byte slot (load at most 1/2) per 64-page chunk that holds a small
free extent; nothing per page. Pool and maps grow by doubling and never shrink.

Every method runs with the GIL held; the store uses its allocator from its
event loop thread only.
"""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memset

from ringblob.errors import NoSpace

__all__ = ["Allocator", "BIN_PAGES", "RUN_MAX_FRAGMENTATION"]

cdef extern from *:
    """
    #define RB_FIB 0x9E3779B97F4A7C15ULL
    static inline int rb_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    static inline int rb_clz64(uint64_t x) { return __builtin_clzll(x); }
    /* treap priority of node x: murmur3's 32-bit finalizer, independent of the extents' pages */
    static inline uint32_t rb_prio(uint32_t x) {
        x ^= x >> 16; x *= 0x85EBCA6BU; x ^= x >> 13; x *= 0xC2B2AE35U; x ^= x >> 16; return x;
    }
    /* pages lo .. hi - 1 of a chunk (0 <= lo < hi <= 64) as a mask */
    static inline uint64_t rb_mask(int lo, int hi) {
        uint64_t top = hi >= 64 ? ~0ULL : ((1ULL << hi) - 1);
        return top & ~((1ULL << lo) - 1);
    }
    """
    const uint64_t RB_FIB
    int rb_ctz64(uint64_t x) noexcept nogil
    int rb_clz64(uint64_t x) noexcept nogil
    uint32_t rb_prio(uint32_t x) noexcept nogil
    uint64_t rb_mask(int lo, int hi) noexcept nogil

cdef enum:
    NBIN = 64         # extents of fewer pages are small (binned); a chunk of the bit map has NBIN pages
    MAP_MIN = 16      # initial slots of a hash map

#: extents of fewer pages sit in exact-size bins (newest first); larger ones in size order (lowest start first)
BIN_PAGES = NBIN
#: allocate_run runs at the write cursor only while at most this share of the free pages lies
#: outside the largest free extent (``fragmentation() <= RUN_MAX_FRAGMENTATION``); past it, best fit
cdef double _RUN_MAX_FRAG = 0.95
RUN_MAX_FRAGMENTATION = _RUN_MAX_FRAG

cdef struct Node:
    int64_t start    # first page
    int64_t n        # pages; 0 while the node is on the free list
    int32_t al, ar   # large: address tree children (0: none)
    int32_t zl, zr   # large: size tree children; small: bin previous / next; free list: zl

cdef struct Chunk:
    int64_t key      # page >> 6; -1: empty slot
    uint64_t bits    # pages free in small extents (bit i: page key * 64 + i)


cdef inline bint _zless(const Node *a, const Node *b) noexcept nogil:
    """Whether ``a`` sorts before ``b`` in the size tree: by (npages, start)."""
    return a.n < b.n or (a.n == b.n and a.start < b.start)


cdef enum:
    ADDR = 0  # the address tree: by start, links al/ar
    SIZE = 1  # the size tree: by (npages, start), links zl/zr


cdef inline bint _before(int tr, const Node *a, const Node *b) noexcept nogil:
    """Whether ``a`` sorts before ``b`` in tree ``tr``."""
    return a.start < b.start if tr == ADDR else _zless(a, b)


cdef inline int32_t *_kid(int tr, Node *n, int right) noexcept nogil:
    """The link of ``n`` to its left (``right`` 0) or right child in tree ``tr``."""
    if tr == ADDR:
        return &n.ar if right else &n.al
    return &n.zr if right else &n.zl


cdef class _Allocator:
    """The C core of :class:`Allocator` (see the module docstring for the layout)."""

    cdef Node *nodes          # nodes[0] is the null node
    cdef int32_t cap          # nodes allocated (including the null node)
    cdef int32_t used         # high-water mark of node indices
    cdef int32_t free_list    # recycled nodes, linked through zl
    cdef int32_t aroot, zroot # treaps of the large extents
    cdef int64_t nlarge       # large extents
    cdef int32_t bin_head[NBIN]
    cdef uint64_t bin_mask    # bit k: bin k (extents of k pages) is not empty
    cdef int32_t *smap        # small extents by start: node indices, 0 = empty
    cdef uint64_t smask       # slots - 1 (slots: a power of two; 0 before the first insert)
    cdef int sshift           # 64 - log2(slots)
    cdef int64_t scount
    cdef Chunk *cmap          # free pages of small extents, by 64-page chunk
    cdef uint64_t cmask
    cdef int cshift
    cdef int64_t ccount
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
        self.nlarge = 0
        memset(self.bin_head, 0, sizeof(self.bin_head))
        self.bin_mask = 0
        self.smap = NULL
        self.smask = 0
        self.sshift = 64
        self.scount = 0
        self.cmap = NULL
        self.cmask = 0
        self.cshift = 64
        self.ccount = 0
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
        PyMem_RawFree(self.smap)
        PyMem_RawFree(self.cmap)
        self.nodes = NULL
        self.smap = NULL
        self.cmap = NULL

    # -- node pool ----------------------------------------------------------------

    cdef int _reserve(self) except -1:
        """Room for one more node, one more small extent and two more chunks, so that the
        mutation that follows cannot fail half-way (MemoryError here changes nothing)."""
        cdef Node *nn
        cdef size_t newcap
        if not self.free_list and self.used >= self.cap:
            newcap = 64 if self.cap == 0 else <size_t>self.cap * 2
            if newcap > 0x7FFFFFFF:
                raise MemoryError("allocator: more than 2**31 free extents")
            nn = <Node *>PyMem_RawRealloc(self.nodes, newcap * sizeof(Node))
            if nn == NULL:
                raise MemoryError(f"allocator: cannot grow the extent pool to {newcap} nodes")
            self.nodes = nn
            self.cap = <int32_t>newcap
        if <uint64_t>(self.scount + 1) * 2 > self.smask + 1 or self.smap == NULL:
            self._sgrow()
        if <uint64_t>(self.ccount + 2) * 2 > self.cmask + 1 or self.cmap == NULL:
            self._cgrow()
        return 0

    cdef int32_t _new_node(self, int64_t start, int64_t n) noexcept nogil:
        """A node for ``(start, n)`` with no links (after :meth:`_reserve`)."""
        cdef int32_t x
        if self.free_list:
            x = self.free_list
            self.free_list = self.nodes[x].zl
        else:
            x = self.used
            self.used += 1
        cdef Node *p = &self.nodes[x]
        p.start = start
        p.n = n
        p.al = p.ar = p.zl = p.zr = 0
        return x

    cdef inline void _drop_node(self, int32_t x) noexcept nogil:
        self.nodes[x].n = 0
        self.nodes[x].zl = self.free_list
        self.free_list = x

    # -- start map: small extents by start (linear probing, backward-shift deletion) -------

    cdef inline uint64_t _shome(self, int64_t key) noexcept nogil:
        return ((<uint64_t>key * RB_FIB) >> self.sshift) & self.smask

    cdef int _sgrow(self) except -1:
        cdef uint64_t slots = MAP_MIN if self.smap == NULL else (self.smask + 1) * 2, i, j
        cdef int32_t *old = self.smap
        cdef uint64_t oldslots = 0 if old == NULL else self.smask + 1
        cdef int32_t *t = <int32_t *>PyMem_RawMalloc(slots * sizeof(int32_t))
        cdef int bits = 0
        if t == NULL:
            raise MemoryError(f"allocator: cannot grow the start map to {slots} slots")
        memset(t, 0, slots * sizeof(int32_t))
        while (<uint64_t>1 << bits) < slots:
            bits += 1
        self.smap = t
        self.smask = slots - 1
        self.sshift = 64 - bits
        for i in range(oldslots):
            if old[i]:
                j = self._shome(self.nodes[old[i]].start)
                while t[j]:
                    j = (j + 1) & self.smask
                t[j] = old[i]
        PyMem_RawFree(old)
        return 0

    cdef int32_t _sfind(self, int64_t start) noexcept nogil:
        """The small extent that starts at ``start`` (0: none)."""
        if self.scount == 0:
            return 0
        cdef uint64_t i = self._shome(start)
        cdef int32_t x
        while True:
            x = self.smap[i]
            if x == 0 or self.nodes[x].start == start:
                return x
            i = (i + 1) & self.smask

    cdef void _sput(self, int32_t x) noexcept nogil:
        """Add node ``x`` (keyed by its start; room reserved)."""
        cdef uint64_t i = self._shome(self.nodes[x].start)
        while self.smap[i]:
            i = (i + 1) & self.smask
        self.smap[i] = x
        self.scount += 1

    cdef void _sdel(self, int32_t x) noexcept nogil:
        """Remove node ``x`` (present, keyed by its current start)."""
        cdef uint64_t i = self._shome(self.nodes[x].start), j, h
        cdef int32_t y
        while self.smap[i] != x:
            i = (i + 1) & self.smask
        j = i
        while True:
            j = (j + 1) & self.smask
            y = self.smap[j]
            if y == 0:
                break
            h = self._shome(self.nodes[y].start)
            # y may move back to the hole at i unless its home lies cyclically in (i, j]
            if (i < j and (h <= i or h > j)) or (i > j and h <= i and h > j):
                self.smap[i] = y
                i = j
        self.smap[i] = 0
        self.scount -= 1

    # -- chunk map: the pages of small extents as bits, by 64-page chunk ----------------------

    cdef inline uint64_t _chome(self, int64_t key) noexcept nogil:
        return ((<uint64_t>key * RB_FIB) >> self.cshift) & self.cmask

    cdef int _cgrow(self) except -1:
        cdef uint64_t slots = MAP_MIN if self.cmap == NULL else (self.cmask + 1) * 2, i, j
        cdef Chunk *old = self.cmap
        cdef uint64_t oldslots = 0 if old == NULL else self.cmask + 1
        cdef Chunk *t = <Chunk *>PyMem_RawMalloc(slots * sizeof(Chunk))
        cdef int bits = 0
        if t == NULL:
            raise MemoryError(f"allocator: cannot grow the chunk map to {slots} slots")
        for i in range(slots):
            t[i].key = -1
            t[i].bits = 0
        while (<uint64_t>1 << bits) < slots:
            bits += 1
        self.cmap = t
        self.cmask = slots - 1
        self.cshift = 64 - bits
        for i in range(oldslots):
            if old[i].key >= 0:
                j = self._chome(old[i].key)
                while t[j].key >= 0:
                    j = (j + 1) & self.cmask
                t[j] = old[i]
        PyMem_RawFree(old)
        return 0

    cdef inline uint64_t _cget(self, int64_t key) noexcept nogil:
        """The bits of chunk ``key`` (0 when it has no entry)."""
        if self.ccount == 0:
            return 0
        cdef uint64_t i = self._chome(key)
        while True:
            if self.cmap[i].key == key:
                return self.cmap[i].bits
            if self.cmap[i].key < 0:
                return 0
            i = (i + 1) & self.cmask

    cdef void _cor(self, int64_t key, uint64_t bits) noexcept nogil:
        """Set ``bits`` in chunk ``key`` (an entry is added if needed; room reserved)."""
        cdef uint64_t i = self._chome(key)
        while True:
            if self.cmap[i].key == key:
                self.cmap[i].bits |= bits
                return
            if self.cmap[i].key < 0:
                self.cmap[i].key = key
                self.cmap[i].bits = bits
                self.ccount += 1
                return
            i = (i + 1) & self.cmask

    cdef void _cclear(self, int64_t key, uint64_t bits) noexcept nogil:
        """Clear ``bits`` in chunk ``key`` (present); the entry goes when no bit is left."""
        cdef uint64_t i = self._chome(key), j, h
        while self.cmap[i].key != key:
            i = (i + 1) & self.cmask
        self.cmap[i].bits &= ~bits
        if self.cmap[i].bits:
            return
        j = i
        while True:
            j = (j + 1) & self.cmask
            if self.cmap[j].key < 0:
                break
            h = self._chome(self.cmap[j].key)
            if (i < j and (h <= i or h > j)) or (i > j and h <= i and h > j):
                self.cmap[i] = self.cmap[j]
                i = j
        self.cmap[i].key = -1
        self.cmap[i].bits = 0
        self.ccount -= 1

    cdef void _bset(self, int64_t s, int64_t e) noexcept nogil:
        """Mark pages ``[s, e)`` free in small extents (room for the chunks reserved)."""
        cdef int64_t c
        while s < e:
            c = s >> 6
            self._cor(c, rb_mask(<int>(s & 63), <int>(e - (c << 6)) if e - (c << 6) < 64 else 64))
            s = (c + 1) << 6

    cdef void _bclear(self, int64_t s, int64_t e) noexcept nogil:
        """Unmark pages ``[s, e)`` (all marked)."""
        cdef int64_t c
        while s < e:
            c = s >> 6
            self._cclear(c, rb_mask(<int>(s & 63), <int>(e - (c << 6)) if e - (c << 6) < 64 else 64))
            s = (c + 1) << 6

    cdef inline bint _bit(self, int64_t p) noexcept nogil:
        return (self._cget(p >> 6) >> (p & 63)) & 1

    cdef int64_t _bfirst(self, int64_t s, int64_t e) noexcept nogil:
        """The first page of ``[s, e)`` free in a small extent (-1: none); O(min((e - s) / 64, slots))."""
        cdef int64_t c, c0, c1, best = -1, p
        cdef uint64_t w, i
        if self.ccount == 0 or s >= e:
            return -1
        c0 = s >> 6
        c1 = (e - 1) >> 6
        if <uint64_t>(c1 - c0) <= self.cmask:
            c = c0
            while c <= c1:
                w = self._cget(c)
                if c == c0:
                    w &= ~rb_mask(0, <int>(s & 63))
                if c == c1:
                    w &= rb_mask(0, <int>((e - 1) & 63) + 1)
                if w:
                    return (c << 6) + rb_ctz64(w)
                c += 1
            return -1
        for i in range(self.cmask + 1):  # a long range: look at every entry instead
            c = self.cmap[i].key
            if c < c0 or c > c1:
                continue
            w = self.cmap[i].bits
            if c == c0 and s & 63:
                w &= ~rb_mask(0, <int>(s & 63))
            if c == c1:
                w &= rb_mask(0, <int>((e - 1) & 63) + 1)
            if w:
                p = (c << 6) + rb_ctz64(w)
                if best < 0 or p < best:
                    best = p
        return best

    cdef int64_t _brun_start(self, int64_t p) noexcept nogil:
        """The first page of the small extent that holds page ``p`` (whose bit is set)."""
        cdef int64_t c = p >> 6
        cdef int off = <int>(p & 63)
        cdef uint64_t clear = ~self._cget(c) & rb_mask(0, off + 1)
        if clear:
            return (c << 6) + 64 - rb_clz64(clear)
        # the extent (< 64 pages) starts in the chunk before: after its highest clear bit
        if c <= 0:
            return 0
        clear = ~self._cget(c - 1)
        return (c << 6) - rb_clz64(clear)

    # -- bins: small extents by exact size, newest first ------------------------------------

    cdef inline void _bin_push(self, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        cdef int64_t k = N[x].n
        cdef int32_t h = self.bin_head[k]
        N[x].zl = 0
        N[x].zr = h
        if h:
            N[h].zl = x
        self.bin_head[k] = x
        self.bin_mask |= (<uint64_t>1) << k

    cdef inline void _bin_unlink(self, int32_t x) noexcept nogil:
        cdef Node *N = self.nodes
        cdef int64_t k = N[x].n
        cdef int32_t p = N[x].zl, q = N[x].zr
        if p:
            N[p].zr = q
        else:
            self.bin_head[k] = q
            if q == 0:
                self.bin_mask &= ~((<uint64_t>1) << k)
        if q:
            N[q].zl = p

    # -- the two treaps of the large extents ---------------------------------------------------
    # One split / merge / insert / erase serves both trees: ``tr`` picks the order and the
    # links (ADDR: by start, through al/ar; SIZE: by (npages, start), through zl/zr).

    cdef void _tsplit(self, int tr, int32_t t, const Node *key, int32_t *l, int32_t *r) noexcept nogil:
        """Split subtree ``t`` of tree ``tr`` into the nodes before ``key`` (``l``) and the rest (``r``)."""
        cdef Node *N = self.nodes
        if t == 0:
            l[0] = 0
            r[0] = 0
        elif _before(tr, &N[t], key):
            self._tsplit(tr, _kid(tr, &N[t], 1)[0], key, _kid(tr, &N[t], 1), r)
            l[0] = t
        else:
            self._tsplit(tr, _kid(tr, &N[t], 0)[0], key, l, _kid(tr, &N[t], 0))
            r[0] = t

    cdef int32_t _tmerge(self, int tr, int32_t l, int32_t r) noexcept nogil:
        """Join subtrees ``l`` and ``r`` of tree ``tr`` (every node of ``l`` before every node of ``r``)."""
        cdef Node *N = self.nodes
        cdef int32_t *k
        if l == 0:
            return r
        if r == 0:
            return l
        if rb_prio(l) >= rb_prio(r):
            k = _kid(tr, &N[l], 1)
            k[0] = self._tmerge(tr, k[0], r)
            return l
        k = _kid(tr, &N[r], 0)
        k[0] = self._tmerge(tr, l, k[0])
        return r

    cdef int32_t _tinsert(self, int tr, int32_t t, int32_t x) noexcept nogil:
        """Subtree ``t`` of tree ``tr`` with node ``x`` added; returns its new root."""
        cdef Node *N = self.nodes
        cdef int32_t *k
        if t == 0:
            _kid(tr, &N[x], 0)[0] = 0
            _kid(tr, &N[x], 1)[0] = 0
            return x
        if rb_prio(x) > rb_prio(t):
            self._tsplit(tr, t, &N[x], _kid(tr, &N[x], 0), _kid(tr, &N[x], 1))
            return x
        k = _kid(tr, &N[t], 0 if _before(tr, &N[x], &N[t]) else 1)
        k[0] = self._tinsert(tr, k[0], x)
        return t

    cdef int32_t _terase(self, int tr, int32_t t, int32_t x) noexcept nogil:
        """Subtree ``t`` of tree ``tr`` without node ``x`` (which it holds); returns its new root."""
        cdef Node *N = self.nodes
        cdef int32_t *k
        if t == x:
            return self._tmerge(tr, _kid(tr, &N[t], 0)[0], _kid(tr, &N[t], 1)[0])
        k = _kid(tr, &N[t], 0 if _before(tr, &N[x], &N[t]) else 1)
        k[0] = self._terase(tr, k[0], x)
        return t

    # -- lookups in the address tree (by start) and the size tree (by npages, start) ----------

    cdef int32_t _abelow(self, int64_t key) noexcept nogil:
        """The large extent with the largest start < key (0: none)."""
        cdef Node *N = self.nodes
        cdef int32_t t = self.aroot, best = 0
        while t:
            if N[t].start < key:
                best = t
                t = N[t].ar
            else:
                t = N[t].al
        return best

    cdef int32_t _aat(self, int64_t key) noexcept nogil:
        """The large extent that starts at key (0: none)."""
        cdef Node *N = self.nodes
        cdef int32_t t = self.aroot
        while t and N[t].start != key:
            t = N[t].ar if N[t].start < key else N[t].al
        return t

    cdef int32_t _zfit(self, int64_t n) noexcept nogil:
        """The smallest large extent of at least ``n`` pages, lowest start among equals (0: none)."""
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
            return 0 if self.bin_mask == 0 else 63 - rb_clz64(self.bin_mask)
        while N[t].zr:
            t = N[t].zr
        return N[t].n

    # -- extents ----------------------------------------------------------------------

    cdef void _add_small(self, int32_t x) noexcept nogil:
        """File node ``x`` (a small extent, its pages already marked) in its bin and the start map."""
        self._sput(x)
        self._bin_push(x)

    cdef void _add_large(self, int32_t x) noexcept nogil:
        self.aroot = self._tinsert(ADDR, self.aroot, x)
        self.zroot = self._tinsert(SIZE, self.zroot, x)
        self.nlarge += 1

    cdef void _remove_small(self, int32_t x) noexcept nogil:
        """Take node ``x`` (small) out of its bin and the start map (its page bits stay)."""
        self._bin_unlink(x)
        self._sdel(x)

    cdef void _remove_large(self, int32_t x) noexcept nogil:
        self.aroot = self._terase(ADDR, self.aroot, x)
        self.zroot = self._terase(SIZE, self.zroot, x)
        self.nlarge -= 1

    cdef int _insert(self, int64_t start, int64_t n) except -1:
        """Add the free extent ``(start, n)`` (no neighbour checks: the caller merged)."""
        self._reserve()
        cdef int32_t x = self._new_node(start, n)
        if n < NBIN:
            self._bset(start, start + n)
            self._add_small(x)
        else:
            self._add_large(x)
        self.nfree += n
        self.nextents += 1
        return 0

    cdef int64_t _take(self, int32_t x, int64_t n) noexcept nogil:
        """Carve ``n`` pages off the front of extent ``x`` (which holds them; room reserved);
        returns the first page. Node ``x`` keeps what is left, if anything."""
        cdef Node *N = self.nodes
        cdef int64_t start = N[x].start, size = N[x].n, rest = size - n
        self.nfree -= n
        if size < NBIN:
            self._remove_small(x)
            self._bclear(start, start + n)
            if rest:
                N[x].start = start + n
                N[x].n = rest
                self._add_small(x)
            else:
                self._drop_node(x)
                self.nextents -= 1
        elif rest >= NBIN:  # stays large, at its place in address order
            self.zroot = self._terase(SIZE, self.zroot, x)
            N[x].start = start + n
            N[x].n = rest
            self.zroot = self._tinsert(SIZE, self.zroot, x)
        else:
            self._remove_large(x)
            if rest:
                N[x].start = start + n
                N[x].n = rest
                self._bset(start + n, start + size)
                self._add_small(x)
            else:
                self._drop_node(x)
                self.nextents -= 1
        return start

    cdef int32_t _cursor(self) noexcept nogil:
        """The node of the free extent that starts at the write cursor (0: none)."""
        cdef int32_t x = self.run_node
        if self.run < 0:
            return 0
        if x and self.nodes[x].n and self.nodes[x].start == self.run:
            return x
        x = self._sfind(self.run)
        if x == 0 and self.nlarge:
            x = self._aat(self.run)
        if x:
            self.run_node = x
        return x

    cdef inline int32_t _fit(self, int64_t n) noexcept nogil:
        """Best fit for ``n`` pages (0: none): the newest extent of the smallest bin that holds
        them, else the smallest large extent (lowest start among equals)."""
        cdef uint64_t m
        if n < NBIN:
            m = self.bin_mask & ~rb_mask(0, <int>n)
            if m:
                return self.bin_head[rb_ctz64(m)]
        return self._zfit(n) if self.nlarge else 0

    # -- API ------------------------------------------------------------------------------

    def allocate(self, int64_t n):
        """Take ``n`` contiguous pages (best fit); returns the first page.

        Best fit is the smallest free extent that holds ``n`` pages; among equal
        sizes the lowest-addressed one when they have at least :data:`BIN_PAGES`
        pages, else the one freed (or last shrunk or grown) most recently. The
        pages are its first ``n``. Raises ``ValueError`` when ``n <= 0`` and
        :class:`~ringblob.errors.NoSpace` (changing nothing) when no free extent
        holds ``n`` pages.
        """
        if n <= 0:
            raise ValueError(f"allocate: {n} pages (want at least 1)")
        return self._allocate(n)

    cdef int64_t _allocate(self, int64_t n) except -1:
        cdef int32_t x = self._fit(n)
        if x == 0:
            raise NoSpace(
                f"no free extent of {n} pages: {self.nfree} pages free, the largest free extent "
                f"has {self._largest()} pages; delete blobs or create a larger data file"
            )
        self._reserve()
        return self._take(x, n)

    def allocate_run(self, int64_t n):
        """Take ``n`` contiguous pages at the write cursor; returns the first page.

        Consecutive calls get consecutive pages (each carved from the front of the
        free extent the cursor is in), so small values allocated together — the
        items of one group commit — are neighbours in the file and go out as one
        write. When the cursor's extent has fewer than ``n`` pages left (or no
        free extent starts at the cursor any more, e.g. a free merged the pages
        before it), a new run starts in the best fit for ``max(n, RUN_MIN)``
        pages (the smallest free extent that holds them: the lowest such when
        it has at least :data:`BIN_PAGES` pages, else the newest of that size),
        so runs use up the middling extents that overwrites free and leave the
        largest ones to values too large for a run; with no such extent this
        is :meth:`allocate` (best fit, filling holes) and the cursor is dropped.
        It is :meth:`allocate` too, dropping the cursor, while the free space
        is fragmented — more than :data:`RUN_MAX_FRAGMENTATION` (0.95)
        of the free pages outside the largest free extent — so the holes get
        filled before runs eat into the last large extents. Raises
        ``ValueError`` when ``n <= 0`` and :class:`~ringblob.errors.NoSpace`
        (changing nothing) like :meth:`allocate`.
        """
        if n <= 0:
            raise ValueError(f"allocate_run: {n} pages (want at least 1)")
        cdef int64_t big = self._largest(), start, want
        if big < (1.0 - _RUN_MAX_FRAG) * self.nfree:  # fragmented: fill holes
            self.run = -1
            return self._allocate(n)
        cdef int32_t x = self._cursor()
        if x == 0 or self.nodes[x].n < n:
            want = n if n > self.RUN_MIN else self.RUN_MIN
            x = self._fit(want) if big >= want else 0
            if x == 0:
                self.run = -1
                return self._allocate(n)
        self._reserve()
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
        if start < self.first or n > self.count or start > self.first + self.count - n:
            raise ValueError(f"free: extent ({start}, {n}) outside the data area "
                             f"[{self.first}, {self.first + self.count})")
        cdef Node *N
        cdef int64_t end = start + n, ms = start, me, b = -1
        cdef int32_t p = 0, l = 0, r = 0, x
        cdef uint64_t w
        cdef bint lbit, rbit
        if start > 0 and (start - 1) >> 6 == end >> 6:  # the pages before and after in one chunk
            w = self._cget(end >> 6)
            if w & rb_mask(<int>(start & 63), <int>(end & 63)):
                b = self._bfirst(start, end)
            lbit = (w >> ((start - 1) & 63)) & 1
            rbit = (w >> (end & 63)) & 1
        else:
            b = self._bfirst(start, end)
            lbit = start > self.first and self._bit(start - 1)
            rbit = end < self.first + self.count and self._bit(end)
        if b >= 0:
            x = self._sfind(self._brun_start(b))
            raise ValueError(f"free: extent ({start}, {n}) overlaps the free extent "
                             f"({self.nodes[x].start}, {self.nodes[x].n}) (double free)")
        if self.nlarge:
            p = self._abelow(end)
            if p and self.nodes[p].start + self.nodes[p].n > start:
                raise ValueError(f"free: extent ({start}, {n}) overlaps the free extent "
                                 f"({self.nodes[p].start}, {self.nodes[p].n}) (double free)")
        self._reserve()
        N = self.nodes
        # neighbours: a small one by its page bits, a large one in the address tree
        # (no page outside [first, first + count) has its bit set)
        if lbit:
            l = self._sfind(self._brun_start(start - 1))
        elif p and N[p].start + N[p].n == start:
            l = p
        if rbit:
            r = self._sfind(end)
        elif self.nlarge and end < self.first + self.count:
            r = self._aat(end)
        if l:
            ms = N[l].start
        me = N[r].start + N[r].n if r else end
        self.nfree += n
        if me - ms < NBIN:  # small, and so were both neighbours
            self._bset(start, end)
            if l:
                self._bin_unlink(l)
                if r:
                    self._remove_small(r)
                    self._drop_node(r)
                    self.nextents -= 1
                N[l].n = me - ms
                self._bin_push(l)
            elif r:
                self._remove_small(r)
                N[r].start = ms
                N[r].n = me - ms
                self._add_small(r)
            else:
                self._add_small(self._new_node(start, n))
                self.nextents += 1
            return
        # large: small neighbours dissolve into it
        if l and N[l].n < NBIN:
            self._remove_small(l)
            self._bclear(N[l].start, start)
            self._drop_node(l)
            self.nextents -= 1
            l = 0
        if r and N[r].n < NBIN:
            self._remove_small(r)
            self._bclear(end, me)
            self._drop_node(r)
            self.nextents -= 1
            r = 0
        if l:  # grows at its end: same start, same place in address order
            if r:
                self._remove_large(r)
                self._drop_node(r)
                self.nextents -= 1
            self.zroot = self._terase(SIZE, self.zroot, l)
            N[l].n = me - ms
            self.zroot = self._tinsert(SIZE, self.zroot, l)
        elif r:  # grows at its front: no large extent lies between
            self.zroot = self._terase(SIZE, self.zroot, r)
            N[r].start = ms
            N[r].n = me - ms
            self.zroot = self._tinsert(SIZE, self.zroot, r)
        else:
            self._add_large(self._new_node(ms, me - ms))
            self.nextents += 1

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
        """Iterate free extents ``(start, npages)`` in address order (for checks and tests; sorts: O(n log n))."""
        cdef list out = []
        cdef int32_t x
        for x in range(1, self.used):
            if self.nodes[x].n:
                out.append((self.nodes[x].start, self.nodes[x].n))
        out.sort()
        return iter(out)

    def _check(self):
        """Assert every invariant (no adjacent or overlapping extents, counters; bins, start map
        and page bits hold exactly the small extents; tree orders and heap order of the large
        ones); raises ``AssertionError``. For tests: O(n log n)."""
        cdef Node *N = self.nodes
        cdef int32_t x, y, prev
        cdef uint64_t i
        cdef int k
        exts = list(self.free_extents())
        assert len(exts) == self.nextents, (len(exts), self.nextents)
        assert sum(n for _, n in exts) == self.nfree
        for (s0, n0), (s1, n1) in zip(exts, exts[1:]):
            assert s0 + n0 < s1, f"extents ({s0}, {n0}) and ({s1}, {n1}) touch or overlap"
        for s, n in exts:
            assert n > 0 and s >= self.first and s + n <= self.first + self.count
        small = {}
        large = []
        for x in range(1, self.used):
            if N[x].n:
                if N[x].n < NBIN:
                    small[x] = (N[x].start, N[x].n)
                else:
                    large.append(x)
        # bins: every small node once, in the bin of its size, links consistent, mask exact
        seen = set()
        for k in range(NBIN):
            assert bool(self.bin_mask >> k & 1) == (self.bin_head[k] != 0), f"bin mask, bin {k}"
            prev = 0
            x = self.bin_head[k]
            while x:
                assert x in small and N[x].n == k and N[x].zl == prev and x not in seen, f"bin {k}"
                seen.add(x)
                prev = x
                x = N[x].zr
        assert len(seen) == len(small), "a small extent is in no bin"
        # start map: exactly the small nodes, each found from its home slot
        nent = 0
        for i in range(self.smask + 1 if self.smap else 0):
            if self.smap[i]:
                nent += 1
        assert self.scount == len(small) == nent, (self.scount, len(small), nent)
        for x in small:
            assert self._sfind(N[x].start) == x, f"start map misses {small[x]}"
        # page bits: exactly the pages of the small extents, entries only for non-empty chunks
        nbits = 0
        nent = 0
        for i in range(self.cmask + 1 if self.cmap else 0):
            if self.cmap[i].key >= 0:
                assert self.cmap[i].bits, "empty chunk entry"
                assert self._cget(self.cmap[i].key) == self.cmap[i].bits, "chunk entry not found"
                nbits += bin(self.cmap[i].bits).count("1")
                nent += 1
        assert nent == self.ccount
        assert nbits == sum(n for _, n in small.values()), "page bits and small extents differ"
        for s, n in small.values():
            assert self._bfirst(s, s + n) == s and self._brun_start(s + n - 1) == s
        # large extents: both trees hold exactly them, in order, heap ordered
        assert self.nlarge == len(large)
        assert self._walk(self.aroot, True) == sorted(N[x].start for x in large), "address tree"
        assert self._walk(self.zroot, False) == sorted((N[x].n, N[x].start) for x in large), "size tree"
        self._check_heap(self.aroot, True)
        self._check_heap(self.zroot, False)

    cdef list _walk(self, int32_t t, bint addr):
        cdef list out = [], stack = []
        while stack or t:
            while t:
                stack.append(t)
                t = self.nodes[t].al if addr else self.nodes[t].zl
            t = stack.pop()
            if addr:
                out.append(self.nodes[t].start)
            else:
                out.append((self.nodes[t].n, self.nodes[t].start))
            t = self.nodes[t].ar if addr else self.nodes[t].zr
        return out

    cdef _check_heap(self, int32_t t, bint addr):
        cdef int32_t c
        if t == 0:
            return
        for c in ((self.nodes[t].al, self.nodes[t].ar) if addr else (self.nodes[t].zl, self.nodes[t].zr)):
            if c:
                assert rb_prio(c) <= rb_prio(t), "heap order"
                self._check_heap(c, addr)


class Allocator(_Allocator):
    """Free space of a page range ``[first, first + count)`` as extents ``(start, npages)``.

    ``Allocator(first, count, free_all=True)``: all pages free, or none with
    ``free_all=False``. Pages are absolute page numbers (``0 <= first``,
    ``first + count < 2**62``; ``ValueError`` otherwise). Free, and allocate
    from an extent of fewer than :data:`BIN_PAGES` pages, are O(1) expected;
    work on larger extents is O(log n) in their number (see
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
