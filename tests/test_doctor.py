"""`ringblob doctor`, run through the installed console script on this real host.

Cases where io_uring must be unavailable run doctor in a child process under a
real seccomp filter that refuses io_uring_setup (tests/deny_io_uring.py, the
way Docker's default profile does); cases needing an unprivileged user drop to
uid/gid 65534 with setpriv.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ringblob.direct import fs_type, open_direct, write_cache_of
from ringblob.store.blobstore import choose_sync_method

ROOT = Path(__file__).resolve().parent.parent
RINGBLOB = str(Path(sys.executable).parent / "ringblob")
DENY = str(ROOT / "tests" / "deny_io_uring.py")
NAMES = ["kernel", "liburing", "io_uring", "opcodes", "extension", "store", "data", "memlock", "engine", "sync", "hash"]
LINE = re.compile(r"^(OK|WARN|FAIL) +([a-z_]+) +\S")
NOBODY = 65534


def _ring_importable() -> bool:
    try:
        from ringblob._uring import Ring  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def repo_tmp():
    """A fresh directory on the repository's file system (ext4), removed after."""
    base = ROOT / ".test-tmp"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="doctor-", dir=base))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def doctor(*args: str, wrap: list[str] | None = None, preexec=None) -> subprocess.CompletedProcess:
    cmd = (wrap or []) + [RINGBLOB, "doctor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def doctor_json(*args: str, **kw) -> tuple[int, dict]:
    p = doctor("--json", *args, **kw)
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"doctor --json printed no JSON: rc={p.returncode}\n{p.stdout}\n{p.stderr}")


def checks(d: dict) -> dict[str, dict]:
    return {c["name"]: c for c in d["checks"]}


def as_nobody(memlock: int | None = None) -> tuple[list[str], object]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to run doctor as an unprivileged user")

    wrap = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    if not _nobody_can_run(tuple(wrap)):
        pytest.skip(f"uid {NOBODY} cannot run {RINGBLOB} (a parent directory of the checkout is not "
                    "world-searchable); clone it under a directory like /work or /srv")

    def pre():
        if memlock is not None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))

    return wrap, pre


@functools.lru_cache(maxsize=None)
def _nobody_can_run(wrap: tuple[str, ...]) -> bool:
    p = subprocess.run([*wrap, RINGBLOB, "--version"], capture_output=True, text=True, timeout=60)
    return p.returncode == 0


def test_console_script_human_output(repo_tmp):
    data = repo_tmp / "ringblob.data"
    p = doctor("--data", str(data))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    found = [LINE.match(line).group(2) for line in lines[:-1]]
    assert found == NAMES, p.stdout
    for line in lines[:-1]:
        status, name = LINE.match(line).groups()
        if name in ("kernel", "liburing", "io_uring", "opcodes", "data", "memlock"):
            assert status == "OK", line
    assert "READ_FIXED, WRITE_FIXED and FSYNC are supported" in p.stdout
    assert f"({fs_type(str(repo_tmp))})" in p.stdout
    assert "O_DIRECT" in p.stdout
    engine = "uring" if _ring_importable() else "psync"
    assert lines[-1] == f"ringblob doctor: OK, engine auto -> {engine}"
    assert list(repo_tmp.iterdir()) == []  # the O_DIRECT probe file was removed; nothing created


