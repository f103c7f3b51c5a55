"""Shared test fixtures and helpers: daemons on real data files, raw protocol sockets.

Data files live under .test-tmp/ in the repository (a real file system, so
O_DIRECT behaves as in production; tmpfs would not).

Fixtures (pytest finds them here; a test module may define its own of the same name):

* ``daemon`` (module scope): one ``ringblob serve`` (:class:`Daemon`) for the
  test module, metrics off, stopped with SIGTERM at the end (must exit 0).
* ``workdir``: a fresh directory (str) under .test-tmp/, removed afterwards.
* ``daemons``: a list of :class:`NotifyDaemon` started with :func:`spawn`,
  killed at teardown.

Helpers, imported with ``from conftest import ...`` (tests/ is on
``sys.path`` under pytest and for the scripts in tests/):

* :class:`Daemon`: a ``ringblob serve`` subprocess, ready when it answers PING
  (tests/test_client.py, test_cli.py, killloop.py, soak.py).
* :class:`NotifyDaemon`: a ``python -m ringblob.server`` subprocess, ready on
  systemd's READY=1, with a metrics scraper (tests/test_server_e2e.py, fuzzwire.py).
* :class:`Raw`: a blocking raw-socket client speaking the codec.
* :func:`make_tmp`, :func:`ringblob_cmd`, ``ROOT``, ``TEST_TMP``/``TMP_ROOT``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ringblob
from ringblob import protocol as P
from ringblob.errors import RingblobError

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
TEST_TMP = ROOT / ".test-tmp"  # ext4 (gitignored): O_DIRECT behaves as in production
TMP_ROOT = str(TEST_TMP)


def _engines() -> list[str]:
    try:
        from ringblob._uring import Ring  # noqa: F401

        return ["psync", "uring"]
    except ImportError:
        return ["psync"]


ENGINES = _engines()  # the engines the store and engine tests run on (uring where the extension is built)


def ringblob_cmd() -> list[str]:
    """The ``ringblob`` console script of this interpreter's venv (or ``python -m ringblob.cli``)."""
    script = pathlib.Path(sys.executable).parent / "ringblob"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ringblob.cli"]


def make_tmp(prefix: str) -> pathlib.Path:
    """A fresh directory under .test-tmp/ (ext4, short enough for a Unix socket path)."""
    TEST_TMP.mkdir(exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=TEST_TMP))


class Daemon:
    """A ``ringblob serve`` subprocess; ``start()`` waits until it answers PING."""

    def __init__(self, workdir: pathlib.Path, *extra: str, size: str = "64M", cwd: pathlib.Path | None = None,
                 data: pathlib.Path | None = None, sock: pathlib.Path | None = None):
        self.workdir = workdir
        self.data = data or workdir / "ringblob.data"
        self.socket = sock or workdir / "rb.sock"
        self.args = ringblob_cmd() + [
            "serve", "--data", str(self.data), "--socket", str(self.socket), "--size", size, "--metrics-addr", "",
            *extra,
        ]
        self.cwd = cwd or ROOT
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"daemon-{time.monotonic_ns()}.log"

    def start(self, timeout: float = 30.0) -> "Daemon":
        self._logfh = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdout=self._logfh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ringblob serve exited with {self.proc.returncode}:\n{self.output()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"ringblob serve did not {self.ready_means} within {timeout} s:\n{self.output()}")

    ready_means = "answer"  # what ready() checks, for the timeout message

    def ready(self) -> bool:
        """Whether the started daemon counts as up: it answers PING."""
        try:
            with ringblob.Client(self.socket, timeout=5) as c:
                c.ping()
            return True
        except (OSError, RingblobError):
            return False

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ringblob serve ignored SIGTERM for {timeout} s:\n{self.output()}")
        self._logfh.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def daemon():
    """One daemon for the test module, stopped with SIGTERM at the end (must exit 0)."""
    workdir = make_tmp("cl-")
    d = Daemon(workdir).start()
    try:
        yield d
    finally:
        rc = d.stop()
        out = d.output()
        shutil.rmtree(workdir, ignore_errors=True)
        assert rc == 0, f"ringblob serve exited with {rc} after SIGTERM:\n{out}"


