# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._format — the journal's record and batch encoders in C (re-exported by :mod:`ringblob.store.format`).

Byte for byte the layout of docs/FORMAT.md (every integer little-endian):

* a record: ``crc u32 | length u16 | type u8 | 0 u8 | seq u64 | body``, the
  CRC32C over everything after the crc field, ``length`` the whole record;
  PUT body ``klen u8 | key | page u64 | length u32 | digest 32s``, DELETE body
  ``klen u8 | key``, CHECKPOINT body ``number u64 | ckpt_seq u64``;
* a batch: a 56-byte header ``"RBJ1" | hdr_crc u32 | store_id u64 |
  first_seq u64 | nrec u32 | payload_len u32 | nblocks u32 | payload_crc u32 |
  durable_seq u64 | prev_crc u32 | 0 u32``, the records, zeros to a whole
  number of journal blocks; ``hdr_crc`` is the CRC32C of the header with that
  field zeroed.

CRC32C (Castagnoli, reflected, initial and final XOR ``0xFFFFFFFF``, the
``crc32c`` package's function) is computed here: with the SSE 4.2 ``crc32``
instruction when the CPU has it, else byte by byte from a table.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

__all__ = ["encode_put", "encode_delete", "encode_checkpoint", "encode_batch", "crc32c",
           "REC_HEADER_SIZE", "BATCH_HEADER_SIZE"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static uint32_t rb_crc_table[256];

    static void rb_crc_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            rb_crc_table[i] = c;
        }
    }

    static uint32_t rb_crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
        crc = ~crc;
        while (n--) crc = rb_crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        return ~crc;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <nmmintrin.h>
    __attribute__((target("sse4.2")))
    static uint32_t rb_crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
        uint64_t c = (uint32_t)~crc;
        while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); p += 8; n -= 8; }
        uint32_t c32 = (uint32_t)c;
        while (n--) c32 = _mm_crc32_u8(c32, *p++);
        return ~c32;
    }
    static int rb_crc_have_hw(void) { return __builtin_cpu_supports("sse4.2"); }
    #else
    static uint32_t rb_crc_hw(uint32_t crc, const uint8_t *p, size_t n) { return rb_crc_sw(crc, p, n); }
    static int rb_crc_have_hw(void) { return 0; }
    #endif

    static int rb_crc_hw_on = 0;
    static inline uint32_t rb_crc32c(uint32_t crc, const uint8_t *p, size_t n) {
        return rb_crc_hw_on ? rb_crc_hw(crc, p, n) : rb_crc_sw(crc, p, n);
    }

    static inline void rb_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
    static inline void rb_le32(uint8_t *p, uint32_t v) {
        for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
    }
    static inline void rb_le64(uint8_t *p, uint64_t v) {
        for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
    }
    """
    void rb_crc_init() noexcept nogil
    int rb_crc_have_hw() noexcept nogil
    int rb_crc_hw_on
    uint32_t rb_crc32c(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    uint32_t rb_crc_sw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    void rb_le16(uint8_t *p, uint16_t v) noexcept nogil
    void rb_le32(uint8_t *p, uint32_t v) noexcept nogil
    void rb_le64(uint8_t *p, uint64_t v) noexcept nogil

rb_crc_init()
rb_crc_hw_on = rb_crc_have_hw()

#: whether CRC32C uses the CPU's crc32 instruction (SSE 4.2)
HARDWARE_CRC = bool(rb_crc_hw_on)

cdef enum:
    _REC_HDR = 16
    _BATCH_HDR = 56
    _PUT_TAIL = 44  # page u64, length u32, digest 32s

REC_HEADER_SIZE = _REC_HDR
BATCH_HEADER_SIZE = _BATCH_HDR
cdef uint8_t REC_PUT = 1, REC_DELETE = 2, REC_CHECKPOINT = 3


def crc32c(data, uint32_t value=0):
    """CRC32C (Castagnoli) of ``data`` (a bytes-like object), continuing from ``value``; an int < 2**32."""
    cdef const uint8_t[::1] mv
    if isinstance(data, bytes):
        return rb_crc32c(value, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    mv = memoryview(data).cast("B")
    if mv.shape[0] == 0:
        return value
    return rb_crc32c(value, &mv[0], mv.shape[0])


def _crc32c_table(data, uint32_t value=0):
    """CRC32C by the table (the fallback when the CPU lacks SSE 4.2), for tests."""
    cdef const uint8_t[::1] mv = memoryview(bytes(data)).cast("B")
    if mv.shape[0] == 0:
        return value
    return rb_crc_sw(value, &mv[0], mv.shape[0])


cdef inline bytes _record(uint8_t rtype, uint64_t seq, bytes key, const uint8_t *tail, size_t tail_len):
    """A record of ``rtype``: header, then ``klen | key`` when ``key`` is not None, then ``tail``."""
    cdef Py_ssize_t klen = 0
    cdef size_t body = tail_len
    if key is not None:
        klen = PyBytes_GET_SIZE(key)
        if klen > 255:
            raise ValueError(f"journal record: a key of {klen} bytes (at most 255)")
        body += 1 + <size_t>klen
    cdef size_t length = _REC_HDR + body
    cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    rb_le16(p + 4, <uint16_t>length)
    p[6] = rtype
    p[7] = 0
    rb_le64(p + 8, seq)
    cdef uint8_t *q = p + _REC_HDR
    if key is not None:
        q[0] = <uint8_t>klen
        memcpy(q + 1, PyBytes_AS_STRING(key), klen)
        q += 1 + klen
    memcpy(q, tail, tail_len)
    rb_le32(p, rb_crc32c(0, p + 4, length - 4))
    return out


def encode_put(uint64_t seq, bytes key not None, uint64_t page, uint32_t length, bytes digest not None):
    """A PUT record: ``key`` now maps to ``length`` bytes at ``page`` with BLAKE3 ``digest``.

    ``key``: 0 to 255 bytes (``ValueError`` beyond); ``digest``: 32 bytes (a
    shorter one is zero padded, a longer one cut, as ``struct``'s ``32s``).
    ``OverflowError`` when ``seq`` or ``page`` is not a u64 or ``length`` not a u32.
    Returns the record's bytes (61 + len(key)).
    """
    cdef uint8_t tail[_PUT_TAIL]
    cdef Py_ssize_t dl = PyBytes_GET_SIZE(digest)
    rb_le64(tail, page)
    rb_le32(tail + 8, length)
    if dl >= 32:
        memcpy(tail + 12, PyBytes_AS_STRING(digest), 32)
    else:
        memcpy(tail + 12, PyBytes_AS_STRING(digest), dl)
        memset(tail + 12 + dl, 0, 32 - dl)
    return _record(REC_PUT, seq, key, tail, _PUT_TAIL)


def encode_delete(uint64_t seq, bytes key not None):
    """A DELETE record for ``key`` (0 to 255 bytes, ``ValueError`` beyond); returns its bytes (17 + len(key))."""
    return _record(REC_DELETE, seq, key, NULL, 0)


def encode_checkpoint(uint64_t seq, uint64_t number, uint64_t ckpt_seq):
    """A CHECKPOINT marker: checkpoint ``number`` holds every record up to ``ckpt_seq`` (32 bytes)."""
    cdef uint8_t tail[16]
    rb_le64(tail, number)
    rb_le64(tail + 8, ckpt_seq)
    return _record(REC_CHECKPOINT, seq, None, tail, 16)


def encode_batch(uint64_t store_id, uint64_t first_seq, list records not None, uint64_t durable_seq,
                 uint32_t prev_crc, Py_ssize_t block):
    """Frame ``records`` (a list of ``bytes``) as one batch padded to whole ``block``-byte journal blocks.

    Returns ``(bytes, hdr_crc)``; ``hdr_crc`` chains into the next batch's
    ``prev_crc``. ``ValueError`` when ``block <= 0``, ``TypeError`` when a
    record is not ``bytes``, ``OverflowError`` when the payload exceeds 4 GiB.
    """
    if block <= 0:
        raise ValueError(f"encode_batch: a journal block of {block} bytes")
    cdef Py_ssize_t payload = 0, total, nblocks, i, nrec = len(records)
    cdef object r
    for r in records:
        if type(r) is not bytes:
            raise TypeError(f"encode_batch: a record of type {type(r).__name__} (want bytes)")
        payload += PyBytes_GET_SIZE(r)
    if payload > 0xFFFFFFFF or nrec > 0xFFFFFFFF:
        raise OverflowError(f"encode_batch: {nrec} records of {payload} bytes do not fit a batch")
    total = _BATCH_HDR + payload
    nblocks = (total + block - 1) // block
    if nblocks > 0xFFFFFFFF:
        raise OverflowError(f"encode_batch: {nblocks} blocks do not fit a batch")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, nblocks * block)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    cdef uint8_t *q = p + _BATCH_HDR
    cdef Py_ssize_t n
    for i in range(nrec):
        r = records[i]
        n = PyBytes_GET_SIZE(r) if type(r) is bytes else -1
        if n < 0 or q + n > p + total:  # the list changed under us (a finalizer run by the allocation)
            raise RuntimeError("encode_batch: the record list changed while it was encoded")
        memcpy(q, PyBytes_AS_STRING(r), n)
        q += n
    memset(q, 0, nblocks * block - total)
    memcpy(p, b"RBJ1", 4)
    rb_le32(p + 4, 0)
    rb_le64(p + 8, store_id)
    rb_le64(p + 16, first_seq)
    rb_le32(p + 24, <uint32_t>nrec)
    rb_le32(p + 28, <uint32_t>payload)
    rb_le32(p + 32, <uint32_t>nblocks)
    rb_le32(p + 36, rb_crc32c(0, p + _BATCH_HDR, payload))
    rb_le64(p + 40, durable_seq)
    rb_le32(p + 48, prev_crc)
    rb_le32(p + 52, 0)
    cdef uint32_t hcrc = rb_crc32c(0, p, _BATCH_HDR)
    rb_le32(p + 4, hcrc)
    return out, hcrc
