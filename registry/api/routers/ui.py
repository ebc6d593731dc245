"""The web UI (``/ui``): server-rendered pages over the services the JSON API calls.

Jinja2 templates and static assets live in ``registry/ui`` (shipped in the package; the vendored
libraries, htmx and cytoscape.js with its dagre layout, come from npm with a lock file, see
``registry/ui/vendor.py``). Handlers stay thin: parse the query, call the same service the JSON
route calls, render. Reading needs ``read``; actions (promote, move an alias, redeliver) need
``write`` (``admin`` for webhooks, as in the API) and carry the page's CSRF token
(:func:`registry.api.deps.check_csrf`). Auth is the API's: a bearer header or the HTTP-only cookie
``/ui/login`` sets, both through the same token check (:func:`registry.api.deps.get_principal`).
Live parts (jobs, deliveries) re-fetch their page every few seconds and htmx swaps the part in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from ... import ui as ui_package
from ...errors import Unauthorized
from ...models import MEMBERSHIP_RELATIONS, JobState, Relation
from ...services import aliases, bases, catalog, compat, compressions, jobs, lineage, names, tokens, versions, webhooks
from ...services.jobtypes import JOB_TYPES
from ...services.tokens import Principal
from ...services.versions import VersionFilter
from ...services.webhooks import DELIVERY_STATUSES
from ...units import human_bytes
from ..deps import COOKIE, Ctx, PageAdmin, PageWriter, Reader, cross_site, csrf_token
from ..params import Id, parse_id_cursor
from .common import version_ref
from .models import model_page

UI_DIR = Path(ui_package.__file__).resolve().parent
STATIC_DIR = UI_DIR / "static"
PREFIX = "/ui"
API = "/api/v1"
PAGE_SIZE = 25
COOKIE_MAX_AGE = 30 * 24 * 3600  # the cookie is re-checked on every request; the token's own expiry still applies

# Pages may load only what this server serves (the browser itself refuses anything else), and may
# not be framed (no clickjacking of the write buttons). ReDoc's bundle asks for its logo from its
# vendor's host: this policy is what keeps that request from ever leaving the browser.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; "
            "base-uri 'self'")

NAV: list[tuple[str, str, str]] = [
    # (section, label, path): the header's links; a new section adds a row here.
    ("models", "Models", f"{PREFIX}/models"),
    ("bases", "Bases", f"{PREFIX}/bases"),
    ("compressions", "Compressions", f"{PREFIX}/compressions"),
    ("jobs", "Jobs", f"{PREFIX}/jobs"),
    ("webhooks", "Webhooks", f"{PREFIX}/webhooks"),
]

router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=UI_DIR / "templates")


# --------------------------------------------------------------------------- formatting (template filters)


def number(x: Any, digits: int = 4) -> str:
    """A metric for people: ``0.0123``, ``1.2e-07``; not a number: as it is."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "" if x is None else str(x)
    if isinstance(x, int) or x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def edge_label(relation: str, params: dict[str, Any]) -> str:
    """How a lineage edge reads: its relation and the parameter that matters for it."""
    if relation == "merge_of" and "weight" in params:
        return f"{relation} w={number(params['weight'], 3)}"
    if relation in MEMBERSHIP_RELATIONS and "error" in params:
        return f"{relation} err={number(params['error'], 3)}"
    if relation == "transfer_of" and "alpha" in params:
        return f"{relation} α={number(params['alpha'], 3)}"
    return relation


def plan_parameters(parameters: dict[str, Any]) -> str:
    """A compression member's parameters in a line: the ranks kept and the commonest component codings
    (own factors), or the basis, its p and the coefficients' coding (rmm); exact: nothing."""
    if "basis" in parameters:
        ps = sorted(set((parameters.get("p") or {}).values()))
        p = "" if not ps else f"p={ps[0]}" if len(ps) == 1 else f"p={ps[0]}–{ps[-1]}"
        return " · ".join(x for x in (f"basis {parameters['basis']}", p, parameters.get("basis_storage"),
                                      f"coefficients {parameters.get('coefficients')}") if x)
    modules = parameters.get("modules") or {}
    if not modules:
        return ""
    ranks = sorted({m.get("rank", 0) for m in modules.values()})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
    counts: dict[str, int] = {}
    for m in modules.values():
        for label in m.get("components") or ([m["stored"]] if "stored" in m else []):
            counts[label] = counts.get(label, 0) + 1
    common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    coding = ", ".join(f"{label} ×{n}" for label, n in common[:3]) + (", …" if len(common) > 3 else "")
    return f"{rank} over {len(modules)} modules" + (f"; {coding}" if coding else "")


