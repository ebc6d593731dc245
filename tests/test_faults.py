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

from .conftest import Server, make_server, wait_healthy, wait_until

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
    if wait_healthy(srv.url, srv.proc, srv.log, timeout, poll=0.05):
        return
    raise RuntimeError(f"server did not restart:\n{srv.log.read_text()[-4000:]}")


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


def test_chunk_waits_for_another_process_writing_the_upload(drill_server: Server, name: str) -> None:
    """API processes (REGISTRY_API_WORKERS > 1) serialise the writes of one upload: a chunk resent
    while another process still holds the .part waits for it (here the test process holds the lock)."""
    import fcntl

    srv = drill_server
    api = srv.url + "/api/v1"
    data = os.urandom(MiB)
    draft = httpx.post(api + "/drafts", json={"model": name}).json()
    up = httpx.post(f"{api}/drafts/{draft['id']}/uploads", json={"path": "notes.txt", "size": len(data)}).json()
    answers: list[httpx.Response] = []
    with open(part_file(srv, draft, up), "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: answers.append(
            httpx.patch(f"{api}/uploads/{up['id']}", content=data, headers={"Upload-Offset": "0"}, timeout=30)))
        t.start()
        time.sleep(1.0)
        assert not answers and httpx.get(f"{api}/uploads/{up['id']}").json()["received"] == 0
    t.join(30)
    assert answers and answers[0].json()["received"] == len(data)


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
        wait_until(lambda: part.stat().st_size > first, 30, "the second chunk to reach the disk", poll=0.005)
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


# --------------------------------------------------------------------------- the client across restarts


def _versions(srv: Server, model: str) -> list[dict[str, Any]]:
    return httpx.get(srv.url + "/api/v1/versions", params={"model": model, "limit": 100}).json()["items"]


def _db_count(srv: Server, sql: str, **params: Any) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(srv.database_url)
    try:
        with engine.connect() as c:
            return int(c.execute(text(sql), params).scalar_one())
    finally:
        engine.dispose()


def _blobs_intact(srv: Server, version: Any) -> bool:
    """Every file of the version (a registry.client.Version) is in the blob store with the bytes its sha256 names."""
    for f in version.files:
        blob = srv.blob_dir / "sha256" / f.sha256[:2] / f.sha256[2:4] / f.sha256
        if not blob.exists() or sha256(blob) != f.sha256:
            return False
    return True


def _many_files(folder: Path, seed: int) -> Path:
    """A sharded checkpoint plus 40 small files: a commit with work to do (headers, index, rows)."""
    g = torch.Generator().manual_seed(seed)
    save_checkpoint(folder, {f"t{i:02d}": torch.randint(0, 256, (256 << 10,), dtype=torch.uint8, generator=g)
                             for i in range(16)}, Shape(), shards=8)
    for i in range(40):
        (folder / "extra" / f"f{i:02d}.txt").parent.mkdir(exist_ok=True)
        (folder / "extra" / f"f{i:02d}.txt").write_bytes(os.urandom(1000 + i))
    return folder


class _CommitProbe:
    """Wraps a client so the test knows when the draft commit request leaves."""

    def __init__(self, rc: Any) -> None:
        self.sent = threading.Event()
        attempt = rc._attempt

        def probe(method: str, path: str, **kw: Any) -> httpx.Response:
            if method == "POST" and path.startswith("/drafts/") and path.endswith("/commit"):
                self.sent.set()
                t0 = time.monotonic()
                try:
                    return attempt(method, path, **kw)  # type: ignore[no-any-return]
                finally:
                    self.duration = time.monotonic() - t0
            return attempt(method, path, **kw)  # type: ignore[no-any-return]

        rc._attempt = probe


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def commit_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  pg_databases: list[str], drill_server: Server) -> Server:
    if request.param == "sqlite":
        return drill_server
    return make_server(request, tmp_path_factory, pg_databases, "postgres", REGISTRY_CHECK_FINITE="off")


