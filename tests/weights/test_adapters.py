"""PEFT LoRA I/O: canonical form (scale folded in), round trips, deterministic bytes, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from registry.weights.adapters import (
    LoraAdapter,
    LoraModule,
    get_pattern_key,
    load_peft_adapter,
    save_peft_adapter,
)
from registry.weights.errors import (
    AdapterFormatError,
    NonFiniteError,
    UnsupportedAdapterError,
    WeightsError,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def _raw(tensors: dict[str, torch.Tensor], name: str, which: str) -> torch.Tensor:
    return tensors[f"base_model.model.{name}.{which}.weight"]


# --- loading: scale folding -----------------------------------------------------------------------


def test_load_folds_the_scale_into_both_factors(peft_folder, peft_factors):
    raw = peft_factors(r=4)
    ad = load_peft_adapter(peft_folder(tensors=raw, r=4, lora_alpha=8))
    s = 8 / 4
    assert ad.module_names() == [Q, V]
    assert ad.dtype == torch.float32 and ad.rank == 4 and not ad.fan_in_fan_out
    mod = ad.modules[Q]
    assert (mod.rank, mod.in_features, mod.out_features) == (4, 8, 8)
    torch.testing.assert_close(mod.A, math.sqrt(s) * _raw(raw, Q, "lora_A"))
    expected = s * _raw(raw, Q, "lora_B").double() @ _raw(raw, Q, "lora_A").double()
    torch.testing.assert_close(ad.delta(Q, dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)


def test_rslora_rank_and_alpha_patterns(peft_folder, peft_factors):
    raw = peft_factors(r=4, modules={Q: (8, 8)}) | peft_factors(r=2, modules={V: (8, 6)}, seed=1)
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.0.self_attn.v_proj": 3}}
    ad = load_peft_adapter(peft_folder(tensors=raw, config=cfg))
    assert ad.modules[Q].rank == 4 and ad.modules[V].rank == 2
    with pytest.raises(WeightsError, match="different ranks"):
        _ = ad.rank
    for name, s in ((Q, 8 / 4), (V, 3 / 2)):
        want = s * _raw(raw, name, "lora_B").double() @ _raw(raw, name, "lora_A").double()
        torch.testing.assert_close(ad.delta(name, dtype=torch.float64), want, rtol=1e-5, atol=1e-5)
    ad2 = load_peft_adapter(peft_folder("rs", tensors=raw, config=cfg, use_rslora=True))
    for name, s in ((Q, 8 / 2), (V, 3 / math.sqrt(2))):
        want = s * _raw(raw, name, "lora_B").double() @ _raw(raw, name, "lora_A").double()
        torch.testing.assert_close(ad2.delta(name, dtype=torch.float64), want, rtol=1e-5, atol=1e-5)


def test_pattern_keys_follow_peft_rule():
    # first matching key wins; keys are regexes matched against a dotted suffix of the name
    assert get_pattern_key(["q_proj", "layers.0.self_attn.q_proj"], Q) == "q_proj"
    assert get_pattern_key(["layers.0.self_attn.q_proj", "q_proj"], Q) == "layers.0.self_attn.q_proj"
    assert get_pattern_key(["proj"], Q) == Q  # not a whole dotted component: no match
    assert get_pattern_key([r"layers\.\d+\.self_attn\.q_proj"], Q) == r"layers\.\d+\.self_attn\.q_proj"


def test_fan_in_fan_out_transposes_the_weight_delta(peft_folder, peft_factors):
    ad = load_peft_adapter(peft_folder(tensors=peft_factors(), fan_in_fan_out=True))
    assert ad.fan_in_fan_out
    assert ad.weight_delta(V).shape == (8, 6)  # Conv1D weight is in × out
    torch.testing.assert_close(ad.weight_delta(V), ad.delta(V).T)


def test_float16_values_survive_load_and_save_exactly(tmp_path, peft_folder, peft_factors):
    raw = peft_factors(r=4, dtype=torch.float16)
    ad = load_peft_adapter(peft_folder(tensors=raw, r=4, lora_alpha=7))  # s = 7/4, √s irrational
    assert ad.dtype == torch.float16 and ad.modules[Q].A.dtype == torch.float32
    save_peft_adapter(ad, tmp_path / "out")
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(written) == set(raw)
    for key, t in raw.items():
        assert written[key].dtype == torch.float16
        assert torch.equal(written[key], t), key
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 7)  # original scale kept, so original factors written


def test_save_is_deterministic_and_reloads_to_the_same_deltas(tmp_path, lora_adapters):
    ad = lora_adapters(1, 4, dtype=torch.bfloat16)[0]
    save_peft_adapter(ad, tmp_path / "a")
    save_peft_adapter(ad, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    back = load_peft_adapter(tmp_path / "a")
    assert back.dtype == torch.bfloat16 and back.module_names() == ad.module_names()
    for name in ad.module_names():
        torch.testing.assert_close(back.delta(name), ad.delta(name), rtol=2e-2, atol=1e-3)


def test_from_factors_synthesises_a_unit_scale_config_with_patterns(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mods = {
        "a.q": (torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)),
        "x.a.q": (torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen)),  # "a.q" is its suffix
        "b.q": (torch.randn(3, 6, generator=gen), torch.randn(2, 3, generator=gen)),
    }
    ad = LoraAdapter.from_factors(mods, dtype=torch.float32)
    assert ad.module_names() == ["a.q", "b.q", "x.a.q"]
    save_peft_adapter(ad, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["use_rslora"] is False
    back = load_peft_adapter(tmp_path / "s")  # validates every module's rank against the patterns
    for name, (a, b) in mods.items():
        assert back.modules[name].rank == a.shape[0]
        torch.testing.assert_close(back.delta(name), b @ a)


def test_changed_ranks_fall_back_to_unit_scale(tmp_path, peft_folder, peft_factors):
    ad = load_peft_adapter(peft_folder(tensors=peft_factors(r=4), r=4, lora_alpha=16))
    trimmed = LoraAdapter.from_factors(
        {n: (m.A[:2], m.B[:, :2]) for n, m in ad.modules.items()}, config=ad.config, dtype=ad.dtype
    )
    save_peft_adapter(trimmed, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 2)
    back = load_peft_adapter(tmp_path / "t")
    for name in ad.module_names():
        torch.testing.assert_close(back.delta(name), trimmed.delta(name))


def test_lora_module_validates_shapes():
    with pytest.raises(AdapterFormatError, match="rank mismatch"):
        LoraModule(A=torch.zeros(3, 4), B=torch.zeros(5, 2))
    with pytest.raises(AdapterFormatError, match="2-D"):
        LoraModule(A=torch.zeros(3, 4, 1), B=torch.zeros(5, 3))


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_and_corrupt_files(tmp_path, peft_folder):
    with pytest.raises(AdapterFormatError, match="not a directory"):
        load_peft_adapter(tmp_path / "nope")
    folder = peft_folder("noconfig")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="missing adapter_config.json"):
        load_peft_adapter(folder)
    folder = peft_folder("noweights")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="missing adapter_model.safetensors"):
        load_peft_adapter(folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterFormatError, match="pickles are refused"):
        load_peft_adapter(folder)
    folder = peft_folder("badjson")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="invalid JSON"):
        load_peft_adapter(folder)
    folder = peft_folder("corrupt")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="unreadable safetensors"):
        load_peft_adapter(folder)
    folder = peft_folder("garbage")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterFormatError, match="unreadable safetensors"):
        load_peft_adapter(folder)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"peft_type": "IA3"}, UnsupportedAdapterError, "is not LORA"),
        ({"peft_type": None}, AdapterFormatError, "no peft_type"),
        ({"use_dora": True}, UnsupportedAdapterError, "DoRA"),
        ({"lora_bias": True}, UnsupportedAdapterError, "lora_bias"),
        ({"bias": "all"}, UnsupportedAdapterError, "bias='all'"),
        ({"modules_to_save": ["classifier"]}, UnsupportedAdapterError, "modules_to_save"),
        ({"init_lora_weights": "pissa_niter_4"}, UnsupportedAdapterError, "rewrites the base weights"),
        ({"alora_invocation_tokens": [1, 2]}, UnsupportedAdapterError, "aLoRA"),
        ({"r": 0}, AdapterFormatError, "positive integer"),
        ({"lora_alpha": "big"}, AdapterFormatError, "lora_alpha"),
    ],
)
def test_unsupported_or_malformed_configs(peft_folder, overrides, error, message):
    with pytest.raises(error, match=message):
        load_peft_adapter(peft_folder(**overrides))


def test_bad_tensors(peft_folder, peft_factors):
    raw = peft_factors()
    dora = raw | {f"base_model.model.{Q}.lora_magnitude_vector": torch.ones(8)}
    with pytest.raises(UnsupportedAdapterError, match="DoRA magnitude"):
        load_peft_adapter(peft_folder("dora", tensors=dora))
    bias = raw | {f"base_model.model.{Q}.lora_B.bias": torch.zeros(8)}
    with pytest.raises(UnsupportedAdapterError, match="LoRA bias"):
        load_peft_adapter(peft_folder("bias", tensors=bias))
    saved = raw | {"base_model.model.classifier.weight": torch.zeros(2, 8)}
    with pytest.raises(UnsupportedAdapterError, match="not LoRA factors.*classifier"):
        load_peft_adapter(peft_folder("mts", tensors=saved))
    emb = raw | {"base_model.model.embed.lora_embedding_A": torch.zeros(4, 10)}
    with pytest.raises(UnsupportedAdapterError, match="embedding"):
        load_peft_adapter(peft_folder("emb", tensors=emb))
    no_b = {k: v for k, v in raw.items() if not k.endswith(f"{V}.lora_B.weight")}
    with pytest.raises(AdapterFormatError, match=f"missing a factor: {V}.lora_B"):
        load_peft_adapter(peft_folder("nob", tensors=no_b))
    skew = raw | {f"base_model.model.{Q}.lora_B.weight": torch.zeros(8, 3)}
    with pytest.raises(AdapterFormatError, match="lora_A has rank 4 but lora_B has rank 3"):
        load_peft_adapter(peft_folder("skew", tensors=skew))
    with pytest.raises(AdapterFormatError, match="rank 4 but the config"):
        load_peft_adapter(peft_folder("cfgrank", tensors=raw, r=8))
    with pytest.raises(AdapterFormatError, match="no LoRA factors"):
        load_peft_adapter(peft_folder("empty", tensors={}))
    mixed = raw | {f"base_model.model.{Q}.lora_A.weight": raw[f"base_model.model.{Q}.lora_A.weight"].half()}
    with pytest.raises(AdapterFormatError, match="mixed factor dtypes"):
        load_peft_adapter(peft_folder("mixed", tensors=mixed))
    conv = {
        f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 8, 1, 1),
        f"base_model.model.{Q}.lora_B.weight": torch.zeros(8, 4, 1, 1),
    }
    with pytest.raises(UnsupportedAdapterError, match="conv LoRA"):
        load_peft_adapter(peft_folder("conv", tensors=conv))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_factors_name_the_tensor(peft_folder, peft_factors, bad):
    raw = peft_factors()
    raw[f"base_model.model.{V}.lora_B.weight"][2, 1] = bad
    with pytest.raises(NonFiniteError, match=rf"{V}\.lora_B\.weight"):
        load_peft_adapter(peft_folder(tensors=raw))
