"""Update compatibility (MUSCLE): prediction sets per version and the flip metrics
between two versions evaluated on the same instances.

A prediction set is either ``classification`` (``predictions`` and ``labels``, one per instance)
or ``generative`` (``scores``: the similarity S(prediction_i, y_i) per instance, computed by the
user's metric). Comparing two versions needs the same dataset name, kind and instance count (and
the same labels for classification).
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidInput, NotFound
from ..models import LineageEdge, ModelVersion, PredictionSet
from . import names
from .context import RegistryContext
from .events import emit
from .refs import resolve

MAX_INSTANCES = 1_000_000
KINDS = ("classification", "generative")


def _check_values(what: str, values: Any, n: int | None) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise InvalidInput(f"{what} must be a non-empty list", code="invalid_predictions")
    if len(values) > MAX_INSTANCES:
        raise InvalidInput(f"{what}: at most {MAX_INSTANCES} instances", code="invalid_predictions")
    if n is not None and len(values) != n:
        raise InvalidInput(f"{what} has {len(values)} entries, expected {n}", code="invalid_predictions")
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values) and what != "scores":
        raise InvalidInput(f"{what} entries must be strings or integers (class labels)", code="invalid_predictions")
    return values


def store_predictions(ctx: RegistryContext, ref: str, dataset: str, kind: str, *, predictions: list[Any] | None = None,
                      labels: list[Any] | None = None, scores: list[float] | None = None,
                      replace: bool = False) -> dict[str, Any]:
    names.model_name(dataset)  # same charset rules as model names
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}", code="invalid_predictions")
    if kind == "classification":
        preds = _check_values("predictions", predictions, None)
        data: dict[str, Any] = {"predictions": preds, "labels": _check_values("labels", labels, len(preds))}
        count = len(preds)
    else:
        if not isinstance(scores, list) or not scores:
            raise InvalidInput("generative prediction sets need 'scores' (one similarity per instance)",
                               code="invalid_predictions")
        if len(scores) > MAX_INSTANCES:
            raise InvalidInput(f"scores: at most {MAX_INSTANCES} instances", code="invalid_predictions")
        bad = [i for i, x in enumerate(scores) if isinstance(x, bool) or not isinstance(x, int | float)
               or not math.isfinite(x)]
        if bad:
            raise InvalidInput(f"scores must be finite numbers (bad at {bad[:5]})", code="invalid_predictions")
        data = {"scores": [float(x) for x in scores]}
        if predictions is not None:
            data["predictions"] = _check_values("predictions", predictions, len(scores))
        count = len(scores)
    with ctx.db.write() as s:
        v = resolve(s, ref)
        existing = s.scalar(select(PredictionSet).where(PredictionSet.version_id == v.id,
                                                        PredictionSet.dataset == dataset))
        if existing is not None:
            if not replace:
                raise Conflict(f"{v.ref} already has predictions for {dataset!r} (replace=true to overwrite)",
                               code="predictions_exist")
            s.delete(existing)
            s.flush()
        s.add(PredictionSet(version_id=v.id, dataset=dataset, kind=kind, count=count, data=data))
        emit(s, "predictions.stored", model_name=v.model.name, version_id=v.id, ref=v.ref, dataset=dataset,
             kind=kind, count=count)
        return {"ref": v.ref, "dataset": dataset, "kind": kind, "count": count}


def list_predictions(ctx: RegistryContext, ref: str) -> list[dict[str, Any]]:
    with ctx.db.read() as s:
        v = resolve(s, ref)
        rows = s.execute(select(PredictionSet.dataset, PredictionSet.kind, PredictionSet.count,
                                PredictionSet.created_at).where(PredictionSet.version_id == v.id)
                         .order_by(PredictionSet.dataset))
        return [{"ref": v.ref, "dataset": d, "kind": k, "count": c, "created_at": t} for d, k, c, t in rows]


def _load(s: Session, ref: str, dataset: str) -> tuple[str, PredictionSet]:
    v = resolve(s, ref)
    p = s.scalar(select(PredictionSet).where(PredictionSet.version_id == v.id, PredictionSet.dataset == dataset))
    if p is None:
        raise NotFound(f"{v.ref} has no predictions for {dataset!r}", code="predictions_not_found",
                       details={"ref": v.ref, "dataset": dataset})
    return v.ref, p


def compare(ctx: RegistryContext, old: str, new: str, dataset: str) -> dict[str, Any]:
    """MUSCLE metrics of updating ``old`` -> ``new`` on ``dataset`` (negative/positive flip rates,
    NFR_mc, accuracies and backward trust compatibility; D-based rates for generative sets)."""
    from ..weights.compat import classification_compat, generative_compat

    with ctx.db.read() as s:
        old_ref, a = _load(s, old, dataset)
        new_ref, b = _load(s, new, dataset)
        if a.kind != b.kind or a.count != b.count:
            raise InvalidInput(f"{old_ref} and {new_ref} have different prediction sets for {dataset!r} "
                               f"({a.kind}/{a.count} vs {b.kind}/{b.count})", code="incomparable_predictions")
        if a.kind == "classification":
            if a.data["labels"] != b.data["labels"]:
                raise InvalidInput("the two prediction sets were made against different labels",
                                   code="incomparable_predictions")
            metrics = classification_compat(a.data["predictions"], b.data["predictions"], a.data["labels"]).as_dict()
        else:
            metrics = generative_compat(a.data["scores"], b.data["scores"]).as_dict()
    return {"old": old_ref, "new": new_ref, "dataset": dataset, "kind": a.kind, "metrics": metrics}


def update_reports(ctx: RegistryContext, ref: str) -> list[dict[str, Any]]:
    """The compatibility reports of the updates a version takes part in: from it to each live version
    of its model that a lineage edge makes its successor (a transfer candidate of it, say), and from
    each same-model parent to it; one report (:func:`compare`) per dataset both sides have predictions
    for, with the successor's status. A pair whose sets cannot be compared carries the reason instead."""
    with ctx.db.read() as s:
        v = resolve(s, ref)
        same_model = (ModelVersion.model_id == v.model_id) & ModelVersion.archived_at.is_(None)
        after = s.scalars(select(ModelVersion).join(LineageEdge, LineageEdge.child_id == ModelVersion.id)
                          .where(LineageEdge.parent_id == v.id, same_model).order_by(ModelVersion.version))
        before = s.scalars(select(ModelVersion).join(LineageEdge, LineageEdge.parent_id == ModelVersion.id)
                           .where(LineageEdge.child_id == v.id, same_model).order_by(ModelVersion.version))
        pairs = [(p, v) for p in dict.fromkeys(before)] + [(v, c) for c in dict.fromkeys(after)]
        ids = {x.id for pair in pairs for x in pair}
        datasets: dict[int, set[str]] = {i: set() for i in ids}
        for vid, dataset in s.execute(select(PredictionSet.version_id, PredictionSet.dataset)
                                      .where(PredictionSet.version_id.in_(ids))):
            datasets[vid].add(dataset)
        todo = [(old.ref, new.ref, new.status, d) for old, new in pairs
                for d in sorted(datasets[old.id] & datasets[new.id])]
    reports = []
    for old_ref, new_ref, status, dataset in todo:
        try:
            reports.append({**compare(ctx, old_ref, new_ref, dataset), "new_status": status})
        except InvalidInput as e:
            reports.append({"old": old_ref, "new": new_ref, "dataset": dataset, "new_status": status,
                            "error": e.message})
    return reports
