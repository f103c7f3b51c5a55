"""Load and soak (about 8 s here; minutes with ``python tests/soak.py --seconds N``).

64 concurrent connections from two client processes with mixed put/get/has/
delete/get_many/flush traffic; afterwards every key verifies, the daemon's RSS
stayed bounded, no file descriptor leaked and the error counters are zero.
See tests/soak.py.
"""

from __future__ import annotations

import os

import soak

SECONDS = float(os.environ.get("RINGBLOB_SOAK_SECONDS", "8"))


def test_soak_64_connections_every_check_holds():
    res = soak.run(SECONDS, procs=2, conns=32, seed=3)
    assert not res.violations, "soak checks failed:\n" + "\n".join(res.violations[:10])
    assert res.connections >= 64
    assert res.crashes == 0 and res.acknowledged_lost == 0 and res.wrong_bytes == 0
    # the load was real and mixed
    ops = res.client_ops
    for op in ("put", "mput", "get", "has", "delete", "flush", "mget"):
        assert ops[op] > 0, f"no {op} was issued"
    assert res.requests >= sum(ops[op] for op in ("put", "mput", "get", "has", "delete", "flush", "mget"))
    assert res.keys_verified == 2 * 32 * soak.TASKS_PER_CONN * soak.KEYS_PER_TASK
    assert len(res.rss_samples) >= 10
    assert res.fds_before > 0 and res.fds_after == res.fds_before


def test_checks_see_a_leak(tmp_path):
    """The helpers read what they claim: an fd opened here is counted, RSS is a plausible number."""
    pid = os.getpid()
    n = soak.fd_count(pid)
    fh = open(tmp_path / "x", "w")
    try:
        assert soak.fd_count(pid) == n + 1
    finally:
        fh.close()
    before = soak.rss_bytes(pid)
    blob = bytearray(64 << 20)
    blob[:: 4096] = b"\1" * len(blob[:: 4096])  # touch every page
    assert soak.rss_bytes(pid) >= before + (48 << 20)
    del blob
