"""Markdown tables for the run (everything printed is computed in the run; nothing is typed in)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .experiments import Collection, TransferResult

TIE = 0.005  # retained-accuracy differences below half a percentage point are called ties


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


PLAN_FAMILIES = ("plan", "plan_quantize", "plan_truncate", "plan_rmm")
GOAL_BYTES, GOAL_MEAN, GOAL_WORST = 0.08, 0.98, 0.95


def collection_table(c: Collection, tasks: Sequence[str]) -> str:
    own = c.own()
    header = ["method", "storage", *tasks, "mean acc", "retained", "Δ error", "how"]
    rows = []
    for r in c.rows:
        if r.family in PLAN_FAMILIES:  # their storage is bytes: see compression_table
            continue
        how = r.via + (f"; {r.note}" if r.note else "")
        rows.append([r.method, num(r.storage), *(pct(r.acc[t]) for t in tasks), pct(r.mean_acc()),
                     pct(r.retained(own)) + "%", num(r.delta_error), how])
    return table(header, rows)


def _best(cands: dict[str, float]) -> str:
    top = max(cands.values())
    winners = [k for k, v in cands.items() if top - v < TIE]
    return winners[0] if len(winners) == 1 else "tie " + " = ".join(winners)


def equal_storage_table(c: Collection) -> str:
    """Each RMM p against the per-adapter truncation and rmm_delta at storage ≤ RMM's."""
    own = c.own()
    trunc = {round(r.storage * c.r): r for r in c.find("trunc")}
    delta = {r.note.removeprefix("matches "): r for r in c.find("rmm_delta")}
    indiv = next(r for r in c.rows if r.family == "individual")
    base = next(r for r in c.rows if r.family == "reference")
    rows = []
    for rm in c.find("rmm"):
        k = min(c.r, int(rm.storage * c.r + 1e-9))
        tr = indiv if k >= c.r else trunc.get(k, base)
        tr_label = f"k={k}" + (" (= the adapters)" if k >= c.r else "")
        cands = {"RMM": rm.retained(own), "trunc": tr.retained(own)}
        dl = delta.get(rm.method)
        if dl is None:  # no new k fits: the previous (largest fitting) rmm_delta row applies
            fits = [d for d in c.find("rmm_delta") if d.storage <= rm.storage + 1e-12]
            dl = max(fits, key=lambda d: d.storage) if fits else None
        if dl is not None:
            cands["rmm_delta"] = dl.retained(own)
        rows.append([rm.method.removeprefix("rmm "), num(rm.storage), pct(rm.retained(own)) + "%", num(rm.delta_error),
                     tr_label, num(min(1.0, k / c.r)), pct(tr.retained(own)) + "%", num(tr.delta_error),
                     dl.method.removeprefix("rmm_delta ") if dl else "–", num(dl.storage) if dl else "–",
                     pct(dl.retained(own)) + "%" if dl else "–", num(dl.delta_error) if dl else "–", _best(cands)])
    header = ["p", "RMM storage", "RMM retained", "RMM Δ err", "trunc", "trunc storage", "trunc retained",
              "trunc Δ err", "rmm_delta", "δ storage", "δ retained", "δ Δ err", "best (±0.5 pp = tie)"]
    return table(header, rows)


def compression_table(c: Collection, tasks: Sequence[str]) -> str:
    """The planner's rows: stored bytes / original bytes against mean and worst-task retention."""
    own = c.own()
    header = ["method", "budget ε", "stored / original bytes", *tasks, "retained (mean)", "worst task",
              "mean Δ error", "goal", "members, bytes"]
    rows = []
    for r in c.rows:
        if r.family not in PLAN_FAMILIES:
            continue
        label, eps = r.method.split(" ε=")
        task, worst = r.worst(own)
        goal = r.storage <= GOAL_BYTES and r.retained(own) >= GOAL_MEAN and worst >= GOAL_WORST
        rows.append([label, eps, num(r.storage, 4), *(pct(r.acc[t]) for t in tasks), pct(r.retained(own)) + "%",
                     f"{pct(worst)}% ({task})", num(r.delta_error, 4), "**met**" if goal else "–", r.note])
    return table(header, rows)


