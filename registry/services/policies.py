"""Automation policies, evaluated by the dispatcher for every event.

``transfer_on_base_update`` (base model X, α): when a new version of X becomes ready, create a
transfer candidate for every live, ready fine-tune and adapter pinned to X's previous ready
version.

``refresh_basis`` (base model X, p | max_error, collection, tags): when an adapter pinned to a
version of X becomes ready, refit the RMM basis of the collection "adapters pinned to that base
version [with these tags]". A refresh already waiting in the queue absorbs later triggers (its
members are resolved when it runs).

``compress_collection`` (base model X, max_error, methods, collection, tags, prune): the same
trigger and collection (of the adapters that still hold their own blobs), re-planned with the
compression planner (:mod:`registry.services.compressions`); with ``prune`` the plan's members then
give up their own blobs.

Jobs get idempotency keys derived from (policy, event[, dependent]), so re-dispatching an event
after a crash never creates a job twice. Promotion stays a user action: policies only create
candidates and bases.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import Conflict, InvalidInput, NotFound
from ..models import Event, Job, JobState, Model, ModelVersion, Policy, VersionTag
from . import compressions, jobs, names
from .bases import check_p_or_budget
from .context import RegistryContext
from .derive import check_number
from .dispatcher import subscriber
from .jobtypes import BasisParams, BasisQuery, JobParams, TransferParams
from .names import FULL_MODEL_KINDS

TYPES = ("transfer_on_base_update", "refresh_basis", "compress_collection")
TRIGGERS = ("version.created", "version.promoted")


def policy_view(p: Policy) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "type": p.type, "base_model": p.base_model, "params": p.params,
            "active": p.active, "created_at": p.created_at, "created_by": p.created_by}


def _check_params(type_: str, params: dict[str, Any]) -> dict[str, Any]:
    if type_ == "transfer_on_base_update":
        alpha = params.get("alpha", 1.0)
        check_number("alpha", alpha, low=-100.0, high=100.0)
        kinds = params.get("kinds", ["finetune", "adapter"])
        if not isinstance(kinds, list) or not kinds or not set(kinds) <= {"finetune", "adapter"}:
            raise InvalidInput("kinds must be a non-empty list of finetune/adapter", code="invalid_parameter")
        return {"alpha": float(alpha), "kinds": sorted(kinds)}
    tags = params.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str | None) for v in tags.values()):
        raise InvalidInput("tags must be an object of strings (or null: any value)", code="invalid_parameter")
    collection = params.get("collection")
    if collection is not None:
        names.model_name(collection)
    if type_ == "compress_collection":
        max_error, methods = compressions.check_request(params.get("max_error"), params.get("methods"))
        prune = params.get("prune", False)
        if not isinstance(prune, bool):
            raise InvalidInput("prune must be true or false", code="invalid_parameter")
        return {"max_error": max_error, "methods": methods, "tags": tags, "collection": collection,
                "name": collection, "prune": prune}
    p, max_error = params.get("p"), params.get("max_error")
    check_p_or_budget(p, max_error)
    return {"p": p, "max_error": max_error, "tags": tags, "collection": collection, "name": collection}


def create_policy(ctx: RegistryContext, name: str, type_: str, base_model: str, params: dict[str, Any],
                  actor: str | None = None) -> dict[str, Any]:
    names.model_name(name)
    names.model_name(base_model)
    if type_ not in TYPES:
        raise InvalidInput(f"unknown policy type {type_!r}; one of {', '.join(TYPES)}", code="invalid_policy_type")
    clean = _check_params(type_, params or {})
    with ctx.db.write() as s:
        if s.scalar(select(Policy.id).where(Policy.name == name)) is not None:
            raise Conflict(f"policy {name!r} already exists", code="policy_exists")
        p = Policy(name=name, type=type_, base_model=base_model, params=clean, created_by=actor)
        s.add(p)
        s.flush()
        return policy_view(p)


def list_policies(ctx: RegistryContext) -> list[dict[str, Any]]:
    with ctx.db.read() as s:
        return [policy_view(p) for p in s.scalars(select(Policy).order_by(Policy.id))]


def delete_policy(ctx: RegistryContext, name: str) -> None:
    with ctx.db.write() as s:
        p = s.scalar(select(Policy).where(Policy.name == name))
        if p is None:
            raise NotFound(f"policy {name!r} not found", code="policy_not_found")
        s.delete(p)


@subscriber
def on_event(s: Session, ev: Event, settings: Settings) -> list[Job]:
    if ev.type not in TRIGGERS or ev.version_id is None:
        return []
    if ev.type == "version.created" and ev.payload.get("status", "ready") != "ready":
        return []
    v = s.get(ModelVersion, ev.version_id)
    if v is None or v.archived_at is not None or v.status != "ready":
        return []
    created: list[Job] = []
    if v.kind in FULL_MODEL_KINDS:
        created += _transfers_for_new_base(s, ev, v, settings)
    if v.kind == "adapter" and v.base_version_id is not None:
        created += _refresh_bases(s, ev, v, settings)
        created += _compress_collections(s, ev, v, settings)
    return created


def _transfers_for_new_base(s: Session, ev: Event, new: ModelVersion, settings: Settings) -> list[Job]:
    model = new.model.name
    policies = list(s.scalars(select(Policy).where(Policy.type == "transfer_on_base_update",
                                                   Policy.base_model == model, Policy.active.is_(True))))
    if not policies:
        return []
    prev = s.scalar(select(ModelVersion).where(
        ModelVersion.model_id == new.model_id, ModelVersion.version < new.version, ModelVersion.status == "ready",
        ModelVersion.archived_at.is_(None)).order_by(ModelVersion.version.desc()).limit(1))
    if prev is None:
        return []
    dependents = list(s.scalars(select(ModelVersion).where(
        ModelVersion.base_version_id == prev.id, ModelVersion.archived_at.is_(None), ModelVersion.status == "ready")
        .order_by(ModelVersion.id)))
    out: list[Job] = []
    for p in policies:
        for dep in dependents:
            if dep.kind not in p.params.get("kinds", ["finetune", "adapter"]):
                continue
            job, created = jobs.create(
                s, TransferParams(finetune=dep.ref, target_base=new.ref, alpha=p.params.get("alpha", 1.0)),
                settings=settings, created_by=f"policy:{p.name}",
                idempotency_key=f"policy:{p.id}:event:{ev.id}:version:{dep.id}", event_id=ev.id, policy_id=p.id,
                max_attempts=settings.job_max_attempts)
            if created:
                out.append(job)
    return out


def _collection_policies(s: Session, adapter: ModelVersion, type_: str,
                         job_type: str) -> Iterator[tuple[Policy, ModelVersion]]:
    """(policy, base) for each active policy of ``type_`` on the base model of ``adapter`` whose tags
    the adapter carries and that has no ``job_type`` job waiting in the queue (the waiting one will
    see this adapter too: its members are resolved when it runs)."""
    base = s.get(ModelVersion, adapter.base_version_id)
    if base is None:
        return
    base_model = s.scalar(select(Model.name).where(Model.id == base.model_id))
    policies = list(s.scalars(select(Policy).where(Policy.type == type_, Policy.base_model == base_model,
                                                   Policy.active.is_(True))))
    have: dict[str, str] | None = None
    for p in policies:
        tags = p.params.get("tags") or {}
        if tags:
            if have is None:
                have = {t.key: t.value for t in s.scalars(select(VersionTag).where(
                    VersionTag.version_id == adapter.id))}
            if any(k not in have or (val is not None and have[k] != val) for k, val in tags.items()):
                continue
        waiting = s.scalar(select(Job.id).where(Job.policy_id == p.id, Job.type == job_type,
                                                Job.state == JobState.queued.value).limit(1))
        if waiting is None:
            yield p, base


def _queue(s: Session, ev: Event, p: Policy, params: JobParams, settings: Settings) -> list[Job]:
    job, created = jobs.create(s, params, settings=settings, created_by=f"policy:{p.name}",
                               idempotency_key=f"policy:{p.id}:event:{ev.id}", event_id=ev.id, policy_id=p.id,
                               max_attempts=settings.job_max_attempts)
    return [job] if created else []


def _refresh_bases(s: Session, ev: Event, adapter: ModelVersion, settings: Settings) -> list[Job]:
    out: list[Job] = []
    for p, base in _collection_policies(s, adapter, "refresh_basis", "basis"):
        out += _queue(s, ev, p, BasisParams(
            query=BasisQuery(base=base.ref, tags=p.params.get("tags") or {}), p=p.params.get("p"),
            max_error=p.params.get("max_error"), collection=p.params.get("collection") or p.name,
            name=p.params.get("name")), settings)
    return out


def _compress_collections(s: Session, ev: Event, adapter: ModelVersion, settings: Settings) -> list[Job]:
    out: list[Job] = []
    for p, base in _collection_policies(s, adapter, "compress_collection", "compress"):
        params = {**p.params, "collection": p.params.get("collection") or p.name}
        out += _queue(s, ev, p, compressions.policy_params(base.ref, p.params.get("tags") or {}, params), settings)
    return out
