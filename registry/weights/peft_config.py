"""The rules for a PEFT ``adapter_config.json`` the registry can represent exactly: ONE place,
used when an adapter is pushed (:mod:`registry.formats.peft`) and when the weight math loads one
(:func:`registry.weights.adapters.load_peft_adapter`), so a push refuses what the math cannot use.

Plain Python (no torch): the API imports it at start-up.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import AdapterFormatError, UnsupportedAdapterError

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


def check_config(config: Any, where: str = "adapter_config.json") -> dict[str, Any]:
    """Return ``config`` if the registry can represent the adapter it describes exactly; raise
    :class:`AdapterFormatError` (malformed) or :class:`UnsupportedAdapterError` (valid PEFT, but a
    feature beyond ΔW = s·B·A) otherwise. ``where`` names the file in messages."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError(f"{where} has no peft_type")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type!r} is not LORA: not supported "
                                      "(only LoRA adapters are)")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(f"{where}: bias={bias!r} trains base biases; it is not supported (only 'none')")
    for key, why in UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{where}: {key} is not supported: {why}, which the registry "
                                          "cannot represent")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights; convert the adapter to a plain "
            "LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterFormatError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"{where}: {key} must be an object")
        for module, value in pattern.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) if key == "rank_pattern" \
                else (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))
            if not ok:
                raise AdapterFormatError(f"{where}: {key}[{module!r}] = {value!r} is not a valid "
                                         + ("rank" if key == "rank_pattern" else "alpha"))
    return config
