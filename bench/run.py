#!/usr/bin/env python3
"""ringblob beside fio and Redis: one run, same file system, same block size and concurrency.

What it runs (``make bench``; ``make bench-quick`` is ``--quick``):

* **fio** (the physical limit): ``--ioengine=io_uring --fixedbufs
  --registerfiles --direct=1`` on a file under ``.bench-tmp/``: 4 KiB
  randread and randwrite at QD 1 and 32, 4 KiB randwrite with an fdatasync
  every 32 writes (and every write at QD 1, the counterpart of a lone
  ``sync=True`` put), 1 MiB sequential read and write at QD 8; and, right
  beside the 4 KiB sync PUT at 32, randwrite at QD 32 with an fdatasync after
  every write and with O_DSYNC: fio's fdatasync goes out beside the writes in
  flight and promises nothing about them, so the O_DSYNC job (each write
  durable when it completes, what a ``sync=True`` put promises) is reported as
  a like-for-like reference beside the targets (not one of them).
* **the group-commit ceiling** (``bench/groupcommit.py``, right beside the
  4 KiB sync PUT at 32): durable group-commit rounds on fio's file through
  ringblob's engine with no daemon, socket or client cost — how many 4 KiB
  writes per second, each acknowledged only after an fdatasync that began
  once it completed, the disk gives at 32 in flight; reported as references
  beside the ringblob sync PUT and beside fio's fdatasync=32 job.
* **ringblob** through its Unix socket, ``ringblob serve --engine uring`` and
  ``--engine psync`` (each on its own data file, filled once): PING (no I/O,
  the per-request floor), 4 KiB GET of random keys
  (concurrency 1 and 32), 4 KiB PUT with ``sync=True`` (1, 32, 128), 4 KiB PUT
  with ``sync=False`` plus a FLUSH every N puts per client process (32),
  1 MiB PUT (``sync=False``) and GET (8). The load comes from several client
  processes, each with one pipelining connection carrying its share of the
  concurrency: by default the native load generator ``bench/loadgen.c``
  (compiled with ``cc`` into the work directory; a few µs of CPU per request,
  as ``redis-benchmark`` is for Redis), or with ``--loadgen python``
  ``multiprocessing`` children each with one :class:`ringblob.AsyncClient`
  (~20 µs of CPU per request, taken from the daemon on a small host).
* **Redis** (``redis-server``, AOF with ``appendfsync always``, Unix socket
  only, ``port 0``) driven by ``redis-benchmark -d 4096`` at the same
  concurrency.

It reports throughput and p50/p99 latency of each, the ratio of each ringblob
figure to its fio and Redis counterparts, checks the targets of issue 5
(PASS/MISS) and writes ``bench/results/run.json``, ``run.md`` and ``run.png``,
stamped with the machine. ``--profile`` then samples the daemon with py-spy
under load (``profile.txt``, ``profile.svg``) and, where ``perf`` is installed
and allowed, records it with ``perf record`` (``perf.txt``: kernel and C
frames, which is where the Cython request path's time shows).

Workload by workload, the fio counterpart, ringblob uring, ringblob psync and
Redis run back to back, so both sides of a ratio are measured moments apart.
Modes: ``--quick`` (< 1 minute, checks the harness, writes
bench/results/quick/), ``--medium`` (~3 minutes), default full (~7 minutes
on 2 CPUs); ``--repeat N`` reports the median of N rounds, ``--nice -10``
lifts every benchmarked process alike on a shared host. Only local processes
are benchmarked: Unix sockets, files under the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import mmap
import multiprocessing as mp
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "daemon"))

KIB = 1024
MIB = 1024 * 1024

# -- modes ----------------------------------------------------------------------------------

MODES = {
    # duration / warmup: seconds per configuration; get_set: bytes of 4 KiB blobs GET reads from
    "quick": dict(duration=0.8, warmup=0.2, fio_runtime="1", fio_ramp="0", get_set=32 * MIB, big_set=16, put_keys=4096, big_put_keys=8),
    "medium": dict(duration=3.0, warmup=0.7, fio_runtime="3", fio_ramp="1", get_set=256 * MIB, big_set=128, put_keys=32768, big_put_keys=32),
    "full": dict(duration=5.0, warmup=1.0, fio_runtime="5", fio_ramp="1", get_set=1024 * MIB, big_set=256, put_keys=65536, big_put_keys=64),
}

WORKLOAD_FILTER: set[str] = set()  # --workloads: run only these ringblob workloads
FLUSH_EVERY = 32  # 4 KiB sync=False puts per client process between FLUSH requests

# -- fio jobs -------------------------------------------------------------------------------

FIO_JOBS = {
    # name: (rw, bs, iodepth, fdatasync every N writes or 0, fio --sync= or "")
    "randread_4k_qd1": ("randread", "4k", 1, 0, ""),
    "randread_4k_qd32": ("randread", "4k", 32, 0, ""),
    "randwrite_4k_qd1": ("randwrite", "4k", 1, 0, ""),
    "randwrite_4k_qd32": ("randwrite", "4k", 32, 0, ""),
    "randwrite_4k_qd1_fdatasync1": ("randwrite", "4k", 1, 1, ""),
    "randwrite_4k_qd32_fdatasync32": ("randwrite", "4k", 32, 32, ""),
    # With an async engine fio's fdatasync goes out beside the writes still in flight and makes
    # no promise about them (io_uring runs an FSYNC in parallel with earlier unfinished writes):
    # an fdatasync after EVERY write at QD 32 shows it costs the writes little. O_DSYNC is the
    # like-for-like reference for a sync=True put: each write is durable when it completes.
    "randwrite_4k_qd32_fdatasync1": ("randwrite", "4k", 32, 1, ""),
    "randwrite_4k_qd32_dsync": ("randwrite", "4k", 32, 0, "dsync"),
    "read_1m_qd8": ("read", "1m", 8, 0, ""),
    "write_1m_qd8": ("write", "1m", 8, 0, ""),
}

# -- ringblob workloads ------------------------------------------------------------------------

RB_WORKLOADS = [
    # name, op, value size, concurrency
    ("ping_c1", "ping", 0, 1),  # no I/O: the floor a request costs (socket, loop, codec)
    ("ping_c32", "ping", 0, 32),
    ("get_4k_c1", "get", 4 * KIB, 1),
    ("get_4k_c32", "get", 4 * KIB, 32),
    ("put_4k_sync_c1", "put_sync", 4 * KIB, 1),
    ("put_4k_sync_c32", "put_sync", 4 * KIB, 32),
    ("put_4k_sync_c32_conn32", "put_sync", 4 * KIB, 32),  # redis-benchmark's shape: see CONNECTIONS
    ("put_4k_sync_c128", "put_sync", 4 * KIB, 128),
    ("put_4k_nosync_flush_c32", "put_nosync_flush", 4 * KIB, 32),
    ("get_1m_c8", "get_big", MIB, 8),
    ("put_1m_c8", "put_big", MIB, 8),
]

# ringblob workload -> client processes, one connection of one request each (its concurrency),
# where not --clients: put_4k_sync_c32_conn32 is put_4k_sync_c32 as redis-benchmark -c 32 drives
# Redis, instead of a few connections pipelining many
CONNECTIONS = {"put_4k_sync_c32_conn32": 32}

# -- Redis runs ---------------------------------------------------------------------------------

REDIS_RUNS = [
    # name, redis-benchmark test, concurrency
    ("ping_c1", "ping_mbulk", 1),
    ("ping_c32", "ping_mbulk", 32),
    ("set_c1", "set", 1),
    ("set_c32", "set", 32),
    ("set_c128", "set", 128),
    ("get_c1", "get", 1),
    ("get_c32", "get", 32),
]
REDIS_KEYSPACE = 10000

# ringblob workload -> (fio counterpart, Redis counterpart)
COUNTERPARTS = {
    "ping_c1": (None, "ping_c1"),
    "ping_c32": (None, "ping_c32"),
    "get_4k_c1": ("randread_4k_qd1", "get_c1"),
    "get_4k_c32": ("randread_4k_qd32", "get_c32"),
    "put_4k_sync_c1": ("randwrite_4k_qd1_fdatasync1", "set_c1"),
    "put_4k_sync_c32": ("randwrite_4k_qd32_fdatasync32", "set_c32"),
    "put_4k_sync_c32_conn32": ("randwrite_4k_qd32_fdatasync32", "set_c32"),
    "put_4k_sync_c128": ("randwrite_4k_qd32_fdatasync32", "set_c128"),
    "put_4k_nosync_flush_c32": ("randwrite_4k_qd32", None),
    "get_1m_c8": ("read_1m_qd8", None),
    "put_1m_c8": ("write_1m_qd8", None),
}

# ringblob workload -> more reference runs, (side, name), right beside it (after its counterpart),
# so that the durability references below divide figures taken moments apart
BESIDE = {
    "put_4k_sync_c32": (("fio", "randwrite_4k_qd32_fdatasync1"), ("fio", "randwrite_4k_qd32_dsync"),
                        ("groupcommit", "groupcommit_4k_c32")),
}

# group-commit ceilings (bench/groupcommit.py on fio's file): name -> values in flight
GROUPCOMMIT_RUNS = {"groupcommit_4k_c32": 32}

# like-for-like references, reported beside the targets but not targets of issue 5:
# (label, (system, run) divided, (system, run) it is divided by)
REFERENCES = [
    ("4 KiB PUT sync c32 / fio randwrite QD32 O_DSYNC (each write durable when it completes)",
     ("ringblob-uring", "put_4k_sync_c32"), ("fio", "randwrite_4k_qd32_dsync")),
    ("4 KiB PUT sync c128 / fio randwrite QD32 O_DSYNC", ("ringblob-uring", "put_4k_sync_c128"),
     ("fio", "randwrite_4k_qd32_dsync")),
    ("4 KiB PUT sync c32 / the group-commit ceiling at 32 in flight (bench/groupcommit.py: durable "
     "rounds' I/O alone, no daemon)", ("ringblob-uring", "put_4k_sync_c32"), ("groupcommit", "groupcommit_4k_c32")),
    ("the group-commit ceiling at 32 in flight / fio randwrite QD32 fdatasync=32 (where below 0.8, the "
     "sync PUT target's baseline is above what durable group commits got from this disk)",
     ("groupcommit", "groupcommit_4k_c32"), ("fio", "randwrite_4k_qd32_fdatasync32")),
    ("4 KiB PUT sync c32 over 32 connections of 1 (redis-benchmark's shape) / Redis SET c32",
     ("ringblob-uring", "put_4k_sync_c32_conn32"), ("redis", "set_c32")),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- machine stamp ------------------------------------------------------------------------------


def _cmd_out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(root: str = ROOT) -> str:
    """The commit the benchmarked code is, short, with ``-dirty`` when tracked files differ from it
    (a working tree with changes, or a copy of one under a stale ``.git``); "" outside git."""
    return _cmd_out(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7", "--exclude", "*"])


def machine_stamp(workdir: str) -> dict:
    """nproc, CPU model, memory, kernel, file system and device of ``workdir``, tool versions, git commit."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * KIB
    except OSError:
        pass
    fs = _cmd_out(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--target", workdir]) or _cmd_out(
        ["stat", "-f", "-c", "%T", workdir]
    )
    from ringblob.direct import describe_write_cache, write_cache_of

    try:
        write_cache = describe_write_cache(write_cache_of(workdir))
    except OSError:
        write_cache = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_bytes": mem,
        "kernel": platform.release(),
        "os": _os_release(),
        "filesystem": fs,
        "workdir": workdir,
        "write_cache": write_cache,  # the device's: decides ringblob's sync_method auto
        "python": platform.python_version(),
        "fio": _cmd_out(["fio", "--version"]) if shutil.which("fio") else None,
        "redis": _cmd_out(["redis-server", "--version"]) if shutil.which("redis-server") else None,
        "git_commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "note": "shared 2-core VM where other jobs (test runs) may run at the same time: figures are noisy"
        if (os.cpu_count() or 0) <= 2
        else "",
    }


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


