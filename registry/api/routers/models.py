"""/api/v1/models: model families, their tags and aliases."""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from starlette.responses import Response

from ...services import aliases, catalog
from ..deps import Ctx, Reader, Writer
from ..params import parse_id_cursor
from ..responses import AUTHENTICATED, errors
from ..schemas import AliasOut, AliasSet, ModelCreate, ModelOut, ModelPage, ModelUpdate, TagValue
from .common import parse_tag_filters

router = APIRouter(prefix="/models", tags=["models"], responses=AUTHENTICATED)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut, responses=errors(409, 422))
def create_model(body: ModelCreate, ctx: Ctx, who: Writer) -> object:
    return catalog.create_model(ctx, body.name, body.kind, body.description, body.tags, actor=who.name)


def model_page(ctx: Ctx, prefix: str | None, kind: str | None, tag: list[str], base: str | None, order: str,
               limit: int, cursor: str | None) -> dict[str, object]:
    """One page of models (the API's and the web UI's): ``cursor`` is a name, or an id when newest first."""
    items, nxt = catalog.list_models(ctx, prefix=prefix, kind=kind, tag=parse_tag_filters(tag), base=base,
                                     order=order, limit=limit,
                                     cursor=parse_id_cursor(cursor) if order == "newest" else cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("", response_model=ModelPage, responses=errors(422))
def list_models(ctx: Ctx, _: Reader, prefix: str | None = None, kind: str | None = None,
                tag: list[str] = Query(default=[], description="key=value or key; repeat to AND"),
                base: str | None = Query(None, description="Only models with a live version pinned to this base "
                                         "version (a ref)."),
                order: str = Query("name", description="`name`, or `newest` (first; the cursor is then an id)."),
                limit: int = 50, cursor: str | None = None) -> object:
    return model_page(ctx, prefix, kind, tag, base, order, limit, cursor)


@router.get("/{name}", response_model=ModelOut, responses=errors(404, 422))
def get_model(name: str, ctx: Ctx, _: Reader) -> object:
    return catalog.get(ctx, name)


@router.patch("/{name}", response_model=ModelOut, responses=errors(404, 422))
def update_model(name: str, body: ModelUpdate, ctx: Ctx, _: Writer) -> object:
    return catalog.update_model(ctx, name, body.description)


@router.put("/{name}/tags/{key:path}", response_model=ModelOut, responses=errors(404, 422))
def set_model_tag(name: str, key: str, body: TagValue, ctx: Ctx, _: Writer) -> object:
    return catalog.set_model_tag(ctx, name, key, body.value)


@router.delete("/{name}/tags/{key:path}", response_model=ModelOut, responses=errors(404, 422))
def delete_model_tag(name: str, key: str, ctx: Ctx, _: Writer) -> object:
    return catalog.delete_model_tag(ctx, name, key)


@router.get("/{name}/aliases", response_model=list[AliasOut], responses=errors(404, 422))
def list_aliases(name: str, ctx: Ctx, _: Reader) -> object:
    return aliases.list_aliases(ctx, name)


@router.put("/{name}/aliases/{alias}", response_model=AliasOut, responses=errors(404, 422))
def set_alias(name: str, alias: str, body: AliasSet, ctx: Ctx, _: Writer) -> object:
    return aliases.set_alias(ctx, name, alias, body.version)


@router.delete("/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def delete_alias(name: str, alias: str, ctx: Ctx, _: Writer) -> Response:
    aliases.delete_alias(ctx, name, alias)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
