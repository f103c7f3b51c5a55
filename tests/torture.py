"""`make torture`: every reliability suite at torture size, and the figures table.

Runs each suite module (see SUITES) as its own process with its torture-size
defaults, collects the ``FIGURES {json}`` line each prints last, and prints a
markdown table: what was tried, and for each suite the acknowledged writes
lost, wrong bytes returned and daemon crashes — all three must be 0. Exits
non-zero when any suite failed or broke an invariant. The table is written to
bench/results/torture.md as well; the README keeps a copy.

    python tests/torture.py [--only SUITE ...] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# module in tests/, extra arguments for torture size
SUITES = [
    ("powerloss", []),
    ("ioerrors", []),
    ("corruption", []),
    ("killloop", []),
    ("fuzzwire", []),
    ("soak", []),
    ("fuzz/fuzz_protocol", ["--seconds", "60"]),  # atheris (make torture installs it)
]


def run_suite(name: str, args: list[str]) -> dict:
    """Run one suite; return its figures (with ``ok`` and ``exit``) or a failure row."""
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.exists(path):
        return {"suite": name, "ok": False, "exit": None, "error": f"{path} is missing"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, path, *args], cwd=REPO, capture_output=True, text=True)
    figures = None
    for line in proc.stdout.splitlines():
        if line.startswith("FIGURES "):
            figures = json.loads(line[len("FIGURES "):])
    if figures is None:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"suite": name, "ok": False, "exit": proc.returncode, "error": " | ".join(tail),
                "seconds": round(time.monotonic() - t0, 1)}
    figures["exit"] = proc.returncode
    figures["ok"] = proc.returncode == 0 and all(
        figures.get(k, 0) == 0 for k in ("acknowledged_lost", "wrong_bytes", "crashes"))
    return figures


def table(rows: list[dict]) -> str:
    """The markdown table of the figures."""
    out = [
        "| suite | tried | acknowledged writes lost | wrong bytes returned | daemon crashes | time (s) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['suite']} | — | — | — | — | {r.get('seconds', '—')} | FAILED: {r['error'][:120]} |")
            continue
        out.append(
            f"| {r['suite']} | {r['count']} {r['unit']} | {r['acknowledged_lost']} | {r['wrong_bytes']} | "
            f"{r['crashes']} | {r['seconds']} | {'ok' if r['ok'] else 'FAILED (exit %s)' % r['exit']} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these suites")
    ap.add_argument("--output", default=os.path.join(REPO, "bench", "results", "torture.md"))
    args = ap.parse_args(argv)
    rows = []
    for name, extra in SUITES:
        if args.only and name not in args.only:
            continue
        print(f"torture: running {name} ...", flush=True)
        rows.append(run_suite(name, extra))
        print(f"torture: {name}: {json.dumps(rows[-1])}", flush=True)
    md = table(rows)
    stamp = (f"Machine: {os.cpu_count()} cores, kernel {platform.release()}, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}.")
    print()
    print(md)
    print()
    print(stamp)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(md + "\n\n" + stamp + "\n")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
