"""systemd integration in a few lines, no dependency: sd_notify, the watchdog, socket activation.

* :func:`notify` sends a state string (``READY=1``, ``STOPPING=1``,
  ``WATCHDOG=1``, ``STATUS=...``, ``EXTEND_TIMEOUT_USEC=...``) as one datagram
  to ``$NOTIFY_SOCKET`` — a path, or an abstract-namespace name written with a
  leading ``@``. Without ``$NOTIFY_SOCKET`` (not run by systemd, or not
  ``Type=notify``) it does nothing and returns False.
* :func:`watchdog_interval` reads ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` (set by
  ``WatchdogSec=``) and returns how often to send ``WATCHDOG=1``: half the
  watchdog timeout, in seconds.
* :func:`listen_fds` takes the sockets systemd passed by socket activation
  (``$LISTEN_FDS`` sockets from fd 3 on, for ``$LISTEN_PID``, named by
  ``$LISTEN_FDNAMES``), marks them close-on-exec, removes the variables from
  the environment so children do not inherit them, and returns socket objects.

See sd_notify(3), sd_watchdog_enabled(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import errno
import logging
import os
import socket

__all__ = [
    "notify",
    "notify_ready",
    "notify_stopping",
    "notify_watchdog",
    "notify_status",
    "extend_timeout",
    "watchdog_interval",
    "listen_fds",
    "listen_fds_with_names",
    "SD_LISTEN_FDS_START",
]

log = logging.getLogger("ringblob.systemd")

SD_LISTEN_FDS_START = 3


def _notify_address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    return value


def notify(state: str, *, unset_environment: bool = False) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` assignments) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is
    unset or the send failed (logged as a warning; a daemon keeps running —
    systemd will notice the missing READY=1 by its start timeout).
    ``unset_environment`` removes ``NOTIFY_SOCKET`` afterwards so that child
    processes cannot notify on the daemon's behalf.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if unset_environment:
        os.environ.pop("NOTIFY_SOCKET", None)
    if not addr:
        return False
    if not (addr.startswith("/") or addr.startswith("@")):
        log.warning("systemd: NOTIFY_SOCKET=%r is neither a path nor an abstract name (@...); not notifying", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_notify_address(addr))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd: sending %r to NOTIFY_SOCKET=%s failed: %s", state.split("\n")[0], addr, exc)
        return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """``READY=1`` (plus ``STATUS=``): start-up finished (after recovery), requests are served."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_stopping(status: str | None = None) -> bool:
    """``STOPPING=1`` (plus ``STATUS=``): shutdown began; in-flight requests are being drained."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def notify_watchdog() -> bool:
    """``WATCHDOG=1``: the event loop is alive; send every :func:`watchdog_interval` seconds."""
    return notify("WATCHDOG=1")


def notify_status(status: str) -> bool:
    """``STATUS=...``: one line shown by ``systemctl status``."""
    return notify(f"STATUS={status}")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more before the start/stop timeout fires
    (for a long journal replay or a slow drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``.

    ``None`` when the watchdog is off: ``$WATCHDOG_USEC`` unset, zero or not a
    number, or ``$WATCHDOG_PID`` set to a process other than this one.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        n = int(usec)
    except ValueError:
        return None
    if n <= 0:
        return None
    return n / 2 / 1_000_000


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets passed by systemd socket activation, as ``(name, socket)`` pairs.

    Names come from ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the
    .socket unit; ``"unknown"`` when absent). Empty when ``$LISTEN_PID`` is not
    this process or ``$LISTEN_FDS`` is unset. Each descriptor is marked
    close-on-exec. ``unset_environment`` (default) removes ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` so children do not take the sockets
    for theirs. Raises ``OSError(ENOTSOCK)`` naming the descriptor when one
    passed is not a socket (a FIFO or a file: not something ringblob serves on).
    """
    env = os.environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        log.warning("systemd: ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return []
    labels = names.split(":") if names else []
    out: list[tuple[str, socket.socket]] = []
    for i in range(max(0, n)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # FD_CLOEXEC
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise OSError(errno.ENOTSOCK, f"socket activation: fd {fd} (of LISTEN_FDS={n}) is not a socket; "
                              "ringblob.socket may only pass ListenStream= sockets") from exc
            raise
        out.append((labels[i] if i < len(labels) and labels[i] else "unknown", sock))
    return out


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets passed by systemd socket activation (fd 3 onward), close-on-exec;
    ``[]`` when not socket-activated. See :func:`listen_fds_with_names`."""
    return [sock for _, sock in listen_fds_with_names(unset_environment)]
