"""The probe loop over training (``probe_training``): layers of several shapes, one of them dying."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import torch
from torch import nn

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.config import ProbeConfig
from fisherlab.run import probe_training
from tests.cases import rng, small_mlp


def test_probe_of_several_layers_with_a_large_learning_rate() -> None:
    """Layers of different shapes, a learning rate that kills the ReLU units: no crash; a zero block
    warns and stores NaN, every other snapshot is finite (defect 9)."""
    model = small_mlp((6, 8, 5, 3), seed=3, activation=nn.ReLU)
    gen = rng(0)
    batches = itertools.cycle(
        [
            (
                torch.randn(16, 6, generator=gen, dtype=torch.float64),
                torch.rand(16, 3, generator=gen, dtype=torch.float64),
            )
            for _ in range(3)
        ]
    )
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    config = ProbeConfig(iterations=6, every=1, metrics=("frobenius_error",), tol=1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = probe_training(model, "mse", batches, opt, config, layers=["0", "2"], progress=False)
    norms = ds["fisher_frobenius_norm"].values
    assert (norms == 0).any(), "the case must kill a layer"
    err = ds["frobenius_error"].values
    assert np.isnan(err[norms == 0]).all() and np.isfinite(err[norms > 0]).all()
    assert any(issubclass(w.category, UndefinedMetricWarning) for w in caught)
