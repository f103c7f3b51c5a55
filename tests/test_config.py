"""Settings of ``ringblob serve``: defaults, TOML, precedence, sizes, errors, docs."""

from __future__ import annotations

import argparse
import pathlib
import re

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ringblob import config
from ringblob.config import Settings, add_arguments, load_toml, parse_addr, parse_mode, parse_size, resolve
from ringblob.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "ringblob.toml"
    path.write_text(text)
    return path


def test_embedded_defaults():
    s = resolve(parse([]))
    assert s == Settings()
    assert s.data == "./var/ringblob.data"
    assert s.size == 1 << 30
    assert s.socket == "./var/ringblob.sock"
    assert s.socket_mode == 0o600
    assert s.metrics_addr == "127.0.0.1:9464"
    assert s.metrics == ("127.0.0.1", 9464)
    assert s.engine == "auto"
    assert s.allow_uids == [] and s.allow_gids == []
    # list defaults are not shared between instances
    a, b = Settings(), Settings()
    a.allow_uids.append(1)
    assert b.allow_uids == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0", 0),
        ("4096", 4096),
        ("1K", 1024),
        ("256M", 256 << 20),
        ("256m", 256 << 20),
        ("256MiB", 256 << 20),
        ("256 MB", 256 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        (" 8k ", 8192),
        (65536, 65536),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "M", "1.5G", "-1", "12X", "1GG", "ten", True, -5, 1.0, None, "1 0"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, "max_blob_size")
    assert "max_blob_size" in str(info.value)


@given(st.integers(min_value=0, max_value=1 << 50))
@hsettings(max_examples=200, deadline=None)
def test_format_size_round_trips(n):
    assert parse_size(config.format_size(n)) == n


def test_parse_mode_and_addr():
    assert parse_mode("0600") == 0o600
    assert parse_mode("660") == 0o660
    assert parse_mode("0o640") == 0o640
    assert parse_mode(0o644) == 0o644
    for bad in ("0800", "rw", "", "01777", True):
        with pytest.raises(ConfigError):
            parse_mode(bad)
    assert parse_addr("") is None
    assert parse_addr("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_addr("[::1]:9464") == ("::1", 9464)
    assert parse_addr("localhost:80") == ("localhost", 80)
    for bad in ("9464", ":9464", "host:", "host:port", "::1:9464", "h:70000"):
        with pytest.raises(ConfigError):
            parse_addr(bad)


def test_flags_parse_every_kind():
    s = resolve(
        parse(
            [
                "--data", "/tmp/x.data", "--size", "256M", "--engine", "psync",
                "--max-blob-size", "1M", "--buffer-size", "64K", "--buffer-count", "8",
                "--queue-depth", "32", "--socket", "/tmp/x.sock", "--socket-mode", "0660",
                "--socket-group", "blob", "--allow-uids", "1000, 1001", "--allow-gids", "50",
                "--max-frame-size", "2M", "--max-connections", "5",
                "--max-in-flight-per-conn", "7", "--max-in-flight-total", "9",
                "--idle-timeout", "1.5", "--metrics-addr", "",
            ]
        )
    )
    assert s == Settings(
        data="/tmp/x.data", size=256 << 20, engine="psync", max_blob_size=1 << 20,
        buffer_size=64 << 10, buffer_count=8, queue_depth=32, socket="/tmp/x.sock",
        socket_mode=0o660, socket_group="blob", allow_uids=[1000, 1001], allow_gids=[50],
        max_frame_size=2 << 20, max_connections=5, max_in_flight_per_conn=7,
        max_in_flight_total=9, idle_timeout=1.5, metrics_addr="",
    )
    assert s.metrics is None


def test_toml_file_and_precedence(tmp_path):
    path = write(
        tmp_path,
        'data = "/srv/blob.data"\nsize = "2G"\nsocket_mode = 0o660\nallow_uids = [0, 1000]\n'
        'max_frame_size = 1048576\nidle_timeout = 5\nmetrics_addr = "127.0.0.1:9999"\n',
    )
    s = resolve(parse(["--config", str(path)]))
    assert s.data == "/srv/blob.data"
    assert s.size == 2 << 30
    assert s.socket_mode == 0o660
    assert s.allow_uids == [0, 1000]
    assert s.max_frame_size == 1 << 20
    assert s.idle_timeout == 5.0 and isinstance(s.idle_timeout, float)
    assert s.socket == Settings().socket  # not in the file: the embedded default
    # a flag beats the file, the file beats the default
    s = resolve(parse(["--config", str(path), "--size", "512M", "--metrics-addr", ""]))
    assert s.size == 512 << 20
    assert s.metrics_addr == ""
    assert s.data == "/srv/blob.data"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, 'data = "x"\nsocket_path = "/tmp/s"\n')
    with pytest.raises(ConfigError) as info:
        resolve(parse(["--config", str(path)]))
    msg = str(info.value)
    assert "socket_path" in msg and str(path) in msg
    path = write(tmp_path, 'max-frame-size = "1M"\n')
    with pytest.raises(ConfigError, match="max_frame_size"):
        load_toml(path)
    path = write(tmp_path, '[server]\nsocket = "/tmp/s"\n')
    with pytest.raises(ConfigError, match="unknown key 'server'"):
        load_toml(path)


