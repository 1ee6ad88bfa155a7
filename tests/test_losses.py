"""Losses and their output Fisher: Monte Carlo targets drawn per position."""

from __future__ import annotations

import torch

from fisherlab.losses import LossKind, sample_targets
from tests.cases import rng
from tests.tolerances import MONTE_CARLO


def test_mc_targets_are_drawn_per_position() -> None:
    """MC sampling for [N, T, C] logits gives one class per position, distributed as softmax."""
    z = torch.log(torch.tensor([[[0.7, 0.2, 0.1]] * 4], dtype=torch.float64)).expand(5000, 4, 3)
    y = sample_targets(LossKind.CE, z, rng(0))
    assert y.shape == (5000, 4)
    freq = torch.bincount(y.flatten(), minlength=3) / y.numel()
    torch.testing.assert_close(freq.double(), torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), **MONTE_CARLO)
