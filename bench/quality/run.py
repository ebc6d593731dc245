"""Quality of derived models on real tasks: RMM bases, merges and fine-tuning transfer, measured
by accuracy on scikit-learn's bundled 8×8 digits (nothing is downloaded).

Usage (from the repository root)::

    python -m bench.quality.run                 # seed 0 through a registry server, seeds 1, 2 direct
    python -m bench.quality.run --direct        # registry.weights only, no server
    python -m bench.quality.run --seeds 1 --report out.md --json out.json --keep

What happens for each seed (every stage is timed and the times are printed):

1. data: 8 tasks from the digits (:mod:`bench.quality.data`), one fixed stratified split;
2. base v1: an MLP (64 → 128 → 128 → 10) trained on the original digits; two base updates v2
   ("small", "large"): v1 trained further on the originals plus four shifted-and-noisy copies;
3. per task a PEFT LoRA (r = 8, α = 16, on fc1, fc2, head) trained on frozen v1, twice: from a
   shared initialisation (same lora_A init for every task) and from an independent one per task;
4. full fine-tunes FT(v1) and FT(v2) per task and update (same recipe and seed);
5. seed 0 unless ``--direct``: ``python -m registry up`` in a temporary REGISTRY_HOME on a free
   port (MLflow UI off); v1 and every adapter are pushed, RMM bases (one job per p and per error
   budget) and merges are requested as jobs, the results are pulled and evaluated
   (:mod:`bench.quality.experiments`); per-adapter truncation, the delta-space variant, dense
   merges and the separate-factor baseline are direct ``registry.weights`` calls (the API has no
   job for them). Other seeds: the same computations with ``registry.weights`` directly;
6. transfer: each v2 pushed as the next version of the base, every FT(v1) pushed as a fine-tune of
   v1 and transferred to v2 by a transfer job (a candidate), FT(v2) pushed as a fine-tune of v2;
   predictions stored with ``store_predictions``, MUSCLE flip rates from ``compat`` (cross-checked
   against ``registry.weights.compat``); the shared-init adapters are transferred (re-pinned) too;
7. the markdown report (every table) is printed to stdout, and written to ``--report`` if given;
   progress goes to stderr.

Torch runs single-threaded (``torch.set_num_threads(1)``): these matrices are tiny, and on a loaded
2-core machine two threads made a training step 5-50× slower (measured while writing this).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import data, models, report
from .backend import ApiBackend, DirectBackend
from .experiments import (
    Collection,
    Recipe,
    TransferResult,
    finetune_transfer,
    lora_collection,
    train_adapters,
    train_finetunes,
)

INITS = ("shared", "independent")


class Timer:
    """Wall-clock seconds per named stage, printed as they finish."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stages: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s] {name} ...")
        yield
        self.stages[name] = time.perf_counter() - t
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s] {name}: {self.stages[name]:.1f}s")

    def total(self) -> float:
        return time.perf_counter() - self.t0


def machine() -> str:
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = "CUDA available" if torch.cuda.is_available() else "CPU only"
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{os.cpu_count()} cores, {mem} RAM, {gpu}; {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} (1 thread); load average at the end "
            f"{load} (other sessions share this machine)")


@dataclass
class SeedRun:
    seed: int
    mode: str
    collections: list[Collection]
    transfers: list[TransferResult]


def run_seed(seed: int, backend: DirectBackend, work: Path, timer: Timer, log: Callable[[str], None],
             tasks: list[data.Task], original: data.Task, augmented: data.Split, shifted: data.Split) -> SeedRun:
    """Train everything for one seed and evaluate every derived artifact through ``backend``."""
    recipe = Recipe(seed=seed)
    tag = f"seed {seed}: "
    with timer.stage(tag + "train base v1 and the v2 updates"):
        v1 = models.train_full(None, original.train, recipe.base, 1000 * seed)
        v1_dir = models.save_checkpoint(v1, work / "base-v1", "trained on the original digits")
        v2s = []
        for label, cfg in recipe.v2:
            v2 = models.train_full(v1, augmented, cfg, 1000 * seed + 1)
            v2s.append((label, cfg, v2, models.save_checkpoint(
                v2, work / f"base-v2-{label}", f"v1 trained on original + shifted/noisy digits ({label} update)")))
    folders = {}
    with timer.stage(tag + f"train {len(INITS) * len(tasks)} LoRA adapters"):
        for init in INITS:
            folders[init] = train_adapters(v1, tasks, recipe, init, work / "adapters" / init, log)
    with timer.stage(tag + f"train {(1 + len(v2s)) * len(tasks)} full fine-tunes"):
        finetunes = train_finetunes(v1, {lb: st for lb, _, st, _ in v2s}, tasks, recipe, work, log)
    colls: list[Collection] = []
    with ExitStack() as stack:
        with timer.stage(tag + ("start the registry server" if backend.mode == "api" else "no server (direct)")):
            stack.enter_context(backend)
        with timer.stage(tag + "push base v1"):
            v1_pushed = backend.push(v1_dir, "digits-mlp", kind="base", tags={"data": "original"})
        for init in INITS:
            with timer.stage(tag + f"{init} collection: push, bases, merges, baselines, evaluation"):
                colls.append(lora_collection(backend, init, v1, v1_pushed, tasks, folders[init], recipe, log))
        with timer.stage(tag + "transfer: push v2s and fine-tunes, transfer jobs, predictions, compat"):
            transfers = finetune_transfer(backend, v1, v1_pushed, v2s, tasks, finetunes, colls[0].pushed, original,
                                          shifted, log)
        if backend.mode == "api":
            with timer.stage(tag + "stop the registry server (SIGINT; worker and dispatcher stop with it)"):
                stack.close()
    return SeedRun(seed, backend.mode, colls, transfers)


