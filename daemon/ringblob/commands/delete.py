"""Delete a blob: `ringblob delete KEY [--sync]`. Deleting a missing key is not an error.

Exit status: 0 done (or nothing to delete), 2 on error.
"""

from __future__ import annotations

import argparse

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob delete``."""
    parser.add_argument("key", metavar="KEY", help="the key (UTF-8 text, or hex with --hex)")
    parser.add_argument("--sync", action="store_true", help="wait until the delete is durable (fdatasync) before returning")
    _common.add_hex_argument(parser)
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Send one DELETE."""
    key = _common.parse_key(args.key, args.hex)
    with _common.connect(args) as client:
        client.delete(key, sync=args.sync)
    return 0
