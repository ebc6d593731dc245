"""Webhooks through real processes (API + dispatcher + Celery workers, embedded broker and Redis):
signed deliveries to a local HTTP receiver, retries with backoff, final failure, redelivery, event
pattern matching; and the SSRF guard, as a unit and through an API that refuses private targets."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from registry.client import Delivery, RegistryAPIError
from registry.client import InvalidInput as InvalidInputError
from registry.config import Settings
from registry.errors import InvalidInput
from registry.services import webhooks
from registry.services.webhooks import resolve_target, sign, verify_signature

from .conftest import Server, Stack, make_server, make_stack

# --------------------------------------------------------------------------- a local receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def key(self) -> str:
        return urlsplit(self.path).path.split("/")[2]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """POST /ok/KEY -> 200; /flaky/KEY?fail=N -> 500 N times, then 200; /down/KEY -> 500;
    /switch/KEY -> whatever ``modes[KEY]`` says (fail, ok, slow)."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    modes: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, key: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.key == key]

    def respond(self, path: str) -> int:
        parts = urlsplit(path)
        mode, key = parts.path.split("/")[1:3]
        if mode == "ok":
            return 200
        if mode == "flaky":
            fail = int(parse_qs(parts.query).get("fail", ["1"])[0])
            return 500 if len(self.of(key)) <= fail else 200
        if mode == "switch":
            m = self.modes.get(key, "fail")
            if m == "slow":
                time.sleep(1.5)
            return 500 if m == "fail" else 200
        return 500


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            code = rec.respond(self.path)
            payload = b'{"ok":true}' if code == 200 else b"receiver says no"
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    rec.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield rec
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", params=["sqla", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    """The conftest stack (private targets allowed, 0.2 s backoff) with 3 attempts per delivery and a
    third worker (every push also queues a provenance job that keeps a worker busy for seconds)."""
    return make_stack(request, tmp_path_factory, pg_databases, request.param, workers=3,
                      REGISTRY_WEBHOOK_MAX_ATTEMPTS="3")


def _delivery(stack: Stack, webhook_id: int, status: str | None = None) -> Delivery | None:
    with stack.client() as rc:
        rows = rc.list_deliveries(webhook_id)
    return next((d for d in rows if status is None or d.status == status), None)


# --------------------------------------------------------------------------- through the stack


def test_signed_delivery_of_a_new_version(stack: Stack, receiver: Receiver, demo: dict[str, Path],
                                          name: str) -> None:
    with stack.client() as rc:
        hook = rc.create_webhook(f"{receiver.url}/ok/{name}", ["version.*"], description="ci")
        secret = hook.secret
        assert secret.startswith("whsec_") and len(secret) > 40
        assert hook.active and hook.events == ["version.*"]
        try:
            assert all("secret" not in w.model_dump() for w in rc.list_webhooks())
            assert "secret" not in rc.get_webhook(hook.id).model_dump()
            v = rc.push(demo["base"], name)
            req = stack.wait_for(lambda: next(iter(receiver.of(name)), None), 60, "the webhook request")
            d = stack.wait_for(lambda: _delivery(stack, hook.id, "succeeded"), 30, "a succeeded delivery")
            detail = rc.get_delivery(d.id)
        finally:
            rc.delete_webhook(hook.id)

    h = req.headers
    assert h["content-type"] == "application/json"
    assert h["x-registry-event"] == "version.created"
    assert h["x-registry-delivery"] == str(d.id)
    assert h["x-registry-signature"].startswith("sha256=")
    assert verify_signature(secret, h["x-registry-timestamp"], req.body, h["x-registry-signature"])
    assert not verify_signature("whsec_wrong-secret-xxxxxxxx", h["x-registry-timestamp"], req.body,
                                h["x-registry-signature"])
    assert not verify_signature(secret, h["x-registry-timestamp"], req.body + b" ", h["x-registry-signature"])
    body = req.json()
    assert list(body) == sorted(body) and b", " not in req.body  # compact, stable key order
    assert body["type"] == "version.created" and body["model"] == name and body["version_id"] == v.id
    assert body["payload"]["ref"] == f"{name}@1" and body["payload"]["kind"] == "base"
    assert body["id"] == d.event_id and body["created_at"]

    assert detail.status == "succeeded" and detail.attempts == 1 and detail.event_type == "version.created"
    assert detail.last_status_code == 200 and detail.delivered_at and detail.next_attempt_at is None
    (entry,) = detail.log
    assert entry["attempt"] == 1 and entry["status_code"] == 200 and entry["duration_ms"] >= 0
    assert len(receiver.of(name)) == 1  # other events of this model (model.created...) did not match
    assert not {"webhook-id", "webhook-signature", "webhook-timestamp"} & set(h)  # the default scheme only


def test_standard_webhooks_delivery_passes_the_reference_verifier(stack: Stack, receiver: Receiver,
                                                                   demo: dict[str, Path], name: str) -> None:
    """A webhook with signature_scheme standard-webhooks: the standardwebhooks package (the
    specification's reference verifier) accepts every attempt of its delivery, and the message id
    stays the same across retries."""
    from standardwebhooks.webhooks import Webhook as Verifier
    from standardwebhooks.webhooks import WebhookVerificationError

    with stack.client() as rc:
        hook = rc.create_webhook(f"{receiver.url}/flaky/{name}?fail=1", ["version.created"],
                                 signature_scheme="standard-webhooks")
        try:
            assert hook.signature_scheme == "standard-webhooks" and hook.secret.startswith("whsec_")
            assert rc.get_webhook(hook.id).signature_scheme == "standard-webhooks"
            v = rc.push(demo["base"], name)
            d = stack.wait_for(lambda: _delivery(stack, hook.id, "succeeded"), 60, "a delivery after one retry")
        finally:
            rc.delete_webhook(hook.id)
    reqs = receiver.of(name)
    assert len(reqs) == 2  # a 500, then the retry
    for req in reqs:
        h = req.headers
        assert h["webhook-id"] == f"msg_{hook.id}_{d.event_id}" and h["webhook-signature"].startswith("v1,")
        assert int(h["webhook-timestamp"]) > 0 and h["x-registry-event"] == "version.created"
        assert "x-registry-signature" not in h
        body = Verifier(hook.secret).verify(req.body, h)  # raises unless the signature is the spec's
        assert body["version_id"] == v.id and body["payload"]["ref"] == f"{name}@1"
        with pytest.raises(WebhookVerificationError):
            Verifier(hook.secret).verify(req.body + b" ", h)
        other = "whsec_" + base64.b64encode(b"another secret of 24+ bytes!").decode()
        with pytest.raises(WebhookVerificationError):
            Verifier(other).verify(req.body, h)


def test_standard_webhooks_secret_rules(stack: Stack, receiver: Receiver, name: str) -> None:
    """A standard-webhooks secret is whsec_ + base64 of 24-64 bytes (given or generated); anything
    else, or an unknown scheme, is a 422 and no webhook."""
    mine = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    url = f"{receiver.url}/ok/{name}"
    with stack.client() as rc:
        before = {w.id for w in rc.list_webhooks()}
        for secret, scheme, code in ((None, "hmac-md5", "invalid_signature_scheme"),
                                     ("s" * 20, "standard-webhooks", "invalid_webhook_secret"),
                                     ("whsec_not base64!", "standard-webhooks", "invalid_webhook_secret"),
                                     ("whsec_" + base64.b64encode(b"short").decode(), "standard-webhooks",
                                      "invalid_webhook_secret"),
                                     ("whsec_" + base64.b64encode(bytes(65)).decode(), "standard-webhooks",
                                      "invalid_webhook_secret")):
            with pytest.raises(InvalidInputError) as e:
                rc.create_webhook(url, ["*"], secret=secret, signature_scheme=scheme)
            assert e.value.code == code, (secret, scheme)
        assert {w.id for w in rc.list_webhooks()} == before
        hook = rc.create_webhook(url, ["*"], secret=mine, signature_scheme="standard-webhooks")
        rc.delete_webhook(hook.id)
    assert hook.secret == mine
    p = stack.server.cli("webhook", "create", url, "-e", "*", "--signature-scheme", "standard-webhooks", "--json")
    created = json.loads(p.stdout)
    assert created["signature_scheme"] == "standard-webhooks" and created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 32
    stack.server.cli("webhook", "rm", str(created["id"]))


def test_failing_receiver_is_retried_until_it_succeeds(stack: Stack, receiver: Receiver, demo: dict[str, Path],
                                                       name: str) -> None:
    with stack.client() as rc:
        hook = rc.create_webhook(f"{receiver.url}/flaky/{name}?fail=2", ["version.created"])
        try:
            rc.push(demo["base"], name)
            d = stack.wait_for(lambda: _delivery(stack, hook.id, "succeeded"), 60, "a delivery after retries")
            detail = rc.get_delivery(d.id)
        finally:
            rc.delete_webhook(hook.id)
    assert detail.attempts == 3
    assert [e["status_code"] for e in detail.log] == [500, 500, 200]
    assert [e["attempt"] for e in detail.log] == [1, 2, 3]
    assert detail.log[0]["error"] == "HTTP 500" and detail.log[0]["response"] == "receiver says no"
    reqs = receiver.of(name)
    assert len(reqs) == 3
    assert {r.headers["x-registry-delivery"] for r in reqs} == {str(d.id)}
    assert {r.body for r in reqs} == {reqs[0].body}  # the same bytes every time; each freshly signed
    for r in reqs:
        assert verify_signature(hook.secret, r.headers["x-registry-timestamp"], r.body,
                                r.headers["x-registry-signature"])


def test_failed_delivery_then_redeliver(stack: Stack, receiver: Receiver, demo: dict[str, Path], name: str) -> None:
    receiver.modes[name] = "fail"
    with stack.client() as rc:
        hook = rc.create_webhook(f"{receiver.url}/switch/{name}", ["version.created"])
        try:
            rc.push(demo["base"], name)
            d = stack.wait_for(lambda: _delivery(stack, hook.id, "failed"), 60, "a failed delivery")
            failed = rc.get_delivery(d.id)
            assert failed.attempts == 3 and [e["status_code"] for e in failed.log] == [500, 500, 500]
            assert failed.last_status_code == 500 and failed.next_attempt_at is None
            job = rc.list_jobs(type="webhook", limit=200)
            (j,) = [j for j in job if j.params == {"delivery_id": d.id, "webhook_id": hook.id,
                                                      "event_id": d.event_id}]
            assert j.state == "failed" and j.attempts == 3

            receiver.modes[name] = "slow"
            again = rc.redeliver(d.id)
            assert again.delivery.status == "pending" and again.job.id != j.id
            with pytest.raises(RegistryAPIError) as e:
                rc.redeliver(d.id)  # the first redelivery is still queued or running
            assert e.value.status == 409 and e.value.code == "delivery_in_progress"
            stack.wait_job(again.job.id, 60)
            done = rc.get_delivery(d.id)
            with pytest.raises(RegistryAPIError) as e:
                rc.redeliver(10**9)
            assert e.value.status == 404
        finally:
            rc.delete_webhook(hook.id)
    assert done.status == "succeeded" and done.attempts == 4
    assert [e["status_code"] for e in done.log] == [500, 500, 500, 200]
    assert done.log[-1]["job_id"] == again.job.id
    reqs = receiver.of(name)
    assert len(reqs) == 4 and {r.headers["x-registry-delivery"] for r in reqs} == {str(d.id)}
    assert reqs[-1].body == reqs[0].body


def _emit(stack: Stack, type_: str, **payload: Any) -> int:
    """Write an event into the stack's outbox, as a job finishing would."""
    from registry.db import Database
    from registry.services.events import emit

    db = Database(stack.server.database_url)
    try:
        with db.write() as s:
            ev = emit(s, type_, **payload)
            s.flush()
            return ev.id
    finally:
        db.dispose()


def test_patterns_select_events(stack: Stack, receiver: Receiver, demo: dict[str, Path], name: str) -> None:
    jobs_key, versions_key = f"{name}-jobs", f"{name}-versions"
    with stack.client() as rc:
        job_hook = rc.create_webhook(f"{receiver.url}/ok/{jobs_key}", ["job.*"])
        version_hook = rc.create_webhook(f"{receiver.url}/ok/{versions_key}", ["version.created", "alias.*"])
        try:
            v1 = rc.push(demo["base"], name)
            v2 = rc.push(demo["base-v2"], name, aliases=["production"])
            # a delivery job's own outcome event, then another job's; events go out in id order, so
            # once the second arrives the first was dispatched too
            loop = _emit(stack, "job.succeeded", job_id=0, job_type="webhook", result={"delivery_id": 0})
            other = _emit(stack, "job.failed", job_id=0, job_type="transfer", error={"code": "x", "message": name})
            stack.wait_for(lambda: any(r.json()["id"] == other for r in receiver.of(jobs_key)), 60,
                           "the job event at the job.* webhook")
            stack.wait_for(lambda: len(receiver.of(versions_key)) == 3, 60, "both versions and the alias")
        finally:
            rc.delete_webhook(job_hook.id)
            rc.delete_webhook(version_hook.id)
    job_bodies = [r.json() for r in receiver.of(jobs_key)]
    assert all(b["type"] in ("job.succeeded", "job.failed") for b in job_bodies)  # no version or alias events
    assert loop not in {b["id"] for b in job_bodies}
    assert all(b["payload"]["job_type"] != "webhook" for b in job_bodies)  # deliveries never feed on themselves
    (failed,) = [b for b in job_bodies if b["id"] == other]
    assert failed["payload"] == {"job_id": 0, "job_type": "transfer", "error": {"code": "x", "message": name}}
    version_types = sorted(r.json()["type"] for r in receiver.of(versions_key))
    assert version_types == ["alias.set", "version.created", "version.created"]
    assert {r.json()["version_id"] for r in receiver.of(versions_key)} == {v1.id, v2.id}


def test_cli_and_updates(stack: Stack, receiver: Receiver, demo: dict[str, Path], name: str) -> None:
    p = stack.server.cli("webhook", "create", f"{receiver.url}/ok/{name}", "--event", "version.*", "-e", "alias.set",
                         "--secret", "s" * 20)
    assert "secret: " + "s" * 20 in p.stdout
    with stack.client() as rc:
        (hook,) = [w for w in rc.list_webhooks() if w.url.endswith(f"/ok/{name}")]
        assert hook.events == ["version.*", "alias.set"]
        assert rc.update_webhook(hook.id, active=False).active is False
        with pytest.raises(RegistryAPIError) as e:
            rc.update_webhook(hook.id, events=[])
        assert e.value.status == 422 and e.value.code == "invalid_webhook_events"
        v = rc.push(demo["base"], name)
        # once its provenance job exists, version.created went through the dispatcher (while inactive)
        stack.wait_for(lambda: any(j.params.get("version_id") == v.id
                                   for j in rc.list_jobs(type="mlflow_sync", limit=200)), 60, "dispatch")
        rc.update_webhook(hook.id, active=True)
        rc.set_alias(name, "stable", 1)
        stack.wait_for(lambda: _delivery(stack, hook.id, "succeeded"), 60, "the alias delivery")
    assert [r.json()["type"] for r in receiver.of(name)] == ["alias.set"]  # inactive: version.created skipped
    listed = json.loads(stack.server.cli("webhook", "ls", "--json").stdout)
    assert [w["url"] for w in listed if w["id"] == hook.id] == [f"{receiver.url}/ok/{name}"]
    assert all("secret" not in w for w in listed)
    (d,) = json.loads(stack.server.cli("webhook", "deliveries", str(hook.id), "--json").stdout)
    assert d["event_type"] == "alias.set" and d["status"] == "succeeded"
    stack.server.cli("webhook", "rm", str(hook.id))
    with stack.client() as rc, pytest.raises(RegistryAPIError) as e:
        rc.get_webhook(hook.id)
    assert e.value.status == 404 and e.value.code == "webhook_not_found"


# --------------------------------------------------------------------------- SSRF guard and signatures


def _no_dns(*args: Any, **kw: Any) -> Any:
    raise AssertionError("an IP literal must not need DNS")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.8.9.10:9000/", "http://[::1]/", "http://10.1.2.3/", "http://172.16.0.1/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/", "http://240.0.0.1/", "http://100.64.0.1/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/", "https://[::ffff:a9fe:a9fe]/",
])
def test_ssrf_guard_refuses_private_literals(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    with pytest.raises(InvalidInput) as e:
        resolve_target(url, allow_private=False)
    assert e.value.code == "webhook_target_refused" and e.value.status == 422
    assert resolve_target(url, allow_private=True)  # the setting lifts the guard


def test_ssrf_guard_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    for url in ("http://93.184.216.34/hook", "https://93.184.216.34:8443/x?y=1",
                "http://[2606:2800:220:1:248:1893:25c8:1946]/"):
        assert [str(a) for a in resolve_target(url, allow_private=False)] == [urlsplit(url).hostname]
    for url in ("http://localhost:8080/", "http://LOCALHOST./", "http://api.localhost/"):
        with pytest.raises(InvalidInput) as e:
            resolve_target(url, allow_private=False)
        assert e.value.code == "webhook_target_refused"

    answers = {"public.example": ["93.184.216.34"], "rebind.example": ["10.0.0.7"],
               "mixed.example": ["93.184.216.34", "127.0.0.1"], "v6.example": ["::1"]}

    def fake_dns(host: str, port: Any, *args: Any, **kw: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    assert [str(a) for a in resolve_target("https://public.example/hook", False)] == ["93.184.216.34"]
    for host in ("rebind.example", "mixed.example", "v6.example"):
        with pytest.raises(InvalidInput) as e:
            resolve_target(f"https://{host}/hook", False)
        assert e.value.code == "webhook_target_refused" and host in e.value.message
    with pytest.raises(InvalidInput) as e:
        resolve_target("https://nowhere.example/", False)
    assert e.value.code == "webhook_target_unresolvable"
    for bad in ("ftp://93.184.216.34/", "file:///etc/passwd", "93.184.216.34/hook", "http:///x",
                "http://user:pw@93.184.216.34/", "http://93.184.216.34/" + "a" * 2100):
        with pytest.raises(InvalidInput) as e:
            resolve_target(bad, False)
        assert e.value.code == "invalid_webhook_url", bad


def test_delivery_rechecks_and_pins_the_address(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = Settings(webhook_allow_private=False, webhook_timeout_seconds=5)
    headers = {"Content-Type": "application/json"}
    with pytest.raises(InvalidInput) as e:  # what passed at creation is checked again at delivery
        webhooks._post(f"{receiver.url}/ok/x", b"{}", headers, strict)
    assert e.value.code == "webhook_target_refused"
    assert not receiver.of("x")

    # a name that resolved to an allowed address is connected to by that address, with its own Host
    port = int(urlsplit(receiver.url).port or 0)
    key = uuid.uuid4().hex
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, p, *a, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))])
    monkeypatch.setattr(webhooks, "address_refused", lambda ip: None)
    assert webhooks._post(f"http://hooks.example.test:{port}/ok/{key}", b"{}", headers, strict) == (200, '{"ok":true}')
    (req,) = receiver.of(key)
    assert req.headers["host"] == f"hooks.example.test:{port}"


