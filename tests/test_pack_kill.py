"""A worker process killed with SIGKILL while it is inside the pack of a file: real processes (API,
dispatcher, Celery workers; SQLite + the embedded broker, PostgreSQL + Redis).

The doomed worker codes segments slowly (``REGISTRY_PACK_SEGMENT_DELAY``), so the kill lands after
it has written some payloads of the first file and before it has finished that file. The version
is servable byte-exact while it packs and after the kill; the job is retried by another worker and
completes; afterwards every version reads back byte-exact, gc leaves exactly what is needed (no
store object without a row, no row nothing needs) and removes the killed attempt's scratch space.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select

from registry.client import Job
from registry.models import Blob
from registry.services import gc, runner

from .conftest import Stack, make_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["sqla", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, request.param, workers=0, REGISTRY_PACK="auto")


def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two safetensors files of three 2 MiB bf16 tensors each (a segment per tensor)."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    for k, part in enumerate((names[:3], names[3:])):
        save_file({n: tensors[n] for n in part}, str(folder / f"model-{k + 1:05d}-of-00002.safetensors"))
    (folder / "config.json").write_text('{"model_type": "drill"}\n')
    return folder


def _pull_exact(stack: Stack, ref: str, folder: Path) -> None:
    name, v = ref.split("@")
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        url = f"{stack.url}/api/v1/models/{name}/versions/{v}/files/{f.name}"
        assert httpx.get(url, timeout=60).content == data
        cut = len(data) // 2  # across segment boundaries
        r = httpx.get(url, headers={"Range": f"bytes={cut - 3000}-{cut + 5000}"}, timeout=60)
        assert r.status_code == 206 and r.content == data[cut - 3000:cut + 5001]


def _pack_job(stack: Stack, ref: str) -> Job | None:
    with stack.client() as rc:
        jobs = [j for j in rc.list_jobs(type="pack", limit=500) if j.params.get("ref") == ref]
    return jobs[0] if jobs else None


def _forms(stack: Stack, folder: Path) -> set[str]:
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")]
    with stack.server.context() as ctx, ctx.db.read() as s:
        return set(s.scalars(select(Blob.form).where(Blob.sha256.in_(shas))))


def test_worker_killed_inside_the_pack_of_a_file(stack: Stack, name: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(11)
    base = {f"layer{i}.weight": (torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16) for i in range(6)}
    tuned = {n: (t.float() + torch.randn(t.shape, generator=g) * 2e-4).to(torch.bfloat16) for n, t in base.items()}
    base_dir, ft_dir = _checkpoint(tmp_path / "base", base), _checkpoint(tmp_path / "ft", tuned)

    steady = stack.start_worker("steady")
    with stack.client() as rc:
        b = rc.push(base_dir, f"{name}-base", kind="base")
    job = stack.wait_for(lambda: _pack_job(stack, b.ref), what="the base's pack job")
    assert stack.wait_job(job.id).state == "succeeded"
    steady.terminate()
    steady.wait(30)

    doomed = stack.start_worker("doomed", REGISTRY_PACK_SEGMENT_DELAY="2")
    with stack.client() as rc:
        ft = rc.push(ft_dir, f"{name}-ft", kind="finetune", base=b.ref)
    job = stack.wait_for(lambda: _pack_job(stack, ft.ref), what="the fine-tune's pack job")
    job_id = job.id
    with stack.server.context() as ctx:
        scratch = runner.attempt_dir(ctx, job_id, 1)

    def inside_a_file() -> bool:  # a payload of the first file written, the file not yet done
        return any(p.is_file() for p in scratch.glob("pack-*/*"))

    stack.wait_for(inside_a_file, 120, "the doomed worker to code a segment")
    _pull_exact(stack, ft.ref, ft_dir)  # servable while it packs
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    with stack.client() as rc:
        running = rc.get_job(job_id)
    assert running.state == "running" and str(running.worker).startswith("doomed@")
    # killed inside the pack of a file: coded payloads in its scratch space, a file still raw
    assert inside_a_file() and "raw" in _forms(stack, ft_dir)
    _pull_exact(stack, ft.ref, ft_dir)  # servable after the kill

    stack.start_worker("rescuer")
    done = stack.wait_job(job_id, timeout=300)
    assert done.state == "succeeded" and done.attempts == 2, done
    assert str(done.worker).startswith("rescuer@")
    assert done.result is not None and done.result["files_packed"] == 2
    assert _forms(stack, ft_dir) == {"packed"}
    with stack.client() as rc:
        v = rc.get_version(ft.ref)
    assert 0 < v.stored_bytes < 0.5 * v.size  # coded against its base
    for f in v.files:
        if f.path.endswith(".safetensors"):
            assert f.sha256 not in stack.server.blob_files()  # raw bytes released
    _pull_exact(stack, ft.ref, ft_dir)

    with stack.server.context() as ctx:
        report = gc.collect(ctx, grace_seconds=0)
    assert report.work_dirs_removed >= 1 and not scratch.exists()
    assert stack.server.leftovers() == (set(), set())
    _pull_exact(stack, b.ref, base_dir)  # gc kept what the packed files need
    _pull_exact(stack, ft.ref, ft_dir)
    with stack.client() as rc:
        for ref in (b.ref, ft.ref):
            result = stack.wait_job(rc.verify(ref).id).result
            assert result is not None and result["ok"] is True