def version_url(ref: str) -> str:
    name, _, v = ref.partition("@")
    return f"{PREFIX}/models/{quote(name)}/versions/{quote(v or 'latest')}"


def file_url(ref: str, path: str) -> str:
    name, _, v = ref.partition("@")
    return f"{API}/models/{quote(name)}/versions/{quote(v)}/files/{quote(path)}"


templates.env.filters.update(bytes=human_bytes, num=number, version_url=version_url, edge_label=edge_label,
                             plan_parameters=plan_parameters,
                             when=lambda d: "" if d is None else str(d)[:19].replace("T", " "),
                             pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
templates.env.globals.update(nav=NAV, file_url=file_url, api=API)


def query(**params: Any) -> str:
    """``?a=1&tag=x&tag=y`` from the non-empty parameters (lists repeat)."""
    pairs = [(k, x) for k, v in params.items() for x in (v if isinstance(v, list) else [v]) if x not in (None, "")]
    return "?" + urlencode(pairs) if pairs else ""


def render(request: Request, who: Principal | None, template: str, http_status: int = 200, /,
           **values: Any) -> Response:
    ctx = request.app.state.ctx
    auth_via = getattr(request.state, "auth_via", None)
    return templates.TemplateResponse(request, template, {
        "who": who, "auth": ctx.settings.auth, "auth_via": auth_via,
        "csrf": getattr(request.state, "csrf_token", None) or csrf_token(None),
        "can_write": who is not None and who.allows("write"), "can_admin": who is not None and who.allows("admin"),
        "mlflow_ui": ctx.settings.resolved_mlflow_ui_url, **values}, status_code=http_status,
        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})


def is_page(request: Request) -> bool:
    """Whether an error for this request is answered with an HTML page (the UI's routes) rather than JSON."""
    path = request.url.path
    return (path == PREFIX or path.startswith(PREFIX + "/")) and not path.startswith(PREFIX + "/static/")


def error_page(request: Request, status: int, code: str, message: str) -> Response:
    """The UI's answer to an error: the sign-in form for a 401, else a page saying what went wrong
    (for an htmx action, its ``#flash`` part is what the page shows)."""
    if status == 401 and request.method == "GET" and "hx-request" not in request.headers:
        return render(request, None, "login.html", status, next=_local(str(request.url.path) + (
            "?" + request.url.query if request.url.query else "")), message=message, code=code)
    hint = " (sign in again: /ui/login)" if status == 401 else ""
    return render(request, None, "error.html", status, status_code=status, code=code, message=message,
                  flash=f"{code}: {message}{hint}", flash_kind="error")


def _local(target: str | None) -> str:
    """A redirect target on this site's UI (anything else, ``//host`` included, becomes /ui)."""
    return target if target and target.startswith(PREFIX) and not target.startswith("//") else PREFIX


def _blank(value: str | None) -> str | None:
    """An empty form field means "no filter"."""
    return value.strip() or None if value is not None else None


# --------------------------------------------------------------------------- sign in / out


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    if request.app.state.ctx.settings.auth == "off":
        return RedirectResponse(_local(next), status_code=303)
    return render(request, None, "login.html", next=_local(next), message=None, code=None)


@router.post("/login")
async def login(request: Request, token: str = Form(""), next: str = Form(PREFIX)) -> Response:
    """Check the token as every request is checked, then keep it in an HTTP-only, SameSite=Strict cookie."""
    ctx = request.app.state.ctx
    if site := cross_site(request):  # no session yet, so no CSRF token: the browser's word decides
        return error_page(request, 403, "csrf_failed", f"refused a {site} sign-in")
    if ctx.settings.auth == "off":
        return RedirectResponse(_local(next), status_code=303)
    secret = token.strip()
    try:
        who = await run_in_threadpool(tokens.authenticate, ctx, secret or None)
    except Unauthorized as e:
        return render(request, None, "login.html", 401, next=_local(next), message=e.message, code=e.code)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, secret, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    response.headers["X-Registry-Principal"] = who.name
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if site := cross_site(request):
        return error_page(request, 403, "csrf_failed", f"refused a {site} sign-out")
    response: Response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    if "hx-request" in request.headers:  # htmx: navigate the whole page
        response = Response(headers={"HX-Redirect": f"{PREFIX}/login"})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


# --------------------------------------------------------------------------- models and versions


