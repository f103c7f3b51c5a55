"""The power-loss simulator itself: what it keeps, undoes and tears."""

from __future__ import annotations

import os

import pytest

from ringblob.direct import open_direct
from ringblob.engine.crashsim import CrashRecorder, simulate_power_loss
from ringblob.engine.psync import PsyncEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def workdir(tmp_path_factory):
    d = os.path.join(REPO, ".test-tmp", f"crashsim-{os.getpid()}-{os.urandom(3).hex()}")
    os.makedirs(d)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def _write(eng, buf, offset, fill, tag, link=False):
    buf.view[:8192] = bytes([fill]) * 8192
    eng.write_fixed(buf, offset, 8192, tag, link=link)


def _drain(eng, n):
    got = []
    while len(got) < n:
        got += eng.wait(1, timeout=5)
    return dict(got)


def test_synced_writes_survive_and_unsynced_are_undone_or_torn(workdir):
    path = os.path.join(workdir, "data")
    log = os.path.join(workdir, "crash.log")
    f = open_direct(path, create_size=1 << 20)
    eng = CrashRecorder(PsyncEngine([f.fd], block_size=f.block_size, buffer_count=4), path, log)
    a, b = eng.lease(), eng.lease()
    _write(eng, a, 0, 0xAA, "a")  # reaped, then covered by the fdatasync below
    eng.submit()
    assert _drain(eng, 1) == {"a": 8192}
    eng.fdatasync("s1")
    eng.submit()
    assert _drain(eng, 1) == {"s1": 0}
    _write(eng, b, 65536, 0xBB, "b", link=True)  # linked ahead of an fdatasync that never completes
    _write(eng, a, 131072, 0xCC, "c")  # completed but never synced
    eng.submit()
    assert _drain(eng, 2) == {"b": 8192, "c": 8192}
    eng.close()
    f.close()

    seen_states = set()
    for seed in range(40):
        with open(path, "r+b") as raw:  # reset the unsynced regions to what the medium may hold
            raw.seek(65536)
            raw.write(bytes([0xBB]) * 8192)
            raw.seek(131072)
            raw.write(bytes([0xCC]) * 8192)
        out = simulate_power_loss(path, log, seed)
        assert out.unsynced_writes == 2
        with open(path, "rb") as raw:
            img = raw.read(1 << 20)
        assert img[:8192] == bytes([0xAA]) * 8192, "a write covered by a completed fdatasync was lost"
        for off, fill in ((65536, 0xBB), (131072, 0xCC)):
            for s in range(off, off + 8192, 4096):
                sector = img[s : s + 4096]
                if sector == bytes([fill]) * 4096:
                    seen_states.add("new")
                elif sector == bytes(4096):
                    seen_states.add("old")
                else:
                    seen_states.add("garbage")
    assert seen_states == {"new", "old", "garbage"}


def test_same_seed_same_image(workdir):
    path = os.path.join(workdir, "data")
    log = os.path.join(workdir, "crash.log")
    f = open_direct(path, create_size=1 << 20)
    eng = CrashRecorder(PsyncEngine([f.fd], block_size=f.block_size, buffer_count=4), path, log)
    buf = eng.lease()
    for i in range(16):
        _write(eng, buf, i * 8192, i + 1, i)
        eng.submit()
        _drain(eng, 1)
    eng.close()
    f.close()
    with open(path, "rb") as raw:
        pristine = raw.read()
    images = []
    for _ in range(2):
        with open(path, "wb") as raw:
            raw.write(pristine)
        simulate_power_loss(path, log, seed=7)
        with open(path, "rb") as raw:
            images.append(raw.read())
    assert images[0] == images[1]
    assert images[0] != pristine


def test_an_unsynced_write_queued_before_a_durable_one_completed_does_not_undo_it(workdir):
    """Two writes to one range queued together: the first is reaped and made durable, the second
    is not. Undoing the second must not bring back what the range held before the first."""
    path = os.path.join(workdir, "data")
    log = os.path.join(workdir, "crash.log")
    f = open_direct(path, create_size=1 << 20)
    eng = CrashRecorder(PsyncEngine([f.fd], block_size=f.block_size, buffer_count=4, threads=0), path, log)
    a, b = eng.lease(), eng.lease()
    _write(eng, a, 0, 0x11, "first")  # both queued before either ran: each saw the zeroes as "old"
    _write(eng, b, 0, 0x22, "second")
    eng.submit()
    assert eng.reap(1) == [("first", 8192)]
    eng.fdatasync("sync")  # covers "first" only: "second" was not reaped yet
    eng.submit()
    assert dict(eng.reap()) == {"second": 8192, "sync": 0}
    eng.close()
    f.close()
    for seed in range(20):
        simulate_power_loss(path, log, seed)
        with open(path, "rb") as raw:
            img = raw.read(8192)
        for s in range(0, 8192, 4096):
            assert img[s : s + 4096] != bytes(4096), f"seed {seed}: the durable write was undone"


def test_a_completed_dsync_write_is_durable_without_an_fdatasync(workdir):
    """A write queued with dsync=True (RWF_DSYNC) and reaped is durable by itself: no power cut
    undoes or tears it; a plain write reaped beside it, with no fdatasync after, is not."""
    path = os.path.join(workdir, "data")
    log = os.path.join(workdir, "crash.log")
    f = open_direct(path, create_size=1 << 20)
    eng = CrashRecorder(PsyncEngine([f.fd], block_size=f.block_size, buffer_count=4), path, log)
    a, b = eng.lease(), eng.lease()
    a.view[:8192] = b"\xd5" * 8192
    eng.write_fixed(a, 0, 8192, "dsync", dsync=True)
    _write(eng, b, 65536, 0xEE, "plain")
    eng.submit()
    assert _drain(eng, 2) == {"dsync": 8192, "plain": 8192}
    eng.close()
    f.close()
    plain_states = set()
    for seed in range(30):
        with open(path, "r+b") as raw:
            raw.seek(65536)
            raw.write(b"\xee" * 8192)
        out = simulate_power_loss(path, log, seed)
        assert out.unsynced_writes == 1  # the plain write only
        with open(path, "rb") as raw:
            img = raw.read(1 << 17)
        assert img[:8192] == b"\xd5" * 8192, f"seed {seed}: a completed RWF_DSYNC write was lost"
        plain_states.add(img[65536:65536 + 4096] == b"\xee" * 4096)
    assert plain_states == {True, False}
