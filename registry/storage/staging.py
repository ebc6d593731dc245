"""The upload staging area: files being received, hashed while they stream in.

Layout: ``<staging>/<draft id>/<n>.part``. A staged file becomes a blob only when its draft is
committed (see :mod:`registry.services.versions`); an abandoned draft's directory is removed by
``registry gc``. For several API replicas, point ``REGISTRY_STAGING_DIR`` at a shared volume (or
keep an upload's requests on one replica).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from .base import CHUNK

_HASH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hash")


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing dirty
    pages back without waiting, so disk writes overlap with receiving the next bytes."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE

    return start_writeback


_START_WRITEBACK = _sync_file_range()


def _each(fn: Callable[[bytes], Any], chunks: list[bytes]) -> None:
    for c in chunks:
        fn(c)


class HashingWriter:
    """Writes bytes to a file while computing their sha256 and size.

    Every ``SYNC_EVERY`` bytes the kernel is asked to start writing the new pages back (without
    waiting), so the ``fsync`` in :meth:`close`, which makes the file durable before any version
    can reference it, has little left to do. Hashing and writing of one batch run in parallel
    (:meth:`write_many`); both release the GIL.

    ``hasher``: the sha256 state to continue (an upload appended to over several requests), or
    None for a fresh one; ``hashing=False``: the bytes are not hashed at all (their digest is
    computed elsewhere), and :meth:`close` returns an empty string."""

    SYNC_EVERY = 32 << 20

    def __init__(self, path: Path, mode: str = "wb", *, hasher: Any = None, hashing: bool = True) -> None:
        self.path = path
        self._f: BinaryIO = open(path, mode)  # noqa: SIM115 - closed in close()
        self._h = (hasher if hasher is not None else hashlib.sha256()) if hashing else None
        self.size = 0
        self._synced_to = self._f.tell()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._f.write(data)
        if self._h is not None:
            self._h.update(data)
        self.size += len(data)
        self._writeback()

    def write_many(self, chunks: list[bytes], also: Callable[[bytes], None] | None = None) -> None:
        """Write ``chunks`` while helper threads hash them and run ``also`` on each (a stream
        check): hashing, checking and writing of one batch run at once, each in order."""
        futures = [_HASH_POOL.submit(_each, fn, chunks) for fn in (self._h.update if self._h is not None else None,
                                                                   also) if fn is not None]
        try:
            for c in chunks:
                self._f.write(c)
                self.size += len(c)
            self._writeback()
        finally:
            for fut in futures:
                fut.result()

    def _writeback(self) -> None:
        if _START_WRITEBACK is None:
            return
        end = self._f.tell()
        if end - self._synced_to >= self.SYNC_EVERY:
            self._f.flush()
            _START_WRITEBACK(self._f.fileno(), self._synced_to, end - self._synced_to)
            self._synced_to = end

    def close(self) -> str:
        """Flush to disk and return the hex sha256."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._h.hexdigest() if self._h is not None else ""

    def abort(self) -> None:
        """Close and delete the file."""
        self.abandon()
        self.path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Close without flushing to disk or deleting (the caller repairs the file)."""
        if not self._f.closed:
            self._f.close()


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 4):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class StagingArea:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def draft_dir(self, draft_id: str) -> Path:
        d = self.root / draft_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def new_file(self, draft_id: str) -> Path:
        return self.draft_dir(draft_id) / f"{uuid.uuid4().hex}.part"

    def staged_path(self, draft_id: str, sha256: str) -> Path:
        """Where a fully received, verified file of a draft waits for commit. Creates nothing: the
        file arrives by rename from the draft's directory, which ``new_file``/``upload_path`` made."""
        return self.root / draft_id / f"{sha256}.blob"

    def upload_path(self, draft_id: str, upload_id: str) -> Path:
        return self.draft_dir(draft_id) / f"upload-{upload_id}.part"

    def remove_draft(self, draft_id: str) -> None:
        shutil.rmtree(self.root / draft_id, ignore_errors=True)

    def draft_ids(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.is_dir()]