@router.get("")
@router.get("/models")
def models_page(request: Request, ctx: Ctx, who: Reader, q: str | None = None, kind: str | None = None,
                tag: list[str] = Query(default=[]), base: str | None = None, cursor: str | None = None,
                limit: int = PAGE_SIZE) -> Response:
    """Every model, newest first: a name prefix search, kind, tag (``key=value`` or ``key``) and base filters."""
    filters = {"q": _blank(q), "kind": _blank(kind), "tag": [t.strip() for t in tag if t.strip()],
               "base": _blank(base), "limit": limit if limit != PAGE_SIZE else None}
    page = model_page(ctx, filters["q"], filters["kind"], filters["tag"], filters["base"], "newest", limit, cursor)
    nxt = query(**filters, cursor=page["next_cursor"]) if page["next_cursor"] else None
    return render(request, who, "models.html", section="models", page=page, filters=filters, kinds=names.KINDS,
                  next_url=nxt, first_url=query(**filters) if cursor else None)


def _model_page(request: Request, ctx: Ctx, who: Principal, name: str, archived: bool = False,
                cursor: str | None = None, limit: int = PAGE_SIZE, flash: str | None = None) -> Response:
    model = catalog.get(ctx, name)
    items, nxt = versions.search(ctx, VersionFilter(model=name, include_archived=archived, limit=limit,
                                                    cursor=parse_id_cursor(cursor)))
    more = {"archived": archived or None, "limit": limit if limit != PAGE_SIZE else None}
    return render(request, who, "model.html", section="models", model=model, versions=items,
                  alias_list=aliases.list_aliases(ctx, name), archived=archived, flash=flash,
                  next_url=query(**more, cursor=nxt) if nxt is not None else None)


@router.get("/models/{name}")
def model_detail(request: Request, name: str, ctx: Ctx, who: Reader, archived: bool = False,
                 cursor: str | None = None, limit: int = PAGE_SIZE) -> Response:
    """A model: its versions (newest first) with status, aliases, tags, storage and sizes."""
    return _model_page(request, ctx, who, name, archived, cursor, limit)


@router.post("/models/{name}/aliases")
def move_alias(request: Request, name: str, ctx: Ctx, who: PageWriter, alias: str = Form(...),
               version: str = Form(...)) -> Response:
    """Point an alias at a version (what ``PUT /api/v1/models/{name}/aliases/{alias}`` does)."""
    out = aliases.set_alias(ctx, name, alias.strip(), version.strip())
    return _model_page(request, ctx, who, name, flash=f"{name}@{out['alias']} → {out['ref']}")


@router.post("/models/{name}/versions/{v}/promote")
def promote(request: Request, name: str, v: str, ctx: Ctx, who: PageWriter, alias: str = Form("")) -> Response:
    """Candidate → ready, optionally pointing an alias at it (``POST …/promote`` of the API)."""
    view = versions.promote(ctx, version_ref(name, v), _blank(alias), who.name)
    return _model_page(request, ctx, who, name, flash=f"promoted {view.ref}: {view.status}")


@router.get("/models/{name}/versions/{v}")
def version_detail(request: Request, name: str, v: str, ctx: Ctx, who: Reader) -> Response:
    """A version: files, tags, its MLflow run, its update reports, and its lineage drawn."""
    ref = version_ref(name, v)
    view = versions.get(ctx, ref)
    graph = lineage.graph(ctx, view.ref, direction="both", depth=25)
    plans = {p.ref for p in view.parents if p.relation == Relation.plan_member_of.value} | {view.ref}
    return render(request, who, "version.html", section="models", v=view, graph=graph,
                  graph_elements=_elements(graph), reports=compat.update_reports(ctx, view.ref),
                  predictions=compat.list_predictions(ctx, view.ref),
                  compressions_of={ref: [c["id"] for c in compressions.list_compressions(ctx, version=ref)]
                                   for ref in sorted(plans)})


def _elements(graph: dict[str, Any]) -> list[dict[str, Any]]:
    """The lineage graph as cytoscape.js elements: edges run parent → child, so ancestors lay out above."""
    nodes = [{"group": "nodes", "data": {"id": n["ref"], "label": f"{n['ref']}\n{n['kind']} · {n['status']}",
                                         "kind": n["kind"], "status": n["status"], "url": version_url(n["ref"]),
                                         "root": n["ref"] == graph["root"], "archived": n["archived"]}}
             for n in graph["nodes"]]
    edges = [{"group": "edges", "data": {"id": f"e{i}", "source": e["parent"], "target": e["child"],
                                         "relation": e["relation"], "label": edge_label(e["relation"], e["params"])}}
             for i, e in enumerate(graph["edges"])]
    return nodes + edges


