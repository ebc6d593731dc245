"""HTTP ``Range`` handling for file downloads (one byte range; RFC 9110 §14)."""

from __future__ import annotations

import re

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