def goal_summary(colls: Sequence[Collection]) -> str:
    """Which planner rows meet the goal (≥ 98 % mean and ≥ 95 % worst-task retention at ≤ 0.08 of the
    bytes), per initialisation, and the best retention reached within the byte limit."""
    parts = []
    for c in colls:
        own = c.own()
        rows = [r for r in c.rows if r.family in PLAN_FAMILIES]
        met = [r.method for r in rows if r.storage <= GOAL_BYTES and r.retained(own) >= GOAL_MEAN
               and r.worst(own)[1] >= GOAL_WORST]
        within = [r for r in rows if r.storage <= GOAL_BYTES]
        best = max(within, key=lambda r: (r.worst(own)[1], r.retained(own)), default=None)
        text = f"{c.init}: " + (f"met by {', '.join(met)}" if met else "**not met**")
        if best is not None:
            text += (f"; within {GOAL_BYTES:g} of the bytes the best worst-task retention is "
                     f"{pct(best.worst(own)[1])}% ({best.method}, {num(best.storage, 4)} of the bytes, mean "
                     f"{pct(best.retained(own))}%)")
        parts.append(text)
    return (f"Goal: mean retention ≥ {100 * GOAL_MEAN:g}% and worst task ≥ {100 * GOAL_WORST:g}% at ≤ "
            f"{GOAL_BYTES:g} of the collection's original bytes. " + "; ".join(parts) + ".")


def merges_table(colls: Sequence[Collection], merge_labels: Sequence[str]) -> str:
    header = ["merge"]
    for c in colls:
        header += [f"{c.init}: rank r (API)", f"{c.init}: dense ΔW", f"{c.init}: separate A, B"]
    rows = []
    for label in merge_labels:
        row = [label]
        for c in colls:
            own = c.own()
            for fam in ("merge", "merge_dense", "separate"):
                r = next(x for x in c.find(fam) if x.method.startswith(label + " "))
                row.append(pct(r.retained(own)) + "%")
        rows.append(row)
    return table(header, rows)


def init_table(colls: Sequence[Collection]) -> str:
    """Shared vs independent initialisation at each p (retained accuracy and delta error)."""
    header = ["method"]
    for c in colls:
        header += [f"{c.init}: retained", f"{c.init}: Δ error"]
    by = [{r.method: r for r in c.rows} for c in colls]
    rows = []
    for r in colls[0].rows:
        if r.family not in ("rmm", "budget", "rmm_delta", "trunc"):
            continue
        if not all(r.method in b for b in by):
            continue
        row = [r.method]
        for c, b in zip(colls, by, strict=True):
            x = b[r.method]
            row += [pct(x.retained(c.own())) + "%", num(x.delta_error)]
        rows.append(row)
    return table(header, rows)


def transfer_table(tr: TransferResult) -> str:
    header = ["task", "v1", "FT(v1)", "v2", "v2 + Δ", "FT(v2)", "recovered", "NFR FT(v1)→v2+Δ",
              "NFR FT(v1)→FT(v2)", "PFR →v2+Δ", "PFR →FT(v2)", "LoRA on v1", "LoRA re-pinned on v2",
              "NFR LoRA v1→v2"]
    rows = []
    for r in tr.rows:
        a = r.acc
        rows.append([r.task, pct(a["v1"]), pct(a["ft_v1"]), pct(a["v2"]), pct(a["v2_delta"]), pct(a["ft_v2"]),
                     pct(r.recovered) + "%" if r.recovered is not None else "–", pct(r.nfr_delta["nfr"]),
                     pct(r.nfr_ft2["nfr"]), pct(r.nfr_delta["pfr"]), pct(r.nfr_ft2["pfr"]), pct(a["lora_v1"]),
                     pct(a["lora_v2"]), pct(r.nfr_lora["nfr"])])
    n = len(tr.rows)

    def mean(f: Any) -> float:
        return sum(f(r) for r in tr.rows) / n

    keys = ("v1", "ft_v1", "v2", "v2_delta", "ft_v2")
    gain_sum = sum(r.acc["ft_v2"] - r.acc["v2"] for r in tr.rows)
    pooled = sum(r.acc["v2_delta"] - r.acc["v2"] for r in tr.rows) / gain_sum if gain_sum else None
    rows.append(["**mean**", *(pct(mean(lambda r, k=k: r.acc[k])) for k in keys),
                 (pct(pooled) + "% (pooled)") if pooled is not None else "–",
                 pct(mean(lambda r: r.nfr_delta["nfr"])), pct(mean(lambda r: r.nfr_ft2["nfr"])),
                 pct(mean(lambda r: r.nfr_delta["pfr"])), pct(mean(lambda r: r.nfr_ft2["pfr"])),
                 pct(mean(lambda r: r.acc["lora_v1"])), pct(mean(lambda r: r.acc["lora_v2"])),
                 pct(mean(lambda r: r.nfr_lora["nfr"]))])
    return table(header, rows)


