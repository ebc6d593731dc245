"""Merges: task arithmetic, TIES, DARE (linear / TIES) over adapters or full models.

- adapters of one base: merged in **delta space** (ΔW_i = B_i A_i) and re-factorised to a LoRA of
  rank ``rank`` (default: the largest input rank) by truncated SVD; the result is an adapter
  pinned to the same base;
- full models (fine-tunes/merges) of one base: merged tensor by tensor against the base
  (τ_i = θ_i − θ_base); the result is a ``merge`` version pinned to the base.

Every input gets a ``merge_of`` edge carrying its weight; the recipe (method, variant, params)
is stored on the version.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ..errors import InvalidInput
from ..models import ModelVersion
from ..weights.errors import MergeParamsError
from ..weights.merge_methods import METHODS, get_method
from . import jobs, names
from .context import RegistryContext
from .derive import (
    deduplicated,
    input_version,
    job_run,
    lineage_doc,
    local_copy,
    provenance_entry,
    record,
    ref_of,
)
from .drafts import DraftSpec
from .jobtypes import MergeParams
from .names import FULL_MODEL_KINDS
from .recording import CommitOptions
from .runner import JobRun

MAX_INPUTS = 64


def _validate(s: Session, method: str, inputs: list[str], params: dict[str, Any]) -> tuple[list[ModelVersion], int]:
    if method not in METHODS:
        raise InvalidInput(f"unknown merge method {method!r}; one of {', '.join(sorted(METHODS))}",
                           code="invalid_method", details={"methods": sorted(METHODS)})
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise InvalidInput(f"a merge needs 1 to {MAX_INPUTS} inputs", code="invalid_inputs")
    try:  # the method's own declared parameters, checked exactly as the worker will
        get_method(method).resolve(params, len(inputs))
    except MergeParamsError as e:
        raise InvalidInput(str(e), code="invalid_parameter", details={"method": method}) from None
    versions = [input_version(s, r, kinds=("adapter", *FULL_MODEL_KINDS[1:]), what="input") for r in inputs]
    kinds = {"adapter" if v.kind == "adapter" else "full" for v in versions}
    if len(kinds) != 1:
        raise InvalidInput("merge inputs must be all adapters or all full models", code="invalid_inputs")
    bases = {v.base_version_id for v in versions}
    if len(bases) != 1 or None in bases:
        raise InvalidInput("merge inputs must be pinned to the same base version", code="mixed_bases",
                           details={"bases": sorted({ref_of(s, b) for b in bases if b is not None})})
    base_id = bases.pop()
    assert base_id is not None
    return versions, base_id


def request_merge(ctx: RegistryContext, method: str, inputs: list[str], name: str, *,
                  params: dict[str, Any] | None = None, rank: int | None = None, actor: str | None = None,
                  idempotency_key: str | None = None) -> dict[str, Any]:
    names.model_name(name)
    params = dict(params or {})
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidInput("rank must be a positive integer", code="invalid_parameter")

    def build(s: Session) -> MergeParams:
        versions, _ = _validate(s, method, inputs, params)
        per_module = {v.ref: r for v in versions if v.kind == "adapter" and isinstance(r := (v.summary or {}).get("r"),
                                                                                       list)}
        if per_module and rank is None:
            raise InvalidInput("inputs have per-module ranks (rank_pattern): pass rank (CLI: --rank R) for the "
                               "merged adapter", code="rank_required", details={"ranks": per_module})
        return MergeParams(method=method, inputs=[v.ref for v in versions], name=name, params=params, rank=rank)

    return jobs.submit(ctx, build, actor=actor, idempotency_key=idempotency_key)


def compute_merge(run: JobRun[MergeParams]) -> dict[str, Any]:
    """The ``merge`` job."""
    from ..weights.adapters import load_peft_adapter, save_peft_adapter
    from ..weights.merge import merge_adapters, merge_checkpoints, refactorise

    ctx, prm = run.ctx, run.params
    method, name, mparams = prm.method, prm.name, dict(prm.params)
    m = get_method(method)
    head = {"operation": "merge", "method": m.name, "variant": m.variant, "params": mparams, "rank": prm.rank,
            "job_id": run.job_id}
    out = run.work_dir / "out"
    result: dict[str, Any] = {}
    with job_run(run, name, f"{m.name} merge", head) as mr:
        with ctx.db.read() as s:
            versions, base_id = _validate(s, method, prm.inputs, mparams)
            entries = [(v.id, provenance_entry(v), v.kind) for v in versions]
            base_ref = ref_of(s, base_id)
        is_adapter = entries[0][2] == "adapter"
        weights = mparams.get("weights") or [1.0] * len(entries)
        inputs: list[dict[str, Any]] = [e[1] for e in entries]
        mr.log_params({"inputs": inputs, "base": base_ref})
        params = {**head, "inputs": inputs, "base": base_ref}
        mr.log_dict(lineage_doc(name, "merge", inputs, params), "lineage.json")
        run.progress(0.05, "materialising inputs")
        if is_adapter:
            adapters = [load_peft_adapter(local_copy(run, vid, f"in-{i}")) for i, (vid, _, _) in enumerate(entries)]
            rank = prm.rank or max(a.rank for a in adapters)
            run.progress(0.3, f"merging {len(adapters)} adapters in delta space")
            dense = merge_adapters(m, adapters, mparams, rank=None, device=ctx.settings.device)
            stored = refactorise(dense, rank, adapters[0])  # type: ignore[arg-type]
            save_peft_adapter(stored.adapter, out)
            # lossy: the exact merged delta is re-factorised to rank r; say by how much
            result["error"] = stored.error
            result["module_errors"] = stored.module_errors
            kind, metrics = "adapter", {"rank": rank, "refactorisation_error": stored.error}
        else:
            base_dir = local_copy(run, base_id, "base")
            dirs = [local_copy(run, vid, f"in-{i}") for i, (vid, _, _) in enumerate(entries)]
            run.progress(0.2, f"merging {len(dirs)} checkpoints tensor by tensor")
            rep = merge_checkpoints(m, base_dir, dirs, out, mparams, device=ctx.settings.device)
            kind, metrics = "merge", {k: v for k, v in rep.as_dict().items() if isinstance(v, int | float)}
        mr.log_metrics({k: float(v) for k, v in metrics.items()})
        run.progress(0.85, "recording the merge")

        def hook(s: Session, v: ModelVersion) -> None:
            result["ref"] = f"{name}@{v.version}"
            run.complete(s, dict(result), mr.run_id)

        spec = DraftSpec(model=name, kind=kind, base=base_ref, tags={"registry.method": m.name}, aliases=[],
                         description=f"{m.name} merge of {len(entries)} inputs",
                         parents=[{"ref": e[1]["ref"], "relation": "merge_of",
                                   "params": {"weight": weights[i], "method": m.name}} for i, e in enumerate(entries)])
        recipe = {"type": "merge", "method": m.name, "variant": m.variant, "params": mparams,
                  "inputs": [e[1]["ref"] for e in entries], "base": base_ref, "rank": prm.rank,
                  "job_id": run.job_id}
        view = record(run, out, spec, CommitOptions(status="ready", recipe=recipe, mlflow_run_id=mr.run_id,
                                                    extra_summary={"merge": {
                                                        "method": m.name, "variant": m.variant,
                                                        **({"rank": metrics["rank"], "error": result["error"]}
                                                           if "error" in result else {})}},
                                                    hook=hook), mlflow_run=mr)
    if isinstance(view, str):
        return deduplicated(view)
    return result
