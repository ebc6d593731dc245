"""Every job that works on versions (basis, transfer, merge, prune, verify) is an MLflow run and the job
records its id: also a verify, a job with nothing to do, one that fails while loading its inputs (the run
is FAILED with the error) and one whose output the registry already held. The prune run has a
``lineage.json``. A transfer asked ``--derived`` when the registry already stores that very transfer is
refused before a job exists (409 ``transfer_exists``) instead of answered with the stored version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry.client import Job, JobFailed, RegistryAPIError
from registry.demo import make_adapter

from .conftest import Stack, make_stack


@pytest.fixture(scope="module")
def pstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           pg_databases: list[str]) -> Stack:
    # one attempt per job: a job that fails on its inputs fails at once
    return make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1, REGISTRY_JOB_MAX_ATTEMPTS="1")


def _mlflow(stack: Stack) -> Any:
    from mlflow import MlflowClient

    uri = f"sqlite:///{stack.server.home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run(stack: Stack, job: Job) -> Any:
    assert job.mlflow_run_id, f"job {job.id} ({job.type}, {job.state}) has no MLflow run"
    return _mlflow(stack).get_run(job.mlflow_run_id)


def _artifacts(stack: Stack, run: Any) -> dict[str, Any]:
    client = _mlflow(stack)
    return {a.path: json.loads(Path(client.download_artifacts(run.info.run_id, a.path)).read_text())
            for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".json")}


def _experiment(stack: Stack, run: Any) -> str:
    return str(_mlflow(stack).get_experiment(run.info.experiment_id).name)


def test_a_verify_job_has_a_run(pstack: Stack, demo: dict[str, Path], name: str) -> None:
    with pstack.client() as rc:
        v = rc.push(demo["adapter-sql"], name, base=rc.push(demo["base"], f"{name}-base").ref)
        job = pstack.wait_job(rc.verify(v.ref).id)
    assert job.result["ok"]
    run = _run(pstack, job)
    assert run.info.status == "FINISHED" and _experiment(pstack, run) == f"registry/{name}"
    assert run.data.params["operation"] == "verify" and run.data.params["ref"] == v.ref
    assert run.data.params["sha256"] == v.content_sha256
    assert run.data.tags["registry.verified"] == "true" and run.data.tags["registry.job"] == str(job.id)
    assert run.data.metrics["files"] == 2 and run.data.metrics["mismatches"] == 0
    assert _artifacts(pstack, run)["verify.json"]["ok"] is True


def test_a_skipped_job_has_a_run(pstack: Stack, demo: dict[str, Path], name: str) -> None:
    """A refresh_basis policy fires for the first adapter of a base: one adapter is no basis."""
    with pstack.client() as rc:
        rc.create_policy(f"{name}-refresh", "refresh_basis", f"{name}-base", {"p": 1})
        base = rc.push(demo["base"], f"{name}-base")
        rc.push(demo["adapter-sql"], f"{name}-sql", base=base.ref)

        def refresh() -> dict[str, Any] | None:
            return next((j for j in rc.list_jobs(type="basis", limit=200)
                         if (j.params.get("query") or {}).get("base") == base.ref
                         and j.state in ("succeeded", "failed")), None)

        job = pstack.wait_for(refresh, 120, "the policy's basis job")
    assert job.state == "succeeded" and "a basis needs 2" in job.result["skipped"]
    run = _run(pstack, job)
    assert run.info.status == "FINISHED" and _experiment(pstack, run) == f"registry/{name}-base-rmm"
    assert run.data.tags["registry.skipped"] == job.result["skipped"]


def test_a_job_failing_on_its_inputs_has_a_failed_run(pstack: Stack, demo: dict[str, Path], name: str,
                                                        tmp_path: Path) -> None:
    with pstack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        refs = [rc.push(make_adapter(tmp_path / k, seed=s, init_seed=7), f"{name}-{k}", base=base.ref)
                for k, s in (("a", 41), ("b", 42))]
    # the stored bytes of one member go bad after its push (its own blob: no other test shares it)
    sha = next(f.sha256 for f in refs[1].files if f.path == "adapter_model.safetensors")
    blob = pstack.server.blob_dir / "sha256" / sha[:2] / sha[2:4] / sha
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * 64)
    with pstack.client() as rc:
        queued = rc.create_basis([r.ref for r in refs], p=1)
        with pytest.raises(JobFailed):
            rc.wait_job(queued.id, timeout=120, poll=0.2)
        job = rc.get_job(queued.id)
    assert job.state == "failed"
    run = _run(pstack, job)
    assert run.info.status == "FAILED" and _experiment(pstack, run) == f"registry/{name}-base-rmm"
    assert run.data.tags["registry.status"] == "failed" and run.data.tags["registry.error"]
    assert json.loads(run.data.params["members"])[1]["ref"] == refs[1].ref  # what it was loading
    # the CLI following it: exit 8 (job failed), the job's error as JSON on stderr's last line
    p = pstack.server.cli("jobs", str(queued.id), "--wait", "--json", check=False)
    assert p.returncode == 8, p.stderr
    err = json.loads(p.stderr.strip().splitlines()[-1])["error"]
    assert err["exit_code"] == 8 and err["code"] == job.error["code"] and f"job {queued.id} failed" in err["message"]


def test_the_prune_run_has_lineage(pstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    with pstack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        refs = [rc.push(make_adapter(tmp_path / k, seed=s, init_seed=7), f"{name}-{k}", base=base.ref)
                for k, s in (("a", 51), ("b", 52))]
        basis = pstack.wait_job(rc.create_basis([r.ref for r in refs], p=1, name=f"{name}-rmm").id)
        job = pstack.wait_job(rc.prune(basis.result["basis_id"], max_error=0.0).id)
        after = rc.get_version(refs[0].ref)
    run = _run(pstack, job)
    assert run.info.status == "FINISHED" and _experiment(pstack, run) == f"registry/{name}-rmm"
    lineage = _artifacts(pstack, run)["lineage.json"]
    assert lineage["operation"] == "prune" and lineage["inputs"][0]["ref"] == f"{name}-rmm@1"
    member = next(m for m in lineage["pruned"] if m["ref"] == refs[0].ref)
    # what it was (its content sha256 and files as pushed) and what it is now (the rebuilt files)
    assert member["content_sha256"] == refs[0].content_sha256 == after.content_sha256
    assert member["original_files"] == {f.path: f.sha256 for f in refs[0].files}
    assert member["files"] == {f.path: f.sha256 for f in after.files}
    # `registry show` says which sha256 is which: the content sha256 names the version as pushed, the
    # file sha256s are those of the rebuilt files it serves now
    shown = " ".join(pstack.server.cli("show", refs[0].ref).stdout.split())
    assert f"content sha256 {after.content_sha256} (of the files as pushed;" in shown
    weights = next(f.sha256 for f in after.files if f.path == "adapter_model.safetensors")
    assert weights[:24] in shown and weights not in {f.sha256 for f in refs[0].files}


def test_transfers_of_inputs_already_transferred(pstack: Stack, demo: dict[str, Path], name: str) -> None:
    with pstack.client() as rc:
        b1 = rc.push(demo["base"], f"{name}-base")
        ft = rc.push(demo["finetune"], f"{name}-ft", base=b1.ref)
        b2 = rc.push(demo["base-v2"], f"{name}-base")
        first = pstack.wait_job(rc.transfer(ft.ref, b2.ref).id)
        assert first.result["ref"] == f"{name}-ft@2"
        jobs_before = len(rc.list_jobs(type="transfer", limit=500))

        # --derived of a transfer the registry stores: refused before a job exists, saying which and why
        with pytest.raises(RegistryAPIError) as e:
            rc.transfer(ft.ref, b2.ref, 1.0, "derived")
        assert e.value.status == 409 and e.value.code == "transfer_exists"
        assert e.value.details["existing"] == f"{name}-ft@2" and e.value.details["storage_mode"] == "stored"
        assert f"{name}-ft@2" in e.value.message and "archive" in e.value.message
        assert len(rc.list_jobs(type="transfer", limit=500)) == jobs_before

        # the same transfer again: the existing version, said so, and the job still has its run
        again = pstack.wait_job(rc.transfer(ft.ref, b2.ref).id)
        assert again.result["ref"] == f"{name}-ft@2" and again.result["deduplicated"] is True
        assert "no new version" in again.result["message"]
        assert [v.ref for v in rc.iter_versions(model=f"{name}-ft", status="candidate")] == [f"{name}-ft@2"]
    run = _run(pstack, again)
    assert run.info.status == "FINISHED" and run.data.tags["registry.deduplicated"] == f"{name}-ft@2"
    assert "lineage.json" in _artifacts(pstack, run)

    # the CLI says both plainly
    derived = pstack.server.cli("transfer", ft.ref, "--to", b2.ref, "--derived", "--wait", check=False)
    assert derived.returncode != 0 and "transfer_exists" in derived.stderr and f"{name}-ft@2" in derived.stderr
    stored = pstack.server.cli("transfer", ft.ref, "--to", b2.ref, "--wait")
    assert stored.stdout.strip().splitlines()[-1] == f"{name}-ft@2"
    assert "already holds exactly this output" in " ".join(stored.stderr.split())

    # another alpha is another transfer: --derived makes a derived version
    with pstack.client() as rc:
        half = pstack.wait_job(rc.transfer(ft.ref, b2.ref, 0.5, "derived").id)
        v = rc.get_version(half.result["ref"])
    assert v.ref == f"{name}-ft@3" and v.storage_mode == "derived:diff"
