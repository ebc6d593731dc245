"""Webhooks: HTTP callbacks for outbox events, signed, retried with backoff, logged, replayable.

A webhook subscribes a URL to event types by glob pattern (``version.*``, ``job.failed``, ``*``;
:func:`fnmatch.fnmatchcase`). For every outbox event the dispatcher calls :func:`on_event`, which
creates, in the dispatching transaction, one :class:`WebhookDelivery` row and one ``webhook`` job
per matching active webhook (idempotency key ``webhook:{webhook_id}:event:{event_id}``, so a
re-dispatched event is never delivered twice). Events about webhook jobs themselves
(``job.succeeded`` / ``job.failed`` with ``job_type == "webhook"``) are never delivered: a webhook
subscribed to ``job.*`` would otherwise feed on its own deliveries forever.

A worker runs :func:`deliver`: it POSTs the event as compact JSON with sorted keys::

    {"created_at": "...", "id": <event id>, "model": "...", "payload": {...}, "type": "...",
     "version_id": ...}

with the headers ``X-Registry-Event`` (type), ``X-Registry-Delivery`` (delivery id; the same on
every retry and redelivery, so receivers can de-duplicate), ``X-Registry-Timestamp`` (unix
seconds) and ``X-Registry-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``.
Receivers check it with :func:`verify_signature`. A webhook created with ``signature_scheme
"standard-webhooks"`` is signed per the Standard Webhooks specification instead (what its
off-the-shelf verifiers check): ``webhook-id`` (``msg_<webhook id>_<event id>``, the same on every
retry and redelivery), ``webhook-timestamp`` (unix seconds) and ``webhook-signature: v1,<base64
HMAC-SHA256(base64-decoded secret, "<id>.<timestamp>.<body>")>``, with a ``whsec_<base64>``
secret; ``X-Registry-Event`` and ``X-Registry-Delivery`` come along. :func:`delivery_headers` is
the one place that says which headers a delivery carries. Redirects are not followed. A 2xx response
marks the delivery ``succeeded``; anything else (status, timeout, connection error) is logged in
the delivery's ``log`` and retried after ``webhook_backoff_seconds * 2**(attempt-1)`` (at most
1 h) until ``webhook_max_attempts``, after which the delivery is ``failed``. :func:`redeliver`
sends a delivery again (same delivery id, new job with key
``webhook-redeliver:{webhook_id}:event:{event_id}:{n}``; attempts keep counting in the log). Job
params carry ``delivery_id``, ``webhook_id`` and ``event_id``: SQLite reuses the ids of deleted
rows, so a job whose delivery was deleted with its webhook never sends someone else's delivery.
A job reaped by the dispatcher on its last attempt (worker killed) leaves its delivery
``pending``; redeliver it.

SSRF guard: unless ``webhook_allow_private`` is set, a target whose host is, or resolves to, a
loopback, private, link-local, multicast, reserved, unspecified or otherwise non-global address
(IPv4, IPv6, IPv4-mapped IPv6) is refused, when the webhook is created or changed and again at
every delivery. The delivery then connects to the address that passed the check (TLS still
verifies the certificate against the URL's host name), so DNS cannot change between the check
and the connection.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .. import __version__
from ..config import Settings
from ..errors import Conflict, InvalidInput, NotFound
from ..models import Event, Job, JobState, Webhook, WebhookDelivery, utcnow
from . import jobs
from .context import RegistryContext
from .dispatcher import subscriber
from .jobtypes import WebhookParams
from .runner import JobRun
from .sql import check_limit, newest_first

MAX_URL_LENGTH = 2048
MAX_PATTERNS = 50
MAX_LOG_ENTRIES = 100
MAX_BACKOFF_SECONDS = 3600.0
RESPONSE_EXCERPT = 500
SIGNATURE_PREFIX = "sha256="
# How deliveries are signed (Webhook.signature_scheme): the registry's own scheme (the default) or
# the Standard Webhooks specification (https://www.standardwebhooks.com).
SIGNATURE_SCHEMES = ("registry", "standard-webhooks")
STANDARD_SECRET_PREFIX = "whsec_"
STANDARD_SECRET_BYTES = (24, 64)  # the specification's recommended key sizes
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,64}")
DELIVERY_STATUSES = ("pending", "succeeded", "failed")
# The event types the registry emits today (documentation; patterns are not checked against it).
EVENT_TYPES = ("model.created", "model.updated", "model.tag_set", "model.tag_deleted", "version.created",
               "version.promoted", "version.archived", "version.tags_set", "version.tag_deleted", "version.pruned",
               "version.packed", "version.verified", "version.corrupt", "alias.set",
               "alias.deleted", "job.succeeded", "job.failed")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# --------------------------------------------------------------------------- signatures


def sign(secret: str, timestamp: int | str, body: bytes | str) -> str:
    """``sha256=`` + hex HMAC-SHA256(secret, ``f"{timestamp}.{body}"``)."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + raw, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>``: the decoded bytes. Raises
    ``invalid_webhook_secret`` for anything else (wrong prefix, not base64, 24-64 bytes)."""
    low, high = STANDARD_SECRET_BYTES
    body = secret[len(STANDARD_SECRET_PREFIX):] if isinstance(secret, str) else ""
    try:
        if not secret.startswith(STANDARD_SECRET_PREFIX):
            raise ValueError
        key = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error, AttributeError):
        raise InvalidInput(f"a standard-webhooks secret is {STANDARD_SECRET_PREFIX!r} followed by the base64 of "
                           f"{low}-{high} random bytes", code="invalid_webhook_secret") from None
    if not low <= len(key) <= high:
        raise InvalidInput(f"a standard-webhooks secret must decode to {low}-{high} bytes, not {len(key)}",
                           code="invalid_webhook_secret")
    return key


def sign_standard(secret: str, msg_id: str, timestamp: int | str, body: bytes | str) -> str:
    """``v1,`` + base64 HMAC-SHA256(``standard_key(secret)``, ``f"{msg_id}.{timestamp}.{body}"``):
    the ``webhook-signature`` of the Standard Webhooks specification."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(standard_key(secret), f"{msg_id}.{timestamp}.".encode() + raw, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def standard_message_id(webhook_id: int, event_id: int) -> str:
    """``webhook-id``: one per (webhook, event), repeated on every retry and redelivery."""
    return f"msg_{webhook_id}_{event_id}"


