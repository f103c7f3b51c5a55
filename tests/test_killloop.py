"""Kill -9 loop (a few dozen rounds here; hundreds with ``python tests/killloop.py``).

The real daemon under load from client processes is SIGKILLed at seeded
moments, restarted and checked against the clients' fsynced logs; see
tests/killloop.py. The checker itself is tested too: it must flag a lost
acknowledged write, bytes never put, and a key nobody wrote.
"""

from __future__ import annotations

import os

import pytest

import killloop
from killloop import ABSENT, KeyModel, decode_value, make_value, read_log
from conftest import Daemon, make_tmp

ROUNDS = int(os.environ.get("RINGBLOB_KILLLOOP_ROUNDS", "20"))


def _assert_clean(res, rounds):
    assert not res.violations, "kill -9 invariants broken:\n" + "\n".join(res.violations[:10])
    assert res.rounds == rounds
    assert res.crashes == 0 and res.lost_acknowledged == 0 and res.wrong_bytes == 0 and res.corrupt == 0
    # the rounds must exercise the dangerous cases, not idle daemons
    assert res.acknowledged_durable > 0, "no sync write or flush was acknowledged"
    assert res.durable_checked > 0
    assert res.unacknowledged > 0, "no kill caught a write in flight"
    assert res.client_gets > 0


def test_kill9_rounds_lose_nothing_acknowledged():
    res = killloop.run(ROUNDS, seed=11, clients=3)
    _assert_clean(res, ROUNDS)


def test_kill9_rounds_psync_engine():
    res = killloop.run(max(4, ROUNDS // 3), seed=12, clients=2, engine="psync")
    _assert_clean(res, max(4, ROUNDS // 3))


# -- the checker ---------------------------------------------------------------------------


def test_values_name_their_key_and_op():
    v = make_value(b"c1-k2", 17, 5000)
    assert decode_value(b"c1-k2", v) == 17
    assert decode_value(b"c1-k3", v) is None  # another key's bytes
    assert decode_value(b"c1-k2", v[:-1]) is None  # truncated
    assert decode_value(b"c1-k2", v[:-1] + bytes([v[-1] ^ 1])) is None  # one bit off
    assert decode_value(b"c1-k2", b"\0" * 4096) is None
    assert decode_value(b"k", make_value(b"k", 3, 0)) == 3


def test_model_allows_exactly_the_durable_state_or_later():
    m = KeyModel(ops=[(1, "P"), (2, "P"), (5, "D"), (7, "P")], durable=(2, "P"))
    assert m.allowed(2) is None and m.allowed(7) is None
    assert m.allowed(ABSENT) is None  # a later delete (5) was issued
    assert m.allowed(1) == "lost"
    assert m.allowed(3) == "wrong"  # seq 3 was never a put of this key
    m = KeyModel(ops=[(1, "P"), (2, "P")], durable=(2, "P"))
    assert m.allowed(ABSENT) == "lost"
    m = KeyModel(ops=[(1, "P"), (4, "D")], durable=(4, "D"))
    assert m.allowed(ABSENT) is None and m.allowed(1) == "lost"
    m = KeyModel(ops=[(1, "P")], durable=None)
    assert m.allowed(ABSENT) is None and m.allowed(1) is None


def test_log_durability_rules(tmp_path):
    log = tmp_path / "c.log"
    log.write_text(
        "I 1 a P 10\nA 1 N\n"  # non-sync, then covered by flush 1
        "F 1\n"
        "I 2 b P 10\nA 2 N\n"  # acknowledged after flush 1 was sent: not covered
        "FA 1\n"
        "I 3 c P 10\nA 3 S\n"  # sync
        "I 4 c D\n"  # issued, never acknowledged
        "I 5 d P 10\nA 5 N\nF 2\n"  # flush 2 never returned
    )
    models, bad = read_log(str(log))
    assert not bad
    assert models[b"a"].durable == (1, "P")
    assert models[b"b"].durable is None
    assert models[b"c"].durable == (3, "P") and models[b"c"].ops == [(3, "P"), (4, "D")]
    assert models[b"d"].durable is None


def test_verify_flags_lost_wrong_and_stray_keys():
    wd = make_tmp("killchk-")
    d = Daemon(wd, size="16M").start()
    try:
        log = wd / "c.log"
        log.write_text("I 1 k1 P 100\nA 1 S\nI 2 k2 P 100\nA 2 S\nI 3 k3 P 100\nA 3 S\n")
        import ringblob

        with ringblob.Client(d.socket) as c:
            c.put(b"k1", make_value(b"k1", 1, 100))  # as acknowledged
            # k2 missing: an acknowledged durable write lost
            c.put(b"k3", make_value(b"k3", 3, 99))  # bytes never put for k3
            c.put(b"stray", b"x")  # a key no client wrote
        res = killloop.RunResult(0)
        killloop._verify(str(d.socket), [str(log)], res, "check")
        assert res.lost_acknowledged == 1
        assert res.wrong_bytes == 2
        assert any("k2" in v for v in res.violations) and any("stray" in v for v in res.violations)
        ok = killloop.RunResult(0)
        with ringblob.Client(d.socket) as c:
            c.put(b"k2", make_value(b"k2", 2, 100))
            c.put(b"k3", make_value(b"k3", 3, 100))
            c.delete(b"stray")
        killloop._verify(str(d.socket), [str(log)], ok, "check")
        assert not ok.violations and ok.keys_checked == 3 and ok.durable_checked == 3
    finally:
        d.stop()
        import shutil

        shutil.rmtree(wd, ignore_errors=True)


def test_kills_during_recovery_lose_nothing():
    """Every restart is first killed 0-0.5 s into store open / journal replay."""
    res = killloop.run(6, seed=13, clients=2, recovery_kill_rate=1.0)
    _assert_clean(res, 6)
    assert res.recovery_kills == 6
