"""Pruning collection members: an adapter that its collection's file rebuilds within an error
budget can give up its own blobs and become derived — ``derived:basis`` (an RMM basis) or
``derived:plan`` (a compression plan, :mod:`registry.services.compressions`).

A basis member is pruned only when its recorded relative delta error is ≤ the budget, or when the
basis rebuilds it exactly by construction (p ≥ min(r, n−1) in every module: rank(X_c) ≤ n−1), which
is what budget 0 admits. A plan member is pruned only when the error of the very files it would be
served, measured against its files as they are (:func:`registry.weights.peft_delta.delta_error`,
from the stored bytes as PEFT applies them), is ≤ the budget: the plan's error plus at most one
rounding of the factors (a float32 adapter whose scale is not a power of 4 does not rebuild to its
exact bytes, so budget 0 leaves it stored). Its adapter files become the reconstruction (computed
on the CPU, in the member's dtype, by :func:`registry.services.derived.rebuild_members`, the
function that serves them later): new sha256s, recorded together with the original manifest, the
error and the collection, in the version's recipe, on its membership lineage edge, and in the MLflow
run of the prune job. Its other files (a README, ...) stay blobs. Nothing is pruned by default
(``REGISTRY_PRUNE_BUDGET`` unset; a plan's own budget for a plan).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..errors import InvalidInput, NotFound
from ..models import (
    Compression,
    DerivedFile,
    LineageEdge,
    MergeBasis,
    ModelVersion,
    Relation,
    StorageMode,
    VersionFile,
    utcnow,
)
from ..weights.adapters import CONFIG_NAME
from . import jobs
from .context import RegistryContext
from .derive import check_number, job_run, lineage_doc, local_copy
from .derived import cache, collection_file, rebuild_members
from .events import emit
from .jobtypes import PruneParams
from .runner import JobRun


def request_prune(ctx: RegistryContext, basis_id: int, budget: float | None,
                  actor: str | None = None) -> dict[str, Any]:
    budget = ctx.settings.prune_budget if budget is None else budget
    if budget is None:
        raise InvalidInput("give an error budget (max_error); nothing is pruned by default", code="invalid_parameter")
    check_number("max_error", budget, low=0.0)

    def build(s: Session) -> PruneParams:
        b = s.get(MergeBasis, basis_id)
        if b is None or b.status != "ready":
            raise NotFound(f"basis {basis_id} not found or not ready", code="basis_not_found")
        return PruneParams(basis_id=basis_id, max_error=float(budget))

    return jobs.submit(ctx, build, actor=actor)


@dataclass
class Member:
    position: int
    version_id: int
    error: float
    recipe: dict[str, Any] = field(default_factory=dict)  # what the member's recipe records beyond the common fields


@dataclass
class Collection:
    """What a prune job works on: the members of one collection file and how they become derived."""

    mode: str  # the storage mode pruned members get
    relation: str  # their lineage edge to the collection's version
    label: str  # "basis" | "plan": the key naming the collection in summaries, events and results
    version_id: int  # the version holding the collection's file
    ref: str
    model: str
    sha256: str
    members: list[Member]
    recipe: dict[str, Any]  # common fields of every pruned member's recipe
    exact: Callable[[Path], set[int]]  # positions rebuilt exactly, given the collection's file
    # True: each member's error is measured again on the files it is rebuilt as, against its files
    # as they are (registry.weights.peft_delta), and that error decides and is recorded
    measure: bool = False


def _exact_positions(file: Path) -> set[int]:
    """Basis members rebuilt exactly by construction: fitted members when every module keeps
    p ≥ min(r, n_fit − 1) directions."""
    from ..weights.rmm import load_basis

    basis = load_basis(file)
    n_fit = basis.n_fit
    exact = all(mb.p >= min(mb.rank, n_fit - 1) for mb in basis.modules.values())
    return set(range(n_fit)) if exact else set()


def _collection(s: Session, prm: PruneParams) -> Collection:
    if prm.basis_id is not None:
        b = s.get(MergeBasis, prm.basis_id)
        if b is None or b.version_id is None:
            raise NotFound("basis not found", code="basis_not_found")
        v = s.get(ModelVersion, b.version_id)
        assert v is not None
        return Collection(StorageMode.derived_basis.value, Relation.basis_member_of.value, "basis", v.id, v.ref,
                          v.model.name, v.content_sha256,
                          [Member(m.position, m.version_id, float(m.error or 0.0)) for m in b.members],
                          {"type": "basis_member", "basis_id": b.id, "basis_version_id": v.id, "basis": v.ref},
                          _exact_positions)
    c = s.get(Compression, prm.compression_id)
    if c is None:
        raise NotFound("compression not found", code="compression_not_found")
    v = s.get(ModelVersion, c.version_id)
    assert v is not None
    exact = {m.position for m in c.members if m.served_error == 0.0}
    return Collection(StorageMode.derived_plan.value, Relation.plan_member_of.value, "plan", v.id, v.ref,
                      v.model.name, v.content_sha256,
                      [Member(m.position, m.version_id, m.served_error,
                              {"method": m.method, "stored_bytes": m.stored_bytes, "plan_error": m.error})
                       for m in c.members],
                      {"type": "plan_member", "compression_id": c.id, "plan_version_id": v.id, "plan": v.ref},
                      lambda _file: exact, measure=True)


def _adapter_prefix(files: dict[str, str]) -> str:
    """The folder of the pushed adapter inside its version ('' at the root)."""
    configs = sorted(p for p in files if p == CONFIG_NAME or p.endswith("/" + CONFIG_NAME))
    return configs[0][: -len(CONFIG_NAME)] if configs else ""


def _served_error(run: JobRun[PruneParams], version_id: int, prefix: str, rebuilt: dict[str, bytes]) -> float:
    """The relative delta error of the rebuilt PEFT files against the member's files as they are."""
    from ..weights.peft_delta import delta_error

    now = local_copy(run, version_id, f"original-{version_id}") / prefix
    then = run.work_dir / f"rebuilt-{version_id}"
    for path, data in rebuilt.items():
        (then / path).parent.mkdir(parents=True, exist_ok=True)
        (then / path).write_bytes(data)
    return delta_error(now, then)


