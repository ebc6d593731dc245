"""Basis and transfer jobs end to end, in process: request (validated before a job exists), run
the job with the runner, check the recorded version, its lineage and its weights.

The models are tiny and built in code (``registry.demo`` with a small shape), so each job takes a
fraction of a second. ``tests/test_workers.py`` stays for the same jobs through Celery workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from registry.errors import InvalidInput, NotFound
from registry.services import bases, lineage, transfers, versions
from registry.services.views import VersionView
from registry.weights.adapters import load_peft_adapter
from registry.weights.rmm import load_basis

from .inproc import InProcess

pytestmark = pytest.mark.services


def _stored(reg: InProcess, v: VersionView, path: str) -> Path:
    f = next(f for f in v.files or [] if f.path == path)
    local = reg.ctx.store.local_path(f.sha256)
    assert local is not None
    return local


def _adapters(reg: InProcess, n: int = 3) -> list[VersionView]:
    base = reg.push_base("llm")
    return [reg.push_adapter(f"lora-{i}", base=base.ref, seed=i + 1, tags={"team": "a"}) for i in range(n)]


def test_basis_job_records_version_basis_and_member_edges(reg: InProcess) -> None:
    members = _adapters(reg)
    job = bases.request_basis(reg.ctx, [m.ref for m in members], p=2, collection="team-a", actor="alice")
    assert job["type"] == "basis" and job["params"]["members"] == ["lora-0@1", "lora-1@1", "lora-2@1"]
    assert reg.run_sent(["basis"]) == {job["id"]: "succeeded"}

    result = reg.job(job["id"])["result"]
    assert result["ref"] == "llm-rmm@1"
    basis = bases.get_basis(reg.ctx, result["basis_id"])
    assert (basis["ref"], basis["base"], basis["collection"], basis["p"], basis["status"]) == (
        "llm-rmm@1", "llm@1", "team-a", 2, "ready")
    assert [m["ref"] for m in basis["members"]] == ["lora-0@1", "lora-1@1", "lora-2@1"]
    assert all(m["error"] < 1e-4 for m in basis["members"])  # p = n - 1 reconstructs every member
    assert [b["id"] for b in bases.list_bases(reg.ctx, collection="team-a")] == [basis["id"]]

    v = versions.get(reg.ctx, "llm-rmm@1")
    assert (v.kind, v.base, v.status, v.tags["registry.method"]) == ("merge", "llm@1", "ready", "rmm")
    assert v.mlflow_run_id
    graph = lineage.graph(reg.ctx, "llm-rmm@1", direction="down")
    assert {(e["child"], e["relation"]) for e in graph["edges"]} == {
        ("lora-0@1", "basis_member_of"), ("lora-1@1", "basis_member_of"), ("lora-2@1", "basis_member_of")}

    # the stored basis gives the members' weight deltas back
    rmm = load_basis(_stored(reg, v, "basis.safetensors"))
    original = load_peft_adapter(reg.folder("lora-1-adapter-2"))
    rebuilt = rmm.reconstruct(1)
    for module in original.module_names():
        assert torch.allclose(rebuilt.delta(module), original.delta(module), atol=1e-5)


def test_basis_with_fewer_directions_has_errors(reg: InProcess) -> None:
    members = _adapters(reg)
    job = bases.request_basis(reg.ctx, [m.ref for m in members], p=1, name="small-basis")
    reg.run_sent(["basis"])
    basis = bases.get_basis(reg.ctx, reg.job(job["id"])["result"]["basis_id"])
    assert basis["ref"] == "small-basis@1"
    assert all(m["error"] > 1e-4 for m in basis["members"])
    assert basis["storage_ratio"] > 0


def test_same_basis_again_is_deduplicated(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg, 2)]
    first = bases.request_basis(reg.ctx, refs, p=1)
    second = bases.request_basis(reg.ctx, refs, p=1)
    reg.run_sent(["basis"])
    result = reg.job(second["id"])["result"]
    assert (result["ref"], result["deduplicated"]) == (reg.job(first["id"])["result"]["ref"], True)
    assert "no new version was made" in result["message"]


def test_basis_idempotency_key(reg: InProcess) -> None:
    refs = [m.ref for m in _adapters(reg, 2)]
    a = bases.request_basis(reg.ctx, refs, p=1, idempotency_key="basis-once")
    b = bases.request_basis(reg.ctx, refs, p=1, idempotency_key="basis-once")
    assert a["id"] == b["id"] and reg.sent == [a["id"]]


def test_basis_requests_are_validated_before_a_job_exists(reg: InProcess) -> None:
    members = _adapters(reg)
    refs = [m.ref for m in members]
    other = reg.push_base("other", seed=5)
    stray = reg.push_adapter("stray", base=other.ref, seed=9)

    def code(*args: object, **kw: object) -> str:
        with pytest.raises(InvalidInput) as e:
            bases.request_basis(reg.ctx, *args, **kw)  # type: ignore[arg-type]
        return e.value.code

    assert code(refs[:1], p=1) == "invalid_members"
    assert code([refs[0], refs[0]], p=1) == "invalid_members"
    assert code(refs, p=3) == "invalid_p"  # above min(r, n - 1) = 2
    assert code(refs) == "invalid_parameter"  # neither p nor max_error
    assert code(refs, p=1, max_error=0.1) == "invalid_parameter"
    assert code([refs[0], stray.ref], p=1) == "mixed_bases"
    assert code([refs[0], "llm@1"], p=1) == "invalid_member"  # a base is not an adapter
    assert reg.jobs_of("basis") == [] and reg.sent == []


def _transfer_setup(reg: InProcess) -> tuple[VersionView, VersionView]:
    reg.push_base("llm")
    ft = reg.push_finetune("tuned", base="llm@1")
    reg.push_base_update("llm")
    return ft, versions.get(reg.ctx, "llm@2")


def test_finetune_transfer_makes_a_candidate_with_the_moved_diff(reg: InProcess) -> None:
    ft, target = _transfer_setup(reg)
    job = transfers.request_transfer(reg.ctx, "tuned@1", "llm@2", actor="alice")
    assert job["params"] == {"finetune": "tuned@1", "target_base": "llm@2", "alpha": 1.0, "storage": "stored"}
    assert reg.run_sent(["transfer"]) == {job["id"]: "succeeded"}
    result = reg.job(job["id"])["result"]
    assert result["ref"] == "tuned@2" and result["status"] == "candidate"
    assert result["diagnostics"]["skipped"] == []

    cand = versions.get(reg.ctx, "tuned@2")
    assert (cand.kind, cand.status, cand.base) == ("finetune", "candidate", "llm@2")
    assert {(p.ref, p.relation) for p in cand.parents} == {("tuned@1", "transfer_of"), ("llm@2", "finetune_of")}
    assert versions.get(reg.ctx, "tuned").version == 1  # a candidate is not latest until promoted

    source = load_file(_stored(reg, versions.get(reg.ctx, "llm@1"), "model.safetensors"))
    tuned = load_file(_stored(reg, ft, "model.safetensors"))
    moved = load_file(_stored(reg, target, "model.safetensors"))
    out = load_file(_stored(reg, cand, "model.safetensors"))
    for name in source:
        assert torch.allclose(out[name], moved[name] + (tuned[name] - source[name]), atol=1e-6)

    versions.promote(reg.ctx, "tuned@2", "prod", actor="alice")
    assert versions.get(reg.ctx, "tuned@prod").version == 2 == versions.get(reg.ctx, "tuned").version


def test_adapter_transfer_repins_the_same_files(reg: InProcess) -> None:
    reg.push_base("llm")
    lora = reg.push_adapter("lora", base="llm@1")
    reg.push_base_update("llm")
    objects_before = {o.sha256 for o in reg.ctx.store.list_objects()}
    job = transfers.request_transfer(reg.ctx, "lora@1", "llm@2")
    reg.run_sent(["transfer"])
    assert reg.job(job["id"])["result"]["ref"] == "lora@2"
    cand = versions.get(reg.ctx, "lora@2")
    assert (cand.base, cand.status) == ("llm@2", "candidate")
    assert {(f.path, f.sha256) for f in cand.files or []} == {(f.path, f.sha256) for f in lora.files or []}
    assert {o.sha256 for o in reg.ctx.store.list_objects()} == objects_before  # no new bytes
    with pytest.raises(InvalidInput) as e:
        transfers.request_transfer(reg.ctx, "lora@1", "llm@2", alpha=0.5)
    assert e.value.code == "invalid_parameter"


def test_transfer_requests_are_validated(reg: InProcess) -> None:
    _transfer_setup(reg)
    for args, code in [(("tuned@1", "llm@1"), "same_base"), (("llm@1", "llm@2"), "invalid_finetune"),
                       (("tuned@1", "ghost@1"), "unknown_target_base")]:
        with pytest.raises(InvalidInput) as e:
            transfers.request_transfer(reg.ctx, *args)
        assert e.value.code == code
    with pytest.raises(InvalidInput):
        transfers.request_transfer(reg.ctx, "tuned@1", "llm@2", alpha=float("nan"))
    assert reg.jobs_of("transfer") == []


def test_transfer_whose_input_went_away_fails_without_retry(reg: InProcess) -> None:
    _transfer_setup(reg)
    job = transfers.request_transfer(reg.ctx, "tuned@1", "llm@2")
    versions.archive(reg.ctx, "tuned@1", actor="alice")  # before a worker picks the job up
    assert reg.run_sent(["transfer"]) == {job["id"]: "failed"}
    failed = reg.job(job["id"])
    assert failed["error"]["code"] == "unknown_finetune" and failed["attempts"] == 1
    with pytest.raises(NotFound):
        versions.get(reg.ctx, "tuned@2")