def delivery_headers(scheme: str, secret: str, *, webhook_id: int, delivery_id: int, event_id: int,
                     event_type: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers a delivery carries, signed per the webhook's ``scheme``."""
    headers = {"Content-Type": "application/json", "User-Agent": f"registry-webhooks/{__version__}",
               "X-Registry-Event": event_type, "X-Registry-Delivery": str(delivery_id)}
    if scheme == "standard-webhooks":
        msg_id = standard_message_id(webhook_id, event_id)
        return {**headers, "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": sign_standard(secret, msg_id, timestamp, body)}
    return {**headers, "X-Registry-Timestamp": str(timestamp), "X-Registry-Signature": sign(secret, timestamp, body)}


def verify_signature(secret: str, timestamp: int | str, body: bytes | str, signature: str,
                     tolerance_seconds: float = 300, *, now: float | None = None) -> bool:
    """Check a delivery's ``X-Registry-Signature`` against its ``X-Registry-Timestamp`` and raw
    body (the bytes received, before any JSON parsing). False when the signature does not match
    (constant-time comparison) or the timestamp is more than ``tolerance_seconds`` away from now
    (a replayed old request)."""
    try:
        ts = int(str(timestamp).strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), str(signature).strip().encode())


# --------------------------------------------------------------------------- SSRF guard


def _refused(reason: str, url: str, **details: Any) -> InvalidInput:
    return InvalidInput(f"webhook target {url!r} refused: {reason}", code="webhook_target_refused",
                        details={"url": url, **details})


def address_refused(ip: Address) -> str | None:
    """Why a webhook may not connect to ``ip`` (None: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_refused(mapped)
    for attr in ("is_unspecified", "is_loopback", "is_link_local", "is_multicast", "is_private", "is_reserved"):
        if getattr(ip, attr):
            return attr.removeprefix("is_").replace("_", "-") + " address"
    if not ip.is_global:
        return "non-global address"
    return None


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def parse_url(url: str) -> httpx.URL:
    """Validate the shape of a webhook URL (no network)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"webhook url must be 1-{MAX_URL_LENGTH} characters", code="invalid_webhook_url")
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise InvalidInput(f"invalid webhook url {url!r}: {e}", code="invalid_webhook_url") from None
    if u.scheme not in ("http", "https"):
        raise InvalidInput(f"webhook url must be http or https, not {u.scheme or 'none'!r}",
                           code="invalid_webhook_url")
    if not u.host:
        raise InvalidInput(f"webhook url {url!r} has no host", code="invalid_webhook_url")
    if u.userinfo:
        raise InvalidInput("webhook url must not contain credentials; receivers authenticate the registry "
                           "with the webhook secret", code="invalid_webhook_url")
    if u.fragment:
        raise InvalidInput("webhook url must not contain a fragment", code="invalid_webhook_url")
    return u


