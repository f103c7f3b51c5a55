"""Can io_uring run here, and with which opcodes? A ctypes shim over liburing.so.2.

This module loads the system ``liburing.so.2`` with :mod:`ctypes` and compiles
nothing, so it answers even where the Cython extension ``ringblob._uring``
failed to build. :func:`probe` does four things:

1. reads ``/proc/sys/kernel/io_uring_disabled`` (0 enabled, 1 only for the
   group in ``kernel.io_uring_group`` or CAP_SYS_ADMIN, 2 disabled; absent
   before Linux 6.6);
2. sets up a real two-entry ring with ``io_uring_queue_init`` and tears it down
   with ``io_uring_queue_exit``, to learn the real errno when the kernel refuses
   (EPERM under Docker's default seccomp profile, ENOSYS on gVisor or
   CONFIG_IO_URING=n, ENOMEM for RLIMIT_MEMLOCK on kernels before 5.12,
   EACCES/EPERM for ``kernel.io_uring_disabled``);
3. asks the kernel which opcodes it supports (``io_uring_get_probe``) and reads
   the ``struct io_uring_probe`` ops array directly, because in liburing 2.3
   ``io_uring_opcode_supported`` is a static inline in the header, not a
   symbol of the library;
4. reports the kernel release and the path of the liburing that was loaded.

Example::

    >>> from ringblob.probe import probe
    >>> r = probe()
    >>> r.available, r.opcodes["READ_FIXED"]
    (True, True)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ProbeResult",
    "probe",
    "OPCODES",
    "REQUIRED_OPCODES",
    "describe_errno",
    "io_uring_disabled_sysctl",
    "LIBURING_SONAME",
    "INSTALL_HINT",
    "ring_mlock_bytes",
]

LIBURING_SONAME = "liburing.so.2"
INSTALL_HINT = (
    "install the liburing 2 shared library: `sudo apt-get install liburing2` on Debian/Ubuntu, "
    "`sudo dnf install liburing` on Fedora/RHEL"
)
IO_URING_DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"

# enum io_uring_op from the kernel's uapi io_uring.h (as shipped in
# /usr/include/liburing/io_uring.h, liburing 2.3): the position is the opcode.
_OP_NAMES = (
    "NOP", "READV", "WRITEV", "FSYNC", "READ_FIXED", "WRITE_FIXED", "POLL_ADD", "POLL_REMOVE",
    "SYNC_FILE_RANGE", "SENDMSG", "RECVMSG", "TIMEOUT", "TIMEOUT_REMOVE", "ACCEPT",
    "ASYNC_CANCEL", "LINK_TIMEOUT", "CONNECT", "FALLOCATE", "OPENAT", "CLOSE", "FILES_UPDATE",
    "STATX", "READ", "WRITE", "FADVISE", "MADVISE", "SEND", "RECV", "OPENAT2", "EPOLL_CTL",
    "SPLICE", "PROVIDE_BUFFERS", "REMOVE_BUFFERS", "TEE", "SHUTDOWN", "RENAMEAT", "UNLINKAT",
    "MKDIRAT", "SYMLINKAT", "LINKAT", "MSG_RING", "FSETXATTR", "SETXATTR", "FGETXATTR",
    "GETXATTR", "SOCKET", "URING_CMD", "SEND_ZC", "SENDMSG_ZC",
)
#: opcode name (without the ``IORING_OP_`` prefix) -> opcode number
OPCODES: dict[str, int] = {name: num for num, name in enumerate(_OP_NAMES)}
#: the opcodes the ringblob engine submits (FSYNC carries IORING_FSYNC_DATASYNC)
REQUIRED_OPCODES = ("READ_FIXED", "WRITE_FIXED", "FSYNC")
#: the opcodes always reported in :attr:`ProbeResult.opcodes`
REPORTED_OPCODES = ("NOP", "READ", "WRITE", "READ_FIXED", "WRITE_FIXED", "FSYNC")

IO_URING_OP_SUPPORTED = 1 << 0
_STRUCT_IO_URING_BYTES = 4096  # sizeof(struct io_uring) is 216 in liburing 2.3; room to spare


class _ProbeOp(ctypes.Structure):
    """struct io_uring_probe_op { __u8 op; __u8 resv; __u16 flags; __u32 resv2; }"""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("resv", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32),
    ]


class _ProbeHeader(ctypes.Structure):
    """struct io_uring_probe { __u8 last_op; __u8 ops_len; __u16 resv; __u32 resv2[3];
    struct io_uring_probe_op ops[]; } — the header, ops follow it."""

    _fields_ = [
        ("last_op", ctypes.c_uint8),
        ("ops_len", ctypes.c_uint8),
        ("resv", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32 * 3),
    ]


assert ctypes.sizeof(_ProbeOp) == 8 and ctypes.sizeof(_ProbeHeader) == 16


@dataclass
class ProbeResult:
    """What :func:`probe` found.

    ``available``: a ring could be set up and torn down here.
    ``reason``: one line saying why not (``None`` when available).
    ``errno``: the errno of the failed ring setup (``None`` when available or
    when the library could not even be loaded).
    ``kernel``: ``uname -r``.
    ``opcodes``: opcode name -> supported, for at least NOP, READ, WRITE,
    READ_FIXED, WRITE_FIXED and FSYNC (all ``False`` when no ring could be set up).
    ``last_op``: the highest opcode number the kernel reported (``None`` if unknown).
    ``liburing_path``: the file liburing was loaded from (``None`` if missing).
    ``io_uring_disabled``: the value of ``kernel.io_uring_disabled`` (``None``
    when the sysctl does not exist, i.e. before Linux 6.6).
    """

    available: bool
    reason: str | None
    errno: int | None
    kernel: str
    opcodes: dict[str, bool] = field(default_factory=dict)
    last_op: int | None = None
    liburing_path: str | None = None
    io_uring_disabled: int | None = None

    @property
    def missing_opcodes(self) -> list[str]:
        """The :data:`REQUIRED_OPCODES` the kernel does not support (empty when all are)."""
        return [op for op in REQUIRED_OPCODES if not self.opcodes.get(op)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``missing_opcodes``."""
        d = asdict(self)
        d["missing_opcodes"] = self.missing_opcodes
        return d