def test_json_report_fields(repo_tmp):
    data = repo_tmp / "new.data"
    rc, d = doctor_json("--data", str(data), "--buffer-size", "1M", "--buffer-count", "8")
    assert rc == 0 and d["ok"] is True
    assert d["engine_requested"] == "auto"
    assert d["buffer_size"] == 1 << 20 and d["buffer_count"] == 8
    c = checks(d)
    assert list(c) == NAMES
    assert c["kernel"]["details"]["release"] == d["kernel"] == os.uname().release
    assert d["probe"]["available"] is True and d["probe"]["opcodes"]["WRITE_FIXED"] is True
    assert c["io_uring"]["status"] == "OK" and c["io_uring"]["details"]["available"] is True
    assert c["opcodes"]["details"]["missing"] == []
    assert c["opcodes"]["details"]["supported"] == {"READ_FIXED": True, "WRITE_FIXED": True, "FSYNC": True}
    dd = c["data"]["details"]
    assert dd["exists"] is False and dd["directory_exists"] is True
    assert dd["fs_type"] == fs_type(str(repo_tmp)) and dd["block_size"] in (512, 1024, 2048, 4096)
    assert c["memlock"]["details"]["pool_bytes"] == 8 << 20
    assert c["memlock"]["details"]["ring_memory_accounting"] == "memory cgroup"  # kernel >= 5.12
    assert c["extension"]["details"]["importable"] is _ring_importable()
    assert c["store"]["status"] == "OK" and c["store"]["details"]["importable"] is True
    assert d["engine"] == c["engine"]["details"]["chosen"] == ("uring" if _ring_importable() else "psync")
    # the sync check: what sync_method auto takes on the device under the (not yet created) data file
    sd = c["sync"]["details"]
    cache = write_cache_of(str(repo_tmp))
    assert sd["path"] == str(repo_tmp) and sd["requested"] == "auto"
    assert (sd["volatile_write_cache"], sd["fua"]) == (cache if cache else (None, None))
    assert sd["chosen"] == choose_sync_method("auto", cache)[0]
    assert c["sync"]["status"] == "OK" and c["sync"]["message"].startswith(f"sync_method auto -> {sd['chosen']} (")
    assert not data.exists() and list(repo_tmp.iterdir()) == []


def test_sync_check_reports_the_configured_method(repo_tmp):
    rc, d = doctor_json("--data", str(repo_tmp / "x.data"), "--engine", "psync", "--sync-method", "fdatasync")
    s = checks(d)["sync"]
    assert rc == 0 and s["details"]["requested"] == "fdatasync" and s["details"]["chosen"] == "fdatasync"
    assert "as configured" in s["message"]


def test_hash_check_says_what_parallel_hash_comes_to_here(repo_tmp):
    """The hash check: auto puts a large PUT's buffers on the hash worker where 2+ CPUs are usable
    (not under taskset -c 0), on adds BLAKE3's pool, off neither; --config supplies the mode and
    the flag wins; informational, never a failure."""
    data = str(repo_tmp / "x.data")
    cpus = len(os.sched_getaffinity(0))
    rc, d = doctor_json("--data", data, "--engine", "psync")
    h = checks(d)["hash"]
    assert rc == 0 and h["status"] == "OK" and h["details"]["requested"] == "auto"
    assert h["details"]["hash_worker"] is (cpus >= 2) and h["details"]["thread_pool"] is False
    assert h["details"]["usable_cpus"] == cpus and f"({cpus} usable CPU" in h["message"]
    rc, d = doctor_json("--data", data, "--engine", "psync", wrap=["taskset", "-c", str(min(os.sched_getaffinity(0)))])
    h = checks(d)["hash"]
    assert rc == 0 and h["details"]["hash_worker"] is False and h["details"]["usable_cpus"] == 1
    assert h["message"].startswith("parallel_hash auto: a large PUT's buffers on the event loop")
    cfg = repo_tmp / "ringblob.toml"
    cfg.write_text(f'data = "{data}"\nengine = "psync"\nparallel_hash = "on"\n')
    rc, d = doctor_json("--config", str(cfg))
    h = checks(d)["hash"]
    assert rc == 0 and h["details"]["thread_pool"] is True and h["details"]["hash_worker"] is True
    rc, d = doctor_json("--config", str(cfg), "--parallel-hash", "off")
    h = checks(d)["hash"]
    assert rc == 0 and h["details"]["requested"] == "off" and not h["details"]["hash_worker"]
    assert list(repo_tmp.iterdir()) == [cfg]


def test_existing_data_file_is_read_not_written(repo_tmp):
    data = repo_tmp / "existing.data"
    with open_direct(str(data), create_size=1 << 20):
        pass
    data.write_bytes(os.urandom(1 << 20))
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    rc, d = doctor_json("--data", str(data), "--engine", "psync")
    assert rc == 0, d
    dd = checks(d)["data"]["details"]
    assert checks(d)["data"]["status"] == "OK"
    assert dd["exists"] is True and dd["size"] == 1 << 20 and dd["block_device"] is False
    assert d["engine"] == "psync" and checks(d)["engine"]["status"] == "OK"
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before