@pytest.fixture
def workdir():
    """A fresh directory under .test-tmp/ (a str path short enough for Unix sockets), removed afterwards."""
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, "wd-" + uuid.uuid4().hex[:8])
    os.mkdir(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class NotifyDaemon:
    """One ``python -m ringblob.server`` process on ``workdir``'s data file and socket (a str path).

    ``start()`` waits for systemd's READY=1 on its own NOTIFY_SOCKET and reads the metrics URL
    from the STATUS line (``metrics_url``); ``scrape()`` returns the metrics as
    ``{(name, sorted labels): value}``; ``stop(sig)`` returns the exit status, ``kill()`` SIGKILLs.
    """

    def __init__(self, workdir: str, *args: str, size: str = str(32 << 20), env: dict | None = None,
                 listen_sock: socket.socket | None = None):
        self.dir = workdir
        self.data = os.path.join(workdir, "store.data")
        self.sock = os.path.join(workdir, "d.sock")
        self.args = list(args)
        self.size = size
        self.proc: subprocess.Popen | None = None
        self.metrics_url: str | None = None
        self.notify: socket.socket | None = None
        self.log_path = os.path.join(workdir, "daemon.log")
        self.messages: list[str] = []
        self.extra_env = env or {}
        self.listen_sock = listen_sock  # passed as fd 3 with LISTEN_FDS=1 (socket activation)

    def _notify_env(self) -> dict:
        """Bind the sd_notify socket the daemon reports to; returns the daemon's environment
        (NOTIFY_SOCKET set, no socket activation or watchdog inherited from ours)."""
        npath = os.path.join(self.dir, "notify.sock")
        if os.path.exists(npath):
            os.unlink(npath)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(npath)
        env = dict(os.environ, NOTIFY_SOCKET=npath, PYTHONUNBUFFERED="1")
        for name in ("LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"):
            env.pop(name, None)
        return env

    def start(self, wait: bool = True) -> "NotifyDaemon":
        env = self._notify_env()
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "ringblob.server", "--data", self.data, "--socket", self.sock,
               "--size", self.size, "--metrics-addr", "127.0.0.1:0", *self.args]
        preexec = None
        if self.listen_sock is not None:
            # as systemd does: the listener at fd 3, LISTEN_FDS=1, LISTEN_PID = the daemon's pid
            env["LISTEN_FDS"] = "1"
            lfd = self.listen_sock.fileno()

            def preexec():
                os.dup2(lfd, 3)

            cmd = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *cmd]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     preexec_fn=preexec, pass_fds=(3,) if preexec else ())
        if wait:
            msg = self.wait_notify("READY=1", 30)
            m = re.search(r"metrics on (http://\S+/metrics)", msg)
            self.metrics_url = m.group(1) if m else None
        return self

    def wait_notify(self, what: str, timeout: float) -> str:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(msg)
            if what in msg.split("\n"):
                return msg
        raise AssertionError(f"no {what} from the daemon within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.log.close()
            if self.notify is not None:
                self.notify.close()
        return rc

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc:
            self.log.close()
        if self.notify is not None:
            self.notify.close()

    def scrape(self) -> dict:
        return scrape(self.metrics_url)


@pytest.fixture
def daemons():
    """A list to put started :class:`NotifyDaemon` objects in (see :func:`spawn`); each is killed at teardown."""
    started: list[NotifyDaemon] = []
    yield started
    for d in started:
        d.kill()


def spawn(daemons, workdir, *args, **kw) -> NotifyDaemon:
    """Start a :class:`NotifyDaemon` on ``workdir`` (``args``/``kw`` as its constructor), killed with ``daemons``."""
    d = NotifyDaemon(workdir, *args, **kw)
    daemons.append(d)
    return d.start()


class Raw:
    """A blocking raw-socket client."""

    def __init__(self, path: str, timeout: float = 20):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.dec = P.FrameDecoder(1 << 30)
        self.ids = iter(range(1, 1 << 62))

    def send(self, *frames: bytes):
        self.s.sendall(b"".join(frames))

    def recv(self) -> P.Frame | None:
        while True:
            f = self.dec.next_frame()
            if f is not None:
                return f
            data = self.s.recv(1 << 20)
            if not data:
                return None
            self.dec.feed(data)

    def call(self, frame: bytes) -> P.Frame:
        self.send(frame)
        f = self.recv()
        assert f is not None, "connection closed before the reply"
        return f

    def ok(self, frame: bytes) -> bytes:
        return P.raise_for_status(self.call(frame)).body

    def close(self):
        self.s.close()


def scrape(url: str) -> dict:
    """The daemon's /metrics as ``{(sample name, ((label, value), ...)): value}`` (prometheus_client's parser)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def connect_when_listening(path: str, proc: subprocess.Popen, timeout: float, describe=lambda: "") -> socket.socket:
    """A Unix stream socket connected to ``path``, which a socket-passing parent (``proc``, e.g.
    systemd-socket-activate) binds and then listens on: the path exists from the bind() a moment
    before the listen(), so a connect is refused until then and is retried (every 20 ms) for up to
    ``timeout`` seconds. Fails the test when ``proc`` exits first (with ``describe()``, e.g. its log)
    or the time runs out."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX)
    try:
        while True:
            assert proc.poll() is None, describe()
            assert time.monotonic() < deadline, f"nothing listened on {path} within {timeout} s"
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
    except BaseException:
        s.close()
        raise
