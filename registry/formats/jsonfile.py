"""The one loader for JSON that users upload (safetensors headers, ``adapter_config.json``,
``*.safetensors.index.json``): UTF-8, nesting depth bounded before parsing.

Python's ``json`` recurses once per nesting level, so ``[[[[…]]]]`` 100k deep raised
``RecursionError`` (a 500). No file the registry reads needs more than a few levels; anything
nested deeper than :data:`MAX_DEPTH` is refused as :class:`~registry.errors.InvalidInput`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InvalidInput

MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class JsonError(ValueError):
    """Raised with a reason; callers turn it into their own error code."""


def depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not count)."""
    structure = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not structure:
        return 0
    steps = _OPEN[np.frombuffer(structure, dtype=np.uint8)].astype(np.int64)
    return int(np.cumsum(steps).max())


def parse(raw: bytes | str, *, max_depth: int = MAX_DEPTH,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse UTF-8 JSON; raises :class:`JsonError` (never ``RecursionError``) on bad input."""
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    d = depth(data)
    if d > max_depth:
        raise JsonError(f"nested {d} levels deep (at most {max_depth})")
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:  # belt and braces: the depth scan should have refused it
        raise JsonError(f"nested too deeply (at most {max_depth} levels)") from None
    except ValueError as e:
        raise JsonError(f"not valid JSON: {e}") from None


def loads(raw: bytes | str, *, file: str, code: str = "invalid_json", max_depth: int = MAX_DEPTH) -> Any:
    """:func:`parse`, refusing bad input as ``InvalidInput(code)`` naming ``file``."""
    try:
        return parse(raw, max_depth=max_depth)
    except JsonError as e:
        raise InvalidInput(f"{file} is not acceptable JSON: {e}", code=code,
                           details={"file": file, "reason": str(e)}) from None
