"""The benchmark harness's report logic (bench/run.py): fio command lines, the run order, targets,
the like-for-like durability references, fio result parsing and the markdown report.

No benchmark runs here: these feed the functions hand-made rows and fio JSON and check what they
decide and print, so a PASS/MISS or a reference ratio in bench/results/ can be trusted; one test
starts real daemons to check what the harness does with a data file another daemon holds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

from conftest import ENGINES

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    name = "bench_run_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def _row(system, workload, ops, samples=None, **kw):
    r = {"system": system, "workload": workload, "ops_per_s": float(ops), "bytes_per_s": float(ops) * 4096,
         "concurrency": 32, "p50_us": 100.0, "p99_us": 200.0}
    if samples is not None:
        r["samples_ops_per_s"] = [float(x) for x in samples]
        r["samples_bytes_per_s"] = [float(x) * 4096 for x in samples]
        r["samples_rounds"] = list(range(len(samples)))
    r.update(kw)
    return r


def _doc(bench, rows):
    """A run.json document around ``rows`` (3 rounds, quick mode), with the report's derived parts."""
    return {
        "mode": "quick", "clients": 2, "load_generator": "native", "repeat": 3,
        "mode_params": {"duration": 1.0, "warmup": 0.2, "get_set": 32 << 20, "big_set": 16},
        "machine": {"nproc": 2, "cpu_model": "test", "mem_bytes": 1 << 30, "kernel": "k", "os": "os",
                    "filesystem": "ext4", "workdir": "/x", "fio": "fio-x", "redis": "redis-x",
                    "git_commit": "abc", "date_utc": "now"},
        "results": rows, "ratios": bench.ratios(rows), "targets": bench.targets(rows),
        "references": bench.references(rows),
    }


def test_fio_command_lines_of_the_sync_jobs(bench):
    mode = bench.MODES["quick"]
    dsync = bench.fio_command("randwrite_4k_qd32_dsync", "/x/fio.dat", 1 << 20, mode)
    assert "--sync=dsync" in dsync and not any(a.startswith("--fdatasync") for a in dsync)
    assert "--iodepth=32" in dsync and "--rw=randwrite" in dsync
    every = bench.fio_command("randwrite_4k_qd32_fdatasync1", "/x/fio.dat", 1 << 20, mode)
    assert "--fdatasync=1" in every and not any(a.startswith("--sync=") for a in every)
    target = bench.fio_command("randwrite_4k_qd32_fdatasync32", "/x/fio.dat", 1 << 20, mode)
    assert "--fdatasync=32" in target and not any(a.startswith("--sync=") for a in target)
    for name in bench.FIO_JOBS:
        argv = bench.fio_command(name, "/x/fio.dat", 1 << 20, mode)
        for opt in ("--ioengine=io_uring", "--fixedbufs", "--registerfiles", "--direct=1"):
            assert opt in argv, (name, opt)


def test_the_references_run_right_beside_the_sync_put(bench):
    def check(order):
        i = order.index(("fio", "randwrite_4k_qd32_fdatasync32"))
        j = order.index(("uring", "put_4k_sync_c32"))
        beside = list(bench.BESIDE["put_4k_sync_c32"])
        assert order[i + 1 : j] == beside  # between the counterpart and ringblob, nothing else
        assert ("groupcommit", "groupcommit_4k_c32") in beside and ("fio", "randwrite_4k_qd32_dsync") in beside
        assert len(order) == len(set(order))

    check(bench.schedule())
    saved = set(bench.WORKLOAD_FILTER)
    try:
        bench.WORKLOAD_FILTER.clear()
        bench.WORKLOAD_FILTER.add("put_4k_sync_c32")
        order = bench.schedule()
        check(order)
        assert ("fio", "randwrite_4k_qd32_dsync") in order and ("fio", "read_1m_qd8") not in order
    finally:
        bench.WORKLOAD_FILTER.clear()
        bench.WORKLOAD_FILTER.update(saved)


