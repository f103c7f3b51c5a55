"""A value received straight into leased fixed buffers of the store's engine.

:meth:`BlobStore.lease_value <ringblob.store.BlobStore.lease_value>` hands out a
:class:`LeasedValue`; whoever receives the value (the daemon's frame decoder)
fills it in place and :meth:`BlobStore.put_leased
<ringblob.store.BlobStore.put_leased>` writes each buffer from where it was
filled: no per-request buffer, no copy into the fixed buffers, and the BLAKE3
digest is computed buffer by buffer as they fill (while the bytes are still in
the CPU cache). It knows nothing of sockets or keys.

The implementation is the Cython class :class:`ringblob._leased.LeasedValue`
(source: ``cython/_leased.pyx``): a large value arrives in about ten socket
reads per MiB, each one asking :meth:`LeasedValue.target` and calling
:meth:`LeasedValue.advance`, and those are C methods there. This module
re-exports it.
"""

from __future__ import annotations

try:
    from .._leased import LeasedValue
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled LeasedValue (ringblob._leased) does not import ({exc}); build the extensions "
        "with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = ["LeasedValue"]