def test_signature_helpers() -> None:
    body = b'{"id":1,"type":"version.created"}'
    ts = int(time.time())
    sig = sign("k" * 16, ts, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature("k" * 16, ts, body, sig)
    assert verify_signature("k" * 16, str(ts), body.decode(), sig)
    assert not verify_signature("k" * 16, ts + 1, body, sig)
    assert not verify_signature("k" * 16, ts, body, sig.upper())
    assert not verify_signature("k" * 16, "not-a-number", body, sig)
    old = ts - 3600
    assert not verify_signature("k" * 16, old, body, sign("k" * 16, old, body))  # replayed
    assert verify_signature("k" * 16, old, body, sign("k" * 16, old, body), tolerance_seconds=7200)


def test_standard_signature_is_the_reference_signers() -> None:
    """sign_standard against the standardwebhooks package's signer and verifier (an independent
    implementation of the specification), over bodies of every byte and secrets of every size."""
    import random
    from datetime import UTC, datetime

    from standardwebhooks.webhooks import Webhook as Reference

    rng = random.Random(0)
    for n in (24, 32, 64):
        secret = "whsec_" + base64.b64encode(rng.randbytes(n)).decode()
        for size in (0, 1, 100, 5000):
            body = rng.randbytes(size)
            ts = rng.randrange(1, 2**32)
            msg = f"msg_{rng.randrange(1, 10**6)}_{rng.randrange(1, 10**6)}"
            assert webhooks.sign_standard(secret, msg, ts, body) == Reference(secret).sign(
                msg, datetime.fromtimestamp(ts, UTC), body)
    now = int(time.time())
    secret = "whsec_" + base64.b64encode(rng.randbytes(32)).decode()
    body = b'{"id":7,"type":"version.created"}'
    headers = webhooks.delivery_headers("standard-webhooks", secret, webhook_id=3, delivery_id=9, event_id=7,
                                        event_type="version.created", body=body, timestamp=now)
    assert headers["webhook-id"] == "msg_3_7" and headers["X-Registry-Delivery"] == "9"
    assert Reference(secret).verify(body, headers) == {"id": 7, "type": "version.created"}
    legacy = webhooks.delivery_headers("registry", "k" * 16, webhook_id=3, delivery_id=9, event_id=7,
                                       event_type="version.created", body=body, timestamp=now)
    assert verify_signature("k" * 16, legacy["X-Registry-Timestamp"], body, legacy["X-Registry-Signature"])
    assert "webhook-signature" not in legacy
    for bad in ("s" * 40, "whsec_", "whsec_!!!!", "whsec_" + base64.b64encode(bytes(23)).decode()):
        with pytest.raises(InvalidInput):
            webhooks.standard_key(bad)


@pytest.fixture(scope="module")
def strict_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  pg_databases: list[str]) -> Server:
    """An API server with the default settings: private webhook targets refused."""
    return make_server(request, tmp_path_factory, pg_databases, "sqlite")


