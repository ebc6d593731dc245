"""The web UI in a real browser: Playwright drives Debian's chromium (``apt-get install chromium``;
never ``playwright install``) against one registry stack (API with auth required, dispatcher, one
Celery worker) and one browser, shared by every test here.

What a person does is what is checked: sign in once with a token (kept in an HTTP-only cookie),
browse list -> model -> version -> its lineage graph -> an ancestor, see a three-input merge's
three typed parents, promote a candidate and move an alias, watch a running job's progress and
error change live, read a webhook's deliveries and redeliver one. Every request any page makes is
routed through the test: one to any host but the registry's is recorded and aborted, and the last
test asserts there was none. ``UI_SCREENSHOTS=docs/ui`` makes ``test_screenshots`` rewrite the
README's screenshots.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import REQUIRE_SERVICES, Stack, free_port, make_stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MLFLOW_UI = "http://mlflow.invalid:5000"  # links only: a browser that followed one would be stopped here
WAIT_MS = 90_000  # live updates on a loaded 2-core machine: generous, never a threshold on speed

try:
    from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]


def _need_browser() -> None:
    missing = ("playwright is not installed (pip install -e '.[test]')" if sync_playwright is None else
               None if CHROMIUM.exists() else f"{CHROMIUM} is missing (apt-get install chromium)")
    if missing is not None:
        if REQUIRE_SERVICES:
            pytest.fail(missing)
        pytest.skip(missing)


@dataclass
class UI:
    stack: Stack
    tokens: dict[str, str]
    browser: Browser
    admin: BrowserContext  # signed in with the admin token
    seen: list[str] = field(default_factory=list)  # every URL a page asked for
    external: list[str] = field(default_factory=list)  # those for another host (aborted)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in pages
    csp: list[str] = field(default_factory=list)  # what the Content-Security-Policy refused

    @property
    def url(self) -> str:
        return self.stack.url

    def context(self) -> BrowserContext:
        """A fresh browser profile (no cookie) whose requests to other hosts are recorded and aborted."""
        ctx = self.browser.new_context(viewport={"width": 1280, "height": 860})
        ctx.set_default_timeout(WAIT_MS)
        host = urlsplit(self.url).netloc

        def guard(route: Route) -> None:
            url = route.request.url
            self.seen.append(url)
            if urlsplit(url).netloc == host:
                route.continue_()
            else:
                self.external.append(url)
                route.abort()

        ctx.route("**/*", guard)
        ctx.on("page", self._watch)
        return ctx

    def _watch(self, page: Page) -> None:
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on("console", lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None)

    def page(self) -> Page:
        return self.admin.new_page()

    def api(self, token: str = "admin"):  # type: ignore[no-untyped-def]
        return self.stack.server.client(self.tokens[token])


def _token(stack: Stack, scope: str) -> str:
    p = subprocess.run([sys.executable, "-m", "registry", "token", "create", f"t-{scope}", "--scope", scope],
                       env=stack.env, capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url + "/ui/models")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/ui/models")


@pytest.fixture(scope="module")
def ui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str],
       demo: dict[str, Path]) -> Iterator[UI]:
    _need_browser()
    stack = make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1, REGISTRY_AUTH="required",
                       REGISTRY_TORCH_THREADS="1", REGISTRY_WEBHOOK_TIMEOUT_SECONDS="300",
                       REGISTRY_MLFLOW_UI_URL=MLFLOW_UI)
    tokens = {s: _token(stack, s) for s in ("read", "write", "admin")}
    with stack.server.client(tokens["admin"]) as rc:
        rc.push(demo["base"], "demo-base", aliases=["production"], tags={"stage": "dev"})
        rc.push(demo["adapter-sql"], "sql-lora", base="demo-base@1")
        rc.push(demo["adapter-chat"], "chat-lora", base="demo-base@1")
        rc.push(demo["adapter-sql"], "ops-lora", base="demo-base@1")
        rc.push(demo["finetune"], "demo-chat", base="demo-base@1")
        rc.push(demo["base-v2"], "demo-base")
        queued = [rc.merge("task_arithmetic", ["sql-lora@1", "chat-lora@1", "ops-lora@1"], "tri-merge",
                           params={"weights": [0.5, 0.3, 0.2]}),
                  rc.transfer("demo-chat@1", "demo-base@2"),  # -> the candidate demo-chat@2
                  rc.create_basis(["sql-lora@1", "chat-lora@1"], p=1)]
        r = httpx.post(stack.url + "/api/v1/compressions", headers={"Authorization": f"Bearer {tokens['admin']}"},
                       json={"members": ["chat-lora@1", "ops-lora@1"], "max_error": 0.05, "prune": True})
        assert r.status_code == 202, r.text
        queued.append(rc.get_job(r.json()["id"]))
        try:
            for job in queued:
                done = rc.wait_job(job.id, timeout=900, poll=0.5)
            rc.wait_job(done.result["prune_job_id"], timeout=900, poll=0.5)  # the plan's members, served from it
        except Exception:
            stack.dump_logs()
            raise
        rc.store_predictions("demo-chat@1", "eval", predictions=[0, 1, 1, 0], labels=[0, 1, 0, 0])
        rc.store_predictions("demo-chat@2", "eval", predictions=[0, 1, 0, 1], labels=[0, 1, 0, 0])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        expect.set_options(timeout=WAIT_MS)
        state = UI(stack, tokens, browser, admin=None)  # type: ignore[arg-type]
        state.admin = state.context()
        page = state.admin.new_page()
        sign_in(page, stack.url, tokens["admin"])
        page.close()
        try:
            yield state
        finally:
            browser.close()


# --------------------------------------------------------------------------- browsing


def node_position(page: Page, ref: str) -> tuple[float, float]:
    """Where the lineage graph drew ``ref``, in page coordinates (the graph is scrolled into view)."""
    graph = page.locator("#lineage-graph")
    graph.scroll_into_view_if_needed()
    box = graph.bounding_box()
    assert box is not None
    x, y = page.evaluate("ref => { const p = window.registryLineage.getElementById(ref).renderedPosition();"
                         " return [p.x, p.y]; }", ref)
    return box["x"] + x, box["y"] + y


def test_list_model_version_lineage_then_an_ancestor(ui: UI) -> None:
    page = ui.page()
    page.goto(ui.url + "/")  # -> /ui
    expect(page.locator("#models")).to_contain_text("tri-merge")
    page.fill("input[name=q]", "tri")  # the search narrows the list as one types
    expect(page.locator("#models tbody tr")).to_have_count(1)
    page.click("a.model:text-is('tri-merge')")
    page.wait_for_url(ui.url + "/ui/models/tri-merge")
    page.click("#versions a.ref:text-is('@1')")
    page.wait_for_url(ui.url + "/ui/models/tri-merge/versions/1")
    expect(page.locator("h1")).to_contain_text("tri-merge@1")
    expect(page.locator("#lineage-graph")).to_have_attribute("data-ready", "true")  # dagre laid it out
    nodes = page.evaluate("window.registryLineage.nodes().map(n => n.id())")
    assert {"tri-merge@1", "sql-lora@1", "chat-lora@1", "ops-lora@1", "demo-base@1"} <= set(nodes)
    merged, base = node_position(page, "tri-merge@1"), node_position(page, "demo-base@1")
    assert base[1] < merged[1]  # ancestors are drawn above
    page.mouse.click(*base)  # every node is a link
    page.wait_for_url(ui.url + "/ui/models/demo-base/versions/1")
    expect(page.locator("h1")).to_contain_text("demo-base@1")
    # the base's graph holds its descendants: the adapters, the fine-tune, and the merge below them
    expect(page.locator("#lineage-graph")).to_have_attribute("data-ready", "true")
    below = page.evaluate("window.registryLineage.getElementById('demo-base@1').successors('node').map(n => n.id())")
    assert {"sql-lora@1", "chat-lora@1", "ops-lora@1", "demo-chat@1", "tri-merge@1"} <= set(below)
    page.close()


def test_a_merge_of_three_inputs_shows_three_typed_parents(ui: UI) -> None:
    page = ui.page()
    page.goto(ui.url + "/ui/models/tri-merge/versions/1")
    rows = page.locator("#parents tr.parent[data-relation=merge_of]")
    expect(rows).to_have_count(3)
    cells = sorted(tuple(" ".join(c.split()) for c in rows.nth(i).locator("td").all_inner_texts()) for i in range(3))
    assert cells == sorted((ref, f"merge_of w={w}", f"method=task_arithmetic weight={w}")
                           for ref, w in (("sql-lora@1", "0.5"), ("chat-lora@1", "0.3"), ("ops-lora@1", "0.2")))
    expect(page.locator("#parents tr.parent[data-relation=adapter_of]")).to_contain_text("demo-base@1")
    expect(page.locator("#lineage-graph")).to_have_attribute("data-ready", "true")
    drawn = page.evaluate("window.registryLineage.getElementById('tri-merge@1').incomers('edge')"
                          ".map(e => [e.source().id(), e.data('relation'), e.data('label')])")
    assert sorted(map(tuple, drawn)) == sorted([
        ("chat-lora@1", "merge_of", "merge_of w=0.3"), ("demo-base@1", "adapter_of", "adapter_of"),
        ("ops-lora@1", "merge_of", "merge_of w=0.2"), ("sql-lora@1", "merge_of", "merge_of w=0.5")])
    # the basis members' edges carry their reconstruction error
    member = page.evaluate("window.registryLineage.edges('[relation = \"basis_member_of\"]').map(e => e.data('label'))")
    assert member and all(label.startswith("basis_member_of err=") for label in member)
    page.close()


def test_version_page_files_run_and_update_report(ui: UI) -> None:
    with ui.api() as rc:
        merged = rc.get_version("tri-merge@1")
        chat = rc.get_version("demo-chat@2")
    page = ui.page()
    page.goto(ui.url + "/ui/models/tri-merge/versions/1")
    expect(page.locator("#size")).to_have_attribute("data-bytes", str(merged.size))
    expect(page.locator("#stored")).to_have_attribute("data-bytes", str(merged.stored_bytes))
    assert page.locator("#mlflow-run").get_attribute("href") == f"{MLFLOW_UI}/#/runs/{merged.mlflow_run_id}"
    for f in merged.files:
        row = page.locator("#files tr", has_text=f.path)
        expect(row.locator("code.sha")).to_have_text(f.sha256)
        with page.expect_download() as dl:
            row.locator("a.download").click()  # through the API, with the cookie
        assert hashlib.sha256(Path(dl.value.path()).read_bytes()).hexdigest() == f.sha256
    page.goto(ui.url + "/ui/models/demo-chat/versions/1")  # a fine-tune and its transfer candidate
    report = page.locator("#compat tbody tr")
    expect(report).to_have_count(1)
    expect(report).to_contain_text("demo-chat@2")
    expect(report.locator("td.nfr")).to_have_text("0.25")  # one negative flip in four, by hand
    assert chat.status in ("candidate", "ready")
    page.close()


def test_promote_a_candidate_and_move_an_alias(ui: UI) -> None:
    page = ui.page()
    page.on("dialog", lambda d: d.accept())  # "Promote demo-chat@2 to ready?"
    page.goto(ui.url + "/ui/models/demo-chat")
    row = page.locator("#v2")
    expect(row).to_contain_text("candidate")
    row.locator("button.promote").click()
    expect(page.locator("#v2")).to_contain_text("ready")
    expect(page.locator("#flash")).to_have_text("promoted demo-chat@2: ready")
    expect(page.locator("#v2 button.promote")).to_have_count(0)
    with ui.api() as rc:
        assert rc.get_version("demo-chat@2").status == "ready"
    for target in ("1", "2"):  # set it, then move it
        page.fill("#alias-form input[name=alias]", "production")
        page.select_option("#alias-form select[name=version]", target)
        page.click("#alias-form button[type=submit]")
        expect(page.locator(f"#v{target} td.aliases")).to_have_text("production")
        with ui.api() as rc:
            assert rc.get_version("demo-chat@production").version == int(target)
    expect(page.locator("#v1 td.aliases")).to_have_text("")
    page.fill("#alias-form input[name=alias]", "Not An Alias")  # refused by the API's rule, said on the page
    page.click("#alias-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("invalid_alias")
    page.close()


def test_bases_page(ui: UI) -> None:
    with ui.api() as rc:
        (b,) = rc.list_bases()
    page = ui.page()
    page.goto(ui.url + "/ui/bases")
    page.click(f"#bases a:text-is('#{b.id}')")
    expect(page.locator("#storage-ratio")).to_have_text(f"{b.storage_ratio:.4g}")
    expect(page.locator("#p")).to_have_text("1")
    for m in b.members:
        expect(page.locator("#members tr", has_text=m.ref)).to_contain_text(f"{m.error:.4g}")
    page.close()


def test_compression_pages(ui: UI) -> None:
    """Compressions (from the header) -> a plan: its ratio and each member's error and error as served;
    a member's page links its plan_member_of edge back to the plan."""
    c = httpx.get(ui.url + "/api/v1/compressions", headers={"Authorization": f"Bearer {ui.tokens['read']}"}).json()[0]
    page = ui.page()
    page.goto(ui.url + "/ui/models")
    page.click("header nav a:text-is('Compressions')")
    page.click(f"#compressions a:text-is('#{c['id']}')")
    expect(page.locator("#storage-ratio")).to_have_text(f"{c['ratio']:.4g}")
    expect(page.locator("#served-count")).to_have_text(f"{len(c['members'])} of {len(c['members'])} members")
    for m in c["members"]:
        row = page.locator("#members tr", has_text=m["ref"])
        expect(row).to_contain_text(f"{m['error']:.4g}")
        expect(row.locator("td.served-error")).to_have_text(f"{m['served_error']:.4g}")
        expect(row.locator("td.served")).to_have_text("yes")
    page.click(f"#members a.ref:text-is('{c['members'][0]['ref']}')")
    edge = page.locator("#parents tr.parent[data-relation=plan_member_of]")
    expect(edge).to_contain_text(c["ref"])
    edge.locator("a.compression").click()
    page.wait_for_url(ui.url + f"/ui/compressions/{c['id']}")
    page.close()


