"""Tasks built from scikit-learn's bundled 8×8 digits (1 797 images, nothing downloaded).

Every task uses the same fixed, stratified train/test split of the images (70 % / 30 %, seeded) and
changes either the images (a *domain*) or the labels (a *label task*):

==============  ================================================================================
task            what changes
==============  ================================================================================
``rot90``       images rotated by 90° (counter-clockwise)
``hflip``       images mirrored left-right
``vflip``       images mirrored top-bottom
``invert``      intensities inverted, x → 1 − x
``noise``       heavy Gaussian pixel noise, σ = 0.5 on [0, 1] intensities (fixed draw per split)
``shuffle``     a fixed random permutation of the 64 pixels (the same for train and test)
``label_shift`` labels permuted, y → (y + 3) mod 10 (images unchanged)
``parity``      labels replaced by y mod 2 (images unchanged; 2 of the 10 outputs used)
==============  ================================================================================

The base models are trained on the untransformed images (:func:`original`) and, for base v2, on
an augmented copy of them (:func:`augmented`: random ±1-pixel shifts plus mild noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TASKS: tuple[str, ...] = ("rot90", "hflip", "vflip", "invert", "noise", "shuffle", "label_shift", "parity")
SPLIT_SEED = 0
TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Split:
    """Images as float32 [N, 64] in [0, 1] (noise tasks may leave the range) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Task:
    name: str
    train: Split
    test: Split


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return xtr, xte, ytr, yte


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), 64))), torch.from_numpy(y))


def original() -> Task:
    """The untransformed digits (what base v1 is trained on)."""
    xtr, xte, ytr, yte = _images()
    return Task("original", _split(xtr, ytr), _split(xte, yte))


def _shift_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image shifted by a random offset in {−1, 0, 1}² (zero fill), plus Gaussian noise σ = 0.1."""
    out = np.zeros_like(x)
    for i, img in enumerate(x):
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
        padded = np.pad(img, 1)
        out[i] = padded[1 - dy : 9 - dy, 1 - dx : 9 - dx]
    return (out + rng.normal(0.0, 0.1, size=out.shape)).astype(np.float32)


def augmented(copies: int = 4, seed: int = 1) -> Split:
    """Base v2's training data: the original training images plus ``copies`` shifted-and-noisy copies
    (:func:`_shift_noise`)."""
    xtr, _, ytr, _ = _images()
    rng = np.random.default_rng(seed)
    xs = [xtr] + [_shift_noise(xtr, rng) for _ in range(copies)]
    return _split(np.concatenate(xs), np.concatenate([ytr] * (copies + 1)))


def shifted_test(seed: int = 2) -> Split:
    """The test images shifted and noised like base v2's extra data (where v2 should beat v1)."""
    _, xte, _, yte = _images()
    return _split(_shift_noise(xte, np.random.default_rng(seed)), yte)


ImageFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
LabelFn = Callable[[np.ndarray], np.ndarray]


def _transform(name: str) -> tuple[ImageFn, LabelFn]:
    same_x: ImageFn = lambda x, rng: x  # noqa: E731
    same_y: LabelFn = lambda y: y  # noqa: E731
    perm = np.random.default_rng(1234).permutation(64)
    images: dict[str, ImageFn] = {
        "rot90": lambda x, rng: np.rot90(x, 1, axes=(1, 2)),
        "hflip": lambda x, rng: x[:, :, ::-1],
        "vflip": lambda x, rng: x[:, ::-1, :],
        "invert": lambda x, rng: 1.0 - x,
        "noise": lambda x, rng: x + rng.normal(0.0, 0.5, size=x.shape).astype(np.float32),
        "shuffle": lambda x, rng: x.reshape(len(x), 64)[:, perm].reshape(x.shape),
    }
    labels: dict[str, LabelFn] = {
        "label_shift": lambda y: (y + 3) % 10,
        "parity": lambda y: y % 2,
    }
    if name in images:
        return images[name], same_y
    if name in labels:
        return same_x, labels[name]
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")


def make_task(name: str) -> Task:
    """One task: the fixed split with its image and label transforms (seeded per task and split)."""
    fx, fy = _transform(name)
    xtr, xte, ytr, yte = _images()
    seed = 100 + TASKS.index(name)
    tr = fx(xtr, np.random.default_rng([seed, 0])).astype(np.float32)
    te = fx(xte, np.random.default_rng([seed, 1])).astype(np.float32)
    return Task(name, _split(tr, fy(ytr)), _split(te, fy(yte)))


def make_tasks(names: tuple[str, ...] = TASKS) -> list[Task]:
    return [make_task(n) for n in names]
