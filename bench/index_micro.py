#!/usr/bin/env python3
"""The key index alone: µs per call of get / set / contains / remove at N keys, and bulk times.

Not a test; prints, writes nothing. Keys are 16 random bytes; lookups go in a
shuffled order (so at 1M keys most touch memory outside the CPU caches, as a
daemon's do). Each figure includes the Python call, as the store pays it.
The package comes from ``PYTHONPATH`` when it is set (so one copy of this
script can time two checkouts), else from this checkout's ``daemon/``::

    .venv/bin/python bench/index_micro.py                              # N = 1,000,000
    .venv/bin/python bench/index_micro.py 20000                        # cache-resident
    PYTHONPATH=/other/checkout/daemon .venv/bin/python bench/index_micro.py
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon"))

from ringblob.store.index import Index  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rnd = random.Random(1)
    keys = [rnd.randbytes(16) for _ in range(n)]
    missing = [rnd.randbytes(16) for _ in range(n)]
    order = keys[:]
    rnd.shuffle(order)
    d = b"d" * 32
    ix = Index()

    def timed(label, fn):
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        gc.enable()
        print(f"{label:24s} {dt / n * 1e6:7.3f} µs/op")

    def insert():
        s = ix.set
        for i, k in enumerate(keys):
            s(k, i, 4096, d)

    def update():
        s = ix.set
        for i, k in enumerate(order):
            s(k, i + 1, 4096, d)

    def get_hit():
        g = ix.get
        for k in order:
            g(k)

    def get_miss():
        g = ix.get
        for k in missing:
            g(k)

    def contains():
        for k in order:
            k in ix  # noqa: B015

    def remove():
        r = ix.remove
        for k in order:
            r(k)

    print(f"{sys.modules['ringblob.store.index'].Index!r}, N = {n:,}")
    timed("set (new key)", insert)
    timed("set (existing key)", update)
    timed("get (hit)", get_hit)
    timed("get (miss)", get_miss)
    timed("contains (hit)", contains)
    print(f"{'memory_bytes / key':24s} {ix.memory_bytes() / n - 16:7.1f} B beyond the key")
    blob = b"".join(ix.iter_entries())
    t0 = time.perf_counter()
    fresh = Index()
    fresh.load_entries(blob, n, 4096)
    print(f"{'load_entries':24s} {time.perf_counter() - t0:7.3f} s")
    t0 = time.perf_counter()
    for _ in fresh.iter_entries():
        pass
    print(f"{'iter_entries':24s} {time.perf_counter() - t0:7.3f} s")
    t0 = time.perf_counter()
    fresh.keys_after(None, False, 1 << 30)
    print(f"{'keys_after (all)':24s} {time.perf_counter() - t0:7.3f} s")
    timed("remove", remove)


if __name__ == "__main__":
    main()
