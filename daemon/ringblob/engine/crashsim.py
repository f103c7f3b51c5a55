"""Power-loss simulation: an engine wrapper that records what a crash may lose.

:class:`CrashRecorder` wraps any engine of the :mod:`ringblob.engine`
contract. Before a write is handed to the inner engine it appends to a
*crash log* (an ordinary file, flushed to the kernel at once so it survives
SIGKILL of the process): the write's id, offset, the bytes it replaces and the
bytes it writes. It also logs each write's completion as the caller reaps it,
and, when an fdatasync completes successfully, which writes that fdatasync
covered: those whose completion the caller had reaped before it queued the
fdatasync, plus the writes linked ahead of it in its chain (IOSQE_IO_LINK).
A write queued with ``dsync=True`` (RWF_DSYNC) covers itself: it is logged
as durable once the caller reaps its successful completion. That is exactly
what a correct store may rely on.

After the process is killed, :func:`simulate_power_loss` reads the log and
turns the data file into one state the medium could hold after a power cut,
in the manner of SQLite's crash VFS: every write not covered by a completed
fdatasync is first undone, then a random subset of them is applied again in a
random order, each 4 KiB sector of each write independently written, dropped
or filled with garbage. The same seed gives the same image. No order among
unsynced writes is assumed — not queue order, not link order, not completion
order: a journal batch may survive a power cut without the data writes
queued (or linked) before it, which is why recovery verifies every record
above the durable point.

Used by the power-loss suite (tests/test_powerloss.py and ``make torture``);
it is test machinery, not part of the daemon's I/O path.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["CrashRecorder", "simulate_power_loss", "CrashOutcome", "SECTOR"]

SECTOR = 4096  # tearing granularity (bytes)
_UNIT = 512  # bookkeeping granularity: the smallest logical block size
# log entries: 1-byte kind, then fields
_W = b"W"  # write: <QqI id offset length> old new
_C = b"C"  # write completed ok: <Q id>
_S = b"S"  # fdatasync completed ok, covering: <I count> <Q id>*count
_HDR_W = struct.Struct("<QqI")


class _Tagged:
    """Wraps the caller's tag so the recorder can see its own ops in completions."""

    __slots__ = ("tag", "kind", "wid", "covers")

    def __init__(self, tag: Any, kind: str, wid: int = 0, covers: tuple = ()):
        self.tag = tag
        self.kind = kind
        self.wid = wid
        self.covers = covers


