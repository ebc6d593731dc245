"""RMM bases: exactness, monotonicity, storage, factored errors, files, budget mode,
the shared-init behaviour, add_member, the delta-space variant and the truncation baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from registry.weights import rmm, rmm_baselines
from registry.weights.adapters import LoraAdapter
from registry.weights.errors import (
    CheckpointFormatError,
    IncompatibleAdaptersError,
    NonFiniteError,
    WeightsError,
)

SMALL = {"l0.q": (12, 10), "l0.up": (12, 20), "l1.down": (20, 12)}


def dense_errors(originals, approx):
    """Relative delta errors computed densely in float64: per member (per-module dict, overall)."""
    out = []
    for ref, app in zip(originals, approx, strict=True):
        num2, den2, mods = 0.0, 0.0, {}
        for name in ref.module_names():
            delta = ref.delta(name, dtype=torch.float64)
            diff = app.delta(name, dtype=torch.float64) - delta
            n2, d2 = float(diff.square().sum()), float(delta.square().sum())
            mods[name] = math.sqrt(n2 / d2)
            num2, den2 = num2 + n2, den2 + d2
        out.append((mods, math.sqrt(num2 / den2)))
    return out


def max_factor_diff(a: LoraAdapter, b: LoraAdapter) -> float:
    return max(
        max(float((a.modules[n].A - b.modules[n].A).abs().max()), float((a.modules[n].B - b.modules[n].B).abs().max()))
        for n in a.module_names()
    )


def factor_residual(a: LoraAdapter, b: LoraAdapter) -> float:
    """Σ over modules and factors of ‖x̂ − x‖_F² (what each position's projection minimises)."""
    return sum(
        float((a.modules[n].A - b.modules[n].A).square().sum() + (a.modules[n].B - b.modules[n].B).square().sum())
        for n in a.module_names()
    )


# --- the method -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "r"), [(5, 4), (3, 6), (7, 3)])  # n ≤ r, n − 1 < r, n > r (r × r Gram)
def test_full_p_reconstructs_every_member(lora_adapters, n, r):
    ads = lora_adapters(n, r, SMALL)
    basis = rmm.fit_basis(ads, p=min(r, n - 1))
    for i, ad in enumerate(ads):
        rec = basis.reconstruct(i)
        assert rec.module_names() == ad.module_names() and rec.dtype == ad.dtype
        assert max_factor_diff(rec, ad) < 1e-6
        assert basis.member_errors()[i].overall < 1e-5


def test_p0_is_the_factor_mean(lora_adapters):
    ads = lora_adapters(4, 3, SMALL)
    rec = rmm.fit_basis(ads, p=0).reconstruct(2)
    for name in SMALL:
        torch.testing.assert_close(rec.modules[name].A, torch.stack([a.modules[name].A for a in ads]).mean(0))
        torch.testing.assert_close(rec.modules[name].B, torch.stack([a.modules[name].B for a in ads]).mean(0))


def test_errors_do_not_increase_with_p(lora_adapters):
    ads = lora_adapters(6, 8, SMALL)
    bases = [rmm.fit_basis(ads, p=p) for p in range(6)]
    for i, ad in enumerate(ads):
        factor = [factor_residual(b.reconstruct(i), ad) for b in bases]
        delta = [b.member_errors()[i].overall for b in bases]
        assert all(x >= y - 1e-7 for x, y in zip(factor, factor[1:], strict=False)), factor
        assert all(x >= y - 1e-7 for x, y in zip(delta, delta[1:], strict=False)), delta
        assert delta[0] > 2 * delta[3] > 0 and delta[-1] < 1e-5


def test_storage_ratio_is_the_stored_fraction(lora_adapters):
    n, r = 5, 6
    ads = lora_adapters(n, r, SMALL)
    total = n * sum(m.rank * (m.in_features + m.out_features) for m in ads[0].modules.values())
    for p in range(n):
        basis = rmm.fit_basis(ads, p=p)
        assert basis.storage_ratio() == pytest.approx((p * (r + n) + r) / (r * n))
        assert basis.storage_ratio() == pytest.approx(rmm.storage_ratio(p, r, n))
        stored = sum(t.numel() for mb in basis.modules.values() for t in mb.tensors().values())
        assert stored / total == pytest.approx(basis.storage_ratio())
        assert basis.byte_ratio() == pytest.approx(basis.storage_ratio())  # float32 basis, float32 sources


def test_factored_errors_equal_the_dense_computation(lora_adapters):
    ads = lora_adapters(5, 4, SMALL, drift=0.8)
    for p in (0, 1, 3):
        basis = rmm.fit_basis(ads, p=p)
        dense = dense_errors(ads, [basis.reconstruct(i) for i in range(len(ads))])
        for err, (mods, overall) in zip(basis.member_errors(), dense, strict=True):
            assert err.overall == pytest.approx(overall, rel=1e-5)
            for name, value in mods.items():
                assert err.modules[name] == pytest.approx(value, rel=1e-5)


def test_fit_is_deterministic(lora_adapters):
    ads = lora_adapters(4, 4, SMALL)
    a, b = rmm.fit_basis(ads, p=2), rmm.fit_basis(ads, p=2)
    for name in SMALL:
        ta, tb = a.modules[name].tensors(), b.modules[name].tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_split_eigh_is_bit_identical(monkeypatch):
    g = torch.randn(700, 6, 7, dtype=torch.float64)
    g = g.mT @ g
    monkeypatch.setattr(rmm, "_MIN_CHUNK", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    w, v = rmm._eigh(g)
    w0, v0 = torch.linalg.eigh(g)
    assert torch.equal(w, w0) and torch.equal(v, v0)


@pytest.mark.parametrize(("n", "r"), [(6, 8), (7, 3), (2, 4)])  # Helmert branch, r × r Gram, n = 2
def test_compiled_cpu_fit_agrees_with_the_torch_path(lora_adapters, n, r):
    """The numba kernel (CPU) against the torch path (torch.linalg.eigh, what other devices run):
    same reconstructions and the same factored member errors, at every p."""
    ads = lora_adapters(n, r, {"m": (40, 30)}, drift=0.6)
    A, B = rmm._stack(ads, "m", torch.device("cpu"))
    fx = rmm._fixed(A, B)
    for k in range(1, min(r, n - 1) + 1):
        got, resid = rmm._fit_module(A, B, k, torch.float32, residuals=True)
        ref, none = rmm._fit_module(A, B, k, torch.float32, residuals=True, compiled=False)
        assert resid is not None and none is None
        for i in range(n):
            for x, y in zip(got.factors(i), ref.factors(i), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=2e-6)
        torch.testing.assert_close(resid[0], A - rmm._all_factors(got)[0])
        torch.testing.assert_close(resid[1], B - rmm._all_factors(got)[1])
        torch.testing.assert_close(rmm._residual_errors(fx, *resid),
                                   rmm._module_errors(fx, *rmm._all_factors(ref)), rtol=1e-4, atol=1e-12)


def test_compiled_cpu_fit_does_not_depend_on_blocks_or_threads(monkeypatch, lora_adapters):
    """Each position is solved on its own: the same bits whatever positions share its block of
    kernels.LANES, wherever a range starts, and however the positions are split across threads."""
    from registry.weights import kernels

    ads = lora_adapters(6, 8, {"m": (300, 450)}, drift=0.6)
    A, B = rmm._stack(ads, "m", torch.device("cpu"))
    X = A.permute(2, 1, 0).contiguous().numpy()
    Q = rmm._helmert(6, torch.float64, torch.device("cpu")).numpy()

    def run(lo: int, hi: int) -> list:
        P = X.shape[0]
        out = [np.zeros((P, 8), np.float32), np.zeros((P, 8, 4), np.float32), np.zeros((P, 4, 6), np.float32),
               np.zeros((P, 8, 6), np.float32)]
        assert kernels.rmm_positions(X, Q, 4, rmm.EIG_RTOL, *out, lo, hi) == 0
        return [o[lo:hi] for o in out]

    whole = run(0, 300)
    for lo, hi in [(5, 200), (131, 300), (299, 300)]:
        part = run(lo, hi)
        assert all(np.array_equal(a[lo:hi], b) for a, b in zip(whole, part, strict=True))
    one = rmm.fit_basis(ads, p=4)
    monkeypatch.setattr(rmm, "_MIN_CHUNK", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    three = rmm.fit_basis(ads, p=4)
    ta, tb = one.modules["m"].tensors(), three.modules["m"].tensors()
    assert all(torch.equal(ta[x], tb[x]) for x in ta)
    assert one.member_errors() == three.member_errors()


def test_compiled_cpu_fit_refuses_non_finite_factors(lora_adapters):
    ads = lora_adapters(4, 4, {"m": (300, 20)})
    ads[2].modules["m"].A[1, 250] = float("nan")
    with pytest.raises(NonFiniteError, match="adapter 2: m.lora_A"):
        rmm.fit_basis(ads, p=2)


@pytest.mark.parametrize("config", [True, False])  # the member's PEFT config (scale unfolded) or none
def test_member_files_are_the_saved_reconstruction(tmp_path, lora_adapters, config):
    from registry.weights.adapters import CONFIG_NAME, WEIGHTS_NAME, save_peft_adapter
    from registry.weights.checkpoint import safetensors_range

    ads = lora_adapters(4, 3, SMALL, dtype=torch.float16)
    if config:
        cfg = {"peft_type": "LORA", "r": 3, "lora_alpha": 12, "target_modules": ["q", "up", "down"]}
        ads = [LoraAdapter.from_factors(a.modules, config=cfg, dtype=a.dtype) for a in ads]
    basis = rmm.fit_basis(ads, p=2)
    for i in (0, 3):
        save_peft_adapter(basis.reconstruct(i), tmp_path / f"m{i}")
        files = basis.member_files(i)
        lay = files.layout
        assert files.config == (tmp_path / f"m{i}" / CONFIG_NAME).read_bytes()
        want = (tmp_path / f"m{i}" / WEIGHTS_NAME).read_bytes()
        assert b"".join(safetensors_range(lay, 0, lay.total_size, files.read, 1000)) == want
        assert b"".join(safetensors_range(lay, 77, 5000, files.read)) == want[77:5000]  # any range
        assert files.files == {CONFIG_NAME: len(files.config), WEIGHTS_NAME: len(want)}
        rmm.save_basis(basis, tmp_path / "b.safetensors")
        lazy = rmm.load_member_files(tmp_path / "b.safetensors", basis.members[i])  # from the file
        assert lazy.config == files.config
        assert b"".join(safetensors_range(lay, 0, lay.total_size, lazy.read)) == want


def test_shared_initialisation_reconstructs_better_than_independent(lora_adapters):
    shared = rmm.fit_basis(lora_adapters(6, 8, SMALL, shared_init=True, seed=3), p=2)
    independent = rmm.fit_basis(lora_adapters(6, 8, SMALL, shared_init=False, seed=3), p=2)
    worst_shared = max(e.overall for e in shared.member_errors())
    best_independent = min(e.overall for e in independent.member_errors())
    assert worst_shared < 0.5 * best_independent


def test_modules_may_have_different_ranks(lora_adapters):
    a = lora_adapters(4, 5, {"x.q": (6, 7)})
    b = lora_adapters(4, 2, {"x.v": (6, 5)}, seed=1)
    ads = [LoraAdapter.from_factors({**x.modules, **y.modules}) for x, y in zip(a, b, strict=True)]
    basis = rmm.fit_basis(ads, p=2)
    assert basis.ranks == {"x.q": 5, "x.v": 2} and basis.r == 5
    assert max(e.modules["x.v"] for e in basis.member_errors()) < 1e-5  # p = 2 = min(r, n − 1) for x.v only
    assert min(e.modules["x.q"] for e in basis.member_errors()) > 1e-3
    with pytest.raises(WeightsError, match=r"0\.\.2"):
        rmm.fit_basis(ads, p=3)
    budget = rmm.fit_basis(ads, max_error=1e-4)
    assert budget.p == {"x.q": 3, "x.v": 2}


# --- error budget -----------------------------------------------------------------------------------


def test_error_budget_picks_the_smallest_p_per_module(lora_adapters):
    easy = lora_adapters(6, 6, {"easy": (10, 10)}, drift=0.02)
    hard = lora_adapters(6, 6, {"hard": (10, 10)}, drift=2.0, seed=1)
    ads = [LoraAdapter.from_factors({**e.modules, **h.modules}) for e, h in zip(easy, hard, strict=True)]
    budget = 0.15
    basis = rmm.fit_basis(ads, max_error=budget)
    assert basis.p["easy"] < basis.p["hard"]
    for name, p in basis.p.items():
        assert max(e.modules[name] for e in basis.member_errors()) <= budget
        if p > 0:
            below = rmm.fit_basis(ads, p=p - 1)
            assert max(e.modules[name] for e in below.member_errors()) > budget
    exact = rmm.fit_basis(ads, max_error=0.0)  # unreachable below round-off: the full p
    assert set(exact.p.values()) == {5}


# --- files --------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, lora_adapters):
    ads = lora_adapters(4, 4, SMALL, dtype=torch.float16)
    basis = rmm.fit_basis(ads, p=2, names=["sql", "chat", "code", "math"])
    rmm.save_basis(basis, tmp_path / "b.safetensors")
    rmm.save_basis(basis, tmp_path / "again.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    loaded = rmm.load_basis(tmp_path / "b.safetensors")
    assert loaded.members == basis.members and loaded.p == basis.p and (loaded.r, loaded.n) == (4, 4)
    assert loaded.dtypes == [torch.float16] * 4 and loaded.storage_dtype == torch.float32
    assert loaded.member_errors() == basis.member_errors()
    assert loaded.configs == basis.configs and loaded.storage_ratio() == basis.storage_ratio()
    for member in basis.members:
        x, y = basis.reconstruct(member), loaded.reconstruct(member)
        for name in SMALL:
            assert torch.equal(x.modules[name].A, y.modules[name].A)
            assert torch.equal(x.modules[name].B, y.modules[name].B)
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert fh.get_tensor("l0.up.lora_B.U").shape == (2, 20, 4)
        assert fh.get_tensor("l0.up.lora_A.C").shape == (4, 2, 12)
    assert meta["method"] == "rmm" and meta["format_version"] == "1" and meta["storage_dtype"] == "float32"
    assert json.loads(meta["members"]) == ["sql", "chat", "code", "math"]
    assert json.loads(meta["p"]) == {"l0.q": 2, "l0.up": 2, "l1.down": 2}
    assert json.loads(meta["dtypes"]) == ["float16"] * 4
    errors = json.loads(meta["errors"])
    assert errors[1]["name"] == "chat" and errors[1]["overall"] == basis.member_errors()[1].overall


def test_load_basis_rejects_malformed_files(tmp_path, lora_adapters):
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        rmm.load_basis(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointFormatError, match="unreadable safetensors"):
        rmm.load_basis(tmp_path / "junk")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"plain.safetensors: not an RMM basis file \(format='pt'\)"):
        rmm.load_basis(tmp_path / "plain.safetensors")
    basis = rmm.fit_basis(lora_adapters(3, 2, SMALL), p=1)
    rmm.save_basis(basis, tmp_path / "b.safetensors")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointFormatError, match="unreadable"):
        rmm.load_basis(tmp_path / "cut.safetensors")
    tensors = {}
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in list(fh.keys()) if not k.startswith("l0.q.")}
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(CheckpointFormatError, match="do not match the modules"):
        rmm.load_basis(tmp_path / "partial.safetensors")
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata=meta | {"members": "[1, "})
    with pytest.raises(CheckpointFormatError, match="malformed basis metadata"):
        rmm.load_basis(tmp_path / "meta.safetensors")


