"""Stored bytes missing or wrong on disk are never served as a silent short or wrong body: the
client sees an error, the version is marked corrupt, and a ``version.corrupt`` event is written
(once). A verify that passes after the bytes are restored clears the mark."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from registry.client import Event, Job, Version

from .conftest import Server


def _push(srv: Server, demo: dict[str, Path], name: str) -> tuple[Version, Path, str]:
    with srv.client() as rc:
        v = rc.push(demo["base"], name)
    f = next(f for f in v.files if f.path.endswith(".safetensors"))
    sha = f.sha256
    return v, srv.blob_dir / "sha256" / sha[:2] / sha[2:4] / sha, f.path


def _corrupt_events(srv: Server, ref: str) -> list[Event]:
    with srv.client() as rc:
        return [e for e in rc.events(limit=1000) if e.type == "version.corrupt" and (e.payload or {}).get("ref") == ref]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_short_blob_is_a_loud_error(sqlite_server: Server, demo: dict[str, Path], name: str,
                                               tmp_path: Path, damage: str) -> None:
    srv = sqlite_server
    v, blob, path = _push(srv, demo, name)
    backup = tmp_path / "backup"
    shutil.copyfile(blob, backup)
    if damage == "missing":
        blob.unlink()
    else:
        with open(blob, "r+b") as f:
            f.truncate(blob.stat().st_size // 2)
    url = f"{srv.url}/api/v1/models/{name}/versions/1/files/{path}"
    r = httpx.get(url)
    assert r.status_code == 500, (r.status_code, len(r.content))
    assert r.json()["error"]["code"] == "data_corrupt"
    r2 = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert r2.status_code == 500
    with srv.client() as rc:
        assert rc.get_version(v.ref).corrupt is True
    assert len(_corrupt_events(srv, str(v.ref))) == 1  # once, however often it is read

    shutil.copyfile(backup, blob)  # the operator restores the bytes; a verify clears the mark
    with srv.client() as rc:
        job = rc.verify(v.ref)
    srv_job = _wait_verify(srv, job.id)
    assert srv_job.result is not None and srv_job.result["ok"] is True
    with srv.client() as rc:
        assert rc.get_version(v.ref).corrupt is False
    assert httpx.get(url).status_code == 200


def _wait_verify(srv: Server, job_id: int) -> Job:
    import subprocess
    import sys

    # no worker runs beside this server: run the queued job in-process, as a worker would
    subprocess.run([sys.executable, "-c", (
        "from registry.services.context import RegistryContext;"
        "from registry.services import runner;"
        f"ctx = RegistryContext.open(); print(runner.run(ctx, {job_id}, 'test'))")], env=srv.env, check=True,
        capture_output=True, text=True)
    with srv.client() as rc:
        return rc.get_job(job_id)


def test_same_size_wrong_bytes_cut_the_response(sqlite_server: Server, demo: dict[str, Path], name: str) -> None:
    srv = sqlite_server
    v, blob, path = _push(srv, demo, name)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, last byte wrong
    blob.write_bytes(bytes(data))
    url = f"{srv.url}/api/v1/models/{name}/versions/1/files/{path}"
    # the connection is cut before the body completes
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", url) as r:
        assert r.status_code == 200
        received = b"".join(r.iter_bytes())
        raise AssertionError(f"a complete-looking body of {len(received)} bytes was served")
    with srv.client() as rc:
        assert rc.get_version(v.ref).corrupt is True
    assert len(_corrupt_events(srv, str(v.ref))) == 1
