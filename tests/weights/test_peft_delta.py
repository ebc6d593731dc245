"""registry.weights.peft_delta: the relative delta error between two PEFT folders from their stored
bytes, against PEFT's own reading of the folders (tests/peft_oracle.py) and exact cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.demo import Shape, make_adapter
from registry.weights.adapters import load_peft_adapter, save_peft_adapter
from registry.weights.errors import IncompatibleAdaptersError
from registry.weights.peft_delta import delta_error
from tests.peft_oracle import relative_error

TINY = Shape(vocab=32, hidden=16, intermediate=32, layers=2)


def _perturbed(src: Path, dest: Path, eps: float, alpha: int | None = None) -> Path:
    dest.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(5)
    out = {k: t + eps * torch.randn(t.shape, generator=g) for k, t in tensors.items()}
    if alpha is not None:  # the same deltas under another lora_alpha: B scaled by old/new
        ratio = cfg["lora_alpha"] / alpha
        out = {k: t * ratio if ".lora_B." in k else t for k, t in out.items()}
        cfg["lora_alpha"] = alpha
    save_file(out, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(("eps", "alpha"), [(1e-3, None), (3e-2, None), (1e-2, 4)])
def test_matches_peft_reading_of_the_folders(tmp_path: Path, eps: float, alpha: int | None) -> None:
    a = make_adapter(tmp_path / "a", seed=1, r=4, shape=TINY)
    b = _perturbed(a, tmp_path / "b", eps, alpha)
    got = delta_error(a, b)
    assert got > 0 and got == pytest.approx(relative_error(a, b), rel=1e-9)


def test_identical_factors_are_exactly_zero_and_rounding_is_seen(tmp_path: Path) -> None:
    s4 = make_adapter(tmp_path / "s4", seed=1, r=4, shape=TINY)  # lora_alpha 16 / r 4: √s = 2
    assert delta_error(s4, s4) == 0.0
    save_peft_adapter(load_peft_adapter(s4), tmp_path / "s4-again")
    assert delta_error(s4, tmp_path / "s4-again") == 0.0
    s2 = make_adapter(tmp_path / "s2", seed=1, r=8, shape=TINY)  # s = 2: folding √2 in float32 rounds
    save_peft_adapter(load_peft_adapter(s2), tmp_path / "s2-again")
    err = delta_error(s2, tmp_path / "s2-again")
    assert 0 < err < 1e-6 and err == pytest.approx(relative_error(s2, tmp_path / "s2-again"), rel=1e-6)


def test_other_modules_are_refused(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", seed=1, r=4, shape=TINY)
    b = make_adapter(tmp_path / "b", seed=1, r=4, shape=TINY, targets=("q_proj",))
    with pytest.raises(IncompatibleAdaptersError):
        delta_error(a, b)
