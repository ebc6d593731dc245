"""The error statuses operations declare in the OpenAPI schema, each with the app's error body.

Every error the API answers is ``{"error": {"code", "message", "details"}}`` (``ErrorResponse``):
domain errors (``registry.errors``), request validation (422 ``invalid_request``, rewritten in
``app.py``), authentication (401) and scope or the loopback guard (403). Routers declare
``responses=errors(...)`` with the statuses each operation can really return; this module is the
one place that says what each status means and which body it carries.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute

from .schemas import ErrorResponse

DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: a body that cannot be decoded (`bad_request`), a bad checksum, sha256 or "
         "Content-Length.",
    401: "No token, or an unknown, revoked or expired one (only with REGISTRY_AUTH=required).",
    403: "The token lacks the scope (`insufficient_scope`), or a remote peer reached a server running "
         "without auth (`auth_required`).",
    404: "Not found (or not yours: drafts and uploads exist only for the token that created them).",
    408: "The request body stopped arriving for REGISTRY_BODY_TIMEOUT_SECONDS (`body_timeout`); nothing was kept.",
    409: "Conflicts with the current state (already exists, has dependents, wrong offset, duplicate content…).",
    413: "Larger than REGISTRY_MAX_FILE_BYTES (files) or REGISTRY_MAX_JSON_BODY_BYTES (JSON bodies).",
    416: "The Range starts beyond the end of the file (`Content-Range: bytes */size`).",
    422: "Invalid input: request validation (`invalid_request`, details.errors lists each problem) or "
         "unacceptable content (names, refs, weights, shapes…).",
    500: "The registry's stored bytes are missing or wrong (`data_corrupt`): the version is marked corrupt.",
    503: "Transient: the bytes are being garbage-collected right now (`blob_busy`); retry.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router or an operation: each status with its meaning and ErrorResponse."""
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


AUTHENTICATED = errors(401, 403)
"""Every operation that needs a token (router level)."""


def declare_body_errors(router: APIRouter) -> None:
    """FastAPI answers 400 ``bad_request`` for a request body it cannot decode (bytes that are not
    UTF-8 JSON), and the body-size middleware 413 for one over REGISTRY_MAX_JSON_BODY_BYTES, before
    any handler runs: declare both on every operation of ``router`` that parses a body (call before
    including the router)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.body_field is not None:
            route.responses = {**errors(400, 413), **route.responses}
