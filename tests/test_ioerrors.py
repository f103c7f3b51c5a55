"""The I/O-error loop (tests/ioerrors.py) at test size, and the daemon under a failing fdatasync.

The loop fails engine op N (read, write or fdatasync, the format writes and
recovery reads included) for every N of one seeded workload, once as a single
fault and once sticky, and checks the exceptions, the read-only switch and a
clean reopen after each; see tests/ioerrors.py. Reproduce one run with
``python tests/ioerrors.py --seed S --mode M --n N -v``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import urllib.request
import uuid

import pytest

import ioerrors
from ringblob import Client
from ringblob.engine.faulty import FaultyEngine
from ringblob.errors import IOFailed, ReadOnly
from ringblob.store import BlobStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_ROOT = os.path.join(ROOT, ".test-tmp")
SEED = int(os.environ.get("RINGBLOB_IOERRORS_SEED", "0"))


def _engine() -> str:
    try:
        from ringblob._uring import Ring  # noqa: F401

        return "uring"
    except ImportError:
        return "psync"


@pytest.fixture(scope="module", params=["single", "sticky"])
def loop(request):
    return request.param, ioerrors.run_loop(SEED, request.param, engine=_engine())


def test_io_error_loop_holds_the_invariants(loop):
    mode, results = loop
    # the loop ran to the end: every op of the workload failed once, the last run had none left to fail
    assert results[-1].fired is None and all(r.fired for r in results[:-1])
    assert len(results) > 60, "the workload is expected to issue dozens of engine ops"
    fired = [r for r in results if r.fired]
    kinds = {r.fired for r in fired}
    assert kinds == {"read", "write", "fdatasync"}
    # the open path was hit too: format writes, recovery reads
    assert any(r.fired_at == "create" and r.fired == "write" for r in fired)
    assert any(r.fired_at in ("reopen", "recover after crash") and r.fired == "read" for r in fired)
    assert sum(r.error_steps for r in fired) >= len(fired) // 2, "the faults must reach the callers"
    bad = {r.n: r.violations[:3] for r in results if r.violations}
    assert not bad, f"I/O-error loop ({mode}) violations by N (reproduce with tests/ioerrors.py --seed {SEED} " \
                    f"--mode {mode} --n N -v): {bad}"
    assert sum(r.wrong_bytes for r in results) == 0
    assert sum(r.crashes for r in results) == 0


class _FailReadAt(FaultyEngine):
    """Fail the first read at file offset ``offset`` (once)."""

    def __init__(self, inner, offset: int):
        super().__init__(inner)
        self.offset = offset
        self.hit = False

    def read_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False):
        if offset == self.offset and not self.hit:
            self.hit = True
            self.fail_next("read")
        return super().read_fixed(buf, offset, length, tag, buf_offset=buf_offset, file_index=file_index, link=link)


@pytest.fixture
def workdir():
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, "ioerr-" + uuid.uuid4().hex[:8])
    os.mkdir(d)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def test_read_error_while_verifying_the_journal_tail_keeps_the_record(workdir):
    """Regression (found by the loop): recovery took a read error (EIO) on a journal-tail record's extent
    for 'the data never reached the medium' and dropped the record (then the tail), losing a put that
    flush() had acknowledged durable. A read error must fail the open (IOFailed), not drop records."""
    async def main():
        p = os.path.join(workdir, "d.data")
        s = await BlobStore.create(p, 8 << 20, engine=_engine())
        await s.put(b"base", b"b" * 100, sync=True)
        await s.put(b"k", b"v" * 5000)  # its record carries durable_seq of 'base' only
        await s.flush()  # acknowledged durable; no later batch says so
        page, _length, _digest = s._index.get(b"k")  # test-only peek: where the bytes live
        offset = page * s.page_size
        await s.abandon()  # a crash: recovery will verify the tail record of 'k'
        holder = {}

        def wrap(e):
            holder["e"] = _FailReadAt(e, offset)
            return holder["e"]

        try:
            s = await BlobStore.open(p, engine=_engine(), wrap_engine=wrap)
        except IOFailed as exc:
            assert exc.errno == errno.EIO  # refusing to open on a read error is fine
            assert holder["e"].hit, "recovery did not read the tail record's extent"
        else:
            assert holder["e"].hit, "recovery did not read the tail record's extent"
            try:
                assert await s.get(b"k") == b"v" * 5000, "the store opened without an acknowledged durable write"
            finally:
                await s.close()  # writes a checkpoint
        s = await BlobStore.open(p, engine=_engine())
        try:
            assert await s.get(b"k") == b"v" * 5000
        finally:
            await s.close()

    asyncio.run(main())


def test_failed_checkpoint_raises_IOFailed(workdir):
    """Regression (found by the loop): checkpoint() raised the engine's bare OSError."""
    async def main():
        p = os.path.join(workdir, "d.data")
        holder = {}

        def wrap(e):
            holder["e"] = FaultyEngine(e)
            return holder["e"]

        s = await BlobStore.create(p, 8 << 20, engine=_engine(), wrap_engine=wrap)
        try:
            await s.put(b"a", b"1" * 5000)
            holder["e"].fail_next("fdatasync")  # the checkpoint's first fdatasync
            with pytest.raises(IOFailed) as ei:
                await s.checkpoint()
            assert ei.value.errno == errno.EIO
        finally:
            await s.abandon()

    asyncio.run(main())


