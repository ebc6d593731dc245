"""Where the weight math runs.

``REGISTRY_DEVICE`` = ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. Functions in
:mod:`registry.weights` take an optional ``device`` argument; ``None`` means "read
``REGISTRY_DEVICE``" so the library honours the same setting as the service.
"""

from __future__ import annotations

import os

import torch

from .errors import WeightsError

_VALID = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the torch device for ``device`` (``auto``/``cpu``/``cuda``/``cuda:N`` or ``None``)."""
    if isinstance(device, torch.device):
        return device
    spec = (device or os.environ.get("REGISTRY_DEVICE") or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise WeightsError(f"REGISTRY_DEVICE={spec!r} but CUDA is not available on this machine")
        return torch.device(spec)
    raise WeightsError(f"unknown device {spec!r}; expected one of {', '.join(_VALID)} or cuda:N")
