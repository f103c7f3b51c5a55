"""Check that this host can run ringblob: io_uring, opcodes, O_DIRECT, memlock, engine.

``ringblob doctor [--config FILE] [--data PATH] [--json] [--engine uring|psync|auto]
[--buffer-size BYTES] [--buffer-count N]`` runs every check and prints one
line per check (``OK``, ``WARN`` or ``FAIL``), or with ``--json`` one JSON
object. ``--config`` reads the same settings from the TOML file of
``ringblob serve`` (flags win). It exits 0 when the chosen engine can run on the data path (warnings
allowed) and 1 when any check fails.

The checks:

* ``kernel`` — the kernel release;
* ``liburing`` / ``io_uring`` / ``opcodes`` — :func:`ringblob.probe.probe`: can
  a ring be set up here (else the real errno and what it means), and does the
  kernel support READ_FIXED, WRITE_FIXED and FSYNC;
* ``extension`` — whether the Cython engine ``ringblob._uring`` imports;
* ``store`` — whether the store's and the server's Cython extensions import
  (``ringblob._index``, ``_alloc``, ``_format``, ``_aiocore``, ``_storeget``,
  ``_storeput``, ``_srvcore``, ``_leased``: key index, page allocator, journal
  encoders, the engine adapter's request path, the store's GET and PUT paths,
  the server's request path, the value received into leased buffers; FAIL without them, whatever the engine);
* ``data`` — O_DIRECT at the data path: an existing data file (or block
  device) is opened read-only with O_DIRECT and its first block read; for a
  path that does not exist yet, a temporary probe file in its directory is
  written, synced, read back with O_DIRECT and removed. Reports the file
  system and the logical block size;
* ``memlock`` — RLIMIT_MEMLOCK against the registered buffer pool
  (buffer_size x buffer_count). Registered buffers are pinned and charged to
  RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK; the ring itself counts
  against RLIMIT_MEMLOCK only before Linux 5.12 (since then it is charged to
  the memory cgroup);
* ``engine`` — which engine ``--engine`` resolves to (``auto``: io_uring when
  the extension imports and a ring with the configured registered buffers can
  be created, else psync), verified by creating that engine over the data path
  and closing it again;
* ``sync`` — which ``sync_method`` the store takes on the data path's device
  (``auto``: dsync where the device has FUA or no volatile write cache, else
  fdatasync) and why; informational, never a failure;
* ``hash`` — what ``parallel_hash`` comes to on this host
  (:func:`ringblob.digest.resolve`): whether a large PUT's buffers go to the
  hash worker thread (``auto``: where the daemon may use 2 CPUs or more, its
  CPU affinity capped by its cgroup's CPU quota) and whether BLAKE3's thread
  pool hashes whole large values (``on``); informational, never a failure.

A check's status depends on the engine asked for: io_uring problems are FAIL
for ``--engine uring``, WARN for ``auto`` (which falls back to psync) and
informational for ``psync``.
"""

from __future__ import annotations

import argparse
import errno as _errno
import json
import mmap
import os
import resource
import stat
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from . import __version__
from .engine import DEFAULT_BUFFER_COUNT, DEFAULT_BUFFER_SIZE, DEFAULT_QUEUE_DEPTH, ENGINE_KINDS
from .engine import _REFUSALS as _ENGINE_REFUSALS

__all__ = ["add_arguments", "run", "diagnose", "Check", "Report", "DEFAULT_DATA"]

