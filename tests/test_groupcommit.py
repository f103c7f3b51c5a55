"""bench/groupcommit.py, the durable group-commit ceiling `make bench` sets beside the sync PUT:
run for real (io_uring, O_DIRECT, fdatasync) on a small file under the repository (ext4)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ENGINES

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / "groupcommit.py"

pytestmark = pytest.mark.skipif("uring" not in ENGINES, reason="the io_uring engine (ringblob._uring) is not built")


def _written_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(b"\x00" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())


def test_every_shape_acknowledges_writes_in_rounds_no_larger_than_its_share(workdir):
    path = os.path.join(workdir, "gc.dat")
    _written_file(path, 64 << 20)
    before = open(path, "rb").read((16 << 20) + 4096 * 64)[16 << 20:]
    out = subprocess.run([sys.executable, str(TOOL), "--file", path, "--conc", "8", "--duration", "0.3",
                          "--warmup", "0.05"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    shapes = [(r["shape"], r["rounds_in_flight"]) for r in doc["results"]]
    assert shapes == [("journal", 2), ("journal", 1), ("minimal", 1), ("minimal", 2), ("minimal", 4),
                      ("minimal-dsync", 2), ("minimal-dsync", 4)]
    for r in doc["results"]:
        assert r["ops_per_s"] > 0 and r["rounds_per_s"] > 0, r
        assert r["concurrency"] == 8
        assert 1 <= r["values_per_round"] <= -(-8 // r["rounds_in_flight"]), r
        assert 0 < r["p50_us"] <= r["p99_us"], r
    assert doc["best"] == max(doc["results"], key=lambda r: r["ops_per_s"])
    # the values were written where the tool says: after the first 16 MiB (the journal's)
    after = open(path, "rb").read((16 << 20) + 4096 * 64)[16 << 20:]
    assert after != before


def test_a_file_too_small_is_refused_with_its_size(workdir):
    path = os.path.join(workdir, "small.dat")
    _written_file(path, 16 << 20)
    out = subprocess.run([sys.executable, str(TOOL), "--file", path, "--duration", "0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "small.dat has 16777216 bytes; it needs at least 67108864" in out.stderr