@pytest.mark.parametrize(
    "line,key",
    [
        ("size = true", "size"),
        ("size = 1.5", "size"),
        ('size = "lots"', "size"),
        ("data = 12", "data"),
        ('buffer_count = "8"', "buffer_count"),
        ("buffer_count = 8.0", "buffer_count"),
        ("max_connections = true", "max_connections"),
        ('idle_timeout = "soon"', "idle_timeout"),
        ('allow_uids = "1000"', "allow_uids"),
        ("allow_uids = [-1]", "allow_uids"),
        ('allow_gids = ["wheel"]', "allow_gids"),
        ('socket_mode = "rw-------"', "socket_mode"),
        ("metrics_addr = 9464", "metrics_addr"),
        ('metrics_addr = "9464"', "metrics_addr"),
        ('engine = "spdk"', "engine"),
        ("buffer_count = 0", "buffer_count"),
        ('buffer_size = "5000"', "buffer_size"),
        ('data = ""', "data"),
    ],
)
def test_wrong_types_in_toml(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        resolve(config=path)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--engine", "spdk"], "engine"),
        (["--buffer-size", "5000"], "buffer_size"),
        (["--buffer-count", "0"], "buffer_count"),
        (["--buffer-count", "many"], "buffer_count"),
        (["--size", "4K"], "size"),
        (["--idle-timeout", "-1"], "idle_timeout"),
        (["--metrics-addr", "9464"], "metrics_addr"),
        (["--allow-uids", "root"], "allow_uids"),
        (["--data", ""], "data"),
    ],
)
def test_bad_flags(argv, key):
    with pytest.raises(ConfigError) as info:
        resolve(parse(argv))
    assert key in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve(config=tmp_path / "absent.toml")
    path = write(tmp_path, "data = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve(config=path)


def test_to_toml_round_trips(tmp_path):
    custom = Settings(size=3 << 30, socket_mode=0o640, allow_gids=[4, 5], metrics_addr="", idle_timeout=0.25, data='/a "q"\\b')
    for s in (Settings(), custom):
        path = write(tmp_path, config.to_toml(s))
        assert resolve(config=path) == s


def test_docs_table_matches_settings():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    m = re.search(r"<!-- settings-table:[^>]*-->\n(.*?)<!-- /settings-table -->", doc, re.S)
    assert m, "docs/CONFIG.md lost its settings-table markers"
    assert m.group(1) == config.markdown_table(), (
        "docs/CONFIG.md is out of date: regenerate the table with `python -m ringblob.config`"
    )
    for f in config.SETTINGS:
        assert f"`{f.name}`" in m.group(1)


@pytest.mark.parametrize("name", ["zero_fill", "stream_writes"])
def test_boolean_settings_from_flag_and_toml(tmp_path, name):
    flag = "--" + name.replace("_", "-")
    assert getattr(Settings(), name) is True
    assert getattr(resolve(parse([flag, "false"])), name) is False
    assert getattr(resolve(parse([flag, "yes"])), name) is True
    assert getattr(resolve(config=write(tmp_path, f"{name} = false\n")), name) is False
    assert getattr(resolve(parse([flag, "true"]), config=write(tmp_path, f"{name} = false\n")), name) is True
    with pytest.raises(ConfigError, match=name):
        resolve(parse([flag, "maybe"]))
    with pytest.raises(ConfigError, match=name):
        resolve(config=write(tmp_path, f'{name} = "false"\n'))  # a string is not a boolean
    off = Settings(**{name: False})
    assert resolve(config=write(tmp_path, config.to_toml(off))) == off


def test_max_receive_bytes_reaches_the_server_config_and_has_a_floor(tmp_path):
    from ringblob.serve import server_config
    from ringblob.server import ServerConfig

    s = resolve(parse(["--max-receive-bytes", "64M"]))
    assert s.max_receive_bytes == 64 << 20
    assert server_config(s).max_receive_bytes == 64 << 20
    assert Settings().max_receive_bytes == 1 << 30
    with pytest.raises(ConfigError, match="max_receive_bytes"):
        resolve(parse(["--max-receive-bytes", "512K"]))
    with pytest.raises(ConfigError, match="max_receive_bytes"):
        ServerConfig(max_receive_bytes=4096).validate()


def test_sync_method_choices_are_the_stores():
    from ringblob.store.blobstore import SYNC_METHODS

    assert config.SYNC_METHODS == SYNC_METHODS
    assert Settings().sync_method == "auto"
    assert resolve(parse(["--sync-method", "dsync"])).sync_method == "dsync"
    with pytest.raises(ConfigError, match="sync_method"):
        resolve(parse(["--sync-method", "osync"]))
