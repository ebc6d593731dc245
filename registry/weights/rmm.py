"""Reversible Model Merging (RMM) bases for LoRA adapters (arXiv 2510.14163).

n adapters of one base, same modules, same rank r. Per module, a **position** is one row of the
paper's A (m × r) = one row of PEFT ``lora_B``, or one column of the paper's B (r × d) = one column
of PEFT ``lora_A``. At each position j the n task vectors x_{j,i} ∈ R^r form X_j ∈ R^{r×n}; the
positions are independent and every module handles all of its d + m positions at once as one
tensor X ∈ R^{P×r×n}. The method (``rmm``), per position, data-free and in closed form:

1. μ = (1/n) Σ_i x_i,  X_c = X − μ 1ᵀ                         (mean task vector, centring)
2. X_c = U Σ Vᵀ (thin SVD), U_p = first p columns of U         (computed as the eigh of a Gram
   matrix, float64: of (X_c Q)ᵀ(X_c Q) = W Σ² Wᵀ with U = X_c Q W Σ⁻¹ when n − 1 ≤ r, where Q is
   an orthonormal basis of 1^⊥ (centring makes 1 a null vector); of X_c X_cᵀ = U Σ² Uᵀ otherwise)
3. C = U_pᵀ X_c ∈ R^{p×n}  (= Σ_p V_pᵀ)                        (per-task coefficients)
4. store (μ, U_p, C); task i is x̂_i = μ + U_p C[:, i]           (reconstruction)

Facts: p = 0 is plain factor averaging; p = min(r, n − 1) ≥ rank(X_c) reconstructs exactly (to
round-off); the factor error is non-increasing in p. Storage relative to the n adapters is
(p(r + n) + r) / (r n) per position: the basis saves space only while p < r(n − 1)/(r + n).

Quality is reported per member as the relative Frobenius error of the *delta*,
‖B̂Â − BA‖_F / ‖BA‖_F, per module and overall (√Σ num² / √Σ den² over modules), computed from
r × r Grams (‖XY‖_F² = tr(XᵀX YYᵀ)), never from out × in matrices (see :func:`_module_errors`).
Errors are computed at fit time from the stored (rounded) tensors and kept in the basis and its file.

Known weakness (measured, not hidden): LoRA factors are defined only up to an invertible r × r
mixing (BA = (BR)(R⁻¹A)), so positions of independently initialised adapters are not aligned and
need a large p; adapters trained from a shared initialisation align much better. The gauge-invariant
alternative ``fit_delta_basis`` (method ``rmm_delta``) works on the deltas instead.

Also here: :func:`add_member` (project a new adapter on an existing basis). The baselines the basis
is measured against (``truncate_adapter``: the per-adapter truncated SVD at equal storage;
``fit_delta_basis``; ``adapter_error``: the factored delta error between any two adapters) are in
:mod:`registry.weights.rmm_baselines`.

Files (:func:`save_basis`/:func:`load_basis`): one safetensors file with six tensors per module,
laid out in each factor's PEFT orientation (see :class:`ModuleBasis`): ``<module>.lora_A.mu``
[r, in], ``.lora_A.U`` [p, r, in], ``.lora_A.C`` [n, p, in], ``<module>.lora_B.mu`` [out, r],
``.lora_B.U`` [p, out, r], ``.lora_B.C`` [n, p, out], plus string metadata (members, p per module,
r, n, dtypes, member errors, ...). Stored in float32 by default: U has unit columns and C carries
the magnitudes, and float32 keeps a full-p reconstruction exact (rounded back to a float16 source
it gives the original values) at twice the bytes of a float16 source; ``storage_dtype=
torch.float16`` halves the bytes for ≈1e-3 relative error. :meth:`RmmBasis.storage_ratio` counts
numbers (the paper's measure), :meth:`RmmBasis.byte_ratio` bytes.

Where it runs: every function takes ``device`` (default ``REGISTRY_DEVICE``). The hot path is one
small eigendecomposition per position (~2.5 M of 7 × 7 for a 7B-shaped collection of 8 rank-16 LoRAs).
On the CPU steps 1-3 and the residuals behind the member errors run in one compiled pass per module
factor (:func:`registry.weights.kernels.rmm_positions`: a lane-parallel Jacobi solver, 128 positions
per SIMD block, split over torch's thread count); torch's LAPACK path solves one matrix per call
(≈3 µs each here, see bench/RESULTS.md). On other devices (CUDA) and for half-precision storage the
torch path runs (``torch.linalg.eigh`` batched).
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraAdapter,
    LoraModule,
    all_finite,
    peft_config_bytes,
    peft_factor,
    peft_tensor_names,
    write_safetensors,
)
from .checkpoint import SafetensorsLayout, TensorSpec, safetensors_layout
from .device import resolve_device
from .errors import CheckpointFormatError, IncompatibleAdaptersError, NonFiniteError, WeightsError
from .formatfile import FormatFile

__all__ = [
    "FORMAT_VERSION",
    "MemberError",
    "MemberFiles",
    "ModuleBasis",
    "RmmBasis",
    "add_member",
    "fit_basis",
    "load_basis",
    "load_member_files",
    "save_basis",
    "storage_ratio",
]

METHOD = "rmm"
FORMAT = "registry.rmm"
FORMAT_VERSION = "1"
_F32, _F64 = torch.float32, torch.float64
# A direction whose eigenvalue is below this fraction of the position's largest one carries no
# energy above round-off: its column of U is stored as zeros (and so is its row of C).
EIG_RTOL = 1e-14


def storage_ratio(p: int, r: int, n: int) -> float:
    """Stored numbers per position relative to n separate adapters: (p(r + n) + r) / (r n)."""
    return (p * (r + n) + r) / (r * n)


@dataclass(frozen=True)
class MemberError:
    """Relative delta error of one member: ‖B̂Â − BA‖_F / ‖BA‖_F per module, and ``overall`` =
    √(Σ_modules num²) / √(Σ_modules den²). ``0.0`` where both are zero, ``inf`` where only ‖BA‖ is."""

    name: str
    modules: dict[str, float]
    overall: float

    @property
    def max_module(self) -> float:
        return max(self.modules.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "overall": self.overall, "modules": dict(self.modules)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MemberError:
        mods = {str(k): float(v) for k, v in dict(obj["modules"]).items()}
        return cls(name=str(obj["name"]), modules=mods, overall=float(obj["overall"]))


def _ratio(num2: float, den2: float) -> float:
    num2 = max(num2, 0.0)
    if den2 > 0.0:
        return math.sqrt(num2 / den2)
    return 0.0 if num2 == 0.0 else math.inf


def member_error(name: str, num2: Mapping[str, float], den2: Mapping[str, float]) -> MemberError:
    mods = {m: _ratio(num2[m], den2[m]) for m in sorted(num2)}
    return MemberError(name=name, modules=mods, overall=_ratio(sum(num2.values()), sum(den2.values())))


# ---------------------------------------------------------------------------------------------
# Basis containers


@dataclass
class ModuleBasis:
    """RMM basis of one module, each factor kept in its PEFT orientation (step 4 of the method).

    lora_A (r × in): a position is a column j. ``mu_A`` [r, in] is the mean lora_A, ``U_A[k]``
    [r, in] holds the k-th basis direction of every column, ``C_A[i, k]`` [in] member i's k-th
    coefficient per column:  Â_i = μ_A + Σ_k U_A[k] · diag(C_A[i, k]).
    lora_B (out × r): a position is a row j. ``mu_B`` [out, r], ``U_B`` [p, out, r], ``C_B``
    [n, p, out]:  B̂_i = μ_B + Σ_k diag(C_B[i, k]) · U_B[k].
    (This layout makes a reconstruction p contiguous multiply-adds with no transposes.)
    """

    mu_A: torch.Tensor
    U_A: torch.Tensor
    C_A: torch.Tensor
    mu_B: torch.Tensor
    U_B: torch.Tensor
    C_B: torch.Tensor

    @property
    def p(self) -> int:
        return int(self.U_A.shape[0])

    @property
    def rank(self) -> int:
        return int(self.mu_A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.mu_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.mu_B.shape[0])

    @property
    def positions(self) -> int:
        return self.in_features + self.out_features

    def tensors(self) -> dict[str, torch.Tensor]:
        """The six stored tensors by file suffix (``lora_A.mu`` ...)."""
        return {
            "lora_A.mu": self.mu_A,
            "lora_A.U": self.U_A,
            "lora_A.C": self.C_A,
            "lora_B.mu": self.mu_B,
            "lora_B.U": self.U_B,
            "lora_B.C": self.C_B,
        }

    def factors(self, i: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â_i, B̂_i) in float32: x̂_i = μ + U_p C[:, i] at every position (step 4).

        Written as μ + Σ_k U[k] · c_k, elementwise in a fixed order, so identical stored tensors
        give bit-identical factors on the same device."""
        dev = device or self.mu_A.device
        a = self.mu_A.to(dev, _F32, copy=True)
        b = self.mu_B.to(dev, _F32, copy=True)
        ua, ub = self.U_A.to(dev, _F32), self.U_B.to(dev, _F32)
        ca, cb = self.C_A[i].to(dev, _F32), self.C_B[i].to(dev, _F32)
        for k in range(self.p):
            a.addcmul_(ua[k], ca[k].unsqueeze(0))
            b.addcmul_(ub[k], cb[k].unsqueeze(1))
        return a, b


