"""Merges: equal to PEFT's merge_utils bit for bit, seeded DARE, declared params, checkpoints, LoRA."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils as peft_merge
from safetensors.torch import load_file

from registry.weights import merge as merge_module
from registry.weights.adapters import LoraAdapter, load_peft_adapter, save_peft_adapter
from registry.weights.errors import (
    IncompatibleAdaptersError,
    MergeParamsError,
    NonFiniteError,
    ShapeMismatchError,
)
from registry.weights.merge import (
    METHODS,
    MergeParams,
    dare_mask,
    get_method,
    merge_adapter_factors_separately,
    merge_adapters,
    merge_checkpoints,
    merge_tensors,
    tensor_seed,
)

WriteCkpt = Callable[..., Path]
SHAPES = [(64, 48), (300,), (4, 6, 10)]


def inputs(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def peft_reference(
    method: str, base: torch.Tensor, fts: list[torch.Tensor], w: list[float], **kw: object
) -> torch.Tensor:
    taus = [f - base for f in fts]
    weights = torch.tensor(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when density >= 1
        fn = getattr(peft_merge, method)
        return base + fn(taus, weights, **kw)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_equals_peft(shape: tuple[int, ...]) -> None:
    base, fts = inputs(shape)
    w = [0.7, -1.2, 0.5]
    got = merge_tensors("task_arithmetic", base, fts, {"weights": w})
    assert torch.equal(got, peft_reference("task_arithmetic", base, fts, w))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
@pytest.mark.parametrize("rule", ["total", "frequency"])
def test_ties_equals_peft(shape: tuple[int, ...], density: float, rule: str) -> None:
    base, fts = inputs(shape)
    w = [0.7, 1.2, 0.5]
    got = merge_tensors("ties", base, fts, {"weights": w, "density": density, "majority_sign": rule})
    assert torch.equal(got, peft_reference("ties", base, fts, w, density=density, majority_sign_method=rule))


def peft_dare_with_registry_masks(
    method: str, taus: list[torch.Tensor], w: list[float], density: float, seed: int, name: str,
    monkeypatch: pytest.MonkeyPatch, **kw: object,
) -> torch.Tensor:
    """PEFT's own ``dare_linear`` / ``dare_ties`` with its Bernoulli draw (``random_pruning``:
    ``torch.bernoulli(full_like(τ_i, density))``, one per input, in input order) answered by the
    registry's mask of that input -- everything else is PEFT's arithmetic."""
    masks = [dare_mask(t.shape, density, seed, name, i).to(t.dtype) for i, t in enumerate(taus)]
    drawn: list[int] = []

    def bernoulli(probs: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        assert not a and not k and bool((probs == density).all())
        drawn.append(len(drawn))
        return masks[drawn[-1]]

    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when density >= 1
        m.setattr(torch, "bernoulli", bernoulli)
        out = getattr(peft_merge, method)(taus, torch.tensor(w), density, **kw)
    assert len(drawn) == (len(taus) if density < 1.0 else 0)  # one draw per input
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.7, 1.0])
def test_dare_equals_peft_given_the_registry_masks(
    shape: tuple[int, ...], density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, fts = inputs(shape)
    w = [0.7, 1.2, -0.5]
    taus = [f - base for f in fts]
    cases = [("dare_linear", {}), ("dare_ties", {"majority_sign_method": "total"}),
             ("dare_ties", {"majority_sign_method": "frequency"})]
    for method, kw in cases:
        ref = base + peft_dare_with_registry_masks(method, taus, w, density, 11, "layer.w", monkeypatch, **kw)
        params: dict[str, object] = {"weights": w, "density": density, "seed": 11}
        if kw:
            params["majority_sign"] = kw["majority_sign_method"]
        got = merge_tensors(method, base, fts, params, name="layer.w")
        assert torch.equal(got, ref), (method, kw)


def splitmix64_reference(key: int, j: int) -> int:
    """The (j + 1)-th output of SplitMix64 seeded with ``key`` (Vigna's splitmix64.c), in Python ints."""
    m64 = (1 << 64) - 1
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    return z ^ (z >> 31)


def test_dare_mask_is_the_documented_splitmix64_rule() -> None:
    assert splitmix64_reference(0, 0) == 0xE220A8397B1DCDAF  # splitmix64.c, seed 0, first output
    for density in (0.1, 0.5, 0.9):
        first = 3_000_000_007  # beyond 2^31: the counter is 64-bit
        got = dare_mask(200, density, 5, "model.layers.0.mlp.up_proj.weight", 2, first=first)
        key = tensor_seed(5, "model.layers.0.mlp.up_proj.weight", 2)
        want = [(splitmix64_reference(key, first + j) >> 11) / 2.0**53 < density for j in range(200)]
        assert got.tolist() == want
    assert dare_mask(10, 1.0, 0, "x").all()
    with pytest.raises(MergeParamsError, match="density"):
        dare_mask(10, 0.0, 0, "x")


@pytest.mark.parametrize("density", [1e-6, 0.1, 0.5, 0.9, 1.0 - 2.0**-40])
def test_dare_mask_torch_ops_equal_the_compiled_kernel(density: float) -> None:
    """The torch-ops hash (CUDA and other devices) gives the compiled kernel's mask, bit for bit."""
    for seed, name, index, first, count in [(0, "w", 0, 0, 100_003), (7, "a.b", 3, 2**40 - 17, 5000),
                                            (2**62, "", 1, 2**62, 999)]:
        compiled = dare_mask(count, density, seed, name, index, first=first, kernel=True)
        ops = dare_mask(count, density, seed, name, index, first=first, kernel=False)
        assert compiled.dtype == ops.dtype == torch.bool
        assert torch.equal(compiled, ops), (seed, name, first)
    m = dare_mask((300, 301), density, 1, "w")
    assert abs(float(m.float().mean()) - density) < 0.01
    assert torch.equal(m.view(-1)[1000:2000], dare_mask(1000, density, 1, "w", first=1000))  # chunks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dare_on_cuda_uses_the_same_masks() -> None:
    assert torch.equal(dare_mask((123, 77), 0.3, 9, "w", 1, device="cuda").cpu(), dare_mask((123, 77), 0.3, 9, "w", 1))
    base, fts = inputs((64, 48))
    for method in ("dare_linear", "dare_ties"):
        p = {"density": 0.3, "seed": 9}
        cpu = merge_tensors(method, base, fts, p, name="w")
        gpu = merge_tensors(method, base, fts, p, name="w", device="cuda").cpu()
        assert torch.equal(gpu == base, cpu == base)  # the same entries dropped everywhere
        torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-7)  # CUDA divides by a reciprocal


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunking_never_changes_a_bit(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = inputs((37, 29), n=4)
    fts[1][:5] = base[:5] + 0.25  # equal magnitudes across chunk boundaries (TIES ties)
    params = {} if method == "task_arithmetic" else {"density": 0.3}
    if method.startswith("dare"):
        params["seed"] = 2
    whole = merge_tensors(method, base, fts, params, name="t")
    monkeypatch.setattr(merge_module, "_CHUNK", 7)
    assert torch.equal(merge_tensors(method, base, fts, params, name="t"), whole)


def test_dare_masks_depend_on_seed_and_name_only() -> None:
    base, fts = inputs((50, 40))
    p = {"density": 0.3, "seed": 4}
    a = merge_tensors("dare_linear", base, fts, p, name="a")
    merge_tensors("dare_linear", base, fts, p, name="b")  # other tensors in between change nothing
    torch.manual_seed(123)
    assert torch.equal(merge_tensors("dare_linear", base, fts, p, name="a"), a)
    assert not torch.equal(merge_tensors("dare_linear", base, fts, p, name="b"), a)
    assert not torch.equal(merge_tensors("dare_linear", base, fts, {**p, "seed": 5}, name="a"), a)
    # rescaling keeps the expectation: with density d the kept entries are τ/d
    tau = fts[0] - base
    one = merge_tensors("dare_linear", base, [fts[0]], p, name="a") - base
    kept = one != 0
    assert torch.allclose(one[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-6)
    assert 0.2 < kept.float().mean() < 0.4


def test_lambda_scales_the_merged_task_vector_and_dtype_is_kept() -> None:
    base, fts = inputs((30, 20))
    tau = peft_merge.ties([f - base for f in fts], torch.ones(3), 0.5)
    got = merge_tensors("ties", base, fts, {"density": 0.5, "lam": 0.4})
    assert torch.equal(got, base + 0.4 * tau)
    b16 = base.to(torch.bfloat16)
    f16 = [f.to(torch.bfloat16) for f in fts]
    out = merge_tensors("task_arithmetic", b16, f16, MergeParams(weights=(0.5, 0.25, 0.25)))
    ref = b16.float() + peft_merge.task_arithmetic(
        [f.float() - b16.float() for f in f16], torch.tensor([0.5, 0.25, 0.25])
    )
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_trim_is_exact_top_k_with_ties_in_index_order(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g, dtype=dtype)
    x[:100] = 0.0
    x[100:300] = x[300]  # many duplicates of one magnitude, both signs
    x[150:200] *= -1
    zero = torch.zeros_like(x)
    order = torch.sort(-x.abs(), stable=True).indices  # |x| descending, ties by index
    for density in (0.0002, 0.01, 0.05, 0.5, 0.98):
        k = int(density * x.numel())
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        got = merge_tensors("ties", zero, [x], {"density": density})
        assert torch.equal(got, x * keep), density


def test_magnitude_trim_small_example() -> None:
    t = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5, -2.0, 3.0])
    got = merge_tensors("ties", torch.zeros(8), [t], {"density": 0.5})  # k = 4: the 3s, then the first 2s
    assert got.tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0, 0.0, 3.0]
    none = merge_tensors("ties", torch.zeros(3), [torch.tensor([1.0, 2.0, 3.0])], {"density": 0.2})
    assert none.tolist() == [0.0, 0.0, 0.0]  # k = int(0.6) = 0 keeps nothing, like PEFT


