"""The probe loop: train a network and, every ``every`` iterations, probe the exact Fisher,
build every approximation, compute every registered metric and append it to the results.

One probe pass feeds every method and metric of a snapshot; the pass happens on the batch
the next training step uses, before that step, and does not disturb it. The metrics are
those of the registry (:data:`fisherlab.metrics.BLOCK_METRICS`, ``LAYER_METRICS`` and, with
``two_level``, :data:`fisherlab.twolevel.TWO_LEVEL_METRICS`); nothing here names one metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError
from fisherlab.approximations import Approximation, Method, approximate_all, warm_starts
from fisherlab.config import ProbeConfig, apply_threads, select_device
from fisherlab.data import announce_data
from fisherlab.fisher import ExactBlock
from fisherlab.losses import LossKind, per_sample_loss
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, evaluate_block
from fisherlab.operators import BlockDiagonal
from fisherlab.probe import Probe, ProbeSnapshot
from fisherlab.problems import get_problem
from fisherlab.results import ResultsWriter, annotate, config_json, run_attrs, snapshot_dataset
from fisherlab.twolevel import TWO_LEVEL_METRICS, two_level_metrics

__all__ = ["probe_training", "run_probe"]


def _step(
    model: nn.Module, loss: LossKind, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, iteration: int
) -> float:
    optimizer.zero_grad(set_to_none=True)
    value = per_sample_loss(loss, model(x), y).mean()
    if not torch.isfinite(value):
        raise FisherlabError(
            f"training loss became {float(value.detach())} at iteration {iteration}; "
            "lower --lr (snapshots so far are saved)"
        )
    value.backward()
    optimizer.step()
    return float(value.detach())


def probe_training(
    model: nn.Module,
    loss: LossKind | str,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    config: ProbeConfig,
    *,
    layers: dict[str, nn.Module] | list[str] | None = None,
    writer: ResultsWriter | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Train ``model`` for ``config.iterations`` steps, probing every ``config.every``.

    Works for any model built from Linear/Conv2d layers and any batch iterator; the CLI
    calls it through :func:`run_probe`. Uses ``config`` for the probe and analysis
    settings (problem fields are ignored).

    Returns:
        The dataset of all snapshots (also on disk when ``writer`` is given).
    """
    config.check()
    loss = LossKind(loss)
    batches = iter(batches)
    kwargs = {"fisher": config.fisher, "mc_samples": config.mc_samples, "seed": config.seed + 1}
    names = list(Probe(model, loss, layers=layers, **kwargs).layers)  # type: ignore[arg-type]
    probe = Probe(model, loss, layers=None if config.two_level else layers, **kwargs)  # type: ignore[arg-type]
    if writer is not None:
        probed = {f"{n}.{p}" if n else p for n, m in probe.layers.items() for p, _ in m.named_parameters(recurse=False)}
        skipped = [n for n, _ in model.named_parameters() if n not in probed]
        writer.attrs["probed_layers"] = ",".join(probe.layers)
        writer.attrs["skipped_parameters"] = ",".join(skipped) or "none"
    previous: dict[str, dict[Method, Approximation]] = {}
    snapshots: list[xr.Dataset] = []  # without a writer; with one, the writer keeps them
    t0 = time.perf_counter()
    bar = tqdm(total=config.iterations, desc="probe", unit="it", disable=not progress, dynamic_ncols=True)
    ds: xr.Dataset | None = None
    try:
        for it in range(config.iterations + 1):
            try:
                x, y = next(batches)
            except StopIteration:
                raise FisherlabError(
                    f"the batch iterator ended after {it} batches; a run of {config.iterations} iterations needs "
                    f"{config.iterations + 1} (pass an endless iterator, e.g. itertools.cycle(loader))"
                ) from None
            if it % config.every == 0:
                ds, snap = _snapshot(it, probe, x, y, names, config, previous, t0)
                if writer is not None:
                    for name in config.store_factors:
                        writer.store_factors(it, name, snap.factors[name].a, snap.factors[name].g)
                    ds = writer.append(ds)
                else:
                    snapshots.append(ds)
                latest = ds.isel(iteration=-1, layer=0)
                summary = {m.value: f"{float(latest['frobenius_error'][i]):.3f}" for i, m in enumerate(config.methods)}
                bar.set_postfix(loss=f"{float(latest['train_loss']):.4g}", **summary)
            if it < config.iterations:
                _step(model, loss, optimizer, x, y, it)
                bar.update(1)
    finally:
        bar.close()
    if writer is not None:
        assert ds is not None
        return ds  # writer.append returned the whole dataset, attributes included
    ds = annotate(xr.concat(snapshots, dim="iteration"))
    ds.attrs.update(
        {
            "problem": type(model).__name__,
            "data_source": "user data (probe_training)",
            "fisher": config.fisher.value,
            "spectrum": config.spectrum.value,
            "metrics": ",".join(config.metrics),
            "loss": loss.value,
            "config_json": config_json(config),
        }
    )
    return ds