# -- CPU accounting -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``; 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def wait_quiet(max_wait: float, threshold: float, window: float = 0.5) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) until the host's busy CPUs over ``window`` s fall below ``threshold`` cores.

    Between configurations the benchmark's own processes are idle, so what is busy is someone else:
    on a shared host this starts each measurement in a quieter moment. Returns (seconds waited,
    busy cores in the last window).
    """
    t0 = time.monotonic()
    ncpu = os.cpu_count() or 1
    while True:
        b0, a0 = host_cpu()
        time.sleep(window)
        b1, a1 = host_cpu()
        busy = (b1 - b0) / (a1 - a0) * ncpu if a1 > a0 else 0.0
        waited = time.monotonic() - t0
        if busy < threshold or waited >= max_wait:
            return waited, busy


# -- percentiles -------------------------------------------------------------------------------


def percentiles(lat_s: "list[float] | array", ps=(50, 99)) -> dict:
    """Latency percentiles in microseconds from samples in seconds ({} when there are none)."""
    import numpy as np

    a = np.frombuffer(lat_s, dtype=np.float64) if isinstance(lat_s, (array, bytes)) else np.asarray(lat_s, dtype=np.float64)
    if a.size == 0:
        return {}
    out = {f"p{p}_us": float(np.percentile(a, p) * 1e6) for p in ps}
    out["mean_us"] = float(a.mean() * 1e6)
    return out


# -- fio ----------------------------------------------------------------------------------------


def fio_command(name: str, path: str, size: int, mode: dict, json_out: str | None = None) -> list[str]:
    """The fio command line of job ``name`` (see FIO_JOBS) on file ``path`` of ``size`` bytes."""
    rw, bs, qd, fds, sync = FIO_JOBS[name]
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={path}",
        f"--size={size}",
        "--ioengine=io_uring",
        "--fixedbufs",
        "--registerfiles",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        "--time_based",
        f"--runtime={mode['fio_runtime']}",
        f"--ramp_time={mode['fio_ramp']}",
        "--output-format=json",
    ]
    if fds:
        argv.append(f"--fdatasync={fds}")
    if sync:
        argv.append(f"--sync={sync}")
    if json_out:
        argv.append(f"--output={json_out}")
    return argv


def parse_fio(doc: dict, name: str) -> dict:
    """One result row from fio's ``--output-format=json``: ops/s, bytes/s, clat p50/p99 (µs)."""
    job = doc["jobs"][0]
    rw, bs, qd, fds, sync_mode = FIO_JOBS[name]
    side = job["read"] if "read" in rw else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    row = {
        "system": "fio",
        "workload": name,
        "block_size": side["bs_bytes"] if "bs_bytes" in side else (4 * KIB if bs == "4k" else MIB),
        "concurrency": qd,
        "ops_per_s": float(side["iops"]),
        "bytes_per_s": float(side["bw_bytes"] if "bw_bytes" in side else side["bw"] * KIB),  # bw: KiB/s (older fio)
        "p50_us": pct.get("50.000000", 0) / 1000.0,
        "p99_us": pct.get("99.000000", 0) / 1000.0,
        "mean_us": side.get("clat_ns", {}).get("mean", 0) / 1000.0,
        "duration_s": job.get("job_runtime", 0) / 1000.0,
        "host_cpu_user_pct": job.get("usr_cpu"),
        "host_cpu_sys_pct": job.get("sys_cpu"),
    }
    # fio's own CPU per I/O (its process's user+system time, percent of one CPU over the job): nearly all
    # of it is the kernel's work for the I/O, a floor under any daemon's CPU per request of that shape
    cpu_pct = (job.get("usr_cpu") or 0) + (job.get("sys_cpu") or 0)
    row["cpu_us_per_op"] = cpu_pct / 100.0 / row["ops_per_s"] * 1e6 if row["ops_per_s"] and cpu_pct else None
    row["block_size"] = 4 * KIB if bs == "4k" else MIB
    if fds:
        sync = job.get("sync", {})
        row["fdatasync_every"] = fds
        row["fdatasync_mean_us"] = sync.get("lat_ns", {}).get("mean", 0) / 1000.0
        spct = sync.get("lat_ns", {}).get("percentile", {})
        if spct:
            row["fdatasync_p99_us"] = spct.get("99.000000", 0) / 1000.0
        row["note"] = "clat is the write's; the fdatasync latency is apart"
    if sync_mode:
        row["sync"] = sync_mode
        row["note"] = f"opened with O_{sync_mode.upper()}: each write is durable when it completes"
    return row


def ensure_tool(binary: str, package: str) -> bool:
    """True when ``binary`` is on PATH, installing Debian's ``package`` with apt-get as root if needed."""
    if shutil.which(binary):
        return True
    cmd = f"apt-get update -q && apt-get install -y -q {package}"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"{binary} is missing; installing Debian's {package}: {cmd}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, stdout=subprocess.DEVNULL)
        return bool(shutil.which(binary))
    log(f"{binary} is missing and this is not root; install it with:  sudo {cmd}")
    return False


def layout_fio_file(path: str, size: int) -> None:
    """Write fio's test file in full (an fallocated file reads as zeros without touching the device,
    and its first writes change extents): with fio when installed, else from Python, O_DIRECT."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    log(f"fio: writing the {size // MIB} MiB test file {path}")
    if shutil.which("fio"):
        subprocess.run(
            ["fio", "--name=layout", f"--filename={path}", f"--size={size}", "--rw=write", "--bs=1m",
             "--direct=1", "--ioengine=io_uring", "--iodepth=8", "--output-format=terse"],
            stdout=subprocess.DEVNULL, check=False,
        )
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(MIB))
        for off in range(0, size, MIB):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


class Fio:
    """fio jobs on one file under the work directory (laid out with real writes first)."""

    def __init__(self, workdir: str, mode: dict, size: int):
        self.path = os.path.join(workdir, "fio.dat")
        self.workdir = workdir
        self.mode = mode
        self.size = size
        self.ok = False

    def start(self) -> list[str]:
        if not ensure_tool("fio", "fio"):
            for name in FIO_JOBS:
                log("skipped (no fio): " + shlex.join(fio_command(name, self.path, self.size, self.mode)))
            return ["fio is not installed"]
        layout_fio_file(self.path, self.size)
        self.ok = True
        return []

    def run(self, name: str) -> tuple[dict | None, list[str]]:
        """Run job ``name``; (row, errors)."""
        if not self.ok:
            return None, []
        out = os.path.join(self.workdir, f"fio-{name}.json")
        argv = fio_command(name, self.path, self.size, self.mode, json_out=out)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, [f"fio {name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
        try:
            with open(out) as f:
                text = f.read()
            doc = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
            row = parse_fio(doc, name)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            return None, [f"fio {name}: cannot parse its JSON: {exc}"]
        row["command"] = shlex.join(argv[:-1])
        log(f"fio: {name}: {row['ops_per_s']:.0f} op/s {row['bytes_per_s'] / MIB:.1f} MiB/s "
            f"p50 {row['p50_us']:.0f} µs p99 {row['p99_us']:.0f} µs")
        return row, []

    def stop(self) -> list[str]:
        return []


class GroupCommitSide:
    """The group-commit ceiling (bench/groupcommit.py) on fio's file: durable rounds' I/O at a
    concurrency with no daemon, in its own process; a row per :data:`GROUPCOMMIT_RUNS` run whose
    figures are the best shape's (``shape``, ``rounds_in_flight``; every shape in ``shapes``)."""

    def __init__(self, workdir: str, mode: dict, size: int):
        self.path = os.path.join(workdir, "fio.dat")
        self.mode = mode
        self.size = size
        self.ok = False

    def start(self) -> list[str]:
        layout_fio_file(self.path, self.size)
        self.ok = os.path.exists(self.path)
        return [] if self.ok else [f"groupcommit: no test file {self.path}"]

    def argv(self, name: str) -> list[str]:
        # it measures seven shapes one after another: in quick mode (a harness check in under a
        # minute) each gets 0.3 s
        quick = self.mode["duration"] < 1
        return [sys.executable, os.path.join(ROOT, "bench", "groupcommit.py"), "--file", self.path,
                "--conc", str(GROUPCOMMIT_RUNS[name]), "--duration", str(0.3 if quick else self.mode["duration"]),
                "--warmup", str(0.05 if quick else min(0.5, self.mode["warmup"]))]

    def run(self, name: str) -> tuple[dict | None, list[str]]:
        """Run ``name``; (row, errors)."""
        if not self.ok:
            return None, []
        argv = self.argv(name)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, [f"groupcommit {name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
        try:
            doc = json.loads(proc.stdout)
            best = doc["best"]
        except (ValueError, KeyError) as exc:
            return None, [f"groupcommit {name}: cannot parse its JSON: {exc}"]
        row = {"system": "groupcommit", "workload": name, "concurrency": best["concurrency"],
               "block_size": 4 * KIB, "ops_per_s": best["ops_per_s"], "bytes_per_s": best["ops_per_s"] * 4 * KIB,
               "p50_us": best["p50_us"], "p99_us": best["p99_us"], "shape": best["shape"],
               "rounds_in_flight": best["rounds_in_flight"], "values_per_round": best["values_per_round"],
               "shapes": doc["results"], "command": shlex.join(argv)}
        log(f"groupcommit: {name}: best {best['ops_per_s']:.0f} acknowledged writes/s ({best['shape']}, "
            f"{best['rounds_in_flight']} rounds in flight); "
            + ", ".join(f"{r['shape']}/{r['rounds_in_flight']} {r['ops_per_s']:.0f}" for r in doc["results"]))
        return row, []

    def stop(self) -> list[str]:
        return []


# -- ringblob: the daemon -------------------------------------------------------------------------


def ringblob_binary() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ringblob")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("ringblob")
    if found:
        return [found]
    return [sys.executable, "-m", "ringblob.cli"]


class DaemonStartError(RuntimeError):
    """``ringblob serve`` exited before it answered; ``status`` is its exit status
    (``ringblob.serve.EXIT_LOCKED`` when another process holds the data file)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Daemon:
    """``ringblob serve`` as a subprocess with its log in ``workdir``; ``start()`` waits for its socket."""

    def __init__(self, workdir: str, data: str, size: int, engine: str, extra: list[str] | None = None):
        self.workdir = workdir
        self.data = data
        self.size = size
        self.engine = engine
        self.socket = os.path.join(workdir, f"rb-{engine}.sock")
        self.log_path = os.path.join(workdir, f"ringblob-{engine}.log")
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.stat: dict = {}

    @property
    def argv(self) -> list[str]:
        return ringblob_binary() + [
            "serve", "--data", self.data, "--size", str(self.size), "--socket", self.socket,
            "--metrics-addr", "", "--engine", self.engine, *self.extra,
        ]

    def log_tail(self, n: int = 2000, since: int = 0) -> str:
        """The last ``n`` bytes of the daemon's log, of what was written at or after byte ``since``."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[since:][-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    @staticmethod
    def reason(tail: str) -> str:
        """The line of a failed start's output that says why: the CLI's ``ringblob serve: ...`` error
        line, else the last line."""
        lines = [line for line in tail.splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("ringblob serve:")]
        return (said or lines or ["no output"])[-1].strip()

    def start(self, timeout: float = 120.0) -> None:
        from ringblob.client import Client

        if os.path.exists(self.socket):
            os.unlink(self.socket)
        logf = open(self.log_path, "ab")
        since = logf.tell()  # this start's output: a failure names its own reason, not an earlier run's
        log("daemon: " + shlex.join(self.argv))
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail(since=since)
                raise DaemonStartError(f"ringblob serve exited with status {self.proc.returncode}: "
                                       f"{self.reason(tail)}\n{tail}", self.proc.returncode)
            if os.path.exists(self.socket):
                try:
                    with Client(self.socket, timeout=5) as c:
                        c.ping()
                        try:
                            self.stat = c.stat()
                        except Exception as exc:  # noqa: BLE001 - STAT is informative only
                            self.stat = {"error": repr(exc)}
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ringblob serve did not answer on {self.socket} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        got = self.stat.get("engine")
        if got and got != self.engine:
            self.stop()
            raise RuntimeError(f"asked for --engine {self.engine} but the daemon reports engine {got!r}")
        log(f"daemon: ready (pid {self.proc.pid}, engine {got or self.engine})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"daemon {proc.pid} ignored SIGTERM for {timeout:.0f} s; killing it")
                proc.kill()
                proc.wait()
        return proc.returncode


# -- ringblob: load generator (child processes) ----------------------------------------------------


@dataclass
class Spec:
    """What one load-generating process does (a :func:`_child` or a bench/loadgen.c process)."""

    socket: str
    op: str  # ping | get | put_sync | put_nosync_flush | get_big | put_big | fill | fill_big (fill: Python only)
    size: int  # value bytes
    share: int  # concurrent requests this process keeps in flight
    keys: int  # key space
    seed: int
    duration: float = 0.0
    warmup: float = 0.0
    key_lo: int = 0  # fill: [key_lo, key_hi)
    key_hi: int = 0
    flush_every: int = FLUSH_EVERY


def get_key(i: int) -> bytes:
    return b"g%09d" % i


def big_key(i: int) -> bytes:
    return b"G%06d" % i


def put_key(i: int) -> bytes:
    return b"p%09d" % i


def big_put_key(i: int) -> bytes:
    return b"P%06d" % i


def _child(spec: Spec, ready, go, start_at, results) -> None:
    try:
        import uvloop  # noqa: F401

        runner = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    try:
        out = runner(_load(spec, ready, go, start_at))
        out["loop"] = loop_name
    except BaseException as exc:  # noqa: BLE001 - report to the parent, never hang it
        ready.put(("error", repr(exc)))
        out = {"error": f"{type(exc).__name__}: {exc}"}
    results.put(out)


async def _load(spec: Spec, ready, go, start_at) -> dict:
    from ringblob.client import AsyncClient

    client = AsyncClient(spec.socket)
    await client.connect()
    rnd = random.Random(spec.seed)
    value = rnd.randbytes(spec.size)
    if spec.op in ("fill", "fill_big"):
        return await _fill(client, spec, value, ready)
    ready.put(("ready", spec.seed))
    go.wait()  # blocking on purpose: nothing else runs on this loop yet
    t_meas = start_at.value
    t_end = t_meas + spec.duration
    lat = array("d")
    flush_lat = array("d")
    state = {"done": 0, "errors": 0, "first_error": None, "cpu0": None, "cpu1": None, "puts": 0}
    clock = time.perf_counter

    op = spec.op
    n = spec.keys
    if op in ("get", "get_big"):
        keyf = get_key if op == "get" else big_key
        keys = [keyf(i) for i in range(n)]
    else:
        keyf = put_key if op != "put_big" else big_put_key
        keys = [keyf(i) for i in range(n)]
    sync = op == "put_sync"
    size = spec.size

    async def one(i: int) -> None:
        r = random.Random(spec.seed * 7919 + i)
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            key = keys[r.randrange(n)]
            try:
                if op == "ping":
                    await client.ping()
                elif op in ("get", "get_big"):
                    got = await client.get(key)
                    if len(got) != size:
                        raise AssertionError(f"GET {key!r} returned {len(got)} bytes, expected {size}")
                else:
                    await client.put(key, value, sync=sync)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                state["errors"] += 1
                if state["first_error"] is None:
                    state["first_error"] = f"{type(exc).__name__}: {exc}"
                if state["errors"] > 1000:
                    raise
                continue
            t1 = clock()
            if t0 >= t_meas and t1 <= t_end:
                lat.append(t1 - t0)
            if op == "put_nosync_flush":
                state["puts"] += 1
                if state["puts"] % spec.flush_every == 0:
                    f0 = clock()
                    await client.flush()
                    if f0 >= t_meas:
                        flush_lat.append(clock() - f0)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, t_meas - clock()))
        state["cpu0"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - clock()))
        state["cpu1"] = time.process_time()

    marks = asyncio.ensure_future(cpu_marks())
    await asyncio.gather(*(one(i) for i in range(spec.share)))
    await marks
    if op == "put_nosync_flush" or op == "put_big":
        await client.flush()
    await client.close()
    return {
        "lat": lat.tobytes(),
        "flush_lat": flush_lat.tobytes(),
        "errors": state["errors"],
        "first_error": state["first_error"],
        "cpu_s": (state["cpu1"] or 0) - (state["cpu0"] or 0),
    }


