"""The one loader for JSON that users upload (safetensors headers, ``adapter_config.json``,
``*.safetensors.index.json``): UTF-8, nesting depth bounded before parsing.

Python's ``json`` recurses once per nesting level, so ``[[[[…]]]]`` 100k deep raised
``RecursionError`` (a 500). No file the registry reads needs more than a few levels; anything
nested deeper than :data:`MAX_DEPTH` is refused with :class:`JsonError` (the ingest turns it into a
4xx; the weight library into a :class:`~registry.weights.errors.CheckpointFormatError` or
:class:`~registry.weights.errors.AdapterFormatError`). numpy + the standard library only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing an object that names a key twice (json keeps the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


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
