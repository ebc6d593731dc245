"""Device and CPU-thread settings of the weight math."""

from __future__ import annotations

import os

import pytest
import torch

from registry.weights.device import resolve_device, set_cpu_threads
from registry.weights.errors import WeightsError


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_thread_count_is_applied() -> None:
    assert set_cpu_threads(1) == 1
    assert torch.get_num_threads() == 1


def test_auto_is_half_the_cores_at_least_one() -> None:
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert set_cpu_threads(0) == expected == torch.get_num_threads()


def test_negative_thread_count_is_refused() -> None:
    with pytest.raises(WeightsError, match=">= 0"):
        set_cpu_threads(-1)


def test_unknown_device_is_refused() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(WeightsError, match="unknown device"):
        resolve_device("tpu")
