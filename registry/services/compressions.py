"""Compression plans: for every adapter of a collection (one base), the fewest stored bytes whose
relative delta error ‖ΔŴ − ΔW‖_F / ‖ΔW‖_F stays within a budget (:mod:`registry.weights.compress`),
computed by a ``compress`` job.

The plan file (``plan.safetensors``, what :func:`~registry.weights.compress.save_plan` writes: one
uint8 blob per member and per RMM basis, JSON metadata) becomes a version of kind ``merge`` in the
plan model (``<base model>-compressed`` by default), stored content-addressed like every file; each
member gets a ``plan_member_of`` lineage edge to it carrying its position, method, stored bytes and
error; a :class:`~registry.models.Compression` row records the budget, the methods and the byte
counts, a :class:`~registry.models.CompressionMember` row each member's. Every error recorded is
recomputed from the plan file as stored (read back with ``load_plan``), before anything is recorded;
beside it, ``served_error``: the error of the PEFT files the member would be served as, rebuilt by
the function that serves them and measured on their bytes (:mod:`registry.weights.peft_delta`) —
the plan's error plus at most one rounding of the factors; it decides whether a member may be pruned.

Members give up their own blobs only when asked (``prune``; see :mod:`registry.services.pruning`):
they become ``derived:plan`` and are served rebuilt from the plan, as PEFT folders.

A collection is named by its members (refs) or by a base and tags: then it is the live, ready
adapters pinned to that base version carrying the tags that still hold their own blobs (members
already served from a plan or a basis stay with it: compressing a reconstruction again would add
its error to theirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import InvalidInput, NotFound
from ..models import Compression, CompressionMember, LineageEdge, ModelVersion, Relation, StorageMode
from . import jobs, names
from .bases import MAX_MEMBERS, query_members
from .context import RegistryContext
from .derive import (
    collection_base_model,
    collection_versions,
    deduplicated,
    get_collection_row,
    job_run,
    lineage_doc,
    list_collection_rows,
    local_copy,
    provenance_entry,
    record,
    ref_of,
    skipped,
)
from .derived import rebuild_members
from .drafts import DraftSpec, resolve_base
from .jobtypes import BasisQuery, CompressParams, PruneParams
from .recording import CommitOptions
from .refs import resolve
from .runner import JobRun

PLAN_FILE = "plan.safetensors"


def check_request(max_error: Any, methods: Any = None) -> tuple[float, list[str] | None]:
    """The budget and the methods of a compression request or policy, by the planner's own rules
    (:func:`registry.weights.compress.check_budget` / ``check_methods``), refused as 422s."""
    from ..weights.compress import check_budget, check_methods
    from ..weights.errors import CompressionParamsError

    try:
        budget = check_budget(max_error)
    except CompressionParamsError as e:
        raise InvalidInput(str(e), code="invalid_parameter", details={"name": "max_error"}) from None
    if methods is None:
        return budget, None
    try:
        return budget, list(check_methods(methods))
    except CompressionParamsError as e:
        raise InvalidInput(str(e), code="invalid_parameter", details={"name": "methods"}) from None


def compressible(s: Session, base_ref: str, tags: dict[str, str | None]) -> list[ModelVersion]:
    """The collection a base and tags name: live, ready adapters pinned to ``base_ref`` carrying
    ``tags`` that still hold their own blobs."""
    return [v for v in query_members(s, base_ref, tags) if v.storage_mode == StorageMode.stored.value]


def request_compression(ctx: RegistryContext, members: list[str] | None = None, *, max_error: Any,
                        base: str | None = None, tags: dict[str, str | None] | None = None,
                        methods: list[str] | None = None, name: str | None = None, collection: str | None = None,
                        prune: bool = False, actor: str | None = None,
                        idempotency_key: str | None = None) -> dict[str, Any]:
    """Validate a compression request and queue its job: every bad input is a 4xx before a job
    exists (budget and methods by the planner's rules; refs, kinds, one base version)."""
    budget, meths = check_request(max_error, methods)
    if name is not None:
        names.model_name(name)
    if collection is not None:
        names.model_name(collection)
    if (members is None) == (base is None):
        raise InvalidInput("give the members (refs), or a base (and tags) naming them; not both",
                           code="invalid_members")
    if tags and base is None:
        raise InvalidInput("tags select adapters of a base: give base too", code="invalid_members")
    if members is not None and not 1 <= len(members) <= MAX_MEMBERS:
        raise InvalidInput(f"a compression takes 1 to {MAX_MEMBERS} member adapters", code="invalid_members")

    def build(s: Session) -> CompressParams:
        if members is not None:
            versions = collection_versions(s, members)
        else:
            assert base is not None
            base_version = resolve_base(s, base)
            versions = compressible(s, base_version.ref, dict(tags or {}))
            if not versions:
                raise InvalidInput(f"no adapter pinned to {base_version.ref} with tags {tags or {}} holds its own "
                                   "blobs: nothing to compress", code="empty_collection",
                                   details={"base": base_version.ref, "tags": tags or {}})
            if len(versions) > MAX_MEMBERS:
                raise InvalidInput(f"{len(versions)} adapters match; a compression takes at most {MAX_MEMBERS}",
                                   code="invalid_members")
        return CompressParams(members=[v.ref for v in versions], max_error=budget, methods=meths, name=name,
                              collection=collection, prune=prune)

    return jobs.submit(ctx, build, actor=actor, idempotency_key=idempotency_key)


def request_prune(ctx: RegistryContext, compression_id: int, max_error: Any = None,
                  actor: str | None = None) -> dict[str, Any]:
    """Queue pruning of a plan's members whose error is ≤ ``max_error`` (default: the plan's own
    budget, which every member meets)."""
    if max_error is not None:
        check_request(max_error)

    def build(s: Session) -> PruneParams:
        c = s.get(Compression, compression_id)
        if c is None:
            raise NotFound(f"compression {compression_id} not found", code="compression_not_found")
        return PruneParams(compression_id=c.id, max_error=float(c.max_error if max_error is None else max_error))

    return jobs.submit(ctx, build, actor=actor)


def compress(run: JobRun[CompressParams]) -> dict[str, Any]:
    """The ``compress`` job."""
    from ..weights import compress as planner
    from ..weights.adapters import load_peft_adapter
    from ..weights.rmm_baselines import adapter_error

    ctx, prm = run.ctx, run.params
    methods = list(prm.methods or planner.METHODS)
    with ctx.db.read() as s:
        model_name = prm.name or f"{collection_base_model(s, prm.members, prm.query)}-compressed"
    head = {"operation": "compress", "max_error": prm.max_error, "methods": methods, "job_id": run.job_id}
    with job_run(run, model_name, "compression plan", head) as mr:
        with ctx.db.read() as s:
            if prm.query is not None:
                versions = compressible(s, prm.query.base, prm.query.tags)
                if not versions:
                    return skipped(mr, "the collection has no adapter holding its own blobs")
            else:
                versions = collection_versions(s, prm.members or [])
            members = [(v.id, provenance_entry(v)) for v in versions]
            base_id = versions[0].base_version_id
            assert base_id is not None
            base_ref = ref_of(s, base_id)
        refs = [m[1]["ref"] for m in members]
        entries: list[dict[str, Any]] = [m[1] for m in members]
        params = {**head, "members": entries, "base": base_ref}
        mr.log_params({"members": entries, "base": base_ref})
        run.progress(0.05, f"loading {len(members)} adapters")
        adapters = [load_peft_adapter(local_copy(run, vid, f"member-{i}")) for i, (vid, _) in enumerate(members)]
        run.progress(0.2, "planning")
        plan = planner.plan(adapters, prm.max_error, methods=methods, names=refs)
        out = run.work_dir / "plan"
        planner.save_plan(plan, out / PLAN_FILE)
        run.progress(0.8, "checking the stored plan")
        stored = planner.load_plan(out / PLAN_FILE)
        errors = [adapter_error(ad, stored.reconstruct(i)).overall for i, ad in enumerate(adapters)]
        over = {refs[i]: e for i, e in enumerate(errors) if e > prm.max_error}
        if over:  # the planner measures every candidate on its decoded values: this would be a bug
            raise RuntimeError(f"plan file rebuilds members above the budget {prm.max_error}: {over}")
        served = _served_errors(run, out / PLAN_FILE, len(members))
        rows = [{"position": i, "ref": refs[i], "method": mp.method, "parameters": mp.parameters,
                 "stored_bytes": mp.stored_bytes, "original_bytes": mp.original_bytes, "error": errors[i],
                 "served_error": served[i]} for i, mp in enumerate(stored.members)]
        totals = {"members": len(rows), "stored_bytes": stored.stored_bytes(),
                  "original_bytes": stored.original_bytes(),
                  "ratio": stored.stored_bytes() / stored.original_bytes() if stored.original_bytes() else 0.0,
                  "error_max": max(errors), "error_mean": sum(errors) / len(errors)}
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["method"]] = counts.get(r["method"], 0) + 1
        metrics = {k: float(v) for k, v in totals.items()}
        metrics.update({f"members_{m.replace('+', '_')}": float(n) for m, n in counts.items()})
        for r in rows:
            metrics[f"stored_bytes_member_{r['position']}"] = float(r["stored_bytes"])
            metrics[f"error_member_{r['position']}"] = r["error"]
            metrics[f"served_error_member_{r['position']}"] = r["served_error"]
        mr.log_metrics(metrics)
        mr.log_dict({**totals, "max_error": prm.max_error, "methods": methods, "base": base_ref, "members": rows},
                    "compression.json")
        mr.log_dict(lineage_doc(model_name, "compress", entries, params), "lineage.json")
        summary = {"compression": {**totals, "max_error": prm.max_error, "methods": methods, "by_method": counts}}
        result: dict[str, Any] = {}

        def hook(s: Session, v: ModelVersion) -> None:
            c = Compression(collection=prm.collection, base_version_id=base_id, version_id=v.id,
                            max_error=prm.max_error, methods=methods, stored_bytes=totals["stored_bytes"],
                            original_bytes=totals["original_bytes"], summary=summary["compression"],
                            job_id=run.job_id, mlflow_run_id=mr.run_id, created_by=run.created_by)
            c.members = [CompressionMember(position=r["position"], version_id=vid, method=r["method"],
                                           parameters=r["parameters"], stored_bytes=r["stored_bytes"],
                                           original_bytes=r["original_bytes"], error=r["error"],
                                           served_error=r["served_error"])
                         for r, (vid, _) in zip(rows, members, strict=True)]
            s.add(c)
            for r, (vid, _) in zip(rows, members, strict=True):
                s.add(LineageEdge(child_id=vid, parent_id=v.id, relation=Relation.plan_member_of.value,
                                  params={"position": r["position"], "method": r["method"],
                                          "stored_bytes": r["stored_bytes"], "error": r["error"]}))
            s.flush()
            result.update(_result(c.id, f"{model_name}@{v.version}", totals, rows))
            _complete(run, s, c.id, result, mr.run_id)

        spec = DraftSpec(model=model_name, kind="merge", base=base_ref, tags={"registry.method": "compress"},
                         aliases=[], parents=[],
                         description=f"compression plan of {len(members)} adapters of {base_ref} "
                                     f"(max_error {prm.max_error})")
        opts = CommitOptions(status="ready", mlflow_run_id=mr.run_id, extra_summary=summary, hook=hook,
                             recipe={"type": "compression_plan", "members": refs, "max_error": prm.max_error,
                                     "methods": methods, "job_id": run.job_id})
        out_view = record(run, out, spec, opts, mlflow_run=mr)
    if isinstance(out_view, str):  # this exact plan exists already
        with ctx.db.write() as s:
            existing = s.scalar(select(Compression).where(Compression.version_id == resolve(s, out_view).id)
                                .order_by(Compression.id).limit(1))
            result = {**deduplicated(out_view), "compression_id": existing.id if existing else None}
            if existing is not None:
                _complete(run, s, existing.id, result, mr.run_id)
            else:
                run.complete(s, result, mr.run_id)
    if result.get("prune_job_id"):
        jobs.send(ctx, [int(result["prune_job_id"])])
    return result


