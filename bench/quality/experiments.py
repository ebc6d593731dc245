"""The two experiments: LoRA collections (RMM, baselines, merges) and fine-tuning transfer.

Every number in the report is computed here from models trained in the same run.

**LoRA collections** (:func:`lora_collection`), once per initialisation setting. n task adapters of
one base; each method turns them into an artifact, every task is evaluated with the adapter that
method gives it (its reconstruction, or the one merged adapter for all tasks), and each row gets:
the accuracy per task, the *retained* accuracy = mean over tasks of acc(method, t) / acc(own
adapter, t), the storage relative to the n adapters (numbers stored, the paper's measure) and the
mean relative delta error ‖Δ̂ − Δ‖_F / ‖Δ‖_F against each task's own adapter.

* ``rmm p=k``: a basis job per p = 0 … min(r, n − 1) (API) / ``fit_basis`` (direct); every member
  reconstructed with ``RmmBasis.reconstruct``. ``rmm ε=e``: the error-budget mode (``max_error``).
* ``trunc k``: each adapter's delta truncated to rank k (``truncate_adapter``), k/r of the collection:
  the per-adapter baseline at equal storage. Direct call (the API has no such job).
* ``rmm_delta k``: the gauge-invariant delta-space variant (``fit_delta_basis``), direct call; k is
  chosen as the largest whose storage does not exceed the matching RMM row's.
* ``plan ε`` (the compression planner, ``registry.weights.compress.plan``, direct call): every
  member stored in the fewest bytes whose relative delta error is ≤ ε, all methods allowed
  (quantization, truncation, RMM membership); ``plan[quantize] ε`` / ``plan[truncate] ε`` /
  ``plan[rmm] ε``: one method alone. Their *storage* is **bytes** (what the plan stores / the
  adapters' safetensors files), not numbers; the report also gives the worst task's retention.
* merges (one adapter for every task): the plain average (task arithmetic with λ = 1/n), task
  arithmetic, TIES, DARE-linear, DARE-TIES in delta space as merge jobs (re-factorised to rank r
  by the registry, 1/n of the collection); the same merges kept dense
  (``merge_adapters(rank=None)``, direct); and the paper's separate-factor baseline
  (``merge_adapter_factors_separately``, direct), which merges the A's and B's apart.

**Fine-tuning transfer** (:func:`finetune_transfer`): base v1, and two updates v2 = v1 trained on
more and shifted data (a small and a large step); full fine-tunes FT(v1) and FT(v2) per task (same
recipe and seed); v2 + Δ with Δ = FT(v1) − v1 from a transfer job; the fraction of FT(v2)'s gain
over v2 that v2 + Δ recovers; MUSCLE flip rates FT(v1) → v2 + Δ and FT(v1) → FT(v2) from
``compat``. The shared-initialisation LoRA adapters are also transferred (re-pinned) to each v2
and evaluated there.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from registry.weights import compress
from registry.weights.adapters import LoraAdapter, save_peft_adapter
from registry.weights.merge import merge_adapter_factors_separately, merge_adapters
from registry.weights.rmm_baselines import adapter_error, fit_delta_basis, truncate_adapter

from . import models
from .backend import ApiBackend, BasisRequest, DirectBackend, MergeRequest, Pushed, as_int_list
from .data import TASKS, Split, Task

Backend = DirectBackend | ApiBackend
Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters and seeds (all fixed; ``seed`` shifts every seed of a run)."""

    seed: int = 0
    r: int = 8
    alpha: int = 16
    base: models.TrainConfig = models.TrainConfig(epochs=40, lr=1e-3)
    # base v2 = v1 trained on: a small update and a large one (same data, different step size / length)
    v2: tuple[tuple[str, models.TrainConfig], ...] = (
        ("small", models.TrainConfig(epochs=4, lr=1e-4)),
        ("large", models.TrainConfig(epochs=8, lr=1e-3)),
    )
    lora: models.TrainConfig = models.TrainConfig(epochs=40, lr=5e-3)
    finetune: models.TrainConfig = models.TrainConfig(epochs=30, lr=1e-3)
    budgets: tuple[float, ...] = (0.3, 0.1)
    # compression planner: all methods at plan_budgets (+ plan_extra, to locate the goal), each single
    # method at plan_budgets
    plan_budgets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    plan_extra: tuple[float, ...] = (0.03, 0.07, 0.08)
    merges: tuple[MergeRequest, ...] = (
        MergeRequest("average", "task_arithmetic", {"lam": 1 / len(TASKS)}),  # the plain mean of the n deltas
        MergeRequest("task_arithmetic", "task_arithmetic", {"lam": 0.4}),
        MergeRequest("ties", "ties", {"density": 0.2, "lam": 1.0}),
        MergeRequest("dare_linear", "dare_linear", {"density": 0.5, "lam": 0.4, "seed": 0}),
        MergeRequest("dare_ties", "dare_ties", {"density": 0.5, "lam": 1.0, "seed": 0}),
    )

    def lora_init_seed(self, init: str, task_index: int) -> int:
        """Shared: one seed for every task; independent: a different seed per task."""
        return 10_000 + 100 * self.seed + (0 if init == "shared" else 1 + task_index)

    def data_seed(self, task_index: int) -> int:
        """Minibatch order of task i (the same in both initialisation settings)."""
        return 20_000 + 100 * self.seed + task_index

    def finetune_seed(self, task_index: int) -> int:
        return 30_000 + 100 * self.seed + task_index


