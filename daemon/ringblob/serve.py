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

Exit status (sysexits.h, so a supervisor can tell the failures apart): 0 after
a clean stop; 78 (EX_CONFIG) for a bad setting, a socket path another daemon
serves or a metrics address it cannot listen on, which a restart does not mend
(the systemd unit's RestartPreventExitStatus); 75 (EX_TEMPFAIL) when another
process holds the data file's lock (the message names its pid); 2 for any
other failure, as every ringblob command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import config
from .errors import ConfigError, StoreLocked

log = logging.getLogger("ringblob.serve")

#: exit status for any failure that has no status of its own (as every ringblob command)
EXIT_FAILURE = 2
#: EX_TEMPFAIL: another process holds the data file's lock (StoreLocked); starting again once it
#: has stopped can succeed
EXIT_LOCKED = 75
#: EX_CONFIG: a bad setting, the socket path served by another daemon or a metrics address it
#: cannot listen on (ConfigError); starting again does not help until the configuration changes
EXIT_CONFIG = 78


def exit_status(exc: BaseException) -> int:
    """The exit status of ``ringblob serve`` for the failure ``exc`` (see the module docstring):
    :data:`EXIT_LOCKED` for :class:`~ringblob.errors.StoreLocked`, :data:`EXIT_CONFIG` for
    :class:`~ringblob.errors.ConfigError`, else :data:`EXIT_FAILURE`."""
    if isinstance(exc, StoreLocked):
        return EXIT_LOCKED
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    return EXIT_FAILURE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of :mod:`ringblob.config` as a flag, plus ``--config`` and ``--print-config``."""
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (defaults < --config file < flags) as TOML and exit",
    )
    config.add_arguments(parser)


def prepare_dirs(*paths: str) -> None:
    """Create the missing parent directories of ``paths`` (e.g. ./var for the defaults), mode 0750.

    Raises :class:`~ringblob.errors.ConfigError` naming the directory when it cannot be made.
    """
    for path in paths:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o750, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the directory {parent} for {path}: {exc.strerror or exc}") from None
            log.info("created directory %s", parent)


def server_config(settings: config.Settings):
    """The :class:`ringblob.server.ServerConfig` for ``settings``."""
    from .server import ServerConfig

    return ServerConfig(
        socket_path=settings.socket,
        socket_mode=settings.socket_mode,
        socket_group=settings.socket_group or None,
        allow_uids=tuple(settings.allow_uids),
        allow_gids=tuple(settings.allow_gids),
        max_frame_size=settings.max_frame_size,
        max_receive_bytes=settings.max_receive_bytes,
        max_connections=settings.max_connections,
        max_in_flight_per_conn=settings.max_in_flight_per_conn,
        max_in_flight_total=settings.max_in_flight_total,
        idle_timeout=settings.idle_timeout,
        metrics_addr=settings.metrics_addr,
        shutdown_timeout=settings.shutdown_timeout,
        loop=settings.loop,
    )


def banner(settings: config.Settings, engine: str | None, *, socket_path: str | None = None,
           metrics_address: tuple[str, int] | None = None) -> str:
    """The lines printed once the daemon is ready: data file, socket, metrics URL, how to stop it.

    ``socket_path`` (``None``: socket-activated) and ``metrics_address`` (the
    bound ``(host, port)``) come from the running server where known, else
    from ``settings``.
    """
    lines = [f"ringblob: serving {os.path.abspath(settings.data)}" + (f" with the {engine} engine" if engine else "")]
    if socket_path is None and os.environ.get("LISTEN_FDS"):
        lines.append("ringblob: socket   passed by systemd (socket activation)")
    else:
        lines.append(f"ringblob: socket   {os.path.abspath(socket_path or settings.socket)}")
    addr = metrics_address or settings.metrics
    if addr is None:
        lines.append('ringblob: metrics  disabled (metrics_addr "")')
    else:
        host, port = addr[0], addr[1]
        shown = f"[{host}]" if ":" in host else host
        lines.append(f"ringblob: metrics  http://{shown}:{port}/metrics")
    lines.append(
        f"ringblob: stop it with Ctrl-C or SIGTERM (kill -TERM {os.getpid()}); "
        "it finishes the requests in flight, flushes and writes a checkpoint"
    )
    return "\n".join(lines)


def _engine_name(store) -> str | None:
    for attr in ("engine_name", "engine_kind"):
        name = getattr(store, attr, None)
        if isinstance(name, str):
            return name
    engine = getattr(store, "engine", None)
    name = getattr(engine, "name", None)
    if isinstance(name, str):
        return name
    try:
        name = store.stat().get("engine")
    except Exception:  # the banner must not fail on a store without stat()
        return None
    return name if isinstance(name, str) else None


def run(args: argparse.Namespace) -> int:
    """Resolve the settings, prepare ./var, open the store and serve until SIGTERM/SIGINT.

    Returns 0 after a clean shutdown. Raises :class:`~ringblob.errors.ConfigError`
    (bad settings, a live daemon on the socket), :class:`~ringblob.errors.StoreLocked`
    (another daemon holds the data file), ``OSError``.
    """
    settings = config.resolve(args)
    if args.print_config:
        sys.stdout.write(config.to_toml(settings))
        return 0
    from . import server as server_mod

    cfg = server_config(settings)
    from . import systemd

    socks = systemd.listen_fds()
    listen = socks[0] if socks else None
    if listen is not None:
        log.info("socket activation: using the listening socket passed by systemd (socket setting unused)")
    prepare_dirs(settings.data, *([settings.socket] if listen is None else []))
    engine: list[str | None] = [None]

    async def open_store(metrics):
        from . import digest
        from .store import BlobStore

        digest.configure(settings.parallel_hash)

        store = await BlobStore.open(
            settings.data,
            engine=settings.engine,
            create_size=settings.size,
            max_blob_size=settings.max_blob_size,
            buffer_size=settings.buffer_size,
            buffer_count=settings.buffer_count,
            queue_depth=settings.queue_depth,
            zero_fill=settings.zero_fill,
            sync_method=settings.sync_method,
            stream_writes=settings.stream_writes,
            observer=metrics,
        )
        engine[0] = _engine_name(store)
        log.info("store %s open (engine %s)", settings.data, engine[0] or "unknown")
        return store

    def on_ready(server) -> None:
        print(
            banner(settings, engine[0], socket_path=getattr(server, "socket_path", None),
                   metrics_address=getattr(server, "metrics_address", None)),
            flush=True,
        )

    return int(server_mod.run(cfg, open_store, listen_sock=listen, on_ready=on_ready) or 0)
