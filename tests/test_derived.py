"""Derived versions served as files: adapters rebuilt from RMM bases, transfers rebuilt from
base + diff, the delta / merged formats; byte-identical responses, checksums, ranges, pruning
budgets, verification and bounded server memory."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.demo import make_adapter
from registry.weights.adapters import load_peft_adapter
from registry.weights.transfer import transfer

from .conftest import Stack, make_stack, start_server


@pytest.fixture(scope="module")
def dstack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           pg_databases: list[str]) -> Stack:
    return make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1)


def _get(stack: Stack, ref: str, path: str, fmt: str = "native", **headers: str) -> httpx.Response:
    name, v = ref.split("@")
    q = f"?format={fmt}" if fmt != "native" else ""
    return httpx.get(f"{stack.url}/api/v1/models/{name}/versions/{v}/files/{path}{q}", headers=headers, timeout=300)


def _family(stack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> dict[str, Any]:
    third = make_adapter(tmp_path / "third", seed=3, init_seed=7)
    with stack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        refs = [rc.push(folder, f"{name}-{k}", base=base.ref).ref
                for k, folder in (("sql", demo["adapter-sql"]), ("chat", demo["adapter-chat"]), ("third", third))]
    return {"base": base.ref, "members": refs, "folders": [demo["adapter-sql"], demo["adapter-chat"], third]}


class TinyLlama(torch.nn.Module):
    """Modules named like the demo checkpoint, so PEFT can load the registry's adapters on it."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        n_layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
        for i in range(n_layers):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = weights[f"model.layers.{i}.self_attn.{p}.weight"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w)
                setattr(layer.self_attn, p, lin)
            self.model.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            a = layer.self_attn
            x = a.o_proj(torch.tanh(a.q_proj(x) + a.k_proj(x) + a.v_proj(x)))
        return x


def _peft_outputs(base_dir: Path, adapter_dir: Path, x: torch.Tensor, scratch: Path) -> torch.Tensor:
    """Outputs of the toy model with the adapter loaded by PEFT (task type cleared: the toy model
    is a plain module, not a causal LM)."""
    from peft import PeftModel

    copy = scratch / f"peft-{adapter_dir.name}-{len(list(scratch.glob('peft-*')))}"
    shutil.copytree(adapter_dir, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["task_type"] = None
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    model = TinyLlama(load_file(base_dir / "model.safetensors"))
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(copy)).eval()(x)


def test_basis_members_served_after_pruning(dstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    fam = _family(dstack, demo, name, tmp_path)
    with dstack.client() as rc:
        job = dstack.wait_job(rc.create_basis(fam["members"], p=2, name=f"{name}-rmm").id)  # n=3: p=2 is exact
        pr = dstack.wait_job(rc.prune(job.result["basis_id"], max_error=0.0).id)
        assert sorted(p["ref"] for p in pr.result["pruned"]) == sorted(fam["members"])
        assert pr.result["refused"] == [] and all(p["exact"] for p in pr.result["pruned"])
        v = rc.get_version(fam["members"][1])
        assert v.storage_mode == "derived:basis" and v.summary["pruned"]["basis"] == f"{name}-rmm@1"
        assert {f.path for f in v.files} == {"adapter_config.json", "adapter_model.safetensors"}
        edges = rc.lineage(v.ref, direction="up").edges
        assert any(e.relation == "basis_member_of" and e.params["pruned"] for e in edges)

    # byte-identical on every request; the checksum header is the manifest's sha256
    f = next(x for x in v.files if x.path == "adapter_model.safetensors")
    first, second = _get(dstack, v.ref, f.path), _get(dstack, v.ref, f.path)
    assert first.content == second.content
    assert hashlib.sha256(first.content).hexdigest() == f.sha256 == first.headers["x-checksum-sha256"]
    assert first.headers["etag"] == f'"{f.sha256}"' and int(first.headers["content-length"]) == f.size
    parts = b"".join(_get(dstack, v.ref, f.path, Range=f"bytes={a}-{min(a + 999, f.size - 1)}").content
                     for a in range(0, f.size, 1000))
    assert parts == first.content

    # ... and across a server restart with the cache emptied (regenerated from the basis)
    dstack.server.stop()
    shutil.rmtree(dstack.server.home / "cache", ignore_errors=True)
    restarted = start_server(dstack.server.home, dstack.server.database_url, "sqlite",
                             **{k: v_ for k, v_ in dstack.env.items() if k.startswith("REGISTRY_") and
                                k not in ("REGISTRY_HOME", "REGISTRY_DATABASE_URL", "REGISTRY_PORT")})
    dstack.server = restarted
    third = _get(dstack, v.ref, f.path)
    assert third.content == first.content

    # PEFT loads it, and at full p it behaves like the original adapter
    with dstack.client() as rc:
        rc.pull(v.ref, tmp_path / "derived")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    want = _peft_outputs(demo["base"], fam["folders"][1], x, tmp_path)
    got = _peft_outputs(demo["base"], tmp_path / "derived", x, tmp_path)
    assert not torch.allclose(want, TinyLlama(load_file(demo["base"] / "model.safetensors"))(x), atol=1e-4)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)

    # the member's own blobs are no longer referenced: gc may remove them
    original = v.summary["pruned"]
    assert original["error"] < 1e-5