# --- validation ---------------------------------------------------------------------------------------


def test_incompatible_adapters_are_refused(lora_adapters):
    ads = lora_adapters(3, 4, SMALL)
    with pytest.raises(IncompatibleAdaptersError, match="at least 2"):
        rmm.fit_basis(ads[:1], p=0)
    fewer = LoraAdapter.from_factors({k: v for k, v in ads[2].modules.items() if k != "l0.up"})
    with pytest.raises(IncompatibleAdaptersError, match=r"adapter 2 lacks modules \['l0.up'\]"):
        rmm.fit_basis([*ads[:2], fewer], p=1)
    other_rank = lora_adapters(1, 3, SMALL)[0]
    with pytest.raises(IncompatibleAdaptersError, match=r"rank r of every module.*l0\.q \(\[3, 4\]\)"):
        rmm.fit_basis([*ads[:2], other_rank], p=1)
    other_shape = lora_adapters(1, 4, {**SMALL, "l0.q": (12, 11)})[0]
    with pytest.raises(IncompatibleAdaptersError, match=r"not of one base: adapter 2 has other shapes for l0\.q"):
        rmm.fit_basis([*ads[:2], other_shape], p=1)
    transposed = LoraAdapter.from_factors(ads[2].modules, fan_in_fan_out=True)
    with pytest.raises(IncompatibleAdaptersError, match="fan_in_fan_out"):
        rmm.fit_basis([*ads[:2], transposed], p=1)
    bad = lora_adapters(1, 4, SMALL)[0]
    bad.modules["l1.down"].B[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"adapter 2: l1\.down\.lora_B"):
        rmm.fit_basis([*ads[:2], bad], p=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of p or max_error"),
        ({"p": 1, "max_error": 0.1}, "exactly one of p or max_error"),
        ({"p": 3}, r"0\.\.2"),  # n = 3 adapters: p ≤ n − 1 = 2 (refused, not clamped)
        ({"p": -1}, r"0\.\.2"),
        ({"p": True}, "integer"),
        ({"max_error": -0.1}, "max_error"),
        ({"max_error": float("nan")}, "max_error"),
        ({"p": 1, "names": ["a", "a", "b"]}, "distinct"),
        ({"p": 1, "storage_dtype": torch.int8}, "storage_dtype"),
    ],
)
def test_bad_parameters(lora_adapters, kwargs, message):
    with pytest.raises(WeightsError, match=message):
        rmm.fit_basis(lora_adapters(3, 4, SMALL), **kwargs)


