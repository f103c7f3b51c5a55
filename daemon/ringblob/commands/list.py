"""List keys: `ringblob list [--prefix P]` prints one key per line in ascending byte order.

Keys print as UTF-8 text, one per line, in which bytes that are not UTF-8,
control characters (a newline, a tab) and the backslash print as \\xNN
escapes, so every key is one line and no two keys print alike; or as hex
with --hex (then --prefix is hex too), which is how to pass such a key back.
The daemon sends the keys in pages; the command prints each page as it
arrives.
"""

from __future__ import annotations

import argparse
import sys

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob list``."""
    parser.add_argument("--prefix", metavar="P", default="", help="only keys starting with P (UTF-8 text, or hex with --hex)")
    _common.add_hex_argument(parser)
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Page through LIST and print the keys."""
    prefix = _common.parse_key(args.prefix, args.hex) if args.prefix else b""
    out = sys.stdout
    with _common.connect(args) as client:
        for key in client.list(prefix):
            out.write(_common.format_key(key, args.hex) + "\n")
    out.flush()
    return 0
