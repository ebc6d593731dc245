"""Compression plans in process: requests refused before a job exists, the compress job (plan
version, members, lineage, MLflow run), members pruned to ``derived:plan`` and served rebuilt from
the plan (errors recomputed from the served bytes by PEFT, byte-stable across a cache wipe, valid
inputs of every job, verifiable), and the compress_collection policy.

``tests/test_compressions.py`` runs the same through the HTTP API, the CLI and Celery workers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from registry.errors import Conflict, InvalidInput, NotFound
from registry.services import bases, compressions, gc, lineage, merges, packing, policies, transfers, verify, versions
from registry.services.derived import materialize
from registry.services.views import VersionView
from registry.weights.compress import load_plan

from ..peft_oracle import relative_error
from .inproc import InProcess, sha

pytestmark = pytest.mark.services


def _adapters(reg: InProcess, n: int = 3, **tags: str) -> list[VersionView]:
    base = reg.push_base("llm")
    return [reg.push_adapter(f"lora-{i}", base=base.ref, seed=i + 1, tags=tags or {"team": "a"}) for i in range(n)]


def _folder(reg: InProcess, i: int) -> Path:
    return reg.folder(f"lora-{i}-adapter-{i + 1}")


def _served(reg: InProcess, ref: str, dest: Path) -> Path:
    """The version's files exactly as the registry serves them (stored or rebuilt)."""
    shutil.rmtree(dest, ignore_errors=True)
    return materialize(reg.ctx, versions.get(reg.ctx, ref).id, dest)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _compress(reg: InProcess, refs: list[str], max_error: float, **kw: Any) -> dict[str, Any]:
    job = compressions.request_compression(reg.ctx, refs, max_error=max_error, **kw)
    assert reg.run_sent(["compress"]) == {job["id"]: "succeeded"}, reg.job(job["id"])["error"]
    return reg.job(job["id"])


def test_compress_job_records_the_plan_its_members_and_run(reg: InProcess, tmp_path: Path) -> None:
    members = _adapters(reg)
    refs = [m.ref for m in members]
    job = _compress(reg, refs, 0.05, collection="team-a", actor="alice")
    result = job["result"]
    assert result["ref"] == "llm-compressed@1" and job["mlflow_run_id"]
    c = compressions.get_compression(reg.ctx, result["compression_id"])
    assert (c["ref"], c["base"], c["collection"], c["max_error"]) == ("llm-compressed@1", "llm@1", "team-a", 0.05)
    assert c["methods"] == ["quantize", "truncate", "rmm"] and c["mlflow_run_id"] == job["mlflow_run_id"]
    assert [m["ref"] for m in c["members"]] == refs and not any(m["pruned"] for m in c["members"])
    assert all(0 < m["error"] <= 0.05 and m["method"] != "exact" for m in c["members"])
    assert all(m["served_error"] == pytest.approx(m["error"], rel=1e-6) and m["prunable"] for m in c["members"])
    assert c["stored_bytes"] == sum(m["stored_bytes"] for m in c["members"]) < c["original_bytes"] / 4
    assert [x["id"] for x in compressions.list_compressions(reg.ctx, collection="team-a")] == [c["id"]]

    v = versions.get(reg.ctx, "llm-compressed@1")
    assert (v.kind, v.base, v.tags["registry.method"], v.mlflow_run_id) == ("merge", "llm@1", "compress",
                                                                            job["mlflow_run_id"])
    assert v.summary["compression"]["stored_bytes"] == c["stored_bytes"]
    graph = lineage.graph(reg.ctx, v.ref, direction="down")
    edges = {e["child"]: e["params"] for e in graph["edges"] if e["relation"] == "plan_member_of"}
    assert set(edges) == set(refs)
    assert all(edges[m["ref"]]["error"] == m["error"] and edges[m["ref"]]["method"] == m["method"]
               for m in c["members"])
    # the member's error is on the version (its membership edge)
    parent = next(p for p in versions.get(reg.ctx, refs[1]).parents if p.relation == "plan_member_of")
    assert parent.ref == v.ref and parent.params["error"] == c["members"][1]["error"]

    # the stored file is the plan; what it rebuilds is within the budget (oracle: PEFT's reading)
    plan = load_plan(next(_served(reg, v.ref, tmp_path / "plan").glob("*.safetensors")))
    assert [m.name for m in plan.members] == refs
    for i in range(3):
        from registry.weights.adapters import save_peft_adapter

        save_peft_adapter(plan.reconstruct(i), tmp_path / f"rec-{i}")
        assert relative_error(_folder(reg, i), tmp_path / f"rec-{i}") == pytest.approx(c["members"][i]["error"],
                                                                                      rel=1e-6)

    # the MLflow run: per-member method, bytes and error
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=reg.ctx.settings.mlflow_tracking_uri)
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["operation"] == "compress"
    assert run.data.metrics["stored_bytes"] == c["stored_bytes"]
    assert run.data.metrics["error_member_2"] == pytest.approx(c["members"][2]["error"])
    doc = json.loads(Path(client.download_artifacts(run.info.run_id, "compression.json")).read_text())
    assert [(m["ref"], m["method"], m["stored_bytes"]) for m in doc["members"]] == [
        (m["ref"], m["method"], m["stored_bytes"]) for m in c["members"]]