def render(runs: list[SeedRun], tasks: list[data.Task], backend: DirectBackend, timer: Timer, command: str) -> str:
    main_run = runs[0]
    recipe = Recipe(seed=main_run.seed)
    names = [t.name for t in tasks]
    n, r = len(tasks), recipe.r
    seeds = [x.seed for x in runs]
    out: list[str] = []
    w = out.append
    w("## Quality on real tasks (`bench/quality/`)\n")
    mode = ("a registry server started by the script; bases, merges and transfers are its jobs"
            if backend.mode == "api" else "registry.weights only, no server")
    w(f"Command: `{command}`. Machine: {machine()}. Date: {datetime.now(UTC).date().isoformat()}. "
      f"Seed {main_run.seed} runs in mode **{backend.mode}** ({mode})"
      + (f"; seeds {', '.join(map(str, seeds[1:]))} run direct (registry.weights only; the cross-checks below show "
         "the API and direct results agree)" if len(runs) > 1 else "")
      + f". Total wall time: **{timer.total():.0f} s** ({timer.total() / 60:.1f} min).\n")
    w(f"Data: scikit-learn's bundled digits (1 797 8×8 images), one stratified split, {len(tasks[0].train)} train / "
      f"{len(tasks[0].test)} test images per task. n = {n} tasks: {', '.join(names)} (see `bench/quality/data.py`). "
      f"Model: MLP 64 → {models.HIDDEN} → {models.HIDDEN} → 10; LoRA r = {r}, α = {recipe.alpha} on fc1, fc2, head "
      f"(PEFT, {recipe.lora.epochs} epochs, Adam lr {recipe.lora.lr:g}). Accuracies in %, on each task's test split. "
      f"*retained* = mean over tasks of acc(method) / acc(task's own adapter); *storage* = numbers stored / numbers "
      f"in the {n} adapters; *Δ error* = mean relative Frobenius error of the reconstructed (or merged) delta "
      f"against each task's own. Adapters are evaluated by adding `LoraAdapter.weight_delta` to the base weights; "
      f"PEFT's own forward pass (`PeftModel.from_pretrained`) was checked against that (cross-checks below). "
      f"The tables are seed {main_run.seed}; *Across seeds* repeats the headline numbers for seeds "
      f"{', '.join(map(str, seeds))}.\n")
    w("### Stage timings\n")
    rows = [[k, f"{v:.1f}"] for k, v in timer.stages.items()]
    if isinstance(backend, ApiBackend):
        for typ, (cnt, sec) in sorted(backend.job_seconds().items()):
            rows.append([f"(seed {main_run.seed}) {cnt} `{typ}` jobs, worker time started → finished, summed",
                         f"{sec:.1f}"])
    rows.append(["**total** (wall clock, from the start of `main`, imports excluded)", f"**{timer.total():.1f}**"])
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rows.append(["CPU time of this process (user + system)", f"{own.ru_utime + own.ru_stime:.1f}"])
    rows.append(["CPU time of the registry server, its worker and dispatcher (user + system)",
                 f"{kids.ru_utime + kids.ru_stime:.1f}"])
    w(report.table(["stage", "seconds"], rows) + "\n")
    w("Wall-clock stages include waiting for the CPU: other sessions were loading this 2-core machine (load "
      "average above), so the CPU times are the better measure of the work itself.\n")

    for c in main_run.collections:
        w(f"### LoRA collection, {c.init} initialisation: every method (n = {c.n}, r = {c.r}, seed {main_run.seed})\n")
        w(report.collection_table(c, names) + "\n")
        w(f"RMM saves storage only while p < r(n−1)/(r+n) = {r * (n - 1) / (r + n):.2f}. Merges put one adapter in "
          f"place of all {n}; the tasks contradict each other by construction (mirrored and rotated inputs, "
          f"permuted labels), so no single model can serve them all.\n")
        w(f"### Compression planner, {c.init} initialisation: stored bytes vs accuracy (seed {main_run.seed})\n")
        w("`registry.weights.compress.plan(adapters, ε, methods)`: per member the fewest stored bytes whose "
          "relative delta error is ≤ ε (`plan`: quantization, truncation and RMM membership; `plan[m]`: method m "
          "alone). *stored / original bytes* = bytes the plan stores (codes, scales, headers, shared basis split "
          "over its users) / bytes of the adapters' `adapter_model.safetensors` files. Accuracy of each task with "
          "its reconstruction; *worst task* = lowest retention.\n")
        w(report.compression_table(c, names) + "\n")
        w(f"### Equal storage, {c.init} initialisation: RMM vs per-adapter truncation vs rmm_delta\n")
        w(report.equal_storage_table(c) + "\n")
        w(losses(c) + "\n")
    w("### Compression planner: the goal\n")
    for x in runs:
        w(f"Seed {x.seed}. " + report.goal_summary(x.collections) + "\n")
    w("### Shared vs independent initialisation\n")
    w("How far training moved the factors (what RMM's per-position statistics see): ")
    w("; ".join(f"{c.init}: ‖A − A_init‖/‖A_init‖ = {c.factors['A drift']:.2f}, mean pairwise cosine of the tasks' "
                f"lora_A = {c.factors['A cosine']:.3f}, of lora_B = {c.factors['B cosine']:.3f}"
                for c in main_run.collections) + ".\n")
    w(report.init_table(main_run.collections) + "\n")
    w("### Merges: delta space (re-factorised to rank r by the API, or kept dense) vs the separate-factor baseline "
      "(retained accuracy)\n")
    w(report.merges_table(main_run.collections, [m.label for m in recipe.merges]) + "\n")
    w("Merge parameters (no validation data, so defaults from the papers, not tuned): "
      + "; ".join(f"{m.label}: {m.method} " + ", ".join(f"{k}={v:g}" for k, v in m.params.items())
                  for m in recipe.merges) + ".\n")

    w("### Fine-tuning transfer\n")
    for tr in main_run.transfers:
        b = tr.bases
        w(f"#### Base update v1 → v2 ({tr.label}: v1 trained {tr.v2_recipe.epochs} more epochs at lr "
          f"{tr.v2_recipe.lr:g} on the originals + 4 shifted/noisy copies)\n")
        w(f"Base v1 ({tr.base_refs['v1']}): {pct(b['v1']['original'])}% on the original test digits, "
          f"{pct(b['v1']['shifted'])}% on shifted+noisy test digits; base v2 ({tr.base_refs['v2']}): "
          f"{pct(b['v2']['original'])}% / {pct(b['v2']['shifted'])}%. FT = every parameter, "
          f"{recipe.finetune.epochs} epochs, the same seed from v1 and v2. *recovered* = (acc(v2 + Δ) − acc(v2)) / "
          f"(acc(FT(v2)) − acc(v2)). NFR / PFR (MUSCLE) = share of test images FT(v1) got right and the new model "
          f"gets wrong / vice versa, from `rc.compat`. LoRA columns: the shared-init adapter on v1, and the same "
          f"adapter transferred to v2 by a transfer job (for an adapter the registry re-pins the same files to the "
          f"new base); *NFR LoRA v1→v2* compares the two.\n")
        w(report.transfer_table(tr) + "\n")
        w(report.transfer_diagnostics(tr) + "\n")
        w(transfer_summary(tr) + "\n")

    if len(runs) > 1:
        w(f"### Across seeds ({', '.join(map(str, seeds))})\n")
        w("Every seed retrains everything (bases, adapters, fine-tunes; the data split is fixed). Retained accuracy "
          "per method:\n")
        for i, init in enumerate(INITS):
            w(f"#### {init} initialisation\n")
            w(report.seeds_table([x.collections[i] for x in runs], seeds) + "\n")
        w("#### Fine-tuning transfer (means over the tasks)\n")
        w(report.transfer_seeds_table([x.transfers for x in runs], seeds) + "\n")

    w("### Cross-checks\n")
    rows = [[f"seed {main_run.seed}: {k}", f"{v:.3g}"] for k, v in sorted(backend.check.values.items())]
    for x in runs:
        for c in x.collections:
            pc = c.peft_check
            rows.append([f"seed {x.seed}, {c.init}: PEFT forward (`PeftModel.from_pretrained`) vs W + ΔW on "
                         f"{pc['artifacts']:.0f} adapters (trained, RMM p = 0 and p = n−1, merges, plan ε=0.05): "
                         "max |logit diff|, "
                         f"{pc['prediction mismatches']:.0f} prediction mismatches", f"{pc['max |logit diff|']:.3g}"])
    w(report.table(["check", "max difference"], rows) + "\n")
    return "\n".join(out)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def losses(c: Collection) -> str:
    """Plain statements of where RMM loses at equal storage (computed from the rows)."""
    own = c.own()
    lines = []
    trunc = {round(r.storage * c.r): r for r in c.find("trunc")}
    indiv = next(r for r in c.rows if r.family == "individual")
    for rm in c.find("rmm"):
        k = min(c.r, int(rm.storage * c.r + 1e-9))
        tr = indiv if k >= c.r else trunc.get(k)
        if tr is None:
            continue
        gap = tr.retained(own) - rm.retained(own)
        if gap >= report.TIE:
            what = "the adapters themselves" if k >= c.r else f"per-adapter truncation to k = {k}"
            lines.append(f"{rm.method} (storage {rm.storage:.3f}) loses to {what} (storage {min(1, k / c.r):.3f}) "
                         f"by {100 * gap:.1f} pp retained accuracy")
    budget = [r for r in c.find("budget")]
    for bd in budget:
        k = min(c.r, int(bd.storage * c.r + 1e-9))
        tr = indiv if k >= c.r else trunc.get(k)
        if tr is not None and tr.retained(own) - bd.retained(own) >= report.TIE:
            lines.append(f"{bd.method} (storage {bd.storage:.3f}) loses to truncation k = {k} "
                         f"({100 * (tr.retained(own) - bd.retained(own)):.1f} pp)")
    if not lines:
        return f"At every p, RMM ({c.init}) is at least as good as per-adapter truncation at equal storage (±0.5 pp)."
    return "**Where RMM loses** (" + c.init + "): " + "; ".join(lines) + "."


