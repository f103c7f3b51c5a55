"""ringblob.direct: opening data files and block devices with O_DIRECT.

Regular files live on the repository's ext4 (.test-tmp/), never on tmpfs.
Block-device tests use a loop device with 4096-byte logical sectors and are
skipped, with the reason, where loop devices cannot be set up (not root, no
losetup, no /dev/loop-control).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import stat
import subprocess
import uuid

import pytest

from ringblob.direct import FALLBACK_BLOCK_SIZE, DirectFile, fs_type, logical_block_size_of_dev, open_direct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_ROOT = os.path.join(REPO, ".test-tmp")


@pytest.fixture
def tdir():
    d = os.path.join(TMP_ROOT, f"direct-{uuid.uuid4().hex[:12]}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def aligned(n: int) -> mmap.mmap:
    """Page-aligned anonymous memory of n bytes (O_DIRECT needs aligned user buffers)."""
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def sysfs_lbs(dev: int) -> int:
    with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/logical_block_size") as f:
        return int(f.read())


@contextlib.contextmanager
def loop_device(backing: str, size: int, sector: int = 4096):
    """Attach ``backing`` (created with ``size`` bytes) as a loop device with ``sector``-byte
    logical blocks; skip the test with the reason when that is impossible here."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root (losetup)")
    if not shutil.which("losetup") or not os.path.exists("/dev/loop-control"):
        pytest.skip("no losetup or /dev/loop-control on this host")
    with open(backing, "wb") as f:
        f.truncate(size)
    p = subprocess.run(["losetup", "-b", str(sector), "-f", "--show", backing], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# -- regular files on ext4 ----------------------------------------------------------


def test_create_allocates_and_reports_size_and_block_size(tdir):
    path = os.path.join(tdir, "data")
    with open_direct(path, create_size=1 << 20) as f:
        assert isinstance(f, DirectFile)
        assert f.size == 1 << 20 and os.path.getsize(path) == 1 << 20
        st = os.fstat(f.fd)
        assert stat.S_ISREG(st.st_mode) and not f.is_block_device
        assert st.st_blocks * 512 >= 1 << 20, "posix_fallocate should allocate, not leave a sparse file"
        assert f.fs_type == "ext4"
        assert f.block_size == sysfs_lbs(st.st_dev)
        fl = fcntl.fcntl(f.fd, fcntl.F_GETFL)
        assert fl & os.O_DIRECT and fl & os.O_ACCMODE == os.O_RDWR
        assert fcntl.fcntl(f.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_existing_file_keeps_its_size(tdir):
    path = os.path.join(tdir, "data")
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
    with open_direct(path, create_size=1 << 20) as f:
        assert f.size == 8192
    with open_direct(path) as f:
        assert f.size == 8192


def test_missing_file_without_create_size(tdir):
    with pytest.raises(FileNotFoundError):
        open_direct(os.path.join(tdir, "absent"))
    with pytest.raises(FileNotFoundError):  # read-only never creates
        open_direct(os.path.join(tdir, "absent"), create_size=4096, read_only=True)
    assert not os.path.exists(os.path.join(tdir, "absent"))


def test_read_only_open(tdir):
    path = os.path.join(tdir, "data")
    open_direct(path, create_size=8192).close()
    with open_direct(path, read_only=True) as f:
        assert fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        buf = aligned(4096)
        assert os.preadv(f.fd, [buf], 0) == 4096
        with pytest.raises(OSError) as info:
            os.pwritev(f.fd, [buf], 0)
        assert info.value.errno == errno.EBADF


def test_o_direct_is_in_effect(tdir):
    """ext4 with O_DIRECT refuses I/O not aligned to the logical block size; aligned I/O works."""
    with open_direct(os.path.join(tdir, "data"), create_size=1 << 16) as f:
        buf = aligned(4096)
        buf[:] = b"a" * 4096
        with pytest.raises(OSError) as info:
            os.pwritev(f.fd, [memoryview(buf)[:100]], 0)  # length not a multiple of the block size
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            os.pwritev(f.fd, [buf], 100)  # offset not aligned
        assert info.value.errno == errno.EINVAL
        assert os.pwritev(f.fd, [buf], f.block_size * 2) == 4096
        back = aligned(4096)
        assert os.preadv(f.fd, [back], f.block_size * 2) == 4096
        assert back[:] == buf[:]


def test_close_is_idempotent_and_leaks_nothing(tdir):
    before = open_fds()
    f = open_direct(os.path.join(tdir, "data"), create_size=4096)
    assert open_fds() == before + 1
    f.close()
    f.close()
    assert f.fd == -1
    assert open_fds() == before


# -- refusals and their messages --------------------------------------------------------


@pytest.mark.parametrize(
    "path,fs",
    [("/proc/self/status", "proc"), ("/sys/kernel/mm/transparent_hugepage/enabled", "sysfs")],
)
def test_file_system_refusing_o_direct_is_named(path, fs):
    """proc and sysfs have no direct I/O: the kernel refuses O_DIRECT at open with EINVAL."""
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist on this kernel")
    before = open_fds()
    with pytest.raises(OSError) as info:
        open_direct(path, read_only=True)
    assert info.value.errno == errno.EINVAL
    msg = info.value.strerror
    assert repr(path) in msg and f"the {fs} file system does not support direct I/O" in msg
    assert "ext4" in msg  # the fix-it hint
    assert open_fds() == before


def test_fifo_is_refused_as_not_a_file_not_blamed_on_ext4(tdir):
    path = os.path.join(tdir, "fifo")
    os.mkfifo(path)
    with pytest.raises(OSError) as info:
        open_direct(path)
    assert info.value.errno == errno.EINVAL
    assert "not a regular file or block device" in info.value.strerror
    assert "file system" not in info.value.strerror


def test_directory_is_refused(tdir):
    before = open_fds()
    with pytest.raises(IsADirectoryError):
        open_direct(tdir)
    with pytest.raises(OSError) as info:  # read-only opens a directory: fstat says no
        open_direct(tdir, read_only=True)
    assert info.value.errno == errno.EINVAL and "not a regular file or block device" in info.value.strerror
    assert open_fds() == before


def test_fs_type_names_the_file_system(tdir):
    assert fs_type(tdir) == "ext4"
    assert fs_type(os.path.join(tdir, "not-yet-created")) == "ext4"  # longest mount prefix of the path
    assert fs_type("/proc/self/status") == "proc"
    if os.path.ismount("/dev/shm"):
        assert fs_type("/dev/shm") == "tmpfs"
    assert fs_type("/sys") == "sysfs"


def test_logical_block_size_of_dev():
    dev = os.stat(REPO).st_dev
    assert logical_block_size_of_dev(dev) == sysfs_lbs(dev)
    assert logical_block_size_of_dev(os.makedev(4095, 1048575)) is None  # no such device
    assert FALLBACK_BLOCK_SIZE == 4096


# -- block devices (loop device with 4096-byte logical sectors) -------------------------


def test_block_device_size_and_logical_block_size(tdir):
    size = 8 << 20
    with loop_device(os.path.join(tdir, "backing"), size) as dev:
        before = open_fds()
        with open_direct(dev, create_size=1 << 30) as f:  # create_size never resizes a device
            assert f.is_block_device and f.fs_type == "block device"
            assert f.size == size  # BLKGETSIZE64
            assert f.block_size == 4096  # BLKSSZGET
            buf = aligned(8192)
            with pytest.raises(OSError) as info:
                os.pwritev(f.fd, [memoryview(buf)[:512]], 0)  # 512 bytes < the 4096-byte sector
            assert info.value.errno == errno.EINVAL
            buf[:4096] = b"D" * 4096
            assert os.pwritev(f.fd, [memoryview(buf)[:4096]], 4096) == 4096
        assert open_fds() == before
        with open(os.path.join(tdir, "backing"), "rb") as b:
            b.seek(4096)
            assert b.read(4096) == b"D" * 4096


def test_regular_file_on_a_4k_sector_device_reports_4096(tdir):
    """A file on ext4 over a 4096-byte-sector device takes its block size from sysfs."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    mnt = os.path.join(tdir, "mnt")
    os.makedirs(mnt)
    with loop_device(os.path.join(tdir, "backing"), 16 << 20) as dev:
        p = subprocess.run(["mkfs.ext4", "-q", "-F", dev], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        p = subprocess.run(["mount", dev, mnt], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a loop device here: {p.stderr.strip()}")
        try:
            with open_direct(os.path.join(mnt, "data"), create_size=1 << 20) as f:
                assert not f.is_block_device and f.fs_type == "ext4"
                assert f.block_size == 4096
                buf = aligned(4096)
                with pytest.raises(OSError) as info:  # 512-aligned is not enough on this device
                    os.pwritev(f.fd, [memoryview(buf)[:512]], 512)
                assert info.value.errno == errno.EINVAL
                assert os.pwritev(f.fd, [buf], 4096) == 4096
        finally:
            subprocess.run(["umount", mnt], capture_output=True)


def test_fs_type_decodes_escaped_mount_points(tdir):
    """mountinfo escapes a space as \\040 and a backslash as \\134; a tmpfs mounted at such a
    path under ext4 must still be told apart from the ext4 around it."""
    mnt = os.path.join(tdir, "a b\\c")
    os.makedirs(mnt)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        assert fs_type(mnt) == "tmpfs"
        assert fs_type(os.path.join(mnt, "file")) == "tmpfs"
        assert fs_type(tdir) == "ext4"
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
