"""registry.weights.compress: the compression planner (budgets, exactness, byte-stable reconstructions,
plan files, PEFT round trips, refusals) and its codec (rANS, bit packing)."""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from registry.weights import codec, compress, rmm, rmm_baselines
from registry.weights.adapters import WEIGHTS_NAME, LoraAdapter, load_peft_adapter, save_peft_adapter
from registry.weights.errors import (
    CheckpointFormatError,
    CompressionParamsError,
    IncompatibleAdaptersError,
    NonFiniteError,
    WeightsError,
)

SHAPES: dict[str, tuple[int, int]] = {  # module -> (in_features, out_features)
    "model.layers.0.self_attn.q_proj": (24, 24),
    "model.layers.0.self_attn.v_proj": (24, 12),
    "model.layers.0.mlp.up_proj": (24, 40),
    "model.layers.1.mlp.down_proj": (40, 24),
}


def make_lora_adapters(n: int, r: int, shapes: dict[str, tuple[int, int]] | None = None, *, shared_init: bool = True,
                       drift: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[LoraAdapter]:
    """n adapters A = A_0 + drift·N, B = B_0 + drift·N from one start (A_0, B_0), or each from its own."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
    for name, (d, m) in (shapes or SHAPES).items():
        for i in range(n):
            if not shared_init or i == 0:
                a0, b0 = torch.randn(r, d, generator=gen) / d**0.5, torch.randn(m, r, generator=gen) * 0.1
            a = a0 + drift * torch.randn(r, d, generator=gen) / d**0.5
            b = b0 + drift * 0.1 * torch.randn(m, r, generator=gen)
            out[i][name] = (a.to(dtype), b.to(dtype))
    return [LoraAdapter.from_factors(mods, dtype=dtype) for mods in out]

BUDGETS = (0.02, 0.1, 0.3)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> str:
    return sha(folder / WEIGHTS_NAME) + sha(folder / "adapter_config.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def independent() -> list[LoraAdapter]:
    return make_lora_adapters(4, 4, shared_init=False, seed=3)


@pytest.fixture(scope="module")
def aligned() -> list[LoraAdapter]:
    """Adapters that barely drift from one shared start: an RMM basis holds them cheaply."""
    return make_lora_adapters(5, 4, drift=0.02, seed=4)


@pytest.fixture(scope="module")
def plans(independent) -> dict[float, compress.CompressionPlan]:
    return {b: compress.plan(independent, b, names=[f"task{i}" for i in range(len(independent))])
            for b in (0.0, 0.01, *BUDGETS, 0.6)}


# ---------------------------------------------------------------------------------------------
# budgets


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_member_is_within_its_budget(plans, independent, budget):
    p = plans[budget]
    for i, (mp, ad) in enumerate(zip(p.members, independent, strict=True)):
        err = rmm_baselines.adapter_error(ad, p.reconstruct(i)).overall
        assert err <= budget
        assert err == pytest.approx(mp.error, rel=1e-9, abs=1e-12)
        assert mp.method in ("exact", "quantize", "truncate", "truncate+quantize", "rmm")
    assert p.stored_bytes() < p.original_bytes()


def test_budget_zero_keeps_every_member_exact(plans, independent, tmp_path):
    p = plans[0.0]
    assert {m.method for m in p.members} == {"exact"}
    for i, ad in enumerate(independent):
        rec = p.reconstruct(i)
        assert rec.config == ad.config and rec.dtype == ad.dtype
        for name, mod in ad.modules.items():
            assert torch.equal(rec.modules[name].A, mod.A) and torch.equal(rec.modules[name].B, mod.B)
        save_peft_adapter(ad, tmp_path / f"orig{i}")
        save_peft_adapter(rec, tmp_path / f"rec{i}")
        assert folder_digest(tmp_path / f"orig{i}") == folder_digest(tmp_path / f"rec{i}")
        assert p.members[i].error == 0.0


def test_larger_budgets_store_fewer_bytes(plans, independent):
    totals = [plans[b].stored_bytes() for b in sorted(plans)]
    assert totals == sorted(totals, reverse=True)
    assert totals[-1] < totals[0] / 4
    for methods in (("quantize",), ("truncate",)):  # each method alone, too
        alone = [compress.plan(independent, b, methods=methods).stored_bytes() for b in (0.05, 0.1, 0.3, 0.6)]
        assert alone == sorted(alone, reverse=True)
        assert alone[-1] < alone[0]
        if methods == ("quantize",):  # every larger budget saves bytes (no member stays exact)
            assert len(set(alone)) == len(alone), alone


def test_methods_restrict_the_representation(independent):
    trunc = compress.plan(independent, 0.3, methods=("truncate",))
    quant = compress.plan(independent, 0.1, methods=["quantize"])
    for i, ad in enumerate(independent):
        assert trunc.members[i].method in ("truncate", "exact")
        assert quant.members[i].method == "quantize"  # a budget of 0.1 holds every member quantized
        rec = quant.reconstruct(i)
        assert all(rec.modules[n].rank == m.rank for n, m in ad.modules.items())  # quantization keeps ranks
        assert rmm_baselines.adapter_error(ad, trunc.reconstruct(i)).overall <= 0.3
    assert trunc.stored_bytes() < trunc.original_bytes()
    assert quant.stored_bytes() < quant.original_bytes() / 2
    # truncation alone stores each kept component in the source dtype: the same numbers truncate_adapter keeps
    kept = sum(trunc.reconstruct(i).modules[n].rank for i in range(len(independent)) for n in independent[0].modules)
    assert kept < len(independent) * len(independent[0].modules) * independent[0].rank


def test_truncation_matches_truncate_adapter(independent):
    """Truncation-only plans keep the leading SVD components, as rmm_baselines.truncate_adapter does."""
    p = compress.plan(independent[:1], 0.3, methods=("truncate",))
    rec = p.reconstruct(0)
    for name, mod in rec.modules.items():
        one = LoraAdapter.from_factors({name: (independent[0].modules[name].A, independent[0].modules[name].B)})
        ref = rmm_baselines.truncate_adapter(one, mod.rank)
        torch.testing.assert_close(rec.delta(name), ref.delta(name), rtol=1e-5, atol=1e-6)


def test_rmm_membership_when_it_is_cheaper(aligned, tmp_path):
    p = compress.plan(aligned, 0.05)
    assert {m.method for m in p.members} == {"rmm"}
    assert len(p.bases) == 1
    alone = compress.plan(aligned, 0.05, methods=("quantize", "truncate"))
    assert p.stored_bytes() < alone.stored_bytes()
    # the basis is counted once, split over its members; every member's bytes add up to the total
    shares = [m.stored_bytes - len(b) for m, b in zip(p.members, p.blobs, strict=True)]
    layout = compress._split(len(p.layout_bytes()), len(p.members))
    assert sum(s - lay for s, lay in zip(shares, layout, strict=True)) == len(p.bases[0])
    for i, ad in enumerate(aligned):
        assert rmm_baselines.adapter_error(ad, p.reconstruct(i)).overall <= 0.05
    compress.save_plan(p, tmp_path / "plan.safetensors")
    back = compress.load_plan(tmp_path / "plan.safetensors")
    for i in range(len(aligned)):
        a, b = p.reconstruct(i), back.reconstruct(i)
        assert all(torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
                   for n in a.modules)


def test_nothing_fits_means_exact():
    ad = make_lora_adapters(2, 3, seed=9)
    p = compress.plan(ad, 1e-12, methods=("truncate",))
    assert {m.method for m in p.members} == {"exact"}


# ---------------------------------------------------------------------------------------------
# bytes


def test_stored_and_original_bytes_are_what_is_written(plans, independent, tmp_path):
    p = plans[0.1]
    layout = compress._split(len(p.layout_bytes()), len(p.members))
    for i, (mp, ad) in enumerate(zip(p.members, independent, strict=True)):
        assert mp.stored_bytes == len(p.blobs[i]) + layout[i]
        save_peft_adapter(ad, tmp_path / f"a{i}")
        assert mp.original_bytes == (tmp_path / f"a{i}" / WEIGHTS_NAME).stat().st_size
    assert p.stored_bytes() == sum(m.stored_bytes for m in p.members)
    compress.save_plan(p, tmp_path / "plan.safetensors")
    # the file holds the blobs plus descriptive metadata (names, configs) that is not counted
    assert (tmp_path / "plan.safetensors").stat().st_size > sum(map(len, p.blobs))


# ---------------------------------------------------------------------------------------------
# determinism and files


def test_plans_and_reconstructions_are_byte_stable(independent, plans, tmp_path):
    again = compress.plan(independent, 0.1, names=[f"task{i}" for i in range(len(independent))])
    compress.save_plan(plans[0.1], tmp_path / "one.safetensors")
    compress.save_plan(again, tmp_path / "two.safetensors")
    assert sha(tmp_path / "one.safetensors") == sha(tmp_path / "two.safetensors")
    for i in range(len(independent)):
        save_peft_adapter(plans[0.1].reconstruct(i), tmp_path / f"x{i}")
        save_peft_adapter(again.reconstruct(f"task{i}"), tmp_path / f"y{i}")
        assert folder_digest(tmp_path / f"x{i}") == folder_digest(tmp_path / f"y{i}")


def test_save_load_round_trip(plans, independent, tmp_path):
    p = plans[0.1]
    compress.save_plan(p, tmp_path / "plan.safetensors")
    back = compress.load_plan(tmp_path / "plan.safetensors")
    assert back.members == p.members
    assert back.stored_bytes() == p.stored_bytes() and back.original_bytes() == p.original_bytes()
    assert back.layout == p.layout and back.max_error == p.max_error and back.methods == p.methods
    for i in range(len(independent)):
        save_peft_adapter(p.reconstruct(i), tmp_path / f"a{i}")
        save_peft_adapter(back.reconstruct(i), tmp_path / f"b{i}")
        assert folder_digest(tmp_path / f"a{i}") == folder_digest(tmp_path / f"b{i}")
    compress.save_plan(back, tmp_path / "again.safetensors")
    assert sha(tmp_path / "again.safetensors") == sha(tmp_path / "plan.safetensors")


def test_saved_reconstruction_loads_back_with_the_measured_error(plans, independent, tmp_path):
    p = plans[0.1]
    for i, ad in enumerate(independent):
        rec = p.reconstruct(i)
        save_peft_adapter(rec, tmp_path / f"r{i}")
        loaded = load_peft_adapter(tmp_path / f"r{i}")
        for n in rec.modules:
            assert torch.equal(loaded.modules[n].A, rec.modules[n].A)
            assert torch.equal(loaded.modules[n].B, rec.modules[n].B)
        assert rmm_baselines.adapter_error(ad, loaded).overall == pytest.approx(p.members[i].error, rel=1e-9, abs=1e-12)


def test_half_precision_sources(tmp_path):
    ads = make_lora_adapters(3, 4, shared_init=False, seed=5, dtype=torch.float16)
    for budget in (0.0, 0.05):
        p = compress.plan(ads, budget)
        for i, ad in enumerate(ads):
            rec = p.reconstruct(i)
            assert rec.dtype == torch.float16
            save_peft_adapter(rec, tmp_path / f"h{budget}-{i}")
            loaded = load_peft_adapter(tmp_path / f"h{budget}-{i}")
            assert rmm_baselines.adapter_error(ad, loaded).overall <= budget
        if budget == 0.0:  # float16 factors are stored as float16: exact members cost the raw bytes
            assert p.stored_bytes() < p.original_bytes()


def test_load_plan_refuses_malformed_files(tmp_path, plans):
    with pytest.raises(CheckpointFormatError, match="missing or not a file"):
        compress.load_plan(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointFormatError):
        compress.load_plan(bad)
    basis = rmm.fit_basis(make_lora_adapters(3, 2), p=1)
    rmm.save_basis(basis, tmp_path / "basis.safetensors")
    with pytest.raises(CheckpointFormatError, match="not a compression plan"):
        compress.load_plan(tmp_path / "basis.safetensors")
    p = copy.copy(plans[0.1])
    p.blobs = [b[:-3] for b in p.blobs]  # truncated blobs fail loudly on decoding
    with pytest.raises(CheckpointFormatError):
        p.reconstruct(1)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("budget", [-0.1, float("nan"), float("inf"), 1.0, 5, "0.1", None, True, [0.1]])
def test_bad_budgets_are_refused(independent, budget):
    with pytest.raises(CompressionParamsError, match="max_error"):
        compress.plan(independent, budget)
    assert issubclass(CompressionParamsError, WeightsError) and issubclass(CompressionParamsError, ValueError)


@pytest.mark.parametrize("methods", [("zip",), (), "quantize", ("quantize", 3)])
def test_bad_methods_are_refused(independent, methods):
    with pytest.raises(CompressionParamsError, match="method"):
        compress.plan(independent, 0.1, methods=methods)


def test_bad_names_and_inputs_are_refused(independent):
    with pytest.raises(CompressionParamsError, match="names"):
        compress.plan(independent, 0.1, names=["a", "a", "b", "c"])
    with pytest.raises(CompressionParamsError):
        compress.plan([], 0.1)
    with pytest.raises(CompressionParamsError):
        compress.plan(["not an adapter"], 0.1)  # type: ignore[list-item]


def test_mixed_bases_are_refused(independent):
    other_modules = make_lora_adapters(1, 4, shapes={"model.layers.0.self_attn.q_proj": (24, 24)})[0]
    with pytest.raises(IncompatibleAdaptersError, match="not of one base"):
        compress.plan([independent[0], other_modules], 0.1)
    shapes = {name: (d + 1, m) for name, (d, m) in SHAPES.items()}
    other_shapes = make_lora_adapters(1, 4, shapes=shapes)[0]
    with pytest.raises(IncompatibleAdaptersError, match="other shapes"):
        compress.plan([independent[0], other_shapes], 0.1)
    nan = copy.deepcopy(independent[1])
    name = nan.module_names()[0]
    nan.modules[name].A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        compress.plan([independent[0], nan], 0.1)


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_every_module_keeps_its_share_of_the_budget(budget):
    """A module whose delta is 20x smaller than the others is not spent as free error (a joint
    allocation over the member's absolute error drops it entirely: relative error 1.0): every
    module's own relative error, recomputed from the reconstruction, stays near the budget."""
    small = "model.layers.0.self_attn.v_proj"
    adapters = [LoraAdapter.from_factors({n: (m.A, m.B * 0.05) if n == small else (m.A, m.B)
                                          for n, m in a.modules.items()})
                for a in make_lora_adapters(3, 4, shared_init=False, seed=5)]
    pl = compress.plan(adapters, budget)
    for i, a in enumerate(adapters):
        err = rmm_baselines.adapter_error(a, pl.reconstruct(i))
        assert err.overall <= budget
        assert err.max_module <= 1.25 * budget, err
        assert pl.members[i].parameters["modules"][small]["rank"] >= 1


def test_one_base_is_one_rule_with_rmm(independent):
    """compress and rmm refuse the same mixed collections with the same message (one rule,
    rmm.check_same_base); only rmm also needs equal ranks."""
    fewer = LoraAdapter.from_factors({k: v for k, v in independent[1].modules.items()
                                      if k != "model.layers.0.mlp.up_proj"})
    transposed = LoraAdapter.from_factors(independent[1].modules, fan_in_fan_out=True)
    for odd in (fewer, transposed):
        with pytest.raises(IncompatibleAdaptersError) as by_plan:
            compress.plan([independent[0], odd], 0.1)
        with pytest.raises(IncompatibleAdaptersError) as by_rmm:
            rmm.fit_basis([independent[0], odd], p=1)
        assert str(by_plan.value) == str(by_rmm.value)
        assert "not of one base: adapter 1" in str(by_plan.value)
    other_rank = make_lora_adapters(1, 3, shared_init=False, seed=9)[0]
    with pytest.raises(IncompatibleAdaptersError, match="rank r of every module"):
        rmm.fit_basis([independent[0], other_rank], p=1)
    mixed = compress.plan([independent[0], other_rank], 0.1)  # ranks may differ in a plan
    assert all(m.error <= 0.1 for m in mixed.members)


def test_unknown_member_is_refused(plans):
    with pytest.raises(WeightsError, match="no member"):
        plans[0.1].reconstruct("nobody")
    with pytest.raises(WeightsError, match="out of range"):
        plans[0.1].reconstruct(99)


# ---------------------------------------------------------------------------------------------
# PEFT


peft = pytest.importorskip("peft")

D = 12


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.up_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.down_proj = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


def test_peft_loads_every_reconstruction(tmp_path):
    torch.manual_seed(0)
    base = Tiny().eval()
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                              rank_pattern={"up_proj": 3})
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(prm, std=0.2)  # a trained-looking adapter (PEFT starts B at zero)
        model.save_pretrained(str(tmp_path / f"ad{seed}"))
        folders.append(tmp_path / f"ad{seed}")
    adapters = [load_peft_adapter(f) for f in folders]
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    for budget in (0.0, 0.05, 0.3):
        p = compress.plan(adapters, budget)
        for i, ad in enumerate(adapters):
            rec = p.reconstruct(i)
            out = tmp_path / f"rec-{budget}-{i}"
            save_peft_adapter(rec, out)
            fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
            with torch.no_grad():
                got = fresh(x)
                params = {f"{n}.weight": getattr(base, n).weight + rec.weight_delta(n) for n in rec.modules}
                want = torch.func.functional_call(base, params, (x,))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert rmm_baselines.adapter_error(ad, load_peft_adapter(out)).overall <= budget + 1e-7


# ---------------------------------------------------------------------------------------------
# codec


def test_rans_round_trip_and_size():
    gen = torch.Generator().manual_seed(0)
    enc = codec.RansEncoder()
    rows, ideal = [], 0.0
    for q in (-24, -12, -4, 0, 6):
        for length in (1, 7, 130):
            K = codec.alphabet(length, q)
            x = torch.randn(length, generator=gen) * 3
            c = torch.round(x / (codec.ratio(q) * float(x.square().mean().sqrt()))).clamp(-K, K).to(torch.int64)
            rows.append((c.tolist(), q, K))
            enc.push(c.tolist(), q, K)
            ideal += float(codec.code_lengths(c, q, K).sum()) / 8
    stream = enc.finish()
    assert len(stream) <= math.ceil(ideal) + 6
    dec = codec.RansDecoder(stream)
    for c, q, K in rows:
        assert dec.read(len(c), q, K) == c
    assert dec.done()
    assert codec.RansEncoder().finish() == b"" and codec.RansDecoder(b"").done()


def test_laplace_tables_sum_to_the_total():
    for q in (-32, -8, 0, 6):
        cums, freqs = codec.laplace_table(q, codec.alphabet(100, q))
        assert sum(freqs) == 1 << codec.PROB_BITS and min(freqs) >= 1
        assert cums[0] == 0 and all(b - a == f for a, b, f in zip(cums, cums[1:], freqs, strict=False))
        mid = len(freqs) // 2
        assert freqs[mid] == max(freqs) and freqs[mid - 1] == freqs[mid + 1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 13])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = codec.pack_bits(codes, bits)
    assert len(packed) == (37 * bits + 7) // 8
    assert torch.equal(codec.unpack_bits(packed, bits, 37), codes)


def test_steps_are_an_exact_grid():
    assert codec.step_value(192) == 1.0 and codec.step_value(200) == 2.0
    for e in (1, 100, 191, 250):
        assert codec.step_exponent(codec.step_value(e)) == e
    assert codec.step_exponent(0.0) == 0 and codec.step_exponent(float("nan")) == 0