def test_close_with_a_failing_checkpoint_does_not_raise_a_bare_oserror(workdir):
    """Regression (found by the loop): close() let a bare OSError of its final checkpoint escape."""
    async def main():
        p = os.path.join(workdir, "d.data")
        holder = {}

        def wrap(e):
            holder["e"] = FaultyEngine(e)
            return holder["e"]

        s = await BlobStore.create(p, 8 << 20, engine=_engine(), wrap_engine=wrap)
        await s.put(b"a", b"1" * 5000, sync=True)
        holder["e"].fail_next("write")  # the checkpoint chunk written by close()
        try:
            await s.close()
        except IOFailed:
            pass
        assert s.closed
        s = await BlobStore.open(p, engine=_engine())
        assert await s.get(b"a") == b"1" * 5000
        await s.close()

    asyncio.run(main())


def test_daemon_with_a_failing_fdatasync_turns_read_only_and_serves_reads(workdir):
    """The real server (run_server) over the real store in a subprocess, its disk wrapped by FaultyEngine."""
    data = os.path.join(workdir, "d.data")
    sock = os.path.join(workdir, "d.sock")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ioerrors; "
            "sys.exit(ioerrors.serve_faulty(sys.argv[2], sys.argv[3]))")
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.join(ROOT, "tests"), data, sock],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        metrics_url = f"http://{line.split()[1]}/metrics"
        with Client(sock, timeout=20) as c:
            c.put(b"durable", b"d" * 9000, sync=True)
            c.put(b"acked", b"a" * 100)  # acknowledged, not yet durable
            assert _metric(metrics_url, "ringblob_read_only") == 0
            proc.send_signal(signal.SIGUSR1)  # the next fdatasync fails with EIO
            assert c.ping(b"x") == b"x"  # the signal is handled before the next request
            with pytest.raises(IOFailed) as ei:
                c.put(b"doomed", b"x" * 10, sync=True)
            # the errno travels in the message's " [errno=N]" trailer (docs/PROTOCOL.md, "Errno")
            assert ei.value.errno == errno.EIO
            assert "EIO" in str(ei.value) and "fdatasync" in str(ei.value)
            with pytest.raises(ReadOnly):
                c.put(b"later", b"y")
            with pytest.raises(ReadOnly):
                c.delete(b"durable")
            with pytest.raises(ReadOnly):
                c.flush()  # 'acked' can no longer be made durable
            assert c.get(b"durable") == b"d" * 9000  # reads go on
            assert c.get(b"acked") == b"a" * 100
            assert c.stat()["read_only"] is True
            assert _metric(metrics_url, "ringblob_read_only") == 1
        with Client(sock, timeout=20) as c2:  # the daemon stays up and takes new connections
            assert c2.get(b"durable") == b"d" * 9000
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    async def reopen():  # a restart recovers from the medium
        s = await BlobStore.open(data, engine=_engine())
        try:
            assert await s.get(b"durable") == b"d" * 9000
            assert await s.get(b"acked") == b"a" * 100  # no power cut: written bytes are on the file
            if s.has(b"doomed"):
                assert await s.get(b"doomed") == b"x" * 10
            assert not s.has(b"later")
            await s.put(b"after", b"z", sync=True)
        finally:
            await s.close()

    asyncio.run(reopen())


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    raise KeyError(name)


async def _two_checkpoints(path: str) -> list:
    """A store whose two superblock slots both name a checkpoint; returns their
    ``(generation, first byte, end byte)`` (the chunk chain of each is one chunk here)."""
    from ringblob.store import format as F

    s = await BlobStore.create(path, 8 << 20, engine=_engine())
    await s.put(b"a", b"1" * 3000, sync=True)
    await s.close()  # checkpoint 1
    s = await BlobStore.open(path, engine=_engine())
    await s.put(b"b", b"2" * 3000, sync=True)
    await s.close()  # checkpoint 2, in the other slot; the first one's pages are kept
    with open(path, "rb") as f:
        raw = f.read(2 * 4096)
    sbs = [F.Superblock.decode(raw[i * 4096 : (i + 1) * 4096]) for i in (0, 1)]
    assert all(sb is not None and sb.ckpt_page for sb in sbs)
    out = sorted(((sb.generation, sb.ckpt_page * sb.page_size, (sb.ckpt_page + sb.ckpt_npages) * sb.page_size)
                  for sb in sbs), reverse=True)
    assert out[0][1] != out[1][1], "the two checkpoints share pages"
    return out


