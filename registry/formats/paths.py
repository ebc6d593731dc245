"""Validation of file paths inside a version (they become object names and download URLs)."""

from __future__ import annotations

import unicodedata

from ..errors import InvalidInput

MAX_PATH = 1024
MAX_SEGMENT = 255
_FORBIDDEN = set('\\:*?"<>|')


def clean_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise ``unsafe_path`` (422).

    Refused: empty, absolute, ``.``/``..`` segments, empty segments, backslashes and other
    characters that are special on common filesystems, control characters, over-long names.
    """

    def bad(reason: str) -> InvalidInput:
        return InvalidInput(f"unsafe file path {path!r}: {reason}", code="unsafe_path",
                            details={"path": path, "reason": reason})

    if not path:
        raise bad("empty")
    if len(path) > MAX_PATH:
        raise bad(f"longer than {MAX_PATH} characters")
    if path.startswith("/"):
        raise bad("absolute paths are not allowed")
    for ch in path:
        if ch in _FORBIDDEN:
            raise bad(f"character {ch!r} is not allowed")
        if unicodedata.category(ch)[0] == "C":
            raise bad("control characters are not allowed")
    if unicodedata.normalize("NFC", path) != path:
        raise bad("not in Unicode NFC form")
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            raise bad("empty, '.' and '..' segments are not allowed")
        if len(seg) > MAX_SEGMENT:
            raise bad(f"a segment is longer than {MAX_SEGMENT} characters")
    return path