def test_pruning_respects_the_budget(dstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    fam = _family(dstack, demo, name, tmp_path)
    with dstack.client() as rc:
        job = dstack.wait_job(rc.create_basis(fam["members"], p=1, name=f"{name}-rmm").id)  # p < n-1: lossy
        basis = rc.get_basis(job.result["basis_id"])
        errors = sorted(m.error for m in basis.members)
        assert errors[0] > 1e-3
        none = dstack.wait_job(rc.prune(basis.id, max_error=0.0).id).result
        assert none["pruned"] == [] and len(none["refused"]) == 3
        assert all(r["error"] > 0 and r["max_error"] == 0.0 for r in none["refused"])
        budget = (errors[0] + errors[1]) / 2
        some = dstack.wait_job(rc.prune(basis.id, max_error=budget).id).result
        assert len(some["pruned"]) == 1 and some["pruned"][0]["error"] == pytest.approx(errors[0])
        assert len(some["refused"]) == 2
        assert all(rc.get_version(m).storage_mode in ("stored", "derived:basis") for m in fam["members"])
        # a member pruned beyond round-off is served as its reconstruction: error as recorded
        pruned_ref = some["pruned"][0]["ref"]
        rc.pull(pruned_ref, tmp_path / "lossy")
    folder = fam["folders"][fam["members"].index(pruned_ref)]
    orig, rec = load_peft_adapter(folder), load_peft_adapter(tmp_path / "lossy")
    num = sum(float(((rec.delta(n, torch.float64) - orig.delta(n, torch.float64)) ** 2).sum()) for n in orig.modules)
    den = sum(float((orig.delta(n, torch.float64) ** 2).sum()) for n in orig.modules)
    assert (num / den) ** 0.5 == pytest.approx(errors[0], rel=1e-2)


def test_delta_and_merged_formats(dstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    with dstack.client() as rc:
        base = rc.push(demo["base"], f"{name}-base")
        a = rc.push(demo["adapter-sql"], f"{name}-a", base=base.ref)
        rc.pull(a.ref, tmp_path / "delta", format="delta")
        rc.pull(a.ref, tmp_path / "merged", format="merged")
        listing = rc.list_files(a.ref, "delta")
        assert listing == rc.list_files(a.ref, "delta")  # defined once
    adapter = load_peft_adapter(demo["adapter-sql"])
    deltas = load_file(tmp_path / "delta" / "delta.safetensors")
    assert set(deltas) == {f"{m}.weight" for m in adapter.modules}
    for m in adapter.modules:
        assert torch.allclose(deltas[f"{m}.weight"], adapter.weight_delta(m).to(deltas[f"{m}.weight"].dtype), atol=1e-7)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    basew = load_file(demo["base"] / "model.safetensors")
    assert merged.keys() == basew.keys()
    k = "model.layers.1.self_attn.v_proj.weight"
    assert torch.allclose(merged[k], basew[k] + adapter.weight_delta("model.layers.1.self_attn.v_proj"), atol=1e-6)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], basew[untouched])
    assert (tmp_path / "merged" / "config.json").read_bytes() == (demo["base"] / "config.json").read_bytes()
    r = _get(dstack, a.ref, "nope.safetensors", "delta")
    assert r.status_code == 404
    assert _get(dstack, base.ref, "delta.safetensors", "delta").json()["error"]["code"] == "invalid_format"