# --------------------------------------------------------------------------- bases


@router.get("/bases")
def bases_page(request: Request, ctx: Ctx, who: Reader, collection: str | None = None) -> Response:
    """RMM bases, newest first: members, p, errors, storage ratio."""
    items = bases.list_bases(ctx, _blank(collection), 100)
    return render(request, who, "bases.html", section="bases", items=items, collection=_blank(collection) or "")


@router.get("/bases/{basis_id}")
def basis_detail(request: Request, basis_id: Id, ctx: Ctx, who: Reader) -> Response:
    return render(request, who, "basis.html", section="bases", b=bases.get_basis(ctx, basis_id))


# --------------------------------------------------------------------------- compressions


@router.get("/compressions")
def compressions_page(request: Request, ctx: Ctx, who: Reader, collection: str | None = None) -> Response:
    """Compression plans, newest first: members, methods, errors, stored over original bytes."""
    items = compressions.list_compressions(ctx, _blank(collection), 100)
    return render(request, who, "compressions.html", section="compressions", items=items,
                  collection=_blank(collection) or "")


@router.get("/compressions/{compression_id}")
def compression_detail(request: Request, compression_id: Id, ctx: Ctx, who: Reader) -> Response:
    """One plan: per member its method and parameters, stored bytes, error and error as served, and
    whether it is served from the plan."""
    return render(request, who, "compression.html", section="compressions",
                  c=compressions.get_compression(ctx, compression_id))


# --------------------------------------------------------------------------- jobs


@router.get("/jobs")
def jobs_page(request: Request, ctx: Ctx, who: Reader, state: str | None = None, type: str | None = None,
              cursor: str | None = None) -> Response:
    """Jobs, newest first, with live progress and errors (the table re-fetches itself every 2 s)."""
    items, nxt = jobs.list_jobs(ctx, state=_blank(state), type=_blank(type), limit=PAGE_SIZE,
                                cursor=parse_id_cursor(cursor))
    filters = {"state": _blank(state), "type": _blank(type)}
    return render(request, who, "jobs.html", section="jobs", items=items, filters=filters,
                  states=[s.value for s in JobState], types=sorted(JOB_TYPES), self_url=query(**filters, cursor=cursor),
                  next_url=query(**filters, cursor=nxt) if nxt is not None else None)


@router.get("/jobs/{job_id}")
def job_detail(request: Request, job_id: Id, ctx: Ctx, who: Reader) -> Response:
    return render(request, who, "job.html", section="jobs", job=jobs.get(ctx, job_id))


# --------------------------------------------------------------------------- webhooks (admin, as in the API)


@router.get("/webhooks")
def webhooks_page(request: Request, ctx: Ctx, who: PageAdmin) -> Response:
    return render(request, who, "webhooks.html", section="webhooks", items=webhooks.list_webhooks(ctx))


@router.get("/webhooks/{webhook_id}")
def webhook_detail(request: Request, webhook_id: Id, ctx: Ctx, who: PageAdmin, status: str | None = None,
                   cursor: str | None = None) -> Response:
    """A webhook and its deliveries, newest first (live while any is pending)."""
    hook = webhooks.get_webhook(ctx, webhook_id)
    items, nxt = webhooks.list_deliveries(ctx, webhook_id, status=_blank(status), limit=PAGE_SIZE,
                                          cursor=parse_id_cursor(cursor))
    return render(request, who, "webhook.html", section="webhooks", hook=hook, items=items,
                  status=_blank(status) or "", statuses=DELIVERY_STATUSES,
                  self_url=query(status=_blank(status), cursor=cursor),
                  next_url=query(status=_blank(status), cursor=nxt) if nxt is not None else None)


@router.get("/deliveries/{delivery_id}")
def delivery_detail(request: Request, delivery_id: Id, ctx: Ctx, who: PageAdmin) -> Response:
    """One delivery with every attempt (status code, error, duration, the response's start)."""
    return render(request, who, "delivery.html", section="webhooks", d=webhooks.get_delivery(ctx, delivery_id))


@router.post("/deliveries/{delivery_id}/redeliver")
def redeliver(request: Request, delivery_id: Id, ctx: Ctx, who: PageAdmin) -> Response:
    out = webhooks.redeliver(ctx, delivery_id, actor=who.name)
    return render(request, who, "delivery.html", section="webhooks", d=webhooks.get_delivery(ctx, delivery_id),
                  flash=f"redelivering: job {out['job']['id']}")