def resolve_target(url: str, allow_private: bool) -> list[Address]:
    """The addresses a delivery to ``url`` may connect to; raises ``webhook_target_refused`` when
    the host is or resolves to a non-public address (unless ``allow_private``). An IP literal is
    checked without DNS. Raises ``webhook_target_unresolvable`` when DNS has no answer."""
    u = parse_url(url)
    host = u.raw_host.decode("ascii").rstrip(".").lower()
    ip = _literal(host)
    if ip is not None:
        if not allow_private and (why := address_refused(ip)):
            raise _refused(why, url, address=str(ip))
        return [ip]
    if allow_private:
        return []  # no pinning needed: the HTTP client resolves the name itself
    if host == "localhost" or host.endswith(".localhost"):
        raise _refused("loopback host name", url, host=host)
    try:
        infos = socket.getaddrinfo(host, u.port or (443 if u.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise InvalidInput(f"cannot resolve webhook host {host!r}: {e}", code="webhook_target_unresolvable",
                           details={"url": url, "host": host}) from None
    addresses: list[Address] = []
    for info in infos:
        a = _literal(str(info[4][0]))
        if a is not None and a not in addresses:
            addresses.append(a)
    if not addresses:
        raise InvalidInput(f"cannot resolve webhook host {host!r}", code="webhook_target_unresolvable",
                           details={"url": url, "host": host})
    for a in addresses:  # one bad address refuses the host: DNS round-robin must not pick it
        if why := address_refused(a):
            raise _refused(f"{host} resolves to a {why}", url, host=host, address=str(a))
    return addresses


# --------------------------------------------------------------------------- webhooks (CRUD)


def webhook_view(w: Webhook, secret: bool = False) -> dict[str, Any]:
    out = {"id": w.id, "url": w.url, "events": list(w.events), "active": w.active, "description": w.description,
           "signature_scheme": w.signature_scheme, "created_at": w.created_at, "created_by": w.created_by}
    if secret:
        out["secret"] = w.secret
    return out


def check_patterns(events: Any) -> list[str]:
    if not isinstance(events, list) or not events or len(events) > MAX_PATTERNS:
        raise InvalidInput(f"events must be a list of 1-{MAX_PATTERNS} patterns (e.g. 'version.*', 'job.failed', '*')",
                           code="invalid_webhook_events")
    out: list[str] = []
    for p in events:
        if not isinstance(p, str) or not _PATTERN.fullmatch(p):
            raise InvalidInput(f"bad event pattern {p!r}: 1-64 characters of letters, digits, '._-' and glob "
                               "characters '*?[]!'", code="invalid_webhook_events")
        if p not in out:
            out.append(p)
    return out


def _check_scheme(scheme: Any) -> str:
    if scheme not in SIGNATURE_SCHEMES:
        raise InvalidInput(f"signature_scheme must be one of {', '.join(SIGNATURE_SCHEMES)}",
                           code="invalid_signature_scheme")
    return str(scheme)


def _check_secret(secret: str | None, scheme: str = "registry") -> str:
    if scheme == "standard-webhooks":
        if secret is None:
            return STANDARD_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        standard_key(secret)
        return secret
    if secret is None:
        return "whsec_" + secrets.token_urlsafe(32)
    if not isinstance(secret, str) or not 16 <= len(secret) <= 256 or not secret.isprintable():
        raise InvalidInput("webhook secret must be 16-256 printable characters", code="invalid_webhook_secret")
    return secret


def _check_url(ctx: RegistryContext, url: str) -> str:
    resolve_target(url, ctx.settings.webhook_allow_private)
    return url


def create_webhook(ctx: RegistryContext, url: str, events: list[str], secret: str | None = None,
                   description: str = "", actor: str | None = None,
                   signature_scheme: str = "registry") -> dict[str, Any]:
    """Subscribe ``url`` to the events matching ``events``, its deliveries signed per
    ``signature_scheme``. The response holds the signing secret; it is never shown again."""
    patterns = check_patterns(events)
    scheme = _check_scheme(signature_scheme)
    key = _check_secret(secret, scheme)
    if not isinstance(description, str) or len(description) > 2000:
        raise InvalidInput("description must be at most 2000 characters", code="invalid_parameter")
    _check_url(ctx, url)
    with ctx.db.write() as s:
        w = Webhook(url=url, events=patterns, secret=key, signature_scheme=scheme, active=True,
                    description=description, created_by=actor)
        s.add(w)
        s.flush()
        return webhook_view(w, secret=True)


def list_webhooks(ctx: RegistryContext) -> list[dict[str, Any]]:
    with ctx.db.read() as s:
        return [webhook_view(w) for w in s.scalars(select(Webhook).order_by(Webhook.id))]


def _webhook(s: Session, webhook_id: int, lock: bool = False) -> Webhook:
    q = select(Webhook).where(Webhook.id == webhook_id)
    w = s.scalar(q.with_for_update() if lock else q)
    if w is None:
        raise NotFound(f"webhook {webhook_id} not found", code="webhook_not_found")
    return w


def get_webhook(ctx: RegistryContext, webhook_id: int) -> dict[str, Any]:
    with ctx.db.read() as s:
        return webhook_view(_webhook(s, webhook_id))


def update_webhook(ctx: RegistryContext, webhook_id: int, *, url: str | None = None, events: list[str] | None = None,
                   active: bool | None = None, description: str | None = None) -> dict[str, Any]:
    patterns = check_patterns(events) if events is not None else None
    if url is not None:
        _check_url(ctx, url)
    if description is not None and (not isinstance(description, str) or len(description) > 2000):
        raise InvalidInput("description must be at most 2000 characters", code="invalid_parameter")
    with ctx.db.write() as s:
        w = _webhook(s, webhook_id, lock=True)
        if url is not None:
            w.url = url
        if patterns is not None:
            w.events = patterns
        if active is not None:
            w.active = bool(active)
        if description is not None:
            w.description = description
        s.flush()
        return webhook_view(w)


def delete_webhook(ctx: RegistryContext, webhook_id: int) -> None:
    """Delete a webhook and its delivery log; its queued deliveries are dropped."""
    with ctx.db.write() as s:
        w = _webhook(s, webhook_id, lock=True)
        s.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == w.id))
        s.delete(w)


