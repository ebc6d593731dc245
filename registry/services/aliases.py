"""Movable names for versions (``production``, ``staging``); ``latest`` is implicit."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import InvalidInput, NotFound
from ..models import Alias, ModelVersion, utcnow
from . import names
from .context import RegistryContext
from .events import emit
from .refs import get_model, resolve


def set_row(s: Session, model_id: int, alias: str, version_id: int) -> None:
    row = s.get(Alias, (model_id, alias))
    if row is None:
        s.add(Alias(model_id=model_id, name=alias, version_id=version_id))
    else:
        row.version_id = version_id
        row.updated_at = utcnow()


def set_alias(ctx: RegistryContext, name: str, alias: str, ref: str) -> dict[str, object]:
    """Point ``name@alias`` at the version ``ref`` (a version of the same model)."""
    names.alias_name(alias)
    with ctx.db.write() as s:
        model = get_model(s, name)
        target = resolve(s, ref if "@" in ref else f"{name}@{ref}")
        if target.model_id != model.id:
            raise InvalidInput(f"{target.ref} is not a version of {name}", code="invalid_alias_target")
        if target.archived_at is not None:
            raise InvalidInput(f"{target.ref} is archived", code="invalid_alias_target")
        set_row(s, model.id, alias, target.id)
        emit(s, "alias.set", model_name=name, version_id=target.id, alias=alias, ref=target.ref)
        return {"model": name, "alias": alias, "version": target.version, "ref": target.ref}


def delete_alias(ctx: RegistryContext, name: str, alias: str) -> None:
    with ctx.db.write() as s:
        model = get_model(s, name)
        row = s.get(Alias, (model.id, alias))
        if row is None:
            raise NotFound(f"{name} has no alias {alias!r}", code="alias_not_found")
        emit(s, "alias.deleted", model_name=name, version_id=row.version_id, alias=alias)
        s.delete(row)


def list_aliases(ctx: RegistryContext, name: str) -> list[dict[str, object]]:
    with ctx.db.read() as s:
        model = get_model(s, name)
        rows = s.execute(select(Alias.name, ModelVersion.version).join(
            ModelVersion, ModelVersion.id == Alias.version_id).where(Alias.model_id == model.id).order_by(Alias.name))
        return [{"model": name, "alias": a, "version": v, "ref": f"{name}@{v}"} for a, v in rows]