def test_kill_mid_commit(commit_server: Server, tmp_path: Path, name: str) -> None:
    """Drill (b): SIGKILL of the API at points spread over a multi-file commit, restart: the client's
    retry finds the version committed once, or commits it; never two versions, never missing bytes."""
    srv = commit_server
    messages: list[str] = []
    # how long an undisturbed commit of this shape takes here
    with srv.client() as rc:
        probe = _CommitProbe(rc)
        rc.push(_many_files(tmp_path / "warm", seed=99), name + "-warm")
    span = probe.duration
    # kill points as fractions of an undisturbed commit; on PostgreSQL (slower to restart) only until
    # one kill lands before the answer (a kill after it drills nothing: the load here varies)
    tries = [0.0, 0.5, 1.0] if srv.backend == "sqlite" else [0.6, 0.3, 0.0]
    hits = 0
    rows = []
    for i, fraction in enumerate(tries):
        model = f"{name}-{i}"
        folder = _many_files(tmp_path / model, seed=i)
        seen = len(messages)
        result: dict[str, Any] = {}
        with retrying_client(srv, messages) as rc:
            probe = _CommitProbe(rc)

            def run(rc: Any = rc, folder: Path = folder, model: str = model, result: dict[str, Any] = result) -> None:
                try:
                    result["version"] = rc.push(folder, model)
                except BaseException as e:  # noqa: BLE001 - reported below
                    result["error"] = e

            t = threading.Thread(target=run)
            t.start()
            assert probe.sent.wait(60), "the push never reached its commit"
            time.sleep(fraction * span)
            kill(srv)
            committed_at_kill = _db_count(srv, "select count(*) from model_versions v join models m "
                                               "on m.id = v.model_id where m.name = :n", n=model)
            restart(srv)
            t.join(120)
            assert not t.is_alive()
        assert "error" not in result, result.get("error")
        versions = _versions(srv, model)
        assert [v["ref"] for v in versions] == [f"{model}@1"]
        with srv.client() as rc:
            v = rc.get_version(f"{model}@1")
            intact = _blobs_intact(srv, v)
            rc.pull(v.ref, tmp_path / "out" / model)
        assert intact and tree_hashes(tmp_path / "out" / model) == tree_hashes(folder)
        assert _db_count(srv, "select count(*) from drafts where model_name = :n", n=model) == 0
        waits = sum("retrying in" in m for m in messages[seen:])
        found = any("was committed before" in m for m in messages[seen:])
        how = "found committed" if found else "committed by the retry" if waits else "answered before the kill"
        rows.append(f"kill at {fraction:.1f}x: {'after' if committed_at_kill else 'before'} the transaction, "
                    f"{waits} retry waits, {how}")
        hits += bool(waits)
        if srv.backend != "sqlite" and hits:
            break
    assert hits, "no kill landed inside a commit request"
    n = len(rows)
    print(f"\nDRILL b ({srv.backend}): {n} tries ({hits} killed mid-request), commit {span:.2f}s undisturbed; "
          f"{'; '.join(rows)}; {n} acknowledged versions, {n} intact, 0 duplicates, 0 bytes lost")


def retrying_client(srv: Server, messages: list[str]) -> Any:
    from registry.client import RegistryClient

    return RegistryClient(srv.url, token="", retry_seconds=90, on_retry=messages.append)


_THROTTLED_CLI = """
import sys, time
import registry.client as c
c.RESUMABLE_THRESHOLD = c.UPLOAD_CHUNK = 8 << 20
c.CHUNK = 1 << 20
read_chunks = c.RegistryClient._read_chunks
def slow(self, *a, **kw):
    for chunk in read_chunks(self, *a, **kw):
        time.sleep(0.03)
        yield chunk
c.RegistryClient._read_chunks = slow
from registry.cli import app
sys.argv[0] = "registry"
app()
"""


def test_cli_push_survives_a_restart(drill_server: Server, tmp_path: Path, name: str) -> None:
    """Drill (c): `registry push` of a 40 MiB checkpoint (resumable upload in 8 MiB chunks, sent at a
    throttled pace so the push takes seconds) while the API is SIGKILLed and restarted on the same
    port: exit 0, one version, a byte-exact pull, no draft or staged bytes left."""
    srv = drill_server
    folder = checkpoint(tmp_path / "m", 40 * MiB, seed=7)
    env = {**srv.env, "REGISTRY_URL": srv.url, "REGISTRY_CLIENT_RETRY_SECONDS": "90"}
    out, errf = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")  # noqa: SIM115
    cli = subprocess.Popen([sys.executable, "-c", _THROTTLED_CLI, "push", str(folder), "--name", name],
                           env=env, stdout=out, stderr=errf, text=True)
    try:
        staging = srv.home / "staging"
        wait_until(lambda: any(p.stat().st_size > 12 * MiB for p in staging.glob("*/upload-*.part")), 60,
                   "the push to be half-way through a chunk", poll=0.005)
        kill(srv)
        restart(srv)
        assert cli.wait(120) == 0, (tmp_path / "stderr").read_text()
    finally:
        if cli.poll() is None:
            cli.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert stdout.strip().splitlines()[-1] == f"{name}@1", stdout + stderr
    assert "retrying in" in stderr, stderr
    assert [v["ref"] for v in _versions(srv, name)] == [f"{name}@1"]
    pulled = srv.cli("pull", f"{name}@1", str(tmp_path / "out"))
    assert pulled.returncode == 0 and tree_hashes(tmp_path / "out") == tree_hashes(folder)
    assert _db_count(srv, "select count(*) from drafts where model_name = :n", n=name) == 0
    gc = subprocess.run([sys.executable, "-m", "registry", "gc", "--json"], capture_output=True, text=True,
                        env={**srv.env, "REGISTRY_GC_GRACE_SECONDS": "0"}, timeout=120)
    assert gc.returncode == 0, gc.stderr
    with srv.client() as rc:
        assert _blobs_intact(srv, rc.get_version(f"{name}@1"))
    assert not [p for p in (srv.home / "staging").glob("*/*") if p.stat().st_size > 12 * MiB]
    retries = stderr.count("retrying in")
    print(f"\nDRILL c: 1 try ({retries} retry waits), 1 acknowledged version, 1 intact, 0 bytes lost")


