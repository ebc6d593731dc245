"""RMM bases: n adapters of one base compressed into one basis, computed by a job.

The basis file (``basis.safetensors``: μ, U_p, C per module and factor, metadata naming members
and parameters) becomes a version of kind ``merge`` in the basis model (``<base model>-rmm`` by
default); each member gets a ``basis_member_of`` edge to it carrying its position and delta
error; a :class:`MergeBasis` row records p / max_error, per-member errors and the storage ratio.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import InvalidInput
from ..models import BasisMember, LineageEdge, MergeBasis, ModelVersion, VersionTag
from . import jobs, names
from .context import RegistryContext
from .derive import (
    check_number,
    collection_base_model,
    collection_versions,
    deduplicated,
    get_collection_row,
    input_version,
    job_run,
    lineage_doc,
    list_collection_rows,
    local_copy,
    provenance_entry,
    record,
    ref_of,
    skipped,
)
from .drafts import DraftSpec
from .jobtypes import BasisParams
from .recording import CommitOptions
from .runner import JobRun

MAX_MEMBERS = 256


def basis_view(s: Session, b: MergeBasis) -> dict[str, Any]:
    return {
        "id": b.id, "collection": b.collection, "method": b.method, "status": b.status, "p": b.p,
        "max_error": b.max_error, "storage_ratio": b.storage_ratio, "summary": b.summary, "job_id": b.job_id,
        "mlflow_run_id": b.mlflow_run_id, "created_at": b.created_at,
        "ref": ref_of(s, b.version_id) if b.version_id else None,
        "base": ref_of(s, b.base_version_id) if b.base_version_id else None,
        "members": [{"position": m.position, "ref": ref_of(s, m.version_id), "error": m.error,
                     "module_errors": m.module_errors} for m in b.members],
    }


MAX_P = 65_535  # directions per position; p ≤ min(r, n − 1) anyway


def check_p_or_budget(p: int | None, max_error: float | None) -> None:
    """A basis takes exactly one of p (a non-negative int) or max_error (a finite number ≥ 0): the
    rule for requests and for refresh_basis policies alike (what members allow is checked later,
    when they are known)."""
    if (p is None) == (max_error is None):
        raise InvalidInput("give exactly one of p or max_error", code="invalid_parameter")
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= MAX_P):
        raise InvalidInput(f"p must be an integer in 0..{MAX_P}", code="invalid_parameter")
    check_number("max_error", max_error, low=0.0)


def request_basis(ctx: RegistryContext, members: list[str], *, p: int | None = None, max_error: float | None = None,
                  name: str | None = None, collection: str | None = None, actor: str | None = None,
                  idempotency_key: str | None = None) -> dict[str, Any]:
    """Validate a basis request and queue its job."""
    check_p_or_budget(p, max_error)
    if name is not None:
        names.model_name(name)
    if not 2 <= len(members) <= MAX_MEMBERS:
        raise InvalidInput(f"a basis needs 2 to {MAX_MEMBERS} member adapters", code="invalid_members")

    def build(s: Session) -> BasisParams:
        versions = collection_versions(s, members)
        _check_fit(versions, p)
        return BasisParams(members=[v.ref for v in versions], p=p, max_error=max_error, name=name,
                           collection=collection)

    return jobs.submit(ctx, build, actor=actor, idempotency_key=idempotency_key)


def _check_fit(versions: list[ModelVersion], p: int | None) -> None:
    """What the members' metadata already rules out, refused before a job exists: members of
    different ranks or module counts (the weight math refuses them too, per module, in
    :func:`registry.weights.rmm.fit_basis`), and p above min(r, n - 1)."""
    ranks = {v.ref: (v.summary or {}).get("r") for v in versions}
    modules = {v.ref: (v.summary or {}).get("modules") for v in versions}
    if len({repr(r) for r in ranks.values()}) != 1 or len(set(modules.values())) != 1:
        raise InvalidInput("RMM needs adapters with the same modules and the same rank r per module; these differ. "
                           "Build one basis per rank, or re-train / truncate the odd adapters to a common rank",
                           code="incompatible_members", details={"ranks": ranks, "modules": modules})
    r = next(iter(ranks.values()))
    rmin = min(r) if isinstance(r, list) else r
    if p is not None and isinstance(rmin, int):
        pmax = min(rmin, len(versions) - 1)
        if p > pmax:
            raise InvalidInput(f"p={p} is above min(r, n - 1) = min({rmin}, {len(versions) - 1}) = {pmax}; "
                               f"p={pmax} already reconstructs every member exactly",
                               code="invalid_p", details={"p": p, "max": pmax})


def query_members(s: Session, base_ref: str, tags: dict[str, str | None]) -> list[ModelVersion]:
    """Live, ready adapters pinned to ``base_ref`` carrying ``tags`` (a policy's collection)."""
    from .refs import resolve

    base = resolve(s, base_ref)
    q = select(ModelVersion).where(ModelVersion.base_version_id == base.id, ModelVersion.kind == "adapter",
                                   ModelVersion.status == "ready", ModelVersion.archived_at.is_(None))
    for k, v in tags.items():
        cond = (VersionTag.version_id == ModelVersion.id) & (VersionTag.key == k)
        if v is not None:
            cond = cond & (VersionTag.value == v)
        q = q.where(select(VersionTag.version_id).where(cond).exists())
    return list(s.scalars(q.order_by(ModelVersion.id)))


def compute_basis(run: JobRun[BasisParams]) -> dict[str, Any]:
    """The ``basis`` job."""
    from ..weights.adapters import load_peft_adapter
    from ..weights.rmm import fit_basis, save_basis

    ctx, prm = run.ctx, run.params
    with ctx.db.read() as s:
        model_name = prm.name or f"{collection_base_model(s, prm.members, prm.query)}-rmm"
    head = {"operation": "rmm_basis", "method": "rmm", "p": prm.p, "max_error": prm.max_error,
            "job_id": run.job_id}
    with job_run(run, model_name, "rmm basis", head) as mr:
        with ctx.db.read() as s:
            if prm.query is not None:
                versions = query_members(s, prm.query.base, prm.query.tags)
                if len(versions) < 2:
                    return skipped(mr, f"collection has {len(versions)} adapter(s); a basis needs 2")
            else:
                versions = [input_version(s, ref, kinds=("adapter",), what="member") for ref in prm.members or []]
            members = [(v.id, provenance_entry(v)) for v in versions]
            base = s.get(ModelVersion, versions[0].base_version_id)
            assert base is not None
            base_ref = base.ref
        refs = [m[1]["ref"] for m in members]
        entries: list[dict[str, Any]] = [m[1] for m in members]
        params = {**head, "members": entries, "base": base_ref}
        mr.log_params({"members": entries, "base": base_ref})
        run.progress(0.05, f"loading {len(members)} adapters")
        adapters = [load_peft_adapter(local_copy(run, vid, f"member-{i}")) for i, (vid, _) in enumerate(members)]
        run.progress(0.2, "fitting the basis")
        basis = fit_basis(adapters, p=prm.p, max_error=prm.max_error, device=ctx.settings.device,
                          names=refs)
        errors = basis.member_errors()
        ratio = basis.storage_ratio()
        ps = sorted({mb.p for mb in basis.modules.values()})
        metrics = {"storage_ratio": ratio, "error_mean": sum(e.overall for e in errors) / len(errors),
                   "error_max": max(e.overall for e in errors), "p_min": ps[0], "p_max": ps[-1]}
        metrics.update({f"error_member_{i}": e.overall for i, e in enumerate(errors)})
        mr.log_metrics(metrics)
        mr.log_dict(lineage_doc(model_name, "rmm_basis", entries, params), "lineage.json")
        run.progress(0.8, "writing the basis")
        out = run.work_dir / "basis"
        out.mkdir()
        save_basis(basis, out / "basis.safetensors")
        summary = {"rmm": {"members": len(members), "p": ps[0] if len(ps) == 1 else ps, "storage_ratio": ratio,
                           "error_mean": metrics["error_mean"], "error_max": metrics["error_max"]}}
        result: dict[str, Any] = {}

        def hook(s: Session, v: ModelVersion) -> None:
            b = MergeBasis(collection=prm.collection, method="rmm", status="ready",
                           base_version_id=base.id, version_id=v.id, p=prm.p, max_error=prm.max_error,
                           storage_ratio=ratio, job_id=run.job_id, mlflow_run_id=mr.run_id, created_by=run.created_by,
                           summary={"p_per_module": {n: mb.p for n, mb in basis.modules.items()},
                                    "error_mean": metrics["error_mean"], "error_max": metrics["error_max"]})
            b.members = [BasisMember(position=i, version_id=vid, error=errors[i].overall,
                                     module_errors=dict(errors[i].modules)) for i, (vid, _) in enumerate(members)]
            s.add(b)
            for i, (vid, _) in enumerate(members):
                s.add(LineageEdge(child_id=vid, parent_id=v.id, relation="basis_member_of",
                                  params={"position": i, "error": errors[i].overall, "method": "rmm"}))
            s.flush()
            result.update({"basis_id": b.id, "ref": f"{model_name}@{v.version}", "storage_ratio": ratio,
                           "errors": {entry["ref"]: errors[i].overall for i, (_, entry) in enumerate(members)}})
            run.complete(s, result, mr.run_id)

        spec = DraftSpec(model=model_name, kind="merge", base=base_ref, tags={"registry.method": "rmm"}, aliases=[],
                         description=f"RMM basis of {len(members)} adapters of {base_ref}", parents=[])
        opts = CommitOptions(status="ready", mlflow_run_id=mr.run_id, extra_summary=summary, hook=hook,
                             recipe={"type": "rmm_basis", "members": refs, "p": prm.p,
                                     "max_error": prm.max_error, "job_id": run.job_id})
        out_view = record(run, out, spec, opts, mlflow_run=mr)
    if isinstance(out_view, str):  # this exact basis exists already
        return deduplicated(out_view)
    return result


def get_basis(ctx: RegistryContext, basis_id: int) -> dict[str, Any]:
    return get_collection_row(ctx, MergeBasis, basis_id, basis_view, "basis")


def list_bases(ctx: RegistryContext, collection: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    return list_collection_rows(ctx, MergeBasis, basis_view, collection, limit)
