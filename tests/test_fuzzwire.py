"""Wire-protocol fuzzing against a real ``ringblob serve`` (a bounded number of inputs here;
thousands in ``make torture``: ``python tests/fuzzwire.py --inputs 5000``).

See tests/fuzzwire.py for what each input is and what the oracle checks.
"""

from __future__ import annotations

import os

from fuzzwire import decode_locally, run_fuzz

INPUTS = int(os.environ.get("RINGBLOB_FUZZWIRE_INPUTS", "300"))


def test_fuzzed_frames_get_clear_answers_and_the_daemon_keeps_serving():
    r = run_fuzz(INPUTS, seed=0)
    assert not r.violations, r.violations[:3]
    assert r.crashes == 0 and r.acknowledged_lost == 0 and r.wrong_bytes == 0
    assert r.inputs >= INPUTS
    # the inputs really cover the kinds of bad input, and valid requests too
    assert r.malformed > INPUTS // 10 and r.too_large > 0 and r.incomplete > 0
    assert r.requests > INPUTS // 2 and r.canary_checks >= INPUTS // 25


def test_fuzzed_frames_on_the_asyncio_event_loop():
    """The same fuzzing with the daemon on the standard asyncio loop (other transports, other flow control)."""
    r = run_fuzz(max(50, INPUTS // 2), seed=1, loop="asyncio")
    assert not r.violations, r.violations[:3]
    assert r.crashes == 0 and r.malformed > 0 and r.requests > 0


def test_local_oracle_classifies_inputs():
    from ringblob import errors
    from ringblob import protocol as P

    good = P.encode_get(5, b"k")
    assert decode_locally(good)[0][0].key == b"k"
    reqs, err, incomplete = decode_locally(good + good[:7])
    assert len(reqs) == 1 and err is None and incomplete
    reqs, err, _ = decode_locally(good + b"XXXX" + good[4:])
    assert len(reqs) == 1 and isinstance(err, errors.ProtocolError) and err.request_id == 0
    big = P.HEADER.pack(P.MAGIC, 1, P.Op.PUT, 0, 9, 0xFFFFFFFF)
    reqs, err, _ = decode_locally(big)
    assert isinstance(err, errors.FrameTooLarge) and err.request_id == 9
