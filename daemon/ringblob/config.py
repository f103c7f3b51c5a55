"""Settings of ``ringblob serve``: one table, two callers.

Every setting is one field of :class:`Settings` with its type, its embedded
default and its help text. From that single table come

* the command-line flags of ``ringblob serve`` (:func:`add_arguments`;
  ``max_frame_size`` becomes ``--max-frame-size``),
* the keys of the TOML configuration file (``--config FILE``; the same names
  with underscores, flat, no tables), read by :func:`load_toml`,
* the effective configuration as TOML (``ringblob serve --print-config``,
  :func:`to_toml`) and the settings table of docs/CONFIG.md
  (:func:`markdown_table`).

Precedence: a flag given on the command line beats the TOML file, which beats
the embedded default (:func:`resolve`). Sizes take bytes or a number with a
binary suffix K, M, G or T (``256M`` is 268435456 bytes), see
:func:`parse_size`. Every bad value raises :class:`~ringblob.errors.ConfigError`
naming the setting (and the file, for TOML).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

__all__ = [
    "Settings",
    "SETTINGS",
    "parse_size",
    "format_size",
    "parse_mode",
    "parse_addr",
    "add_arguments",
    "load_toml",
    "resolve",
    "to_toml",
    "markdown_table",
]

KIB = 1024
_SUFFIX = {"": 1, "K": KIB, "M": KIB**2, "G": KIB**3, "T": KIB**4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: Any, name: str = "size") -> int:
    """Parse a size in bytes: an int, or a string of digits with an optional binary suffix.

    ``"4096"`` -> 4096, ``"256M"`` / ``"256MiB"`` / ``"256m"`` -> 268435456,
    ``"1G"`` -> 1073741824, ``"2T"`` -> 2199023255552 (K/M/G/T are powers of
    1024). Raises :class:`ConfigError` naming ``name`` for anything else
    (negative numbers, fractions, unknown suffixes, booleans).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size in bytes (e.g. 4096 or 256M), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: a size cannot be negative ({value})")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    raise ConfigError(
        f"{name}: {value!r} is not a size; use bytes or a whole number with a binary suffix "
        f"K, M, G or T (1K = 1024 bytes), e.g. 256M"
    )


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes: ``1073741824`` -> ``"1G"``, ``1000`` -> ``"1000"``."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def parse_mode(value: Any, name: str = "socket_mode") -> int:
    """Parse a file mode: an int (TOML ``0o600``) or an octal string (``"0600"``, ``"600"``, ``"0o600"``)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an octal file mode such as \"0600\", got {value!r}")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("0o"):
            text = text[2:]
        if not text or any(c not in "01234567" for c in text):
            raise ConfigError(f"{name}: {value!r} is not an octal file mode; use e.g. \"0600\" or \"0660\"")
        mode = int(text, 8)
    else:
        raise ConfigError(f"{name}: expected an octal file mode such as \"0600\", got {value!r}")
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{name}: mode {oct(mode)} is outside 0000..0777")
    return mode


def parse_addr(value: str, name: str = "metrics_addr") -> tuple[str, int] | None:
    """Parse ``HOST:PORT`` (IPv6 as ``[::1]:9464``) into ``(host, port)``; ``""`` -> ``None`` (disabled)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected \"HOST:PORT\" or \"\" to disable, got {value!r}")
    text = value.strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464; \"\" disables it)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{name}: write an IPv6 address in brackets, e.g. [::1]:9464 (got {value!r})")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ConfigError(f"{name}: port {p} is outside 0..65535")
    return host, p


# -- value kinds: how a setting is parsed from a flag and from TOML, and written back ----------


@dataclass(frozen=True)
class _Kind:
    name: str  # shown in docs: "path", "size", ...
    from_flag: Callable[[str, str], Any]  # (text, setting name) -> value
    from_toml: Callable[[Any, str], Any]  # (TOML value, setting name) -> value
    to_toml: Callable[[Any], str]  # value -> TOML literal


def _toml_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _want(types: tuple[type, ...], what: str):
    def check(v: Any, name: str) -> Any:
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            raise ConfigError(f"{name}: expected {what}, got {type(v).__name__} {v!r}")
        return v

    return check


