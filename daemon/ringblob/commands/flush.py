"""Make every acknowledged write durable: `ringblob flush`.

The daemon skips the fdatasync when nothing is pending (`needs_flush` false).
Exit status: 0 durable, 2 on error (e.g. ReadOnly after a failed fdatasync).
"""

from __future__ import annotations

import argparse

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob flush``."""
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Send one FLUSH."""
    with _common.connect(args) as client:
        client.flush()
    return 0