async def _fill(client, spec: Spec, value: bytes, ready) -> dict:
    keyf = get_key if spec.op == "fill" else big_key
    it = iter(range(spec.key_lo, spec.key_hi))

    async def one() -> None:
        for i in it:
            v = value[: len(value) - 16] + b"%016d" % i  # distinct content per key
            await client.put(keyf(i), v, sync=False)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(spec.share)))
    await client.flush()
    await client.close()
    return {"fill_s": time.perf_counter() - t0, "count": spec.key_hi - spec.key_lo}


def run_load(specs: list[Spec], warmup: float, duration: float, pid: int | None) -> dict:
    """Start one process per spec, release them together, and merge what they measured.

    The load comes from :data:`LOADGEN`'s generator: ``native`` runs one
    bench/loadgen.c process per spec, ``python`` one ``multiprocessing`` child
    per spec (:func:`_child`). Filling the data set (``fill``/``fill_big``
    specs) always runs in Python: it is not measured.
    """
    fill = specs[0].op.startswith("fill")
    if LOADGEN["kind"] == "native" and not fill:
        return _run_native(specs, warmup, duration, pid)
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_child, args=(s, ready, go, start_at, results), daemon=True) for s in specs]
    for p in procs:
        p.start()
    errors: list[str] = []
    if not fill:
        for _ in procs:
            kind, what = ready.get(timeout=60)
            if kind == "error":
                errors.append(what)
        start_at.value = time.perf_counter() + warmup
        go.set()
        # Sample the daemon and the host over the measured window.
        samples = _sample_window(start_at.value, duration, pid, time.perf_counter)
    outs = [results.get(timeout=max(120.0, duration * 4)) for _ in procs]
    for p in procs:
        p.join(10)
    errors += [o["error"] for o in outs if "error" in o]
    if fill:
        return {"errors": errors, "fill_s": max((o.get("fill_s", 0) for o in outs), default=0)}
    return _merge(specs, outs, errors, duration, pid, samples)


def _sample_window(t_meas: float, duration: float, pid: int | None, clock) -> tuple:
    """Sleep through the measured window [t_meas, t_meas + duration] (times on ``clock``), sampling the
    daemon's CPU seconds and the host's busy/total jiffies at both ends: (d0, d1, h0, h1)."""
    time.sleep(max(0.0, t_meas - clock()))
    d0 = proc_cpu(pid) if pid else 0.0
    h0 = host_cpu()
    time.sleep(max(0.0, t_meas + duration - clock()))
    d1 = proc_cpu(pid) if pid else 0.0
    h1 = host_cpu()
    return d0, d1, h0, h1


def _merge(specs: list[Spec], outs: list[dict], errors: list[str], duration: float, pid: int | None, samples: tuple) -> dict:
    """One result from the load processes' outputs (each: ``lat``/``flush_lat`` float64 seconds as bytes,
    ``errors``, ``first_error``, ``cpu_s``, ``loop``) and the window's CPU samples."""
    import numpy as np

    d0, d1, h0, h1 = samples
    lat = np.concatenate([np.frombuffer(o["lat"], dtype=np.float64) for o in outs if "lat" in o] or [np.zeros(0)])
    flush_lat = np.concatenate([np.frombuffer(o["flush_lat"], dtype=np.float64) for o in outs if "flush_lat" in o] or [np.zeros(0)])
    req_errors = sum(o.get("errors", 0) for o in outs)
    first = next((o["first_error"] for o in outs if o.get("first_error")), None)
    if first:
        errors.append(f"{req_errors} request(s) failed; first: {first}")
    ops = int(lat.size)
    out = {
        "ops": ops,
        "duration_s": duration,
        "ops_per_s": ops / duration,
        "bytes_per_s": ops * specs[0].size / duration,
        "block_size": specs[0].size,
        **percentiles(lat),
        "client_processes": len(specs),
        "load_generator": LOADGEN["kind"],
        "client_loop": next((o.get("loop") for o in outs if o.get("loop")), None),
        "client_cpu_cores": sum(o.get("cpu_s", 0) for o in outs) / duration,
        "request_errors": req_errors,
        "errors": errors,
    }
    if flush_lat.size:
        out["flushes"] = int(flush_lat.size)
        out["flush_p50_us"] = float(np.percentile(flush_lat, 50) * 1e6)
        out["flush_p99_us"] = float(np.percentile(flush_lat, 99) * 1e6)
    if pid:
        out["daemon_cpu_cores"] = (d1 - d0) / duration
        out["daemon_cpu_us_per_op"] = (d1 - d0) / ops * 1e6 if ops else None
    busy, total = h1[0] - h0[0], h1[1] - h0[1]
    out["host_cpu_busy"] = busy / total if total else None
    if total:
        # CPU used by everything else on the host (other jobs, kernel threads): the noise indicator
        cores = busy / total * (os.cpu_count() or 1)
        out["other_cpu_cores"] = max(0.0, cores - out["client_cpu_cores"] - out.get("daemon_cpu_cores", 0.0))
    return out


# -- ringblob: the native load generator (bench/loadgen.c) ------------------------------------------

LOADGEN_SRC = os.path.join(ROOT, "bench", "loadgen.c")
# which load generator run_load uses: "native" (bench/loadgen.c, built into the work directory) or "python"
LOADGEN: dict = {"kind": "python", "binary": None, "workdir": None}


