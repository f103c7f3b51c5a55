"""Check that the daemon answers: `ringblob ping` prints the round-trip time.

Exit status: 0 when it answered, 2 when it did not (not running, wrong socket).
"""

from __future__ import annotations

import argparse
import time

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob ping``."""
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Send one PING and time it."""
    with _common.connect(args) as client:
        t0 = time.perf_counter()
        client.ping()
        dt = time.perf_counter() - t0
    print(f"ringblob at {client.socket_path} answered in {dt * 1000:.3f} ms")
    return 0
