"""Helpers shared by routes."""

from __future__ import annotations

from ...errors import InvalidInput


def parse_tag_filters(values: list[str]) -> dict[str, str | None]:
    """``key=value`` (exact) or ``key`` (present) -> {key: value or None}."""
    out: dict[str, str | None] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidInput(f"bad tag filter {item!r}: expected key=value or key", code="invalid_tag_filter")
        out[key] = value if sep else None
    return out


def version_ref(name: str, v: str) -> str:
    """``/models/{name}/versions/{v}`` -> ref (``v`` is a number, an alias or ``latest``)."""
    return f"{name}@{v}"
