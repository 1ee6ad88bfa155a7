"""Before a paper-problem run (fisherlab.launch): the layers ``--layers`` names, the memory a snapshot
needs (refused before any work when it does not fit), the problem's model, optimizer and batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from fisherlab import launch
from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.launch import build_training, check_memory, resolve_layers, snapshot_bytes
from fisherlab.problems import get_problem


def test_layers_all_names_every_probeable_layer() -> None:
    resnet = get_problem("resnet18")
    every = resolve_layers(resnet, ("all",))
    assert len(every) == 21 and every[0] == "conv1" and "layer4.1.conv2" in every and every[-1] == "fc"
    assert resolve_layers(get_problem("mnist"), ("2", "5")) == ("2", "5")
    with pytest.raises(FisherlabError, match=r"unknown layers \['layer9'\].*conv1, layer1.0.conv1"):
        resolve_layers(resnet, ("layer9",))


def test_a_snapshot_beyond_memory_is_refused_naming_the_setting(monkeypatch) -> None:
    """The estimate counts every probed layer's per-sample factors and the Gram matrix; a run beyond the
    memory there is names --mc-samples first when the Gram matrix dominates."""
    problem = get_problem("mnist")
    data = problem.data(seed=0)
    config = ProbeConfig(layers=("2", "5"), fisher="mc", mc_samples=4, batch_size=10)
    need = snapshot_bytes(problem, data, config, 10)
    assert need["directions"] == 4 and need["gram"] == (10 * 4) ** 2 * 8 and need["factors"] > 0
    monkeypatch.setattr(launch, "available_bytes", lambda device: need["factors"] + need["gram"] + 1)
    check_memory(problem, data, config, torch.device("cpu"))  # fits
    monkeypatch.setattr(launch, "available_bytes", lambda device: 1.0)
    with pytest.raises(FisherlabError, match=r"a snapshot needs about .* lower --mc-samples 4 or "):
        check_memory(problem, data, config, torch.device("cpu"))


@pytest.mark.parametrize("name", ["deeplinear64", "deeplinear14"])
def test_the_estimate_takes_models_with_batch_norm(name: str) -> None:
    """The estimate's forward pass of one sample ran batch norm in training mode, which refuses a batch of
    one: `fisherlab probe --problem deeplinear64` ended in a ValueError traceback."""
    problem = get_problem(name)
    need = snapshot_bytes(problem, problem.data(seed=0), ProbeConfig(problem=name, two_level=True), 8)
    layers = itertools.pairwise(problem.sizes)
    assert need["factors"] == sum(8 * (d_in + 1 + d_out) * 8 for d_in, d_out in layers)  # N (d_in + 1 + d_out)


def test_build_training_gives_the_problems_model_optimizer_and_batches() -> None:
    problem = get_problem("mnist")
    data = problem.data(seed=0)
    config = ProbeConfig(optimizer="adam", lr=3e-4, batch_size=7)
    model, optimizer, batches = build_training(problem, data, config, torch.device("cpu"), torch.float64)
    x, y = next(batches)
    assert y.shape[0] == 7
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 3e-4
    assert x.shape[0] == 7 and x.dtype == torch.float64 and model(x).shape[0] == 7