@dataclass
class Row:
    """One method's result on a collection."""

    method: str
    family: str
    storage: float
    acc: dict[str, float]
    delta_error: float | None
    via: str
    note: str = ""

    def retained(self, own: dict[str, float]) -> float:
        return sum(self.acc[t] / own[t] for t in own) / len(own)

    def worst(self, own: dict[str, float]) -> tuple[str, float]:
        """The task with the lowest retained accuracy, and that retention."""
        return min(((t, self.acc[t] / own[t]) for t in own), key=lambda x: (x[1], x[0]))

    def mean_acc(self) -> float:
        return sum(self.acc.values()) / len(self.acc)


@dataclass
class Collection:
    init: str
    n: int
    r: int
    rows: list[Row] = field(default_factory=list)
    peft_check: dict[str, float] = field(default_factory=dict)
    pushed: list[Pushed] = field(default_factory=list)
    factors: dict[str, float] = field(default_factory=dict)

    def note_peft(self, max_logit_diff: float, mismatches: int) -> None:
        """Record one PEFT-vs-(W + ΔW) comparison (see :func:`_peft_check`)."""
        c = self.peft_check
        c["artifacts"] = c.get("artifacts", 0) + 1
        c["max |logit diff|"] = max(c.get("max |logit diff|", 0.0), max_logit_diff)
        c["prediction mismatches"] = c.get("prediction mismatches", 0) + mismatches

    def own(self) -> dict[str, float]:
        return next(r for r in self.rows if r.family == "individual").acc

    def find(self, family: str) -> list[Row]:
        return [r for r in self.rows if r.family == family]


# ------------------------------------------------------------------------------------ helpers


def _accs(base: models.State, tasks: Sequence[Task], adapters: Sequence[LoraAdapter | None]) -> dict[str, float]:
    return {t.name: models.accuracy(base, t.test, models.deltas_of(a) if a is not None else None)
            for t, a in zip(tasks, adapters, strict=True)}


def _dense_accs(base: models.State, tasks: Sequence[Task], deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t.name: models.accuracy(base, t.test, deltas) for t in tasks}


def _how(via: str, ref: str) -> str:
    return via if ref == "direct" else f"{via} → {ref}"


def _mean_error(refs: Sequence[LoraAdapter], approx: Sequence[LoraAdapter]) -> float:
    return sum(adapter_error(a, b).overall for a, b in zip(refs, approx, strict=True)) / len(refs)


