"""The blob store interface."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 4 << 20  # read/stream granularity: big enough to amortise per-chunk overhead


def check_sha(sha256: str) -> str:
    if not SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return sha256


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    size: int
    mtime: float  # seconds since the epoch


class BlobStore(ABC):
    """Where verified blobs live. Implementations must make ``put`` atomic: a reader sees the
    whole blob or nothing."""

    name: str

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def size(self, sha256: str) -> int | None:
        """Size in bytes, or None when absent."""

    @abstractmethod
    def put(self, sha256: str, staged: Path) -> None:
        """Move a staged file whose sha256 is already verified into the store (consumes it)."""

    @abstractmethod
    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) in chunks; ``end`` None means to the end."""

    @abstractmethod
    def delete(self, sha256: str) -> None: ...

    @abstractmethod
    def list_objects(self) -> Iterator[StoredObject]:
        """Every blob in the store (for gc)."""

    def local_path(self, sha256: str) -> Path | None:
        """A local file holding the blob, when the store has one (fast paths: mmap, sendfile)."""
        return None

    def read_bytes(self, sha256: str, start: int = 0, end: int | None = None) -> bytes:
        return b"".join(self.iter_range(sha256, start, end))
