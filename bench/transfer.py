"""Benchmark: streamed fine-tuning transfer and TIES merge on a ~1 GB bf16 model (not a test).

Generates once, under ``.bench-data/transfer`` (gitignored), a Qwen2-0.5B-shaped transformer
(vocab 151936, hidden 896, 24 layers, MLP 4864, tied embeddings: ~494M params, ~0.99 GB bf16) in
~300 MB shards: a source base, a fine-tune of it, a target base and a second fine-tune (for the
merge). Then, in one run, on a warm page cache:

* read baseline: the three transfer inputs read tensor by tensor with ``safe_open``
  (``get_tensor(name).clone()`` so every byte is really read), the same bytes read raw, and one
  model's worth of bytes written raw (the transfer must also write its output);
* ``transfer(finetune, source, target)`` in a fresh subprocess: wall time (compared with the
  safe_open read and with read + raw write), and peak RSS growth over the post-import RSS (the
  high-water mark ``VmHWM`` is reset after imports via ``/proc/self/clear_refs``) compared with the
  largest tensor;
* ``merge_checkpoints(method, base, [3 inputs])`` likewise, against reading its 4 checkpoints, for
  each method of ``--merge-methods`` (default ``ties``; ``dare`` = ``dare_linear,dare_ties``; density
  0.2, weights 1, DARE seed 0), each interleaved with its own reads (and the baseline tree's merge).

Usage: ``python bench/transfer.py [--repeat 3] [--merge-repeat 2] [--regen] [--profile]
[--threads N] [--skip-merge] [--skip-transfer] [--merge-methods ties,dare]``. Prints markdown tables.
``--threads`` sets ``torch.set_num_threads`` in the measured subprocesses (default: torch's default,
one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from registry.weights.checkpoint import ShardedWriter, TensorSpec, open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".bench-data" / "transfer"
SHARD = 300 * 1000 * 1000
DTYPE = torch.bfloat16


def qwen2_05b_specs() -> list[TensorSpec]:
    """Tensor layout of a Qwen2-0.5B-like model (tied embeddings, no lm_head tensor)."""
    h, inter, layers, vocab, kv = 896, 4864, 24, 151936, 128
    specs = [TensorSpec("model.embed_tokens.weight", DTYPE, (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", DTYPE, (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", DTYPE, (h, h)),
            TensorSpec(p + "self_attn.q_proj.bias", DTYPE, (h,)),
            TensorSpec(p + "self_attn.k_proj.weight", DTYPE, (kv, h)),
            TensorSpec(p + "self_attn.k_proj.bias", DTYPE, (kv,)),
            TensorSpec(p + "self_attn.v_proj.weight", DTYPE, (kv, h)),
            TensorSpec(p + "self_attn.v_proj.bias", DTYPE, (kv,)),
            TensorSpec(p + "self_attn.o_proj.weight", DTYPE, (h, h)),
            TensorSpec(p + "post_attention_layernorm.weight", DTYPE, (h,)),
            TensorSpec(p + "mlp.gate_proj.weight", DTYPE, (inter, h)),
            TensorSpec(p + "mlp.up_proj.weight", DTYPE, (inter, h)),
            TensorSpec(p + "mlp.down_proj.weight", DTYPE, (h, inter)),
        ]
    specs.append(TensorSpec("model.norm.weight", DTYPE, (h,)))
    return specs


def generate(regen: bool) -> dict[str, Path]:
    paths = {k: DATA / k for k in ("source", "finetune", "target", "finetune2")}
    if not regen and all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    shutil.rmtree(DATA, ignore_errors=True)
    specs = qwen2_05b_specs()
    # (seed of the per-model perturbation, its scale relative to the base weights)
    recipe = {"source": None, "finetune": (1, 0.01), "target": (2, 0.05), "finetune2": (3, 0.01)}
    print(f"generating {len(specs)} tensors x {len(paths)} models under {DATA} ...", flush=True)
    writers = {k: ShardedWriter(paths[k], specs, SHARD) for k in paths}
    for i, spec in enumerate(specs):
        g = torch.Generator().manual_seed(1000 + i)
        base = torch.randn(spec.shape, generator=g) * 0.02
        for k, w in writers.items():
            r = recipe[k]
            if r is None:
                w.write(spec.name, base.to(DTYPE))
            else:
                gk = torch.Generator().manual_seed(r[0] * 100_000 + i)
                noise = torch.randn(spec.shape, generator=gk) * (0.02 * r[1])
                w.write(spec.name, (base + noise).to(DTYPE))
    for k, w in writers.items():
        w.close()
        (paths[k] / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 151936}))
    return paths


def warm(paths: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


CPU_READS: list[float] = []  # CPU time of each read_safe_open (user + system of this process)


def read_safe_open(paths: list[Path]) -> float:
    t = os.times()
    c0 = t.user + t.system
    t0 = time.perf_counter()
    for p in paths:
        ck = open_checkpoint(p)
        for f in ck.files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():  # noqa: SIM118 - safe_open handles are not dicts
                    h.get_tensor(name).clone()
    dt = time.perf_counter() - t0
    t = os.times()
    CPU_READS.append(t.user + t.system - c0)
    return dt


def read_raw(paths: list[Path]) -> float:
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


def write_raw(nbytes: int) -> float:
    buf = bytearray(16 << 20)
    path = DATA / "write-test.bin"
    path.unlink(missing_ok=True)
    os.sync()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left:
            left -= fh.write(memoryview(buf)[: min(left, len(buf))])
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


CHILD = r"""
import json, resource, sys, time, cProfile, pstats, io
import torch
args = json.loads(sys.argv[1])
if args.get("threads"): torch.set_num_threads(args["threads"])
if args["op"] == "transfer":
    from registry.weights import transfer as T
