"""The blob store: keys to copy-on-write extents on one O_DIRECT file.

``from ringblob.store import BlobStore`` — see :class:`BlobStore` for the API
and docs/FORMAT.md for the on-disk format.
"""

from .blobstore import DEFAULT_MAX_BLOB_SIZE, BlobStore

__all__ = ["BlobStore", "DEFAULT_MAX_BLOB_SIZE"]