def test_requests_are_refused_before_a_job_exists(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg)]
    other = reg.push_base("other", seed=5)
    stray = reg.push_adapter("stray", base=other.ref, seed=9)

    def code(*args: Any, **kw: Any) -> str:
        kw.setdefault("max_error", 0.05)
        with pytest.raises(InvalidInput) as e:
            compressions.request_compression(reg.ctx, *args, **kw)
        return e.value.code

    for budget in (-0.1, float("nan"), float("inf"), 1.0, 5, "0.1", None, True, [0.1]):
        assert code(refs, max_error=budget) == "invalid_parameter", budget
    for methods in (["zip"], [], "quantize", ["quantize", 3]):
        assert code(refs, methods=methods) == "invalid_parameter", methods
    assert code(["ghost@1"]) == "unknown_member"
    assert code([refs[0], "llm@1"]) == "invalid_member"  # a base is not an adapter
    assert code([refs[0], stray.ref]) == "mixed_bases"
    assert code([refs[0], refs[0]]) == "invalid_members"
    assert code([]) == "invalid_members"
    assert code() == "invalid_members"  # neither members nor base
    assert code(refs, base="llm@1") == "invalid_members"  # both
    assert code(base="ghost") == "unknown_base"
    assert code(base="llm", tags={"team": "nobody"}) == "empty_collection"
    assert code(refs, name="bad name") == "invalid_name"
    assert reg.jobs_of("compress") == [] and reg.sent == []
    with pytest.raises(NotFound):
        compressions.get_compression(reg.ctx, 1)
    with pytest.raises(NotFound):
        compressions.request_prune(reg.ctx, 1)


def test_a_base_and_tags_name_the_collection(reg: InProcess) -> None:
    members = _adapters(reg)
    reg.push_adapter("lora-b", base="llm@1", seed=8, tags={"team": "b"})
    job = compressions.request_compression(reg.ctx, base="llm", tags={"team": "a"}, max_error=0.1)
    assert job["params"]["members"] == [m.ref for m in members]  # resolved (and checked) when asked
    assert reg.run_sent(["compress"]) == {job["id"]: "succeeded"}


def test_budget_zero_is_exact_and_pruned_members_serve_their_own_bytes(reg: InProcess, tmp_path: Path) -> None:
    refs = [m.ref for m in _adapters(reg)]
    job = _compress(reg, refs, 0.0, prune=True)
    assert all(m["method"] == "exact" and m["error"] == 0.0 for m in job["result"]["members"])
    assert reg.run_sent(["prune"]) == {job["result"]["prune_job_id"]: "succeeded"}
    for i, ref in enumerate(refs):
        v = versions.get(reg.ctx, ref)
        assert v.storage_mode == "derived:plan"
        served = _served(reg, ref, tmp_path / f"served-{i}")
        original = load_file(_folder(reg, i) / "adapter_model.safetensors")
        rebuilt = load_file(served / "adapter_model.safetensors")
        assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)
        assert (json.loads((served / "adapter_config.json").read_text())
                == json.loads((_folder(reg, i) / "adapter_config.json").read_text()))
        assert relative_error(_folder(reg, i), served) == 0.0


def test_budget_zero_prunes_only_members_rebuilt_to_their_exact_bytes(reg: InProcess, tmp_path: Path) -> None:
    """A float32 adapter with s = lora_alpha / r = 2 is held folded (√2 · factors, rounded): its
    rebuilt files are one rounding off the pushed ones, so budget 0 leaves it stored."""
    from registry.demo import make_adapter

    from .inproc import TINY

    base = reg.push_base("llm")
    s4 = reg.push_adapter("lora-s4", base=base.ref, seed=1)  # r 4, alpha 16: √s = 2, exact
    s2 = reg.push_folder("lora-s2", make_adapter(tmp_path / "s2", seed=2, r=8, shape=TINY, init_seed=7),
                         base=base.ref)
    job = _compress(reg, [s4.ref, s2.ref], 0.0, prune=True)
    c = compressions.get_compression(reg.ctx, job["result"]["compression_id"])
    assert [(m["method"], m["error"]) for m in c["members"]] == [("exact", 0.0), ("exact", 0.0)]
    assert c["members"][0]["served_error"] == 0.0 and c["members"][0]["prunable"]
    assert 0 < c["members"][1]["served_error"] < 1e-6 and not c["members"][1]["prunable"]
    reg.run_sent(["prune"])
    result = reg.job(job["result"]["prune_job_id"])["result"]
    assert [p["ref"] for p in result["pruned"]] == [s4.ref] and [r["ref"] for r in result["refused"]] == [s2.ref]
    assert versions.get(reg.ctx, s2.ref).storage_mode == "stored"
    for ref, folder in ((s4.ref, reg.folder("lora-s4-adapter-1")), (s2.ref, tmp_path / "s2")):
        assert relative_error(folder, _served(reg, ref, tmp_path / f"served-{ref}")) == 0.0


