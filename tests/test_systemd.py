"""ringblob.systemd: sd_notify over a real datagram socket, the watchdog interval, and
socket activation with real inherited descriptors in child processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import connect_when_listening  # the bind-then-listen race, shared
from ringblob import systemd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def short_dir():
    """A directory with a short path (sun_path holds 108 bytes)."""
    d = tempfile.mkdtemp(prefix="rb-sd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notify_socket(short_dir, monkeypatch, request):
    """A bound AF_UNIX datagram socket exported as $NOTIFY_SOCKET (path or '@abstract')."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if getattr(request, "param", "path") == "abstract":
        name = f"ringblob-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = str(short_dir / "notify")
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_notify_messages_arrive(notify_socket):
    assert systemd.notify_ready("recovered 12 blobs") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=recovered 12 blobs"
    assert systemd.notify_watchdog() is True
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify_status("serving") is True
    assert notify_socket.recv(4096) == b"STATUS=serving"
    assert systemd.notify_stopping() is True
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert systemd.extend_timeout(2.5) is True
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert systemd.notify_ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_notify_unset_environment(notify_socket):
    assert systemd.notify("READY=1", unset_environment=True) is True
    assert notify_socket.recv(4096) == b"READY=1"
    assert "NOTIFY_SOCKET" not in os.environ
    assert systemd.notify("WATCHDOG=1") is False


def test_notify_without_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False


def test_notify_to_missing_socket_logs_and_returns_false(monkeypatch, short_dir, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    with caplog.at_level("WARNING", logger="ringblob.systemd"):
        assert systemd.notify_ready() is False
    assert "NOTIFY_SOCKET" in caplog.text and "READY=1" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert systemd.notify_ready() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # WatchdogSec=30
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "abc", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_listen_fds_for_another_pid_is_empty_and_clears_env(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    assert systemd.listen_fds() == []  # nothing set: not socket-activated


CHILD = r"""
import json, os, socket, sys
from ringblob import systemd
pairs = systemd.listen_fds_with_names()
info = [dict(name=n, fd=s.fileno(), family=int(s.family), type=int(s.type) & 0xF,
             inheritable=os.get_inheritable(s.fileno()), listening=bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))
        for n, s in pairs]
env = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps({"socks": info, "env": env}), flush=True)
for name, s in pairs:   # serve one connection on each: proves they are the real listeners
    conn, _ = s.accept()
    conn.sendall(name.encode())
    conn.close()
"""


def _spawn_with_fds(fds: list[int], env_extra: dict[str, str], code: str) -> subprocess.Popen:
    """Start `python -c code` with ``fds`` at 3, 4, ... and LISTEN_PID set to the child's own pid."""

    def place():
        high = [os.dup(fd) for fd in fds]  # out of the way before dup2 onto 3..
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)  # dup2 clears FD_CLOEXEC on the target
        for fd in high:
            os.close(fd)

    env = dict(os.environ, LISTEN_FDS=str(len(fds)), PYTHONPATH=str(ROOT / "daemon"), **env_extra)
    env.pop("LISTEN_PID", None)
    return subprocess.Popen(
        ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", sys.executable, "-c", code],
        env=env, preexec_fn=place, close_fds=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_listen_fds_takes_inherited_sockets(short_dir):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(short_dir / "rb.sock"))
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    try:
        child = _spawn_with_fds([unix.fileno(), tcp.fileno()], {"LISTEN_FDNAMES": "ringblob:metrics"}, CHILD)
        line = child.stdout.readline()
        assert line, child.stderr.read()
        report = json.loads(line)
        assert report["env"] == []  # LISTEN_* removed from the environment
        socks = report["socks"]
        assert [s["name"] for s in socks] == ["ringblob", "metrics"]
        assert [s["fd"] for s in socks] == [3, 4]
        assert [s["family"] for s in socks] == [socket.AF_UNIX, socket.AF_INET]
        assert all(s["type"] == socket.SOCK_STREAM and s["listening"] and not s["inheritable"] for s in socks)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(short_dir / "rb.sock"))
            assert c.recv(64) == b"ringblob"
        with socket.create_connection(tcp.getsockname(), timeout=10) as c:
            assert c.recv(64) == b"metrics"
        assert child.wait(timeout=30) == 0, child.stderr.read()
    finally:
        unix.close()
        tcp.close()


def test_listen_fds_without_names_and_not_a_socket():
    r, w = os.pipe()
    try:
        code = ("from ringblob import systemd\n"
                "try:\n    systemd.listen_fds()\nexcept OSError as e:\n    print(e.errno, e)\n")
        child = _spawn_with_fds([r], {}, code)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert out.startswith(f"{__import__('errno').ENOTSOCK} ") and "fd 3" in out and "not a socket" in out
    finally:
        os.close(r)
        os.close(w)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        code = ("from ringblob import systemd\n"
                "print([(n, s.fileno()) for n, s in systemd.listen_fds_with_names()])\n")
        child = _spawn_with_fds([s.fileno()], {}, code)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert out.strip() == "[('unknown', 3)]"
    finally:
        s.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is absent (apt-get install systemd)")
def test_listen_fds_under_systemd_socket_activate(short_dir):
    """The real systemd tool passes the socket; listen_fds() finds it with its --fdname."""
    path = str(short_dir / "act.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=ringblob", sys.executable, "-c", CHILD],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the first connection launches the child
        with connect_when_listening(path, proc, 20, lambda: proc.stderr.read()) as c:
            c.settimeout(20)
            assert c.recv(64) == b"ringblob"
        report = json.loads(proc.stdout.readline())
        assert report["env"] == []
        assert [(s["name"], s["fd"], s["family"]) for s in report["socks"]] == [("ringblob", 3, socket.AF_UNIX)]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
