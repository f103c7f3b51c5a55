"""The in-memory index: key -> (first page, length, BLAKE3 digest), in key order for listing.

The implementation is the Cython class :class:`ringblob._index.Index` (source:
``cython/_index.pyx``, whose docstring describes the layout: an arena of
``klen | key | page u64 | length u32 | digest 32s`` entries — the checkpoint
entry bytes —, a hash table of 64-bit tagged slots, and sorted chunks of arena
offsets for ``keys_after``). This module re-exports it, with the helpers that
pack and unpack an entry's value.

Compact by design: at most 100 bytes of RAM per blob beyond the key bytes at
1M blobs, no Python object per blob.
"""

from __future__ import annotations

import struct

try:
    from .._index import CHUNK, Index
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled index (ringblob._index) does not import ({exc}); build the extensions "
        "with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = ["Index", "pack_value", "unpack_value", "VALUE_SIZE", "CHUNK"]

_VAL = struct.Struct("<QI32s")
VALUE_SIZE = _VAL.size  # 44


def pack_value(page: int, length: int, digest: bytes) -> bytes:
    """The packed ``<QI32s`` value of an entry (44 bytes): page u64, length u32 (bytes), digest."""
    return _VAL.pack(page, length, digest)


def unpack_value(v) -> tuple[int, int, bytes]:
    """``(page, length, digest)`` from a packed 44-byte value (``struct.error`` for another size)."""
    return _VAL.unpack(v)