def _served_errors(run: JobRun[CompressParams], plan_file: Path, n: int) -> list[float]:
    """Each member's error as it would be served once pruned: its PEFT files rebuilt by the function
    that serves them, measured against the member's files as they are now (job input ``member-i``)."""
    from ..weights.peft_delta import delta_error

    errors = []
    for position, files in rebuild_members(StorageMode.derived_plan.value, plan_file, list(range(n)),
                                           run.work_dir / "rebuilt"):
        folder = run.work_dir / "served" / str(position)
        for path, data in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        errors.append(delta_error(run.work_dir / f"member-{position}", folder))
    return errors


def _result(compression_id: int, ref: str, totals: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"compression_id": compression_id, "ref": ref, **totals,
            "members": [{k: r[k] for k in ("ref", "method", "stored_bytes", "error", "served_error")} for r in rows]}


def _complete(run: JobRun[CompressParams], s: Session, compression_id: int, result: dict[str, Any],
              mlflow_run_id: str | None) -> None:
    """Complete the job in the caller's transaction; with ``prune``, queue the plan's prune job in it."""
    if run.params.prune:
        job, _ = jobs.create(s, PruneParams(compression_id=compression_id, max_error=run.params.max_error),
                             settings=run.ctx.settings, created_by=run.created_by,
                             idempotency_key=f"compress:{run.job_id}:prune",
                             max_attempts=run.ctx.settings.job_max_attempts)
        result["prune_job_id"] = job.id
    run.complete(s, result, mlflow_run_id)