def test_device_argument(lora_adapters, monkeypatch):
    """The library reads no settings: ``device=None`` is ``auto`` whatever REGISTRY_DEVICE says
    (the service passes its setting explicitly)."""
    ads = lora_adapters(3, 2, SMALL)
    a = rmm.fit_basis(ads, p=1, device="cpu" if not torch.cuda.is_available() else "cuda")
    monkeypatch.setenv("REGISTRY_DEVICE", "tpu")
    b = rmm.fit_basis(ads, p=1)
    assert torch.equal(a.modules["l0.q"].U_A, b.modules["l0.q"].U_A)
    with pytest.raises(WeightsError, match="unknown device"):
        rmm.fit_basis(ads, p=1, device="tpu")


def test_float16_storage_halves_the_bytes(lora_adapters):
    ads = lora_adapters(4, 4, SMALL)
    f32 = rmm.fit_basis(ads, p=3)
    f16 = rmm.fit_basis(ads, p=3, storage_dtype=torch.float16)
    assert f16.byte_ratio() == pytest.approx(f32.byte_ratio() / 2)
    assert f16.storage_ratio() == f32.storage_ratio()
    assert 1e-6 < max(e.overall for e in f16.member_errors()) < 1e-2
    dense = dense_errors(ads, [f16.reconstruct(i) for i in range(4)])
    assert f16.member_errors()[0].overall == pytest.approx(dense[0][1], rel=1e-3)


