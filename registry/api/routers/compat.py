"""Prediction sets per version and MUSCLE update-compatibility between two versions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from ...services import compat
from ..deps import Ctx, Reader, Writer
from ..responses import AUTHENTICATED, errors
from ..schemas import CompatOut, PredictionsOut, UpdateReportOut
from .common import version_ref

router = APIRouter(tags=["compatibility"], responses=AUTHENTICATED)


class PredictionsIn(BaseModel):
    dataset: str
    kind: str = Field("classification", description="classification or generative")
    predictions: list[Any] | None = None
    labels: list[Any] | None = None
    scores: list[float] | None = Field(None, description="generative: S(prediction_i, y_i) per instance")
    replace: bool = False


@router.post("/models/{name}/versions/{v}/predictions", status_code=status.HTTP_201_CREATED,
             response_model=PredictionsOut, responses=errors(404, 409, 422))
def store_predictions(name: str, v: str, body: PredictionsIn, ctx: Ctx, _: Writer) -> object:
    return compat.store_predictions(ctx, version_ref(name, v), body.dataset, body.kind,
                                    predictions=body.predictions, labels=body.labels, scores=body.scores,
                                    replace=body.replace)


@router.get("/models/{name}/versions/{v}/predictions", response_model=list[PredictionsOut], responses=errors(404, 422))
def list_predictions(name: str, v: str, ctx: Ctx, _: Reader) -> object:
    return compat.list_predictions(ctx, version_ref(name, v))


@router.get("/models/{name}/versions/{v}/compat", response_model=list[UpdateReportOut], responses=errors(404, 422))
def version_updates(name: str, v: str, ctx: Ctx, _: Reader) -> object:
    """The compatibility reports of the updates this version takes part in (to its same-model
    successors in the lineage, transfer candidates included, and from its same-model parents), one
    per dataset both sides have predictions for."""
    return compat.update_reports(ctx, version_ref(name, v))


@router.get("/compat", response_model=CompatOut, responses=errors(404, 422))
def compare(old: str, new: str, dataset: str, ctx: Ctx, _: Reader) -> object:
    """MUSCLE metrics of the update old -> new: NFR, PFR, NFR_mc, accuracies, BTC (or D-based rates)."""
    return compat.compare(ctx, old, new, dataset)
