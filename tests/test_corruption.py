"""Corruption rounds (tests/corruption.py) at test size: seeded bit flips in data pages, journal,
superblocks and checkpoint chunks of a closed store; Corrupt for exactly the damaged blobs, fallback
to the redundant slot, the journal tail dropped from a damaged batch, never a wrong byte.

Reproduce a failing seed with ``python tests/corruption.py --seed N -v``.
"""

from __future__ import annotations

import os

import pytest

import corruption

ROUNDS = int(os.environ.get("RINGBLOB_CORRUPTION_ROUNDS", "60"))


@pytest.fixture(scope="module")
def results():
    # psync keeps the rounds quick on a busy machine; the store's checks are the same over io_uring
    # (the torture run, `python tests/corruption.py`, uses io_uring)
    return corruption.run_rounds(range(ROUNDS), engine="psync")


def test_corruption_rounds_hold_the_invariants(results):
    failures = {r.seed: r.violations[:4] for r in results if r.violations}
    assert not failures, f"corruption invariants broken (reproduce with tests/corruption.py --seed N -v): {failures}"
    assert sum(r.wrong_bytes for r in results) == 0
    assert sum(r.lost_acknowledged for r in results) == 0
    assert sum(r.crashes for r in results) == 0


def test_rounds_cover_every_region_and_outcome(results):
    assert {r.region for r in results} == set(corruption.REGIONS)
    assert {r.ending for r in results} == {"close", "crash"}
    assert sum(r.damaged_blobs for r in results) > 0 and sum(r.detected for r in results) > 0
    assert sum(r.repaired for r in results) > 0, "no damaged blob was rewritten and read back after a reopen"
    assert any(r.fallback and not r.open_refused for r in results), "no round fell back to the older slot"
    assert any(r.truncated for r in results), "no round dropped a journal tail"
    assert sum(r.padding_flips for r in results) > 0, "no flip landed in unchecked padding"
    # a round with no detectable damage must still check every key
    assert all(r.keys_checked > 0 for r in results if not r.open_refused)
