"""ringblob.digest: both parallel_hash modes give BLAKE3's digests, and only whole values of
PARALLEL_MIN bytes or more go to BLAKE3's thread pool."""

from __future__ import annotations

import os

import blake3
import pytest

from ringblob import config, digest


@pytest.fixture(autouse=True)
def _restore():
    was = digest.mode()
    yield
    digest.configure(was)


def test_modes_and_the_setting(monkeypatch, caplog):
    """on: BLAKE3's pool and the hash worker; auto: the worker only, and only where the process
    may run on 2 CPUs or more; off: neither. The setting defaults to auto."""
    assert digest.configure("on") is True and digest.parallel() and digest.hash_worker()
    assert digest.mode() == "on"
    assert digest.configure("off") is False and not digest.parallel() and not digest.hash_worker()
    with pytest.raises(ValueError, match="parallel_hash: 'fast' is not one of off, auto, on"):
        digest.configure("fast")
    assert digest.mode() == "off" and not digest.parallel()  # a refused mode changes nothing
    monkeypatch.setattr(digest.os, "sched_getaffinity", lambda pid: {0, 1})
    with caplog.at_level("INFO", logger="ringblob.digest"):
        assert digest.configure("auto") is False
    assert digest.hash_worker() and not digest.parallel()
    assert "a large PUT's buffers by the hash worker thread (2 usable CPUs)" in caplog.text
    monkeypatch.setattr(digest.os, "sched_getaffinity", lambda pid: {3})
    digest.configure("auto")
    assert not digest.hash_worker() and not digest.parallel()  # one CPU: the worker only adds switches
    digest.configure("on")
    assert digest.hash_worker() and digest.parallel()  # on means on, even there
    assert config.PARALLEL_HASH_MODES == digest.PARALLEL_MODES
    assert config.Settings().parallel_hash == "auto"


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_digests_are_blake3_on_both_sides_of_the_threshold(mode):
    digest.configure(mode)
    m = digest.PARALLEL_MIN
    for n in (0, 1, 4096, m - 1, m, m + 1, 4 * m + 12345):
        data = os.urandom(n)
        want = blake3.blake3(data).digest()
        assert digest.digest(data) == want
        assert digest.digest(memoryview(bytearray(data))) == want


def test_thread_pool_is_taken_for_large_values_only(monkeypatch):
    """With the mode on, values of PARALLEL_MIN bytes or more ask blake3 for max_threads=AUTO;
    smaller ones, and every value with the mode off, for the default (one thread)."""
    seen = []
    real = blake3.blake3
    auto = real.AUTO

    def spy(*args, **kw):
        seen.append(kw.get("max_threads", 1))
        return real(*args, **kw)

    monkeypatch.setattr(blake3, "blake3", spy)
    digest.configure("on")
    digest.digest(b"x" * (digest.PARALLEL_MIN - 1))
    digest.digest(b"x" * digest.PARALLEL_MIN)
    digest.configure("off")
    digest.digest(b"x" * digest.PARALLEL_MIN)
    assert seen == [1, auto, 1]


def test_hash_worker_runs_jobs_in_order_off_the_caller_and_survives_a_failing_job(caplog):
    """worker_put: one daemon thread runs (fn, arg) jobs in the order they were put, not on the
    caller's thread; a job that raises is logged and the jobs after it still run."""
    import threading

    put = digest.worker_put()
    assert digest.worker_put() == put  # one worker per process
    seen, done = [], threading.Event()

    def job(i):
        seen.append((i, threading.current_thread().name))

    def boom(_):
        raise RuntimeError("job failed on purpose")

    with caplog.at_level("ERROR", logger="ringblob.digest"):
        for i in range(5):
            put((job, i))
        put((boom, None))
        put((job, 5))
        put((lambda _: done.set(), None))
        assert done.wait(10)
    assert seen == [(i, "ringblob-hash") for i in range(6)]
    assert "hash worker: a job failed" in caplog.text and "job failed on purpose" in caplog.text


def _cgroup_tree(tmp_path, proc_line: str, files: dict) -> None:
    (tmp_path / "proc_cgroup").write_text(proc_line)
    for rel, text in files.items():
        f = tmp_path / "cg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


@pytest.mark.parametrize("proc_line, files, want", [
    # cgroup v2: the service's own quota (systemd CPUQuota=100%)
    ("0::/system.slice/ringblob.service\n",
     {"cgroup.controllers": "cpu io", "system.slice/cpu.max": "max 100000",
      "system.slice/ringblob.service/cpu.max": "100000 100000"}, 1.0),
    # cgroup v2: an ancestor's quota caps the leaf's
    ("0::/a/b\n", {"cgroup.controllers": "cpu", "a/cpu.max": "150000 100000", "a/b/cpu.max": "max 100000"}, 1.5),
    # cgroup v2 without a quota anywhere
    ("0::/a\n", {"cgroup.controllers": "cpu", "a/cpu.max": "max 100000"}, None),
    # cgroup v1 (hybrid hierarchy, as docker --cpus=0.5 sets it)
    ("4:cpu,cpuacct:/docker/abc\n0::/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
    # cgroup v1 without a quota
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
])
def test_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, monkeypatch, proc_line, files, want):
    """auto counts the CPUs the daemon may use: its affinity, capped by its cgroup's CPU quota
    (v2 cpu.max up the tree, or v1 cfs quota / period), rounded up; no quota, no cap."""
    _cgroup_tree(tmp_path, proc_line, files)
    monkeypatch.setattr(digest, "_PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr(digest, "_CGROUP_ROOT", str(tmp_path / "cg"))
    monkeypatch.setattr(digest.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert digest.cgroup_cpu_limit() == want
    assert digest._usable_cpus() == (8 if want is None else max(1, -(-want // 1)))
    digest.configure("auto")
    assert digest.hash_worker() is (want is None or want > 1)


def test_unreadable_cgroup_files_leave_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(digest, "_PROC_CGROUP", str(tmp_path / "missing"))
    monkeypatch.setattr(digest.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert digest.cgroup_cpu_limit() is None and digest._usable_cpus() == 3
