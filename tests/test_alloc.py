"""The page allocator (ringblob._alloc.Allocator) against a pure-Python model, and its edges.

The model keeps the free extents as a sorted list and implements the documented
semantics directly: best fit = smallest extent that holds ``n`` pages; among
equals the lowest start when they have at least ``BIN_PAGES`` pages, any of them
below that (the allocator's bins are newest-first lists); the write cursor is a
page, valid while a free extent starts there; a new run starts at the largest
extent (chosen as above) when it has at least ``RUN_MIN`` and ``n`` pages, else
allocate_run is allocate and drops the cursor.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ringblob import _alloc
from ringblob.errors import NoSpace
from ringblob.store.alloc import Allocator

BIN = _alloc.BIN_PAGES


class Model:
    """Free extents as a sorted list of ``[start, n]``; O(n) everything.

    Where the documented semantics allow a choice (among free extents of equal size
    below ``BIN_PAGES`` pages, whichever the allocator's bin holds first), the model
    returns every admissible start and is told which one the allocator took.
    """

    def __init__(self, first: int, count: int, free: list[tuple[int, int]], run_min: int):
        self.first, self.count, self.run_min = first, count, run_min
        self.ext = sorted([s, n] for s, n in free)
        self.run = None

    def _take(self, i: int, n: int) -> int:
        s, size = self.ext[i]
        if size > n:
            self.ext[i] = [s + n, size - n]
        else:
            del self.ext[i]
        return s

    def _of_size(self, size: int) -> list[int]:
        """Admissible starts among the extents of ``size`` pages: any small one, else the lowest."""
        starts = [s for s, m in self.ext if m == size]
        return starts if size < BIN else starts[:1]

    def allocate_choices(self, n: int) -> list[int]:
        fits = [size for _, size in self.ext if size >= n]
        if not fits:
            raise NoSpace("model")
        return self._of_size(min(fits))

    def allocate_run_choices(self, n: int) -> tuple[list[int], bool]:
        """Admissible starts, and whether the allocation is a run (sets the cursor)."""
        i = next((i for i, (s, _) in enumerate(self.ext) if s == self.run), None)
        if i is not None and self.ext[i][1] >= n:
            return [self.run], True
        big = max((size for _, size in self.ext), default=0)
        if big < n or big < self.run_min:
            self.run = None
            return self.allocate_choices(n), False
        return self._of_size(big), True

    def take(self, start: int, n: int, run: bool = False) -> None:
        """The allocator took ``n`` pages at ``start`` (the front of a free extent)."""
        i = next(i for i, (s, _) in enumerate(self.ext) if s == start)
        size = self.ext[i][1]
        self._take(i, n)
        if run:
            self.run = start + n if size > n else None

    def free(self, start: int, n: int) -> None:
        end = start + n
        if start < self.first or end > self.first + self.count:
            raise ValueError("outside")
        if any(s < end and start < s + m for s, m in self.ext):
            raise ValueError("double free")
        self.ext.append([start, n])
        self.ext.sort()
        merged: list[list[int]] = []
        for s, m in self.ext:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1][1] += m
            else:
                merged.append([s, m])
        self.ext = merged

    def extents(self) -> list[tuple[int, int]]:
        return [(s, n) for s, n in self.ext]


# large offsets: page numbers beyond 2**32 must work
FIRSTS = st.sampled_from([0, 7, (1 << 33) + 5])


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / allocate_run / free / rebuild (from_used) sequences, compared step by step."""

    @initialize(first=FIRSTS, count=st.integers(1, 400), run_min=st.sampled_from([1, 8, 64, 1 << 40]))
    def start(self, first, count, run_min):
        self.a = Allocator(first, count)
        self.a.RUN_MIN = run_min
        self.m = Model(first, count, [(first, count)], run_min)
        self.used: list[tuple[int, int]] = []

    def _check_alloc(self, fn, n):
        try:
            if fn == "allocate":
                want, run = self.m.allocate_choices(n), False
            else:
                want, run = self.m.allocate_run_choices(n)
        except NoSpace:
            before = list(self.a.free_extents())
            with pytest.raises(NoSpace):
                getattr(self.a, fn)(n)
            assert list(self.a.free_extents()) == before
            return
        got = getattr(self.a, fn)(n)
        assert got in want, (fn, n, got, want)
        self.m.take(got, n, run)
        self.used.append((got, n))

    @rule(n=st.integers(1, 40))
    def allocate(self, n):
        self._check_alloc("allocate", n)

    @rule(n=st.integers(1, 12))
    def allocate_run(self, n):
        self._check_alloc("allocate_run", n)

    @rule(data=st.data())
    def free_used(self, data):
        if not self.used:
            return
        i = data.draw(st.integers(0, len(self.used) - 1))
        start, n = self.used.pop(i)
        # sometimes free only a part (the rest stays used): splits are legal frees too
        k = data.draw(st.integers(0, n - 1))
        if k:
            self.used.append((start, k))
        self.m.free(start + k, n - k)
        self.a.free(start + k, n - k)

    @rule(data=st.data())
    def bad_free(self, data):
        """A free overlapping a free extent, or outside the range: ValueError, nothing changes."""
        first, count = self.a.first, self.a.count
        start = data.draw(st.integers(first - 5, first + count + 5))
        n = data.draw(st.integers(1, 20))
        try:
            self.m.free(start, n)
        except ValueError:
            before = list(self.a.free_extents())
            with pytest.raises(ValueError):
                self.a.free(start, n)
            assert list(self.a.free_extents()) == before
            return
        self.a.free(start, n)
        # the model accepted it (all pages were used): keep the bookkeeping of used pages exact
        self.used = _subtract(self.used, start, n)

    @rule()
    def rebuild(self):
        """from_used (as a store open does) yields the same free extents; the cursor starts unset."""
        run_min = self.m.run_min
        self.a = Allocator.from_used(self.a.first, self.a.count, self.used)
        self.a.RUN_MIN = run_min
        self.m = Model(self.m.first, self.m.count, self.m.extents(), run_min)

    @invariant()
    def same(self):
        assert list(self.a.free_extents()) == self.m.extents()
        total = sum(n for _, n in self.m.ext)
        assert self.a.free_pages == total and self.a.extents == len(self.m.ext)
        assert self.a.largest() == max((n for _, n in self.m.ext), default=0)
        self.a._check()


def _subtract(used, start, n):
    """Used extents minus the pages ``[start, start + n)``."""
    out = []
    end = start + n
    for s, m in used:
        e = s + m
        if e <= start or s >= end:
            out.append((s, m))
            continue
        if s < start:
            out.append((s, start - s))
        if e > end:
            out.append((end, e - end))
    return out


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_allocator_state_machine = AllocatorMachine.TestCase


def test_module_reexports_the_compiled_class():
    assert Allocator is _alloc.Allocator


def test_run_min_is_settable_on_class_and_instance(monkeypatch):
    a = Allocator(0, 100)
    a.allocate(10)
    a.free(0, 5)  # free: [0, 5) and [10, 100)
    monkeypatch.setattr(Allocator, "RUN_MIN", 1000)
    b = Allocator.from_used(0, 100, [(5, 5)])
    assert b.allocate_run(2) == 0  # no extent of RUN_MIN pages: best fit
    b.RUN_MIN = 1
    assert b.allocate_run(2) == 10  # a run in the largest extent


def test_pages_beyond_2_to_the_32_and_range_checks():
    first = 5 << 32
    a = Allocator.from_used_packed(first, 1 << 34, [(first + 10) << 32 | 5, first << 32 | 3])
    assert list(a.free_extents()) == [(first + 3, 7), (first + 15, (1 << 34) - 15)]
    assert a.allocate(7) == first + 3
    with pytest.raises(ValueError, match="outside"):
        a.free(first - 1, 2)
    with pytest.raises(ValueError, match="outside"):
        a.free(first + (1 << 34) - 1, 2)
    with pytest.raises(ValueError, match="double free"):
        a.free(first + 20, 1)  # inside a free extent, neither end shared with it
    with pytest.raises(ValueError, match="overlaps"):
        Allocator.from_used_packed(0, 100, [90 << 32 | 20])
    with pytest.raises(ValueError):
        Allocator(-1, 10)
    a.free(first + 10, 5)
    a.free(first, 3)
    a.free(first + 3, 7)
    assert list(a.free_extents()) == [(first, 1 << 34)] and a.fragmentation() == 0.0
    a._check()


def test_many_extents_stay_balanced_and_consistent():
    a = Allocator(0, 200_000)
    pages = [a.allocate_run(1) for _ in range(200_000)]
    assert pages == list(range(200_000)) and a.free_pages == 0 and a.largest() == 0
    for p in pages[::2]:
        a.free(p, 1)
    assert a.extents == 100_000 and a.largest() == 1
    a._check()
    for p in pages[1::2]:
        a.free(p, 1)
    assert list(a.free_extents()) == [(0, 200_000)]
    a._check()
