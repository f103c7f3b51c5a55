#!/usr/bin/env python3
"""The journal encoders alone: µs per encode_put / encode_delete / encode_batch (32 PUT records, 4 KiB blocks).

Not a test; prints, writes nothing. The package comes from ``PYTHONPATH`` when
it is set (so one copy of this script can time two checkouts), else from this
checkout's ``daemon/``.
"""
import os
import sys
import timeit

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon"))

from ringblob.store import format as F  # noqa: E402

d = os.urandom(32); k = b"key-%012d" % 42
recs = [F.encode_put(i, k, 1000 + i, 4096, d) for i in range(32)]
n = 200000
t = min(timeit.repeat(lambda: F.encode_put(7, k, 123456, 4096, d), number=n, repeat=3)) / n * 1e6
t2 = min(timeit.repeat(lambda: F.encode_delete(7, k), number=n, repeat=3)) / n * 1e6
t3 = min(timeit.repeat(lambda: F.encode_batch(1, 5, recs, 4, 77, 4096), number=n // 10, repeat=3)) / (n // 10) * 1e6
print(f"encode_put {t:.3f} µs, encode_delete {t2:.3f} µs, encode_batch(32 puts, 4 KiB) {t3:.3f} µs")
