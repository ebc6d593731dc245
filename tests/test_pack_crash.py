"""A pack that dies at any step leaves the version servable and byte-exact, and the retry (or gc)
finishes the work: the crash states are produced in-process, against a real server's registry."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from registry.client import Version
from registry.config import Settings
from registry.models import Blob
from registry.services import content, gc, packing
from registry.services.context import RegistryContext

from .conftest import Server, make_server


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, request.param)  # REGISTRY_PACK=off: no worker packs


@pytest.fixture
def ctx(srv: Server) -> Iterator[RegistryContext]:
    c = RegistryContext.open(Settings(home=srv.home, database_url=srv.database_url))
    yield c
    c.close()


def _push(srv: Server, name: str, tmp_path: Path, seed: int) -> tuple[Version, bytes]:
    folder = tmp_path / f"v{seed}"
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({f"layer{i}.weight": torch.randn(128, 64, generator=g) for i in range(4)},
              str(folder / "model.safetensors"))
    with srv.client() as rc:
        v = rc.push(folder, name, kind="base")
    return v, (folder / "model.safetensors").read_bytes()


def _download(srv: Server, name: str) -> bytes:
    r = httpx.get(f"{srv.url}/api/v1/models/{name}/versions/1/files/model.safetensors", timeout=30)
    assert r.status_code == 200
    return r.content


def _form(ctx: RegistryContext, sha: str) -> tuple[str, int]:
    with ctx.db.read() as s:
        row = s.execute(select(Blob.form, Blob.stored_size).where(Blob.sha256 == sha)).one()
    return str(row[0]), int(row[1])


class Died(BaseException):
    """Stands for kill -9: nothing after it runs, no cleanup handler sees an Exception."""


def test_death_before_the_commit_leaves_the_file_raw(srv: Server, ctx: RegistryContext, name: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    v, data = _push(srv, name, tmp_path, 1)
    sha = hashlib.sha256(data).hexdigest()

    def die(*a: object, **k: object) -> None:
        raise Died

    monkeypatch.setattr(packing, "_commit", die)
    with pytest.raises(Died):
        packing.pack_version(ctx, v.id)
    monkeypatch.undo()
    assert _form(ctx, sha) == ("raw", len(data))
    assert _download(srv, name) == data
    # the payloads it wrote are claims nobody commits: gc removes them after the grace period only
    assert not gc.collect(ctx, grace_seconds=3600).blob_rows_removed
    # the retried job finishes the work
    report = packing.pack_version(ctx, v.id)
    assert report.files_packed == 1
    assert _form(ctx, sha) == ("packed", 0)
    assert _download(srv, name) == data
    assert content.read_bytes(ctx, sha, 100, 5000) == data[100:5000]


def test_death_after_the_commit_keeps_the_raw_bytes_until_gc(srv: Server, ctx: RegistryContext, name: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v, data = _push(srv, name, tmp_path, 2)
    sha = hashlib.sha256(data).hexdigest()

    def die(*a: object, **k: object) -> None:
        raise Died

    monkeypatch.setattr(content, "release_raw", die)
    with pytest.raises(Died):
        packing.pack_version(ctx, v.id)
    monkeypatch.undo()
    assert _form(ctx, sha) == ("packed", len(data))  # packed, raw object still held
    assert ctx.store.exists(sha)
    assert _download(srv, name) == data
    report = gc.collect(ctx, grace_seconds=0)
    assert report.raw_released >= 1
    assert not ctx.store.exists(sha)
    assert _form(ctx, sha) == ("packed", 0)
    assert _download(srv, name) == data


def test_a_reader_that_missed_the_raw_bytes_reads_the_packed_form(srv: Server, ctx: RegistryContext, name: str,
                                                                   tmp_path: Path) -> None:
    v, data = _push(srv, name, tmp_path, 3)
    sha = hashlib.sha256(data).hexdigest()
    stream = content.iter_range(ctx, sha)  # looked up while raw: not opened yet
    packing.pack_version(ctx, v.id)
    assert not ctx.store.exists(sha)
    assert b"".join(stream) == data


def test_packing_twice_changes_nothing(srv: Server, ctx: RegistryContext, name: str, tmp_path: Path) -> None:
    v, data = _push(srv, name, tmp_path, 4)
    first = packing.pack_version(ctx, v.id)
    again = packing.pack_version(ctx, v.id)
    assert first.files_packed == 1 and again.files_packed == 0 and again.files_already_packed == 1
    assert again.stored_bytes == first.stored_bytes
    assert _download(srv, name) == data


def test_cli_pack_and_storage(srv: Server, name: str, tmp_path: Path) -> None:
    """`registry pack REF` and `registry storage` as a user sees them (this server runs no
    worker: the job is queued, and the CLI says so; `--wait` is exercised in test_pack_storage)."""
    import json

    v, data = _push(srv, name, tmp_path, 5)
    assert "queued" in srv.cli("pack", v.ref).stdout
    report = json.loads(srv.cli("storage", "--json").stdout)
    row = {m["model"]: m for m in report["models"]}[name]
    assert row["logical_bytes"] == row["stored_bytes"] == len(data)  # not packed yet: raw bytes count
    assert report["pack"] == "off"
    table = srv.cli("storage").stdout
    assert name in table and "total" in table
