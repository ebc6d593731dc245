"""Exception types raised by :mod:`registry.weights`.

Every error the weight math raises on bad input is a :class:`WeightsError`, so callers (the
services layer, the API) can turn it into a clear 4xx without catching unrelated bugs.
"""

from __future__ import annotations


class WeightsError(ValueError):
    """Base class: the inputs cannot be processed as asked."""


class AdapterFormatError(WeightsError):
    """A PEFT adapter folder or file is missing, malformed or inconsistent."""


class UnsupportedAdapterError(WeightsError):
    """A valid PEFT adapter uses a feature the registry cannot represent exactly
    (DoRA magnitudes, LoRA bias, modules_to_save, non-LoRA PEFT types)."""


class IncompatibleAdaptersError(WeightsError):
    """Adapters that must share modules, ranks or shapes do not."""


class NonFiniteError(WeightsError):
    """A tensor holds NaN or Inf values."""


class ShapeMismatchError(WeightsError):
    """Tensors that must have matching shapes do not (and no padding rule applies)."""


class CheckpointFormatError(WeightsError):
    """A safetensors checkpoint (single file or sharded index) is missing or malformed."""


class MergeParamsError(WeightsError):
    """Unknown merge method, or merge parameters that are missing, unknown or out of range."""


class CompressionParamsError(WeightsError):
    """A compression budget or method list that cannot be used (negative, NaN, not a number, unknown
    method)."""