class CrashRecorder:
    """Engine wrapper that logs writes and fdatasync coverage to ``log_path``.

    ``inner``: the engine the store opened over ``data_path`` (uring or
    psync). The recorder reads the bytes a write replaces through its own
    buffered descriptor on ``data_path``. With ``deterministic=True`` it closes
    ``inner`` and runs a psync engine with ``threads=0`` over its own O_DIRECT
    descriptor instead: every op runs inline at ``submit()``, so a seeded
    workload produces the same log, byte for byte, every time.

    ``crash_after``: after that many ops have been queued the power is cut:
    later ops are swallowed (never performed, never completed), ``crashed``
    turns True and ``on_crash`` (if given) is called once. Every attribute
    of the contract not overridden here is the engine's.
    """

    def __init__(self, inner, data_path: str, log_path: str, *, deterministic: bool = False,
                 crash_after: int | None = None, on_crash=None):
        self._own_file = None
        if deterministic:
            from ..direct import open_direct
            from .psync import PsyncEngine

            self._own_file = open_direct(data_path)
            replacement = PsyncEngine(
                [self._own_file.fd], block_size=inner.block_size, buffer_size=inner.buffer_size,
                buffer_count=inner.buffer_count, queue_depth=inner.queue_depth, threads=0,
            )
            inner.close()
            inner = replacement
        self._inner = inner
        self._reader = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        self._log = open(log_path, "ab", buffering=0)
        self._next_id = 1
        self._reaped: set[int] = set()  # completed writes not yet covered by a completed fdatasync
        self._chain: list[int] = []  # writes queued with link=True, ahead of the next op
        self.ops = 0
        self.crash_after = crash_after
        self.crashed = False
        self._on_crash = on_crash

    def _power_on(self) -> bool:
        """Count one op; False once the power has been cut."""
        if self.crashed:
            return False
        self.ops += 1
        if self.crash_after is not None and self.ops > self.crash_after:
            self.crashed = True
            if self._on_crash is not None:
                self._on_crash()
            return False
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # -- queueing -------------------------------------------------------------

    def write_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False, dsync=False) -> None:
        if not self._power_on():
            return
        wid = self._next_id
        self._next_id += 1
        old = os.pread(self._reader, length, offset)
        old = old + b"\0" * (length - len(old))
        new = bytes(buf.view[buf_offset : buf_offset + length])
        self._log.write(_W + _HDR_W.pack(wid, offset, length) + old + new)
        self._inner.write_fixed(
            buf, offset, length, _Tagged(tag, "d" if dsync else "w", wid), buf_offset=buf_offset,
            file_index=file_index, link=link, dsync=dsync,
        )
        if link:
            self._chain.append(wid)
        else:
            self._chain = []

    def read_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False) -> None:
        if not self._power_on():
            return
        self._inner.read_fixed(
            buf, offset, length, _Tagged(tag, "r"), buf_offset=buf_offset, file_index=file_index, link=link
        )
        if not link:
            self._chain = []

    def fdatasync(self, tag, *, file_index=0, link=False) -> None:
        if not self._power_on():
            return
        covers = tuple(self._reaped) + tuple(self._chain)
        self._chain = []
        self._inner.fdatasync(_Tagged(tag, "s", covers=covers), file_index=file_index, link=link)

    # -- completions ----------------------------------------------------------

    def _translate(self, pairs: list) -> list:
        out = []
        for t, result in pairs:
            if t.kind == "w" and not isinstance(result, BaseException):
                self._log.write(_C + struct.pack("<Q", t.wid))
                self._reaped.add(t.wid)
            elif t.kind == "d" and not isinstance(result, BaseException):
                # RWF_DSYNC: durable once completed, no fdatasync needed
                self._log.write(_C + struct.pack("<Q", t.wid) + _S + struct.pack("<IQ", 1, t.wid))
            elif t.kind == "s" and not isinstance(result, BaseException):
                self._log.write(_S + struct.pack(f"<I{len(t.covers)}Q", len(t.covers), *t.covers))
                self._reaped.difference_update(t.covers)
            out.append((t.tag, result))
        return out

    def reap(self, max_cqes: int = 256) -> list:
        return self._translate(self._inner.reap(max_cqes))

    def wait(self, min_complete: int = 1, timeout: float | None = None) -> list:
        return self._translate(self._inner.wait(min_complete, timeout))

    def close(self) -> None:
        self._inner.close()
        if self._own_file is not None:
            self._own_file.close()
        if self._reader >= 0:
            os.close(self._reader)
            self._reader = -1
        self._log.close()


@dataclass
class _Write:
    wid: int
    offset: int
    old: bytes
    new: bytes