def test_derived_transfer_streams_the_same_bytes(dstack: Stack, demo: dict[str, Path], name: str,
                                                 tmp_path: Path) -> None:
    with dstack.client() as rc:
        b1 = rc.push(demo["base"], f"{name}-base")
        ft = rc.push(demo["finetune"], f"{name}-ft", base=b1.ref)
        b2 = rc.push(demo["base-v2"], f"{name}-base")
        job = dstack.wait_job(rc.transfer(ft.ref, b2.ref, storage="derived").id)
        cand = rc.get_version(job.result["ref"])
        assert cand.storage_mode == "derived:diff" and cand.status == "candidate"
        rc.pull(cand.ref, tmp_path / "pulled")
    expected = tmp_path / "expected"
    transfer(demo["finetune"], demo["base"], demo["base-v2"], expected, 1.0, device="cpu")
    for f in cand.files:
        assert (tmp_path / "pulled" / f.path).read_bytes() == (expected / f.path).read_bytes(), f.path
    w = next(f for f in cand.files if f.path == "model.safetensors")
    whole = _get(dstack, cand.ref, w.path).content
    step = w.size // 7 + 1
    parts = [_get(dstack, cand.ref, w.path, Range=f"bytes={a}-{min(a + step, w.size) - 1}").content
             for a in range(0, w.size, step)]
    assert b"".join(parts) == whole and hashlib.sha256(whole).hexdigest() == w.sha256
    with dstack.client() as rc:
        ver = rc.wait_job(rc.verify(cand.ref).id).result
    assert ver["ok"] and {c["source"] for c in ver["files"]} >= {"generated", "blob"}


