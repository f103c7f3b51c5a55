#!/usr/bin/env python3
"""A large value received into a LeasedValue alone: µs per MiB for its socket-read-sized pieces.

Not a test; prints, writes nothing. A 1 MiB value goes into four 256 KiB
buffers the way the daemon's reads put it there: each read copies up to
``PIECE`` bytes (never past a buffer's end) into ``target()`` and reports them
with ``advance()`` — the copy stands in for the kernel's socket copy. For
comparison, the same bytes hashed by one BLAKE3 update per piece (what the
receive path did before LeasedValue hashed each buffer whole: unaligned ~100 KB
pieces make BLAKE3 hash smaller subtrees). Best of ``ROUNDS``, 64 MiB touched
between rounds so the value is not left in the CPU cache. The package comes from
``PYTHONPATH`` when it is set (so one copy of this script can time two
checkouts), else from this checkout's ``daemon/``::

    .venv/bin/python bench/leased_micro.py               # PIECE = 100,000 (Unix socket reads)
    .venv/bin/python bench/leased_micro.py 4096
"""

from __future__ import annotations

import os
import sys
import time

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon"))

import blake3  # noqa: E402

from ringblob.store.leased import LeasedValue  # noqa: E402

BSZ = 256 * 1024
LENGTH = 1 << 20
ROUNDS = 30


class _Buf:
    def __init__(self, view):
        self.view = view


def _fill(bufs, src, piece: int) -> int:
    lv = LeasedValue(bufs, LENGTH, BSZ, lambda b: None)
    pos = reads = 0
    while (t := lv.target()) is not None:
        k = min(len(t), piece)
        t[:k] = src[pos : pos + k]
        t.release()
        lv.advance(k)
        pos += k
        reads += 1
    lv.digest()
    return reads


def _per_piece(whole, src, piece: int) -> int:
    h = blake3.blake3()
    pos = reads = 0
    while pos < LENGTH:
        k = min(piece, BSZ - pos % BSZ, LENGTH - pos)
        whole[pos : pos + k] = src[pos : pos + k]
        with whole[pos : pos + k] as p:
            h.update(p)
        pos += k
        reads += 1
    h.digest()
    return reads


def main() -> None:
    piece = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    whole = memoryview(bytearray(LENGTH))
    bufs = [_Buf(whole[i * BSZ : (i + 1) * BSZ]) for i in range(LENGTH // BSZ)]
    src = memoryview(os.urandom(LENGTH))
    evict = bytearray(64 << 20)
    for name, fn in (("LeasedValue (a hash per buffer)", lambda: _fill(bufs, src, piece)),
                     ("copy + a hash per piece", lambda: _per_piece(whole, src, piece))):
        best = float("inf")
        for _ in range(ROUNDS):
            evict[::4096] = bytes(len(range(0, len(evict), 4096)))
            t0 = time.perf_counter()
            reads = fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:32s} {best * 1e6:7.1f} µs per MiB in {reads} reads of <= {piece} bytes")


if __name__ == "__main__":
    main()