# --------------------------------------------------------------------------- jobs and webhooks, live


class Receiver(ThreadingHTTPServer):
    """A webhook target the test controls: the first POST fails (500), the second waits until
    ``release`` is set and then succeeds, later ones succeed at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hits = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.hits += 1
                    n = receiver.hits
                if n == 2:
                    receiver.release.wait(600)
                code = 500 if n == 1 else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if code == 500 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


def test_jobs_page_shows_a_running_jobs_progress_and_errors_then_a_redelivery(ui: UI) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with ui.api() as rc:
            hook = rc.create_webhook(f"http://127.0.0.1:{receiver.server_port}/hook", ["model.created"])
            rc.create_model("hooked", "base")
            job = ui.stack.wait_for(lambda: next(iter(rc.list_jobs(type="webhook")), None), what="the delivery job")
        page = ui.page()
        page.goto(ui.url + "/ui/jobs?type=webhook")
        page.evaluate("window.stillThisPage = true")
        row = page.locator(f"#job-{job.id}")
        # attempt 1 got a 500 and is retried; attempt 2 is held open by the receiver: running
        expect(row).to_have_attribute("data-state", "running")
        expect(row.locator("td.error")).to_contain_text("HTTP 500")
        expect(row).to_contain_text("2/")  # the second attempt
        with ui.api() as rc:
            now = rc.get_job(job.id)
        assert now.state == "running" and now.attempts == 2
        expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", str(round(now.progress * 100)))
        expect(row.locator("td.message")).to_have_text(now.message)
        receiver.release.set()
        expect(row).to_have_attribute("data-state", "succeeded")  # without a reload: the table polls
        expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
        assert page.evaluate("window.stillThisPage") is True
        # the delivery and its two attempts, then a redelivery from the page
        page.goto(ui.url + "/ui/webhooks")
        page.click(f"#webhooks a:text-is('#{hook.id}')")
        delivery = page.locator("#deliveries tbody tr").first
        expect(delivery).to_have_attribute("data-status", "succeeded")
        expect(delivery.locator("td.attempts")).to_have_text("2")
        delivery.locator("a").first.click()
        attempts = page.locator("#attempts tr.attempt")
        expect(attempts).to_have_count(2)
        expect(attempts.nth(0)).to_contain_text("HTTP 500")
        expect(attempts.nth(1)).to_contain_text("200")
        page.click("button.redeliver")
        expect(page.locator("#flash")).to_contain_text("redelivering: job")
        expect(page.locator("#delivery")).to_have_attribute("data-status", "succeeded")
        expect(page.locator("#attempts tr.attempt")).to_have_count(3)
        assert receiver.hits == 3
        page.close()
    finally:
        receiver.release.set()
        receiver.shutdown()


# --------------------------------------------------------------------------- auth in the browser


def test_a_token_entered_once_is_kept_in_an_http_only_cookie(ui: UI) -> None:
    ctx = ui.context()
    page = ctx.new_page()
    r = page.goto(ui.url + "/ui/models/demo-chat")
    assert r is not None and r.status == 401  # the sign-in form, on the page asked for
    page.fill("input[name=token]", "rgt_not-a-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("invalid_token")
    assert ctx.cookies() == []
    page.fill("input[name=token]", ui.tokens["read"])
    page.click("button[type=submit]")
    page.wait_for_url(ui.url + "/ui/models/demo-chat")
    expect(page.locator("#who")).to_contain_text("t-read")
    (cookie,) = ctx.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        "registry_token", True, "Strict", "/")
    assert "registry_token" not in page.evaluate("document.cookie")  # scripts cannot read it
    expect(page.locator("button.promote")).to_have_count(0)  # read scope: no actions offered
    expect(page.locator("p.note")).to_contain_text("write")
    page.goto(ui.url + "/ui/jobs")  # the cookie stays: no second sign-in
    expect(page.locator("h1")).to_have_text("Jobs")
    # what a forged request with the cookie gets: no CSRF token, no action
    r2 = ctx.request.post(ui.url + "/ui/models/demo-chat/aliases", form={"alias": "x", "version": "1"})
    assert r2.status == 403 and "csrf_failed" in r2.text()
    r3 = page.goto(ui.url + "/ui/webhooks")
    assert r3 is not None and r3.status == 403
    page.goto(ui.url + "/ui/models")
    page.click("header button:text-is('sign out')")
    page.wait_for_url(ui.url + "/ui/login")
    assert ctx.cookies() == []
    r4 = page.goto(ui.url + "/ui/models")
    assert r4 is not None and r4.status == 401
    ctx.close()


# --------------------------------------------------------------------------- docs, screenshots, and the network


def test_api_docs_render_offline(ui: UI) -> None:
    page = ui.page()
    page.goto(ui.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("registry")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
    page.goto(ui.url + "/redoc")
    expect(page.locator("h1").first).to_contain_text("registry")
    expect(page.get_by_text("List Models").first).to_be_attached()
    page.close()


def test_screenshots(ui: UI, tmp_path: Path) -> None:
    """The README's screenshots (``UI_SCREENSHOTS=docs/ui`` writes them there)."""
    out = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page = ui.page()
    for name, path, ready in [("models", "/ui/models", "#models"), ("model", "/ui/models/demo-chat", "#versions"),
                              ("version", "/ui/models/tri-merge/versions/1", "#lineage-graph[data-ready=true]"),
                              ("basis", "/ui/bases/1", "#members"), ("compression", "/ui/compressions/1", "#members"),
                              ("jobs", "/ui/jobs", "#jobs")]:
        page.goto(ui.url + path)
        page.locator(ready).wait_for()
        page.screenshot(path=str(out / f"{name}.png"), full_page=name == "version")
        assert (out / f"{name}.png").stat().st_size > 10_000
    page.close()


def test_no_request_left_the_server(ui: UI) -> None:
    """Run last: of every request the pages above made (pages, scripts, styles, the OpenAPI document,
    htmx's polls), none went to another host; what the Content-Security-Policy refused before it
    could leave is only ReDoc's remote logo; no page threw."""
    assert len(ui.seen) > 50 and all(u.startswith(ui.url) for u in ui.seen[:3])
    assert ui.external == []
    assert all("cdn.redoc.ly" in m for m in ui.csp), ui.csp
    assert ui.errors == []
    assert httpx.get(ui.url + "/api/v1/health").status_code == 200