def test_pull_survives_a_restart(drill_server: Server, tmp_path: Path, name: str) -> None:
    """`pull` with the API SIGKILLed half-way through a file: it retries, resumes its .part file
    (a Range request), and verifies the sha256."""
    srv = drill_server
    folder = checkpoint(tmp_path / "m", 24 * MiB, seed=3)
    messages: list[str] = []
    with srv.client() as rc:
        v = rc.push(folder, name)
    half = threading.Event()
    done: dict[str, Any] = {}
    got = 0

    def progress(_phase: str, n: int) -> None:
        nonlocal got
        got += n
        if got > 10 * MiB:
            half.set()
        time.sleep(0.02)

    def run() -> None:
        try:
            with retrying_client(srv, messages) as rc:
                rc.pull(v.ref, tmp_path / "out", progress=progress)
            done["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            done["error"] = e

    t = threading.Thread(target=run)
    t.start()
    assert half.wait(60)
    kill(srv)
    part = tmp_path / "out" / "model.safetensors.part"
    assert part.exists() and part.stat().st_size < 24 * MiB
    restart(srv)
    t.join(120)
    assert done.get("ok"), done
    assert tree_hashes(tmp_path / "out") == tree_hashes(folder)
    assert any("retrying in" in m for m in messages), messages


# --------------------------------------------------------------------------- lost answers, deterministically


def _lose_answer(rc: Any, match: Any, *, after_sending: bool) -> list[str]:
    """Make the first request ``match``es break: after the server handled it (the answer is lost) or
    before it left (nothing happened). Returns the list the client's retry messages go to."""
    attempt = rc._attempt
    broken: list[str] = []

    def flaky(method: str, path: str, **kw: Any) -> httpx.Response:
        if not broken and match(method, path):
            broken.append(path)
            if after_sending:
                attempt(method, path, **kw)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return attempt(method, path, **kw)  # type: ignore[no-any-return]

    rc._attempt = flaky
    return broken


def _is_commit(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/drafts/") and path.endswith("/commit")


@pytest.mark.parametrize("after_sending", [True, False], ids=["committed", "not-committed"])
def test_lost_commit_answer_makes_one_version(drill_server: Server, demo: dict[str, Path], name: str,
                                             after_sending: bool) -> None:
    messages: list[str] = []
    with retrying_client(drill_server, messages) as rc:
        broken = _lose_answer(rc, _is_commit, after_sending=after_sending)
        v = rc.push(demo["base"], name)
    assert broken and v.ref == f"{name}@1"
    assert [x["ref"] for x in _versions(drill_server, name)] == [f"{name}@1"]
    assert any("retrying in" in m for m in messages), messages
    assert any("was committed before the connection broke" in m for m in messages) == after_sending


@pytest.mark.parametrize("after_sending", [True, False], ids=["committed", "not-committed"])
def test_lost_upload_commit_answer(drill_server: Server, tmp_path: Path, name: str, after_sending: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import registry.client as client_mod

    monkeypatch.setattr(client_mod, "RESUMABLE_THRESHOLD", MiB)
    monkeypatch.setattr(client_mod, "UPLOAD_CHUNK", MiB)
    folder = checkpoint(tmp_path / "m", 3 * MiB, seed=5)
    with retrying_client(drill_server, []) as rc:
        broken = _lose_answer(rc, lambda m, p: m == "POST" and p.startswith("/uploads/"), after_sending=after_sending)
        v = rc.push(folder, name, dedup=False)
        assert broken
        rc.pull(v.ref, tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(folder)


def test_only_safe_requests_are_retried() -> None:
    from registry.client import RegistryAPIError, _transient

    refused = httpx.ConnectError("refused")
    broken = httpx.ReadError("reset")
    assert _transient(refused, idempotent=False) and _transient(refused, idempotent=True)
    assert _transient(broken, idempotent=True) and not _transient(broken, idempotent=False)
    for status in (502, 503, 504):
        assert _transient(RegistryAPIError(status, "http_error", ""), idempotent=True)
    for status in (400, 404, 409, 422, 500):
        assert not _transient(RegistryAPIError(status, "x", ""), idempotent=True)


def test_client_errors_are_not_retried(drill_server: Server, demo: dict[str, Path], name: str) -> None:
    messages: list[str] = []
    from registry.client import RegistryAPIError

    with retrying_client(drill_server, messages) as rc, pytest.raises(RegistryAPIError) as e:
        rc.push(demo["adapter-sql"], name, base="no-such-model@1")
    assert e.value.status == 422 and messages == []
