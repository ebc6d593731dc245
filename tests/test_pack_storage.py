"""Packed storage end to end: API + dispatcher + Celery workers, SQLite and PostgreSQL.

Every version is packed after its commit (``REGISTRY_PACK=auto``); a pull returns the bytes that
were pushed (same sha256), ranges included; identical tensors are kept once; packed versions
are inputs of every job type; a damaged payload is found by verify; gc never collects what a
packed file still needs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.client import Job
from registry.config import Settings
from registry.demo import Shape, make_adapter, make_finetune, random_weights, save_checkpoint
from registry.services.context import RegistryContext

from .conftest import Stack, make_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["sqla", "redis"])
def packed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, request.param, REGISTRY_PACK="auto")


@contextmanager
def _context(stack: Stack) -> Iterator[RegistryContext]:
    """The stack's registry, in this process (to look behind the API)."""
    ctx = RegistryContext.open(Settings(home=stack.server.home, database_url=stack.server.database_url))
    try:
        yield ctx
    finally:
        ctx.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pack_jobs_done(stack: Stack, ref: str) -> list[Job]:
    def done() -> list[Job] | None:
        with stack.client() as rc:
            jobs = [j for j in rc.list_jobs(type="pack", limit=500) if j.params.get("ref") == ref]
        if jobs and all(j.state in ("succeeded", "failed") for j in jobs):
            return jobs
        return None

    jobs = stack.wait_for(done, what=f"pack jobs of {ref}")
    assert all(j.state == "succeeded" for j in jobs), jobs
    return jobs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pack-models")
    shape = Shape(hidden=128, intermediate=256)
    base = {n: t.to(torch.bfloat16) for n, t in random_weights(shape, seed=0).items()}
    out = {"base": save_checkpoint(root / "base", base, shape)}
    out["ft"] = make_finetune(root / "ft", base, seed=3, shape=shape)
    tuned = load_file(str(out["ft"] / "model.safetensors"))
    out["ft-resharded"] = save_checkpoint(root / "ft-resharded", tuned, shape, shards=2)
    out["base-v2"] = make_finetune(root / "base-v2", base, seed=4, scale=0.001, shape=shape)
    out["adapter-a"] = make_adapter(root / "adapter-a", seed=1, init_seed=7, shape=shape)
    out["adapter-b"] = make_adapter(root / "adapter-b", seed=2, init_seed=7, shape=shape)
    return out


def test_pull_is_byte_exact_and_finetunes_cost_their_delta(packed: Stack, models: dict[str, Path], name: str,
                                                          tmp_path: Path) -> None:
    with packed.client() as rc:
        b = rc.push(models["base"], f"{name}-base", kind="base")
        ft = rc.push(models["ft"], f"{name}-ft", kind="finetune", base=b.ref)
    for ref in (b.ref, ft.ref):
        _pack_jobs_done(packed, ref)
    with packed.client() as rc:
        b, ft = rc.get_version(b.ref), rc.get_version(ft.ref)
        assert 0 < ft.stored_bytes < 0.6 * ft.size, ft  # bf16 fine-tune coded against its base
        assert 0 < b.stored_bytes <= b.size
        for v, folder in ((b, models["base"]), (ft, models["ft"])):
            got = rc.pull(v.ref, tmp_path / v.ref.replace("@", "-"))
            for f in got.files:
                assert _sha(tmp_path / v.ref.replace("@", "-") / f.path) == _sha(folder / f.path)
        # a range decodes only what it overlaps, and is exact
        data = (models["ft"] / "model.safetensors").read_bytes()
        url = f"{packed.url}/api/v1/models/{name}-ft/versions/1/files/model.safetensors"
        for start, end in ((0, 8), (1000, 70_000), (len(data) - 5, len(data) - 1)):
            r = httpx.get(url, headers={"Range": f"bytes={start}-{end}"})
            assert r.status_code == 206 and r.content == data[start:end + 1]
        report = rc.storage()
    row = {m.model: m for m in report.models}[f"{name}-ft"]
    assert row.stored_bytes == ft.stored_bytes and row.logical_bytes == ft.size
    out = packed.server.cli("pack", ft.ref, "--wait").stdout  # already packed: nothing to do
    assert f"{ft.ref}: 0 files packed" in out and "stored" in out
    # the raw objects were released once the packed form read back
    sha = next(f.sha256 for f in ft.files if f.path == "model.safetensors")
    assert sha not in packed.server.blob_files()


def test_identical_tensors_are_stored_once(packed: Stack, models: dict[str, Path], name: str) -> None:
    with packed.client() as rc:
        b = rc.push(models["base"], f"{name}-base", kind="base")
        ft = rc.push(models["ft"], f"{name}-ft", kind="finetune", base=b.ref)
        again = rc.push(models["ft-resharded"], f"{name}-ft", kind="finetune", base=b.ref)
    for ref in (b.ref, ft.ref, again.ref):
        _pack_jobs_done(packed, ref)
    with packed.client() as rc:
        again = rc.get_version(again.ref)
    assert again.stored_bytes <= 0.01 * again.size, again


