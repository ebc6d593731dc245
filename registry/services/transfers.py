"""Fine-tuning transfer: a fine-tune or adapter of base s becomes a **candidate**
version pinned to base t, computed by a job.

- fine-tune: ``m_t + α (m'_s − m_s)`` streamed tensor by tensor (:func:`registry.weights.transfer.transfer`),
  with diagnostics (relative base shift, cosine(m_t − m_s, Δ), skipped/padded tensors);
- adapter: the diff *is* the adapter, so transfer re-pins the same files to the new base (no new
  bytes), after the shape check against the new base's tensors.

The candidate lands in the source's model with lineage ``transfer_of`` (source) and
``finetune_of``/``adapter_of`` (target base). Promoting it is the user's decision.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput
from ..formats import inspect as fmt
from ..models import Model, ModelVersion, VersionFile
from . import jobs
from .context import RegistryContext
from .derive import (
    check_number,
    deduplicated,
    input_version,
    job_run,
    lineage_doc,
    local_copy,
    model_of,
    provenance_entry,
    record,
)
from .derived import cache, plan_transfer_files
from .drafts import DraftSpec, resolve_base
from .jobtypes import TransferParams
from .names import FULL_MODEL_KINDS
from .recording import CommitOptions, check_duplicate, record_version
from .runner import JobRun


def _validate(s: Session, finetune: str, target_base: str, alpha: float) -> tuple[ModelVersion, ModelVersion]:
    ft = input_version(s, finetune, kinds=("finetune", "adapter"), what="finetune")
    if ft.base_version_id is None:
        raise InvalidInput(f"{ft.ref} is not pinned to a base", code="invalid_finetune")
    target = input_version(s, target_base, kinds=FULL_MODEL_KINDS, what="target_base")
    if target.id == ft.base_version_id:
        raise InvalidInput(f"{ft.ref} is already pinned to {target.ref}", code="same_base")
    if ft.kind == "adapter" and alpha != 1.0:
        raise InvalidInput(f"{ft.ref} is an adapter: it is transferred by re-pinning it (the adapter is the diff), "
                           "so alpha must be 1; merge it with a weight to scale it", code="invalid_parameter",
                           details={"alpha": alpha})
    return ft, target


STORAGE = ("stored", "derived")


def existing_transfer(s: Session, ft: ModelVersion, target: ModelVersion, alpha: float) -> ModelVersion | None:
    """A live version of the fine-tune's model that already is its transfer to ``target`` with ``alpha``."""
    rows = s.scalars(select(ModelVersion).where(
        ModelVersion.model_id == ft.model_id, ModelVersion.base_version_id == target.id,
        ModelVersion.archived_at.is_(None), ModelVersion.status.in_(("ready", "candidate")))
        .order_by(ModelVersion.version))
    for v in rows:
        r = v.recipe or {}
        if r.get("type") == "transfer" and r.get("finetune") == ft.ref and float(r.get("alpha", 1.0)) == alpha:
            return v  # type: ignore[no-any-return]
    return None


def _refuse_other_storage(s: Session, ft: ModelVersion, target: ModelVersion, alpha: float, storage: str) -> None:
    """A transfer asked ``--derived`` when the registry already stores that very transfer (or stored
    when it keeps it derived) cannot be made: both would hold the same weights, and a model keeps one
    version per content. Say so before a job exists, rather than hand back the other one silently.
    (Asked again with the same storage, the job returns the existing version, saying so.)"""
    ex = existing_transfer(s, ft, target, alpha)
    if ex is None or (ex.storage_mode == "stored") == (storage == "stored"):
        return
    have = "stored" if ex.storage_mode == "stored" else f"{ex.storage_mode} (no weights stored)"
    raise Conflict(f"{ex.ref} already is this transfer ({ft.ref} to {target.ref}, alpha={alpha:g}), {have}; a "
                   f"{storage} copy would hold the same weights, and a model keeps one version per content. Use "
                   f"{ex.ref}, or archive it (registry archive {ex.ref}) and transfer again",
                   code="transfer_exists", details={"existing": ex.ref, "storage_mode": ex.storage_mode,
                                                    "requested": storage})