# --------------------------------------------------------------------------- deliveries


def delivery_view(d: WebhookDelivery, event_type: str | None, with_log: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": d.id, "webhook_id": d.webhook_id, "event_id": d.event_id, "event_type": event_type,
        "status": d.status, "attempts": d.attempts, "last_status_code": d.last_status_code,
        "last_error": d.last_error, "next_attempt_at": d.next_attempt_at, "created_at": d.created_at,
        "delivered_at": d.delivered_at}
    if with_log:
        out["log"] = list(d.log or [])
    return out


def list_deliveries(ctx: RegistryContext, webhook_id: int, status: str | None = None, limit: int = 50,
                    cursor: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """A webhook's deliveries, newest first (keyset pagination on the id)."""
    check_limit(limit)
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(DELIVERY_STATUSES)}", code="invalid_parameter")
    with ctx.db.read() as s:
        _webhook(s, webhook_id)
        q = (select(WebhookDelivery, Event.type).outerjoin(Event, Event.id == WebhookDelivery.event_id)
             .where(WebhookDelivery.webhook_id == webhook_id))
        if status:
            q = q.where(WebhookDelivery.status == status)
        rows, more = newest_first(s, q, WebhookDelivery.id, limit, cursor, entities=False)
        return [delivery_view(d, t) for d, t in rows], (rows[-1][0].id if more else None)


def get_delivery(ctx: RegistryContext, delivery_id: int) -> dict[str, Any]:
    """One delivery with its per-attempt log."""
    with ctx.db.read() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None:
            raise NotFound(f"delivery {delivery_id} not found", code="delivery_not_found")
        return delivery_view(d, s.scalar(select(Event.type).where(Event.id == d.event_id)), with_log=True)


def _original_key(d: WebhookDelivery) -> str:
    return f"webhook:{d.webhook_id}:event:{d.event_id}"


def _redeliver_prefix(d: WebhookDelivery) -> str:
    # (webhook, event) names a delivery for good; SQLite may reuse the ids of deleted rows
    return f"webhook-redeliver:{d.webhook_id}:event:{d.event_id}:"


def _job_params(d: WebhookDelivery) -> WebhookParams:
    return WebhookParams(delivery_id=d.id, webhook_id=d.webhook_id, event_id=d.event_id)


