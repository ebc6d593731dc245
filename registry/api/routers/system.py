"""Health, tokens and the event log."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import text

from ... import __version__
from ...services import events, tokens
from ...services.packing import storage_report
from ..deps import Admin, Ctx, Reader
from ..params import AfterId, Id
from ..responses import AUTHENTICATED, errors
from ..schemas import EventPage, HealthOut, StorageOut, TokenCreate, TokenOut

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthOut, responses=errors(403))
def health(ctx: Ctx) -> object:
    with ctx.db.read() as s:
        s.execute(text("select 1"))
    return {"status": "ok", "version": __version__, "database": ctx.db.engine.dialect.name,
            "storage": ctx.store.name, "auth": ctx.settings.auth}


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenOut,
             responses=AUTHENTICATED | errors(422))
def create_token(body: TokenCreate, ctx: Ctx, _: Admin) -> object:
    return tokens.create(ctx, body.name, body.scope, body.expires_days)


@router.get("/tokens", response_model=list[TokenOut], responses=AUTHENTICATED)
def list_tokens(ctx: Ctx, _: Admin) -> object:
    return tokens.list_tokens(ctx)


@router.delete("/tokens/{token_id}", response_model=TokenOut, responses=AUTHENTICATED | errors(404, 422))
def revoke_token(token_id: Id, ctx: Ctx, _: Admin) -> object:
    return tokens.revoke(ctx, token_id)


@router.get("/storage", response_model=StorageOut, responses=AUTHENTICATED)
def storage(ctx: Ctx, _: Reader) -> object:
    """Logical bytes (what the versions' files add up to) against physical bytes (what the store
    holds for them), per model and in total."""
    return storage_report(ctx)


@router.get("/events", response_model=EventPage, responses=AUTHENTICATED | errors(422))
def list_events(ctx: Ctx, _: Reader, after: AfterId = 0, limit: int = 100) -> object:
    """The event log (oldest first, after the given id)."""
    return {"items": events.list_events(ctx, after, limit)}
