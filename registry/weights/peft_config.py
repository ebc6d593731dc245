"""PEFT LoRA ``adapter_config.json`` semantics, without torch (mirrors peft 0.21:
peft/utils/other.py get_pattern_key, tuners/lora/layer.py).

The one place these rules live: :mod:`registry.weights.adapters` applies them when it loads an
adapter, and the registry's ingest (:mod:`registry.formats.peft`) applies them to the config and
the safetensors header of an upload, so an adapter is refused at push time exactly when the
weight library could not load it. Pure Python: importing it does not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError, UnsupportedAdapterError

__all__ = ["BASE_REWRITING_INITS", "UNSUPPORTED_FIELDS", "check_config", "get_pattern_key", "rank_alpha",
           "targets"]

# Config fields whose truthy value means a forward pass other than base(x) + s·B·A·x.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) adds a learned magnitude vector",
    "lora_bias": "LoRA bias (lora_bias) adds a bias term to lora_B",
    "modules_to_save": "modules_to_save stores full copies of modules, not low-rank factors",
    "trainable_token_indices": "trainable tokens store embedding rows, not low-rank factors",
    "layer_replication": "layer_replication changes the base model's layers",
    "use_qalora": "QALoRA pools the input before lora_A",
    "alora_invocation_tokens": "aLoRA activates the adapter only after invocation tokens",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) uses a different key layout",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is a different factor layout",
    "arrow_config": "Arrow routing mixes several adapters at run time",
    "kasa_config": "KaSA changes the LoRA forward",
    "velora_config": "VeLoRA changes the LoRA forward",
    "monteclora_config": "MonteCLoRA samples the factors",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
}
# init_lora_weights values that also rewrite the base weights: the delta alone is not the adapter.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's rule: the first pattern key ``k`` (in dict order) with ``re.match(rf"(.*\\.)?({k})$",
    name)`` wins; pattern keys are regular expressions matched against a module-name suffix.
    Returns ``key_to_match`` itself when nothing matches (as PEFT does)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def rank_alpha(config: Mapping[str, Any], name: str) -> tuple[int, float]:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern, name), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, name), config.get("lora_alpha", 8))
    return int(r), float(alpha)


def targets(config: Mapping[str, Any], name: str) -> bool:
    """Mirror of peft's check_target_module_exists for ``target_modules``/``exclude_modules``/
    ``layers_to_transform``/``layers_pattern``: does PEFT put a LoRA layer on ``name``?"""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{k}") for k in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{k}") for k in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = config.get("layers_pattern")
    match: re.Match[str] | None = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pat in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def check_config(config: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a config the registry cannot represent: not LoRA, base biases, the UNSUPPORTED_FIELDS,
    base-rewriting initialisations, ``r`` not a positive int, a non-finite ``lora_alpha``."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError(f"{where}: adapter_config.json has no peft_type")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type!r} is not LORA")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(f"{where}: bias={bias!r} trains base biases; only 'none' is supported")
    for key, why in UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{where}: {key} is set: {why}; the registry cannot represent it")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights; convert the adapter to a plain "
            "LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterFormatError(f"{where}: config r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{where}: config lora_alpha must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"{where}: config {key} must be an object")
        for module, value in pattern.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = (number and isinstance(value, int) and value > 0) if key == "rank_pattern" \
                else (number and math.isfinite(value))
            if not ok:
                raise AdapterFormatError(f"{where}: config {key}[{module!r}] must be a "
                                         + ("positive integer" if key == "rank_pattern" else "finite number")
                                         + f", got {value!r}")
