"""File downloads: ``GET``/``HEAD`` with ``Range``, ``ETag`` = sha256 and a checksum header."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...errors import RangeNotSatisfiable
from ...services import derived, integrity, names, versions
from ..deps import Ctx, Reader
from ..ranges import parse_range
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
    sha, size = f.sha256, f.size
    etag = f'"{sha}"'
    headers = {
        "ETag": etag,
        "X-Checksum-Sha256": sha,
        "X-Registry-Ref": ref,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        # A numbered version never changes; an alias or "latest" may move.
        "Cache-Control": "public, max-age=31536000, immutable" if names.ascii_uint(v) is not None else "no-cache",
    }
    inm = request.headers.get("if-none-match")
    if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)
    rng_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        rng_header = None
    try:
        rng = parse_range(rng_header, size)
    except RangeNotSatisfiable as e:
        return JSONResponse(e.to_dict(), status_code=e.status, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = rng if rng is not None else (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if rng is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    body = (integrity.read_stored(ctx, version_id, f, start, end) if f.blob
            else derived.open_generated(ctx, version_id, format, f, start, end))
    return StreamingResponse(body, status_code=status, headers=headers, media_type="application/octet-stream")
