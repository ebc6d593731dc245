"""File downloads: ``GET``/``HEAD`` with ``Range``, ``ETag`` = sha256 and a checksum header."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...services import derived, integrity, names, versions
from ..deps import Ctx, Reader
from ..ranges import file_response
from ..responses import AUTHENTICATED, errors
from .common import version_ref

router = APIRouter(tags=["files"], responses=AUTHENTICATED)

_FILE = "/models/{name}/versions/{v}/files/{path:path}"
_BYTES = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
_DOWNLOAD = {
    200: {**_BYTES, "description": "The file."},
    206: {**_BYTES, "description": "The requested byte range (`Content-Range`)."},
    304: {"description": "`If-None-Match` matched the ETag."},
    **errors(404, 416, 422, 500),
}


@router.head(_FILE, operation_id="head_file", responses=_DOWNLOAD)
@router.get(_FILE, operation_id="download_file", responses=_DOWNLOAD)
def download(name: str, v: str, path: str, request: Request, ctx: Ctx, _: Reader, format: str = "native") -> Response:
    """The bytes of one file of a version, stored or generated (derived versions, and the
    ``delta``/``merged`` formats of adapters). ``ETag`` and ``X-Checksum-Sha256`` carry its sha256;
    ``Range: bytes=a-b`` returns 206 with that slice; ``If-None-Match`` the ETag returns 304."""
    ref, version_id, f = versions.locate_file(ctx, version_ref(name, v), path, format)
    headers = {
        "X-Registry-Ref": ref,
        # A numbered version never changes; an alias or "latest" may move.
        "Cache-Control": "public, max-age=31536000, immutable" if names.ascii_uint(v) is not None else "no-cache",
    }

    def body(start: int, end: int) -> Iterator[bytes]:
        return (integrity.read_stored(ctx, version_id, f, start, end) if f.blob
                else derived.open_generated(ctx, version_id, format, f, start, end))

    return file_response(request, sha256=f.sha256, size=f.size, filename=path, headers=headers, body=body)
