"""ringblob.probe: the ctypes shim over liburing.so.2, on this real kernel."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ringblob import probe as probe_mod
from ringblob.probe import OPCODES, REQUIRED_OPCODES, ProbeResult, describe_errno, probe

ROOT = Path(__file__).resolve().parent.parent
DENY = str(ROOT / "tests" / "deny_io_uring.py")


def _enum_from_header() -> dict[str, int]:
    """enum io_uring_op parsed out of the installed kernel uapi header."""
    text = Path("/usr/include/liburing/io_uring.h").read_text()
    body = re.search(r"enum io_uring_op \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*IORING_OP_(\w+)\s*,", body, re.M)
    return {n: i for i, n in enumerate(names) if n != "LAST"}


def test_probe_on_this_kernel_finds_io_uring_and_required_opcodes():
    r = probe()
    assert isinstance(r, ProbeResult)
    assert r.available is True, r.reason
    assert r.reason is None and r.errno is None
    assert r.kernel == os.uname().release
    for op in REQUIRED_OPCODES + ("NOP", "READ", "WRITE"):
        assert r.opcodes[op] is True, op
    assert r.missing_opcodes == []
    # a 6.x kernel knows far more than the 49 opcodes liburing 2.3 names
    assert r.last_op is not None and r.last_op >= OPCODES["SENDMSG_ZC"]
    assert r.liburing_path and os.path.exists(r.liburing_path)
    assert "liburing.so" in os.path.basename(r.liburing_path)
    assert r.io_uring_disabled == probe_mod.io_uring_disabled_sysctl()


def test_opcode_numbers_match_the_installed_header():
    header = _enum_from_header()
    if not header:
        pytest.skip("/usr/include/liburing/io_uring.h has no enum io_uring_op")
    for name, num in header.items():
        if name in OPCODES:
            assert OPCODES[name] == num, name
    assert OPCODES["READ_FIXED"] == 4 and OPCODES["WRITE_FIXED"] == 5 and OPCODES["FSYNC"] == 3


def test_to_dict_is_json_ready():
    d = probe().to_dict()
    back = json.loads(json.dumps(d))
    assert back["available"] is True
    assert back["missing_opcodes"] == []
    assert set(REQUIRED_OPCODES) <= set(back["opcodes"])


def test_missing_library_says_how_to_install_it():
    r = probe("liburing-ringblob-absent.so.2")
    assert r.available is False
    assert r.errno is None and r.liburing_path is None
    assert "apt-get install liburing2" in r.reason
    assert r.missing_opcodes == list(REQUIRED_OPCODES)


def test_sysctl_reader(tmp_path):
    p = tmp_path / "io_uring_disabled"
    p.write_text("2\n")
    assert probe_mod.io_uring_disabled_sysctl(str(p)) == 2
    assert probe_mod.io_uring_disabled_sysctl(str(tmp_path / "absent")) is None
    p.write_text("garbage")
    assert probe_mod.io_uring_disabled_sysctl(str(p)) is None


@pytest.mark.parametrize(
    "err,disabled,needle",
    [
        (errno.EPERM, 0, "seccomp"),
        (errno.EPERM, 2, "io_uring_disabled=2"),
        (errno.EACCES, 1, "io_uring_group"),
        (errno.ENOSYS, None, "gVisor"),
        (errno.ENOMEM, None, "LimitMEMLOCK"),
        (errno.EIO, None, "EIO"),
    ],
)
def test_describe_errno_names_cause_and_fix(err, disabled, needle):
    text = describe_errno(err, disabled)
    assert needle in text
    assert os.strerror(err) in text


def _probe_under_seccomp(errname: str) -> dict:
    code = "import json; from ringblob.probe import probe; print(json.dumps(probe().to_dict()))"
    out = subprocess.run(
        [sys.executable, DENY, "--errno", errname, "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp helper builds an x86_64 filter")
@pytest.mark.parametrize("errname", ["EPERM", "ENOSYS"])
def test_probe_reports_real_errno_when_seccomp_refuses_io_uring(errname):
    """A child under a real seccomp filter (as Docker's default profile) sees io_uring_setup fail."""
    d = _probe_under_seccomp(errname)
    assert d["available"] is False
    assert d["errno"] == getattr(errno, errname)
    assert errname in d["reason"]
    assert d["missing_opcodes"] == list(REQUIRED_OPCODES)
    assert d["liburing_path"]  # the library loaded; the kernel refused


def test_ring_mlock_bytes_is_zero_where_the_ring_is_charged_to_the_memcg():
    # Linux >= 5.12 (IORING_FEAT_NATIVE_WORKERS) charges ring memory to the memory cgroup
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    n = probe_mod.ring_mlock_bytes(128)
    if (major, minor) >= (5, 12):
        assert n == 0
    else:
        assert n is not None and n > 0
    assert probe_mod.ring_mlock_bytes(128, "liburing-ringblob-absent.so.2") is None
