"""Baselines the RMM basis is measured against (:mod:`registry.weights.rmm`), and the error
they are measured with; none of it is used by the registry itself, only by the benchmarks and tests.

* :func:`adapter_error`: relative delta error ‖B̂Â − BA‖_F / ‖BA‖_F of any adapter against a
  reference, per module and overall, from factors only (ranks may differ);
* :func:`truncate_adapter`: the per-adapter baseline at equal storage: each delta truncated to its
  best rank-k approximation (k/r of one adapter);
* :func:`fit_delta_basis` (method ``rmm_delta``): a delta-space variant of the basis, invariant to
  the factor gauge (LoraAdapter factors are defined only up to an invertible r × r mixing, which
  the position-wise RMM basis is not).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import LoraAdapter, LoraModule
from .device import resolve_device
from .errors import IncompatibleAdaptersError, WeightsError
from .rmm import EIG_RTOL, MemberError, check_adapters, check_finite, member_error, member_names

__all__ = [
    "DELTA_METHOD",
    "DeltaBasis",
    "DeltaModuleBasis",
    "adapter_error",
    "fit_delta_basis",
    "truncate_adapter",
]

DELTA_METHOD = "rmm_delta"
_F32, _F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------------------------------
# Baselines and the generic error


def _gram_error(
    A: torch.Tensor, B: torch.Tensor, Ah: torch.Tensor, Bh: torch.Tensor
) -> tuple[float, float]:
    """(‖B̂Â − BA‖², ‖BA‖²) for factors of any ranks, in float64:
    ‖B̂Â‖² − 2⟨B̂Â, BA⟩ + ‖BA‖² = tr(B̂ᵀB̂ ÂÂᵀ) − 2 tr(B̂ᵀB AÂᵀ) + tr(BᵀB AAᵀ)."""
    A, B, Ah, Bh = (t.to(_F64) for t in (A, B, Ah, Bh))
    den2 = float(((B.T @ B) * (A @ A.T)).sum())
    hh = float(((Bh.T @ Bh) * (Ah @ Ah.T)).sum())
    cross = float(((Bh.T @ B) * (Ah @ A.T)).sum())
    return hh - 2.0 * cross + den2, den2


def adapter_error(
    reference: LoraAdapter,
    approx: LoraAdapter,
    name: str = "",
    device: str | torch.device | None = None,
) -> MemberError:
    """Relative delta error of ``approx`` against ``reference`` per module and overall, from
    factors only (float64 Grams, see :func:`_gram_error`); ranks may differ."""
    if set(reference.modules) != set(approx.modules):
        raise IncompatibleAdaptersError("reference and approximation have different modules")
    dev = resolve_device(device)
    num2: dict[str, float] = {}
    den2: dict[str, float] = {}
    for m, ref in reference.modules.items():
        app = approx.modules[m]
        if (ref.in_features, ref.out_features) != (app.in_features, app.out_features):
            raise IncompatibleAdaptersError(f"module {m}: shapes differ")
        num2[m], den2[m] = _gram_error(ref.A.to(dev), ref.B.to(dev), app.A.to(dev), app.B.to(dev))
    return member_error(name, num2, den2)


def truncate_adapter(adapter: LoraAdapter, k: int, device: str | torch.device | None = None) -> LoraAdapter:
    """Per-adapter baseline: each module's delta BA truncated to its best rank-k approximation
    (Eckart-Young), computed from the factors: B = Q_B R_B, Aᵀ = Q_A R_A (thin QR), SVD of the
    r × r core R_B R_Aᵀ = W S Zᵀ, then B_k = Q_B W_k S_k^½ and A_k = S_k^½ Z_kᵀ Q_Aᵀ (no out × in
    matrix). Costs k/r of one adapter; k ≥ rank keeps the module as it is (min(k, r) is used)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise WeightsError(f"k must be a non-negative integer, got {k!r}")
    dev = resolve_device(device)
    out: dict[str, LoraModule | tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in adapter.modules.items():
        if k >= mod.rank:
            out[name] = (mod.A, mod.B)
            continue
        qb, rb = torch.linalg.qr(mod.B.to(dev, _F64))
        qa, ra = torch.linalg.qr(mod.A.to(dev, _F64).T)
        w, s, zt = torch.linalg.svd(rb @ ra.T)
        root = s[:k].sqrt()
        cdt = mod.A.dtype  # float32 (float64 for float64 sources)
        out[name] = (((root[:, None] * zt[:k]) @ qa.T).to(cdt), (qb @ (w[:, :k] * root)).to(cdt))
    return LoraAdapter.from_factors(
        out, config=copy.deepcopy(adapter.config), dtype=adapter.dtype, fan_in_fan_out=adapter.fan_in_fan_out
    )


# ---------------------------------------------------------------------------------------------
# Delta-space variant (beyond the paper): gauge-invariant


@dataclass
class DeltaModuleBasis:
    """Shared subspaces of one module: U [out, k] (column space of all deltas), V [in, k] (row
    space), per-member cores S [n, k, k]; member i's delta is U S_i Vᵀ."""

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.U.shape[1])


