"""Show the daemon's state: `ringblob stat [--json]` (engine, blob count, used and free bytes, ...).

Without --json it prints one `name: value` line per field (nested fields as
`a.b`); with --json the daemon's STAT reply as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import _common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob stat``."""
    parser.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    _common.add_socket_argument(parser)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, value))


def run(args: argparse.Namespace) -> int:
    """Send one STAT and print it."""
    with _common.connect(args) as client:
        info = client.stat()
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    rows: list[tuple[str, Any]] = []
    _flatten("", info, rows)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return 0
