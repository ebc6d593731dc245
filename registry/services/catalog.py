"""Models (named families of versions): create, read, list, describe, tag."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput
from ..models import Alias, Model, ModelTag, ModelVersion, VersionStatus
from . import names
from .context import RegistryContext
from .events import emit
from .refs import find, get_model
from .sql import check_limit, newest_first
from .views import ModelView


def _views(s: Session, models: list[Model]) -> list[ModelView]:
    if not models:
        return []
    ids = [m.id for m in models]
    latest = dict(s.execute(
        select(ModelVersion.model_id, func.max(ModelVersion.version))
        .where(ModelVersion.model_id.in_(ids), ModelVersion.status == VersionStatus.ready.value,
               ModelVersion.archived_at.is_(None))
        .group_by(ModelVersion.model_id)).all())
    counts = dict(s.execute(
        select(ModelVersion.model_id, func.count()).where(
            ModelVersion.model_id.in_(ids), ModelVersion.archived_at.is_(None))
        .group_by(ModelVersion.model_id)).all())
    aliases: dict[int, dict[str, int]] = defaultdict(dict)
    for mid, alias, number in s.execute(
        select(Alias.model_id, Alias.name, ModelVersion.version).join(
            ModelVersion, ModelVersion.id == Alias.version_id).where(Alias.model_id.in_(ids))):
        aliases[mid][alias] = number
    return [
        ModelView(id=m.id, name=m.name, kind=m.kind, description=m.description,
                  tags={t.key: t.value for t in m.tags}, latest_version=latest.get(m.id),
                  version_count=counts.get(m.id, 0), aliases=aliases.get(m.id, {}),
                  created_at=m.created_at, created_by=m.created_by)
        for m in models
    ]


def create_model(ctx: RegistryContext, name: str, kind: str, description: str = "",
                 tags: dict[str, str] | None = None, actor: str | None = None) -> ModelView:
    names.model_name(name)
    names.kind(kind)
    description = names.description(description)
    tag_map = names.tags(tags)
    names.tag_budget(tag_map, max_count=ctx.settings.max_tags, max_bytes=ctx.settings.max_tag_bytes)
    with ctx.db.write() as s:
        if s.scalar(select(Model.id).where(Model.name == name)) is not None:
            raise Conflict(f"model {name!r} already exists", code="model_exists", details={"model": name})
        m = Model(name=name, kind=kind, description=description, created_by=actor, last_version=0)
        m.tags = [ModelTag(key=k, value=v) for k, v in tag_map.items()]
        s.add(m)
        s.flush()
        emit(s, "model.created", model_name=name, kind=kind)
        return _views(s, [m])[0]


def get(ctx: RegistryContext, name: str) -> ModelView:
    with ctx.db.read() as s:
        return _views(s, [get_model(s, name)])[0]


def update_model(ctx: RegistryContext, name: str, description: str | None) -> ModelView:
    with ctx.db.write() as s:
        m = get_model(s, name)
        if description is not None:
            m.description = names.description(description)
        emit(s, "model.updated", model_name=name)
        s.flush()
        return _views(s, [m])[0]


ORDERS = ("name", "newest")
"""How a model list is sorted: by name, or newest first (by creation)."""


def list_models(ctx: RegistryContext, *, prefix: str | None = None, kind: str | None = None,
                tag: dict[str, str | None] | None = None, base: str | None = None, order: str = "name",
                limit: int = 50, cursor: str | int | None = None) -> tuple[list[ModelView], str | None]:
    """Models by name (keyset-paginated on the unique name: ``cursor`` is the last name) or newest
    first (``order="newest"``, keyset-paginated on the id: ``cursor`` is the last id, an int).
    ``base``: only models with a live version pinned to the base version that ref names."""
    check_limit(limit)
    if order not in ORDERS:
        raise InvalidInput(f"order must be one of {', '.join(ORDERS)}", code="invalid_order")
    with ctx.db.read() as s:
        q = select(Model)
        if prefix:
            q = q.where(Model.name.startswith(prefix, autoescape=True))
        if kind:
            q = q.where(Model.kind == names.kind(kind))
        for key, value in (tag or {}).items():
            cond = (ModelTag.model_id == Model.id) & (ModelTag.key == key)
            if value is not None:
                cond = cond & (ModelTag.value == value)
            q = q.where(select(ModelTag.model_id).where(cond).exists())
        if base is not None:
            pinned_to = find(s, base)
            if pinned_to is None:
                return [], None
            q = q.where(select(ModelVersion.id).where(
                ModelVersion.model_id == Model.id, ModelVersion.base_version_id == pinned_to.id,
                ModelVersion.archived_at.is_(None)).exists())
        if order == "newest":
            rows, more = newest_first(s, q, Model.id, limit, cursor if isinstance(cursor, int) else None)
            return _views(s, rows), (str(rows[-1].id) if more else None)
        if cursor:
            q = q.where(Model.name > str(cursor))
        rows = list(s.scalars(q.order_by(Model.name).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return _views(s, rows), (rows[-1].name if more else None)


def set_model_tag(ctx: RegistryContext, name: str, key: str, value: str) -> ModelView:
    key, value = names.tag(key, value)
    with ctx.db.write() as s:
        m = get_model(s, name)
        current = {k: v for k, v in s.execute(select(ModelTag.key, ModelTag.value).where(ModelTag.model_id == m.id))}
        names.tag_budget({**current, key: value}, max_count=ctx.settings.max_tags,
                         max_bytes=ctx.settings.max_tag_bytes)
        row = s.get(ModelTag, (m.id, key))
        if row is None:
            s.add(ModelTag(model_id=m.id, key=key, value=value))
        else:
            row.value = value
        emit(s, "model.tag_set", model_name=name, key=key, value=value)
        s.flush()
        s.refresh(m)
        return _views(s, [m])[0]


def delete_model_tag(ctx: RegistryContext, name: str, key: str) -> ModelView:
    with ctx.db.write() as s:
        m = get_model(s, name)
        row = s.get(ModelTag, (m.id, key))
        if row is not None:
            s.delete(row)
            emit(s, "model.tag_deleted", model_name=name, key=key)
        s.flush()
        s.refresh(m)
        return _views(s, [m])[0]
