"""/api/v1/versions and /api/v1/models/{name}/versions: read, search, archive, tag, lineage."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, TypeAdapter

from ...services import lineage, recording, tags, versions
from ...services.drafts import DraftSpec
from ...services.versions import VersionFilter
from ...services.views import VersionView
from ..deps import Ctx, Reader, Writer
from ..params import IdCursor
from ..responses import AUTHENTICATED, errors
from ..schemas import FileOut, LineageOut, TagsSet, VersionCreate, VersionOut, VersionPage
from .common import json_response, parse_tag_filters, version_json, version_ref

router = APIRouter(tags=["versions"], responses=AUTHENTICATED)

TagQuery = Query(default=[], description="key=value or key; repeat to AND")


@dataclass
class _Page:
    items: list[VersionView]
    next_cursor: str | None


_PAGE_JSON = TypeAdapter(_Page)


def _search(ctx: Ctx, model: str | None, prefix: str | None, kind: str | None, tag: list[str], base: str | None,
            status: str | None, archived: bool, limit: int, cursor: int | None) -> _Page:
    items, nxt = versions.search(ctx, VersionFilter(
        model=model, prefix=prefix, kind=kind, tags=parse_tag_filters(tag), base=base, status=status,
        include_archived=archived, limit=limit, cursor=cursor))
    return _Page(items, str(nxt) if nxt is not None else None)


@router.get("/versions", response_model=VersionPage, responses=errors(404, 422))
def search_versions(ctx: Ctx, _: Reader, cursor: IdCursor, model: str | None = None, prefix: str | None = None,
                    kind: str | None = None, tag: list[str] = TagQuery, base: str | None = None,
                    status: str | None = None, archived: bool = False, limit: int = 50) -> object:
    """Search versions across models; newest first; ``next_cursor`` pages on."""
    return json_response(_PAGE_JSON, _search(ctx, model, prefix, kind, tag, base, status, archived, limit, cursor))


@router.get("/models/{name}/versions", response_model=VersionPage, responses=errors(404, 422))
def list_versions(name: str, ctx: Ctx, _: Reader, cursor: IdCursor, kind: str | None = None,
                  tag: list[str] = TagQuery, base: str | None = None, status: str | None = None,
                  archived: bool = False, limit: int = 50) -> object:
    versions_ = _search(ctx, name, None, kind, tag, base, status, archived, limit, cursor)
    if not versions_.items and cursor is None:
        from ...services.catalog import get

        get(ctx, name)  # 404 for an unknown model rather than an empty page
    return json_response(_PAGE_JSON, versions_)


@router.post("/models/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=VersionOut,
             responses=errors(409, 422))
def create_version(name: str, body: VersionCreate, ctx: Ctx, who: Writer) -> object:
    """Create the next version of ``name`` in one request from bytes the registry already holds
    (``files``: path, sha256 and optionally size of each file). The same checks as a draft's
    commit; 422 ``blob_not_found`` lists the files whose bytes the registry does not hold (upload
    those through a draft), and nothing is recorded."""
    spec = DraftSpec(model=name, kind=body.kind, base=body.base, tags=body.tags, aliases=body.aliases,
                     description=body.description, parents=[p.model_dump() for p in body.parents])
    view = recording.create_version(ctx, spec, [(f.path, f.sha256, f.size) for f in body.files], who.name)
    return version_json(view, status.HTTP_201_CREATED)


@router.get("/refs/{ref}", response_model=VersionOut, responses=errors(404, 422))
def get_by_ref(ref: str, ctx: Ctx, _: Reader) -> object:
    """A version by ref: ``name@3``, ``name@alias`` or ``name`` (newest ready)."""
    return version_json(versions.get(ctx, ref))


@router.get("/models/{name}/versions/{v}", response_model=VersionOut, responses=errors(404, 422))
def get_version(name: str, v: str, ctx: Ctx, _: Reader) -> object:
    return version_json(versions.get(ctx, version_ref(name, v)))


@router.delete("/models/{name}/versions/{v}", response_model=VersionOut, responses=errors(404, 409, 422))
def archive_version(name: str, v: str, ctx: Ctx, who: Writer) -> object:
    """Archive (soft-delete). Refused with 409 while live versions depend on it."""
    return versions.archive(ctx, version_ref(name, v), who.name)


class PromoteBody(BaseModel):
    alias: str | None = None


@router.post("/models/{name}/versions/{v}/promote", response_model=VersionOut, responses=errors(404, 409, 422))
def promote_version(name: str, v: str, ctx: Ctx, who: Writer, body: PromoteBody | None = None) -> object:
    """Candidate -> ready (and optionally point an alias at it)."""
    return versions.promote(ctx, version_ref(name, v), body.alias if body else None, who.name)


@router.post("/models/{name}/versions/{v}/tags", response_model=VersionOut, responses=errors(404, 422))
def set_version_tags(name: str, v: str, body: TagsSet, ctx: Ctx, _: Writer) -> object:
    return tags.set_tags(ctx, version_ref(name, v), body.tags)


@router.delete("/models/{name}/versions/{v}/tags/{key:path}", response_model=VersionOut, responses=errors(404, 422))
def delete_version_tag(name: str, v: str, key: str, ctx: Ctx, _: Writer) -> object:
    return tags.delete_tag(ctx, version_ref(name, v), key)


@router.get("/models/{name}/versions/{v}/lineage", response_model=LineageOut, responses=errors(404, 422))
def get_lineage(name: str, v: str, ctx: Ctx, _: Reader, direction: str = "both", depth: int = 25) -> object:
    return lineage.graph(ctx, version_ref(name, v), direction=direction, depth=depth)


@router.get("/models/{name}/versions/{v}/files", response_model=list[FileOut], responses=errors(404, 409, 422))
def list_files(name: str, v: str, ctx: Ctx, _: Reader, format: str = "native") -> object:
    """The version's files (``format``: native, or for adapters ``delta`` / ``merged``; a format's
    files are generated and hashed the first time they are asked for)."""
    return [FileOut(path=f.path, sha256=f.sha256, size=f.size) for f in versions.list_served(
        ctx, version_ref(name, v), format)]
