# Little-endian loads and stores of the on-disk integers (cython/rb_endian.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "rb_endian.h" nogil:
    uint64_t rb_le64(const uint8_t *p)
    uint32_t rb_le32(const uint8_t *p)
    void rb_put_le64(uint8_t *p, uint64_t v)
    void rb_put_le32(uint8_t *p, uint32_t v)
    void rb_put_le16(uint8_t *p, uint16_t v)