def _dense_error(refs: Sequence[LoraAdapter], deltas: dict[str, torch.Tensor]) -> float:
    out = 0.0
    for a in refs:
        num = sum(float((a.delta(m) - deltas[m]).square().sum()) for m in a.module_names())
        den = sum(float(a.delta(m).square().sum()) for m in a.module_names())
        out += math.sqrt(num / den)
    return out / len(refs)


def delta_storage(adapters: Sequence[LoraAdapter], k: int) -> float:
    """Storage of ``fit_delta_basis(k)`` relative to the n adapters (``DeltaBasis.storage_ratio``'s
    formula, evaluated before fitting): Σ_m (k(in + out) + n k²) / Σ_m n r (in + out)."""
    n = len(adapters)
    mods = adapters[0].modules
    num = sum(k * (m.in_features + m.out_features) + n * k * k for m in mods.values())
    den = sum(n * m.rank * (m.in_features + m.out_features) for m in mods.values())
    return num / den


def _peft_check(base: models.State, task: Task, adapter: LoraAdapter) -> tuple[float, int]:
    """(max |logit difference|, prediction mismatches) between W + ΔW evaluation and PEFT's own
    forward pass over the adapter written with ``save_peft_adapter``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_peft_adapter(adapter, tmp)
        peft = models.peft_logits(base, Path(tmp), task.test.x)
    ours = models.logits(base, task.test.x, models.deltas_of(adapter))
    return float((peft - ours).abs().max()), int((peft.argmax(1) != ours.argmax(1)).sum())


def factor_diagnostics(base: models.State, folders: Sequence[Path], recipe: Recipe, init: str) -> dict[str, float]:
    """How far training moved lora_A from its initialisation, and how aligned the tasks' factors are.

    ``A drift`` = mean over tasks of ‖A − A_init‖ / ‖A_init‖ (all modules together, unscaled PEFT
    factors); ``A cosine`` / ``B cosine`` = mean over task pairs of the cosine between the flattened
    factors: what RMM's per-position statistics see (shared initialisation is meant to raise them)."""
    from safetensors.torch import load_file

    As, Bs, drift = [], [], []
    for i, f in enumerate(folders):
        sd = load_file(str(f / "adapter_model.safetensors"))
        a0 = models.lora_init_factors(base, recipe.r, recipe.alpha, recipe.lora_init_seed(init, i))
        a = {m: sd[f"base_model.model.{m}.lora_A.weight"] for m in models.MODULES}
        num = sum(float((a[m] - a0[m]).square().sum()) for m in models.MODULES)
        den = sum(float(a0[m].square().sum()) for m in models.MODULES)
        drift.append(math.sqrt(num / den))
        As.append(torch.cat([a[m].flatten() for m in models.MODULES]))
        Bs.append(torch.cat([sd[f"base_model.model.{m}.lora_B.weight"].flatten() for m in models.MODULES]))

    def mean_cos(xs: list[torch.Tensor]) -> float:
        v = torch.stack(xs)
        v = v / v.norm(dim=1, keepdim=True)
        c = v @ v.T
        n = len(xs)
        return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))

    return {"A drift": sum(drift) / len(drift), "A cosine": mean_cos(As), "B cosine": mean_cos(Bs)}


# ---------------------------------------------------------------------------------- training


def train_adapters(base: models.State, tasks: Sequence[Task], recipe: Recipe, init: str, out: Path,
                   log: Log) -> list[Path]:
    """One PEFT LoRA per task (saved with ``save_pretrained`` under ``out/<task>``)."""
    folders = []
    for i, t in enumerate(tasks):
        folder = out / t.name
        models.train_lora(base, t.train, recipe.lora, r=recipe.r, alpha=recipe.alpha,
                          init_seed=recipe.lora_init_seed(init, i), data_seed=recipe.data_seed(i), out=folder)
        folders.append(folder)
    log(f"  trained {len(tasks)} LoRA adapters ({init} initialisation)")
    return folders


# ----------------------------------------------------------------------------- LoRA collection


