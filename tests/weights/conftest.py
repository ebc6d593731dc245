"""Shared helpers for the registry.weights tests (tiny tensors built in code, no downloads)."""

from __future__ import annotations

# --- LoRA adapters / RMM (tests/weights/test_adapters.py, test_rmm.py, test_peft_roundtrip.py) ---
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from registry.weights.adapters import LoraAdapter

Shapes = Mapping[str, tuple[int, int]]  # module name -> (in_features, out_features)

LORA_SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (24, 24),
    "model.layers.0.self_attn.v_proj": (24, 12),
    "model.layers.0.mlp.up_proj": (24, 40),
    "model.layers.1.self_attn.q_proj": (24, 24),
    "model.layers.1.mlp.down_proj": (40, 24),
}


def make_lora_adapters(
    n: int,
    r: int,
    shapes: Shapes = LORA_SHAPES,
    *,
    shared_init: bool = True,
    drift: float = 0.3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[LoraAdapter]:
    """n adapters with folded factors A = A_0 + drift·N (r × in) and B = B_0 + drift·N (out × r): a
    shared starting point (A_0, B_0) plus per-task drift, like LoRAs trained from one seed; with
    ``shared_init=False`` every adapter draws its own (A_0, B_0)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
    for name, (d, m) in shapes.items():
        for i in range(n):
            if shared_init is False or i == 0:
                a0 = torch.randn(r, d, generator=gen) / d**0.5
                b0 = torch.randn(m, r, generator=gen) * 0.1
            a = a0 + drift * torch.randn(r, d, generator=gen) / d**0.5
            b = b0 + drift * 0.1 * torch.randn(m, r, generator=gen)
            out[i][name] = (a.to(dtype), b.to(dtype))
    return [LoraAdapter.from_factors(mods, dtype=dtype) for mods in out]


def write_peft_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Write a raw PEFT folder (no validation) so tests can craft good and bad adapters."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    cfg.update(config or {})
    cfg.update(overrides)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def peft_tensors(
    r: int = 4,
    modules: Mapping[str, tuple[int, int]] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """PEFT-layout factor tensors (unfolded) for ``modules`` (default: q_proj/v_proj of layer 0)."""
    gen = torch.Generator().manual_seed(seed)
    mods = modules or {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 6)}
    out: dict[str, torch.Tensor] = {}
    for name, (d, m) in mods.items():
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d, generator=gen).to(dtype)
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, r, generator=gen).to(dtype)
    return out


@pytest.fixture
def lora_adapters() -> Callable[..., list[LoraAdapter]]:
    return make_lora_adapters


@pytest.fixture
def peft_factors() -> Callable[..., dict[str, torch.Tensor]]:
    return peft_tensors


@pytest.fixture
def peft_folder(tmp_path: Path) -> Callable[..., Path]:
    """``peft_folder(name, tensors=None, config=None, **overrides)`` writes a folder under tmp_path."""

    def make(
        name: str = "adapter",
        tensors: Mapping[str, torch.Tensor] | None = None,
        config: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Path:
        return write_peft_folder(tmp_path / name, peft_tensors() if tensors is None else tensors, config, **kw)

    return make


# --- Full checkpoints (tests/weights/test_transfer.py, test_merge.py) ---


def write_checkpoint(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` with plain ``save_file`` as ``path/model.safetensors`` (``shards=1``) or as
    ``shards`` HF-style shard files plus ``model.safetensors.index.json`` (sorted names dealt into
    contiguous groups), and extra text ``files`` (config.json, tokenizer.json, ...) beside them."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"))
    else:
        weight_map: dict[str, str] = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            group = names[i * per : (i + 1) * per]
            save_file({n: tensors[n].contiguous() for n in group}, str(path / fname))
            weight_map.update(dict.fromkeys(group, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for fname, text in (files or {}).items():
        (path / fname).write_text(text)
    return path


@pytest.fixture
def write_ckpt() -> Callable[..., Path]:
    """``write_ckpt(path, tensors, shards=1, files=None)``: see :func:`write_checkpoint`."""
    return write_checkpoint


@pytest.fixture()
def one_torch_thread():
    """Tiny matrices: torch's intra-op threads only add overhead (10× slower on a loaded 2-core box).
    Test modules of such math use it for every test (``pytestmark = pytest.mark.usefixtures(...)``)
    or through a module fixture of their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
