"""PEFT LoRA adapters in the registry's canonical form.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
holding, per target module, ``base_model.model.<module>.lora_A.weight`` (r × in_features) and
``...lora_B.weight`` (out_features × r). PEFT applies

    ΔW = s · B · A,   s = lora_alpha / r   (s = lora_alpha / √r with ``use_rslora``),

with ``r``/``lora_alpha`` overridden per module by ``rank_pattern``/``alpha_pattern``, and lays ΔW
on the base weight transposed when ``fan_in_fan_out`` (GPT-2 ``Conv1D`` weights are in × out).

Canonical form: the scale is folded into both factors, A' = √s·A and B' = √s·B, so that the delta
of a module is exactly ``B' @ A'`` whatever the config said. In memory the folded factors are
float32 (float64 when the source is float64); :attr:`LoraAdapter.dtype` remembers the source dtype,
which :func:`save_peft_adapter` writes back.

Building an adapter from factors (what merge/RMM code does)::

    adapter = LoraAdapter.from_factors(
        {"model.layers.0.self_attn.q_proj": (A, B)},   # A: r × in, B: out × r, delta = B @ A
        dtype=torch.float16,                           # dtype to write on save
        config=None,                                   # or a PEFT config dict to keep its fields
    )

``from_factors`` moves the factors to CPU float32, sorts the modules by name and, without a config,
synthesises one (s = 1, see :func:`save_peft_adapter`). Module names are PEFT key paths with
``base_model.model.`` and ``.lora_A.weight``/``.lora_B.weight`` stripped.

What cannot be represented exactly is refused with :class:`UnsupportedAdapterError`: DoRA
magnitudes, LoRA biases, ``modules_to_save``, embedding/conv LoRAs, trainable tokens and the PEFT
variants whose forward is not ``base(x) + s·B·A·x`` (aLoRA, QALoRA, ...), and initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import jsonfile
from .device import resolve_device
from .errors import AdapterFormatError, NonFiniteError, UnsupportedAdapterError, WeightsError
from .peft_config import check_config as _check_config
from .peft_config import get_pattern_key
from .peft_config import rank_alpha as _rank_alpha
from .peft_config import targets as _targets

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LoraAdapter",
    "LoraModule",
    "get_pattern_key",
    "load_peft_adapter",
    "lora_scale",
    "peft_config_bytes",
    "peft_factor",
    "peft_tensor_names",
    "save_peft_adapter",
    "write_safetensors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. NaN and Inf propagate into a sum, so one reduction (no temporary)
    decides the common case; a non-finite sum (or an overflow) is confirmed element-wise."""
    return bool(t.sum(dtype=_compute_dtype(t.dtype)).isfinite()) or bool(torch.isfinite(t).all())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other source dtype is held and computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class LoraModule:
    """One module's factors with the scale folded in: ΔW = B @ A (out × in).

    ``A`` is r × in_features (PEFT ``lora_A`` orientation), ``B`` is out_features × r (``lora_B``).
    """

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise AdapterFormatError(
                f"LoRA factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise AdapterFormatError(
                f"rank mismatch: A is {tuple(self.A.shape)} (rank {self.A.shape[0]}) but B is "
                f"{tuple(self.B.shape)} (rank {self.B.shape[1]})"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])