def test_packed_versions_are_inputs_of_every_job_type(packed: Stack, models: dict[str, Path], name: str,
                                                     tmp_path: Path) -> None:
    with packed.client() as rc:
        b = rc.push(models["base"], f"{name}-base", kind="base")
        b2 = rc.push(models["base-v2"], f"{name}-base", kind="base")
        ft = rc.push(models["ft"], f"{name}-ft", kind="finetune", base=b.ref)
        a = rc.push(models["adapter-a"], f"{name}-a", kind="adapter", base=b.ref)
        a2 = rc.push(models["adapter-b"], f"{name}-b", kind="adapter", base=b.ref)
    for v in (b, b2, ft, a, a2):
        _pack_jobs_done(packed, v.ref)
    with packed.client() as rc:
        jobs = [rc.transfer(ft.ref, b2.ref),
                rc.merge("ties", [a.ref, a2.ref], f"{name}-merged", params={"density": 0.5}, rank=8),
                rc.create_basis([a.ref, a2.ref], p=1)]
    for j in jobs:
        done = packed.wait_job(j.id, timeout=300)
        assert done.state == "succeeded", done
    with packed.client() as rc:
        out = rc.get_version(packed.wait_job(jobs[0].id).result["ref"])
        rc.pull(out.ref, tmp_path / "transfer")


def test_verify_finds_a_damaged_payload(packed: Stack, name: str, tmp_path: Path) -> None:
    folder = tmp_path / "unique"
    folder.mkdir()
    g = torch.Generator().manual_seed(hash(name) % (2**31))
    save_file({"w": torch.randn(256, 256, generator=g).to(torch.bfloat16)}, str(folder / "model.safetensors"))
    with packed.client() as rc:
        b = rc.push(folder, f"{name}-solo", kind="base")
    _pack_jobs_done(packed, b.ref)
    with packed.client() as rc:
        assert packed.wait_job(rc.verify(b.ref).id).result["ok"] is True
    sha = b.files[0].sha256
    with _context(packed) as ctx, ctx.db.read() as s:
        from sqlalchemy import select

        from registry.models import BlobSegment, Chunk

        objects = list(s.scalars(select(Chunk.object_sha256).join(BlobSegment, BlobSegment.chunk_sha256 == Chunk.sha256)
                                 .where(BlobSegment.blob_sha256 == sha, BlobSegment.key.is_not(None))))
        paths = [ctx.store.local_path(o) for o in objects]
    assert paths and all(p is not None for p in paths)
    for p in paths:
        raw = bytearray(p.read_bytes())  # type: ignore[union-attr]
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))  # type: ignore[union-attr]
    with packed.client() as rc:
        result = packed.wait_job(rc.verify(b.ref).id).result
        assert result["ok"] is False
        assert rc.get_version(b.ref).corrupt is True
    try:  # never served as the file: a 500 before the body, or the connection cut mid-body
        r = httpx.get(f"{packed.url}/api/v1/models/{name}-solo/versions/1/files/model.safetensors")
        assert r.status_code == 500, r.status_code
    except httpx.RemoteProtocolError:
        pass


def test_downloads_stay_exact_while_packing(packed: Stack, models: dict[str, Path], name: str) -> None:
    data = (models["ft"] / "model.safetensors").read_bytes()
    want = hashlib.sha256(data).hexdigest()
    with packed.client() as rc:
        b = rc.push(models["base"], f"{name}-base", kind="base")
        ft = rc.push(models["ft"], f"{name}-ft", kind="finetune", base=b.ref)
    url = f"{packed.url}/api/v1/models/{name}-ft/versions/1/files/model.safetensors"
    bad: list[str] = []
    stop = threading.Event()

    def pull_loop() -> None:
        while not stop.is_set():
            r = httpx.get(url, timeout=30)
            if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != want:
                bad.append(f"{r.status_code} {len(r.content)}")

    t = threading.Thread(target=pull_loop)
    t.start()
    try:
        _pack_jobs_done(packed, b.ref)
        _pack_jobs_done(packed, ft.ref)
    finally:
        stop.set()
        t.join()
    assert not bad


def test_gc_keeps_what_packed_files_need(packed: Stack, models: dict[str, Path], name: str, tmp_path: Path) -> None:
    """A base whose tensors a fine-tune is coded against loses its own file; gc must keep the
    chunks the fine-tune needs (the reference stays), and the fine-tune still pulls exactly."""
    from registry.services import gc

    folder = tmp_path / "solo-base"
    folder.mkdir()
    t = load_file(str(models["base"] / "model.safetensors"))
    save_file(t, str(folder / "model.safetensors"), metadata={"note": name})
    with packed.client() as rc:
        b = rc.push(folder, f"{name}-base", kind="base")
        ft = rc.push(models["ft"], f"{name}-ft", kind="finetune", base=b.ref)
    for v in (b, ft):
        _pack_jobs_done(packed, v.ref)
    with _context(packed) as ctx:
        from sqlalchemy import delete

        from registry.models import VersionFile

        with ctx.db.write() as s:  # the base's file gone (as if its version had been deleted)
            s.execute(delete(VersionFile).where(VersionFile.version_id == b.id,
                                                VersionFile.path == "model.safetensors"))
        report = gc.collect(ctx, grace_seconds=0)
        assert report.blob_rows_removed >= 1
    with packed.client() as rc:
        got = rc.pull(ft.ref, tmp_path / "ft")
    for f in got.files:
        assert _sha(tmp_path / "ft" / f.path) == _sha(models["ft"] / f.path)
