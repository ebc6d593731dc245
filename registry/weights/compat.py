"""Update compatibility between two model versions (MUSCLE, Echterhoff et al., Findings of
EMNLP 2024).

An old version v1 and a new version v2 are evaluated on the same N instances.

Classification (predictions compared with labels by equality), counts over all N:

* negative flip: v1 correct and v2 wrong; ``NFR = #negative flips / N``;
* positive flip: v1 wrong and v2 correct; ``PFR = #positive flips / N``;
* ``NFR_mc = #{v2 wrong and v2 ≠ v1} / N`` (a wrong v2 answer that is also a *changed* answer);
* ``acc(v) = #{v correct} / N``; backward trust compatibility ``BTC = 1 − NFR / acc(v1)``
  (= the share of v1's correct instances that v2 keeps correct).

Generative (per-instance similarity scores ``S(v_i, y_i)`` from any metric), ``D_i = S(v2_i, y_i) −
S(v1_i, y_i)``:

* ``PFR = mean(D > 0)``, ``NFR = mean(D < 0)``;
* ``gain = mean(D_i | D_i > 0)``, ``regression = mean(−D_i | D_i < 0)`` (both ≥ 0; ``None`` when
  there is no such instance);
* ``acc(v1) = mean(S(v1_i, y_i))`` (the accuracy when S is 0/1 exact match); ``BTC = 1 − NFR / acc(v1)``.

``BTC`` is ``None`` when ``acc(v1) ≤ 0``: with no v1 success there is no trust to keep, and the
ratio is undefined. All arithmetic in float64. Inputs: plain sequences or 1-D tensors.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import NonFiniteError, ShapeMismatchError, WeightsError

__all__ = ["ClassificationCompat", "GenerativeCompat", "classification_compat", "generative_compat"]


def _as_list(x: Sequence[Any] | torch.Tensor, what: str) -> list[Any]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ShapeMismatchError(f"{what} must be 1-D, got shape {list(x.shape)}")
        return list(x.detach().cpu().tolist())
    if isinstance(x, str | bytes):
        raise WeightsError(f"{what} must be a sequence of values, not a string")
    return list(x)


def _same_length(**named: list[Any]) -> int:
    lengths = {k: len(v) for k, v in named.items()}
    n = next(iter(lengths.values()))
    if len(set(lengths.values())) != 1:
        raise ShapeMismatchError(f"inputs differ in length: {lengths}")
    if n == 0:
        raise WeightsError("compatibility metrics need at least one instance")
    return n


def _btc(nfr: float, acc_v1: float) -> float | None:
    return 1.0 - nfr / acc_v1 if acc_v1 > 0 else None


@dataclass(frozen=True)
class ClassificationCompat:
    """Flip rates between v1 and v2 on N labelled instances (see module docstring)."""

    n: int
    accuracy_v1: float
    accuracy_v2: float
    negative_flips: int
    positive_flips: int
    nfr: float
    pfr: float
    nfr_mc: float
    btc: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerativeCompat:
    """Score-difference flip rates between v1 and v2 on N instances (see module docstring)."""

    n: int
    mean_score_v1: float
    mean_score_v2: float
    pfr: float
    nfr: float
    unchanged: float
    gain: float | None
    regression: float | None
    btc: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def classification_compat(
    v1: Sequence[Hashable] | torch.Tensor,
    v2: Sequence[Hashable] | torch.Tensor,
    labels: Sequence[Hashable] | torch.Tensor,
) -> ClassificationCompat:
    """NFR, PFR, NFR_mc, accuracies and BTC from two prediction sets and the labels.

    ``NFR = #{v1 = y ∧ v2 ≠ y}/N``, ``PFR = #{v1 ≠ y ∧ v2 = y}/N``,
    ``NFR_mc = #{v2 ≠ y ∧ v2 ≠ v1}/N``, ``BTC = 1 − NFR/acc(v1)`` (``None`` if acc(v1) = 0).
    """
    p1, p2, y = _as_list(v1, "v1"), _as_list(v2, "v2"), _as_list(labels, "labels")
    n = _same_length(v1=p1, v2=p2, labels=y)
    c1 = [a == t for a, t in zip(p1, y, strict=True)]
    c2 = [b == t for b, t in zip(p2, y, strict=True)]
    neg = sum(1 for a, b in zip(c1, c2, strict=True) if a and not b)
    pos = sum(1 for a, b in zip(c1, c2, strict=True) if b and not a)
    mc = sum(1 for ok2, a, b in zip(c2, p1, p2, strict=True) if not ok2 and a != b)
    acc1, acc2 = sum(c1) / n, sum(c2) / n
    nfr = neg / n
    return ClassificationCompat(
        n=n,
        accuracy_v1=acc1,
        accuracy_v2=acc2,
        negative_flips=neg,
        positive_flips=pos,
        nfr=nfr,
        pfr=pos / n,
        nfr_mc=mc / n,
        btc=_btc(nfr, acc1),
    )


def generative_compat(
    scores_v1: Sequence[float] | torch.Tensor, scores_v2: Sequence[float] | torch.Tensor
) -> GenerativeCompat:
    """Flip rates from per-instance similarity scores ``S(v1_i, y_i)``, ``S(v2_i, y_i)``.

    ``D_i = S2_i − S1_i``; ``PFR = mean(D > 0)``, ``NFR = mean(D < 0)``, ``unchanged = mean(D = 0)``,
    ``gain = mean(D | D > 0)``, ``regression = mean(−D | D < 0)``, ``BTC = 1 − NFR / mean(S1)``
    (``None`` if mean(S1) ≤ 0). Non-finite scores raise :class:`NonFiniteError`.
    """
    s1 = [float(x) for x in _as_list(scores_v1, "scores_v1")]
    s2 = [float(x) for x in _as_list(scores_v2, "scores_v2")]
    n = _same_length(scores_v1=s1, scores_v2=s2)
    if not all(math.isfinite(x) for x in s1 + s2):
        raise NonFiniteError("similarity scores hold NaN or Inf values")
    d = [b - a for a, b in zip(s1, s2, strict=True)]
    up = [x for x in d if x > 0]
    down = [-x for x in d if x < 0]
    nfr = len(down) / n
    mean1 = math.fsum(s1) / n
    return GenerativeCompat(
        n=n,
        mean_score_v1=mean1,
        mean_score_v2=math.fsum(s2) / n,
        pfr=len(up) / n,
        nfr=nfr,
        unchanged=(n - len(up) - len(down)) / n,
        gain=math.fsum(up) / len(up) if up else None,
        regression=math.fsum(down) / len(down) if down else None,
        btc=_btc(nfr, mean1),
    )
