"""One snapshot as one dataset row (fisherlab.snapshot): the values of the row are evaluate_block's on
the probe pass's factors, warm starts are kept for the next snapshot, a zero block warns once, and a
two-level row carries the whole-network variables per coarse space."""

from __future__ import annotations

import time
import warnings

import torch

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.config import ProbeConfig
from fisherlab.fisher import ExactBlock
from fisherlab.losses import LossKind
from fisherlab.metrics import evaluate_block
from fisherlab.probe import Probe
from fisherlab.results import validate
from fisherlab.snapshot import assemble_snapshot
from fisherlab.twolevel import TWO_LEVEL_METRICS
from tests.cases import regression_batch, small_mlp


def test_the_row_holds_evaluate_block_of_each_probed_layer() -> None:
    model = small_mlp((4, 5, 3))
    x, y = regression_batch(8)
    config = ProbeConfig(fisher="exact", methods=("kfac", "kpsvd"), metrics=("frobenius_error",), tol=1e-10)
    probe = Probe(model, LossKind.MSE, layers=["0", "2"], fisher=config.fisher)
    previous: dict = {}
    ds, snap = assemble_snapshot(3, probe, x, y, ["0", "2"], config, previous, time.perf_counter())
    validate(ds)
    assert list(ds["iteration"].values) == [3] and set(previous) == {"0", "2"}
    for name in ("0", "2"):
        ev = evaluate_block(ExactBlock(snap.factors[name]), ["kfac", "kpsvd"], config.approx, metrics=config.metrics)
        for method in ("kfac", "kpsvd"):
            row = float(ds["frobenius_error"].sel({"iteration": 3, "layer": name, "method": method}))
            assert abs(row - ev.values["frobenius_error"][method]) <= 1e-8 * max(1.0, abs(row))


def test_a_zero_block_warns_once_per_run() -> None:
    model = small_mlp((4, 5, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[2].weight.zero_()  # no output derivative reaches layer 0: its block is zero
    x, y = regression_batch(8)
    config = ProbeConfig(fisher="exact", methods=("kfac",), metrics=("frobenius_error",))
    probe = Probe(model, LossKind.MSE, layers=["0"], fisher=config.fisher)
    zero_warned: set[str] = set()
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        assemble_snapshot(0, probe, x, y, ["0"], config, {}, 0.0, zero_warned=zero_warned)
    assert zero_warned == {"0"} and any(issubclass(w.category, UndefinedMetricWarning) for w in first)
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        assemble_snapshot(1, probe, x, y, ["0"], config, {}, 0.0, zero_warned=zero_warned)
    assert not any(issubclass(w.category, UndefinedMetricWarning) for w in second)


def test_a_two_level_row_has_every_whole_network_variable() -> None:
    model = small_mlp((4, 5, 3))
    x, y = regression_batch(8)
    config = ProbeConfig(fisher="exact", methods=("kfac", "kpsvd"), metrics=("frobenius_error",), two_level=True)
    probe = Probe(model, LossKind.MSE, fisher=config.fisher)  # two-level: every layer
    ds, _ = assemble_snapshot(0, probe, x, y, ["2"], config, {}, 0.0)
    assert list(ds["layer"].values) == ["2"] and "tko" in list(ds["coarse_space"].values)
    for variable in TWO_LEVEL_METRICS:
        assert ds[variable.name].dims == variable.dims
