"""The page allocator: free extents of contiguous pages, neighbours merged; best fit, and a
write cursor for small values so that the values of one group commit lie side by side.

The implementation is :class:`ringblob._alloc.Allocator` (source: ``cython/_alloc.pyx``,
whose docstring describes the layout: each free extent is a node of two C treaps, one by
start page, one by ``(npages, start)``; allocate and free are O(log n) descents). This
module re-exports it.
"""

from __future__ import annotations

try:
    from .._alloc import Allocator
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled page allocator (ringblob._alloc) does not import ({exc}); build the extensions "
        "with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = ["Allocator"]
