"""Automation policies in process: their rules, and the jobs the dispatcher makes from events
(``transfer_on_base_update``, ``refresh_basis``), run to the versions they produce.

``tests/test_workers.py`` stays for policies driven through the server and real workers.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import Conflict, InvalidInput, NotFound
from registry.services import bases, policies, versions

from .inproc import InProcess

pytestmark = pytest.mark.services


def test_policy_rules(reg: InProcess) -> None:
    p = policies.create_policy(reg.ctx, "follow-llm", "transfer_on_base_update", "llm", {"alpha": 0.5},
                               actor="alice")
    assert (p["params"], p["active"], p["created_by"]) == ({"alpha": 0.5, "kinds": ["adapter", "finetune"]}, True,
                                                           "alice")
    with pytest.raises(Conflict) as e:
        policies.create_policy(reg.ctx, "follow-llm", "transfer_on_base_update", "llm", {})
    assert e.value.code == "policy_exists"
    bad: list[tuple[str, str, str, dict[str, Any], str]] = [
        ("x", "nightly_build", "llm", {}, "invalid_policy_type"),
        ("x", "transfer_on_base_update", "llm", {"alpha": "big"}, "invalid_parameter"),
        ("x", "transfer_on_base_update", "llm", {"kinds": ["base"]}, "invalid_parameter"),
        ("x", "refresh_basis", "llm", {}, "invalid_parameter"),
        ("x", "refresh_basis", "llm", {"p": 1, "tags": ["a"]}, "invalid_parameter"),
        ("bad name", "refresh_basis", "llm", {"p": 1}, "invalid_name"),
    ]
    for name, type_, base, params, code in bad:
        with pytest.raises(InvalidInput) as e2:
            policies.create_policy(reg.ctx, name, type_, base, params)
        assert e2.value.code == code, (type_, params)
    assert [x["name"] for x in policies.list_policies(reg.ctx)] == ["follow-llm"]
    policies.delete_policy(reg.ctx, "follow-llm")
    assert policies.list_policies(reg.ctx) == []
    with pytest.raises(NotFound) as e3:
        policies.delete_policy(reg.ctx, "follow-llm")
    assert e3.value.code == "policy_not_found"


def _dependents(reg: InProcess) -> None:
    reg.push_base("llm")
    reg.push_finetune("tuned", base="llm@1")
    reg.push_adapter("lora", base="llm@1")
    reg.dispatch()  # the events so far trigger nothing: no policy yet


def test_new_base_version_transfers_its_dependents(reg: InProcess) -> None:
    _dependents(reg)
    pol = policies.create_policy(reg.ctx, "follow", "transfer_on_base_update", "llm", {})
    reg.push_base_update("llm")
    reg.dispatch()
    created = reg.jobs_of("transfer")
    assert sorted(j["params"]["finetune"] for j in created) == ["lora@1", "tuned@1"]
    assert all(j["policy_id"] == pol["id"] and j["created_by"] == "policy:follow" for j in created)
    assert all(j["params"]["target_base"] == "llm@2" for j in created)

    reg.dispatch()  # the same event is never dispatched twice
    assert len(reg.jobs_of("transfer")) == 2
    assert set(reg.run_sent(["transfer"]).values()) == {"succeeded"}
    for ref in ("tuned@2", "lora@2"):
        v = versions.get(reg.ctx, ref)
        assert (v.status, v.base) == ("candidate", "llm@2")
    # candidates are not ready: they trigger nothing further
    reg.dispatch()
    assert len(reg.jobs_of("transfer")) == 2


def test_transfer_policy_kinds_filter(reg: InProcess) -> None:
    _dependents(reg)
    policies.create_policy(reg.ctx, "adapters-only", "transfer_on_base_update", "llm", {"kinds": ["adapter"]})
    reg.push_base_update("llm")
    reg.dispatch()
    assert [j["params"]["finetune"] for j in reg.jobs_of("transfer")] == ["lora@1"]


def test_candidate_base_triggers_only_when_promoted(reg: InProcess) -> None:
    _dependents(reg)
    policies.create_policy(reg.ctx, "follow", "transfer_on_base_update", "llm", {"kinds": ["finetune"]})
    reg.push_weights("llm", 50, status="candidate")  # llm@2, not ready: nothing yet
    reg.dispatch()
    assert reg.jobs_of("transfer") == []
    versions.promote(reg.ctx, "llm@2", None, actor="alice")
    reg.dispatch()
    assert [(j["params"]["finetune"], j["params"]["target_base"]) for j in reg.jobs_of("transfer")] == [
        ("tuned@1", "llm@2")]


def test_policy_of_another_model_triggers_nothing(reg: InProcess) -> None:
    _dependents(reg)
    policies.create_policy(reg.ctx, "other", "transfer_on_base_update", "not-llm", {})
    reg.push_base_update("llm")
    reg.dispatch()
    assert reg.jobs_of("transfer") == []


def test_refresh_basis_on_new_adapter(reg: InProcess) -> None:
    reg.push_base("llm")
    policies.create_policy(reg.ctx, "team-a", "refresh_basis", "llm", {"p": 1, "tags": {"team": "a"}})
    reg.push_adapter("lora-1", base="llm@1", seed=1, tags={"team": "a"})
    reg.dispatch()
    first, = reg.jobs_of("basis")
    assert first["params"]["query"] == {"base": "llm@1", "tags": {"team": "a"}}
    assert first["params"]["collection"] == "team-a"

    reg.push_adapter("lora-2", base="llm@1", seed=2, tags={"team": "a"})
    reg.push_adapter("lora-b", base="llm@1", seed=3, tags={"team": "b"})
    reg.dispatch()
    assert len(reg.jobs_of("basis")) == 1  # the queued refresh absorbs the second adapter

    assert reg.run_sent(["basis"]) == {first["id"]: "succeeded"}
    basis, = bases.list_bases(reg.ctx, collection="team-a")
    assert sorted(m["ref"] for m in basis["members"]) == ["lora-1@1", "lora-2@1"]  # not team b's

    reg.push_adapter("lora-3", base="llm@1", seed=4, tags={"team": "a"})
    reg.dispatch()
    assert len(reg.jobs_of("basis")) == 2  # nothing queued any more: a new refresh


def test_refresh_with_a_single_member_is_skipped(reg: InProcess) -> None:
    reg.push_base("llm")
    policies.create_policy(reg.ctx, "solo", "refresh_basis", "llm", {"max_error": 0.1})
    reg.push_adapter("lora-1", base="llm@1")
    reg.dispatch()
    (job_id, outcome), = reg.run_sent(["basis"]).items()
    assert outcome == "succeeded"
    assert reg.job(job_id)["result"] == {"skipped": "collection has 1 adapter(s); a basis needs 2"}
    assert bases.list_bases(reg.ctx) == []