def test_missing_directory_is_probed_in_nearest_ancestor(repo_tmp):
    data = repo_tmp / "var" / "sub" / "ringblob.data"
    rc, d = doctor_json("--data", str(data), "--engine", "psync")
    c = checks(d)["data"]
    assert rc == 0 and c["status"] == "WARN"
    assert c["details"]["probed_in"] == str(repo_tmp)
    assert f"mkdir -p {data.parent}" in c["message"]
    assert list(repo_tmp.iterdir()) == []  # nothing created, probe file removed


@pytest.mark.parametrize("kind", ["directory", "under_a_file", "proc"])
def test_unusable_data_path_fails(repo_tmp, kind):
    if kind == "directory":
        data = str(repo_tmp)
    elif kind == "under_a_file":
        (repo_tmp / "plain").write_text("x")
        data = str(repo_tmp / "plain" / "ringblob.data")
    else:
        data = "/proc/ringblob-doctor-test.data"
    p = doctor("--data", data, "--engine", "psync")
    assert p.returncode == 1, p.stdout
    assert re.search(r"^FAIL data ", p.stdout, re.M), p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("ringblob doctor: FAIL (data")


def test_unwritable_directory_fails_for_unprivileged_user(repo_tmp):
    locked = repo_tmp / "locked"
    locked.mkdir(mode=0o755)  # root-owned: uid 65534 may enter but not create
    wrap, pre = as_nobody()
    rc, d = doctor_json("--data", str(locked / "ringblob.data"), "--engine", "psync", wrap=wrap, preexec=pre)
    c = checks(d)["data"]
    assert rc == 1 and c["status"] == "FAIL"
    assert c["details"]["errno"] == errno.EACCES
    assert "writable" in c["message"]
    assert checks(d)["engine"]["status"] == "FAIL"
    assert list(locked.iterdir()) == []


def test_existing_file_not_writable_fails_for_unprivileged_user(repo_tmp):
    data = repo_tmp / "root-owned.data"
    with open_direct(str(data), create_size=1 << 20):
        pass
    data.chmod(0o644)
    wrap, pre = as_nobody()
    rc, d = doctor_json("--data", str(data), "--engine", "psync", wrap=wrap, preexec=pre)
    c = checks(d)["data"]
    assert rc == 1 and c["status"] == "FAIL" and "not writable by uid 65534" in c["message"]


def test_memlock_too_small_without_cap_ipc_lock_warns(repo_tmp):
    wrap, pre = as_nobody(memlock=1 << 20)
    os.chown(repo_tmp, NOBODY, NOBODY)
    rc, d = doctor_json("--data", str(repo_tmp / "x.data"), wrap=wrap, preexec=pre)
    m = checks(d)["memlock"]
    assert m["status"] == "WARN", m
    assert m["details"]["cap_ipc_lock"] is False
    assert m["details"]["rlimit_memlock_soft"] == 1 << 20
    assert "LimitMEMLOCK" in m["message"] and "16 MiB" in m["message"]
    # psync does not pin buffers: the same limit is fine there
    rc, d = doctor_json("--data", str(repo_tmp / "x.data"), "--engine", "psync", wrap=wrap, preexec=pre)
    assert rc == 0 and checks(d)["memlock"]["status"] == "OK"


@pytest.mark.skipif(not _ring_importable(), reason="ringblob._uring.Ring (the Cython engine) is not built yet")
def test_memlock_too_small_makes_uring_fail_and_auto_fall_back(repo_tmp):
    """Registering 16 MiB of fixed buffers under a 1 MiB RLIMIT_MEMLOCK without CAP_IPC_LOCK fails for real."""
    wrap, pre = as_nobody(memlock=1 << 20)
    os.chown(repo_tmp, NOBODY, NOBODY)
    rc, d = doctor_json("--data", str(repo_tmp / "x.data"), "--engine", "uring", wrap=wrap, preexec=pre)
    e = checks(d)["engine"]
    assert rc == 1 and e["status"] == "FAIL" and d["engine"] is None
    assert e["details"]["errno"] == errno.ENOMEM
    rc, d = doctor_json("--data", str(repo_tmp / "x.data"), "--engine", "auto", wrap=wrap, preexec=pre)
    e = checks(d)["engine"]
    assert rc == 0 and d["engine"] == "psync" and e["status"] == "WARN"
    assert "ENOMEM" in e["details"]["uring_error"] or "memory" in e["details"]["uring_error"].lower()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp helper builds an x86_64 filter")