def build_loadgen(workdir: str) -> str:
    """Compile bench/loadgen.c to ``workdir``/loadgen with ``cc`` when the binary is missing or older
    than the source; its path. Raises RuntimeError when there is no ``cc`` or the compile fails."""
    binary = os.path.join(workdir, "loadgen")
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(LOADGEN_SRC):
        return binary
    cc = shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (cc) on PATH")
    tmp = f"{binary}.{os.getpid()}.tmp"
    argv = [cc, "-O2", "-Wall", "-Wextra", "-o", tmp, LOADGEN_SRC]
    log("loadgen: " + shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    if proc.stderr.strip():
        log("loadgen: compiler warnings:\n" + proc.stderr.strip())
    os.replace(tmp, binary)
    return binary


def choose_loadgen(wanted: str | None, workdir: str) -> None:
    """Set :data:`LOADGEN`: ``wanted`` native or python, or None for native when it can be built
    (``cc`` on PATH, or a binary in ``workdir`` newer than bench/loadgen.c).

    An explicit ``native`` that cannot be built raises SystemExit; the default
    falls back to python with one log line saying why.
    """
    LOADGEN["workdir"] = workdir
    if wanted == "python":
        LOADGEN.update(kind="python", binary=None)
        return
    try:
        LOADGEN.update(kind="native", binary=build_loadgen(workdir))
    except (RuntimeError, OSError) as exc:
        if wanted == "native":
            raise SystemExit(f"bench: --loadgen native: cannot build {LOADGEN_SRC}: {exc}")
        log(f"loadgen: cannot build {LOADGEN_SRC} ({str(exc).splitlines()[0]}): the ringblob load comes from "
            "the Python client instead (--loadgen python), which takes CPU from the daemon on a small host")
        LOADGEN.update(kind="python", binary=None)


def loadgen_argv(spec: Spec, lat_path: str, flush_path: str) -> list[str]:
    """The bench/loadgen.c command line for ``spec``; it waits for 'T_MEAS DURATION' on stdin."""
    assert LOADGEN["binary"]
    return [LOADGEN["binary"], "--socket", spec.socket, "--op", spec.op, "--size", str(spec.size),
            "--share", str(spec.share), "--keys", str(spec.keys), "--seed", str(spec.seed),
            "--flush-every", str(spec.flush_every), "--out", lat_path, "--flush-out", flush_path, "--go-stdin"]


def _run_native(specs: list[Spec], warmup: float, duration: float, pid: int | None) -> dict:
    """:func:`run_load` with one bench/loadgen.c process per spec.

    Each prints ``ready`` once connected; then every one gets the same absolute
    CLOCK_MONOTONIC start of the measured window (``time.monotonic()``) and its
    length on stdin, starts its load at once (warm-up until that start) and
    writes its latencies (float64 seconds) to a file and a JSON summary to stdout.
    """
    tmp = tempfile.mkdtemp(prefix="loadgen-", dir=LOADGEN["workdir"])
    procs: list[tuple[subprocess.Popen, str, str]] = []
    errors: list[str] = []
    try:
        for i, s in enumerate(specs):
            lat_path, flush_path = os.path.join(tmp, f"lat-{i}.f64"), os.path.join(tmp, f"flush-{i}.f64")
            p = subprocess.Popen(loadgen_argv(s, lat_path, flush_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            procs.append((p, lat_path, flush_path))
        ready: list[subprocess.Popen] = []
        deadline = time.monotonic() + 60
        for p, _, _ in procs:
            line = ""
            if select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                line = p.stdout.readline()
            if line.strip() == "ready":
                ready.append(p)
            else:
                errors.append(f"loadgen {p.pid} did not get ready: {line.strip()[-300:] or 'no answer within 60 s'}")
        t_meas = time.monotonic() + warmup
        for p in ready:
            try:
                p.stdin.write(f"{t_meas!r} {duration!r}\n")
                p.stdin.flush()
            except OSError as exc:
                errors.append(f"loadgen {p.pid}: cannot start it: {exc}")
        samples = _sample_window(t_meas, duration, pid, time.monotonic)
        outs = []
        for p, lat_path, flush_path in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(120.0, duration * 4))
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            doc = None
            for line in reversed(stdout.splitlines()):
                if line.startswith("{"):
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        pass
                    break
            if doc is None:
                outs.append({"error": f"loadgen {p.pid} exited with status {p.returncode} and no result: "
                                      f"{stderr.strip()[-300:]}"})
                continue
            o = {"errors": doc.get("errors", 0), "first_error": doc.get("first_error"), "cpu_s": doc.get("cpu_s", 0.0),
                 "loop": "native"}
            for key, path in (("lat", lat_path), ("flush_lat", flush_path)):
                try:
                    with open(path, "rb") as f:
                        o[key] = f.read()
                except OSError:
                    pass
            if doc.get("error") or p.returncode != 0:
                o["error"] = f"loadgen {p.pid}: {doc.get('error') or f'exit status {p.returncode}'}"
            outs.append(o)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    errors += [o["error"] for o in outs if "error" in o]
    return _merge(specs, outs, errors, duration, pid, samples)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fill(socket_path: str, op: str, count: int, size: int, procs: int) -> float:
    """Store ``count`` blobs of ``size`` bytes (keys 0..count-1) from ``procs`` processes; seconds taken."""
    t0 = time.perf_counter()
    specs = []
    lo = 0
    for i, n in enumerate(split(count, procs)):
        specs.append(Spec(socket_path, op, size, share=32 if size <= 64 * KIB else 4, keys=count, seed=1000 + i, key_lo=lo, key_hi=lo + n))
        lo += n
    res = run_load(specs, 0, 0, None)
    if res["errors"]:
        raise RuntimeError(f"filling the data set failed: {res['errors'][:3]}")
    return time.perf_counter() - t0


def dataset_present(socket_path: str, get_keys: int, big_keys: int) -> bool:
    from ringblob.client import Client

    try:
        with Client(socket_path, timeout=10) as c:
            probes = [get_key(0), get_key(get_keys - 1), get_key(get_keys // 2), big_key(0), big_key(big_keys - 1)]
            return all(c.has(k) for k in probes)
    except Exception:  # noqa: BLE001
        return False


class RingblobSide:
    """One ``ringblob serve --engine ENGINE`` on its own data file, filled with the GET data set."""

    def __init__(self, engine: str, workdir: str, mode: dict, clients: int, data_size: int,
                 extra: list[str] | None = None):
        self.engine = engine
        self.system = f"ringblob-{engine}"
        self.mode = mode
        self.clients = clients
        # one data file per engine and data-set size, so quick/medium/full runs do not refill each other's
        self.data = os.path.join(workdir, f"ringblob-{engine}-{mode['get_set'] // MIB}M.data")
        self.get_keys = mode["get_set"] // (4 * KIB)
        self.big_keys = mode["big_set"]
        self.daemon = Daemon(workdir, self.data, data_size, engine, extra)  # extra: more `serve` flags
        self.shape = {"size": data_size, "get_set": mode["get_set"], "big_set": self.big_keys}
        self.info: dict = {}
        self.ok = False

    def start(self) -> list[str]:
        from ringblob.serve import EXIT_LOCKED

        # A data file is reused only when it was made for the same data set and size (see .json beside it).
        side = self.data + ".json"
        try:
            with open(side) as f:
                same = json.load(f) == self.shape
        except (OSError, ValueError):
            same = False
        if not same and os.path.exists(self.data):
            log(f"{self.system}: {self.data} was made for another data set; formatting afresh")
            os.unlink(self.data)
        try:
            try:
                self.daemon.start()
            except DaemonStartError as exc:
                if not os.path.exists(self.data) or exc.status == EXIT_LOCKED:
                    raise   # another daemon holds the file: formatting it under that daemon's feet helps nobody
                log(f"{self.system}: the daemon did not start on the existing {self.data} "
                    f"({str(exc).splitlines()[0]}); formatting afresh")
                os.unlink(self.data)
                self.daemon.start()
            self.info = {"argv": self.daemon.argv, "stat": self.daemon.stat, "pid": self.daemon.pid}
            if same and dataset_present(self.daemon.socket, self.get_keys, self.big_keys):
                log(f"{self.system}: the data set from an earlier run is there; reusing it")
            else:
                n = max(2, self.clients)
                log(f"{self.system}: filling {self.get_keys} x 4 KiB blobs ({self.get_keys * 4 // 1024} MiB) "
                    f"and {self.big_keys} x 1 MiB from {n} processes")
                t = fill(self.daemon.socket, "fill", self.get_keys, 4 * KIB, n)
                t2 = fill(self.daemon.socket, "fill_big", self.big_keys, MIB, n)
                self.info["fill_s"] = {"4k": t, "1m": t2}
                with open(side, "w") as f:
                    json.dump(self.shape, f)
                log(f"{self.system}: filled in {t:.1f} s + {t2:.1f} s")
        except (RuntimeError, OSError) as exc:
            self.daemon.stop()
            return [f"ringblob --engine {self.engine}: {exc}"]
        self.ok = True
        return []

    def specs(self, name: str) -> list[Spec]:
        _, op, size, conc = next(w for w in RB_WORKLOADS if w[0] == name)
        procs = CONNECTIONS.get(name) or max(1, min(self.clients, conc))
        keys = {"get": self.get_keys, "get_big": self.big_keys, "put_big": self.mode["big_put_keys"]}.get(op, self.mode["put_keys"])
        return [
            Spec(self.daemon.socket, op, size, share=s, keys=keys, seed=i + 1, duration=self.mode["duration"], warmup=self.mode["warmup"])
            for i, s in enumerate(split(conc, procs))
        ]

    def run(self, name: str) -> tuple[dict | None, list[str]]:
        """Run workload ``name`` (see RB_WORKLOADS); (row, errors)."""
        if not self.ok:
            return None, []
        _, op, size, conc = next(w for w in RB_WORKLOADS if w[0] == name)
        s0 = _stat(self.daemon.socket)
        res = run_load(self.specs(name), self.mode["warmup"], self.mode["duration"], self.daemon.pid)
        row = {"system": self.system, "engine": self.engine, "workload": name, "concurrency": conc, **res}
        row["daemon_counters"] = stat_delta(s0, _stat(self.daemon.socket))
        if op == "put_nosync_flush":
            row["flush_every"] = FLUSH_EVERY
        errors = [f"{self.engine} {name}: {e}" for e in res["errors"]]
        log(f"{self.system}: {name}: {row['ops_per_s']:.0f} op/s {row['bytes_per_s'] / MIB:.1f} MiB/s "
            f"p50 {row.get('p50_us', 0):.0f} µs p99 {row.get('p99_us', 0):.0f} µs; daemon "
            f"{row.get('daemon_cpu_cores', 0):.2f} cores, clients {row['client_cpu_cores']:.2f} cores, "
            f"others {row.get('other_cpu_cores') or 0:.2f} cores"
            + "".join(f", {k} {row['daemon_counters'][k]:.1f}" for k in ("writes_per_group_commit", "sqes_per_enter", "enters_per_request") if k in row["daemon_counters"])
            + (f", fragmentation {row['daemon_counters']['fragmentation']:.2f}" if "fragmentation" in row["daemon_counters"] else "")
            + (f"; {len(res['errors'])} error(s): {res['errors'][0]}" if res["errors"] else ""))
        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            self.ok = False
            errors.append(f"ringblob --engine {self.engine} died during {name}:\n{self.daemon.log_tail()}")
        return row, errors

    def stop(self) -> list[str]:
        if self.ok:
            self.info["stat_after"] = _stat(self.daemon.socket)
        rc = self.daemon.stop()
        if rc not in (0, None, -15):
            return [f"ringblob --engine {self.engine} exited with status {rc} at SIGTERM:\n{self.daemon.log_tail(600)}"]
        return []


STAT_COUNTERS = ("gets", "puts", "fdatasyncs", "dsync_commits", "group_commits", "group_commit_writes",
                 "journal_batches", "journal_bytes_written", "flushes", "flushes_skipped", "checkpoints", "bytes_read",
                 "bytes_written", "values_leased", "values_streamed")


def _sync_methods_note(rows: list) -> str:
    """' Sync puts: ...' naming the sync_method each ringblob engine's store took (from its STAT), or ''."""
    taken: dict = {}
    for r in rows:
        sm = (r.get("daemon_counters") or {}).get("sync_method")
        if sm and r.get("engine"):
            taken.setdefault(r["engine"], sm)
    if not taken:
        return ""
    return (" Sync puts: the store's `sync_method` (default auto, decided by the device's write cache) was "
            + ", ".join(f"{sm} ({eng})" for eng, sm in sorted(taken.items())) + ".")


def stat_delta(s0: dict, s1: dict) -> dict:
    """What the daemon's STAT counters did over a workload (warm-up included), with derived ratios."""
    out: dict = {}
    for k in STAT_COUNTERS:
        if isinstance(s0.get(k), (int, float)) and isinstance(s1.get(k), (int, float)):
            out[k] = s1[k] - s0[k]
    e0, e1 = s0.get("engine_counters") or {}, s1.get("engine_counters") or {}
    for k, v in e1.items():
        if isinstance(v, (int, float)) and isinstance(e0.get(k), (int, float)):
            out["engine_" + k] = v - e0[k]
    if isinstance(s1.get("sync_method"), str):
        out["sync_method"] = s1["sync_method"]  # the one the store took (not a counter)
    for k in ("stream_writes", "parallel_hash", "hash_worker"):  # large PUTs written as they arrive; large
        # values hashed by BLAKE3's pool / the hash worker
        if isinstance(s1.get(k), bool):
            out[k] = s1[k]
    for k in ("fragmentation", "largest_free_bytes"):  # the free space after the workload (not counters):
        if isinstance(s1.get(k), (int, float)):      # past 0.95 small puts fill holes (docs/FORMAT.md)
            out[k] = s1[k]
    reqs = out.get("gets", 0) + out.get("puts", 0)
    if out.get("group_commits"):
        out["writes_per_group_commit"] = out.get("group_commit_writes", 0) / out["group_commits"]
    if out.get("engine_enters"):
        out["sqes_per_enter"] = out.get("engine_sqes", 0) / out["engine_enters"]
        if reqs:
            out["enters_per_request"] = out["engine_enters"] / reqs
    return out


def _stat(socket_path: str) -> dict:
    from ringblob.client import Client

    try:
        with Client(socket_path, timeout=10) as c:
            return c.stat()
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


# -- Redis --------------------------------------------------------------------------------------


class RedisSide:
    """redis-server (AOF, appendfsync always, Unix socket only) driven by redis-benchmark -d 4096."""

    def __init__(self, workdir: str, mode: dict):
        self.mode = mode
        self.rdir = os.path.join(workdir, "redis")
        self.sock = os.path.join(self.rdir, "redis.sock")
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.ok = False

    def start(self) -> list[str]:
        if not (ensure_tool("redis-server", "redis-server") and ensure_tool("redis-benchmark", "redis-tools")):
            for name, test, c in REDIS_RUNS:
                log("skipped (no redis): " + shlex.join(_redis_bench_argv(self.sock, test, c, 100000)))
            return ["redis-server / redis-benchmark are not installed"]
        shutil.rmtree(self.rdir, ignore_errors=True)
        os.makedirs(self.rdir)
        conf = os.path.join(self.rdir, "redis.conf")
        with open(conf, "w") as f:
            f.write(
                "port 0\n"
                f"unixsocket {self.sock}\n"
                "unixsocketperm 700\n"
                f"dir {self.rdir}\n"
                "appendonly yes\n"
                "appendfsync always\n"
                "auto-aof-rewrite-percentage 0\n"
                'save ""\n'
                "daemonize no\n"
                f"logfile {os.path.join(self.rdir, 'redis.log')}\n"
            )
        argv = ["redis-server", conf]
        log("redis: " + shlex.join(argv))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        with open(conf) as f:
            self.info = {"config": f.read(), "version": _cmd_out(["redis-server", "--version"])}
        try:
            deadline = time.monotonic() + 30
            while not _redis_ping(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not come up on {self.sock}")
                time.sleep(0.05)
            checked = {k: _redis_cmd(self.sock, "CONFIG", "GET", k) for k in ("appendonly", "appendfsync", "port")}
            self.info["checked"] = checked
            if checked.get("appendfsync") != "always" or checked.get("appendonly") != "yes":
                raise RuntimeError(f"redis-server did not take the AOF settings: {checked}")
            # the GET runs read keys that exist: SET most of the key space first (not measured)
            n = 3 * REDIS_KEYSPACE
            subprocess.run(_redis_bench_argv(self.sock, "set", 32, n), capture_output=True, timeout=600, check=True)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.stop()
            return [f"redis: {exc}"]
        self.ok = True
        return []

    def run(self, name: str) -> tuple[dict | None, list[str]]:
        """Run redis-benchmark for ``name`` (see REDIS_RUNS), sized by a pilot run; (row, errors)."""
        if not self.ok or self.proc is None:
            return None, []
        _, test, c = next(r for r in REDIS_RUNS if r[0] == name)
        try:
            pilot_n = max(200, 20 * c)
            pilot = _redis_bench(self.sock, test, c, pilot_n, self.proc.pid)
            n = int(max(pilot_n, min(2_000_000, pilot["ops_per_s"] * (self.mode["duration"] + self.mode["warmup"]))))
            row = _redis_bench(self.sock, test, c, n, self.proc.pid)
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            return None, [f"redis {name}: {exc}"]
        row.update({"system": "redis", "workload": name, "concurrency": c, "block_size": 4 * KIB if test in ("set", "get") else 0})
        log(f"redis: {name}: {row['ops_per_s']:.0f} op/s p50 {row['p50_us']:.0f} µs p99 {row['p99_us']:.0f} µs "
            f"(n={n}, redis-server {row['daemon_cpu_cores']:.2f} cores)")
        return row, []

    def stop(self) -> list[str]:
        proc, self.proc = self.proc, None
        if proc is None:
            return []
        self.info["aof_bytes"] = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(self.rdir)
                                     for fn in fns if ".aof" in fn)
        self.info["fsync_note"] = ("appendfsync always: redis-server writes and fsyncs the AOF once per event-loop "
                                   "turn, for every write command of that turn (group commit)")
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(self.rdir, ignore_errors=True)
        return []


def _redis_ping(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(sock)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _redis_cmd(sock: str, *args: str) -> str:
    """Send one command (RESP) over the Unix socket; the value of a 2-element array reply, else the raw reply."""
    req = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(req.encode())
        time.sleep(0.05)
        reply = s.recv(65536).decode("utf-8", "replace")
    parts = reply.split("\r\n")
    return parts[4] if reply.startswith("*2") and len(parts) > 4 else reply.strip()


def _redis_bench_argv(sock: str, test: str, c: int, n: int) -> list[str]:
    return ["redis-benchmark", "-s", sock, "-t", test, "-d", "4096", "-c", str(c), "-n", str(n),
            "-r", str(REDIS_KEYSPACE), "--csv"]


def _redis_bench(sock: str, test: str, c: int, n: int, pid: int) -> dict:
    argv = _redis_bench_argv(sock, test, c, n)
    d0 = proc_cpu(pid)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    d1 = proc_cpu(pid)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    rec = None
    for r in csv.DictReader(io.StringIO(proc.stdout)):
        if r.get("test", "").upper().replace("_", "") .startswith(test.upper().replace("_", "")):
            rec = r
    if rec is None:
        raise ValueError(f"no {test.upper()} row in redis-benchmark's CSV output: {proc.stdout[-300:]!r}")
    return {
        "ops_per_s": float(rec["rps"]),
        "bytes_per_s": float(rec["rps"]) * 4 * KIB if test in ("set", "get") else 0.0,
        "p50_us": float(rec["p50_latency_ms"]) * 1000,
        "p99_us": float(rec["p99_latency_ms"]) * 1000,
        "mean_us": float(rec["avg_latency_ms"]) * 1000,
        "ops": n,
        "duration_s": wall,
        "daemon_cpu_cores": (d1 - d0) / wall if wall else 0,
        "command": shlex.join(argv),
    }


# -- comparisons and targets -----------------------------------------------------------------------


def index(rows: list[dict]) -> dict:
    return {(r["system"], r["workload"]): r for r in rows}


def ratios(rows: list[dict]) -> list[dict]:
    """For each ringblob row: its throughput over fio's, Redis's and the psync engine's."""
    idx = index(rows)
    out = []
    for r in rows:
        if not r["system"].startswith("ringblob-"):
            continue
        fio_name, redis_name = COUNTERPARTS.get(r["workload"], (None, None))
        rec = {"system": r["system"], "workload": r["workload"]}
        f = idx.get(("fio", fio_name))
        if f and f["ops_per_s"]:
            rec["fio_workload"] = fio_name
            rec["vs_fio"] = r["ops_per_s"] / f["ops_per_s"]
        red = idx.get(("redis", redis_name))
        if red and red["ops_per_s"]:
            rec["redis_workload"] = redis_name
            rec["vs_redis"] = r["ops_per_s"] / red["ops_per_s"]
        if r["system"] == "ringblob-uring":
            p = idx.get(("ringblob-psync", r["workload"]))
            if p and p["ops_per_s"]:
                rec["vs_psync"] = r["ops_per_s"] / p["ops_per_s"]
        out.append(rec)
    return out


def _compare(idx: dict, name: str, a: tuple, b: tuple, need: float | None, metric: str = "ops_per_s",
             strict: bool = False) -> dict:
    """Row ``a`` over row ``b`` (``(system, workload)`` keys of ``idx``) by ``metric``: the ratio of the
    median rounds and, where both sides ran several rounds, each round's. With a ``need`` (a target)
    also PASS / MISS (n/a when a side is missing; MISS when ``a`` had request errors) and the rounds
    passing; without one (a reference) just the ratios."""
    ra, rb = idx.get(a), idx.get(b)
    rec = {"target": name, "need": need, "a": "/".join(a), "b": "/".join(b), "metric": metric}
    if not ra or not rb or not rb.get(metric) or ra.get("request_errors"):
        rec["ratio"] = None
        if need is not None:
            rec["result"] = "n/a" if not (ra and ra.get("request_errors")) else "MISS"
        if ra and ra.get("request_errors"):
            rec["why"] = f"{ra['request_errors']} request errors"
        return rec
    rec["ratio"] = ra[metric] / rb[metric]
    rounds = per_round(ra, rb, metric)
    if rounds:  # the honest spread: the result is the ratio of the medians, but each round has its own
        rec["per_round"] = rounds
    if need is not None:
        ok = rec["ratio"] > need if strict else rec["ratio"] >= need
        rec["result"] = "PASS" if ok else "MISS"
        if rounds:
            rec["rounds_passing"] = sum(1 for x in rounds if (x > need if strict else x >= need))
    return rec


def references(rows: list[dict]) -> list[dict]:
    """The like-for-like references (:data:`REFERENCES`: durability, connection shape): ratios only,
    not targets."""
    idx = index(rows)
    return [_compare(idx, label, a, b, None) for label, a, b in REFERENCES]


def targets(rows: list[dict]) -> list[dict]:
    """The targets of issue 5, each with its measured ratio and PASS / MISS (n/a when a side is missing)."""
    idx = index(rows)

    def t(*args, **kw) -> dict:  # _compare over this run's rows
        return _compare(idx, *args, **kw)

    U = "ringblob-uring"
    out = [
        t("4 KiB GET c32 >= 0.6x fio randread QD32 IOPS", (U, "get_4k_c32"), ("fio", "randread_4k_qd32"), 0.6),
        t("4 KiB PUT sync c32 >= 1.5x Redis SET c32 (appendfsync always)", (U, "put_4k_sync_c32"), ("redis", "set_c32"), 1.5),
        t("4 KiB PUT sync c32 >= 0.8x fio randwrite QD32 fdatasync=32", (U, "put_4k_sync_c32"), ("fio", "randwrite_4k_qd32_fdatasync32"), 0.8),
        t("1 MiB GET c8 >= 0.7x fio seq read QD8 bandwidth", (U, "get_1m_c8"), ("fio", "read_1m_qd8"), 0.7, "bytes_per_s"),
        t("1 MiB PUT c8 >= 0.7x fio seq write QD8 bandwidth", (U, "put_1m_c8"), ("fio", "write_1m_qd8"), 0.7, "bytes_per_s"),
    ]
    for name, op, _, conc in RB_WORKLOADS:
        if conc >= 32 and op != "ping":  # PING does no I/O: no engine to compare
            out.append(t(f"uring ahead of psync: {name}", (U, name), ("ringblob-psync", name), 1.0, strict=True))
    return out


# -- report ---------------------------------------------------------------------------------------

SYSTEM_ORDER = ["fio", "ringblob-uring", "ringblob-psync", "redis"]


def _fmt(x, nd=0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    rows = doc["results"]
    idx = index(rows)
    rat = {(r["system"], r["workload"]): r for r in doc["ratios"]}
    lines = [
        f"# ringblob benchmark ({doc['mode']} mode)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_bytes'] / 2**30:.0f} GiB RAM, kernel {m['kernel']}, "
        f"{m['os']}; files on {m['filesystem']} ({m['workdir']})"
        + (f", device write cache {m['write_cache']}" if m.get("write_cache") else "")
        + f". {m['fio'] or 'fio missing'}; "
        f"{(m['redis'] or 'redis missing').split(' sha=')[0]}; git {m['git_commit']}; {m['date_utc']} UTC.",
        "",
    ]
    if m.get("note"):
        lines += [f"**Note:** {m['note']}."
                  + (f" Every benchmarked process (fio, redis-server and redis-benchmark, both daemons, the clients) "
                     f"ran at nice {doc['nice']}." if doc.get("nice") else "")
                  + (f" Each configuration ran {doc['repeat']} times; the table shows the median." if doc.get("repeat", 1) > 1 else ""),
                  ""]
    lines += [
        f"Load: ringblob from {doc['clients']} client processes ("
        + ("native C load generator (bench/loadgen.c), one connection per process, each pipelining its share of "
           "the concurrency" if doc.get("load_generator") == "native"
           else "each one pipelining `AsyncClient`, sharing the concurrency")
        + "".join(f"; {w} from {n} processes of one request each" for w, n in CONNECTIONS.items())
        + f"), {doc['mode_params']['duration']:.1f} s measured after "
        f"{doc['mode_params']['warmup']:.1f} s warm-up per configuration; 4 KiB GETs read random keys over "
        f"{doc['mode_params']['get_set'] // MIB} MiB of blobs, 1 MiB GETs over {doc['mode_params']['big_set']} blobs. "
        "Every read is O_DIRECT, so the page cache plays no part for fio or ringblob; Redis serves GET from RAM."
        + _sync_methods_note(rows)
        + (f" Daemon flags: `{shlex.join(doc['serve_flags'])}`." if doc.get("serve_flags") else ""),
        "",
        "## Summary",
        "",
        "Throughput (4 KiB and PING: ops/s; 1 MiB: MiB/s) and p99 latency, each ringblob engine beside its fio and Redis counterpart.",
        "",
        "| workload | fio | ringblob uring | ringblob psync | Redis | uring / fio | uring / Redis | p99 µs fio / uring / Redis |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _op, size, _conc in RB_WORKLOADS:
        fio_name, redis_name = COUNTERPARTS[name]
        metric, scale = ("bytes_per_s", MIB) if size >= MIB else ("ops_per_s", 1)
        cells = []
        for sysname, wl in (("fio", fio_name), ("ringblob-uring", name), ("ringblob-psync", name), ("redis", redis_name)):
            r = idx.get((sysname, wl)) if wl else None
            cells.append(r)
        u = cells[1]

        def val(r):
            return _fmt(r[metric] / scale) if r else "–"

        def ratio(r):
            return _fmt(u[metric] / r[metric], 2) if (u and r and r.get(metric)) else "–"

        p99 = " / ".join(_fmt(r.get("p99_us")) if r else "–" for r in (cells[0], cells[1], cells[3]))
        lines.append(f"| {name} | {val(cells[0])} | {val(cells[1])} | {val(cells[2])} | {val(cells[3])} | "
                     f"{ratio(cells[0])} | {ratio(cells[3])} | {p99} |")
    lines += [
        "",
        "## All figures",
        "",
        "| workload | system | conc | ops/s | MiB/s | p50 µs | p99 µs | vs fio | vs Redis | uring/psync | CPU µs/op | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, _, _conc in RB_WORKLOADS:
        fio_name, redis_name = COUNTERPARTS[name]
        for sysname, wl in (("fio", fio_name), ("ringblob-uring", name), ("ringblob-psync", name), ("redis", redis_name)):
            r = idx.get((sysname, wl)) if wl else None
            if r is None:
                continue
            ra = rat.get((sysname, wl), {})
            label = {"fio": f"fio {wl}", "redis": f"redis {wl.replace('_c', ' c').upper().replace(' C', ' c')}"}.get(sysname, name)
            lines.append(
                f"| {label} | {sysname} | {r['concurrency']} | {_fmt(r['ops_per_s'])} | "
                f"{_fmt(r['bytes_per_s'] / MIB, 1)} | {_fmt(r.get('p50_us'))} | {_fmt(r.get('p99_us'))} | "
                f"{_fmt(ra.get('vs_fio'), 2)} | {_fmt(ra.get('vs_redis'), 2)} | {_fmt(ra.get('vs_psync'), 2)} | "
                f"{_fmt(r.get('daemon_cpu_us_per_op', r.get('cpu_us_per_op')))} | {_fmt(r.get('other_cpu_cores'), 2)} |"
            )
        lines.append("| | | | | | | | | | | | |")
    if lines[-1].startswith("| | "):
        lines.pop()
    other = [r for r in rows if r["system"] == "fio" and r["workload"] not in {c[0] for c in COUNTERPARTS.values()}]
    if other:
        lines += ["", "Other fio runs:", "",
                  "| fio job | QD | sync | ops/s | MiB/s | p50 µs | p99 µs |", "|---|---:|---|---:|---:|---:|---:|"]
        for r in other:
            sync = (f"O_{r['sync'].upper()}" if r.get("sync")
                    else f"fdatasync every {r['fdatasync_every']}" if r.get("fdatasync_every") else "–")
            lines.append(f"| {r['workload']} | {r['concurrency']} | {sync} | {_fmt(r['ops_per_s'])} | "
                         f"{_fmt(r['bytes_per_s'] / MIB, 1)} | {_fmt(r['p50_us'])} | {_fmt(r['p99_us'])} |")
    ceil = [r for r in rows if r["system"] == "groupcommit"]
    if ceil:
        lines += ["", "Group-commit ceiling (bench/groupcommit.py on fio's file through ringblob's engine, no daemon, "
                  "socket or client: each 4 KiB write acknowledged once an fdatasync that began after it completed "
                  "succeeded, an acknowledged slot's next write ready at once; a round's values are one merged "
                  "write, `journal` adds a 4 KiB journal write beside it as ringblob's rounds do, `minimal-dsync` "
                  "writes it with RWF_DSYNC instead of following it with an fdatasync; the best shape is the "
                  "row's figure):", "",
                  "| run | in flight | best shape | acknowledged writes/s | values per round | p50 µs | p99 µs | "
                  "every shape (rounds in flight: writes/s) |", "|---|---:|---|---:|---:|---:|---:|---|"]
        for r in ceil:
            shapes = ", ".join(f"{x['shape']} {x['rounds_in_flight']}: {_fmt(x['ops_per_s'])}" for x in r.get("shapes", []))
            lines.append(f"| {r['workload']} | {r['concurrency']} | {r.get('shape', '–')} {r.get('rounds_in_flight', '')} | "
                         f"{_fmt(r['ops_per_s'])} | {_fmt(r.get('values_per_round'), 1)} | {_fmt(r.get('p50_us'))} | "
                         f"{_fmt(r.get('p99_us'))} | {shapes or '–'} |")
    lines += ["", "## Targets (ratios within this run)", "",
              "The ratio is of the two sides' median rounds; `per round` divides the figures each round "
              "took moments apart (a stalled round of either side shows there as an outlier).", "",
              "| target | ratio | need | result | per round | rounds passing |", "|---|---:|---:|---|---|---:|"]
    for t in doc["targets"]:
        pr = t.get("per_round")
        spread = " / ".join(f"{x:.2f}" for x in pr) if pr else "–"
        passing = f"{t['rounds_passing']} of {len(pr)}" if pr else "–"
        lines.append(f"| {t['target']} | {_fmt(t['ratio'], 2)} | {t['need']} | **{t['result']}** | {spread} | {passing} |")
    refs = [r for r in doc.get("references", []) if r.get("ratio") is not None]
    if refs:
        lines += ["", "Like-for-like references (not targets of issue 5). Durability: fio's `--fdatasync=N` with an "
                  "async engine goes out beside the writes still in flight and promises nothing about them "
                  "(io_uring runs an FSYNC in parallel with earlier unfinished writes), so fio's randwrite with an "
                  "fdatasync every 32 writes runs at about the disk's raw write rate (see `randwrite_4k_qd32_fdatasync1` "
                  "in the fio runs: an fdatasync after every write). A `sync=True` put is acknowledged only once "
                  "an fdatasync that began after its write completed has succeeded; fio with O_DSYNC (each "
                  "write durable when it completes) gives the same promise, and the group-commit ceiling above "
                  "measures what such acknowledgements cost the disk alone. Connections: the ringblob rows come "
                  "from a few client processes, each one connection pipelining its share of the concurrency "
                  "(several requests per socket read and reply write), while `redis-benchmark -c 32` opens 32 "
                  "connections of one request each; `put_4k_sync_c32_conn32` drives ringblob that way too.", "",
                  "| reference | ratio | per round |", "|---|---:|---|"]
        for r in refs:
            pr = r.get("per_round")
            spread = " / ".join(f"{x:.2f}" for x in pr) if pr else "–"
            lines.append(f"| {r['target']} | {_fmt(r['ratio'], 2)} | {spread} |")
    lines += [
        "",
        "Notes: `vs fio` divides by the fio job of the same shape (GET ↔ randread, PUT sync ↔ randwrite with "
        "fdatasync every 32 writes (every write at c1), PUT sync=False ↔ randwrite, 1 MiB ↔ sequential, compared "
        "by bandwidth); `vs Redis` divides by redis-benchmark SET (PUT) or GET at the same number of "
        "connections. 4 KiB PUT sync=False sends a FLUSH every "
        f"{FLUSH_EVERY} puts per client process; 1 MiB PUTs are sync=False (fio's writes have no fdatasync either). "
        "`CPU µs/op` is, for ringblob, the daemon's user+system CPU time over the window divided by the requests "
        "served; for fio, fio's own (its JSON's usr_cpu + sys_cpu per I/O; 1 MiB rows: per MiB): nearly all of it "
        "the kernel's work for the I/O, so it is what the same I/O costs any daemon on this machine; "
        "`others' CPU` is what the rest of the host (other jobs, kernel threads, interrupts) used meanwhile, in cores "
        "of the machine's total: the noise gauge. PING rows have no I/O: they show what a request costs "
        "the socket, the event loop and the codec alone (Redis: redis-benchmark PING_MBULK).",
    ]
    if doc.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(doc["results"])
    small = [w for w in RB_WORKLOADS if w[2] == 4 * KIB]  # (PING rows are in the table only)
    big = [w for w in RB_WORKLOADS if w[2] == MIB]
    colors = {"fio": "#777777", "ringblob-uring": "#1f77b4", "ringblob-psync": "#aec7e8", "redis": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [3, 1.1, 3]})

    def bars(ax, wls, metric, scale, ylabel, log=False):
        width = 0.2
        for k, sysname in enumerate(SYSTEM_ORDER):
            xs, ys = [], []
            for i, (name, *_rest) in enumerate(wls):
                fio_name, redis_name = COUNTERPARTS[name]
                wl = {"fio": fio_name, "redis": redis_name}.get(sysname, name)
                r = idx.get((sysname, wl)) if wl else None
                if r and r.get(metric):
                    xs.append(i + (k - 1.5) * width)
                    ys.append(r[metric] / scale)
            if xs:
                ax.bar(xs, ys, width, label=sysname, color=colors[sysname])
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels([w[0] for w in wls], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], small, "ops_per_s", 1000, "thousand ops/s (4 KiB)")
    axes[0].set_title("4 KiB throughput (fio / Redis: counterpart job)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    bars(axes[1], big, "bytes_per_s", MIB, "MiB/s (1 MiB)")
    axes[1].set_title("1 MiB bandwidth")
    bars(axes[2], small, "p99_us", 1, "p99 latency µs (log)", log=True)
    axes[2].set_title("4 KiB p99 latency")
    m = doc["machine"]
    fig.suptitle(f"ringblob vs fio vs Redis — {m['nproc']} CPUs {m['cpu_model']}, kernel {m['kernel']}, "
                 f"{m['filesystem'].split()[0] if m['filesystem'] else ''} ({doc['mode']} mode, {m['date_utc']} UTC)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- profile ---------------------------------------------------------------------------------------

PROFILE_WORKLOADS = ("get_4k_c32", "put_4k_sync_c32", "put_4k_nosync_flush_c32", "get_1m_c8", "put_1m_c8")


def pyspy_binary() -> str | None:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else shutil.which("py-spy")


def summarize_collapsed(text: str, top: int = 25) -> tuple[str, int]:
    """Top functions by own samples and by inclusive samples from py-spy's collapsed (raw) stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n
    out = io.StringIO()
    if not total:
        return "(no samples)\n", 0
    out.write(f"{total} samples\n\nby own time (where the CPU is):\n")
    for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.write(f"  {100 * n / total:5.1f}%  {fr}\n")
    out.write("\nby inclusive time (the function and what it calls):\n")
    for fr, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.write(f"  {100 * n / total:5.1f}%  {fr}\n")
    files: dict[str, int] = {}
    for fr, n in own.items():
        m = re.search(r"\((.*?)(?::\d+)?\)$", fr)
        where = m.group(1) if m else fr
        if fr.startswith("run (ringblob/server.py"):
            where = "event loop C code (uvloop: epoll, socket I/O, callbacks)"
        files[where] = files.get(where, 0) + n
    out.write("\nby file (own time):\n")
    for fr, n in sorted(files.items(), key=lambda kv: -kv[1])[:top]:
        out.write(f"  {100 * n / total:5.1f}%  {fr}\n")
    return out.getvalue(), total


def commit_probe(path: str, rounds: int = 200, writes: int = 16) -> list[dict]:
    """Time one group-commit round's I/O three ways on ``path`` through the store's AsyncEngine.

    ``writes`` 4 KiB data writes at random pages plus one journal write, then an
    fdatasync: (a) all in one IOSQE_IO_LINK chain, as ``BlobStore._commit_items``
    submits them (the kernel runs a chain one op after another); (b) the writes
    unlinked in one submit, then the fdatasync once they completed; (c) one data
    write + the journal write + fdatasync linked (a lone sync put). Median and
    p99 in µs, for the uring and psync engines. Evidence for analysis.md.
    """
    from ringblob.direct import open_direct
    from ringblob.engine import open_engine
    from ringblob.engine.aio import FSYNC, WRITE, AsyncEngine

    out: list[dict] = []

    async def one(kind: str) -> None:
        df = open_direct(path)
        eng = open_engine(kind, [df.fd], block_size=df.block_size, buffer_size=256 * KIB, buffer_count=8, queue_depth=128)
        try:
            aio = AsyncEngine(eng)
            pages = df.size // (4 * KIB)
            bufs = await aio.lease(2)
            for b in bufs:
                b.view[:] = os.urandom(len(b.view))
            rnd = random.Random(7)
            for label in ("linked chain: writes -> journal -> fdatasync (the store before 345eb51)",
                          "writes + journal unlinked, then fdatasync (the store now)",
                          "lone put: 1 write -> journal -> fdatasync linked"):
                k = 1 if label.startswith("lone") else writes
                ts = []
                for r in range(rounds):
                    ops = [(WRITE, bufs[0], rnd.randrange(16, pages) * 4 * KIB, 4 * KIB, (i % 60) * 4 * KIB) for i in range(k)]
                    ops.append((WRITE, bufs[1], 4 * KIB * (r % 8), 4 * KIB, 0))
                    t0 = time.perf_counter()
                    # a lost completion must not hang the benchmark: give a round 10 s
                    if label.startswith("writes + journal unlinked"):
                        await asyncio.wait_for(aio.run(ops, link=False), 10)
                        await asyncio.wait_for(aio.run([(FSYNC,)]), 10)
                    else:
                        await asyncio.wait_for(aio.run(ops + [(FSYNC,)], link=True), 10)
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                rec = {"engine": kind, "round": label, "data_writes": k, "rounds": rounds,
                       "median_us": ts[len(ts) // 2] * 1e6, "p99_us": ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e6}
                out.append(rec)
                log(f"commit probe: {os.path.basename(path)}: {kind:5} {label}: median {rec['median_us']:.0f} µs, p99 {rec['p99_us']:.0f} µs")
            aio.release(*bufs)
            aio.close()  # closes the engine too
        finally:
            if not getattr(eng, "closed", True):
                eng.close()
            df.close()

    for kind in ("uring", "psync"):
        try:
            asyncio.run(one(kind))
        except TimeoutError:
            log(f"commit probe: {os.path.basename(path)}: {kind}: a round got no completion within 10 s (lost "
                f"wakeup?); the {kind} probe stops here")
            out.append({"engine": kind, "round": "HUNG: a round got no completion within 10 s", "data_writes": writes,
                        "rounds": rounds, "median_us": None, "p99_us": None})
    return out


def commit_probes(workdir: str) -> list[dict]:
    """:func:`commit_probe` on fio's fully written file and on a freshly fallocated one.

    A new ringblob data file is fallocated: its pages are *unwritten* extents
    until first written, and an O_DIRECT write into one makes ext4 convert the
    extent (io_uring cannot issue it inline and hands it to an io-wq worker;
    the fdatasync then commits the file system journal too).
    """
    out = []
    written = os.path.join(workdir, "fio.dat")
    if os.path.exists(written):
        for r in commit_probe(written):
            out.append({"file": "fully written (fio.dat)", **r})
    fresh = os.path.join(workdir, "probe-fallocated.dat")
    try:
        with open(fresh, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 1 << 30)
        for r in commit_probe(fresh):
            out.append({"file": "fallocated, never written", **r})
    finally:
        if os.path.exists(fresh):
            os.unlink(fresh)
    return out


def daemon_flags(args: argparse.Namespace) -> list[str]:
    """The ``ringblob serve`` flags the harness's own options ask for (``--sync-method``, then
    ``--serve-flags`` split as a shell would)."""
    flags = ["--sync-method", args.sync_method] if getattr(args, "sync_method", None) else []
    return flags + shlex.split(getattr(args, "serve_flags", None) or "")


def run_profile(workdir: str, mode: dict, clients: int, data_size: int, outdir: str, native: bool,
                extra: list[str] | None = None) -> list[str]:
    """Sample the uring daemon with py-spy while each PROFILE_WORKLOADS load runs (not counted in results)."""
    spy = pyspy_binary()
    if not spy:
        msg = f"py-spy is missing; install it with:  {sys.executable} -m pip install py-spy"
        log(msg)
        return [msg]
    parts = []
    perf_parts: list[str] = []
    side = RingblobSide("uring", workdir, mode, clients, data_size, extra)
    errors = side.start()
    dur = mode["duration"] + mode["warmup"]
    try:
        for name in PROFILE_WORKLOADS:
            if not side.ok or (WORKLOAD_FILTER and name not in WORKLOAD_FILTER):
                continue
            pid = side.daemon.pid
            raw = os.path.join(workdir, f"profile-{name}.txt")
            argv = [spy, "record", "--pid", str(pid), "--duration", str(int(dur + 1)), "--rate", "250",
                    "--format", "raw", "--function", "--output", raw]
            argv.append("--native" if native else "--nonblocking")  # --native has to pause the process
            if os.path.exists(raw):
                os.unlink(raw)
            log("profile: " + shlex.join(argv))
            spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.3)
            res = run_load(side.specs(name), 0.3, dur, pid)
            _, err = spy_proc.communicate(timeout=120)
            try:
                with open(raw) as f:
                    summary, _n = summarize_collapsed(f.read())
            except OSError:
                summary = f"(py-spy wrote nothing: {err.strip()[-300:]})\n"
                errors.append(f"py-spy {name}: {err.strip()[-200:]}")
            parts.append(
                f"## {name} ({res['ops_per_s']:.0f} op/s under the profiler, daemon {res.get('daemon_cpu_cores', 0):.2f} "
                f"cores = {res.get('daemon_cpu_us_per_op') or 0:.0f} µs CPU per request, clients "
                f"{res['client_cpu_cores']:.2f} cores, everything else {res.get('other_cpu_cores') or 0:.2f} cores)\n\n{summary}\n"
            )
            perf_parts.append(perf_profile(name, side, pid, dur, workdir))
            if name == "put_4k_sync_c32":  # one flame graph to browse
                svg = os.path.join(outdir, "profile.svg")
                argv_svg = [spy, "record", "--pid", str(pid), "--duration", str(int(dur + 1)), "--rate", "250",
                            "--format", "flamegraph", "--output", svg, "--nonblocking"]
                log("profile: " + shlex.join(argv_svg))
                spy_proc = subprocess.Popen(argv_svg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(0.3)
                run_load(side.specs(name), 0.3, dur, pid)
                spy_proc.communicate(timeout=120)
    finally:
        errors += side.stop()
    probe = commit_probes(workdir)
    with open(os.path.join(outdir, "commit_probe.json"), "w") as f:
        json.dump({"results": probe}, f, indent=1)
    parts.append("## one group-commit round's I/O: 16 x 4 KiB data writes + a journal write + fdatasync "
                 "(bench/run.py commit_probe)\n\n"
                 + "".join(f"  {r['file']:26} {r['engine']:5} {r['round']}: median {_fmt(r['median_us'])} µs, "
                           f"p99 {_fmt(r['p99_us'])} µs\n" for r in probe))
    head = (
        "py-spy samples of `ringblob serve --engine uring` (all threads, "
        f"{'with native frames: idle time in epoll_pwait shows too' if native else 'Python frames only, idle samples dropped'}, "
        f"250 Hz) while each load ran from {clients} client processes ({LOADGEN['kind']} load generator"
        f"{' bench/loadgen.c' if LOADGEN['kind'] == 'native' else ': AsyncClient'}) on the same CPUs. "
        "Percentages are of the daemon's samples. `run (ringblob/server.py)` own time is time inside the "
        "event loop's C code (uvloop: socket reads/writes, epoll, callbacks' C parts).\n\n"
    )
    with open(os.path.join(outdir, "profile.txt" if not native else "profile-native.txt"), "w") as f:
        f.write(head + "\n".join(parts))
    log(f"profile: wrote {outdir}/{'profile.txt' if not native else 'profile-native.txt'}")
    if any(perf_parts):
        with open(os.path.join(outdir, "perf.txt"), "w") as f:
            f.write("`perf record -F 999 -g` of `ringblob serve --engine uring` (kernel and every shared object: "
                    "where the daemon's CPU goes now that its request path is Cython, which py-spy cannot see "
                    f"into) while each load ran from {clients} client processes; percentages of the daemon's "
                    "samples.\n\n" + "\n".join(p for p in perf_parts if p))
        log(f"profile: wrote {outdir}/perf.txt")
    return errors


def perf_profile(name: str, side: "RingblobSide", pid: int, dur: float, workdir: str) -> str:
    """``perf record`` the daemon ``pid`` while ``name``'s load runs again; returns a markdown section
    with the shares by shared object and the top symbols ("" when perf is missing or refused)."""
    perf = shutil.which("perf")
    if not perf:
        log("profile: perf is not installed (Debian: apt-get install linux-perf); perf.txt skipped")
        return ""
    data = os.path.join(workdir, f"perf-{name}.data")
    argv = [perf, "record", "-F", "999", "-g", "-p", str(pid), "-o", data, "--", "sleep", str(int(dur))]
    log("profile: " + shlex.join(argv))
    rec = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    res = run_load(side.specs(name), 0.3, dur, pid)
    _, err = rec.communicate(timeout=120)
    if rec.returncode != 0 or not os.path.exists(data):
        log(f"profile: perf record failed ({err.strip()[-200:]}); perf.txt skipped for {name}")
        return ""

    def report(sort: str, n: int) -> str:
        out = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", sort, "-g", "none"],
                             capture_output=True, text=True).stdout
        lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
        return "\n".join(lines[:n])

    return (f"## {name} ({res['ops_per_s']:.0f} op/s under perf, daemon {res.get('daemon_cpu_cores', 0):.2f} cores)\n\n"
            f"by shared object:\n```\n{report('dso', 14)}\n```\n\nby symbol (top 30):\n```\n{report('sym', 30)}\n```\n")


def schedule() -> list[tuple[str, str]]:
    """(side, name) in execution order: each ringblob workload right after its fio counterpart and
    before its Redis one, so the figures a ratio divides were taken moments apart."""
    order: list[tuple[str, str]] = []
    for name, *_ in RB_WORKLOADS:
        if WORKLOAD_FILTER and name not in WORKLOAD_FILTER:
            continue
        fio_name, redis_name = COUNTERPARTS[name]
        beside = BESIDE.get(name, ())
        for side, n in (("fio", fio_name), *beside, ("uring", name), ("psync", name), ("redis", redis_name)):
            if n and (side, n) not in order:
                order.append((side, n))
    if not WORKLOAD_FILTER:
        order += [("fio", n) for n in FIO_JOBS if ("fio", n) not in order]
    return order


def median_row(samples: list[dict]) -> dict:
    """The sample with the median throughput (the lower middle one of an even count), with every
    sample's throughput (ops/s and bytes/s) and round, in the order they ran."""
    ordered = sorted(samples, key=lambda r: r["ops_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(samples) > 1:
        row["samples_ops_per_s"] = [r["ops_per_s"] for r in samples]
        row["samples_bytes_per_s"] = [r.get("bytes_per_s") for r in samples]
        row["samples_rounds"] = [r.get("round") for r in samples]
    return row


def per_round(a: dict, b: dict, metric: str) -> list[float] | None:
    """``a``'s ``metric`` over ``b``'s round by round (rounds both sides ran, in order), from the
    samples ``median_row`` keeps; None with fewer than two rounds. A run.json written before the
    rounds were kept pairs the samples by position (they are in round order)."""
    def series(r: dict) -> list | None:
        vals = r.get(f"samples_{metric}")
        if vals is None and metric == "bytes_per_s" and r.get("samples_ops_per_s") and r.get("ops_per_s"):
            per_op = (r.get("bytes_per_s") or 0) / r["ops_per_s"]  # fixed block size per job
            vals = [x * per_op for x in r["samples_ops_per_s"]]
        return vals

    va, vb = series(a), series(b)
    if not va or not vb:
        return None
    ra, rb = a.get("samples_rounds"), b.get("samples_rounds")
    if ra and rb and None not in ra and None not in rb:
        da, db = dict(zip(ra, va)), dict(zip(rb, vb))
        pairs = [(da[k], db[k]) for k in sorted(set(da) & set(db))]
    elif len(va) == len(vb):
        pairs = list(zip(va, vb))
    else:
        return None
    out = [x / y for x, y in pairs if x is not None and y]
    return out if len(out) > 1 else None


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="mode", help="under a minute: checks the harness")
    g.add_argument("--medium", action="store_const", const="medium", dest="mode", help="about 3 minutes")
    g.add_argument("--full", action="store_const", const="full", dest="mode", help="the default: about 7 minutes on 2 CPUs")
    ap.add_argument("--workdir", default=os.path.join(ROOT, ".bench-tmp"), help="where the data files go (a real file system, not tmpfs)")
    ap.add_argument("--out", default=None,
                    help="where run.json/run.md/run.png go (default bench/results; bench/results/quick for --quick, "
                         "so a harness check never overwrites the real results)")
    ap.add_argument("--clients", type=int, default=max(2, os.cpu_count() or 2), help="client processes for ringblob (default: max(2, nproc))")
    ap.add_argument("--loadgen", choices=("native", "python"), default=None,
                    help="what drives ringblob: native = bench/loadgen.c (compiled with cc into the work directory, "
                         "one pipelining connection per client process; the default when cc exists), python = "
                         "multiprocessing children each with one AsyncClient (the default without cc)")
    ap.add_argument("--only", default="fio,uring,psync,redis,groupcommit",
                    help="comma-separated subset of fio,uring,psync,redis,groupcommit (groupcommit: the durable "
                         "group-commit ceiling, bench/groupcommit.py, beside the sync PUT at 32)")
    ap.add_argument("--workloads", default="", help="comma-separated subset of the ringblob workloads (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over every configuration; the median round is reported")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each configuration wait up to this many seconds for the host to be quiet "
                         "(default: 5 in full and medium mode, 0 in quick mode)")
    ap.add_argument("--quiet-cores", type=float, default=0.5, help="'quiet' means fewer busy cores than this (default 0.5)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run every benchmarked process (fio, redis, daemons, clients) at this nice value, e.g. -5 "
                         "on a host shared with other jobs (negative needs root); all sides get the same")
    ap.add_argument("--duration", type=float, help="seconds measured per configuration (overrides the mode)")
    ap.add_argument("--sync-method", choices=("auto", "dsync", "fdatasync"), default=None,
                    help="the daemons' sync_method (default: theirs, auto); run.md names the one each store took, "
                         "so two runs compare RWF_DSYNC group commits with fdatasync ones on this device")
    ap.add_argument("--serve-flags", default="", metavar="FLAGS",
                    help="more flags for both ringblob daemons, e.g. '--parallel-hash off' (for A/B runs)")
    ap.add_argument("--fresh", action="store_true", help="delete the ringblob data file first (else a filled one is reused)")
    ap.add_argument("--profile", action="store_true", help="after the run, sample the uring daemon with py-spy under load "
                    "(profile.txt, profile.svg) and, where perf is installed, with perf record (perf.txt)")
    ap.add_argument("--profile-only", action="store_true", help="only the py-spy pass (no results written)")
    ap.add_argument("--probe-commit", action="store_true", help="only time a group-commit round's I/O, linked vs unlinked (needs .bench-tmp/fio.dat)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite run.md and run.png from an existing run.json")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C/Cython frames too)")
    args = ap.parse_args(argv)
    mode_name = args.mode or "full"
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "results", *(["quick"] if mode_name == "quick" else []))
    mode = dict(MODES[mode_name])
    if args.duration:
        mode["duration"] = args.duration
        mode["fio_runtime"] = str(max(1, round(args.duration)))
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if mode_name == "quick" else 5.0
    only = set(args.only.split(","))
    WORKLOAD_FILTER.update(w for w in args.workloads.split(",") if w)
    unknown = WORKLOAD_FILTER - {w[0] for w in RB_WORKLOADS}
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(w[0] for w in RB_WORKLOADS)}")
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    data_size = _round_up(2 * mode["get_set"] + 2 * mode["big_set"] * MIB + 4 * mode["put_keys"] * 4 * KIB
                          + 4 * mode["big_put_keys"] * MIB + 256 * MIB, 64 * MIB)
    if args.fresh:
        for engine in ("uring", "psync"):
            for suffix in ("", ".json"):
                path = os.path.join(workdir, f"ringblob-{engine}-{mode['get_set'] // MIB}M.data{suffix}")
                if os.path.exists(path):
                    os.unlink(path)
    if args.nice:
        set_nice(args.nice)
    t_start = time.perf_counter()
    if args.probe_commit:
        probe = commit_probes(workdir)
        with open(os.path.join(args.out, "commit_probe.json"), "w") as f:
            json.dump({"results": probe}, f, indent=1)
        return 0
    if args.report_only:
        with open(os.path.join(args.out, "run.json")) as f:
            doc = json.load(f)
        doc["targets"] = targets(doc["results"])
        doc["references"] = references(doc["results"])
        doc["ratios"] = ratios(doc["results"])
        with open(os.path.join(args.out, "run.md"), "w") as f:
            f.write(markdown(doc))
        chart(doc, os.path.join(args.out, "run.png"))
        log(f"rewrote {args.out}/run.md and run.png from run.json")
        return 0
    choose_loadgen(args.loadgen, workdir)
    if args.profile_only:
        errs = run_profile(workdir, mode, args.clients, data_size, args.out, args.native, daemon_flags(args))
        for e in errs:
            log("error: " + e.splitlines()[0])
        return 1 if errs else 0

    machine = machine_stamp(workdir)
    log(f"{mode_name} mode on {machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']}, "
        f"{machine['filesystem']}; ringblob load from {args.clients} client processes ({LOADGEN['kind']} load generator)")
    sides: dict = {}
    if "fio" in only:
        sides["fio"] = Fio(workdir, mode, max(mode["get_set"], 256 * MIB))
    if "groupcommit" in only:
        sides["groupcommit"] = GroupCommitSide(workdir, mode, max(mode["get_set"], 256 * MIB))
    for engine in ("uring", "psync"):
        if engine in only:
            sides[engine] = RingblobSide(engine, workdir, mode, args.clients, data_size, daemon_flags(args))
    if "redis" in only:
        sides["redis"] = RedisSide(workdir, mode)
    errors: list[str] = []
    samples: dict = {}
    try:
        for side in sides.values():
            errors += side.start()
        for rep in range(args.repeat):
            if args.repeat > 1:
                log(f"round {rep + 1} of {args.repeat}")
            for side_name, name in schedule():
                side = sides.get(side_name)
                if side is None:
                    continue
                waited, busy = wait_quiet(args.quiet_wait, args.quiet_cores) if args.quiet_wait > 0 else (0.0, None)
                row, errs = side.run(name)
                errors += errs
                if row is not None:
                    row["round"] = rep
                    row["quiet_wait_s"] = waited
                    row["busy_cores_before"] = busy
                    samples.setdefault((row["system"], row["workload"]), []).append(row)
    finally:
        for side in sides.values():
            errors += side.stop()
    rows = [median_row(v) for v in samples.values()]
    extra = {k: v.info for k, v in sides.items() if getattr(v, "info", None)}
    doc = {
        "mode": mode_name,
        "mode_params": mode,
        "clients": args.clients,
        "load_generator": LOADGEN["kind"],
        "repeat": args.repeat,
        "quiet_gate": {"max_wait_s": args.quiet_wait, "busy_cores_below": args.quiet_cores},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "flush_every": FLUSH_EVERY,
        "serve_flags": daemon_flags(args),
        "machine": machine,
        "results": rows,
        "ratios": ratios(rows),
        "targets": targets(rows),
        "references": references(rows),
        "errors": errors,
        "runs": extra,
        "wall_s": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    md = markdown(doc)
    with open(os.path.join(args.out, "run.md"), "w") as f:
        f.write(md)
    try:
        chart(doc, os.path.join(args.out, "run.png"))
    except Exception as exc:  # noqa: BLE001 - the chart is optional, the numbers are not
        log(f"chart: {type(exc).__name__}: {exc} (install matplotlib: {sys.executable} -m pip install matplotlib)")
    print()
    print(md)
    print("Targets:")
    for t in doc["targets"]:
        pr = t.get("per_round")
        rounds = f"; per round {' / '.join(f'{x:.2f}' for x in pr)}, {t['rounds_passing']} of {len(pr)} pass" if pr else ""
        print(f"  {t['result']:4}  {t['target']}: {_fmt(t['ratio'], 2)} (need {t['need']}){rounds}")
    for r in doc["references"]:
        if r.get("ratio") is not None:
            print(f"  ref   {r['target']}: {_fmt(r['ratio'], 2)}")
    log(f"wrote {args.out}/run.json, run.md, run.png in {doc['wall_s']:.0f} s")
    if args.profile:
        errors += run_profile(workdir, mode, args.clients, data_size, args.out, args.native, daemon_flags(args))
    return 0


def set_nice(nice: int) -> None:
    """Run this process and everything it starts at ``nice``.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
    a process's nice value only ranks it inside its session's group, and each
    session's group gets an equal share of the CPUs. So the benchmark moves
    into a session (and autogroup) of its own with ``setsid`` when it does not
    lead one already, and sets that group's nice too: the benchmark as a whole
    gets the weight, and nothing else of the caller's session does.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # inherited by every process started from here
    except OSError as exc:
        log(f"cannot set nice {nice} ({exc.strerror}); going on at nice {os.getpriority(os.PRIO_PROCESS, 0)}")
        return
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            enabled = f.read().strip() == "1"
    except OSError:
        enabled = False
    if enabled:
        try:
            if os.getsid(0) != os.getpid():
                os.setsid()  # a session (and autogroup) of our own: other jobs of the caller's session are not lifted
        except OSError:
            pass
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
        except OSError as exc:
            log(f"cannot set the autogroup nice to {nice} ({exc.strerror}); the benchmark shares the CPUs "
                "equally with every other session")


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


if __name__ == "__main__":
    sys.exit(main())
