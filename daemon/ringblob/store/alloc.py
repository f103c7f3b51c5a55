"""The page allocator: free extents of contiguous pages, neighbours merged; best fit, and a
write cursor for small values so that the values of one group commit lie side by side."""

from __future__ import annotations

from bisect import bisect_left, insort

from ..errors import NoSpace

__all__ = ["Allocator"]


class Allocator:
    """Free space of a page range ``[first, first + count)`` as extents ``(start, npages)``.

    Free extents are kept in three structures: ``start -> npages``,
    ``end -> start`` (so a freed extent merges with both neighbours in O(1))
    and ``npages -> set(starts)`` with a sorted list of the distinct sizes
    (best fit: the smallest free extent that holds the request; ties go to
    whichever start the set yields). Page numbers are absolute (page ``p``
    starts at byte ``p * page_size`` of the data file).
    """

    #: :meth:`allocate_run` starts a new run only in a free extent of at least this many pages
    RUN_MIN = 64

    def __init__(self, first: int, count: int, *, free_all: bool = True):
        self.first = first
        self.count = count
        self._run: int | None = None  # the write cursor: the first page of the free extent being carved
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._by_size: dict[int, set[int]] = {}
        self._sizes: list[int] = []
        self.free_pages = 0
        if free_all and count:
            self._insert(first, count)

    @classmethod
    def from_used(cls, first: int, count: int, used) -> "Allocator":
        """Build from an iterable of used extents ``(start, npages)`` (any order, no overlaps).

        Raises ``ValueError`` when two used extents overlap or one lies outside the range.
        """
        return cls.from_used_packed(first, count, [start << 32 | n for start, n in used if n > 0])

    @classmethod
    def from_used_packed(cls, first: int, count: int, used: list[int]) -> "Allocator":
        """Like :meth:`from_used` with each extent packed as ``start << 32 | npages`` (sorted in place)."""
        used.sort()
        self = cls(first, count, free_all=False)
        pos = first
        end_all = first + count
        mask = (1 << 32) - 1
        for e in used:
            start, n = e >> 32, e & mask
            if start < pos or start + n > end_all:
                raise ValueError(f"allocator: used extent ({start}, {n}) overlaps another or lies outside "
                                 f"pages [{first}, {end_all})")
            if start > pos:
                self._insert(pos, start - pos)
            pos = start + n
        if pos < end_all:
            self._insert(pos, end_all - pos)
        return self

    # -- internal -------------------------------------------------------------

    def _insert(self, start: int, n: int) -> None:
        self._by_start[start] = n
        self._by_end[start + n] = start
        s = self._by_size.get(n)
        if s is None:
            self._by_size[n] = {start}
            insort(self._sizes, n)
        else:
            s.add(start)
        self.free_pages += n

    def _remove(self, start: int, n: int) -> None:
        del self._by_start[start]
        del self._by_end[start + n]
        s = self._by_size[n]
        s.discard(start)
        if not s:
            del self._by_size[n]
            del self._sizes[bisect_left(self._sizes, n)]
        self.free_pages -= n

    # -- API --------------------------------------------------------------------

    def allocate(self, n: int) -> int:
        """Take ``n`` contiguous pages (best fit); returns the first page.

        Raises :class:`~ringblob.errors.NoSpace` (changing nothing) when no free
        extent holds ``n`` pages.
        """
        if n <= 0:
            raise ValueError(f"allocate: {n} pages")
        i = bisect_left(self._sizes, n)
        if i == len(self._sizes):
            raise NoSpace(
                f"no free extent of {n} pages: {self.free_pages} pages free, the largest free extent "
                f"has {self.largest()} pages; delete blobs or create a larger data file"
            )
        size = self._sizes[i]
        start = min(self._by_size[size]) if len(self._by_size[size]) < 8 else next(iter(self._by_size[size]))
        self._remove(start, size)
        if size > n:
            self._insert(start + n, size - n)
        return start

    def allocate_run(self, n: int) -> int:
        """Take ``n`` contiguous pages at the write cursor; returns the first page.

        Consecutive calls get consecutive pages (each carved from the front of the
        free extent the cursor is in), so small values allocated together — the
        items of one group commit — are neighbours in the file and go out as one
        write. When the cursor's extent has fewer than ``n`` pages left, a new run
        starts at the largest free extent if it has at least :attr:`RUN_MIN` (and
        ``n``) pages; otherwise this is :meth:`allocate` (best fit, filling holes).
        Raises :class:`~ringblob.errors.NoSpace` (changing nothing) like :meth:`allocate`.
        """
        if n <= 0:
            raise ValueError(f"allocate_run: {n} pages")
        start = self._run
        size = self._by_start.get(start) if start is not None else None
        if size is None or size < n:
            big = self._sizes[-1] if self._sizes else 0
            if big < n or big < self.RUN_MIN:
                self._run = None
                return self.allocate(n)
            starts = self._by_size[big]
            start = min(starts) if len(starts) < 8 else next(iter(starts))
            size = big
        self._remove(start, size)
        if size > n:
            self._insert(start + n, size - n)
            self._run = start + n
        else:
            self._run = None
        return start

    def free(self, start: int, n: int) -> None:
        """Give back ``n`` pages at ``start``, merging with free neighbours.

        Raises ``ValueError`` on a double free (overlap with a free extent).
        """
        if n <= 0:
            return
        end = start + n
        if start < self.first or end > self.first + self.count:
            raise ValueError(f"free: extent ({start}, {n}) outside the data area")
        if start in self._by_start or end in self._by_end:
            raise ValueError(f"free: extent ({start}, {n}) is already free (double free)")
        prev = self._by_end.get(start)
        if prev is not None:
            pn = self._by_start[prev]
            self._remove(prev, pn)
            start, n = prev, pn + n
        nxt_n = self._by_start.get(end)
        if nxt_n is not None:
            self._remove(end, nxt_n)
            n += nxt_n
        self._insert(start, n)

    def largest(self) -> int:
        """Pages in the largest free extent (0 when full)."""
        return self._sizes[-1] if self._sizes else 0

    @property
    def extents(self) -> int:
        """Number of free extents."""
        return len(self._by_start)

    def fragmentation(self) -> float:
        """``1 - largest free extent / free pages``: 0.0 when the free space is one extent."""
        if not self.free_pages:
            return 0.0
        return 1.0 - self.largest() / self.free_pages

    def free_extents(self):
        """Iterate free extents ``(start, npages)`` in address order (for checks and tests)."""
        for s in sorted(self._by_start):
            yield s, self._by_start[s]
