"""The probe loops: :func:`probe_training` trains a model and probes it every ``every`` steps
(a plain training loop around :class:`~fisherlab.fisher_probe.FisherProbe`); :func:`run_probe`
is ``fisherlab probe``, that loop on one of the papers' problems, written to a results file.

One probe pass feeds every method and metric of a snapshot; the pass happens on the batch
the next training step uses, before that step, and does not disturb it. Under
``torch.distributed`` each process probes and trains on its contiguous rows of the global
batch (:func:`~fisherlab.distributed.split_global_batch`), gradients summed over processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
import xarray as xr
from torch import Tensor, nn
from torch import distributed as dist
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig, apply_threads, select_device
from fisherlab.data import announce_data
from fisherlab.distributed import Shard, all_reduce_sum, local_rows, split_global_batch
from fisherlab.fisher_probe import FisherProbe
from fisherlab.launch import build_training, check_memory, join_process_group, resolve_layers
from fisherlab.losses import LossKind, as_enum, per_sample_loss
from fisherlab.problems import get_problem
from fisherlab.results import ResultsWriter, run_attrs

__all__ = ["probe_training", "run_probe", "train_step"]


def train_step(
    model: nn.Module,
    loss: LossKind,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    iteration: int,
    shard: Shard | None = None,
) -> float:
    """One training step on the batch; with ``shard``, on this process's rows of the global batch,
    the gradients summed over processes (every process takes the same step as one process would)."""
    optimizer.zero_grad(set_to_none=True)
    n = x.shape[0] if shard is None else shard.n_total
    total = per_sample_loss(loss, model(x), y).sum()
    value = float(all_reduce_sum(total.detach(), shard)) / n
    if not math.isfinite(value):
        raise FisherlabError(
            f"training loss became {value} at iteration {iteration}; lower --lr (snapshots so far are saved)"
        )
    (total / n).backward()
    if shard is not None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=shard.group)
    optimizer.step()
    return value


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
    """Train ``model`` for ``config.iterations`` steps, probing every ``config.every``: a plain
    training loop around :class:`FisherProbe`.

    Under ``torch.distributed`` every process's ``batches`` must yield the same global batches;
    each process probes and trains on its contiguous rows (gradients summed over processes), so
    the run equals one process on the global batch; only rank 0 writes.

    Works for any model (its layers of a registered kind are probed) and any batch iterator; the CLI
    calls it through :func:`run_probe`. Uses ``config`` for the probe and analysis
    settings (problem fields are ignored).

    Returns:
        The dataset of all snapshots (also on disk when ``writer`` is given).
    """
    config.check()
    return _probe_training(model, loss, batches, optimizer, config, layers=layers, writer=writer, progress=progress)


def _probe_training(
    model: nn.Module,
    loss: LossKind | str,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    config: ProbeConfig,
    *,
    layers: dict[str, nn.Module] | list[str] | None,
    writer: ResultsWriter | None,
    progress: bool,
) -> xr.Dataset:
    """:func:`probe_training` of a checked ``config``."""
    loss = as_enum(LossKind, loss, "loss")
    batches = iter(batches)
    fisher_probe = FisherProbe(model, loss, layers=layers, config=config, writer=writer)
    distributed = dist.is_available() and dist.is_initialized()
    leader = not distributed or dist.get_rank() == 0
    bar = tqdm(total=config.iterations, desc="probe", unit="it", disable=not (progress and leader), dynamic_ncols=True)
    try:
        for it in range(config.iterations + 1):
            try:
                x, y = next(batches)
            except StopIteration:
                raise FisherlabError(
                    f"the batch iterator ended after {it} batches; a run of {config.iterations} iterations needs "
                    f"{config.iterations + 1} (pass an endless iterator, e.g. itertools.cycle(loader))"
                ) from None
            shard = split_global_batch(x.shape[0]) if distributed else None
            x, y = local_rows(x, shard), local_rows(y, shard)  # every process is handed the global batch: its rows
            snapshot = fisher_probe.step(it, x, y, shard=shard)
            if snapshot is not None:
                latest = snapshot.isel(iteration=-1, layer=0)
                summary = {m: f"{float(latest['frobenius_error'][i]):.3f}" for i, m in enumerate(config.methods)}
                bar.set_postfix(loss=f"{float(latest['train_loss']):.4g}", **summary)
            if it < config.iterations:
                train_step(model, loss, optimizer, x, y, it, shard)
                bar.update(1)
    finally:
        bar.close()
    return fisher_probe.dataset


def run_probe(config: ProbeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run ``fisherlab probe`` on one of the papers' problems and write ``out``.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence.
    """
    config.check()
    apply_threads(config.threads)
    problem = get_problem(config.problem).sized(config.size)
    config = replace(config, layers=resolve_layers(problem, config.layers))
    config.check_store_factors()  # before any work (FisherProbe checks it against the layers it finds)
    device = select_device(config.device)
    started = join_process_group(device, config)
    if dist.is_available() and dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    leader = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    dtype = config.dtype.dtype
    try:
        # rank 0 refuses an existing or locked output before any work; other ranks write nothing
        with ResultsWriter(out, {}, overwrite=overwrite) if leader else contextlib.nullcontext() as writer:
            data = problem.data(config.data_dir, seed=config.seed)
            if config.batch_size and config.batch_size > data.train.shape[0]:
                raise FisherlabError(
                    f"--batch-size {config.batch_size} exceeds the {data.train.shape[0]} training examples of "
                    f"{data.source}"
                )
            check_memory(problem, data, config, device)
            if writer is not None:
                announce_data(data.source, data.stand_in)
                writer.attrs.update(run_attrs(config, device, data.source, problem.loss, stand_in=data.stand_in))
            t0 = time.perf_counter()
            model, optimizer, batches = build_training(problem, data, config, device, dtype)
            result = _probe_training(  # the config is checked
                model,
                problem.loss,
                batches,
                optimizer,
                config,
                layers=list(config.layers),
                writer=writer,
                progress=progress,
            )
            if writer is not None:
                total = time.perf_counter() - t0
                print(
                    f"fisherlab: results: {writer.appended} snapshots appended in {writer.write_seconds:.2f} s "
                    f"({100 * writer.write_seconds / max(total, 1e-9):.2f}% of the run's {total:.1f} s)",
                    file=sys.stderr,
                )
        if started:
            dist.barrier()  # no rank tears the group down while another finishes its last step
        return result
    finally:
        if started:
            dist.destroy_process_group()
