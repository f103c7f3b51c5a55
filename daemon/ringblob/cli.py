"""The ``ringblob`` command line.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status), and may
provide ``exit_status(exc) -> int`` for the failures it tells apart (``serve``
does); this module only wires them to argparse. Errors of :mod:`ringblob.errors`
and ``OSError`` print one line to stderr and exit with that status, else 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import RingblobError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("ringblob.serve", "run the daemon: serve blobs over a Unix socket (foreground)"),
    "put": ("ringblob.commands.put", "store a blob from a file or stdin (--cas: under its BLAKE3 digest)"),
    "get": ("ringblob.commands.get", "write a blob to stdout or a file"),
    "has": ("ringblob.commands.has", "exit 0 if a blob exists, 1 if not"),
    "delete": ("ringblob.commands.delete", "delete a blob (a missing key is not an error)"),
    "list": ("ringblob.commands.list", "list keys in ascending order (--prefix)"),
    "flush": ("ringblob.commands.flush", "make every acknowledged write durable"),
    "stat": ("ringblob.commands.stat", "show the daemon's state (--json)"),
    "ping": ("ringblob.commands.ping", "check that the daemon answers"),
    "doctor": ("ringblob.doctor", "check that this host can run ringblob (io_uring, O_DIRECT, memlock)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ringblob",
        description="ringblob: an io_uring blob-storage daemon and its client tools.",
    )
    parser.add_argument("--version", action="version", version=f"ringblob {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (modname, helptext) in COMMANDS.items():
        mod = importlib.import_module(modname)
        doc = (mod.__doc__ or helptext).strip()
        first, _, rest = doc.partition("\n\n")
        p = sub.add_parser(
            name,
            help=helptext,
            description=" ".join(first.split()),
            epilog=rest.strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _exit_status=getattr(mod, "exit_status", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except RingblobError as exc:
        print(f"ringblob {args.command}: {exc}", file=sys.stderr)
        return _status(args, exc)
    except BrokenPipeError:
        # the reader of our output went away (`ringblob list | head`): stop quietly, as a
        # process killed by SIGPIPE would (the client maps a broken socket to ConnectionLost)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except OSError as exc:
        print(f"ringblob {args.command}: {exc}", file=sys.stderr)
        return _status(args, exc)
    except KeyboardInterrupt:
        return 130


def _status(args: argparse.Namespace, exc: BaseException) -> int:
    """The exit status of the subcommand's failure ``exc``: its module's ``exit_status``, else 2."""
    return int(args._exit_status(exc)) if args._exit_status is not None else 2


if __name__ == "__main__":
    sys.exit(main())
