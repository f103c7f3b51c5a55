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

CRC32C (Castagnoli) comes from the ``crc32c`` package, the same function the
decoders in :mod:`ringblob.store.format` use: one implementation for
writing and reading.
"""

from cpython.buffer cimport PyBUF_READ
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from rb_endian cimport rb_put_le16, rb_put_le32, rb_put_le64

import crc32c as _crc32c_pkg

__all__ = ["encode_put", "encode_delete", "encode_checkpoint", "encode_batch",
           "REC_HEADER_SIZE", "BATCH_HEADER_SIZE"]

# CRC32C from the crc32c package (the same function the decoders and the rest of the store use),
# over a memoryview of the bytes being built: one implementation for writing and reading
cdef object _crc32c = _crc32c_pkg.crc32c


cdef inline uint32_t rb_crc32c(const uint8_t *p, size_t n) except? 0xFFFFFFFF:
    return _crc32c(PyMemoryView_FromMemory(<char *>p, <Py_ssize_t>n, PyBUF_READ))


cdef enum:
    _REC_HDR = 16
    _BATCH_HDR = 56
    _PUT_TAIL = 44  # page u64, length u32, digest 32s

REC_HEADER_SIZE = _REC_HDR
BATCH_HEADER_SIZE = _BATCH_HDR
cdef uint8_t REC_PUT = 1, REC_DELETE = 2, REC_CHECKPOINT = 3


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
    rb_put_le16(p + 4, <uint16_t>length)
    p[6] = rtype
    p[7] = 0
    rb_put_le64(p + 8, seq)
    cdef uint8_t *q = p + _REC_HDR
    if key is not None:
        q[0] = <uint8_t>klen
        memcpy(q + 1, PyBytes_AS_STRING(key), klen)
        q += 1 + klen
    memcpy(q, tail, tail_len)
    rb_put_le32(p, rb_crc32c(p + 4, length - 4))
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
    rb_put_le64(tail, page)
    rb_put_le32(tail + 8, length)
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
    rb_put_le64(tail, number)
    rb_put_le64(tail + 8, ckpt_seq)
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
    rb_put_le32(p + 4, 0)
    rb_put_le64(p + 8, store_id)
    rb_put_le64(p + 16, first_seq)
    rb_put_le32(p + 24, <uint32_t>nrec)
    rb_put_le32(p + 28, <uint32_t>payload)
    rb_put_le32(p + 32, <uint32_t>nblocks)
    rb_put_le32(p + 36, rb_crc32c(p + _BATCH_HDR, payload))
    rb_put_le64(p + 40, durable_seq)
    rb_put_le32(p + 48, prev_crc)
    rb_put_le32(p + 52, 0)
    cdef uint32_t hcrc = rb_crc32c(p, _BATCH_HDR)
    rb_put_le32(p + 4, hcrc)
    return out, hcrc
