"""Webhooks in process: subscriptions, the dispatcher's subscriber creating one delivery and one job
per matching event, delivery to a receiver on this machine (signed), retries with backoff,
redelivery, deactivation and deletion.

The receiver is a small HTTP server on a thread of this process. ``tests/test_webhooks.py`` stays
for deliveries through real workers and the server's API.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from registry.errors import Conflict, InvalidInput, NotFound
from registry.models import utcnow
from registry.services import webhooks

from .inproc import InProcess

pytestmark = pytest.mark.services


@dataclass
class Receiver:
    url: str
    status: int = 204
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            rec.requests.append(({k: v for k, v in self.headers.items()}, body))
            self.send_response(rec.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def _hook(reg: InProcess, url: str, events: list[str], **kw: Any) -> dict[str, Any]:
    reg.ctx.settings.webhook_allow_private = True  # the receiver listens on loopback
    return webhooks.create_webhook(reg.ctx, url, events, **kw)


def _deliveries(reg: InProcess, webhook_id: int) -> list[dict[str, Any]]:
    rows, _ = webhooks.list_deliveries(reg.ctx, webhook_id)
    return sorted(rows, key=lambda d: d["id"])


def test_targets_and_patterns_are_checked(reg: InProcess) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://[::1]/hook"):
        with pytest.raises(InvalidInput) as e:
            webhooks.create_webhook(reg.ctx, url, ["*"])
        assert e.value.code == "webhook_target_refused"
    with pytest.raises(InvalidInput) as e:
        webhooks.create_webhook(reg.ctx, "https://93.184.215.14/hook", [])
    assert e.value.code == "invalid_webhook_events"
    with pytest.raises(InvalidInput) as e:
        webhooks.create_webhook(reg.ctx, "https://93.184.215.14/hook", ["*"], secret="short")
    assert e.value.code == "invalid_webhook_secret"
    w = webhooks.create_webhook(reg.ctx, "https://93.184.215.14/hook", ["version.*", "version.*"])
    assert w["events"] == ["version.*"] and w["secret"].startswith("whsec_")
    assert "secret" not in webhooks.list_webhooks(reg.ctx)[0]  # shown once, at creation


def test_matching_events_create_one_delivery_and_job_each(reg: InProcess) -> None:
    versions_hook = _hook(reg, "http://127.0.0.1:9/a", ["version.*"])
    alias_hook = _hook(reg, "http://127.0.0.1:9/b", ["alias.set"])
    off = _hook(reg, "http://127.0.0.1:9/c", ["*"])
    webhooks.update_webhook(reg.ctx, off["id"], active=False)
    reg.push_weights("m", 1, aliases=["prod"])  # version.created + alias.set
    reg.push_weights("m", 2)

    reg.dispatch()
    assert [d["event_type"] for d in _deliveries(reg, versions_hook["id"])] == ["version.created"] * 2
    assert [d["event_type"] for d in _deliveries(reg, alias_hook["id"])] == ["alias.set"]
    assert _deliveries(reg, off["id"]) == []
    hook_jobs = reg.jobs_of("webhook")
    assert len(hook_jobs) == 3 and all(j["state"] == "queued" for j in hook_jobs)
    assert all(j["idempotency_key"].startswith("webhook:") for j in hook_jobs)
    assert set(reg.sent) >= {j["id"] for j in hook_jobs}

    reg.dispatch()  # nothing new
    assert len(reg.jobs_of("webhook")) == 3


def test_delivery_is_signed_and_recorded(reg: InProcess, receiver: Receiver) -> None:
    w = _hook(reg, receiver.url, ["version.created"], secret="s" * 32)
    reg.push_weights("m", 1)
    reg.dispatch()
    outcomes = reg.run_sent(["webhook"])
    assert list(outcomes.values()) == ["succeeded"]

    (headers, body), = receiver.requests
    doc = json.loads(body)
    assert (doc["type"], doc["model"], doc["payload"]["ref"]) == ("version.created", "m", "m@1")
    assert headers["X-Registry-Event"] == "version.created"
    assert webhooks.verify_signature("s" * 32, headers["X-Registry-Timestamp"], body,
                                     headers["X-Registry-Signature"])
    assert not webhooks.verify_signature("t" * 32, headers["X-Registry-Timestamp"], body,
                                         headers["X-Registry-Signature"])
    d, = _deliveries(reg, w["id"])
    assert (d["status"], d["attempts"], d["last_status_code"]) == ("succeeded", 1, 204)
    assert headers["X-Registry-Delivery"] == str(d["id"])
    assert webhooks.get_delivery(reg.ctx, d["id"])["log"][0]["status_code"] == 204


def test_failed_delivery_is_retried_with_backoff_then_fails(reg: InProcess, receiver: Receiver) -> None:
    w = _hook(reg, receiver.url, ["version.created"])
    reg.ctx.settings.webhook_max_attempts = 2
    receiver.status = 500
    reg.push_weights("m", 1)
    reg.dispatch()
    (job_id, outcome), = reg.run_sent(["webhook"]).items()
    assert outcome == "queued"
    d, = _deliveries(reg, w["id"])
    assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == ("pending", 1, 500, "HTTP 500")
    assert 0 < (d["next_attempt_at"] - utcnow()).total_seconds() <= reg.ctx.settings.webhook_backoff_seconds
    assert reg.job(job_id)["error"]["code"] == "retry"

    reg.make_due(job_id)
    assert reg.run(job_id) == "failed"  # the last attempt
    d, = _deliveries(reg, w["id"])
    assert (d["status"], d["attempts"]) == ("failed", 2)
    assert len(receiver.requests) == 2
    # the failures are job.failed events about a webhook job: never delivered themselves
    reg.dispatch()
    assert len(reg.jobs_of("webhook")) == 1


def test_redeliver_sends_the_same_delivery_again(reg: InProcess, receiver: Receiver) -> None:
    w = _hook(reg, receiver.url, ["version.created"])
    reg.ctx.settings.webhook_max_attempts = 1
    receiver.status = 503
    reg.push_weights("m", 1)
    reg.dispatch()
    reg.run_sent(["webhook"])
    d, = _deliveries(reg, w["id"])
    assert d["status"] == "failed"

    receiver.status = 200
    out = webhooks.redeliver(reg.ctx, d["id"], actor="alice")
    assert out["delivery"]["status"] == "pending" and out["job"]["idempotency_key"].endswith(":1")
    with pytest.raises(Conflict) as e:
        webhooks.redeliver(reg.ctx, d["id"])  # its job has not run yet
    assert e.value.code == "delivery_in_progress"
    assert reg.run_sent(["webhook"]) == {out["job"]["id"]: "succeeded"}
    after = webhooks.get_delivery(reg.ctx, d["id"])
    assert (after["status"], after["attempts"], len(after["log"])) == ("succeeded", 2, 2)
    assert {h["X-Registry-Delivery"] for h, _ in receiver.requests} == {str(d["id"])}


def test_deactivated_or_deleted_webhook_sends_nothing(reg: InProcess, receiver: Receiver) -> None:
    paused = _hook(reg, receiver.url, ["version.created"])
    gone = _hook(reg, receiver.url, ["version.created"])
    reg.push_weights("m", 1)
    reg.dispatch()
    webhooks.update_webhook(reg.ctx, paused["id"], active=False)
    webhooks.delete_webhook(reg.ctx, gone["id"])
    results = {reg.job(j)["params"]["webhook_id"]: reg.job(j) for j in reg.run_sent(["webhook"])}
    assert results[paused["id"]]["result"]["skipped"] == "webhook is inactive"
    assert results[gone["id"]]["result"]["skipped"] == "delivery no longer exists"
    assert receiver.requests == []
    d, = _deliveries(reg, paused["id"])
    assert (d["status"], d["last_error"]) == ("failed", "webhook is inactive")
    with pytest.raises(Conflict) as e:
        webhooks.redeliver(reg.ctx, d["id"])
    assert e.value.code == "webhook_inactive"
    with pytest.raises(NotFound) as e2:
        webhooks.get_webhook(reg.ctx, gone["id"])
    assert e2.value.code == "webhook_not_found"


def test_private_target_is_refused_again_at_delivery(reg: InProcess, receiver: Receiver) -> None:
    w = _hook(reg, receiver.url, ["version.created"])
    reg.ctx.settings.webhook_allow_private = False  # the rule tightened after the webhook was made
    reg.push_weights("m", 1)
    reg.dispatch()
    (job_id, outcome), = reg.run_sent(["webhook"]).items()
    assert outcome == "failed" and reg.job(job_id)["error"]["code"] == "webhook_target_refused"
    d, = _deliveries(reg, w["id"])
    assert d["status"] == "failed" and receiver.requests == []


def test_events_listed_in_order(reg: InProcess) -> None:
    from registry.models import Event
    from registry.services.events import list_events

    reg.push_weights("m", 1, aliases=["prod"])
    events = list_events(reg.ctx)
    assert [e["type"] for e in events] == ["version.created", "alias.set"]
    assert list_events(reg.ctx, after=events[0]["id"])[0]["type"] == "alias.set"
    with reg.ctx.db.read() as s:
        assert s.scalar(select(Event.dispatched_at).where(Event.id == events[0]["id"])) is None