def lora_collection(backend: Backend, init: str, base: models.State, base_ref: Pushed, tasks: Sequence[Task],
                    folders: Sequence[Path], recipe: Recipe, log: Log) -> Collection:
    n, r = len(tasks), recipe.r
    coll = Collection(init=init, n=n, r=r)
    pushed = [backend.push(f, f"digits-{init}-{t.name}", kind="adapter", base=base_ref,
                           tags={"task": t.name, "init": init}) for f, t in zip(folders, tasks, strict=True)]
    coll.pushed = pushed
    coll.factors = factor_diagnostics(base, folders, recipe, init)
    adapters = [backend.adapter(p) for p in pushed]
    via_api = "API job" if backend.mode == "api" else "direct"

    coll.rows.append(Row("base model, no adapter", "reference", 0.0, _accs(base, tasks, [None] * n), None, "-"))
    coll.rows.append(Row("individual adapters", "individual", 1.0, _accs(base, tasks, adapters), 0.0,
                         "pulled from the registry" if backend.mode == "api" else "direct"))

    # RMM: one basis per p, and the error-budget mode
    pmax = min(r, n - 1)
    requests = [BasisRequest(f"rmm p={p}", p=p) for p in range(pmax + 1)]
    requests += [BasisRequest(f"rmm ε={e:g}", max_error=e) for e in recipe.budgets]
    bases = backend.bases(pushed, adapters, requests, name=f"digits-{init}-rmm")
    for rq in requests:
        basis, ref = bases[rq.label]
        recon = [basis.reconstruct(i) for i in range(n)]
        ps = basis.p
        note = "" if rq.p is not None else "p per module: " + ", ".join(f"{m} {v}" for m, v in ps.items())
        coll.rows.append(Row(rq.label, "rmm" if rq.p is not None else "budget", basis.storage_ratio(),
                             _accs(base, tasks, recon),
                             sum(e.overall for e in basis.member_errors()) / n, _how(via_api, ref), note))
        if rq.p in (0, pmax):
            coll.note_peft(*_peft_check(base, tasks[0], recon[0]))
    log(f"  {init}: {len(requests)} RMM bases")

    # per-adapter truncated SVD at k/r of the collection
    for k in range(1, r):
        trunc = [truncate_adapter(a, k) for a in adapters]
        coll.rows.append(Row(f"trunc k={k}", "trunc", k / r, _accs(base, tasks, trunc), _mean_error(adapters, trunc),
                             "direct"))

    # delta-space RMM variant at the largest k whose storage fits each RMM p's
    seen: set[int] = set()
    for row in coll.find("rmm"):
        k = max(kk for kk in range(0, n * r + 1) if delta_storage(adapters, kk) <= row.storage + 1e-12)
        if k in seen or k == 0:
            continue
        seen.add(k)
        db = fit_delta_basis(adapters, k=k)
        assert abs(db.storage_ratio() - delta_storage(adapters, k)) < 1e-12
        recon = [db.reconstruct(i) for i in range(n)]
        coll.rows.append(Row(f"rmm_delta k={k}", "rmm_delta", db.storage_ratio(), _accs(base, tasks, recon),
                             sum(e.overall for e in db.member_errors()) / n, "direct", f"matches {row.method}"))
    log(f"  {init}: truncation and rmm_delta baselines")

    # the compression planner (direct): all methods, then each method alone; storage = bytes
    plans = [(f"plan ε={e:g}", "plan", compress.METHODS, e) for e in sorted(recipe.plan_budgets + recipe.plan_extra)]
    plans += [(f"plan[{m}] ε={e:g}", f"plan_{m}", (m,), e) for m in compress.METHODS for e in recipe.plan_budgets]
    names = [t.name for t in tasks]
    for label, family, methods, eps in plans:
        pl = compress.plan(adapters, eps, methods=methods, names=names)
        recon = [pl.reconstruct(i) for i in range(n)]
        counts: dict[str, int] = {}
        for mp in pl.members:
            counts[mp.method] = counts.get(mp.method, 0) + 1
        errs = [mp.error for mp in pl.members]
        note = (f"{pl.stored_bytes()} of {pl.original_bytes()} B; max Δ error {max(errs):.3f}; "
                + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())))
        coll.rows.append(Row(label, family, pl.stored_bytes() / pl.original_bytes(), _accs(base, tasks, recon),
                             sum(errs) / n, "direct", note))
        if family == "plan" and eps == 0.05:
            coll.note_peft(*_peft_check(base, tasks[0], recon[0]))
    log(f"  {init}: {len(plans)} compression plans")

    # merges: delta space through the API (rank r), dense (direct), separate factors (direct)
    merged = backend.merges(pushed, adapters, recipe.merges, rank=r, name=f"digits-{init}")
    dense_storage = (sum(m.in_features * m.out_features for m in adapters[0].modules.values())
                     / sum(n * m.rank * (m.in_features + m.out_features) for m in adapters[0].modules.values()))
    for rq in recipe.merges:
        adapter, ref = merged[rq.label]
        params = ", ".join(f"{k}={v}" for k, v in rq.params.items() if k != "seed")
        coll.rows.append(Row(f"{rq.label} (delta space, rank {r})", "merge", 1 / n, _accs(base, tasks, [adapter] * n),
                             _mean_error(adapters, [adapter] * n), _how(via_api, ref), params))
        coll.note_peft(*_peft_check(base, tasks[0], adapter))
    for rq in recipe.merges:
        dense = merge_adapters(rq.method, adapters, rq.params, rank=None)
        assert isinstance(dense, dict)
        coll.rows.append(Row(f"{rq.label} (delta space, dense ΔW)", "merge_dense", dense_storage,
                             _dense_accs(base, tasks, dense), _dense_error(adapters, dense), "direct"))
    for rq in recipe.merges:
        sep = merge_adapter_factors_separately(rq.method, adapters, rq.params)
        coll.rows.append(Row(f"{rq.label} (separate A, B: paper's baseline)", "separate", 1 / n,
                             _accs(base, tasks, [sep] * n), _mean_error(adapters, [sep] * n), "direct"))
    log(f"  {init}: {3 * len(recipe.merges)} merges")

    for i, (t, f) in enumerate(zip(tasks, folders, strict=True)):
        peft = models.peft_logits(base, f, t.test.x)
        ours = models.logits(base, t.test.x, models.deltas_of(adapters[i]))
        coll.note_peft(float((peft - ours).abs().max()), int((peft.argmax(1) != ours.argmax(1)).sum()))
    return coll


