"""One snapshot of a probed training run as one row of the results dataset.

:func:`assemble_snapshot` runs the probe pass on a batch, then for every probed layer
:func:`~fisherlab.metrics.evaluate_block` (every method, every registered metric) and, with
``two_level``, :func:`~fisherlab.twolevel.two_level_metrics_of_snapshot`; the values become one
``iteration`` of the results schema (:func:`~fisherlab.results.snapshot_dataset`). The metrics
are those of the registry (:data:`fisherlab.metrics.BLOCK_METRICS`, ``LAYER_METRICS`` and
:data:`fisherlab.twolevel.TWO_LEVEL_METRICS`); nothing here names one metric.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import xarray as xr
from torch import Tensor

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import Approximation, WarmStarts, approximate_all, warm_starts
from fisherlab.config import ProbeConfig
from fisherlab.distributed import Shard
from fisherlab.fisher import ExactBlock
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, evaluate_block
from fisherlab.probe import Batch, Probe, ProbeSnapshot
from fisherlab.results import snapshot_dataset
from fisherlab.twolevel import TWO_LEVEL_METRICS, two_level_metrics_of_snapshot

__all__ = ["assemble_snapshot"]


def assemble_snapshot(
    it: int,
    probe: Probe,
    x: Batch,
    y: Tensor | None,
    names: list[str],
    config: ProbeConfig,
    previous: dict[str, WarmStarts],
    t0: float,
    shard: Shard | None = None,
    zero_warned: set[str] | None = None,
    nan_warned: set[tuple[str, str]] | None = None,
) -> tuple[xr.Dataset, ProbeSnapshot]:
    """One snapshot: probe pass, every registered metric of every probed layer and method.

    Args:
        it: The iteration (the row's ``iteration`` coordinate).
        probe: The hooks (on every layer when ``config.two_level``, else on ``names``).
        x: This process's rows of the batch (a tensor, or a mapping of keyword inputs: :class:`Probe`).
        y: Their true targets (``None`` where the Fisher kind needs none, or a mapping's ``labels``).
        names: The probed layers (the ``layer`` coordinate).
        config: Methods, metrics, approximation and two-level settings.
        previous: Warm starts per layer from the last snapshot; updated in place.
        t0: ``time.perf_counter()`` at the start of the run (for ``wall_time``).
        shard: This process's rows of the global batch under ``torch.distributed``.
        zero_warned: Layers that warned already that their block is zero: they do not warn
            again; a layer that warns is added (the warning is given once per layer and run).
        nan_warned: The ``(metric, reason)`` pairs whose NaN warning (solve error, KL divergence) was given
            already (:func:`~fisherlab.metrics.evaluate_block`'s ``warned``): each is given once per run.

    Returns:
        The one-iteration dataset and the probe pass (its per-sample factors, for storing).
    """
    zero_warned = set() if zero_warned is None else zero_warned
    start = time.perf_counter()
    snap = probe(x, y, shard=shard)
    probe_time = time.perf_counter() - start
    methods = list(config.methods)
    per_method = {m.name: np.zeros((len(names), len(methods)), dtype=m.dtype) for m in BLOCK_METRICS}
    per_layer = {m.name: np.zeros(len(names), dtype=m.dtype) for m in LAYER_METRICS}
    # across snapshots only the warm starts are kept (a lifted approximation of a wide layer is
    # d_in² numbers per term); the two-level metrics need every layer's approximations of this one
    current: dict[str, dict[str, Approximation]] = {}
    if config.two_level:  # block-diagonal increments need every layer, not only the probed ones
        for name in snap.factors:
            if name not in names:
                block = snap.approx_block(name) or ExactBlock(snap.factors[name])  # --approx-fisher's kind
                current[name] = approximate_all(block, methods, config.approx, warm=previous.get(name), layer=name)
                previous[name] = warm_starts(current[name])
    for li, name in enumerate(names):
        with warnings.catch_warnings():
            if name in zero_warned:
                warnings.simplefilter("ignore", UndefinedMetricWarning)
            ev = evaluate_block(
                ExactBlock(snap.factors[name]),
                methods,
                config.approx,
                spectrum=config.spectrum,
                metrics=config.metrics,
                warm=previous.get(name),
                layer=name,
                damping=config.damping,
                gradient=snap.gradients.get(name),
                approx_block=snap.approx_block(name),
                warn_not_applicable=False,  # FisherProbe said it once for the run (methods_not_applicable)
                warned=nan_warned,
            )
        if not ev.layer_values["fisher_frobenius_norm"] > 0:
            zero_warned.add(name)
        previous[name] = dict(ev.warm_starts)  # without lifting the approximations of a wide layer
        if config.two_level:
            current[name] = ev.approximations
        for metric, values in ev.values.items():
            per_method[metric][li] = [values[m] for m in methods]
        for metric, value in ev.layer_values.items():
            per_layer[metric][li] = value
    extra: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    coords: dict[str, list[str]] = {}
    scalars = {"train_loss": snap.loss, "probe_time": probe_time}
    if config.two_level:
        network, spaces = two_level_metrics_of_snapshot(
            snap,
            current,
            methods,
            damping=config.damping,
            spaces=config.coarse_spaces,
            taylor_order=config.taylor_order,
        )
        for variable in TWO_LEVEL_METRICS:
            if len(variable.dims) == 1:
                scalars[variable.name] = float(network[variable.name])
            else:
                extra[variable.name] = (variable.dims[1:], np.asarray(network[variable.name]))
        coords["coarse_space"] = spaces
    scalars["wall_time"] = time.perf_counter() - t0
    return snapshot_dataset(it, names, list(methods), per_method, per_layer, scalars, extra, coords), snap
