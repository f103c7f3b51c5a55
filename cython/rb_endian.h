/* Little-endian loads and stores of the on-disk integers (docs/FORMAT.md), shared by the
   store's Cython modules (ringblob._index, ringblob._format) through rb_endian.pxd. */
#ifndef RB_ENDIAN_H
#define RB_ENDIAN_H

#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define RB_BSWAP16(v) __builtin_bswap16(v)
#define RB_BSWAP32(v) __builtin_bswap32(v)
#define RB_BSWAP64(v) __builtin_bswap64(v)
#else
#define RB_BSWAP16(v) (v)
#define RB_BSWAP32(v) (v)
#define RB_BSWAP64(v) (v)
#endif

static inline uint64_t rb_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return RB_BSWAP64(v); }
static inline uint32_t rb_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return RB_BSWAP32(v); }
static inline void rb_put_le64(uint8_t *p, uint64_t v) { v = RB_BSWAP64(v); memcpy(p, &v, 8); }
static inline void rb_put_le32(uint8_t *p, uint32_t v) { v = RB_BSWAP32(v); memcpy(p, &v, 4); }
static inline void rb_put_le16(uint8_t *p, uint16_t v) { v = RB_BSWAP16(v); memcpy(p, &v, 2); }

#endif
