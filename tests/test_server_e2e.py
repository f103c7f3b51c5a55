"""End-to-end tests: a real daemon process (``python -m ringblob.server``) over the real store.

Clients are raw Unix sockets speaking the shared codec (ringblob.protocol).
Readiness comes from sd_notify: each daemon gets a NOTIFY_SOCKET and the
tests wait for READY=1 (whose STATUS line names the metrics URL). Data files
live under .test-tmp/ in the repository (a real file system, O_DIRECT).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import blake3
import pytest

from ringblob import errors
from ringblob import protocol as P

# The daemon helper, raw-socket client and fixtures (workdir, daemons) live in tests/conftest.py.
from conftest import ROOT, Raw, spawn  # noqa: E402,F401
from conftest import NotifyDaemon as Daemon  # noqa: E402,F401


def test_every_operation_and_error_end_to_end(daemons, workdir):
    d = spawn(daemons, workdir, "--max-blob-size", str(1 << 20), size=str(16 << 20))
    c = Raw(d.sock)
    assert c.ok(P.encode_ping(1, b"hi")) == b"hi"
    assert P.decode_bool_reply(c.ok(P.encode_needs_flush(2))) is False
    c.ok(P.encode_put(3, b"alpha", b"A" * 5000))
    assert P.decode_bool_reply(c.ok(P.encode_needs_flush(4))) is True
    c.ok(P.encode_flush(5))
    assert P.decode_bool_reply(c.ok(P.encode_needs_flush(6))) is False
    assert c.ok(P.encode_get(7, b"alpha")) == b"A" * 5000
    assert P.decode_bool_reply(c.ok(P.encode_has(8, b"alpha"))) is True
    assert P.decode_bool_reply(c.ok(P.encode_has(9, b"beta"))) is False
    c.ok(P.encode_put(10, b"empty", b"", sync=True))
    assert c.ok(P.encode_get(11, b"empty")) == b""
    with pytest.raises(errors.NotFound, match="beta"):
        c.ok(P.encode_get(12, b"beta"))
    c.ok(P.encode_delete(13, b"alpha", sync=True))
    c.ok(P.encode_delete(14, b"alpha"))  # missing: not an error
    with pytest.raises(errors.NotFound):
        c.ok(P.encode_get(15, b"alpha"))
    # content-addressed put
    digest = blake3.blake3(b"cas value").digest()
    c.ok(P.encode_put(16, digest, b"cas value", verify=True, sync=True))
    with pytest.raises(errors.DigestMismatch):
        c.ok(P.encode_put(17, digest, b"tampered", verify=True))
    assert c.ok(P.encode_get(18, digest)) == b"cas value"
    # invalid key (empty) comes from the store; the connection stays usable
    with pytest.raises(errors.InvalidKey):
        c.ok(P.encode_frame(P.Op.PUT, 19, b"\x00value"))
    # too large for the store's max_blob_size
    with pytest.raises(errors.TooLarge):
        c.ok(P.encode_put(20, b"huge", b"x" * ((1 << 20) + 1)))
    # batches
    items = [(b"k/%03d" % i, b"v%d" % i * (i + 1)) for i in range(30)]
    c.ok(P.encode_mput(21, items, sync=True))
    res = P.decode_mget_reply(c.ok(P.encode_mget(22, [b"k/000", b"k/nope", b"k/029"])))
    assert res[0] == items[0][1] and res[2] == items[29][1] and isinstance(res[1], errors.NotFound)
    # LIST pages in ascending order
    seen, start = [], None
    while True:
        keys, more = P.decode_list_reply(c.ok(P.encode_list(23, b"k/", start, 7)))
        seen += keys
        if not more:
            break
        assert len(keys) == 7
        start = keys[-1]
    assert seen == [k for k, _ in items]
    keys, more = P.decode_list_reply(c.ok(P.encode_list(24, b"", None, 0)))
    assert keys == sorted(keys) and len(keys) == 32 and not more
    st = P.decode_stat_reply(c.ok(P.encode_stat(25)))
    assert st["blob_count"] == 32 and st["server"]["connections"] == 1
    # NoSpace: the 16 MiB file cannot hold 20 blobs of 1 MiB; the store stays usable
    big = b"z" * (1 << 20)
    with pytest.raises(errors.NoSpace):
        for i in range(20):
            c.ok(P.encode_put(100 + i, b"big%d" % i, big))
    assert c.ok(P.encode_get(26, b"k/005")) == items[5][1]
    c.close()
    assert d.stop() == 0


def test_pipelined_requests_many_ids_in_one_write(daemons, workdir):
    d = spawn(daemons, workdir)
    c = Raw(d.sock)
    c.ok(P.encode_mput(1, [(b"pre%d" % i, b"P%d" % i) for i in range(50)]))
    frames, expect = [], {}
    for i in range(600):
        rid = 1000 + i
        kind = i % 3
        if kind == 0:
            frames.append(P.encode_put(rid, b"new%d" % i, b"N%d" % i * 100, sync=i % 2 == 0))
            expect[rid] = (P.Op.PUT, b"")
        elif kind == 1:
            frames.append(P.encode_get(rid, b"pre%d" % (i % 50)))
            expect[rid] = (P.Op.GET, b"P%d" % (i % 50))
        else:
            frames.append(P.encode_ping(rid, b"%d" % rid))
            expect[rid] = (P.Op.PING, b"%d" % rid)
    c.send(*frames)
    got = {}
    while len(got) < len(expect):
        f = c.recv()
        assert f is not None
        assert f.request_id not in got
        got[f.request_id] = f
    for rid, (op, body) in expect.items():
        f = got[rid]
        assert (f.opcode, f.status, f.body) == (op, 0, body)
    for i in range(0, 600, 3):
        assert c.ok(P.encode_get(5000 + i, b"new%d" % i)) == b"N%d" % i * 100
    c.close()
    assert d.stop() == 0


def test_concurrent_clients(daemons, workdir):
    d = spawn(daemons, workdir)
    failures = []

    def worker(w):
        try:
            c = Raw(d.sock)
            for i in range(60):
                key, val = b"w%d/%d" % (w, i), os.urandom(100 + i * 37)
                c.ok(P.encode_put(i * 2 + 1, key, val, sync=i % 10 == 0))
                assert c.ok(P.encode_get(i * 2 + 2, key)) == val
            keys, _ = P.decode_list_reply(c.ok(P.encode_list(999, b"w%d/" % w)))
            assert len(keys) == 60
            c.close()
        except Exception as exc:  # reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    c = Raw(d.sock)
    assert P.decode_stat_reply(c.ok(P.encode_stat(1)))["blob_count"] == 480
    c.close()
    assert d.stop() == 0


def test_malformed_truncated_and_oversized_frames(daemons, workdir):
    d = spawn(daemons, workdir, "--max-frame-size", str(1 << 20))
    good = Raw(d.sock)
    good.ok(P.encode_put(1, b"survivor", b"still here", sync=True))
    # bad magic
    c = Raw(d.sock)
    c.send(b"GET / HTTP/1.1\r\n\r\n")
    f = c.recv()
    assert f.status == errors.ProtocolError.code and f.request_id == 0
    assert c.recv() is None
    # oversized: refused from the header, with the frame's request id
    c = Raw(d.sock)
    c.send(P.HEADER.pack(P.MAGIC, P.VERSION, P.Op.PUT, 0, 77, 8 << 20) + b"x" * 4096)
    f = c.recv()
    assert (f.status, f.request_id, f.opcode) == (errors.FrameTooLarge.code, 77, P.Op.PUT)
    assert "maximum frame size" in f.body.decode()
    assert c.recv() is None
    # a malformed body after a valid request: the valid one is answered, then the close
    c = Raw(d.sock)
    c.send(P.encode_put(5, b"before", b"ok"), P.encode_frame(P.Op.GET, 6, b"\x40short"))
    got = {f.request_id: f for f in (c.recv(), c.recv())}
    assert got[5].status == 0 and got[6].status == errors.ProtocolError.code
    assert c.recv() is None
    # truncated: half a frame, then the client goes away
    c = Raw(d.sock)
    c.send(P.encode_put(7, b"torn", b"t" * 10000)[:3000])
    c.close()
    # another client and the daemon are unaffected; nothing of theirs is lost
    assert good.ok(P.encode_get(2, b"survivor")) == b"still here"
    assert good.ok(P.encode_get(3, b"before")) == b"ok"
    assert P.decode_bool_reply(good.ok(P.encode_has(4, b"torn"))) is False
    m = d.scrape()
    assert m[("ringblob_rejected_frames_total", (("reason", "malformed"),))] == 2
    assert m[("ringblob_rejected_frames_total", (("reason", "too_large"),))] == 1
    good.close()
    assert d.stop() == 0


def test_client_disconnecting_mid_request(daemons, workdir):
    d = spawn(daemons, workdir)
    for round_ in range(3):
        c = Raw(d.sock)
        c.send(*(P.encode_put(i, b"gone%d/%d" % (round_, i), b"g" * 20000, sync=True) for i in range(1, 41)),
               P.encode_get(99, b"gone0/1"))
        c.s.shutdown(socket.SHUT_RDWR)
        c.close()
    c = Raw(d.sock)
    assert c.ok(P.encode_ping(1, b"alive")) == b"alive"
    c.ok(P.encode_put(2, b"after", b"x", sync=True))
    assert c.ok(P.encode_get(3, b"after")) == b"x"
    st = P.decode_stat_reply(c.ok(P.encode_stat(4)))
    assert st["server"]["in_flight"] == 0  # nothing left behind by the clients that went away
    c.close()
    assert d.stop() == 0


def test_connection_limits_and_access_control(daemons, workdir):
    d = spawn(daemons, workdir, "--max-connections", "2", "--allow-gid", str(os.getgid()))
    a, b = Raw(d.sock), Raw(d.sock)
    assert a.ok(P.encode_ping(1)) == b"" and b.ok(P.encode_ping(1)) == b""
    c = Raw(d.sock)
    f = c.recv()
    assert (f.opcode, f.request_id, f.status) == (0, 0, errors.Busy.code)
    assert c.recv() is None
    for x in (a, b, c):
        x.close()
    assert d.stop() == 0
    d2 = spawn(daemons, workdir, "--allow-uid", str(os.getuid() + 4242))
    c = Raw(d2.sock)
    f = c.recv()
    assert f.status == errors.AccessDenied.code and str(os.getuid()) in f.body.decode()
    assert c.recv() is None
    c.close()
    assert d2.scrape()[("ringblob_connections_rejected_total", (("reason", "access_denied"),))] == 1
    assert d2.stop() == 0


def test_parallel_hash_on_serves_large_values_and_stat_says_so(daemons, workdir):
    """--parallel-hash on: large values hashed by BLAKE3's thread pool (a 200 KiB value the store
    has whole, a 1 MiB one received into leased buffers, both checked on GET) read back intact;
    values received into leased buffers are hashed by the hash worker, and a content-addressed
    PUT of one is checked against its key before anything is stored; STAT and the log say which
    mode is in force."""
    d = spawn(daemons, workdir, "--parallel-hash", "on")
    c = Raw(d.sock)
    mid, big = os.urandom(200 << 10), os.urandom(1 << 20)
    c.ok(P.encode_put(1, b"mid", mid, sync=True))
    c.ok(P.encode_put(2, b"big", big, sync=True))
    assert c.ok(P.encode_get(3, b"mid")) == mid and c.ok(P.encode_get(4, b"big")) == big
    cas = blake3.blake3(big[::-1]).digest()
    c.ok(P.encode_put(8, cas, big[::-1], verify=True))
    with pytest.raises(errors.DigestMismatch):
        c.ok(P.encode_put(9, blake3.blake3(b"other").digest(), big, verify=True, sync=True))
    with pytest.raises(errors.NotFound):
        c.ok(P.encode_get(10, blake3.blake3(b"other").digest()))
    assert c.ok(P.encode_get(11, cas)) == big[::-1]
    st = P.decode_stat_reply(c.ok(P.encode_stat(5)))
    assert st["parallel_hash"] is True and st["hash_worker"] is True
    c.close()
    assert d.stop() == 0
    with open(d.log_path) as f:
        assert "parallel_hash on: whole values of 128 KiB or more are hashed by BLAKE3's thread pool" in f.read()
    d2 = spawn(daemons, workdir)  # the default (auto), on the same data: the same digests
    c = Raw(d2.sock)
    assert c.ok(P.encode_get(6, b"big")) == big
    c.ok(P.encode_put(12, b"big2", big[::-1], sync=True))
    assert c.ok(P.encode_get(13, b"big2")) == big[::-1]
    st = P.decode_stat_reply(c.ok(P.encode_stat(7)))  # auto: the worker wherever 2+ CPUs are usable
    assert st["parallel_hash"] is False and st["hash_worker"] is (len(os.sched_getaffinity(0)) >= 2)
    c.close()
    assert d2.stop() == 0


def test_metrics_scraped_over_http_move(daemons, workdir):
    d = spawn(daemons, workdir, "--sync-method", "dsync")
    before = d.scrape()
    c = Raw(d.sock)
    for i in range(20):
        c.ok(P.encode_put(i + 1, b"m%d" % i, b"x" * 8192, sync=True))
    c.send(*(P.encode_put(100 + i, b"g%d" % i, b"y" * 100, sync=True) for i in range(32)))
    for _ in range(32):
        assert c.recv().status == 0
    # sync_method=dsync: those rounds' writes carried RWF_DSYNC, no fdatasync
    mid = d.scrape()
    assert mid[("ringblob_dsync_commits_total", ())] - before.get(("ringblob_dsync_commits_total", ()), 0) >= 2
    assert mid.get(("ringblob_fdatasync_total", ()), 0) == before.get(("ringblob_fdatasync_total", ()), 0)
    # a sync PUT after a sync=False one: its round ends with an fdatasync (it covers the earlier one too)
    c.ok(P.encode_put(150, b"n0", b"z" * 100))
    c.ok(P.encode_put(151, b"n1", b"z" * 100, sync=True))
    c.ok(P.encode_get(200, b"m1"))
    with pytest.raises(errors.NotFound):
        c.ok(P.encode_get(201, b"none"))
    c.ok(P.encode_flush(202))  # nothing to flush: skipped
    after = d.scrape()

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("ringblob_requests_total", (("op", "put"), ("status", "ok"))) == 54
    assert delta("ringblob_requests_total", (("op", "get"), ("status", "ok"))) == 1
    assert delta("ringblob_requests_total", (("op", "get"), ("status", "not_found"))) == 1
    assert delta("ringblob_request_duration_seconds_count", (("op", "put"),)) == 54
    assert delta("ringblob_fdatasync_total") >= 1
    assert delta("ringblob_fdatasync_duration_seconds_count") >= 1
    assert delta("ringblob_group_commit_batch_size_count") >= 3
    assert delta("ringblob_group_commit_batch_size_sum") == 53
    assert delta("ringblob_flush_skipped_total") == 1
    assert delta("ringblob_sqes_submitted_total") > 0
    assert delta("ringblob_cqes_reaped_total") > 0
    assert delta("ringblob_written_bytes_total") >= 20 * 8192
    assert delta("ringblob_read_bytes_total") >= 8192
    assert delta("ringblob_received_bytes_total") > 20 * 8192
    assert after[("ringblob_blobs", ())] == 54
    assert after[("ringblob_used_bytes", ())] >= 54 * 4096
    assert after[("ringblob_free_bytes", ())] > 0
    assert after[("ringblob_journal_bytes", ())] > 0
    assert after[("ringblob_read_only", ())] == 0
    assert after[("ringblob_connections", ())] == 1
    assert after[("ringblob_requests_in_flight", ())] == 0
    assert ("ringblob_checkpoints_total", ()) in after
    assert ("ringblob_checksum_failures_total", ()) in after
    c.close()
    assert d.stop() == 0


def test_sigterm_shutdown_loses_nothing(daemons, workdir):
    d = spawn(daemons, workdir)
    c = Raw(d.sock)
    values = {b"t%04d" % i: os.urandom(50 + (i * 131) % 9000) for i in range(300)}
    c.send(*(P.encode_put(i + 1, k, v) for i, (k, v) in enumerate(values.items())))  # sync=False
    for _ in values:
        assert c.recv().status == 0
    c.ok(P.encode_delete(9999, b"t0007"))
    del values[b"t0007"]
    # more unsynced puts still being answered as SIGTERM arrives: every acknowledged one must survive
    late = {b"late%03d" % i: b"L%d" % i * 50 for i in range(100)}
    c.send(*(P.encode_put(20000 + i, k, v) for i, (k, v) in enumerate(late.items())))
    d.proc.send_signal(signal.SIGTERM)
    acked = set()
    names = list(late)
    while True:
        f = c.recv()
        if f is None:
            break
        if f.status == 0:
            acked.add(names[f.request_id - 20000])
        else:
            assert f.status == errors.ServerShuttingDown.code
    d.wait_notify("STOPPING=1", 10)
    assert d.proc.wait(30) == 0
    d.log.close()
    d.notify.close()
    assert not os.path.exists(d.sock)
    assert "shutdown complete" in d.output()
    d2 = spawn(daemons, workdir)
    c2 = Raw(d2.sock)
    for k, v in values.items():
        assert c2.ok(P.encode_get(1, k)) == v
    for k in acked:
        assert c2.ok(P.encode_get(2, k)) == late[k]
    assert not P.decode_bool_reply(c2.ok(P.encode_has(3, b"t0007")))
    assert P.decode_stat_reply(c2.ok(P.encode_stat(4)))["blob_count"] == len(values) + len(acked)
    c2.close()
    assert d2.stop(signal.SIGINT) == 0  # SIGINT stops it cleanly too


def _sigkill_during_sync_puts(d, writers: int, batch_of, want: int, wait_s: float, max_puts: int | None = None):
    """Run ``writers`` threads sending sync PUT batches (``batch_of(w, i)`` -> [(key, value)])
    to daemon ``d``, SIGKILL it once ``want`` puts were acknowledged (or ``wait_s`` passed) and
    return ``{key: value}`` of every acknowledged put (at least ``want``)."""
    acked: dict[bytes, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w):
        try:
            c = Raw(d.sock, timeout=10)
        except OSError:
            return
        i = 0
        try:
            while not stop.is_set() and (max_puts is None or i < max_puts):
                batch = batch_of(w, i)
                c.send(*(P.encode_put(i + j + 1, k, v, sync=True) for j, (k, v) in enumerate(batch)))
                for _ in batch:
                    f = c.recv()
                    if f is None:
                        return
                    if f.status == 0:
                        with lock:
                            acked[batch[f.request_id - i - 1][0]] = batch[f.request_id - i - 1][1]
                i += len(batch)
        except OSError:
            return
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + wait_s
    while len(acked) < want and time.monotonic() < deadline:
        time.sleep(0.02)
    d.proc.kill()  # SIGKILL in the middle of sync puts
    d.proc.wait()
    stop.set()
    for t in threads:
        t.join(10)
    d.log.close()
    d.notify.close()
    assert len(acked) >= want
    with lock:
        return dict(acked)


def _all_there(d2, acked: dict) -> None:
    """Every acknowledged put reads back from the restarted daemon ``d2``, which then stops cleanly."""
    c = Raw(d2.sock)
    for k, v in acked.items():
        assert c.ok(P.encode_get(1, k)) == v, k
    c.close()
    assert d2.stop() == 0


def test_sigkill_during_sync_puts_then_restart(daemons, workdir):
    d = spawn(daemons, workdir)
    acked = _sigkill_during_sync_puts(
        d, 4, lambda w, i: [(b"s%d/%05d" % (w, i + j), os.urandom(64 + (i + j) % 3000)) for j in range(8)],
        want=200, wait_s=10)
    assert os.path.exists(d.sock)  # the dead daemon's stale socket: the restart replaces it
    _all_there(spawn(daemons, workdir), acked)


def test_second_daemon_on_the_same_data_file_refuses(daemons, workdir):
    d = spawn(daemons, workdir)
    other_sock = os.path.join(workdir, "other.sock")
    proc = subprocess.run(
        [sys.executable, "-m", "ringblob.server", "--data", d.data, "--socket", other_sock],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "lock" in proc.stderr.lower() or "StoreLocked" in proc.stderr
    # a second daemon (another data file) on the live socket refuses and leaves it alone
    proc = subprocess.run(
        [sys.executable, "-m", "ringblob.server", "--data", os.path.join(workdir, "b.data"), "--socket", d.sock,
         "--size", str(16 << 20)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode != 0 and "in use by a running daemon" in proc.stderr
    c = Raw(d.sock)
    assert c.ok(P.encode_ping(1, b"still mine")) == b"still mine"
    c.close()
    assert d.stop() == 0


def test_requests_arriving_together_are_submitted_together(daemons, workdir):
    """32 GETs in one write: their reads reach the ring in a few io_uring_enter calls, not 32."""
    d = spawn(daemons, workdir, "--engine", "uring")
    c = Raw(d.sock)
    c.ok(P.encode_mput(1, [(b"r%02d" % i, bytes([i]) * 4096) for i in range(32)], sync=True))
    before = P.decode_stat_reply(c.ok(P.encode_stat(2)))["engine_counters"]
    c.send(*(P.encode_get(100 + i, b"r%02d" % i) for i in range(32)))
    for _ in range(32):
        f = c.recv()
        assert f.status == 0 and f.body == bytes([f.request_id - 100]) * 4096
    after = P.decode_stat_reply(c.ok(P.encode_stat(3)))["engine_counters"]
    sqes = after["sqes"] - before["sqes"]
    enters = after["enters"] - before["enters"]
    assert sqes >= 32
    assert enters <= 4, (sqes, enters)
    c.close()
    assert d.stop() == 0


def test_a_64_mib_value_fits_the_default_frame_limit(daemons, workdir):
    d = spawn(daemons, workdir, size=str(160 << 20))
    value = os.urandom(1 << 16) * 1024  # 64 MiB
    c = Raw(d.sock, timeout=60)
    c.ok(P.encode_put(1, b"big", value, sync=True))
    assert c.ok(P.encode_get(2, b"big")) == value
    c.close()
    assert d.stop() == 0


def test_systemd_ready_watchdog_and_stopping(daemons, workdir):
    d = spawn(daemons, workdir, env={"WATCHDOG_USEC": "200000"})
    assert any("READY=1" in m for m in d.messages)
    d.wait_notify("WATCHDOG=1", 10)
    d.wait_notify("WATCHDOG=1", 10)
    c = Raw(d.sock)  # READY came after the store opened and the socket listened
    assert c.ok(P.encode_ping(1, b"x")) == b"x"
    c.close()
    d.proc.send_signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1", 10)
    assert d.proc.wait(30) == 0
    d.log.close()
    d.notify.close()


def test_socket_activation_uses_the_inherited_listener(daemons, workdir):
    path = os.path.join(workdir, "activated.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    d = Daemon(workdir, listen_sock=lsock)
    daemons.append(d)
    d.start()
    lsock.close()
    assert not os.path.exists(d.sock)  # --socket is not bound under socket activation
    c = Raw(path)
    c.ok(P.encode_put(1, b"via-activation", b"yes", sync=True))
    assert c.ok(P.encode_get(2, b"via-activation")) == b"yes"
    c.close()
    assert d.stop() == 0
    assert os.path.exists(path)  # the unit's socket file belongs to systemd, not to the daemon
    os.unlink(path)


def test_large_puts_into_fixed_buffers_survive_sigkill_and_clients_leaving(daemons, workdir):
    """Large PUTs (received into the store's fixed buffers) from clients that pipeline them, one
    client leaving mid-value: no buffer stays held (STAT), and after a SIGKILL during sync puts
    every acknowledged value reads back intact from the restarted daemon."""
    d = spawn(daemons, workdir, size=str(96 << 20))
    gone = Raw(d.sock)
    frame = P.encode_put(1, b"gone", os.urandom(3 << 20))
    gone.send(frame[: len(frame) // 2])
    c = Raw(d.sock)
    deadline = time.monotonic() + 10
    while P.decode_stat_reply(c.ok(P.encode_stat(1)))["receive_buffers_held"] == 0:
        assert time.monotonic() < deadline, "the value was never received into fixed buffers"
        time.sleep(0.01)
    gone.close()
    while (st := P.decode_stat_reply(c.ok(P.encode_stat(2))))["receive_buffers_held"]:
        assert time.monotonic() < deadline, "a client that left mid-value kept its buffers"
        time.sleep(0.01)
    assert st["values_leased"] == 1 and st["blob_count"] == 0
    # unique keys: an unacknowledged put never shadows an acknowledged one
    acked = _sigkill_during_sync_puts(
        d, 2, lambda w, i: [(b"b%d/%03d" % (w, i + j), os.urandom(300_000 + (i + j) * 4097 % 65536))
                            for j in range(4)],
        want=24, wait_s=max(0.0, deadline - time.monotonic()) + 20, max_puts=60)
    _all_there(spawn(daemons, workdir, size=str(96 << 20)), acked)


def test_parallel_hash_auto_on_one_cpu_keeps_large_puts_on_the_loop(workdir):
    """`ringblob serve` with the default parallel_hash (auto) confined to one CPU (taskset, as
    systemd's CPUAffinity= would): no hash worker — STAT and the log say so — and large values
    round-trip intact, checked on GET."""
    import pathlib

    import conftest

    d = conftest.Daemon(pathlib.Path(workdir), size="32M")  # (`ringblob serve`, not the dev entry)
    d.args = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *d.args]
    d.start()
    try:
        c = Raw(str(d.socket))
        big = os.urandom((1 << 20) + 3)
        c.ok(P.encode_put(1, b"big", big, sync=True))
        assert c.ok(P.encode_get(2, b"big")) == big
        st = P.decode_stat_reply(c.ok(P.encode_stat(3)))
        assert st["hash_worker"] is False and st["parallel_hash"] is False and st["values_leased"] == 1
        c.close()
    finally:
        assert d.stop() == 0
    log = d.output()
    assert "parallel_hash auto: " in log and "a large PUT's buffers on the event loop's thread (1 usable CPU)" in log


@pytest.mark.parametrize("stream_writes", ["true", "false"])
def test_stream_writes_setting_decides_whether_a_large_put_is_written_as_it_arrives(workdir, stream_writes):
    """`ringblob serve --stream-writes true|false`: with true (the default) a large PUT's buffers
    are written as they arrive (STAT values_streamed), with false once the value is complete;
    the value round-trips either way, a wrong digest with the verify flag stores nothing, and no
    free space is left behind."""
    import pathlib

    import conftest

    d = conftest.Daemon(pathlib.Path(workdir), "--stream-writes", stream_writes, size="32M")
    d.start()
    try:
        c = Raw(str(d.socket))
        free0 = P.decode_stat_reply(c.ok(P.encode_stat(1)))["free_bytes"]
        big = os.urandom((1 << 20) + 3)
        c.ok(P.encode_put(2, b"big", big, sync=True))
        assert c.ok(P.encode_get(3, b"big")) == big
        f = c.call(P.encode_put(4, b"\x07" * 32, big, verify=True))
        assert isinstance(P.reply_error(f), errors.DigestMismatch)
        st = P.decode_stat_reply(c.ok(P.encode_stat(5)))
        on = stream_writes == "true"
        assert st["stream_writes"] is on and st["values_leased"] == 2
        assert st["values_streamed"] == (2 if on else 0)
        pages = -(-len(big) // st["page_size"]) * st["page_size"]
        for _ in range(100):  # the wrong digest's extent: freed once its writes completed
            if st["free_bytes"] == free0 - pages:
                break
            time.sleep(0.01)
            st = P.decode_stat_reply(c.ok(P.encode_stat(6)))
        assert st["free_bytes"] == free0 - pages
        c.close()
    finally:
        assert d.stop() == 0