# --------------------------------------------------------------------------- fine-tuning transfer


@dataclass
class TransferRow:
    task: str
    acc: dict[str, float]  # v1, ft_v1, v2, v2_delta, ft_v2, lora_v1, lora_v2
    nfr_delta: dict[str, Any]
    nfr_ft2: dict[str, Any]
    nfr_lora: dict[str, Any]
    refs: dict[str, str]
    diagnostics: dict[str, Any]

    @property
    def recovered(self) -> float | None:
        gain = self.acc["ft_v2"] - self.acc["v2"]
        return None if abs(gain) < 1e-12 else (self.acc["v2_delta"] - self.acc["v2"]) / gain


@dataclass
class TransferResult:
    """One base update v1 → v2 (``label``), every task."""

    label: str
    v2_recipe: models.TrainConfig
    rows: list[TransferRow]
    bases: dict[str, dict[str, float]]
    base_refs: dict[str, str]


def _preds(state: models.State, data: Split, deltas: dict[str, torch.Tensor] | None = None) -> list[int]:
    return as_int_list(models.predict(state, data.x, deltas))


Finetunes = dict[str, list[tuple[models.State, Path]]]


def train_finetunes(v1: models.State, v2s: dict[str, models.State], tasks: Sequence[Task], recipe: Recipe,
                    work: Path, log: Log) -> Finetunes:
    """FT(v1) and FT(v2) for every v2 variant, per task: every parameter trained, the same recipe and
    seed from each base; saved as checkpoints under ``work/finetunes``."""
    out: Finetunes = {}
    for label, start in {"v1": v1, **v2s}.items():
        out[label] = []
        for i, t in enumerate(tasks):
            ft = models.train_full(start, t.train, recipe.finetune, recipe.finetune_seed(i))
            folder = models.save_checkpoint(ft, work / "finetunes" / f"{label}-{t.name}", f"FT({label}) on {t.name}")
            out[label].append((ft, folder))
    log(f"  trained {sum(len(v) for v in out.values())} full fine-tunes")
    return out


