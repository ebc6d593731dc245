"""Drafts: a push in progress, and the files that join it.

A draft is invisible, and private to the principal that created it: another principal without
the admin scope is told it does not exist (``who`` in the functions below; ``None`` is the server
itself, e.g. a worker ingesting its output). Its files sit in the staging area, not in the blob
store, and no version row exists. A file joins a draft streamed (:func:`receive_file`: hashed and
validated on arrival), linked (:func:`link_file`: bytes the registry already holds), copied from
local disk (:func:`stage_local_file`) or through a resumable upload
(:mod:`registry.services.uploads`). A file's blob row is claimed (``pending``) when it joins the
draft, before its bytes move anywhere, so gc never removes bytes a commit may still reference
(:mod:`registry.services.blobs`); an abandoned draft's claims and bytes are removed by ``registry gc``.
Turning a draft into a version is :mod:`registry.services.recording`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import BadRequest, Conflict, InvalidInput, NotFound, PayloadTooLarge, RequestTimeout
from ..formats import inspect as fmt
from ..formats.paths import clean_path
from ..formats.safetensors import StreamCheck, iter_file
from ..models import Blob, BlobState, Draft, DraftFile, ModelVersion, Relation
from ..storage import HashingWriter
from ..storage.base import SHA256_RE
from . import blobs, content, names
from .context import RegistryContext
from .refs import model_named, parse_ref, resolve
from .tokens import Principal

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


def checked_spec(ctx: RegistryContext, spec: DraftSpec) -> dict[str, Any]:
    """The spec of a version to create, its names and values checked (no database access): the
    ``spec`` a draft stores, and what a one-request create records."""
    names.model_name(spec.model)
    if spec.kind is not None:
        names.kind(spec.kind)
    tags = names.tags(spec.tags)
    names.tag_budget(tags, max_count=ctx.settings.max_tags, max_bytes=ctx.settings.max_tag_bytes)
    aliases = [names.alias_name(a) for a in spec.aliases]
    description = names.description(spec.description)
    parents = [_check_parent(p) for p in spec.parents]
    return {"kind": spec.kind, "base": spec.base, "tags": tags, "aliases": aliases,
            "description": description, "parents": parents}


def create_draft(ctx: RegistryContext, spec: DraftSpec, actor: str | None) -> dict[str, Any]:
    """Start a push. Names, kind, base and parent refs are checked now, so a bad push fails
    before any byte is uploaded."""
    checked = checked_spec(ctx, spec)
    with ctx.db.read() as s:
        model = s.scalar(model_named(spec.model))
        if model is not None and spec.kind is not None and model.kind != spec.kind:
            raise Conflict(f"model {spec.model!r} holds {model.kind} versions, not {spec.kind}",
                           code="kind_mismatch", details={"model": spec.model, "kind": model.kind})
        if spec.base is not None:
            resolve_base(s, spec.base)
        for p in checked["parents"]:
            resolve_body_ref(s, p["ref"], "parent")
    draft = Draft(
        id=str(uuid.uuid4()),
        model_name=spec.model,
        created_by=actor,
        spec=checked,
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


def draft_row(s: Session, draft_id: str, who: Principal | None = None) -> Draft:
    draft = s.get(Draft, draft_id)
    if draft is None or (who is not None and not who.owns(draft.created_by)):
        raise NotFound(f"draft {draft_id} not found (committed, aborted or expired)", code="draft_not_found",
                       details={"draft": draft_id})
    return draft


def get_draft(ctx: RegistryContext, draft_id: str, who: Principal | None = None) -> dict[str, Any]:
    with ctx.db.read() as s:
        return _draft_view(draft_row(s, draft_id, who))


def abort_draft(ctx: RegistryContext, draft_id: str, who: Principal | None = None) -> None:
    """Discard a draft: its staged bytes, and the blob claims nothing else holds."""
    with ctx.db.write() as s:
        draft = draft_row(s, draft_id, who)
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


def local_source(path: str, local: Path, sha256: str, size: int) -> fmt.FileSource:
    def read_at(offset: int, length: int) -> bytes:
        with open(local, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return fmt.FileSource(path=path, sha256=sha256, size=size, read_at=read_at,
                          iter_bytes=lambda: iter_file(local))


def stream_check(ctx: RegistryContext, path: str, kind: str | None) -> StreamCheck | None:
    if not fmt.is_weights(path):
        return None
    return StreamCheck(file=path, max_header_bytes=ctx.settings.max_header_bytes,
                       check_finite=_wants_finite_scan(ctx, kind, path))


def accept_staged_file(ctx: RegistryContext, draft_id: str, path: str, tmp: Path, sha256: str, size: int,
                        check: StreamCheck | None = None) -> dict[str, Any]:
    """Validate a fully received file and add it to the draft (runs in a worker thread).

    ``check`` is the stream check that saw the bytes arrive; without one (a resumed upload whose
    state is gone) the file is read once more."""
    try:
        with ctx.db.read() as s:
            kind = draft_row(s, draft_id).spec.get("kind")
        streamed = (check.finish(), check.non_finite) if check is not None else None
        fmt.check_single_file(
            local_source(path, tmp, sha256, size),
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
            draft_row(s, draft_id)
            blobs.claim(s, {sha256: size})  # from now on gc leaves these bytes alone
            existing = s.get(DraftFile, (draft_id, path))
            if existing is not None:
                s.delete(existing)
                s.flush()
            s.add(DraftFile(draft_id=draft_id, path=path, sha256=sha256, size=size, staged=True))

    blobs.retrying(add)
    return {"path": path, "sha256": sha256, "size": size, "deduplicated": False}


def check_sha_arg(sha256: str | None) -> str | None:
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
    expected = check_sha_arg(expected_sha256)
    limit = ctx.settings.max_file_bytes
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(f"{path}: {content_length} bytes exceeds the limit of {limit}",
                              details={"limit": limit})
    draft = await asyncio.to_thread(get_draft, ctx, draft_id, who)
    check = stream_check(ctx, path, draft.get("kind"))
    writer = HashingWriter(ctx.staging.new_file(draft_id))
    try:
        await pump_body(body, writer, limit, path, check=check, timeout=ctx.settings.body_timeout_seconds)
        sha = await asyncio.to_thread(writer.close)
    except BaseException:
        writer.abort()
        raise
    if expected is not None and sha != expected:
        writer.path.unlink(missing_ok=True)
        raise BadRequest(f"{path}: received bytes hash to {sha}, not the expected {expected}",
                         code="checksum_mismatch", details={"path": path, "expected": expected, "actual": sha})
    return await asyncio.to_thread(accept_staged_file, ctx, draft_id, path, writer.path, sha, writer.size, check)


DRAIN_AFTER_ERROR = 64 << 20  # read (and drop) this much more of a refused body so the client sees the error


async def pump_body(body: AsyncIterator[bytes], writer: HashingWriter, limit: int, path: str, *,
                    check: StreamCheck | None = None, timeout: float | None = None) -> None:
    """Copy the request body to ``writer`` in batches handed to a worker thread (which hashes them
    as it writes), feeding the stream ``check`` on the way. A check failure (bad header)
    stops the copy early; a little more of the body is drained so the client reads the 4xx.
    A body that sends nothing for ``timeout`` seconds (one read) is refused with 408."""
    batch: list[bytes] = []
    pending = 0
    total = writer.size  # bytes received so far, including those still being written
    failure: BaseException | None = None

    def flush(chunks: list[bytes]) -> None:
        writer.write_many(chunks, check.feed if check is not None else None)

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
    sha = check_sha_arg(sha256)
    with ctx.db.write() as s:
        draft = draft_row(s, draft_id, who)
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


PROBE_CANDIDATES = 64  # stored files of one size a probe compares samples with; more: "maybe"


def probe_file(ctx: RegistryContext, draft_id: str, size: int, sample: str,
               who: Principal | None = None) -> dict[str, Any]:
    """Whether the registry may already hold a file of ``size`` bytes whose
    :func:`~registry.formats.inspect.sample_digest` is ``sample``: a cheap question a push asks
    before it hashes a large file. ``maybe_held`` false is certain (no stored file of that size
    has that sample: upload the bytes, hashing them while they are sent); true means hash the file
    and link it (it may still turn out new). Stored files whose samples cannot be read cheaply
    (not a local raw object, or too many candidates) answer true."""
    if size < 0:
        raise InvalidInput("size must be >= 0", code="invalid_size")
    sample = check_sha_arg(sample) or ""
    with ctx.db.read() as s:
        draft_row(s, draft_id, who)
        if size > ctx.settings.max_file_bytes:  # no stored file is that large
            return {"maybe_held": False, "candidates": 0}
        rows = s.execute(select(Blob.sha256).where(Blob.size == size, Blob.state == BlobState.ready.value)
                         .limit(PROBE_CANDIDATES + 1)).scalars().all()
    if len(rows) > PROBE_CANDIDATES:
        return {"maybe_held": True, "candidates": len(rows)}
    held = any(local is None or _sample_matches(local, size, sample)
               for local in (content.local_path(ctx, sha) for sha in rows))
    return {"maybe_held": held, "candidates": len(rows)}


def _sample_matches(local: Path, size: int, sample: str) -> bool:
    try:
        with open(local, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False

            def read_at(offset: int, length: int) -> bytes:
                f.seek(offset)
                return f.read(length)

            return fmt.sample_digest(read_at, size) == sample
    except FileNotFoundError:
        return True  # released meanwhile (packed): cannot tell


def stage_local_file(ctx: RegistryContext, draft_id: str, path: str, local: Path) -> dict[str, Any]:
    """Copy a local file into a draft, hashed and checked on the way (what a worker does with
    the files it produced; the same checks as an upload)."""
    path = clean_path(path)
    with ctx.db.read() as s:
        kind = draft_row(s, draft_id).spec.get("kind")
    check = stream_check(ctx, path, kind)
    writer = HashingWriter(ctx.staging.new_file(draft_id))
    try:
        for chunk in iter_file(local):
            writer.write_many([chunk], check.feed if check is not None else None)
        sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return accept_staged_file(ctx, draft_id, path, writer.path, sha, writer.size, check)
