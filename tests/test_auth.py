"""Bearer tokens with scopes, and the loopback rule for running without auth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from registry.client import Forbidden, RegistryAPIError

from .conftest import Server, make_server, server_env


@pytest.fixture(scope="module")
def auth_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_AUTH="required")


def _token(server: Server, scope: str, *extra: str) -> str:
    p = subprocess.run([sys.executable, "-m", "registry", "token", "create", f"t-{scope}", "--scope", scope, *extra],
                       env=server.env, capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tokens(auth_server: Server) -> dict[str, str]:
    return {s: _token(auth_server, s) for s in ("read", "write", "admin")}


def _err(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_missing_and_invalid_tokens(auth_server: Server) -> None:
    api = auth_server.url + "/api/v1"
    assert _err(httpx.get(api + "/versions")) == (401, "missing_token")
    assert _err(httpx.get(api + "/versions", headers={"Authorization": "Bearer rgt_nope"})) == (401, "invalid_token")
    assert _err(httpx.get(api + "/versions", headers={"Authorization": "Basic abc"})) == (401, "missing_token")
    assert httpx.get(api + "/health").status_code == 200  # health needs no token


def test_scopes(auth_server: Server, tokens: dict[str, str], demo: dict[str, Path], name: str) -> None:
    with auth_server.client(tokens["read"]) as ro:
        assert ro.search_versions().items is not None
        with pytest.raises(Forbidden) as e:
            ro.push(demo["base"], name)
        assert (e.value.status, e.value.code) == (403, "insufficient_scope")
        assert e.value.details == {"needed": "write", "has": "read"}
    with auth_server.client(tokens["write"]) as rw:
        v = rw.push(demo["base"], name)
        assert v.created_by == "t-write"
        with pytest.raises(RegistryAPIError) as e:
            rw.list_tokens()
        assert e.value.status == 403
    with auth_server.client(tokens["admin"]) as admin:
        t = admin.create_token("ci-bot", "write")
        assert t.token.startswith("rgt_") and t.scope == "write"
        assert admin.list_tokens()[0].token is None  # the secret only in the answer that creates it
        admin.revoke_token(t.id)
    r = httpx.get(auth_server.url + "/api/v1/versions", headers={"Authorization": f"Bearer {t.token}"})
    assert _err(r) == (401, "invalid_token")


def test_cli_uses_registry_token(auth_server: Server, tokens: dict[str, str], demo: dict[str, Path], name: str) -> None:
    denied = auth_server.cli("push", str(demo["adapter-sql"]), "--name", name, check=False)
    assert denied.returncode == 6 and "missing_token" in denied.stderr  # 6: authentication
    ok = auth_server.cli("ls", "--models", token=tokens["read"])
    assert ok.returncode == 0


def test_expired_token(auth_server: Server) -> None:
    from datetime import timedelta

    from sqlalchemy import create_engine, update

    from registry.models import ApiToken, utcnow

    secret = _token(auth_server, "read", "--expires-days", "1")
    engine = create_engine(auth_server.database_url)
    with engine.begin() as c:
        c.execute(update(ApiToken).where(ApiToken.name == "t-read", ApiToken.expires_at.is_not(None))
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    engine.dispose()
    r = httpx.get(auth_server.url + "/api/v1/versions", headers={"Authorization": f"Bearer {secret}"})
    assert _err(r) == (401, "token_expired")


def test_refuses_public_bind_without_auth(tmp_path: Path) -> None:
    env = server_env(tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
    p = subprocess.run([sys.executable, "-m", "registry", "up", "--host", "0.0.0.0", "--port", "1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "without authentication" in p.stderr


def test_loopback_guard_rejects_remote_peers(tmp_path: Path) -> None:
    """With auth off, a request from a non-loopback peer is refused even if the server is bound
    publicly by other means (here: the ASGI app driven with a fake remote client address)."""
    import asyncio

    from registry.api.app import LoopbackOnly

    sent: list[dict[str, object]] = []

    async def inner(scope: object, receive: object, send: object) -> None:
        raise AssertionError("must not reach the app")

    async def send(msg: dict[str, object]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "client": ("203.0.113.9", 5555), "method": "GET", "path": "/", "headers": []}
    asyncio.run(LoopbackOnly(inner)(scope, receive, send))
    assert sent[0]["status"] == 403
