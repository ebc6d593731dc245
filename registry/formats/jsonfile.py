"""User-uploaded JSON as ingest refuses it: the bounded loader of :mod:`registry.weights.jsonfile`
(depth checked before parsing, never a ``RecursionError``) with its failures as ``InvalidInput``."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from ..weights.jsonfile import MAX_DEPTH, JsonError, parse

__all__ = ["MAX_DEPTH", "JsonError", "loads", "parse"]


def loads(raw: bytes | str, *, file: str, code: str = "invalid_json", max_depth: int = MAX_DEPTH) -> Any:
    """:func:`parse`, refusing bad input as ``InvalidInput(code)`` naming ``file``."""
    try:
        return parse(raw, max_depth=max_depth)
    except JsonError as e:
        raise InvalidInput(f"{file} is not acceptable JSON: {e}", code=code,
                           details={"file": file, "reason": str(e)}) from None
