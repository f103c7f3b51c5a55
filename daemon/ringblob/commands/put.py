"""Store a blob: `ringblob put KEY [FILE|-]`, or `ringblob put --cas [FILE|-]` to store it under its BLAKE3 digest.

The value is read from FILE, or from standard input when FILE is `-` or
missing. With --sync the command returns only once the blob and its journal
record are durable (fdatasync); without it the blob is durable at the next
flush. With --cas give no KEY: the daemon stores the value under its BLAKE3
digest (checked by the daemon) and the command prints the digest in hex.
Exit status: 0 stored, 2 on error (nothing stored).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RingblobError
from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob put``."""
    parser.add_argument("key", nargs="?", metavar="KEY", help="the key (UTF-8 text, or hex with --hex); omit it with --cas")
    parser.add_argument("file", nargs="?", metavar="FILE", help="file to store; '-' or absent reads standard input")
    parser.add_argument("--sync", action="store_true", help="wait until the blob is durable (fdatasync) before returning")
    parser.add_argument("--cas", action="store_true", help="content-addressed: store under the BLAKE3 digest of the value and print it (hex)")
    _common.add_hex_argument(parser)
    _common.add_socket_argument(parser)


def _read(path: str | None) -> bytes:
    if path is None or path == "-":
        if sys.stdin.isatty():
            print("ringblob put: reading the value from standard input; end it with Ctrl-D", file=sys.stderr)
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RingblobError(f"cannot read the value from {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    """Read the value, send one PUT; print the digest with --cas."""
    if args.cas:
        if args.file is not None:
            raise RingblobError("put --cas takes no KEY (the key is the BLAKE3 digest of the value): ringblob put --cas [FILE|-]")
        path = args.key
        key = None
    else:
        if args.key is None:
            raise RingblobError("put needs a KEY: ringblob put KEY [FILE|-] (or --cas to key it by its BLAKE3 digest)")
        key = _common.parse_key(args.key, args.hex)
        path = args.file
    value = _read(path)
    with _common.connect(args) as client, _common.Progress("put") as progress:
        if args.cas:
            digest = client.put_cas(value, sync=args.sync, progress=progress)
            progress.close()
            print(digest.hex())
        else:
            client.put(key, value, sync=args.sync, progress=progress)
    return 0
