"""Recording a version: a draft's commit, and the one transaction every version goes through.

:func:`commit` validates the whole version, moves staged files into the blob store
(content-addressed: identical files are stored once) and then, in ONE database transaction,
records it with :func:`record_version`: the next version number, blobs, manifest, lineage, tags,
aliases and an event. If anything fails, no version exists. Versions the server makes (job
outputs, derived versions) are recorded by the same :func:`record_version`, through
:func:`ingest_folder` (a local folder, the same draft -> commit path as a push) or directly with
the files they generate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput, NotFound
from ..formats import inspect as fmt
from ..formats.paths import clean_path
from ..models import (
    DerivedFile,
    Draft,
    LineageEdge,
    Model,
    ModelVersion,
    Relation,
    VersionFile,
    VersionTag,
    utcnow,
)
from . import blobs, content
from .aliases import set_row
from .context import RegistryContext
from .drafts import (
    DraftSpec,
    abort_draft,
    check_sha_arg,
    checked_spec,
    create_draft,
    draft_row,
    link_file,
    local_source,
    resolve_base,
    resolve_body_ref,
    stage_local_file,
)
from .events import emit
from .refs import model_named
from .sql import insert_ignore
from .tokens import Principal
from .views import FileView, ParentView, VersionView


@dataclass
class NewFile:
    """A file of a version about to be recorded: staged by a draft (``staged``: its bytes, not yet
    in the store) or bytes the store already holds."""

    path: str
    sha256: str
    size: int
    staged: Path | None = None


def _sources(ctx: RegistryContext, s: Session, files: list[NewFile],
             held: dict[str, tuple[int, str]] | None = None) -> dict[str, fmt.FileSource]:
    """A readable source for every file (staged file, or blob already stored; ``held``: the blob
    rows of the stored ones when the caller read them already)."""
    sources: dict[str, fmt.FileSource] = {}
    stored = [f for f in files if f.staged is None or not f.staged.exists()]
    if held is None:
        held = content.rows(s, [f.sha256 for f in stored])
    # A deduplicated blob was scanned before if some version already holds it as weights.
    weights = sorted({f.sha256 for f in stored if fmt.is_weights(f.path)})
    scanned = set(s.scalars(select(VersionFile.blob_sha256).where(
        VersionFile.blob_sha256.in_(weights), VersionFile.path.like("%.safetensors")).distinct())) if weights else set()
    for f in files:
        if f.staged is not None and f.staged.exists():
            src = local_source(f.path, f.staged, f.sha256, f.size)
            src.needs_scan = False  # scanned on arrival
        else:
            row = held.get(f.sha256)
            if not content.exists(ctx, f.sha256, row):
                raise Conflict(f"{f.path}: its bytes are no longer available; upload it again",
                               code="blob_missing", details={"path": f.path})

            def read_at(offset: int, length: int, sha: str = f.sha256, row: tuple[int, str] | None = row) -> bytes:
                return content.read_bytes(ctx, sha, offset, offset + length, known=row)

            def iter_bytes(sha: str = f.sha256, row: tuple[int, str] | None = row) -> Iterator[bytes]:
                return content.iter_range(ctx, sha, known=row)

            src = fmt.FileSource(path=f.path, sha256=f.sha256, size=f.size, read_at=read_at, iter_bytes=iter_bytes)
            if fmt.is_weights(f.path):
                src.needs_scan = f.sha256 not in scanned
        sources[f.path] = src
    return sources


@dataclass
class CommitOptions:
    """How a machine-made version is recorded (user pushes use the defaults)."""

    status: str = "ready"
    recipe: dict[str, Any] | None = None
    mlflow_run_id: str | None = None
    extra_summary: dict[str, Any] | None = None
    # Runs inside the commit transaction after the version row exists (e.g. completing a job).
    hook: Callable[[Session, ModelVersion], None] | None = None


@dataclass
class _Plan:
    """A version checked against the database (read phase), before its files are inspected."""

    model_name: str
    spec: dict[str, Any]
    kind: str
    base: ModelVersion | None
    base_index: dict[str, Any] | None
    sources: dict[str, fmt.FileSource]
    files: dict[str, tuple[str, int]]  # path -> (sha256, size)
    content_sha256: str


def _plan(ctx: RegistryContext, s: Session, model_name: str, spec: dict[str, Any], files: list[NewFile],
          held: dict[str, tuple[int, str]] | None = None) -> _Plan:
    """What every new version is checked for before its files are read: files, the model's kind,
    the base, the parents, a duplicate of an existing version."""
    if not files:
        raise InvalidInput("nothing to commit: the draft has no files", code="empty_version")
    manifest = {f.path: f.sha256 for f in files}
    model = s.scalar(model_named(model_name))
    base = resolve_base(s, spec["base"]) if spec.get("base") else None
    kind = spec.get("kind") or (model.kind if model else None) or fmt.infer_kind(list(manifest), base is not None)
    if model is not None and model.kind != kind:
        raise Conflict(f"model {model_name!r} holds {model.kind} versions, not {kind}", code="kind_mismatch",
                       details={"model": model_name, "kind": model.kind})
    if kind in ("adapter", "finetune") and base is None:
        raise InvalidInput(f"a {kind} must be pinned to a base version (--base NAME@VERSION)",
                           code="base_required")
    for p in spec.get("parents") or []:
        resolve_body_ref(s, p["ref"], "parent")
    chash = fmt.content_hash(manifest)
    if model is not None:
        check_duplicate(s, model.id, chash, base.id if base is not None else None, model_name)
    return _Plan(model_name=model_name, spec=spec, kind=kind, base=base,
                 base_index=dict(base.tensor_index or {}) if base is not None else None,
                 sources=_sources(ctx, s, files, held), files={f.path: (f.sha256, f.size) for f in files},
                 content_sha256=chash)


def _inspect(ctx: RegistryContext, plan: _Plan) -> fmt.Inspection:
    """The whole version's validation: headers, shapes and dtypes, finite values where configured,
    an adapter or fine-tune against its base."""
    settings = ctx.settings
    check_finite = settings.check_finite == "all" or (settings.check_finite == "adapters" and plan.kind == "adapter")
    insp = fmt.inspect_version(plan.kind, plan.sources, max_header_bytes=settings.max_header_bytes,
                               check_finite=check_finite)
    if plan.base_index is not None and plan.base is not None:
        _check_against_base(plan.kind, insp, plan.base_index, str(plan.spec["base"]))
    return insp


def _record_plan(s: Session, plan: _Plan, insp: fmt.Inspection, actor: str | None, opts: CommitOptions,
                 new_blobs: set[str]) -> Recorded:
    return record_version(
        s, model_name=plan.model_name, kind=plan.kind, actor=actor, base=plan.base, spec=plan.spec,
        content_sha256=plan.content_sha256, fingerprint=insp.fingerprint,
        summary={**insp.summary, **(opts.extra_summary or {})}, tensor_index=insp.tensor_index,
        files=plan.files, new_blobs=new_blobs, options=opts)


def commit(ctx: RegistryContext, draft_id: str, actor: str | None,
           options: CommitOptions | None = None, who: Principal | None = None) -> VersionView:
    opts = options or CommitOptions()
    with ctx.db.read() as s:
        draft = draft_row(s, draft_id, who)
        files = [NewFile(f.path, f.sha256, f.size, ctx.staging.staged_path(draft_id, f.sha256) if f.staged else None)
                 for f in draft.files]
        plan = _plan(ctx, s, draft.model_name, dict(draft.spec), files)
        staged = {f.sha256 for f in files if f.staged is not None}
        known = blobs.ready(s, staged) if staged else set()

    insp = _inspect(ctx, plan)

    # Bytes into the blob store before the transaction. Their rows were claimed when the files
    # joined the draft, so gc leaves them alone; the transaction turns the rows ready.
    for sha in sorted(staged - known):
        path = ctx.staging.staged_path(draft_id, sha)
        if path.exists():
            ctx.store.put(sha, path)
        elif not content.exists(ctx, sha):
            raise Conflict(f"staged bytes for {sha} are gone; upload the file again", code="blob_missing")

    with ctx.db.write() as s:
        # One statement: the draft and (ON DELETE CASCADE) its files and uploads. It also locks the
        # row, so of two commits of one draft the second finds nothing to delete.
        if not s.execute(delete(Draft).where(Draft.id == draft_id)).rowcount:
            raise NotFound(f"draft {draft_id} not found (committed, aborted or expired)", code="draft_not_found",
                           details={"draft": draft_id})
        view = _record_plan(s, plan, insp, actor, opts, staged - known).view
    ctx.staging.remove_draft(draft_id)
    return view


def create_version(ctx: RegistryContext, spec: DraftSpec, files: list[tuple[str, str, int | None]],
                   actor: str | None) -> VersionView:
    """Create a version in one step from bytes the registry already holds: ``files`` is the
    manifest, (path, sha256, size or None). The same checks as a draft and its commit (names,
    paths, kind, base, parents, duplicate, the whole version's validation) and the same
    :func:`record_version`; a sha256 the registry does not hold (or holds with another size) is
    refused, naming every such file, and nothing is recorded."""
    checked = checked_spec(ctx, spec)
    listed: dict[str, tuple[str, int | None]] = {}
    for path, sha, size in files:
        path = clean_path(path)
        if path in listed:
            raise InvalidInput(f"{path} is listed twice", code="duplicate_path", details={"path": path})
        listed[path] = (check_sha_arg(sha) or "", size)
    with ctx.db.read() as s:
        held = blobs.ready_rows(s, {sha for sha, _ in listed.values()})
        missing = [{"path": p, "sha256": sha, "size": size} for p, (sha, size) in sorted(listed.items())
                   if sha not in held or (size is not None and held[sha][0] != size)]
        if missing:
            raise InvalidInput(f"the registry holds no bytes for {len(missing)} of the files: "
                               + ", ".join(m["path"] for m in missing[:10]) + "; upload them instead",
                               code="blob_not_found", details={"missing": missing})
        plan = _plan(ctx, s, spec.model, checked,
                     [NewFile(p, sha, held[sha][0]) for p, (sha, _) in sorted(listed.items())], held)
    insp = _inspect(ctx, plan)
    with ctx.db.write() as s:
        return _record_plan(s, plan, insp, actor, CommitOptions(), set()).view


@dataclass
class Recorded:
    """A version just recorded: its row, and its view built from what was written (no re-read)."""

    version: ModelVersion
    view: VersionView


def record_version(
    s: Session, *, model_name: str, kind: str, actor: str | None, base: ModelVersion | None, spec: dict[str, Any],
    content_sha256: str, fingerprint: str | None, summary: dict[str, Any], tensor_index: dict[str, Any],
    files: dict[str, tuple[str, int]], new_blobs: set[str], options: CommitOptions,
    generated: dict[str, tuple[str, int]] | None = None, storage_mode: str = "stored",
) -> Recorded:
    """Record a version in the caller's transaction: the next number of its model (created if
    needed), blob rows for ``new_blobs``, its manifest (``files``: path -> (blob sha256, size);
    ``generated``: path -> (sha256, size) of files the server generates), tags, lineage, aliases,
    the options' hook and the events. The same path for pushes, job outputs and derived versions.
    Returns the row and its view, built from what was written."""
    model_id, number = _next_number(s, model_name, kind, actor)
    check_duplicate(s, model_id, content_sha256, base.id if base is not None else None, model_name)
    if base is not None:
        locked = s.scalar(select(ModelVersion).where(ModelVersion.id == base.id).with_for_update(read=True))
        if locked is None or locked.archived_at is not None:
            raise InvalidInput(f"base {spec.get('base')} was archived meanwhile", code="invalid_base")
    # Bytes this commit put into the store become ready; reused bytes must be ready (and stay
    # locked until this transaction commits).
    blobs.mark_ready(s, {sha: size for sha, size in files.values() if sha in new_blobs})
    blobs.lock_ready(s, {sha for sha, _ in files.values()} - new_blobs)
    generated = generated or {}
    all_sizes = [size for _, size in files.values()] + [size for _, size in generated.values()]
    v = ModelVersion(
        model_id=model_id, version=number, kind=kind, status=options.status, storage_mode=storage_mode,
        base_version_id=base.id if base is not None else None, fingerprint=fingerprint,
        content_sha256=content_sha256, total_size=sum(all_sizes), file_count=len(all_sizes),
        description=spec.get("description") or "", summary=summary, tensor_index=tensor_index,
        recipe=options.recipe, mlflow_run_id=options.mlflow_run_id, created_by=actor, created_at=utcnow(),
        # what this commit added to the store (bytes it reuses were counted where first stored)
        stored_bytes=sum({sha: size for sha, size in files.values() if sha in new_blobs}.values()),
    )
    s.add(v)
    s.flush()
    tags = dict(spec.get("tags") or {})
    # Plain multi-row INSERTs: rows nothing in this transaction reads back as objects (no unit of work).
    for table, rows in (
        (VersionFile.__table__, [{"version_id": v.id, "path": p, "blob_sha256": sha, "size": size}
                                 for p, (sha, size) in files.items()]),
        (DerivedFile.__table__, [{"version_id": v.id, "format": "native", "path": p, "sha256": sha, "size": size,
                                  "created_at": v.created_at} for p, (sha, size) in generated.items()]),
        (VersionTag.__table__, [{"version_id": v.id, "key": k, "value": val} for k, val in tags.items()]),
    ):
        if rows:
            s.execute(insert(table), rows)
    parents: list[ParentView] = []
    if base is not None and kind in ("adapter", "finetune"):
        rel = Relation.adapter_of if kind == "adapter" else Relation.finetune_of
        s.add(LineageEdge(child_id=v.id, parent_id=base.id, relation=rel.value, params={}))
        parents.append(ParentView(_ref(base), rel.value, {}))
    for p in spec.get("parents") or []:
        parent = resolve_body_ref(s, p["ref"], "parent")
        if base is not None and parent.id == base.id and p["relation"] in ("adapter_of", "finetune_of"):
            continue
        s.add(LineageEdge(child_id=v.id, parent_id=parent.id, relation=p["relation"], params=p["params"]))
        parents.append(ParentView(_ref(parent), p["relation"], p["params"] or {}))
    aliases = list(dict.fromkeys(spec.get("aliases") or []))
    for alias in aliases:
        set_row(s, model_id, alias, v.id)
    s.flush()
    if options.hook is not None:
        options.hook(s, v)
    ref = f"{model_name}@{number}"
    emit(s, "version.created", model_name=model_name, version_id=v.id, ref=ref, kind=kind, status=options.status,
         storage_mode=storage_mode, base=spec.get("base"), content_sha256=content_sha256)
    for alias in spec.get("aliases") or []:
        emit(s, "alias.set", model_name=model_name, version_id=v.id, alias=alias, ref=ref)
    listed = [FileView(p, sha, size) for p, (sha, size) in files.items()]
    if storage_mode != "stored":
        listed += [FileView(p, sha, size) for p, (sha, size) in generated.items()]
    view = VersionView(
        id=v.id, model=model_name, version=number, ref=ref, kind=kind, status=v.status, storage_mode=storage_mode,
        base=_ref(base) if base is not None else None, fingerprint=fingerprint, content_sha256=content_sha256,
        size=v.total_size, file_count=v.file_count, description=v.description, summary=v.summary or {},
        tags=tags, aliases=sorted(aliases), parents=parents, mlflow_run_id=v.mlflow_run_id,
        created_at=v.created_at, created_by=actor, archived=v.archived_at is not None, archived_at=v.archived_at,
        corrupt=v.corrupt_at is not None, stored_bytes=v.stored_bytes, files=sorted(listed, key=lambda f: f.path))
    return Recorded(v, view)


def _ref(v: ModelVersion) -> str:
    return f"{v.model.name}@{v.version}"


def check_duplicate(s: Session, model_id: int, chash: str, base_id: int | None, model_name: str) -> None:
    """Versions are immutable: the same files pinned to the same base would add nothing. (The same
    files pinned to another base are a new version: an adapter re-pinned to a new base.)"""
    dup = s.scalar(select(ModelVersion.version).where(
        ModelVersion.model_id == model_id, ModelVersion.content_sha256 == chash,
        ModelVersion.base_version_id.is_(None) if base_id is None else ModelVersion.base_version_id == base_id,
        ModelVersion.archived_at.is_(None)).limit(1))
    if dup is not None:
        raise Conflict(f"{model_name}@{dup} already holds exactly these files; versions are immutable and "
                       "a duplicate would add nothing", code="duplicate_content",
                       details={"existing": f"{model_name}@{dup}"})


def _check_against_base(kind: str, insp: fmt.Inspection, base_index: dict[str, Any], base_ref: str) -> None:
    from ..formats.peft import check_against_base

    if kind == "adapter" and insp.adapter is not None:
        problems = check_against_base(insp.adapter, base_index)
        what = "adapter modules do not match"
    elif kind == "finetune":
        problems = fmt.check_finetune_against_base(insp.tensor_index, base_index)
        what = "fine-tune tensors do not match"
    else:
        return
    if problems:
        keys = ", ".join(p["key"] for p in problems[:10])
        more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InvalidInput(f"{what} the base {base_ref}: {keys}{more}", code="shape_mismatch",
                           details={"base": base_ref, "mismatches": problems})


def _next_number(s: Session, name: str, kind: str, actor: str | None) -> tuple[int, int]:
    """(model id, the next version number) of model ``name``, created if needed. One statement
    for an existing model; it locks the model's row until the transaction ends, so the versions
    of one model are recorded one at a time (and see each other: :func:`check_duplicate`)."""
    bump = (update(Model).where(Model.name == name).values(last_version=Model.last_version + 1)
            .returning(Model.id, Model.kind, Model.last_version))
    row = s.execute(bump).one_or_none()
    if row is None:  # the first version of a new model (a concurrent first version may insert it too)
        insert_ignore(s, Model.__table__, [{"name": name, "kind": kind, "description": "", "last_version": 0,
                                            "created_at": utcnow(), "created_by": actor}])
        row = s.execute(bump).one()
    model_id, model_kind, number = row
    if model_kind != kind:
        raise Conflict(f"model {name!r} holds {model_kind} versions, not {kind}", code="kind_mismatch",
                       details={"model": name, "kind": model_kind})
    return int(model_id), int(number)


def ingest_folder(ctx: RegistryContext, folder: Path, spec: DraftSpec, actor: str | None,
                  options: CommitOptions | None = None, links: dict[str, str] | None = None) -> VersionView:
    """Create a version from a local folder (and/or ``links``: path -> sha256 of bytes the registry
    already holds), through the same draft -> commit path as a push. On failure the draft is removed."""
    draft = create_draft(ctx, spec, actor)
    try:
        for path, sha in sorted((links or {}).items()):
            link_file(ctx, draft["id"], path, sha, None)
        if folder is not None and folder.exists():
            for local in sorted(p for p in folder.rglob("*") if p.is_file()):
                stage_local_file(ctx, draft["id"], local.relative_to(folder).as_posix(), local)
        return commit(ctx, draft["id"], actor, options)
    except BaseException:
        with contextlib.suppress(Exception):
            abort_draft(ctx, draft["id"])
        raise
