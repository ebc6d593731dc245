"""An oracle for adapter deltas independent of the registry's weight code: PEFT itself loads a PEFT
folder (``PeftModel.from_pretrained`` on a toy model with exactly the adapter's modules), and each
module's ΔW = scaling · B A is taken from what PEFT loaded (its own reading of the config: r,
lora_alpha, rank/alpha patterns, rslora), in float64."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_PREFIX = "base_model.model."


def _toy_model(weights: Path) -> nn.Module:
    shapes: dict[str, dict[str, int]] = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            shape = f.get_slice(key).get_shape()
            for suffix, dim, index in ((".lora_A.weight", "in", 1), (".lora_B.weight", "out", 0)):
                if key.endswith(suffix):
                    shapes.setdefault(key[len(_PREFIX):-len(suffix)], {})[dim] = int(shape[index])
    root = nn.Module()
    for module, sh in sorted(shapes.items()):
        parent = root
        *path, leaf = module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(sh["in"], sh["out"], bias=False))
    return root


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Module name -> ΔW (out × in, float64) of the PEFT adapter in ``folder``, as PEFT loads it."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="peft-oracle-") as tmp:
        copy = Path(tmp) / "adapter"
        shutil.copytree(folder, copy)
        cfg = json.loads((copy / "adapter_config.json").read_text())
        cfg["task_type"] = None  # the toy model is a plain module, not a causal LM
        (copy / "adapter_config.json").write_text(json.dumps(cfg))
        model = PeftModel.from_pretrained(_toy_model(copy / "adapter_model.safetensors"), str(copy))
        out: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            lora_a = getattr(m, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
                a = lora_a["default"].weight.detach().double()
                b = m.lora_B["default"].weight.detach().double()
                delta = float(m.scaling["default"]) * (b @ a)
                out[name.removeprefix(_PREFIX)] = delta.T if getattr(m, "fan_in_fan_out", False) else delta
    return out


def relative_error(original: Path, served: Path) -> float:
    """‖ΔŴ − ΔW‖_F / ‖ΔW‖_F over all modules together, from the two folders' bytes as PEFT reads them."""
    want, got = peft_deltas(original), peft_deltas(served)
    assert set(want) == set(got), (sorted(want), sorted(got))
    num = sum(float(((got[m] - want[m]) ** 2).sum()) for m in want)
    den = sum(float((want[m] ** 2).sum()) for m in want)
    return (num / den) ** 0.5
