"""The one exception hierarchy of ringblob.

Every error ringblob raises on purpose derives from :class:`RingblobError`.
Each class carries a stable numeric ``code`` that the wire protocol uses as the
reply status (see docs/PROTOCOL.md), so a client re-raises the same class the
store raised. Messages name what failed and, where it helps, how to fix it.

Some classes also derive from a built-in so that ordinary Python code keeps
working: :class:`NotFound` is a ``KeyError``, :class:`InvalidKey`,
:class:`Misaligned` and :class:`EngineClosed` are ``ValueError``s.

Operating-system failures from the engine (a negative CQE result, a failed
``preadv``) are raised as plain ``OSError`` with the errno set and a message
naming the operation, e.g. ``write_fixed: EIO``; :class:`IOFailed` wraps such
an error where it must cross the protocol.
"""

from __future__ import annotations

__all__ = [
    "RingblobError",
    "NotFound",
    "DigestMismatch",
    "NoSpace",
    "TooLarge",
    "InvalidKey",
    "Corrupt",
    "ReadOnly",
    "StoreLocked",
    "IOFailed",
    "Misaligned",
    "EngineClosed",
    "EngineUnavailable",
    "BufferBusy",
    "NoBuffers",
    "ConfigError",
    "ProtocolError",
    "FrameTooLarge",
    "Busy",
    "AccessDenied",
    "ConnectionLost",
    "ServerShuttingDown",
    "error_for_code",
]


class RingblobError(Exception):
    """Root of every error ringblob raises on purpose.

    ``code`` is the wire status of the class (0 is success and never used
    here); subclasses override it. Codes are stable across releases.
    """

    code: int = 1

    def __str__(self) -> str:  # keep KeyError subclasses from quoting the text
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()


# -- store -------------------------------------------------------------------


class NotFound(RingblobError, KeyError):
    """No blob is stored under the key (also a ``KeyError``)."""

    code = 2


class DigestMismatch(RingblobError):
    """A content-addressed put whose BLAKE3 digest is not its key; nothing was stored."""

    code = 3


class NoSpace(RingblobError):
    """The data file has no free extent large enough; the store is unchanged and usable."""

    code = 4


class TooLarge(RingblobError):
    """A value larger than ``max_blob_size`` (or a frame over the protocol limit)."""

    code = 5


class InvalidKey(RingblobError, ValueError):
    """A key that is not bytes of 1 to 255 bytes (also a ``ValueError``)."""

    code = 6


class Corrupt(RingblobError):
    """Stored bytes fail their BLAKE3 digest or a structure fails its CRC32C.

    The bytes are never returned. ``keys`` lists the damaged keys where known.
    """

    code = 7

    def __init__(self, message: str, keys: list[bytes] | None = None):
        super().__init__(message)
        self.keys = list(keys or [])


class ReadOnly(RingblobError):
    """The store turned read-only after a failed write or fdatasync (EIO).

    Reads go on; restart the daemon (reopen the store) to recover from the medium.
    """

    code = 8


class StoreLocked(RingblobError):
    """Another process holds the data file's lock (flock); the message names its pid."""

    code = 9


class IOFailed(RingblobError):
    """An I/O error (EIO, ENOSPC on the medium, ...) reported to a client.

    ``errno`` is the operating system's error number where known.
    """

    code = 10

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


# -- engine ------------------------------------------------------------------


class Misaligned(RingblobError, ValueError):
    """An O_DIRECT offset, length or buffer not aligned to the logical block size.

    Raised before anything is submitted (also a ``ValueError``).
    """

    code = 20


class EngineClosed(RingblobError, ValueError):
    """The engine (or its buffer) was used after ``close()`` (also a ``ValueError``)."""

    code = 21


class EngineUnavailable(RingblobError):
    """The requested engine cannot run here; the message says why and what to do."""

    code = 22


class BufferBusy(RingblobError):
    """A fixed buffer cannot be released or reused while an operation on it is in flight."""

    code = 23


class NoBuffers(RingblobError):
    """Every registered buffer is leased; release one or configure a larger pool."""

    code = 24


# -- configuration and daemon ------------------------------------------------


class ConfigError(RingblobError, ValueError):
    """A bad setting (flag, TOML key or value); the message names the setting."""

    code = 30


class ProtocolError(RingblobError):
    """A malformed frame: bad magic, version, length or opcode. The connection closes."""

    code = 40


class FrameTooLarge(ProtocolError):
    """A frame over the server's maximum frame size. The connection closes."""

    code = 41


class Busy(RingblobError):
    """Too many requests in flight or connections open; retry later (backpressure)."""

    code = 42


class AccessDenied(RingblobError):
    """The peer's uid/gid (SO_PEERCRED) is not on the daemon's allowlist."""

    code = 43


class ConnectionLost(RingblobError):
    """The connection to the daemon closed before the reply arrived."""

    code = 44


class ServerShuttingDown(RingblobError):
    """The daemon is stopping and accepts no new requests."""

    code = 45


_BY_CODE: dict[int, type[RingblobError]] = {}


def _index(cls: type[RingblobError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(RingblobError)


def error_for_code(code: int) -> type[RingblobError]:
    """Return the exception class whose wire status is ``code``.

    Unknown codes map to :class:`RingblobError` so a newer daemon never makes
    an older client crash on a status it does not know.
    """
    return _BY_CODE.get(code, RingblobError)


def values_or_raise(results) -> list:
    """The ``get_many`` view of per-key results (each a value or the exception for that key,
    as an MGET answers and :meth:`BlobStore.get_each <ringblob.store.BlobStore.get_each>`
    returns): the values in order, None for a :class:`NotFound`; the first other exception,
    in key order, is raised."""
    out: list = []
    for res in results:
        if isinstance(res, NotFound):
            out.append(None)
        elif isinstance(res, BaseException):
            raise res
        else:
            out.append(res)
    return out
