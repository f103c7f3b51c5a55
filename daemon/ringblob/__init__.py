"""ringblob: a Linux io_uring blob-storage daemon.

Layers (see DESIGN.md): the engine (:mod:`ringblob.engine`, the Cython
``ringblob._uring``), the store (:mod:`ringblob.store`), the server, and the
clients. Errors: :mod:`ringblob.errors`.
"""

__version__ = "0.1.0"

__all__ = ["Client", "AsyncClient", "__version__"]


def __getattr__(name: str):
    # ringblob.Client / ringblob.AsyncClient (see ringblob.client), imported on first use so that
    # `import ringblob.<module>` stays light for the daemon, the engine and doctor.
    if name in ("Client", "AsyncClient"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'ringblob' has no attribute {name!r}")
