"""The model, its training loops and evaluation.

:class:`DigitsMLP` is a 3-layer MLP on the 64 pixels (64 → 128 → 128 → 10, ReLU) with Linear
modules ``fc1``, ``fc2``, ``head``; its state dict is saved as ``model.safetensors`` with tensor
names ``fc1.weight``, ``fc1.bias``, ... plus a ``config.json``, so a PEFT adapter's module paths
(``base_model.model.fc1`` ...) match the base's ``<module>.weight`` tensors, which is what the
registry checks when an adapter is pushed against the base.

Training is minibatch Adam (batch 64), seeded: :func:`train_full` (all parameters: the bases
and the full fine-tunes) and :func:`train_lora` (a PEFT LoRA on every Linear, base frozen).

Evaluation (:func:`evaluate`) runs the base network with per-module weight deltas added to the
base weights, ``W + ΔW`` with ΔW = ``LoraAdapter.weight_delta(module)`` (through
``torch.func.functional_call``), so any adapter -- trained, reconstructed from a basis, merged,
truncated -- is evaluated the same way. :func:`peft_logits` loads a saved PEFT folder with
``PeftModel.from_pretrained`` instead; the run cross-checks the two paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from registry.weights.adapters import LoraAdapter

from .data import Split

HIDDEN = 128
CLASSES = 10
MODULES: tuple[str, ...] = ("fc1", "fc2", "head")


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN, classes: int = CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    batch: int = 64
    weight_decay: float = 0.0


def new_model(seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP()


def model_from_state(state: Mapping[str, torch.Tensor]) -> DigitsMLP:
    m = DigitsMLP()
    m.load_state_dict(dict(state))
    return m


def state_of(model: nn.Module) -> State:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _fit(model: nn.Module, params: list[nn.Parameter], data: Split, cfg: TrainConfig, seed: int) -> None:
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch):
            idx = order[i : i + cfg.batch]
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def train_full(state: Mapping[str, torch.Tensor] | None, data: Split, cfg: TrainConfig, seed: int) -> State:
    """Train every parameter, from ``state`` (a fine-tune / continued training) or from a seeded
    random initialisation (``state=None``); returns the new state dict."""
    model = new_model(seed) if state is None else model_from_state(state)
    _fit(model, list(model.parameters()), data, cfg, seed)
    return state_of(model)


def lora_config(r: int, alpha: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES), lora_dropout=0.0, bias="none",
                      init_lora_weights=True)


def train_lora(base: Mapping[str, torch.Tensor], data: Split, cfg: TrainConfig, *, r: int, alpha: int,
               init_seed: int, data_seed: int, out: Path) -> None:
    """Train a PEFT LoRA (every Linear, rank ``r``, ``lora_alpha`` = ``alpha``) on ``data`` with the
    base frozen and save it with ``save_pretrained`` (a real PEFT folder) to ``out``.

    PEFT's default initialisation draws ``lora_A`` (Kaiming-uniform) from torch's global RNG and
    sets ``lora_B = 0``; the global RNG is seeded with ``init_seed`` right before
    ``get_peft_model``, so equal ``init_seed`` = identical initial factors (shared
    initialisation)."""
    model = model_from_state(base)
    torch.manual_seed(init_seed)
    pm = get_peft_model(model, lora_config(r, alpha))
    _fit(pm, [p for p in pm.parameters() if p.requires_grad], data, cfg, data_seed)
    pm.save_pretrained(str(out))


def lora_init_factors(base: Mapping[str, torch.Tensor], r: int, alpha: int, init_seed: int) -> dict[str, torch.Tensor]:
    """The ``lora_A`` each module starts from under ``init_seed`` (what :func:`train_lora` draws)."""
    torch.manual_seed(init_seed)
    pm = get_peft_model(model_from_state(base), lora_config(r, alpha))
    return {name: getattr(pm.base_model.model, name).lora_A["default"].weight.detach().clone() for name in MODULES}


def save_checkpoint(state: Mapping[str, torch.Tensor], folder: Path, note: str) -> Path:
    """``model.safetensors`` + ``config.json`` (what the registry accepts as a base / fine-tune)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["DigitsMLP"], "model_type": "digits-mlp", "in_features": 64, "hidden_size": HIDDEN,
              "num_classes": CLASSES, "torch_dtype": "float32", "note": note}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_checkpoint(folder: Path) -> State:
    return dict(load_file(str(folder / "model.safetensors")))


def deltas_of(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Per module ``ΔW`` laid out like the base weight (``LoraAdapter.weight_delta``)."""
    return {name: adapter.weight_delta(name, device="cpu") for name in adapter.module_names()}


@torch.no_grad()
def logits(base: Mapping[str, torch.Tensor], x: torch.Tensor,
           deltas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Forward pass of :class:`DigitsMLP` with weights ``base[m.weight] + deltas[m]``."""
    params = dict(base)
    for name, d in (deltas or {}).items():
        params[f"{name}.weight"] = base[f"{name}.weight"] + d
    return functional_call(_SKELETON, params, (x,))


def predict(base: Mapping[str, torch.Tensor], x: torch.Tensor,
            deltas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    return logits(base, x, deltas).argmax(dim=1)


def accuracy(base: Mapping[str, torch.Tensor], data: Split, deltas: Mapping[str, torch.Tensor] | None = None) -> float:
    return float((predict(base, data.x, deltas) == data.y).float().mean())


@torch.no_grad()
def peft_logits(base: Mapping[str, torch.Tensor], adapter_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the base with a saved PEFT adapter loaded by ``PeftModel.from_pretrained``."""
    pm = PeftModel.from_pretrained(model_from_state(base), str(adapter_dir))
    pm.eval()
    return pm(x)


_SKELETON = DigitsMLP().eval()