def io_uring_disabled_sysctl(path: str = IO_URING_DISABLED_PATH) -> int | None:
    """The value of ``kernel.io_uring_disabled`` (0, 1 or 2), or ``None`` when the
    sysctl is absent (kernels before 6.6) or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def describe_errno(err: int, disabled: int | None = None) -> str:
    """Explain in one line why ring setup failed with errno ``err`` and what to do.

    ``disabled`` is ``kernel.io_uring_disabled`` where known; with 1 or 2 an
    EPERM/EACCES is blamed on the sysctl rather than on seccomp.
    """
    name = _errno.errorcode.get(err, str(err))
    text = os.strerror(err)
    if err in (_errno.EPERM, _errno.EACCES) and disabled == 2:
        return (f"io_uring_setup failed with {name} ({text}): kernel.io_uring_disabled=2 turns "
                "io_uring off for everyone; set it to 0 (sysctl -w kernel.io_uring_disabled=0) "
                "or use --engine psync")
    if err in (_errno.EPERM, _errno.EACCES) and disabled == 1:
        return (f"io_uring_setup failed with {name} ({text}): kernel.io_uring_disabled=1 allows "
                "io_uring only for CAP_SYS_ADMIN and the group in kernel.io_uring_group; add the "
                "service user to that group, set the sysctl to 0, or use --engine psync")
    if err == _errno.EPERM:
        sysctl = "" if disabled == 0 else " or kernel.io_uring_disabled forbids it"
        return (f"io_uring_setup failed with EPERM ({text}): a seccomp profile refuses the "
                "io_uring syscalls (Docker's default profile does; run the container with a "
                "profile that allows io_uring_setup/io_uring_enter/io_uring_register)"
                f"{sysctl}; otherwise use --engine psync")
    if err == _errno.EACCES:
        return (f"io_uring_setup failed with EACCES ({text}): io_uring is disabled for this user "
                "(kernel.io_uring_disabled / kernel.io_uring_group) or by an LSM policy; "
                "use --engine psync")
    if err == _errno.ENOSYS:
        return (f"io_uring_setup failed with ENOSYS ({text}): this kernel has no io_uring "
                "(older than 5.1, CONFIG_IO_URING=n, or a sandbox such as gVisor); "
                "use --engine psync")
    if err == _errno.ENOMEM:
        return (f"io_uring_setup failed with ENOMEM ({text}): the ring could not be allocated; "
                "on kernels before 5.12 ring memory counts against RLIMIT_MEMLOCK, so raise "
                "LimitMEMLOCK (ulimit -l); otherwise the memory cgroup is full")
    if err == _errno.EINVAL:
        return (f"io_uring_setup failed with EINVAL ({text}): the kernel rejected the ring "
                "parameters (too old for liburing's defaults?)")
    return f"io_uring_setup failed with {name} ({text})"


def ring_mlock_bytes(entries: int, library: str = LIBURING_SONAME) -> int | None:
    """Bytes of RLIMIT_MEMLOCK a ring of ``entries`` SQEs needs here (``io_uring_mlock_size``).

    0 on kernels that charge the ring to the memory cgroup instead (5.12 and
    newer, IORING_FEAT_NATIVE_WORKERS); ``None`` when liburing is missing or the
    kernel refuses io_uring. Registered buffers come on top of this.
    """
    try:
        lib = ctypes.CDLL(library)
        fn = lib.io_uring_mlock_size
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    n = fn(entries, 0)
    return n if n >= 0 else None


def _loaded_path(libname: str) -> str | None:
    """Path of the mapped file whose name starts with ``libname``'s stem, from /proc/self/maps."""
    stem = os.path.basename(libname).split(".so")[0] + ".so"
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(stem):
                    return parts[5].strip()
    except OSError:
        pass
    return None