else:
    from registry.weights import merge as M
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) * 1024
kernel_rss = kernel_s = 0.0
if args["op"] == "merge":
    # One-off per process: load the compiled kernels (if this tree has them) with a tiny merge, so
    # that the timing and the RSS growth below are the merge's own (reported separately).
    before, t0 = status("VmRSS"), time.perf_counter()
    M.merge_tensors("ties", torch.zeros(64), [torch.ones(64)] * 3, {"density": 0.2})
    kernel_s, kernel_rss = time.perf_counter() - t0, status("VmRSS") - before
# Peak RSS of this process only: reset the high-water mark after imports (ru_maxrss would also
# carry the parent's RSS across fork+exec), then read VmHWM at the end.
open("/proc/self/clear_refs", "w").write("5")
base_rss = status("VmRSS")
def rss(): return status("VmHWM")
prof = cProfile.Profile() if args.get("profile") else None
ru0 = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru0.ru_utime + ru0.ru_stime
t0 = time.perf_counter()
if prof: prof.enable()
if args["op"] == "transfer":
    rep = T.transfer(args["f"], args["s"], args["t"], args["out"], device="cpu", max_shard_bytes=args["shard"])
    extra = {"cosine": rep.cosine, "relative_base_shift": rep.relative_base_shift}
else:
    rep = M.merge_checkpoints(args["method"], args["base"], args["inputs"], args["out"], args["params"],
                              device="cpu")
    extra = {}
if prof: prof.disable()
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
out = {"seconds": dt, "cpu": ru.ru_utime + ru.ru_stime - cpu0, "rss_growth": rss() - base_rss,
       "base_rss": base_rss, "kernel_s": kernel_s,
       "kernel_rss": kernel_rss, **extra}
