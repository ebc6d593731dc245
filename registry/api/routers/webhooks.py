"""Webhooks and their delivery log (admin scope: targets and logs may carry sensitive URLs)."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field
from starlette.responses import Response

from ...services import webhooks
from ..deps import Admin, Ctx
from ..params import Id, IdCursor
from ..responses import AUTHENTICATED, errors
from ..schemas import DeliveryDetail, DeliveryPage, RedeliveryOut, WebhookCreated, WebhookOut

router = APIRouter(tags=["webhooks"], responses=AUTHENTICATED)


class WebhookCreate(BaseModel):
    url: str = Field(description="http(s) URL receiving POSTed events.")
    events: list[str] = Field(description="Event type patterns (fnmatch): 'version.*', 'job.failed', '*'.")
    secret: str | None = Field(None, description="HMAC signing secret (16-256 chars; for standard-webhooks "
                               "'whsec_' + base64 of 24-64 bytes); generated when omitted.")
    description: str = ""
    signature_scheme: str = Field("registry", description="How deliveries are signed: 'registry' "
                                  "(X-Registry-Signature) or 'standard-webhooks' (webhook-id, webhook-timestamp, "
                                  "webhook-signature per the Standard Webhooks specification).")


class WebhookUpdate(BaseModel):
    url: str | None = None
    events: list[str] | None = None
    active: bool | None = None
    description: str | None = None


@router.post("/webhooks", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated, responses=errors(422))
def create_webhook(body: WebhookCreate, ctx: Ctx, who: Admin) -> object:
    """Subscribe a URL to events. The response carries the signing secret, shown only once."""
    return webhooks.create_webhook(ctx, body.url, body.events, secret=body.secret, description=body.description,
                                   actor=who.name, signature_scheme=body.signature_scheme)


@router.get("/webhooks", response_model=list[WebhookOut])
def list_webhooks(ctx: Ctx, _: Admin) -> object:
    return webhooks.list_webhooks(ctx)


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, responses=errors(404, 422))
def get_webhook(webhook_id: Id, ctx: Ctx, _: Admin) -> object:
    return webhooks.get_webhook(ctx, webhook_id)


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, responses=errors(404, 422))
def update_webhook(webhook_id: Id, body: WebhookUpdate, ctx: Ctx, _: Admin) -> object:
    return webhooks.update_webhook(ctx, webhook_id, url=body.url, events=body.events, active=body.active,
                                   description=body.description)


@router.delete("/webhooks/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def delete_webhook(webhook_id: Id, ctx: Ctx, _: Admin) -> Response:
    webhooks.delete_webhook(ctx, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage, responses=errors(404, 422))
def list_deliveries(webhook_id: Id, ctx: Ctx, _: Admin, cursor: IdCursor, status: str | None = None,
                    limit: int = 50) -> object:
    items, nxt = webhooks.list_deliveries(ctx, webhook_id, status=status, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": str(nxt) if nxt is not None else None}


@router.get("/deliveries/{delivery_id}", response_model=DeliveryDetail, responses=errors(404, 422))
def get_delivery(delivery_id: Id, ctx: Ctx, _: Admin) -> object:
    return webhooks.get_delivery(ctx, delivery_id)


@router.post("/deliveries/{delivery_id}/redeliver", status_code=status.HTTP_202_ACCEPTED,
             response_model=RedeliveryOut, responses=errors(404, 409, 422))
def redeliver(delivery_id: Id, ctx: Ctx, who: Admin) -> object:
    """Send the delivery again (same delivery id, new job); returns ``{"delivery", "job"}``."""
    return webhooks.redeliver(ctx, delivery_id, actor=who.name)