def policy_params(base_ref: str, tags: dict[str, str | None], params: dict[str, Any]) -> CompressParams:
    """The job a compress_collection policy queues when an adapter lands (members found when it runs)."""
    return CompressParams(query=BasisQuery(base=base_ref, tags=tags), max_error=params["max_error"],
                          methods=params.get("methods"), name=params.get("name"),
                          collection=params.get("collection"), prune=bool(params.get("prune", False)))


# ----------------------------------------------------------------------------- views


def compression_view(s: Session, c: Compression) -> dict[str, Any]:
    ids = [m.version_id for m in c.members]
    versions = {v.id: v for v in s.scalars(select(ModelVersion).where(ModelVersion.id.in_(ids)))} if ids else {}

    def pruned_here(v: ModelVersion | None) -> bool:
        return (v is not None and v.storage_mode == StorageMode.derived_plan.value
                and (v.recipe or {}).get("compression_id") == c.id)

    return {
        "id": c.id, "collection": c.collection, "ref": ref_of(s, c.version_id),
        "base": ref_of(s, c.base_version_id) if c.base_version_id else None,
        "max_error": c.max_error, "methods": c.methods, "stored_bytes": c.stored_bytes,
        "original_bytes": c.original_bytes, "ratio": c.stored_bytes / c.original_bytes if c.original_bytes else 0.0,
        "summary": c.summary, "job_id": c.job_id, "mlflow_run_id": c.mlflow_run_id, "created_at": c.created_at,
        "created_by": c.created_by,
        "members": [{"position": m.position, "ref": versions[m.version_id].ref if m.version_id in versions else None,
                     "method": m.method, "parameters": m.parameters, "stored_bytes": m.stored_bytes,
                     "original_bytes": m.original_bytes, "error": m.error, "served_error": m.served_error,
                     "prunable": m.served_error <= c.max_error,
                     "pruned": pruned_here(versions.get(m.version_id))} for m in c.members],
    }


def get_compression(ctx: RegistryContext, compression_id: int) -> dict[str, Any]:
    return get_collection_row(ctx, Compression, compression_id, compression_view, "compression")


def list_compressions(ctx: RegistryContext, collection: str | None = None, limit: int = 50,
                      version: str | None = None) -> list[dict[str, Any]]:
    """Plans, newest first; ``version``: only those whose plan file is the version that ref names."""
    return list_collection_rows(ctx, Compression, compression_view, collection, limit, version)