def test_references_give_ratios_and_no_verdict(bench):
    rows = [
        _row("ringblob-uring", "put_4k_sync_c32", 60_000, [50_000, 60_000, 70_000]),
        _row("fio", "randwrite_4k_qd32_dsync", 75_000, [100_000, 75_000, 70_000]),
        _row("fio", "randwrite_4k_qd32_fdatasync32", 140_000, [140_000, 140_000, 140_000]),
    ]
    refs = {r["target"]: r for r in bench.references(rows)}
    c32 = next(r for name, r in refs.items() if "c32" in name)
    assert c32["ratio"] == pytest.approx(0.8)
    assert c32["per_round"] == pytest.approx([0.5, 0.8, 1.0])
    assert "result" not in c32 and "rounds_passing" not in c32
    c128 = next(r for name, r in refs.items() if "c128" in name)
    assert c128["ratio"] is None  # no put_4k_sync_c128 row: nothing to divide
    sync_vs_fio = next(t for t in bench.targets(rows) if "fdatasync=32" in t["target"])
    assert sync_vs_fio["result"] == "MISS" and sync_vs_fio["ratio"] == pytest.approx(60 / 140)
    assert sync_vs_fio["rounds_passing"] == 0


def test_a_target_with_request_errors_misses_and_a_missing_side_is_na(bench):
    rows = [
        _row("ringblob-uring", "get_4k_c32", 90_000, request_errors=3),
        _row("fio", "randread_4k_qd32", 100_000),
    ]
    t = {x["target"]: x for x in bench.targets(rows)}
    get = next(v for k, v in t.items() if k.startswith("4 KiB GET c32"))
    assert get["result"] == "MISS" and "3 request errors" in get["why"]
    put = next(v for k, v in t.items() if k.startswith("1 MiB PUT"))
    assert put["result"] == "n/a" and put["ratio"] is None
    ok = bench.targets([_row("ringblob-uring", "get_4k_c32", 60_000), _row("fio", "randread_4k_qd32", 100_000)])
    assert next(x for x in ok if x["target"].startswith("4 KiB GET c32"))["result"] == "PASS"  # 0.6 >= 0.6


def test_parse_fio_marks_o_dsync_and_fdatasync_jobs(bench):
    def doc(with_sync):
        job = {"write": {"iops": 80_000.0, "bw_bytes": 80_000 * 4096, "bs_bytes": 4096,
                         "clat_ns": {"mean": 300_000.0, "percentile": {"50.000000": 290_000, "99.000000": 700_000}}},
               "read": {}, "job_runtime": 5000, "usr_cpu": 5.0, "sys_cpu": 40.0}
        if with_sync:
            job["sync"] = {"lat_ns": {"mean": 80_000.0, "percentile": {"99.000000": 200_000}}}
        return {"jobs": [job]}

    d = bench.parse_fio(doc(False), "randwrite_4k_qd32_dsync")
    assert d["sync"] == "dsync" and "O_DSYNC" in d["note"] and "fdatasync_every" not in d
    assert d["ops_per_s"] == 80_000 and d["p99_us"] == 700
    f = bench.parse_fio(doc(True), "randwrite_4k_qd32_fdatasync1")
    assert f["fdatasync_every"] == 1 and "sync" not in f
    assert f["fdatasync_mean_us"] == 80 and f["fdatasync_p99_us"] == 200
    # fio's own CPU per I/O: 45 % of one CPU at 80k writes/s is 5.625 µs each
    assert d["cpu_us_per_op"] == pytest.approx(5.625)
    quiet = doc(False)
    quiet["jobs"][0].update(usr_cpu=0.0, sys_cpu=0.0)
    assert bench.parse_fio(quiet, "randwrite_4k_qd32_dsync")["cpu_us_per_op"] is None  # not measured