def redeliver(ctx: RegistryContext, delivery_id: int, actor: str | None = None) -> dict[str, Any]:
    """Send a delivery again, now: the delivery goes back to ``pending`` (same id, so the
    ``X-Registry-Delivery`` header repeats; its log keeps the earlier attempts) and a new job
    with a fresh attempt budget delivers it. 409 while a job for it is still queued or running."""
    with ctx.db.write() as s:
        d = s.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update())
        if d is None:
            raise NotFound(f"delivery {delivery_id} not found", code="delivery_not_found")
        w = _webhook(s, d.webhook_id)
        if not w.active:
            raise Conflict(f"webhook {w.id} is inactive; activate it before redelivering", code="webhook_inactive")
        prefix = _redeliver_prefix(d)
        keyed = (Job.idempotency_key == _original_key(d)) | Job.idempotency_key.startswith(prefix, autoescape=True)
        busy = s.scalar(select(Job.id).where(Job.type == "webhook", keyed,
                                             Job.state.in_([JobState.queued.value, JobState.running.value])).limit(1))
        if busy is not None:
            raise Conflict(f"delivery {d.id} is in progress (job {busy}); wait for it to finish",
                           code="delivery_in_progress", details={"job_id": busy})
        n = 1 + (s.scalar(select(func.count()).select_from(Job).where(
            Job.idempotency_key.startswith(prefix, autoescape=True))) or 0)
        job, _ = jobs.create(s, _job_params(d), settings=ctx.settings, idempotency_key=f"{prefix}{n}",
                             created_by=actor, event_id=d.event_id, max_attempts=ctx.settings.webhook_max_attempts)
        d.status = "pending"
        d.next_attempt_at = None
        d.delivered_at = None
        s.flush()
        out = {"delivery": delivery_view(d, s.scalar(select(Event.type).where(Event.id == d.event_id))),
               "job": jobs.job_view(job)}
    jobs.send(ctx, [out["job"]["id"]])
    return out


# --------------------------------------------------------------------------- dispatch and delivery


def _about_webhook_job(ev: Event) -> bool:
    return ev.type.startswith("job.") and (ev.payload or {}).get("job_type") == "webhook"


@subscriber
def on_event(s: Session, ev: Event, settings: Settings) -> list[Job]:
    if _about_webhook_job(ev):
        return []
    out: list[Job] = []
    for w in s.scalars(select(Webhook).where(Webhook.active.is_(True)).order_by(Webhook.id)):
        if not any(fnmatch.fnmatchcase(ev.type, p) for p in w.events or []):
            continue
        key = f"webhook:{w.id}:event:{ev.id}"
        if s.scalar(select(Job.id).where(Job.idempotency_key == key)) is not None:
            continue  # dispatched before (a pass that crashed after creating it)
        d = WebhookDelivery(webhook_id=w.id, event_id=ev.id, status="pending", attempts=0, log=[])
        s.add(d)
        s.flush()
        job, created = jobs.create(s, _job_params(d), settings=settings, idempotency_key=key,
                                   event_id=ev.id, max_attempts=settings.webhook_max_attempts)
        if created:
            out.append(job)
    return out


def event_body(ev: Event) -> bytes:
    """The exact bytes POSTed for an event (compact JSON, sorted keys)."""
    doc = {"id": ev.id, "type": ev.type, "created_at": ev.created_at.isoformat() if ev.created_at else None,
           "model": ev.model_name, "version_id": ev.version_id, "payload": ev.payload or {}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def backoff_delay(settings: Settings, attempt: int) -> float:
    return float(min(MAX_BACKOFF_SECONDS, settings.webhook_backoff_seconds * 2 ** max(0, attempt - 1)))


def _post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> tuple[int, str]:
    """POST once (SSRF check, pinned address, no redirects); returns (status, start of the response
    body). Only the first few KiB of the response are read."""
    target = resolve_target(url, settings.webhook_allow_private)
    u = httpx.URL(url)
    extensions: dict[str, Any] = {}
    if target and _literal(u.raw_host.decode("ascii")) is None:
        # connect to the address that passed the check; Host and TLS SNI/verification keep the name
        headers = {**headers, "Host": u.netloc.decode("ascii")}
        if u.scheme == "https":
            extensions["sni_hostname"] = u.raw_host.decode("ascii")
        u = u.copy_with(host=str(target[0]))
    with (httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False) as http,
          http.stream("POST", u, content=body, headers=headers, extensions=extensions) as r):
        head = b""
        for chunk in r.iter_bytes():
            head += chunk
            if len(head) >= 4 * RESPONSE_EXCERPT:
                break
        return r.status_code, head[:4 * RESPONSE_EXCERPT].decode("utf-8", "replace")[:RESPONSE_EXCERPT]


