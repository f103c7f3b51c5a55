"""Access: who may talk to the daemon, what its socket file looks like, and that keys are never paths.

* Peer credentials: the daemon checks ``SO_PEERCRED`` against ``allow_uids`` /
  ``allow_gids``. The tests run as root and fork children that drop to uid
  65534 (nobody) or another uid/gid before connecting, so the peer the daemon
  sees really is another user. A refused peer gets ``AccessDenied`` and a
  closed connection, its requests never reach the store, the refusal is
  counted in ``ringblob_connections_rejected_total{reason="access_denied"}``,
  and allowed peers keep being served.
* The socket file gets ``socket_mode`` (default 0600) and ``socket_group``
  (a gid or a group name), from flags or from the TOML file; with the default
  mode another user cannot even connect (EACCES).
* No request can name a file system path: the opcode table has no path-taking
  operation, unknown opcodes are refused, and keys such as
  ``../../etc/passwd`` are opaque bytes: stored and read back, with no file
  created or changed anywhere they could point, and the daemon holding no
  file open but its data file.

Needs root (setuid children); every test skips without it.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid

import pytest

import ringblob
from ringblob import protocol as P
from ringblob.errors import AccessDenied, ProtocolError
from conftest import ROOT, Daemon, make_tmp, scrape

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers under other uids (setuid children)")

NOBODY = 65534
OTHER_GID = 4242  # a gid no account has


def as_user(fn, uid: int = NOBODY, gid: int = NOBODY, groups: tuple = ()) -> list:
    """Run ``fn()`` in a forked child with these credentials; ``["ok", result]`` or ``["err", class, message]``.

    ``result`` must be JSON-serialisable. The child drops supplementary
    groups to ``groups``, then gid, then uid, exactly as a daemonised client
    of another user would run.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            try:
                out = ["ok", fn()]
            except BaseException as exc:  # report every failure to the parent
                out = ["err", type(exc).__name__, str(exc)]
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert chunks, f"the child running as uid {uid} died without a word (status {status})"
    return json.loads(b"".join(chunks))


class QuietDaemon(Daemon):
    """A ``ringblob serve`` that counts as started once it prints its banner (root may be refused)."""

    ready_means = "start"

    def ready(self) -> bool:
        return "ringblob: stop it with" in self.output()

    def metrics_url(self) -> str:
        m = re.search(r"metrics\s+(http://\S+/metrics)", self.output())
        assert m, self.output()
        return m.group(1)


@pytest.fixture
def workdir():
    d = make_tmp("acc-")
    os.chmod(d, 0o755)  # other users may reach the socket; its own mode decides
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def started():
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        d.kill()
        fh = getattr(d, "_logfh", None)
        if fh is not None:
            fh.close()


def serve(started, workdir, *args, metrics: bool = False) -> QuietDaemon:
    extra = list(args) + (["--metrics-addr", "127.0.0.1:0"] if metrics else [])
    d = QuietDaemon(workdir, *extra, size="16M")
    started.append(d)
    return d.start()


def _ping(sock: str):
    def fn():
        with ringblob.Client(sock, timeout=10) as c:
            return c.ping(b"hello").decode()

    return fn


def _roundtrip(sock: str, key: str):
    def fn():
        with ringblob.Client(sock, timeout=10) as c:
            c.put(key, b"from " + str(os.getuid()).encode(), sync=True)
            return c.get(key).decode()

    return fn


def _rejected(d: QuietDaemon) -> float:
    return scrape(d.metrics_url()).get(
        ("ringblob_connections_rejected_total", (("reason", "access_denied"),)), 0.0
    )


# -- peer credentials -----------------------------------------------------------------------


def test_peer_outside_the_uid_allowlist_is_refused(started, workdir):
    d = serve(started, workdir, "--allow-uids", "0", "--socket-mode", "0666", metrics=True)
    sock = str(d.socket)
    out = as_user(_ping(sock))
    assert out[0] == "err" and out[1] == "AccessDenied", out
    assert "uid 65534" in out[2] and "allow_uids" in out[2]  # the message says who and which setting
    out = as_user(_ping(sock), uid=1000, gid=1000)
    assert out[:2] == ["err", "AccessDenied"], out
    assert _rejected(d) == 2
    # the allowed peer (root) is served throughout
    with ringblob.Client(sock, timeout=10) as c:
        assert c.ping(b"x") == b"x"