def test_the_cpu_column_gives_the_daemon_per_request_and_fio_per_io(bench):
    """The 'All figures' table's CPU column shows the daemon's CPU per request on ringblob rows and
    fio's own CPU per I/O on fio rows (what the same I/O costs any process on that machine)."""
    rows = [
        _row("ringblob-uring", "get_4k_c32", 40_000, daemon_cpu_us_per_op=21.4),
        _row("fio", "randread_4k_qd32", 88_000, cpu_us_per_op=8.9),
    ]
    md = bench.markdown(_doc(bench, rows))
    assert "| CPU µs/op | others' CPU |" in md
    fio_line = next(line for line in md.splitlines() if line.startswith("| fio randread_4k_qd32 |"))
    uring_line = next(line for line in md.splitlines() if line.startswith("| get_4k_c32 | ringblob-uring |"))
    assert fio_line.split("|")[11].strip() == "9"
    assert uring_line.split("|")[11].strip() == "21"


def test_markdown_prints_the_reference_table_only_with_a_ratio(bench):
    rows = [
        _row("ringblob-uring", "put_4k_sync_c32", 60_000, [50_000, 60_000, 70_000]),
        _row("fio", "randwrite_4k_qd32_fdatasync32", 140_000),
        _row("fio", "randwrite_4k_qd32_dsync", 75_000, [100_000, 75_000, 70_000], sync="dsync"),
        _row("fio", "randwrite_4k_qd32_fdatasync1", 120_000, fdatasync_every=1),
    ]
    doc = _doc(bench, rows)
    md = bench.markdown(doc)
    assert "Like-for-like references" in md
    assert "| 0.80 | 0.50 / 0.80 / 1.00 |" in md
    assert "| randwrite_4k_qd32_dsync | 32 | O_DSYNC |" in md
    assert "| randwrite_4k_qd32_fdatasync1 | 32 | fdatasync every 1 |" in md
    doc["references"] = bench.references(rows[1:])  # no ringblob row: no ratio, no table
    assert "Like-for-like references" not in bench.markdown(doc)


def test_the_report_names_the_write_cache_and_the_sync_method_taken(bench):
    """The store's sync_method (from each daemon's STAT) and the device's write cache (which
    decides auto) are carried into the report; rows without them (older run.json) say nothing."""
    s0 = {"puts": 10, "fdatasyncs": 3, "dsync_commits": 0, "sync_method": "fdatasync", "fragmentation": 0.1}
    s1 = {"puts": 110, "fdatasyncs": 9, "dsync_commits": 0, "sync_method": "fdatasync", "fragmentation": 0.5,
          "largest_free_bytes": 1 << 20}
    d = bench.stat_delta(s0, s1)
    assert d["puts"] == 100 and d["fdatasyncs"] == 6 and d["dsync_commits"] == 0 and d["sync_method"] == "fdatasync"
    assert d["fragmentation"] == 0.5 and d["largest_free_bytes"] == 1 << 20  # the state after, not a delta
    rows = [_row("ringblob-uring", "put_4k_sync_c32", 5, engine="uring", daemon_counters=d),
            _row("ringblob-psync", "put_4k_sync_c32", 4, engine="psync",
                 daemon_counters=dict(d, sync_method="dsync")),
            _row("fio", "randwrite_4k_qd32", 9)]
    note = bench._sync_methods_note(rows)
    assert "dsync (psync), fdatasync (uring)" in note
    assert bench._sync_methods_note([_row("ringblob-uring", "get_4k_c32", 5, engine="uring")]) == ""
    m = bench.machine_stamp(str(ROOT))
    assert m["write_cache"] == "unknown" or m["write_cache"].startswith(("write back, ", "write through, "))


def test_sync_method_option_reaches_the_daemons_command_line(bench):
    import argparse

    assert bench.daemon_flags(argparse.Namespace(sync_method=None)) == []
    flags = bench.daemon_flags(argparse.Namespace(sync_method="dsync"))
    assert flags == ["--sync-method", "dsync"]
    d = bench.Daemon("/w", "/w/d.data", 1 << 20, "uring", flags)
    argv = d.argv
    assert argv[argv.index("--sync-method") + 1] == "dsync" and argv[argv.index("--engine") + 1] == "uring"


