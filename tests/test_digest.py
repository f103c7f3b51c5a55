"""ringblob.digest: both parallel_hash modes give BLAKE3's digests, and only whole values of
PARALLEL_MIN bytes or more go to BLAKE3's thread pool."""

from __future__ import annotations

import os

import blake3
import pytest

from ringblob import config, digest


@pytest.fixture(autouse=True)
def _restore():
    was = "on" if digest.parallel() else "off"
    yield
    digest.configure(was)


def test_modes_and_the_setting():
    assert digest.configure("on") is True and digest.parallel()
    assert digest.configure("off") is False and not digest.parallel()
    with pytest.raises(ValueError, match="parallel_hash: 'auto' is not one of off, on"):
        digest.configure("auto")
    assert not digest.parallel()  # a refused mode changes nothing
    assert config.PARALLEL_HASH_MODES == digest.PARALLEL_MODES
    assert config.Settings().parallel_hash == "off"


@pytest.mark.parametrize("mode", ["on", "off"])
def test_digests_are_blake3_on_both_sides_of_the_threshold(mode):
    digest.configure(mode)
    m = digest.PARALLEL_MIN
    for n in (0, 1, 4096, m - 1, m, m + 1, 4 * m + 12345):
        data = os.urandom(n)
        want = blake3.blake3(data).digest()
        assert digest.digest(data) == want
        assert digest.digest(memoryview(bytearray(data))) == want


def test_thread_pool_is_taken_for_large_values_only(monkeypatch):
    """With the mode on, values of PARALLEL_MIN bytes or more ask blake3 for max_threads=AUTO;
    smaller ones, and every value with the mode off, for the default (one thread)."""
    seen = []
    real = blake3.blake3
    auto = real.AUTO

    def spy(*args, **kw):
        seen.append(kw.get("max_threads", 1))
        return real(*args, **kw)

    monkeypatch.setattr(blake3, "blake3", spy)
    digest.configure("on")
    digest.digest(b"x" * (digest.PARALLEL_MIN - 1))
    digest.digest(b"x" * digest.PARALLEL_MIN)
    digest.configure("off")
    digest.digest(b"x" * digest.PARALLEL_MIN)
    assert seen == [1, auto, 1]
