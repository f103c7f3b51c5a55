"""Run the daemon in the foreground: `ringblob serve [--config FILE] [flags]`.

With no arguments it uses the embedded defaults: the data file
./var/ringblob.data (formatted with 1 GiB when absent), the Unix socket
./var/ringblob.sock (mode 0600) and Prometheus metrics on
http://127.0.0.1:9464/metrics. Every setting is a flag and a key of the TOML
file given with --config; a flag beats the file, the file beats the default
(docs/CONFIG.md lists them all). --print-config prints the effective settings
as TOML and exits.

SIGTERM or SIGINT (Ctrl-C) stops it cleanly: no new requests, the ones in
flight finish, the store is flushed and checkpointed, exit status 0. A second
daemon on the same data file refuses to start (StoreLocked).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from . import config
from .errors import ConfigError

log = logging.getLogger("ringblob.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of :mod:`ringblob.config` as a flag, plus ``--config`` and ``--print-config``."""
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (defaults < --config file < flags) as TOML and exit",
    )
    config.add_arguments(parser)


def prepare_dirs(settings: config.Settings) -> None:
    """Create the missing parent directories of the data file and the socket (e.g. ./var), mode 0750."""
    for path in (settings.data, settings.socket):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o750, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the directory {parent} for {path}: {exc.strerror or exc}") from None
            log.info("created directory %s", parent)


def server_config(settings: config.Settings):
    """The :class:`ringblob.server.ServerConfig` for ``settings`` (the fields it has, by name)."""
    from .server import ServerConfig

    values = {
        "socket_path": settings.socket,
        "socket_mode": settings.socket_mode,
        "socket_group": settings.socket_group or None,
        "allow_uids": tuple(settings.allow_uids),
        "allow_gids": tuple(settings.allow_gids),
        "max_frame_size": settings.max_frame_size,
        "max_connections": settings.max_connections,
        "max_in_flight_per_conn": settings.max_in_flight_per_conn,
        "max_in_flight_total": settings.max_in_flight_total,
        "idle_timeout": settings.idle_timeout or None,
        "metrics_addr": settings.metrics,
    }
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in values.items() if k in names})


def banner(settings: config.Settings, engine: str | None) -> str:
    """The lines printed once the daemon is ready: socket, metrics URL, how to stop it."""
    lines = [f"ringblob: serving {os.path.abspath(settings.data)}" + (f" (engine {engine})" if engine else "")]
    lines.append(f"ringblob: socket   {os.path.abspath(settings.socket)}")
    metrics = settings.metrics
    if metrics is None:
        lines.append("ringblob: metrics  disabled (--metrics-addr \"\")")
    else:
        host, port = metrics
        shown = f"[{host}]" if ":" in host else host
        lines.append(f"ringblob: metrics  http://{shown}:{port}/metrics")
    lines.append(f"ringblob: stop it with Ctrl-C or SIGTERM (kill -TERM {os.getpid()}); it finishes requests in flight and flushes")
    return "\n".join(lines)


async def _serve(settings: config.Settings) -> int:
    from .server import run_server
    from .store import BlobStore

    store = await BlobStore.open(
        settings.data,
        engine=settings.engine,
        create_size=settings.size,
        max_blob_size=settings.max_blob_size,
        buffer_size=settings.buffer_size,
        buffer_count=settings.buffer_count,
        queue_depth=settings.queue_depth,
    )
    engine = getattr(store, "engine_name", None)
    log.info("store %s open with the %s engine", settings.data, engine or "?")

    def ready() -> None:
        print(banner(settings, engine), flush=True)

    return int(await run_server(store, server_config(settings), on_ready=ready) or 0)


def run(args: argparse.Namespace) -> int:
    """Resolve the settings, prepare ./var, open the store and serve until SIGTERM/SIGINT."""
    settings = config.resolve(args)
    if args.print_config:
        sys.stdout.write(config.to_toml(settings))
        return 0
    prepare_dirs(settings)
    return asyncio.run(_serve(settings))
