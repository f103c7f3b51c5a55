"""The engine layer: mechanism, not policy.

An *engine* moves bytes between registered (fixed) buffers and registered
files. It knows nothing of keys, journals or sockets. Two engines offer the
same interface:

* ``uring`` — :class:`ringblob._uring.Ring`, the Cython engine over liburing:
  one io_uring ring, buffers registered with ``io_uring_register_buffers``,
  files with ``io_uring_register_files``, an eventfd registered with
  ``io_uring_register_eventfd``.
* ``psync`` — :class:`ringblob.engine.psync.PsyncEngine`: a thread pool over
  ``os.preadv`` / ``os.pwritev`` / ``os.fdatasync`` for hosts where io_uring is
  refused (seccomp, ``kernel.io_uring_disabled``, gVisor).

:func:`open_engine` picks one (``uring``, ``psync`` or ``auto``) and never
falls back silently: ``auto`` logs one WARNING line with the reason.

The contract (both engines)
---------------------------

Construction::

    Engine(fds, *, block_size=4096, buffer_size=262144, buffer_count=64,
           queue_depth=128)

``fds`` is a sequence of open file descriptors (normally one, opened with
O_DIRECT by :func:`ringblob.direct.open_direct`); ops address them by
``file_index``. The engine does not close them. ``block_size`` is the
alignment unit (the logical block size) every offset, length and
``buf_offset`` must be a multiple of. ``buffer_size`` (bytes, a multiple of
the page size) times ``buffer_count`` is the registered pool.

Attributes: ``name`` (``"uring"``/``"psync"``), ``block_size``,
``buffer_size``, ``buffer_count``, ``queue_depth``, ``eventfd`` (an fd that
becomes readable when completions are ready; for an asyncio loop's
``add_reader``), ``in_flight`` (operations submitted and not yet reaped),
``pending`` (queued, not yet submitted), ``free_buffers``, ``closed``.

Buffers::

    buf = engine.lease()      # -> Buffer; NoBuffers when all are leased
    buf.view                  # writable memoryview of buffer_size bytes (no copy)
    buf.tobytes(n)            # its first n bytes as new bytes (one copy)
    buf.index, buf.size, buf.in_flight
    engine.release(buf)       # BufferBusy while an op on it is in flight

Queueing (no syscall each; each op carries a caller ``tag``, any object)::

    engine.read_fixed(buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False)
    engine.write_fixed(buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False, dsync=False)
    engine.fdatasync(tag, *, file_index=0, link=False)

``dsync=True`` makes a write durable by itself (RWF_DSYNC, per-write
O_DSYNC): its completion comes only once its data, and the metadata needed to
read it back, are on stable storage — a FUA write where the device takes
them, else a cache flush the kernel issues after the write — so no fdatasync
is needed for it. ``link=True`` links the op to the *next* one queued
(IOSQE_IO_LINK): the next starts only after this one completed successfully. A batch of writes each
with ``link=True`` followed by ``fdatasync(..., link=False)`` is one chain:
the fdatasync runs after the writes, and all go in one submission.
More than ``queue_depth`` ops queued plus in flight raises
:class:`~ringblob.errors.Busy` (reap first). Misaligned
offset/length/buf_offset, a length past the buffer, or a foreign buffer raise :class:`~ringblob.errors.Misaligned` / ``ValueError`` before
anything is queued.

Submitting and reaping::

    engine.submit() -> int            # one io_uring_enter for the whole batch; SQEs submitted
    engine.reap(max_cqes=256) -> list[tuple[tag, result]]   # non-blocking; drains the eventfd
    engine.wait(min_complete=1, timeout=None) -> list[tuple[tag, result]]
                                      # blocks with the GIL released; timeout in seconds
    engine.counters() -> dict[str, int]
        # enters (submit syscalls), sqes, cqes, fdatasyncs, retries (EAGAIN/EINTR),
        # short_continuations, link_resubmits
    engine.close()                    # waits for (or cancels) ops in flight, then frees

``result`` is an ``int`` >= 0 (bytes transferred, the whole requested length
unless the read reached end of file; 0 for fdatasync) or an ``OSError``
instance with ``errno`` set and a message naming the operation, e.g.
``write_fixed: EIO (Input/output error) at offset 8192``. Results are
delivered once per queued op, under its tag. Inside the engine: -EAGAIN and
-EINTR are retried, short reads/writes continue for the remainder, a linked
fdatasync cancelled (-ECANCELED) only because a linked write was short is
resubmitted once the write completed, and one cancelled because a linked write
failed is delivered as ``OSError(ECANCELED)``. A full completion queue is
reaped and the submit retried. Use after ``close()`` raises
:class:`~ringblob.errors.EngineClosed`; close never frees memory the kernel may
still write.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Sequence

from ..errors import EngineUnavailable

__all__ = ["open_engine", "ENGINE_KINDS", "DEFAULT_BUFFER_SIZE", "DEFAULT_BUFFER_COUNT"]

log = logging.getLogger("ringblob.engine")

ENGINE_KINDS = ("auto", "uring", "psync")
DEFAULT_BUFFER_SIZE = 256 * 1024
DEFAULT_BUFFER_COUNT = 64
DEFAULT_QUEUE_DEPTH = 128

# errnos with which the kernel refuses io_uring, and what each usually means
_REFUSALS = {
    errno.EPERM: "io_uring_setup was refused with EPERM (a seccomp profile such as Docker's "
    "default, or kernel.io_uring_disabled=2 / a group restriction)",
    errno.ENOSYS: "io_uring_setup is not implemented (ENOSYS: an old kernel, gVisor, or "
    "CONFIG_IO_URING=n)",
    errno.ENOMEM: "io_uring_setup failed with ENOMEM (RLIMIT_MEMLOCK too small for the ring "
    "and registered buffers on this kernel; raise LimitMEMLOCK)",
    errno.EACCES: "io_uring is disabled for this user (EACCES; kernel.io_uring_disabled)",
}


def describe_refusal(err: OSError) -> str:
    """Explain an ``OSError`` from ring setup in one line (for logs and doctor)."""
    base = _REFUSALS.get(err.errno or 0)
    if base:
        return f"{base}: {err}"
    return f"io_uring setup failed: {err}"


def open_engine(kind: str, fds: Sequence[int], **kwargs: Any):
    """Create an engine of ``kind`` (``"uring"``, ``"psync"`` or ``"auto"``) over ``fds``.

    ``kwargs`` are the engine constructor's (``block_size``, ``buffer_size``,
    ``buffer_count``, ``queue_depth``). ``auto`` takes io_uring when the kernel
    allows it and otherwise logs one WARNING line with the reason and returns
    the psync engine.

    Raises :class:`~ringblob.errors.EngineUnavailable` when ``uring`` was asked
    for explicitly and cannot run (the message says why), and
    :class:`~ringblob.errors.ConfigError` for an unknown kind.
    """
    from ..errors import ConfigError

    if kind not in ENGINE_KINDS:
        raise ConfigError(f"engine: unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    if kind == "psync":
        from .psync import PsyncEngine

        return PsyncEngine(fds, **kwargs)
    try:
        from .._uring import Ring
    except ImportError as exc:  # the extension did not build or liburing.so.2 is missing
        reason = f"the io_uring extension ringblob._uring cannot be imported ({exc}); rebuild with `make setup`"
        if kind == "uring":
            raise EngineUnavailable(f"engine uring: {reason}") from exc
        log.warning("engine: using psync, not io_uring: %s", reason)
        from .psync import PsyncEngine

        return PsyncEngine(fds, **kwargs)
    try:
        return Ring(fds, **kwargs)
    except OSError as exc:
        if kind == "uring" or exc.errno not in _REFUSALS:
            if kind == "uring":
                raise EngineUnavailable(f"engine uring: {describe_refusal(exc)}") from exc
            raise
        log.warning("engine: using psync, not io_uring: %s", describe_refusal(exc))
        from .psync import PsyncEngine

        return PsyncEngine(fds, **kwargs)
