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
buffers fill (``ringblob._leased``), one buffer at a time on one thread: there
the pool measured no faster end to end and ~8x the CPU. With the mode on, that
thread is the process's **hash worker** (:func:`worker_put`: one thread, jobs
in order) instead of the event loop's, so the loop receives the next buffer
while the last one is hashed.

:func:`configure` sets the mode once for the process (the daemon does it from
the setting); :func:`digest` follows it. The store's C paths keep hashing small
values inline and call here only for large ones. Nothing here knows of keys,
sockets or the disk.
"""

from __future__ import annotations

import logging
import threading
from _queue import SimpleQueue

import blake3

log = logging.getLogger(__name__)

__all__ = ["PARALLEL_MIN", "PARALLEL_MODES", "configure", "parallel", "digest", "worker_put"]

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


_jobs: SimpleQueue | None = None  # the hash worker's queue, once started
_jobs_lock = threading.Lock()


def _run_jobs(q: SimpleQueue) -> None:
    get = q.get
    while True:
        fn, arg = get()
        try:
            fn(arg)
        except BaseException:  # a job reports its own failure (see worker_put); the worker goes on
            log.exception("hash worker: a job failed")


def worker_put():
    """The ``put`` of the process's hash worker queue, starting the worker on first use.

    The worker is one daemon thread (``ringblob-hash``) that takes jobs ``(fn, arg)`` in the
    order they were put and calls ``fn(arg)``: a caller that puts a value's pieces in order gets
    them hashed in order, off its own thread (BLAKE3 releases the GIL while it hashes a large
    piece). A job must report its own outcome (set a lock, record an error): an exception it
    raises is logged and the worker goes on. The caller must keep the bytes a job reads
    unchanged until the job ran (``ringblob._leased`` waits for its last job before it gives its
    buffers back).
    """
    global _jobs
    q = _jobs
    if q is None:
        with _jobs_lock:
            if _jobs is None:
                q = SimpleQueue()
                threading.Thread(target=_run_jobs, args=(q,), name="ringblob-hash", daemon=True).start()
                _jobs = q
            q = _jobs
    return q.put