@dataclass
class CrashOutcome:
    """What :func:`simulate_power_loss` did: counts of writes and sectors."""

    unsynced_writes: int = 0
    applied_sectors: int = 0
    dropped_sectors: int = 0
    garbage_sectors: int = 0
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def _parse_log(log_path: str) -> tuple[list[_Write], set[int]]:
    """Return (writes in log order, ids durable by a completed fdatasync).

    A torn last entry (the process died while logging) is ignored; its write
    was never handed to the engine.
    """
    with open(log_path, "rb") as f:
        data = f.read()
    writes: list[_Write] = []
    durable: set[int] = set()
    pos = 0
    while pos < len(data):
        kind = data[pos : pos + 1]
        pos += 1
        if kind == _W:
            if pos + _HDR_W.size > len(data):
                break
            wid, offset, length = _HDR_W.unpack_from(data, pos)
            end = pos + _HDR_W.size + 2 * length
            if end > len(data):
                break
            body = pos + _HDR_W.size
            writes.append(_Write(wid, offset, data[body : body + length], data[body + length : end]))
            pos = end
        elif kind == _C:
            if pos + 8 > len(data):
                break
            pos += 8
        elif kind == _S:
            if pos + 4 > len(data):
                break
            (n,) = struct.unpack_from("<I", data, pos)
            if pos + 4 + 8 * n > len(data):
                break
            durable.update(struct.unpack_from(f"<{n}Q", data, pos + 4))
            pos += 4 + 8 * n
        else:
            raise ValueError(f"crash log {log_path}: unknown entry {kind!r} at byte {pos - 1}")
    return writes, durable


def simulate_power_loss(data_path: str, log_path: str, seed: int, *, p_write: float = 0.5, p_garbage: float = 0.15) -> CrashOutcome:
    """Turn ``data_path`` into a state a power cut could have left, from ``log_path``.

    Writes not covered by a completed fdatasync are undone (each unit they
    touched gets back what the medium surely held), then, in a random order,
    each sector of each such write is written with probability ``p_write``, filled with random bytes with ``p_garbage``, or
    else dropped. Deterministic for a given ``seed``. The file is modified in
    place through buffered I/O and fsynced.
    """
    rng = random.Random(seed)
    writes, durable = _parse_log(log_path)
    # Where a durable write later in the log covers a unit, an older unsynced
    # write there is superseded: it is neither undone nor applied again.
    last_durable: dict[int, int] = {}
    for i, w in enumerate(writes):
        if w.wid in durable:
            for u in range(w.offset // _UNIT, (w.offset + len(w.new)) // _UNIT):
                last_durable[u] = i
    unsynced = [(i, w) for i, w in enumerate(writes) if w.wid not in durable]
    out = CrashOutcome(unsynced_writes=len(unsynced), seed=seed)

    def live(i: int, off: int) -> bool:
        return last_durable.get(off // _UNIT, -1) < i

    # What the medium surely holds in each unit an unsynced write touched: the
    # bytes of the last durable write there, else the bytes the first logged
    # write there replaced. (Not each write's own "old" bytes: with writes to one
    # range in flight together, those may predate a write that became durable.)
    base: dict[int, bytes] = {}
    for i, w in enumerate(writes):
        for k in range(0, len(w.new), _UNIT):
            u = (w.offset + k) // _UNIT
            if w.wid in durable:
                base[u] = w.new[k : k + _UNIT]
            elif u not in base:
                base[u] = w.old[k : k + _UNIT]
    fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        undone: set[int] = set()
        for _i, w in unsynced:
            for k in range(0, len(w.new), _UNIT):
                u = (w.offset + k) // _UNIT
                if u not in undone:
                    undone.add(u)
                    os.pwrite(fd, base[u], u * _UNIT)
        order = list(unsynced)
        rng.shuffle(order)
        for i, w in order:
            for s in range(0, len(w.new), SECTOR):
                r = rng.random()
                n = min(SECTOR, len(w.new) - s)
                if r < p_write:
                    chunk, out.applied_sectors = w.new[s : s + n], out.applied_sectors + 1
                elif r < p_write + p_garbage:
                    chunk, out.garbage_sectors = rng.randbytes(n), out.garbage_sectors + 1
                else:
                    out.dropped_sectors += 1
                    continue
                for u in range(0, n, _UNIT):
                    if live(i, w.offset + s + u):
                        os.pwrite(fd, chunk[u : u + _UNIT], w.offset + s + u)
        os.fsync(fd)
    finally:
        os.close(fd)
    return out
