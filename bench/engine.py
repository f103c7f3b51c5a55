#!/usr/bin/env python3
"""Engine benchmark: 4 KiB random read / random write IOPS at QD1 and QD32.

Runs, on the same O_DIRECT file, with the same block size and queue depth:

* ``uring``  — ringblob._uring.Ring driven from a Python loop (fixed buffers,
  fixed files, one submit per reaped batch);
* ``psync``  — ringblob.engine.psync.PsyncEngine, the same loop;
* ``fio``    — ``fio --ioengine=io_uring --fixedbufs --registerfiles
  --direct=1`` (the reference: C, no interpreter).

and prints a table with the ratio engine/fio, writing JSON to
bench/results/engine.json. This is a benchmark, not a test: numbers depend on
the device and on what else runs on the host.

Usage::

    .venv/bin/python bench/engine.py            # ~5 s per cell
    .venv/bin/python bench/engine.py --quick    # ~1 s per cell, writes bench/results/quick/

fio comes from Debian (``apt-get install -y fio``); the script installs it
when it runs as root and fio is missing, else it prints that command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "daemon"))

from ringblob.direct import open_direct  # noqa: E402

BS = 4096
RESULTS = os.path.join(ROOT, "bench", "results")


def ensure_fio() -> str | None:
    """Path of fio, installing Debian's package when root; None (with a hint printed) otherwise."""
    path = shutil.which("fio")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: fio is missing; installing it with apt-get install -y fio", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for attempt in range(30):  # another apt may hold the dpkg lock for a while
            rc = subprocess.call(["apt-get", "install", "-y", "-q", "fio"], env=env, stdout=subprocess.DEVNULL)
            if rc == 0:
                break
            if attempt == 0:
                subprocess.call(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            time.sleep(5)
        path = shutil.which("fio")
        if path:
            return path
    print("bench: fio not found; install it with:  sudo apt-get install -y fio", file=sys.stderr)
    return None


def prepare_file(path: str, size: int) -> None:
    """Create ``path`` with ``size`` bytes of written (not just allocated) data.

    Unwritten extents read back as zeros without touching the device, which
    would flatter every random-read number, so the file is filled once.
    """
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def run_engine(kind: str, path: str, rw: str, qd: int, runtime: float, submit_every: int = 1) -> dict:
    """Keep ``qd`` 4 KiB ops in flight for ``runtime`` seconds; return IOPS and counters.

    Each reaped completion is replaced by a new op at a random offset; the
    queued ops are submitted every ``submit_every`` replacements and at the end
    of each reaped batch (fio's default, iodepth_batch_submit=1, submits each
    I/O as soon as it is queued).
    """
    df = open_direct(path)
    try:
        nblocks = df.size // BS
        if kind == "uring":
            from ringblob._uring import Ring

            eng = Ring([df.fd], buffer_size=BS, buffer_count=qd, queue_depth=max(qd, 1))
            flags = list(eng.setup_flags)
        else:
            from ringblob.engine.psync import PsyncEngine

            eng = PsyncEngine([df.fd], buffer_size=BS, buffer_count=qd, queue_depth=max(qd, 1))
            flags = []
        rng = random.Random(42)
        offsets = [rng.randrange(nblocks) * BS for _ in range(1 << 16)]
        mask = (1 << 16) - 1
        bufs = [eng.lease() for _ in range(qd)]
        for b in bufs:
            b.view[:] = os.urandom(BS)
        op = eng.read_fixed if rw == "randread" else eng.write_fixed
        wait = eng.wait
        submit = eng.submit
        perf = time.perf_counter
        i = 0
        for tag in range(qd):
            op(bufs[tag], offsets[i & mask], BS, tag)
            i += 1
        submit()
        done = 0
        errors = 0
        c0 = time.process_time()
        t0 = perf()
        deadline = t0 + runtime
        now = t0
        while now < deadline:
            k = 0
            for tag, res in wait(1):
                if res != BS:
                    errors += 1
                op(bufs[tag], offsets[i & mask], BS, tag)
                i += 1
                done += 1
                k += 1
                if k == submit_every:
                    submit()
                    k = 0
            if k:
                submit()
            now = perf()
        elapsed = perf() - t0
        cpu = time.process_time() - c0
        while eng.in_flight:
            eng.wait(eng.in_flight)
        counters = eng.counters()
        eng.close()
    finally:
        df.close()
    if errors:
        raise RuntimeError(f"{kind} {rw} qd{qd}: {errors} ops failed")
    return {"iops": done / elapsed, "ops": done, "seconds": elapsed, "cpu_us_per_op": cpu / done * 1e6,
            "setup_flags": flags, "counters": counters}


def run_fio(fio: str, path: str, size: int, rw: str, qd: int, runtime: float) -> dict:
    cmd = [
        fio, "--name=ringblob-engine", f"--filename={path}", f"--size={size}", f"--rw={rw}",
        f"--bs={BS}", f"--iodepth={qd}", "--ioengine=io_uring", "--fixedbufs", "--registerfiles",
        "--direct=1", "--time_based", f"--runtime={runtime}s", "--ramp_time=0", "--norandommap",
        "--randrepeat=0", "--numjobs=1", "--output-format=json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw == "randread" else job["write"]
    seconds = job["job_runtime"] / 1000.0
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * seconds
    return {"iops": side["iops"], "ops": side["total_ios"], "seconds": seconds,
            "cpu_us_per_op": cpu / max(side["total_ios"], 1) * 1e6, "command": " ".join(cmd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 1 s per cell instead of 5")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per cell (default 5, --quick 1)")
    ap.add_argument("--file", default=os.path.join(ROOT, "var", "bench", "engine.dat"),
                    help="data file on the file system to measure (default var/bench/engine.dat)")
    ap.add_argument("--size", type=int, default=1 << 30, help="file size in bytes (default 1 GiB)")
    ap.add_argument("--engines", default="uring,psync", help="comma-separated engines (uring,psync)")
    ap.add_argument("--qd", default="1,32", help="comma-separated queue depths (default 1,32)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="repetitions per cell, order rotated, median reported (default 3, --quick 1)")
    ap.add_argument("--submit-every", type=int, default=1,
                    help="submit after this many replacement ops (default 1, like fio's iodepth_batch_submit=1)")
    ap.add_argument("--json", default=None,
                    help="where to write JSON (default bench/results/engine.json; with --quick "
                         "bench/results/quick/engine.json, not committed)")
    ap.add_argument("--md", default=None,
                    help="where to write the markdown page ('' for none; default engine.md beside the JSON)")
    args = ap.parse_args(argv)
    runtime = args.runtime or (1.0 if args.quick else 5.0)
    outdir = os.path.join(RESULTS, "quick") if args.quick else RESULTS
    if args.json is None:
        args.json = os.path.join(outdir, "engine.json")
    if args.md is None:
        args.md = os.path.join(os.path.dirname(args.json), "engine.md")
    engines = [e for e in args.engines.split(",") if e]
    qds = [int(q) for q in args.qd.split(",")]

    fio = ensure_fio()
    prepare_file(args.file, args.size)
    repeat = args.repeat or (1 if args.quick else 3)
    kinds = (["fio"] if fio else []) + engines
    rows = []
    for rw in ("randread", "randwrite"):
        for qd in qds:
            samples: dict[str, list] = {k: [] for k in kinds}
            for rep in range(repeat):
                # rotate the order each repetition: the device's speed drifts with
                # whatever else the host does, so no runner always goes first
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                for k in order:
                    if k == "fio":
                        samples[k].append(run_fio(fio, args.file, args.size, rw, qd, runtime))
                    else:
                        samples[k].append(run_engine(k, args.file, rw, qd, runtime, args.submit_every))
            row = {"rw": rw, "qd": qd, "bs": BS, "repeat": repeat}
            for k in kinds:
                row[k] = summarize(samples[k])
            if fio:
                for e in engines:
                    # runs of one repetition are adjacent in time: their ratio cancels most of
                    # the device's drift, so the median of these paired ratios is the estimate
                    paired = [x["iops"] / y["iops"] for x, y in zip(samples[e], samples["fio"])]
                    row[e]["ratio_to_fio"] = statistics.median(paired)
                    row[e]["ratio_to_fio_samples"] = paired
                    row[e]["ratio_of_medians"] = row[e]["iops"] / row["fio"]["iops"]
            rows.append(row)
            print_row(row, engines, fio is not None, header=len(rows) == 1)

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "file": args.file,
        "size": args.size,
        "fs": __import__("ringblob.direct", fromlist=["fs_type"]).fs_type(args.file),
        "runtime_s": runtime,
        "repeat": repeat,
        "loadavg_after": os.getloadavg(),
        "submit_every": args.submit_every,
        "fio": subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip() if fio else None,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows, engines, fio is not None, meta))
        print(f"wrote {args.md}")
    return 0


def markdown(rows: list[dict], engines: list[str], have_fio: bool, meta: dict) -> str:
    """The results as a markdown page (table, target check, how it was measured)."""
    lines = ["# Engine benchmark: 4 KiB random I/O, ringblob engines vs fio", ""]
    lines.append(f"Measured {meta['when']} on `{meta['host']}`: Linux {meta['kernel']}, {meta['cpus']} CPUs, "
                 f"Python {meta['python']}, {meta['fio'] or 'no fio'}; file `{meta['file']}` "
                 f"({meta['size'] >> 20} MiB, {meta['fs']}, O_DIRECT). Each cell: {meta['repeat']} run(s) of "
                 f"{meta['runtime_s']:g} s per runner in rotated order; median IOPS shown; engine/fio is the "
                 "median of the per-repetition ratios (runs of one repetition are adjacent in time). "
                 f"Load average after the run: {', '.join(f'{x:.2f}' for x in meta['loadavg_after'])}.")
    lines.append("")
    header = ["workload", "QD"] + (["fio IOPS"] if have_fio else [])
    for e in engines:
        header += [f"{e} IOPS"] + ([f"{e}/fio"] if have_fio else [])
    header += ["CPU µs/op (" + " / ".join((["fio"] if have_fio else []) + engines) + ")"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [f"4 KiB {row['rw']}", str(row["qd"])]
        if have_fio:
            cells.append(f"{row['fio']['iops']:,.0f}")
        for e in engines:
            cells.append(f"{row[e]['iops']:,.0f}")
            if have_fio:
                cells.append(f"{row[e]['ratio_to_fio']:.2f}")
        cells.append(" / ".join(f"{row[k]['cpu_us_per_op']:.1f}" for k in (["fio"] if have_fio else []) + engines))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if have_fio and "uring" in engines:
        checks = [(r["rw"], r["uring"]["ratio_to_fio"]) for r in rows if r["qd"] == 32]
        verdict = ", ".join(f"{rw} {ratio:.2f}x" for rw, ratio in checks)
        ok = all(ratio >= 0.85 for _, ratio in checks)
        lines.append(f"Target (uring >= 0.85x fio IOPS at QD32): **{'met' if ok else 'missed'}** ({verdict}).")
        lines.append("")
    lines.append("Min-max IOPS and the per-repetition engine/fio ratios (the spread is the host's noise):")
    lines.append("")
    for row in rows:
        spread = "; ".join(f"{k} {row[k]['iops_min']:,.0f}-{row[k]['iops_max']:,.0f}"
                           for k in (["fio"] if have_fio else []) + engines)
        if have_fio:
            spread += "; ratios " + "; ".join(
                f"{e} " + " ".join(f"{x:.2f}" for x in row[e]["ratio_to_fio_samples"]) for e in engines)
        lines.append(f"- {row['rw']} QD{row['qd']}: {spread}")
    lines.append("")
    lines.append("How: `bench/engine.py` keeps QD ops of 4 KiB at uniformly random aligned offsets in flight "
                 "from a Python loop (`wait(1)`, replace each completion, `submit()` after each replacement "
                 f"(--submit-every {meta['submit_every']}), like fio's default iodepth_batch_submit=1); fio runs "
                 "`--ioengine=io_uring --fixedbufs --registerfiles --direct=1 --norandommap` on the same file. "
                 "CPU µs/op is process CPU time (user+system) per completed op. Raw numbers: "
                 "bench/results/engine.json.")
    lines.append("")
    return "\n".join(lines)


def summarize(samples: list[dict]) -> dict:
    """Median IOPS (and CPU per op) over repetitions, keeping every sample."""
    iops = sorted(x["iops"] for x in samples)
    cpu = sorted(x["cpu_us_per_op"] for x in samples)
    out = dict(samples[0])
    out.update(
        iops=statistics.median(iops),
        iops_min=iops[0],
        iops_max=iops[-1],
        cpu_us_per_op=statistics.median(cpu),
        samples=[{"iops": x["iops"], "cpu_us_per_op": x["cpu_us_per_op"], "seconds": x["seconds"]} for x in samples],
    )
    out.pop("ops", None)
    out.pop("seconds", None)
    return out


def print_row(row: dict, engines: list[str], have_fio: bool, header: bool) -> None:
    if header:
        cols = ["workload", "QD"] + (["fio IOPS"] if have_fio else [])
        for e in engines:
            cols += [f"{e} IOPS"] + ([f"{e}/fio"] if have_fio else [])
        cols += ["CPU µs/op " + "/".join((["fio"] if have_fio else []) + engines)]
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
    cells = [f"4 KiB {row['rw']}", str(row["qd"])]
    if have_fio:
        cells.append(f"{row['fio']['iops']:,.0f}")
    for e in engines:
        cells.append(f"{row[e]['iops']:,.0f}")
        if have_fio:
            cells.append(f"{row[e]['ratio_to_fio']:.2f}")
    cells.append(" / ".join(f"{row[k]['cpu_us_per_op']:.1f}" for k in (["fio"] if have_fio else []) + engines))
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