@dataclass
class LoraAdapter:
    """A LoRA adapter: per module the folded factors, plus the config and dtype it came from.

    ``modules`` is sorted by module name on construction, so iteration order (and everything
    written from it) is deterministic.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))
        if self.dtype not in _FLOAT_DTYPES:
            raise UnsupportedAdapterError(f"adapter dtype {self.dtype} is not a float type")

    @classmethod
    def from_factors(
        cls,
        modules: Mapping[str, LoraModule | tuple[torch.Tensor, torch.Tensor]],
        *,
        config: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        fan_in_fan_out: bool | None = None,
    ) -> LoraAdapter:
        """Build an adapter from folded factors ``(A, B)`` (delta = B @ A) per module name.

        Factors are moved to contiguous CPU float32 (float64 stays float64), detached; a factor
        that already is one is used as is, not copied (treat factors as read-only).
        ``dtype`` is the dtype :func:`save_peft_adapter` writes (default: the factors' dtype).
        ``config`` None synthesises a PEFT config with s = 1 (lora_alpha = r, per-module
        ``rank_pattern``/``alpha_pattern`` where ranks differ).
        """
        if not modules:
            raise WeightsError("an adapter needs at least one module")
        built: dict[str, LoraModule] = {}
        for name, mod in modules.items():
            a, b = (mod.A, mod.B) if isinstance(mod, LoraModule) else mod
            cdt = _compute_dtype(a.dtype)
            built[name] = LoraModule(
                A=a.detach().to("cpu", cdt).contiguous(), B=b.detach().to("cpu", cdt).contiguous()
            )
        first = next(iter(modules.values()))
        src_dtype = dtype or (first.A if isinstance(first, LoraModule) else first[0]).dtype
        if config is not None:
            cfg = dict(config)
            fifo = bool(cfg.get("fan_in_fan_out", False)) if fan_in_fan_out is None else fan_in_fan_out
        else:
            fifo = bool(fan_in_fan_out)
            cfg = unit_scale_config({}, {n: m.rank for n, m in built.items()}, fifo)
        cfg["fan_in_fan_out"] = fifo
        return cls(modules=built, config=cfg, dtype=src_dtype, fan_in_fan_out=fifo)

    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def rank(self) -> int:
        """The rank shared by every module; raises :class:`WeightsError` if ranks differ."""
        ranks = {m.rank for m in self.modules.values()}
        if len(ranks) != 1:
            raise WeightsError(f"modules have different ranks {sorted(ranks)} (rank_pattern)")
        return ranks.pop()

    def delta(
        self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """ΔW = B @ A (out × in), computed in ``dtype`` on ``device``."""
        mod = self._module(name)
        dev = resolve_device(device)
        return mod.B.to(dev, dtype) @ mod.A.to(dev, dtype)

    def weight_delta(
        self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """ΔW laid out like the base weight: (B @ A)ᵀ (in × out) when ``fan_in_fan_out``."""
        d = self.delta(name, dtype=dtype, device=device)
        return d.T.contiguous() if self.fan_in_fan_out else d

    def _module(self, name: str) -> LoraModule:
        try:
            return self.modules[name]
        except KeyError:
            raise WeightsError(f"adapter has no module {name!r}") from None


# ---------------------------------------------------------------------------------------------
# Config semantics (mirrors peft 0.21; the config rules themselves are in peft_config.py)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scale: s = α / r, or s = α / √r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _module_scale(config: Mapping[str, Any], name: str) -> tuple[int, float]:
    """(r, s) that PEFT uses for module ``name`` under ``config``."""
    r, alpha = _rank_alpha(config, name)
    return r, lora_scale(r, alpha, bool(config.get("use_rslora", False)))


# ---------------------------------------------------------------------------------------------
# Loading


def _classify_extra_keys(keys: Sequence[str], where: Path) -> None:
    if not keys:
        return
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    if any("lora_magnitude_vector" in k for k in keys):
        raise UnsupportedAdapterError(f"{where}: DoRA magnitude vectors are not supported: {shown}")
    if any(k.endswith((".lora_A.bias", ".lora_B.bias")) for k in keys):
        raise UnsupportedAdapterError(f"{where}: LoRA bias tensors are not supported: {shown}")
    if any("lora_embedding_" in k for k in keys):
        raise UnsupportedAdapterError(f"{where}: embedding LoRAs (lora_embedding_*) are unsupported: {shown}")
    raise UnsupportedAdapterError(
        f"{where}: tensors that are not LoRA factors (modules_to_save or trainable tokens?): {shown}"
    )


def load_peft_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read a PEFT LoRA folder into canonical form: per module A' = √s·A, B' = √s·B (float32).

    Validates the config and every tensor (see the module docstring for what is refused); pickled
    ``adapter_model.bin`` files are refused, never unpickled.
    """
    folder = Path(path)
    cfg_path, st_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a directory")
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{folder}: missing {CONFIG_NAME}")
    if not st_path.is_file():
        if (folder / _PICKLE_NAME).is_file():
            raise AdapterFormatError(
                f"{folder}: only {_PICKLE_NAME} (a pickle) is present; pickles are refused, convert it to "
                f"{WEIGHTS_NAME}"
            )
        raise AdapterFormatError(f"{folder}: missing {WEIGHTS_NAME}")
    try:
        config = jsonfile.parse(cfg_path.read_bytes())
    except jsonfile.JsonError as exc:
        raise AdapterFormatError(f"{cfg_path}: invalid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    _check_config(config, folder)
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{st_path}: unreadable safetensors file: {exc}") from exc

    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[str] = []
    for key in sorted(tensors):
        if key.startswith(_PREFIX) and key.endswith((_SUFFIX_A, _SUFFIX_B)):
            name, which = key[len(_PREFIX) : -len(_SUFFIX_A)], key[-len(_SUFFIX_A) + 1 : -len(".weight")]
            factors.setdefault(name, {})[which] = tensors[key]
        else:
            extra.append(key)
    _classify_extra_keys(extra, folder)
    if not factors:
        raise AdapterFormatError(f"{st_path}: no LoRA factors (base_model.model.<module>.lora_A.weight keys)")
    missing = sorted(f"{n}.{w}" for n, fs in factors.items() for w in ("lora_A", "lora_B") if w not in fs)
    if missing:
        raise AdapterFormatError(f"{st_path}: modules missing a factor: {', '.join(missing[:10])}")
    dtypes = {t.dtype for fs in factors.values() for t in fs.values()}
    if len(dtypes) != 1:
        raise AdapterFormatError(f"{st_path}: mixed factor dtypes {sorted(map(str, dtypes))}")
    src = dtypes.pop()
    if src not in _FLOAT_DTYPES:
        raise UnsupportedAdapterError(f"{st_path}: factor dtype {src} is not a float type (quantized?)")
    cdt = _compute_dtype(src)
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for name, fs in factors.items():
        a, b = fs["lora_A"], fs["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedAdapterError(
                f"{st_path}: {name}: factors {tuple(a.shape)}/{tuple(b.shape)} are not 2-D (conv LoRA?)"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{st_path}: {name}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}"
            )
        r, alpha = _rank_alpha(config, name)
        if a.shape[0] != r:
            raise AdapterFormatError(
                f"{st_path}: {name}: factors have rank {a.shape[0]} but the config (r/rank_pattern) says {r}"
            )
        root = math.sqrt(lora_scale(r, alpha, use_rslora))
        folded = []
        for which, t in (("lora_A", a), ("lora_B", b)):
            x = t.to(cdt)  # a fresh tensor, or the loaded one itself: either is ours to scale in place
            if root != 1.0:
                x.mul_(root)
            if not all_finite(x):
                raise NonFiniteError(f"{st_path}: tensor {_PREFIX}{name}.{which}.weight holds NaN or Inf")
            folded.append(x)
        modules[name] = LoraModule(A=folded[0], B=folded[1])
    return LoraAdapter(
        modules=modules, config=config, dtype=src, fan_in_fan_out=bool(config.get("fan_in_fan_out", False))
    )


# ---------------------------------------------------------------------------------------------
# Saving


def _pattern_dict(values: Mapping[str, int], default: int, names: Sequence[str]) -> dict[str, Any]:
    """A rank/alpha pattern whose keys are full module names, longest first, so that PEFT's
    first-match rule resolves every module to its own entry (a shorter name can match a longer one
    as a suffix, never the other way round). Only modules whose value differs from ``default``
    get an entry unless that would let an entry catch a module it was not meant for."""
    order = sorted(values, key=lambda n: (-len(n), n))
    sparse = {n: values[n] for n in order if values[n] != default}

    def resolves(pattern: dict[str, Any]) -> bool:
        return all(pattern.get(get_pattern_key(pattern, n), default) == values[n] for n in names)

    if resolves(sparse):
        return sparse
    dense = {re.escape(n): values[n] for n in order}
    if resolves(dense):
        return dense
    raise WeightsError("cannot express per-module ranks as a PEFT rank_pattern")  # pragma: no cover


def _exact_targets(names: Sequence[str]) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def unit_scale_config(
    base: Mapping[str, Any], ranks: Mapping[str, int], fan_in_fan_out: bool
) -> dict[str, Any]:
    """A config with s = 1 for every module: r = the most common rank, lora_alpha = r,
    ``rank_pattern``/``alpha_pattern`` (alpha = rank) where a module's rank differs, no rsLoRA."""
    names = sorted(ranks)
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "target_modules": _exact_targets(names),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    cfg.update({k: v for k, v in base.items() if k not in ("alpha_pattern", "rank_pattern")})
    cfg.update(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern=_pattern_dict(ranks, r, names),
        alpha_pattern=_pattern_dict(ranks, r, names),
    )
    return cfg


def _save_config(adapter: LoraAdapter) -> tuple[dict[str, Any], dict[str, float]]:
    """The config to write and the per-module scale s to unfold (factor / √s).

    If ``adapter.config`` assigns every module its actual rank (e.g. an adapter loaded from PEFT,
    or an exact RMM reconstruction of one), its r/lora_alpha/patterns/use_rslora are kept and the
    original scale is unfolded, so a load → save round trip writes the original factor values.
    Otherwise (ranks changed, no config) the scale is set to s = 1 (lora_alpha = r per module).
    Target modules are kept when PEFT would place a layer on every module, else replaced by an
    exact regular expression of the module names.
    """
    names = adapter.module_names()
    base = dict(adapter.config)
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    keeps_scale = isinstance(base.get("r"), int) and all(_rank_alpha(base, n)[0] == ranks[n] for n in names)
    if keeps_scale:
        cfg = base
        scales = {n: _module_scale(base, n)[1] for n in names}
    else:
        cfg = unit_scale_config(base, ranks, adapter.fan_in_fan_out)
        scales = dict.fromkeys(names, 1.0)
    cfg["peft_type"] = "LORA"
    cfg["fan_in_fan_out"] = adapter.fan_in_fan_out
    if not all(_targets(cfg, n) for n in names):
        cfg["target_modules"] = _exact_targets(names)
        for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            cfg[key] = None
    if cfg.get("init_lora_weights") is False:
        cfg["init_lora_weights"] = True  # a targeted module without factors then stays at ΔW = 0
    ordered = {k: cfg[k] for k in sorted(cfg)}
    return ordered, scales


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Atomically write a safetensors file whose bytes depend only on its contents.

    ``save_file`` streams the tensors to disk without extra copies but serialises
    ``__metadata__`` from a hash map, so with several metadata keys their order (and the file's
    bytes) can change from run to run. The header is therefore rewritten in place with sorted
    keys: same entries, same length, so the padding and data offsets do not move."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        if len(metadata) > 1:
            with open(tmp, "r+b") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
                text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
                if len(text) > size:  # pragma: no cover - serde_json and json escape alike for str→str
                    raise WeightsError(f"{path}: cannot canonicalise the safetensors header")
                fh.seek(8)
                fh.write(text + b" " * (size - len(text)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def peft_config_bytes(adapter: LoraAdapter) -> tuple[bytes, dict[str, float]]:
    """The ``adapter_config.json`` bytes :func:`save_peft_adapter` writes for ``adapter`` and the
    scale s it unfolds per module (only the modules' ranks and the adapter's config are read)."""
    config, scales = _save_config(adapter)
    return (json.dumps(config, indent=2) + "\n").encode("utf-8"), scales


def peft_tensor_names(module: str) -> tuple[str, str]:
    """The file's tensor names of a module's (A, B)."""
    return _PREFIX + module + _SUFFIX_A, _PREFIX + module + _SUFFIX_B


def peft_factor(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """A folded factor as :func:`save_peft_adapter` stores it: t / √s in the compute dtype, rounded
    once to ``dtype`` (contiguous, CPU)."""
    root = math.sqrt(scale)
    x = t.detach().to("cpu")
    if root != 1.0:  # divide in the compute dtype, round once to the source dtype
        x = x.to(_compute_dtype(x.dtype)) / root
    return x.to(dtype).contiguous()


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike[str]) -> None:
    """Write ``adapter`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Each module is written as A = A'/√s and B = B'/√s in ``adapter.dtype``, where s is the scale
    the written config gives that module (the original one when the config still matches the
    ranks, else s = 1), so PEFT's s·B·A equals the in-memory B' @ A'. Bytes are deterministic:
    sorted tensors, fixed metadata ``{"format": "pt"}``, config keys sorted.
    """
    if not adapter.modules:
        raise WeightsError("cannot save an adapter without modules")
    if any(m.rank == 0 for m in adapter.modules.values()):
        raise WeightsError("cannot save rank-0 modules in PEFT layout")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config, scales = peft_config_bytes(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in adapter.modules.items():
        for key, t in zip(peft_tensor_names(name), (mod.A, mod.B), strict=True):
            tensors[key] = peft_factor(t, scales[name], adapter.dtype)
    write_safetensors(tensors, folder / WEIGHTS_NAME, {"format": "pt"})
    _atomic_write(folder / CONFIG_NAME, config)
