"""Fetch a blob: `ringblob get KEY [-o FILE]` writes its bytes to standard output or FILE.

Exit status: 0 found, 2 on error (NotFound when no blob has the key, with a
hint to add --hex when KEY is the 64 hex digits `ringblob put --cas` prints;
Corrupt when its bytes fail their BLAKE3 digest, in which case nothing is
written).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import NotFound, RingblobError
from . import _common

_DIGEST_HEX = re.compile(r"[0-9a-fA-F]{64}")  # a BLAKE3 digest in hex, as `put --cas` prints it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringblob get``."""
    parser.add_argument("key", metavar="KEY", help="the key (UTF-8 text, or hex with --hex)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the value to FILE (replaced atomically) instead of standard output")
    _common.add_hex_argument(parser)
    _common.add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Send one GET and write the value out."""
    key = _common.parse_key(args.key, args.hex)
    to_stdout = args.output is None or args.output == "-"
    tmp = None if to_stdout else f"{args.output}.ringblob-tmp-{os.getpid()}"
    fh = None
    try:
        if tmp is not None:  # opened first: a FILE that cannot be written fails before the transfer
            try:
                fh = open(tmp, "wb")
            except OSError as exc:
                raise RingblobError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        with _common.connect(args) as client, _common.Progress("get") as progress:
            try:
                value = client.get(key, progress=progress)
            except NotFound as exc:
                if not args.hex and _DIGEST_HEX.fullmatch(args.key):
                    # the hex that `put --cas` prints names the raw 32-byte digest, not this text
                    raise NotFound(f"{exc}; a key printed by `ringblob put --cas` is hex: add --hex") from None
                raise
        if fh is None:
            out = sys.stdout.buffer
            out.write(value)
            out.flush()
            return 0
        try:
            fh.write(value)
            fh.close()
            os.replace(tmp, args.output)
        except OSError as exc:
            raise RingblobError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    except BaseException:
        if fh is not None:
            fh.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return 0
