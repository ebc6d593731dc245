"""Shared steps of the jobs that derive artifacts (bases, transfers, merges): resolving inputs,
loading them for the weight math, and recording the output as a version with its provenance."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput, NotFound
from ..models import Model, ModelVersion
from ..provenance import Provenance, RunHandle
from .context import RegistryContext
from .derived import materialize
from .drafts import DraftSpec, resolve_body_ref
from .recording import CommitOptions, ingest_folder
from .refs import find
from .runner import JobRun
from .views import VersionView


def ref_of(s: Session, version_id: int) -> str:
    row = s.execute(select(Model.name, ModelVersion.version).join(Model, Model.id == ModelVersion.model_id)
                    .where(ModelVersion.id == version_id)).one()
    return f"{row[0]}@{row[1]}"


def input_version(s: Session, ref: str, *, kinds: Sequence[str], what: str) -> ModelVersion:
    """A live, ready version named in a request body, of one of ``kinds`` (422 otherwise)."""
    v = resolve_body_ref(s, ref, what)
    if v.kind not in kinds:
        raise InvalidInput(f"{what} {v.ref} is a {v.kind}; expected {' or '.join(kinds)}", code=f"invalid_{what}",
                           details={"ref": v.ref, "kind": v.kind})
    if v.status != "ready":
        raise InvalidInput(f"{what} {v.ref} is {v.status}, not ready", code=f"invalid_{what}",
                           details={"ref": v.ref, "status": v.status})
    return v


def collection_versions(s: Session, refs: Sequence[str]) -> list[ModelVersion]:
    """The members of a collection named in a request (an RMM basis, a compression plan): live,
    ready adapters (422 ``unknown_member`` / ``invalid_member``), distinct (``invalid_members``),
    pinned to one base version (``mixed_bases``)."""
    versions = [input_version(s, ref, kinds=("adapter",), what="member") for ref in refs]
    if len({v.id for v in versions}) != len(versions):
        raise InvalidInput("members must be distinct versions", code="invalid_members")
    bases = {v.base_version_id for v in versions}
    if len(bases) != 1:
        raise InvalidInput("members must be adapters of the same base version", code="mixed_bases",
                           details={"bases": sorted(ref_of(s, b) for b in bases if b is not None)})
    return versions


def collection_base_model(s: Session, members: Sequence[str] | None, query: Any) -> str:
    """The model of a collection's base (a basis, a plan goes to a model named after it unless named),
    from the job's request: the ``query``'s base, else the first member's base."""
    from .refs import resolve

    if query is not None:
        return model_of(query.base)
    first = resolve(s, (list(members or []) or [""])[0])
    base = s.get(ModelVersion, first.base_version_id) if first.base_version_id is not None else None
    return str(base.model.name) if base is not None else model_of(first.ref)


def check_number(name: str, value: float | None, *, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number", code="invalid_parameter", details={"name": name})
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidInput(f"{name} must be in [{low}, {high}]", code="invalid_parameter", details={"name": name})


def provenance_entry(v: ModelVersion) -> dict[str, str]:
    return {"ref": v.ref, "sha256": v.content_sha256}


def local_copy(run: JobRun[Any], version_id: int, label: str) -> Path:
    return materialize(run.ctx, version_id, run.work_dir / label)


def record(run: JobRun[Any], folder: Path | None, spec: DraftSpec, options: CommitOptions,
           links: dict[str, str] | None = None, mlflow_run: RunHandle | None = None) -> VersionView | str:
    """Commit the job's output as a version (completing the job in the same transaction). If
    the registry already holds exactly this output, return the existing ref instead (see
    :func:`deduplicated`).

    ``mlflow_run`` is marked FINISHED first, so that whoever sees the new version sees a finished
    run; should the commit fail, the run's context turns it FAILED."""
    if mlflow_run is not None:
        mlflow_run.finish()
    try:
        return ingest_folder(run.ctx, folder, spec, run.created_by, options, links)  # type: ignore[arg-type]
    except Conflict as e:
        if e.code != "duplicate_content":
            raise
        existing = str(e.details["existing"])
        if mlflow_run is not None:
            mlflow_run.set_tag("registry.deduplicated", existing)
        return existing


def deduplicated(existing: str) -> dict[str, Any]:
    """The result of a job whose output the registry already held as ``existing``: no new version;
    the job (and its MLflow run, tagged ``registry.deduplicated``) points at the existing one."""
    return {"ref": existing, "deduplicated": True,
            "message": f"{existing} already holds exactly this output: it is returned, no new version was made"}


@contextmanager
def job_run(run: JobRun[Any], model: str, title: str, params: dict[str, Any]) -> Iterator[RunHandle]:
    """The MLflow run of a job (experiment ``registry/<model>``; the job records its id). Jobs open it
    first, with what their request says, so that a job that fails on its inputs still leaves a run
    (FAILED, with the error) and one that finds nothing to do says so (tag ``registry.skipped``)."""
    with Provenance(run.ctx.settings).run(model, f"{title} (job {run.job_id})", params,
                                          {"registry.job": str(run.job_id), "registry.job_type": run.type}) as mr:
        run.mlflow_run_id = mr.run_id
        yield mr


def skipped(mr: RunHandle, reason: str) -> dict[str, Any]:
    """A job with nothing to do: its run says why (tag ``registry.skipped``), and so does its result."""
    mr.set_tag("registry.skipped", reason)
    return {"skipped": reason}


def model_of(ref: str) -> str:
    """The model name of a ref (``name@N``, ``name@alias`` or ``name``): the experiment of a job's run,
    known from its request before anything is resolved."""
    return ref.partition("@")[0]


def lineage_doc(output_model: str, operation: str, inputs: list[dict[str, Any]],
                params: dict[str, Any]) -> dict[str, Any]:
    return {"output_model": output_model, "operation": operation, "inputs": inputs, "params": params}


def get_collection_row(ctx: RegistryContext, cls: type[Any], row_id: int,
                       view: Callable[[Session, Any], dict[str, Any]], what: str) -> dict[str, Any]:
    """One row of a collection table (a basis, a compression) as its view; 404 ``<what>_not_found``."""
    with ctx.db.read() as s:
        row = s.get(cls, row_id)
        if row is None:
            raise NotFound(f"{what} {row_id} not found", code=f"{what}_not_found")
        return view(s, row)


def list_collection_rows(ctx: RegistryContext, cls: Any, view: Callable[[Session, Any], dict[str, Any]],
                         collection: str | None, limit: int, version: str | None = None) -> list[dict[str, Any]]:
    """Rows of a collection table, newest first (``collection``: only that collection's; ``version``:
    only those recorded as the version that ref names, none when it names none; 1 … 500 rows)."""
    with ctx.db.read() as s:
        q = select(cls)
        if collection:
            q = q.where(cls.collection == collection)
        if version is not None:
            v = find(s, version)
            if v is None:
                return []
            q = q.where(cls.version_id == v.id)
        return [view(s, row) for row in s.scalars(q.order_by(cls.id.desc()).limit(max(1, min(limit, 500))))]
