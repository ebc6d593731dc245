"""Merge methods as declarations: names, parameters (accepted, defaults, required) and the two
steps each runs (trim, elect). Plain Python (the API validates a merge request with exactly these
rules, :func:`get_method` then :meth:`MergeMethod.resolve`, before any job exists, without loading
the tensor library); :mod:`registry.weights.merge` runs them. A new method is one
:class:`MergeMethod` plus one entry in :data:`METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import MergeParamsError

__all__ = ["DARE_LINEAR", "DARE_MASK", "DARE_TIES", "METHODS", "TASK_ARITHMETIC", "TIES", "MergeMethod", "MergeParams",
           "ParamsLike", "get_method"]

Trim = Literal["none", "magnitude", "random"]
#: DARE's mask rule, the suffix of the DARE variants (``merge.dare_mask``): counter-based SplitMix64.
#: Variants without it (``dare_linear/rescaled``, ``dare_ties/rescaled/per-tensor``) drew
#: ``torch.bernoulli`` masks: the same seed gave other masks.
DARE_MASK = "splitmix64"
_PARAM_NAMES = ("weights", "lam", "density", "seed", "majority_sign")
_ALIASES = {"lambda": "lam"}


@dataclass(frozen=True)
class MergeParams:
    """Merge parameters; ``None`` means "not given" (:meth:`MergeMethod.resolve` fills defaults).

    ``weights``: one per input (default all 1). ``lam``: λ, scale of the merged task vector
    (default 1; the TIES paper uses 0.4 without validation data). ``density``: fraction kept --
    top-k fraction for TIES (default 0.2), keep probability ``1 − p`` for DARE (required).
    ``seed``: DARE seed (default 0). ``majority_sign``: ``"total"`` (default) or ``"frequency"``.
    """

    weights: tuple[float, ...] | None = None
    lam: float | None = None
    density: float | None = None
    seed: int | None = None
    majority_sign: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weights"] is not None:
            d["weights"] = list(d["weights"])
        return {k: v for k, v in d.items() if v is not None}


ParamsLike = MergeParams | Mapping[str, Any] | None


def _real(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise MergeParamsError(f"{name} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: name, declared parameters (``accepts``; ``defaults``; ``required``) and
    its two steps (``trim`` each task vector: none / magnitude top-k / random DARE drop; ``elect``
    signs + disjoint mean, or a weighted sum)."""

    name: str
    variant: str
    trim: Trim
    elect: bool
    accepts: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def resolve(self, params: ParamsLike, n_inputs: int) -> MergeParams:
        """Validate ``params`` for ``n_inputs`` inputs and fill defaults (raises
        :class:`MergeParamsError` with the reason)."""
        if n_inputs < 1:
            raise MergeParamsError(f"{self.name}: needs at least one input to merge")
        if params is None:
            raw: dict[str, Any] = {}
        elif isinstance(params, MergeParams):
            raw = {f.name: getattr(params, f.name) for f in fields(params)}
            raw = {k: v for k, v in raw.items() if v is not None}
        elif isinstance(params, Mapping):
            raw = {_ALIASES.get(str(k), str(k)): v for k, v in params.items()}
        else:
            raise MergeParamsError(f"params must be a mapping or MergeParams, got {type(params).__name__}")
        unknown = sorted(set(raw) - set(_PARAM_NAMES))
        if unknown:
            raise MergeParamsError(f"{self.name}: unknown parameter(s) {unknown}; known: {list(_PARAM_NAMES)}")
        foreign = sorted(k for k in raw if k not in self.accepts)
        if foreign:
            raise MergeParamsError(f"{self.name} does not take {foreign}; it takes {list(self.accepts)}")
        missing = [k for k in self.required if raw.get(k) is None]
        if missing:
            raise MergeParamsError(f"{self.name}: parameter(s) {missing} are required")
        v = {**self.defaults, **{k: x for k, x in raw.items() if x is not None}}
        weights = v.get("weights")
        if weights is None:
            w: tuple[float, ...] = (1.0,) * n_inputs
        else:
            if hasattr(weights, "tolist"):  # a tensor or an array
                weights = weights.tolist()
            if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
                raise MergeParamsError(f"weights must be a list of numbers, got {weights!r}")
            w = tuple(_real("weight", x) for x in weights)
            if len(w) != n_inputs:
                raise MergeParamsError(f"{self.name}: {len(w)} weights for {n_inputs} inputs")
        lam = _real("lam", v.get("lam", 1.0))
        density = v.get("density")
        if density is not None:
            density = _real("density", density)
            if not 0.0 < density <= 1.0:
                raise MergeParamsError(f"density must be in (0, 1], got {density}")
        seed = v.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise MergeParamsError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        sign = v.get("majority_sign")
        if sign is not None and sign not in ("total", "frequency"):
            raise MergeParamsError(f"majority_sign must be 'total' or 'frequency', got {sign!r}")
        return MergeParams(weights=w, lam=lam, density=density, seed=seed, majority_sign=sign)


TASK_ARITHMETIC = MergeMethod("task_arithmetic", "task_arithmetic", "none", False, ("weights", "lam"))
TIES = MergeMethod(
    "ties",
    "ties/per-tensor",
    "magnitude",
    True,
    ("weights", "lam", "density", "majority_sign"),
    {"density": 0.2, "majority_sign": "total"},
)
DARE_LINEAR = MergeMethod(
    "dare_linear",
    f"dare_linear/rescaled/mask-{DARE_MASK}",
    "random",
    False,
    ("weights", "lam", "density", "seed"),
    {"seed": 0},
    ("density",),
)
DARE_TIES = MergeMethod(
    "dare_ties",
    f"dare_ties/rescaled/per-tensor/mask-{DARE_MASK}",
    "random",
    True,
    ("weights", "lam", "density", "seed", "majority_sign"),
    {"seed": 0, "majority_sign": "total"},
    ("density",),
)
#: Name -> method. A new method is one :class:`MergeMethod` plus one entry here.
METHODS: dict[str, MergeMethod] = {m.name: m for m in (TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES)}


def get_method(method: str | MergeMethod) -> MergeMethod:
    """Look a method up by name (:class:`MergeParamsError` listing the known names if unknown)."""
    if isinstance(method, MergeMethod):
        return method
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise MergeParamsError(f"unknown merge method {method!r}; known: {sorted(METHODS)}") from None