def transfer_summary(tr: TransferResult) -> str:
    rec = [r.recovered for r in tr.rows if r.recovered is not None]
    better = sum(1 for r in tr.rows if r.acc["v2_delta"] >= r.acc["ft_v1"])
    worse_nfr = sum(1 for r in tr.rows if r.nfr_delta["nfr"] > r.nfr_ft2["nfr"])
    below = [r.task for r in tr.rows if r.acc["v2_delta"] < r.acc["v2"]]
    return (f"v2 + Δ recovers a median {pct(sorted(rec)[len(rec) // 2])}% of FT(v2)'s gain over v2 "
            f"(min {pct(min(rec))}%, max {pct(max(rec))}%); it matches or beats FT(v1) on {better} of {len(tr.rows)} "
            f"tasks; its negative flip rate against FT(v1) is higher than FT(v2)'s on {worse_nfr} of "
            f"{len(tr.rows)} tasks" + (f"; it is *worse than v2 without any fine-tune* on {', '.join(below)}"
                                       if below else "") + ".")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--direct", action="store_true", help="skip the server: call registry.weights directly")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds 0..N-1 (default 3): seed 0 through the backend, the others direct")
    ap.add_argument("--report", type=Path, help="also write the markdown report here")
    ap.add_argument("--json", type=Path, help="write every computed number as JSON here")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (checkpoints, registry home)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    timer = Timer(log)
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.quality.run" + (" --direct" if args.direct else "") + (
        f" --seeds {args.seeds}" if args.seeds != 3 else "")
    try:
        with timer.stage("data"):
            tasks = data.make_tasks()
            original, augmented, shifted = data.original(), data.augmented(), data.shifted_test()
        runs = []
        main_backend: DirectBackend | None = None
        for seed in range(args.seeds):
            work = root / f"seed-{seed}"
            work.mkdir(parents=True, exist_ok=True)
            backend = ApiBackend(work) if seed == 0 and not args.direct else DirectBackend(work)
            runs.append(run_seed(seed, backend, work, timer, log, tasks, original, augmented, shifted))
            main_backend = main_backend or backend
        assert main_backend is not None
        text = render(runs, tasks, main_backend, timer, command)
        print(text)
        if args.report:
            args.report.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps(_as_json(runs, timer, main_backend), indent=1, default=str) + "\n")
    finally:
        if args.keep or args.work is not None:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _as_json(runs: list[SeedRun], timer: Timer, backend: DirectBackend) -> dict[str, Any]:
    return {
        "runs": [{
            "seed": x.seed, "mode": x.mode,
            "collections": [{"init": c.init, "n": c.n, "r": c.r, "factors": c.factors, "peft_check": c.peft_check,
                             "rows": [asdict(r) | {"retained": r.retained(c.own())} for r in c.rows]}
                            for c in x.collections],
            "transfers": [{"label": t.label, "bases": t.bases, "base_refs": t.base_refs,
                           "rows": [asdict(r) | {"recovered": r.recovered} for r in t.rows]} for t in x.transfers],
        } for x in runs],
        "stages": timer.stages, "total_seconds": timer.total(), "crosscheck": backend.check.values,
    }


if __name__ == "__main__":
    raise SystemExit(main())