def test_engine_uring_fails_when_seccomp_refuses_io_uring(repo_tmp):
    wrap = [sys.executable, DENY, "--"]
    data = str(repo_tmp / "x.data")
    rc, d = doctor_json("--data", data, "--engine", "uring", wrap=wrap)
    c = checks(d)
    assert rc == 1 and d["ok"] is False and d["engine"] is None
    assert c["io_uring"]["status"] == "FAIL"
    assert c["io_uring"]["details"]["errno"] == errno.EPERM
    assert "seccomp" in c["io_uring"]["message"]
    assert c["engine"]["status"] == "FAIL" and "--engine psync" in c["engine"]["message"]

    p = doctor("--data", data, "--engine", "uring", wrap=wrap)
    assert p.returncode == 1 and re.search(r"^FAIL io_uring +unavailable: io_uring_setup failed with EPERM", p.stdout, re.M)

    # auto falls back to psync (a warning, not a failure); psync does not care
    rc, d = doctor_json("--data", data, "--engine", "auto", wrap=wrap)
    assert rc == 0 and d["engine"] == "psync"
    assert checks(d)["io_uring"]["status"] == "WARN" and checks(d)["engine"]["status"] == "WARN"
    rc, d = doctor_json("--data", data, "--engine", "psync", wrap=wrap)
    assert rc == 0 and d["engine"] == "psync" and checks(d)["engine"]["status"] == "OK"


def test_bad_buffer_size_is_a_usage_error(repo_tmp):
    p = doctor("--data", str(repo_tmp / "x.data"), "--buffer-size", "1000")
    assert p.returncode == 2
    assert "page size" in p.stderr
    p = doctor("--data", str(repo_tmp / "x.data"), "--buffer-count", "0")
    assert p.returncode == 2 and "at least 1" in p.stderr


def test_config_file_supplies_settings_and_flags_win(repo_tmp):
    cfg = repo_tmp / "ringblob.toml"
    cfg.write_text(f'data = "{repo_tmp / "from-toml.data"}"\nengine = "psync"\n'
                   'buffer_size = "128K"\nbuffer_count = 4\nsocket = "/run/x.sock"\n')
    rc, d = doctor_json("--config", str(cfg))
    assert rc == 0, d
    assert d["data"] == str(repo_tmp / "from-toml.data") and d["engine_requested"] == "psync"
    assert (d["buffer_size"], d["buffer_count"]) == (128 << 10, 4)
    rc, d = doctor_json("--config", str(cfg), "--buffer-count", "8", "--engine", "auto")
    assert rc == 0 and d["buffer_count"] == 8 and d["engine_requested"] == "auto"
    p = doctor("--config", str(cfg), "--buffer-count", "2")  # below what `ringblob serve` accepts
    assert p.returncode == 2 and "buffer_count" in p.stderr and "minimum" in p.stderr
    p = doctor("--config", str(repo_tmp / "absent.toml"))
    assert p.returncode == 2 and "absent.toml" in p.stderr


def test_example_config_of_the_unit_passes_doctor_checks_except_location(repo_tmp):
    """systemd/ringblob.toml is a valid `ringblob serve` file; only its /var/lib path is host-specific."""
    rc, d = doctor_json("--config", str(ROOT / "systemd" / "ringblob.toml"), "--data", str(repo_tmp / "x.data"))
    assert rc == 0 and d["ok"] is True
    assert (d["buffer_size"], d["buffer_count"], d["engine_requested"]) == (256 << 10, 64, "auto")


def test_a_missing_store_extension_fails(repo_tmp):
    """The store cannot run without its Cython key index, allocator and journal encoders: the
    doctor says which one does not import and how to rebuild it, whatever the engine."""
    code = ("import sys; sys.modules['ringblob._alloc'] = None\n"
            "from ringblob.cli import main\n"
            "sys.argv = ['ringblob', 'doctor', '--json', '--data', sys.argv[1]]\n"
            "sys.exit(main())\n")
    p = subprocess.run([sys.executable, "-c", code, str(repo_tmp / "d.data")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    c = checks(json.loads(p.stdout))
    assert c["store"]["status"] == "FAIL" and "ringblob._alloc" in c["store"]["message"]
    assert "make setup" in c["store"]["message"] and c["extension"]["status"] == "OK"
