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
