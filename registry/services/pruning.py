"""Pruning basis members: an adapter that its RMM basis rebuilds within an error budget can give
up its own blobs and become ``derived:basis``.

A member is pruned only when its recorded relative delta error is ≤ the budget, or when the
basis rebuilds it exactly by construction (p ≥ min(r, n−1) in every module: rank(X_c) ≤ n−1), which
is what budget 0 admits. Its files become the reconstruction (computed on the CPU, saved in the
member's dtype): new sha256s, recorded together with the original manifest, the error, and the
basis, in the version's recipe, on its ``basis_member_of`` lineage edge, and in the MLflow run of
the prune job. Nothing is pruned by default (``REGISTRY_PRUNE_BUDGET`` unset).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..errors import InvalidInput, NotFound
from ..formats.safetensors import iter_file
from ..models import DerivedFile, LineageEdge, MergeBasis, ModelVersion, VersionFile, utcnow
from . import jobs
from .context import RegistryContext
from .derive import check_number, job_run, lineage_doc, local_copy, provenance_entry
from .derived import cache
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


def _exact_positions(basis: Any) -> set[int]:
    """Members rebuilt exactly by construction: fitted members when every module keeps
    p ≥ min(r, n_fit − 1) directions."""
    n_fit = basis.n_fit
    exact = all(mb.p >= min(mb.rank, n_fit - 1) for mb in basis.modules.values())
    return set(range(n_fit)) if exact else set()


def prune(run: JobRun[PruneParams]) -> dict[str, Any]:
    """The ``prune`` job."""
    from ..weights.adapters import save_peft_adapter
    from ..weights.rmm import load_basis

    ctx, prm = run.ctx, run.params
    budget = prm.max_error
    with ctx.db.read() as s:
        b = s.get(MergeBasis, prm.basis_id)
        if b is None or b.version_id is None:
            raise NotFound("basis not found", code="basis_not_found")
        basis_version = s.get(ModelVersion, b.version_id)
        assert basis_version is not None
        basis_version_id, basis_ref, model = basis_version.id, basis_version.ref, basis_version.model.name
        inputs = [provenance_entry(basis_version)]
        members = [(m.position, m.version_id, m.error) for m in b.members]
    pruned, refused, skipped = [], [], []
    params = {"operation": "prune", "basis": inputs[0], "max_error": budget, "job_id": run.job_id}
    lineage: list[dict[str, Any]] = []  # each pruned member: what it was and what it is now
    with job_run(run, model, f"prune members of {basis_ref}", params) as mr:
        folder = local_copy(run, basis_version_id, "basis")
        basis = load_basis(next(folder.rglob("*.safetensors")))
        exact = _exact_positions(basis)
        for position, version_id, error in members:
            with ctx.db.read() as s:
                v = s.get(ModelVersion, version_id)
                assert v is not None
                ref, mode, archived = v.ref, v.storage_mode, v.archived_at is not None
                original = {f.path: f.blob_sha256 for f in s.scalars(select(VersionFile).where(
                    VersionFile.version_id == version_id))}
                content = v.content_sha256
            if mode != "stored" or archived:
                skipped.append({"ref": ref, "reason": "already derived" if mode != "stored" else "archived"})
                continue
            err = float(error or 0.0)
            if not (err <= budget or position in exact):
                refused.append({"ref": ref, "error": err, "max_error": budget})
                continue
            out = run.work_dir / f"member-{position}"
            save_peft_adapter(basis.reconstruct(position, device="cpu"), out)
            files = []
            for p in sorted(out.rglob("*")):
                if p.is_file():
                    sha = hashlib.sha256(p.read_bytes()).hexdigest()
                    files.append((p.relative_to(out).as_posix(), sha, p.stat().st_size, p))
            with ctx.db.write() as s:
                v = s.scalar(select(ModelVersion).where(ModelVersion.id == version_id).with_for_update())
                if v is None or v.storage_mode != "stored":
                    continue
                s.execute(delete(VersionFile).where(VersionFile.version_id == version_id))
                for path, sha, size, _ in files:
                    s.add(DerivedFile(version_id=version_id, format="native", path=path, sha256=sha, size=size))
                v.storage_mode = "derived:basis"
                v.total_size = sum(f[2] for f in files)
                v.file_count = len(files)
                v.recipe = {"type": "basis_member", "basis_id": prm.basis_id, "basis_version_id": basis_version_id,
                            "basis": basis_ref, "position": position, "error": err, "exact": position in exact,
                            "pruned_at": utcnow().isoformat(), "original": {"content_sha256": content,
                                                                           "files": original}}
                v.summary = {**(v.summary or {}), "pruned": {"basis": basis_ref, "error": err}}
                edge = s.scalar(select(LineageEdge).where(LineageEdge.child_id == version_id,
                                                          LineageEdge.parent_id == basis_version_id,
                                                          LineageEdge.relation == "basis_member_of"))
                if edge is not None:
                    edge.params = {**(edge.params or {}), "pruned": True, "error": err}
                emit(s, "version.pruned", model_name=v.model.name, version_id=v.id, ref=v.ref, basis=basis_ref,
                     error=err)
            c = cache(ctx)
            for _, sha, _, p in files:
                c.put(sha, p.stat().st_size, iter_file(p))
            pruned.append({"ref": ref, "error": err, "exact": position in exact})
            lineage.append({"ref": ref, "content_sha256": content, "position": position, "error": err,
                            "exact": position in exact, "original_files": original,
                            "files": {path: sha for path, sha, _, _ in files}})
        mr.log_metrics({"pruned": len(pruned), "refused": len(refused),
                        "max_pruned_error": max((p["error"] for p in pruned), default=0.0)})
        mr.log_dict({"pruned": pruned, "refused": refused, "skipped": skipped}, "prune.json")
        mr.log_dict({**lineage_doc(model, "prune", inputs, params), "pruned": lineage}, "lineage.json")
        mr.finish()
        result = {"basis": basis_ref, "max_error": budget, "pruned": pruned, "refused": refused, "skipped": skipped}
        with ctx.db.write() as s:
            run.complete(s, result, mr.run_id)
    return result