def test_params_are_validated_in_one_place() -> None:
    base, fts = inputs((4,))
    cases: list[tuple[str, object, str]] = [
        ("slerp", {}, "unknown merge method 'slerp'"),
        ("ties", {"densty": 0.2}, "unknown parameter"),
        ("ties", {"seed": 1}, r"ties does not take \['seed'\]"),
        ("task_arithmetic", {"density": 0.5}, "does not take"),
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("dare_ties", {"density": -0.1}, r"density must be in \(0, 1\]"),
        ("dare_linear", {}, r"\['density'\] are required"),
        ("task_arithmetic", {"weights": [1.0, 2.0]}, "2 weights for 3 inputs"),
        ("task_arithmetic", {"weights": [1.0, math.nan, 1.0]}, "finite number"),
        ("task_arithmetic", {"weights": "abc"}, "list of numbers"),
        ("task_arithmetic", {"lam": math.inf}, "lam must be a finite number"),
        ("ties", {"majority_sign": "mean"}, "majority_sign"),
        ("dare_linear", {"density": 0.5, "seed": -1}, "seed must be"),
        ("dare_linear", {"density": 0.5, "seed": True}, "seed must be"),
    ]
    for method, params, msg in cases:
        with pytest.raises(MergeParamsError, match=msg):
            merge_tensors(method, base, fts, params)  # type: ignore[arg-type]
    with pytest.raises(MergeParamsError, match="at least one input"):
        merge_tensors("ties", base, [], None)
    assert get_method("ties").resolve({"lambda": 0.4}, 2) == MergeParams(
        weights=(1.0, 1.0), lam=0.4, density=0.2, seed=None, majority_sign="total"
    )
    assert set(METHODS) == {"task_arithmetic", "ties", "dare_linear", "dare_ties"}
    assert METHODS["ties"].variant == "ties/per-tensor"
    # the DARE mask rule is part of the recorded variant (the torch.bernoulli masks had none)
    assert METHODS["dare_linear"].variant == "dare_linear/rescaled/mask-splitmix64"
    assert METHODS["dare_ties"].variant == "dare_ties/rescaled/per-tensor/mask-splitmix64"


