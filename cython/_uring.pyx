# cython: language_level=3
"""ringblob._uring — the io_uring engine (being written; see ringblob.engine for the contract)."""
