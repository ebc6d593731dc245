"""Compression plans through the product: the HTTP API, the CLI and the Python client against a
server, a dispatcher and a real Celery worker (embedded SQLite broker + SQLite, Redis + PostgreSQL).

Every member's error is recomputed from the bytes the registry serves (pulled, loaded by PEFT);
budget 0 serves the pushed factors exactly; served bytes are the same on every request, after the
generated-file cache is wiped and across two runs of the same plan; bad requests are 4xx with no
job; pruned members are inputs of every job and verify; the compress_collection policy re-plans."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from registry.client import Compression
from registry.demo import make_adapter

from .conftest import Stack, make_stack
from .peft_oracle import relative_error


@pytest.fixture(scope="module", params=["sqla", "redis"])
def cstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, request.param, workers=1)


def _family(stack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> tuple[str, list[str], list[Path]]:
    folders = [demo["adapter-sql"], demo["adapter-chat"], make_adapter(tmp_path / "third", seed=3, init_seed=7)]
    with stack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base").ref
        refs = [rc.push(f, f"{name}-{i}", base=base, tags={"team": name}).ref for i, f in enumerate(folders)]
    return base, refs, folders


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _compress_jobs(stack: Stack) -> int:
    with stack.client() as rc:
        return len(rc.list_jobs(type="compress", limit=500))


def test_members_are_served_from_the_plan_within_the_budget(cstack: Stack, demo: dict[str, Path], name: str,
                                                           tmp_path: Path) -> None:
    base, refs, folders = _family(cstack, demo, name, tmp_path)
    budget = 0.05
    cli = cstack.server.cli("compress", *[a for r in refs for a in ("-m", r)], "--max-error", str(budget),
                            "--name", f"{name}-plan", "--prune", "--wait", timeout=300)
    assert cli.stdout.strip().splitlines()[-1] == f"{name}-plan@1"
    with cstack.client() as rc:
        c = rc.list_compressions()[0]
        assert c.ref == f"{name}-plan@1" and c.base == base
        prune_job = rc.get_job(c.job_id).result["prune_job_id"]
        assert cstack.wait_job(prune_job).state == "succeeded"
        c = rc.get_compression(c.id)
    shown = json.loads(cstack.server.cli("compress", "show", str(c.id), "--json").stdout)
    assert shown == c.model_dump(mode="json")
    table = cstack.server.cli("compress", "show", str(c.id)).stdout
    assert c.ref in table and "error" in table  # (a table as wide as the console: cells may wrap)
    assert all(m.pruned and 0 < m.error <= budget for m in c.members)
    assert c.stored_bytes < c.original_bytes / 4

    with cstack.client() as rc:
        for i, ref in enumerate(refs):
            v = rc.get_version(ref)
            assert v.storage_mode == "derived:plan" and v.summary["pruned"]["plan"] == c.ref
            edge = next(p for p in v.parents if p.relation == "plan_member_of")
            assert edge.ref == c.ref and edge.params["error"] == c.members[i].served_error
            rc.pull(ref, tmp_path / f"served-{i}")
            # the error recomputed from the served bytes, as PEFT loads them
            err = relative_error(folders[i], tmp_path / f"served-{i}")
            assert err <= budget and err == pytest.approx(c.members[i].served_error, rel=1e-9)
            assert err == pytest.approx(c.members[i].error, rel=1e-5)  # the plan's, plus a rounding
            assert _digest(tmp_path / f"served-{i}") == {f.path: f.sha256 for f in v.files}

    # the same bytes on every request, by range, and after the generated-file cache is wiped
    with cstack.client() as rc:
        v = rc.get_version(refs[1])
    f = next(x for x in v.files if x.path == "adapter_model.safetensors")
    url = f"{cstack.url}/api/v1/models/{refs[1].replace('@', '/versions/')}/files/{f.path}"
    whole = httpx.get(url, timeout=120)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == f.sha256
    assert whole.headers["etag"] == f'"{f.sha256}"'
    parts = b"".join(httpx.get(url, headers={"Range": f"bytes={a}-{min(a + 999, f.size - 1)}"}, timeout=120)
                     .content for a in range(0, f.size, 1000))
    assert parts == whole.content
    shutil.rmtree(cstack.server.home / "cache", ignore_errors=True)
    assert httpx.get(url, timeout=120).content == whole.content
    assert "verified" in cstack.server.cli("verify", refs[0]).stdout


def test_budget_zero_serves_the_pushed_factors_and_plans_are_byte_stable(cstack: Stack, demo: dict[str, Path],
                                                                        name: str, tmp_path: Path) -> None:
    _, refs, folders = _family(cstack, demo, name, tmp_path)
    with cstack.client() as rc:
        # a plan computed twice is the same bytes: the second run finds the first's version
        first = cstack.wait_job(rc.compress(refs[2:], max_error=0.05).id, timeout=300)
        again = cstack.wait_job(rc.compress(refs[2:], max_error=0.05).id, timeout=300)
        assert again.result["deduplicated"] and again.result["ref"] == first.result["ref"]
        assert again.result["compression_id"] == first.result["compression_id"]

        # budget 0: a member is pruned only if its rebuilt files give its exact deltas; a float32
        # adapter with s = lora_alpha / r = 2 (the demo's) is held folded, one rounding away: it stays
        r4 = rc.push(make_adapter(tmp_path / "r4", seed=4, r=4, init_seed=7), f"{name}-r4",
                     base=rc.get_version(refs[0]).base).ref
        job = cstack.wait_job(rc.compress([r4, refs[0]], max_error=0, prune=True).id, timeout=300)
        assert all(m["method"] == "exact" and m["error"] == 0 for m in job.result["members"])
        pruned = cstack.wait_job(job.result["prune_job_id"]).result
        assert [p["ref"] for p in pruned["pruned"]] == [r4] and [r["ref"] for r in pruned["refused"]] == [refs[0]]
        assert rc.get_version(r4).storage_mode == "derived:plan"
        assert rc.get_version(refs[0]).storage_mode == "stored"
        for ref, folder in ((r4, tmp_path / "r4"), (refs[0], folders[0])):
            rc.pull(ref, tmp_path / f"exact-{ref}")
            got = load_file(tmp_path / f"exact-{ref}" / "adapter_model.safetensors")
            want = load_file(folder / "adapter_model.safetensors")
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            assert relative_error(folder, tmp_path / f"exact-{ref}") == 0.0


def test_bad_requests_are_refused_before_a_job_exists(cstack: Stack, demo: dict[str, Path], name: str,
                                                     tmp_path: Path) -> None:
    base, refs, _ = _family(cstack, demo, name, tmp_path)
    with cstack.client() as rc:
        other = rc.push(demo["base-v2"], f"{name}-other").ref
        stray = rc.push(demo["adapter-sql"], f"{name}-stray", base=other).ref
    before = _compress_jobs(cstack)
    url = f"{cstack.url}/api/v1/compressions"
    members = json.dumps(refs)
    cases: list[tuple[str, str]] = [
        (f'{{"members": {members}, "max_error": -0.1}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": NaN}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": Infinity}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": 1.5}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": "0.1"}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": true}}', "invalid_parameter"),
        (f'{{"members": {members}, "max_error": null}}', "invalid_parameter"),
        (f'{{"members": {members}}}', "invalid_request"),
        (f'{{"members": {members}, "max_error": 0.1, "methods": ["zip"]}}', "invalid_parameter"),
        ('{"members": ["nobody@1"], "max_error": 0.1}', "unknown_member"),
        (f'{{"members": ["{refs[0]}", "{base}"], "max_error": 0.1}}', "invalid_member"),
        (f'{{"members": ["{refs[0]}", "{stray}"], "max_error": 0.1}}', "mixed_bases"),
        (f'{{"base": "{base}", "tags": {{"team": "nobody"}}, "max_error": 0.1}}', "empty_collection"),
        ('{"max_error": 0.1}', "invalid_members"),
    ]
    for body, code in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == code, (body, r.json())
        assert set(r.json()["error"]) == {"code", "message", "details"}
    assert httpx.get(f"{url}/999999", timeout=30).json()["error"]["code"] == "compression_not_found"
    assert httpx.post(f"{url}/999999/prune", json={}, timeout=30).status_code == 404
    bad = cstack.server.cli("compress", "-m", refs[0], "--max-error", "5", check=False)
    assert bad.returncode == 4 and "invalid_parameter" in bad.stderr  # 4: invalid input
    assert _compress_jobs(cstack) == before


def test_pruned_members_are_inputs_of_every_job(cstack: Stack, demo: dict[str, Path], name: str,
                                               tmp_path: Path) -> None:
    base, refs, _ = _family(cstack, demo, name, tmp_path)
    with cstack.client() as rc:
        job = cstack.wait_job(rc.compress(base=base, tags={"team": name}, max_error=0.1, prune=True).id,
                              timeout=300)
        assert [m["ref"] for m in job.result["members"]] == refs
        cstack.wait_job(job.result["prune_job_id"])
        assert all(rc.get_version(r).storage_mode == "derived:plan" for r in refs)
        outcomes = [
            cstack.wait_job(rc.merge("ties", refs[:2], f"{name}-merged", params={"density": 0.5}).id, 300),
            cstack.wait_job(rc.create_basis(refs, p=2, name=f"{name}-rmm").id, 300),
            cstack.wait_job(rc.compress(refs, max_error=0.2, name=f"{name}-again").id, 300),
            cstack.wait_job(rc.verify(refs[2]).id, 300),
        ]
        assert all(j.state == "succeeded" for j in outcomes)
        assert outcomes[3].result["ok"]
        b2 = rc.push(demo["base-v2"], base.split("@")[0]).ref
        moved = cstack.wait_job(rc.transfer(refs[2], b2).id, 300)
        assert moved.state == "succeeded"
        rc.pull(moved.result["ref"], tmp_path / "moved")
        rc.pull(refs[2], tmp_path / "member")
    assert _digest(tmp_path / "moved") == _digest(tmp_path / "member")


def test_compress_collection_policy_replans_when_adapters_land(cstack: Stack, demo: dict[str, Path], name: str,
                                                               tmp_path: Path) -> None:
    with cstack.client() as rc:
        bad = httpx.post(f"{cstack.url}/api/v1/policies", json={
            "name": f"{name}-bad", "type": "compress_collection", "base_model": f"{name}-base",
            "params": {"max_error": -1}}, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
        rc.create_policy(f"{name}-squeeze", "compress_collection", f"{name}-base",
                         {"max_error": 0.1, "collection": f"{name}-plans"})
        base = rc.push(demo["base"], f"{name}-base").ref
        first = rc.push(demo["adapter-sql"], f"{name}-a", base=base).ref

        def plan_of(n: int) -> Compression | None:
            return next((c for c in rc.list_compressions(f"{name}-plans") if len(c.members) == n), None)

        one = cstack.wait_for(lambda: plan_of(1), 180, "a plan of the first adapter")
        second = rc.push(demo["adapter-chat"], f"{name}-b", base=base).ref
        two = cstack.wait_for(lambda: plan_of(2), 180, "a plan of both adapters")
    assert [m.ref for m in one.members] == [first]
    assert [m.ref for m in two.members] == [first, second] and two.base == base
    assert all(m.error <= 0.1 for m in two.members)