@dataclass
class RmmBasis:
    """A fitted RMM basis (method ``rmm``) over ``members``; see the module docstring.

    ``r`` is the adapters' rank (the largest one when ``rank_pattern`` gave modules different
    ranks; :attr:`ranks` has each module's). ``n_fit`` members determined μ and U; members added
    later with :func:`add_member` only have coefficients. ``configs``/``dtypes`` are the members'
    PEFT configs and source dtypes, used to rebuild each member as a :class:`LoraAdapter`.
    """

    modules: dict[str, ModuleBasis]
    members: list[str]
    r: int
    dtypes: list[torch.dtype]
    configs: list[dict[str, Any]]
    errors: list[MemberError]
    fan_in_fan_out: bool = False
    n_fit: int = 0
    method: str = METHOD
    storage_dtype: torch.dtype = _F32
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))
        if not self.n_fit:
            self.n_fit = len(self.members)

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def p(self) -> dict[str, int]:
        """Number of basis directions per module."""
        return {name: mb.p for name, mb in self.modules.items()}

    @property
    def ranks(self) -> dict[str, int]:
        """LoRA rank per module."""
        return {name: mb.rank for name, mb in self.modules.items()}

    def index(self, member: int | str) -> int:
        if isinstance(member, str):
            try:
                return self.members.index(member)
            except ValueError:
                raise WeightsError(f"basis has no member {member!r}") from None
        if not 0 <= member < self.n:
            raise WeightsError(f"member index {member} out of range 0..{self.n - 1}")
        return member

    def reconstruct(self, member: int | str, device: str | torch.device | None = None) -> LoraAdapter:
        """Rebuild member i: per module and factor x̂_i = μ + U_p C[:, i] (step 4), reassembled as
        Â = x̂_Aᵀ (r × in) and B̂ = x̂_B (out × r), with the member's config and source dtype."""
        i = self.index(member)
        dev = resolve_device(device)
        names = list(self.modules)

        def some(lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [self.modules[name].factors(i, dev) for name in names[lo:hi]]

        # modules are independent: on the CPU they are rebuilt on torch's threads, each alone
        parts = _split(len(names), some, minimum=2) if dev.type == "cpu" else [some(0, len(names))]
        built = [f for part in parts for f in part]
        modules: dict[str, LoraModule | tuple[torch.Tensor, torch.Tensor]] = dict(zip(names, built, strict=True))
        return LoraAdapter.from_factors(
            modules,
            config=copy.deepcopy(self.configs[i]),
            dtype=self.dtypes[i],
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def member_files(
        self, member: int | str, module: Callable[[str], tuple[ModuleBasis, int]] | None = None
    ) -> MemberFiles:
        """Member i's PEFT folder, byte for byte what ``save_peft_adapter(self.reconstruct(i))``
        writes, without writing it: the config bytes now, the safetensors file as a layout plus a
        reader that rebuilds one module at a time, when its bytes are first asked for (CPU).
        ``module(name)`` -> (that module's basis, the member's index in it) (default: this basis's)."""
        i = self.index(member)
        shapes = {  # placeholders of the right shapes: the config depends only on ranks and config
            name: (torch.empty(mb.rank, mb.in_features), torch.empty(mb.out_features, mb.rank))
            for name, mb in self.modules.items()
        }
        like = LoraAdapter.from_factors(shapes, config=copy.deepcopy(self.configs[i]), dtype=self.dtypes[i],
                                        fan_in_fan_out=self.fan_in_fan_out)
        config, scales = peft_config_bytes(like)
        owner: dict[str, str] = {}
        specs: list[TensorSpec] = []
        for name, mb in self.modules.items():
            a, b = peft_tensor_names(name)
            owner[a] = owner[b] = name
            specs += [TensorSpec(a, self.dtypes[i], (mb.rank, mb.in_features)),
                      TensorSpec(b, self.dtypes[i], (mb.out_features, mb.rank))]
        layout = safetensors_layout(specs, {"format": "pt"})
        get = module if module is not None else (lambda name: (self.modules[name], i))
        return MemberFiles(get, self.dtypes[i], config, layout, owner, scales)

    def storage_ratio(self) -> float:
        """Σ_m P_m (p_m(r_m + n) + r_m) / Σ_m P_m r_m n: numbers stored by the basis over numbers
        in the n adapters, each module m weighted by its position count P_m = in + out."""
        n = self.n
        num = sum(mb.positions * (mb.p * (mb.rank + n) + mb.rank) for mb in self.modules.values())
        den = sum(mb.positions * mb.rank * n for mb in self.modules.values())
        return num / den

    def byte_ratio(self) -> float:
        """Bytes of the stored tensors over bytes of the n adapters' factors in their source dtypes."""
        stored = sum(t.numel() * t.element_size() for mb in self.modules.values() for t in mb.tensors().values())
        per_member = sum(mb.positions * mb.rank for mb in self.modules.values())
        source = sum(per_member * torch.empty((), dtype=dt).element_size() for dt in self.dtypes)
        return stored / source

    def member_errors(self) -> list[MemberError]:
        """Per member, the relative delta error of its reconstruction (computed at fit time)."""
        return list(self.errors)


class MemberFiles:
    """One member's PEFT files (see :meth:`RmmBasis.member_files`): ``config`` (the
    ``adapter_config.json`` bytes), ``layout`` (of ``adapter_model.safetensors``) and
    :meth:`read` (bytes ``[lo, hi)`` of one stored tensor; the module's two factors are rebuilt
    together and kept until another module is read)."""

    def __init__(self, module: Callable[[str], tuple[ModuleBasis, int]], dtype: torch.dtype, config: bytes,
                 layout: SafetensorsLayout, owner: Mapping[str, str], scales: Mapping[str, float]) -> None:
        self._module, self.dtype, self.config, self.layout = module, dtype, config, layout
        self._owner, self._scales = dict(owner), dict(scales)
        self._held: dict[str, torch.Tensor] = {}

    @property
    def files(self) -> dict[str, int]:
        """File name -> size."""
        return {CONFIG_NAME: len(self.config), WEIGHTS_NAME: self.layout.total_size}

    def read(self, name: str, lo: int, hi: int) -> bytes:
        if name not in self._held:
            module = self._owner[name]
            mb, i = self._module(module)
            a, b = mb.factors(i, torch.device("cpu"))
            na, nb = peft_tensor_names(module)
            scale = self._scales[module]
            self._held = {na: peft_factor(a, scale, self.dtype).view(torch.uint8).reshape(-1),
                          nb: peft_factor(b, scale, self.dtype).view(torch.uint8).reshape(-1)}
        return self._held[name][lo:hi].numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# Validation


def check_same_base(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The one rule for "adapters of one base": every adapter has the first one's modules, each with
    the same (in_features, out_features), and the same ``fan_in_fan_out``; ranks may differ (see
    :func:`check_ranks`). Returns the first adapter's module names; raises
    :class:`IncompatibleAdaptersError` naming every adapter that differs and how."""
    if not adapters:
        raise IncompatibleAdaptersError("no adapters given")
    ref = adapters[0]
    names = ref.module_names()
    problems: list[str] = []
    for idx, ad in enumerate(adapters[1:], start=1):
        mine = set(ad.modules)
        missing, extra = sorted(set(names) - mine), sorted(mine - set(names))
        if missing:
            problems.append(f"adapter {idx} lacks modules {missing[:5]}")
        if extra:
            problems.append(f"adapter {idx} has extra modules {extra[:5]}")
        shapes = [n for n in names if n in mine
                  and (ad.modules[n].in_features, ad.modules[n].out_features)
                  != (ref.modules[n].in_features, ref.modules[n].out_features)]
        if shapes:
            problems.append(f"adapter {idx} has other shapes for {', '.join(shapes[:5])}")
        if ad.fan_in_fan_out != ref.fan_in_fan_out:
            problems.append(f"adapter {idx} has fan_in_fan_out={ad.fan_in_fan_out}")
    if problems:
        raise IncompatibleAdaptersError("adapters are not of one base: " + "; ".join(problems))
    return names


def check_ranks(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> dict[str, int]:
    """Every adapter has the same rank r in each module (what an RMM basis needs); returns it."""
    ranks = {n: adapters[0].modules[n].rank for n in names}
    odd = sorted({n for ad in adapters for n in names if ad.modules[n].rank != ranks[n]})
    if odd:
        raise IncompatibleAdaptersError(
            "adapters must share the rank r of every module; modules whose rank differs: "
            + ", ".join(f"{n} ({sorted({ad.modules[n].rank for ad in adapters})})" for n in odd[:10])
        )
    return ranks


def check_adapters(adapters: Sequence[LoraAdapter], minimum: int = 2) -> tuple[list[str], dict[str, int]]:
    """At least ``minimum`` adapters of one base (:func:`check_same_base`) with equal ranks per
    module (:func:`check_ranks`): (module names, rank per module)."""
    if len(adapters) < minimum:
        raise IncompatibleAdaptersError(f"need at least {minimum} adapters, got {len(adapters)}")
    names = check_same_base(adapters)
    return names, check_ranks(adapters, names)


def check_finite(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> None:
    """Raise :class:`NonFiniteError` naming the first adapter/module/factor holding NaN or Inf."""
    for idx, ad in enumerate(adapters):
        for n in names:
            mod = ad.modules[n]
            for which, t in (("lora_A", mod.A), ("lora_B", mod.B)):
                if not all_finite(t):
                    raise NonFiniteError(f"adapter {idx}: {n}.{which} holds NaN or Inf values")


def _check_against(basis: RmmBasis, adapter: LoraAdapter) -> None:
    """``adapter`` has the basis's modules, shapes, rank, fan_in_fan_out and finite factors."""
    if set(adapter.modules) != set(basis.modules):
        diff = sorted(set(adapter.modules) ^ set(basis.modules))
        raise IncompatibleAdaptersError(f"adapter modules differ from the basis: {diff[:10]}")
    if adapter.fan_in_fan_out != basis.fan_in_fan_out:
        raise IncompatibleAdaptersError("adapter fan_in_fan_out differs from the basis")
    odd = sorted(
        name
        for name, mb in basis.modules.items()
        if (adapter.modules[name].rank, adapter.modules[name].in_features, adapter.modules[name].out_features)
        != (mb.rank, mb.in_features, mb.out_features)
    )
    if odd:
        raise IncompatibleAdaptersError(f"adapter rank/shapes differ from the basis: {odd[:10]}")
    for name, mod in adapter.modules.items():
        for which, t in (("lora_A", mod.A), ("lora_B", mod.B)):
            if not all_finite(t):
                raise NonFiniteError(f"adapter: {name}.{which} holds NaN or Inf values")


def member_names(names: Sequence[str] | None, n: int) -> list[str]:
    out = [f"m{i}" for i in range(n)] if names is None else [str(x) for x in names]
    if len(out) != n or len(set(out)) != n:
        raise WeightsError(f"names must be {n} distinct strings, got {list(out)}")
    return out


# ---------------------------------------------------------------------------------------------
# The hot path: all positions of a module at once


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_MIN_CHUNK = 2048


def _forget_pool() -> None:  # a forked child (e.g. a Celery worker) must not reuse the parent's threads
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _split(total: int, work: Callable[[int, int], Any], align: int = 1, minimum: int | None = None) -> list[Any]:
    """``work(lo, hi)`` over ``[0, total)``, split into contiguous ranges (multiples of ``align``)
    across torch's intra-op thread count on a shared pool, when ``total`` reaches ``minimum``
    (default 2 · _MIN_CHUNK); results in range order. Each call must compute its range on its
    own, so the split never changes a result."""
    global _POOL
    workers = torch.get_num_threads()
    if workers < 2 or total < (2 * _MIN_CHUNK if minimum is None else minimum):
        return [work(0, total)]
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rmm")
        pool = _POOL
    step = -(-total // workers)
    step = -(-step // align) * align
    return list(pool.map(lambda lo: work(lo, min(total, lo + step)), range(0, total, step)))


def _eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched symmetric eigendecomposition (ascending). On CPU, torch runs a batch through LAPACK
    one matrix at a time on one thread, so the batch is split across torch's intra-op thread count
    (each matrix is still solved alone, so the split does not change any result)."""
    if G.device.type != "cpu":
        evals, evecs = torch.linalg.eigh(G)
        return evals, evecs
    evals = G.new_empty(G.shape[:-1])
    evecs = torch.empty_like(G)
    _split(G.shape[0], lambda lo, hi: torch.linalg.eigh(G[lo:hi], out=(evals[lo:hi], evecs[lo:hi])))
    return evals, evecs


def _helmert(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Q [n, n − 1]: orthonormal basis of the vectors orthogonal to 1 (Helmert), so that
    X_c Q = X Q and X_c = (X Q) Qᵀ: centring and the trivial direction 1 removed in one product."""
    q = torch.zeros(n, n - 1, dtype=dtype, device=device)
    for j in range(1, n):
        q[:j, j - 1] = 1.0
        q[j, j - 1] = -float(j)
        q[:, j - 1] /= math.sqrt(j * (j + 1))
    return q


def _principal_directions(X: torch.Tensor, mu: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 for every position: U_k [P, r, k] and C = U_kᵀ X_c [P, k, n] (float64), from
    X [P, r, n] and its mean μ [P, r, 1].

    n − 1 ≤ r: Y = X Q = X_c Q (Q [n, n − 1] orthonormal, Q ⟂ 1, so centring is implicit), eigh of
    the (n−1)×(n−1) Gram YᵀY = W Σ² Wᵀ, U = Y W Σ⁻¹ and C = Σ Wᵀ Qᵀ (= Σ_p V_pᵀ: X_c = Y Qᵀ).
    Otherwise eigh of X_c X_cᵀ = U Σ² Uᵀ and C = Uᵀ X_c. Gram and eigh in float64 (squaring
    doubles the condition number); directions with σ² ≤ 1e-14 σ_max² are zero in U and C."""
    P, r, n = X.shape
    if k == 0:
        return X.new_zeros(P, r, 0, dtype=_F64), X.new_zeros(P, 0, n, dtype=_F64)
    if n - 1 <= r:
        Q = _helmert(n, _F64, X.device)
        Y = (X.reshape(-1, n) @ Q.to(X.dtype)).view(P, r, n - 1).to(_F64)  # round-off ~ eps·‖x‖
        evals, V = _eigh(Y.mT @ Y)
        Vk = V[..., -k:].flip(-1)  # [P, n − 1, k], descending σ
        keep = evals[..., -k:].flip(-1) > EIG_RTOL * evals[..., -1:]
        W = Y @ Vk  # U Σ
        sigma = torch.where(keep, (W * W).sum(dim=1).sqrt(), 0.0)  # σ = ‖Y v‖, so U C = Y V_k V_kᵀ Qᵀ
        U = W * torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(_F64).tiny), 0.0).unsqueeze(1)
        C = ((Vk * sigma.unsqueeze(1)).mT.reshape(-1, n - 1) @ Q.T).view(P, k, n)  # Σ V_kᵀ Qᵀ
        return U, C
    Xc = X.to(_F64) - mu.to(_F64)
    _, U = _eigh(Xc @ Xc.mT)
    U = U[..., -k:].flip(-1)
    return U, U.mT @ Xc


def _fit_module(
    A: torch.Tensor, B: torch.Tensor, k: int, storage_dtype: torch.dtype, residuals: bool = False,
    compiled: bool = True,
) -> tuple[ModuleBasis, tuple[torch.Tensor, torch.Tensor] | None]:
    """Steps 1-3 for all positions of one module at once; A [n, r, in], B [n, out, r] (float32).

    On the CPU (``k ≥ 1``, float32/float64 storage; ``compiled=False`` forces the torch path) by the
    compiled kernel
    :func:`registry.weights.kernels.rmm_positions`, which also returns, when ``residuals``, the
    residuals (A − Â, B − B̂) of the stored basis (float32, the factors' shapes); else ``None``.
    Elsewhere positions are stacked as X [in + out, r, n]; μ in float32, U and C in float64, all
    rounded to ``storage_dtype``. For a half-precision storage dtype C is recomputed as U_kᵀ(X − μ)
    from the rounded μ and U_k (the least-squares coefficients for the stored basis)."""
    if compiled and A.device.type == "cpu" and k > 0 and storage_dtype in (_F32, _F64):
        return _fit_module_cpu(A, B, k, storage_dtype, residuals)
    d = A.shape[2]
    X = torch.cat([A.permute(2, 1, 0), B.permute(1, 2, 0)])  # [P, r, n]
    mu = X.mean(dim=-1, keepdim=True)  # step 1
    if not bool(torch.isfinite(mu).all()):  # NaN/Inf anywhere in X reaches the mean
        raise NonFiniteError("non-finite factor")
    U, C = _principal_directions(X, mu, k)  # steps 2-3
    mu, U = mu.to(storage_dtype), U.to(storage_dtype)
    if storage_dtype not in (_F32, _F64):  # re-fit C to the rounded μ and U (least squares)
        C = U.to(_F64).mT @ (X.to(_F64) - mu.to(_F64))
    C = C.to(storage_dtype)
    mb = ModuleBasis(
        mu_A=mu[:d, :, 0].T.contiguous(),
        U_A=U[:d].permute(2, 1, 0).contiguous(),
        C_A=C[:d].permute(2, 1, 0).contiguous(),
        mu_B=mu[d:, :, 0].contiguous(),
        U_B=U[d:].permute(2, 0, 1).contiguous(),
        C_B=C[d:].permute(2, 1, 0).contiguous(),
    )
    return mb, None


def _fit_module_cpu(
    A: torch.Tensor, B: torch.Tensor, k: int, dtype: torch.dtype, residuals: bool
) -> tuple[ModuleBasis, tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`_fit_module` by the compiled kernel, writing straight into the stored layouts: the
    kernel sees each factor's positions as strided views [P, r, n] / [P, r] / [P, r, k] / [P, k, n]."""
    from . import kernels

    n, r, d = A.shape
    m = B.shape[1]
    mb = ModuleBasis(
        mu_A=torch.empty(r, d, dtype=dtype), U_A=torch.empty(k, r, d, dtype=dtype),
        C_A=torch.empty(n, k, d, dtype=dtype), mu_B=torch.empty(m, r, dtype=dtype),
        U_B=torch.empty(k, m, r, dtype=dtype), C_B=torch.empty(n, k, m, dtype=dtype),
    )
    EA = torch.empty(n, r, d, dtype=_F32) if residuals else None
    EB = torch.empty(n, m, r, dtype=_F32) if residuals else None
    Q = _helmert(n, _F64, torch.device("cpu")).numpy()
    parts = [  # (X, μ, U, C, E) as [P, ...] views of each factor's positions
        (A.permute(2, 1, 0), mb.mu_A.T, mb.U_A.permute(2, 1, 0), mb.C_A.permute(2, 1, 0),
         None if EA is None else EA.permute(2, 1, 0)),
        (B.permute(1, 2, 0), mb.mu_B, mb.U_B.permute(1, 2, 0), mb.C_B.permute(2, 1, 0),
         None if EB is None else EB.permute(1, 2, 0)),
    ]
    for X, mu, U, C, E in parts:
        x, m_, u, c = X.numpy(), mu.numpy(), U.numpy(), C.numpy()
        e = None if E is None else E.numpy()

        def work(lo: int, hi: int, x: Any = x, m_: Any = m_, u: Any = u, c: Any = c, e: Any = e) -> int:
            return kernels.rmm_positions(x, Q, k, EIG_RTOL, m_, u, c, e, lo, hi)

        if any(_split(X.shape[0], work, kernels.LANES)):
            raise NonFiniteError("non-finite factor")
    return mb, (None if EA is None or EB is None else (EA, EB))


def _truncated(mb: ModuleBasis, p: int) -> ModuleBasis:
    """The same basis with only its first p directions (U_p, C_p)."""
    return ModuleBasis(
        mu_A=mb.mu_A,
        U_A=mb.U_A[:p].contiguous(),
        C_A=mb.C_A[:, :p].contiguous(),
        mu_B=mb.mu_B,
        U_B=mb.U_B[:p].contiguous(),
        C_B=mb.C_B[:, :p].contiguous(),
    )


def _partial_factors(mb: ModuleBasis) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(Â [n, r, in], B̂ [n, out, r]) of every member with the first p' directions, for
    p' = 0, 1, ..., p in turn (float32; the yielded tensors are updated in place afterwards)."""
    ua, ub = mb.U_A.to(_F32), mb.U_B.to(_F32)
    ca, cb = mb.C_A.to(_F32), mb.C_B.to(_F32)
    a = mb.mu_A.to(_F32).expand(ca.shape[0], -1, -1).clone()
    b = mb.mu_B.to(_F32).expand(cb.shape[0], -1, -1).clone()
    yield a, b
    for k in range(mb.p):
        a.addcmul_(ua[k].unsqueeze(0), ca[:, k].unsqueeze(1))
        b.addcmul_(ub[k].unsqueeze(0), cb[:, k].unsqueeze(2))
        yield a, b


def _all_factors(mb: ModuleBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â [n, r, in], B̂ [n, out, r]) of every member with all p directions, float32."""
    *_, last = _partial_factors(mb)
    return last


def _stack(adapters: Sequence[LoraAdapter], name: str, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [n, r, in], B [n, out, r]) of one module over the adapters, float32 on ``dev``."""
    A = torch.stack([ad.modules[name].A.to(dev, _F32) for ad in adapters])
    B = torch.stack([ad.modules[name].B.to(dev, _F32) for ad in adapters])
    return A, B


@dataclass
class _Fixed:
    """p-independent pieces of the error of one module: the factors and their Grams."""

    A: torch.Tensor  # [n, r, in]
    B: torch.Tensor  # [n, out, r]
    AAt: torch.Tensor  # [n, r, r] float64
    BtB: torch.Tensor  # [n, r, r] float64
    den2: torch.Tensor  # [n] float64: ‖BA‖_F²


def _fixed(A: torch.Tensor, B: torch.Tensor) -> _Fixed:
    AAt = (A @ A.mT).to(_F64)
    BtB = (B.mT @ B).to(_F64)
    return _Fixed(A, B, AAt, BtB, _tr(BtB, AAt))


def _tr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tr(x y) for batches of square matrices."""
    return (x * y.mT).sum(dim=(-2, -1))


def _module_errors(fx: _Fixed, Ahat: torch.Tensor, Bhat: torch.Tensor) -> torch.Tensor:
    """num² = ‖B̂Â − BA‖_F² per member [n], for A, Â [n, r, in] and B, B̂ [n, out, r]
    (:func:`_residual_errors` of the residuals A − Â, B − B̂)."""
    return _residual_errors(fx, fx.A - Ahat, fx.B - Bhat)


def _residual_errors(fx: _Fixed, EA: torch.Tensor, EB: torch.Tensor) -> torch.Tensor:
    """num² = ‖B̂Â − BA‖_F² per member [n] from the residuals E_A = A − Â [n, r, in], E_B = B − B̂
    [n, out, r] (so B̂Â − BA = −(B E_A + E_B Â)), with ‖XY‖² = tr(XᵀX YYᵀ):

        num² = tr(BᵀB · E_AE_Aᵀ) + 2 tr(BᵀE_B · ÂE_Aᵀ) + tr(E_BᵀE_B · ÂÂᵀ)
        ÂE_Aᵀ = AE_Aᵀ − E_AE_Aᵀ,   ÂÂᵀ = AAᵀ − AE_Aᵀ − (AE_Aᵀ)ᵀ + E_AE_Aᵀ,   den² = tr(BᵀB · AAᵀ)

    Every term is a product of r × r Grams (cost (in + out) r² per member, no out × in matrix), and
    the terms scale with the error itself, so there is no catastrophic cancellation (unlike
    ‖B̂Â‖² − 2⟨B̂Â, BA⟩ + ‖BA‖²); Grams in float32, traces in float64."""
    AE, EE = (fx.A @ EA.mT).to(_F64), (EA @ EA.mT).to(_F64)  # A E_Aᵀ, E_A E_Aᵀ
    BE, FF = (fx.B.mT @ EB).to(_F64), (EB.mT @ EB).to(_F64)  # Bᵀ E_B, E_Bᵀ E_B
    ahat = fx.AAt - AE - AE.mT + EE
    return _tr(fx.BtB, EE) + 2.0 * _tr(BE, AE - EE) + _tr(FF, ahat)


def fit_basis(
    adapters: Sequence[LoraAdapter],
    p: int | None = None,
    max_error: float | None = None,
    device: str | torch.device | None = None,
    names: Sequence[str] | None = None,
    storage_dtype: torch.dtype = _F32,
) -> RmmBasis:
    """Fit an RMM basis (method ``rmm``, steps 1-4 of the module docstring) over ``adapters``.

    Exactly one of ``p`` (directions for every module; 0 ≤ p ≤ min(r, n − 1), anything else is
    refused rather than clamped) or ``max_error`` (per module, the smallest p whose delta errors of
    all members on that module are ≤ ``max_error``; found by scanning p = 0, 1, ... because the
    delta error need not be monotone in p; min(r, n − 1) if no p meets it). Modules may have
    different ranks (``rank_pattern``) as long as every adapter agrees on each module's rank.
    ``names`` label the members (default ``m0``, ``m1``, ...). Raises
    :class:`IncompatibleAdaptersError` when modules, ranks, shapes or ``fan_in_fan_out`` differ,
    :class:`NonFiniteError` on NaN/Inf factors.
    """
    if (p is None) == (max_error is None):
        raise WeightsError("give exactly one of p or max_error")
    module_names, ranks = check_adapters(adapters)
    n = len(adapters)
    members = member_names(names, n)
    kmax = {m: min(rk, n - 1) for m, rk in ranks.items()}
    pmax = min(kmax.values())
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= pmax):
        raise WeightsError(f"p must be an integer in 0..min(r, n-1) = 0..{pmax}, got {p!r}")
    if max_error is not None and not (math.isfinite(max_error) and max_error >= 0):
        raise WeightsError(f"max_error must be a finite number >= 0, got {max_error!r}")
    if storage_dtype not in (torch.float16, torch.bfloat16, _F32, _F64):
        raise WeightsError(f"storage_dtype must be a float dtype, got {storage_dtype}")
    dev = resolve_device(device)

    modules: dict[str, ModuleBasis] = {}
    num2: list[dict[str, float]] = [{} for _ in range(n)]
    den2: list[dict[str, float]] = [{} for _ in range(n)]
    tiny = torch.finfo(_F64).tiny
    for name in module_names:
        A, B = _stack(adapters, name, dev)
        fx = _fixed(A, B)
        try:
            full, resid = _fit_module(A, B, kmax[name] if p is None else p, storage_dtype, max_error is None)
        except NonFiniteError:
            check_finite(adapters, [name])  # names the adapter and factor
            raise
        if max_error is None:
            mb = full
            num = _residual_errors(fx, *resid) if resid is not None else _module_errors(fx, *_all_factors(full))
        else:  # scan p' = 0, 1, ...: one more direction per step, stop at the first within budget
            chosen = 0
            for chosen, (ahat, bhat) in enumerate(_partial_factors(full)):  # noqa: B007 (used below)
                num = _module_errors(fx, ahat, bhat)
                if bool((num.clamp_min(0) <= max_error**2 * fx.den2.clamp_min(tiny)).all()):
                    break
            mb = _truncated(full, chosen)
        modules[name] = ModuleBasis(**{f: t.cpu() for f, t in vars(mb).items()})
        for i in range(n):
            num2[i][name], den2[i][name] = float(num[i]), float(fx.den2[i])
    return RmmBasis(
        modules=modules,
        members=members,
        r=max(ranks.values()),
        dtypes=[ad.dtype for ad in adapters],
        configs=[copy.deepcopy(ad.config) for ad in adapters],
        errors=[member_error(members[i], num2[i], den2[i]) for i in range(n)],
        fan_in_fan_out=adapters[0].fan_in_fan_out,
        n_fit=n,
        storage_dtype=storage_dtype,
    )


def add_member(
    basis: RmmBasis,
    adapter: LoraAdapter,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> RmmBasis:
    """Add ``adapter`` to ``basis`` without refitting: per position c = U_pᵀ(x − μ) with the
    existing μ and U_p (a projection on the old subspace), appended as a new member of C.

    Returns a new basis (the input is not modified); the new member's delta error is the last entry
    of :meth:`RmmBasis.member_errors` and is typically larger than a refit would give, since U_p was
    chosen for the other members."""
    _check_against(basis, adapter)
    label = name if name is not None else f"m{basis.n}"
    if label in basis.members:
        raise WeightsError(f"basis already has a member named {label!r}")
    dev = resolve_device(device)
    sd = basis.storage_dtype
    modules: dict[str, ModuleBasis] = {}
    num2: dict[str, float] = {}
    den2: dict[str, float] = {}
    for mname, mb in basis.modules.items():
        A, B = _stack([adapter], mname, dev)
        # c_k = U_kᵀ (x − μ) per position: columns of lora_A, rows of lora_B
        ca = ((A.to(_F64) - mb.mu_A.to(dev, _F64)) * mb.U_A.to(dev, _F64)).sum(dim=1).to(sd)  # [p, in]
        cb = ((B.to(_F64) - mb.mu_B.to(dev, _F64)) * mb.U_B.to(dev, _F64)).sum(dim=2).to(sd)  # [p, out]
        one = ModuleBasis(mb.mu_A, mb.U_A, ca.unsqueeze(0).cpu(), mb.mu_B, mb.U_B, cb.unsqueeze(0).cpu())
        fx = _fixed(A, B)
        num = _module_errors(fx, *_all_factors(_to(one, dev)))
        num2[mname], den2[mname] = float(num[0]), float(fx.den2[0])
        modules[mname] = ModuleBasis(
            mu_A=mb.mu_A,
            U_A=mb.U_A,
            C_A=torch.cat([mb.C_A, one.C_A]),
            mu_B=mb.mu_B,
            U_B=mb.U_B,
            C_B=torch.cat([mb.C_B, one.C_B]),
        )
    return RmmBasis(
        modules=modules,
        members=[*basis.members, label],
        r=basis.r,
        dtypes=[*basis.dtypes, adapter.dtype],
        configs=[*copy.deepcopy(basis.configs), copy.deepcopy(adapter.config)],
        errors=[*basis.errors, member_error(label, num2, den2)],
        fan_in_fan_out=basis.fan_in_fan_out,
        n_fit=basis.n_fit,
        method=basis.method,
        storage_dtype=basis.storage_dtype,
        extra=dict(basis.extra),
    )


def _to(mb: ModuleBasis, dev: torch.device) -> ModuleBasis:
    return ModuleBasis(**{f: t.to(dev) for f, t in vars(mb).items()})


# ---------------------------------------------------------------------------------------------
# Files


_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (torch.float16, torch.bfloat16, _F32, _F64)}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def save_basis(basis: RmmBasis, path: str | os.PathLike[str]) -> None:
    """Write ``basis`` as one safetensors file (tensors ``<module>.lora_{A,B}.{mu,U,C}``, laid out as
    in :class:`ModuleBasis`); the
    string metadata holds format/version, method, members, n, n_fit, r, p per module, source and
    storage dtypes, fan_in_fan_out, the member configs and the member errors (JSON). Deterministic
    bytes: same basis, same file."""
    tensors = {
        f"{name}.{suffix}": t.detach().to("cpu").contiguous()
        for name, mb in basis.modules.items()
        for suffix, t in mb.tensors().items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": basis.method,
        "members": json.dumps(basis.members),
        "n": str(basis.n),
        "n_fit": str(basis.n_fit),
        "r": str(basis.r),
        "p": json.dumps(basis.p),
        "dtypes": json.dumps([_dtype_name(dt) for dt in basis.dtypes]),
        "storage_dtype": _dtype_name(basis.storage_dtype),
        "fan_in_fan_out": json.dumps(basis.fan_in_fan_out),
        "storage_ratio": repr(basis.storage_ratio()),
        "configs": json.dumps(basis.configs),
        "errors": json.dumps([e.to_json() for e in basis.errors]),
        **basis.extra,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, target, metadata)


_SUFFIXES = ("lora_A.mu", "lora_A.U", "lora_A.C", "lora_B.mu", "lora_B.U", "lora_B.C")


def _open_basis(path: str | os.PathLike[str]) -> tuple[FormatFile, dict[str, Any], dict[str, int]]:
    """The open file, its parsed metadata and p per module, every tensor's shape and dtype checked
    against the metadata from the header alone (no tensor is read)."""
    f = FormatFile(path, FORMAT, FORMAT_VERSION, "an RMM basis")
    where, meta = f.where, f.meta
    if meta.get("method") != METHOD:
        raise CheckpointFormatError(f"{where}: unsupported basis method {meta.get('method')!r}")
    try:
        members = [str(m) for m in json.loads(meta["members"])]
        p_per_module = {str(k): int(v) for k, v in json.loads(meta["p"]).items()}
        r, n, n_fit = int(meta["r"]), int(meta["n"]), int(meta["n_fit"])
        dtypes = [_DTYPES[s] for s in json.loads(meta["dtypes"])]
        storage_dtype = _DTYPES[meta["storage_dtype"]]
        configs = [dict(c) for c in json.loads(meta["configs"])]
        errors = [MemberError.from_json(e) for e in json.loads(meta["errors"])]
        fifo = bool(json.loads(meta["fan_in_fan_out"]))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointFormatError(f"{where}: malformed basis metadata: {exc!r}") from exc
    if not (len(members) == n == len(dtypes) == len(configs) == len(errors)):
        raise CheckpointFormatError(f"{where}: member lists disagree with n={n}")
    expected = {f"{m}.{x}" for m in p_per_module for x in _SUFFIXES}
    if set(f.names) != expected:
        odd = sorted(set(f.names) ^ expected)
        raise CheckpointFormatError(f"{where}: tensors do not match the modules in the metadata: {odd[:5]}")
    for name, p in p_per_module.items():
        mu_a, u_a, c_a, mu_b, u_b, c_b = (f.shape(f"{name}.{x}") for x in _SUFFIXES)
        rk, d = (mu_a[0], mu_a[1]) if len(mu_a) == 2 else (-1, -1)
        m = mu_b[0] if len(mu_b) == 2 else -1
        shapes_ok = (
            0 < rk <= r
            and mu_a == (rk, d)
            and u_a == (p, rk, d)
            and c_a == (n, p, d)
            and mu_b == (m, rk)
            and u_b == (p, m, rk)
            and c_b == (n, p, m)
        )
        if not shapes_ok or {f.dtype(f"{name}.{x}") for x in _SUFFIXES} != {storage_dtype}:
            raise CheckpointFormatError(f"{where}: {name}: tensor shapes/dtypes do not match the metadata")
    fields = {"members": members, "r": r, "n_fit": n_fit, "dtypes": dtypes, "configs": configs, "errors": errors,
              "fan_in_fan_out": fifo, "storage_dtype": storage_dtype}
    return f, fields, p_per_module


def load_basis(path: str | os.PathLike[str]) -> RmmBasis:
    """Read a basis written by :func:`save_basis`; reconstructions are bit-identical to the
    in-memory basis it came from. Raises :class:`CheckpointFormatError` on anything malformed."""
    f, fields, p_per_module = _open_basis(path)
    modules = {name: ModuleBasis(*(f.tensor(f"{name}.{x}") for x in _SUFFIXES)) for name in p_per_module}
    meta = f.meta
    known = {"format", "format_version", "method", "members", "n", "n_fit", "r", "p", "dtypes"}
    known |= {"storage_dtype", "fan_in_fan_out", "storage_ratio", "configs", "errors"}
    return RmmBasis(modules=modules, extra={k: v for k, v in meta.items() if k not in known}, **fields)


def load_member_files(path: str | os.PathLike[str], member: int | str) -> MemberFiles:
    """:meth:`RmmBasis.member_files` of the basis in ``path`` without loading it: the file is
    checked from its header, and each module's μ, U and this member's row of C are read when the
    module's bytes are first asked for (the other members' coefficients never are). Same bytes."""
    f, fields, p_per_module = _open_basis(path)
    shapes = {name: (f.shape(f"{name}.lora_A.mu"), f.shape(f"{name}.lora_B.mu")) for name in p_per_module}
    stub = RmmBasis(  # dimensions only: zero directions, no coefficients read
        modules={name: ModuleBasis(torch.empty(a), torch.empty(0, *a), torch.empty(0, 0, a[1]), torch.empty(b),
                                   torch.empty(0, *b), torch.empty(0, 0, b[0])) for name, (a, b) in shapes.items()},
        **fields,
    )
    i = stub.index(member)

    def module(name: str) -> tuple[ModuleBasis, int]:
        t = {x: f.rows(f"{name}.{x}", i, i + 1) if x.endswith(".C") else f.tensor(f"{name}.{x}") for x in _SUFFIXES}
        return ModuleBasis(*(t[x] for x in _SUFFIXES)), 0

    return stub.member_files(i, module)
