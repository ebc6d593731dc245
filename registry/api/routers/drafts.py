"""Pushing versions: drafts, streamed file uploads, resumable upload sessions, commit."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ...errors import BadRequest
from ...services import drafts, names, recording, uploads
from ...services.drafts import DraftSpec
from ..deps import Ctx, Writer, streamed_body
from ..responses import AUTHENTICATED, errors
from ..schemas import (
    DraftCreate,
    DraftFileOut,
    DraftOut,
    LinkFile,
    ProbeFile,
    ProbeOut,
    UploadCommit,
    UploadCreate,
    UploadOut,
    VersionOut,
)
from .common import version_json

router = APIRouter(tags=["push"], responses=AUTHENTICATED)


@router.post("/drafts", status_code=status.HTTP_201_CREATED, response_model=DraftOut, responses=errors(409, 422))
def create_draft(body: DraftCreate, ctx: Ctx, who: Writer) -> object:
    """Start a push to ``model``. Nothing is visible until ``commit``; the draft and its uploads are
    visible only to the token that created it (and to admins)."""
    spec = DraftSpec(model=body.model, kind=body.kind, base=body.base, tags=body.tags, aliases=body.aliases,
                     description=body.description, parents=[p.model_dump() for p in body.parents])
    return drafts.create_draft(ctx, spec, who.name)


@router.get("/drafts/{draft_id}", response_model=DraftOut, responses=errors(404, 422))
def get_draft(draft_id: str, ctx: Ctx, who: Writer) -> object:
    return drafts.get_draft(ctx, draft_id, who)


@router.delete("/drafts/{draft_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def abort_draft(draft_id: str, ctx: Ctx, who: Writer) -> Response:
    drafts.abort_draft(ctx, draft_id, who)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    length = names.ascii_uint(value)
    if length is None:
        raise BadRequest("bad Content-Length", code="bad_content_length")
    return length


@router.put("/drafts/{draft_id}/files/{path:path}", status_code=status.HTTP_201_CREATED, response_model=DraftFileOut,
            responses=errors(400, 404, 408, 413, 422, 503),
            openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
@streamed_body
async def put_file(draft_id: str, path: str, request: Request, ctx: Ctx, who: Writer,
                   x_checksum_sha256: str | None = Header(default=None)) -> object:
    """Upload one file as the raw request body (streamed to disk, hashed on the way). With
    ``X-Checksum-Sha256`` the upload is refused unless the bytes hash to it."""
    return await drafts.receive_file(ctx, draft_id, path, request.stream(), expected_sha256=x_checksum_sha256,
                                     content_length=_content_length(request), who=who)


@router.post("/drafts/{draft_id}/links", status_code=status.HTTP_201_CREATED, response_model=DraftFileOut,
             responses=errors(400, 404, 422))
def link_file(draft_id: str, body: LinkFile, ctx: Ctx, who: Writer) -> object:
    """Add a file by sha256 when the registry already holds those bytes (404 otherwise: upload it)."""
    return drafts.link_file(ctx, draft_id, body.path, body.sha256, body.size, who)


@router.post("/drafts/{draft_id}/probe", response_model=ProbeOut, responses=errors(400, 404, 422))
def probe_file(draft_id: str, body: ProbeFile, ctx: Ctx, who: Writer) -> object:
    """Whether the registry may already hold a file of this size and sample digest (a few KiB of
    it, see the client): false is certain, so the client uploads without hashing the file first."""
    return drafts.probe_file(ctx, draft_id, body.size, body.sample, who)


@router.post("/drafts/{draft_id}/uploads", status_code=status.HTTP_201_CREATED, response_model=UploadOut,
             responses=errors(404, 413, 422))
def create_upload(draft_id: str, body: UploadCreate, ctx: Ctx, who: Writer) -> object:
    """Open a resumable upload for a large file: PATCH chunks with ``Upload-Offset``, then commit."""
    return uploads.create_upload(ctx, draft_id, body.path, body.size, who)


@router.get("/uploads/{upload_id}", response_model=UploadOut, responses=errors(404, 422))
def get_upload(upload_id: str, ctx: Ctx, who: Writer) -> object:
    """How many bytes arrived (resume from ``received``)."""
    return uploads.get_upload(ctx, upload_id, who)


@router.patch("/uploads/{upload_id}", response_model=UploadOut, responses=errors(400, 404, 408, 409, 413, 422),
              openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
@streamed_body
async def append_chunk(
    upload_id: str, request: Request, ctx: Ctx, who: Writer,
    upload_offset: str = Header(description="Offset of this chunk (ASCII digits); must equal `received`."),
) -> object:
    offset = names.ascii_uint(upload_offset)
    if offset is None:
        raise BadRequest(f"bad Upload-Offset {upload_offset!r}: expected ASCII digits", code="invalid_offset",
                         details={"offset": upload_offset})
    return await uploads.append_chunk(ctx, upload_id, offset, request.stream(), who)


@router.post("/uploads/{upload_id}/commit", status_code=status.HTTP_201_CREATED, response_model=DraftFileOut,
             responses=errors(400, 404, 409, 413, 422, 503))
async def commit_upload(upload_id: str, body: UploadCommit, ctx: Ctx, who: Writer) -> object:
    return await run_in_threadpool(uploads.complete_upload, ctx, upload_id, body.sha256, who)


@router.delete("/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def abort_upload(upload_id: str, ctx: Ctx, who: Writer) -> Response:
    uploads.abort_upload(ctx, upload_id, who)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/drafts/{draft_id}/commit", status_code=status.HTTP_201_CREATED, response_model=VersionOut,
             responses=errors(404, 409, 422))
def commit_draft(draft_id: str, ctx: Ctx, who: Writer) -> object:
    """Validate the whole version and make it visible atomically, with the next version number."""
    return version_json(recording.commit(ctx, draft_id, who.name, who=who), status.HTTP_201_CREATED)
