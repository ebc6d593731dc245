"""The web UI and the offline API docs over plain HTTP (the browser tests are tests/test_ui_browser.py):
pages answer on loopback without auth and need a token otherwise, the cookie goes through the same
token check as the bearer header, page actions need write scope and the page's CSRF token, every
asset a page or the docs load is served by the registry itself, the vendored assets are the locked
npm packages, and the model list's filters and the update reports behave over the JSON API too."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.api.deps import COOKIE, CSRF_HEADER, csrf_token
from registry.ui import vendor

from .conftest import Server, Stack, free_port, make_server, make_stack, wait_until

ROOT_DIR = Path(__file__).resolve().parent.parent
ASSET = re.compile(r"""(?:src|href)=["']([^"'#]+)["']""")


def _err(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def _assets(html: str) -> list[str]:
    return [u for u in ASSET.findall(html) if not u.startswith(("?", "mailto:"))]


# --------------------------------------------------------------------------- loopback, no auth


def test_root_redirects_to_the_ui_and_pages_render(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        lora = rc.push(demo["adapter-sql"], f"{name}-lora", base=base.ref)
    r = httpx.get(server.url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    for path in ("/ui", "/ui/models", f"/ui/models/{name}-lora", f"/ui/models/{name}-lora/versions/1",
                 f"/ui/models/{name}-lora/versions/latest", "/ui/bases", "/ui/compressions", "/ui/jobs",
                 "/ui/webhooks"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200, (path, r.text[:500])
        assert r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
    page = httpx.get(server.url + f"/ui/models/{name}-lora/versions/1").text
    for f in lora.files:  # every file with its size, sha256 and a download link through the API
        assert f.sha256 in page and f"/api/v1/models/{name}-lora/versions/1/files/{f.path}" in page
    assert f'href="/ui/models/{name}-base/versions/1"' in page  # the base, a link
    listing = httpx.get(server.url + "/ui/models", params={"q": name}).text
    assert listing.index(f"{name}-lora") < listing.index(f"{name}-base")  # newest first
    first = httpx.get(server.url + "/ui/models", params={"q": name, "limit": 1}).text  # paginated
    assert f">{name}-lora<" in first and f">{name}-base<" not in first
    (more,) = re.findall(r'<a rel="next" href="([^"]+)"', first)
    second = httpx.get(server.url + "/ui/models" + more.replace("&amp;", "&")).text
    assert f">{name}-base<" in second and f">{name}-lora<" not in second and 'rel="next"' not in second


def test_every_asset_a_page_or_the_docs_loads_is_served_here(server: Server) -> None:
    """No CDN: /docs, /redoc and the pages reference only this server's paths, and each one answers."""
    seen = set()
    for path in ("/docs", "/redoc", "/ui/models", "/ui/jobs"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200, path
        urls = _assets(r.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), (path, urls)
        assert "googleapis" not in r.text and "cdn." not in r.text
        seen.update(urls)
    assert {"/ui/static/vendor/swagger-ui-bundle.js", "/ui/static/vendor/redoc.standalone.js",
            "/ui/static/vendor/htmx.min.js"} <= seen
    for url in seen - {"/ui/models", "/ui/jobs", "/docs", "/ui", "/ui/bases", "/ui/compressions", "/ui/webhooks"}:
        assert httpx.get(server.url + url).status_code == 200, url
    assert "/openapi.json" in httpx.get(server.url + "/docs").text


def test_ui_errors_are_pages_and_api_errors_stay_json(server: Server) -> None:
    r = httpx.get(server.url + "/ui/models/no-such-model")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "model_not_found" in r.text
    assert httpx.get(server.url + "/ui/no-such-page").status_code == 404
    r = httpx.get(server.url + "/ui/jobs/0")
    assert r.status_code == 422 and "invalid_request" in r.text
    r = httpx.get(server.url + "/ui/jobs", params={"cursor": "x"})
    assert r.status_code == 422 and "invalid_cursor" in r.text
    r = httpx.get(server.url + "/ui/models", params={"limit": 0})
    assert r.status_code == 422 and "invalid_limit" in r.text
    r = httpx.get(server.url + "/ui/models", params={"kind": "robot"})
    assert r.status_code == 422 and "invalid_kind" in r.text
    assert _err(httpx.get(server.url + "/api/v1/models/no-such-model")) == (404, "model_not_found")


def test_page_actions_on_loopback_need_the_csrf_header(server: Server, demo: dict[str, Path], name: str) -> None:
    """Without auth any local page could post to the server: an action needs the custom header a
    cross-site form cannot send, and a browser-marked cross-site request is refused outright."""
    with server.client() as rc:
        rc.push(demo["base"], name)
    url = server.url + f"/ui/models/{name}/aliases"
    r = httpx.post(url, data={"alias": "prod", "version": "1"})
    assert r.status_code == 403 and "csrf_failed" in r.text
    r = httpx.post(url, data={"alias": "prod", "version": "1"},
                   headers={CSRF_HEADER: csrf_token(None), "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "csrf_failed" in r.text
    with server.client() as rc:
        assert rc.list_aliases(name) == []
    r = httpx.post(url, data={"alias": "prod", "version": "1"}, headers={CSRF_HEADER: csrf_token(None)})
    assert r.status_code == 200 and f"{name}@prod → {name}@1" in r.text
    with server.client() as rc:
        assert [a.ref for a in rc.list_aliases(name)] == [f"{name}@1"]
    r = httpx.post(url, data={"alias": "Bad Alias!", "version": "1"}, headers={CSRF_HEADER: csrf_token(None)})
    assert r.status_code == 422 and "invalid_alias" in r.text  # the service's rule, as an HTML page
    r = httpx.post(server.url + f"/ui/models/{name}/versions/1/promote", headers={CSRF_HEADER: csrf_token(None)})
    assert r.status_code == 200  # a ready version: promoting is a no-op, as in the API


def test_login_is_not_needed_without_auth(server: Server) -> None:
    r = httpx.get(server.url + "/ui/login", params={"next": "/ui/jobs"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    r = httpx.get(server.url + "/ui/login", params={"next": "//evil.example/x"}, follow_redirects=False)
    assert r.headers["location"] == "/ui"  # only this site's UI is a redirect target


# --------------------------------------------------------------------------- the model list's filters (JSON API)


def test_models_newest_first_and_by_base(server: Server, demo: dict[str, Path], name: str) -> None:
    with server.client() as rc:
        base = rc.push(demo["base"], f"{name}-a-base")
        rc.push(demo["adapter-sql"], f"{name}-b-sql", base=base.ref)
        rc.push(demo["adapter-chat"], f"{name}-c-chat", base=base.ref)
        rc.push(demo["base-v2"], f"{name}-a-base")
    api = server.url + "/api/v1/models"
    page = httpx.get(api, params={"prefix": name, "order": "newest", "limit": 2}).json()
    assert [m["name"] for m in page["items"]] == [f"{name}-c-chat", f"{name}-b-sql"]
    rest = httpx.get(api, params={"prefix": name, "order": "newest", "cursor": page["next_cursor"]}).json()
    assert [m["name"] for m in rest["items"]] == [f"{name}-a-base"] and rest["next_cursor"] is None
    by_base = httpx.get(api, params={"prefix": name, "base": f"{name}-a-base@1"}).json()["items"]
    assert [m["name"] for m in by_base] == [f"{name}-b-sql", f"{name}-c-chat"]
    assert httpx.get(api, params={"prefix": name, "base": f"{name}-a-base@2"}).json()["items"] == []
    assert httpx.get(api, params={"base": f"{name}-nothing@1"}).json()["items"] == []  # matches nothing
    page = httpx.get(server.url + "/ui/models", params={"base": f"{name}-a-base@1"}).text
    assert f"{name}-b-sql" in page and f"{name}-c-chat" in page and f">{name}-a-base<" not in page


@pytest.mark.parametrize(("params", "code"), [
    ({"order": "oldest"}, "invalid_order"),
    ({"order": "newest", "cursor": "abc"}, "invalid_cursor"),
    ({"order": "newest", "cursor": "0"}, "invalid_cursor"),
    ({"base": "not a ref"}, "invalid_ref"),
])
def test_bad_model_list_parameters(server: Server, params: dict[str, str], code: str) -> None:
    assert _err(httpx.get(server.url + "/api/v1/models", params=params)) == (422, code)


def test_update_reports_of_a_version(server: Server, demo: dict[str, Path], name: str) -> None:
    """GET …/compat: the MUSCLE report of each same-model update a version takes part in (here v1 -> v2,
    an edge of the lineage), on each dataset both have predictions for; what the version page shows."""
    with server.client() as rc:
        rc.push(demo["base"], name)
        rc.push(demo["base-v2"], name, parents=[{"ref": f"{name}@1", "relation": "finetune_of"}])
        url = server.url + f"/api/v1/models/{name}/versions/1/compat"
        assert httpx.get(url).json() == []  # no predictions yet
        rc.store_predictions(f"{name}@1", "eval", predictions=[0, 1, 1, 0], labels=[0, 1, 0, 0])
        rc.store_predictions(f"{name}@2", "eval", predictions=[0, 1, 0, 1], labels=[0, 1, 0, 0])
        rc.store_predictions(f"{name}@2", "other", predictions=[1], labels=[1])  # only on one side
    (report,) = httpx.get(url).json()
    assert (report["old"], report["new"], report["dataset"], report["new_status"]) == (
        f"{name}@1", f"{name}@2", "eval", "ready")
    # by hand: v1 is right on 0, 1, 3 and v2 on 0, 1, 2 -> one negative flip (3), one positive (2) of 4
    assert (report["metrics"]["nfr"], report["metrics"]["pfr"]) == (0.25, 0.25)
    assert httpx.get(server.url + f"/api/v1/models/{name}/versions/2/compat").json() == [report]  # seen from v2
    page = httpx.get(server.url + f"/ui/models/{name}/versions/1").text
    assert f'href="/ui/models/{name}/versions/2"' in page and '<td class="num nfr">0.25</td>' in page
    assert _err(httpx.get(server.url + f"/api/v1/models/{name}/versions/9/compat")) == (404, "version_not_found")


# --------------------------------------------------------------------------- compressions (a worker runs the plans)


@pytest.fixture(scope="module")
def cstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1)


def _ref(pushed: Any) -> str:
    return str(pushed["ref"] if isinstance(pushed, dict) else pushed.ref)


def _job_result(stack: Stack, r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 202, r.text  # queued
    job = stack.wait_job(r.json()["id"], timeout=600)
    assert _field(job, "state") == "succeeded", job
    return dict(_field(job, "result"))


def _field(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def _cell(x: float, digits: int = 4) -> str:
    """How the pages print a metric (registry.api.routers.ui.number): 4 significant digits."""
    return f"{x:.{digits}g}"


def test_compression_pages(cstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    """A plan whose members are served from it, and one whose member is not (budget 0: the demo
    adapter is not rebuilt to its exact bytes): the list, the detail page (per member method,
    parameters, stored bytes, error and error as served, served from the plan or not; the plan's
    ratio), a member's plan_member_of edge and the plan version linking to the compression; the same
    numbers the JSON API gives, and the JSON list filtered by plan version."""
    from registry.demo import make_adapter

    api = cstack.url + "/api/v1"
    with cstack.client() as rc:
        base = _ref(rc.push(demo["base"], f"{name}-base"))
        folders = [demo["adapter-sql"], demo["adapter-chat"], make_adapter(tmp_path / "third", seed=3, init_seed=7)]
        refs = [_ref(rc.push(f, f"{name}-{i}", base=base)) for i, f in enumerate(folders)]
        exact = _ref(rc.push(demo["adapter-sql"], f"{name}-exact", base=base))
    served = _job_result(cstack, httpx.post(api + "/compressions", json={
        "members": refs, "max_error": 0.05, "name": f"{name}-plan", "collection": name, "prune": True}))
    assert _field(cstack.wait_job(served["prune_job_id"], timeout=600), "state") == "succeeded"
    kept = _job_result(cstack, httpx.post(api + "/compressions", json={
        "members": [exact], "max_error": 0, "name": f"{name}-plan0", "collection": name}))
    c = httpx.get(f"{api}/compressions/{served['compression_id']}").json()
    c0 = httpx.get(f"{api}/compressions/{kept['compression_id']}").json()
    assert all(m["pruned"] for m in c["members"]) and not c0["members"][0]["pruned"]
    assert not c0["members"][0]["prunable"]

    listing = httpx.get(cstack.url + "/ui/compressions", params={"collection": name}).text
    assert listing.index(f'id="compression-{c0["id"]}"') < listing.index(f'id="compression-{c["id"]}"')  # newest first
    assert f'href="/ui/compressions/{c["id"]}"' in listing
    assert f'<td class="num ratio">{_cell(c["ratio"], 3)}</td>' in listing
    assert "No compression plans" in httpx.get(cstack.url + "/ui/compressions", params={"collection": "none-such"}).text

    page = httpx.get(cstack.url + f"/ui/compressions/{c['id']}")
    assert page.status_code == 200 and 'aria-current="page">Compressions' in page.text
    html = page.text
    assert f'href="/ui/models/{name}-plan/versions/1"' in html and f'href="/ui/models/{name}-base/versions/1"' in html
    assert re.search(f'<dd id="storage-ratio"[^>]*>{re.escape(_cell(c["ratio"]))}</dd>', html)
    assert f'data-bytes="{c["stored_bytes"]}"' in html and f'data-bytes="{c["original_bytes"]}"' in html
    members = html.split('<table class="members">')[1].split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", members, re.S)
    assert len(rows) == len(refs)
    for m, row in zip(c["members"], rows, strict=True):
        assert f'href="/ui/models/{m["ref"].replace("@", "/versions/")}"' in row
        assert f"<td>{m['method']}</td>" in row and f'title="{m["stored_bytes"]} bytes"' in row
        assert f">{_cell(m['error'])}</td>" in row and f">{_cell(m['served_error'])}</td>" in row
        assert ">yes</span>" in row
        if m["parameters"]:
            assert "<details><summary>" in row
    row0 = httpx.get(cstack.url + f"/ui/compressions/{c0['id']}").text
    assert "no <span class=\"note\">(not within budget as served)</span>" in row0
    assert f">{_cell(c0['members'][0]['served_error'])}</td>" in row0

    # a member's plan_member_of edge and the plan version both link to the compression
    member = httpx.get(cstack.url + f"/ui/models/{name}-1/versions/1").text
    assert 'data-relation="plan_member_of"' in member and f'href="/ui/compressions/{c["id"]}"' in member
    plan = httpx.get(cstack.url + f"/ui/models/{name}-plan/versions/1").text
    assert f'<dd id="plan-of"><a href="/ui/compressions/{c["id"]}">' in plan
    assert "/ui/compressions/" not in httpx.get(cstack.url + f"/ui/models/{name}-base/versions/1").text.split(
        "<main>")[1]  # nothing to link for a version that is no plan and no member

    # the JSON list by plan version: the one plan, none for an unknown version, 422 for no ref
    assert [x["id"] for x in httpx.get(api + "/compressions", params={"version": f"{name}-plan@1"}).json()] == [c["id"]]
    assert httpx.get(api + "/compressions", params={"version": f"{name}-plan@9"}).json() == []
    assert httpx.get(api + "/compressions", params={"version": f"{name}-base@1"}).json() == []
    assert _err(httpx.get(api + "/compressions", params={"version": "not a ref!"})) == (422, "invalid_ref")

    # bad ids: the API's errors, as pages
    r = httpx.get(cstack.url + "/ui/compressions/999999")
    assert r.status_code == 404 and "compression_not_found" in r.text
    r = httpx.get(cstack.url + "/ui/compressions/0")
    assert r.status_code == 422 and "invalid_request" in r.text


# --------------------------------------------------------------------------- auth required: tokens and the cookie


@pytest.fixture(scope="module")
def auth_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_AUTH="required",
                       REGISTRY_WEBHOOK_ALLOW_PRIVATE="true")


@pytest.fixture(scope="module")
def tokens(auth_server: Server) -> dict[str, str]:
    def create(scope: str) -> str:
        p = subprocess.run([sys.executable, "-m", "registry", "token", "create", f"ui-{scope}", "--scope", scope],
                           env=auth_server.env, capture_output=True, text=True, check=True)
        return p.stdout.strip().splitlines()[-1]

    return {s: create(s) for s in ("read", "write", "admin")}


@contextmanager
def _login(server: Server, token: str) -> Iterator[httpx.Client]:
    """A client signed in through the form, as a browser is: it then holds only the cookie."""
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/ui/login", data={"token": token, "next": "/ui/jobs"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text[:300]
        yield http


def test_pages_need_a_token(auth_server: Server, tokens: dict[str, str]) -> None:
    r = httpx.get(auth_server.url + "/ui/models")
    assert r.status_code == 401 and 'name="token"' in r.text  # the sign-in form, coming back here
    assert 'name="next" value="/ui/models"' in r.text
    assert _err(httpx.get(auth_server.url + "/api/v1/models")) == (401, "missing_token")
    read = {"Authorization": f"Bearer {tokens['read']}"}
    assert httpx.get(auth_server.url + "/ui/models", headers=read).status_code == 200
    r = httpx.get(auth_server.url + "/ui/webhooks", headers=read)  # admin scope, as in the API
    assert r.status_code == 403 and "insufficient_scope" in r.text
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    assert httpx.get(auth_server.url + "/ui/webhooks", headers=admin).status_code == 200
    r = httpx.get(auth_server.url + "/ui/models", headers={"Authorization": "Bearer rgt_nope"})
    assert r.status_code == 401 and "invalid_token" in r.text
    assert httpx.get(auth_server.url + "/docs").status_code == 200  # the docs and assets are public
    assert httpx.get(auth_server.url + "/ui/static/ui.css").status_code == 200


def test_the_cookie_goes_through_the_token_check(auth_server: Server, tokens: dict[str, str],
                                                 demo: dict[str, Path], name: str) -> None:
    r = httpx.post(auth_server.url + "/ui/login", data={"token": "rgt_wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "invalid_token" in r.text and "set-cookie" not in r.headers
    r = httpx.post(auth_server.url + "/ui/login", data={"token": tokens["read"]}, follow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={tokens['read']};")
    assert {"httponly", "samesite=strict", "path=/"} <= {p.strip().lower() for p in cookie.split(";")}
    with _login(auth_server, tokens["read"]) as http:
        assert http.get("/ui/models").status_code == 200 and "ui-read" in http.get("/ui/models").text
        assert http.get("/api/v1/versions").status_code == 200  # the same rule serves the API (downloads)
        assert _err(http.post("/api/v1/models", json={"name": name, "kind": "base"}))[0] == 403
    with auth_server.client(tokens["write"]) as rc:
        rc.push(demo["base"], name)
    with _login(auth_server, tokens["write"]) as http:
        # an unsafe request the cookie authenticates needs the page's CSRF token
        body = {"version": "1"}
        assert _err(http.put(f"/api/v1/models/{name}/aliases/prod", json=body)) == (403, "csrf_failed")
        assert _err(http.put(f"/api/v1/models/{name}/aliases/prod", json=body,
                             headers={CSRF_HEADER: csrf_token(None)})) == (403, "csrf_failed")
        ok = http.put(f"/api/v1/models/{name}/aliases/prod", json=body,
                      headers={CSRF_HEADER: csrf_token(tokens["write"])})
        assert ok.status_code == 200 and ok.json()["ref"] == f"{name}@1"
        page = http.get(f"/ui/models/{name}").text
        assert csrf_token(tokens["write"]) in page  # what the page's actions send back
        r = http.post(f"/ui/models/{name}/aliases", data={"alias": "stable", "version": "1"})
        assert r.status_code == 403 and "csrf_failed" in r.text
        r = http.post(f"/ui/models/{name}/aliases", data={"alias": "stable", "version": "1"},
                      headers={CSRF_HEADER: csrf_token(tokens["write"])})
        assert r.status_code == 200 and f"{name}@stable → {name}@1" in r.text
    with _login(auth_server, tokens["read"]) as http:
        r = http.post(f"/ui/models/{name}/aliases", data={"alias": "stable", "version": "1"},
                      headers={CSRF_HEADER: csrf_token(tokens["read"])})
        assert r.status_code == 403 and "insufficient_scope" in r.text
    # a bearer header needs no CSRF token (no browser sends one on its own)
    r = httpx.post(auth_server.url + f"/ui/models/{name}/aliases", data={"alias": "beta", "version": "1"},
                   headers={"Authorization": f"Bearer {tokens['write']}"})
    assert r.status_code == 200


def test_a_revoked_token_in_the_cookie_is_refused(auth_server: Server, tokens: dict[str, str]) -> None:
    with auth_server.client(tokens["admin"]) as admin:
        t = admin.create_token("ui-short", "read")
    with _login(auth_server, t.token) as http:
        assert http.get("/ui/models").status_code == 200
        with auth_server.client(tokens["admin"]) as admin:
            admin.revoke_token(t.id)
        r = http.get("/ui/models")
        assert r.status_code == 401 and "invalid_token" in r.text
        r = http.post("/ui/logout", follow_redirects=False)
        assert r.status_code == 303 and f'{COOKIE}=""' in r.headers["set-cookie"]


def test_webhook_pages_are_for_admins(auth_server: Server, tokens: dict[str, str], name: str) -> None:
    """A webhook, its deliveries and one delivery's attempts (no worker runs here: the delivery stays
    pending, so redelivering it is refused with the API's 409, on the page)."""
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    dispatcher = subprocess.Popen([sys.executable, "-m", "registry", "dispatcher"], env=auth_server.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with auth_server.client(tokens["admin"]) as rc:
            hook = rc.create_webhook(f"http://127.0.0.1:{free_port()}/hook", ["model.*"], description="ui test")
            rc.create_model(name, "base")
            (d,) = wait_until(lambda: rc.list_deliveries(hook.id), 120, "the dispatcher's delivery")
    finally:
        dispatcher.terminate()
        dispatcher.wait(30)
    page = httpx.get(auth_server.url + f"/ui/webhooks/{hook.id}", headers=admin)
    assert page.status_code == 200 and f'id="delivery-{d.id}"' in page.text and "model.created" in page.text
    page = httpx.get(auth_server.url + f"/ui/deliveries/{d.id}", headers=admin)
    assert page.status_code == 200 and "Not attempted yet" in page.text
    r = httpx.post(auth_server.url + f"/ui/deliveries/{d.id}/redeliver", headers=admin)
    assert r.status_code == 409 and "delivery_in_progress" in r.text
    read = {"Authorization": f"Bearer {tokens['read']}"}
    assert httpx.get(auth_server.url + f"/ui/deliveries/{d.id}", headers=read).status_code == 403
    assert httpx.get(auth_server.url + "/ui/deliveries/999999", headers=admin).status_code == 404


def test_cross_site_sign_in_is_refused(auth_server: Server, tokens: dict[str, str]) -> None:
    r = httpx.post(auth_server.url + "/ui/login", data={"token": tokens["read"]},
                   headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert r.status_code == 403 and "set-cookie" not in r.headers


# --------------------------------------------------------------------------- what ships


def test_vendored_assets_are_the_locked_npm_packages() -> None:
    """static/vendor holds exactly what `python -m registry.ui.vendor` copies out of the packages
    package-lock.json pins: each file's recorded sha256 and version match."""
    import json

    record = json.loads(vendor.VERSIONS.read_text())
    assert set(record) == set(vendor.ASSETS)
    locked = vendor.locked_versions()
    for dest, (pkg, inner) in vendor.ASSETS.items():
        info = record[dest]
        assert (info["package"], info["path"], info["version"]) == (pkg, inner, locked[pkg]), dest
        assert hashlib.sha256((vendor.VENDOR / dest).read_bytes()).hexdigest() == info["sha256"], dest
    for pkg in vendor.LICENSES:
        assert (vendor.VENDOR / f"LICENSE.{pkg}").is_file()


def test_the_wheel_ships_templates_and_assets(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT_DIR)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("registry-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    ui = ROOT_DIR / "registry" / "ui"
    wanted = {str(p.relative_to(ROOT_DIR)) for p in ui.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert wanted - shipped == set()
