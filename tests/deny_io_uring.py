"""Run a command under a seccomp filter that refuses io_uring_setup, like Docker's default profile.

Usage: python tests/deny_io_uring.py [--errno NAME] -- COMMAND [ARGS...]

Installs a classic-BPF seccomp filter (PR_SET_NO_NEW_PRIVS, then
PR_SET_SECCOMP/SECCOMP_MODE_FILTER via ctypes; x86_64 only) that makes
io_uring_setup(2) fail with the given errno (default EPERM, what Docker's
default seccomp profile returns) and allows every other system call, then
execs COMMAND. The filter is inherited across execve, so the command sees a
kernel that refuses io_uring exactly as it would inside such a container.
This file is a test helper, not a test module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_IO_URING_SETUP = 425  # same number on every architecture (asm-generic numbering since 5.1)

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
OFF_NR, OFF_ARCH = 0, 4  # offsetof(struct seccomp_data, nr / arch)


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def install(err: int = errno.EPERM) -> None:
    """Install the filter in this process (irreversible). Raises OSError if refused."""
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOTSUP, "deny_io_uring: only x86_64 is supported")
    prog = b"".join([
        _insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),  # other arch: allow (skip 3)
        _insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
        _insn(BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | (err & 0xFFFF)),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
    filt = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(filt))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_SECCOMP): {os.strerror(e)}")


def main(argv: list[str]) -> int:
    err = errno.EPERM
    if argv[:1] == ["--errno"]:
        err = getattr(errno, argv[1])
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    install(err)
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
