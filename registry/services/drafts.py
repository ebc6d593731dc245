"""Pushing a version: draft -> files (streamed, hashed, validated on arrival) -> commit.

A draft is invisible, and private to the principal that created it: another principal without
the admin scope is told it does not exist (``who`` in the functions below; ``None`` is the server
itself, e.g. a worker ingesting its output). Its files sit in the staging area, not in the blob store, and no version
row exists. :func:`commit` validates the whole version, moves staged files into the blob store
(content-addressed: identical files are stored once) and then, in ONE database transaction,
allocates the next version number, records blobs, manifest, lineage, tags, aliases and an event.
If anything fails, no version exists. A file's blob row is claimed (``pending``) when it joins the
draft, before its bytes move anywhere, so gc never removes bytes a commit may still reference
(:mod:`registry.services.blobs`); an abandoned draft's claims and bytes are removed by ``registry gc``.

Large files use resumable upload sessions: chunks are appended at explicit offsets, the client
can ask for the received offset after a failure and continue, and the file joins the draft only
after a commit with the expected sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session, lazyload

from ..errors import BadRequest, Conflict, InvalidInput, NotFound, PayloadTooLarge, RequestTimeout
from ..formats import inspect as fmt
from ..formats.paths import clean_path
from ..formats.safetensors import StreamCheck, iter_file
from ..models import (
    DerivedFile,
    Draft,
    DraftFile,
    LineageEdge,
    Model,
    ModelVersion,
    Relation,
    UploadSession,
    VersionFile,
    VersionTag,
    utcnow,
)
from ..storage import HashingWriter
from ..storage.base import SHA256_RE
from ..storage.staging import sha256_file
from . import blobs, content, names
from .aliases import set_row
from .context import RegistryContext
from .events import emit
from .refs import parse_ref, resolve
from .sql import insert_ignore
from .tokens import Principal
from .views import VersionView, version_view

BATCH_BYTES = 8 << 20  # hand received bytes to a worker thread in batches of this size


# ----------------------------------------------------------------------------- drafts


@dataclass
class DraftSpec:
    model: str
    kind: str | None
    base: str | None
    tags: dict[str, str]
    aliases: list[str]
    description: str
    parents: list[dict[str, Any]]


def _draft_view(draft: Draft) -> dict[str, Any]:
    return {
        "id": draft.id,
        "model": draft.model_name,
        **draft.spec,
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in draft.files],
        "created_at": draft.created_at,
    }


def create_draft(ctx: RegistryContext, spec: DraftSpec, actor: str | None) -> dict[str, Any]:
    """Start a push. Names, kind, base and parent refs are checked now, so a bad push fails
    before any byte is uploaded."""
    names.model_name(spec.model)
    if spec.kind is not None:
        names.kind(spec.kind)
    tags = names.tags(spec.tags)
    names.tag_budget(tags, max_count=ctx.settings.max_tags, max_bytes=ctx.settings.max_tag_bytes)
    aliases = [names.alias_name(a) for a in spec.aliases]
    description = names.description(spec.description)
    parents = [_check_parent(p) for p in spec.parents]
    with ctx.db.read() as s:
        model = s.scalar(_model_named(spec.model))
        if model is not None and spec.kind is not None and model.kind != spec.kind:
            raise Conflict(f"model {spec.model!r} holds {model.kind} versions, not {spec.kind}",
                           code="kind_mismatch", details={"model": spec.model, "kind": model.kind})
        if spec.base is not None:
            resolve_base(s, spec.base)
        for p in parents:
            resolve_body_ref(s, p["ref"], "parent")
    draft = Draft(
        id=str(uuid.uuid4()),
        model_name=spec.model,
        created_by=actor,
        spec={"kind": spec.kind, "base": spec.base, "tags": tags, "aliases": aliases,
              "description": description, "parents": parents},
        files=[],  # known empty: no query to load it
    )
    with ctx.db.write() as s:
        s.add(draft)
        s.flush()
        view = _draft_view(draft)
    return view  # its staging directory is made when the first byte arrives (a link-only push needs none)


def _check_parent(p: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(p, dict) or not isinstance(p.get("ref"), str):
        raise InvalidInput("each parent needs a 'ref'", code="invalid_parent")
    relation = p.get("relation", Relation.merge_of.value)
    if relation not in {r.value for r in Relation}:
        raise InvalidInput(f"unknown lineage relation {relation!r}", code="invalid_relation",
                           details={"allowed": [r.value for r in Relation]})
    params = p.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidInput("parent params must be an object", code="invalid_parent")
    parse_ref(p["ref"])
    return {"ref": p["ref"], "relation": relation, "params": params}


def resolve_body_ref(s: Session, ref: str, what: str) -> ModelVersion:
    """Resolve a ref given in a request body: unknown refs are a 422, not a 404 of the URL."""
    try:
        v = resolve(s, ref, include_archived=False)
    except NotFound as e:
        raise InvalidInput(f"unknown {what} {ref!r}: {e.message}", code=f"unknown_{what}",
                           details={"ref": ref}) from None
    if v.archived_at is not None:
        raise InvalidInput(f"{what} {ref} is archived", code=f"unknown_{what}", details={"ref": ref})
    return v


def resolve_base(s: Session, ref: str) -> ModelVersion:
    v = resolve_body_ref(s, ref, "base")
    if v.kind not in names.FULL_MODEL_KINDS:
        raise InvalidInput(f"base {ref} is an {v.kind}; a base must be a full model", code="invalid_base",
                           details={"ref": ref, "kind": v.kind})
    if v.status != "ready":
        raise InvalidInput(f"base {ref} is {v.status}, not ready", code="invalid_base", details={"ref": ref})
    return v


def _get_draft(s: Session, draft_id: str, who: Principal | None = None) -> Draft:
    draft = s.get(Draft, draft_id)
    if draft is None or (who is not None and not who.owns(draft.created_by)):
        raise NotFound(f"draft {draft_id} not found (committed, aborted or expired)", code="draft_not_found",
                       details={"draft": draft_id})
    return draft


def get_draft(ctx: RegistryContext, draft_id: str, who: Principal | None = None) -> dict[str, Any]:
    with ctx.db.read() as s:
        return _draft_view(_get_draft(s, draft_id, who))


def abort_draft(ctx: RegistryContext, draft_id: str, who: Principal | None = None) -> None:
    """Discard a draft: its staged bytes, and the blob claims nothing else holds."""
    with ctx.db.write() as s:
        draft = _get_draft(s, draft_id, who)
        claimed = [f.sha256 for f in draft.files]
        s.delete(draft)
    ctx.staging.remove_draft(draft_id)
    blobs.release(ctx, claimed)


# ----------------------------------------------------------------------------- receiving files


def _wants_finite_scan(ctx: RegistryContext, draft_kind: str | None, path: str) -> bool:
    mode = ctx.settings.check_finite
    if mode == "all":
        return True
    if mode == "adapters":
        return draft_kind == "adapter" or path.endswith(fmt.ADAPTER_WEIGHTS)
    return False


def _local_source(path: str, local: Path, sha256: str, size: int) -> fmt.FileSource:
    def read_at(offset: int, length: int) -> bytes:
        with open(local, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return fmt.FileSource(path=path, sha256=sha256, size=size, read_at=read_at,
                          iter_bytes=lambda: iter_file(local))


def _stream_check(ctx: RegistryContext, path: str, kind: str | None) -> StreamCheck | None:
    if not fmt.is_weights(path):
        return None
    return StreamCheck(file=path, max_header_bytes=ctx.settings.max_header_bytes,
                       check_finite=_wants_finite_scan(ctx, kind, path))


def _accept_staged_file(ctx: RegistryContext, draft_id: str, path: str, tmp: Path, sha256: str, size: int,
                        check: StreamCheck | None = None) -> dict[str, Any]:
    """Validate a fully received file and add it to the draft (runs in a worker thread).

    ``check`` is the stream check that saw the bytes arrive; without one (a resumed upload whose
    state is gone) the file is read once more."""
    try:
        with ctx.db.read() as s:
            kind = _get_draft(s, draft_id).spec.get("kind")
        streamed = (check.finish(), check.non_finite) if check is not None else None
        fmt.check_single_file(
            _local_source(path, tmp, sha256, size),
            max_header_bytes=ctx.settings.max_header_bytes,
            check_finite=_wants_finite_scan(ctx, kind, path),
            streamed=streamed,
        )
        final = ctx.staging.staged_path(draft_id, sha256)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    def add() -> None:
        with ctx.db.write() as s:
            _get_draft(s, draft_id)
            blobs.claim(s, {sha256: size})  # from now on gc leaves these bytes alone
            existing = s.get(DraftFile, (draft_id, path))
            if existing is not None:
                s.delete(existing)
                s.flush()
            s.add(DraftFile(draft_id=draft_id, path=path, sha256=sha256, size=size, staged=True))

    blobs.retrying(add)
    return {"path": path, "sha256": sha256, "size": size, "deduplicated": False}


def _check_sha_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    sha256 = sha256.lower()
    if not SHA256_RE.fullmatch(sha256):
        raise BadRequest(f"not a hex sha256: {sha256!r}", code="invalid_sha256")
    return sha256


async def receive_file(ctx: RegistryContext, draft_id: str, path: str, body: AsyncIterator[bytes], *,
                       expected_sha256: str | None = None, content_length: int | None = None,
                       who: Principal | None = None) -> dict[str, Any]:
    """Stream one file into a draft: written to the staging area and hashed as it arrives, never
    held in memory whole. A wrong ``expected_sha256`` or an interrupted body leaves nothing."""
    path = clean_path(path)
    expected = _check_sha_arg(expected_sha256)
    limit = ctx.settings.max_file_bytes
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(f"{path}: {content_length} bytes exceeds the limit of {limit}",
                              details={"limit": limit})
    draft = await asyncio.to_thread(get_draft, ctx, draft_id, who)
    check = _stream_check(ctx, path, draft.get("kind"))
    writer = HashingWriter(ctx.staging.new_file(draft_id))
    try:
        await _pump(body, writer, limit, path, check=check, timeout=ctx.settings.body_timeout_seconds)
        sha = await asyncio.to_thread(writer.close)
    except BaseException:
        writer.abort()
        raise
    if expected is not None and sha != expected:
        writer.path.unlink(missing_ok=True)
        raise BadRequest(f"{path}: received bytes hash to {sha}, not the expected {expected}",
                         code="checksum_mismatch", details={"path": path, "expected": expected, "actual": sha})
    return await asyncio.to_thread(_accept_staged_file, ctx, draft_id, path, writer.path, sha, writer.size, check)


DRAIN_AFTER_ERROR = 64 << 20  # read (and drop) this much more of a refused body so the client sees the error


async def _pump(body: AsyncIterator[bytes], writer: HashingWriter, limit: int, path: str, *,
                hasher: Any = None, check: StreamCheck | None = None, timeout: float | None = None) -> None:
    """Copy the request body to ``writer`` in batches handed to a worker thread, updating the
    extra ``hasher`` and feeding the stream ``check`` on the way. A check failure (bad header)
    stops the copy early; a little more of the body is drained so the client reads the 4xx.
    A body that sends nothing for ``timeout`` seconds (one read) is refused with 408."""
    batch: list[bytes] = []
    pending = 0
    total = writer.size  # bytes received so far, including those still being written
    failure: BaseException | None = None

    def also(c: bytes) -> None:
        if hasher is not None:
            hasher.update(c)
        if check is not None:
            check.feed(c)

    def flush(chunks: list[bytes]) -> None:
        writer.write_many(chunks, also if hasher is not None or check is not None else None)

    inflight: asyncio.Future[None] | None = None  # one batch is hashed/written while the next arrives

    async def wait_inflight() -> None:
        nonlocal inflight, failure
        if inflight is not None:
            try:
                await inflight
            except InvalidInput as e:
                failure = e
            inflight = None

    chunks = body.__aiter__()

    async def next_chunk() -> bytes | None:
        try:
            async with asyncio.timeout(timeout):
                return await chunks.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise RequestTimeout(f"{path}: no body bytes for {timeout:g} s; upload refused",
                                 details={"path": path, "timeout_seconds": timeout}) from None

    try:
        while (chunk := await next_chunk()) is not None:
            if not chunk:
                continue
            if failure is not None:
                pending += len(chunk)
                if pending > DRAIN_AFTER_ERROR:
                    break
                continue
            batch.append(chunk)
            pending += len(chunk)
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"{path}: more than the limit of {limit} bytes", details={"limit": limit})
            if pending >= BATCH_BYTES or (check is not None and check.pos < 8 << 10):
                await wait_inflight()
                if failure is None:
                    inflight = asyncio.ensure_future(asyncio.to_thread(flush, batch))
                batch, pending = [], 0
        await wait_inflight()
        if failure is None and batch:
            await asyncio.to_thread(flush, batch)
    finally:
        if inflight is not None:  # an error elsewhere: let the thread finish before the file is closed
            await asyncio.gather(inflight, return_exceptions=True)
    if failure is not None:
        raise failure


def link_file(ctx: RegistryContext, draft_id: str, path: str, sha256: str, size: int | None,
              who: Principal | None = None) -> dict[str, Any]:
    """Add a file whose bytes the registry already holds (deduplication: no upload)."""
    path = clean_path(path)
    sha = _check_sha_arg(sha256)
    with ctx.db.write() as s:
        draft = _get_draft(s, draft_id, who)
        held = blobs.claim_ready(s, sha)
        if held is None or (size is not None and held != size):
            raise NotFound(f"no blob {sha}; upload the file instead", code="blob_not_found",
                           details={"sha256": sha})
        existing = next((f for f in draft.files if f.path == path), None)  # files are loaded with the draft
        if existing is not None:
            s.delete(existing)
            s.flush()
        s.add(DraftFile(draft_id=draft_id, path=path, sha256=sha, size=held, staged=False))
        return {"path": path, "sha256": sha, "size": held, "deduplicated": True}


# ----------------------------------------------------------------------------- resumable uploads

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
        _get_draft(s, draft_id, who)
        upload.draft_id = draft_id
        s.add(upload)
    ctx.staging.upload_path(draft_id, upload.id).touch()
    with _HASHERS_LOCK:
        _HASHERS[upload.id] = (hashlib.sha256(), _stream_check(ctx, path, None), 0)
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


@contextlib.asynccontextmanager
async def _part_lock(part: Path) -> AsyncIterator[None]:
    """Hold an exclusive lock on an upload's .part file, across API processes: a chunk resent after
    a broken connection may reach another process while the first one still writes the old try.
    (No file: nothing to protect; closing the descriptor releases the lock.)"""
    try:
        fd = os.open(part, os.O_RDWR)
    except FileNotFoundError:
        yield
        return
    try:
        while not _try_flock(fd):
            await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _part_lock_sync(part: Path) -> Iterator[None]:
    import time

    try:
        fd = os.open(part, os.O_RDWR)
    except FileNotFoundError:
        yield
        return
    try:
        while not _try_flock(fd):
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


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
                _part_lock(ctx.staging.upload_path(view["draft"], upload_id))):
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
    writer = HashingWriter(part, mode="ab")
    writer.size = offset
    try:
        await _pump(body, writer, limit, view["path"], hasher=hasher, check=check,
                    timeout=ctx.settings.body_timeout_seconds)
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
    expected = _check_sha_arg(sha256)
    with ctx.db.read() as s:
        draft_id = _get_upload(s, upload_id, who).draft_id
    with _part_lock_sync(ctx.staging.upload_path(draft_id, upload_id)):
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
        result = _accept_staged_file(ctx, draft_id, path, part, actual, received, check)
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


# ----------------------------------------------------------------------------- commit


def _sources(ctx: RegistryContext, s: Session, draft: Draft) -> dict[str, fmt.FileSource]:
    """A readable source for every file of the draft (staged file, or blob already stored)."""
    sources: dict[str, fmt.FileSource] = {}
    for f in draft.files:
        staged = ctx.staging.staged_path(draft.id, f.sha256)
        if f.staged and staged.exists():
            src = _local_source(f.path, staged, f.sha256, f.size)
            src.needs_scan = False  # scanned on arrival
        else:
            if not content.exists(ctx, f.sha256):
                raise Conflict(f"{f.path}: its bytes are no longer available; upload it again",
                               code="blob_missing", details={"path": f.path})

            def read_at(offset: int, length: int, sha: str = f.sha256) -> bytes:
                return content.read_bytes(ctx, sha, offset, offset + length)

            def iter_bytes(sha: str = f.sha256) -> Iterator[bytes]:
                return content.iter_range(ctx, sha)

            src = fmt.FileSource(path=f.path, sha256=f.sha256, size=f.size, read_at=read_at, iter_bytes=iter_bytes)
            if fmt.is_weights(f.path):
                # A deduplicated blob was scanned before if some version already holds it as weights.
                prior = s.scalar(select(func.count()).select_from(VersionFile).where(
                    VersionFile.blob_sha256 == f.sha256, VersionFile.path.like("%.safetensors")))
                src.needs_scan = not prior
        sources[f.path] = src
    return sources


@dataclass
class CommitOptions:
    """How a machine-made version is recorded (user pushes use the defaults)."""

    status: str = "ready"
    recipe: dict[str, Any] | None = None
    mlflow_run_id: str | None = None
    extra_summary: dict[str, Any] | None = None
    # Runs inside the commit transaction after the version row exists (e.g. completing a job).
    hook: Callable[[Session, ModelVersion], None] | None = None


def commit(ctx: RegistryContext, draft_id: str, actor: str | None,
           options: CommitOptions | None = None, who: Principal | None = None) -> VersionView:
    settings = ctx.settings
    opts = options or CommitOptions()
    with ctx.db.read() as s:
        draft = _get_draft(s, draft_id, who)
        spec = dict(draft.spec)
        model_name = draft.model_name
        if not draft.files:
            raise InvalidInput("nothing to commit: the draft has no files", code="empty_version")
        manifest = {f.path: f.sha256 for f in draft.files}
        sizes = {f.path: f.size for f in draft.files}
        staged = {f.sha256 for f in draft.files if f.staged}
        model = s.scalar(_model_named(model_name))
        base = resolve_base(s, spec["base"]) if spec.get("base") else None
        kind = spec.get("kind") or (model.kind if model else None) or fmt.infer_kind(list(manifest), base is not None)
        if model is not None and model.kind != kind:
            raise Conflict(f"model {model_name!r} holds {model.kind} versions, not {kind}", code="kind_mismatch",
                           details={"model": model_name, "kind": model.kind})
        if kind in ("adapter", "finetune") and base is None:
            raise InvalidInput(f"a {kind} must be pinned to a base version (--base NAME@VERSION)",
                               code="base_required")
        base_index = dict(base.tensor_index or {}) if base is not None else None
        sources = _sources(ctx, s, draft)
        chash = fmt.content_hash(manifest)
        if model is not None:
            check_duplicate(s, model.id, chash, base.id if base is not None else None, model_name)

    check_finite = settings.check_finite == "all" or (settings.check_finite == "adapters" and kind == "adapter")
    insp = fmt.inspect_version(kind, sources, max_header_bytes=settings.max_header_bytes, check_finite=check_finite)
    if base_index is not None and base is not None:
        _check_against_base(kind, insp, base_index, str(spec["base"]))

    # Bytes into the blob store before the transaction. Their rows were claimed when the files
    # joined the draft, so gc leaves them alone; the transaction turns the rows ready.
    known: set[str] = set()
    if staged:
        with ctx.db.read() as s:
            known = blobs.ready(s, staged)
    for sha in sorted(staged - known):
        path = ctx.staging.staged_path(draft_id, sha)
        if path.exists():
            ctx.store.put(sha, path)
        elif not content.exists(ctx, sha):
            raise Conflict(f"staged bytes for {sha} are gone; upload the file again", code="blob_missing")

    with ctx.db.write() as s:
        draft = _get_draft(s, draft_id)
        v = record_version(
            s, model_name=model_name, kind=kind, actor=actor, base=base, spec=spec, content_sha256=chash,
            fingerprint=insp.fingerprint, summary={**insp.summary, **(opts.extra_summary or {})},
            tensor_index=insp.tensor_index, files={p: (manifest[p], sizes[p]) for p in manifest},
            new_blobs=staged - known, options=opts,
            before_events=lambda: s.delete(draft),
        )
        view = version_view(s, v)
    ctx.staging.remove_draft(draft_id)
    return view


def record_version(
    s: Session, *, model_name: str, kind: str, actor: str | None, base: ModelVersion | None, spec: dict[str, Any],
    content_sha256: str, fingerprint: str | None, summary: dict[str, Any], tensor_index: dict[str, Any],
    files: dict[str, tuple[str, int]], new_blobs: set[str], options: CommitOptions,
    generated: dict[str, tuple[str, int]] | None = None, storage_mode: str = "stored",
    before_events: Callable[[], None] | None = None,
) -> ModelVersion:
    """Record a version in the caller's transaction: the next number of its model (created if
    needed), blob rows for ``new_blobs``, its manifest (``files``: path -> (blob sha256, size);
    ``generated``: path -> (sha256, size) of files the server generates), tags, lineage, aliases,
    the options' hook and the events. The same path for pushes, job outputs and derived versions."""
    model = _get_or_create_model(s, model_name, kind, actor)
    number = s.execute(
        update(Model).where(Model.id == model.id).values(last_version=Model.last_version + 1)
        .returning(Model.last_version)
    ).scalar_one()
    check_duplicate(s, model.id, content_sha256, base.id if base is not None else None, model_name)
    if base is not None:
        locked = s.scalar(select(ModelVersion).where(ModelVersion.id == base.id).with_for_update(read=True))
        if locked is None or locked.archived_at is not None:
            raise InvalidInput(f"base {spec.get('base')} was archived meanwhile", code="invalid_base")
    # Bytes this commit put into the store become ready; reused bytes must be ready (and stay
    # locked until this transaction commits).
    blobs.mark_ready(s, {sha: size for sha, size in files.values() if sha in new_blobs})
    blobs.lock_ready(s, {sha for sha, _ in files.values()} - new_blobs)
    generated = generated or {}
    all_sizes = [size for _, size in files.values()] + [size for _, size in generated.values()]
    v = ModelVersion(
        model=model, model_id=model.id, version=number, kind=kind, status=options.status, storage_mode=storage_mode,
        base_version_id=base.id if base is not None else None, fingerprint=fingerprint,
        content_sha256=content_sha256, total_size=sum(all_sizes), file_count=len(all_sizes),
        description=spec.get("description") or "", summary=summary, tensor_index=tensor_index,
        recipe=options.recipe, mlflow_run_id=options.mlflow_run_id, created_by=actor,
        # what this commit added to the store (bytes it reuses were counted where first stored)
        stored_bytes=sum({sha: size for sha, size in files.values() if sha in new_blobs}.values()),
    )
    s.add(v)
    s.flush()
    s.add_all(VersionFile(version_id=v.id, path=p, blob_sha256=sha, size=size) for p, (sha, size) in files.items())
    s.add_all(DerivedFile(version_id=v.id, format="native", path=p, sha256=sha, size=size)
              for p, (sha, size) in generated.items())
    s.add_all(VersionTag(version_id=v.id, key=k, value=val) for k, val in (spec.get("tags") or {}).items())
    if base is not None and kind in ("adapter", "finetune"):
        rel = Relation.adapter_of if kind == "adapter" else Relation.finetune_of
        s.add(LineageEdge(child_id=v.id, parent_id=base.id, relation=rel.value, params={}))
    for p in spec.get("parents") or []:
        parent = resolve_body_ref(s, p["ref"], "parent")
        if base is not None and parent.id == base.id and p["relation"] in ("adapter_of", "finetune_of"):
            continue
        s.add(LineageEdge(child_id=v.id, parent_id=parent.id, relation=p["relation"], params=p["params"]))
    for alias in spec.get("aliases") or []:
        set_row(s, model.id, alias, v.id)
    if before_events is not None:
        before_events()
    s.flush()
    if options.hook is not None:
        options.hook(s, v)
    ref = f"{model_name}@{number}"
    emit(s, "version.created", model_name=model_name, version_id=v.id, ref=ref, kind=kind, status=options.status,
         storage_mode=storage_mode, base=spec.get("base"), content_sha256=content_sha256)
    for alias in spec.get("aliases") or []:
        emit(s, "alias.set", model_name=model_name, version_id=v.id, alias=alias, ref=ref)
    return v


