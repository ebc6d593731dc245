"""Read models: what the API returns for models and versions, built with batched queries
(one query per related table for a whole page, never one per row)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
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


def version_views(session: Session, versions: Sequence[ModelVersion], *, with_files: bool = False) -> list[VersionView]:
    if not versions:
        return []
    ids = [v.id for v in versions]
    # Plain column rows, not ORM entities: no identity map or instance state for what is only read.
    tags: dict[int, dict[str, str]] = defaultdict(dict)
    for vid, key, value in session.execute(
            select(VersionTag.version_id, VersionTag.key, VersionTag.value).where(VersionTag.version_id.in_(ids))):
        tags[vid][key] = value
    aliases: dict[int, list[str]] = defaultdict(list)
    for vid, name in session.execute(
            select(Alias.version_id, Alias.name).where(Alias.version_id.in_(ids)).order_by(Alias.name)):
        aliases[vid].append(name)
    parent = _PARENT
    parents: dict[int, list[ParentView]] = defaultdict(list)
    base_refs: dict[int, str] = {}
    rows = session.execute(
        select(LineageEdge.child_id, LineageEdge.relation, LineageEdge.params, parent.version, Model.name)
        .join(parent, parent.id == LineageEdge.parent_id)
        .join(Model, Model.id == parent.model_id)
        .where(LineageEdge.child_id.in_(ids))
        .order_by(LineageEdge.id)
    )
    for child_id, relation, params, pversion, pname in rows:
        parents[child_id].append(ParentView(f"{pname}@{pversion}", relation, params or {}))
    base_ids = {v.base_version_id for v in versions if v.base_version_id is not None}
    if base_ids:
        for bid, bversion, bname in session.execute(
            select(ModelVersion.id, ModelVersion.version, Model.name)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(ModelVersion.id.in_(base_ids))
        ):
            base_refs[bid] = f"{bname}@{bversion}"
    files: dict[int, list[FileView]] = defaultdict(list)
    if with_files:
        for vid, path, sha, size in session.execute(
                select(VersionFile.version_id, VersionFile.path, VersionFile.blob_sha256, VersionFile.size)
                .where(VersionFile.version_id.in_(ids))):
            files[vid].append(FileView(path, sha, size))
        derived_ids = [v.id for v in versions if v.storage_mode != "stored"]
        if derived_ids:
            for d in session.scalars(select(DerivedFile).where(DerivedFile.version_id.in_(derived_ids),
                                                               DerivedFile.format == "native")):
                files[d.version_id].append(FileView(d.path, d.sha256, d.size))
        for lst in files.values():
            lst.sort(key=lambda f: f.path)
    return [
        VersionView(
            id=v.id, model=v.model.name, version=v.version, ref=f"{v.model.name}@{v.version}", kind=v.kind,
            status=v.status, storage_mode=v.storage_mode,
            base=base_refs.get(v.base_version_id) if v.base_version_id else None,
            fingerprint=v.fingerprint, content_sha256=v.content_sha256, size=v.total_size,
            file_count=v.file_count, description=v.description, summary=v.summary or {},
            tags=tags.get(v.id, {}), aliases=aliases.get(v.id, []), parents=parents.get(v.id, []),
            mlflow_run_id=v.mlflow_run_id, created_at=v.created_at, created_by=v.created_by,
            archived=v.archived_at is not None, archived_at=v.archived_at, corrupt=v.corrupt_at is not None,
            stored_bytes=v.stored_bytes,
            files=files.get(v.id, []) if with_files else None,
        )
        for v in versions
    ]


def version_view(session: Session, version: ModelVersion, *, with_files: bool = True) -> VersionView:
    return version_views(session, [version], with_files=with_files)[0]
