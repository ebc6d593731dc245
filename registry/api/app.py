"""The FastAPI application: ``create_app()`` (uvicorn: ``registry.api.app:create_app --factory``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..config import Settings, get_settings, is_loopback
from ..errors import RegistryError
from ..services import content, names
from ..services.context import RegistryContext
from .responses import declare_body_errors
from .routers import compat, compressions, drafts, files, hub, jobs, models, system, ui, versions, webhooks

log = logging.getLogger("registry.api")

API_PREFIX = "/api/v1"
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details or {}}}, status_code=status)


def _answer(request: Request, status: int, code: str, message: str, details: Any = None) -> Response:
    """An error as the API's JSON body, or, for the web UI's pages, as a page saying the same."""
    if ui.is_page(request):
        return ui.error_page(request, status, code, message)
    return _error(status, code, message, details)


class LoopbackOnly:
    """ASGI middleware: 403 for any peer that is not on this machine."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            host = client[0] if client else "127.0.0.1"
            if not is_loopback(host) and host != "testclient":
                response = _error(403, "auth_required", "this server runs without authentication and only "
                                  "accepts connections from its own machine")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body is bounded to ``limit`` bytes as the route reads it, before
    anything parses it: a larger declared ``Content-Length`` is refused before any byte is read,
    and a chunked body as soon as it passes the limit (413 ``payload_too_large``, through the
    app's error handler). Routes marked :func:`~registry.api.deps.streamed_body` (file bytes,
    upload chunks) are exempt: they stream to disk under their own size and time limits."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = -1  # -1: nothing read yet

        async def limited_receive() -> Any:
            nonlocal seen
            if getattr(getattr(scope.get("route"), "endpoint", None), "streams_body", False):
                return await receive()  # routed by now: the router set scope["route"]
            if seen < 0:
                seen = 0
                for key, value in scope["headers"]:
                    declared = names.ascii_uint(value.decode("latin-1")) if key == b"content-length" else None
                    if declared is not None and declared > self.limit:
                        raise StarletteHTTPException(413, "request body too large")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, "request body too large")
            return message

        await self.app(scope, limited_receive, send)


def create_app(settings: Settings | None = None, ctx: RegistryContext | None = None) -> FastAPI:
    settings = settings or (ctx.settings if ctx else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = ctx is None
        app.state.ctx = ctx or RegistryContext.open(settings, migrate=True)
        if app.state.ctx.job_sender is None:
            from workers.app import send_job

            app.state.ctx.job_sender = send_job
        content.load_codec()  # packed downloads decode with compiled kernels: load them now, beside startup
        try:
            yield
        finally:
            if own:
                app.state.ctx.close()

    app = FastAPI(
        title="registry",
        version=__version__,
        summary="Versions, lineage and derived artifacts for base models, LoRA adapters, fine-tunes and merges.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc below: their assets are served from the package, not a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> Response:
        return _answer(request, exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", [])), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _answer(request, 422, "invalid_request", f"{where}: {first['msg']}", {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 413:
            limit = settings.max_json_body_bytes
            return _error(413, "payload_too_large", f"request body larger than {limit} bytes (the limit of "
                          "REGISTRY_MAX_JSON_BODY_BYTES; files are uploaded with PUT or upload sessions)",
                          {"limit": limit})
        return _answer(request, exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        from ..weights.errors import WeightsError

        if isinstance(exc, WeightsError):
            return _error(422, "invalid_weights", str(exc), {"type": type(exc).__name__})
        log.exception("unhandled error")
        return _error(500, "internal", "internal server error")

    app.add_middleware(BodyLimit, limit=settings.max_json_body_bytes)
    if settings.auth == "off":
        # Without auth the server must only be reachable from this machine; refuse remote peers
        # even if someone bound it to a public address by hand.
        app.add_middleware(LoopbackOnly)

    routers = (system, models, versions, files, drafts, jobs, compressions, compat, webhooks)
    for router in (r.router for r in routers):
        declare_body_errors(router)
        app.include_router(router, prefix=API_PREFIX)
    _add_pages(app)
    # The Hugging Face Hub's read API at the Hub's own paths (HF_ENDPOINT=<this server>); last, so
    # its path-shaped routes never shadow one of the API's.
    app.include_router(hub.router)
    return app


def _add_pages(app: FastAPI) -> None:
    """The web UI at /ui (and / leading there), its static assets, and the API docs, all served from
    the package (registry/ui/static): nothing a page loads comes from another host."""
    static = f"{ui.PREFIX}/static"
    app.mount(static, StaticFiles(directory=ui.STATIC_DIR), name="ui-static")
    app.include_router(ui.router)
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(ui.PREFIX, status_code=307)

    def docs_page(page: HTMLResponse) -> HTMLResponse:
        page.headers["Content-Security-Policy"] = ui.DOCS_CSP
        return page

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return docs_page(get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} API — Swagger UI",
                                   swagger_js_url=f"{static}/vendor/swagger-ui-bundle.js",
                                   swagger_css_url=f"{static}/vendor/swagger-ui.css",
                                   swagger_favicon_url=f"{static}/vendor/favicon-32x32.png",
                                   # no badge fetched from the public validator
                                   swagger_ui_parameters={"validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return docs_page(get_redoc_html(openapi_url=openapi_url, title=f"{app.title} API — ReDoc",
                                        redoc_js_url=f"{static}/vendor/redoc.standalone.js",
                                        redoc_favicon_url=f"{static}/vendor/favicon-32x32.png",
                                        with_google_fonts=False))
