"""A value received straight into leased fixed buffers of the store's engine.

:meth:`BlobStore.lease_value <ringblob.store.BlobStore.lease_value>` hands out a
:class:`LeasedValue`; whoever receives the value (the daemon's frame decoder)
fills it in place and :meth:`BlobStore.put_leased
<ringblob.store.BlobStore.put_leased>` writes each buffer from where it was
filled: no per-request buffer, no copy into the fixed buffers, and the BLAKE3
digest is computed piece by piece as the bytes arrive (while they are still in
the CPU cache). It knows nothing of sockets or keys.
"""

from __future__ import annotations

from typing import Callable, Sequence

import blake3

__all__ = ["LeasedValue"]


class LeasedValue:
    """``length`` bytes (>= 1) to be received into ``bufs`` (leased fixed buffers of
    ``buffer_size`` bytes each, ``ceil(length / buffer_size)`` of them): every buffer full but
    the last, each from its start (offset 0: O_DIRECT needs the data aligned).

    Fill it with :meth:`target` (a writable view of where the next bytes go) and
    :meth:`advance` (how many were written there; they are hashed at once), or
    :meth:`write` (copies). :meth:`release` gives the buffers back (idempotent; ``on_release``
    is called once with them); :meth:`BlobStore.put_leased` releases them itself.
    Attributes: ``length`` and ``received`` (bytes), ``complete``, ``released``.
    """

    __slots__ = ("length", "received", "_bufs", "_views", "_i", "_off", "_hasher", "_on_release")

    def __init__(self, bufs: Sequence, length: int, buffer_size: int, on_release: Callable[[list], None]):
        n = len(bufs)
        if length < 1 or n != -(-length // buffer_size):
            raise ValueError(f"LeasedValue: {n} buffers of {buffer_size} bytes cannot hold exactly "
                             f"{length} bytes")
        self.length = length
        self.received = 0
        self._bufs: list | None = list(bufs)
        # per buffer, the part the value fills: all of it but in the last one
        self._views = [b.view[:buffer_size] for b in self._bufs[:-1]]
        self._views.append(self._bufs[-1].view[: length - buffer_size * (n - 1)])
        self._i = 0  # the buffer being filled
        self._off = 0  # bytes of it filled
        self._hasher = blake3.blake3()
        self._on_release = on_release

    @property
    def complete(self) -> bool:
        """All ``length`` bytes were received."""
        return self.received == self.length

    @property
    def released(self) -> bool:
        return self._bufs is None

    @property
    def buffers(self) -> list:
        """The leased buffers, in value order (``ValueError`` once released)."""
        if self._bufs is None:
            raise ValueError("LeasedValue: its buffers were released")
        return self._bufs

    def target(self) -> memoryview | None:
        """A writable view of where the next bytes go: the unfilled rest of the current buffer,
        never past the value's end (at most ``buffer_size`` bytes); ``None`` once complete or
        released. Report what was written into it with :meth:`advance`."""
        if self.received >= self.length or self._bufs is None:
            return None
        return self._views[self._i][self._off :]

    def advance(self, nbytes: int) -> None:
        """``nbytes`` were written into the view :meth:`target` returned; they are hashed now.

        Raises ``ValueError`` when they do not fit that view (or the value was released).
        """
        if self._bufs is None or nbytes < 0 or self.received >= self.length:
            raise ValueError(f"LeasedValue.advance: {nbytes} bytes cannot be taken (released, complete or "
                             "negative)")
        view = self._views[self._i]
        off = self._off
        end = off + nbytes
        if end > len(view):
            raise ValueError(f"LeasedValue.advance: {nbytes} bytes at {self.received} pass the current "
                             f"buffer's end ({len(view) - off} bytes left in it)")
        if nbytes:
            with view[off:end] as piece:
                self._hasher.update(piece)
            if end == len(view):
                self._i += 1
                self._off = 0
            else:
                self._off = end
            self.received += nbytes

    def write(self, data) -> int:
        """Copy ``data`` (bytes-like, format ``B``) in, across buffers; returns the bytes taken
        (fewer than ``len(data)`` only when the value is complete)."""
        taken = 0
        with memoryview(data) as mv:
            n = len(mv)
            while taken < n:
                t = self.target()
                if t is None:
                    break
                k = min(len(t), n - taken)
                t[:k] = mv[taken : taken + k]
                t.release()
                self.advance(k)
                taken += k
        return taken

    def digest(self) -> bytes:
        """The BLAKE3 digest (32 bytes) of the value. ``ValueError`` before it is complete."""
        if self.received != self.length:
            raise ValueError(f"LeasedValue: {self.received} of {self.length} bytes received; the digest "
                             "needs the whole value")
        return self._hasher.digest()

    def release(self) -> None:
        """Give the buffers back (idempotent). After it, nothing may write into views of them."""
        bufs, self._bufs = self._bufs, None
        if bufs is not None:
            self._views = []
            self._on_release(bufs)

    def __repr__(self) -> str:
        state = "released" if self._bufs is None else f"{len(self._bufs)} buffers"
        return f"<LeasedValue {self.received}/{self.length} bytes, {state}>"
