"""An upload interrupted mid-stream (client killed) leaves no visible version or blob; gc later
removes the abandoned push's staged bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from .conftest import Server


def test_client_killed_mid_upload(sqlite_server: Server, tmp_path: Path, name: str) -> None:
    srv = sqlite_server
    api = srv.url + "/api/v1"
    blobs_before = srv.blob_files()
    marker = tmp_path / "started"
    script = textwrap.dedent(f"""
        import httpx, time, pathlib
        api = {api!r}
        d = httpx.post(api + "/drafts", json={{"model": {name!r}}}).json()
        pathlib.Path({str(tmp_path / 'draft')!r}).write_text(d["id"])
        def body():
            yield b"\\x00" * (1 << 20)
            pathlib.Path({str(marker)!r}).write_text("x")
            while True:
                time.sleep(0.05)
                yield b"\\x00" * 1024
        httpx.put(api + "/drafts/" + d["id"] + "/files/model.safetensors", content=body(), timeout=600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "client did not start uploading"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    draft_id = (tmp_path / "draft").read_text()

    # the partial bytes go away once the server notices the dropped connection
    staging = srv.home / "staging" / draft_id
    deadline = time.monotonic() + 20
    while any(staging.glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(staging.glob("*")), list(staging.glob("*"))
    assert httpx.get(f"{api}/models/{name}").status_code == 404
    assert httpx.get(f"{api}/versions", params={"prefix": name}).json()["items"] == []
    assert srv.blob_files() == blobs_before
    assert httpx.get(f"{api}/drafts/{draft_id}").json()["files"] == []

    # gc with no TTL removes the abandoned draft
    env = {**srv.env, "REGISTRY_DRAFT_TTL_SECONDS": "0"}
    out = subprocess.run([sys.executable, "-m", "registry", "gc", "--json"], env=env, capture_output=True, text=True,
                         check=True)
    assert '"drafts_removed"' in out.stdout
    assert httpx.get(f"{api}/drafts/{draft_id}").status_code == 404
    assert not staging.exists()
