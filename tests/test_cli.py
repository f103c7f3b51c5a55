"""The ``ringblob`` CLI end to end: real daemon subprocess, real command subprocesses.

Checks exit codes, stdout and the one-line stderr of errors for put (file,
stdin, --cas), get (stdout, -o), has, delete, list, flush, stat (--json),
ping, --hex keys and $RINGBLOB_SOCKET; and for ``serve``: --print-config,
bad settings, a second daemon on the same data file, and the embedded
defaults (./var/ringblob.data, ./var/ringblob.sock mode 0600).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import time
import tomllib
import unicodedata

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ringblob
from ringblob.commands._common import Progress, format_key, parse_key
from ringblob.errors import InvalidKey

from conftest import ROOT, Daemon, make_tmp, ringblob_cmd  # the daemon fixture is conftest.py's too


def rb(*args: str, input: bytes | None = None, env: dict | None = None, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``ringblob ARGS`` and return the completed process (stdout/stderr as bytes)."""
    full_env = dict(os.environ)
    full_env.pop("RINGBLOB_SOCKET", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        ringblob_cmd() + list(args), input=input if input is not None else b"", capture_output=True,
        env=full_env, cwd=cwd or ROOT, timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> bytes:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess, command: str, status: int = 2) -> str:
    """The one stderr line of a command that failed with exit ``status``."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"ringblob {command}: "), lines[0]
    return lines[0]


def test_put_get_file_stdin_and_output(daemon, tmp_path):
    s = str(daemon.socket)
    src = tmp_path / "in.bin"
    data = os.urandom(200_000)
    src.write_bytes(data)
    ok(rb("put", "cli/file", str(src), "--socket", s))
    assert ok(rb("get", "cli/file", "--socket", s)) == data
    ok(rb("put", "cli/stdin", "-", "--sync", "--socket", s, input=b"from stdin"))
    ok(rb("put", "cli/stdin2", "--socket", s, input=b"no dash"))
    assert ok(rb("get", "cli/stdin", "--socket", s)) == b"from stdin"
    assert ok(rb("get", "cli/stdin2", "--socket", s)) == b"no dash"
    out = tmp_path / "out.bin"
    assert ok(rb("get", "cli/file", "-o", str(out), "--socket", s)) == b""
    assert out.read_bytes() == data
    # the output file is replaced, not appended to; no temporary files are left behind
    ok(rb("get", "cli/stdin", "-o", str(out), "--socket", s))
    assert out.read_bytes() == b"from stdin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin", "out.bin"]
    # failures name the file, leave the output as it was and nothing behind
    line = one_line_error(rb("put", "cli/x", str(tmp_path / "missing.bin"), "--socket", s), "put")
    assert line == f"ringblob put: cannot read the value from {tmp_path / 'missing.bin'}: No such file or directory"
    line = one_line_error(rb("get", "cli/file", "-o", str(tmp_path / "no-dir" / "out.bin"), "--socket", s), "get")
    assert line == f"ringblob get: cannot write {tmp_path / 'no-dir' / 'out.bin'}: No such file or directory"
    line = one_line_error(rb("get", "cli/absent", "-o", str(out), "--socket", s), "get")
    assert "no blob under key" in line
    assert out.read_bytes() == b"from stdin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin", "out.bin"]


def test_put_cas_prints_blake3_digest(daemon, tmp_path):
    s = str(daemon.socket)
    data = os.urandom(50_000)
    src = tmp_path / "cas.bin"
    src.write_bytes(data)
    digest = ok(rb("put", "--cas", str(src), "--socket", s)).decode().strip()
    assert digest == blake3.blake3(data).hexdigest()
    digest2 = ok(rb("put", "--cas", "--sync", "--socket", s, input=b"cas from stdin")).decode().strip()
    assert digest2 == blake3.blake3(b"cas from stdin").hexdigest()
    assert ok(rb("get", "--hex", digest, "--socket", s)) == data
    assert rb("has", "--hex", digest2, "--socket", s).returncode == 0
    # the printed digest without --hex is other text: not found, and the error says what to add
    line = one_line_error(rb("get", digest, "--socket", s), "get")
    assert "no blob under key" in line and line.endswith("is hex: add --hex")
    line = one_line_error(rb("get", "cli/absent-key", "--socket", s), "get")
    assert "no blob under key" in line and "--hex" not in line
    line = one_line_error(rb("put", "--cas", "key", str(src), "--socket", s), "put")
    assert "no KEY" in line


def test_has_delete_exit_codes(daemon):
    s = str(daemon.socket)
    ok(rb("put", "cli/has", "--socket", s, input=b"x"))
    p = rb("has", "cli/has", "--socket", s)
    assert p.returncode == 0 and p.stdout == b""
    assert rb("has", "cli/absent", "--socket", s).returncode == 1
    ok(rb("delete", "cli/has", "--socket", s))
    assert rb("has", "cli/has", "--socket", s).returncode == 1
    ok(rb("delete", "cli/has", "--sync", "--socket", s))  # missing: still fine


def test_hex_keys(daemon):
    s = str(daemon.socket)
    key = bytes([0, 1, 2, 0xFF, 0xFE])
    ok(rb("put", "--hex", key.hex(), "--socket", s, input=b"binary key"))
    with ringblob.Client(daemon.socket) as c:
        assert c.get(key) == b"binary key"
    assert ok(rb("get", "--hex", key.hex().upper(), "--socket", s)) == b"binary key"
    lines = ok(rb("list", "--hex", "--prefix", "000102", "--socket", s)).decode().split()
    assert lines == [key.hex()]
    line = one_line_error(rb("get", "--hex", "xyz", "--socket", s), "get")
    assert "not hexadecimal" in line


def test_list_prefix(daemon):
    s = str(daemon.socket)
    names = [f"cli-list/{i:04d}" for i in range(1203)]
    with ringblob.Client(daemon.socket) as c:
        c.put_many({n: b"v" for n in names})
        c.put("cli-list/ü", b"u")
        c.put(b"cli-list/\xff", b"not utf-8")
    out = ok(rb("list", "--prefix", "cli-list/", "--socket", s)).decode()
    lines = out.splitlines()
    assert lines == names + ["cli-list/ü", "cli-list/\\xff"]
    out = ok(rb("list", "--prefix", "cli-list/011", "--socket", s)).decode().splitlines()
    assert out == [f"cli-list/{i:04d}" for i in range(110, 120)]
    assert ok(rb("list", "--prefix", "cli-nothing-here/", "--socket", s)) == b""
    everything = ok(rb("list", "--socket", s)).decode().splitlines()
    assert set(names) <= set(everything)


def test_list_prints_awkward_keys_one_per_line(daemon):
    s = str(daemon.socket)
    keys = [b"cli-esc/a\nb", b"cli-esc/a\\x0ab", b"cli-esc/tab\t", b"cli-esc/\x81\x9b", "cli-esc/ü".encode()]
    with ringblob.Client(daemon.socket) as c:
        c.put_many({k: b"v" for k in keys})
    lines = ok(rb("list", "--prefix", "cli-esc/", "--socket", s)).decode().split("\n")
    assert lines[-1] == ""  # the output ends with a newline
    assert lines[:-1] == [format_key(k, False) for k in sorted(keys)]
    assert len(set(lines[:-1])) == len(keys)
    assert "cli-esc/a\\x0ab" in lines and "cli-esc/a\\x5cx0ab" in lines  # a newline and its look-alike
    hexed = ok(rb("list", "--hex", "--prefix", b"cli-esc/".hex(), "--socket", s)).decode().split()
    assert [bytes.fromhex(h) for h in hexed] == sorted(keys)
    assert ok(rb("get", "--hex", keys[0].hex(), "--socket", s)) == b"v"


def test_flush_stat_ping(daemon):
    s = str(daemon.socket)
    ok(rb("put", "cli/flush", "--socket", s, input=b"x"))
    ok(rb("flush", "--socket", s))
    with ringblob.Client(daemon.socket) as c:
        assert c.needs_flush() is False
    info = json.loads(ok(rb("stat", "--json", "--socket", s)))
    assert info["blob_count"] >= 1 and "free_bytes" in info
    text = ok(rb("stat", "--socket", s)).decode()
    assert any(line.startswith("blob_count:") for line in text.splitlines()), text
    assert "answered in" in ok(rb("ping", "--socket", s)).decode()


def test_socket_from_environment(daemon):
    env = {"RINGBLOB_SOCKET": str(daemon.socket)}
    ok(rb("put", "cli/env", env=env, input=b"via env"))
    assert ok(rb("get", "cli/env", env=env)) == b"via env"


def test_errors_are_one_line_and_nonzero(daemon, tmp_path):
    s = str(daemon.socket)
    line = one_line_error(rb("get", "cli/definitely-missing", "--socket", s), "get")
    assert "cli/definitely-missing" in line or "not found" in line.lower() or "no blob" in line.lower()
    line = one_line_error(rb("ping", "--socket", str(tmp_path / "nothing.sock")), "ping")
    assert "cannot connect" in line and "nothing.sock" in line
    line = one_line_error(rb("put", "cli/nofile", str(tmp_path / "absent.bin"), "--socket", s), "put")
    assert "absent.bin" in line
    one_line_error(rb("put", "--socket", s), "put")  # no KEY
    one_line_error(rb("put", "k" * 300, "--socket", s, input=b"x"), "put")  # key too long
    # argparse errors: usage on stderr, exit 2
    assert rb("get", "--socket", s).returncode == 2


def test_help_on_every_subcommand():
    from ringblob.cli import COMMANDS

    for name in COMMANDS:
        p = rb(name, "--help")
        assert p.returncode == 0, (name, p.stderr)
        assert b"usage: ringblob " + name.encode() in p.stdout


def test_progress_bar_draws_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress("put", tty, delay=0, interval=0) as bar:
        for done in range(0, 10 << 20, 1 << 20):
            bar(done, 10 << 20)
        bar(10 << 20, 10 << 20)
    out = tty.getvalue()
    assert "\rput [" in out and "100.0%" in out and "10.0 MiB" in out and out.endswith("\n")
    plain = io.StringIO()  # not a terminal: nothing at all
    with Progress("put", plain, delay=0, interval=0) as bar:
        bar(5, 10)
    assert plain.getvalue() == ""
    quick = Tty()  # a transfer shorter than the delay draws nothing
    with Progress("get", quick, delay=60) as bar:
        bar(10, 10)
    assert quick.getvalue() == ""


def test_parse_and_format_keys():
    assert parse_key("päge:1", False) == "päge:1".encode()
    assert parse_key("00ff", True) == b"\x00\xff"
    with pytest.raises(InvalidKey):
        parse_key("", False)
    with pytest.raises(InvalidKey):
        parse_key("0g", True)
    assert format_key(b"\x00\xff", True) == "00ff"
    assert format_key(b"a\xff", False) == "a\\xff"
    assert format_key("päge/1".encode(), False) == "päge/1"
    assert format_key(b"a\nb\tc\\d", False) == "a\\x0ab\\x09c\\x5cd"  # control characters and the backslash


def _unescape(text: str) -> bytes:
    """The key ``format_key(key, False)`` printed as ``text``."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\":
            assert text[i + 1] == "x", text
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=255) | st.text(min_size=1, max_size=60).map(lambda t: t.encode()))
def test_a_printed_key_is_one_line_and_names_exactly_its_key(key):
    """``ringblob list`` prints one key per line: whatever the key's bytes, its printed form has
    no line break of any kind and reads back as that key alone (so no two keys print alike)."""
    text = format_key(key, False)
    assert len(text.splitlines()) == 1
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)  # no control character or lone surrogate
    assert _unescape(text) == key


