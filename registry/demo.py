"""Small, real checkpoints for the quickstart, the tests and the benchmarks.

A Llama-shaped toy transformer (embeddings, attention and MLP projections, norms, lm_head) saved
as real safetensors with config and tokenizer files; LoRA adapters in PEFT layout
(``adapter_config.json`` + ``adapter_model.safetensors``) for it; full fine-tunes; a continued
"v2" base. Everything is seeded and built in a fraction of a second.

    python -m registry.demo ./demo          # writes demo/base, demo/adapter, demo/finetune, ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tensor_shapes(shape: Shape = Shape()) -> dict[str, tuple[int, ...]]:
    h, i = shape.hidden, shape.intermediate
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        for name in ATTN:
            out[f"{p}self_attn.{name}.weight"] = (h, h)
        out[f"{p}mlp.gate_proj.weight"] = (i, h)
        out[f"{p}mlp.up_proj.weight"] = (i, h)
        out[f"{p}mlp.down_proj.weight"] = (h, i)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def random_weights(shape: Shape = Shape(), seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in tensor_shapes(shape).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(s, dtype=dtype)
        else:
            out[name] = (torch.randn(s, generator=g) * 0.02).to(dtype)
    return out


def _write_aux(folder: Path, shape: Shape, dtype: torch.dtype) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": shape.vocab, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    vocab = {f"<t{i}>": i for i in range(shape.vocab)}
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<t0>"}}
    (folder / "tokenizer.json").write_text(json.dumps(tok, sort_keys=True))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}) + "\n")


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shape: Shape = Shape(), shards: int = 1) -> Path:
    """Write tensors as ``model.safetensors`` (or ``shards`` files plus an index) with config files."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(tensors.values())).dtype
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
            total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_aux(folder, shape, dtype)
    return folder


def make_base(folder: Path, seed: int = 0, shape: Shape = Shape(), dtype: torch.dtype = torch.float32,
              shards: int = 1) -> Path:
    return save_checkpoint(folder, random_weights(shape, seed, dtype), shape, shards)


def make_finetune(folder: Path, base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.002,
                  shape: Shape = Shape()) -> Path:
    """base + small seeded drift on every tensor (a stand-in for a full fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    tuned = {n: (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype) for n, t in base.items()}
    return save_checkpoint(folder, tuned, shape)


def lora_factors(shape: Shape = Shape(), r: int = 8, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                 init_seed: int | None = None, drift: float = 0.02) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA factors for ``targets``. With ``init_seed`` shared across adapters, factors
    start from a common initialisation plus task drift (as when adapters share an init)."""
    g = torch.Generator().manual_seed(seed)
    g0 = torch.Generator().manual_seed(init_seed if init_seed is not None else seed + 10_000)
    out = {}
    for name, s in tensor_shapes(shape).items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(t) for t in targets):
            continue
        out_f, in_f = s
        a0 = torch.randn(r, in_f, generator=g0) / in_f**0.5
        b0 = torch.randn(out_f, r, generator=g0) * 0.01
        a = a0 + drift * torch.randn(r, in_f, generator=g)
        b = b0 + drift * torch.randn(out_f, r, generator=g)
        out[f"base_model.model.{module}.lora_A.weight"] = a
        out[f"base_model.model.{module}.lora_B.weight"] = b
    return out


def save_adapter(folder: Path, factors: dict[str, torch.Tensor], r: int = 8, alpha: float = 16,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), base_name: str = "demo-base",
                 dtype: torch.dtype = torch.float32, extra_config: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_name, "inference_mode": True, **(extra_config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(factors.items())},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def make_adapter(folder: Path, seed: int = 0, r: int = 8, shape: Shape = Shape(),
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), init_seed: int | None = None) -> Path:
    return save_adapter(folder, lora_factors(shape, r, seed, targets, init_seed), r=r, targets=targets)


def make_demo(root: Path) -> dict[str, Path]:
    """The quickstart set: a base, its v2, two adapters and a fine-tune of the base."""
    root.mkdir(parents=True, exist_ok=True)
    shape = Shape()
    base = random_weights(shape, seed=0)
    paths = {"base": save_checkpoint(root / "base", base, shape)}
    g = torch.Generator().manual_seed(99)
    v2 = {n: t + torch.randn(t.shape, generator=g) * 0.001 for n, t in base.items()}
    paths["base-v2"] = save_checkpoint(root / "base-v2", v2, shape)
    paths["adapter-sql"] = make_adapter(root / "adapter-sql", seed=1, init_seed=7)
    paths["adapter-chat"] = make_adapter(root / "adapter-chat", seed=2, init_seed=7)
    paths["finetune"] = make_finetune(root / "finetune", base, seed=3)
    return paths


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "demo")
    for name, path in make_demo(root).items():
        print(f"{name:14s} {path}")


if __name__ == "__main__":
    main()
