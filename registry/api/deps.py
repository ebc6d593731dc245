"""Dependencies injected into routes: the registry context and the authenticated principal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ..services import tokens
from ..services.context import RegistryContext
from ..services.tokens import Principal


async def get_ctx(request: Request) -> RegistryContext:
    # async: FastAPI would run a plain ``def`` dependency in the thread pool, one hop per request
    ctx: RegistryContext = request.app.state.ctx
    return ctx


F = TypeVar("F", bound=Callable[..., object])


def streamed_body(endpoint: F) -> F:
    """Mark a route that streams its request body to disk under its own limits (file bytes,
    upload chunks): the app's body limit (``REGISTRY_MAX_JSON_BODY_BYTES``) does not apply to it."""
    endpoint.streams_body = True  # type: ignore[attr-defined]
    return endpoint


Ctx = Annotated[RegistryContext, Depends(get_ctx)]


# Declares the bearer scheme in the OpenAPI schema (the Authorize button of /docs) on every
# operation that needs a principal; a missing or non-bearer header gives None, answered below.
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", bearerFormat="rgt_…",
                     description="An API token (`registry token create`). Ignored when the server runs "
                                 "without auth (REGISTRY_AUTH=off, loopback only).")


async def get_principal(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    ctx: RegistryContext = request.app.state.ctx
    if ctx.settings.auth == "off":
        return tokens.ANONYMOUS_ADMIN
    secret = credentials.credentials.strip() if credentials is not None else ""
    return await run_in_threadpool(tokens.authenticate, ctx, secret or None)


def _scope(needed: str):  # type: ignore[no-untyped-def]
    async def dep(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        principal.require(needed)
        return principal

    return dep


Reader = Annotated[Principal, Depends(_scope("read"))]
Writer = Annotated[Principal, Depends(_scope("write"))]
Admin = Annotated[Principal, Depends(_scope("admin"))]