def test_refused_peer_requests_never_reach_the_store(started, workdir):
    d = serve(started, workdir, "--allow-uids", "0", "--socket-mode", "0666")
    sock = str(d.socket)

    def raw_put():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock)
        try:
            # pipelined before any reply: a put, a delete of root's key, a flush
            s.sendall(P.encode_put(1, b"intruder", b"x" * 100, sync=True) + P.encode_delete(2, b"owned", sync=True)
                      + P.encode_flush(3))
        except (BrokenPipeError, ConnectionResetError):
            pass
        dec = P.FrameDecoder(1 << 20)
        frames = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            dec.feed(data)
            while (f := dec.next_frame()) is not None:
                frames.append([f.request_id, f.flags])
        s.close()
        return frames

    with ringblob.Client(sock, timeout=10) as c:
        c.put(b"owned", b"root's", sync=True)
    out = as_user(raw_put)
    assert out[0] == "ok", out
    # exactly one reply, addressed to no request (id 0), status AccessDenied; then the connection closed
    assert out[1] == [[0, AccessDenied.code]], out
    with ringblob.Client(sock, timeout=10) as c:
        assert not c.has(b"intruder")
        assert c.get(b"owned") == b"root's"


def test_allowed_uid_works(started, workdir):
    d = serve(started, workdir, "--allow-uids", "0,65534", "--socket-mode", "0666")
    out = as_user(_roundtrip(str(d.socket), "nobody-key"))
    assert out == ["ok", "from 65534"], out
    out = as_user(_ping(str(d.socket)), uid=1000, gid=1000)  # still not everyone
    assert out[:2] == ["err", "AccessDenied"], out
    with ringblob.Client(d.socket, timeout=10) as c:
        assert c.get("nobody-key") == b"from 65534"


def test_gid_allowlist_admits_by_primary_gid_only(started, workdir):
    d = serve(started, workdir, "--allow-gids", str(OTHER_GID), "--socket-mode", "0666", metrics=True)
    sock = str(d.socket)
    assert as_user(_roundtrip(sock, "by-gid"), gid=OTHER_GID) == ["ok", "from 65534"]
    out = as_user(_ping(sock))  # nobody's own gid is not on the list
    assert out[:2] == ["err", "AccessDenied"], out
    # root is not special: uid 0 gid 0 is outside this allowlist too
    with pytest.raises(AccessDenied):
        with ringblob.Client(sock, timeout=10) as c:
            c.ping()
    assert _rejected(d) == 2


def test_no_allowlist_means_whoever_can_open_the_socket(started, workdir):
    d = serve(started, workdir, "--socket-mode", "0666")
    assert as_user(_ping(str(d.socket))) == ["ok", "hello"]


# -- the socket file ------------------------------------------------------------------------


def test_default_socket_mode_is_0600_and_keeps_other_users_out(started, workdir):
    d = serve(started, workdir)
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    out = as_user(_ping(str(d.socket)))
    assert out[:2] == ["err", "PermissionError"], out  # connect(2): EACCES, before the daemon sees anything


@pytest.mark.parametrize("mode", ["0660", "0640", "0666", "0700"])
def test_socket_gets_the_configured_mode(started, workdir, mode):
    d = serve(started, workdir, "--socket-mode", mode)
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == int(mode, 8)


def test_socket_group_by_gid_admits_group_members_only(started, workdir):
    d = serve(started, workdir, "--socket-mode", "0660", "--socket-group", str(OTHER_GID))
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, OTHER_GID)
    sock = str(d.socket)
    assert as_user(_ping(sock), groups=(OTHER_GID,)) == ["ok", "hello"]  # a member (supplementary group)
    assert as_user(_ping(sock))[:2] == ["err", "PermissionError"]  # not a member


def test_socket_group_by_name_and_mode_from_the_config_file(started, workdir):
    cfg = workdir / "ringblob.toml"
    group = grp.getgrgid(NOBODY).gr_name  # "nogroup" on Debian, "nobody" elsewhere
    cfg.write_text(f'socket_mode = "0640"\nsocket_group = "{group}"\nallow_uids = [0, 65534]\n')
    d = serve(started, workdir, "--config", str(cfg))
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, NOBODY)
    # group may read but not write: connect(2) needs write permission on the socket
    assert as_user(_ping(str(d.socket)), uid=1000, gid=NOBODY)[:2] == ["err", "PermissionError"]


def test_restart_over_a_stale_socket_file_applies_the_configured_mode(started, workdir):
    """A daemon restarted over a killed one's socket file replaces it with the configured mode, not the old file's."""
    d = serve(started, workdir, "--socket-mode", "0666")
    d.kill()
    d._logfh.close()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666  # the stale file of the killed daemon
    d2 = serve(started, workdir)  # default 0600 over the stale 0666 file
    assert stat.S_IMODE(os.stat(d2.socket).st_mode) == 0o600
    assert as_user(_ping(str(d2.socket)))[:2] == ["err", "PermissionError"]