def test_verify_finds_a_corrupt_blob(dstack: Stack, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with dstack.client() as rc:
        v = rc.push(folder, name)
    ok = dstack.server.cli("verify", v.ref)
    assert "verified" in ok.stdout
    sha = next(f.sha256 for f in v.files if f.path == "config.json")
    blob = dstack.server.blob_dir / "sha256" / sha[:2] / sha[2:4] / sha
    blob.chmod(0o644)
    blob.write_text('{"tampered": true}')
    bad = dstack.server.cli("verify", v.ref, check=False)
    assert bad.returncode == 9 and "MISMATCH" in bad.stdout and "CORRUPT" in bad.stdout  # 9: integrity


@pytest.mark.slow
def test_streaming_a_derived_1gb_model_keeps_server_memory_flat(tmp_path_factory: pytest.TempPathFactory,
                                                                request: pytest.FixtureRequest,
                                                                pg_databases: list[str], tmp_path: Path) -> None:
    stack = make_stack(request, tmp_path_factory, pg_databases, "sqla", workers=1,
                       REGISTRY_DERIVED_CACHE_BYTES="0", REGISTRY_CHECK_FINITE="off")
    shape = (4096, 8192)  # 64 MiB of fp16 per tensor, one tensor per shard, 16 shards = 1 GiB
    names = [f"layers.{i:02d}.weight" for i in range(16)]

    def shard(folder: Path, i: int, value: float) -> None:
        t = torch.full(shape, value, dtype=torch.float16) + (torch.arange(shape[1]) % 97).to(torch.float16) * 1e-3
        save_file({names[i]: t}, str(folder / f"model-{i + 1:05d}-of-00016.safetensors"))

    def checkpoint(folder: Path, like: Path | None, changed: dict[int, float]) -> Path:
        """A sharded checkpoint sharing all but ``changed`` shards with ``like`` (pushes dedupe them)."""
        if like is None:
            folder.mkdir(parents=True)
            for i in range(16):
                shard(folder, i, 0.5)
            index = {"metadata": {"total_size": 16 * 64 << 20},
                     "weight_map": {n: f"model-{i + 1:05d}-of-00016.safetensors" for i, n in enumerate(names)}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            shutil.copytree(like, folder)
        for i, value in changed.items():
            shard(folder, i, value)
        (folder / "config.json").write_text(json.dumps({"model_type": "big", "changed": sorted(changed)}))
        return folder

    b1_dir = checkpoint(tmp_path / "b1", None, {})
    with stack.client() as rc:
        b1 = rc.push(b1_dir, "big-base")
        ft = rc.push(checkpoint(tmp_path / "ft", b1_dir, {1: 0.75, 2: 0.625}), "big-ft", base=b1.ref)
        b2 = rc.push(checkpoint(tmp_path / "b2", b1_dir, {0: 0.25}), "big-base")
        shutil.rmtree(tmp_path, ignore_errors=True)
        cand = rc.get_version(stack.wait_job(rc.transfer(ft.ref, b2.ref, storage="derived").id,
                                             timeout=600).result["ref"])
    w = next(f for f in cand.files if f.path == "model.safetensors")
    assert w.size > 1 << 30 and cand.storage_mode == "derived:diff"
    url = f"{stack.url}/api/v1/models/big-ft/versions/{cand.version}/files/model.safetensors"
    httpx.get(url, headers={"Range": "bytes=0-999999"}, timeout=600)  # warm up: lazy imports of the math code
    pid = stack.server.proc.pid  # type: ignore[union-attr]
    probe = textwrap.dedent(f"""
        import hashlib, httpx, pathlib
        def rss(field):
            for line in pathlib.Path("/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        pathlib.Path("/proc/{pid}/clear_refs").write_text("5")
        before = rss("VmRSS")
        h, n = hashlib.sha256(), 0
        with httpx.stream("GET", "{url}", timeout=600) as r:
            for chunk in r.iter_bytes(1 << 20):
                h.update(chunk)
                n += len(chunk)
        print(n, h.hexdigest(), rss("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900)
    n, sha, growth = out.stdout.split()
    assert int(n) == w.size and sha == w.sha256
    assert int(growth) < 100 << 20, f"server RSS grew by {int(growth) >> 20} MiB"


def test_every_storage_mode_is_a_job_input(dstack: Stack, demo: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Pruned basis members (``derived:basis``) and derived transfers (``derived:diff``) work as
    the input of every job type, exactly like stored versions (they used to fail with "missing
    adapter_config.json": job inputs linked stored blobs only)."""
    fam = _family(dstack, demo, name, tmp_path)
    with dstack.client() as rc:
        basis = dstack.wait_job(rc.create_basis(fam["members"], p=2, name=f"{name}-rmm").id)
        assert basis.state == "succeeded"
        pruned = dstack.wait_job(rc.prune(basis.result["basis_id"], max_error=0.0).id)
        assert len(pruned.result["pruned"]) == 3
        assert all(rc.get_version(r).storage_mode == "derived:basis" for r in fam["members"])

        merge = dstack.wait_job(rc.merge("ties", fam["members"][:2], f"{name}-merged", params={"density": 0.5}).id)
        assert merge.state == "succeeded", merge.error
        # a TIES merge re-factorised to rank r is lossy: the error is on the job and the version
        assert 0 < merge.result["error"] < 1 and set(merge.result["module_errors"])
        assert rc.get_version(merge.result["ref"]).summary["merge"]["error"] == merge.result["error"]
        again = dstack.wait_job(rc.create_basis(fam["members"], p=2, name=f"{name}-rmm2").id)
        assert again.state == "succeeded", again.error
        assert max(m.error for m in rc.get_basis(again.result["basis_id"]).members) < 1e-4
        ver = dstack.wait_job(rc.verify(fam["members"][0]).id)
        assert ver.state == "succeeded" and ver.result["ok"]
        b1 = rc.get_version(fam["base"])
        ft = rc.push(demo["finetune"], f"{name}-ft", base=b1.ref)
        b2 = rc.push(demo["base-v2"], fam["base"].split("@")[0])
        moved = dstack.wait_job(rc.transfer(fam["members"][2], b2.ref, storage="stored").id)
        assert moved.state == "succeeded", moved.error

        # a derived transfer (derived:diff) as the fine-tune of a transfer and the input of a merge
        cand = dstack.wait_job(rc.transfer(ft.ref, b2.ref, storage="derived").id).result["ref"]
        rc.promote(cand)
        assert rc.get_version(cand).storage_mode == "derived:diff"
        back = dstack.wait_job(rc.transfer(cand, b1.ref, storage="stored").id)
        assert back.state == "succeeded", back.error
        stored = dstack.wait_job(rc.transfer(ft.ref, b2.ref, alpha=0.5).id).result["ref"]
        rc.promote(stored)
        fm = dstack.wait_job(rc.merge("task_arithmetic", [cand, stored], f"{name}-ftmerge").id)
        assert fm.state == "succeeded", fm.error
        rc.pull(back.result["ref"], tmp_path / "back")
    # fine-tune moved to v2 and back to v1 is the fine-tune again (to bf16/fp32 round-off)
    got = load_file(tmp_path / "back" / "model.safetensors")
    want = load_file(demo["finetune"] / "model.safetensors")
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-2) for k in want)
