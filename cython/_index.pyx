# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._index — the store's in-memory key index in C (re-exported as :class:`ringblob.store.index.Index`).

Key -> ``(first page, length, BLAKE3 digest)``, in key order for listing.
Compact by design (target: at most 100 bytes of RAM per blob beyond the key
bytes at 1M blobs), so it holds no Python object per blob:

* an **arena** (one growable C buffer) of entries ``klen u8 | key | page u64 |
  length u32 | digest 32s`` (little-endian) — 45 bytes plus the key; the same
  bytes as a checkpoint entry, so loading a checkpoint is one copy plus a pass
  that fills the hash table and the order;
* an open-addressing **hash table** of ``uint64`` slots, each ``tag << 40 |
  (arena offset + 1)`` (0: empty, all ones: a tombstone), where the tag is the
  top 24 bits of the key's hash: a probe compares tags before it touches the
  arena, so a miss or a collision rarely costs a cache miss in the arena.
  Linear probing, at most 70 % full (tombstones included), rebuilt to at most
  50 % full. Offsets are 40 bits: the arena may hold up to 1 TiB;
* the **order**: sorted chunks (C arrays of at most ``CHUNK`` arena offsets),
  each with the first 8 bytes of its largest key cached beside it, so an insert
  moves at most ``CHUNK`` offsets and ``keys_after`` is two bisections.