DEFAULT_DATA = "./var/ringblob.data"
OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: the Cython modules the store and the server import (the key index, the page allocator, the journal
#: encoders, the engine adapter's request path, the store's GET and PUT paths, the server's request path)
STORE_EXTENSIONS = ("_index", "_alloc", "_format", "_aiocore", "_storeget", "_storeput", "_srvcore", "_leased")
CAP_IPC_LOCK = 14


@dataclass
class Check:
    """One line of the report: ``name``, ``status`` (OK/WARN/FAIL), ``message``,
    and ``details`` (JSON-ready facts behind the message)."""

    name: str
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Everything ``doctor`` found. ``ok`` is False when any check is FAIL;
    ``engine`` is the engine ``engine_requested`` resolves to (``None`` when
    none can run); ``kernel`` is ``uname -r``; ``probe`` is
    :meth:`ringblob.probe.ProbeResult.to_dict` (every opcode the kernel reports)."""

    version: str
    engine_requested: str
    engine: str | None
    data: str
    buffer_size: int
    buffer_count: int
    checks: list[Check]
    kernel: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _parse_size(text: str) -> int:
    try:
        from .config import parse_size  # K/M/G/T suffixes, same as ringblob serve
    except ImportError:  # pragma: no cover - config is part of the package
        return int(text)
    return parse_size(text, "--buffer-size")


def _positive_size(text: str) -> int:
    try:
        n = _parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n <= 0 or n % mmap.PAGESIZE:
        raise argparse.ArgumentTypeError(f"--buffer-size: {text} is not a positive multiple of the page size ({mmap.PAGESIZE})")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buffer-count: {text!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--buffer-count: must be at least 1, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register doctor's flags on its subparser."""
    parser.add_argument("--config", metavar="FILE",
                        help="read data, engine, buffer_size and buffer_count from this `ringblob serve` TOML "
                        "file (flags given here win)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help=f"data file or block device the daemon will use (default: {DEFAULT_DATA})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of one line per check")
    parser.add_argument("--engine", choices=ENGINE_KINDS, default=None,
                        help="engine to check: uring, psync, or auto (io_uring else psync; default)")
    parser.add_argument("--buffer-size", type=_positive_size, default=None, metavar="BYTES",
                        help=f"size of each registered buffer in bytes, K/M suffixes allowed (default: {DEFAULT_BUFFER_SIZE})")
    parser.add_argument("--buffer-count", type=_positive_int, default=None, metavar="N",
                        help=f"number of registered buffers (default: {DEFAULT_BUFFER_COUNT})")
    from .config import SYNC_METHODS

    parser.add_argument("--sync-method", choices=SYNC_METHODS, default=None,
                        help="how group commits will be made durable (default auto): the check says which "
                        "method auto takes for the data path's device, and why")
    from .config import PARALLEL_HASH_MODES

    parser.add_argument("--parallel-hash", choices=PARALLEL_HASH_MODES, default=None,
                        help="which thread hashes large values (default auto): the check says what it comes "
                        "to on this host")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``data``, ``engine``, ``buffer_size``, ``buffer_count``, ``sync_method``, ``parallel_hash`` from flags >
    ``--config`` TOML > defaults.

    Raises :class:`~ringblob.errors.ConfigError` for a bad or unreadable TOML file and for
    values ``ringblob serve`` would refuse (e.g. fewer buffers than the store needs).
    """
    values: dict[str, Any] = {"data": DEFAULT_DATA, "engine": "auto", "buffer_size": DEFAULT_BUFFER_SIZE,
                              "buffer_count": DEFAULT_BUFFER_COUNT, "sync_method": "auto", "parallel_hash": "auto"}
    if getattr(args, "config", None):
        from .config import load_toml

        toml = load_toml(args.config)
        values.update({k: toml[k] for k in values if k in toml})
    for key in values:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    from .config import Settings

    Settings(**values).validate()  # the same limits `ringblob serve` enforces (ConfigError names the setting)
    return values


# -- helpers -------------------------------------------------------------------


def _mib(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else _mib(n)


def _kernel_tuple(release: str) -> tuple[int, int]:
    parts = []
    for piece in release.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def has_cap_ipc_lock(status_path: str = "/proc/self/status") -> bool:
    """True when this process's effective capabilities include CAP_IPC_LOCK."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _errname(err: int | None) -> str:
    return _errno.errorcode.get(err or 0, str(err))


def _direct_roundtrip(fd: int, bsz: int, *, write: bool) -> None:
    """Read (and with ``write`` first write and fdatasync) block 0 with O_DIRECT through an aligned buffer."""
    buf = mmap.mmap(-1, max(bsz, mmap.PAGESIZE))
    try:
        view = memoryview(buf)[:bsz]
        if write:
            pattern = (b"ringblob doctor O_DIRECT probe\n" * (bsz // 31 + 1))[:bsz]
            view[:] = pattern
            n = os.pwritev(fd, [view], 0)
            if n != bsz:
                raise OSError(_errno.EIO, f"short O_DIRECT write: {n} of {bsz} bytes")
            os.fdatasync(fd)
            view[:] = b"\0" * bsz
        n = os.preadv(fd, [view], 0)
        if write and (n != bsz or bytes(view) != pattern):
            raise OSError(_errno.EIO, "O_DIRECT read-back returned different bytes than were written")
        view.release()
    finally:
        buf.close()


class _DataProbe:
    """Result of the data-path check; holds an O_DIRECT fd for the engine check (closed by ``close``)."""

    def __init__(self) -> None:
        self.check: Check | None = None
        self.fd = -1
        self.block_size = 4096
        self.cleanup: list[str] = []
        self.where: str | None = None  # the path probed: the data path, or the directory holding the probe file

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in self.cleanup:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.cleanup.clear()


def _check_data(path: str) -> _DataProbe:
    from .direct import fs_type, open_direct

    res = _DataProbe()
    apath = os.path.abspath(path)
    details: dict[str, Any] = {"path": path, "exists": os.path.lexists(path)}
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        res.check = Check("data", FAIL, f"{path}: cannot stat ({exc.strerror}); fix the path or its permissions", details)
        return res

    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            res.check = Check("data", FAIL, f"{path} is a directory; --data names the data file "
                              f"(e.g. {os.path.join(path, 'ringblob.data')})", details)
            return res
        try:
            df = open_direct(path, read_only=True)
        except OSError as exc:
            details["errno"] = exc.errno
            res.check = Check("data", FAIL, f"{path}: O_DIRECT open failed: {exc}", details)
            return res
        res.fd, res.block_size, res.where = df.fd, df.block_size, path
        details.update(size=df.size, block_size=df.block_size, fs_type=df.fs_type,
                       block_device=df.is_block_device, writable=os.access(path, os.W_OK))
        try:
            if df.size >= df.block_size:
                _direct_roundtrip(df.fd, df.block_size, write=False)
        except OSError as exc:
            details["errno"] = exc.errno
            res.check = Check("data", FAIL, f"{path}: O_DIRECT read of block 0 failed: {exc}", details)
            return res
        if not details["writable"]:
            res.check = Check("data", FAIL, f"{path}: not writable by uid {os.getuid()}; chown it to the "
                              "user that runs ringblob", details)
            return res
        where = "block device" if df.is_block_device else f"{df.fs_type} file"
        res.check = Check("data", OK, f"{path}: existing {where} of {_mib(df.size)}, O_DIRECT works, "
                          f"logical block size {df.block_size}", details)
        return res

    # The data file does not exist yet: probe its directory, or the nearest
    # existing ancestor when the directory itself is still to be created.
    parent = os.path.dirname(apath) or "/"
    probe_dir = parent
    while not os.path.isdir(probe_dir):
        if os.path.lexists(probe_dir):
            res.check = Check("data", FAIL, f"{path}: {probe_dir} exists and is not a directory", details)
            return res
        probe_dir = os.path.dirname(probe_dir)
    details.update(directory=parent, directory_exists=probe_dir == parent, probed_in=probe_dir,
                   fs_type=fs_type(probe_dir))
    res.where = probe_dir
    probe_file = os.path.join(probe_dir, f".ringblob-doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}.probe")
    try:
        df = open_direct(probe_file, create_size=4096)
        res.cleanup.append(probe_file)
        res.fd, res.block_size = df.fd, df.block_size
        _direct_roundtrip(df.fd, df.block_size, write=True)
    except OSError as exc:
        details["errno"] = exc.errno
        if exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            hint = "; make the directory writable by the user that runs ringblob"
        elif exc.errno == _errno.EINVAL:
            hint = ""  # open_direct's message already names the file system
        else:
            hint = "; put the data file on a local file system (ext4, xfs, btrfs) or a block device"
        res.check = Check("data", FAIL, f"{path}: cannot create an O_DIRECT file in {probe_dir} "
                          f"({details['fs_type']}): {exc.strerror or exc}{hint}", details)
        res.close()
        return res
    details.update(block_size=df.block_size)
    msg = (f"{path}: does not exist yet; a probe file in {probe_dir} ({details['fs_type']}) was written, "
           f"synced and read back with O_DIRECT, logical block size {df.block_size}")
    if probe_dir != parent:
        res.check = Check("data", WARN, msg + f"; directory {parent} does not exist: create it "
                          f"(mkdir -p {parent}) or let `ringblob serve` create it", details)
    else:
        res.check = Check("data", OK, msg, details)
    return res


def _check_memlock(buffer_size: int, buffer_count: int, kernel: str, engine_may_be_uring: bool) -> Check:
    from .probe import ring_mlock_bytes

    pool = buffer_size * buffer_count
    ring = ring_mlock_bytes(DEFAULT_QUEUE_DEPTH) or 0  # 0 where the ring is charged to the memory cgroup
    need = pool + ring
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap = has_cap_ipc_lock()
    major_minor = _kernel_tuple(kernel)
    ring_in_memcg = major_minor >= (5, 12)
    details = {
        "pool_bytes": pool,
        "ring_mlock_bytes": ring,
        "needed_bytes": need,
        "rlimit_memlock_soft": None if soft == resource.RLIM_INFINITY else soft,
        "rlimit_memlock_hard": None if hard == resource.RLIM_INFINITY else hard,
        "cap_ipc_lock": cap,
        "ring_memory_accounting": "memory cgroup" if ring_in_memcg else "RLIMIT_MEMLOCK",
    }
    ring_note = ("the ring itself is charged to the memory cgroup on this kernel (>= 5.12), not to memlock"
                 if ring_in_memcg else
                 f"on this kernel (< 5.12) the ring itself also counts against RLIMIT_MEMLOCK: {_mib(ring)} "
                 f"for {DEFAULT_QUEUE_DEPTH} entries")
    head = f"registered buffer pool {_mib(pool)} ({buffer_count} x {_mib(buffer_size)}), RLIMIT_MEMLOCK {_limit(soft)}"
    if cap:
        return Check("memlock", OK, f"{head}; this process has CAP_IPC_LOCK, so registered buffers are not "
                     f"charged to it ({ring_note}); the systemd service runs without CAP_IPC_LOCK and needs "
                     f"LimitMEMLOCK >= {_mib(need)}", details)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return Check("memlock", OK, f"{head}: enough for the registered buffers ({ring_note})", details)
    if not engine_may_be_uring:
        return Check("memlock", OK, f"{head}: too small for io_uring's registered buffers, but the psync "
                     "engine does not pin them", details)
    return Check("memlock", WARN, f"{head}: too small to register the buffers (they are pinned and charged "
                 f"to RLIMIT_MEMLOCK); raise it to at least {_mib(need)} (LimitMEMLOCK= in the unit, ulimit -l, "
                 f"/etc/security/limits.conf) or lower --buffer-count", details)


def _import_ring() -> tuple[Any, str | None]:
    """(Ring class or None, reason it is unavailable)."""
    try:
        from ._uring import Ring  # noqa: F401
    except ImportError as exc:
        return None, f"the io_uring extension ringblob._uring cannot be imported ({exc}); rebuild it with `make setup`"
    return Ring, None


def _ring_error(err: OSError) -> str:
    """The engine's own message (it names the failed call) plus what the errno usually means."""
    text = str(err)
    if err.errno == _errno.ENOMEM and "memlock" not in text.lower():
        text += ("; the registered buffers are pinned and charged to RLIMIT_MEMLOCK: raise LimitMEMLOCK "
                 "(ulimit -l) or use a smaller pool")
    elif err.errno in (_errno.EPERM, _errno.EACCES, _errno.ENOSYS):
        from .probe import describe_errno, io_uring_disabled_sysctl

        text += f" ({describe_errno(err.errno, io_uring_disabled_sysctl())})"
    return text


def _try_engine(kind: str, fd: int, block_size: int, buffer_size: int, buffer_count: int):
    """Create and close an engine of ``kind``; returns None on success or the exception."""
    kwargs = dict(block_size=block_size, buffer_size=buffer_size, buffer_count=buffer_count,
                  queue_depth=DEFAULT_QUEUE_DEPTH)
    try:
        if kind == "uring":
            from ._uring import Ring

            eng = Ring([fd], **kwargs)
        else:
            from .engine.psync import PsyncEngine

            eng = PsyncEngine([fd], **kwargs)
        eng.close()
    except Exception as exc:  # OSError from the kernel, ImportError, RingblobError/ValueError from bad settings
        return exc
    return None


def _check_sync(target: str, sync_method: str) -> Check:
    """Which ``sync_method`` the store will take for the device under ``target`` (the path the
    data check probed), and why: informational, never a failure."""
    try:
        from .direct import describe_write_cache, write_cache_of
        from .store.blobstore import choose_sync_method
    except ImportError as exc:
        return Check("sync", WARN, f"not checked: the store cannot be imported ({exc})", {"requested": sync_method})
    try:
        cache = write_cache_of(target)
    except OSError:
        cache = None
    chosen, why = choose_sync_method(sync_method, cache)
    details = {"requested": sync_method, "chosen": chosen, "path": target,
               "volatile_write_cache": None if cache is None else cache[0],
               "fua": None if cache is None else cache[1]}
    if sync_method != "auto":  # auto's reason already describes the device
        why += f"; the device's write cache: {describe_write_cache(cache)}"
    return Check("sync", OK, f"sync_method {sync_method} -> {chosen} ({why})", details)


def _check_hash(parallel_hash: str) -> Check:
    """What ``parallel_hash`` comes to on this host (``ringblob.digest.resolve``): informational."""
    from .digest import cgroup_cpu_limit, resolve

    pool, worker, cpus = resolve(parallel_hash)
    quota = cgroup_cpu_limit()
    details = {"requested": parallel_hash, "hash_worker": worker, "thread_pool": pool, "usable_cpus": cpus,
               "cgroup_cpu_quota": quota}
    where = f"{cpus} usable CPU{'' if cpus == 1 else 's'}" + (
        f", cgroup CPU quota {quota:g}" if quota is not None else "")
    put_side = "by the hash worker thread" if worker else "on the event loop"
    whole = "by BLAKE3's thread pool" if pool else "on the event loop"
    return Check("hash", OK, f"parallel_hash {parallel_hash}: a large PUT's buffers {put_side}, whole large "
                 f"values {whole} ({where})", details)


def diagnose(data: str = DEFAULT_DATA, engine: str = "auto", buffer_size: int = DEFAULT_BUFFER_SIZE,
             buffer_count: int = DEFAULT_BUFFER_COUNT, sync_method: str = "auto",
             parallel_hash: str = "auto") -> Report:
    """Run every check and return the :class:`Report` (never raises for a host problem).

    ``data``: the data file or block device path; ``engine``: ``auto``,
    ``uring`` or ``psync``; ``buffer_size`` (bytes) x ``buffer_count``: the
    registered buffer pool to check memlock and engine creation against;
    ``sync_method``: ``auto``, ``dsync`` or ``fdatasync`` (the ``sync`` check
    says which one the store takes on the data path's device); ``parallel_hash``:
    ``off``, ``auto`` or ``on`` (the ``hash`` check says what it comes to here).
    """
    from .probe import INSTALL_HINT, REQUIRED_OPCODES, probe

    checks: list[Check] = []
    want_uring = engine in ("auto", "uring")
    # severity of an io_uring problem for the engine asked for
    sev = FAIL if engine == "uring" else WARN if engine == "auto" else OK
    fallback = {"uring": "", "auto": "; auto will use psync", "psync": " (not needed: --engine psync)"}[engine]

    pr = probe()
    checks.append(Check("kernel", OK, f"Linux {pr.kernel}", {"release": pr.kernel}))

    if pr.liburing_path:
        checks.append(Check("liburing", OK, f"loaded {pr.liburing_path}", {"path": pr.liburing_path}))
    else:
        checks.append(Check("liburing", sev, f"liburing.so.2 is missing: {INSTALL_HINT}{fallback}", {"path": None}))

    uring_reason: str | None = None
    io_details = {"available": pr.available, "errno": pr.errno, "errno_name": _errname(pr.errno) if pr.errno else None,
                  "reason": pr.reason, "io_uring_disabled": pr.io_uring_disabled, "last_op": pr.last_op}
    sysctl = "absent (kernel < 6.6)" if pr.io_uring_disabled is None else str(pr.io_uring_disabled)
    if pr.available:
        checks.append(Check("io_uring", OK, f"a ring can be set up (kernel.io_uring_disabled={sysctl}, "
                            f"highest opcode {pr.last_op})", io_details))
    else:
        uring_reason = pr.reason or "io_uring is unavailable"
        if pr.liburing_path:
            checks.append(Check("io_uring", sev, f"unavailable: {pr.reason}{fallback}", io_details))

    missing = pr.missing_opcodes
    op_details = {"required": list(REQUIRED_OPCODES), "missing": missing,
                  "supported": {op: pr.opcodes.get(op, False) for op in REQUIRED_OPCODES}}
    if pr.available and not missing:
        checks.append(Check("opcodes", OK, "READ_FIXED, WRITE_FIXED and FSYNC are supported", op_details))
    elif pr.available:
        uring_reason = f"the kernel lacks io_uring opcodes {', '.join(missing)}; upgrade the kernel"
        checks.append(Check("opcodes", sev, f"missing {', '.join(missing)}{fallback}", op_details))
    else:
        checks.append(Check("opcodes", sev, "not probed: no ring could be set up" + fallback, op_details))

    ring, ext_reason = _import_ring()
    if ring is not None:
        import importlib

        mod = importlib.import_module("ringblob._uring")
        checks.append(Check("extension", OK, f"ringblob._uring imports ({getattr(mod, '__file__', '?')})",
                            {"importable": True, "file": getattr(mod, "__file__", None)}))
    else:
        checks.append(Check("extension", sev, f"{ext_reason}{fallback}", {"importable": False, "error": ext_reason}))
        uring_reason = uring_reason or ext_reason

    # the store's Cython extensions (key index, page allocator, journal encoders): either engine needs them
    import importlib

    missing = []
    for name in STORE_EXTENSIONS:
        try:
            importlib.import_module(f"ringblob.{name}")
        except ImportError as exc:
            missing.append(f"ringblob.{name} ({exc})")
    if missing:
        checks.append(Check("store", FAIL, f"the store's and the server's extensions cannot be imported: {'; '.join(missing)}; "
                                           "rebuild them with `make setup`",
                            {"importable": False, "missing": missing}))
    else:
        checks.append(Check("store", OK, f"the store's and the server's extensions import ({', '.join(STORE_EXTENSIONS)})",
                            {"importable": True}))

    data_probe = _check_data(data)
    try:
        checks.append(data_probe.check)
        checks.append(_check_memlock(buffer_size, buffer_count, pr.kernel, want_uring))

        # which engine, verified by creating it over the data path
        chosen: str | None
        eng_details: dict[str, Any] = {"requested": engine, "pool_bytes": buffer_size * buffer_count}
        if engine == "psync":
            chosen, why = "psync", "asked for with --engine psync"
        elif uring_reason is None:
            chosen, why = "uring", "io_uring is available and the extension imports"
        elif engine == "uring":
            chosen, why = None, uring_reason
        else:
            chosen, why = "psync", f"io_uring cannot be used: {uring_reason}"

        if chosen is None:
            checks.append(Check("engine", FAIL, f"--engine uring cannot run: {why}; fix that or use --engine psync",
                                eng_details))
        elif data_probe.fd < 0:
            eng_details["chosen"] = chosen
            checks.append(Check("engine", FAIL, f"{engine} -> {chosen} ({why}); not created: the data path is "
                                "unusable (see the data check)", eng_details))
        else:
            err = _try_engine(chosen, data_probe.fd, data_probe.block_size, buffer_size, buffer_count)
            if err is not None and chosen == "uring" and engine == "auto" and isinstance(err, OSError) \
                    and err.errno in _ENGINE_REFUSALS:
                # exactly what open_engine("auto") does: a refused ring falls back to psync
                why = f"creating the ring failed: {_ring_error(err)}"
                eng_details["uring_error"] = str(err)
                chosen = "psync"
                err = _try_engine(chosen, data_probe.fd, data_probe.block_size, buffer_size, buffer_count)
            eng_details["chosen"] = chosen
            if err is None:
                status = WARN if engine == "auto" and chosen == "psync" else OK
                checks.append(Check("engine", status, f"{engine} -> {chosen} ({why}); created it with "
                                    f"{buffer_count} x {_mib(buffer_size)} buffers over the data path and closed it",
                                    eng_details))
            else:
                eng_details["error"] = str(err)
                if isinstance(err, OSError):
                    eng_details["errno"] = err.errno
                    text = _ring_error(err) if chosen == "uring" else str(err)
                else:
                    text = f"{type(err).__name__}: {err}"
                checks.append(Check("engine", FAIL, f"{engine} -> {chosen}, but creating it failed: {text}",
                                    eng_details))
                chosen = None
    finally:
        data_probe.close()
    checks.append(_check_sync(data_probe.where or data, sync_method))
    checks.append(_check_hash(parallel_hash))

    return Report(version=__version__, engine_requested=engine, engine=chosen, data=data,
                  buffer_size=buffer_size, buffer_count=buffer_count, checks=checks,
                  kernel=pr.kernel, probe=pr.to_dict())


def format_report(report: Report) -> str:
    """The human form: one ``STATUS name: message`` line per check, then a summary line."""
    lines = [f"{c.status:<4} {c.name:<9} {c.message}" for c in report.checks]
    if report.ok:
        lines.append(f"ringblob doctor: OK, engine {report.engine_requested} -> {report.engine}")
    else:
        failed = ", ".join(c.name for c in report.checks if c.status == FAIL)
        lines.append(f"ringblob doctor: FAIL ({failed}); ringblob cannot run with these settings")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the checks for ``args`` (see :func:`add_arguments`); returns 0 when all pass, else 1."""
    report = diagnose(**settings_from_args(args))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0 if report.ok else 1