@dataclass
class DeltaBasis:
    """A delta-space basis (method ``rmm_delta``), see :func:`fit_delta_basis`."""

    modules: dict[str, DeltaModuleBasis]
    members: list[str]
    ranks: dict[str, int]
    dtypes: list[torch.dtype]
    configs: list[dict[str, Any]]
    errors: list[MemberError]
    fan_in_fan_out: bool = False
    method: str = DELTA_METHOD

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def k(self) -> dict[str, int]:
        return {name: mb.k for name, mb in self.modules.items()}

    def reconstruct(self, member: int | str, device: str | torch.device | None = None) -> LoraAdapter:
        """Δ̂_i = U S_i Vᵀ, refactored to rank ≤ r: S_i = W Σ Zᵀ, B̂ = U W_r Σ_r^½, Â = Σ_r^½ Z_rᵀ Vᵀ
        (exact, since rank S_i ≤ rank Δ_i ≤ r)."""
        if isinstance(member, str) and member not in self.members:
            raise WeightsError(f"basis has no member {member!r}")
        i = self.members.index(member) if isinstance(member, str) else member
        if not 0 <= i < self.n:
            raise WeightsError(f"member index {i} out of range 0..{self.n - 1}")
        dev = resolve_device(device)
        out: dict[str, LoraModule | tuple[torch.Tensor, torch.Tensor]] = {}
        for name, mb in self.modules.items():
            w, s, zt = torch.linalg.svd(mb.S[i].to(dev, _F64))
            r = self.ranks[name]
            q = min(r, mb.k)
            root = s[:q].sqrt()
            b = mb.U.to(dev, _F64) @ (w[:, :q] * root)
            a = (root[:, None] * zt[:q]) @ mb.V.to(dev, _F64).T
            if q < r:  # pad with zero directions so every module keeps its rank r
                b = torch.cat([b, b.new_zeros(b.shape[0], r - q)], dim=1)
                a = torch.cat([a, a.new_zeros(r - q, a.shape[1])], dim=0)
            out[name] = (a.to(_F32), b.to(_F32))
        return LoraAdapter.from_factors(
            out,
            config=copy.deepcopy(self.configs[i]),
            dtype=self.dtypes[i],
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def storage_ratio(self) -> float:
        """Σ_m (k_m(in_m + out_m) + n k_m²) / Σ_m n r (in_m + out_m)."""
        n = self.n
        num = sum(mb.k * (mb.U.shape[0] + mb.V.shape[0]) + n * mb.k**2 for mb in self.modules.values())
        den = sum(n * self.ranks[m] * (mb.U.shape[0] + mb.V.shape[0]) for m, mb in self.modules.items())
        return num / den

    def member_errors(self) -> list[MemberError]:
        return list(self.errors)


def _range_basis(Y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors of Y [L, q] (float64) via eigh of the q × q Gram, and all
    eigenvalues (descending)."""
    evals, Z = torch.linalg.eigh(Y.T @ Y)
    evals, Z = evals.flip(0), Z.flip(1)
    W = Y @ Z[:, :k]
    norms = torch.linalg.vector_norm(W, dim=0, keepdim=True)
    keep = evals[:k] > EIG_RTOL * evals[0].clamp_min(0)
    return torch.where(keep, W / norms.clamp_min(torch.finfo(_F64).tiny), 0.0), evals


def fit_delta_basis(
    adapters: Sequence[LoraAdapter],
    k: int | None = None,
    max_error: float | None = None,
    device: str | torch.device | None = None,
    names: Sequence[str] | None = None,
) -> DeltaBasis:
    """Delta-space variant ``rmm_delta`` (beyond the paper), invariant to the factor gauge.

    Per module, with Δ_i = B_i A_i: U_k = top-k left singular vectors of [Δ_1 … Δ_n] and V_k = top-k
    right singular vectors of [Δ_1; …; Δ_n], both from factors (B_i and A_iᵀ are made orthogonal
    on the other side by thin QR, so Σ_i Δ_iΔ_iᵀ = Y Yᵀ with Y = [B_1 R_1ᵀ … B_n R_nᵀ], out × nr,
    and the eigh of its nr × nr Gram gives U); cores S_i = (U_kᵀ B_i)(A_i V_k) ∈ R^{k×k}; Δ̂_i =
    U_k S_i V_kᵀ = P_U Δ_i P_V, so ‖Δ_i − Δ̂_i‖² = ‖Δ_i‖² − ‖S_i‖² (computed in float64).
    Exactly one of ``k`` (0 ≤ k ≤ n r) or ``max_error`` (smallest k per module meeting it; the
    error is monotone in k here). Storage: (k(in + out) + n k²) / (n r (in + out)) per module.
    """
    if (k is None) == (max_error is None):
        raise WeightsError("give exactly one of k or max_error")
    module_names, ranks = check_adapters(adapters)
    check_finite(adapters, module_names)
    n = len(adapters)
    members = member_names(names, n)
    kcap = n * min(ranks.values())
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= kcap):
        raise WeightsError(f"k must be an integer in 0..n*r = 0..{kcap}, got {k!r}")
    if max_error is not None and not (math.isfinite(max_error) and max_error >= 0):
        raise WeightsError(f"max_error must be a finite number >= 0, got {max_error!r}")
    dev = resolve_device(device)
    modules: dict[str, DeltaModuleBasis] = {}
    num2: list[dict[str, float]] = [{} for _ in range(n)]
    den2: list[dict[str, float]] = [{} for _ in range(n)]
    for name in module_names:
        kmax = n * ranks[name]
        As = [ad.modules[name].A.to(dev, _F64) for ad in adapters]
        Bs = [ad.modules[name].B.to(dev, _F64) for ad in adapters]
        ra = [torch.linalg.qr(a.T)[1] for a in As]  # A_iᵀ = Q R → Δ_i Δ_iᵀ = (B_i Rᵀ)(B_i Rᵀ)ᵀ
        rb = [torch.linalg.qr(b)[1] for b in Bs]  # B_i = Q R → Δ_iᵀ Δ_i = (A_iᵀ Rᵀ)(A_iᵀ Rᵀ)ᵀ
        U, _ = _range_basis(torch.cat([b @ q.T for b, q in zip(Bs, ra, strict=True)], dim=1), kmax)
        V, _ = _range_basis(torch.cat([a.T @ q.T for a, q in zip(As, rb, strict=True)], dim=1), kmax)
        ub = torch.stack([U.T @ b for b in Bs])  # [n, K, r]
        av = torch.stack([a @ V for a in As])  # [n, r, K]
        den = torch.stack([((b.T @ b) * (a @ a.T)).sum() for a, b in zip(As, Bs, strict=True)])
        chosen = k
        if max_error is not None:
            chosen = kmax
            for kk in range(kmax + 1):
                s2 = (ub[:, :kk] @ av[:, :, :kk]).square().sum(dim=(1, 2))
                rel = ((den - s2).clamp_min(0) / den.clamp_min(torch.finfo(_F64).tiny)).sqrt()
                if bool((rel <= max_error).all()):
                    chosen = kk
                    break
        assert chosen is not None
        S = ub[:, :chosen] @ av[:, :, :chosen]
        s2 = S.square().sum(dim=(1, 2))
        modules[name] = DeltaModuleBasis(
            U=U[:, :chosen].to("cpu", _F32).contiguous(),
            V=V[:, :chosen].to("cpu", _F32).contiguous(),
            S=S.to("cpu", _F32).contiguous(),
        )
        for i in range(n):
            num2[i][name], den2[i][name] = float(den[i] - s2[i]), float(den[i])
    return DeltaBasis(
        modules=modules,
        members=members,
        ranks=ranks,
        dtypes=[ad.dtype for ad in adapters],
        configs=[copy.deepcopy(ad.config) for ad in adapters],
        errors=[member_error(members[i], num2[i], den2[i]) for i in range(n)],
        fan_in_fan_out=adapters[0].fan_in_fan_out,
    )
