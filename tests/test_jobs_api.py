"""Requests for derived artifacts are validated before a job is queued (clear 4xx, no job), and
compatibility reports between two versions (MUSCLE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Server
from .test_bad_input import assert_error


def _rank_pattern_adapter(folder: Path) -> Path:
    """A LoRA whose first module has rank 4 and the others rank 8 (``rank_pattern``)."""
    import json

    from safetensors.torch import load_file, save_file

    from registry.demo import make_adapter

    make_adapter(folder, seed=5, r=8)
    weights = load_file(folder / "adapter_model.safetensors")
    key_a = sorted(k for k in weights if k.endswith("lora_A.weight"))[0]
    module = key_a[len("base_model.model."):-len(".lora_A.weight")]
    weights[key_a] = weights[key_a][:4].contiguous()
    key_b = key_a.replace("lora_A", "lora_B")
    weights[key_b] = weights[key_b][:, :4].contiguous()
    save_file(weights, folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {module: 4}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def family(server: Server, demo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from registry.demo import make_adapter

    scratch = tmp_path_factory.mktemp("family")
    with server.client() as rc:
        base = rc.push(demo["base"], "jobs-base").ref
        other = rc.push(demo["base-v2"], "jobs-other-base").ref
        return {
            "base": base, "other": other,
            "a": rc.push(demo["adapter-sql"], "jobs-a", base=base).ref,
            "b": rc.push(demo["adapter-chat"], "jobs-b", base=base).ref,
            "c": rc.push(demo["adapter-chat"], "jobs-c", base=other).ref,
            "ft": rc.push(demo["finetune"], "jobs-ft", base=base).ref,
            "r4": rc.push(make_adapter(scratch / "r4", seed=4, r=4), "jobs-r4", base=base).ref,
            "rp": rc.push(_rank_pattern_adapter(scratch / "rp"), "jobs-rp", base=base).ref,
            "rp2": rc.push(_rank_pattern_adapter(scratch / "rp2"), "jobs-rp2", base=base).ref,
        }


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1{path}", json=body, timeout=60)


def test_merge_requests_are_checked_by_the_librarys_own_method_table() -> None:
    """One table of merge methods and their parameters (torch-free), used by the request check and
    by the merge itself."""
    from registry.services.merges import METHODS
    from registry.weights.merge import METHODS as LIBRARY

    assert METHODS is LIBRARY


def _jobs(server: Server) -> int:
    return len(httpx.get(f"{server.url}/api/v1/jobs", params={"limit": 1000}).json()["items"])


@pytest.mark.parametrize("body,code", [
    ({"members": ["a"], "p": 1}, "invalid_members"),
    ({"members": ["a", "b"]}, "invalid_parameter"),
    ({"members": ["a", "b"], "p": 1, "max_error": 0.1}, "invalid_parameter"),
    ({"members": ["a", "b"], "p": -1}, "invalid_parameter"),
    ({"members": ["a", "a"], "p": 1}, "invalid_members"),
    ({"members": ["a", "c"], "p": 1}, "mixed_bases"),
    ({"members": ["a", "ft"], "p": 1}, "invalid_member"),
    ({"members": ["a", "nope@1"], "p": 1}, "unknown_member"),
    ({"members": ["a", "b"], "max_error": float("inf")}, "invalid_request"),
    # known from the members' metadata: refused now, not as a failed job later
    ({"members": ["a", "r4"], "p": 1}, "incompatible_members"),
    ({"members": ["a", "rp"], "p": 1}, "incompatible_members"),
    ({"members": ["a", "b"], "p": 99}, "invalid_p"),
    ({"members": ["a", "b"], "p": 2}, "invalid_p"),
])
def test_bad_basis_requests(server: Server, family: dict[str, str], body: dict[str, Any], code: str) -> None:
    body = {**body, "members": [family.get(m, m) for m in body["members"]]}
    before = _jobs(server)
    if body.get("max_error") == float("inf"):
        r = httpx.post(f"{server.url}/api/v1/bases", content=b'{"members": ["a", "b"], "max_error": Infinity}',
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 422
    else:
        assert_error(_post(server, "/bases", body), 422, code)
    assert _jobs(server) == before


@pytest.mark.parametrize("body,code", [
    ({"finetune": "ft", "target_base": "base"}, "same_base"),
    ({"finetune": "base", "target_base": "other"}, "invalid_finetune"),
    ({"finetune": "ft", "target_base": "a"}, "invalid_target_base"),
    ({"finetune": "ft", "target_base": "other", "alpha": 1e9}, "invalid_parameter"),
    ({"finetune": "ft", "target_base": "missing@3"}, "unknown_target_base"),
    ({"finetune": "a", "target_base": "other", "alpha": 0.5}, "invalid_parameter"),  # an adapter is re-pinned
])
def test_bad_transfer_requests(server: Server, family: dict[str, str], body: dict[str, Any], code: str) -> None:
    body = {k: family.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = _jobs(server)
    assert_error(_post(server, "/transfers", body), 422, code)
    assert _jobs(server) == before


@pytest.mark.parametrize("body,code", [
    ({"method": "slerp", "inputs": ["a", "b"], "name": "m1"}, "invalid_method"),
    ({"method": "ties", "inputs": ["a", "ft"], "name": "m1"}, "invalid_inputs"),
    ({"method": "ties", "inputs": ["a", "c"], "name": "m1"}, "mixed_bases"),
    ({"method": "ties", "inputs": ["a", "b"], "name": "m1", "params": {"temperature": 1}}, "invalid_parameter"),
    ({"method": "ties", "inputs": ["a", "b"], "name": "m1", "params": {"weights": [1]}}, "invalid_parameter"),
    ({"method": "ties", "inputs": ["a", "b"], "name": "bad name"}, "invalid_name"),
    ({"method": "ties", "inputs": ["a", "b"], "name": "m1", "rank": 0}, "invalid_parameter"),
    ({"method": "ties", "inputs": ["rp", "rp2"], "name": "m1"}, "rank_required"),
    # the method's declared parameters, checked before a job exists
    ({"method": "dare_linear", "inputs": ["a", "b"], "name": "m1"}, "invalid_parameter"),  # density required
    ({"method": "ties", "inputs": ["a", "b"], "name": "m1", "params": {"density": 1.5}}, "invalid_parameter"),
    ({"method": "task_arithmetic", "inputs": ["a", "b"], "name": "m1", "params": {"density": 0.5}},
     "invalid_parameter"),
])
def test_bad_merge_requests(server: Server, family: dict[str, str], body: dict[str, Any], code: str) -> None:
    body = {**body, "inputs": [family.get(i, i) for i in body["inputs"]]}
    before = _jobs(server)
    assert_error(_post(server, "/merges", body), 422, code)
    assert _jobs(server) == before


@pytest.mark.parametrize("body,code", [
    ({"name": "p1", "type": "delete_everything", "base_model": "x"}, "invalid_policy_type"),
    ({"name": "p1", "type": "refresh_basis", "base_model": "x", "params": {}}, "invalid_parameter"),
    ({"name": "p1", "type": "refresh_basis", "base_model": "x", "params": {"p": 1, "max_error": 0.1}},
     "invalid_parameter"),
    ({"name": "p1", "type": "transfer_on_base_update", "base_model": "x", "params": {"kinds": ["base"]}},
     "invalid_parameter"),
    ({"name": "bad name", "type": "refresh_basis", "base_model": "x", "params": {"p": 1}}, "invalid_name"),
])
def test_bad_policies(server: Server, body: dict[str, Any], code: str) -> None:
    assert_error(_post(server, "/policies", body), 422, code)


def test_queued_job_is_visible_and_idempotent(server: Server, family: dict[str, str]) -> None:
    body = {"members": [family["a"], family["b"]], "p": 1}
    r1 = httpx.post(f"{server.url}/api/v1/bases", json=body, headers={"Idempotency-Key": "basis-ab-once"})
    r2 = httpx.post(f"{server.url}/api/v1/bases", json=body, headers={"Idempotency-Key": "basis-ab-once"})
    assert r1.status_code == 202 and r1.json()["id"] == r2.json()["id"]
    job = httpx.get(f"{server.url}/api/v1/jobs/{r1.json()['id']}").json()
    assert job["type"] == "basis" and job["state"] == "queued" and job["params"]["members"] == body["members"]
    assert_error(httpx.get(f"{server.url}/api/v1/jobs/999999"), 404, "job_not_found")


def test_promote_only_candidates(server: Server, family: dict[str, str]) -> None:
    name, v = family["a"].split("@")
    r = httpx.post(f"{server.url}/api/v1/models/{name}/versions/{v}/promote", json={"alias": "prod"})
    assert r.status_code == 200 and r.json()["aliases"] == ["prod"]  # already ready: only the alias moves


def test_compatibility_report(server: Server, family: dict[str, str]) -> None:
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    old = [0, 1, 2, 0, 1, 2, 0, 0, 0, 1]  # 7 correct
    new = [0, 1, 2, 0, 1, 1, 0, 1, 2, 2]  # 8 correct; flips: idx 5 negative; 7, 8 positive
    with server.client() as rc:
        rc.store_predictions(family["a"], "eval-set", predictions=old, labels=labels)
        rc.store_predictions(family["b"], "eval-set", predictions=new, labels=labels)
        r = rc.compat(family["a"], family["b"], "eval-set")
        m = r.metrics
        assert m["nfr"] == pytest.approx(0.1) and m["pfr"] == pytest.approx(0.2)
        assert m["accuracy_v1"] == pytest.approx(0.7) and m["accuracy_v2"] == pytest.approx(0.8)
        assert m["btc"] == pytest.approx(1 - 0.1 / 0.7)
        rc.store_predictions(family["a"], "gen", kind="generative", scores=[0.5, 0.9, 0.2])
        rc.store_predictions(family["b"], "gen", kind="generative", scores=[0.6, 0.8, 0.2])
        g = rc.compat(family["a"], family["b"], "gen").metrics
        assert g["pfr"] == pytest.approx(1 / 3) and g["nfr"] == pytest.approx(1 / 3)
    a_name, a_v = family["a"].split("@")
    api = f"{server.url}/api/v1"
    assert_error(httpx.post(f"{api}/models/{a_name}/versions/{a_v}/predictions",
                            json={"dataset": "eval-set", "predictions": old, "labels": labels}), 409,
                 "predictions_exist")
    assert_error(httpx.post(f"{api}/models/{a_name}/versions/{a_v}/predictions",
                            json={"dataset": "short", "predictions": [1, 2], "labels": [1]}), 422,
                 "invalid_predictions")
    assert_error(httpx.get(f"{api}/compat", params={"old": family["a"], "new": family["c"], "dataset": "eval-set"}),
                 404, "predictions_not_found")
    assert_error(httpx.get(f"{api}/compat", params={"old": family["a"], "new": family["b"], "dataset": "missing"}),
                 404, "predictions_not_found")