def test_pruned_members_are_served_within_the_budget_byte_stable(reg: InProcess, tmp_path: Path) -> None:
    refs = [m.ref for m in _adapters(reg)]
    budget = 0.1
    job = _compress(reg, refs, budget, prune=True)
    assert reg.run_sent(["prune"]) == {job["result"]["prune_job_id"]: "succeeded"}
    prune = reg.job(job["result"]["prune_job_id"])
    assert sorted(p["ref"] for p in prune["result"]["pruned"]) == sorted(refs) and prune["mlflow_run_id"]
    c = compressions.get_compression(reg.ctx, job["result"]["compression_id"])
    assert all(m["pruned"] for m in c["members"])
    digests = {}
    for i, ref in enumerate(refs):
        v = versions.get(reg.ctx, ref)
        assert v.storage_mode == "derived:plan" and v.summary["pruned"]["plan"] == c["ref"]
        assert v.summary["pruned"]["error"] == c["members"][i]["served_error"]  # measured on the served bytes
        assert {f.path for f in v.files or []} == {"adapter_config.json", "adapter_model.safetensors"}
        served = _served(reg, ref, tmp_path / f"a-{i}")
        assert _digest(served) == {f.path: f.sha256 for f in v.files or []}  # the recorded sha256s
        err = relative_error(_folder(reg, i), served)
        assert err <= budget and err == pytest.approx(c["members"][i]["error"], rel=1e-6)
        digests[ref] = _digest(served)
        edge = next(p for p in v.parents if p.relation == "plan_member_of")
        assert edge.params["pruned"] is True

    # byte-stable: the generated-file cache wiped, every member is rebuilt to the same bytes
    shutil.rmtree(reg.ctx.settings.resolved_cache_dir, ignore_errors=True)
    for i, ref in enumerate(refs):
        assert _digest(_served(reg, ref, tmp_path / f"b-{i}")) == digests[ref]
    # ... and after the plan is packed and gc reclaimed the members' own former blobs
    pack = packing.request_pack(reg.ctx, c["ref"], actor="alice")
    assert reg.run_sent(["pack"]) == {pack["id"]: "succeeded"}
    assert reg.job(pack["id"])["result"]["files_packed"] == 1
    removed = set(gc.collect(reg.ctx, grace_seconds=0).removed)
    weights = {sha((_folder(reg, i) / "adapter_model.safetensors").read_bytes()) for i in range(3)}
    assert weights <= removed  # the pushed weight files are no longer kept
    shutil.rmtree(reg.ctx.settings.resolved_cache_dir, ignore_errors=True)
    for i, ref in enumerate(refs):
        assert _digest(_served(reg, ref, tmp_path / f"c-{i}")) == digests[ref]
    # and verifies
    for ref in refs:
        job_v = verify.request_verify(reg.ctx, ref)
        reg.run_sent(["verify"])
        assert reg.job(job_v["id"])["result"]["ok"]

    # the plan now has dependents: it cannot be archived; a second prune skips them
    with pytest.raises(Conflict) as e:
        versions.archive(reg.ctx, c["ref"], actor="alice")
    assert e.value.code == "has_dependents"
    again = compressions.request_prune(reg.ctx, c["id"])
    reg.run_sent(["prune"])
    assert [s["reason"] for s in reg.job(again["id"])["result"]["skipped"]] == ["already derived"] * 3


def test_a_plan_without_pruned_members_can_be_archived(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg, 2)]
    ref = _compress(reg, refs, 0.1)["result"]["ref"]
    assert versions.archive(reg.ctx, ref, actor="alice").archived


def test_prune_respects_a_tighter_budget(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg)]
    c = compressions.get_compression(reg.ctx, _compress(reg, refs, 0.2)["result"]["compression_id"])
    errors = sorted(m["served_error"] for m in c["members"])
    tight = (errors[0] + errors[1]) / 2
    job = compressions.request_prune(reg.ctx, c["id"], tight)
    reg.run_sent(["prune"])
    result = reg.job(job["id"])["result"]
    assert [p["error"] for p in result["pruned"]] == [errors[0]] and len(result["refused"]) == 2
    with pytest.raises(InvalidInput):
        compressions.request_prune(reg.ctx, c["id"], -1)