def prune(run: JobRun[PruneParams]) -> dict[str, Any]:
    """The ``prune`` job."""
    ctx, prm = run.ctx, run.params
    budget = prm.max_error
    with ctx.db.read() as s:
        col = _collection(s, prm)
    source = {"ref": col.ref, "sha256": col.sha256}
    pruned, refused, skipped = [], [], []
    params = {"operation": "prune", col.label: source, "max_error": budget, "job_id": run.job_id}
    lineage: list[dict[str, Any]] = []  # each pruned member: what it was and what it is now
    with job_run(run, col.model, f"prune members of {col.ref}", params) as mr:
        file = collection_file(ctx, col.version_id, run.work_dir)
        exact = col.exact(file)
        eligible: dict[int, tuple[Member, str, dict[str, str], str]] = {}
        for m in col.members:
            with ctx.db.read() as s:
                v = s.get(ModelVersion, m.version_id)
                assert v is not None
                ref, mode, archived = v.ref, v.storage_mode, v.archived_at is not None
                original = {f.path: f.blob_sha256 for f in s.scalars(select(VersionFile).where(
                    VersionFile.version_id == m.version_id))}
                content = v.content_sha256
            if mode != "stored" or archived:
                skipped.append({"ref": ref, "reason": "already derived" if mode != "stored" else "archived"})
            elif not (m.error <= budget or m.position in exact):
                refused.append({"ref": ref, "error": m.error, "max_error": budget})
            else:
                eligible[m.position] = (m, ref, original, content)
        for position, rebuilt in rebuild_members(col.mode, file, sorted(eligible), run.work_dir / "members"):
            m, ref, original, content = eligible[position]
            prefix = _adapter_prefix(original)
            files = {prefix + path: (hashlib.sha256(data).hexdigest(), data) for path, data in rebuilt.items()}
            if col.measure:
                m.error = _served_error(run, m.version_id, prefix, rebuilt)
                if m.error > budget:
                    refused.append({"ref": ref, "error": m.error, "max_error": budget})
                    continue
            is_exact = position in exact
            with ctx.db.write() as s:
                v = s.scalar(select(ModelVersion).where(ModelVersion.id == m.version_id).with_for_update())
                if v is None or v.storage_mode != "stored":
                    continue
                replaced = set(files) | {p for p in original if p.startswith(prefix) and p.endswith(".safetensors")}
                s.execute(delete(VersionFile).where(VersionFile.version_id == m.version_id,
                                                    VersionFile.path.in_(sorted(replaced))))
                kept = {f.path: f.size for f in s.scalars(select(VersionFile).where(
                    VersionFile.version_id == m.version_id))}
                for path, (sha, data) in files.items():
                    s.add(DerivedFile(version_id=m.version_id, format="native", path=path, sha256=sha, size=len(data)))
                v.storage_mode = col.mode
                v.total_size = sum(kept.values()) + sum(len(d) for _, d in files.values())
                v.file_count = len(kept) + len(files)
                v.recipe = {**col.recipe, "position": position, "error": m.error, "exact": is_exact, **m.recipe,
                            "prefix": prefix, "pruned_at": utcnow().isoformat(),
                            "original": {"content_sha256": content, "files": original}}
                v.summary = {**(v.summary or {}), "pruned": {col.label: col.ref, "error": m.error, **m.recipe}}
                edge = s.scalar(select(LineageEdge).where(LineageEdge.child_id == m.version_id,
                                                          LineageEdge.parent_id == col.version_id,
                                                          LineageEdge.relation == col.relation))
                if edge is not None:
                    edge.params = {**(edge.params or {}), "pruned": True, "error": m.error}
                emit(s, "version.pruned", model_name=v.model.name, version_id=v.id, ref=v.ref,
                     **{col.label: col.ref}, error=m.error)
            c = cache(ctx)
            for sha, data in files.values():
                c.put(sha, len(data), iter([data]))
            pruned.append({"ref": ref, "error": m.error, "exact": is_exact, **m.recipe})
            lineage.append({"ref": ref, "content_sha256": content, "position": position, "error": m.error,
                            "exact": is_exact, **m.recipe, "original_files": original,
                            "files": {path: sha for path, (sha, _) in files.items()}})
        mr.log_metrics({"pruned": len(pruned), "refused": len(refused),
                        "max_pruned_error": max((p["error"] for p in pruned), default=0.0)})
        mr.log_dict({"pruned": pruned, "refused": refused, "skipped": skipped}, "prune.json")
        mr.log_dict({**lineage_doc(col.model, "prune", [source], params), "pruned": lineage}, "lineage.json")
        mr.finish()
        result = {col.label: col.ref, "max_error": budget, "pruned": pruned, "refused": refused, "skipped": skipped}
        with ctx.db.write() as s:
            run.complete(s, result, mr.run_id)
    return result