def test_bad_tensors() -> None:
    base, fts = inputs((4, 4))
    with pytest.raises(ShapeMismatchError, match="input 1: \\[4, 5\\]"):
        merge_tensors("ties", base, [fts[0], torch.zeros(4, 5)], None, name="w")
    bad = fts[1].clone()
    bad[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="'w' of input 1"):
        merge_tensors("ties", base, [fts[0], bad], None, name="w")
    with pytest.raises(ShapeMismatchError, match="floating-point"):
        merge_tensors("task_arithmetic", torch.arange(4), [torch.arange(4)], None)


# ------------------------------------------------------------------------------------- checkpoints


def model(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = {f"layers.{i}.w": torch.randn(12, 8, generator=g).to(dtype) for i in range(3)}
    m["norm.w"] = torch.randn(8, generator=g).to(dtype)
    m["pos_ids"] = torch.arange(6)
    return m


def test_merge_checkpoints_streams_per_tensor(
    tmp_path: Path, write_ckpt: WriteCkpt, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = model(0)
    ins = [
        {
            k: (v.float() + 0.05 * torch.randn(v.shape)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    bp = write_ckpt(tmp_path / "base", base, files={"config.json": "{}", "tokenizer.json": "{}"})
    ips = [write_ckpt(tmp_path / f"in{i}", x, shards=2) for i, x in enumerate(ins)]
    params = {"density": 0.5, "seed": 3, "weights": [1.0, 0.5, 0.8], "lam": 0.9}
    monkeypatch.setattr(merge_module, "_CHUNK", 17)  # many chunks per tensor, read with pread
    rep = merge_checkpoints("dare_ties", bp, ips, tmp_path / "out", params, device="cpu")
    monkeypatch.undo()
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, b in base.items():
        if b.is_floating_point():
            want = merge_tensors("dare_ties", b, [x[name] for x in ins], params, name=name)
            assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name
        else:
            assert torch.equal(out[name], b)
    assert rep.merged == 4 and rep.copied == ["pos_ids"] and rep.inputs == 3
    assert rep.side_files == {"config.json": "base", "tokenizer.json": "base"}
    assert rep.params == {"weights": [1.0, 0.5, 0.8], "lam": 0.9, "density": 0.5, "seed": 3, "majority_sign": "total"}
    assert len(rep.task_norms) == 3 and all(x > 0 for x in rep.task_norms)
    json.dumps(rep.as_dict())
    # same inputs, same bytes
    merge_checkpoints("dare_ties", bp, ips, tmp_path / "again.safetensors", params)
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_checkpoint_merges_are_byte_identical_across_runs_and_chunk_sizes(
    method: str, tmp_path: Path, write_ckpt: WriteCkpt
) -> None:
    """The same seed gives the same bytes: here and in a fresh process with another chunk size,
    another torch RNG state and another thread count (the masks are counter-based)."""
    import subprocess
    import sys

    base = model(0)
    g = torch.Generator().manual_seed(1)
    ins = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(3)]
    bp = write_ckpt(tmp_path / "base", base)
    ips = [write_ckpt(tmp_path / f"in{i}", x) for i, x in enumerate(ins)]
    params = {"density": 0.3, "seed": 42, "weights": [1.0, -0.5, 0.8]}
    rep = merge_checkpoints(method, bp, ips, tmp_path / "a.safetensors", params)
    assert rep.variant.endswith("/mask-splitmix64")
    script = (
        "import sys, json, torch\n"
        "from registry.weights import merge as M\n"
        "torch.manual_seed(12345); torch.set_num_threads(1); M._CHUNK = 5\n"
        "a = json.loads(sys.argv[1])\n"
        "M.merge_checkpoints(a['m'], a['b'], a['i'], a['o'], a['p'])\n"
    )
    arg = json.dumps({"m": method, "b": str(bp), "i": [str(x) for x in ips], "o": str(tmp_path / "b.safetensors"),
                      "p": params})
    subprocess.run([sys.executable, "-c", script, arg], check=True, cwd=Path(__file__).resolve().parents[2])
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    other = merge_checkpoints(method, bp, ips, tmp_path / "c.safetensors", {**params, "seed": 43})
    assert other.bytes_written == rep.bytes_written
    assert (tmp_path / "c.safetensors").read_bytes() != (tmp_path / "a.safetensors").read_bytes()


def test_merge_checkpoints_refuses_mismatched_inputs(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    base = model(0)
    other = dict(model(1))
    other["layers.0.w"] = torch.zeros(12, 9, dtype=torch.bfloat16)
    del other["norm.w"]
    other["extra"] = torch.zeros(1)
    with pytest.raises(ShapeMismatchError, match="layers.0.w.*input 0.*'norm.w' missing.*'extra' in input 0"):
        merge_checkpoints(
            "ties", write_ckpt(tmp_path / "b", base), [write_ckpt(tmp_path / "o", other)], tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
    nan = dict(model(2))
    nan["norm.w"] = torch.full((8,), math.nan, dtype=torch.bfloat16)
    with pytest.raises(NonFiniteError, match="'norm.w' of input 0"):
        merge_checkpoints("ties", tmp_path / "b", [write_ckpt(tmp_path / "n", nan)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeParamsError, match="unknown merge method"):
        merge_checkpoints("average", tmp_path / "b", [tmp_path / "b"], tmp_path / "out")


# ------------------------------------------------------------------------------------- LoRA


def test_one_adapter_with_weight_one_is_the_identity(lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    (a,) = lora_adapters(1, 4)
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare_linear", {"density": 1.0})):
        dense = merge_adapters(method, [a], {**params, "weights": [1.0]})
        assert isinstance(dense, dict)
        for name in a.module_names():
            assert torch.equal(dense[name], a.delta(name)), (method, name)
    merged = merge_adapters("task_arithmetic", [a], None, rank=4)
    assert isinstance(merged, LoraAdapter) and merged.rank == 4
    for name in a.module_names():
        torch.testing.assert_close(merged.delta(name), a.delta(name), rtol=1e-5, atol=1e-6)
    base_line = merge_adapter_factors_separately("task_arithmetic", [a], None)
    for name in a.module_names():
        torch.testing.assert_close(base_line.delta(name), a.delta(name))


def test_delta_space_merge_vs_separate_factor_baseline(lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    a, b = lora_adapters(2, 4, shared_init=False)
    w = [0.6, 0.4]
    dense = merge_adapters("task_arithmetic", [a, b], {"weights": w})
    sep = merge_adapter_factors_separately("task_arithmetic", [a, b], {"weights": w})
    assert isinstance(dense, dict)
    for name in a.module_names():
        want = w[0] * a.delta(name) + w[1] * b.delta(name)
        torch.testing.assert_close(dense[name], want)
        ma, mb = a.modules[name], b.modules[name]
        cross = (math.sqrt(w[0]) * ma.B + math.sqrt(w[1]) * mb.B) @ (math.sqrt(w[0]) * ma.A + math.sqrt(w[1]) * mb.A)
        torch.testing.assert_close(sep.delta(name), cross)
        # the baseline carries the cross terms √(w_a w_b)(B_a A_b + B_b A_a); delta space does not
        torch.testing.assert_close(
            sep.delta(name) - dense[name], math.sqrt(w[0] * w[1]) * (ma.B @ mb.A + mb.B @ ma.A), rtol=1e-4, atol=1e-5
        )
        assert (sep.delta(name) - dense[name]).norm() > 1e-2 * dense[name].norm()


def test_separate_factor_baseline_equals_peft_on_factors(lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    a, b = lora_adapters(2, 4)
    sep = merge_adapter_factors_separately("ties", [a, b], {"weights": [0.5, 2.0], "density": 0.5})
    roots = torch.tensor([math.sqrt(0.5), math.sqrt(2.0)])
    for name in a.module_names():
        for part in ("A", "B"):
            want = peft_merge.ties([getattr(x.modules[name], part).clone() for x in (a, b)], roots, 0.5)
            assert torch.equal(getattr(sep.modules[name], part), want)
    with pytest.raises(MergeParamsError, match="square roots"):
        merge_adapter_factors_separately("task_arithmetic", [a, b], {"weights": [1.0, -1.0]})


def test_merged_adapter_refactorised_and_saved(tmp_path: Path, lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    ads = lora_adapters(3, 4)
    dense = merge_adapters("ties", ads, {"density": 0.3})
    assert isinstance(dense, dict)
    low = merge_adapters("ties", ads, {"density": 0.3}, rank=6)
    full = merge_adapters("task_arithmetic", ads, None, rank=12)  # rank(Σ ΔW_i) <= 3 * 4
    ta = merge_adapters("task_arithmetic", ads, None)
    assert isinstance(low, LoraAdapter) and isinstance(full, LoraAdapter) and isinstance(ta, dict)
    for name in ads[0].module_names():
        assert low.modules[name].rank == 6
        u = torch.linalg.svdvals(dense[name])
        err = (low.delta(name) - dense[name]).norm()
        assert err == pytest.approx(float(u[6:].norm()), rel=1e-3, abs=1e-6)  # Eckart-Young optimum
        torch.testing.assert_close(full.delta(name), ta[name], rtol=1e-4, atol=1e-5)
    save_peft_adapter(low, tmp_path / "merged")
    back = load_peft_adapter(tmp_path / "merged")
    for name in ads[0].module_names():
        torch.testing.assert_close(back.delta(name), low.delta(name), rtol=1e-5, atol=1e-6)


def test_incompatible_adapters(lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    (a,) = lora_adapters(1, 4)
    (b,) = lora_adapters(1, 4, shapes={"model.layers.0.self_attn.q_proj": (24, 24)})
    with pytest.raises(IncompatibleAdaptersError, match="other modules"):
        merge_adapters("task_arithmetic", [a, b], None)
    (c,) = lora_adapters(1, 2)
    merge_adapters("task_arithmetic", [a, c], None)  # ranks may differ in delta space
    with pytest.raises(IncompatibleAdaptersError, match="ranks differ"):
        merge_adapter_factors_separately("task_arithmetic", [a, c], None)
    with pytest.raises(MergeParamsError, match="at least one adapter"):
        merge_adapters("ties", [], None)


def test_refactorisation_reports_its_error(lora_adapters: Callable[..., list[LoraAdapter]]) -> None:
    """The error a rank-r merge records is the Eckart-Young tail of the exact merged delta
    (independent oracle: singular values), and 0 (round-off) when the rank suffices."""
    from registry.weights.merge import refactorise

    ads = lora_adapters(3, 4)
    dense = merge_adapters("ties", ads, {"density": 0.3})
    assert isinstance(dense, dict)
    low = refactorise(dense, 4, ads[0])
    tail2 = {n: float(torch.linalg.svdvals(d.double())[4:].square().sum()) for n, d in dense.items()}
    total2 = {n: float(d.double().square().sum()) for n, d in dense.items()}
    for n in dense:
        assert low.module_errors[n] == pytest.approx(math.sqrt(tail2[n] / total2[n]), rel=1e-3)
    assert low.error == pytest.approx(math.sqrt(sum(tail2.values()) / sum(total2.values())), rel=1e-3)
    assert low.error > 0.05
    ta = merge_adapters("task_arithmetic", ads, None)
    assert isinstance(ta, dict)
    assert refactorise(ta, 12, ads[0]).error < 1e-5  # rank(Σ ΔW_i) <= 3 * 4: exact


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so that +0 and -0, and every rounding, count)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_compiled_cpu_path_is_the_torch_path_bit_for_bit(
    dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernels (CPU, n ≤ 4) against the torch ops (what other devices and > 4 inputs
    run): every method, both sign rules, ties at the threshold across chunks, the one-pass threshold
    (bf16/fp16 inputs) and its exact fallback (float32/float64 inputs), λ and weights."""
    base, fts = inputs((53, 41), n=n, seed=n)
    base, fts = base.to(dtype), [f.to(dtype) for f in fts]
    fts[0][:3] = base[:3] + 0.125  # equal magnitudes: ties at the threshold
    if n > 1:
        fts[1][:3] = base[:3] - 0.125
    weights = [0.5 + 0.25 * i for i in range(n)]
    monkeypatch.setattr(merge_module, "_CHUNK", 211)  # several chunks, ties spread across them
    cases = [("task_arithmetic", {"weights": weights, "lam": 0.7}),
             ("ties", {"density": 0.3, "weights": weights}),
             ("ties", {"density": 0.3, "majority_sign": "frequency"}),
             ("ties", {"density": 0.0001}),  # k = 0
             ("dare_linear", {"density": 0.4, "seed": 3}),
             ("dare_ties", {"density": 0.4, "seed": 3, "weights": weights})]
    for method, params in cases:
        got = merge_tensors(method, base, fts, params, name="w")
        with monkeypatch.context() as m:
            m.setattr(merge_module, "_KERNEL_MAX_INPUTS", 0)  # the torch path
            want = merge_tensors(method, base, fts, params, name="w")
        assert torch.equal(_bits(got), _bits(want)), (method, params)


def test_one_pass_threshold_needs_no_second_pass_for_bf16_and_is_exact_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 task vectors: one histogram pass decides the threshold; float32 ones with magnitudes that
    differ only below the top 16 bits: more passes, the same top-k set as a stable sort."""
    from registry.weights import kernels

    calls: list[int] = []
    real = kernels.magnitude_histogram

    def counting(*a: object) -> None:
        calls.append(int(a[3]))  # prefix_shift: 32 = the first pass
        real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "magnitude_histogram", counting)
    base, fts = inputs((4000,), n=3)
    b16, f16 = base.to(torch.bfloat16), [f.to(torch.bfloat16) for f in fts]
    merge_tensors("ties", b16, f16, {"density": 0.2})
    assert set(calls) == {32}  # one pass
    calls.clear()
    x = 1.0 + torch.arange(1000, dtype=torch.float32) * 2.0**-20  # all in one top-16-bit digit
    x = x[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    got = merge_tensors("ties", torch.zeros(1000), [x], {"density": 0.25})
    assert set(calls) == {32, 16}  # the digit does not decide: a second pass, exact
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[torch.sort(-x, stable=True).indices[:250]] = True
    assert torch.equal(got, x * keep)