def request_transfer(ctx: RegistryContext, finetune: str, target_base: str, alpha: float = 1.0, *,
                     storage: str = "stored", actor: str | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
    check_number("alpha", alpha, low=-100.0, high=100.0)
    if storage not in STORAGE:
        raise InvalidInput(f"storage must be one of {', '.join(STORAGE)}", code="invalid_parameter")

    def build(s: Session) -> TransferParams:
        ft, target = _validate(s, finetune, target_base, float(alpha))
        if ft.kind != "adapter":  # an adapter is re-pinned, whatever the storage asked
            _refuse_other_storage(s, ft, target, float(alpha), storage)
        return TransferParams(finetune=ft.ref, target_base=target.ref, alpha=float(alpha),
                              storage=storage)  # type: ignore[arg-type]  # checked against STORAGE above

    return jobs.submit(ctx, build, actor=actor, idempotency_key=idempotency_key)


def compute_transfer(run: JobRun[TransferParams]) -> dict[str, Any]:
    """The ``transfer`` job."""
    from ..weights.transfer import transfer

    ctx, prm = run.ctx, run.params
    alpha = prm.alpha
    head = {"operation": "transfer", "alpha": alpha, "storage": prm.storage, "job_id": run.job_id}
    result: dict[str, Any] = {}
    with job_run(run, model_of(prm.finetune), f"transfer {prm.finetune} -> {prm.target_base}", head) as mr:
        with ctx.db.read() as s:
            ft, target = _validate(s, prm.finetune, prm.target_base, alpha)
            source = s.get(ModelVersion, ft.base_version_id)
            assert source is not None
            model_name, kind = ft.model.name, ft.kind
            inputs = [provenance_entry(ft), provenance_entry(source), provenance_entry(target)]
            ft_id, src_id, tgt_id = ft.id, source.id, target.id
            ft_ref, src_ref, tgt_ref = ft.ref, source.ref, target.ref
            ft_stored = ft.storage_mode == "stored"
            files = {f.path: f.blob_sha256
                     for f in s.scalars(select(VersionFile).where(VersionFile.version_id == ft.id))}
        resolved = {"method": "repin" if kind == "adapter" else "diff", "finetune": inputs[0],
                    "source_base": inputs[1], "target_base": inputs[2]}
        mr.log_params(resolved)
        params = {**head, **resolved}
        spec = DraftSpec(model=model_name, kind=kind, base=tgt_ref, tags={"registry.transfer_from": ft_ref},
                         aliases=[], description=f"{ft_ref} transferred from {src_ref} to {tgt_ref} (alpha={alpha:g})",
                         parents=[{"ref": ft_ref, "relation": "transfer_of",
                                   "params": {"alpha": alpha, "source_base": src_ref, "target_base": tgt_ref}}])
        mr.log_dict(lineage_doc(model_name, "transfer", inputs, params), "lineage.json")

        def hook(s: Session, v: ModelVersion) -> None:
            result["ref"] = f"{model_name}@{v.version}"
            run.complete(s, {**result, "status": "candidate"}, mr.run_id)

        recipe = {"type": "transfer", "finetune": ft_ref, "source_base": src_ref, "target_base": tgt_ref,
                  "alpha": alpha, "job_id": run.job_id}
        if kind == "adapter":
            report = {"method": "repin", "note": "the adapter is the diff; re-pinned after a shape check"}
            result["diagnostics"] = report
            # a stored adapter's blobs are linked as they are; a derived one is rebuilt and stored
            folder = None if ft_stored else local_copy(run, ft_id, "finetune")
            view = record(run, folder, spec, CommitOptions(status="candidate", recipe=recipe, mlflow_run_id=mr.run_id,
                                                           extra_summary={"transfer": report}, hook=hook),
                          links=files if ft_stored else None, mlflow_run=mr)
        elif prm.storage == "derived":
            view = _record_derived(run, spec, recipe, hook, mr, (ft_id, src_id, tgt_id), alpha, result)
        else:
            run.progress(0.05, "materialising the three checkpoints")
            paths = [local_copy(run, vid, label) for vid, label in ((ft_id, "finetune"), (src_id, "source"),
                                                                    (tgt_id, "target"))]
            run.progress(0.15, "computing m_t + alpha * (m'_s - m_s)")
            out = run.work_dir / "out"
            rep = transfer(paths[0], paths[1], paths[2], out, alpha, device=ctx.settings.device)
            result["diagnostics"] = _diagnostics(rep, mr)
            run.progress(0.85, "recording the candidate")
            view = record(run, out, spec, CommitOptions(status="candidate", recipe=recipe, mlflow_run_id=mr.run_id,
                                                        extra_summary={"transfer": result["diagnostics"]},
                                                        hook=hook), mlflow_run=mr)
    if isinstance(view, str):
        return deduplicated(view)
    return result


def _diagnostics(rep: Any, mr: Any) -> dict[str, Any]:
    report = rep.as_dict()
    diag = {k: report[k] for k in ("relative_base_shift", "cosine") if report.get(k) is not None}
    mr.log_metrics({**diag, "skipped_tensors": len(report.get("skipped", [])),
                    "padded_tensors": len(report.get("padded", []))})
    mr.log_dict(report, "transfer_report.json")
    return {**diag, "skipped": report.get("skipped", [])[:50], "padded": report.get("padded", [])[:50]}


def _record_derived(run: JobRun[Any], spec: DraftSpec, recipe: dict[str, Any], hook: Any, mr: Any,
                    ids: tuple[int, int, int], alpha: float, result: dict[str, Any]) -> Any:
    """A ``derived:diff`` candidate: no weights stored, only the recipe. Its files are generated
    once here to learn their sha256 (and diagnostics), teed into the cache; side files that are
    plain copies link the target's / fine-tune's blobs."""
    from ..weights.transfer_stream import tensor_index

    ctx = run.ctx
    run.progress(0.05, "planning the derived transfer")
    plan = plan_transfer_files(ctx, ids, alpha, run.work_dir)
    c = cache(ctx)
    generated: dict[str, tuple[str, int]] = {}
    try:
        sizes = plan.file_sizes()
        total = sum(sizes.values()) or 1
        done = 0
        for name, size in sorted(sizes.items()):
            h = hashlib.sha256()
            for chunk in c.keep(size, plan.iter_file(name), h):
                done += len(chunk)
                if done % (256 << 20) < len(chunk):
                    run.progress(0.1 + 0.75 * done / total, f"hashing {name}")
            generated[name] = (h.hexdigest(), size)
        plan.finish_report()
        links: dict[str, tuple[str, int]] = {}
        with ctx.db.read() as s:
            for side in plan.side_files:
                if side.data is not None:
                    sha = hashlib.sha256(side.data).hexdigest()
                    generated[side.name] = (sha, len(side.data))
                    c.put(sha, len(side.data), [side.data])
                    continue
                owner = ids[0] if side.role == "finetune" else ids[2]
                vf = s.get(VersionFile, (owner, side.name))
                if vf is None:
                    raise InvalidInput(f"{side.name} is not a file of its version", code="invalid_side_file")
                links[side.name] = (vf.blob_sha256, vf.size)
        index = tensor_index(plan)
        report = plan.report
    finally:
        plan.close()
    result["diagnostics"] = _diagnostics(report, mr)
    manifest = {p: sha for p, (sha, _) in {**links, **generated}.items()}
    chash = fmt.content_hash(manifest)
    params = sum(math.prod(v[1]) for v in index.values())
    summary = {"tensors": len(index), "parameters": params, "weight_files": len(plan.layout.files),
               "sharded": plan.layout.index is not None, "transfer": result["diagnostics"],
               "derived": {"stored_bytes": sum(sz for _, sz in links.values()),
                           "generated_bytes": sum(sz for _, sz in generated.values())}}
    run.progress(0.9, "recording the derived candidate")
    mr.finish()
    try:
        with ctx.db.write() as s:
            base = resolve_base(s, spec.base) if spec.base else None
            model = s.scalar(select(Model).where(Model.name == spec.model))
            if model is not None:
                check_duplicate(s, model.id, chash, base.id if base is not None else None, spec.model)
            recipe = {**recipe, "finetune_version_id": ids[0], "source_version_id": ids[1],
                      "target_version_id": ids[2], "max_shard_bytes": ctx.settings.merged_shard_bytes}
            v = record_version(
                s, model_name=spec.model, kind="finetune", actor=run.created_by, base=base,
                spec={"base": spec.base, "tags": spec.tags, "aliases": [], "description": spec.description,
                      "parents": spec.parents},
                content_sha256=chash, fingerprint=fmt.fingerprint(index), summary=summary, tensor_index=index,
                files=links, new_blobs=set(), generated=generated, storage_mode="derived:diff",
                options=CommitOptions(status="candidate", recipe=recipe, mlflow_run_id=mr.run_id, hook=hook))
            return v.version.id  # the hook completed the job with the new ref
    except Conflict as e:
        if e.code != "duplicate_content":
            raise
        mr.set_tag("registry.deduplicated", str(e.details["existing"]))
        return str(e.details["existing"])
