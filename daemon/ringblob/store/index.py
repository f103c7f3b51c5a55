"""The in-memory index: key -> (page, length, BLAKE3 digest), plus key order for listing.

:class:`Index` keeps one dict from key to a packed 44-byte value (first page
u64, length u32, digest 32 bytes) and a :class:`SortedKeys` (a list of sorted
chunks of at most ``CHUNK`` keys, so an insert moves at most ``CHUNK`` pointers)
for ``list`` in ascending key order without sorting on every call.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right, insort
from typing import Iterator

__all__ = ["Index", "SortedKeys"]

_VAL = struct.Struct("<QI32s")


class SortedKeys:
    """An ordered set of bytes keys as a list of sorted chunks (a small B-tree of height 2)."""

    CHUNK = 512

    def __init__(self):
        self._chunks: list[list[bytes]] = []
        self._maxes: list[bytes] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def load_sorted(self, keys: list[bytes]) -> None:
        """Replace the content with ``keys`` (already sorted, distinct)."""
        c = self.CHUNK // 2 or 1
        self._chunks = [keys[i : i + c] for i in range(0, len(keys), c)]
        self._maxes = [ch[-1] for ch in self._chunks]
        self._len = len(keys)

    def add(self, key: bytes) -> None:
        """Insert ``key`` (no-op when present)."""
        if not self._chunks:
            self._chunks.append([key])
            self._maxes.append(key)
            self._len = 1
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            i -= 1
            ch = self._chunks[i]
            ch.append(key)
            self._maxes[i] = key
        else:
            ch = self._chunks[i]
            j = bisect_left(ch, key)
            if j < len(ch) and ch[j] == key:
                return
            ch.insert(j, key)
        self._len += 1
        if len(ch) > self.CHUNK:
            half = len(ch) // 2
            self._chunks[i : i + 1] = [ch[:half], ch[half:]]
            self._maxes[i : i + 1] = [ch[half - 1], ch[-1]]

    def discard(self, key: bytes) -> None:
        """Remove ``key`` if present."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return
        ch = self._chunks[i]
        j = bisect_left(ch, key)
        if j == len(ch) or ch[j] != key:
            return
        del ch[j]
        self._len -= 1
        if not ch:
            del self._chunks[i]
            del self._maxes[i]
        else:
            self._maxes[i] = ch[-1]

    def after(self, start: bytes | None, inclusive: bool, limit: int) -> list[bytes]:
        """Up to ``limit`` keys ``> start`` (``>=`` when ``inclusive``; all when ``start`` is None)."""
        out: list[bytes] = []
        if not self._chunks:
            return out
        if start is None:
            i, j = 0, 0
        else:
            i = (bisect_left if inclusive else bisect_right)(self._maxes, start)
            if i == len(self._chunks):
                return out
            j = (bisect_left if inclusive else bisect_right)(self._chunks[i], start)
        while i < len(self._chunks) and len(out) < limit:
            ch = self._chunks[i]
            out.extend(ch[j : j + limit - len(out)])
            i, j = i + 1, 0
        return out

    def __iter__(self) -> Iterator[bytes]:
        for ch in self._chunks:
            yield from ch


class Index:
    """Key -> extent and digest. Values are ``(page, length, digest)`` tuples at the API.

    ``page`` is the first page of the blob's extent (0 for an empty value),
    ``length`` the value's size in bytes, ``digest`` its 32-byte BLAKE3.
    ``key_bytes`` and ``value_bytes`` are running totals.
    """

    def __init__(self):
        self._map: dict[bytes, bytes] = {}
        self._order = SortedKeys()
        self.key_bytes = 0
        self.value_bytes = 0

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: bytes) -> bool:
        return key in self._map

    def get(self, key: bytes) -> tuple[int, int, bytes] | None:
        v = self._map.get(key)
        return None if v is None else _VAL.unpack(v)

    def set(self, key: bytes, page: int, length: int, digest: bytes) -> tuple[int, int, bytes] | None:
        """Map ``key``; returns the previous ``(page, length, digest)`` or None."""
        old = self._map.get(key)
        self._map[key] = _VAL.pack(page, length, digest)
        if old is None:
            self._order.add(key)
            self.key_bytes += len(key)
            self.value_bytes += length
            return None
        o = _VAL.unpack(old)
        self.value_bytes += length - o[1]
        return o

    def remove(self, key: bytes) -> tuple[int, int, bytes] | None:
        """Unmap ``key``; returns the previous ``(page, length, digest)`` or None."""
        old = self._map.pop(key, None)
        if old is None:
            return None
        self._order.discard(key)
        o = _VAL.unpack(old)
        self.key_bytes -= len(key)
        self.value_bytes -= o[1]
        return o

    def keys_after(self, start: bytes | None, inclusive: bool, limit: int) -> list[bytes]:
        """Up to ``limit`` keys in ascending order after ``start`` (see :meth:`SortedKeys.after`)."""
        return self._order.after(start, inclusive, limit)

    def items_sorted(self) -> Iterator[tuple[bytes, bytes]]:
        """``(key, packed value)`` in ascending key order; the packed value is ``<QI32s``."""
        m = self._map
        for k in self._order:
            yield k, m[k]

    def raw_values(self) -> Iterator[bytes]:
        """Every packed value (``<QI32s``), any order."""
        return iter(self._map.values())

    def load_sorted(self, items: list[tuple[bytes, bytes]]) -> None:
        """Replace the content with ``(key, packed value)`` pairs sorted by key (recovery)."""
        self._map = dict(items)
        self._order.load_sorted([k for k, _ in items])
        self.key_bytes = sum(len(k) for k, _ in items)
        self.value_bytes = sum(_VAL.unpack_from(v, 0)[1] for _, v in items)


def unpack_value(v: bytes) -> tuple[int, int, bytes]:
    """``(page, length, digest)`` from a packed index value."""
    return _VAL.unpack(v)


def pack_value(page: int, length: int, digest: bytes) -> bytes:
    """The packed ``<QI32s`` index value."""
    return _VAL.pack(page, length, digest)
