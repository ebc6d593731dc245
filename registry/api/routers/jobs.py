"""Jobs and the operations that run as jobs: bases, transfers, merges; automation policies."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, status
from pydantic import BaseModel, Field
from starlette.responses import Response

from ...services import bases, jobs, merges, packing, policies, pruning, transfers, verify
from ..deps import Ctx, Reader, Writer
from ..params import Id, IdCursor
from ..responses import AUTHENTICATED, errors
from ..schemas import BasisOut, JobOut, JobPage, PolicyOut

router = APIRouter(tags=["jobs"], responses=AUTHENTICATED)


class BasisCreate(BaseModel):
    members: list[str] = Field(description="Refs of ≥ 2 adapters of one base version.")
    p: int | None = Field(None, description="Basis directions per module (0 ≤ p ≤ min(r, n−1)).")
    max_error: float | None = Field(None, description="Per module, the smallest p keeping every member's error ≤ this.")
    name: str | None = Field(None, description="Model holding the basis version (default <base model>-rmm).")
    collection: str | None = None


class TransferCreate(BaseModel):
    finetune: str = Field(description="Ref of a fine-tune or adapter pinned to the source base.")
    target_base: str
    alpha: float = 1.0
    storage: str = Field("stored", description="stored (keep the weights) or derived (keep only the recipe; "
                         "the weights are rebuilt as target + alpha * (fine-tune - source) on request)")


class MergeCreate(BaseModel):
    method: str = Field(description="task_arithmetic, ties, dare_linear or dare_ties.")
    inputs: list[str]
    name: str = Field(description="Model to hold the result.")
    params: dict[str, Any] = Field(default_factory=dict, description="weights, lam, density, seed, majority_sign")
    rank: int | None = Field(None, description="Adapters: rank of the merged LoRA (default: largest input rank).")


class PolicyCreate(BaseModel):
    name: str
    type: str = Field(description="transfer_on_base_update, refresh_basis or compress_collection.")
    base_model: str
    params: dict[str, Any] = Field(default_factory=dict)


@router.get("/jobs", response_model=JobPage, responses=errors(422))
def list_jobs(ctx: Ctx, _: Reader, cursor: IdCursor, state: str | None = None, type: str | None = None,
              limit: int = 50) -> object:
    items, nxt = jobs.list_jobs(ctx, state=state, type=type, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": str(nxt) if nxt is not None else None}


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(404, 422))
def get_job(job_id: Id, ctx: Ctx, _: Reader) -> object:
    return jobs.get(ctx, job_id)


@router.post("/bases", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=errors(409, 422))
def create_basis(body: BasisCreate, ctx: Ctx, who: Writer,
                 idempotency_key: str | None = Header(default=None)) -> object:
    """Queue an RMM basis over ``members``; the job's result names the basis and its version."""
    return bases.request_basis(ctx, body.members, p=body.p, max_error=body.max_error, name=body.name,
                               collection=body.collection, actor=who.name, idempotency_key=idempotency_key)


@router.get("/bases", response_model=list[BasisOut], responses=errors(422))
def list_bases(ctx: Ctx, _: Reader, collection: str | None = None, limit: int = 50) -> object:
    return bases.list_bases(ctx, collection, limit)


@router.get("/bases/{basis_id}", response_model=BasisOut, responses=errors(404, 422))
def get_basis(basis_id: Id, ctx: Ctx, _: Reader) -> object:
    return bases.get_basis(ctx, basis_id)


class PruneBody(BaseModel):
    max_error: float | None = Field(None, description="Prune members whose relative delta error is ≤ this "
                                    "(0: only members rebuilt exactly). Default: REGISTRY_PRUNE_BUDGET.")


@router.post("/bases/{basis_id}/prune", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=errors(404, 409, 422))
def prune_basis(basis_id: Id, body: PruneBody, ctx: Ctx, who: Writer) -> object:
    """Queue pruning: members within the budget give up their blobs and are served from the basis."""
    return pruning.request_prune(ctx, basis_id, body.max_error, who.name)


@router.post("/models/{name}/versions/{v}/verify", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=errors(404, 409, 422))
def verify_version(name: str, v: str, ctx: Ctx, who: Writer) -> object:
    """Queue a check of every file's sha256 (stored files re-read, derived files regenerated)."""
    return verify.request_verify(ctx, f"{name}@{v}", who.name)


@router.post("/models/{name}/versions/{v}/pack", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=errors(404, 409, 422))
def pack_version(name: str, v: str, ctx: Ctx, who: Writer) -> object:
    """Queue packing a version losslessly (tensors deduplicated and coded against its base or
    previous version); downloads return the same bytes before, during and after."""
    return packing.request_pack(ctx, f"{name}@{v}", who.name)


@router.post("/transfers", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=errors(409, 422))
def create_transfer(body: TransferCreate, ctx: Ctx, who: Writer,
                    idempotency_key: str | None = Header(default=None)) -> object:
    """Queue a transfer of a fine-tune/adapter to a new base; the result is a candidate version."""
    return transfers.request_transfer(ctx, body.finetune, body.target_base, body.alpha, storage=body.storage,
                                      actor=who.name, idempotency_key=idempotency_key)


@router.post("/merges", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=errors(409, 422))
def create_merge(body: MergeCreate, ctx: Ctx, who: Writer,
                 idempotency_key: str | None = Header(default=None)) -> object:
    return merges.request_merge(ctx, body.method, body.inputs, body.name, params=body.params, rank=body.rank,
                                actor=who.name, idempotency_key=idempotency_key)


@router.post("/policies", status_code=status.HTTP_201_CREATED, response_model=PolicyOut, responses=errors(409, 422))
def create_policy(body: PolicyCreate, ctx: Ctx, who: Writer) -> object:
    return policies.create_policy(ctx, body.name, body.type, body.base_model, body.params, who.name)


@router.get("/policies", response_model=list[PolicyOut])
def list_policies(ctx: Ctx, _: Reader) -> object:
    return policies.list_policies(ctx)


@router.delete("/policies/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def delete_policy(name: str, ctx: Ctx, _: Writer) -> Response:
    policies.delete_policy(ctx, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
