"""Fault injection: an engine wrapper that turns chosen completions into I/O errors.

:class:`FaultyEngine` wraps any engine (``uring`` or ``psync``) and keeps its
contract, except that the writes, fdatasyncs or reads you pick complete with
``OSError(EIO)`` (or another errno), and ops linked after a failed one complete
with ``OSError(ECANCELED)``, as io_uring reports them. A failed write is a
*lost* write: the medium is not changed; ops cancelled by the link are not
performed either (each failed or
cancelled op is replaced by a read of the first block into the wrapper's own
scratch buffer, leased from the pool on the first injection, so chains keep
their shape and the caller's buffers are never written). The store is never
mocked: it sees exactly what a dying disk would show it.

Pass it to the store with ``BlobStore.open(path, wrap_engine=lambda e: FaultyEngine(e, ...))``
and keep a handle to arm it later::

    faulty = {}
    def wrap(e):
        faulty["e"] = FaultyEngine(e)
        return faulty["e"]
    store = await BlobStore.open(path, wrap_engine=wrap)
    faulty["e"].fail_next("fdatasync")       # the next fdatasync fails with EIO

Counters: ``writes``, ``fdatasyncs``, ``reads`` (ops queued), ``injected``
(completions turned into errors, cancellations included) and ``hits`` (ops
failed by :meth:`fail_range`, a bad spot on the medium).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = ["FaultyEngine"]

_KINDS = ("write", "fdatasync", "read")


class FaultyEngine:
    """Wrap ``inner``; fail the ``n``-th op of a kind counted from arming (1 = the next one).

    ``fail_write`` / ``fail_fdatasync`` / ``fail_read``: arm at construction
    (the n-th op of that kind from now fails). ``sticky=True``: once the first
    failure fired, every later op of that kind fails too (a dead disk).
    ``err``: the errno (default EIO).
    """

    def __init__(self, inner, *, fail_write: int | None = None, fail_fdatasync: int | None = None,
                 fail_read: int | None = None, sticky: bool = False, err: int = _errno.EIO):
        self._inner = inner
        self.err = err
        self.sticky = sticky
        self.writes = self.fdatasyncs = self.reads = 0
        self.injected = 0
        self._countdown: dict[str, int | None] = {"write": fail_write, "fdatasync": fail_fdatasync,
                                                  "read": fail_read}
        self._dead: dict[str, bool] = dict.fromkeys(_KINDS, False)
        self._fail: dict[Any, OSError] = {}
        self._chain_broken = False
        self._scratch = None  # leased on the first injected failure
        self._ranges: list[tuple[str, int, int]] = []
        self.hits = 0  # ops failed by fail_range

    # -- arming -------------------------------------------------------------------

    def fail_next(self, kind: str, n: int = 1) -> None:
        """The ``n``-th ``kind`` op (``"write"``, ``"fdatasync"``, ``"read"``) queued from now fails."""
        if kind not in _KINDS:
            raise ValueError(f"fail_next: kind must be one of {_KINDS}")
        self._countdown[kind] = n

    def fail_range(self, kind: str, start: int, end: int) -> None:
        """Every ``kind`` op touching file bytes ``[start, end)`` fails from now on (a bad spot
        on the medium), until :meth:`heal`."""
        if kind not in ("write", "read"):
            raise ValueError("fail_range: kind must be 'write' or 'read'")
        self._ranges.append((kind, start, end))

    def fail_all(self, kind: str) -> None:
        """Every ``kind`` op from now on fails (until :meth:`heal`)."""
        self._dead[kind] = True

    def heal(self) -> None:
        """Disarm everything."""
        self._countdown = dict.fromkeys(_KINDS, None)
        self._dead = dict.fromkeys(_KINDS, False)
        self._ranges = []

    def _doomed(self, kind: str, offset=None, length: int = 0) -> bool:
        if self._dead[kind]:
            return True
        if offset is not None:
            for k, a, b in self._ranges:
                if k == kind and offset < b and a < offset + length:
                    self.hits += 1
                    return True
        c = self._countdown[kind]
        if c is None:
            return False
        c -= 1
        if c <= 0:
            self._countdown[kind] = None
            if self.sticky:
                self._dead[kind] = True
            return True
        self._countdown[kind] = c
        return False

    def _mark(self, op: str, kind: str, tag, offset, link: bool, length: int = 0) -> bool:
        """Decide the fate of one queued op; returns True when it must not touch the medium."""
        where = f" at offset {offset}" if offset is not None else ""
        if self._chain_broken:
            self._fail[tag] = OSError(_errno.ECANCELED, f"{op}: ECANCELED (a linked op failed; injected){where}")
            skip = True
        elif self._doomed(kind, offset, length):
            name = _errno.errorcode.get(self.err, str(self.err))
            self._fail[tag] = OSError(self.err, f"{op}: {name} ({os.strerror(self.err)}; injected){where}")
            skip = True
            self._chain_broken = link
        else:
            skip = False
        if not link:
            self._chain_broken = False
        return skip

    # -- the engine contract -----------------------------------------------------------

    def _stand_in(self, tag, file_index: int, link: bool):
        """Queue a harmless op in place of a failed or cancelled one: a read of the first
        block into the wrapper's own scratch buffer, keeping the link flag, so the chain
        keeps its shape, the medium and the caller's buffer stay untouched, and the tag
        completes in order."""
        if self._scratch is None:
            self._scratch = self._inner.lease()
        bs = self._inner.block_size
        return self._inner.read_fixed(self._scratch, 0, bs, tag, file_index=file_index, link=link)

    def write_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False, dsync=False):
        self.writes += 1
        if self._mark("write_fixed", "write", tag, offset, link, length):
            return self._stand_in(tag, file_index, link)  # a lost write
        return self._inner.write_fixed(buf, offset, length, tag, buf_offset=buf_offset,
                                       file_index=file_index, link=link, dsync=dsync)

    def read_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False):
        self.reads += 1
        if self._mark("read_fixed", "read", tag, offset, link, length):
            return self._stand_in(tag, file_index, link)
        return self._inner.read_fixed(buf, offset, length, tag, buf_offset=buf_offset,
                                      file_index=file_index, link=link)

    def fdatasync(self, tag, *, file_index=0, link=False):
        self.fdatasyncs += 1
        if self._mark("fdatasync", "fdatasync", tag, None, link):
            return self._stand_in(tag, file_index, link)
        return self._inner.fdatasync(tag, file_index=file_index, link=link)

    @property
    def free_buffers(self) -> int:
        return self._inner.free_buffers

    def close(self) -> None:
        if self._scratch is not None and not self._inner.closed:
            try:
                self._inner.release(self._scratch)
            except Exception:
                pass
            self._scratch = None
        self._inner.close()

    def _map(self, cqes):
        out = []
        for tag, res in cqes:
            e = self._fail.pop(tag, None)
            if e is not None:
                self.injected += 1
                res = e
            out.append((tag, res))
        return out

    def reap(self, max_cqes: int = 256):
        return self._map(self._inner.reap(max_cqes))

    def wait(self, min_complete: int = 1, timeout=None):
        return self._map(self._inner.wait(min_complete, timeout))

    def __getattr__(self, name):  # lease, release, submit, counters, close, eventfd, ...
        return getattr(self._inner, name)
