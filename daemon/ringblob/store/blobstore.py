"""BlobStore: keys to copy-on-write extents on one O_DIRECT file, with a CRC32C journal.

See :class:`BlobStore` for the API and docs/FORMAT.md for the on-disk format.
"""

from __future__ import annotations

import asyncio
import collections
import errno as _errno
import fcntl
import functools
import logging
import os
import random
import stat as _stat
import time
from typing import Any, AsyncIterator, Iterable, Sequence

import blake3

from .. import systemd as _systemd
from .. import digest as _digest
from ..direct import open_direct, write_cache_of
from ..engine import DEFAULT_BUFFER_COUNT, DEFAULT_BUFFER_SIZE, DEFAULT_QUEUE_DEPTH, open_engine
from ..engine.aio import WRITE, AsyncEngine
from ..errors import (
    ConfigError,
    Corrupt,
    DigestMismatch,
    EngineClosed,
    InvalidKey,
    IOFailed,
    NoSpace,
    NotFound,
    ReadOnly,
    RingblobError,
    StoreLocked,
    TooLarge,
    values_or_raise,
)
from . import format as F
from .alloc import Allocator
from .index import Index
from .leased import LeasedValue

try:
    from .._storeget import GetPath
    from .._storeput import Item as _Item
    from .._storeput import PutPath
    from .._storeput import settle as _settle
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled request paths (ringblob._storeget, ringblob._storeput) do not import ({exc}); "
        "build the extensions with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = ["BlobStore", "DEFAULT_MAX_BLOB_SIZE", "LeasedValue"]

log = logging.getLogger("ringblob.store")

DEFAULT_MAX_BLOB_SIZE = 64 * 1024 * 1024
#: how a round of sync requests is made durable (``sync_method``; the class docstring explains)
SYNC_METHODS = ("auto", "dsync", "fdatasync")


def choose_sync_method(method: str, write_cache: tuple[bool, bool] | None) -> tuple[str, str]:
    """Resolve ``sync_method`` for a device: returns ``(method, reason)``, ``method`` one of
    ``"dsync"`` / ``"fdatasync"`` and ``reason`` a phrase for the log.

    ``write_cache``: ``(volatile, fua)`` from :func:`ringblob.direct.write_cache_of`, or None
    when unknown. ``"auto"`` takes ``"dsync"`` where a RWF_DSYNC write needs no cache flush — the
    device takes FUA writes, or has no volatile write cache — and ``"fdatasync"`` otherwise: on a
    volatile cache without FUA every RWF_DSYNC write is followed by a flush of its own, two per
    round instead of the fdatasync's one (on the bench VM's virtio disk that cost ~13 % of the
    sync puts at 32 concurrent). ``"dsync"`` and ``"fdatasync"`` are taken as given. Raises
    :class:`ConfigError` for any other name.
    """
    if method not in SYNC_METHODS:
        raise ConfigError(f"sync_method {method!r}: choose one of {', '.join(SYNC_METHODS)}")
    if method != "auto":
        return method, "as configured"
    if write_cache is None:
        return "fdatasync", "auto: the device's write cache is unknown"
    volatile, fua = write_cache
    if fua:
        return "dsync", "auto: the device takes FUA writes, so a RWF_DSYNC write needs no cache flush"
    if not volatile:
        return "dsync", "auto: the device has no volatile write cache, so a RWF_DSYNC write needs no cache flush"
    return "fdatasync", ("auto: volatile write cache without FUA, where each RWF_DSYNC write would "
                         "need a cache flush of its own")
DEFAULT_BATCH_MAX = 64 * 1024
CKPT_CHUNK_BYTES = 4 * 1024 * 1024
_EMPTY_DIGEST = blake3.blake3(b"").digest()
_PUT, _DELETE = 1, 2
_FSYNC_OP = ("fdatasync",)
# while zero-filling, ask systemd (Type=notify; a no-op elsewhere) for this many more seconds
# of start timeout every _EXTEND_EVERY seconds, so a large new data file can be formatted
_EXTEND_EVERY, _EXTEND_BY = 5.0, 60.0


def _write_error(ops: list, results: list) -> OSError | None:
    """The first failure among the results of ``ops`` (an ``OSError``, or ``OSError(EIO)`` for a
    short write), or None when every write transferred all its bytes."""
    for op, r in zip(ops, results):
        if isinstance(r, BaseException):
            return r
        if op[0] == WRITE and r != op[3]:
            return OSError(_errno.EIO, f"write_fixed: short write of {r} of {op[3]} bytes at offset {op[2]}")
    return None


def _holder_pid(fd: int) -> str:
    """The pid holding a flock on ``fd``'s file, from /proc/locks ('unknown' if not found)."""
    try:
        st = os.fstat(fd)
        dev = st.st_rdev if _stat.S_ISBLK(st.st_mode) else st.st_dev
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or "FLOCK" not in parts:
                    continue
                i = parts.index("FLOCK")
                if len(parts) < i + 5:
                    continue
                pid, ident = parts[i + 3], parts[i + 4]
                try:
                    maj, mnr, ino = ident.split(":")
                    if (int(maj, 16), int(mnr, 16), int(ino)) == want:
                        return pid
                except ValueError:
                    continue
        del dev
    except OSError:
        pass
    return "unknown"


def _check_key(key) -> bytes:
    if not isinstance(key, bytes):
        if isinstance(key, (bytearray, memoryview)):
            key = bytes(key)
        else:
            raise InvalidKey(f"key must be bytes of 1 to 255 bytes, not {type(key).__name__}")
    if not 1 <= len(key) <= 255:
        raise InvalidKey(f"key must be 1 to 255 bytes long, got {len(key)} bytes")
    return key


def _as_view(value) -> memoryview:
    try:
        mv = memoryview(value)
    except TypeError:
        raise TypeError(f"value must be bytes-like, not {type(value).__name__}") from None
    if not mv.c_contiguous:
        # a strided view (memoryview(b)[::2]): BLAKE3 and the copy into fixed buffers take
        # contiguous bytes
        mv = memoryview(mv.tobytes())
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if not mv.readonly:
        # a writable buffer (bytearray, ...) could change while the put is in flight; the
        # digest and the bytes written must be of one snapshot
        mv = memoryview(bytes(mv))
    return mv