def test_serve_flags_reach_the_daemons_and_the_report(bench):
    """--serve-flags are split as a shell would and follow the harness's own flags; run.md names
    them; the STAT field parallel_hash (a bool, not a counter) is carried into daemon_counters."""
    import argparse

    flags = bench.daemon_flags(argparse.Namespace(sync_method="dsync", serve_flags="--parallel-hash on  --loop 'asyncio'"))
    assert flags == ["--sync-method", "dsync", "--parallel-hash", "on", "--loop", "asyncio"]
    assert bench.daemon_flags(argparse.Namespace(sync_method=None, serve_flags="")) == []
    argv = bench.Daemon("/w", "/w/d.data", 1 << 20, "uring", flags).argv
    assert argv[argv.index("--parallel-hash") + 1] == "on"
    d = bench.stat_delta({"puts": 1, "parallel_hash": True, "hash_worker": True},
                         {"puts": 5, "parallel_hash": True, "hash_worker": False})
    assert d["puts"] == 4 and d["parallel_hash"] is True and d["hash_worker"] is False
    doc = {"mode": "quick", "mode_params": bench.MODES["quick"], "clients": 2, "load_generator": "native",
           "repeat": 1, "machine": bench.machine_stamp(str(ROOT)), "results": [], "ratios": {}, "targets": [],
           "references": [], "errors": [], "serve_flags": flags}
    assert "Daemon flags: `--sync-method dsync --parallel-hash on --loop asyncio`." in bench.markdown(doc)


def test_the_connection_shape_reference_drives_32_connections_and_divides_by_redis(bench):
    """put_4k_sync_c32_conn32 is put_4k_sync_c32 from 32 client processes of one request each
    (redis-benchmark -c 32's shape) whatever --clients says; its reference divides by Redis SET c32."""
    side = bench.RingblobSide("uring", "/w", dict(bench.MODES["quick"]), 2, 64 << 20)
    side.daemon.socket = "/w/s.sock"
    shares = [sp.share for sp in side.specs("put_4k_sync_c32_conn32")]
    assert shares == [1] * 32
    assert [sp.share for sp in side.specs("put_4k_sync_c32")] == [16, 16]  # --clients 2: two pipelines
    rows = [_row("ringblob-uring", "put_4k_sync_c32_conn32", 42_000, [40_000, 42_000, 44_000]),
            _row("redis", "set_c32", 40_000, [40_000, 40_000, 40_000])]
    ref = next(r for r in bench.references(rows) if "redis-benchmark's shape" in r["target"])
    assert ref["ratio"] == pytest.approx(1.05) and "result" not in ref
    order = bench.schedule()
    assert order.index(("uring", "put_4k_sync_c32_conn32")) == order.index(("psync", "put_4k_sync_c32")) + 2


def test_the_group_commit_ceiling_is_a_reference_beside_the_sync_put_and_fio(bench):
    rows = [
        _row("ringblob-uring", "put_4k_sync_c32", 54_000, [50_000, 54_000, 60_000]),
        _row("fio", "randwrite_4k_qd32_fdatasync32", 120_000, [120_000, 130_000, 120_000]),
        _row("groupcommit", "groupcommit_4k_c32", 72_000, [60_000, 72_000, 80_000], shape="minimal",
             rounds_in_flight=2, values_per_round=16.0,
             shapes=[{"shape": "journal", "rounds_in_flight": 2, "ops_per_s": 65_000.0},
                     {"shape": "minimal", "rounds_in_flight": 2, "ops_per_s": 72_000.0}]),
    ]
    refs = {r["target"]: r for r in bench.references(rows)}
    put = next(r for k, r in refs.items() if k.startswith("4 KiB PUT sync c32 / the group-commit ceiling"))
    assert put["ratio"] == pytest.approx(0.75) and put["per_round"] == pytest.approx([50 / 60, 54 / 72, 60 / 80])
    ceil = next(r for k, r in refs.items() if k.startswith("the group-commit ceiling at 32 in flight / fio"))
    assert ceil["ratio"] == pytest.approx(0.6) and "result" not in ceil
    # the ceiling is no target: the verdicts are the issue's, unchanged
    assert {t["target"] for t in bench.targets(rows)} == {t["target"] for t in bench.targets(rows[:2])}
    doc = _doc(bench, rows)
    md = bench.markdown(doc)
    assert "| groupcommit_4k_c32 | 32 | minimal 2 | 72,000 | 16.0 |" in md
    assert "journal 2: 65,000, minimal 2: 72,000" in md
    assert "| 0.60 | 0.50 / 0.55 / 0.67 |" in md  # the ceiling over fio's fdatasync=32 job, round by round


