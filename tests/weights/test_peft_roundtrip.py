"""End to end with real PEFT: train tiny LoRAs, read them, fit an RMM basis at full p, rebuild a
member, write it with save_peft_adapter and check PeftModel.from_pretrained gives the same outputs."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft.utils.other import get_pattern_key as peft_get_pattern_key  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from registry.weights import rmm, rmm_baselines  # noqa: E402
from registry.weights.adapters import get_pattern_key, load_peft_adapter, save_peft_adapter  # noqa: E402

D = 16


class Block(nn.Module):
    """A tiny attention-like block plus MLP, Llama-style module names."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D, bias=False)
        self.v_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.up_proj, self.down_proj = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).mT / math.sqrt(D), dim=-1)
        x = x + self.o_proj(att @ self.v_proj(x))
        return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GPT2Block(nn.Module):
    """GPT-2 layout: Conv1D weights are in × out, so LoRA needs fan_in_fan_out=True."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * D, D), Conv1D(D, D)
        self.c_fc, self.c_out = Conv1D(2 * D, D), Conv1D(D, 2 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(D, dim=-1)
        x = x + self.c_proj(torch.softmax(q @ k.mT / math.sqrt(D), dim=-1) @ v)
        return x + self.c_out(torch.nn.functional.gelu(self.c_fc(x)))


class TinyGPT2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([GPT2Block(), GPT2Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return x


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "plain": (TinyLM, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS}),
    "patterns": (
        TinyLM,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": LLAMA_TARGETS,
            "rank_pattern": {"up_proj": 6, "layers.1.q_proj": 2},
            "alpha_pattern": {"layers.1.down_proj": 3, "v_proj": 20},
        },
    ),
    "rslora": (TinyLM, {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": LLAMA_TARGETS}),
    "conv1d_fan_in_fan_out": (
        TinyGPT2,
        {"r": 3, "lora_alpha": 5, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj", "c_fc", "c_out"]},
    ),
}


def train_lora(base: nn.Module, config: dict[str, Any], seed: int, folder: Path) -> nn.Module:
    """A few Adam steps of a LoRA on random data; saved with save_pretrained; returns the PEFT model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x, y = torch.randn(8, 5, D), torch.randn(8, 5, D)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, list[nn.Module], list[Path]]]:
    out = {}
    for case, (make, config) in CASES.items():
        torch.manual_seed(100)
        base = make().eval()
        folders = [tmp_path_factory.mktemp(f"{case}-{i}") for i in range(3)]
        models = [train_lora(base, config, seed, folder) for seed, folder in enumerate(folders)]
        out[case] = (base, models, folders)
    return out


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(4, 7, D, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_deltas_equal_peft_delta_weights(trained, case):
    base, models, folders = trained[case]
    adapter = load_peft_adapter(folders[0])
    layers = {
        name.removeprefix("base_model.model."): mod
        for name, mod in models[0].named_modules()
        if isinstance(mod, peft.tuners.lora.LoraLayer)
    }
    assert sorted(layers) == adapter.module_names()
    for name, layer in layers.items():
        with torch.no_grad():
            want = layer.get_delta_weight("default")  # PEFT's s·B·A, transposed for fan_in_fan_out
        torch.testing.assert_close(adapter.weight_delta(name), want, rtol=1e-5, atol=1e-6)
        assert adapter.modules[name].rank == layer.r["default"]


@pytest.mark.parametrize("case", list(CASES))
def test_basis_member_round_trips_through_peft(trained, tmp_path, case):
    base, models, folders = trained[case]
    adapters = [load_peft_adapter(f) for f in folders]
    assert all(a.fan_in_fan_out is (case == "conv1d_fan_in_fan_out") for a in adapters)
    assert (outputs(models[0]) - outputs(base)).abs().max() > 1e-2  # the LoRAs did move the outputs
    basis = rmm.fit_basis(adapters, p=2)  # n = 3 adapters: p = min(r, n − 1) = 2 is exact
    assert max(e.overall for e in basis.member_errors()) < 1e-5
    rmm.save_basis(basis, tmp_path / "basis.safetensors")
    loaded = rmm.load_basis(tmp_path / "basis.safetensors")
    for i in (0, 2):
        save_peft_adapter(loaded.reconstruct(i), tmp_path / f"m{i}")
        fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"m{i}")).eval()
        torch.testing.assert_close(outputs(fresh), outputs(models[i]), rtol=1e-4, atol=1e-5)
    # and the plain I/O round trip: read a PEFT folder, write it back, same model outputs
    save_peft_adapter(adapters[1], tmp_path / "io")
    fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "io")).eval()
    torch.testing.assert_close(outputs(fresh), outputs(models[1]), rtol=1e-5, atol=1e-6)


def test_truncated_adapter_with_new_ranks_loads_in_peft(trained, tmp_path):
    base, _, folders = trained["patterns"]
    adapter = load_peft_adapter(folders[0])
    cut = rmm_baselines.truncate_adapter(adapter, 3)  # modules of rank 2 keep rank 2, others drop to 3
    save_peft_adapter(cut, tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3
    fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "cut")).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in fresh.named_modules() if hasattr(m, "lora_A")}
    for name, layer in layers.items():
        with torch.no_grad():
            got = layer.get_delta_weight("default")
        torch.testing.assert_close(got, cut.weight_delta(name), rtol=1e-4, atol=1e-6)


def test_pattern_matching_mirrors_peft():
    names = ["model.layers.0.self_attn.q_proj", "layers.10.mlp.up_proj", "q_proj", "h.1.attn.c_attn"]
    patterns = [
        ["q_proj"],
        ["self_attn.q_proj", "q_proj"],
        ["layers.1.mlp.up_proj", "up_proj"],
        [r"layers\.\d+\.mlp\.up_proj"],
        ["attn.c_attn", "proj"],
        ["0.self_attn.q_proj"],
    ]
    for keys in patterns:
        for name in names:
            assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name), (keys, name)
