"""Opening data files and block devices with O_DIRECT.

:func:`open_direct` opens a regular file or a block device for direct I/O and
reports what the engine needs: the size in bytes (``BLKGETSIZE64`` for a block
device) and the logical block size (``BLKSSZGET`` for a block device; for a
regular file, the logical block size of the device under its file system from
sysfs). Where the file system refuses O_DIRECT, the error names the path and
the file system.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from dataclasses import dataclass

__all__ = ["DirectFile", "open_direct", "fs_type", "logical_block_size_of_dev", "write_cache_of",
           "describe_write_cache"]

BLKSSZGET = 0x1268  # int: logical sector size
BLKGETSIZE64 = 0x80081272  # u64: device size in bytes
FALLBACK_BLOCK_SIZE = 4096  # safe for every device with a logical block size up to 4 KiB


@dataclass
class DirectFile:
    """An open O_DIRECT file: ``fd``, ``path``, ``size`` (bytes), ``block_size``
    (logical block size in bytes), ``is_block_device``, ``fs_type`` (file
    system name from mountinfo, or ``"block device"``)."""

    fd: int
    path: str
    size: int
    block_size: int
    is_block_device: bool
    fs_type: str

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (space \\040, tab \\011, newline \\012, backslash \\134)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fs_type(path: str) -> str:
    """Name of the file system holding ``path`` (e.g. ``ext4``, ``tmpfs``), from
    /proc/self/mountinfo; ``"unknown"`` when it cannot be told."""
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = _unescape_mountinfo(fields[4])
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, right.split()[0]
    except OSError:
        pass
    return best_type


def logical_block_size_of_dev(dev: int) -> int | None:
    """Logical block size in bytes of block device number ``dev`` from sysfs,
    following a partition to its disk; ``None`` when sysfs does not say."""
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for cand in (f"{base}/queue/logical_block_size", f"{base}/../queue/logical_block_size"):
        try:
            with open(cand) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def write_cache_of(path: str, sysfs: str = "/sys") -> tuple[bool, bool] | None:
    """``(volatile, fua)`` of the block device under ``path`` (``path`` itself when it is a block
    device; else the device of its file system), from sysfs: ``volatile`` — the device has a
    volatile write cache (``queue/write_cache`` reads "write back"), ``fua`` — it takes FUA
    writes (``queue/fua`` is 1). A partition is followed to its disk. ``None`` when it cannot be
    told (tmpfs and other file systems with no block device, no sysfs). Raises ``OSError`` only
    from ``stat(path)``.
    """
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    base = f"{sysfs}/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{q}/write_cache") as f:
                cache = f.read().strip()
            with open(f"{q}/fua") as f:
                fua = f.read().strip()
        except OSError:
            continue
        if cache in ("write back", "write through") and fua in ("0", "1"):
            return cache == "write back", fua == "1"
    return None


def describe_write_cache(cache: tuple[bool, bool] | None) -> str:
    """:func:`write_cache_of`'s answer in words, e.g. ``"write back, no FUA"`` (``"unknown"`` for None)."""
    if cache is None:
        return "unknown"
    return f"{'write back' if cache[0] else 'write through'}, {'FUA' if cache[1] else 'no FUA'}"


def open_direct(path: str, *, create_size: int | None = None, read_only: bool = False) -> DirectFile:
    """Open ``path`` with O_DIRECT and report its size and logical block size.

    ``create_size`` (bytes): create the file if absent and, when it is empty,
    allocate that many bytes with ``posix_fallocate`` (``ftruncate`` where the
    file system cannot fallocate). Block devices are never created or resized.

    Raises ``FileNotFoundError`` when the path is missing and ``create_size`` is
    None; ``OSError(EINVAL)`` naming the path and the file system when the file
    system refuses O_DIRECT; ``OSError`` from open/fallocate otherwise.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
    if create_size is not None and not read_only:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = None
            if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                # a FIFO, socket or character device: not the file system's fault
                raise OSError(errno.EINVAL, f"open {path!r}: not a regular file or block device") from exc
            raise OSError(
                errno.EINVAL,
                f"open {path!r} with O_DIRECT: the {fs_type(path)} file system does not support "
                "direct I/O; put the data file on ext4, xfs or btrfs, or use a block device",
            ) from exc
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            bsz = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            return DirectFile(fd, path, size, bsz, True, "block device")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"open {path!r}: not a regular file or block device")
        size = st.st_size
        if create_size is not None and size == 0 and create_size > 0:
            try:
                os.posix_fallocate(fd, 0, create_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(exc.errno, f"fallocate {path!r} to {create_size} bytes: {exc.strerror}") from exc
                os.ftruncate(fd, create_size)
            size = os.fstat(fd).st_size
        bsz = logical_block_size_of_dev(st.st_dev) or FALLBACK_BLOCK_SIZE
        return DirectFile(fd, path, size, bsz, False, fs_type(path))
    except BaseException:
        os.close(fd)
        raise