The hash is a wyhash-style 64-bit multiply-mix (128-bit products) keyed with a
random per-process seed, so the slot of a key is not predictable from outside
the process. Keys come only from local clients (the daemon's Unix socket); the
seed makes crafting colliding keys impractical for them, but it is not a
cryptographic MAC. Nothing about the hash is stored: checkpoints hold entries
in key order, and every load rebuilds the table.

A value update in place rewrites the entry's 44 value bytes; a delete leaves
garbage in the arena, reclaimed by a compaction (rewrite in key order) once
garbage exceeds both 1 MiB and the live bytes.

Size at 1M blobs with 16-byte keys, beyond the key bytes: about 70 bytes per
blob after a checkpoint load (45 of entry, ~17 of hash slots, ~8 of order),
about 75 after random inserts (arena and chunk slack). ``memory_bytes()``
counts what is used, ``sys.getsizeof()`` what is allocated.

Every method runs with the GIL held and never releases it; it creates Python
objects (which may run the GC, hence arbitrary code) only where the index is
consistent, and re-reads its pointers after each. The store uses the index from
its event loop thread only.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove

from rb_endian cimport rb_le32, rb_le64, rb_put_le32, rb_put_le64

import os as _os

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* the first 8 bytes of a key as a big-endian number, zero-padded: a < b implies key a <= key b,
       and prefix a < prefix b implies key a < key b (byte-wise order, shorter first on ties) */
    static inline uint64_t rb_prefix(const uint8_t *k, size_t n) {
        uint8_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(b, k, n < 8 ? n : 8);
        uint64_t v; memcpy(&v, b, 8);
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint64_t rb_mum(uint64_t a, uint64_t b) {
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    }
    static inline uint64_t rb_r64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
    static inline uint64_t rb_r32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    /* wyhash-style: 16 bytes per 128-bit multiply, the tail read as (overlapping) words */
    static inline uint64_t rb_hash(const uint8_t *p, size_t n, uint64_t seed) {
        const uint64_t s1 = 0xa0761d6478bd642fULL, s2 = 0xe7037ed1a0b428dbULL, s3 = 0x8ebc6af09c88c6e3ULL;
        size_t len = n;
        uint64_t h = seed ^ rb_mum(seed ^ s1, (uint64_t)len ^ s2);
        uint64_t a = 0, b = 0;
        while (n > 16) {
            h = rb_mum(rb_r64(p) ^ s1, rb_r64(p + 8) ^ h);
            p += 16; n -= 16;
        }
        if (n >= 8) { a = rb_r64(p); b = rb_r64(p + n - 8); }
        else if (n >= 4) { a = rb_r32(p); b = rb_r32(p + n - 4); }
        else if (n > 0) { a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1]; }
        return rb_mum(s3 ^ (uint64_t)len, rb_mum(a ^ s2, b ^ h));
    }
    """
    uint64_t rb_prefix(const uint8_t *k, size_t n) nogil
    uint64_t rb_hash(const uint8_t *p, size_t n, uint64_t seed) nogil


__all__ = ["Index", "VALUE_SIZE", "CHUNK"]

cdef enum:
    _VALUE_SIZE = 44  # packed value bytes of an entry: page u64, length u32, BLAKE3 digest (``<QI32s``)
    _CHUNK = 512      # most arena offsets one order chunk holds before it splits in two
    _OFF_BITS = 40    # bits of an arena offset (+ 1) in a hash slot; the top 24 hold the tag

#: packed value bytes of an entry: page u64, length u32, BLAKE3 digest (``<QI32s``)
VALUE_SIZE = _VALUE_SIZE
#: most arena offsets one order chunk holds before it splits in two
CHUNK = _CHUNK

cdef uint64_t OFF_MASK = (<uint64_t>1 << _OFF_BITS) - 1
cdef uint64_t TAG_MASK = ~OFF_MASK
cdef uint64_t TOMB = <uint64_t>0xFFFFFFFFFFFFFFFF
cdef size_t MAX_ARENA = <size_t>((<uint64_t>1 << _OFF_BITS) - 2)  # offset + 1 must stay below the tombstone

cdef uint64_t _SEED = int.from_bytes(_os.urandom(8), "little") | 1


ctypedef struct Chunk:
    uint64_t *off    # arena offsets, ascending key order
    uint64_t maxpfx  # rb_prefix of the largest key (off[n - 1])
    uint32_t n
    uint32_t cap


cdef inline int _cmp_keys(const uint8_t *a, size_t al, const uint8_t *b, size_t bl) noexcept nogil:
    """bytes ordering: memcmp over the common length, then the shorter first."""
    cdef int c = memcmp(a, b, al if al < bl else bl)
    if c:
        return c
    return (al > bl) - (al < bl)


cdef void _free_order(Chunk *chunks, size_t nchunks) noexcept nogil:
    """Free a chunk array and every chunk's offsets."""
    cdef size_t i
    if chunks == NULL:
        return
    for i in range(nchunks):
        PyMem_RawFree(chunks[i].off)
    PyMem_RawFree(chunks)


cdef inline void _slot_put(uint64_t *table, uint64_t mask, uint64_t h, uint64_t off) noexcept nogil:
    """Put arena offset ``off`` with hash ``h`` in the first empty slot of its probe sequence
    (a table being built: no tombstones, never full)."""
    cdef uint64_t i = h & mask
    while table[i]:
        i = (i + 1) & mask
    table[i] = (h & TAG_MASK) | (off + 1)


cdef bint _order_alloc(Chunk *chunks, size_t nch, size_t n, size_t per) noexcept nogil:
    """Give each of ``nch`` chunks room for its share of ``n`` offsets, ``per`` per chunk (the
    last takes the rest); False when an allocation failed (free them with :func:`_free_order`)."""
    cdef size_t ci, m
    for ci in range(nch):
        m = per if (ci + 1) * per <= n else n - ci * per
        chunks[ci].off = <uint64_t *>PyMem_RawMalloc(m * sizeof(uint64_t))
        if chunks[ci].off == NULL:
            return False
        chunks[ci].cap = <uint32_t>m
    return True


@cython.final
@cython.auto_pickle(False)
cdef class Index:
    """Key -> ``(page, length, digest)``, ordered; see the module docstring for the layout.

    Keys are ``bytes`` of 0 to 255 bytes (the store passes 1 to 255); values
    are ``page`` (0 <= page < 2**64, the first data page of the extent),
    ``length`` (0 <= length < 2**32, in bytes) and ``digest`` (exactly 32
    bytes, the BLAKE3 of the value).

    Attributes (read-only):

    * ``key_bytes`` / ``value_bytes``: running totals of the live keys' and
      values' sizes, in bytes.
    * ``CHUNK``: most offsets per order chunk (512).
    """

    cdef uint8_t *arena
    cdef size_t alen, acap
    cdef readonly size_t _garbage
    cdef uint64_t *table
    cdef uint64_t mask
    cdef readonly size_t _used   # live slots + tombstones
    cdef size_t n                # live keys
    cdef Chunk *chunks
    cdef size_t nchunks, chunks_cap
    cdef readonly unsigned long long key_bytes
    cdef readonly unsigned long long value_bytes
    cdef unsigned long long _version  # bumped when the order changes (iterators check it)
    cdef bint _collide  # tests: every key hashes alike

    CHUNK = _CHUNK

    def __cinit__(self, *, bint _collide=False):
        self.table = <uint64_t *>PyMem_RawCalloc(8, sizeof(uint64_t))
        if self.table == NULL:
            raise MemoryError("index: cannot allocate the hash table")
        self.mask = 7
        self._collide = _collide

    def __init__(self, *, bint _collide=False):
        """An empty index. ``_collide`` (tests only) makes every key hash to the same value, so
        every lookup walks one probe chain and compares keys byte by byte."""

    def __dealloc__(self):
        _free_order(self.chunks, self.nchunks)
        PyMem_RawFree(self.table)
        PyMem_RawFree(self.arena)

    # -- C helpers -------------------------------------------------------------------

    cdef inline uint64_t _hash(self, const uint8_t *k, size_t kl) noexcept nogil:
        if self._collide:
            return <uint64_t>0x5A5A5A5A5A5A5A5A
        return rb_hash(k, kl, _SEED)

    cdef inline Py_ssize_t _find(self, const uint8_t *k, size_t kl, uint64_t h, size_t *slot) noexcept nogil:
        """Arena offset of the key, or -1 (then ``slot`` is where to insert it: the first tombstone
        on its probe chain, else the empty slot that ended the chain)."""
        cdef uint64_t *t = self.table
        cdef uint64_t mask = self.mask
        cdef uint64_t tag = h & TAG_MASK
        cdef uint64_t i = h & mask
        cdef uint64_t v, o
        cdef Py_ssize_t first_tomb = -1
        cdef const uint8_t *a = self.arena
        while True:
            v = t[i]
            if v == 0:
                slot[0] = <size_t>first_tomb if first_tomb >= 0 else <size_t>i
                return -1
            if v == TOMB:
                if first_tomb < 0:
                    first_tomb = <Py_ssize_t>i
            elif (v & TAG_MASK) == tag:
                o = (v & OFF_MASK) - 1
                if a[o] == kl and memcmp(a + o + 1, k, kl) == 0:
                    slot[0] = <size_t>i
                    return <Py_ssize_t>o
            i = (i + 1) & mask

    cdef int _rehash(self, size_t cap) except -1:
        """Rebuild the table with ``cap`` slots (a power of two) from the live entries."""
        cdef uint64_t *nt = <uint64_t *>PyMem_RawCalloc(cap, sizeof(uint64_t))
        if nt == NULL:
            raise MemoryError(f"index: cannot allocate a hash table of {cap} slots ({cap * 8} bytes)")
        cdef uint64_t *old = self.table
        cdef size_t oldcap = <size_t>self.mask + 1
        cdef uint64_t mask = cap - 1
        cdef size_t s
        cdef uint64_t v, o
        cdef const uint8_t *a = self.arena
        for s in range(oldcap):
            v = old[s]
            if v == 0 or v == TOMB:
                continue
            o = (v & OFF_MASK) - 1
            _slot_put(nt, mask, self._hash(a + o + 1, a[o]), o)
        PyMem_RawFree(old)
        self.table = nt
        self.mask = mask
        self._used = self.n
        return 0

    cdef int _arena_reserve(self, size_t extra) except -1:
        cdef size_t need = self.alen + extra
        cdef size_t cap
        cdef uint8_t *p
        if need <= self.acap:
            return 0
        if need > MAX_ARENA:
            raise MemoryError(f"index: the arena would pass {MAX_ARENA} bytes (40-bit offsets)")
        cap = self.acap + (self.acap >> 3) + 256  # like bytearray: 1/8 slack
        if cap < need:
            cap = need
        if cap > MAX_ARENA:
            cap = MAX_ARENA
        p = <uint8_t *>PyMem_RawRealloc(self.arena, cap)
        if p == NULL:
            raise MemoryError(f"index: cannot grow the arena to {cap} bytes")
        self.arena = p
        self.acap = cap
        return 0

    cdef inline tuple _value_at(self, size_t vo):
        cdef const uint8_t *p = self.arena + vo
        return (rb_le64(p), rb_le32(p + 8), PyBytes_FromStringAndSize(<const char *>p + 12, 32))

    # -- order helpers -------------------------------------------------------------

    cdef inline int _cmp_at(self, uint64_t off, const uint8_t *k, size_t kl) noexcept nogil:
        """Compare the arena key at ``off`` with ``k``: <0, 0, >0."""
        return _cmp_keys(self.arena + off + 1, self.arena[off], k, kl)

    cdef inline void _refresh_max(self, Chunk *c) noexcept nogil:
        cdef uint64_t o = c.off[c.n - 1]
        c.maxpfx = rb_prefix(self.arena + o + 1, self.arena[o])

    cdef size_t _chunk_bisect(self, const uint8_t *k, size_t kl, bint right) noexcept nogil:
        """First chunk whose largest key is >= k (> k when ``right``); ``nchunks`` when none."""
        cdef size_t lo = 0, hi = self.nchunks, mid
        cdef uint64_t p = rb_prefix(k, kl)
        cdef int c
        cdef Chunk *ch
        while lo < hi:
            mid = (lo + hi) >> 1
            ch = &self.chunks[mid]
            if ch.maxpfx < p:
                c = -1
            elif ch.maxpfx > p:
                c = 1
            else:
                c = self._cmp_at(ch.off[ch.n - 1], k, kl)
            if c < 0 or (right and c == 0):
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef size_t _pos_bisect(self, Chunk *ch, const uint8_t *k, size_t kl, bint right) noexcept nogil:
        """First position in ``ch`` whose key is >= k (> k when ``right``)."""
        cdef size_t lo = 0, hi = ch.n, mid
        cdef int c
        while lo < hi:
            mid = (lo + hi) >> 1
            c = self._cmp_at(ch.off[mid], k, kl)
            if c < 0 or (right and c == 0):
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef bint _chunks_grow(self) noexcept:
        """Grow the chunk array's capacity; False when out of memory (nothing changed)."""
        cdef size_t cap = self.chunks_cap + (self.chunks_cap >> 1) + 4
        cdef Chunk *p = <Chunk *>PyMem_RawRealloc(self.chunks, cap * sizeof(Chunk))
        if p == NULL:
            return False
        self.chunks = p
        self.chunks_cap = cap
        return True

    cdef int _chunks_insert(self, size_t i) except -1:
        """Open an empty chunk record at position ``i`` of the chunk array (``MemoryError`` only
        when the array is full and cannot grow)."""
        if self.nchunks == self.chunks_cap and not self._chunks_grow():
            raise MemoryError("index: cannot grow the order's chunk array")
        memmove(&self.chunks[i + 1], &self.chunks[i], (self.nchunks - i) * sizeof(Chunk))
        self.chunks[i].off = NULL
        self.chunks[i].n = 0
        self.chunks[i].cap = 0
        self.chunks[i].maxpfx = 0
        self.nchunks += 1
        return 0

    cdef int _order_add(self, uint64_t off, const uint8_t *k, size_t kl) except -1:
        """Insert ``off`` (its key ``k`` already written in the arena) into the order.

        Raises ``MemoryError`` only before anything changed; a chunk that cannot be split for
        want of memory stays oversized (correct, just slower) until a later insert splits it.
        """
        cdef size_t i, j, half, rest
        cdef uint32_t cap
        cdef uint64_t *p
        cdef Chunk *ch
        cdef Chunk *right
        if self.nchunks == 0:
            p = <uint64_t *>PyMem_RawMalloc(4 * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError("index: cannot allocate an order chunk")
            try:
                self._chunks_insert(0)
            except MemoryError:
                PyMem_RawFree(p)
                raise
            ch = &self.chunks[0]
            ch.off = p
            ch.cap = 4
            ch.off[0] = off
            ch.n = 1
            self._refresh_max(ch)
            self._version += 1
            return 0
        i = self._chunk_bisect(k, kl, False)
        if i == self.nchunks:
            i -= 1
            j = self.chunks[i].n
        else:
            j = self._pos_bisect(&self.chunks[i], k, kl, False)
        ch = &self.chunks[i]
        if ch.n == ch.cap:
            cap = ch.cap + (ch.cap >> 1) + 4
            if cap > _CHUNK + 1:
                cap = _CHUNK + 1
            if cap <= ch.n:  # an oversized chunk (a split failed): room for one more
                cap = ch.n + 1
            p = <uint64_t *>PyMem_RawRealloc(ch.off, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError("index: cannot grow an order chunk")
            ch.off = p
            ch.cap = cap
        # from here on nothing fails
        self._version += 1
        memmove(&ch.off[j + 1], &ch.off[j], (ch.n - j) * sizeof(uint64_t))
        ch.off[j] = off
        ch.n += 1
        if j == ch.n - 1:
            self._refresh_max(ch)
        if ch.n > _CHUNK:
            half = ch.n // 2
            rest = ch.n - half
            p = <uint64_t *>PyMem_RawMalloc(rest * sizeof(uint64_t))
            if p == NULL:
                return 0
            if self.nchunks == self.chunks_cap and not self._chunks_grow():
                PyMem_RawFree(p)
                return 0
            self._chunks_insert(i + 1)  # cannot fail now; may have moved the array: refetch ch
            ch = &self.chunks[i]
            right = &self.chunks[i + 1]
            memcpy(p, &ch.off[half], rest * sizeof(uint64_t))
            right.off = p
            right.n = <uint32_t>rest
            right.cap = <uint32_t>rest
            right.maxpfx = ch.maxpfx
            ch.n = <uint32_t>half
            p = <uint64_t *>PyMem_RawRealloc(ch.off, half * sizeof(uint64_t))  # shrink to the exact size
            if p != NULL:
                ch.off = p
                ch.cap = <uint32_t>half
            self._refresh_max(ch)
        return 0

    cdef int _order_remove(self, uint64_t off, const uint8_t *k, size_t kl) except -1:
        """Remove ``off`` (key ``k``) from the order; ``SystemError`` if it is not where the
        order says it must be (a broken invariant: nothing is changed then)."""
        cdef size_t i = self._chunk_bisect(k, kl, False)
        cdef size_t j = 0
        cdef Chunk *ch
        cdef uint64_t *p
        cdef uint32_t cap
        if i < self.nchunks:
            j = self._pos_bisect(&self.chunks[i], k, kl, False)
        if i >= self.nchunks or j >= self.chunks[i].n or self.chunks[i].off[j] != off:
            raise SystemError(f"index: the order lost the key at arena offset {off}; this is a bug in "
                              "ringblob._index (restart the daemon: recovery rebuilds the index)")
        ch = &self.chunks[i]
        self._version += 1
        memmove(&ch.off[j], &ch.off[j + 1], (ch.n - j - 1) * sizeof(uint64_t))
        ch.n -= 1
        if ch.n == 0:
            PyMem_RawFree(ch.off)
            memmove(&self.chunks[i], &self.chunks[i + 1], (self.nchunks - i - 1) * sizeof(Chunk))
            self.nchunks -= 1
            return 0
        if j == ch.n:
            self._refresh_max(ch)
        if ch.cap > 16 and ch.n * 4 < ch.cap:  # give back most of a chunk emptied by deletes
            cap = ch.n * 2
            p = <uint64_t *>PyMem_RawRealloc(ch.off, cap * sizeof(uint64_t))
            if p != NULL:
                ch.off = p
                ch.cap = cap
        return 0

    cdef int _compact(self) except -1:
        """Rewrite the arena in key order without garbage; rebuild the order (half-full chunks)
        and the table (at most half full). Everything new is built before anything is freed:
        ``MemoryError`` leaves the index as it was."""
        cdef size_t live = self.alen - self._garbage
        cdef size_t half = _CHUNK // 2
        cdef size_t nch = (self.n + half - 1) // half
        cdef size_t cap = 8
        while self.n * 10 > cap * 5:
            cap *= 2
        cdef uint64_t mask = cap - 1
        cdef uint8_t *na = <uint8_t *>PyMem_RawMalloc(live if live else 1)
        cdef Chunk *nc = <Chunk *>PyMem_RawCalloc(nch if nch else 1, sizeof(Chunk))
        cdef uint64_t *nt = <uint64_t *>PyMem_RawCalloc(cap, sizeof(uint64_t))
        cdef size_t c, j, w = 0, ci = 0, m
        cdef uint64_t o
        cdef size_t sz
        cdef const uint8_t *a = self.arena
        cdef bint ok = na != NULL and nc != NULL and nt != NULL and _order_alloc(nc, nch, self.n, half)
        if not ok:
            _free_order(nc, nch)
            PyMem_RawFree(na)
            PyMem_RawFree(nt)
            raise MemoryError(f"index: cannot allocate the compacted index ({live} bytes of entries, "
                              f"{cap} hash slots)")
        ci = 0
        m = 0
        for c in range(self.nchunks):
            for j in range(self.chunks[c].n):
                o = self.chunks[c].off[j]
                sz = 1 + a[o] + _VALUE_SIZE
                if w + sz > live or ci >= nch:
                    ok = False
                    break
                memcpy(na + w, a + o, sz)
                _slot_put(nt, mask, self._hash(na + w + 1, na[w]), w)
                nc[ci].off[m] = w
                m += 1
                if m == nc[ci].cap:
                    nc[ci].n = <uint32_t>m
                    ci += 1
                    m = 0
                w += sz
            if not ok:
                break
        if not ok or w != live or ci != nch:  # the counts disagree with the order: change nothing
            _free_order(nc, nch)
            PyMem_RawFree(na)
            PyMem_RawFree(nt)
            raise SystemError("index: the order disagrees with the live byte count; this is a bug in "
                              "ringblob._index (restart the daemon: recovery rebuilds the index)")
        _free_order(self.chunks, self.nchunks)
        PyMem_RawFree(self.arena)
        PyMem_RawFree(self.table)
        self.arena = na
        self.alen = self.acap = w
        self._garbage = 0
        self.chunks = nc
        self.nchunks = self.chunks_cap = nch
        for ci in range(nch):
            self._refresh_max(&nc[ci])
        self.table = nt
        self.mask = mask
        self._used = self.n
        self._version += 1
        return 0

    # -- API ------------------------------------------------------------------------

    def __len__(self):
        """Number of keys."""
        return self.n

    def __contains__(self, key):
        """Whether ``key`` (bytes) is mapped. ``TypeError`` for a key that is not bytes."""
        if type(key) is not bytes:
            raise TypeError(f"index keys are bytes, not {type(key).__name__}")
        return self._value_offset(<bytes>key) >= 0

    cdef Py_ssize_t _value_offset(self, bytes key):
        """Arena offset of the ``page|length|digest`` fields of ``key``'s entry; -1 when the key
        is absent (or longer than 255 bytes, so never mapped)."""
        cdef size_t slot
        cdef size_t kl = PyBytes_GET_SIZE(key)
        cdef const uint8_t *kp = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef Py_ssize_t o
        if kl > 255:
            return -1
        o = self._find(kp, kl, self._hash(kp, kl), &slot)
        return -1 if o < 0 else o + 1 + <Py_ssize_t>kl

    def get(self, bytes key not None):
        """``(page, length, digest)`` of ``key`` (ints, bytes of 32), or None when absent.

        ``TypeError`` for a key that is not bytes.
        """
        cdef Py_ssize_t v = self._value_offset(key)
        return None if v < 0 else self._value_at(<size_t>v)

    def value_length(self, bytes key not None):
        """Length in bytes of the value mapped under ``key`` (an int), or None when absent.

        What ``get(key)[1]`` gives, without building the tuple and the digest.
        """
        cdef Py_ssize_t v = self._value_offset(key)
        return None if v < 0 else rb_le32(self.arena + v + 8)

    def set(self, bytes key not None, uint64_t page, uint32_t length, bytes digest not None):
        """Map ``key`` to ``(page, length, digest)``; returns the previous ``(page, length, digest)``
        or None when the key is new.

        ``key``: bytes of at most 255 bytes; ``page`` < 2**64; ``length`` < 2**32 (bytes);
        ``digest``: exactly 32 bytes. Raises ``ValueError`` for a key longer than 255 bytes or a
        digest of another length, ``OverflowError`` for a negative or too large ``page`` /
        ``length``, ``MemoryError`` when the arena, table or order cannot grow; the index is
        unchanged after any error.
        """
        cdef size_t slot
        cdef size_t kl = PyBytes_GET_SIZE(key)
        cdef const uint8_t *kp = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef Py_ssize_t o
        cdef uint64_t h
        cdef size_t off, cap, want
        cdef uint8_t *a
        cdef uint64_t old_page
        cdef uint32_t old_len
        cdef uint8_t old_digest[32]
        if kl > 255:
            raise ValueError(f"index: a key is at most 255 bytes, got {kl}")
        if PyBytes_GET_SIZE(digest) != 32:
            raise ValueError(f"index: a digest is 32 bytes (BLAKE3), got {PyBytes_GET_SIZE(digest)}")
        h = self._hash(kp, kl)
        o = self._find(kp, kl, h, &slot)
        if o >= 0:
            a = self.arena + <size_t>o + 1 + kl
            old_page = rb_le64(a)
            old_len = rb_le32(a + 8)
            memcpy(old_digest, a + 12, 32)
            rb_put_le64(a, page)
            rb_put_le32(a + 8, length)
            memcpy(a + 12, PyBytes_AS_STRING(digest), 32)
            self.value_bytes = self.value_bytes - old_len + length
            # (objects are made only once the index is consistent: making them may run the GC)
            return (old_page, old_len, PyBytes_FromStringAndSize(<const char *>old_digest, 32))
        cap = <size_t>self.mask + 1
        if (self._used + 2) * 10 > cap * 7:  # grow first (the slot moves): a failure changes nothing
            want = cap
            while (self.n + 2) * 10 > want * 5:  # rebuild to at most half full
                want *= 2
            self._rehash(want)
            o = self._find(kp, kl, h, &slot)
        self._arena_reserve(1 + kl + _VALUE_SIZE)
        off = self.alen
        a = self.arena + off
        a[0] = <uint8_t>kl
        memcpy(a + 1, kp, kl)
        rb_put_le64(a + 1 + kl, page)
        rb_put_le32(a + 1 + kl + 8, length)
        memcpy(a + 1 + kl + 12, PyBytes_AS_STRING(digest), 32)
        self._order_add(off, kp, kl)  # the only step that can fail: nothing is visible before it
        self.alen += 1 + kl + _VALUE_SIZE
        if self.table[slot] == 0:
            self._used += 1
        self.table[slot] = (h & TAG_MASK) | (off + 1)
        self.n += 1
        self.key_bytes += kl
        self.value_bytes += length
        return None

    def remove(self, bytes key not None):
        """Unmap ``key``; returns the previous ``(page, length, digest)`` or None when absent.

        May compact the arena (once garbage passes 1 MiB and the live bytes); a compaction that
        cannot allocate is skipped (retried on a later remove), never an error of this call.
        """
        cdef size_t slot
        cdef size_t kl = PyBytes_GET_SIZE(key)
        cdef const uint8_t *kp = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef Py_ssize_t o
        cdef const uint8_t *a
        cdef uint64_t old_page
        cdef uint32_t old_len
        cdef uint8_t old_digest[32]
        if kl > 255:
            return None
        o = self._find(kp, kl, self._hash(kp, kl), &slot)
        if o < 0:
            return None
        a = self.arena + <size_t>o + 1 + kl
        old_page = rb_le64(a)
        old_len = rb_le32(a + 8)
        memcpy(old_digest, a + 12, 32)
        self._order_remove(<uint64_t>o, kp, kl)  # the only step that can fail: first
        self.table[slot] = TOMB
        self.n -= 1
        self.key_bytes -= kl
        self.value_bytes -= old_len
        self._garbage += 1 + kl + _VALUE_SIZE
        if self._garbage > (1 << 20) and self._garbage > self.alen - self._garbage:
            try:
                self._compact()
            except MemoryError:
                pass  # the key is removed all the same; the next remove tries to compact again
        return (old_page, old_len, PyBytes_FromStringAndSize(<const char *>old_digest, 32))

    def keys_after(self, bytes start, bint inclusive, Py_ssize_t limit):
        """Up to ``limit`` keys (a list of bytes) in ascending order ``> start`` (``>= start`` when
        ``inclusive``; from the first key when ``start`` is None). An empty list when ``limit`` <= 0
        or no key follows."""
        cdef list out = []
        cdef size_t i, j
        cdef const uint8_t *sp
        cdef size_t sl
        cdef Py_ssize_t got = 0
        cdef uint64_t o
        if self.nchunks == 0 or limit <= 0:
            return out
        if start is None:
            i = j = 0
        else:
            sp = <const uint8_t *>PyBytes_AS_STRING(start)
            sl = PyBytes_GET_SIZE(start)
            i = self._chunk_bisect(sp, sl, not inclusive)
            if i == self.nchunks:
                return out
            j = self._pos_bisect(&self.chunks[i], sp, sl, not inclusive)
        # no pointer is kept across an allocation (one may run the GC, and so arbitrary code)
        while self._seek(&i, &j):
            o = self.chunks[i].off[j]
            out.append(PyBytes_FromStringAndSize(<const char *>self.arena + o + 1, self.arena[o]))
            got += 1
            if got >= limit:
                break
            j += 1
        return out

    cdef inline bint _seek(self, size_t *c, size_t *j) noexcept:
        """Move the order position (chunk ``c``, slot ``j``) past finished chunks: False at the end
        of the order, else True with ``chunks[c].off[j]`` the next entry."""
        while c[0] < self.nchunks:
            if j[0] < self.chunks[c[0]].n:
                return True
            c[0] += 1
            j[0] = 0
        return False

    def iter_entries(self):
        """An iterator over every entry (``klen | key | value`` bytes, the checkpoint entry) in
        ascending key order. ``RuntimeError`` from ``next()`` when a key was added or removed
        since the iterator was made (value updates in place are seen, not refused)."""
        return _EntryIter(self)

    def entries_size(self):
        """Bytes :meth:`iter_entries` yields in all."""
        return self.n * (1 + _VALUE_SIZE) + self.key_bytes

    def extents(self, Py_ssize_t page_size):
        """Every non-empty extent as ``page << 32 | npages`` (a list of ints, any order), with
        ``npages = ceil(length / page_size)``. ``ValueError`` when ``page_size`` <= 0."""
        if page_size <= 0:
            raise ValueError(f"index: page_size must be positive, got {page_size}")
        cdef list out = []
        cdef size_t c = 0, j = 0
        cdef uint64_t o, page, npages
        cdef uint32_t ln
        cdef const uint8_t *a
        cdef uint64_t ps = <uint64_t>page_size
        # no pointer is kept across an allocation (one may run the GC, and so arbitrary code)
        while c < self.nchunks:
            if j >= self.chunks[c].n:
                c += 1
                j = 0
                continue
            a = self.arena
            o = self.chunks[c].off[j]
            j += 1
            o += 1 + a[o]
            ln = rb_le32(a + o + 8)
            if ln:
                page = rb_le64(a + o)
                npages = (ln + ps - 1) // ps
                if page < (<uint64_t>1 << 32):
                    out.append(page << 32 | npages)
                else:
                    out.append((<object>page) << 32 | npages)
        return out

    def load_entries(self, buf, Py_ssize_t count, Py_ssize_t page_size=0):
        """Replace the content with ``count`` entries (``klen | key | value`` each, ascending key
        order, distinct keys) concatenated in ``buf`` (a contiguous bytes-like object).

        Returns, when ``page_size`` > 0, every non-empty extent as ``page << 32 | npages`` (what
        :meth:`extents` returns, gathered in the same pass), else an empty list. Raises
        ``ValueError`` when the entries do not fill ``buf`` exactly, an entry is cut short, or
        they are out of order; the index is then unchanged.
        """
        cdef const uint8_t[::1] view = buf
        cdef size_t nbytes = view.shape[0]
        cdef const uint8_t *b = &view[0] if nbytes else NULL
        cdef list used = []
        if count < 0:
            raise ValueError(f"index entries: count must be >= 0, got {count}")
        if page_size < 0:
            raise ValueError(f"index: page_size must be >= 0, got {page_size}")
        if <size_t>count > nbytes // (1 + _VALUE_SIZE):
            raise ValueError(f"index entries: {count} entries need at least {count * (1 + _VALUE_SIZE)} bytes, "
                             f"got {nbytes}")
        if nbytes > MAX_ARENA:
            raise MemoryError(f"index: {nbytes} bytes of entries pass the arena's {MAX_ARENA} bytes")
        cdef size_t cap = 8
        while <size_t>count * 10 > cap * 5:
            cap *= 2
        cdef size_t half = _CHUNK // 2
        cdef size_t nch = (<size_t>count + half - 1) // half
        cdef uint64_t *nt = NULL
        cdef Chunk *nc = NULL
        cdef uint8_t *na = NULL
        cdef size_t ci, m, idx, o = 0, ko, kl, prev_o = 0
        cdef uint64_t mask = cap - 1, page, npages, ps = <uint64_t>page_size
        cdef uint32_t ln
        cdef unsigned long long keybytes = 0, valbytes = 0
        cdef bint ok = False
        try:
            nt = <uint64_t *>PyMem_RawCalloc(cap, sizeof(uint64_t))
            nc = <Chunk *>PyMem_RawCalloc(nch if nch else 1, sizeof(Chunk))
            na = <uint8_t *>PyMem_RawMalloc(nbytes if nbytes else 1)
            if nt == NULL or nc == NULL or na == NULL:
                raise MemoryError(f"index: cannot allocate the index for {count} entries ({nbytes} bytes)")
            if not _order_alloc(nc, nch, <size_t>count, half):
                raise MemoryError("index: cannot allocate an order chunk")
            ci = 0
            m = 0
            for idx in range(<size_t>count):
                if o >= nbytes:
                    raise ValueError(f"index entries: entry {idx} of {count} starts at byte {o}, past the "
                                     f"{nbytes} bytes given")
                kl = b[o]
                ko = o + 1 + kl
                if ko + _VALUE_SIZE > nbytes:
                    raise ValueError(f"index entries: entry {idx} of {count} at byte {o} is cut short "
                                     f"({nbytes - o} of {1 + kl + _VALUE_SIZE} bytes)")
                if idx and _cmp_keys(b + o + 1, kl, b + prev_o + 1, b[prev_o]) <= 0:
                    raise ValueError("index entries out of order")
                prev_o = o
                _slot_put(nt, mask, self._hash(b + o + 1, kl), o)
                nc[ci].off[m] = o
                m += 1
                if m == nc[ci].cap:
                    nc[ci].n = <uint32_t>m
                    ci += 1
                    m = 0
                ln = rb_le32(b + ko + 8)
                if ln:
                    valbytes += ln
                    if ps:
                        page = rb_le64(b + ko)
                        npages = (ln + ps - 1) // ps
                        if page < (<uint64_t>1 << 32):
                            used.append(page << 32 | npages)
                        else:
                            used.append((<object>page) << 32 | npages)
                keybytes += kl
                o = ko + _VALUE_SIZE
            if o != nbytes:
                raise ValueError(f"index entries fill {o} of {nbytes} bytes")
            if nbytes:
                memcpy(na, b, nbytes)
            ok = True
        finally:
            if not ok:
                _free_order(nc, nch)
                PyMem_RawFree(nt)
                PyMem_RawFree(na)
        _free_order(self.chunks, self.nchunks)
        PyMem_RawFree(self.table)
        PyMem_RawFree(self.arena)
        self.arena = na
        self.alen = self.acap = nbytes
        self._garbage = 0
        self.table = nt
        self.mask = mask
        self.n = self._used = <size_t>count
        self.chunks = nc
        self.nchunks = self.chunks_cap = nch
        for ci in range(nch):
            self._refresh_max(&nc[ci])
        self._version += 1
        self.key_bytes = keybytes
        self.value_bytes = valbytes
        return used

    def memory_bytes(self):
        """Bytes held by the arena, the hash table and the order (not counting allocation slack)."""
        cdef size_t c, offs = 0
        for c in range(self.nchunks):
            offs += self.chunks[c].n
        return self.alen + (<size_t>self.mask + 1) * 8 + offs * 8 + self.nchunks * sizeof(Chunk)

    def __sizeof__(self):
        """Bytes allocated for the index, slack included (``sys.getsizeof``)."""
        cdef size_t c, offs = 0
        for c in range(self.nchunks):
            offs += self.chunks[c].cap
        return (object.__sizeof__(self) + self.acap + (<size_t>self.mask + 1) * 8 + offs * 8
                + self.chunks_cap * sizeof(Chunk))

    # -- introspection for tests and debugging ---------------------------------------

    @property
    def _arena(self):
        """A copy of the arena's bytes (tests and debugging only: O(arena))."""
        return PyBytes_FromStringAndSize(<const char *>self.arena, self.alen) if self.alen else b""

    @property
    def _capacity(self):
        """Slots in the hash table (a power of two)."""
        return <size_t>self.mask + 1

    @property
    def _nchunks(self):
        """Chunks in the order."""
        return self.nchunks

    def _check(self):
        """Verify every invariant (tests: O(n)); ``AssertionError`` naming the first broken one."""
        cdef size_t c, j, s, live = 0, tombs = 0, total = 0
        cdef uint64_t o, prev = 0, v
        cdef size_t slot
        cdef unsigned long long kb = 0, vb = 0
        cdef const uint8_t *a = self.arena
        for s in range(<size_t>self.mask + 1):
            v = self.table[s]
            if v == TOMB:
                tombs += 1
            elif v:
                live += 1
        assert live == self.n, f"table holds {live} live slots, index says {self.n}"
        assert live + tombs == self._used, f"{live} live + {tombs} tombstones != used {self._used}"
        assert self._used * 10 <= (<size_t>self.mask + 1) * 7, "table over 70 % full"
        for c in range(self.nchunks):
            assert self.chunks[c].n >= 1, f"chunk {c} is empty"
            assert self.chunks[c].n <= self.chunks[c].cap and self.chunks[c].n <= _CHUNK, f"chunk {c} overfull"
            o = self.chunks[c].off[self.chunks[c].n - 1]
            assert self.chunks[c].maxpfx == rb_prefix(a + o + 1, a[o]), f"chunk {c}'s cached max is stale"
            for j in range(self.chunks[c].n):
                o = self.chunks[c].off[j]
                assert o + 1 + a[o] + _VALUE_SIZE <= self.alen, f"offset {o} past the arena"
                if total:
                    assert _cmp_keys(a + prev + 1, a[prev], a + o + 1, a[o]) < 0, f"order broken at chunk {c}"
                prev = o
                total += 1
                kb += a[o]
                vb += rb_le32(a + o + 1 + a[o] + 8)
                assert self._find(a + o + 1, a[o], self._hash(a + o + 1, a[o]), &slot) == <Py_ssize_t>o, \
                    f"key at offset {o} not found through the table"
        assert total == self.n, f"order holds {total} keys, index says {self.n}"
        assert kb == self.key_bytes and vb == self.value_bytes, "key_bytes / value_bytes drifted"
        assert self.alen - self._garbage == self.n * (1 + _VALUE_SIZE) + self.key_bytes, "garbage count drifted"
        return True


@cython.final
@cython.auto_pickle(False)
cdef class _EntryIter:
    """Iterator of :meth:`Index.iter_entries` (keeps the index alive; checks it did not change)."""

    cdef Index ix
    cdef size_t c, j
    cdef unsigned long long version

    def __cinit__(self, Index ix not None):
        self.ix = ix
        self.version = ix._version

    def __iter__(self):
        return self

    def __next__(self):
        cdef Index ix = self.ix
        cdef uint64_t o
        if ix._version != self.version:
            raise RuntimeError("index: a key was added or removed while iter_entries() walked it")
        if not ix._seek(&self.c, &self.j):
            raise StopIteration
        o = ix.chunks[self.c].off[self.j]
        self.j += 1
        return PyBytes_FromStringAndSize(<const char *>ix.arena + o, 1 + ix.arena[o] + _VALUE_SIZE)

    def take(self, Py_ssize_t cap):
        """The next entries, whole and in order, while their sum fits ``cap`` bytes, packed:
        ``(bytes, count)`` — the bytes as many ``next()`` calls would give, joined (one checkpoint
        chunk's body in one call: a Python loop over 330k entries took ~50 ms of the event loop
        per checkpoint). ``(b"", 0)`` when none is left or the next one alone passes ``cap``.
        ``RuntimeError`` as ``next()`` when a key was added or removed since the iterator was made."""
        cdef Index ix = self.ix
        cdef size_t c = self.c, j = self.j
        cdef Py_ssize_t used = 0, count = 0, k = 0, sz
        cdef uint64_t o
        cdef char *dst
        if ix._version != self.version:
            raise RuntimeError("index: a key was added or removed while iter_entries() walked it")
        while ix._seek(&c, &j):
            o = ix.chunks[c].off[j]
            sz = 1 + ix.arena[o] + _VALUE_SIZE
            if used + sz > cap:
                break
            used += sz
            count += 1
            j += 1
        out = PyBytes_FromStringAndSize(NULL, used)
        # (the allocation may have run the GC, hence arbitrary code: pointers are read again)
        if ix._version != self.version:
            raise RuntimeError("index: a key was added or removed while iter_entries() walked it")
        dst = PyBytes_AS_STRING(out)
        used = 0
        while k < count and ix._seek(&self.c, &self.j):
            o = ix.chunks[self.c].off[self.j]
            sz = 1 + ix.arena[o] + _VALUE_SIZE
            memcpy(dst + used, <const char *>ix.arena + o, sz)
            used += sz
            k += 1
            self.j += 1
        return out, count

    @property
    def exhausted(self):
        """No entry is left to take."""
        return not self.ix._seek(&self.c, &self.j)