# -- serve ------------------------------------------------------------------------------------


def test_serve_print_config(tmp_path):
    cfg = tmp_path / "rb.toml"
    cfg.write_text('size = "2G"\nmetrics_addr = ""\nallow_uids = [1000]\n')
    out = ok(rb("serve", "--config", str(cfg), "--size", "3G", "--print-config"))
    got = tomllib.loads(out.decode())
    assert got["size"] == "3G" and got["metrics_addr"] == "" and got["allow_uids"] == [1000]
    assert got["socket"] == "./var/ringblob.sock" and got["data"] == "./var/ringblob.data"
    defaults = tomllib.loads(ok(rb("serve", "--print-config")).decode())
    assert defaults["metrics_addr"] == "127.0.0.1:9464" and defaults["size"] == "1G"
    assert defaults["socket_mode"] == "0600"


def test_serve_rejects_bad_settings(tmp_path):
    cfg = tmp_path / "rb.toml"
    cfg.write_text('sockett = "/tmp/x"\n')
    # a bad setting exits 78 (EX_CONFIG), which the systemd unit does not restart
    line = one_line_error(rb("serve", "--config", str(cfg)), "serve", 78)
    assert "sockett" in line and str(cfg) in line
    line = one_line_error(rb("serve", "--size", "lots"), "serve", 78)
    assert "size" in line
    line = one_line_error(rb("serve", "--engine", "spdk"), "serve", 78)
    assert "engine" in line
    unit = (ROOT / "systemd" / "ringblob.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=78$", unit, re.M)