def deliver(run: JobRun[WebhookParams]) -> dict[str, Any]:
    """The ``webhook`` job."""
    ctx, settings, prm = run.ctx, run.ctx.settings, run.params
    delivery_id = prm.delivery_id
    with ctx.db.read() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or (d.webhook_id, d.event_id) != (d.webhook_id if prm.webhook_id is None else prm.webhook_id,
                                                       d.event_id if prm.event_id is None else prm.event_id):
            # deleted with its webhook (the id may since have been reused by another delivery)
            return {"delivery_id": delivery_id, "skipped": "delivery no longer exists"}
        w = s.get(Webhook, d.webhook_id)
        ev = s.get(Event, d.event_id)
        max_attempts = s.scalar(select(Job.max_attempts).where(Job.id == run.job_id)) or 1
        if w is None or ev is None:
            return {"delivery_id": delivery_id, "skipped": "webhook or event no longer exists"}
        url, secret, active, event_type, event_id, webhook_id = w.url, w.secret, w.active, ev.type, ev.id, w.id
        scheme = w.signature_scheme
        body = event_body(ev)
    if not active:  # deactivated after the event: not sent, not counted as an attempt
        with ctx.db.write() as s:
            d = s.get(WebhookDelivery, delivery_id)
            if d is not None:
                d.status, d.last_error, d.next_attempt_at = "failed", "webhook is inactive", None
        return {"delivery_id": delivery_id, "skipped": "webhook is inactive"}

    headers = delivery_headers(scheme, secret, webhook_id=webhook_id, delivery_id=delivery_id, event_id=event_id,
                               event_type=event_type, body=body, timestamp=int(time.time()))
    started = time.monotonic()
    entry: dict[str, Any] = {"job_id": run.job_id, "job_attempt": run.attempt, "url": url}
    try:
        code, excerpt = _post(url, body, headers, settings)
    except InvalidInput as e:  # refused by the SSRF guard (or the URL went bad): not retried
        if e.code == "webhook_target_unresolvable":
            entry.update(error=e.message, duration_ms=_ms(started))
        else:
            entry.update(error=e.message, code=e.code, duration_ms=_ms(started))
            _record(ctx, delivery_id, entry, final=True)
            raise
    except httpx.HTTPError as e:
        entry.update(error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, duration_ms=_ms(started))
    else:
        entry.update(status_code=code, duration_ms=_ms(started), response=excerpt)
        if 200 <= code < 300:
            result = {"delivery_id": delivery_id, "status_code": code, "event_id": event_id,
                      "webhook_id": webhook_id}
            with ctx.db.write() as s:
                _apply(s, delivery_id, entry, status="succeeded")
                run.complete(s, result)
            return result
        entry["error"] = f"HTTP {code}"

    final = run.attempt >= max_attempts
    delay = backoff_delay(settings, run.attempt)
    _record(ctx, delivery_id, entry, final=final, retry_in=None if final else delay)
    raise jobs.RetryLater(f"delivery {delivery_id} attempt {run.attempt}: {entry.get('error', 'error')}", delay=delay)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _record(ctx: RegistryContext, delivery_id: int, entry: dict[str, Any], *, final: bool,
            retry_in: float | None = None) -> None:
    with ctx.db.write() as s:
        _apply(s, delivery_id, entry, status="failed" if final else "pending", retry_in=retry_in)


def _apply(s: Session, delivery_id: int, entry: dict[str, Any], *, status: str, retry_in: float | None = None) -> None:
    d = s.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update())
    if d is None:
        return
    now = utcnow()
    d.attempts = (d.attempts or 0) + 1
    entry = {"attempt": d.attempts, "at": now.isoformat(), **entry}
    d.log = [*(d.log or []), entry][-MAX_LOG_ENTRIES:]
    d.status = status
    d.last_status_code = entry.get("status_code")
    d.last_error = entry.get("error")
    if status == "succeeded":
        d.delivered_at = now
        d.next_attempt_at = None
    else:
        d.next_attempt_at = now + timedelta(seconds=retry_in) if retry_in is not None else None
