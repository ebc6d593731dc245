"""Blobs as files under a directory: ``<root>/sha256/ab/cd/<sha256>``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .base import CHUNK, SHA256_RE, BlobStore, StoredObject, check_sha


class LocalBlobStore(BlobStore):
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        check_sha(sha256)
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, sha256: str, staged: Path) -> None:
        dest = self.path(sha256)
        if dest.exists() and dest.stat().st_size == staged.stat().st_size:
            os.utime(dest)
            staged.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, dest)  # atomic on one filesystem
            _fsync_dir(dest.parent)  # the rename itself survives a power cut
            return
        except OSError:
            pass
        # Different filesystems: copy to a temporary name beside the destination, then rename.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(staged, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        staged.unlink(missing_ok=True)

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                data = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list_objects(self) -> Iterator[StoredObject]:
        for p in (self.root / "sha256").glob("*/*/*"):
            if SHA256_RE.fullmatch(p.name):
                st = p.stat()
                yield StoredObject(p.name, st.st_size, st.st_mtime)

    def local_path(self, sha256: str) -> Path | None:
        p = self.path(sha256)
        return p if p.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