def test_second_daemon_on_same_data_file_is_refused(daemon):
    other_sock = daemon.workdir / "second.sock"
    p = rb("serve", "--data", str(daemon.data), "--socket", str(other_sock), "--metrics-addr", "", timeout=60)
    assert p.returncode == 75, p.stderr  # EX_TEMPFAIL: may start once the holder has stopped
    err = p.stderr.decode()
    assert "lock" in err.lower(), err
    assert str(daemon.data) in err or "ringblob.data" in err, err
    # the first daemon is unaffected
    with ringblob.Client(daemon.socket) as c:
        c.ping()


def test_serve_embedded_defaults_create_var():
    """`make run`-style: with cwd in a fresh directory, ./var/ringblob.data (1 GiB) and ./var/ringblob.sock (0600)."""
    cwd = make_tmp("run-")
    try:
        d = Daemon(cwd, cwd=cwd, size="1G", data=pathlib.Path("var/ringblob.data"), sock=pathlib.Path("var/ringblob.sock"))
        # exactly the defaults except metrics (port 9464 may be taken by a neighbour); --print-config
        # above checks that metrics default to 127.0.0.1:9464
        d.args = ringblob_cmd() + ["serve", "--metrics-addr", ""]
        d.socket = cwd / "var" / "ringblob.sock"
        d.start()
        try:
            data = cwd / "var" / "ringblob.data"
            assert data.stat().st_size == 1 << 30
            mode = (cwd / "var" / "ringblob.sock").stat()
            assert stat.S_ISSOCK(mode.st_mode)
            assert stat.S_IMODE(mode.st_mode) == 0o600
            with ringblob.Client(d.socket) as c:
                c.put(b"k", b"v", sync=True)
            # the banner says where the socket is and how to stop it
            deadline = time.monotonic() + 5
            while "Ctrl-C" not in d.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            out = d.output()
            assert "ringblob.sock" in out and "Ctrl-C" in out and "SIGTERM" in out, out
        finally:
            assert d.stop() == 0, d.output()
        # restart on the same files: the data survives
        d.start()
        try:
            with ringblob.Client(d.socket) as c:
                assert c.get(b"k") == b"v"
        finally:
            assert d.stop() == 0, d.output()
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def test_serve_settings_reach_the_server_config():
    from ringblob import serve
    from ringblob.config import Settings

    s = Settings(socket="/tmp/x.sock", socket_mode=0o660, socket_group="", allow_uids=[1000], allow_gids=[5, 6],
                 max_frame_size=1 << 20, max_connections=3, max_in_flight_per_conn=4, max_in_flight_total=5,
                 idle_timeout=0.0, metrics_addr="", shutdown_timeout=2.5, loop="asyncio")
    cfg = serve.server_config(s).validate()
    assert (cfg.socket_path, cfg.socket_mode, cfg.socket_group) == ("/tmp/x.sock", 0o660, None)
    assert tuple(cfg.allow_uids) == (1000,) and tuple(cfg.allow_gids) == (5, 6)
    assert (cfg.max_frame_size, cfg.max_connections, cfg.max_in_flight_per_conn, cfg.max_in_flight_total) == (1 << 20, 3, 4, 5)
    assert (cfg.idle_timeout, cfg.metrics_addr, cfg.shutdown_timeout, cfg.loop) == (0.0, "", 2.5, "asyncio")
    # the embedded defaults agree with the protocol's frame limit
    from ringblob import protocol

    assert Settings().max_frame_size == protocol.DEFAULT_MAX_FRAME_SIZE


