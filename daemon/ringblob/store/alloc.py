"""The page allocator: free extents of contiguous pages, neighbours merged; best fit, and a
write cursor for small values so that the values of one group commit lie side by side.

The implementation is :class:`ringblob._alloc.Allocator` (source: ``cython/_alloc.pyx``,
whose docstring describes the layout: extents of fewer than ``BIN_PAGES`` (64) pages sit in
exact-size bins, found by hash maps keyed by start and by 64-page chunk (page bits as
boundary tags), so free and small allocations are O(1) expected; larger extents sit in two
C treaps, by start and by ``(npages, start)``). This module re-exports it.
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