def transfer_diagnostics(tr: TransferResult) -> str:
    header = ["task", "‖v2 − v1‖/‖v1‖", "cos(v2 − v1, Δ)", "skipped tensors", "FT(v1) ref", "v2 + Δ ref (candidate)",
              "FT(v2) ref"]
    rows = []
    for r in tr.rows:
        d = r.diagnostics
        rows.append([r.task, num(d.get("relative_base_shift"), 4), num(d.get("cosine"), 4),
                     str(len(d.get("skipped", []))), r.refs["ft_v1"], r.refs["v2_delta"], r.refs["ft_v2"]])
    return table(header, rows)


def mean_sd(xs: Sequence[float]) -> str:
    if len(xs) < 2:
        return pct(xs[0])
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


SEED_FAMILIES = ("rmm", "budget", "trunc", "rmm_delta", "merge", "merge_dense", "separate", "reference",
                 *PLAN_FAMILIES)


def seeds_table(runs: Sequence[Collection], seeds: Sequence[int]) -> str:
    """Retained accuracy of every method per seed, and mean ± sample standard deviation."""
    header = ["method", "storage", *(f"seed {s}" for s in seeds), "mean ± sd"]
    rows = []
    for r0 in runs[0].rows:
        if r0.family not in SEED_FAMILIES:
            continue
        vals = []
        for c in runs:
            match = [x for x in c.rows if x.method == r0.method]
            vals.append(match[0].retained(c.own()) if match else None)
        got = [v for v in vals if v is not None]
        rows.append([r0.method, num(r0.storage), *(pct(v) if v is not None else "–" for v in vals), mean_sd(got)])
    return table(header, rows)


def _pooled(tr: TransferResult) -> float:
    gain = sum(r.acc["ft_v2"] - r.acc["v2"] for r in tr.rows)
    return sum(r.acc["v2_delta"] - r.acc["v2"] for r in tr.rows) / gain


def transfer_seeds_table(runs: Sequence[Sequence[TransferResult]], seeds: Sequence[int]) -> str:
    """Per base update and seed: base shift, mean accuracies, pooled recovered gain, mean NFRs."""
    header = ["v2 update", "seed", "‖v2 − v1‖/‖v1‖", "v2", "v2 + Δ", "FT(v2)", "FT(v1)", "recovered (pooled)",
              "NFR FT(v1)→v2+Δ", "NFR FT(v1)→FT(v2)", "LoRA re-pinned on v2", "LoRA on v1", "NFR LoRA v1→v2"]
    rows = []
    for j, first in enumerate(runs[0]):
        per_seed = [run[j] for run in runs]
        stats: dict[str, list[float]] = {}
        for seed, tr in zip(seeds, per_seed, strict=True):
            n = len(tr.rows)
            vals = {
                "shift": tr.rows[0].diagnostics.get("relative_base_shift") or 0.0,
                "v2": sum(r.acc["v2"] for r in tr.rows) / n,
                "v2_delta": sum(r.acc["v2_delta"] for r in tr.rows) / n,
                "ft_v2": sum(r.acc["ft_v2"] for r in tr.rows) / n,
                "ft_v1": sum(r.acc["ft_v1"] for r in tr.rows) / n,
                "rec": _pooled(tr),
                "nfr_d": sum(r.nfr_delta["nfr"] for r in tr.rows) / n,
                "nfr_f": sum(r.nfr_ft2["nfr"] for r in tr.rows) / n,
                "lora_v2": sum(r.acc["lora_v2"] for r in tr.rows) / n,
                "lora_v1": sum(r.acc["lora_v1"] for r in tr.rows) / n,
                "nfr_l": sum(r.nfr_lora["nfr"] for r in tr.rows) / n,
            }
            for k, v in vals.items():
                stats.setdefault(k, []).append(v)
            rows.append([first.label, str(seed), num(vals["shift"]), pct(vals["v2"]), pct(vals["v2_delta"]),
                         pct(vals["ft_v2"]), pct(vals["ft_v1"]), pct(vals["rec"]) + "%", pct(vals["nfr_d"]),
                         pct(vals["nfr_f"]), pct(vals["lora_v2"]), pct(vals["lora_v1"]), pct(vals["nfr_l"])])
        if len(per_seed) > 1:
            k = ("v2", "v2_delta", "ft_v2", "ft_v1", "rec", "nfr_d", "nfr_f", "lora_v2", "lora_v1", "nfr_l")
            rows.append([f"**{first.label}**", "mean ± sd", num(statistics.mean(stats["shift"])),
                         *(mean_sd(stats[x]) for x in k)])
    return table(header, rows)