def _open_failing_reads(path: str, ranges: list):
    def wrap(e):
        f = FaultyEngine(e)
        for a, b in ranges:
            f.fail_range("read", a, b)
        return f

    return BlobStore.open(path, engine=_engine(), wrap_engine=wrap)


def test_read_errors_on_both_checkpoints_are_IOFailed_not_Corrupt(workdir):
    """EIO reading the checkpoint of both superblock slots says 'I/O error, check the device'
    (IOFailed with the errno), not 'corrupt, restore from a backup': the bytes were never
    seen, and once the device reads again the store opens with everything in it."""
    async def main():
        p = os.path.join(workdir, "d.data")
        cks = await _two_checkpoints(p)
        with pytest.raises(IOFailed) as ei:
            await _open_failing_reads(p, [(a, b) for _g, a, b in cks])
        assert ei.value.errno == errno.EIO
        msg = str(ei.value)
        assert "I/O error" in msg and "check the device" in msg and "restore from a backup" not in msg
        for gen, _a, _b in cks:
            assert f"generation {gen}" in msg  # what each slot said
        s = await BlobStore.open(p, engine=_engine())  # the medium reads again: nothing was lost
        try:
            assert await s.get(b"a") == b"1" * 3000 and await s.get(b"b") == b"2" * 3000
        finally:
            await s.close()

    asyncio.run(main())


def test_newest_checkpoint_unreadable_opens_from_the_older_slot(workdir):
    """EIO on the newest checkpoint alone: the older slot's checkpoint is loaded and the
    journal replayed from there; nothing acknowledged is lost."""
    async def main():
        p = os.path.join(workdir, "d.data")
        (_g, a, b), _older = await _two_checkpoints(p)
        s = await _open_failing_reads(p, [(a, b)])
        try:
            assert await s.get(b"a") == b"1" * 3000 and await s.get(b"b") == b"2" * 3000
        finally:
            await s.abandon()

    asyncio.run(main())


def test_one_checkpoint_damaged_and_the_other_unreadable_is_IOFailed(workdir):
    """A damaged checkpoint in one slot and a read error on the other: IOFailed (the
    unreadable one may be intact); with both damaged it is Corrupt."""
    from ringblob.errors import Corrupt

    async def main():
        p = os.path.join(workdir, "d.data")
        (_g1, a1, b1), (_g2, a2, b2) = await _two_checkpoints(p)
        with open(p, "r+b") as f:  # damage the newest checkpoint's chunk (its CRC32C fails)
            f.seek(a1 + 100)
            f.write(b"\xff" * 64)
        with pytest.raises(IOFailed) as ei:
            await _open_failing_reads(p, [(a2, b2)])
        assert "CRC32C" in str(ei.value) and ei.value.errno == errno.EIO
        with open(p, "r+b") as f:  # now damage the older one too
            f.seek(a2 + 100)
            f.write(b"\xff" * 64)
        with pytest.raises(Corrupt) as ei:
            await BlobStore.open(p, engine=_engine())
        assert "restore from a backup" in str(ei.value)

    asyncio.run(main())


def test_scrub_reports_unreadable_blobs_apart_from_damaged_ones(workdir):
    """A blob whose read fails (EIO on its extent) is in ``unreadable_keys``, not in
    ``bad_keys``, and is not counted as a checksum failure; a flipped byte is ``bad_keys``."""
    async def main():
        p = os.path.join(workdir, "d.data")
        s = await BlobStore.create(p, 8 << 20, engine=_engine())
        for k in (b"ok", b"eio", b"flip"):
            await s.put(k, k * 2000, sync=True)
        eio_page = s._index.get(b"eio")[0]  # test-only peek: where the bytes live
        flip_page = s._index.get(b"flip")[0]
        P = s.page_size
        await s.close()
        with open(p, "r+b") as f:
            f.seek(flip_page * P + 10)
            f.write(b"X")
        s = await _open_failing_reads(p, [(eio_page * P, (eio_page + 1) * P)])
        try:
            rep = await s.scrub()
            assert rep["bad_keys"] == [b"flip"]
            assert rep["unreadable_keys"] == [b"eio"]
            assert rep["checked"] == 3 and rep["bytes_checked"] == len(b"ok" * 2000)
            assert s.stat()["checksum_failures"] == 1
        finally:
            await s.close()

    asyncio.run(main())