def check_duplicate(s: Session, model_id: int, chash: str, base_id: int | None, model_name: str) -> None:
    """Versions are immutable: the same files pinned to the same base would add nothing. (The same
    files pinned to another base are a new version: an adapter re-pinned to a new base.)"""
    dup = s.scalar(select(ModelVersion.version).where(
        ModelVersion.model_id == model_id, ModelVersion.content_sha256 == chash,
        ModelVersion.base_version_id.is_(None) if base_id is None else ModelVersion.base_version_id == base_id,
        ModelVersion.archived_at.is_(None)).limit(1))
    if dup is not None:
        raise Conflict(f"{model_name}@{dup} already holds exactly these files; versions are immutable and "
                       "a duplicate would add nothing", code="duplicate_content",
                       details={"existing": f"{model_name}@{dup}"})


def _check_against_base(kind: str, insp: fmt.Inspection, base_index: dict[str, Any], base_ref: str) -> None:
    from ..formats.peft import check_against_base

    if kind == "adapter" and insp.adapter is not None:
        problems = check_against_base(insp.adapter, base_index)
        what = "adapter modules do not match"
    elif kind == "finetune":
        problems = fmt.check_finetune_against_base(insp.tensor_index, base_index)
        what = "fine-tune tensors do not match"
    else:
        return
    if problems:
        keys = ", ".join(p["key"] for p in problems[:10])
        more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InvalidInput(f"{what} the base {base_ref}: {keys}{more}", code="shape_mismatch",
                           details={"base": base_ref, "mismatches": problems})