def _int_flag(text: str, name: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {text!r}") from None


def _float_flag(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {text!r}") from None


def _id_list_flag(text: str, name: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise ConfigError(f"{name}: expected comma-separated numeric ids (e.g. 1000,1001), got {text!r}")
        out.append(int(part))
    return out


def _id_list_toml(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        raise ConfigError(f"{name}: expected an array of numeric ids, e.g. [1000, 1001], got {v!r}")
    return list(v)


_STR = _Kind("string", lambda t, n: t, _want((str,), "a string"), _toml_str)
_PATH = _Kind("path", lambda t, n: t, _want((str,), "a path string"), _toml_str)
_SIZE = _Kind("size", lambda t, n: parse_size(t, n), lambda v, n: parse_size(v, n), lambda v: _toml_str(format_size(v)))
_INT = _Kind("integer", _int_flag, _want((int,), "a whole number"), str)
_SECONDS = _Kind(
    "seconds",
    _float_flag,
    lambda v, n: float(_want((int, float), "a number of seconds")(v, n)),
    lambda v: repr(float(v)),
)
_MODE = _Kind("octal mode", lambda t, n: parse_mode(t, n), lambda v, n: parse_mode(v, n), lambda v: _toml_str(f"{v:04o}"))
_IDS = _Kind("id list", _id_list_flag, _id_list_toml, lambda v: "[" + ", ".join(str(x) for x in v) + "]")


def _bool_flag(text: str, name: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "yes", "on", "1"):
        return True
    if t in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {text!r}")


_BOOL = _Kind("boolean", _bool_flag, _want((bool,), "true or false"), lambda v: "true" if v else "false")
_ADDR = _Kind("HOST:PORT", lambda t, n: t, _want((str,), "a \"HOST:PORT\" string"), _toml_str)

ENGINES = ("auto", "uring", "psync")
LOOPS = ("auto", "uvloop", "asyncio")
SYNC_METHODS = ("auto", "dsync", "fdatasync")  # the store's SYNC_METHODS (the store does not import config)
PARALLEL_HASH_MODES = ("off", "auto", "on")  # ringblob.digest.PARALLEL_MODES


def _setting(default: Any, kind: _Kind, help: str, *, group: str, choices: tuple | None = None,
             minimum: int | float | None = None, metavar: str | None = None):
    """One row of the settings table: a dataclass field carrying its kind, help, limits and flag metavar."""
    meta = {"kind": kind, "help": help, "group": group, "choices": choices, "min": minimum, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Every setting of ``ringblob serve`` with its embedded default (see docs/CONFIG.md).

    Sizes are in bytes, times in seconds. Build one with :func:`resolve`
    (flags > TOML > defaults); ``Settings()`` is the embedded defaults.
    """

    # store
    data: str = _setting("./var/ringblob.data", _PATH, "data file or block device (formatted with `size` when absent)", group="store")
    size: int = _setting(1 << 30, _SIZE, "size of a new data file when it has to be formatted (bytes, or K/M/G/T)", group="store", minimum=1 << 20)
    engine: str = _setting("auto", _STR, "I/O engine: auto (io_uring, else psync with a warning), uring or psync", group="store", choices=ENGINES)
    max_blob_size: int = _setting(64 << 20, _SIZE, "largest value a put may store (bytes, or K/M/G/T)", group="store", minimum=1)
    buffer_size: int = _setting(256 << 10, _SIZE, "size of each registered (fixed) I/O buffer (a multiple of 4K)", group="store", minimum=4096)
    buffer_count: int = _setting(64, _INT, "number of registered buffers (buffer_size x buffer_count is locked memory; at least 3)", group="store", minimum=3)
    queue_depth: int = _setting(128, _INT, "io_uring submission queue depth (SQEs queued plus in flight)", group="store", minimum=1)
    sync_method: str = _setting("auto", _STR, "how a group commit of sync puts is made durable: dsync = its writes carry RWF_DSYNC (per-write O_DSYNC) and no fdatasync follows, wherever nothing written earlier still needs one; fdatasync = the writes, then one fdatasync; auto = dsync where the device needs no cache flush for a RWF_DSYNC write (FUA, or no volatile write cache), else fdatasync", group="store", choices=SYNC_METHODS)
    parallel_hash: str = _setting("auto", _STR, "which thread BLAKE3-hashes large values (the same digest in every mode): auto = a value larger than buffer_size arriving from a client is hashed buffer by buffer, as they fill, by one hash worker thread while the event loop receives the next, where the daemon may use 2 CPUs or more (its CPU affinity, capped by a cgroup CPU quota) (1 MiB PUTs +30% on 16 CPUs, +4% on 2, for 5-10% more CPU), else on the loop's thread; on = that worker always, and whole values of 128 KiB or more (a GET's check, a put of a value in hand, recovery) by BLAKE3's thread pool (one thread per CPU: on 16 CPUs 1 MiB GETs +38% for ~2.7x the CPU per GET; on 2 CPUs no gain); off = everything on the event loop's thread", group="store", choices=PARALLEL_HASH_MODES)
    stream_writes: bool = _setting(True, _BOOL, "write a large PUT's value buffer by buffer as it arrives, into an extent allocated when its buffers are leased, so the disk write overlaps the receive (1 MiB PUTs +14-20% on a 16-CPU host at 2 to 16 CPUs; about level on a 2-CPU VM for 10-25% more CPU per MiB); false = write it once complete", group="store")
    zero_fill: bool = _setting(True, _BOOL, "when formatting a new data file, write zeros over all of it first so writes never land in unwritten extents (~0.5 s per GiB; block devices never)", group="store")
    # server
    socket: str = _setting("./var/ringblob.sock", _PATH, "Unix socket the daemon listens on (ignored under socket activation)", group="server")
    socket_mode: int = _setting(0o600, _MODE, "file mode of the socket (octal)", group="server")
    socket_group: str = _setting("", _STR, "group owning the socket (name or gid; empty keeps the daemon's)", group="server", metavar="GROUP")
    allow_uids: list = _setting([], _IDS, "peer uids allowed to connect, checked with SO_PEERCRED (empty: anyone who can open the socket)", group="server", metavar="UID,...")
    allow_gids: list = _setting([], _IDS, "peer gids allowed to connect, checked with SO_PEERCRED (empty: anyone who can open the socket)", group="server", metavar="GID,...")
    max_frame_size: int = _setting(72 << 20, _SIZE, "largest request frame (header + body) accepted; larger ones get FrameTooLarge and the connection closes", group="server", minimum=4096)
    max_receive_bytes: int = _setting(1 << 30, _SIZE, "bytes all connections together may hold in request frames received and not yet served (partial bodies included); over it, connections holding such bytes are read one at a time until it drops", group="server", minimum=1 << 20)
    max_connections: int = _setting(1024, _INT, "connections open at once; more are refused with Busy", group="server", minimum=1)
    max_in_flight_per_conn: int = _setting(256, _INT, "requests in flight on one connection before the daemon stops reading it", group="server", minimum=1)
    max_in_flight_total: int = _setting(4096, _INT, "requests in flight over all connections before the daemon stops reading", group="server", minimum=1)
    idle_timeout: float = _setting(300.0, _SECONDS, "close a connection idle this long (seconds; 0 never)", group="server", minimum=0)
    metrics_addr: str = _setting("127.0.0.1:9464", _ADDR, "Prometheus /metrics listener HOST:PORT; empty disables it", group="server", metavar="HOST:PORT")
    shutdown_timeout: float = _setting(30.0, _SECONDS, "at SIGTERM/SIGINT, seconds to wait for requests in flight before closing the store", group="server", minimum=0)
    loop: str = _setting("auto", _STR, "event loop: auto (uvloop when installed), uvloop or asyncio", group="server", choices=LOOPS)

    def validate(self) -> "Settings":
        """Check every value's type and range; return ``self``. Raises :class:`ConfigError` naming the setting."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        return self

    @property
    def metrics(self) -> tuple[str, int] | None:
        """``metrics_addr`` parsed as ``(host, port)``, or ``None`` when disabled."""
        return parse_addr(self.metrics_addr)


SETTINGS: tuple[dataclasses.Field, ...] = tuple(dataclasses.fields(Settings))
_BY_NAME = {f.name: f for f in SETTINGS}


def check_value(name: str, value: Any) -> None:
    """Check one parsed setting's range and form (choices, minimum, alignment, address).

    Raises :class:`ConfigError` naming the setting.
    """
    meta = _BY_NAME[name].metadata
    choices = meta["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    lo = meta["min"]
    if lo is not None and value < lo:
        shown = format_size(lo) if meta["kind"] is _SIZE else lo
        raise ConfigError(f"{name}: {value!r} is below the minimum {shown}")
    if name == "buffer_size" and value % 4096:
        raise ConfigError(f"buffer_size: {value} is not a multiple of 4096 (the page size)")
    if name in ("data", "socket") and not value:
        raise ConfigError(f"{name}: the path is empty")
    if meta["kind"] is _ADDR:
        parse_addr(value, name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (default ``None``: "not given") plus ``--config FILE``."""
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (the keys are the flag names with underscores)")
    groups: dict[str, Any] = {}
    for f in SETTINGS:
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(f"{meta['group']} settings")
        default = Settings().__dict__[f.name]
        shown = _display(f, default)
        group.add_argument(
            _flag(f.name),
            dest=f.name,
            default=None,
            metavar=_metavar(meta),
            help=f"{meta['help']} (default: {shown})".replace("%", "%%"),
        )


def _metavar(meta: Any) -> str:
    if meta["metavar"]:
        return meta["metavar"]
    if meta["choices"]:
        return "{" + ",".join(meta["choices"]) + "}"
    return meta["kind"].name.upper().replace(" ", "_")


def _display(f: dataclasses.Field, value: Any) -> str:
    kind = f.metadata["kind"]
    if kind is _SIZE:
        return format_size(value)
    if kind is _MODE:
        return f"{value:04o}"
    if kind is _IDS:
        return ",".join(map(str, value)) if value else "(none)"
    if kind is _BOOL:
        return "true" if value else "false"
    if value == "":
        return '"" (off)' if f.name == "metrics_addr" else '""'
    return str(value)


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML settings file into ``{setting: parsed value}``.

    Raises :class:`ConfigError` naming the file for a missing/unreadable file,
    invalid TOML, an unknown key (or a table: the file is flat), or a value of
    the wrong type.
    """
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        f = _BY_NAME.get(key)
        if f is None:
            hint = ""
            alt = key.replace("-", "_")
            if alt in _BY_NAME:
                hint = f" (did you mean {alt!r}? keys use underscores)"
            raise ConfigError(
                f"config {path}: unknown key {key!r}{hint}; known keys: {', '.join(_BY_NAME)}"
            )
        try:
            out[key] = f.metadata["kind"].from_toml(value, key)
            check_value(key, out[key])
        except ConfigError as exc:
            raise ConfigError(f"config {path}: {exc}") from None
    return out


def resolve(args: argparse.Namespace | None = None, *, config: str | os.PathLike | None = None) -> Settings:
    """Build the effective :class:`Settings`: flags > TOML file > embedded defaults.

    ``args`` is the namespace of a parser set up by :func:`add_arguments`
    (flags not given are ``None``); ``config`` (or ``args.config``) names the
    TOML file. Raises :class:`ConfigError` for any bad flag, key or value.
    """
    values: dict[str, Any] = {}
    path = config if config is not None else getattr(args, "config", None)
    if path:
        values.update(load_toml(path))
    if args is not None:
        for f in SETTINGS:
            text = getattr(args, f.name, None)
            if text is not None:
                values[f.name] = f.metadata["kind"].from_flag(text, f.name) if isinstance(text, str) else text
    return Settings(**values).validate()


def to_toml(settings: Settings) -> str:
    """The settings as a TOML document that :func:`load_toml` reads back to the same values."""
    lines = ["# ringblob serve settings (flags override this file; see docs/CONFIG.md)"]
    group = None
    for f in SETTINGS:
        meta = f.metadata
        if meta["group"] != group:
            group = meta["group"]
            lines.append("")
            lines.append(f"# -- {group} --")
        lines.append(f"# {meta['help']}")
        lines.append(f"{f.name} = {meta['kind'].to_toml(getattr(settings, f.name))}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The settings table of docs/CONFIG.md (TOML key, flag, type, default, meaning)."""
    rows = ["| TOML key | flag | type | default | meaning |", "|---|---|---|---|---|"]
    defaults = Settings()
    for f in SETTINGS:
        meta = f.metadata
        kind = meta["kind"].name
        if meta["choices"]:
            kind = " / ".join(meta["choices"])
        default = meta["kind"].to_toml(getattr(defaults, f.name))
        rows.append(f"| `{f.name}` | `{_flag(f.name)}` | {kind} | `{default}` | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m ringblob.config: print the docs table
    print(markdown_table(), end="")
