"""Helpers shared by routes."""

from __future__ import annotations

from pydantic import TypeAdapter
from starlette.responses import Response

from ...errors import InvalidInput
from ...services.views import VersionView

# The hottest routes serialise the service's views straight to JSON. VersionView has exactly
# VersionOut's fields (tests/test_api.py checks), so FastAPI's second pass (validating the returned
# objects into VersionOut, in the thread pool, then dumping them) would only copy them: for a page
# of 100 versions that was about a third of the request's CPU.
VERSION_JSON = TypeAdapter(VersionView)


def json_response(adapter: TypeAdapter[object], value: object, status_code: int = 200) -> Response:
    return Response(adapter.dump_json(value), status_code=status_code, media_type="application/json")


def version_json(view: VersionView, status_code: int = 200) -> Response:
    """One version as the API returns it (``VersionOut``)."""
    return json_response(VERSION_JSON, view, status_code)  # type: ignore[arg-type]


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
