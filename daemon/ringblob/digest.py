"""BLAKE3 digests of values, and how many threads hash a large one.

Every value's 32-byte BLAKE3 digest is computed when it is put and checked when
it is read (DESIGN.md: the store never returns bytes that fail it). Small values
are hashed on the caller's thread (the event loop's, in the daemon). A value of
at least :data:`PARALLEL_MIN` bytes may instead be hashed by BLAKE3's
multithreaded mode (the ``blake3`` package's ``max_threads=blake3.blake3.AUTO``: its
shared thread pool, one thread per CPU, with the calling thread taking part;
the digest is the same). That moves most of a large value's hashing off the
event loop's core, which pays where spare cores exist and costs where they do
not (the pool's handoffs on a 2-CPU host: ``bench/results/analysis.md``).

:func:`configure` sets the mode once for the process (the daemon does it from
the ``parallel_hash`` setting); :func:`digest` and :func:`hasher` follow it.
The store's C paths keep hashing small values inline and call here only for
large ones. Nothing here knows of keys, sockets or the disk.
"""

from __future__ import annotations

import os

import blake3

__all__ = ["PARALLEL_MIN", "PARALLEL_MODES", "PARALLEL_AUTO_MIN_CPUS", "configure", "parallel", "digest", "hasher"]

PARALLEL_MIN = 128 * 1024
"""Bytes: values (and, for :func:`hasher`, update pieces) below this are always hashed on one
thread; BLAKE3's multithreaded mode splits its input into 1 KiB chunks and gains little on less."""

PARALLEL_MODES = ("auto", "on", "off")
PARALLEL_AUTO_MIN_CPUS = 4
"""``auto`` turns the multithreaded mode on where the process may run on at least this many CPUs."""

_AUTO = blake3.blake3.AUTO  # max_threads: as many as BLAKE3's shared pool has (one per CPU)
_max_threads = 1  # 1 or _AUTO, for inputs of at least PARALLEL_MIN bytes


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure(mode: str, cpus: int | None = None) -> bool:
    """Set how values of at least :data:`PARALLEL_MIN` bytes are hashed, for the whole process.

    ``mode``: ``"on"`` (BLAKE3's thread pool), ``"off"`` (the calling thread alone) or
    ``"auto"`` (on where ``cpus`` — by default the CPUs this process may run on — is at least
    :data:`PARALLEL_AUTO_MIN_CPUS`). Returns whether the multithreaded mode is now on.
    Raises ``ValueError`` naming the choices for any other mode.
    """
    global _max_threads
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel_hash: {mode!r} is not one of {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        on = (cpus if cpus is not None else _usable_cpus()) >= PARALLEL_AUTO_MIN_CPUS
    else:
        on = mode == "on"
    _max_threads = _AUTO if on else 1
    return on


def parallel() -> bool:
    """Whether large values are hashed by BLAKE3's thread pool (see :func:`configure`)."""
    return _max_threads != 1


def digest(data) -> bytes:
    """The 32-byte BLAKE3 digest of ``data`` (bytes-like), by the thread pool when it is on and
    ``data`` has at least :data:`PARALLEL_MIN` bytes (the same digest either way)."""
    if _max_threads != 1 and len(data) >= PARALLEL_MIN:
        return blake3.blake3(data, max_threads=_max_threads).digest()
    return blake3.blake3(data).digest()


def hasher():
    """A new incremental BLAKE3 hasher for a large value received piece by piece: its
    ``update`` uses the thread pool when it is on (feed it pieces of at least
    :data:`PARALLEL_MIN` bytes: on smaller ones the pool's handoffs cost more than they save)."""
    if _max_threads != 1:
        return blake3.blake3(max_threads=_max_threads)
    return blake3.blake3()