# -- no request names a file system path -----------------------------------------------------


def test_the_opcode_table_has_no_path_taking_operation():
    ops = {op.name: int(op) for op in P.Op}
    assert ops == {"PUT": 1, "GET": 2, "HAS": 3, "DELETE": 4, "LIST": 5, "FLUSH": 6, "STAT": 7, "PING": 8,
                   "MPUT": 9, "MGET": 10, "NEEDS_FLUSH": 11}, "a new opcode: check it takes no path, then update this"
    fields = {f.name for f in dataclasses.fields(P.Request)}
    assert fields == {"op", "request_id", "flags", "key", "value", "prefix", "start_after", "limit", "items", "keys", "sink"}
    # (sink: a large PUT value received into leased fixed buffers, never a name of anything)
    assert not any(word in name for name in fields for word in ("path", "file", "dir"))


def test_unknown_opcodes_are_refused(started, workdir):
    d = serve(started, workdir, "--socket-mode", "0600")
    known = {int(op) for op in P.Op}
    for opcode in range(256):
        if opcode in known:
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(P.encode_frame(opcode, 7, b"/etc/passwd"))
        dec = P.FrameDecoder(1 << 20)
        frames = []
        while data := s.recv(65536):
            dec.feed(data)
            while (f := dec.next_frame()) is not None:
                frames.append(f)
        s.close()
        assert len(frames) == 1 and frames[0].flags == ProtocolError.code, (opcode, frames)  # then closed
        assert frames[0].request_id == 7 and b"unknown opcode" in frames[0].body
    with ringblob.Client(d.socket, timeout=10) as c:
        assert c.ping() == b""


PATH_KEYS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "/",
    "a/../../b",
    "./ringblob.data",
    "ringblob.data",
    "rb.sock",
    "../" * 84 + "etc",
    "~root/.ssh/authorized_keys",
    "..\\..\\windows\\system32",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "file:///etc/shadow",
    "/proc/self/mem",
    "/dev/sda",
]


def _fingerprint(path: str):
    try:
        st = os.lstat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            return ("file", st.st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest())
    return (stat.S_IFMT(st.st_mode),)  # a directory's size changes with others' files; its kind must not


def test_path_like_keys_are_just_keys(started, workdir):
    d = serve(started, workdir)
    marker = f"rb-escape-{uuid.uuid4().hex[:8]}"
    keys = [k.encode() for k in PATH_KEYS] + [
        f"../../../../../../../../tmp/{marker}".encode(),
        f"/tmp/{marker}".encode(),
        f"../{marker}".encode(),
        b"\x00/../" + marker.encode(),
        b"/etc/passwd\x00" + marker.encode(),
    ]
    assert all(1 <= len(k) <= P.MAX_KEY_SIZE for k in keys)
    bases = [str(workdir), str(ROOT), "/", "/tmp", os.path.dirname(str(workdir))]
    targets = sorted({os.path.normpath(os.path.join(b, k.replace(b"\x00", b"").decode())) for b in bases for k in keys})
    own = {str(d.data), str(d.socket), str(d.log)}  # the daemon's own files change as they should
    targets = [t for t in targets if not t.startswith(("/proc/", "/sys/", "/dev/")) and t not in own]
    before = {t: _fingerprint(t) for t in targets}
    listing_before = set(os.listdir(workdir))
    values = {k: b"value of " + k + b"\n" + os.urandom(5000) for k in keys}
    with ringblob.Client(d.socket, timeout=10) as c:
        for i, (k, v) in enumerate(values.items()):
            c.put(k, v, sync=i % 2 == 0)
        c.flush()
        for k, v in values.items():
            assert c.get(k) == v, k
            assert c.has(k)
        assert set(c.list()) == set(keys)
        assert set(c.list(prefix=b"../")) == {k for k in keys if k.startswith(b"../")}
        assert c.get_many(keys) == [values[k] for k in keys]
        # the daemon holds no file open but its data file (and the log its stdout was given)
        fds = os.listdir(f"/proc/{d.proc.pid}/fd")
        regular = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{d.proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/"):
                regular.add(target)
        assert regular <= {str(d.data), str(d.log), "/dev/null"}, regular
        for k in keys:
            c.delete(k, sync=True)
        assert list(c.list()) == []
    after = {t: _fingerprint(t) for t in targets}
    changed = {t: (before[t], after[t]) for t in targets if before[t] != after[t]}
    assert not changed, f"paths named by keys changed on disk: {changed}"
    assert not any(marker in name for name in os.listdir("/tmp"))
    assert set(os.listdir(workdir)) == listing_before
