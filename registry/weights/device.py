"""Where the weight math runs.

``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Functions in
:mod:`registry.weights` take an optional ``device`` argument; ``None`` means ``auto``. The library
reads no settings: the service passes its ``REGISTRY_DEVICE`` (``settings.device``) explicitly.
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
    spec = (device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise WeightsError(f"device {spec!r} asked for, but CUDA is not available on this machine")
        return torch.device(spec)
    raise WeightsError(f"unknown device {spec!r}; expected one of {', '.join(_VALID)} or cuda:N")


def set_cpu_threads(threads: int) -> int:
    """Set torch's intra-op CPU thread count for this process and return it (the service passes
    ``REGISTRY_TORCH_THREADS``); 0 means half the cores, at least 1.

    The streamed weight math works on cache-sized chunks, where intra-op threads buy little on a
    quiet host and cost a great deal on a busy one: a worker and an API server share the host,
    and a torch thread that waits for a busy core stalls every chunk (``bench/transfer.py``
    measured 1 thread 25x faster than 2 on a loaded 2-core machine).
    """
    if threads < 0:
        raise WeightsError(f"torch threads must be >= 0, got {threads}")
    n = threads or max(1, (os.cpu_count() or 1) // 2)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
