"""API tokens: random secrets shown once, stored as sha256, with hierarchical scopes
(``read`` < ``write`` < ``admin``)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from ..errors import Forbidden, InvalidInput, NotFound, Unauthorized
from ..models import ApiToken, utcnow
from .context import RegistryContext

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "rgt_"
_LAST_USED_EVERY = timedelta(minutes=5)
MAX_EXPIRES_DAYS = 36500  # a hundred years; beyond it no date can be stored


@dataclass(frozen=True)
class Principal:
    name: str
    scope: str  # the highest scope held
    token_id: int | None = None

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)

    def owns(self, created_by: str | None) -> bool:
        """Whether this principal may act on something another principal made and keeps to itself
        (a draft): the one that made it (``created_by`` is its name), or an admin."""
        return self.allows("admin") or (created_by is not None and created_by == self.name)

    def require(self, needed: str) -> None:
        if not self.allows(needed):
            raise Forbidden(f"this operation needs the {needed!r} scope; the token has {self.scope!r}",
                            code="insufficient_scope", details={"needed": needed, "has": self.scope})


ANONYMOUS_ADMIN = Principal("anonymous", "admin")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _view(t: ApiToken) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "scope": t.scopes, "prefix": t.prefix, "created_at": t.created_at,
            "expires_at": t.expires_at, "revoked": t.revoked_at is not None, "last_used_at": t.last_used_at}


def create(ctx: RegistryContext, name: str, scope: str, expires_days: int | None = None) -> dict[str, Any]:
    """Create a token; the secret is in the result and is never retrievable again."""
    if scope not in SCOPES:
        raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}", code="invalid_scope")
    if not name or len(name) > 128:
        raise InvalidInput("token name must be 1-128 characters", code="invalid_name")
    if expires_days is not None and not 0 < expires_days <= MAX_EXPIRES_DAYS:
        raise InvalidInput(f"expires_days must be between 1 and {MAX_EXPIRES_DAYS}", code="invalid_expiry")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, token_hash=_hash(secret), prefix=secret[:10], scopes=scope,
                     expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None)
    with ctx.db.write() as s:
        s.add(token)
        s.flush()
        return {**_view(token), "token": secret}


def list_tokens(ctx: RegistryContext) -> list[dict[str, Any]]:
    with ctx.db.read() as s:
        return [_view(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke(ctx: RegistryContext, token_id: int) -> dict[str, Any]:
    with ctx.db.write() as s:
        t = s.get(ApiToken, token_id)
        if t is None:
            raise NotFound(f"token {token_id} not found", code="token_not_found")
        if t.revoked_at is None:
            t.revoked_at = utcnow()
        return _view(t)


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def authenticate(ctx: RegistryContext, secret: str | None) -> Principal:
    """The principal for a bearer secret; raises 401 when missing, unknown, revoked or expired."""
    if not secret:
        raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'",
                           code="missing_token")
    with ctx.db.read() as s:
        t = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(secret)))
        if t is None or t.revoked_at is not None:
            raise Unauthorized("invalid or revoked token", code="invalid_token")
        now = utcnow()
        expires = _aware(t.expires_at)
        if expires is not None and expires <= now:
            raise Unauthorized("token expired", code="token_expired")
        last = _aware(t.last_used_at)
        principal = Principal(t.name, t.scopes, t.id)
        stale = last is None or now - last > _LAST_USED_EVERY
    if stale:  # record use at most every few minutes: no write per request
        with ctx.db.write() as s:
            s.execute(update(ApiToken).where(ApiToken.id == principal.token_id).values(last_used_at=now))
    return principal
