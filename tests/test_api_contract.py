"""The API's contract at its edges: ids beyond 64 bits, who may touch a draft, and what the
OpenAPI schema promises (error statuses, the error body, the bearer scheme)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.demo import make_base

from .conftest import Server, make_server

BIG = 2**64  # beyond any integer column
MAX_ID = 2**31 - 1  # ids are INTEGER columns: 32-bit on PostgreSQL


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict[str, Any]:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- ids beyond 64 bits

# (method, path, json body): every operation taking an integer id in its path or query
ID_OPERATIONS = [
    ("GET", "/jobs/{id}", None),
    ("GET", "/bases/{id}", None),
    ("POST", "/bases/{id}/prune", {}),
    ("GET", "/deliveries/{id}", None),
    ("POST", "/deliveries/{id}/redeliver", None),
    ("DELETE", "/tokens/{id}", None),
    ("GET", "/webhooks/{id}", None),
    ("PATCH", "/webhooks/{id}", {}),
    ("DELETE", "/webhooks/{id}", None),
    ("GET", "/webhooks/{id}/deliveries", None),
    ("GET", "/events?after={id}", None),
    ("GET", "/versions?cursor={id}", None),
    ("GET", "/jobs?cursor={id}", None),
    ("GET", "/webhooks/1/deliveries?cursor={id}", None),
]


@pytest.mark.parametrize("value", [2**31, BIG, 2**63, 0, -1, 10**40])
def test_out_of_range_ids_are_4xx(server: Server, value: int) -> None:
    api = server.url + "/api/v1"
    with httpx.Client() as c:
        for method, path, body in ID_OPERATIONS:
            if value == 0 and "after=" in path:  # after=0: from the first event
                continue
            r = c.request(method, api + path.format(id=value), json=body)
            assert_error(r, (404, 422))


def test_largest_id_is_a_plain_not_found(server: Server) -> None:
    api = server.url + "/api/v1"
    for path in ("/jobs/{id}", "/bases/{id}", "/deliveries/{id}", "/webhooks/{id}"):
        assert_error(httpx.get(api + path.format(id=MAX_ID)), 404)
    assert httpx.get(api + f"/events?after={MAX_ID}").json() == {"items": []}
    assert httpx.get(api + f"/versions?cursor={MAX_ID}").status_code == 200


@pytest.mark.parametrize("cursor", ["abc", "²", "١٢", "1.5", "", "-3", "9" * 5000, str(2**31)])
def test_bad_int_cursors_are_422(sqlite_server: Server, cursor: str) -> None:
    api = sqlite_server.url + "/api/v1"
    for path in ("/versions", "/jobs", "/models/x/versions"):
        assert_error(httpx.get(api + path, params={"cursor": cursor}), 422)


def test_validation_errors_use_the_error_body(sqlite_server: Server) -> None:
    api = sqlite_server.url + "/api/v1"
    err = assert_error(httpx.get(api + "/jobs/notanumber"), 422, "invalid_request")
    assert err["details"]["errors"][0]["loc"] == ["path", "job_id"]
    assert_error(httpx.post(api + "/drafts", json={"kind": "base"}), 422, "invalid_request")
    assert_error(httpx.post(api + "/drafts", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_request")


def test_oversized_integers_in_bodies_are_4xx(sqlite_server: Server) -> None:
    api = sqlite_server.url + "/api/v1"
    assert_error(httpx.post(api + "/tokens", json={"name": "x", "scope": "read", "expires_days": BIG}), 422)
    assert_error(httpx.post(api + "/tokens", json={"name": "x", "scope": "read", "expires_days": 10**7}), 422)
    draft = httpx.post(api + "/drafts", json={"model": "contract-big-size", "kind": "base"}).json()
    assert_error(httpx.post(api + f"/drafts/{draft['id']}/uploads", json={"path": "a.bin", "size": BIG}), (413, 422))
    assert_error(httpx.post(api + f"/drafts/{draft['id']}/links",
                            json={"path": "a.bin", "sha256": "0" * 64, "size": BIG}), (404, 422))
    httpx.delete(api + f"/drafts/{draft['id']}")


# --------------------------------------------------------------------------- drafts belong to their creator


@pytest.fixture(scope="module")
def auth_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_AUTH="required")


@pytest.fixture(scope="module")
def people(auth_server: Server) -> dict[str, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "registry", "token", "create", "root", "--scope", "admin"],
                       env=auth_server.env, capture_output=True, text=True, check=True)
    admin = p.stdout.strip().splitlines()[-1]
    out = {"admin": admin}
    with auth_server.client(admin) as rc:
        for who, scope in (("alice", "write"), ("bob", "write"), ("reader", "read")):
            out[who] = rc.create_token(who, scope).token
    return out


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_draft_is_bound_to_its_creator(auth_server: Server, people: dict[str, str],
                                         tmp_path: Path) -> None:
    api = auth_server.url + "/api/v1"
    alice, bob, admin = _h(people["alice"]), _h(people["bob"]), _h(people["admin"])
    folder = make_base(tmp_path / "b", seed=7)
    data = (folder / "model.safetensors").read_bytes()
    r = httpx.post(api + "/drafts", json={"model": "owned-base", "kind": "base"}, headers=alice)
    assert r.status_code == 201, r.text
    did = r.json()["id"]
    up = httpx.post(api + f"/drafts/{did}/uploads", json={"path": "extra.safetensors", "size": len(data)},
                    headers=alice)
    assert up.status_code == 201, up.text
    uid = up.json()["id"]

    # bob: as if neither existed
    assert_error(httpx.get(api + f"/drafts/{did}", headers=bob), 404, "draft_not_found")
    assert_error(httpx.put(api + f"/drafts/{did}/files/model.safetensors", content=data, headers=bob),
                 404, "draft_not_found")
    assert_error(httpx.post(api + f"/drafts/{did}/links", json={"path": "x", "sha256": "0" * 64}, headers=bob),
                 404, "draft_not_found")
    assert_error(httpx.post(api + f"/drafts/{did}/uploads", json={"path": "y"}, headers=bob), 404, "draft_not_found")
    assert_error(httpx.post(api + f"/drafts/{did}/commit", headers=bob), 404, "draft_not_found")
    assert_error(httpx.delete(api + f"/drafts/{did}", headers=bob), 404, "draft_not_found")
    assert_error(httpx.get(api + f"/uploads/{uid}", headers=bob), 404, "upload_not_found")
    assert_error(httpx.patch(api + f"/uploads/{uid}", content=data, headers={**bob, "Upload-Offset": "0"}),
                 404, "upload_not_found")
    assert_error(httpx.post(api + f"/uploads/{uid}/commit", json={"sha256": "0" * 64}, headers=bob),
                 404, "upload_not_found")
    assert_error(httpx.delete(api + f"/uploads/{uid}", headers=bob), 404, "upload_not_found")

    # the creator, and an admin, see them
    assert httpx.get(api + f"/drafts/{did}", headers=alice).status_code == 200
    assert httpx.get(api + f"/drafts/{did}", headers=admin).status_code == 200
    assert httpx.get(api + f"/uploads/{uid}", headers=admin).json()["received"] == 0
    assert httpx.delete(api + f"/uploads/{uid}", headers=alice).status_code == 204
    r = httpx.put(api + f"/drafts/{did}/files/model.safetensors", content=data, headers=alice)
    assert r.status_code == 201, r.text
    r = httpx.post(api + f"/drafts/{did}/commit", headers=alice)
    assert r.status_code == 201, r.text
    assert r.json()["created_by"] == "alice"


def test_admin_may_abort_anyones_draft(auth_server: Server, people: dict[str, str]) -> None:
    api = auth_server.url + "/api/v1"
    did = httpx.post(api + "/drafts", json={"model": "owned-2"}, headers=_h(people["bob"])).json()["id"]
    assert httpx.delete(api + f"/drafts/{did}", headers=_h(people["admin"])).status_code == 204
    assert_error(httpx.get(api + f"/drafts/{did}", headers=_h(people["bob"])), 404, "draft_not_found")


def test_verify_needs_write(auth_server: Server, people: dict[str, str]) -> None:
    api = auth_server.url + "/api/v1"
    r = httpx.post(api + "/models/nope/versions/1/verify", headers=_h(people["reader"]))
    assert_error(r, 403, "insufficient_scope")
    r = httpx.post(api + "/models/nope/versions/1/verify", headers=_h(people["alice"]))
    assert_error(r, 404)


# --------------------------------------------------------------------------- the OpenAPI schema


def test_openapi_declares_errors_and_bearer(sqlite_server: Server) -> None:
    schema = httpx.get(sqlite_server.url + "/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values()), schemes
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_ref = "#/components/schemas/ErrorResponse"
    for path, item in schema["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            codes = op["responses"]
            errors = {c for c in codes if c.startswith(("4", "5"))}
            assert errors, f"{where} declares no error status"
            for c in errors:
                assert codes[c]["content"]["application/json"]["schema"] == {"$ref": error_ref}, (where, c)
            if path.endswith("/health"):
                continue
            assert op.get("security"), f"{where} declares no security"
            assert {"401", "403"} <= errors, where


def test_range_not_satisfiable_is_an_error_body(sqlite_server: Server, tmp_path: Path) -> None:
    folder = make_base(tmp_path / "b", seed=3)
    with sqlite_server.client() as rc:
        ref = rc.push(folder, "contract-range").ref
    size = (folder / "config.json").stat().st_size
    name, v = ref.split("@")
    r = httpx.get(f"{sqlite_server.url}/api/v1/models/{name}/versions/{v}/files/config.json",
                  headers={"Range": f"bytes={size}-"})
    assert_error(r, 416, "range_not_satisfiable")
    assert r.headers["content-range"] == f"bytes */{size}"