if prof:
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12); out["profile"] = s.getvalue()
print("RESULT " + json.dumps(out))
"""


def child(args: dict[str, object], src: str | None = None) -> dict[str, object]:
    """Run one measured operation in a fresh process; ``src``: import ``registry`` from that tree
    (a checkout of the code before a change: the baseline of a before/after comparison)."""
    out = Path(str(args["out"]))
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # previous outputs' dirty pages: not this run's cost
    env = {**os.environ, "PYTHONPATH": src or str(ROOT)}
    # -P: no current directory on sys.path, so ``registry`` comes from PYTHONPATH (this tree or ``src``)
    res = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                         check=False, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stdout}\n{res.stderr}")
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    parsed: dict[str, object] = json.loads(line[len("RESULT ") :])
    return parsed


def mb(x: float) -> str:
    return f"{x / 1e6:,.0f} MB"


def merge_table(a: argparse.Namespace, method: str, params: dict[str, object], mg_inputs: list[Path],
                mg_args: dict[str, object], largest: int) -> None:
    """Time ``merge_checkpoints(method)`` (and the baseline tree's) interleaved with reads of its inputs."""
    read4: list[float] = []
    mgs: list[dict[str, object]] = []
    olds: list[dict[str, object]] = []
    for _ in range(a.merge_repeat):
        read4.append(read_safe_open(mg_inputs))
        mgs.append(child(mg_args))
        if a.baseline_src:
            olds.append(child(mg_args, a.baseline_src))
    t_mg = [float(str(r["seconds"])) for r in mgs]
    rss_mg = max(float(str(r["rss_growth"])) for r in mgs)
    print(f"\n### {method} merge, 3 inputs + base ({json.dumps(params)}; {a.merge_repeat} runs)\n")
    print("| measurement | min | median | ratio of mins |")
    print("|---|---|---|---|")
    print(
        f"| read 4 checkpoints, safe_open get_tensor().clone() | {min(read4):.2f} s | "
        f"{statistics.median(read4):.2f} s | 1.00 |"
    )
    print(
        f"| merge_checkpoints('{method}') | {min(t_mg):.2f} s | {statistics.median(t_mg):.2f} s | "
        f"**{min(t_mg) / min(read4):.1f}x** |"
    )
    print(f"| peak RSS growth of merge (max) | {mb(rss_mg)} | | {rss_mg / largest:.2f}x largest tensor |")
    k_s, k_rss = max(float(str(r["kernel_s"])) for r in mgs), max(float(str(r["kernel_rss"])) for r in mgs)
    print(f"| one-off per process, before the timing: load the compiled kernels | {k_s:.2f} s | | "
          f"{mb(k_rss)} RSS |")
    if olds:
        t_old = [float(str(r["seconds"])) for r in olds]
        rss_old = max(float(str(r["rss_growth"])) for r in olds)
        print(f"| baseline tree {a.baseline_src}: merge_checkpoints('{method}') | {min(t_old):.2f} s | "
              f"{statistics.median(t_old):.2f} s | **{min(t_old) / min(read4):.1f}x** |")
        print(f"| baseline tree: peak RSS growth of merge (max) | {mb(rss_old)} | | "
              f"{rss_old / largest:.2f}x largest tensor |")
        print(f"\nbaseline merge runs: {[round(x, 2) for x in t_old]} s")
    c_read = min(CPU_READS[-a.merge_repeat:])
    c_mg = min(float(str(r["cpu"])) for r in mgs)
    print(f"\nCPU time (user + system; not stretched by other processes): read 4 checkpoints {c_read:.2f} s, "
          f"merge {c_mg:.2f} s = **{c_mg / c_read:.1f}x**" + (
              f"; baseline merge {min(float(str(r['cpu'])) for r in olds):.2f} s = "
              f"**{min(float(str(r['cpu'])) for r in olds) / c_read:.1f}x**" if olds else ""))
    print(f"\nruns: merge {[round(x, 2) for x in t_mg]} s; read {[round(x, 2) for x in read4]} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--regen", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one transfer and one merge")
    ap.add_argument("--merge-repeat", type=int, default=2)
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--skip-transfer", action="store_true")
    ap.add_argument("--merge-methods", default="ties",
                    help="comma-separated merge methods to time (ties, dare_linear, dare_ties, task_arithmetic; "
                         "'dare' = dare_linear,dare_ties)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the measured subprocesses")
    ap.add_argument("--baseline-src", default=None,
                    help="a source tree of the code before a change (e.g. `git worktree add /tmp/base main`): "
                         "its merge is timed in the same run, interleaved")
    a = ap.parse_args()

    paths = generate(a.regen)
    ck = open_checkpoint(paths["source"])
    model_bytes = ck.nbytes
    largest = max(i.nbytes for i in (ck.info(n) for n in ck.names))
    print(
        f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {a.threads or torch.get_num_threads()}; model {len(ck)} tensors, {mb(model_bytes)} bf16 "
        f"in {len(ck.files)} shards, largest tensor {mb(largest)}; load average at start "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    tr_inputs = [paths["finetune"], paths["source"], paths["target"]]
    mg_inputs = [paths["source"], paths["finetune"], paths["target"], paths["finetune2"]]
    os.sync()  # flush generation writes so writeback does not disturb the timings
    warm(mg_inputs)

    tr_args = {
        "op": "transfer",
        "f": str(paths["finetune"]),
        "s": str(paths["source"]),
        "t": str(paths["target"]),
        "out": str(DATA / "out-transfer"),
        "shard": SHARD,
        "threads": a.threads,
    }
    if not a.skip_transfer:
        # Interleaved (read, raw read, write, transfer) x repeat, so a disturbance hits all of them;
        # min = least disturbed run, median for reference.
        read3: list[float] = []
        raw3: list[float] = []
        write1: list[float] = []
        trs: list[dict[str, object]] = []
        for _ in range(a.repeat):
            read3.append(read_safe_open(tr_inputs))
            raw3.append(read_raw(tr_inputs))
            write1.append(write_raw(model_bytes))
            trs.append(child(tr_args))
        t_tr_all = [float(str(r["seconds"])) for r in trs]
        rss = max(float(str(r["rss_growth"])) for r in trs)
        t_read = min(read3)
        print(f"### Transfer ({a.repeat} interleaved runs, warm page cache; min / median)\n")
        print("| measurement | min | median | ratio of mins |")
        print("|---|---|---|---|")
        rows = [
            ("read 3 inputs: safe_open get_tensor().clone(), tensor by tensor", read3),
            ("read 3 inputs: raw file read, 16 MiB buffer", raw3),
            ("write 1 model of bytes: raw file write (page cache, no fsync)", write1),
            ("**transfer** (3 in, 1 out, 4 shards, with diagnostics)", t_tr_all),
        ]
        for label, xs in rows:
            print(f"| {label} | {min(xs):.2f} s | {statistics.median(xs):.2f} s | {min(xs) / t_read:.2f}x |")
        t_rw = min(read3) + min(write1)
        print(
            f"| read 3 inputs (safe_open) + raw write 1 model (sum of the two mins above) | {t_rw:.2f} s | | "
            f"{t_rw / t_read:.2f}x; transfer = **{min(t_tr_all) / t_rw:.2f}x** this |"
        )
        t_raw = min(raw3) + min(write1)
        print(
            f"| raw read 3 inputs + raw write 1 model (sum of the two mins above) | {t_raw:.2f} s | | "
            f"{t_raw / t_read:.2f}x; transfer = **{min(t_tr_all) / t_raw:.2f}x** this |"
        )
        gbs = 3 * model_bytes / min(t_tr_all) / 1e9
        print(f"| transfer throughput (input bytes / min time) | {gbs:.2f} GB/s | | |")
        ratio = f"**{rss / largest:.3f}x** largest tensor"
        print(f"| peak RSS growth of transfer (VmHWM - RSS after imports; max) | {mb(rss)} | | {ratio} |")
        print(f"| diagnostics | cosine {trs[0]['cosine']:.4f}, rel. shift {trs[0]['relative_base_shift']:.4f} | | |")
        print(f"\ngoals: transfer <= 1.5x read -> {min(t_tr_all) / t_read:.2f}x; "
              f"RSS <= 4x largest -> {rss / largest:.3f}x")
        print(
            f"runs: transfer {[round(x, 2) for x in t_tr_all]} s; read {[round(x, 2) for x in read3]} s; "
            f"raw read {[round(x, 2) for x in raw3]} s; raw write {[round(x, 2) for x in write1]} s"
        )

    methods: list[str] = []
    for x in a.merge_methods.split(","):
        methods += ["dare_linear", "dare_ties"] if x.strip() == "dare" else [x.strip()]
    mg_args: dict[str, object] = {}
    if not a.skip_merge:
        for method in methods:
            params: dict[str, object] = {"density": 0.2, "weights": [1.0, 1.0, 1.0]}
            if method.startswith("dare"):
                params["seed"] = 0
            elif method == "task_arithmetic":
                del params["density"]
            mg_args = {
                "op": "merge",
                "method": method,
                "params": params,
                "base": str(paths["source"]),
                "inputs": [str(paths["finetune"]), str(paths["target"]), str(paths["finetune2"])],
                "out": str(DATA / "out-merge"),
                "threads": a.threads,
            }
            merge_table(a, method, params, mg_inputs, mg_args, largest)

    print(f"\nload average at end of timings: {os.getloadavg()[0]:.2f} (1 min)")
    if a.profile:
        print("\n### cProfile of one transfer (tottime)\n```")
        print(child({**tr_args, "profile": True})["profile"])
        print("```")
        if mg_args:
            print(f"\n### cProfile of one {mg_args['method']} merge (tottime)\n```")
            print(child({**mg_args, "profile": True})["profile"])
            print("```")


if __name__ == "__main__":
    main()
