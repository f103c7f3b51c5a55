"""BLAKE3 digests of whole values, and whether a large one is hashed by BLAKE3's thread pool.

Every value's 32-byte BLAKE3 digest is computed when it is put and checked when
it is read (DESIGN.md: the store never returns bytes that fail it). By default
every digest is computed on the caller's thread (the event loop's, in the
daemon). With the ``parallel_hash`` setting on, a whole value of at least
:data:`PARALLEL_MIN` bytes is hashed by BLAKE3's multithreaded mode instead
(the ``blake3`` package's ``max_threads=blake3.blake3.AUTO``: its shared thread
pool, one thread per CPU, the calling thread taking part; the digest is the
same). Measured on 16 CPUs (bench/results/analysis.md, session 10): 1 MiB GETs
at 8 concurrent +38 % (1,047 -> 1,450 MiB/s), but ~2.7x the daemon's CPU per
GET (the pool's threads spin while they wait for work); on 2 CPUs no gain.

A large PUT received from a socket is hashed piece by piece as its fixed
buffers fill (``ringblob._leased``), always on one thread: there the pool
measured no faster end to end and ~8x the CPU.

:func:`configure` sets the mode once for the process (the daemon does it from
the setting); :func:`digest` follows it. The store's C paths keep hashing small
values inline and call here only for large ones. Nothing here knows of keys,
sockets or the disk.
"""

from __future__ import annotations

import logging

import blake3

log = logging.getLogger(__name__)

__all__ = ["PARALLEL_MIN", "PARALLEL_MODES", "configure", "parallel", "digest"]

PARALLEL_MIN = 128 * 1024
"""Bytes: values below this are always hashed on one thread (BLAKE3's pool gains nothing on
them: 64 KiB took 50 µs either way on 16 CPUs, and twice as long in the pool on 2)."""

PARALLEL_MODES = ("off", "on")

_AUTO = blake3.blake3.AUTO  # max_threads: as many as BLAKE3's shared pool has (one per CPU)
_max_threads = 1  # 1 or _AUTO, for values of at least PARALLEL_MIN bytes


def configure(mode: str) -> bool:
    """Set how whole values of at least :data:`PARALLEL_MIN` bytes are hashed, for the whole
    process: ``"on"`` (BLAKE3's thread pool) or ``"off"`` (the calling thread alone). Returns
    whether the pool is now used (and logs which, at INFO). Raises ``ValueError`` naming the
    choices for any other mode.
    """
    global _max_threads
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel_hash: {mode!r} is not one of {', '.join(PARALLEL_MODES)}")
    _max_threads = _AUTO if mode == "on" else 1
    log.info("parallel_hash %s: whole values of %d KiB or more are hashed %s", mode, PARALLEL_MIN // 1024,
             "by BLAKE3's thread pool" if _max_threads != 1 else "on the event loop's thread")
    return _max_threads != 1


def parallel() -> bool:
    """Whether whole large values are hashed by BLAKE3's thread pool (see :func:`configure`)."""
    return _max_threads != 1


def digest(data) -> bytes:
    """The 32-byte BLAKE3 digest of ``data`` (bytes-like), by the thread pool when it is on and
    ``data`` has at least :data:`PARALLEL_MIN` bytes (the same digest either way)."""
    if _max_threads != 1 and len(data) >= PARALLEL_MIN:
        return blake3.blake3(data, max_threads=_max_threads).digest()
    return blake3.blake3(data).digest()
