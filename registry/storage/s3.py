"""Blobs in an S3-compatible bucket (AWS S3, MinIO, ...): key ``<prefix>sha256/ab/<sha256>``.

Bytes are verified in the staging area before upload, and an S3 object becomes visible only
when its upload completes, so a key never shows partial or wrong content. Credentials come from
the usual AWS environment (``AWS_ACCESS_KEY_ID`` ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import CHUNK, SHA256_RE, BlobStore, StoredObject, check_sha


class S3BlobStore(BlobStore):
    name = "s3"

    def __init__(
        self, bucket: str, prefix: str = "blobs/", endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )
        self.transfer_config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)

    def key(self, sha256: str) -> str:
        check_sha(sha256)
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256}"

    def _head(self, sha256: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self.key(sha256)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int | None:
        head = self._head(sha256)
        return None if head is None else int(head["ContentLength"])

    def put(self, sha256: str, staged: Path) -> None:
        # Always (re)write: the object's LastModified then tells gc it is in use.
        size = staged.stat().st_size
        self.client.upload_file(
            str(staged), self.bucket, self.key(sha256),
            ExtraArgs={"Metadata": {"sha256": sha256}}, Config=self.transfer_config,
        )
        if self.size(sha256) != size:
            raise OSError(f"S3 object for {sha256} has the wrong size after upload")
        staged.unlink(missing_ok=True)

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return
        from botocore.exceptions import ClientError

        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256), Range=rng)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self.key(sha256)) from e
            raise
        body = obj["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def list_objects(self) -> Iterator[StoredObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"):
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if SHA256_RE.fullmatch(name):
                    yield StoredObject(name, int(obj["Size"]), obj["LastModified"].timestamp())
