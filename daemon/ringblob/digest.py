"""BLAKE3 digests of large values, and which thread hashes them (the ``parallel_hash`` setting).

Every value's 32-byte BLAKE3 digest is computed when it is put and checked when
it is read (DESIGN.md: the store never returns bytes that fail it), on the
caller's thread (the event loop's, in the daemon), but for two kinds of large
value, per mode (:data:`PARALLEL_MODES`; the digest is the same in all):

* **a large PUT received from a socket** is hashed buffer by buffer as its
  fixed buffers fill (``ringblob._leased``). With ``"auto"`` (the default,
  where the process may use at least 2 CPUs: its affinity, capped by its
  cgroup's CPU quota) and ``"on"`` that is done by the process's **hash
  worker** (:func:`worker_put`: one thread, jobs in order) while the event
  loop receives the next buffer; the loop waits for the digest only once
  the value's data write completed. Measured (bench/results/analysis.md,
  session 11), alternating runs of ``put_1m_c8``: on 16 CPUs +30 % (1,232 ->
  1,606 MiB/s, medians of 6 a side), on the 2-CPU VM +4 % (2,075 -> 2,169,
  21 a side over three sets), for 5-10 % more CPU per MiB. Confined to one
  CPU the worker only adds thread switches (-27 % there), hence ``"auto"``. BLAKE3's thread pool measured no faster than one thread per
  256 KiB buffer and ~8x the CPU, so it is never used there;
* **a whole value of at least** :data:`PARALLEL_MIN` **bytes** (a GET's
  check, a put of a value in hand, recovery) is hashed by BLAKE3's
  multithreaded mode with ``"on"`` only (the ``blake3`` package's
  ``max_threads=blake3.blake3.AUTO``: its shared thread pool, one thread per
  CPU, the calling thread taking part). Measured on 16 CPUs (session 10):
  1 MiB GETs at 8 concurrent +38 % (1,047 -> 1,450 MiB/s), but ~2.7x the
  daemon's CPU per GET (the pool's threads spin while they wait for work); on
  2 CPUs no gain.

:func:`configure` sets the mode once for the process (the daemon does it from
the setting); :func:`digest` follows it. The store's C paths keep hashing small
values inline and call here only for large ones. Nothing here knows of keys,
sockets or the disk.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from _queue import SimpleQueue

import blake3

log = logging.getLogger(__name__)

__all__ = ["PARALLEL_MIN", "PARALLEL_MODES", "configure", "resolve", "mode", "parallel", "hash_worker",
           "cgroup_cpu_limit", "digest", "worker_put"]

PARALLEL_MIN = 128 * 1024
"""Bytes: values below this are always hashed on one thread (BLAKE3's pool gains nothing on
them: 64 KiB took 50 µs either way on 16 CPUs, and twice as long in the pool on 2)."""

PARALLEL_MODES = ("off", "auto", "on")
"""The ``parallel_hash`` setting's choices (its default is ``"auto"``; this module's, until
:func:`configure` is called, ``"off"``). ``"off"``: every digest on the caller's thread;
``"auto"``: a large received PUT's buffers by the hash worker where the process may use 2
CPUs or more (its CPU affinity, capped by its cgroup's CPU quota); ``"on"``: those by the hash worker always, and whole values
of :data:`PARALLEL_MIN` bytes or more by BLAKE3's thread pool."""

_AUTO = blake3.blake3.AUTO  # max_threads: as many as BLAKE3's shared pool has (one per CPU)
_max_threads = 1  # 1 or _AUTO, for values of at least PARALLEL_MIN bytes
_worker = False  # a large received PUT's buffers hashed by the hash worker (ringblob._leased)
_mode = "off"  # as configured; "off" until configure() is called (the daemon always calls it)


_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cgroup_cpu_limit() -> float | None:
    """CPUs per period the process's cgroup and its ancestors allow (the smallest CPU quota
    divided by its period: cgroup v2's ``cpu.max``, else v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``, as systemd's ``CPUQuota=`` or ``docker --cpus`` set them); None when
    none is set or the files cannot be read."""
    text = _read(_PROC_CGROUP)
    if text is None:
        return None
    v2 = v1 = None
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hier == "0" and ctrls == "":
            v2 = path
        elif "cpu" in ctrls.split(","):
            v1 = (ctrls, path)
    limits = []
    if v2 is not None and _read(os.path.join(_CGROUP_ROOT, "cgroup.controllers")) is not None:
        parts = [p for p in v2.split("/") if p]
        for i in range(len(parts), -1, -1):
            got = _read(os.path.join(_CGROUP_ROOT, *parts[:i], "cpu.max"))
            fields = got.split() if got else []
            if len(fields) == 2 and fields[0] != "max":
                try:
                    limits.append(int(fields[0]) / int(fields[1]))
                except (ValueError, ZeroDivisionError):
                    pass
    elif v1 is not None:
        ctrls, path = v1
        parts = [p for p in path.split("/") if p]
        for mount in (ctrls, "cpu", "cpu,cpuacct"):
            base = os.path.join(_CGROUP_ROOT, mount)
            if not os.path.isdir(base):
                continue
            for i in range(len(parts), -1, -1):
                quota = _read(os.path.join(base, *parts[:i], "cpu.cfs_quota_us"))
                period = _read(os.path.join(base, *parts[:i], "cpu.cfs_period_us"))
                try:
                    q, p = int(quota), int(period)  # (TypeError: a file not there)
                except (TypeError, ValueError):
                    continue
                if q > 0 and p > 0:
                    limits.append(q / p)
            break
    return min(limits) if limits else None


def _usable_cpus() -> int:
    """CPUs this process may use: its CPU affinity (os.cpu_count() where that is unknown),
    capped by its cgroup's CPU quota rounded up (:func:`cgroup_cpu_limit`)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return n


def configure(mode: str) -> bool:
    """Set which thread hashes large values, for the whole process (one of
    :data:`PARALLEL_MODES`; the daemon calls it once, from the ``parallel_hash`` setting): whole
    values of at least :data:`PARALLEL_MIN` bytes by BLAKE3's thread pool (``"on"``) or the
    calling thread, and a large PUT's buffers, in each ``ringblob._leased.LeasedValue`` made from
    then on, by the hash worker of :func:`worker_put` (``"on"``, and ``"auto"`` on 2 CPUs or
    more) or the thread that fills them. Returns whether the pool is now used (see also
    :func:`hash_worker`) and logs what was decided, at INFO. Raises ``ValueError`` naming the
    choices for any other mode, changing nothing.
    """
    global _max_threads, _worker, _mode
    pool, worker, cpus = resolve(mode)
    _max_threads = _AUTO if pool else 1
    _worker = worker
    _mode = mode
    log.info("parallel_hash %s: whole values of %d KiB or more are hashed %s; a large PUT's buffers %s "
             "(%d usable CPU%s)", mode, PARALLEL_MIN // 1024,
             "by BLAKE3's thread pool" if _max_threads != 1 else "on the event loop's thread",
             "by the hash worker thread" if _worker else "on the event loop's thread", cpus,
             "" if cpus == 1 else "s")
    return _max_threads != 1


def parallel() -> bool:
    """Whether whole large values are hashed by BLAKE3's thread pool (see :func:`configure`)."""
    return _max_threads != 1


def resolve(mode: str) -> tuple[bool, bool, int]:
    """What :func:`configure` would set for ``mode`` on this host, changing nothing: ``(pool,
    worker, usable_cpus)`` — BLAKE3's thread pool for whole values, the hash worker for a large
    PUT's buffers, and the CPUs counted for ``"auto"`` (affinity capped by the cgroup's CPU quota).
    Raises ``ValueError`` naming the choices for a mode not in :data:`PARALLEL_MODES`."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel_hash: {mode!r} is not one of {', '.join(PARALLEL_MODES)}")
    cpus = _usable_cpus()
    return mode == "on", mode == "on" or (mode == "auto" and cpus >= 2), cpus


def mode() -> str:
    """The mode :func:`configure` last set (``"off"`` before it was ever called)."""
    return _mode


def hash_worker() -> bool:
    """Whether a large PUT's buffers go to the hash worker (see :func:`configure`)."""
    return _worker


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