def _load(libname: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(libname, use_errno=True)
    lib.io_uring_queue_init.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    lib.io_uring_queue_init.restype = ctypes.c_int
    lib.io_uring_queue_exit.argtypes = [ctypes.c_void_p]
    lib.io_uring_queue_exit.restype = None
    lib.io_uring_get_probe.argtypes = []
    lib.io_uring_get_probe.restype = ctypes.c_void_p
    lib.io_uring_free_probe.argtypes = [ctypes.c_void_p]
    lib.io_uring_free_probe.restype = None
    return lib


def _read_probe(lib: ctypes.CDLL) -> tuple[int | None, dict[int, bool]]:
    """(last_op, {opcode: supported}) from io_uring_get_probe, or (None, {}) on failure."""
    ptr = lib.io_uring_get_probe()
    if not ptr:
        return None, {}
    try:
        hdr = _ProbeHeader.from_address(ptr)
        ops = (_ProbeOp * hdr.ops_len).from_address(ptr + ctypes.sizeof(_ProbeHeader))
        supported = {int(o.op): bool(o.flags & IO_URING_OP_SUPPORTED) for o in ops}
        # ops[i].op == i in practice; key by the op field in case a kernel ever differs
        return int(hdr.last_op), supported
    finally:
        lib.io_uring_free_probe(ptr)


def probe(library: str = LIBURING_SONAME, *, entries: int = 2) -> ProbeResult:
    """Find out whether io_uring can run in this process and which opcodes it has.

    ``library`` is the soname (or path) of liburing to load; ``entries`` the
    size of the throw-away ring set up to test the kernel. Never raises for an
    environment problem: a missing library, a refused ``io_uring_setup`` or an
    unreadable sysctl all end up in the result's ``reason``/``errno``.
    """
    kernel = os.uname().release
    disabled = io_uring_disabled_sysctl()
    none = {name: False for name in REPORTED_OPCODES}
    try:
        lib = _load(library)
    except OSError as exc:
        return ProbeResult(
            available=False,
            reason=f"{library} cannot be loaded ({exc}); {INSTALL_HINT}",
            errno=None,
            kernel=kernel,
            opcodes=none,
            io_uring_disabled=disabled,
        )
    except AttributeError as exc:  # an old liburing without io_uring_get_probe
        return ProbeResult(
            available=False,
            reason=f"{library} lacks a needed symbol ({exc}); {INSTALL_HINT} (version 2.0 or newer)",
            errno=None,
            kernel=kernel,
            opcodes=none,
            liburing_path=_loaded_path(library),
            io_uring_disabled=disabled,
        )
    path = _loaded_path(library) or library

    ring = ctypes.create_string_buffer(_STRUCT_IO_URING_BYTES)  # heap memory for struct io_uring
    ret = lib.io_uring_queue_init(entries, ring, 0)
    if ret < 0:
        err = -ret
        return ProbeResult(
            available=False,
            reason=describe_errno(err, disabled),
            errno=err,
            kernel=kernel,
            opcodes=none,
            liburing_path=path,
            io_uring_disabled=disabled,
        )
    lib.io_uring_queue_exit(ring)

    last_op, supported = _read_probe(lib)
    opcodes = dict(none)
    for name, num in OPCODES.items():
        if num in supported:
            opcodes[name] = supported[num]
    if last_op is None:
        return ProbeResult(
            available=False,
            reason="a ring could be set up but io_uring_get_probe failed (IORING_REGISTER_PROBE "
            "needs Linux 5.6 or newer); upgrade the kernel or use --engine psync",
            errno=None,
            kernel=kernel,
            opcodes=opcodes,
            liburing_path=path,
            io_uring_disabled=disabled,
        )
    return ProbeResult(
        available=True,
        reason=None,
        errno=None,
        kernel=kernel,
        opcodes=opcodes,
        last_op=last_op,
        liburing_path=path,
        io_uring_disabled=disabled,
    )


if __name__ == "__main__":  # python -m ringblob.probe
    import json

    print(json.dumps(probe().to_dict(), indent=2, sort_keys=True))
