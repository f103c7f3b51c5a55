"""Type stubs for the store's GET request path (cython/_storeget.pyx), used by
ringblob.store.blobstore.BlobStore.get_nowait."""

from typing import Any, Callable

class GetPath:
    def __init__(self, store: Any, index: Any, read_nowait: Callable[..., bool], pins: dict[int, int],
                 free_on_unpin: dict[int, int], alloc_free: Callable[[int, int], None], counters: dict[str, int],
                 page_size: int, check_key: Callable[[Any], bytes]) -> None: ...
    def get_nowait(self, key: bytes, done: Callable[[bytes | None, BaseException | None], Any],
                   max_size: int | None = None) -> int: ...
