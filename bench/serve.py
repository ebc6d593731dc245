"""Serving derived versions vs stored ones, over HTTP on loopback, against the embedded server.

1. An adapter rebuilt from its RMM basis on every request (cache off) vs the same adapter stored.
2. An adapter rebuilt from a compression plan (``--plan-budget``, pruned) on every request (cache off)
   vs the same adapter stored.
3. A transferred model rebuilt as target + (fine-tune - source) on every request (cache off) vs the
   same transfer stored as blobs. Each download is verified against the manifest's sha256.

Besides the best wall time per download, the server process's CPU time of one download (the least
of the repeats) for the adapter rows: a ratio the load of a shared machine distorts less.

    python bench/serve.py                      # ~1 GiB model, 8 adapters
    python bench/serve.py --model-mb 256 --adapters 4 --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.client import FileEntry, RegistryClient  # noqa: E402
from tests.conftest import start_server  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_base(folder: Path, layers: int, hidden: int, value: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(value * 1000))
    for i in range(layers):
        t = {f"model.layers.{i}.self_attn.{m}.weight": (torch.randn(hidden, hidden, generator=g) * 0.02 + value)
             .to(torch.float16) for m in MODULES}
        save_file(t, str(folder / f"model-{i + 1:05d}-of-{layers:05d}.safetensors"))
    index = {"metadata": {}, "weight_map": {f"model.layers.{i}.self_attn.{m}.weight":
                                            f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
                                            for i in range(layers) for m in MODULES}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "value": value}))
    return folder


def make_adapter(folder: Path, layers: int, hidden: int, r: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g0, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for m in MODULES:
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[f"{key}.lora_A.weight"] = (torch.randn(r, hidden, generator=g0) / hidden**0.5
                                         + 0.02 * torch.randn(r, hidden, generator=g)).to(torch.float16)
            t[f"{key}.lora_B.weight"] = (torch.randn(hidden, r, generator=g0) * 0.01
                                         + 0.02 * torch.randn(hidden, r, generator=g)).to(torch.float16)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(MODULES), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None}))
    return folder


def download(url: str, ref: str, files: list[FileEntry]) -> float:
    name, v = ref.split("@")
    t = time.perf_counter()
    for f in files:
        h = hashlib.sha256()
        with httpx.stream("GET", f"{url}/api/v1/models/{name}/versions/{v}/files/{f.path}", timeout=900) as r:
            for chunk in r.iter_bytes(4 << 20):
                h.update(chunk)
        assert h.hexdigest() == f.sha256, f.path
    return time.perf_counter() - t


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, float] = {}  # label -> the server's CPU seconds of the best download


def best(fn, repeat: int, pid: int | None = None, label: str = "") -> float:  # type: ignore[no-untyped-def]
    """Best wall time of ``repeat`` calls; with ``pid``, also the least server CPU of one call (in CPU)."""
    walls, cpus = [], []
    for _ in range(repeat):
        c0 = server_cpu(pid) if pid else 0.0
        walls.append(fn())
        cpus.append(server_cpu(pid) - c0 if pid else 0.0)
    if pid:
        CPU[label] = min(cpus)
    return min(walls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-mb", type=int, default=1024, help="size of the transferred model (fp16)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plan-budget", type=float, default=0.05, help="max_error of the compression plan")
    ap.add_argument("--data", type=Path, default=Path(".bench-data/serve"))
    args = ap.parse_args()

    hidden = 2048
    layers = max(1, args.model_mb * 2**20 // (4 * hidden * hidden * 2))
    shutil.rmtree(args.data, ignore_errors=True)
    args.data.mkdir(parents=True)
    home = args.data / "home"
    srv = start_server(home, f"sqlite:///{home / 'registry.db'}", REGISTRY_EMBEDDED_WORKERS="1",
                       REGISTRY_DERIVED_CACHE_BYTES="0", REGISTRY_DISPATCH_INTERVAL="0.2")
    url = srv.url
    try:
        rc = RegistryClient(url)
        b1 = rc.push(make_base(args.data / "b1", layers, hidden, 0.5), "bench-base")
        refs = [rc.push(make_adapter(args.data / f"a{i}", layers, hidden, args.rank, i), f"bench-lora-{i}",
                        base=b1.ref).ref for i in range(args.adapters)]
        member = rc.get_version(refs[0])
        pid = srv.proc.pid
        t_stored_adapter = best(lambda: download(url, member.ref, member.files), args.repeat, pid, "stored")
        job = rc.wait_job(rc.create_basis(refs, p=args.adapters - 1).id, timeout=3600)
        rc.wait_job(rc.prune(job.result["basis_id"], max_error=0.0).id, timeout=3600)
        derived_member = rc.get_version(refs[0])
        assert derived_member.storage_mode == "derived:basis"
        download(url, derived_member.ref, derived_member.files)  # warm-up (imports)
        t_derived_adapter = best(lambda: download(url, derived_member.ref, derived_member.files), args.repeat,
                                 pid, "basis")

        planned = [rc.push(make_adapter(args.data / f"p{i}", layers, hidden, args.rank, 100 + i), f"bench-plan-{i}",
                           base=b1.ref).ref for i in range(args.adapters)]
        t0 = time.perf_counter()
        plan_job = rc.wait_job(rc.compress(planned, max_error=args.plan_budget, prune=True).id, timeout=7200)
        t_plan = time.perf_counter() - t0
        rc.wait_job(plan_job.result["prune_job_id"], timeout=7200)
        plan = rc.get_compression(plan_job.result["compression_id"])
        plan_member = rc.get_version(planned[0])
        assert plan_member.storage_mode == "derived:plan"
        download(url, plan_member.ref, plan_member.files)  # warm-up
        t_plan_adapter = best(lambda: download(url, plan_member.ref, plan_member.files), args.repeat, pid, "plan")

        ft = rc.push(make_base(args.data / "ft", layers, hidden, 0.75), "bench-ft", base=b1.ref)
        b2 = rc.push(make_base(args.data / "b2", layers, hidden, 0.25), "bench-base")
        derived = rc.get_version(rc.wait_job(rc.transfer(ft.ref, b2.ref, storage="derived").id,
                                             timeout=3600).result["ref"])
        assert derived.storage_mode == "derived:diff"
        # the stored equivalent: the same bytes pushed as an ordinary stored version
        rc.pull(derived.ref, args.data / "copy")
        stored = rc.push(args.data / "copy", "bench-stored-copy")
        assert {f.sha256 for f in stored.files} == {f.sha256 for f in derived.files}
        t_stored_model = best(lambda: download(url, stored.ref, stored.files), args.repeat)
        download(url, derived.ref, derived.files[:1])
        t_derived_model = best(lambda: download(url, derived.ref, derived.files), args.repeat)
        a_mb, m_mb = member.size / 2**20, stored.size / 2**20
        print(f"\nembedded server on loopback, cache off, best of {args.repeat}; {os.cpu_count()} CPU cores; "
              f"{args.adapters} adapters r={args.rank} ({a_mb:.1f} MiB each), model {m_mb:.0f} MiB fp16\n")
        print("| download | stored (s) | derived (s) | derived / stored | goal |")
        print("|---|---:|---:|---:|---:|")
        print(f"| adapter rebuilt from its RMM basis (p = n−1) | {t_stored_adapter:.3f} | {t_derived_adapter:.3f} | "
              f"{t_derived_adapter / t_stored_adapter:.2f}× | ≤ 1.5× |")
        print(f"| adapter rebuilt from a compression plan (ε = {args.plan_budget}) | {t_stored_adapter:.3f} | "
              f"{t_plan_adapter:.3f} | {t_plan_adapter / t_stored_adapter:.2f}× | ≤ 1.5× |")
        print(f"| transfer rebuilt as target + (fine-tune − source) | {t_stored_model:.2f} | {t_derived_model:.2f} | "
              f"{t_derived_model / t_stored_model:.2f}× | ≤ 1.5× |")
        print("\nserver CPU per adapter download (s; least of the repeats, the API process):")
        print("| download | stored | derived | derived / stored |")
        print("|---|---:|---:|---:|")
        for label, key in (("adapter rebuilt from its RMM basis", "basis"),
                           ("adapter rebuilt from a compression plan", "plan")):
            print(f"| {label} | {CPU['stored']:.3f} | {CPU[key]:.3f} | {CPU[key] / max(CPU['stored'], 1e-9):.2f}× |")
        print(f"\ncompression plan of {args.adapters} adapters: {plan.stored_bytes} bytes stored for "
              f"{plan.original_bytes} ({plan.ratio:.3f}), max served error "
              f"{max(m.served_error for m in plan.members):.4f}, planned in {t_plan:.1f} s (job, end to end)")
        print(f"\nstorage: stored transfer {stored.size / 2**20:.0f} MiB of blobs; derived transfer keeps "
              f"{derived.summary['derived']['stored_bytes'] / 2**20:.2f} MiB (side files, shared with its inputs)")
    finally:
        srv.stop()
        shutil.rmtree(args.data, ignore_errors=True)


if __name__ == "__main__":
    main()
