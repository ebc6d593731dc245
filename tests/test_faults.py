"""Fault drills with real processes: the API killed (SIGKILL) mid-chunk, mid-commit and under a running
`registry push`, then restarted on the same home, database and port. Nothing acknowledged is lost, no
version is created twice, every pulled byte matches its sha256.

A worker killed mid-job is drilled in tests/test_workers.py (test_worker_killed_mid_job_is_retried_elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from registry.demo import Shape, save_checkpoint

from .conftest import Server, make_server

MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


def kill(srv: Server) -> None:
    """SIGKILL the API process: no cleanup runs, no response is finished."""
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)


def restart(srv: Server, timeout: float = 60) -> None:
    """Start a new API process on the same home, database and port (REGISTRY_PORT is in its env)."""
    assert srv.log is not None
    with open(srv.log, "ab") as logf:
        srv.proc = subprocess.Popen([sys.executable, "-m", "registry", "up"], env=srv.env, stdout=logf,
                                    stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log.read_text()[-4000:]}")
        try:
            if httpx.get(srv.url + "/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server did not restart:\n{srv.log.read_text()[-4000:]}")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpoint(folder: Path, nbytes: int, seed: int = 0) -> Path:
    """A base checkpoint whose model.safetensors holds one uint8 tensor of ``nbytes`` random bytes."""
    g = torch.Generator().manual_seed(seed)
    return save_checkpoint(folder, {"w": torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)}, Shape())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def part_file(srv: Server, draft: dict[str, Any], upload: dict[str, Any]) -> Path:
    return srv.home / "staging" / draft["id"] / f"upload-{upload['id']}.part"


@pytest.fixture(scope="module")
def drill_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 pg_databases: list[str]) -> Server:
    """A SQLite server of this module: drills kill it and start it again (same home, database, port)."""
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_CHECK_FINITE="off")


def _slow_body(data: bytes, first: int, then_wait: threading.Event) -> Iterator[bytes]:
    """``first`` bytes at once, then nothing until ``then_wait`` is set (the server is killed meanwhile)."""
    for i in range(0, first, MiB):
        yield data[i:min(i + MiB, first)]
    then_wait.wait(30)
    yield data[first:first + MiB]


# --------------------------------------------------------------------------- resumable uploads


def test_bytes_written_but_not_recorded_are_cut_back(drill_server: Server, tmp_path: Path, name: str) -> None:
    """A crash between writing a chunk and recording ``received`` leaves extra bytes in the upload's
    .part file; the next chunk at the recorded offset must replace them, not follow them."""
    srv = drill_server
    api = srv.url + "/api/v1"
    folder = checkpoint(tmp_path / "m", 3 * MiB)
    data = (folder / "model.safetensors").read_bytes()
    draft = httpx.post(api + "/drafts", json={"model": name}).json()
    up = httpx.post(f"{api}/drafts/{draft['id']}/uploads", json={"path": "model.safetensors",
                                                                  "size": len(data)}).json()
    half = len(data) // 2
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[:half],
                       headers={"Upload-Offset": "0"}).json()["received"] == half
    part = part_file(srv, draft, up)
    with open(part, "ab") as f:  # what a process killed before recording its chunk leaves behind
        f.write(data[half:half + 12345])
    assert httpx.get(f"{api}/uploads/{up['id']}").json()["received"] == half
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[half:],
                       headers={"Upload-Offset": str(half)}).json()["received"] == len(data)
    r = httpx.post(f"{api}/uploads/{up['id']}/commit", json={"sha256": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 201, r.text
    for p in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert httpx.put(f"{api}/drafts/{draft['id']}/files/{p}", content=(folder / p).read_bytes()).status_code == 201
    v = httpx.post(f"{api}/drafts/{draft['id']}/commit").json()
    got = httpx.get(f"{api}/models/{name}/versions/{v['version']}/files/model.safetensors")
    assert len(got.content) == len(data) and got.content == data  # the stored blob holds exactly the bytes


def test_part_file_shorter_than_recorded_is_resent(drill_server: Server, tmp_path: Path, name: str) -> None:
    """Bytes lost below the application (the .part shorter than ``received``): the server says where
    its bytes really end instead of appending after a hole."""
    srv = drill_server
    api = srv.url + "/api/v1"
    data = os.urandom(2 * MiB)
    draft = httpx.post(api + "/drafts", json={"model": name}).json()
    up = httpx.post(f"{api}/drafts/{draft['id']}/uploads", json={"path": "notes.txt", "size": len(data)}).json()
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[:MiB],
                       headers={"Upload-Offset": "0"}).json()["received"] == MiB
    part = part_file(srv, draft, up)
    os.truncate(part, 1000)
    r = httpx.patch(f"{api}/uploads/{up['id']}", content=data[MiB:], headers={"Upload-Offset": str(MiB)})
    assert r.status_code == 409 and r.json()["error"]["details"]["received"] == 1000, r.text
    assert httpx.get(f"{api}/uploads/{up['id']}").json()["received"] == 1000
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[1000:],
                       headers={"Upload-Offset": "1000"}).json()["received"] == len(data)
    r = httpx.post(f"{api}/uploads/{up['id']}/commit", json={"sha256": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 201, r.text


def test_kill_mid_chunk_then_resume(drill_server: Server, tmp_path: Path, name: str) -> None:
    """Drill (a): SIGKILL of the API while a PATCH chunk streams in (some of its bytes already on disk,
    none recorded), restart, resume at the server's offset: the commit succeeds and the pulled bytes
    have the pushed sha256."""
    srv = drill_server
    api = srv.url + "/api/v1"
    folder = checkpoint(tmp_path / "m", 40 * MiB, seed=1)
    data = (folder / "model.safetensors").read_bytes()
    draft = httpx.post(api + "/drafts", json={"model": name}).json()
    up = httpx.post(f"{api}/drafts/{draft['id']}/uploads", json={"path": "model.safetensors",
                                                                  "size": len(data)}).json()
    first = 16 * MiB
    assert httpx.patch(f"{api}/uploads/{up['id']}", content=data[:first],
                       headers={"Upload-Offset": "0"}).json()["received"] == first
    part = part_file(srv, draft, up)

    # the second chunk: 12 MiB arrive, then the stream stalls; the API dies once some are on disk
    release = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            httpx.patch(f"{api}/uploads/{up['id']}", content=_slow_body(data[first:], 12 * MiB, release),
                        headers={"Upload-Offset": str(first), "Content-Length": str(len(data) - first)},
                        timeout=60)
        except httpx.HTTPError as e:
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    try:
        wait_until(lambda: part.stat().st_size > first, 30, "the second chunk to reach the disk")
        kill(srv)
    finally:
        release.set()
        t.join(30)
    assert errors, "the interrupted chunk must not have been acknowledged"
    on_disk = part.stat().st_size
    assert on_disk > first  # bytes the database never recorded

    restart(srv)
    received = httpx.get(f"{api}/uploads/{up['id']}").json()["received"]
    assert received == first
    r = httpx.patch(f"{api}/uploads/{up['id']}", content=data[received:], headers={"Upload-Offset": str(received)})
    assert r.status_code == 200 and r.json()["received"] == len(data), r.text
    r = httpx.post(f"{api}/uploads/{up['id']}/commit", json={"sha256": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 201, r.text
    for p in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert httpx.put(f"{api}/drafts/{draft['id']}/files/{p}", content=(folder / p).read_bytes()).status_code == 201
    v = httpx.post(f"{api}/drafts/{draft['id']}/commit").json()
    assert v["ref"] == f"{name}@1"
    with srv.client() as rc:
        rc.pull(v["ref"], tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(folder)
    print(f"\nDRILL a: 1 try, 1 acknowledged version, 1 intact, 0 bytes lost "
          f"(.part held {on_disk} bytes, database {first})")