# --- beyond the paper ---------------------------------------------------------------------------------


def test_add_member_projects_without_refitting(lora_adapters):
    ads = lora_adapters(5, 6, SMALL)
    base = rmm.fit_basis(ads[:4], p=3)
    grown = rmm.add_member(base, ads[4], name="new")
    assert grown.members == ["m0", "m1", "m2", "m3", "new"] and grown.n_fit == 4
    assert grown.storage_ratio() == pytest.approx(rmm.storage_ratio(3, 6, 5))
    for i in range(4):  # old members untouched, bit for bit
        x, y = base.reconstruct(i), grown.reconstruct(i)
        assert all(torch.equal(x.modules[n].A, y.modules[n].A) for n in SMALL)
    err = grown.member_errors()[-1]
    (mods, overall), = dense_errors([ads[4]], [grown.reconstruct("new")])
    assert err.overall == pytest.approx(overall, rel=1e-5)
    copy_of_member = rmm.add_member(base, ads[1])  # in the span of the fitted members: exact
    assert copy_of_member.member_errors()[-1].overall < 1e-5
    with pytest.raises(WeightsError, match="already has a member"):
        rmm.add_member(base, ads[4], name="m0")
    with pytest.raises(IncompatibleAdaptersError, match="rank/shapes"):
        rmm.add_member(base, lora_adapters(1, 5, SMALL)[0])