def _model_named(name: str) -> Select[tuple[Model]]:
    """The model called ``name``, without its tags (nothing here reads them: one query fewer)."""
    return select(Model).where(Model.name == name).options(lazyload(Model.tags))


def _get_or_create_model(s: Session, name: str, kind: str, actor: str | None) -> Model:
    insert_ignore(s, Model.__table__, [{"name": name, "kind": kind, "description": "", "last_version": 0,
                                        "created_at": utcnow(), "created_by": actor}])
    model = s.scalar(_model_named(name))
    assert model is not None
    if model.kind != kind:
        raise Conflict(f"model {name!r} holds {model.kind} versions, not {kind}", code="kind_mismatch",
                       details={"model": name, "kind": model.kind})
    return model


def stage_local_file(ctx: RegistryContext, draft_id: str, path: str, local: Path) -> dict[str, Any]:
    """Copy a local file into a draft, hashed and checked on the way (what a worker does with
    the files it produced; the same checks as an upload)."""
    path = clean_path(path)
    with ctx.db.read() as s:
        kind = _get_draft(s, draft_id).spec.get("kind")
    check = _stream_check(ctx, path, kind)
    writer = HashingWriter(ctx.staging.new_file(draft_id))
    try:
        for chunk in iter_file(local):
            writer.write_many([chunk], check.feed if check is not None else None)
        sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return _accept_staged_file(ctx, draft_id, path, writer.path, sha, writer.size, check)


def ingest_folder(ctx: RegistryContext, folder: Path, spec: DraftSpec, actor: str | None,
                  options: CommitOptions | None = None, links: dict[str, str] | None = None) -> VersionView:
    """Create a version from a local folder (and/or ``links``: path -> sha256 of bytes the registry
    already holds), through the same draft -> commit path as a push. On failure the draft is removed."""
    draft = create_draft(ctx, spec, actor)
    try:
        for path, sha in sorted((links or {}).items()):
            link_file(ctx, draft["id"], path, sha, None)
        if folder is not None and folder.exists():
            for local in sorted(p for p in folder.rglob("*") if p.is_file()):
                stage_local_file(ctx, draft["id"], local.relative_to(folder).as_posix(), local)
        return commit(ctx, draft["id"], actor, options)
    except BaseException:
        with contextlib.suppress(Exception):
            abort_draft(ctx, draft["id"])
        raise
