"""Resumable uploads: a large file sent in chunks at explicit offsets.

The client can ask for the received offset after a failure and continue; the file joins its
draft (:mod:`registry.services.drafts`) only after a commit with the expected sha256. The
database's ``received`` is the truth: bytes past it on disk (a process killed mid-chunk) are cut
off before anything is appended. An upload belongs to its draft's creator.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy.orm import Session

from ..errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from ..formats.paths import clean_path
from ..formats.safetensors import StreamCheck
from ..models import Draft, UploadSession, utcnow
from ..storage import HashingWriter
from ..storage.staging import sha256_file
from .context import RegistryContext
from .drafts import accept_staged_file, check_sha_arg, draft_row, pump_body, stream_check
from .tokens import Principal

# upload id -> (sha256 state, stream check, offset): what this process saw of an upload so far.
_HASHERS: OrderedDict[str, tuple[Any, StreamCheck | None, int]] = OrderedDict()
_HASHERS_LOCK = threading.Lock()
_UPLOAD_LOCKS: dict[str, asyncio.Lock] = {}


def _upload_view(u: UploadSession) -> dict[str, Any]:
    return {"id": u.id, "draft": u.draft_id, "path": u.path, "size": u.size, "received": u.received}


def create_upload(ctx: RegistryContext, draft_id: str, path: str, size: int | None,
                  who: Principal | None = None) -> dict[str, Any]:
    path = clean_path(path)
    if size is not None and (size < 0 or size > ctx.settings.max_file_bytes):
        raise PayloadTooLarge(f"{path}: {size} bytes exceeds the limit of {ctx.settings.max_file_bytes}")
    upload = UploadSession(id=str(uuid.uuid4()), path=path, size=size, received=0)
    with ctx.db.write() as s:
        draft_row(s, draft_id, who)
        upload.draft_id = draft_id
        s.add(upload)
    ctx.staging.upload_path(draft_id, upload.id).touch()
    with _HASHERS_LOCK:
        _HASHERS[upload.id] = (hashlib.sha256(), stream_check(ctx, path, None), 0)
        while len(_HASHERS) > 256:
            _HASHERS.popitem(last=False)
    return _upload_view(upload)


def _get_upload(s: Session, upload_id: str, who: Principal | None = None) -> UploadSession:
    u = s.get(UploadSession, upload_id)
    if u is not None and who is not None and not who.allows("admin"):
        draft = s.get(Draft, u.draft_id)
        if draft is None or not who.owns(draft.created_by):  # an upload belongs to its draft's creator
            u = None
    if u is None:
        raise NotFound(f"upload {upload_id} not found", code="upload_not_found", details={"upload": upload_id})
    return u


def get_upload(ctx: RegistryContext, upload_id: str, who: Principal | None = None) -> dict[str, Any]:
    with ctx.db.read() as s:
        return _upload_view(_get_upload(s, upload_id, who))


def _try_flock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the in-process lock is all there is
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class PartLock:
    """An exclusive lock on an upload's .part file, across API processes: a chunk resent after a
    broken connection may reach another process while the first one still writes the old try.
    Held with ``async with`` (an event loop waits without blocking) or ``with`` (a worker thread).
    No file: nothing to protect; closing the descriptor releases the lock."""

    POLL_SECONDS = 0.05

    def __init__(self, part: Path) -> None:
        self.part = part
        self.fd: int | None = None

    def _try(self) -> bool:
        """One try: True once the lock is held, or when there is no file to lock."""
        if self.fd is None:
            try:
                self.fd = os.open(self.part, os.O_RDWR)
            except FileNotFoundError:
                return True
        return _try_flock(self.fd)

    def _release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> None:
        try:
            while not self._try():
                time.sleep(self.POLL_SECONDS)
        except BaseException:
            self._release()
            raise

    async def __aenter__(self) -> None:
        try:
            while not self._try():
                await asyncio.sleep(self.POLL_SECONDS)
        except BaseException:
            self._release()
            raise

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._release()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._release()


def _cut_back(ctx: RegistryContext, upload_id: str, part: Path, received: int) -> int:
    """Make the .part file hold exactly the ``received`` bytes the database recorded (the truth).

    A process killed while a chunk streamed in, or between writing a chunk and recording it, leaves
    bytes past ``received``: they are cut off (and the cut made durable) before anything is appended.
    A file shorter than ``received`` (bytes lost below the application) moves ``received`` back to what
    is really there. Returns the bytes the upload now holds."""
    try:
        on_disk = part.stat().st_size
    except FileNotFoundError:
        part.touch()
        on_disk = 0
    if on_disk > received:
        with open(part, "r+b") as f:
            f.truncate(received)
            f.flush()
            os.fsync(f.fileno())
        return received
    if on_disk < received:
        with ctx.db.write() as s:
            u = _get_upload(s, upload_id)
            u.received = on_disk
            u.updated_at = utcnow()
    return on_disk


async def append_chunk(ctx: RegistryContext, upload_id: str, offset: int, body: AsyncIterator[bytes],
                       who: Principal | None = None) -> dict[str, Any]:
    """Append bytes at ``offset`` (which must equal the bytes received so far). An interrupted
    chunk is cut back to the last acknowledged offset, so the client simply resends it."""
    view = await asyncio.to_thread(get_upload, ctx, upload_id, who)  # 404 before any lock is made for an id
    async with (_UPLOAD_LOCKS.setdefault(upload_id, asyncio.Lock()),
                PartLock(ctx.staging.upload_path(view["draft"], upload_id))):
        return await _append_locked(ctx, upload_id, offset, body)


async def _append_locked(ctx: RegistryContext, upload_id: str, offset: int,
                         body: AsyncIterator[bytes]) -> dict[str, Any]:
    view = await asyncio.to_thread(get_upload, ctx, upload_id)  # again: another process may have appended
    if offset != view["received"]:
        raise Conflict(f"upload {upload_id} has {view['received']} bytes; send the chunk at that offset",
                       code="offset_mismatch", details={"received": view["received"], "offset": offset})
    part = ctx.staging.upload_path(view["draft"], upload_id)
    held = await asyncio.to_thread(_cut_back, ctx, upload_id, part, view["received"])
    if held != offset:
        raise Conflict(f"upload {upload_id} has {held} bytes; send the chunk at that offset",
                       code="offset_mismatch", details={"received": held, "offset": offset})
    with _HASHERS_LOCK:
        state = _HASHERS.pop(upload_id, None)
    # Chunks arrive in order at this process: keep hashing and checking as they stream.
    hasher, check = (state[0], state[1]) if state is not None and state[2] == offset else (None, None)
    limit = view["size"] if view["size"] is not None else ctx.settings.max_file_bytes
    # The writer continues the upload's hash (no hash at all when its state is gone: the commit
    # reads the file again), so every byte is hashed once.
    writer = HashingWriter(part, mode="ab", hasher=hasher, hashing=hasher is not None)
    writer.size = offset
    try:
        await pump_body(body, writer, limit, view["path"], check=check, timeout=ctx.settings.body_timeout_seconds)
        await asyncio.to_thread(writer.close)  # fsync: durable before ``received`` says so
    except BaseException:
        writer.abandon()
        with open(part, "r+b") as f:
            f.truncate(offset)
        raise
    received = writer.size

    def record() -> None:
        with ctx.db.write() as s:
            u = _get_upload(s, upload_id)
            u.received = received
            u.updated_at = utcnow()

    await asyncio.to_thread(record)
    if hasher is not None:
        with _HASHERS_LOCK:
            _HASHERS[upload_id] = (hasher, check, received)
    return {**view, "received": received}


def complete_upload(ctx: RegistryContext, upload_id: str, sha256: str, who: Principal | None = None) -> dict[str, Any]:
    """Finish an upload: the received bytes must hash to ``sha256`` (and match the declared size)."""
    expected = check_sha_arg(sha256)
    with ctx.db.read() as s:
        draft_id = _get_upload(s, upload_id, who).draft_id
    with PartLock(ctx.staging.upload_path(draft_id, upload_id)):
        return _complete_locked(ctx, upload_id, expected)


def _complete_locked(ctx: RegistryContext, upload_id: str, expected: str | None) -> dict[str, Any]:
    with ctx.db.read() as s:
        u = _get_upload(s, upload_id)
        draft_id, path, size, received = u.draft_id, u.path, u.size, u.received
    part = ctx.staging.upload_path(draft_id, upload_id)
    if not part.exists() and received and ctx.staging.staged_path(draft_id, expected or "").exists():
        # killed after the verified file was moved into the draft, before the session was closed
        part = ctx.staging.staged_path(draft_id, expected or "")
    else:
        received = _cut_back(ctx, upload_id, part, received)
    if size is not None and received != size:
        raise Conflict(f"upload {upload_id} has {received} of {size} bytes", code="upload_incomplete",
                       details={"received": received, "size": size})
    with _HASHERS_LOCK:
        state = _HASHERS.pop(upload_id, None)
    check: StreamCheck | None = None
    if state is not None and state[2] == received:
        actual, check = state[0].hexdigest(), state[1]
    else:  # another process received some chunks, or the server restarted: read the file again
        actual, _ = sha256_file(part)
    if actual != expected:
        with ctx.db.write() as s:
            s.delete(_get_upload(s, upload_id))
        part.unlink(missing_ok=True)
        raise BadRequest(f"{path}: uploaded bytes hash to {actual}, not the expected {expected}; upload "
                         "discarded", code="checksum_mismatch",
                         details={"path": path, "expected": expected, "actual": actual})
    try:
        result = accept_staged_file(ctx, draft_id, path, part, actual, received, check)
    except BaseException:
        with ctx.db.write() as s:
            u = s.get(UploadSession, upload_id)
            if u is not None:
                s.delete(u)
        raise
    with ctx.db.write() as s:
        u = s.get(UploadSession, upload_id)
        if u is not None:
            s.delete(u)
    _UPLOAD_LOCKS.pop(upload_id, None)
    return result


def abort_upload(ctx: RegistryContext, upload_id: str, who: Principal | None = None) -> None:
    with ctx.db.write() as s:
        u = _get_upload(s, upload_id, who)
        draft_id = u.draft_id
        s.delete(u)
    ctx.staging.upload_path(draft_id, upload_id).unlink(missing_ok=True)
    with _HASHERS_LOCK:
        _HASHERS.pop(upload_id, None)
    _UPLOAD_LOCKS.pop(upload_id, None)
