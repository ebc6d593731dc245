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
        assert rc.health()["storage"] == "s3"
        base = rc.push(demo["base"], name)
        rc.push(demo["adapter-sql"], name + "-sql", base=base["ref"])
        rc.pull(base["ref"], tmp_path / "out")
    for f in base["files"]:
        assert (tmp_path / "out" / f["path"]).read_bytes() == (demo["base"] / f["path"]).read_bytes()
    store = S3BlobStore("registry-test", prefix="api/", endpoint_url=s3_endpoint)
    assert {f["sha256"] for f in base["files"]} <= {o.sha256 for o in store.list_objects()}
    url = f"{s3_server.url}/api/v1/models/{name}/versions/1/files/model.safetensors"
    data = (demo["base"] / "model.safetensors").read_bytes()
    assert httpx.get(url, headers={"Range": "bytes=100-199"}).content == data[100:200]
    assert not any(s3_server.blob_dir.glob("sha256/*/*/*"))  # nothing went to the local directory
