"""HTTP ``Range`` handling for file downloads (one byte range; RFC 9110 §14)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import RangeNotSatisfiable

# RFC 9110 §14.1.2: int-range = first-pos "-" [ last-pos ]; suffix-range = "-" suffix-length;
# positions are 1*DIGIT, and DIGIT is ASCII 0-9 only (no sign, space, '_' or other scripts).
_BYTE_RANGE = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, None to serve the whole file.

    Invalid syntax, multiple ranges and unknown units are ignored (the whole file is served, as
    the RFC allows); a syntactically valid but unsatisfiable range raises 416."""
    if not header:
        return None
    unit, eq, spec = header.strip(" \t").partition("=")
    if not eq or unit.lower() != "bytes":
        return None
    m = _BYTE_RANGE.fullmatch(spec)
    if m is None:
        return None
    first, last = m.groups()
    if first == "":
        if last == "":
            return None
        n = int(last)  # suffix: the last N bytes
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range", details={"size": size})
        return (max(0, size - n), size)
    start = int(first)
    end = size if last == "" else int(last) + 1
    if last != "" and end <= start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start} but the file has {size} bytes", details={"size": size})
    return (start, min(end, size))


def file_response(request: Request, *, sha256: str, size: int, filename: str, headers: dict[str, str],
                  body: Callable[[int, int], Iterator[bytes]]) -> Response:
    """A file's ``GET``/``HEAD`` answer: ``ETag`` and ``X-Checksum-Sha256`` = ``sha256``,
    ``If-None-Match`` -> 304, ``Range`` (honoured unless ``If-Range`` names another ETag) -> 206
    or 416, else 200; ``body(start, end)`` streams bytes ``[start, end)`` (not called for HEAD)."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "X-Checksum-Sha256": sha256, "Accept-Ranges": "bytes",
               "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}",
               **headers}
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
    return StreamingResponse(body(start, end), status_code=status, headers=headers,
                             media_type="application/octet-stream")
