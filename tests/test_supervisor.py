"""`registry up` hands its workers the address it really listens on: a worker started beside an API
on --port 8282 publishes http://127.0.0.1:8282 URLs (MLflow version sources, webhooks), not the
default 8080 (the port used to stay in the API process)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from registry.config import Settings
from registry.supervisor import Supervisor


def test_children_know_the_apis_real_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REGISTRY_URL", "REGISTRY_PUBLIC_URL", "REGISTRY_HOST", "REGISTRY_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings(home=tmp_path, port=8282)
    sup = Supervisor(settings, env=settings.env_for("host", "port"))
    sup.add("probe", [sys.executable, "-c", "from registry.config import get_settings; "
                                            "print('public', get_settings().resolved_public_url, flush=True)"])
    sup.start()
    log = tmp_path / "logs" / "probe.log"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "public" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
    finally:
        sup.stop()
    assert "public http://127.0.0.1:8282" in log.read_text()


def test_when_answering_calls_back_once_the_url_answers(tmp_path: Path) -> None:
    """The supervisor reports a child's address only once something answers there."""
    import http.server
    import threading

    from tests.conftest import free_port

    port = free_port()
    calls: list[tuple[float, bool]] = []
    sup = Supervisor(Settings(home=tmp_path))
    started = time.monotonic()
    sup.when_answering(f"http://127.0.0.1:{port}", lambda ok: calls.append((time.monotonic() - started, ok)))
    time.sleep(2.0)
    assert calls == []  # nothing listens yet
    httpd = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while not calls and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        httpd.shutdown()
        sup.stop()
    assert len(calls) == 1 and calls[0][1] is True and calls[0][0] >= 2.0


def test_up_announces_the_mlflow_ui_only_once_it_answers(tmp_path: Path) -> None:
    """`registry up` used to print "MLflow UI on http://…" at once, though the UI answers only after a
    while (~100 s on a busy 2-core machine): the banner says it is starting, and its address comes
    when it answers."""
    import os
    import signal
    import subprocess

    import httpx

    from tests.conftest import free_port

    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update({"REGISTRY_HOME": str(tmp_path / "home"), "REGISTRY_PORT": str(port), "REGISTRY_MLFLOW_UI": "true",
                "REGISTRY_MLFLOW_UI_PORT": str(ui_port), "REGISTRY_EMBEDDED_WORKERS": "0",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "registry", "up"], env=env, stdout=out, stderr=subprocess.STDOUT)
    ui_url = f"http://127.0.0.1:{ui_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        text = " ".join(log.read_text().split())  # the console may wrap long lines
        assert "MLflow UI starting" in text, text
        if f"MLflow UI on {ui_url}" in text:  # announced: then it answers
            httpx.get(ui_url, timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
