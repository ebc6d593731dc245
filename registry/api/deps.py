"""Dependencies injected into routes: the registry context and the authenticated principal.

One auth rule for every route, API and web UI alike (:func:`get_principal`): the secret comes from
the ``Authorization: Bearer`` header or, failing that, from the web UI's HTTP-only cookie
(:data:`COOKIE`), and either way goes through :func:`registry.services.tokens.authenticate`. A
request the cookie authenticates cannot be forged by another site: the cookie is ``SameSite=Strict``,
and an unsafe method also needs the page's CSRF token in :data:`CSRF_HEADER` (:func:`check_csrf`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ..errors import Forbidden
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


COOKIE = "registry_token"
"""The web UI's session cookie: the token itself (HTTP-only, SameSite=Strict), set by ``/ui/login``."""

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token(secret: str | None) -> str:
    """The value a page sends back in :data:`CSRF_HEADER` with a write action: an HMAC of the
    session's token, which another site can neither read nor compute. Without auth (loopback only)
    there is no secret and the value is fixed: there the custom header itself is the defence, since a
    cross-site form cannot send one and a cross-site script cannot without a CORS preflight, which
    this server never grants."""
    return hmac.new((secret or "registry:auth-off").encode(), b"registry-ui-csrf", hashlib.sha256).hexdigest()


def cross_site(request: Request) -> str | None:
    """What the browser says of a request that another site (or a sibling subdomain) made
    (``Sec-Fetch-Site``: cross-site, same-site), or None for this site's own and for non-browsers."""
    site = request.headers.get("sec-fetch-site")
    return site if site is not None and site not in ("same-origin", "none") else None


def check_csrf(request: Request) -> None:
    """403 ``csrf_failed`` for an unsafe request that another site may have made: one the browser
    marks cross-site (:func:`cross_site`), or one without the page's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    site = cross_site(request)
    if site is not None:
        raise Forbidden(f"refused a {site} request: write actions come from the registry's own pages",
                        code="csrf_failed", details={"sec_fetch_site": site})
    expected = getattr(request.state, "csrf_token", None) or csrf_token(None)
    if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), expected):
        raise Forbidden(f"missing or wrong {CSRF_HEADER}: write actions come from the registry's own pages "
                        "(or send the token as 'Authorization: Bearer')", code="csrf_failed")


async def get_principal(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The principal of a request (the one auth rule). Records on ``request.state`` how it
    authenticated (``auth_via``: off, bearer or cookie) and the CSRF token its pages embed."""
    ctx: RegistryContext = request.app.state.ctx
    secret: str | None = None
    if ctx.settings.auth == "off":
        via, principal = "off", tokens.ANONYMOUS_ADMIN
    else:
        secret = credentials.credentials.strip() if credentials is not None else ""
        via = "bearer"
        if not secret:
            secret, via = request.cookies.get(COOKIE, "").strip(), "cookie"
        principal = await run_in_threadpool(tokens.authenticate, ctx, secret or None)
    request.state.auth_via = via
    request.state.csrf_token = csrf_token(secret)
    if via == "cookie":
        check_csrf(request)
    return principal


def _scope(needed: str):  # type: ignore[no-untyped-def]
    async def dep(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        principal.require(needed)
        return principal

    return dep


Reader = Annotated[Principal, Depends(_scope("read"))]
Writer = Annotated[Principal, Depends(_scope("write"))]
Admin = Annotated[Principal, Depends(_scope("admin"))]


def _page_action(needed: str):  # type: ignore[no-untyped-def]
    scoped = Depends(_scope(needed))  # (not in the annotation: it is a string, read in this module's globals)

    async def dep(request: Request, principal: Principal = scoped) -> Principal:
        if request.state.auth_via != "bearer":  # a browser's request (cookie, or no auth on loopback)
            check_csrf(request)
        return principal

    return dep


PageWriter = Annotated[Principal, Depends(_page_action("write"))]
"""A web UI action needing ``write``: also CSRF-checked when the browser sends it without a bearer header."""
PageAdmin = Annotated[Principal, Depends(_page_action("admin"))]
