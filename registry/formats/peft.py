"""Header-level checks of PEFT LoRA adapters (no tensor data read).

Used at ingest to decide, from ``adapter_config.json`` and the safetensors header alone, whether
an adapter is a LoRA the registry can represent exactly and which base tensors it
touches, so that its shapes can be checked against the pinned base version's fingerprint.
The weight math itself (loading factors, scales) lives in :mod:`registry.weights.adapters`.

**Served adapter configs** (:func:`resolvable_config`; the rule lives here and nowhere else): a
pushed ``adapter_config.json`` names its base as the pusher had it (often a local path). Two
promises meet here, and both hold:

- the native API (``registry pull``, ``/api/v1/models/…/files/…``) returns every stored file
  byte-exact: the sha256 the pusher computed is the one the registry serves, ``adapter_config.json``
  included;
- the Hugging Face Hub-compatible view (:mod:`registry.services.hub`), which PEFT tooling loads
  straight from the registry, serves an adapter pinned to a base with a *generated*
  ``adapter_config.json``: the same JSON object (every key, in its order) with
  ``base_model_name_or_path`` set to the base's repo id and ``revision`` to the base version's
  commit, so ``AutoPeftModel…from_pretrained`` loads exactly the pinned base from the registry. It is
  a file of its own: its own sha256 (the ETag), size and bytes, computed from the stored config on
  request (deterministic: the same stored file and base give the same bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from ..weights import peft_config
from ..weights.errors import AdapterFormatError, UnsupportedAdapterError
from ..weights.safetensors_header import HeaderEntry
from . import jsonfile

PREFIX = "base_model.model."
ADAPTER_CONFIG_NAME = "adapter_config.json"
BASE_KEYS = ("base_model_name_or_path", "revision")  # where PEFT reads the base (and its revision) from
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


def _unsupported(message: str, **details: Any) -> InvalidInput:
    return InvalidInput(message, code="unsupported_adapter", details=details)


def _invalid(message: str, **details: Any) -> InvalidInput:
    return InvalidInput(message, code="invalid_adapter", details=details)


@dataclass(frozen=True)
class LoraModuleShape:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    layer: str  # "linear" or "embedding"
    r: int
    in_features: int  # columns of A (linear) / num_embeddings (embedding)
    out_features: int  # rows of B (linear) / embedding_dim (embedding)

    def expected_base_shape(self, fan_in_fan_out: bool) -> tuple[int, int]:
        if self.layer == "embedding":
            return (self.in_features, self.out_features)
        if fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class AdapterSpec:
    config: dict[str, Any]
    modules: dict[str, LoraModuleShape] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def summary(self) -> dict[str, Any]:
        ranks = sorted({m.r for m in self.modules.values()})
        return {
            "peft_type": "LORA",
            "r": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "fan_in_fan_out": self.fan_in_fan_out,
            "target_modules": self.config.get("target_modules"),
            "modules": len(self.modules),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
        }


def parse_config(raw: bytes, file: str = "adapter_config.json") -> dict[str, Any]:
    try:
        cfg = jsonfile.parse(raw)
    except jsonfile.JsonError as e:
        raise _invalid(f"{file} is {e}", file=file) from None
    if not isinstance(cfg, dict):
        raise _invalid(f"{file} must hold a JSON object", file=file)
    # The same rules the weight library applies when it loads the adapter (one place: peft_config).
    try:
        peft_config.check_config(cfg, file)
    except UnsupportedAdapterError as e:
        raise _unsupported(f"not supported: {e}", file=file) from None
    except AdapterFormatError as e:
        raise _invalid(str(e), file=file) from None
    return cfg


def _check_module_config(config: dict[str, Any], module: str, r: int, file: str) -> None:
    """The config must describe the factors: ``r`` equal to their rank and the module among
    ``target_modules``. Checked when that takes no user-supplied regular expression (which could
    take exponential time here); with ``rank_pattern`` or regex targets the weight library checks
    them when it loads the adapter."""
    if not config.get("rank_pattern"):
        want, _ = peft_config.rank_alpha(config, module)
        if r != want:
            raise _invalid(f"{file}: module {module!r} has rank {r} but adapter_config.json says r={want}",
                           module=module, rank=r, config_r=want)
    targets = config.get("target_modules")
    plain = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if plain and not config.get("layers_pattern") and not isinstance(config.get("exclude_modules"), str) \
            and not peft_config.targets(config, module):
        raise _invalid(f"{file}: module {module!r} is not among target_modules {targets[:10]}",
                       module=module, target_modules=targets[:50])


def parse_adapter(config: dict[str, Any], tensors: dict[str, HeaderEntry], file: str) -> AdapterSpec:
    """Group the adapter's tensors into LoRA modules and check each module's A/B shapes."""
    parts: dict[str, dict[str, HeaderEntry]] = {}
    layers: dict[str, str] = {}
    for name, info in tensors.items():
        if "lora_magnitude_vector" in name:
            raise _unsupported("DoRA magnitude vectors found; DoRA is not supported", tensor=name)
        if ".lora_B.bias" in name or ".lora_A.bias" in name:
            raise _unsupported("LoRA bias tensors found; lora_bias is not supported", tensor=name)
        if "modules_to_save" in name:
            raise _unsupported("modules_to_save tensors found; not supported", tensor=name)
        for suffix, (layer, factor) in _FACTOR_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                module = module[len(PREFIX):] if module.startswith(PREFIX) else module
                parts.setdefault(module, {})[factor] = info
                layers[module] = layer
                break
        else:
            raise _unsupported(f"{file}: tensor {name!r} is not a LoRA factor (full weights inside an "
                               "adapter are not supported)", tensor=name)

    modules: dict[str, LoraModuleShape] = {}
    for module, fac in sorted(parts.items()):
        if set(fac) != {"A", "B"}:
            missing = "B" if "A" in fac else "A"
            raise _invalid(f"module {module!r} has no lora_{missing} factor", module=module)
        a, b = fac["A"], fac["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise _unsupported(f"module {module!r}: only 2-D LoRA factors (Linear, Conv1D, Embedding) are "
                               f"supported, got A{list(a.shape)} B{list(b.shape)}", module=module)
        if a.dtype != b.dtype:
            raise _invalid(f"module {module!r}: lora_A is {a.dtype} but lora_B is {b.dtype}", module=module)
        # Linear: A (r, in), B (out, r). Embedding: A (r, num_embeddings), B (embedding_dim, r).
        r, in_f, out_f, r_b = a.shape[0], a.shape[1], b.shape[0], b.shape[1]
        if r != r_b or r == 0:
            raise _invalid(f"module {module!r}: lora_A rank {r} does not match lora_B rank {r_b}",
                           module=module, a_shape=list(a.shape), b_shape=list(b.shape))
        _check_module_config(config, module, r, file)
        modules[module] = LoraModuleShape(module, layers[module], r, in_f, out_f)
    if not modules:
        raise _invalid(f"{file} holds no LoRA factors")
    return AdapterSpec(config=config, modules=modules)


def check_against_base(spec: AdapterSpec, base_index: dict[str, Any]) -> list[dict[str, Any]]:
    """Mismatches between the adapter's modules and the base's tensor index ``{name: [dtype, shape, file]}``.

    Returns one entry per offending module (empty list when all match).
    """
    problems: list[dict[str, Any]] = []
    for m in spec.modules.values():
        key = f"{m.name}.weight"
        expected = list(m.expected_base_shape(spec.fan_in_fan_out))
        entry = base_index.get(key)
        if entry is None:
            problems.append({"key": key, "problem": "no such tensor in the base", "adapter_shape": expected})
        elif list(entry[1]) != expected:
            problems.append({"key": key, "problem": "shape mismatch", "adapter_shape": expected,
                             "base_shape": list(entry[1])})
    return problems


def resolvable_config(raw: bytes, base_repo_id: str, base_revision: str) -> bytes:
    """``adapter_config.json`` naming its base as the registry resolves it (the rule in the module
    docstring): ``raw`` with :data:`BASE_KEYS` set to ``base_repo_id`` and ``base_revision``, other
    keys and their order kept, written as PEFT writes configs (2-space indent) plus a newline.
    Returns ``raw`` itself when it already says so (or is not a JSON object: nothing to rewrite)."""
    try:
        cfg = jsonfile.parse(raw)
    except jsonfile.JsonError:
        return raw
    if not isinstance(cfg, dict):
        return raw
    want = dict(zip(BASE_KEYS, (base_repo_id, base_revision), strict=True))
    if all(cfg.get(k) == v for k, v in want.items()):
        return raw
    cfg.update(want)
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
