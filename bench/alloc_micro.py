#!/usr/bin/env python3
"""The page allocator alone: µs per allocate_run+free pair and per allocate+free pair.

Not a test; prints, writes nothing. The store's pattern: values of 1 page taken
at the write cursor, each freed again ``LIVE`` allocations later (an overwrite
or a delete), with ``HOLES`` one-page holes scattered over the data area first
(a fragmented store: many free extents); then random overwrites of one-page
values in a full data area with ``HOLES`` one-page holes (each free leaves a
hole, each allocation fills one: the store under put_4k_sync_c32 once the tail
is used up). Figures include the Python call, as the
store pays it. The package comes from ``PYTHONPATH`` when it is set (so one copy
of this script can time two checkouts), else from this checkout's ``daemon/``::

    .venv/bin/python bench/alloc_micro.py            # HOLES = 100,000
    .venv/bin/python bench/alloc_micro.py 1000       # few free extents
    PYTHONPATH=/other/checkout/daemon .venv/bin/python bench/alloc_micro.py
"""

from __future__ import annotations

import collections
import gc
import os
import random
import sys
import time

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon"))

from ringblob.store.alloc import Allocator  # noqa: E402

LIVE = 10_000
OPS = 200_000


def fragmented(holes: int) -> Allocator:
    """An allocator of ``4 * holes + 1M`` pages with ``holes`` one-page holes in its first part."""
    a = Allocator(0, 4 * holes + (1 << 20))
    used = [a.allocate(4) for _ in range(holes)]
    for p in random.Random(1).sample(used, holes):
        a.free(p, 1)
    return a


def main() -> None:
    holes = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    a = fragmented(holes)
    live = collections.deque(a.allocate_run(1) for _ in range(LIVE))
    run, free = a.allocate_run, a.free
    gc.collect()
    t = time.perf_counter()
    for _ in range(OPS):
        live.append(run(1))
        free(live.popleft(), 1)
    dt = time.perf_counter() - t
    print(f"allocate_run(1)+free: {dt / OPS * 1e6:.3f} µs per pair ({a.extents} free extents)")

    b = fragmented(holes)
    rnd = random.Random(2)
    sizes = [rnd.choice((1, 2, 3, 8, 40)) for _ in range(OPS)]
    live = collections.deque((b.allocate(n), n) for n in sizes[:LIVE])
    alloc, free = b.allocate, b.free
    gc.collect()
    t = time.perf_counter()
    for n in sizes:
        live.append((alloc(n), n))
        free(*live.popleft())
    dt = time.perf_counter() - t
    print(f"allocate(n)+free:     {dt / OPS * 1e6:.3f} µs per pair ({b.extents} free extents)")

    # random overwrites of one-page values in a full, fragmented data area (put_4k_sync_c32 once
    # the tail is used up): every free leaves a one-page hole, every allocation fills one
    keys = 262_144
    c = Allocator(0, keys + holes)
    where = [c.allocate_run(1) for _ in range(keys + holes)]
    for i in random.Random(3).sample(range(keys + holes), holes):
        c.free(where[i], 1)
        where[i] = -1
    where = [p for p in where if p >= 0]
    picks = [rnd.randrange(keys) for _ in range(OPS)]
    run, free = c.allocate_run, c.free
    gc.collect()
    t = time.perf_counter()
    for i in picks:
        new = run(1)
        free(where[i], 1)
        where[i] = new
    dt = time.perf_counter() - t
    print(f"overwrite 1 page:     {dt / OPS * 1e6:.3f} µs per pair ({c.extents} free extents, {keys} live)")

    used = [p << 32 | 3 for p in range(0, 4 * holes * 4, 4)]
    gc.collect()
    t = time.perf_counter()
    Allocator.from_used_packed(0, 4 * holes * 4 + 1000, used)
    print(f"from_used_packed({len(used)} used extents): {(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
