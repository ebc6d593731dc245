"""Read models: what the API returns for models and versions, built with batched queries
(one query per related table for a whole page, never one per row)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Integer,
    Row,
    Text,
    any_,
    bindparam,
    cast,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased

from ..models import Alias, DerivedFile, LineageEdge, Model, ModelVersion, VersionFile, VersionTag


@dataclass
class FileView:
    path: str
    sha256: str
    size: int


@dataclass
class ParentView:
    ref: str
    relation: str
    params: dict[str, Any]


@dataclass
class VersionView:
    id: int
    model: str
    version: int
    ref: str
    kind: str
    status: str
    storage_mode: str
    base: str | None
    fingerprint: str | None
    content_sha256: str
    size: int
    file_count: int
    description: str
    summary: dict[str, Any]
    tags: dict[str, str]
    aliases: list[str]
    parents: list[ParentView]
    mlflow_run_id: str | None
    created_at: datetime
    created_by: str | None
    archived: bool
    archived_at: datetime | None
    corrupt: bool = False  # a read or a verify found its stored bytes missing or wrong
    stored_bytes: int = 0  # physical bytes it added to the store (shared objects count at their first version)
    files: list[FileView] | None = None


@dataclass
class ModelView:
    id: int
    name: str
    kind: str
    description: str
    tags: dict[str, str]
    latest_version: int | None
    version_count: int
    aliases: dict[str, int] = field(default_factory=dict)
    created_at: datetime | None = None
    created_by: str | None = None


# Built once: a fresh alias per call costs more than the queries that use it (column proxies).
_PARENT = aliased(ModelVersion, name="parent_version")

VERSION_COLUMNS = (
    ModelVersion.id, ModelVersion.version, ModelVersion.kind, ModelVersion.status, ModelVersion.storage_mode,
    ModelVersion.base_version_id, ModelVersion.fingerprint, ModelVersion.content_sha256, ModelVersion.total_size,
    ModelVersion.file_count, ModelVersion.description, ModelVersion.summary, ModelVersion.mlflow_run_id,
    ModelVersion.created_at, ModelVersion.created_by, ModelVersion.archived_at, ModelVersion.corrupt_at,
    ModelVersion.stored_bytes, Model.name.label("model_name"),
)
"""What a :class:`VersionView` is built from, as plain columns (select them from ``model_versions``
joined with ``models``): no ORM entity, identity map or instance state for what is only read."""

# What the views of a page need besides the versions' own rows, all in one statement (one round
# trip, however many tables): rows of (part, version id, a, b, n, c, order) where part is
# 0 tag (key, value), 1 alias (name), 2 parent edge (relation, parent model, parent number, params
# as JSON text, edge id), 3 file (path, sha256, size), 4 derived native file (path, sha256, size),
# 5 base (the base's id; model, number). Each branch is answered from an index on its version id.
_TAG, _ALIAS, _PARENT_EDGE, _FILE, _DERIVED, _BASE = range(6)


def _ids(column: Any, name: str, pg: bool) -> Any:
    """``column`` is one of the ids bound as ``name``. PostgreSQL: ``= ANY(array)``, one parameter,
    so the statement's text is the same for every page size (psycopg caches its parsing and
    prepares it once; an expanded ``IN`` list made a new, long statement per page size). SQLite: an
    expanded ``IN``."""
    if pg:
        return column == any_(bindparam(name, type_=ARRAY(Integer)))
    return column.in_(bindparam(name, expanding=True))


def _part(n: int, vid: Any, a: Any = None, b: Any = None, num: Any = None, c: Any = None, order: Any = None) -> Any:
    none_text, none_int = null().cast(Text), null().cast(BigInteger)
    return (literal_column(str(n), Integer).label("part"), vid.label("vid"),
            (a if a is not None else none_text).label("a"), (b if b is not None else none_text).label("b"),
            (cast(num, BigInteger) if num is not None else none_int).label("n"),
            (c if c is not None else none_text).label("c"),
            (cast(order, BigInteger) if order is not None else none_int).label("o"))


def _related_query(*, files: bool, derived: bool, bases: bool, pg: bool) -> Any:
    ids, derived_ids, base_ids = (_ids(c, n, pg) for c, n in (
        (VersionTag.version_id, "ids"), (DerivedFile.version_id, "derived_ids"), (ModelVersion.id, "base_ids")))
    parts = [
        select(*_part(_TAG, VersionTag.version_id, VersionTag.key, VersionTag.value))
        .where(ids),
        select(*_part(_ALIAS, Alias.version_id, Alias.name)).where(_ids(Alias.version_id, "ids", pg)),
        select(*_part(_PARENT_EDGE, LineageEdge.child_id, LineageEdge.relation, Model.name, _PARENT.version,
                      cast(LineageEdge.params, Text), LineageEdge.id))
        .join(_PARENT, _PARENT.id == LineageEdge.parent_id).join(Model, Model.id == _PARENT.model_id)
        .where(_ids(LineageEdge.child_id, "ids", pg)),
    ]
    if files:
        parts.append(select(*_part(_FILE, VersionFile.version_id, VersionFile.path, VersionFile.blob_sha256,
                                   VersionFile.size)).where(_ids(VersionFile.version_id, "ids", pg)))
    if derived:
        parts.append(select(*_part(_DERIVED, DerivedFile.version_id, DerivedFile.path, DerivedFile.sha256,
                                   DerivedFile.size))
                     .where(derived_ids, DerivedFile.format == "native"))
    if bases:
        parts.append(select(*_part(_BASE, ModelVersion.id, None, Model.name, ModelVersion.version))
                     .join(Model, Model.id == ModelVersion.model_id).where(base_ids))
    return union_all(*parts)


# One compiled statement per shape (SQLAlchemy caches each by its structure).
_RELATED = {(f, d, b, pg): _related_query(files=f, derived=d, bases=b, pg=pg)
            for f in (False, True) for d in (False, True) for b in (False, True) for pg in (False, True)}


def version_views(session: Session, versions: Sequence[Any], *, with_files: bool = False) -> list[VersionView]:
    """Views of ``versions``: ORM :class:`ModelVersion` objects, or rows of :data:`VERSION_COLUMNS`.
    Two round trips at most for the whole page: the versions themselves (the caller's) and one
    statement for their tags, aliases, parents, base refs and (``with_files``) files."""
    if not versions:
        return []
    ids = [v.id for v in versions]
    derived_ids = [v.id for v in versions if v.storage_mode != "stored"] if with_files else []
    base_ids = sorted({v.base_version_id for v in versions if v.base_version_id is not None})
    params: dict[str, Any] = {"ids": ids}
    if derived_ids:
        params["derived_ids"] = derived_ids
    if base_ids:
        params["base_ids"] = base_ids
    tags: dict[int, dict[str, str]] = defaultdict(dict)
    aliases: dict[int, list[str]] = defaultdict(list)
    edges: dict[int, list[tuple[int, ParentView]]] = defaultdict(list)
    files: dict[int, list[FileView]] = defaultdict(list)
    base_refs: dict[int, str] = {}
    pg = session.get_bind().dialect.name == "postgresql"
    stmt = _RELATED[(with_files, bool(derived_ids), bool(base_ids), pg)]
    for part, vid, a, b, n, c, o in session.execute(stmt, params):
        if part == _TAG:
            tags[vid][a] = b
        elif part == _ALIAS:
            aliases[vid].append(a)
        elif part == _PARENT_EDGE:
            edges[vid].append((o, ParentView(f"{b}@{n}", a, (json.loads(c) if c else None) or {})))
        elif part == _BASE:
            base_refs[vid] = f"{b}@{n}"
        else:
            files[vid].append(FileView(a, b, n))
    for lst in aliases.values():
        lst.sort()
    for fl in files.values():
        fl.sort(key=lambda f: f.path)
    parents = {vid: [p for _, p in sorted(e, key=lambda x: x[0])] for vid, e in edges.items()}
    out = []
    for v in versions:
        name = v.model_name if isinstance(v, Row) else v.model.name
        vtags = tags.get(v.id)
        out.append(VersionView(
            id=v.id, model=name, version=v.version, ref=f"{name}@{v.version}", kind=v.kind,
            status=v.status, storage_mode=v.storage_mode,
            base=base_refs.get(v.base_version_id) if v.base_version_id else None,
            fingerprint=v.fingerprint, content_sha256=v.content_sha256, size=v.total_size,
            file_count=v.file_count, description=v.description, summary=v.summary or {},
            tags=dict(sorted(vtags.items())) if vtags else {}, aliases=aliases.get(v.id, []),
            parents=parents.get(v.id, []),
            mlflow_run_id=v.mlflow_run_id, created_at=v.created_at, created_by=v.created_by,
            archived=v.archived_at is not None, archived_at=v.archived_at, corrupt=v.corrupt_at is not None,
            stored_bytes=v.stored_bytes,
            files=files.get(v.id, []) if with_files else None,
        ))
    return out


def version_view(session: Session, version: ModelVersion, *, with_files: bool = True) -> VersionView:
    return version_views(session, [version], with_files=with_files)[0]
