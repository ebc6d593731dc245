"""Content-addressed blob stores and the upload staging area.

A blob is addressed by the sha256 of its bytes. Bytes reach a store only through
:meth:`BlobStore.put` with a file whose hash was already verified in the staging area, so a blob
key is never visible with the wrong content, and identical files are stored once.
"""

from __future__ import annotations

from ..config import Settings
from .base import BlobStore, StoredObject
from .local import LocalBlobStore
from .staging import HashingWriter, StagingArea

__all__ = ["BlobStore", "HashingWriter", "LocalBlobStore", "StagingArea", "StoredObject", "open_store"]


def open_store(settings: Settings) -> BlobStore:
    if settings.storage == "s3":
        from .s3 import S3BlobStore

        if not settings.s3_bucket:
            raise ValueError("REGISTRY_STORAGE=s3 needs REGISTRY_S3_BUCKET")
        return S3BlobStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return LocalBlobStore(settings.resolved_blob_dir)
