"""The Python client: typed results that are the API's own response schemas, one exception class
per kind of error, and an async client with the same surface, through a real server."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from pathlib import Path

import httpx
import pytest

import registry.client as client_mod
from registry.api import schemas
from registry.client import (
    AsyncRegistryClient,
    ChecksumMismatch,
    Conflict,
    InvalidInput,
    NotFound,
    RegistryAPIError,
    RegistryClient,
    RegistryClientError,
    ServerUnreachable,
    Version,
)
from registry.demo import make_base

from .conftest import Server, free_port

PUBLIC = sorted(n for n, v in vars(RegistryClient).items() | vars(client_mod.Operations).items()
                if not n.startswith("_") and n not in ("close",))


def test_the_async_client_has_the_same_surface() -> None:
    """Every method of the sync client is on the async one, with the same signature (both are
    bound from one flow), a coroutine function there; the iterators become async iterators."""
    for name in PUBLIC:
        sync, asy = getattr(RegistryClient, name), getattr(AsyncRegistryClient, name)
        assert sync is asy or inspect.signature(sync) == inspect.signature(asy), name
    arc = AsyncRegistryClient("http://127.0.0.1:1")
    try:
        for name in PUBLIC:
            method = getattr(arc, name)
            if name.startswith("iter_"):
                assert inspect.isasyncgen(method())
            else:
                coro = method.__wrapped__ if hasattr(method, "__wrapped__") else method
                assert inspect.isgeneratorfunction(coro), name  # a flow, run by the driver
    finally:
        asyncio.run(arc.aclose())
    assert {"get_version", "push", "pull", "download_file", "wait_job", "export_oci", "import_oci",
            "create_webhook", "iter_versions", "iter_jobs"} <= set(PUBLIC)


def test_results_are_the_api_schemas(sqlite_server: Server, demo: dict[str, Path], name: str) -> None:
    with RegistryClient(sqlite_server.url) as rc:
        v = rc.push(demo["base"], name, tags={"k": "v"})
        assert type(v) is schemas.VersionOut is Version
        assert type(rc.get_model(name)) is schemas.ModelOut and type(rc.lineage(v.ref)) is schemas.LineageOut
        assert type(rc.health()) is schemas.HealthOut and type(rc.storage()) is schemas.StorageOut
        assert all(type(e) is schemas.EventOut for e in rc.events(limit=5))
        assert all(type(f) is schemas.FileOut for f in rc.list_files(v.ref))
        assert rc.get_version(v.ref) == v  # models compare by value
    # every JSON answer of the API names its schema, so the client's models are the API's
    spec = httpx.get(sqlite_server.url + "/openapi.json").json()
    untyped = []
    for path, item in spec["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, op in item.items():
            if op.get("operationId") in ("download_file", "head_file"):  # file bytes, not JSON
                continue
            for status, response in op.get("responses", {}).items():
                body = response.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith("2") and body is not None:
                    ref = body.get("$ref") or (body.get("items") or {}).get("$ref")
                    if not ref or ref.rsplit("/", 1)[-1] not in vars(schemas):
                        untyped.append(f"{method.upper()} {path} {status}: {body}")
    assert untyped == []


def test_one_exception_class_per_error_kind(sqlite_server: Server, demo: dict[str, Path], name: str) -> None:
    with RegistryClient(sqlite_server.url) as rc:
        rc.push(demo["base"], name)
        with pytest.raises(NotFound) as nf:
            rc.get_version(f"{name}@7")
        with pytest.raises(Conflict) as cf:
            rc.push(demo["base"], name)
        with pytest.raises(InvalidInput) as ii:
            rc.set_tags(f"{name}@1", {"bad key": "x"})
    assert (nf.value.status, nf.value.code) == (404, "version_not_found")
    assert (cf.value.status, cf.value.code) == (409, "duplicate_content") and cf.value.details["existing"]
    assert (ii.value.status, ii.value.code) == (422, "invalid_tag")
    for e in (nf.value, cf.value, ii.value):
        assert isinstance(e, RegistryAPIError) and isinstance(e, RegistryClientError)
    messages: list[str] = []
    with RegistryClient(f"http://127.0.0.1:{free_port()}", retry_seconds=1, on_retry=messages.append) as rc, \
            pytest.raises(ServerUnreachable) as su:
        rc.health()
    assert isinstance(su.value, RegistryClientError) and not isinstance(su.value, RegistryAPIError)
    assert su.value.code == "server_unreachable" and any("retrying in" in m for m in messages)


def test_async_round_trip(sqlite_server: Server, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Push (through a resumable upload session: files over the threshold), pull, list, errors and
    concurrent requests with the async client; the results equal the sync client's."""
    monkeypatch.setattr(client_mod, "RESUMABLE_THRESHOLD", 256 << 10)
    monkeypatch.setattr(client_mod, "UPLOAD_CHUNK", 256 << 10)
    folder = make_base(tmp_path / "m", seed=31)
    seen: dict[str, int] = {}

    def progress(phase: str, n: int) -> None:
        seen[phase] = seen.get(phase, 0) + n

    async def main() -> tuple[Version, list[Version], list[str]]:
        async with AsyncRegistryClient(sqlite_server.url) as arc:
            v = await arc.push(folder, name, tags={"via": "async"}, progress=progress)
            got = await arc.pull(v.ref, tmp_path / "out", progress=progress)
            assert got == v
            many = await asyncio.gather(*(arc.get_version(v.ref) for _ in range(8)))
            refs = [x.ref async for x in arc.iter_versions(model=name, limit=1)]
            with pytest.raises(NotFound):
                await arc.get_model(f"{name}-nope")
            with pytest.raises(Conflict):
                await arc.push(folder, name)
            return v, list(many), refs

    v, many, refs = asyncio.run(main())
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert max(p.stat().st_size for p in folder.iterdir()) > 256 << 10  # the weights went in chunks
    assert seen == {"hash": total, "upload": total, "download": total}
    assert refs == [f"{name}@1"] and all(m == v for m in many)
    with RegistryClient(sqlite_server.url) as rc:
        assert rc.get_version(v.ref) == v and rc.search_versions(tags=["via=async"]).items == [v.model_copy(
            update={"files": None})]
    for p in folder.iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_async_download_resumes_and_checks(sqlite_server: Server, tmp_path: Path, name: str) -> None:
    """A .part file is continued with a Range request; one whose bytes are wrong is caught by the
    sha256 check (and removed), and the next pull starts over."""
    folder = make_base(tmp_path / "m", seed=32)
    weights = (folder / "model.safetensors").read_bytes()
    with RegistryClient(sqlite_server.url) as rc:
        v = rc.push(folder, name)
    sha = hashlib.sha256(weights).hexdigest()
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    part = out.with_name(out.name + ".part")

    async def fetch() -> str:
        async with AsyncRegistryClient(sqlite_server.url) as arc:
            return await arc.download_file(v.ref, "model.safetensors", out, expected_sha256=sha)

    part.write_bytes(weights[: len(weights) // 3])
    assert asyncio.run(fetch()) == sha and out.read_bytes() == weights and not part.exists()
    out.unlink()
    part.write_bytes(b"\0" * 1000)  # not a prefix of the file
    with pytest.raises(ChecksumMismatch) as e:
        asyncio.run(fetch())
    assert e.value.details["expected"] == sha and not part.exists() and not out.exists()
    assert asyncio.run(fetch()) == sha and out.read_bytes() == weights


def test_large_push_asks_before_hashing(sqlite_server: Server, tmp_path: Path, name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over the resumable threshold is hashed before sending only when the server, asked
    with a sample of it, may hold it: new bytes are sent at once (hashed while they go), identical
    bytes are still linked, not sent."""
    monkeypatch.setattr(client_mod, "RESUMABLE_THRESHOLD", 256 << 10)
    monkeypatch.setattr(client_mod, "UPLOAD_CHUNK", 256 << 10)
    hashed: list[str] = []
    real_hash = client_mod._hash_file
    monkeypatch.setattr(client_mod, "_hash_file", lambda p, progress=None: hashed.append(p.name) or real_hash(p))
    first, other = make_base(tmp_path / "a", seed=41), make_base(tmp_path / "b", seed=42)
    weights = "model.safetensors"
    size = (first / weights).stat().st_size
    assert size > 256 << 10 and (other / weights).stat().st_size == size  # same size, other bytes
    with RegistryClient(sqlite_server.url) as rc:
        v1 = rc.push(first, name)
        assert weights not in hashed  # no file of that size was stored: sent at once
        before = sqlite_server.blob_files()
        hashed.clear()
        v2 = rc.push(first, f"{name}-again")
        assert weights in hashed and sqlite_server.blob_files() == before  # may be held: hashed, linked
        hashed.clear()
        v3 = rc.push(other, f"{name}-other")
        assert weights not in hashed  # a stored file of that size, but another sample: sent at once
        assert {f.path: f.sha256 for f in v1.files or []} == {f.path: f.sha256 for f in v2.files or []}
        rc.pull(v3.ref, tmp_path / "out")
        assert (tmp_path / "out" / weights).read_bytes() == (other / weights).read_bytes()
        draft = httpx.post(sqlite_server.url + "/api/v1/drafts", json={"model": name}).json()
        probe = sqlite_server.url + f"/api/v1/drafts/{draft['id']}/probe"
        r = httpx.post(probe, json={"size": size, "sample": "not-hex"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_sha256"
        r = httpx.post(probe, json={"size": -1, "sample": "0" * 64})
        assert r.status_code == 422
        assert httpx.post(probe, json={"size": 1 << 80, "sample": "0" * 64}).json() == {"maybe_held": False,
                                                                                       "candidates": 0}
        answer = httpx.post(probe, json={"size": size, "sample": "0" * 64}).json()
        assert answer["maybe_held"] is False and answer["candidates"] >= 2  # compared, none alike