def _regauge(ad: LoraAdapter, seed: int) -> LoraAdapter:
    """Same deltas, different factors: (B R, R⁻¹ A) with a random invertible R per module."""
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for name, m in ad.modules.items():
        R = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=gen, dtype=torch.float64))[0]
        R = R @ torch.diag(torch.rand(m.rank, generator=gen, dtype=torch.float64) + 0.5)
        mods[name] = ((torch.linalg.inv(R) @ m.A.double()).float(), (m.B.double() @ R).float())
    return LoraAdapter.from_factors(mods)


def test_delta_basis_is_gauge_invariant_and_exact_at_full_k(lora_adapters):
    ads = lora_adapters(4, 3, SMALL)
    full = rmm_baselines.fit_delta_basis(ads, k=12)
    assert max(e.overall for e in full.member_errors()) < 1e-6
    assert max_factor_diff(rmm_baselines.truncate_adapter(ads[0], 3), ads[0]) == 0.0
    for i, ad in enumerate(ads):
        assert rmm_baselines.adapter_error(ad, full.reconstruct(i)).overall < 1e-5
    regauged = [_regauge(a, s) for s, a in enumerate(ads)]
    d1, d2 = rmm_baselines.fit_delta_basis(ads, k=5), rmm_baselines.fit_delta_basis(regauged, k=5)
    for e1, e2 in zip(d1.member_errors(), d2.member_errors(), strict=True):
        assert e1.overall == pytest.approx(e2.overall, rel=1e-4)
    r1, r2 = rmm.fit_basis(ads, p=1), rmm.fit_basis(regauged, p=1)
    assert r1.member_errors()[0].overall != pytest.approx(r2.member_errors()[0].overall, rel=1e-2)
    dense = dense_errors(ads, [d1.reconstruct(i) for i in range(4)])
    for err, (_, overall) in zip(d1.member_errors(), dense, strict=True):
        assert err.overall == pytest.approx(overall, rel=1e-4)
    assert d1.storage_ratio() == pytest.approx(
        sum(5 * (d + m) + 4 * 25 for d, m in SMALL.values()) / sum(4 * 3 * (d + m) for d, m in SMALL.values())
    )
    budget = rmm_baselines.fit_delta_basis(ads, max_error=0.2)
    for name, k in budget.k.items():
        assert max(e.modules[name] for e in budget.member_errors()) <= 0.2
        if k:
            assert max(e.modules[name] for e in rmm_baselines.fit_delta_basis(ads, k=k - 1).member_errors()) > 0.2


def test_truncate_adapter_is_the_best_rank_k_approximation(lora_adapters):
    ad = lora_adapters(1, 5, SMALL, dtype=torch.float16)[0]
    for k in (0, 2, 4):
        cut = rmm_baselines.truncate_adapter(ad, k)
        assert cut.dtype == torch.float16 and all(m.rank == k for m in cut.modules.values())
        err = rmm_baselines.adapter_error(ad, cut)
        for name in SMALL:
            s = torch.linalg.svdvals(ad.delta(name, dtype=torch.float64))
            assert err.modules[name] == pytest.approx(float(s[k:].norm() / s.norm()), rel=1e-5, abs=1e-7)
    assert rmm_baselines.truncate_adapter(ad, 9).modules["l0.q"].rank == 5
    with pytest.raises(WeightsError, match="non-negative"):
        rmm_baselines.truncate_adapter(ad, -1)
