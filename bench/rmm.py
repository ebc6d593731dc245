"""Benchmark: RMM bases (registry.weights.rmm) on a 7B-shaped collection of LoRA adapters.

Generates n PEFT LoRA folders (fp16 safetensors) for every linear module of a Llama-7B-shaped model
(hidden 4096, intermediate 11008, q/k/v/o/gate/up/down), once, under --data, then measures in one
run: reading the n adapters, fitting a basis (fixed p and error budget), reconstructing + writing
one member vs reading it, a p sweep against the per-adapter truncated-SVD baseline and the
delta-space variant at equal storage, add_member, and the eigendecomposition approaches.

    python bench/rmm.py                      # full size (≈640 MB of inputs, a few minutes)
    python bench/rmm.py --layers 2           # quick run

Synthetic factors ("shared initialisation plus per-task drift", like LoRAs trained from one seed):
A_i = A_0 + 0.25·bound·N_i with A_0 ~ U(−bound, bound), bound = 1/√in (PEFT's kaiming init of
lora_A); B_i = 0.01·(0.6·Z_0 + 0.8·Z_i) (lora_B starts at 0, so it is all drift; Z_0 is a component
the tasks share). The independent-initialisation comparison draws A_0 per adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from registry.weights import rmm
from registry.weights.adapters import LoraAdapter, load_peft_adapter, save_peft_adapter
from registry.weights.rmm_baselines import adapter_error, fit_delta_basis, truncate_adapter

HIDDEN, INTER = 4096, 11008
PROJ = {  # name: (in_features, out_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTER),
    "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}
T = TypeVar("T")


def module_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{p}": s for i in range(layers) for p, s in PROJ.items()}


def synth_factors(
    shapes: dict[str, tuple[int, int]], n: int, r: int, seed: int, shared_init: bool = True
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per adapter, module → (A [r, in], B [out, r]) in float32 (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
    for name, (d, m) in shapes.items():
        bound = 1.0 / math.sqrt(d)
        a0 = (torch.rand(r, d, generator=gen) * 2 - 1) * bound
        z0 = torch.randn(m, r, generator=gen)
        for i in range(n):
            if not shared_init:
                a0 = (torch.rand(r, d, generator=gen) * 2 - 1) * bound
            a = a0 + 0.25 * bound * torch.randn(r, d, generator=gen)
            b = 0.01 * (0.6 * z0 + 0.8 * torch.randn(m, r, generator=gen))
            out[i][name] = (a, b)
    return out


def generate(data: Path, layers: int, n: int, r: int, alpha: int) -> list[Path]:
    """Write n PEFT folders (fp16) under data, unless a matching set is already there."""
    stamp = {"layers": layers, "n": n, "r": r, "alpha": alpha, "version": 1}
    folders = [data / f"adapter-{i}" for i in range(n)]
    marker = data / "stamp.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp and all(f.is_dir() for f in folders):
        return folders
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    shapes = module_shapes(layers)
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    scale = math.sqrt(alpha / r)  # synth factors are the folded ones; PEFT files hold A/√s, B/√s
    for li in range(layers):  # per layer, to bound memory
        layer = {k: v for k, v in shapes.items() if k.startswith(f"model.layers.{li}.")}
        for i, mods in enumerate(synth_factors(layer, n, r, seed=1000 + li)):
            for name, (a, b) in mods.items():
                tensors[i][f"base_model.model.{name}.lora_A.weight"] = (a / scale).half()
                tensors[i][f"base_model.model.{name}.lora_B.weight"] = (b / scale).half()
    for i, folder in enumerate(folders):
        folder.mkdir()
        save_file(tensors[i], str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "synthetic/llama-7b-shape",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted({p.split(".")[-1] for p in PROJ}),
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    marker.write_text(json.dumps(stamp))
    print(f"generated {n} adapters ({layers} layers) in {time.perf_counter() - t0:.1f} s under {data}")
    return folders


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[T, float]:
    """Best wall time of ``repeat`` runs (the result of the last)."""
    best = math.inf
    result: Any = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def cpu_seconds() -> float:
    """This process's CPU time (user + system, all threads): unlike wall time, not stretched by
    other processes on a shared machine (nor by waiting for the disk)."""
    t = os.times()
    return t.user + t.system


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def subset(adapter: LoraAdapter, names: Sequence[str]) -> LoraAdapter:
    return LoraAdapter(
        modules={k: adapter.modules[k] for k in names},
        config=adapter.config,
        dtype=adapter.dtype,
        fan_in_fan_out=adapter.fan_in_fan_out,
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def as_half(basis: rmm.RmmBasis) -> rmm.RmmBasis:
    """The basis with μ, U, C rounded to float16 (for timing what a float16-stored basis reads)."""
    mods = {k: rmm.ModuleBasis(**{f: t.half() for f, t in vars(mb).items()}) for k, mb in basis.modules.items()}
    return dataclasses.replace(basis, modules=mods, storage_dtype=torch.float16)


def fit_profile(
    adapters: Sequence[LoraAdapter], p: int, device: torch.device
) -> tuple[rmm.RmmBasis, float, dict[str, float]]:
    """fit_basis(p) with its wall time and the seconds spent in the batched eigendecompositions and
    in the member-error bookkeeping (reconstructing all members' factors + the r × r Grams)."""
    spent = {"kernel": 0.0, "eigh": 0.0, "errors": 0.0}
    originals = {"_eigh": rmm._eigh, "_all_factors": rmm._all_factors,
                 "_residual_errors": rmm._residual_errors, "_fit_module_cpu": rmm._fit_module_cpu}

    def counting(name: str, key: str) -> Callable[..., Any]:
        fn = originals[name]

        def run(*a: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a)
            spent[key] += time.perf_counter() - t0
            return out

        return run

    rmm._eigh = counting("_eigh", "eigh")
    rmm._all_factors = counting("_all_factors", "errors")
    rmm._residual_errors = counting("_residual_errors", "errors")
    rmm._fit_module_cpu = counting("_fit_module_cpu", "kernel")
    try:
        basis, t = timed(lambda: rmm.fit_basis(adapters, p=p, device=device))
    finally:
        for name, fn in originals.items():
            setattr(rmm, name, fn)
    return basis, t, spent


def approaches(adapters: Sequence[LoraAdapter], device: torch.device) -> None:
    """Time the step-2 decompositions on one layer's positions and check each is exact at full p."""
    names = [k for k in adapters[0].module_names() if k.startswith("model.layers.0.")]
    parts = []
    for k in names:
        a, b = rmm._stack(adapters, k, device)
        parts += [a.permute(2, 1, 0), b.permute(1, 2, 0)]
    X = torch.cat(parts)
    P, r, n = X.shape
    Xd = X.double()
    Xc = Xd - Xd.mean(-1, keepdim=True)
    kfull = min(r, n - 1)

    def exactness(U: torch.Tensor) -> float:
        Uk = U[:, :, :kfull].double()
        return float(((Uk @ (Uk.mT @ Xc)) - Xc).norm() / Xc.norm())

    def svd() -> torch.Tensor:
        return torch.linalg.svd(Xc.float(), full_matrices=False)[0]

    def gram_eigh(dtype: torch.dtype, threaded: bool, helmert: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            x = Xc.to(dtype)
            if helmert:  # drop the null direction 1 first: (n−1)×(n−1) Grams
                x = x @ rmm._helmert(n, dtype, x.device)
            g = x.mT @ x
            _, v = rmm._eigh(g) if threaded else torch.linalg.eigh(g)
            w = x @ v.flip(-1)[..., :kfull]
            return w / torch.linalg.vector_norm(w, dim=1, keepdim=True)

        return run

    def compiled() -> torch.Tensor:  # steps 1-3 in one compiled pass (what fit_basis runs on the CPU)
        from registry.weights import kernels

        x = X.contiguous()
        mu, U = torch.empty(P, r, dtype=torch.float64), torch.empty(P, r, kfull, dtype=torch.float64)
        C = torch.empty(P, kfull, n, dtype=torch.float64)
        q = rmm._helmert(n, torch.float64, torch.device("cpu")).numpy()
        args = (x.numpy(), q, kfull, rmm.EIG_RTOL, mu.numpy(), U.numpy(), C.numpy(), None)
        rmm._split(P, lambda lo, hi: kernels.rmm_positions(*args, lo, hi), kernels.LANES)
        return U

    rows = []
    for label, fn in [
        ("compiled kernel (numba): Helmert Gram + lane-parallel Jacobi, U and C, float64 (used on CPU)",
         compiled),
        ("torch.linalg.svd of X_c [P, r, n], float32", svd),
        ("eigh of the n×n Gram X_cᵀX_c, float32", gram_eigh(torch.float32, False, False)),
        ("eigh of the n×n Gram X_cᵀX_c, float64", gram_eigh(torch.float64, False, False)),
        ("eigh of the (n−1)×(n−1) Gram of X_c Q, float64", gram_eigh(torch.float64, False, True)),
        ("same, batch split over 2 threads (the torch path: other devices)", gram_eigh(torch.float64, True, True)),
    ]:
        U, sec = timed(fn, repeat=2)
        rows.append((label, f"{sec:.3f}", f"{exactness(U):.1e}"))
    print(f"\n### Step 2 on one layer ({P} positions, r={r}, n={n}, device {device})\n")
    print(table(["approach", "seconds", "rel. error of full-p reconstruction"], rows))


BASELINE = r"""
import json, sys, time, tempfile, shutil
import torch
from registry.weights import rmm
from registry.weights.adapters import load_peft_adapter, save_peft_adapter
folders, p = json.loads(sys.argv[1]), int(sys.argv[2])
import os
def cpu(): t = os.times(); return t.user + t.system
c0, t0 = cpu(), time.perf_counter(); ads = [load_peft_adapter(f) for f in folders]
read, cpu_read = time.perf_counter() - t0, cpu() - c0
c0, t0 = cpu(), time.perf_counter(); basis = rmm.fit_basis(ads, p=p)
fit, cpu_fit = time.perf_counter() - t0, cpu() - c0
out = tempfile.mkdtemp()
read1 = recw = 1e9
for _ in range(3):
    t0 = time.perf_counter(); load_peft_adapter(folders[0]); read1 = min(read1, time.perf_counter() - t0)
    t0 = time.perf_counter(); save_peft_adapter(basis.reconstruct(0), out + "/m0")
    recw = min(recw, time.perf_counter() - t0)
shutil.rmtree(out)
print("RESULT " + json.dumps({"read": read, "fit": fit, "read1": read1, "recw": recw, "cpu_read": cpu_read,
                             "cpu_fit": cpu_fit}))
"""


def baseline_run(src: str, folders: Sequence[Path], p: int) -> dict[str, float]:
    """Read + fit + reconstruct/save timed by the code in ``src`` (a fresh process, same threads)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": src}
    # -P: no current directory on sys.path, so ``registry`` comes from ``src``
    res = subprocess.run([sys.executable, "-P", "-c", BASELINE, json.dumps([str(f) for f in folders]), str(p)],
                         capture_output=True, text=True, check=True, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out: dict[str, float] = json.loads(line[len("RESULT "):])
    return {k: round(v, 3) for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--max-error", type=float, default=0.3)
    ap.add_argument("--sweep-layers", type=int, default=2, help="layers used for the p sweep")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved read/fit runs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data", default=".bench-data/rmm")
    ap.add_argument("--timings-only", action="store_true",
                    help="skip the quality tables (p sweep, add_member, initialisation): only the timings")
    ap.add_argument("--baseline-src", default=None,
                    help="a source tree of the code before a change: its read / fit / rebuild + write are timed "
                         "in a subprocess in the same run (ratios within that process)")
    args = ap.parse_args(argv)
    device = rmm.resolve_device(args.device)
    print(f"# RMM benchmark: n={args.n}, r={args.r}, {args.layers} layers, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    print("command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    folders = generate(Path(args.data), args.layers, args.n, args.r, args.alpha)
    input_bytes = sum(folder_bytes(f) for f in folders)

    # 1-2. read and fit, interleaved (read, fit, read, fit, ...) so that background load on a
    # shared machine hits both alike; ratios use the best time of each.
    for f in folders:
        load_peft_adapter(f)  # warm the page cache (it cannot be dropped without root)
    reads, fits, shares = [], [], []
    baseline: list[dict[str, float]] = []
    cpu_reads, cpu_fits = [], []
    for _ in range(args.repeat):
        c0 = cpu_seconds()
        adapters, t = timed(lambda: [load_peft_adapter(f) for f in folders])
        cpu_reads.append(cpu_seconds() - c0)
        reads.append(t)
        c0 = cpu_seconds()
        basis, t, spent = fit_profile(adapters, args.p, device)
        cpu_fits.append(cpu_seconds() - c0)
        fits.append(t)
        shares.append({k: v / t for k, v in spent.items()})
        if args.baseline_src:
            baseline.append(baseline_run(args.baseline_src, folders, args.p))
    t_read, t_fit = min(reads), min(fits)
    best = shares[fits.index(t_fit)]
    budget, t_budget = timed(lambda: rmm.fit_basis(adapters, max_error=args.max_error, device=device))
    # 3. reconstruct + write one member vs read it, interleaved likewise
    out_dir = Path(tempfile.mkdtemp(prefix="rmm-bench-"))
    try:
        read1, recs, recws = [], [], []
        for _ in range(3):
            read1.append(timed(lambda: load_peft_adapter(folders[0]))[1])
            recs.append(timed(lambda: basis.reconstruct(0, device=device))[1])
            recws.append(timed(lambda: save_peft_adapter(basis.reconstruct(0, device=device), out_dir / "m0"))[1])
        t_read1, t_rec, t_recw = min(read1), min(recs), min(recws)
        # the same basis held in float16 (what storage_dtype=torch.float16 stores): half the bytes to read
        half = as_half(basis)
        t_recw16 = min(timed(lambda: save_peft_adapter(half.reconstruct(0), out_dir / "h0"))[1] for _ in range(3))
        half = None
        rmm.save_basis(basis, out_dir / "basis.safetensors")
        basis_bytes = (out_dir / "basis.safetensors").stat().st_size
        _, t_load_basis = timed(lambda: rmm.load_basis(out_dir / "basis.safetensors").reconstruct(0), repeat=2)
    finally:
        shutil.rmtree(out_dir)

    errs = [e.overall for e in basis.member_errors()]
    print(f"\n### Timings ({args.layers} layers, {len(basis.modules)} modules, "
          f"{sum(mb.positions for mb in basis.modules.values())} positions; best of {args.repeat} interleaved runs)\n")
    print(table(
        ["step", "seconds", "ratio", "goal"],
        [
            (f"read {args.n} adapters (load_peft_adapter, warm page cache, {input_bytes / 2**20:.0f} MiB fp16)",
             f"{t_read:.2f}", "1.00", ""),
            (f"fit p={args.p} (compiled kernel {100 * best['kernel']:.0f}%, torch eigh {100 * best['eigh']:.0f}%, "
             f"member errors {100 * best['errors']:.0f}%)",
             f"{t_fit:.2f}",
             f"{t_fit / t_read:.2f}× read", "≤ 5× (CPU)"),
            (f"fit max_error={args.max_error} (p per module {sorted(set(budget.p.values()))})",
             f"{t_budget:.2f}", f"{t_budget / t_read:.2f}× read", ""),
            ("read 1 adapter", f"{t_read1:.3f}", "1.00", ""),
            ("reconstruct 1 member (in memory)", f"{t_rec:.3f}", f"{t_rec / t_read1:.2f}× read 1", ""),
            ("reconstruct 1 member + save_peft_adapter", f"{t_recw:.3f}", f"{t_recw / t_read1:.2f}× read 1",
             "≤ 1.5×"),
            ("same, basis stored in float16", f"{t_recw16:.3f}", f"{t_recw16 / t_read1:.2f}× read 1", ""),
            ("load_basis + reconstruct 1 member", f"{t_load_basis:.3f}", f"{t_load_basis / t_read1:.2f}× read 1", ""),
        ],
    ))
    print(f"\nCPU time (user + system, all {torch.get_num_threads()} threads; best of {args.repeat}): read "
          f"{min(cpu_reads):.2f} s, fit p={args.p} {min(cpu_fits):.2f} s = **{min(cpu_fits) / min(cpu_reads):.2f}× "
          f"read**")
    if baseline:
        b_read, b_fit = min(x["read"] for x in baseline), min(x["fit"] for x in baseline)
        print(f"baseline CPU time: read {min(x['cpu_read'] for x in baseline):.2f} s, fit "
              f"{min(x['cpu_fit'] for x in baseline):.2f} s = **"
              f"{min(x['cpu_fit'] for x in baseline) / min(x['cpu_read'] for x in baseline):.2f}× read**")
        b_read1, b_recw = min(x["read1"] for x in baseline), min(x["recw"] for x in baseline)
        print(f"\nbaseline tree {args.baseline_src} (same run, interleaved, own process): read {b_read:.2f} s, "
              f"fit p={args.p} {b_fit:.2f} s = **{b_fit / b_read:.2f}× read**; read 1 {b_read1:.3f} s, reconstruct + "
              f"save {b_recw:.3f} s = **{b_recw / b_read1:.2f}× read 1**; runs {baseline}")
    print(f"\nall runs (s): read {', '.join(f'{x:.2f}' for x in reads)}; fit {', '.join(f'{x:.2f}' for x in fits)}; "
          f"read 1 {', '.join(f'{x:.3f}' for x in read1)}; reconstruct+save {', '.join(f'{x:.3f}' for x in recws)}")
    print(f"basis p={args.p}: storage ratio {basis.storage_ratio():.4f} (numbers), byte ratio "
          f"{basis.byte_ratio():.4f} (float32 basis vs fp16 adapters; file {basis_bytes / 2**20:.0f} MiB vs "
          f"{input_bytes / 2**20:.0f} MiB), member error mean {statistics.mean(errs):.4f} max {max(errs):.4f}")
    be = [e.overall for e in budget.member_errors()]
    print(f"budget basis max_error={args.max_error}: storage ratio {budget.storage_ratio():.4f}, "
          f"worst module error {max(e.max_module for e in budget.member_errors()):.4f}, "
          f"member error mean {statistics.mean(be):.4f} max {max(be):.4f}")

    # 4. p sweep on a few layers, against the baselines at equal (or lower) storage
    names = [k for k in adapters[0].module_names() if int(k.split(".")[2]) < args.sweep_layers]
    small = [subset(a, names) for a in adapters]
    if args.timings_only:
        approaches(small, device)
        return
    r, n = args.r, args.n
    rows = []
    for p in range(min(r, n - 1) + 1):
        b, t = timed(lambda p=p: rmm.fit_basis(small, p=p, device=device))
        e = [x.overall for x in b.member_errors()]
        ratio = b.storage_ratio()
        k = min(r, int(math.floor(ratio * r + 1e-9)))  # truncated SVD at rank k costs k/r ≤ ratio
        te = [adapter_error(a, truncate_adapter(a, k, device=device)).overall for a in small]
        # delta-space variant: largest k_d whose storage does not exceed the RMM ratio
        kd = 0
        while kd < n * r:
            trial = sum((kd + 1) * (d + m) + n * (kd + 1) ** 2 for d, m in
                        ((a.in_features, a.out_features) for a in small[0].modules.values()))
            if trial / sum(n * r * (a.in_features + a.out_features) for a in small[0].modules.values()) > ratio:
                break
            kd += 1
        db = fit_delta_basis(small, k=kd, device=device)
        de = [x.overall for x in db.member_errors()]
        rows.append((p, ratio, statistics.mean(e), max(e), k, statistics.mean(te), max(te),
                     kd, db.storage_ratio(), statistics.mean(de), max(de), f"{t:.2f}"))
    h = rmm.fit_basis(small, p=args.p, device=device, storage_dtype=torch.float16)
    f = rmm.fit_basis(small, p=args.p, device=device)
    print(f"\nstorage_dtype=float16 at p={args.p} ({args.sweep_layers} layers): byte ratio {h.byte_ratio():.4f} "
          f"(float32: {f.byte_ratio():.4f}), mean error {statistics.mean(e.overall for e in h.member_errors()):.4f} "
          f"(float32: {statistics.mean(e.overall for e in f.member_errors()):.4f})")
    print(f"\n### p sweep ({args.sweep_layers} layers, {len(names)} modules; errors = relative delta error "
          "over the adapter; baselines at storage ≤ the RMM ratio)\n")
    print(table(["p", "storage ratio", "rmm mean", "rmm max", "trunc k", "trunc mean", "trunc max",
                 "rmm_delta k", "delta ratio", "delta mean", "delta max", "fit s"], rows))

    # 5. add_member: fit on n-1, add the last, compare with the refit
    rows = []
    for p in sorted({2, args.p, min(r, n - 2)}):
        b7 = rmm.fit_basis(small[:-1], p=p, device=device)
        b8 = rmm.add_member(b7, small[-1], device=device)
        full = rmm.fit_basis(small, p=p, device=device)
        rows.append((p, b8.member_errors()[-1].overall, full.member_errors()[-1].overall,
                     statistics.mean(x.overall for x in full.member_errors()[:-1]), b8.storage_ratio()))
    print(f"\n### add_member (fit on {n - 1}, project the {n}th; {args.sweep_layers} layers)\n")
    print(table(["p", "added member error", "same member, refit on all", "others, refit", "storage ratio"], rows))

    # 6. the known weakness: independent initialisations
    shapes = {k: (a.in_features, a.out_features) for k, a in small[0].modules.items()}
    rows = []
    for shared in (True, False):
        facs = synth_factors(shapes, n, r, seed=7, shared_init=shared)
        ads = [LoraAdapter.from_factors(f, dtype=torch.float16) for f in facs]
        for p in (0, args.p, min(r, n - 1) - 1):
            e = [x.overall for x in rmm.fit_basis(ads, p=p, device=device).member_errors()]
            rows.append(("shared" if shared else "independent", p, statistics.mean(e), max(e)))
    print(f"\n### Shared vs independent initialisation ({args.sweep_layers} layers, synthetic, in memory)\n")
    print(table(["init", "p", "mean error", "max error"], rows))

    approaches(small, device)


if __name__ == "__main__":
    main()
