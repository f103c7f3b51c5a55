"""ringblob: a Linux io_uring blob-storage daemon.

Layers (see DESIGN.md): the engine (:mod:`ringblob.engine`, the Cython
``ringblob._uring``), the store (:mod:`ringblob.store`), the server, and the
clients. Errors: :mod:`ringblob.errors`.
"""

__version__ = "0.1.0"