def finetune_transfer(backend: Backend, v1: models.State, v1_pushed: Pushed,
                      v2s: Sequence[tuple[str, models.TrainConfig, models.State, Path]], tasks: Sequence[Task],
                      finetunes: Finetunes, lora_pushed: Sequence[Pushed], original: Task, shifted: Split,
                      log: Log) -> list[TransferResult]:
    """For each base update: push v2 as the next version of the base, transfer every FT(v1) to it
    (a job; the result is a candidate version), push FT(v2), re-pin the task's LoRA to v2, and
    compare FT(v1) → v2 + Δ and FT(v1) → FT(v2) with MUSCLE metrics."""
    ft1_pushed = [backend.push(d, f"digits-ft-{t.name}", kind="finetune", base=v1_pushed, tags={"task": t.name})
                  for (_, d), t in zip(finetunes["v1"], tasks, strict=True)]
    lora_v1 = [backend.adapter(p) for p in lora_pushed]
    results = []
    for label, cfg, v2, v2_dir in v2s:
        v2_pushed = backend.push(v2_dir, "digits-mlp", kind="base", tags={"update": label})
        bases = {name: {"original": models.accuracy(st, original.test), "shifted": models.accuracy(st, shifted)}
                 for name, st in (("v1", v1), ("v2", v2))}
        rows = []
        for i, t in enumerate(tasks):
            ft1 = finetunes["v1"][i][0]
            ft2, d2 = finetunes[label][i]
            moved, cand_ref, diag = backend.transfer_finetune(ft1_pushed[i], v1_pushed, v2_pushed)
            p2 = backend.push(d2, f"digits-ft-{t.name}", kind="finetune", base=v2_pushed,
                              tags={"task": t.name, "oracle": f"FT(v2 {label})"})
            repinned, lora_ref = backend.transfer_adapter(lora_pushed[i], v2_pushed)
            acc = {
                "v1": models.accuracy(v1, t.test), "ft_v1": models.accuracy(ft1, t.test),
                "v2": models.accuracy(v2, t.test), "v2_delta": models.accuracy(moved, t.test),
                "ft_v2": models.accuracy(ft2, t.test),
                "lora_v1": models.accuracy(v1, t.test, models.deltas_of(lora_v1[i])),
                "lora_v2": models.accuracy(v2, t.test, models.deltas_of(repinned)),
            }
            labels = as_int_list(t.test.y)
            dataset = f"digits-{t.name}-test"
            pf1, pmove, pf2 = _preds(ft1, t.test), _preds(moved, t.test), _preds(ft2, t.test)
            nfr_delta = backend.compat((ft1_pushed[i].ref, pf1), (cand_ref, pmove), labels, dataset)
            nfr_ft2 = backend.compat((ft1_pushed[i].ref, pf1), (p2.ref, pf2), labels, dataset)
            nfr_lora = backend.compat((lora_pushed[i].ref, _preds(v1, t.test, models.deltas_of(lora_v1[i]))),
                                      (lora_ref, _preds(v2, t.test, models.deltas_of(repinned))), labels, dataset)
            refs = {"ft_v1": ft1_pushed[i].ref, "v2_delta": cand_ref, "ft_v2": p2.ref, "lora_v2": lora_ref}
            rows.append(TransferRow(t.name, acc, nfr_delta, nfr_ft2, nfr_lora, refs, diag))
        results.append(TransferResult(label, cfg, rows, bases, {"v1": v1_pushed.ref, "v2": v2_pushed.ref}))
        rec = [r.recovered for r in rows if r.recovered is not None]
        log(f"  transfer to v2 ({label} update): median recovered {sorted(rec)[len(rec) // 2]:.2f}")
    return results
