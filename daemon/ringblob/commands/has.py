"""Test whether a blob exists: `ringblob has KEY` exits 0 when it does, 1 when it does not.

The daemon answers from its index without reading the blob. Exit status 2 on
error (e.g. the daemon is not running).
"""

from __future__ import annotations

import argparse

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob has``."""
    parser.add_argument("key", metavar="KEY", help="the key (UTF-8 text, or hex with --hex)")
    _common.add_hex_argument(parser)
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Send one HAS; 0 present, 1 absent."""
    key = _common.parse_key(args.key, args.hex)
    with _common.connect(args) as client:
        return 0 if client.has(key) else 1
