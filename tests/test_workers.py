"""Automations through real Celery workers, on the embedded broker and on Redis: refresh-basis
and transfer policies, MLflow provenance, a worker killed mid-job, a broker outage."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from registry.client import Basis, Job
from registry.demo import make_adapter
from registry.weights.adapters import load_peft_adapter
from registry.weights.rmm import load_basis
from registry.weights.transfer import transfer

from .conftest import Stack, make_stack


def _mlflow(stack: Stack):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    uri = f"sqlite:///{stack.server.home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _dense_error(orig: Any, rec: Any) -> float:
    num = den = 0.0
    for name in orig.modules:
        d = orig.delta(name, dtype=torch.float64)
        num += float(((rec.delta(name, dtype=torch.float64) - d) ** 2).sum())
        den += float((d ** 2).sum())
    return (num / den) ** 0.5


def test_refresh_basis_policy(stack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    third = make_adapter(tmp_path / "third", seed=3, init_seed=7)
    members = {"sql": demo["adapter-sql"], "chat": demo["adapter-chat"], "third": third}
    with stack.client() as rc:
        rc.create_policy(f"{name}-refresh", "refresh_basis", f"{name}-base", {"p": 1, "collection": f"{name}-rmm"})
        base = rc.push(demo["base"], f"{name}-base")
        refs = {k: rc.push(folder, f"{name}-{k}", base=base.ref).ref for k, folder in members.items()}

        def full_basis() -> Basis | None:
            return next((b for b in rc.list_bases(f"{name}-rmm") if len(b.members) == 3), None)

        b = stack.wait_for(full_basis, 180, "a basis over all three adapters")
        assert b.status == "ready" and b.p == 1 and b.base == base.ref
        r, n = 8, 3
        assert b.storage_ratio == pytest.approx((1 * (r + n) + r) / (r * n))
        rc.pull(b.ref, tmp_path / "basis")
        job = rc.get_job(b.job_id)
        lineage = rc.lineage(b.ref, direction="down")
    basis = load_basis(tmp_path / "basis" / "basis.safetensors")
    by_ref = {m.ref: m for m in b.members}
    for key, folder in members.items():
        m = by_ref[refs[key]]
        rebuilt = basis.reconstruct(m.position)
        assert _dense_error(load_peft_adapter(folder), rebuilt) == pytest.approx(m.error, rel=1e-4, abs=1e-7)
        assert m.error > 1e-3  # p = 1 < n - 1: a real approximation
    edges = {(e.child, e.relation) for e in lineage.edges}
    assert edges == {(ref, "basis_member_of") for ref in refs.values()}

    run = _mlflow(stack).get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "rmm" and run.data.params["p"] == "1"
    members_param = json.loads(run.data.params["members"])
    assert {m["ref"] for m in members_param} == set(refs.values())
    assert all(len(m["sha256"]) == 64 for m in members_param)
    assert run.data.metrics["storage_ratio"] == pytest.approx(b.storage_ratio)
    assert run.data.metrics["error_max"] == pytest.approx(max(m.error for m in b.members))
    assert "lineage.json" in {a.path for a in _mlflow(stack).list_artifacts(run.info.run_id)}


def test_transfer_policy_creates_candidates(stack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    with stack.client() as rc:
        rc.create_policy(f"{name}-upgrade", "transfer_on_base_update", f"{name}-base", {"alpha": 1.0})
        b1 = rc.push(demo["base"], f"{name}-base")
        ft = rc.push(demo["finetune"], f"{name}-ft", base=b1.ref)
        ad = rc.push(demo["adapter-sql"], f"{name}-sql", base=b1.ref)
        b2 = rc.push(demo["base-v2"], f"{name}-base")

        def transfers_done() -> list[Job] | None:
            jobs = [j for j in rc.list_jobs(type="transfer", limit=200) if j.params["target_base"] == b2.ref]
            return jobs if len(jobs) == 2 and all(j.state == "succeeded" for j in jobs) else None

        jobs = stack.wait_for(transfers_done, 180, "two transfer candidates")
        results = {j.params["finetune"]: j.result["ref"] for j in jobs}
        ft2 = rc.get_version(results[ft.ref])
        ad2 = rc.get_version(results[ad.ref])
        assert ft2.ref == f"{name}-ft@2" and ad2.ref == f"{name}-sql@2"
        for cand, src, rel in ((ft2, ft, "finetune_of"), (ad2, ad, "adapter_of")):
            assert cand.status == "candidate" and cand.base == b2.ref
            parents = {(p.ref, p.relation) for p in cand.parents}
            assert parents == {(src.ref, "transfer_of"), (b2.ref, rel)}
            assert cand.mlflow_run_id
        # the adapter's diff is the adapter: same bytes, re-pinned
        assert {f.sha256 for f in ad2.files} == {f.sha256 for f in ad.files}
        # candidates are not "latest" until a user promotes them
        assert rc.get_version(f"{name}-ft").version == 1
        rc.promote(ft2.ref, alias="production")
        assert rc.get_version(f"{name}-ft").version == 2
        rc.pull(ft2.ref, tmp_path / "candidate")
    expected = tmp_path / "expected"
    transfer(demo["finetune"], demo["base"], demo["base-v2"], expected, 1.0, device="cpu")
    got, want = load_file(tmp_path / "candidate" / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    direct = load_file(demo["finetune"] / "model.safetensors")
    b1w, b2w = load_file(demo["base"] / "model.safetensors"), load_file(demo["base-v2"] / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[k], b2w[k] + (direct[k] - b1w[k]), atol=1e-6)


def test_operations_by_request(stack: Stack, demo: dict[str, Path], name: str) -> None:
    with stack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        a = rc.push(demo["adapter-sql"], f"{name}-a", base=base.ref)
        c = rc.push(demo["adapter-chat"], f"{name}-c", base=base.ref)
        job = stack.wait_job(rc.create_basis([a.ref, c.ref], max_error=0.0, name=f"{name}-basis").id)
        basis = rc.get_basis(job.result["basis_id"])
        assert all(m.error < 1e-5 for m in basis.members)  # budget 0 → exact
        merged = stack.wait_job(rc.merge("ties", [a.ref, c.ref], f"{name}-merged", {"density": 0.5}).id)
        mv = rc.get_version(merged.result["ref"])
        assert mv.kind == "adapter" and mv.base == base.ref
        assert {(p.ref, p.relation) for p in mv.parents} == {
            (a.ref, "merge_of"), (c.ref, "merge_of"), (base.ref, "adapter_of")}
        v2 = rc.push(demo["base-v2"], f"{name}-base")
        t = stack.wait_job(rc.transfer(a.ref, v2.ref).id)
        assert rc.get_version(t.result["ref"]).status == "candidate"
        # every version is in the MLflow Model Registry with its registry ref
        stack.wait_for(lambda: all(j.state == "succeeded" for j in rc.list_jobs(type="mlflow_sync", limit=500)),
                       60, "mlflow sync")
    mv_tags = [v.tags for v in _mlflow(stack).search_model_versions(f"name='{name}-merged'")]
    assert mv_tags and mv_tags[0]["registry.ref"] == f"{name}-merged@1"
    assert mv_tags[0]["registry.kind"] == "adapter"


# --------------------------------------------------------------------------- crash drills


@pytest.fixture(scope="module", params=["sqla", "redis"])
def bare_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               pg_databases: list[str]) -> Stack:
    """A stack with no worker running yet (the test starts them)."""
    return make_stack(request, tmp_path_factory, pg_databases, request.param, workers=0)


def test_worker_killed_mid_job_is_retried_elsewhere(bare_stack: Stack, demo: dict[str, Path], name: str,
                                                    tmp_path: Path) -> None:
    stack = bare_stack
    slow = stack.start_worker("doomed", REGISTRY_JOB_START_DELAY="60")
    with stack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        ft = rc.push(demo["finetune"], f"{name}-ft", base=base.ref)
        v2 = rc.push(demo["base-v2"], f"{name}-base")
        job = rc.transfer(ft.ref, v2.ref)
        stack.wait_for(lambda: rc.get_job(job.id).state == "running", 60, "the doomed worker to start the job")
        assert rc.get_job(job.id).worker.startswith("doomed@")
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait()
        stack.start_worker("rescuer")
        done = stack.wait_job(job.id, timeout=120)
        assert done.state == "succeeded" and done.attempts == 2
        assert done.worker.startswith("rescuer@")
        versions = [v.ref for v in rc.iter_versions(model=f"{name}-ft")]
        assert versions == [f"{name}-ft@2", f"{name}-ft@1"]  # exactly one candidate
        time.sleep(2 * 3)  # a redelivered message (Redis) must not make a second one
        assert [v.ref for v in rc.iter_versions(model=f"{name}-ft")] == versions
        rc.pull(done.result["ref"], tmp_path / "rescued")  # verifies every sha256
    orphan_objects, unreferenced_rows = stack.server.leftovers()
    assert orphan_objects == set() and unreferenced_rows == set()
    # the retried job's output is exactly the transfer of its inputs
    transfer(demo["finetune"], demo["base"], demo["base-v2"], tmp_path / "expected", 1.0, device="cpu")
    got = load_file(tmp_path / "rescued" / "model.safetensors")
    want = load_file(tmp_path / "expected" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_broker_outage_loses_no_event(bare_stack: Stack, demo: dict[str, Path], name: str) -> None:
    stack = bare_stack
    if stack.redis is None:
        pytest.skip("the embedded broker is a file beside the database; this drill is for Redis")
    stack.start_worker("steady")
    with stack.client() as rc:
        rc.create_policy(f"{name}-up", "transfer_on_base_update", f"{name}-base", {})
        base = rc.push(demo["base"], f"{name}-base")
        ft = rc.push(demo["finetune"], f"{name}-ft", base=base.ref)
        stack.redis.stop()
        v2 = rc.push(demo["base-v2"], f"{name}-base")  # the event is committed with the version
        time.sleep(2)
        pending = [j for j in rc.list_jobs(type="transfer", limit=100) if j.params["target_base"] == v2.ref]
        assert len(pending) == 1 and pending[0].state == "queued"  # created from the outbox, not yet sent
        stack.redis.start()
        done = stack.wait_job(pending[0].id, timeout=120)
        assert done.result["ref"] == f"{name}-ft@2"
        parents = {(p.ref, p.relation) for p in rc.get_version(done.result["ref"]).parents}
        assert parents == {(ft.ref, "transfer_of"), (v2.ref, "finetune_of")}


_PREPARE = """
import sys, time
start = float(sys.argv[1])
from workers.app import prepare_broker
while time.time() < start:
    time.sleep(0.001)
prepare_broker()
"""


def test_processes_starting_together_all_reach_the_embedded_broker(tmp_path: Path) -> None:
    """Found by CI: two workers and the dispatcher starting at once on a fresh embedded broker raced
    kombu's check-then-insert ("UNIQUE constraint failed: kombu_queue.name", "table kombu_queue
    already exists"); the loser never consumed and every job stayed queued. Eight processes released
    at the same instant must all declare the queues, and each queue must exist once."""
    import sqlite3
    import subprocess
    import sys

    env = {**os.environ, "REGISTRY_HOME": str(tmp_path)}
    env.pop("REGISTRY_BROKER_URL", None)
    start = time.time() + 8  # after every interpreter has imported celery
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(8)]
    outputs = [(p.wait(60), p.stdout.read().decode() if p.stdout else "") for p in procs]
    failed = [out for rc, out in outputs if rc != 0]
    assert not failed, failed[0][-2000:]
    with sqlite3.connect(tmp_path / "broker.db") as db:
        names = sorted(n for (n,) in db.execute("SELECT name FROM kombu_queue"))
    assert names == ["cpu", "gpu"]
