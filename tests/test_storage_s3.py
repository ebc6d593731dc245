"""The S3-compatible blob store, against a real S3 emulator over HTTP (moto's server)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.storage.s3 import S3BlobStore

from .conftest import Server, free_port, make_server


@pytest.fixture(scope="module")
def s3_endpoint(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(k, v)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="registry-test")
    yield endpoint
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_store_operations(s3_endpoint: str, tmp_path: Path) -> None:
    store = S3BlobStore("registry-test", prefix="unit/", endpoint_url=s3_endpoint)
    data = bytes(range(256)) * 4096
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha) and store.size(sha) is None
    staged = tmp_path / "x.part"
    staged.write_bytes(data)
    store.put(sha, staged)
    assert not staged.exists()
    assert store.exists(sha) and store.size(sha) == len(data)
    assert store.read_bytes(sha) == data
    assert store.read_bytes(sha, 1000, 5000) == data[1000:5000]
    assert store.read_bytes(sha, len(data) - 3) == data[-3:]
    assert [o.sha256 for o in store.list_objects()] == [sha]
    store.delete(sha)
    assert not store.exists(sha)


@pytest.fixture(scope="module")
def s3_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str],
              s3_endpoint: str) -> Server:
    return make_server(request, tmp_path_factory, pg_databases, "sqlite", REGISTRY_STORAGE="s3",
                       REGISTRY_S3_BUCKET="registry-test", REGISTRY_S3_ENDPOINT_URL=s3_endpoint,
                       REGISTRY_S3_PREFIX="api/", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                       AWS_DEFAULT_REGION="us-east-1")


def test_push_pull_through_s3(s3_server: Server, s3_endpoint: str, demo: dict[str, Path], name: str,
                              tmp_path: Path) -> None:
    import httpx

    with s3_server.client() as rc:
        assert rc.health().storage == "s3"
        base = rc.push(demo["base"], name)
        rc.push(demo["adapter-sql"], name + "-sql", base=base.ref)
        rc.pull(base.ref, tmp_path / "out")
    for f in base.files:
        assert (tmp_path / "out" / f.path).read_bytes() == (demo["base"] / f.path).read_bytes()
    store = S3BlobStore("registry-test", prefix="api/", endpoint_url=s3_endpoint)
    assert {f.sha256 for f in base.files} <= {o.sha256 for o in store.list_objects()}
    url = f"{s3_server.url}/api/v1/models/{name}/versions/1/files/model.safetensors"
    data = (demo["base"] / "model.safetensors").read_bytes()
    assert httpx.get(url, headers={"Range": "bytes=100-199"}).content == data[100:200]
    assert not any(s3_server.blob_dir.glob("sha256/*/*/*"))  # nothing went to the local directory


def test_packed_files_on_s3(s3_server: Server, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Packing on the S3 store: payloads are S3 objects, the raw object is released, pulls and
    ranges stay exact (the pack runs in-process against the server's registry)."""
    import httpx

    from registry.config import Settings
    from registry.services import packing
    from registry.services.context import RegistryContext

    with s3_server.client() as rc:
        base = rc.push(demo["base"], name)
        ft = rc.push(demo["finetune"], name + "-ft", kind="finetune", base=base.ref)
    settings = Settings(home=s3_server.home, database_url=s3_server.database_url, storage="s3",
                        s3_bucket="registry-test", s3_endpoint_url=s3_server.env["REGISTRY_S3_ENDPOINT_URL"],
                        s3_prefix="api/")
    ctx = RegistryContext.open(settings)
    try:
        report = packing.pack_version(ctx, ft.id)
        assert report.files_packed >= 1 and report.also_packed == [base.ref]
        weights = next(f for f in ft.files if f.path.endswith(".safetensors"))
        assert not ctx.store.exists(weights.sha256)
    finally:
        ctx.close()
    with s3_server.client() as rc:
        rc.pull(ft.ref, tmp_path / "ft")
        assert rc.get_version(ft.ref).stored_bytes < ft.size
    for f in ft.files:
        assert (tmp_path / "ft" / f.path).read_bytes() == (demo["finetune"] / f.path).read_bytes()
    data = (demo["finetune"] / weights.path).read_bytes()
    r = httpx.get(f"{s3_server.url}/api/v1/models/{name}-ft/versions/1/files/{weights.path}",
                  headers={"Range": "bytes=10-99999"})
    assert r.status_code == 206 and r.content == data[10:100000]