def test_serve_config_file_end_to_end():
    """A TOML file sets data, socket, size and max_blob_size; a flag overrides its metrics_addr."""
    workdir = make_tmp("cf-")
    try:
        cfg = workdir / "rb.toml"
        cfg.write_text(
            f'data = "{workdir}/fromfile.data"\nsocket = "{workdir}/fromfile.sock"\nsize = "32M"\n'
            'max_blob_size = "4K"\nmetrics_addr = "192.0.2.1:9464"\n'  # TEST-NET-1: not an address of this host
        )
        d = Daemon(workdir, data=workdir / "fromfile.data", sock=workdir / "fromfile.sock")
        d.args = ringblob_cmd() + ["serve", "--config", str(cfg), "--metrics-addr", ""]
        d.start()
        try:
            assert (workdir / "fromfile.data").stat().st_size == 32 << 20
            with ringblob.Client(d.socket) as c:
                c.put(b"small", b"x" * 4096)
                with pytest.raises(ringblob.errors.TooLarge):
                    c.put(b"big", b"x" * 4097)
        finally:
            assert d.stop() == 0, d.output()
        # without the flag the file's metrics_addr is used: nothing can listen there (the store
        # opened first and logged, so the error is the last line)
        p = rb("serve", "--config", str(cfg))
        assert p.returncode == 78  # a setting to change (EX_CONFIG), not a failure a restart mends
        line = p.stderr.decode().strip().splitlines()[-1]
        assert line.startswith("ringblob serve: ") and "metrics_addr" in line and "192.0.2.1:9464" in line
        # a malformed value in the file is refused naming the key and the file
        cfg.write_text('metrics_addr = "not an address"\n')
        line = one_line_error(rb("serve", "--config", str(cfg), "--metrics-addr", ""), "serve", 78)
        assert "metrics_addr" in line and str(cfg) in line
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
