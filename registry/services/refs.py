"""References to versions: ``name@3``, ``name@alias``, ``name`` (the newest ready version)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, contains_eager, lazyload

from ..errors import InvalidInput, NotFound
from ..models import Alias, Model, ModelVersion, VersionStatus
from . import names

T = TypeVar("T", bound=tuple[Any, ...])


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(text: str) -> Ref:
    """Parse a ref; raises ``invalid_ref`` (422) on bad syntax."""

    def bad(reason: str) -> InvalidInput:
        return InvalidInput(f"invalid ref {text!r}: {reason} (expected name, name@VERSION or name@ALIAS)",
                            code="invalid_ref", details={"ref": text})

    if not isinstance(text, str) or not text or text.count("@") > 1:
        raise bad("malformed")
    name, _, sel = text.partition("@")
    if not names.is_model_name(name):
        raise bad("bad model name")
    if not _:
        return Ref(name)
    v = names.ascii_uint(sel)
    if v is not None:
        if v < 1 or len(sel) > 9:
            raise bad("version numbers start at 1")
        return Ref(name, version=v)
    if sel == "latest":
        return Ref(name)
    if not names.is_alias(sel):
        raise bad("bad alias (a version number is ASCII digits)")
    return Ref(name, alias=sel)


def model_named(name: str) -> Select[tuple[Model]]:
    """The model called ``name``, without its tags (nothing here reads them: one query fewer)."""
    return select(Model).where(Model.name == name).options(lazyload(Model.tags))


def get_model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFound(f"model {name!r} not found", code="model_not_found", details={"model": name})
    return model


def ref_query(q: Select[T], r: Ref) -> Select[T]:
    """``q`` (a select from ``model_versions``) narrowed to the version ``r`` names, joined with its
    model: by number (the unique ``(model_id, version)``), by alias (the aliases' primary key), or
    the newest ready, non-archived version (``ix_versions_model_status_version``)."""
    q = q.join(Model, Model.id == ModelVersion.model_id).where(Model.name == r.name)
    if r.version is not None:
        return q.where(ModelVersion.version == r.version)
    if r.alias is not None:
        return q.join(Alias, Alias.version_id == ModelVersion.id).where(
            Alias.model_id == Model.id, Alias.name == r.alias)
    return q.where(ModelVersion.status == VersionStatus.ready.value, ModelVersion.archived_at.is_(None)).order_by(
        ModelVersion.version.desc()).limit(1)


def not_found(session: Session, r: Ref) -> NotFound:
    """The error for a ref that names no version: ``model_not_found`` (raised) when the model
    itself is unknown, else ``version_not_found`` (returned)."""
    get_model(session, r.name)
    what = "no ready version" if r.version is None and r.alias is None else "not found"
    return NotFound(f"{r}: {what}", code="version_not_found", details={"ref": str(r)})


def resolve(session: Session, ref: Ref | str, *, include_archived: bool = True) -> ModelVersion:
    """The version a ref names. ``name`` alone is the newest ready, non-archived version.

    One query (the version joined with its model; the model's tags are left unloaded); a second
    one only on a miss, to tell an unknown model from an unknown version."""
    r = parse_ref(ref) if isinstance(ref, str) else ref
    v = session.scalar(ref_query(select(ModelVersion), r).options(
        contains_eager(ModelVersion.model).lazyload(Model.tags)))
    if v is None or (not include_archived and v.archived_at is not None):
        raise not_found(session, r)
    return v


def find(session: Session, ref: str) -> ModelVersion | None:
    """The version a ref used as a filter names (``?base=``), or None when it names none: a filter on
    a version that does not exist matches nothing (a malformed ref is still ``invalid_ref``)."""
    try:
        return resolve(session, ref)
    except NotFound:
        return None
