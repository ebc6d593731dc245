"""Compression plans: a collection of adapters stored in the fewest bytes within an error budget."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, status
from pydantic import BaseModel, Field

from ...services import compressions
from ..deps import Ctx, Reader, Writer
from ..params import Id
from ..responses import AUTHENTICATED, errors
from ..schemas import CompressionOut, JobOut

router = APIRouter(tags=["compressions"], responses=AUTHENTICATED)

_NUMBER = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}


class CompressionCreate(BaseModel):
    members: list[str] | None = Field(None, description="Refs of adapters of one base version (or give base).")
    base: str | None = Field(None, description="Instead of members: every live adapter pinned to this base "
                             "version (a model name means its latest) that carries tags and still holds its "
                             "own blobs.")
    tags: dict[str, str | None] | None = Field(None, description="With base: key -> value (null: any value).")
    # Any: the planner's own rule (registry.weights.compress.check_budget) says what a budget is.
    max_error: Any = Field(description="Every member's relative delta error ‖ΔŴ − ΔW‖/‖ΔW‖ stays ≤ this "
                           "(a fraction in [0, 1); 0: every member exact).", json_schema_extra=_NUMBER)
    methods: list[str] | None = Field(None, description="Any of quantize, truncate, rmm (default: all).")
    name: str | None = Field(None, description="Model holding the plan version (default <base model>-compressed).")
    collection: str | None = None
    prune: bool = Field(False, description="Then let every member give up its own blobs and be served "
                        "rebuilt from the plan (a prune job queued when the plan is recorded).")


class CompressionPrune(BaseModel):
    max_error: Any = Field(None, description="Prune members whose error is ≤ this (default: the plan's budget, "
                           "which every member meets).", json_schema_extra=_NUMBER)


@router.post("/compressions", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=errors(409, 422))
def create_compression(body: CompressionCreate, ctx: Ctx, who: Writer,
                       idempotency_key: str | None = Header(default=None)) -> object:
    """Queue a compression plan; the job's result names the compression, its plan version and each
    member's method, stored bytes and error."""
    return compressions.request_compression(
        ctx, body.members, max_error=body.max_error, base=body.base, tags=body.tags, methods=body.methods,
        name=body.name, collection=body.collection, prune=body.prune, actor=who.name,
        idempotency_key=idempotency_key)


@router.get("/compressions", response_model=list[CompressionOut], responses=errors(422))
def list_compressions(ctx: Ctx, _: Reader, collection: str | None = None, limit: int = 50,
                      version: str | None = Query(None, description="Only the plans held by this version "
                                                  "(a ref such as demo-base-compressed@1; none if it names none).")
                      ) -> object:
    return compressions.list_compressions(ctx, collection, limit, version)


@router.get("/compressions/{compression_id}", response_model=CompressionOut, responses=errors(404, 422))
def get_compression(compression_id: Id, ctx: Ctx, _: Reader) -> object:
    return compressions.get_compression(ctx, compression_id)


@router.post("/compressions/{compression_id}/prune", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=errors(404, 409, 422))
def prune_compression(compression_id: Id, body: CompressionPrune, ctx: Ctx, who: Writer) -> object:
    """Queue pruning: members within the budget give up their blobs and are served from the plan."""
    return compressions.request_prune(ctx, compression_id, body.max_error, who.name)
