"""HTTP ``Range`` handling for file downloads (one byte range; RFC 9110 §14)."""

from __future__ import annotations

from ..errors import RangeNotSatisfiable


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, None to serve the whole file.

    Multiple ranges and unknown units are ignored (the whole file is served, as the RFC allows);
    a syntactically valid but unsatisfiable range raises 416."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":  # suffix: the last N bytes
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable("empty suffix range", details={"size": size})
            return (max(0, size - n), size)
        start = int(first)
        end = size if last == "" else int(last) + 1
    except ValueError:
        return None
    if start < 0 or (last != "" and end <= start):
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start} but the file has {size} bytes", details={"size": size})
    return (start, min(end, size))
