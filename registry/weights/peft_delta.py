"""The relative delta error between two PEFT LoRA folders, from the factors exactly as stored.

:func:`registry.weights.adapters.load_peft_adapter` folds each module's scale s into its factors
(A' = √s·A, B' = √s·B, in float32 for float32 files), which rounds: a load → save round trip of a
float32 adapter whose s is not a power of 4 can move factors by one ulp. What a server hands out is
the folder's bytes, and PEFT applies ΔW = s · B A to the stored factors. So to say what serving a
rebuilt folder costs against the folder that was pushed, both are read here the way PEFT reads them:
per module ΔW = s · B A with s from the folder's own config (r, lora_alpha, rank/alpha patterns,
rsLoRA), computed densely in float64 from the stored values, row block by row block. Identical
factors and scales give exactly 0.

    error = √(Σ_m ‖ΔŴ_m − ΔW_m‖²_F) / √(Σ_m ‖ΔW_m‖²_F)

the error :mod:`registry.weights.compress` bounds (its members' errors are measured on the folded
factors; this one on the bytes).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import jsonfile
from .adapters import CONFIG_NAME, WEIGHTS_NAME, lora_scale
from .errors import AdapterFormatError, IncompatibleAdaptersError
from .peft_config import rank_alpha

_PREFIX = "base_model.model."
_ROWS = 1024  # rows of ΔW formed at a time


def _factors(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    try:
        config = jsonfile.parse((folder / CONFIG_NAME).read_bytes())
        tensors = load_file(folder / WEIGHTS_NAME)
    except (OSError, jsonfile.JsonError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{folder}: not a readable PEFT folder: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: expected a JSON object")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for which in ("lora_A", "lora_B"):
            suffix = f".{which}.weight"
            if key.startswith(_PREFIX) and key.endswith(suffix):
                parts.setdefault(key[len(_PREFIX):-len(suffix)], {})[which] = t
    out, scales = {}, {}
    for name, fs in parts.items():
        if set(fs) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{folder}: module {name} lacks a factor")
        r, alpha = rank_alpha(config, name)
        out[name] = (fs["lora_A"].to(torch.float64), fs["lora_B"].to(torch.float64))
        scales[name] = lora_scale(r, alpha, bool(config.get("use_rslora", False)))
    return out, scales


def delta_error(reference: str | os.PathLike[str], candidate: str | os.PathLike[str]) -> float:
    """Relative delta error of the PEFT folder ``candidate`` against ``reference`` (see the module
    docstring); 0.0 exactly when every module's s · B A agrees to the last bit."""
    ref, ref_s = _factors(Path(reference))
    cand, cand_s = _factors(Path(candidate))
    if set(ref) != set(cand):
        raise IncompatibleAdaptersError(f"the folders hold different modules: {sorted(set(ref) ^ set(cand))[:5]}")
    num = den = 0.0
    for name, (a, b) in sorted(ref.items()):
        a2, b2 = cand[name]
        if a2.shape[1] != a.shape[1] or b2.shape[0] != b.shape[0]:
            raise IncompatibleAdaptersError(f"module {name}: other shapes")
        for r0 in range(0, b.shape[0], _ROWS):
            want = ref_s[name] * (b[r0:r0 + _ROWS] @ a)
            got = cand_s[name] * (b2[r0:r0 + _ROWS] @ a2)
            num += float(((got - want) ** 2).sum())
            den += float((want ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