class BlobStore:
    """An embedded blob store over one data file or block device (asyncio).

    Open with ``await BlobStore.create(...)`` (format) or ``await
    BlobStore.open(...)`` (recover and open); ``await store.close()`` flushes
    and writes a checkpoint. All methods run on the loop that opened the store.
    The daemon awaits them from coroutines it steps without a Task
    (``server._Connection._start``): they must not need
    ``asyncio.current_task()`` (no ``asyncio.timeout()``, no ``TaskGroup``).

    API (keys: bytes of 1..255 bytes, else :class:`InvalidKey`; values:
    bytes-like of 0..``max_blob_size`` bytes, else :class:`TooLarge`):

    * ``await put(key, value, *, sync=False, verify=False)``; ``verify=True``
      requires ``key == blake3(value).digest()`` else :class:`DigestMismatch`
      (nothing stored). ``await put_cas(value, *, sync=False) -> digest``.
    * ``lease_value(length) -> LeasedValue | None`` and ``await
      put_leased(key, leased, *, sync=False, verify=False)``: a value larger
      than one fixed buffer received straight into leased fixed buffers
      (the daemon's large PUTs) and written from there, without a copy.
    * ``await put_many([(key, value), ...], *, sync=False)``: with
      ``sync=True`` this is write_blobs_with_data_sync (the data writes and the
      journal write in one ring turn where they fit a batch, then one
      fdatasync once all of them completed).
    * ``await get(key) -> bytes`` (:class:`NotFound`, :class:`Corrupt` when
      the bytes fail their BLAKE3 digest — they are never returned);
      ``await get_many(keys) -> list[bytes | None]`` (None where missing);
      ``await get_each(keys) -> list`` (each key's value or its own error: the
      daemon's MGET), their reads started like ``get_nowait``'s.
    * ``has(key) -> bool`` (no read); ``await delete(key, *, sync=False)``
      (missing keys are fine); ``list(prefix=b"", start_after=None,
      limit=None)``: an async iterator of keys in ascending order.
    * ``await flush()``; ``needs_flush`` (property); ``stat() -> dict``;
      ``await scrub() -> {"checked", "bytes_checked", "bad_keys", "unreadable_keys"}``;
      ``await checkpoint()``; ``read_only`` / ``closed`` (properties);
      ``await close()``; ``await abandon()`` (drop it as a crash would: no
      flush, no checkpoint — for tests and tools).

    Durability: ``sync=True`` returns once data and journal record are durable;
    concurrent sync requests share one group-commit round: its writes, then
    one fdatasync — or, with ``sync_method="dsync"``, writes queued with
    RWF_DSYNC and no fdatasync, wherever nothing written before the round
    still needs one (see ``sync_method`` below).
    ``sync=False`` returns once written; durable at the next flush
    (``needs_flush`` is True until then). Errors of a failed write or
    fdatasync: the requests in the failed commit raise :class:`IOFailed`
    (``errno`` set, the ``OSError`` chained), the store turns read-only (later
    writes raise :class:`ReadOnly`), reads go on; reopening recovers from the
    medium.

    Options of ``open``/``create``: ``engine`` (``"auto"``, ``"uring"``,
    ``"psync"``), ``max_blob_size`` (bytes), ``buffer_size`` /
    ``buffer_count`` / ``queue_depth`` (engine), ``checkpoint_threshold``
    (journal bytes since the last checkpoint that trigger one; default a
    quarter of the journal), ``read_only``, ``wrap_engine`` (a callable
    taking the engine and returning an engine with the same contract — for
    fault injection, see :mod:`ringblob.engine.faulty`), ``observer``,
    ``zero_fill`` (default True: when formatting a regular file, write zeros
    over all of it first, so later writes never land in unwritten extents —
    about 0.5 s per GiB at 2 GB/s; block devices are never zero-filled),
    ``receive_buffers`` (fixed buffers that values being received through
    :meth:`lease_value` may hold at once, until written; default half of
    ``buffer_count``, 0 turns it off), ``stream_writes`` (default True: such a
    value's extent is allocated when its buffers are leased and each buffer is
    written as soon as it is full; False: written once complete, see
    :meth:`lease_value`), ``sync_method`` (``"auto"``, the
    default, ``"dsync"`` or ``"fdatasync"``): how a round of sync requests is
    made durable. ``"fdatasync"``: the round's data and journal writes, then one
    fdatasync issued once they completed (two waits per round, the fdatasync
    on an io-wq worker). ``"dsync"``: the same writes each carry RWF_DSYNC
    (per-write O_DSYNC: a FUA write where the device takes it, else a cache
    flush the kernel issues after the write), so the round is durable when
    its writes complete — one wait, no fdatasync. The store takes that path
    only when it gives the same promise: every record before the round is
    durable or in a sync round in flight (after a ``sync=False`` round the
    next sync round ends with an fdatasync), and no value of the round was
    written ahead of it (large values, e.g. received into leased buffers);
    otherwise the round ends with an fdatasync as with ``"fdatasync"``.
    ``"auto"`` takes ``"dsync"`` where the device needs no cache flush for a
    RWF_DSYNC write (FUA, or no volatile write cache) and ``"fdatasync"``
    elsewhere (:func:`choose_sync_method`); the ``sync_method`` attribute
    and ``stat()`` give the method taken, the log says why.

    ``observer``: an object whose optional methods are called (exceptions
    are logged and ignored): ``on_fdatasync(seconds: float)``,
    ``on_group_commit(batch_size: int)`` (sync requests served by one
    round: one fdatasync, or its RWF_DSYNC writes), ``on_flush_skipped()``,
    ``on_checksum_failure(key: bytes)``, ``on_read_only(reason: str)``,
    ``on_checkpoint(seconds: float)``.
    """

    # -- opening ------------------------------------------------------------------

    def __init__(self, _token=None):
        if _token is not _OPEN_TOKEN:
            raise TypeError("use `await BlobStore.open(path)` or `await BlobStore.create(path, size)`")

    @classmethod
    async def create(cls, path: str, size_bytes: int | None = None, page_size: int = 4096, *,
                     journal_size: int | None = None, force: bool = False, **options: Any) -> "BlobStore":
        """Format ``path`` (a file, created and fallocated to ``size_bytes``, or a block device) and open it.

        ``page_size`` (bytes, power of two, >= the logical block size) and
        ``journal_size`` (bytes; default 1/32 of the file, 1 MiB..256 MiB) are
        fixed at format time. Refuses (:class:`ConfigError`) a file that
        already holds a ringblob store unless ``force=True``. With
        ``zero_fill=True`` (the default) a regular file is written with zeros
        in full before the superblocks (see the class docstring).
        """
        return await cls._open(path, fmt=dict(size=size_bytes, page_size=page_size, journal_size=journal_size,
                                              force=force, only_if_blank=False), **options)

    @classmethod
    async def open(cls, path: str, engine: str = "auto", *, create_size: int | None = None,
                   page_size: int = 4096, journal_size: int | None = None, **options: Any) -> "BlobStore":
        """Recover and open the store at ``path``.

        ``create_size`` (bytes): format the file first when it is absent or
        empty (or was fallocated but never got a superblock). Raises
        ``FileNotFoundError``, :class:`StoreLocked`, :class:`Corrupt` (no valid
        superblock or checkpoint), :class:`ConfigError`.
        """
        fmt = None
        if create_size is not None:
            fmt = dict(size=create_size, page_size=page_size, journal_size=journal_size, force=False,
                       only_if_blank=True)
        return await cls._open(path, fmt=fmt, engine=engine, **options)

    @classmethod
    async def _open(cls, path: str, *, fmt: dict | None = None, engine: str = "auto",
                    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE, buffer_size: int = DEFAULT_BUFFER_SIZE,
                    buffer_count: int = DEFAULT_BUFFER_COUNT, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                    checkpoint_threshold: int | None = None, read_only: bool = False,
                    wrap_engine=None, observer=None, zero_fill: bool = True,
                    receive_buffers: int | None = None, sync_method: str = "auto",
                    stream_writes: bool = True) -> "BlobStore":
        self = cls(_OPEN_TOKEN)
        self.path = path
        self._zero_fill_on_format = bool(zero_fill)
        self.stream_writes = bool(stream_writes)
        choose_sync_method(sync_method, None)  # a bad name fails here, before anything is opened
        self.sync_method = sync_method  # resolved once the file is open
        self.max_blob_size = int(max_blob_size)
        if not 0 < self.max_blob_size < 1 << 32:
            raise ConfigError(f"max_blob_size {max_blob_size} must be between 1 byte and 4 GiB")
        if buffer_count < 3:
            raise ConfigError(f"buffer_count {buffer_count}: the store needs at least 3 fixed buffers")
        if queue_depth < 4:
            raise ConfigError(f"queue_depth {queue_depth}: the store needs at least 4 (data write, journal "
                              "write, fdatasync and a read)")
        if receive_buffers is not None and receive_buffers < 0:
            raise ConfigError(f"receive_buffers {receive_buffers}: must be >= 0 (0 turns lease_value off)")
        # fixed buffers that values being received (lease_value) may hold at once, until written:
        # half the pool (with a quarter, many 1 MiB PUTs at concurrency 8 took the copying path)
        self._recv_cap = buffer_count // 2 if receive_buffers is None else int(receive_buffers)
        self._recv_held = 0
        self._observer = observer
        self._opened_read_only = bool(read_only)
        self._read_only: str | None = None
        self._closed = False
        if fmt is not None and read_only:
            raise ConfigError("cannot format a store opened read_only")
        existed_blank = fmt is not None and (not os.path.exists(path) or os.path.getsize(path) == 0)
        create_size = fmt["size"] if fmt is not None else None
        self._df = open_direct(path, create_size=create_size, read_only=read_only)
        try:
            self.sync_method, why = choose_sync_method(sync_method, write_cache_of(path))
            log.info("store: %s: sync_method %s (%s)", path, self.sync_method, why)
            await self._lock(path, read_only)
            eng = open_engine(engine, [self._df.fd], block_size=self._df.block_size, buffer_size=buffer_size,
                              buffer_count=buffer_count, queue_depth=queue_depth)
            if wrap_engine is not None:
                eng = wrap_engine(eng)
            self._aio = AsyncEngine(eng)
        except BaseException:
            self._unlock_and_close()
            raise
        try:
            if fmt is not None:
                await self._maybe_format(fmt, existed_blank)
            await self._recover(checkpoint_threshold)
        except BaseException as exc:
            self._aio.close()
            self._unlock_and_close()
            if isinstance(exc, OSError):
                raise IOFailed(f"{path}: opening the store failed on an I/O error: {exc}; nothing was changed",
                               exc.errno) from exc
            raise
        self._committer_task = asyncio.get_running_loop().create_task(self._committer())
        if not read_only and self._disk_durable < self._durable_seq:
            # Replay took records past the durable point recorded on disk and freed the extents
            # they replaced. Record the new durable point (an empty batch + fdatasync) before any
            # put can reuse those extents, or a crash before the next durable batch would make
            # recovery verify the replaced records against reused pages and end the journal early.
            self._want_marker = True
            fut = asyncio.get_running_loop().create_future()
            self._flush_waiters.append(fut)
            self._kick()
            try:
                await fut
            except BaseException:
                await self.abandon()
                raise
        return self

    async def _lock(self, path: str, read_only: bool, wait_dead: float = 5.0) -> None:
        """flock the data file; StoreLocked names the holder's pid.

        A holder that has died (SIGKILL) can keep the lock for a moment: the
        kernel drops an io_uring ring's registered-file references
        asynchronously, so a lock whose holder pid is gone is retried for up
        to ``wait_dead`` seconds.
        """
        deadline = time.monotonic() + wait_dead
        while True:
            try:
                fcntl.flock(self._df.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pid = _holder_pid(self._df.fd)
                alive = pid.isdigit() and int(pid) > 0  # -1/unknown: an orphaned lock (holder died)
                if alive:
                    try:
                        os.kill(int(pid), 0)
                    except ProcessLookupError:
                        alive = False
                    except PermissionError:
                        pass
                if alive or time.monotonic() > deadline:
                    raise StoreLocked(
                        f"{path}: the data file is locked by another process (pid {pid}); "
                        "stop that ringblob (or store user) first, or open another data file"
                    ) from None
                await asyncio.sleep(0.02)

    # -- format -----------------------------------------------------------------

    async def _read_slots(self, page_size: int) -> list:
        raw = await self._aio.read(0, 2 * page_size)
        return [raw[:page_size], raw[page_size:]]

    async def _maybe_format(self, fmt: dict, existed_blank: bool) -> None:
        P = fmt["page_size"]
        if P < 512 or P & (P - 1) or P % self._df.block_size:
            raise ConfigError(f"page_size {P} must be a power of two >= 512 and a multiple of the logical "
                              f"block size {self._df.block_size}")
        if self._df.size >= 2 * P:
            slots = await self._read_slots(P)
            formatted = any(F.Superblock.decode(s) for s in slots)
            if fmt["only_if_blank"]:
                if formatted or (not existed_blank and any(any(s) for s in slots)):
                    return  # open the existing store (or let recovery name the damage)
            elif formatted and not fmt["force"]:
                raise ConfigError(f"{self.path} already holds a ringblob store; open it, or pass force=True "
                                  "to create() to erase it")
        size = self._df.size
        if fmt["size"] is not None and not self._df.is_block_device and size < fmt["size"]:
            raise ConfigError(f"{self.path}: file is {size} bytes, smaller than the requested {fmt['size']}")
        total = size // P
        jb = fmt["journal_size"]
        if jb is None:
            jb = min(max(size // 32, 1 << 20), 256 << 20)
        batch_max = max(DEFAULT_BATCH_MAX, P)
        jpages = max(jb // P, 4 * batch_max // P)
        data_page = 2 + jpages
        if total < data_page + 8:
            raise ConfigError(f"{self.path}: {size} bytes is too small for a store with a {jpages * P}-byte "
                              "journal; give at least a few MiB or a smaller journal_size")
        if self._zero_fill_on_format and not self._df.is_block_device:
            # before the superblocks: a crash in between leaves a blank file that the next
            # open(create_size=...) formats again
            await self._zero_fill(0, total * P)
        sid = random.getrandbits(63) | 1
        now = time.time_ns()
        for gen in (0, 1):
            sb = F.Superblock(store_id=sid, generation=gen, page_size=P, batch_max=batch_max, total_pages=total,
                              journal_page=2, journal_pages=jpages, data_page=data_page, created_ns=now)
            await self._aio.write_chunks(gen * P, sb.encode(P))
        # the first journal block: zeroed so no stale batch can follow a fresh format
        await self._aio.write_chunks(2 * P, bytes(min(batch_max, jpages * P)), sync=True)
        log.info("store: formatted %s: %d pages of %d bytes, journal %d bytes, store id %x",
                 self.path, total, P, jpages * P, sid)

    async def _zero_fill(self, start: int, end: int) -> None:
        """Write zeros over bytes ``[start, end)`` of the data file (block-aligned), with O_DIRECT.

        A fallocated file is *unwritten* extents: ext4 must convert an extent
        on its first write, so io_uring cannot issue such a write inline (it
        goes to an io-wq worker) and the next fdatasync must also commit the
        file system's metadata. Writing the area once at format time turns
        every later write into a plain overwrite. One fixed buffer of zeros
        serves every write (writes only read it); two workers keep up to
        ``queue_depth - 2`` writes of ``buffer_size`` bytes in flight. Logs
        the time taken. Under systemd (``NOTIFY_SOCKET``) it sends
        ``EXTEND_TIMEOUT_USEC`` every 5 s so the start timeout does not fire.
        Raises ``OSError`` for a failed or short write.
        """
        aio = self._aio
        bsz = aio.buffer_size
        per = max(1, min(16, (aio.queue_depth - 2) // 2))  # writes per ring turn, per worker
        step = bsz * per
        t0 = time.perf_counter()
        (buf,) = await aio.lease(1)
        failed: list[BaseException] = []
        next_extend = time.monotonic() + _EXTEND_EVERY
        try:
            buf.view[:] = bytes(bsz)
            batches = range(start, end, step)

            async def worker(k: int) -> None:
                nonlocal next_extend
                for i in range(k, len(batches), 2):
                    if failed:
                        return
                    if time.monotonic() >= next_extend:
                        next_extend = time.monotonic() + _EXTEND_EVERY
                        _systemd.extend_timeout(_EXTEND_BY)
                    off = batches[i]
                    ops = [(WRITE, buf, o, min(bsz, end - o), 0) for o in range(off, min(off + step, end), bsz)]
                    err = _write_error(ops, await aio.run(ops))
                    if err is not None:
                        failed.append(err)
                        return

            res = await asyncio.gather(worker(0), worker(1), return_exceptions=True)
            failed.extend(r for r in res if isinstance(r, BaseException))
            if failed:
                raise failed[0]
        finally:
            aio.release(buf)
        dt = time.perf_counter() - t0
        log.info("store: zero-filled %s: %d MiB in %.2f s (%.0f MiB/s); later writes overwrite written extents",
                 self.path, (end - start) >> 20, dt, (end - start) / (1 << 20) / max(dt, 1e-9))

    # -- recovery ---------------------------------------------------------------

    async def _recover(self, checkpoint_threshold: int | None) -> None:
        t0 = time.perf_counter()
        blk = self._df.block_size
        # slots are one page each; read with the smallest page size and retry with the real one
        raw0 = await self._aio.read(0, max(4096, blk))
        first = F.Superblock.decode(raw0)
        P = first.page_size if first else 4096
        slots = await self._read_slots(P)
        sbs = [F.Superblock.decode(s) for s in slots]
        if first is None and sbs[0] is None and sbs[1] is None:
            # maybe a page size other than 4096: try the second slot at other sizes
            for P2 in (512, 1024, 2048, 8192, 16384, 32768, 65536):
                try:
                    s = await self._read_slots(P2)
                except OSError:
                    continue
                cand = F.Superblock.decode(s[1])
                if cand and cand.page_size == P2:
                    P, sbs = P2, [None, cand]
                    break
        valid = [s for s in sbs if s is not None and s.page_size == P]
        if not valid:
            raise Corrupt(f"{self.path}: no valid superblock in either slot (not a ringblob store, or both "
                          "slots are damaged); create a new store or restore from a backup")
        valid.sort(key=lambda s: s.generation, reverse=True)
        if len(valid) == 2 and valid[0].store_id != valid[1].store_id:
            valid = valid[:1]
        if len(sbs) == 2 and (sbs[0] is None or sbs[1] is None):
            log.warning("store: %s: superblock slot %d is damaged; using the other slot", self.path,
                        0 if sbs[0] is None else 1)
        self.page_size = P
        if P % blk:
            raise ConfigError(f"{self.path}: page size {P} is not a multiple of the logical block size {blk}")
        chosen = None
        entries = None
        failures: list[tuple[int, RingblobError]] = []  # (generation, why its checkpoint was not loaded)
        for sb in valid:
            try:
                entries, nentries, ck_ext = await self._load_checkpoint(sb)
                chosen = sb
                break
            except (Corrupt, IOFailed) as exc:
                failures.append((sb.generation, exc))
                log.warning("store: %s: checkpoint of superblock generation %d is unreadable (%s); "
                            "trying the other slot", self.path, sb.generation, exc)
        if chosen is None:
            raise self._no_checkpoint(failures)
        older = [s for s in valid if s.generation < chosen.generation]
        older_sb = older[0] if older else None
        self._sb = chosen
        self._older_sb = older_sb
        self._store_id = chosen.store_id
        self._jbytes = chosen.journal_pages * P
        self._joff = chosen.journal_page * P
        self._batch_max = chosen.batch_max
        self._batch_cap = min(chosen.batch_max, self._aio.buffer_size)
        self._data_page = chosen.data_page
        self._total_pages = chosen.total_pages
        self._ckpt_extents = ck_ext
        self._prev_ckpt_extents: list[tuple[int, int]] = []
        if older_sb is not None and older_sb.ckpt_page:
            try:
                self._prev_ckpt_extents = await self._walk_chunks(older_sb)
            except (Corrupt, IOFailed) as exc:  # the older slot is no fallback then: nothing to keep
                log.warning("store: %s: the older checkpoint (superblock generation %d) is unreadable (%s); "
                            "its pages are not kept", self.path, older_sb.generation, exc)
                self._prev_ckpt_extents = []
        index = Index()
        try:
            used = index.load_entries(entries, nentries, P)
        except (ValueError, IndexError) as exc:
            raise Corrupt(f"{self.path}: the checkpoint's index entries are malformed ({exc})") from exc
        del entries
        self._index = index
        # replay the journal
        recs, end_pos, chain, max_durable, stop, batches, next_seq = await self._read_journal(chosen)
        bad = await self._verify_tail(recs, max(max_durable, chosen.ckpt_seq))
        dropped = 0
        if bad is not None:
            # A record past the last durable point whose data never reached the medium: the
            # journal ends before its batch (everything after it was never durable either).
            for first, nrec, bpos, bprev, _d in batches:
                if first <= bad < first + nrec:
                    break
            keep = [b for b in batches if b[0] < first]
            dropped = sum(1 for r in recs if r[1] >= first)
            recs = [r for r in recs if r[1] < first]
            end_pos, chain, next_seq, batches = bpos, bprev, first, keep
            stop = (f"record {bad} at journal position {bpos} references data that did not reach the medium "
                    f"(BLAKE3 mismatch); dropped {dropped} record(s) from there on")
            if not self._opened_read_only:
                log.warning("store: %s: %s", self.path, stop)
        applied = 0
        for r in recs:
            t, key = r[0], r[2]
            if t == F.REC_PUT:
                index.set(key, r[3], r[4], r[5])
            elif t == F.REC_DELETE:
                index.remove(key)
            applied += 1
        if recs:
            used = index.extents(P)  # the replay changed extents: gather them again
        self._head = end_pos
        self._chain = chain
        self._next_seq = next_seq
        self._written_seq = self._next_seq - 1
        self._durable_seq = self._written_seq
        # the last record written by a round that left it to a later fdatasync (sync=False only):
        # a round above it cannot be made durable by its own RWF_DSYNC writes alone
        self._nosync_seq = -1
        # the highest durable point written in a durable place: frees wait for it (see _process_frees)
        self._last_batch_d = max([b[4] for b in batches] + [chosen.ckpt_seq])
        self._disk_durable = self._last_batch_d
        self._want_marker = False
        self._ckpt_pos = chosen.replay_pos
        self._tail_pos = older_sb.replay_pos if older_sb is not None else chosen.replay_pos
        self._checkpoints = chosen.checkpoints
        self._ckpt_marker = None
        self._last_batch_pos, self._last_batch_len = end_pos, 0
        # allocator from the index and both checkpoints
        used.extend(p << 32 | n for p, n in self._ckpt_extents + self._prev_ckpt_extents)
        try:
            self._alloc = Allocator.from_used_packed(self._data_page, self._total_pages - self._data_page, used)
        except ValueError as exc:
            raise Corrupt(f"{self.path}: the index maps overlapping extents ({exc}); run scrub on a copy "
                          "or restore from a backup") from exc
        del used
        self._pending_free: collections.deque = collections.deque()  # (seq, page, npages), seq order
        self._pins: dict[int, int] = {}
        self._free_on_unpin: dict[int, int] = {}
        self._queue: list[_Item] = []
        self._flush_waiters: list[asyncio.Future] = []
        self._ckpt_waiters: list[asyncio.Future] = []
        self._wake: asyncio.Future | None = None
        self._stopping = False
        # finish tasks of rounds whose writes completed and whose fdatasync/acknowledgement is
        # pending, oldest first (at most two: see _commit_round)
        self._finishers: collections.deque = collections.deque()
        self._ckpt_retry_free = 0
        self._threshold = int(checkpoint_threshold) if checkpoint_threshold else max(self._jbytes // 4, P)
        if self._threshold > self._jbytes // 3:
            # two checkpoint intervals must fit the journal (the older slot's tail is kept)
            log.warning("store: %s: checkpoint_threshold %d exceeds a third of the %d-byte journal; using %d",
                        self.path, self._threshold, self._jbytes, self._jbytes // 3)
            self._threshold = max(self._jbytes // 3, P)
        self._counters = dict.fromkeys(
            ("puts", "gets", "deletes", "fdatasyncs", "group_commits", "group_commit_writes", "flushes",
             "flushes_skipped", "checksum_failures", "bytes_read", "bytes_written", "journal_batches",
             "journal_bytes_written", "recovered_records", "recovery_dropped_records", "values_leased",
             "values_streamed", "lease_value_refused", "dsync_commits"), 0)
        self._counters["recovered_records"] = applied
        self._counters["recovery_dropped_records"] = dropped
        # the GET request path in C (get_nowait); it shares the index, pins and counters above
        self._getpath = GetPath(self, self._index, self._aio.read_nowait, self._pins, self._free_on_unpin,
                                self._alloc.free, self._counters, P, _check_key)
        self.get_nowait = self._getpath.get_nowait  # the server calls it with no Python frame between
        # the PUT request path and the group commit's per-item loops in C; they share the queue,
        # pending frees, pins, counters, index and allocator above (never replaced)
        self._putpath = PutPath(self, P, self._aio.block_size, self._aio.buffer_size, self.max_blob_size,
                                F.ENTRY.size, F.CHUNK_HEADER_SIZE, _check_key, _as_view)
        self.put_nowait = self._putpath.put_nowait
        self.put_leased_nowait = self._putpath.put_leased_nowait
        if recs and recs[-1][1] > max_durable and not self._opened_read_only:
            await self._aio.fdatasync()  # the verified tail is durable from here on
            self._counters["fdatasyncs"] += 1
        self.recovery_seconds = time.perf_counter() - t0
        log.info("store: opened %s (engine %s): %d blobs, replayed %d journal records in %.3f s%s",
                 self.path, self._aio.name, len(index), applied, self.recovery_seconds,
                 f"; journal ends: {stop}" if stop else "")

    def _no_checkpoint(self, failures: list[tuple[int, RingblobError]]) -> RingblobError:
        """The error for an open where no superblock slot's checkpoint could be loaded.

        ``failures``: ``(superblock generation, error)`` per slot tried, newest first. When any
        slot failed on a read error (:class:`IOFailed`) the checkpoint may be intact on a
        medium that is failing or was briefly unavailable, so the answer is :class:`IOFailed`
        (with the first read error's errno) and the advice is to look at the device, not to
        restore: only when every slot's checkpoint was read and found damaged is it
        :class:`Corrupt`."""
        said = "; ".join(f"generation {gen}: {exc}" for gen, exc in failures)
        io = [exc for _gen, exc in failures if isinstance(exc, IOFailed)]
        if io:
            return IOFailed(f"{self.path}: no superblock slot's checkpoint could be loaded, and reading it failed "
                            f"with an I/O error ({said}). The data may be intact: check the device (dmesg, SMART) "
                            "and open the store again, or copy the file off the failing device first; nothing was "
                            "changed", io[0].errno)
        return Corrupt(f"{self.path}: no superblock slot has a readable checkpoint ({said}); restore from a backup")

    async def _read_chunk(self, offset: int, length: int, what: str) -> bytes:
        """Read ``length`` bytes of a checkpoint chunk at byte ``offset``; a read error is
        :class:`IOFailed` naming ``what`` (not :class:`Corrupt`: the bytes were never seen)."""
        try:
            return await self._aio.read(offset, length)
        except OSError as exc:
            raise IOFailed(f"{what} cannot be read: {exc}", exc.errno) from exc

    async def _walk_chunks(self, sb: F.Superblock) -> list[tuple[int, int]]:
        """Extents of a checkpoint's chunks, reading only each chunk's first page.

        Raises :class:`Corrupt` for a broken chain, :class:`IOFailed` for a read error."""
        out = []
        page, n = sb.ckpt_page, sb.ckpt_npages
        P = self.page_size
        seen = 0
        while page:
            if page < sb.data_page or page + n > sb.total_pages or seen > 1 << 20:
                raise Corrupt("checkpoint chunk chain leaves the data area")
            h = F.decode_chunk_header(await self._read_chunk(page * P, P, f"checkpoint chunk at page {page}"))
            if h is None or h.store_id != sb.store_id or h.ckpt_seq != sb.ckpt_seq:
                raise Corrupt(f"checkpoint chunk at page {page} has a bad header")
            out.append((page, n))
            page, n = h.next_page, h.next_npages
            seen += 1
        return out

    async def _load_checkpoint(self, sb: F.Superblock):
        """Read a checkpoint chain; returns ``(entry bytes, entry count, chunk extents)``.

        Raises :class:`Corrupt` when a chunk fails its checks, :class:`IOFailed` when one
        cannot be read."""
        parts = []
        count = 0
        extents = []
        page, n = sb.ckpt_page, sb.ckpt_npages
        P = self.page_size
        chunk_no = 0
        while page:
            if page < sb.data_page or page + n > sb.total_pages or n <= 0:
                raise Corrupt(f"checkpoint chunk {chunk_no} at page {page} (+{n}) lies outside the data area")
            buf = await self._read_chunk(page * P, n * P, f"checkpoint chunk {chunk_no} at page {page}")
            h = F.decode_chunk_header(buf)
            if (h is None or h.store_id != sb.store_id or h.ckpt_seq != sb.ckpt_seq or h.chunk_no != chunk_no
                    or not F.chunk_crc_ok(buf, h)):
                raise Corrupt(f"checkpoint chunk {chunk_no} at page {page} fails its CRC32C or header check")
            parts.append(memoryview(buf)[F.CHUNK_HEADER_SIZE : F.CHUNK_HEADER_SIZE + h.payload_len])
            count += h.nentries
            extents.append((page, n))
            page, n = h.next_page, h.next_npages
            chunk_no += 1
        if count != sb.ckpt_blobs:
            raise Corrupt(f"checkpoint holds {count} blobs, the superblock says {sb.ckpt_blobs}")
        data = b"".join(parts)
        for m in parts:
            m.release()
        return data, count, extents

    async def _read_journal(self, sb: F.Superblock):
        """Parse batches from ``sb.replay_pos``; returns (records, end_pos, chain_crc, max_durable, why_stopped)."""
        J, B, joff = self._jbytes, self.page_size, self._joff
        window = 1 << 20
        cache_start, cache = -1, b""

        async def read(phys: int, n: int) -> bytes:
            nonlocal cache_start, cache
            if cache_start <= phys and phys + n <= cache_start + len(cache):
                return cache[phys - cache_start : phys - cache_start + n]
            ln = max(n, min(window, J - phys))
            cache = await self._aio.read(joff + phys, ln)
            cache_start = phys
            return cache[:n]

        pos = sb.replay_pos
        expect = sb.next_seq
        prev = sb.chain_crc
        recs: list[tuple] = []
        batches: list[tuple[int, int, int, int, int]] = []  # (first_seq, nrec, pos, prev_crc, durable_seq)
        max_durable = 0
        stop = None
        while pos - sb.replay_pos < J:
            phys = pos % J
            if J - phys < self._batch_max:
                pos += J - phys
                continue
            raw = await read(phys, B)
            h = F.decode_batch_header(raw)
            if h is None:
                if raw[:4] == F.BATCH_MAGIC:
                    stop = f"torn batch header at journal position {pos} (CRC32C mismatch)"
                    log.warning("store: %s: dropped the torn journal tail: %s", self.path, stop)
                elif any(raw):
                    stop = f"no batch at journal position {pos} (stale or garbage bytes)"
                else:
                    stop = f"zeroed block at journal position {pos}"
                break
            if h.store_id != self._store_id or h.first_seq != expect or h.prev_crc != prev:
                stop = f"older batch at journal position {pos} (seq {h.first_seq}, expected {expect})"
                if h.store_id == self._store_id and h.first_seq == expect:
                    log.warning("store: %s: dropped the journal tail: batch at %d does not chain to its "
                                "predecessor", self.path, pos)
                break
            size = h.nblocks * B
            if h.nblocks < 1 or phys + size > J or size > self._batch_max:
                stop = f"batch at journal position {pos} has a bad size"
                log.warning("store: %s: dropped the torn journal tail: %s", self.path, stop)
                break
            data = await read(phys, size)
            payload = data[F.BATCH_HEADER_SIZE : F.BATCH_HEADER_SIZE + h.payload_len]
            if len(payload) != h.payload_len or F.crc32c(payload) != h.payload_crc:
                stop = f"torn batch at journal position {pos} (payload CRC32C mismatch)"
                log.warning("store: %s: dropped the torn journal tail: %s", self.path, stop)
                break
            got, problem = F.decode_records(payload, expect, h.nrec)
            good = []
            for r in got:
                if r[0] == F.REC_PUT and r[4] and not (
                        self._data_page <= r[3] and r[3] + -(-r[4] // B) <= self._total_pages):
                    problem = f"record {r[1]} points outside the data area"
                    break
                good.append(r)
            if problem:  # the whole batch goes: its seqs will be written again
                stop = f"bad record in batch at journal position {pos}: {problem}"
                log.warning("store: %s: dropped the torn journal tail: %s", self.path, stop)
                break
            recs.extend(good)
            batches.append((expect, h.nrec, pos, prev, h.durable_seq))
            expect += h.nrec
            prev = h.hdr_crc
            max_durable = max(max_durable, h.durable_seq)
            pos += size
        return recs, pos, prev, max_durable, stop, batches, expect

    async def _verify_tail(self, recs: list[tuple], durable: int) -> int | None:
        """The first seq of a PUT record past the last durable point whose data does not hash
        to its digest (None when all verify)."""
        bad: set[int] = set()
        P = self.page_size

        async def check(r) -> None:
            page, length, digest = r[3], r[4], r[5]
            if not length:
                ok = digest == _EMPTY_DIGEST
            else:
                for attempt in (1, 2):
                    try:
                        data = await self._aio.read(page * P, length)
                        break
                    except OSError as exc:
                        if attempt == 2:
                            # a read error is not proof that the data never landed: dropping the
                            # record could lose an acknowledged write, so the open fails instead
                            raise IOFailed(
                                f"{self.path}: recovery cannot read the {length} bytes at page {page} of journal "
                                f"record {r[1]} to verify them ({exc}); the data file has a read error. Nothing "
                                "was changed: copy the file off the failing device (or fix it) and open it again",
                                exc.errno) from exc
                ok = _digest.digest(data) == digest
            if not ok:
                bad.add(r[1])

        todo = [r for r in recs if r[0] == F.REC_PUT and r[1] > durable]
        for i in range(0, len(todo), 32):  # 32 reads per ring turn
            await asyncio.gather(*(check(r) for r in todo[i : i + 32]))
            if bad:
                break
        return min(bad) if bad else None

    # -- helpers ------------------------------------------------------------------

    def _obs(self, name: str, *args) -> None:
        m = getattr(self._observer, name, None) if self._observer is not None else None
        if m is not None:
            try:
                m(*args)
            except Exception:  # an observer must never break the store
                log.exception("store: observer %s failed", name)

    def _check_writable(self) -> None:
        if self._closed:
            raise EngineClosed(f"{self.path}: the store is closed")
        if self._opened_read_only:
            raise ReadOnly(f"{self.path}: the store was opened read_only")
        if self._read_only is not None:
            raise ReadOnly(f"{self.path}: the store turned read-only after {self._read_only}; restart (reopen) "
                           "it to recover from the medium")

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"{self.path}: the store is closed")

    def _npages(self, length: int) -> int:
        return -(-length // self.page_size)

    def _pin(self, page: int) -> None:
        self._pins[page] = self._pins.get(page, 0) + 1

    def _unpin(self, page: int) -> None:
        c = self._pins[page] - 1
        if c:
            self._pins[page] = c
            return
        del self._pins[page]
        n = self._free_on_unpin.pop(page, None)
        if n is not None:
            self._alloc.free(page, n)

    def _release_extent(self, page: int, n: int) -> None:
        """Free an extent now, or once its last reader unpins it (C: ``PutPath.release_extent``)."""
        self._putpath.release_extent(page, n)

    def _process_frees(self) -> None:
        # Free an old extent only once a durable journal batch (or checkpoint) says its replacing
        # record is durable: recovery then never verifies the replaced record against pages
        # that were reused since (see docs/FORMAT.md, "never served"). Entries are appended in
        # sequence order, so the ripe ones are at the left.
        self._putpath.process_frees()

    def _ckpt_reserve_pages(self, extra_bytes: int = 0) -> int:
        """Free pages a put must leave for the next checkpoint (its chunks are written before
        the previous checkpoint's are freed), assuming the worst fragmentation."""
        P = self.page_size
        min_pages = -(-(F.CHUNK_HEADER_SIZE + 1 + 255 + F.ENTRY.size) // P)
        cap = min_pages * P - F.CHUNK_HEADER_SIZE - (1 + 255 + F.ENTRY.size)
        need = self._index.entries_size() + extra_bytes
        return -(-need // cap) * min_pages + 1

    def _take_pages(self, npages: int, extra_bytes: int) -> int:
        if npages == 0:
            return 0
        free = self._alloc.free_pages
        reserve = self._ckpt_reserve_pages(extra_bytes)
        if free - npages < reserve:
            raise NoSpace(
                f"no room for {npages} pages: {free} pages free, {reserve} of them are kept for the next "
                "checkpoint; delete blobs or create a larger data file"
            )
        if npages * self.page_size <= self._aio.buffer_size:
            # a value the group commit stages in a fixed buffer: at the write cursor, so the
            # values of one round are neighbours in the file and merge into one write (best fit
            # instead once the free space is fragmented: Allocator.allocate_run)
            return self._alloc.allocate_run(npages)
        return self._alloc.allocate(npages)

    async def _reclaim(self) -> None:
        """Make pending frees happen: flush, then record the durable point in the journal."""
        await self.flush()
        if self._pending_free and self._pending_free[-1][0] > self._disk_durable:
            self._check_writable()
            self._want_marker = True
            fut = asyncio.get_running_loop().create_future()
            self._flush_waiters.append(fut)
            self._kick()
            await fut

    async def _allocate(self, npages: int, extra_bytes: int) -> int:
        if npages == 0:
            return 0
        try:
            return self._take_pages(npages, extra_bytes)
        except NoSpace:
            if not self._pending_free and not self._queue:
                raise
        await self._reclaim()  # frees wait for durable replacing records
        return self._take_pages(npages, extra_bytes)

    def _kick(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    # -- the write path -------------------------------------------------------------

    def _put_item(self, key: bytes, page: int, length: int, digest: bytes, sync: bool) -> _Item:
        """The (not yet queued) item of a put whose extent starts at ``page`` (allocated with
        ``_allocate(_npages(length), 1 + len(key) + F.ENTRY.size)``: NoSpace before anything
        is written)."""
        self._check_writable()
        return _Item(_PUT, key, page, self._npages(length), length, digest, None, sync,
                     asyncio.get_running_loop().create_future())

    async def _write_value(self, item: _Item, write) -> None:
        """Await ``write`` (the engine coroutine writing ``item``'s value into its extent); a failed
        write turns the store read-only and raises :class:`IOFailed`."""
        try:
            await write
        except asyncio.CancelledError:
            raise  # the extent leaks until the next open (a write may still be in flight into it)
        except OSError as exc:
            self._go_read_only(f"a failed data write ({exc})")
            raise IOFailed(f"{self.path}: writing {item.length} bytes for a put failed: {exc}",
                           exc.errno) from exc
        self._counters["bytes_written"] += item.length

    async def _prepare_put(self, key: bytes, mv: memoryview, digest: bytes, sync: bool) -> _Item:
        length = len(mv)
        page = await self._allocate(self._npages(length), 1 + len(key) + F.ENTRY.size)
        item = self._put_item(key, page, length, digest, sync)
        if length == 0:
            return item
        if length <= self._aio.buffer_size:
            item.data = mv  # the committer copies it into a fixed buffer and writes it with the journal batch
            return item
        await self._write_value(item, self._aio.write_chunks(item.page * self.page_size, mv))
        return item

    def _enqueue(self, item: _Item) -> None:
        self._check_writable()
        self._queue.append(item)
        self._kick()

    async def put(self, key, value, *, sync: bool = False, verify: bool = False) -> None:
        """Store ``value`` under ``key`` (atomic: readers see the whole old or the whole new value).

        Raises :class:`InvalidKey`, :class:`TooLarge`, :class:`DigestMismatch`
        (``verify=True``), :class:`NoSpace` (nothing changed), :class:`ReadOnly`,
        :class:`IOFailed`.
        """
        key = _check_key(key)
        self._check_writable()
        mv = _as_view(value)
        if len(mv) > self.max_blob_size:
            raise self._too_large(len(mv))
        # BLAKE3 on the loop's thread (a large value: with BLAKE3's thread pool when
        # ringblob.digest's parallel_hash mode is on; see docs/FORMAT.md, "Data area")
        digest = _digest.digest(mv)
        if verify and digest != key:
            raise DigestMismatch(f"put: the BLAKE3 digest of the value is {digest.hex()}, not the key "
                                 f"{key.hex()}; nothing was stored")
        await self._put_hashed(key, mv, digest, sync)

    def put_nowait(self, key, value, done, *, sync: bool = False, verify: bool = False) -> bool:
        """Start a put of a small value with no coroutine and no future: the request path's
        PUT (the server calls it for every PUT; :meth:`put` is the awaitable form, with the
        same checks and the same group commit).

        Returns True when the value is hashed, its extent allocated and the item queued for
        the committer; then ``done(None, error)`` is called exactly once, later, on the loop's
        thread: ``error`` None once the put is acknowledged (durable first with ``sync=True``),
        else what :meth:`put` would raise (:class:`ReadOnly`, :class:`IOFailed`). Returns
        False, having changed nothing, for what only :meth:`put` does: a value larger than one
        fixed buffer (written before it is queued), or no room until pending frees are
        reclaimed. Raises at once, changing nothing, what :meth:`put` raises before it
        queues: :class:`InvalidKey`, :class:`TooLarge`, :class:`DigestMismatch`
        (``verify=True``), :class:`NoSpace`, :class:`ReadOnly`.
        """
        return self._putpath.put_nowait(key, value, done, sync=sync, verify=verify)

    async def _put_hashed(self, key: bytes, mv: memoryview, digest: bytes, sync: bool) -> None:
        item = await self._prepare_put(key, mv, digest, sync)
        self._enqueue(item)
        await item.fut

    def lease_value(self, length: int) -> LeasedValue | None:
        """Fixed buffers of the engine to receive a value of ``length`` bytes into, or ``None``.

        For a value about to arrive from elsewhere (the daemon's socket): fill
        the returned :class:`LeasedValue` in place (it hashes the bytes as they
        arrive) and hand it to :meth:`put_leased`, which writes it without a
        copy. The buffers are leased now, never waited for: ``None`` (take
        :meth:`put` with a value of your own) when ``length`` fits one fixed
        buffer (such values ride along with the journal write, see
        :meth:`put`) or passes ``max_blob_size``, when the store is not
        writable, when the buffers held by values being received would pass
        ``receive_buffers`` (half the pool by default: reads and commits keep
        the other half, and slow senders hold at most that), or when
        the pool is short or others wait for it. Release the value
        (:meth:`LeasedValue.release`) if it is not handed to :meth:`put_leased`.

        Where there is room now (and the store's ``stream_writes`` is on, the default),
        the value's extent is allocated here too and each buffer is written as soon as
        it is full, while the rest arrives (a stream, ``PutPath.stream``; STAT
        ``values_streamed``): the disk write overlaps the receive. Until the put commits
        that extent is free space no reader or recovery sees; a value released instead
        frees it once the writes in flight completed.
        """
        aio = self._aio
        bsz = aio.buffer_size
        if (length <= bsz or length > self.max_blob_size or self._closed or self._read_only is not None
                or self._opened_read_only):
            return None
        n = -(-length // bsz)
        bufs = aio.try_lease(n) if self._recv_held + n <= self._recv_cap else None
        if bufs is None:
            self._counters["lease_value_refused"] += 1
            return None
        self._recv_held += n
        self._counters["values_leased"] += 1
        lv = LeasedValue(bufs, length, bsz, self._return_leased)
        if self.stream_writes and self._putpath.stream(lv):
            self._counters["values_streamed"] += 1
        return lv

    def _return_leased(self, bufs: list) -> None:
        self._recv_held -= len(bufs)
        self._aio.release(*bufs)  # one still in flight (a cancelled write) goes back at its CQE

    def put_leased_nowait(self, key, value: LeasedValue, done, *, sync: bool = False, verify: bool = False) -> bool:
        """Start :meth:`put_leased` with no coroutine and no future: the request path's large PUT
        (``value`` received in full into the fixed buffers :meth:`lease_value` leased).

        Returns True when the digest is checked, the extent allocated and the value's data
        write queued (one WRITE_FIXED per buffer, this loop turn's submit; for a value written
        as it arrived, see :meth:`lease_value`, its extent and the writes not queued yet); when
        the write completes the buffers are released and the item queued for the group commit. Then
        ``done(None, error)`` is called exactly once, later, on the loop's thread: ``error``
        None once the put is acknowledged (durable first with ``sync=True``), else what
        :meth:`put_leased` would raise (:class:`IOFailed`, :class:`ReadOnly`, the engine's
        :class:`EngineClosed`). Returns False, having changed nothing (``value`` is still the
        caller's: hand it to :meth:`put_leased` or release it), for what only
        :meth:`put_leased` does: an incomplete value or one over ``max_blob_size``, more
        buffers than one submit window (a quarter of the pool), no room until pending frees
        are reclaimed, or no queue slots free at once. Raises at once, having released
        ``value`` and stored nothing (a streamed value's extent is freed once its writes in
        flight completed), :class:`InvalidKey`, :class:`DigestMismatch` (``verify=True``),
        :class:`NoSpace`, :class:`ReadOnly`, or :class:`IOFailed` when a write of a streamed
        value failed already.
        """
        return self._putpath.put_leased_nowait(key, value, done, sync=sync, verify=verify)

    async def put_leased(self, key, value: LeasedValue, *, sync: bool = False, verify: bool = False) -> None:
        """Store ``value`` — received in full into the fixed buffers :meth:`lease_value` leased —
        under ``key``, as :meth:`put` would, without copying it: each buffer is written from
        where it was filled (the tail zero-padded to a block inside the last one) and the digest
        is the one computed as the bytes arrived.

        The buffers are released in every case: once the data write completed (before the
        commit is awaited), or at the first error. Same durability and errors as :meth:`put`:
        :class:`InvalidKey`, :class:`TooLarge`, :class:`DigestMismatch` (``verify=True``;
        nothing stored), :class:`NoSpace` (nothing written), :class:`ReadOnly`,
        :class:`IOFailed`; ``ValueError`` when ``value`` is not complete. A value whose
        buffers were written as they arrived (see :meth:`lease_value`) is finished as
        :meth:`put_leased_nowait` does (its writes went to free pages: a failed put stores
        nothing); when it raises, it has waited until those writes completed and the extent
        was freed.
        """
        w = getattr(value, "writer", None)
        if w is not None:
            if await self._put_streamed(key, value, w, sync, verify):
                return
            # declined (an incomplete value, or no queue slots for the stream's last writes): give
            # the stream up, wait for its writes in flight, and take the path below
            value.writer = None
            w.abandon()
            await self._stream_idle(w)
        try:
            key = _check_key(key)
            self._check_writable()
            length = value.length
            if length > self.max_blob_size:
                raise self._too_large(length)
            digest = value.digest()
            if verify and digest != key:
                raise DigestMismatch(f"put: the BLAKE3 digest of the value is {digest.hex()}, not the key "
                                     f"{key.hex()}; nothing was stored")
            page = await self._allocate(self._npages(length), 1 + len(key) + F.ENTRY.size)
            item = self._put_item(key, page, length, digest, sync)
            await self._write_value(item, self._aio.write_leased(item.page * self.page_size, value.buffers,
                                                                  length))
        finally:
            value.release()
        self._enqueue(item)
        await item.fut

    async def _put_streamed(self, key, value: LeasedValue, writer, sync: bool, verify: bool) -> bool:
        """:meth:`put_leased` of a value with a stream, through :meth:`put_leased_nowait`: True
        once stored, False (nothing changed) when that declines."""
        fut = asyncio.get_running_loop().create_future()

        def done(_result, err):
            if not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

        try:
            if not self.put_leased_nowait(key, value, done, sync=sync, verify=verify):
                return False
        except BaseException:
            await self._stream_idle(writer)  # the value was released: its extent is freed after its writes
            raise
        await fut
        return True

    @staticmethod
    async def _stream_idle(writer) -> None:
        f = writer.wait_idle()
        if f is not None:
            await asyncio.shield(f)

    async def put_cas(self, value, *, sync: bool = False) -> bytes:
        """Store ``value`` under its 32-byte BLAKE3 digest; returns the digest (the value is hashed once)."""
        self._check_writable()
        mv = _as_view(value)
        if len(mv) > self.max_blob_size:
            raise self._too_large(len(mv))
        digest = _digest.digest(mv)
        await self._put_hashed(digest, mv, digest, sync)
        return digest

    async def put_many(self, items: Iterable[tuple[bytes, Any]], *, sync: bool = False) -> None:
        """Store several blobs; with ``sync=True`` they share one group commit (data and journal writes, then one fdatasync).

        Every key and size is checked before anything is written. A
        :class:`NoSpace` for any of them stores none of them.
        """
        self._check_writable()
        prepared = []
        for key, value in items:
            key = _check_key(key)
            mv = _as_view(value)
            if len(mv) > self.max_blob_size:
                raise self._too_large(len(mv), key)
            prepared.append((key, mv, _digest.digest(mv)))
        # allocate everything first: NoSpace changes nothing
        pages = []
        extra = 0
        try:
            for key, mv, _d in prepared:
                n = self._npages(len(mv))
                extra += 1 + len(key) + F.ENTRY.size
                try:
                    pages.append((self._take_pages(n, extra), n))
                except NoSpace:
                    if not self._pending_free:
                        raise
                    await self._reclaim()
                    pages.append((self._take_pages(n, extra), n))
        except BaseException:
            for p, n in pages:
                if n:
                    self._alloc.free(p, n)
            raise
        loop = asyncio.get_running_loop()
        out = []
        for (key, mv, digest), (page, n) in zip(prepared, pages):
            it = _Item(_PUT, key, page, n, len(mv), digest, None, sync, loop.create_future())
            if len(mv) > self._aio.buffer_size:
                try:
                    await self._aio.write_chunks(page * self.page_size, mv)
                except OSError as exc:
                    self._go_read_only(f"a failed data write ({exc})")
                    raise IOFailed(f"{self.path}: writing a blob of put_many failed: {exc}", exc.errno) from exc
                self._counters["bytes_written"] += len(mv)
            elif len(mv):
                it.data = mv
            out.append(it)
        self._check_writable()
        self._queue.extend(out)
        self._kick()
        await asyncio.gather(*(it.fut for it in out))

    async def delete(self, key, *, sync: bool = False) -> None:
        """Remove ``key``; a missing key is not an error. Raises :class:`ReadOnly`, :class:`IOFailed`."""
        key = _check_key(key)
        self._check_writable()
        if key not in self._index and not any(it.key == key for it in self._queue):
            if sync and self.needs_flush:
                await self.flush()
            return
        item = _Item(_DELETE, key, 0, 0, 0, b"", None, sync, asyncio.get_running_loop().create_future())
        self._enqueue(item)
        await item.fut

    @property
    def needs_flush(self) -> bool:
        """True exactly while some acknowledged put or delete is not yet durable."""
        return self._written_seq > self._durable_seq

    async def flush(self) -> None:
        """Make every acknowledged write durable (one fdatasync, shared with concurrent flushes).

        With ``needs_flush`` False this returns at once and makes no syscall.
        Raises :class:`ReadOnly` when acknowledged writes can no longer be made
        durable, :class:`IOFailed` when the fdatasync fails.
        """
        self._check_open()
        if not self.needs_flush:
            self._counters["flushes_skipped"] += 1
            self._obs("on_flush_skipped")
            return
        self._check_writable()
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._kick()
        await fut

    async def checkpoint(self) -> None:
        """Write a checkpoint now (index snapshot + superblock flip); no-op when nothing changed."""
        self._check_writable()
        fut = asyncio.get_running_loop().create_future()
        self._ckpt_waiters.append(fut)
        self._kick()
        await fut

    def _go_read_only(self, reason: str) -> None:
        if self._read_only is not None:
            return
        self._read_only = reason
        log.error("store: %s turned read-only after %s; reads go on, writes fail with ReadOnly; restart to "
                  "recover from the medium", self.path, reason)
        self._obs("on_read_only", reason)
        q = self._queue[:]
        self._queue.clear()  # in place: the C put path holds this list
        for it in q:
            if not it.fut.done():
                it.fut.set_exception(ReadOnly(f"{self.path}: the store turned read-only after {reason}"))
        fl, self._flush_waiters = self._flush_waiters, []
        for f in fl:
            if not f.done():
                f.set_exception(ReadOnly(f"{self.path}: the store turned read-only after {reason}"))
        cw, self._ckpt_waiters = self._ckpt_waiters, []
        for f in cw:
            if not f.done():
                f.set_exception(ReadOnly(f"{self.path}: the store turned read-only after {reason}"))

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        jbuf = None
        try:
            (jbuf,) = await self._aio.lease(1)
            while True:
                if not self._queue and not self._flush_waiters and not self._ckpt_waiters:
                    if self._stopping:
                        await self._drain()
                        return
                    self._wake = loop.create_future()
                    await self._wake
                    self._wake = None
                    continue
                if self._read_only is not None:
                    self._go_read_only(self._read_only)
                    # (waiters were failed by the first call; fail newcomers the same way)
                    for lst in (self._queue, self._flush_waiters, self._ckpt_waiters):
                        for x in lst:
                            f = x.fut if isinstance(x, _Item) else x
                            if not f.done():
                                f.set_exception(ReadOnly(f"{self.path}: the store is read-only ({self._read_only})"))
                        lst.clear()
                    continue
                try:
                    if self._queue or self._flush_waiters:
                        await self._commit_round(jbuf)
                    if self._read_only is None and (
                            self._ckpt_waiters or (self._head - self._ckpt_pos >= self._threshold
                                                   and self._alloc.free_pages >= self._ckpt_retry_free)):
                        await self._drain()  # the checkpoint snapshots an index with every round applied
                        if self._read_only is not None:
                            continue
                        waiters, self._ckpt_waiters = self._ckpt_waiters, []
                        try:
                            await self._checkpoint()
                        except BaseException as exc:
                            e2 = self._as_error(exc, "the checkpoint")
                            for f in waiters:
                                if not f.done():
                                    f.set_exception(e2)
                            raise
                        for f in waiters:
                            if not f.done():
                                f.set_result(None)
                except NoSpace as exc:
                    # the store stays writable; puts that need the journal space fail with NoSpace
                    log.error("store: %s: checkpoint failed: %s", self.path, exc)
                    self._ckpt_retry_free = self._alloc.free_pages + 1
                except OSError as exc:
                    self._go_read_only(f"an I/O error ({exc})")
                except EngineClosed:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: never leave requests hanging
            log.exception("store: %s: the committer failed", self.path)
            self._go_read_only(f"an internal error ({exc!r})")
        finally:
            if jbuf is not None and not self._aio.closed:
                self._aio.release(jbuf)

    def _journal_place(self, nbytes: int) -> tuple[int, int] | None:
        """(logical pos, physical offset) for a batch of ``nbytes``, or None when the journal is full."""
        J = self._jbytes
        pos = self._head
        phys = pos % J
        if J - phys < self._batch_max:
            pos += J - phys
            phys = 0
        if pos + nbytes - self._tail_pos > J:
            return None
        return pos, phys

    async def _commit_round(self, jbuf) -> None:
        cap = self._batch_cap - F.BATCH_HEADER_SIZE
        max_ops = self._aio.queue_depth - 2
        max_data_bufs = max(1, (self._aio.buffer_count - 1) // 2)
        items: list[_Item] = []
        recs: list[bytes] = []
        rec_bytes = 0
        seq = self._next_seq
        marker = None
        if self._ckpt_marker is not None and self._queue:
            number, cseq = self._ckpt_marker
            marker = F.encode_checkpoint(seq, number, cseq)
            recs.append(marker)
            rec_bytes += len(marker)
            seq += 1
        # pack small values into fixed buffers (simulated first; leased in _commit_items)
        seq, nbufs = self._putpath.pack_round(recs, items, seq, rec_bytes, cap, max_ops, max_data_bufs)
        flushers, self._flush_waiters = self._flush_waiters, []
        if not items:
            await self._drain()
            if self._read_only is not None:  # a round in flight failed: its fdatasync error stands
                self._fail_read_only([], flushers)
                return
            await self._sync_only(flushers, jbuf)
            return
        try:
            await self._commit_items(jbuf, items, flushers, recs, seq, marker, nbufs)
        except BaseException as exc:
            e2 = self._as_error(exc, "the commit")
            _settle(items, flushers, e2)
            raise

    async def _drain(self) -> None:
        """Wait until every round in flight was made durable (or failed) and acknowledged."""
        while self._finishers:
            r = self._finishers[0]
            if not r.finished:
                await r.wait()
            if self._finishers and self._finishers[0] is r:
                self._finishers.popleft()

    async def _commit_items(self, jbuf, items, flushers, recs, seq, marker, nbufs) -> None:
        """Phase one of a round: the data writes and the journal write (unlinked, one submit,
        made at once with ``AsyncEngine.submit_now``, not at the loop turn's end).

        The writes' completion call (no hop back into this coroutine) moves the
        journal state past the batch and starts the round's phase two (a
        :class:`_Round`: fdatasync, index, acknowledgements, driven by
        completion calls, no Task), its fdatasync submitted in that same loop
        turn; then this returns, so the next round's writes go out while this
        round's fdatasync is in flight (pipelining). Rounds are acknowledged
        strictly in order: a round starts once the previous one finished, and
        issues its fdatasync only after the previous round's succeeded. A
        failed write fails the round here, after the rounds before it finished.
        """
        P = self.page_size
        want_sync = bool(flushers) or any(it.sync for it in items)
        # the durable point as known now: the previous round's fdatasync may still be in flight
        batch_d = self._durable_seq
        # RWF_DSYNC writes make only themselves durable: the round may skip the fdatasync only
        # when every record before it is durable or in a sync round in flight (acknowledged
        # rounds finish in order, and a failed round fails the later ones), and when no value
        # of the round was written ahead of it (leased large values: data None, length > 0)
        dsync = (want_sync and self.sync_method == "dsync" and self._nosync_seq <= batch_d
                 and not any(it.data is None and it.length for it in items))
        batch, hcrc = F.encode_batch(self._store_id, self._next_seq, recs, batch_d, self._chain, P)
        place = self._journal_place(len(batch))
        if place is None:
            # the journal is full: checkpoints move its tail; two may be needed
            await self._drain()
            if self._read_only is not None:
                self._fail_read_only(items, flushers)
                return
            for _ in range(2):
                await self._checkpoint(force=True)
                place = self._journal_place(len(batch))
                if place is not None:
                    break
            if place is None:
                raise NoSpace(f"{self.path}: the journal ({self._jbytes} bytes) is full")
            # the checkpoint marker belongs before these records: rebuild the batch
            if marker is None and self._ckpt_marker is not None:
                self._queue[:0] = items
                for f in flushers:
                    self._flush_waiters.append(f)
                return
        pos, phys = place
        # two rounds in the ring at most: this round's writes may overlap the previous round's
        # fdatasync, not the one before it
        while self._finishers and self._finishers[0].finished:
            self._finishers.popleft()
        while len(self._finishers) > 1:
            r = self._finishers[0]
            if not r.finished:
                await r.wait()
            if self._finishers and self._finishers[0] is r:
                self._finishers.popleft()
        if self._read_only is not None:  # an earlier round failed meanwhile
            self._fail_read_only(items, flushers)
            return
        if not want_sync:  # its writes wait for a later fdatasync
            self._nosync_seq = seq - 1
        # data buffers
        aio = self._aio
        bufs = (aio.try_lease(nbufs) or await aio.lease(nbufs)) if nbufs else []
        ops: list[tuple] = []
        results = None
        try:
            ops = self._putpath.stage(items, bufs, WRITE)  # values copied in, neighbours merged
            jbuf.view[: len(batch)] = batch
            ops.append((WRITE, jbuf, self._joff + phys, len(batch), 0))
            # The data writes and the journal write go out unlinked, in one ring turn, so the
            # kernel runs them in parallel (IOSQE_IO_LINK would run them one after another, and
            # IOSQE_IO_DRAIN on the fdatasync would hold every other op on the ring, GET reads
            # included, behind it). Their order on the medium does not matter: recovery verifies
            # every record above the durable point (docs/FORMAT.md). The fdatasync goes out
            # only once every write completed in full: from the completion call of the last
            # write (same loop turn, see _written), not after a hop back into this coroutine.
            rnd = (items, flushers, seq, marker, batch_d, want_sync, dsync, pos, len(batch), hcrc)
            # the engine's loop is the running one; asyncio.get_running_loop() costs a getpid()
            # syscall per call on CPython 3.11, once per round here
            fut = aio.loop.create_future()

            def written(res: list) -> list | None:
                # the writes' results: None once all completed in full (the round goes on), else res
                if _write_error(ops, res) is not None:
                    return res
                if bufs:  # back to the pool before the round's puts are answered
                    aio.release(*bufs)
                    bufs.clear()
                self._written(rnd)
                return None

            def done(res: list) -> None:
                if fut.done():
                    return  # the committer was cancelled meanwhile
                try:
                    for r in res:
                        if isinstance(r, EngineClosed):
                            fut.set_exception(r)
                            return
                    res = written(res)
                except BaseException as exc:  # a bug: the committer fails the round
                    fut.set_exception(exc)
                    return
                fut.set_result(res)

            if aio.run_nowait(ops, done, dsync):
                aio.submit_now()
                results = await fut
            else:
                results = written(await aio.run(ops, link=False, dsync=dsync))
        finally:
            if bufs:
                self._aio.release(*bufs)
        if results is not None:
            err = _write_error(ops, results)
            await self._drain()  # earlier rounds are acknowledged (or failed) first
            self._fail_round(items, flushers, err)

    def _written(self, rnd: tuple) -> None:
        """A round's writes all completed in full (``rnd``: what ``_commit_items`` packed): the
        journal state moves past its batch, and its phase two (a :class:`_Round`) is chained
        behind the previous round or started (its fdatasync queued) at once. Called from the
        writes' completion call, so the fdatasync is queued in the loop turn that reaped them."""
        items, flushers, seq, marker, batch_d, want_sync, dsync, pos, blen, hcrc = rnd
        # written: the next batch follows this one in the journal
        self._last_batch_pos, self._last_batch_len = pos, blen
        self._head = pos + blen
        self._chain = hcrc
        self._next_seq = seq
        self._written_seq = seq - 1
        self._last_batch_d = batch_d
        if marker is not None:
            self._ckpt_marker = None
        c = self._counters
        c["journal_batches"] += 1
        c["journal_bytes_written"] += blen
        fin = self._finishers
        prev = fin[-1] if fin else None
        r = _Round(self, items, flushers, seq - 1, batch_d, want_sync, dsync)
        fin.append(r)
        if prev is not None and not prev.finished:
            prev.next = r  # started once the previous round finished
        else:
            # a finished round still queued succeeded, or failed and turned the store read-only:
            # then this round fails too
            r.start(prev is None or prev.ok)

    def _fail_read_only(self, items, flushers) -> None:
        exc = ReadOnly(f"{self.path}: the store turned read-only after {self._read_only}")
        _settle(items, flushers, exc)

    async def _sync_only(self, flushers: list, jbuf) -> None:
        if self._written_seq > self._durable_seq:
            target = self._written_seq
            t0 = time.perf_counter()
            try:
                await self._aio.fdatasync()
            except OSError as exc:
                self._fail_round([], flushers, exc)
                return
            dt = time.perf_counter() - t0
            self._durable_seq = max(self._durable_seq, target)
            self._disk_durable = max(self._disk_durable, self._last_batch_d)
            self._counters["fdatasyncs"] += 1
            self._obs("on_fdatasync", dt)
            self._process_frees()
        if self._want_marker and self._disk_durable < self._durable_seq:
            # space is waiting for a durable point to be recorded: an empty batch carries it
            P = self.page_size
            d = self._durable_seq
            batch, hcrc = F.encode_batch(self._store_id, self._next_seq, [], d, self._chain, P)
            place = self._journal_place(len(batch))
            if place is None:
                await self._checkpoint(force=True)  # records the durable point in the superblock
            else:
                pos, phys = place
                jbuf.view[: len(batch)] = batch
                jop = (WRITE, jbuf, self._joff + phys, len(batch), 0)
                err = _write_error([jop], await self._aio.run([jop]))
                t0 = time.perf_counter()
                if err is None:  # the fdatasync only after the write completed in full
                    try:
                        await self._aio.fdatasync()
                    except OSError as exc:
                        err = exc
                if err is not None:
                    self._fail_round([], flushers, err)
                    return
                self._obs("on_fdatasync", time.perf_counter() - t0)
                self._counters["fdatasyncs"] += 1
                self._counters["journal_batches"] += 1
                self._counters["journal_bytes_written"] += len(batch)
                self._last_batch_pos, self._last_batch_len = pos, len(batch)
                self._head = pos + len(batch)
                self._chain = hcrc
                self._last_batch_d = d
                self._disk_durable = max(self._disk_durable, d)
            self._process_frees()
        self._want_marker = False
        self._counters["flushes"] += len(flushers)
        _settle([], flushers)

    def _as_error(self, exc: BaseException, what: str) -> BaseException:
        """The exception a caller gets: an engine ``OSError`` becomes :class:`IOFailed` (``errno`` set,
        the ``OSError`` chained); a :class:`RingblobError` passes; anything else as is."""
        if isinstance(exc, OSError):
            e2 = IOFailed(f"{self.path}: {what} failed: {exc}; the store is now read-only", exc.errno)
            e2.__cause__ = exc
            return e2
        if not isinstance(exc, Exception):
            return ReadOnly(f"{self.path}: the store is closing")
        return exc

    def _fail_round(self, items: list[_Item], flushers: list, err: BaseException) -> None:
        en = getattr(err, "errno", None)
        reason = f"a failed write or fdatasync ({err})"
        exc = IOFailed(f"{self.path}: the commit failed: {err}; the store is now read-only", en)
        exc.__cause__ = err
        _settle(items, flushers, exc)
        self._go_read_only(reason)

    # -- checkpoints ----------------------------------------------------------------

    async def _checkpoint(self, force: bool = False) -> None:
        """Snapshot the index into fresh pages, fdatasync, flip the superblock, fdatasync."""
        if self._head == self._ckpt_pos and not force:
            return
        t0 = time.perf_counter()
        P = self.page_size
        S = self._written_seq
        idx = self._index
        esz = F.ENTRY.size
        hdr = F.CHUNK_HEADER_SIZE
        min_pages = -(-(hdr + 1 + 255 + esz) // P)
        chunk_pages = max(CKPT_CHUNK_BYTES // P, min_pages)
        remaining = idx.entries_size()
        if remaining and self._alloc.free_pages * P < remaining + hdr:
            raise NoSpace(f"checkpoint: {remaining} bytes of index entries need more than the "
                          f"{self._alloc.free_pages} free pages")
        new_ext: list[tuple[int, int]] = []

        def alloc_chunk(need_bytes: int) -> tuple[int, int]:
            want = min(chunk_pages, max(min_pages, -(-(need_bytes + hdr) // P)))
            while True:
                try:
                    return self._alloc.allocate(want), want
                except NoSpace:
                    if want <= min_pages:
                        raise
                    want = max(min_pages, want // 2)

        try:
            first = (0, 0)
            if len(idx):
                cur = alloc_chunk(remaining)
                new_ext.append(cur)
                first = cur
                it = idx.iter_entries()
                chunk_no = 0
                while cur is not None:
                    # the entries that fit this chunk, packed in C (min_pages: at least one fits)
                    body, count = it.take(cur[1] * P - hdr)
                    remaining -= len(body)
                    nxt = None
                    if not it.exhausted:
                        nxt = alloc_chunk(max(remaining, 1))
                        new_ext.append(nxt)
                    data = F.encode_chunk(chunk_no, self._store_id, S, count, body,
                                          nxt[0] if nxt else 0, nxt[1] if nxt else 0, P)
                    await self._aio.write_chunks(cur[0] * P, data)
                    cur = nxt
                    chunk_no += 1
            t1 = time.perf_counter()
            await self._aio.fdatasync()
            self._counters["fdatasyncs"] += 1
            self._obs("on_fdatasync", time.perf_counter() - t1)
            old = self._sb
            sb = F.Superblock(
                store_id=self._store_id, generation=old.generation + 1, page_size=P, batch_max=old.batch_max,
                total_pages=old.total_pages, journal_page=old.journal_page, journal_pages=old.journal_pages,
                data_page=old.data_page, ckpt_seq=S, ckpt_page=first[0], ckpt_npages=first[1],
                ckpt_blobs=len(idx), checkpoints=self._checkpoints + 1, replay_pos=self._head,
                next_seq=S + 1, chain_crc=self._chain, created_ns=old.created_ns,
            )
            await self._aio.write_chunks((sb.generation % 2) * P, sb.encode(P))
            t1 = time.perf_counter()
            await self._aio.fdatasync()
            self._counters["fdatasyncs"] += 1
            self._obs("on_fdatasync", time.perf_counter() - t1)
        except NoSpace:
            for p, n in new_ext:
                self._alloc.free(p, n)
            raise
        # the slot overwritten held the checkpoint before the previous one: its chunks are free now
        for p, n in self._prev_ckpt_extents:
            self._release_extent(p, n)
        self._prev_ckpt_extents = self._ckpt_extents
        self._ckpt_extents = new_ext
        self._tail_pos = old.replay_pos
        self._older_sb = old
        self._sb = sb
        self._ckpt_pos = self._head
        self._checkpoints += 1
        self._durable_seq = max(self._durable_seq, S)
        self._disk_durable = max(self._disk_durable, S)
        self._ckpt_marker = (self._checkpoints, S)
        self._ckpt_retry_free = 0
        self._process_frees()
        dt = time.perf_counter() - t0
        log.info("store: %s: checkpoint %d at seq %d: %d blobs in %d chunk(s), %.3f s", self.path,
                 self._checkpoints, S, len(idx), len(new_ext), dt)
        self._obs("on_checkpoint", dt)

    # -- the read path ----------------------------------------------------------------

    async def get(self, key) -> bytes:
        """The value stored under ``key``, verified against its BLAKE3 digest.

        Raises :class:`NotFound` (a ``KeyError``), :class:`Corrupt` (counted;
        the bytes are never returned), :class:`IOFailed` for a failed read.
        """
        key = _check_key(key)
        page, length, digest = self._lookup(key)
        if length == 0:
            data = b""
        else:
            self._pin(page)
            try:
                data = await self._aio.read(page * self.page_size, length)
            except OSError as exc:
                raise self._read_failed(key, page, length, exc) from exc
            finally:
                self._unpin(page)
        return self._verified(key, page, length, digest, data)

    def get_nowait(self, key, done, max_size: int | None = None) -> int:
        """Start reading ``key``'s value with no coroutine and no future: the request path's
        GET (the server calls it for every GET; :meth:`get` is the awaitable form).

        Returns the value's length in bytes (> 0) when the read is queued for this loop
        turn's submit; then ``done(value, error)`` is called exactly once, later, on the
        loop's thread, with the value (``bytes``, verified against its BLAKE3 digest exactly
        as :meth:`get` does) and None, or None and the error :meth:`get` would raise
        (:class:`Corrupt`, :class:`IOFailed`, :class:`EngineClosed`). Returns 0, having done
        nothing, when the value cannot be read this way right now (it is empty, larger than
        one fixed buffer or than ``max_size`` bytes, or the buffer pool or queue depth is
        short): await :meth:`get` instead. Raises :class:`NotFound`, :class:`InvalidKey`,
        :class:`EngineClosed` at once.
        """
        return self._getpath.get_nowait(key, done, max_size)

    def _too_large(self, length: int, key: bytes | None = None) -> TooLarge:
        """The :class:`TooLarge` for a value of ``length`` bytes over ``max_blob_size``."""
        what = f"value of {length} bytes" + ("" if key is None else f" for key {key!r}")
        return TooLarge(f"{what} exceeds max_blob_size ({self.max_blob_size} bytes); store it in "
                        "smaller pieces or raise the daemon's max_blob_size setting (--max-blob-size)")

    def _lookup(self, key: bytes) -> tuple[int, int, bytes]:
        """``(page, length, digest)`` of ``key``; raises :class:`NotFound`, :class:`EngineClosed`."""
        self._check_open()
        e = self._index.get(key)
        if e is None:
            raise NotFound(f"no blob under key {key!r}")
        return e

    def _read_failed(self, key: bytes, page: int, length: int, exc: OSError) -> IOFailed:
        return IOFailed(f"{self.path}: reading {length} bytes of key {key!r} at page {page} failed: {exc}", exc.errno)

    def _verified(self, key: bytes, page: int, length: int, digest: bytes, data: bytes) -> bytes:
        """``data`` when its BLAKE3 digest is ``digest`` (counted as a get); else raises :class:`Corrupt`."""
        if _digest.digest(data) != digest:
            raise self._corrupt(key, page, length)
        self._counters["gets"] += 1
        self._counters["bytes_read"] += length
        return data

    def _corrupt(self, key: bytes, page: int, length: int) -> Corrupt:
        """A read of ``key``'s value failed its BLAKE3 digest: count the get and the checksum
        failure, tell the observer, log it; returns the :class:`Corrupt` to raise or hand on."""
        self._counters["gets"] += 1
        self._counters["checksum_failures"] += 1
        self._obs("on_checksum_failure", key)
        log.error("store: %s: blob %r at page %d (%d bytes) fails its BLAKE3 digest", self.path, key, page, length)
        return Corrupt(f"blob {key!r} at page {page} ({length} bytes) fails its BLAKE3 digest: the stored bytes "
                       "are damaged; delete it and restore it from a replica or backup", [key])

    async def get_many(self, keys: Iterable[bytes]) -> list[bytes | None]:
        """Values of ``keys`` in order (None for a missing key), read as :meth:`get_each` does.

        Raises :class:`InvalidKey` for a bad key before reading anything, and
        :class:`Corrupt` / :class:`IOFailed` like :meth:`get` (the first such error of the
        keys, in order, once every read finished).
        """
        keys = [_check_key(k) for k in keys]
        return values_or_raise(await self.get_each(keys))

    async def get_each(self, keys: Sequence) -> list:
        """For each of ``keys`` (a sequence), in order: its value (``bytes``, verified against
        its BLAKE3 digest as :meth:`get` does) or the exception :meth:`get` would raise for it
        (:class:`NotFound`, :class:`InvalidKey`, :class:`Corrupt`, :class:`IOFailed`,
        :class:`EngineClosed`). Never raises for one key's failure: the server's MGET answers
        each key with its own status.

        The reads of values that fit one fixed buffer go out the way :meth:`get_nowait`'s do
        (no coroutine, task or future per key; completions call back), as many at once as the
        buffer pool and queue depth allow, each completion starting the next; larger or empty
        values are read by :meth:`get`, one task each, beside them. Returns once every read
        finished.
        """
        run = _GetEach(self, keys, self._aio.loop.create_future())
        run.pump()
        if run.active:
            await run.fut
        return run.results

    def has(self, key) -> bool:
        """Whether ``key`` is stored (reads no data)."""
        key = _check_key(key)
        self._check_open()
        return key in self._index

    def value_size(self, key) -> int | None:
        """Length in bytes of the value stored under ``key``, or None when absent (reads no data).

        The server uses it to budget the reply bytes a connection may have in
        flight before reading the values. Raises :class:`InvalidKey`.
        """
        key = _check_key(key)
        self._check_open()
        return self._index.value_length(key)

    async def list(self, prefix: bytes = b"", start_after: bytes | None = None,
                   limit: int | None = None) -> AsyncIterator[bytes]:
        """Keys in ascending byte order: those starting with ``prefix``, after ``start_after``, at most ``limit``.

        An async iterator that walks the index in pages of 256 keys (never the
        whole key list); keys added or removed while iterating may or may not
        be seen.
        """
        self._check_open()
        prefix = bytes(prefix)
        cur = None if start_after is None else bytes(start_after)
        inclusive = False
        if prefix and (cur is None or cur < prefix):
            cur, inclusive = prefix, True
        n = 0
        if limit is not None and limit <= 0:
            return
        while True:
            batch = self._index.keys_after(cur, inclusive, 256)
            if not batch:
                return
            for k in batch:
                if prefix and not k.startswith(prefix):
                    return
                yield k
                n += 1
                if limit is not None and n >= limit:
                    return
            cur, inclusive = batch[-1], False
            await asyncio.sleep(0)

    async def scrub(self) -> dict:
        """Read every blob and check its BLAKE3 digest.

        Returns ``{"checked": int, "bytes_checked": int, "bad_keys": [bytes, ...],
        "unreadable_keys": [bytes, ...]}``: ``bad_keys`` are blobs whose bytes were read and
        fail their digest (damaged: restore them; each is counted in ``checksum_failures``),
        ``unreadable_keys`` blobs whose read failed with an I/O error (the bytes were never
        seen: the device, not the blob, is the first suspect). ``checked`` counts both.
        Blobs deleted while the scrub runs are skipped. Raises :class:`EngineClosed` when
        the store is closed.
        """
        self._check_open()
        bad = []
        unreadable = []
        checked = 0
        nbytes = 0
        async for k in self.list():
            try:
                v = await self.get(k)
                nbytes += len(v)
            except NotFound:
                continue
            except Corrupt:
                bad.append(k)
            except IOFailed:
                unreadable.append(k)
            checked += 1
        if bad:
            log.error("store: %s: scrub found %d damaged blob(s) of %d", self.path, len(bad), checked)
        if unreadable:
            log.error("store: %s: scrub could not read %d blob(s) of %d (I/O errors; check the device)",
                      self.path, len(unreadable), checked)
        return {"checked": checked, "bytes_checked": nbytes, "bad_keys": bad, "unreadable_keys": unreadable}

    # -- stats and lifetime -------------------------------------------------------------

    def stat(self) -> dict:
        """Counts and sizes (bytes unless named otherwise).

        blob_count, value_bytes, key_bytes, used_bytes (data pages in use, including
        checkpoint chunks and old extents waiting to be freed), free_bytes, capacity_bytes,
        page_size, journal_bytes (live journal: from the older superblock's replay point),
        journal_capacity_bytes, journal_since_checkpoint_bytes, checkpoints, fragmentation
        (0..1), free_extents, largest_free_bytes, read_only, read_only_reason, needs_flush,
        sync_method (the one taken: ``"dsync"`` or ``"fdatasync"``), stream_writes (the
        setting: large PUT values written as they arrive), parallel_hash (True where
        values of 128 KiB or more are hashed by BLAKE3's thread pool: :mod:`ringblob.digest`),
        hash_worker (True where a large received PUT's buffers are hashed by the hash
        worker), engine, sequence, durable_sequence, recovery_seconds, index_bytes; cumulative
        counters: puts, gets, deletes, fdatasyncs, group_commits, group_commit_writes,
        dsync_commits (rounds made durable by RWF_DSYNC writes instead of an fdatasync),
        flushes, flushes_skipped, checksum_failures, bytes_read, bytes_written,
        journal_batches, journal_bytes_written, recovered_records, recovery_dropped_records,
        values_leased (values :meth:`lease_value` leased fixed buffers for),
        values_streamed (of those, values written buffer by buffer as they arrived),
        lease_value_refused (values over the buffer size that :meth:`lease_value` turned
        away: over ``receive_buffers`` or the pool short; they took the copying path);
        receive_buffers_held (a gauge: buffers such values hold now); and
        ``engine_counters`` (the engine's ``counters()``).
        """
        P = self.page_size
        data_pages = self._total_pages - self._data_page
        free = self._alloc.free_pages
        d = {
            "blob_count": len(self._index),
            "value_bytes": self._index.value_bytes,
            "key_bytes": self._index.key_bytes,
            "used_bytes": (data_pages - free) * P,
            "free_bytes": free * P,
            "capacity_bytes": data_pages * P,
            "page_size": P,
            "journal_bytes": self._head - self._tail_pos,
            "journal_capacity_bytes": self._jbytes,
            "journal_since_checkpoint_bytes": self._head - self._ckpt_pos,
            "checkpoints": self._checkpoints,
            "fragmentation": self._alloc.fragmentation(),
            "free_extents": self._alloc.extents,
            "largest_free_bytes": self._alloc.largest() * P,
            "read_only": self._read_only is not None or self._opened_read_only,
            "read_only_reason": self._read_only,
            "needs_flush": self.needs_flush,
            "sync_method": self.sync_method,
            "stream_writes": self.stream_writes,
            "parallel_hash": _digest.parallel(),
            "hash_worker": _digest.hash_worker(),
            "engine": self._aio.name,
            "sequence": self._written_seq,
            "durable_sequence": self._durable_seq,
            "recovery_seconds": self.recovery_seconds,
            "index_bytes": self._index.memory_bytes(),
            "receive_buffers_held": self._recv_held,
        }
        d.update(self._counters)
        try:
            d["engine_counters"] = self._aio.engine.counters()
        except Exception:
            d["engine_counters"] = {}
        return d

    @property
    def read_only(self) -> bool:
        """True when opened read_only or turned read-only after an I/O error."""
        return self._opened_read_only or self._read_only is not None

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Flush, write a checkpoint (when the journal grew since the last), release the file. Idempotent.

        Requests already queued are committed first; a request that reaches the
        store after ``close()`` began may fail with :class:`EngineClosed`.
        """
        if self._closed:
            return
        try:
            if not self._opened_read_only and self._read_only is None:
                try:
                    while self._queue:
                        await asyncio.sleep(0)
                    await self.flush()
                    if self._head != self._ckpt_pos:
                        await self.checkpoint()
                except (ReadOnly, IOFailed, NoSpace, OSError) as exc:
                    # what was acknowledged durable stays so; the next open recovers the rest
                    log.warning("store: %s: close could not flush/checkpoint: %s", self.path, exc)
        finally:
            self._closed = True
            self._stopping = True
            self._kick()
            task = self._committer_task
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5)
                except Exception:
                    task.cancel()
            self._fail_pending(EngineClosed(f"{self.path}: the store was closed before this request committed"))
            self._aio.close()
            self._unlock_and_close()

    def _fail_pending(self, exc: Exception) -> None:
        q = self._queue[:]
        self._queue.clear()  # in place: the C put path holds this list
        for it in q:
            if not it.fut.done():
                it.fut.set_exception(exc)
        for lst in (self._flush_waiters, self._ckpt_waiters):
            for f in lst:
                if not f.done():
                    f.set_exception(exc)
            lst.clear()

    def _unlock_and_close(self) -> None:
        # LOCK_UN explicitly: io_uring's registered-file reference keeps the open file
        # description (and so the flock) alive until the kernel finishes tearing the ring down
        try:
            fcntl.flock(self._df.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        self._df.close()

    async def abandon(self) -> None:
        """Drop the store the way a crash would: no flush, no checkpoint (for tests and tools).

        Whatever reached the file stays; acknowledged ``sync=False`` writes may
        or may not be there after the next open.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        task = self._committer_task
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        for r in list(getattr(self, "_finishers", ())):
            r.cancel()
        self._fail_pending(EngineClosed(f"{self.path}: the store was abandoned before this request committed"))
        self._aio.close()
        self._unlock_and_close()

    async def __aenter__(self) -> "BlobStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()



class _Round:
    """Phase two of a group-commit round, driven by calls instead of a Task: once the previous
    round finished, the round's fdatasync (``AsyncEngine.run_nowait``), then it is made visible
    and acknowledged (:meth:`_apply`). A ``dsync`` round (its writes carried RWF_DSYNC, so they
    were durable when they completed) needs no fdatasync: it is applied as soon as the previous
    round finished. Rounds are chained (``next``) so that they finish
    strictly in order and a round's fdatasync goes out only after the previous round's
    succeeded.

    A failed fdatasync fails this round and every later round in flight: after an fdatasync
    error a later fdatasync's success proves nothing. ``finished`` turns True once the round
    is acknowledged or failed; ``ok`` says which. :meth:`wait` returns a future resolved then
    (for the committer's ``_drain``).
    """

    __slots__ = ("store", "items", "flushers", "last_seq", "batch_d", "want_sync", "dsync", "finished", "ok",
                 "next", "_waiters", "_t0", "_task")

    def __init__(self, store: "BlobStore", items: list, flushers: list, last_seq: int, batch_d: int,
                 want_sync: bool, dsync: bool = False):
        self.store = store
        self.items = items
        self.flushers = flushers
        self.last_seq = last_seq
        self.batch_d = batch_d
        self.want_sync = want_sync
        self.dsync = dsync
        self.finished = False
        self.ok = False
        self.next: _Round | None = None
        self._waiters: list | None = None
        self._t0 = 0.0
        self._task = None

    def wait(self) -> asyncio.Future:
        """A future resolved (None) once the round finished."""
        fut = asyncio.get_running_loop().create_future()
        if self.finished:
            fut.set_result(None)
        elif self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        return fut

    def start(self, prev_ok: bool) -> None:
        """The previous round finished (``prev_ok``: it succeeded): issue this round's fdatasync,
        or fail it when the previous one failed."""
        if self.finished:
            return
        st = self.store
        if not prev_ok:
            # an earlier round failed: the store is read-only, this round cannot be durable
            exc = IOFailed(f"{st.path}: the commit failed: an earlier commit failed; the store is now "
                           "read-only", _errno.EIO)
            _settle(self.items, self.flushers, exc)
            self._finish(False)
            return
        if not self.want_sync or self.dsync:
            self._apply(0.0)
            return
        self._t0 = time.perf_counter()
        try:
            queued = st._aio.run_nowait([_FSYNC_OP], self._synced)
        except BaseException as exc:
            self._synced([exc])
            return
        if not queued:  # no room in the queue depth now: await it
            self._task = asyncio.get_running_loop().create_task(self._sync_slow())
        else:
            st._aio.submit_now()  # on the critical path of every put of the round: not at the turn's end

    async def _sync_slow(self) -> None:
        try:
            await self.store._aio.fdatasync()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._synced([exc])
            return
        self._synced([0])

    def _synced(self, results: list) -> None:
        """The fdatasync's completion (``results``: its one result, an ``int`` or the exception)."""
        if self.finished:
            return  # cancelled meanwhile (abandon)
        r = results[0]
        st = self.store
        if isinstance(r, OSError):
            st._fail_round(self.items, self.flushers, r)
            self._finish(False)
            return
        if isinstance(r, BaseException):
            _settle(self.items, self.flushers, st._as_error(r, "the commit"))
            self._finish(False)
            return
        self._apply(time.perf_counter() - self._t0)

    def _apply(self, dt: float) -> None:
        """Committed: make visible (index, counters, replaced extents queued for freeing), acknowledge."""
        st = self.store
        items, flushers = self.items, self.flushers
        try:
            nsync = st._putpath.apply_round(items)
            if self.want_sync:
                st._durable_seq = max(st._durable_seq, self.last_seq)
                st._disk_durable = max(st._disk_durable, self.batch_d)
                c = st._counters
                if self.dsync:
                    c["dsync_commits"] += 1
                else:
                    c["fdatasyncs"] += 1
                    st._obs("on_fdatasync", dt)
                if nsync:
                    c["group_commits"] += 1
                    c["group_commit_writes"] += nsync
                    st._obs("on_group_commit", nsync)
                c["flushes"] += len(flushers)
            st._process_frees()
        except Exception as exc:  # a bug: never leave requests hanging
            log.exception("store: %s: finishing a commit failed", st.path)
            _settle(items, flushers, exc)
            st._go_read_only(f"an internal error ({exc!r})")
            self._finish(False)
            return
        _settle(items, flushers)
        self._finish(True)

    def _finish(self, ok: bool) -> None:
        self.finished = True
        self.ok = ok
        self.items = self.flushers = ()
        ws, self._waiters = self._waiters, None
        if ws:
            for f in ws:
                if not f.done():
                    f.set_result(None)
        nxt, self.next = self.next, None
        if nxt is not None:
            nxt.start(ok)

    def cancel(self) -> None:
        """Drop the round (the store is abandoned): its requests fail with :class:`ReadOnly`."""
        if self.finished:
            return
        if self._task is not None:
            self._task.cancel()
        _settle(self.items, self.flushers, ReadOnly(f"{self.store.path}: the store is closing"))
        self.next = None  # cancelled in turn by abandon
        self._finish(False)


class _GetEach:
    """The reads of one :meth:`BlobStore.get_each`: keys are started in order, through
    ``get_nowait`` while the buffer pool and queue depth take them, else (a value larger than
    one buffer, or empty) by a task awaiting ``get``. When the pool or queue is short the
    starting stops until one of this run's reads completes; with none of them in flight the
    key goes to a task (``get`` waits for a buffer). ``fut`` is resolved once every key has
    its result in ``results``; once it is cancelled (the caller went away) nothing more is
    started."""

    __slots__ = ("store", "keys", "results", "fut", "next", "active", "tasks")

    def __init__(self, store: "BlobStore", keys: Sequence, fut: asyncio.Future):
        self.store = store
        self.keys = keys
        self.results: list = [None] * len(keys)
        self.fut = fut
        self.next = 0  # the index of the next key to start
        self.active = 0  # reads of this run started and not finished
        self.tasks: set = set()

    def pump(self) -> None:
        """Start the next keys' reads, as many as the engine takes now."""
        store, keys, results = self.store, self.keys, self.results
        if self.fut.cancelled():
            return  # the caller is gone (an MGET whose connection closed): start nothing more
        n = len(keys)
        while self.next < n:
            i = self.next
            key = keys[i]
            try:
                queued = store.get_nowait(key, functools.partial(self._done, i))
            except Exception as exc:  # NotFound, InvalidKey, EngineClosed: this key's answer
                results[i] = exc
                self.next = i + 1
                continue
            if queued:
                self.active += 1
                self.next = i + 1
                continue
            length = store.value_size(key)
            if self.active and length and length <= store._aio.buffer_size:
                return  # the pool or queue is short: the next completion of ours starts it
            self.next = i + 1
            self.active += 1
            t = asyncio.ensure_future(self._get(i, key))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        if not self.active and not self.fut.done():
            self.fut.set_result(None)

    async def _get(self, i: int, key) -> None:
        try:
            self.results[i] = await self.store.get(key)
        except Exception as exc:
            self.results[i] = exc
        self._finished()

    def _done(self, i: int, value, err) -> None:
        self.results[i] = value if err is None else err
        self._finished()

    def _finished(self) -> None:
        self.active -= 1
        self.pump()


_OPEN_TOKEN = object()
