"""Pieces shared by the client subcommands: ``--socket``, ``--hex``, keys, connecting, progress."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import IO

from ..errors import InvalidKey, RingblobError

DEFAULT_SOCKET = "./var/ringblob.sock"


def default_socket() -> str:
    """The socket a command talks to when ``--socket`` is not given: ``$RINGBLOB_SOCKET`` or ``./var/ringblob.sock``."""
    return os.environ.get("RINGBLOB_SOCKET") or DEFAULT_SOCKET


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    """``--socket PATH`` (default ``$RINGBLOB_SOCKET``, else ``./var/ringblob.sock``)."""
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's Unix socket (default: $RINGBLOB_SOCKET, else {DEFAULT_SOCKET})",
    )


def add_hex_argument(parser: argparse.ArgumentParser) -> None:
    """``--hex``: keys are given (and printed) as hexadecimal instead of UTF-8 text."""
    parser.add_argument(
        "--hex",
        action="store_true",
        help="keys are hexadecimal bytes (e.g. a BLAKE3 digest) instead of UTF-8 text",
    )


def parse_key(text: str, hex_key: bool) -> bytes:
    """A key from the command line: UTF-8 text, or hex digits with ``--hex``.

    Raises :class:`~ringblob.errors.InvalidKey` for bad hex or an empty key.
    """
    if hex_key:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise InvalidKey(f"key {text!r} is not hexadecimal (drop --hex to use it as UTF-8 text)") from None
    else:
        key = os.fsencode(text)  # UTF-8; undecodable argv bytes come back as they were given
    if not key:
        raise InvalidKey("the key is empty; a key is 1 to 255 bytes")
    return key


# what format_key prints as is: UTF-8 text without control characters (C0, DEL, C1), the line and
# paragraph separators U+2028/U+2029 or the backslash; undecodable bytes are the lone surrogates
# U+DC80..U+DCFF of the surrogateescape decoding
_PLAIN_KEY = re.compile(r"[^\x00-\x1f\\\x7f-\x9f\u2028\u2029\udc80-\udcff]*")


def format_key(key: bytes, hex_key: bool) -> str:
    """A key for printing on one line: hex with ``--hex``; else UTF-8 text in which every byte
    that is not printable text — bytes that are not UTF-8, control characters (a newline, say)
    and the backslash itself — prints as ``\\xNN``, so no key spans two lines and no two keys
    print alike (pass such a key back with ``--hex``)."""
    if hex_key:
        return key.hex()
    text = key.decode("utf-8", "surrogateescape")
    if _PLAIN_KEY.fullmatch(text):
        return text
    out = []
    for ch in text:
        if _PLAIN_KEY.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def connect(args: argparse.Namespace):
    """Open a blocking :class:`ringblob.Client` on ``args.socket``.

    Raises :class:`~ringblob.errors.RingblobError` with a one-line hint when
    nothing listens there.
    """
    from ..client import Client

    path = args.socket or default_socket()
    try:
        return Client(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RingblobError(
            f"cannot connect to the daemon at {path}: {reason}; is it running? "
            f"Start it with `ringblob serve` (or `make run`), or point --socket / $RINGBLOB_SOCKET at its socket"
        ) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A one-line progress bar on stderr for a transfer of ``total`` bytes.

    Call it as ``progress(done, total)``. It draws nothing unless ``stream``
    is a terminal and the transfer has taken longer than ``delay`` seconds,
    redraws at most every ``interval`` seconds, and :meth:`close` ends the
    line (only if something was drawn). Usable as a context manager.
    """

    def __init__(self, label: str, stream: IO[str] | None = None, *, delay: float = 0.5, interval: float = 0.1):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.delay = delay
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.delay or (now - self.last < self.interval and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 30
        filled = int(frac * width)
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{_human(done)} / {_human(total)} {_human(rate)}/s"
        )
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the progress line (a newline on stderr if a bar was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
