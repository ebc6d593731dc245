"""The Hugging Face Hub's read API, for ``HF_ENDPOINT=<registry URL>``: a translation layer.

Served at the Hub's own paths (not under ``/api/v1``, and not in the OpenAPI schema: the protocol
is the Hub's, checked with its real client in ``tests/test_hub.py``):

- ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}``: model info
  (``sha`` = the commit, ``siblings`` with sizes and LFS sha256s);
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]``: the file tree (``recursive``, ``expand``);
- ``POST /api/models/{repo_id}/paths-info/{revision}``: the tree entries of the paths asked for (the
  client's form body ``paths=…&paths=…&expand=…``, or the same as a JSON object), those that exist;
- ``GET /api/models/{repo_id}/refs``: the revisions as Git refs (aliases as branches, version
  numbers as tags; :func:`registry.services.hub.git_refs`);
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: a file. A revision other than the
  commit answers ``307`` with a relative ``Location`` naming the commit, so the client's ``GET``
  reads exactly the version its ``HEAD`` saw even if an alias moves in between; at the commit the
  bytes, with ``ETag`` = ``X-Linked-Etag`` = the file's sha256, ``X-Linked-Size``,
  ``X-Repo-Commit``, ``Content-Length``, ``Range`` (206) and ``If-None-Match`` (304).

Errors keep the registry's JSON body and add what the Hub client reads (``HEAD`` responses have no
body): ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``: the client's
``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``),
``X-Error-Message``, and ``X-Repo-Commit`` on a missing file (the client caches the absence). An
ambiguous repo id or revision is a 409 carrying ``RepoNotFound`` / ``RevisionNotFound``, so the
client raises that error with the reason (the versions to choose from) instead of reporting a
connection problem.
Tokens are the registry's (``HF_TOKEN`` is sent as the bearer token), with the same rules.
The rules for repo ids, revisions, commits and files are in :mod:`registry.services.hub`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ...errors import InvalidInput, NotFound, RegistryError
from ...services import hub
from ..deps import Ctx, Reader
from ..ranges import file_response

# The client raises the error these name, with X-Error-Message in it; for the two ambiguities (409) that is
# what tells its user why (any other 4xx on a HEAD it reports as a connection problem).
_HUB_CODES = {"model_not_found": "RepoNotFound", "version_not_found": "RevisionNotFound",
              "file_not_found": "EntryNotFound", "ambiguous_repo": "RepoNotFound",
              "ambiguous_revision": "RevisionNotFound"}
# The Hub's message for a token it does not know; its client then reports a bad token, not a missing repo.
_BAD_TOKEN = "Invalid credentials in Authorization header"


def _header_text(text: str) -> str:
    return " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())[:1000]


def hub_error(e: RegistryError) -> JSONResponse:
    """The registry's error body with the headers the Hub client reads."""
    message = _BAD_TOKEN if e.code in ("invalid_token", "token_expired") else e.message
    headers = {"X-Error-Message": _header_text(message)}
    if e.code in _HUB_CODES:
        headers["X-Error-Code"] = _HUB_CODES[e.code]
    commit = e.details.get("commit") if isinstance(e.details, dict) else None
    if isinstance(commit, str):
        headers["X-Repo-Commit"] = commit
    return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)


