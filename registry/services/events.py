"""The transactional outbox: every state change writes an Event in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models import Event
from .context import RegistryContext


def emit(session: Session, type: str, *, model_name: str | None = None, version_id: int | None = None,
         **payload: Any) -> Event:
    ev = Event(type=type, model_name=model_name, version_id=version_id, payload=payload)
    session.add(ev)
    return ev


def list_events(ctx: RegistryContext, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """The event log, oldest first, after event id ``after``."""
    limit = max(1, min(limit, 1000))
    with ctx.db.read() as s:
        rows = s.scalars(select(Event).where(Event.id > after).order_by(Event.id).limit(limit))
        return [{"id": e.id, "type": e.type, "model": e.model_name, "version_id": e.version_id,
                 "payload": e.payload, "created_at": e.created_at} for e in rows]