def test_pruned_members_are_inputs_of_every_job(reg: InProcess, tmp_path: Path) -> None:
    refs = [m.ref for m in _adapters(reg)]
    job = _compress(reg, refs, 0.05, prune=True)
    reg.run_sent(["prune"])
    assert all(versions.get(reg.ctx, r).storage_mode == "derived:plan" for r in refs)
    b = bases.request_basis(reg.ctx, refs, p=2)
    m = merges.request_merge(reg.ctx, "ties", refs[:2], "merged", params={"density": 0.5})
    again = compressions.request_compression(reg.ctx, refs, max_error=0.1, name="twice")
    outcomes = reg.run_sent(["basis", "merge", "compress"])
    assert outcomes == {b["id"]: "succeeded", m["id"]: "succeeded", again["id"]: "succeeded"}, [
        reg.job(j)["error"] for j in outcomes]
    reg.push_base_update("llm")
    t = transfers.request_transfer(reg.ctx, refs[2], "llm@2")
    assert reg.run_sent(["transfer"]) == {t["id"]: "succeeded"}
    moved = reg.job(t["id"])["result"]["ref"]
    # re-pinned: the served (rebuilt) files of the member, now stored as blobs
    assert _digest(_served(reg, moved, tmp_path / "moved")) == _digest(_served(reg, refs[2], tmp_path / "src"))
    assert job["result"]["compression_id"] != reg.job(again["id"])["result"]["compression_id"]


def test_the_same_plan_again_is_deduplicated(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg, 2)]
    first = _compress(reg, refs, 0.1)
    second = _compress(reg, refs, 0.1)
    assert second["result"]["deduplicated"] and second["result"]["ref"] == first["result"]["ref"]
    assert second["result"]["compression_id"] == first["result"]["compression_id"]
    assert len(compressions.list_compressions(reg.ctx)) == 1


def test_compress_collection_policy_replans_when_adapters_land(reg: InProcess) -> None:
    bad: list[dict[str, Any]] = [{}, {"max_error": 2}, {"max_error": "0.1"}, {"max_error": 0.1, "methods": ["zip"]},
                                 {"max_error": 0.1, "prune": "yes"}, {"max_error": 0.1, "tags": ["a"]}]
    for params in bad:
        with pytest.raises(InvalidInput) as e:
            policies.create_policy(reg.ctx, "squeeze", "compress_collection", "llm", params)
        assert e.value.code == "invalid_parameter", params
    pol = policies.create_policy(reg.ctx, "squeeze", "compress_collection", "llm",
                                 {"max_error": 0.1, "tags": {"team": "a"}})
    assert pol["params"] == {"max_error": 0.1, "methods": None, "tags": {"team": "a"}, "collection": None,
                             "name": None, "prune": False}
    base = reg.push_base("llm")
    reg.push_adapter("lora-0", base=base.ref, seed=1, tags={"team": "a"})
    reg.push_adapter("lora-x", base=base.ref, seed=5, tags={"team": "b"})  # not in the collection
    assert set(reg.settle(["compress"]).values()) == {"succeeded"}
    first = compressions.list_compressions(reg.ctx)
    assert [[m["ref"] for m in c["members"]] for c in first] == [["lora-0@1"]]
    assert first[0]["collection"] == "squeeze"
    reg.push_adapter("lora-1", base=base.ref, seed=2, tags={"team": "a"})
    reg.settle(["compress"])
    plans = compressions.list_compressions(reg.ctx)  # newest first
    assert [[m["ref"] for m in c["members"]] for c in plans] == [["lora-0@1", "lora-1@1"], ["lora-0@1"]]
    jobs_ = reg.jobs_of("compress")
    assert all(j["policy_id"] == pol["id"] and j["created_by"] == "policy:squeeze" for j in jobs_)


def test_a_pruning_policy_keeps_each_adapter_on_one_plan(reg: InProcess) -> None:
    policies.create_policy(reg.ctx, "squeeze", "compress_collection", "llm", {"max_error": 0.1, "prune": True})
    base = reg.push_base("llm")
    reg.push_adapter("lora-0", base=base.ref, seed=1)
    reg.push_adapter("lora-1", base=base.ref, seed=2)
    reg.settle(["compress", "prune"])
    assert {versions.get(reg.ctx, r).storage_mode for r in ("lora-0@1", "lora-1@1")} == {"derived:plan"}
    reg.push_adapter("lora-2", base=base.ref, seed=3)
    reg.settle(["compress", "prune"])
    newest = compressions.list_compressions(reg.ctx)[0]
    assert [m["ref"] for m in newest["members"]] == ["lora-2@1"] and newest["members"][0]["pruned"]
    assert versions.get(reg.ctx, "lora-0@1").summary["pruned"]["plan"] != newest["ref"]
