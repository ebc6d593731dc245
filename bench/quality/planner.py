"""The compression planner against accuracy, measured in stored bytes: the digits suite (both
initialisations, every seed) and real LoRA adapters of all-MiniLM-L6-v2 (:mod:`bench.quality.minilm`).

Usage (from the repository root)::

    python -m bench.quality.planner                      # digits (3 seeds) and MiniLM
    python -m bench.quality.planner --suite digits --seeds 3
    python -m bench.quality.planner --suite minilm --report out.md --json out.json

**Baseline in the same run.** ``--baseline REV`` (default :data:`BASELINE_REV`, the planner before
per-module budget shares) loads ``registry/weights/compress.py`` and ``codec.py`` of that commit from
git (``git show``) as a module of its own and runs it on the same adapters, beside the current
planner; ``--baseline none`` skips it.

**Measures.** *stored / original* = the plan's ``stored_bytes()`` / ``original_bytes()`` (the
members' ``adapter_model.safetensors``); *retained* = mean over tasks of accuracy(reconstruction) /
accuracy(own adapter); *worst* = the lowest of those; *logit error* = ‖z(recon) − z(own)‖ /
‖z(own) − z(base)‖ over a task's test set (z: logits), mean and worst task: a smooth measure of the
function change that does not jump with single predictions. The goal (issue 12): retained ≥ 0.98,
worst ≥ 0.95 at ≤ 0.08 of the bytes.

**Digits** (:mod:`bench.quality.data`, :mod:`bench.quality.models`): base v1 and the 8 task adapters
per initialisation exactly as ``bench.quality.run`` trains them (same recipe and seeds), cached
under ``bench/.quality-cache/digits-v1-seed<s>/``. Each planner at ε ∈ :data:`DIGITS_BUDGETS`, all
methods; the current planner also with one method at a time at the issue's budgets (seed 0).

**MiniLM**: 6 adapters (18 modules each); every method alone and the planner at the issue's budgets,
the baseline planner, RMM bases (``fit_basis`` p = 0 … n − 1 and the error-budget mode) and
``add_member`` leave-one-out (fit on the other n − 1 members, project the held-out one). RMM storage
is the saved basis file's bytes (float32) over the adapters' files; its numbers ratio is the paper's
measure. One plan reconstruction is also loaded with ``PeftModel.from_pretrained`` and compared with
W + ΔW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from registry.weights import compress, rmm
from registry.weights.adapters import LoraAdapter, load_peft_adapter, save_peft_adapter

from . import data, models
from .experiments import Recipe, train_adapters
from .report import GOAL_BYTES, GOAL_MEAN, GOAL_WORST, table

BASELINE_REV = "6eec3c7"  # main before per-module budget shares (the planner of issue 12's first stop)
ISSUE_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
DIGITS_BUDGETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.2)
MINILM_EXTRA = (0.07, 0.3)
CACHE = Path(__file__).resolve().parent.parent / ".quality-cache"
REPO = Path(__file__).resolve().parent.parent.parent
Log = Callable[[str], None]
Planner = Callable[..., Any]


def baseline_planner(rev: str) -> types.ModuleType:
    """``compress`` (with its ``codec``) as of commit ``rev``, loaded from git as its own module."""
    def source(path: str) -> str:
        return subprocess.check_output(["git", "-C", str(REPO), "show", f"{rev}:{path}"], text=True)

    tag = "".join(c for c in rev if c.isalnum())
    codec_mod = types.ModuleType(f"registry.weights.codec_at_{tag}")
    codec_mod.__package__ = "registry.weights"
    sys.modules[codec_mod.__name__] = codec_mod
    exec(compile(source("registry/weights/codec.py"), f"{rev}:codec.py", "exec"), codec_mod.__dict__)
    src = source("registry/weights/compress.py").replace(
        "from . import codec, rmm, rmm_baselines",
        f"from . import rmm, rmm_baselines\nfrom . import codec_at_{tag} as codec")
    mod = types.ModuleType(f"registry.weights.compress_at_{tag}")
    mod.__package__ = "registry.weights"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:compress.py", "exec"), mod.__dict__)
    return mod


@dataclass
class Point:
    """One artifact (a plan, a basis) evaluated on a collection."""

    suite: str
    collection: str
    method: str
    budget: float | None
    ratio: float  # stored bytes / original bytes
    acc: dict[str, float]
    own: dict[str, float]
    logit_error: dict[str, float]
    max_error: float | None = None
    note: str = ""
    numbers: float | None = None  # RMM: numbers stored / numbers of the adapters

    def retained(self) -> list[float]:
        return [self.acc[t] / self.own[t] for t in self.own]

    @property
    def mean(self) -> float:
        r = self.retained()
        return sum(r) / len(r)

    @property
    def worst(self) -> tuple[str, float]:
        return min(((t, self.acc[t] / self.own[t]) for t in self.own), key=lambda x: (x[1], x[0]))

    def goal(self) -> bool:
        return self.ratio <= GOAL_BYTES and self.mean >= GOAL_MEAN and self.worst[1] >= GOAL_WORST


@dataclass
class Collection:
    suite: str
    name: str
    tasks: list[str]
    own: dict[str, float]
    base: dict[str, float]
    points: list[Point] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)


Evaluate = Callable[[Sequence[LoraAdapter]], tuple[dict[str, float], dict[str, float]]]


def plan_point(suite: str, coll: Collection, planner: Planner, label: str, adapters: Sequence[LoraAdapter],
               budget: float, methods: Sequence[str], evaluate: Evaluate) -> tuple[Point, Any]:
    pl = planner(list(adapters), budget, methods=tuple(methods), names=coll.tasks)
    recon = [pl.reconstruct(i) for i in range(len(adapters))]
    acc, fe = evaluate(recon)
    counts: dict[str, int] = {}
    for mp in pl.members:
        counts[mp.method] = counts.get(mp.method, 0) + 1
    note = f"{pl.stored_bytes()} of {pl.original_bytes()} B; " + ", ".join(
        f"{k} ×{v}" for k, v in sorted(counts.items()))
    return Point(suite, coll.name, label, budget, pl.stored_bytes() / pl.original_bytes(), acc, coll.own, fe,
                 max(mp.error for mp in pl.members), note), pl


# --------------------------------------------------------------------------------------------- digits


def digits_collections(seed: int, log: Log) -> tuple[models.State, list[data.Task], dict[str, list[LoraAdapter]]]:
    """Base v1 and the adapters of both initialisations for ``seed`` (bench.quality.run's recipe),
    trained once and then read from the cache."""
    recipe = Recipe(seed=seed)
    tasks = data.make_tasks()
    root = CACHE / f"digits-v1-seed{seed}"
    done = root / "done.json"
    inits = ("shared", "independent")
    if not done.exists():
        log(f"  seed {seed}: training base v1 and {2 * len(tasks)} LoRA adapters ...")
        v1 = models.train_full(None, data.original().train, recipe.base, 1000 * seed)
        models.save_checkpoint(v1, root / "base-v1", "trained on the original digits")
        for init in inits:
            train_adapters(v1, tasks, recipe, init, root / init, log)
        done.write_text(json.dumps({"seed": seed, "tasks": [t.name for t in tasks]}) + "\n")
    v1 = models.load_checkpoint(root / "base-v1")
    return v1, tasks, {init: [load_peft_adapter(root / init / t.name) for t in tasks] for init in inits}


def digits_suite(seeds: int, baseline: types.ModuleType | None, log: Log) -> list[Collection]:
    out = []
    for seed in range(seeds):
        v1, tasks, colls = digits_collections(seed, log)
        for init, adapters in colls.items():
            base_z = [models.logits(v1, t.test.x) for t in tasks]
            own_z = [models.logits(v1, t.test.x, models.deltas_of(a)) for t, a in zip(tasks, adapters, strict=True)]

            def acc_of(z: torch.Tensor, t: data.Task) -> float:
                return float((z.argmax(1) == t.test.y).float().mean())

            coll = Collection("digits", f"seed {seed}, {init}", [t.name for t in tasks],
                              {t.name: acc_of(z, t) for z, t in zip(own_z, tasks, strict=True)},
                              {t.name: acc_of(z, t) for z, t in zip(base_z, tasks, strict=True)})

            def evaluate(recon: Sequence[LoraAdapter]) -> tuple[dict[str, float], dict[str, float]]:
                acc, fe = {}, {}
                for i, (t, a) in enumerate(zip(tasks, recon, strict=True)):  # noqa: B023 - used at once
                    z = models.logits(v1, t.test.x, models.deltas_of(a))  # noqa: B023
                    acc[t.name] = acc_of(z, t)
                    fe[t.name] = float((z - own_z[i]).norm() / (own_z[i] - base_z[i]).norm())  # noqa: B023
                return acc, fe

            t0 = time.perf_counter()
            planners: list[tuple[str, Planner]] = [("plan", compress.plan)]
            if baseline is not None:
                planners.append(("baseline plan", baseline.plan))
            for label, fn in planners:
                for eps in DIGITS_BUDGETS:
                    coll.points.append(plan_point("digits", coll, fn, label, adapters, eps, compress.METHODS,
                                                  evaluate)[0])
            for m in compress.METHODS if seed == 0 else ():  # one method at a time: seed 0
                for eps in ISSUE_BUDGETS:
                    coll.points.append(plan_point("digits", coll, compress.plan, f"plan[{m}]", adapters, eps, (m,),
                                                  evaluate)[0])
            log(f"  digits {coll.name}: {len(coll.points)} plans in {time.perf_counter() - t0:.0f} s")
            out.append(coll)
    return out


NOISE_LEVELS = (0.01, 0.02, 0.03, 0.05, 0.08)
NOISE_DRAWS = 8


def noise_floor(seeds: int, log: Log) -> list[list[str]]:
    """How much accuracy an adapter loses to *any* small perturbation of its factors: per task, random
    Gaussian noise on the factors of its SVD form (b_j ⊗ δa + δb ⊗ a_j, every number's noise
    proportional to its component's rms: what quantization does), scaled to a relative delta error e
    of the whole adapter; NOISE_DRAWS draws per level (seeded). Rows: the task with the lowest mean
    retention per collection."""
    rows = []
    for seed in range(seeds):
        v1, tasks, colls = digits_collections(seed, log)
        for init, adapters in colls.items():
            gen = torch.Generator().manual_seed(seed)
            worst: tuple[float, str, list[str]] | None = None
            for t, a in zip(tasks, adapters, strict=True):
                ds = {m: a.weight_delta(m, device="cpu").double() for m in a.module_names()}
                own = models.accuracy(v1, t.test, {m: d.float() for m, d in ds.items()})
                den = math.sqrt(sum(float(d.square().sum()) for d in ds.values()))
                cells: list[str] = []
                means: list[float] = []
                for e in NOISE_LEVELS:
                    vals = []
                    for _ in range(NOISE_DRAWS):
                        noise = {}
                        for m, d in ds.items():
                            u, sv, vh = torch.linalg.svd(d, full_matrices=False)
                            b, aa = u * sv.sqrt(), sv.sqrt()[:, None] * vh
                            na = torch.randn(aa.shape, generator=gen, dtype=torch.float64) * aa.norm(
                                dim=1, keepdim=True) / math.sqrt(aa.shape[1])
                            nb = torch.randn(b.shape, generator=gen, dtype=torch.float64) * b.norm(
                                dim=0, keepdim=True) / math.sqrt(b.shape[0])
                            noise[m] = nb @ aa + b @ na
                        scale = e * den / math.sqrt(sum(float(x.square().sum()) for x in noise.values()))
                        vals.append(models.accuracy(v1, t.test, {m: (ds[m] + scale * noise[m]).float()
                                                                 for m in ds}) / own)
                    means.append(sum(vals) / len(vals))
                    cells.append(f"{pct(means[-1])}% (min {pct(min(vals))}%)")
                key = sum(means)
                if worst is None or key < worst[0]:
                    worst = (key, f"{t.name} (own {pct(own)}%)", cells)
            assert worst is not None
            rows.append([f"seed {seed}, {init}", worst[1], *worst[2]])
    return rows


# --------------------------------------------------------------------------------------------- MiniLM


def minilm_suite(baseline: types.ModuleType | None, log: Log) -> list[Collection]:
    from . import minilm

    enc = minilm.Encoder()
    adapters, folders, facts = minilm.adapters(enc, log)
    tasks = list(minilm.TASKS)
    names = [t.name for t in tasks]
    tests = [minilm.test_set(t) for t in tasks]
    base_z = [enc.logits(x, t.classes) for t, (x, _) in zip(tasks, tests, strict=True)]

    def deltas(a: LoraAdapter) -> dict[str, torch.Tensor]:
        return {m: a.weight_delta(m, device="cpu") for m in a.module_names()}

    own_z = [enc.logits(x, t.classes, deltas(a)) for t, (x, _), a in zip(tasks, tests, adapters, strict=True)]

    def acc_of(z: torch.Tensor, y: torch.Tensor) -> float:
        return float((z.argmax(1) == y).float().mean())

    coll = Collection("minilm", "all-MiniLM-L6-v2, 6 tasks", names,
                      {n: acc_of(z, y) for n, z, (_, y) in zip(names, own_z, tests, strict=True)},
                      {n: acc_of(z, y) for n, z, (_, y) in zip(names, base_z, tests, strict=True)})
    coll.checks["training seconds (6 adapters, summed)"] = sum(f["seconds"] for f in facts)

    def eval_one(i: int, a: LoraAdapter) -> tuple[float, float]:
        z = enc.logits(tests[i][0], tasks[i].classes, deltas(a))
        return acc_of(z, tests[i][1]), float((z - own_z[i]).norm() / (own_z[i] - base_z[i]).norm())

    def evaluate(recon: Sequence[LoraAdapter]) -> tuple[dict[str, float], dict[str, float]]:
        acc, fe = {}, {}
        for i, a in enumerate(recon):
            acc[names[i]], fe[names[i]] = eval_one(i, a)
        return acc, fe

    original = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    t0 = time.perf_counter()
    budgets = sorted(set(ISSUE_BUDGETS) | set(MINILM_EXTRA))
    for eps in budgets:
        pt, pl = plan_point("minilm", coll, compress.plan, "plan", adapters, eps, compress.METHODS, evaluate)
        coll.points.append(pt)
        if eps == 0.05:  # PEFT's own forward pass over a saved reconstruction vs W + ΔW
            with tempfile.TemporaryDirectory() as tmp:
                save_peft_adapter(pl.reconstruct(0), tmp)
                pz = enc.peft_logits(Path(tmp), tests[0][0], tasks[0].classes)
            z = enc.logits(tests[0][0], tasks[0].classes, deltas(pl.reconstruct(0)))
            coll.checks["PEFT forward vs W + ΔW (plan ε=0.05, first task): max |logit diff|"] = float(
                (pz - z).abs().max())
            coll.checks["PEFT forward vs W + ΔW: prediction mismatches"] = float((pz.argmax(1) != z.argmax(1)).sum())
        log(f"  minilm plan ε={eps:g}: {pt.ratio:.4f} of the bytes, retained {pt.mean:.3f}, worst {pt.worst[1]:.3f}")
    if baseline is not None:
        for eps in budgets:
            coll.points.append(plan_point("minilm", coll, baseline.plan, "baseline plan", adapters, eps,
                                          compress.METHODS, evaluate)[0])
    for m in compress.METHODS:
        for eps in ISSUE_BUDGETS:
            coll.points.append(plan_point("minilm", coll, compress.plan, f"plan[{m}]", adapters, eps, (m,),
                                          evaluate)[0])
    log(f"  minilm: {len(coll.points)} plans in {time.perf_counter() - t0:.0f} s")

    n = len(adapters)

    def basis_point(label: str, basis: rmm.RmmBasis, recon: Sequence[LoraAdapter], note: str = "") -> Point:
        with tempfile.TemporaryDirectory() as tmp:
            rmm.save_basis(basis, Path(tmp) / "basis.safetensors")
            size = (Path(tmp) / "basis.safetensors").stat().st_size
        acc, fe = evaluate(recon)
        errs = [e.overall for e in basis.member_errors()]
        return Point("minilm", coll.name, label, None, size / original, acc, coll.own, fe, max(errs), note,
                     basis.storage_ratio())

    t0 = time.perf_counter()
    pmax = min(minilm.R, n - 1)
    for p in range(pmax + 1):
        b = rmm.fit_basis(adapters, p=p, device="cpu", names=names)
        coll.points.append(basis_point(f"rmm p={p}", b, [b.reconstruct(i) for i in range(n)]))
    for e in (0.3, 0.1):
        b = rmm.fit_basis(adapters, max_error=e, device="cpu", names=names)
        coll.points.append(basis_point(f"rmm ε={e:g}", b, [b.reconstruct(i) for i in range(n)],
                                       "p per module " + ", ".join(sorted({str(v) for v in b.p.values()}))))
    # add_member, leave one out: fit on the other n - 1 (p = n - 2), project the held-out member
    p_loo = min(minilm.R, n - 2)
    acc, fe, errs = {}, {}, []
    for i in range(n):
        others = [a for j, a in enumerate(adapters) if j != i]
        b = rmm.add_member(rmm.fit_basis(others, p=p_loo, device="cpu"), adapters[i], name="held-out")
        acc[names[i]], fe[names[i]] = eval_one(i, b.reconstruct(n - 1))
        errs.append(b.member_errors()[-1].overall)
    coll.points.append(Point("minilm", coll.name, f"rmm add_member (leave one out, p={p_loo})", None, float("nan"),
                             acc, coll.own, fe, max(errs), "each task projected on a basis fitted without it"))
    log(f"  minilm: RMM rows in {time.perf_counter() - t0:.0f} s")
    return [coll]


# --------------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def point_row(p: Point) -> list[str]:
    t, w = p.worst
    fe = list(p.logit_error.values())
    return [p.method, "–" if p.budget is None else f"{p.budget:g}", "–" if math.isnan(p.ratio) else f"{p.ratio:.4f}",
            pct(p.mean) + "%", f"{pct(w)}% ({t})", f"{sum(fe) / len(fe):.3f} / {max(fe):.3f}",
            "–" if p.max_error is None else f"{p.max_error:.3f}", "**met**" if p.goal() else "–", p.note]


HEADER = ["method", "ε", "stored / original bytes", "retained (mean)", "worst task", "logit error (mean / worst)",
          "max Δ error", "goal", "notes"]


def digits_report(colls: Sequence[Collection]) -> str:
    out = ["### Digits: the goal per seed and initialisation\n"]
    labels = sorted({p.method for c in colls for p in c.points if p.method.endswith("plan")})
    rows = []
    for label in labels:
        for eps in DIGITS_BUDGETS:
            pts = [p for c in colls for p in c.points if p.method == label and p.budget == eps]
            met = [p for p in pts if p.goal()]
            rows.append([label, f"{eps:g}", f"{min(p.ratio for p in pts):.4f}–{max(p.ratio for p in pts):.4f}",
                         f"{pct(min(p.mean for p in pts))}%", f"{pct(min(p.worst[1] for p in pts))}%",
                         f"{sum(sum(p.logit_error.values()) / len(p.logit_error) for p in pts) / len(pts):.3f}",
                         f"{sum(max(p.logit_error.values()) for p in pts) / len(pts):.3f}",
                         f"{len(met)}/{len(pts)}"])
    out.append(table(["planner", "ε", "stored / original (range)", "lowest mean retained", "lowest worst task",
                      "logit error, mean", "logit error, worst task (mean over collections)", "goal met"], rows) + "\n")
    out.append("At equal stored bytes (logit error interpolated in log-bytes between the ε grid's points, per "
               "collection, then averaged):\n")
    rows = []
    for target in (0.07, 0.08, 0.09):
        row = [f"{target:g}"]
        for label in labels:
            mean_fe, worst_fe = [], []
            for c in colls:
                pts = sorted((p for p in c.points if p.method == label), key=lambda p: p.ratio)
                mean_fe.append(interp(target, pts, lambda p: sum(p.logit_error.values()) / len(p.logit_error)))
                worst_fe.append(interp(target, pts, lambda p: max(p.logit_error.values())))
            row += [f"{sum(mean_fe) / len(mean_fe):.4f}", f"{sum(worst_fe) / len(worst_fe):.4f}"]
        rows.append(row)
    cols = [f"{lb}: logit error {k}" for lb in labels for k in ("mean", "worst task")]
    out.append(table(["stored / original", *cols], rows) + "\n")
    for c in colls:
        out.append(f"#### {c.name} (own accuracy: " + ", ".join(f"{t} {pct(a)}" for t, a in c.own.items()) + ")\n")
        out.append(table(HEADER, [point_row(p) for p in c.points]) + "\n")
    return "\n".join(out)


def interp(x: float, pts: Sequence[Point], f: Callable[[Point], float]) -> float:
    xs = [math.log(p.ratio) for p in pts]
    ys = [f(p) for p in pts]
    lx = math.log(x)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= lx <= x1:
            return y0 + (y1 - y0) * (lx - x0) / (x1 - x0) if x1 > x0 else y0
    return math.nan


def minilm_report(colls: Sequence[Collection]) -> str:
    c = colls[0]
    out = [f"### all-MiniLM-L6-v2 LoRA adapters ({len(c.tasks)} tasks)\n",
           "Own accuracy: " + ", ".join(f"{t} {pct(a)}%" for t, a in c.own.items()) + "; base model (no adapter): "
           + ", ".join(f"{t} {pct(a)}%" for t, a in c.base.items()) + ".\n"]
    out.append(table([*HEADER[:2], "stored / original bytes", "numbers (RMM)", *HEADER[3:]],
                     [[*point_row(p)[:3], "–" if p.numbers is None else f"{p.numbers:.3f}", *point_row(p)[3:]]
                      for p in c.points]) + "\n")
    out.append(table(["check", "value"], [[k, f"{v:.3g}"] for k, v in c.checks.items()]) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--suite", choices=("digits", "minilm", "noise", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=3, help="digits seeds 0..N-1")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision of the baseline planner, or 'none'")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log: Log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    baseline = None if args.baseline == "none" else baseline_planner(args.baseline)
    t0 = time.perf_counter()
    colls: list[Collection] = []
    parts = []
    if args.suite in ("digits", "all"):
        d = digits_suite(args.seeds, baseline, log)
        colls += d
        parts.append(digits_report(d))
    if args.suite in ("noise", "all"):
        rows = noise_floor(args.seeds, log)
        parts.append("### Digits: the noise floor (retention under random factor noise, the most sensitive task)\n\n"
                     + table(["collection", "task", *(f"e = {e:g}" for e in NOISE_LEVELS)], rows) + "\n")
    if args.suite in ("minilm", "all"):
        m = minilm_suite(baseline, log)
        colls += m
        parts.append(minilm_report(m))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    seeds = f" --seeds {args.seeds}" if args.suite != "minilm" else ""
    head = (f"Command: `python -m bench.quality.planner --suite {args.suite}{seeds}`"
            + (f" (baseline planner: commit {args.baseline})" if baseline else "")
            + f"; {time.perf_counter() - t0:.0f} s, 1 torch thread, load average at the end {load}.\n")
    text = head + "\n" + "\n".join(parts)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in colls], indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