def test_api_refuses_private_targets(strict_server: Server) -> None:
    api = strict_server.url + "/api/v1"
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://[::ffff:192.168.0.1]/", "http://10.0.0.1/"):
        r = httpx.post(api + "/webhooks", json={"url": url, "events": ["*"]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "webhook_target_refused"
    r = httpx.post(api + "/webhooks", json={"url": "gopher://93.184.216.34/", "events": ["*"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_webhook_url"
    r = httpx.post(api + "/webhooks", json={"url": "http://93.184.216.34/", "events": ["*"], "secret": "short"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_webhook_secret"
    r = httpx.post(api + "/webhooks", json={"url": "http://93.184.216.34/", "events": ["version created"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_webhook_events"

    r = httpx.post(api + "/webhooks", json={"url": "http://93.184.216.34/hook", "events": ["version.*"]})
    assert r.status_code == 201, r.text
    hook = r.json()
    assert hook["secret"]
    r = httpx.patch(api + f"/webhooks/{hook['id']}", json={"url": "http://169.254.169.254/"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_target_refused"
    assert httpx.get(api + f"/webhooks/{hook['id']}").json()["url"] == "http://93.184.216.34/hook"
    assert httpx.get(api + f"/webhooks/{hook['id']}/deliveries").json() == {"items": [], "next_cursor": None}
    assert httpx.get(api + "/deliveries/999999").json()["error"]["code"] == "delivery_not_found"
    assert httpx.delete(api + f"/webhooks/{hook['id']}").status_code == 204
    assert httpx.get(api + "/webhooks").json() == []
