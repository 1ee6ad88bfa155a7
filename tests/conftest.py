"""Test-wide settings: one torch thread (tests use small tensors, where a thread pool costs CPU
time without saving wall time; the suite's CPU-time budget is 90 s), and the ``device``
fixture: ``cpu`` always, ``cuda`` (marked ``gpu``) when a GPU is present."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

DEVICES = [pytest.param("cpu")] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device in turn; science tests run their dense twins on it."""
    return torch.device(request.param)
