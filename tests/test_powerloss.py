"""Power-loss simulation rounds (a bounded number here; thousands in `make torture`).

Each seeded round runs a store workload over the crash recorder, cuts the
power at a seeded engine op, tears the unsynced writes, reopens and checks the
durability invariants; see tests/powerloss.py. A failing seed reproduces with
``python tests/powerloss.py --seed N``.
"""

from __future__ import annotations

import os

import pytest

from powerloss import run_rounds

ROUNDS = int(os.environ.get("RINGBLOB_POWERLOSS_ROUNDS", "40"))


@pytest.mark.parametrize("chunk", range(4))
def test_power_loss_rounds_hold_the_invariants(chunk):
    per = max(1, ROUNDS // 4)
    results = run_rounds(range(chunk * per, (chunk + 1) * per))
    failures = {r.seed: r.violations for r in results if r.violations}
    assert not failures, f"power-loss invariants broken (reproduce with tests/powerloss.py --seed N): {failures}"
    # the rounds must actually exercise the dangerous cases, not only clean shutdowns
    assert sum(r.acked_durable for r in results) > 0
    assert sum(r.keys_checked for r in results) > 0


def test_rounds_tear_unsynced_writes():
    results = run_rounds(range(1000, 1020))
    assert sum(r.unsynced_writes for r in results) > 0, "no round left an unsynced write to tear"
    assert sum(r.torn_sectors for r in results) > 0
    assert all(not r.violations for r in results), {r.seed: r.violations for r in results if r.violations}
