"""The API's contract at its edges: ids beyond 64 bits, who may touch a draft, and what the
OpenAPI schema promises (error statuses, the error body, the bearer scheme)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import Server

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


@pytest.mark.parametrize("cursor", ["abc", "²", "١٢", "1.5", "", "-3"])
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
