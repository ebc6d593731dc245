"""MUSCLE update-compatibility metrics on hand-computed examples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from registry.weights.compat import classification_compat, generative_compat
from registry.weights.errors import NonFiniteError, ShapeMismatchError, WeightsError

#        i:  0  1  2  3  4  5  6  7
V1 = [0, 1, 2, 1, 0, 2, 1, 0]
V2 = [0, 2, 2, 0, 1, 0, 1, 0]
Y = [0, 1, 2, 2, 1, 0, 1, 1]
# v1 correct at 0 1 2 6 (acc 4/8); v2 correct at 0 2 4 5 6 (5/8)
# negative flip: 1; positive flips: 4 5; v2 wrong and changed: 1 (2 vs 1), 3 (0 vs 1); 7 unchanged


def test_classification_hand_example() -> None:
    c = classification_compat(V1, V2, Y)
    assert (c.n, c.negative_flips, c.positive_flips) == (8, 1, 2)
    assert (c.accuracy_v1, c.accuracy_v2) == (0.5, 0.625)
    assert (c.nfr, c.pfr, c.nfr_mc) == (0.125, 0.25, 0.25)
    assert c.btc == pytest.approx(0.75)  # v2 keeps 3 of v1's 4 correct answers
    assert json.loads(json.dumps(c.as_dict())) == c.as_dict()
    # tensors and strings work the same
    t = classification_compat(torch.tensor(V1), torch.tensor(V2), torch.tensor(Y))
    assert t == c
    s = classification_compat(["a", "b"], ["a", "c"], ["a", "b"])
    assert (s.nfr, s.nfr_mc, s.btc) == (0.5, 0.5, 0.5)


def test_btc_undefined_when_v1_never_correct() -> None:
    c = classification_compat([1, 1], [0, 1], [0, 0])
    assert c.accuracy_v1 == 0.0 and c.btc is None and c.pfr == 0.5 and c.nfr == 0.0
    g = generative_compat([0.0, 0.0], [0.5, 0.0])
    assert g.btc is None


def test_identical_versions_are_fully_compatible() -> None:
    c = classification_compat(V1, V1, Y)
    assert (c.nfr, c.pfr, c.nfr_mc, c.btc) == (0.0, 0.0, 0.0, 1.0)


def test_generative_hand_example() -> None:
    s1 = [0.5, 0.75, 0.25, 1.0, 0.0]
    s2 = [0.75, 0.5, 0.25, 1.0, 0.5]  # D = [+0.25, -0.25, 0, 0, +0.5]
    g = generative_compat(s1, s2)
    assert (g.n, g.pfr, g.nfr, g.unchanged) == (5, 0.4, 0.2, 0.4)
    assert (g.gain, g.regression) == (0.375, 0.25)
    assert (g.mean_score_v1, g.mean_score_v2) == (0.5, 0.6)
    assert g.btc == pytest.approx(1 - 0.2 / 0.5)
    assert generative_compat(torch.tensor(s1, dtype=torch.float64), torch.tensor(s2, dtype=torch.float64)) == g
    flat = generative_compat([1.0, 1.0], [1.0, 1.0])
    assert flat.gain is None and flat.regression is None and flat.btc == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(ShapeMismatchError, match="differ in length"):
        classification_compat([1, 2], [1], [1, 2])
    with pytest.raises(ShapeMismatchError, match="differ in length"):
        generative_compat([1.0], [1.0, 0.0])
    with pytest.raises(WeightsError, match="at least one instance"):
        classification_compat([], [], [])
    with pytest.raises(WeightsError, match="at least one instance"):
        generative_compat([], [])
    with pytest.raises(NonFiniteError):
        generative_compat([math.nan], [1.0])
    with pytest.raises(ShapeMismatchError, match="1-D"):
        classification_compat(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(WeightsError, match="not a string"):
        classification_compat("abc", "abd", "abc")  # type: ignore[arg-type]