class HubRoute(APIRoute):
    """Routes whose errors (their dependencies' included: a missing token) carry the Hub's headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RegistryError as e:
                return hub_error(e)

        return route


router = APIRouter(route_class=HubRoute, include_in_schema=False)


def _segments(request: Request, prefix: str) -> list[str]:
    """The URL path after ``prefix``, split on ``/`` before decoding (the client sends a revision
    or a folder with ``/`` in it as ``%2F``, inside one segment)."""
    raw = (request.scope.get("raw_path") or b"").decode("latin-1").partition("?")[0]
    if not raw.startswith(prefix):  # no raw path, or its prefix spelled with escapes: the decoded one
        return request.url.path[len(prefix):].split("/")
    return [unquote(p) for p in raw[len(prefix):].split("/")]


def _not_a_hub_path(request: Request) -> NotFound:
    return NotFound(f"{request.url.path} is not a path of the Hub API", code="not_found")


def _readings(ctx: Ctx, request: Request, segs: list[str],
              fits: Callable[[list[str]], bool]) -> tuple[str, list[str]]:
    """(repo id, rest of the path): a path starts with ``name`` or ``namespace/name``; when both
    readings fit, the one naming a model wins (both: ``ambiguous_repo``)."""
    readings = [("/".join(segs[:n]), segs[n:]) for n in (1, 2) if len(segs) >= n and fits(segs[n:])]
    if not readings:
        raise _not_a_hub_path(request)
    if len(readings) == 1:
        return readings[0]
    return readings[hub.pick_repo(ctx, [r for r, _ in readings])]


def _iso(t: datetime) -> str:
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _lfs(f: hub.HubFile) -> dict[str, Any]:
    return {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.lfs_pointer)}


def _model_info(hv: hub.HubVersion, files: list[hub.HubFile]) -> dict[str, Any]:
    namespace, sep, _ = hv.repo_id.partition("/")
    info: dict[str, Any] = {
        "id": hv.repo_id, "modelId": hv.repo_id, "author": namespace if sep else None, "sha": hv.commit,
        "lastModified": _iso(hv.created_at), "createdAt": _iso(hv.model_created_at),
        "private": False, "disabled": False, "gated": False,
        "tags": [f"{k}:{v}" if v else k for k, v in sorted(hv.tags.items())],
        "siblings": [{"rfilename": f.path, "size": f.size, "blobId": f.blob_oid, "lfs": _lfs(f)} for f in files],
        "usedStorage": sum(f.size for f in files),
        "registry": {"ref": hv.ref, "kind": hv.kind, "storage_mode": hv.storage_mode, "status": hv.status},
    }
    if hv.kind == "adapter":
        info["library_name"] = "peft"
    if hv.base_repo_id is not None:
        info["cardData"] = {"base_model": hv.base_repo_id}
    return info


def _flag(request: Request, key: str) -> bool:
    return request.query_params.get(key, "").lower() in ("1", "true")


def _tree_entry(hv: hub.HubVersion, e: hub.HubFile | hub.Folder, expand: bool) -> dict[str, Any]:
    if isinstance(e, hub.Folder):
        out: dict[str, Any] = {"type": "directory", "oid": e.oid(hv.commit), "size": 0, "path": e.path}
    else:
        out = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path,
               "lfs": {"oid": e.sha256, "size": e.size, "pointerSize": len(e.lfs_pointer)}}
    if expand:
        out["lastCommit"] = {"id": hv.commit, "title": hv.ref, "date": _iso(hv.created_at)}
    return out


def _api_fits(rest: list[str]) -> bool:
    return (not rest or rest == ["refs"] or (len(rest) == 2 and rest[0] == "revision")
            or (len(rest) >= 2 and rest[0] == "tree"))


def _git_ref(r: hub.GitRef) -> dict[str, str]:
    return {"name": r.name, "ref": r.ref, "targetCommit": r.commit}


@router.get("/api/models/{rest:path}")
def models_api(request: Request, ctx: Ctx, _: Reader) -> Any:
    """Model info (``/api/models/{repo}[/revision/{rev}]``), trees (``…/tree/{rev}[/{path}]``) and
    refs (``…/refs``)."""
    repo_id, rest = _readings(ctx, request, _segments(request, "/api/models/"), _api_fits)
    if rest == ["refs"]:
        branches, tags = hub.git_refs(ctx, repo_id)
        out: dict[str, Any] = {"branches": [_git_ref(b) for b in branches], "converts": [],
                               "tags": [_git_ref(t) for t in tags]}
        if _flag(request, "include_prs"):
            out["pullRequests"] = []  # the registry has none
        return out
    hv = hub.resolve(ctx, repo_id, rest[1] if rest else None)
    files = hub.files(ctx, hv)
    if not rest or rest[0] == "revision":
        return _model_info(hv, files)
    entries = hub.tree(hv, files, "/".join(rest[2:]) or None, _flag(request, "recursive"))
    expand = _flag(request, "expand")
    return [_tree_entry(hv, e, expand) for e in entries]


def _paths_info_fits(rest: list[str]) -> bool:
    return len(rest) == 2 and rest[0] == "paths-info" and bool(rest[1])


def _paths_request(body: bytes, content_type: str) -> tuple[list[str], bool]:
    """(paths, expand) of a paths-info body: the Hub client's form (``paths`` repeated, ``expand``
    ``True``/``False``), or a JSON object ``{"paths": [...] or "...", "expand": bool}``."""
    def bad(message: str) -> InvalidInput:
        return InvalidInput(f"paths-info: {message}", code="invalid_request")

    media = content_type.partition(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the body is not UTF-8") from None
    if media == "application/json":
        try:
            doc = json.loads(text)
        except ValueError:
            raise bad("the body is not JSON") from None
        if not isinstance(doc, dict):
            raise bad("the body must be a JSON object")
        paths, expand = doc.get("paths", []), doc.get("expand", False)
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise bad("paths must be a string or a list of strings")
        if not isinstance(expand, bool):
            raise bad("expand must be true or false")
        return paths, expand
    if media not in ("", "application/x-www-form-urlencoded"):
        raise bad(f"a form (application/x-www-form-urlencoded) or JSON body, not {media}")
    try:
        form = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))  # (the body is bounded)
    except ValueError as e:
        raise bad(f"not a form body ({e})") from None
    flag = (form.get("expand") or ["false"])[-1].lower()
    if flag not in ("true", "false", "1", "0", ""):
        raise bad(f"expand must be true or false, not {flag!r}")
    return form.get("paths", []), flag in ("true", "1")


@router.post("/api/models/{rest:path}")
async def paths_info(request: Request, ctx: Ctx, _: Reader) -> Any:
    """Tree entries of the paths a client asks about (``HfApi.get_paths_info``, ``HfFileSystem.info``)."""
    repo_id, rest = await run_in_threadpool(_readings, ctx, request, _segments(request, "/api/models/"),
                                            _paths_info_fits)
    # (the body is bounded like every JSON body: REGISTRY_MAX_JSON_BODY_BYTES, 413 above it)
    paths, expand = _paths_request(await request.body(), request.headers.get("content-type", ""))

    def entries() -> list[dict[str, Any]]:
        hv = hub.resolve(ctx, repo_id, rest[1])
        return [_tree_entry(hv, e, expand) for e in hub.paths_info(hv, hub.files(ctx, hv), paths)]

    return await run_in_threadpool(entries)


def _resolve_fits(rest: list[str]) -> bool:
    return len(rest) >= 3 and rest[0] == "resolve" and all(rest[2:])


@router.api_route("/{repo:path}/resolve/{rest:path}", methods=["GET", "HEAD"])
def resolve_file(request: Request, ctx: Ctx, _: Reader) -> Response:
    """A file of a version (``/{repo}/resolve/{rev}/{path}``): 307 to the commit, or the bytes."""
    repo_id, rest = _readings(ctx, request, _segments(request, "/"), _resolve_fits)
    revision, path = rest[1], "/".join(rest[2:])
    hv = hub.resolve(ctx, repo_id, revision)
    f = hub.file(ctx, hv, path)
    headers = {"X-Repo-Commit": hv.commit, "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
               "X-Registry-Ref": hv.ref}
    if revision != hv.commit:
        location = f"/{quote(repo_id)}/resolve/{hv.commit}/{quote(f.path)}"
        return Response(status_code=307, headers={**headers, "Location": location, "Cache-Control": "no-cache"})
    return file_response(request, sha256=f.sha256, size=f.size, filename=f.path,
                         headers={**headers, "Cache-Control": "public, max-age=31536000, immutable"},
                         body=lambda start, end: hub.read(ctx, hv, f, start, end))