def test_groupcommit_side_command_line(bench):
    side = bench.GroupCommitSide("/w", bench.MODES["quick"], 256 << 20)
    argv = side.argv("groupcommit_4k_c32")
    assert argv[1].endswith("bench/groupcommit.py")
    assert argv[argv.index("--file") + 1] == "/w/fio.dat" and argv[argv.index("--conc") + 1] == "32"
    assert float(argv[argv.index("--duration") + 1]) == 0.3  # seven shapes: quick mode stays under a minute
    full = bench.GroupCommitSide("/w", bench.MODES["full"], 256 << 20).argv("groupcommit_4k_c32")
    assert float(full[full.index("--duration") + 1]) == bench.MODES["full"]["duration"]


def test_a_start_failure_names_its_own_reason(bench):
    """A daemon that would not start is reported by the CLI's own error line, not the log's last
    line of an earlier run (the log is appended across runs)."""
    tail = ("2026 INFO ringblob.store: sync_method fdatasync\n"
            "ringblob serve: /x/d.data: the data file is locked by another process (pid 7); stop that ringblob\n"
            "2026 INFO ringblob.digest: parallel_hash auto\n")
    assert bench.Daemon.reason(tail).startswith("ringblob serve: /x/d.data: the data file is locked")
    assert bench.Daemon.reason("a\nlast words\n\n") == "last words"
    assert bench.Daemon.reason("") == "no output"


@pytest.mark.skipif(sys.platform != "linux", reason="the daemon runs on Linux")
def test_a_data_file_another_daemon_holds_is_reported_not_formatted_afresh(bench, workdir):
    """When the bench's daemon cannot start because another process holds the data file's lock,
    the harness says so and leaves the file alone (it used to unlink it and format a new one under
    the other daemon's feet). Real daemons on a real file under the repository."""
    from ringblob.client import Client

    size = 256 << 20
    engine = "uring" if "uring" in ENGINES else "psync"
    side = bench.RingblobSide(engine, workdir, {"get_set": 1 << 20, "big_set": 1}, 1, size)
    os.mkdir(os.path.join(workdir, "first"))
    first = bench.Daemon(os.path.join(workdir, "first"), side.data, size, engine)
    first.start()
    try:
        with open(side.data + ".json", "w") as f:
            json.dump(side.shape, f)
        inode = os.stat(side.data).st_ino
        errors = side.start()
        assert len(errors) == 1, errors
        assert "locked by another process" in errors[0] and f"pid {first.pid}" in errors[0].splitlines()[0]
        assert "exited with status 75" in errors[0]  # told apart by the exit status (EX_TEMPFAIL)
        assert os.stat(side.data).st_ino == inode  # not unlinked, not formatted afresh
        with Client(first.socket, timeout=5) as c:
            c.ping()
    finally:
        side.daemon.stop()  # (had it formatted afresh, its own daemon would be running)
        first.stop()


def test_the_report_names_the_commit_and_says_when_the_tree_differs_from_it(bench, tmp_path):
    """run.md's header names the benchmarked commit; a tree with changes to tracked files (or a copy
    of one under a stale .git, as on a lent machine) is marked -dirty instead of passing for it."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    assert bench.git_commit(str(tmp_path)) == ""  # not a repository
    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    git("-c", "user.name=t", "-c", "user.email=t@t", "tag", "v1")  # a tag does not replace the hash
    head = git("rev-parse", "--short=7", "HEAD").strip()
    assert bench.git_commit(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("new\n")
    assert bench.git_commit(str(tmp_path)) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert bench.git_commit(str(tmp_path)) == head + "-dirty"