def _snapshot(
    it: int,
    probe: Probe,
    x: Tensor,
    y: Tensor,
    names: list[str],
    config: ProbeConfig,
    previous: dict[str, dict[Method, Approximation]],
    t0: float,
) -> tuple[xr.Dataset, ProbeSnapshot]:
    """One snapshot: probe pass, every registered metric of every probed layer and method."""
    start = time.perf_counter()
    snap = probe(x, y)
    probe_time = time.perf_counter() - start
    methods = list(config.methods)
    per_method = {m.name: np.zeros((len(names), len(methods)), dtype=m.dtype) for m in BLOCK_METRICS}
    per_layer = {m.name: np.zeros(len(names), dtype=m.dtype) for m in LAYER_METRICS}
    if config.two_level:  # block-diagonal increments need every layer, not only the probed ones
        for name in snap.factors:
            if name not in names:
                block = ExactBlock(snap.factors[name])
                previous[name] = approximate_all(
                    block, methods, config.approx, warm=warm_starts(previous.get(name)), layer=name
                )
    for li, name in enumerate(names):
        ev = evaluate_block(
            ExactBlock(snap.factors[name]),
            methods,
            config.approx,
            spectrum=config.spectrum,
            metrics=config.metrics,
            warm=warm_starts(previous.get(name)),
            layer=name,
        )
        previous[name] = ev.approximations
        for metric, values in ev.values.items():
            per_method[metric][li] = [values[m] for m in methods]
        for metric, value in ev.layer_values.items():
            per_layer[metric][li] = value
    extra: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    coords: dict[str, list[str]] = {}
    scalars = {"train_loss": snap.loss, "probe_time": probe_time}
    if config.two_level:
        order = list(snap.factors)
        diagonals = {m: BlockDiagonal(tuple(previous[n][m].kron for n in order)) for m in methods}
        values, spaces = two_level_metrics(
            snap.whole_fisher(order),
            [snap.gradients[n] for n in order],
            diagonals,
            damping=config.damping,
            spaces=config.coarse_spaces,
            taylor_order=config.taylor_order,
        )
        for variable in TWO_LEVEL_METRICS:
            if len(variable.dims) == 1:
                scalars[variable.name] = float(values[variable.name])  # type: ignore[arg-type]
            else:
                extra[variable.name] = (variable.dims[1:], np.asarray(values[variable.name]))
        coords["coarse_space"] = spaces
    scalars["wall_time"] = time.perf_counter() - t0
    return snapshot_dataset(it, names, [m.value for m in methods], per_method, per_layer, scalars, extra, coords), snap


def run_probe(config: ProbeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run ``fisherlab probe`` on one of the papers' problems and write ``out``.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence.
    """
    config.check()
    apply_threads(config.threads)
    problem = get_problem(config.problem)
    known = problem.layer_names()
    bad = [name for name in config.layers if name not in known]
    if bad or not config.layers:
        listing = f"1 to {known[-1]}" if all(n.isdigit() for n in known) else ", ".join(known)
        raise FisherlabError(f"unknown layers {bad} for {problem.name}: it has layers {listing}")
    device = select_device(config.device)
    dtype = config.dtype.dtype
    with ResultsWriter(out, {}, overwrite=overwrite) as writer:  # refuses an existing or locked output before any work
        data = problem.data(config.data_dir, seed=config.seed)
        announce_data(data.source, data.stand_in)
        writer.attrs.update(run_attrs(config, device, data.source, problem.loss, stand_in=data.stand_in))
        model = problem.model(seed=config.seed, dtype=dtype, device=device)
        if config.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr or 1e-3)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr or 1e-2, momentum=0.9)
        batches = problem.batches(data, batch_size=config.batch_size, seed=config.seed, device=device, dtype=dtype)
        return probe_training(
            model,
            problem.loss,
            batches,
            optimizer,
            config,
            layers=list(config.layers),
            writer=writer,
            progress=progress,
        )
