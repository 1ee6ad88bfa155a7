"""``fisherlab train``: compare optimizers on a problem (K §4.2, Figure 2; T §4, Figures 2-4).

Each optimizer trains a fresh copy of the network (same seed, same batch order) and records
training and validation loss after every epoch against epoch and wall time. Optional grid
search over learning rate and damping keeps the setting with the lowest final training loss
(as the papers do); early stopping ends a run after ``patience`` epochs without improvement
(T §4: patience 10). Results go to one xarray dataset with dims ``optimizer``, ``epoch``.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError
from fisherlab.config import TrainConfig, apply_threads, select_device
from fisherlab.data import announce_data
from fisherlab.losses import per_sample_loss
from fisherlab.optim import KroneckerOptimizer, make_optimizer
from fisherlab.problems import Problem, get_problem
from fisherlab.results import ResultsWriter, annotate, config_json

__all__ = ["run_training"]


def _mean_loss(model: torch.nn.Module, problem: Problem, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-sample loss over ``x``; NaN for an empty set (no validation data), never 0."""
    if x.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        total = 0.0
        for start in range(0, x.shape[0], 1024):
            total += float(per_sample_loss(problem.loss, model(x[start : start + 1024]), y[start : start + 1024]).sum())
    return total / x.shape[0]


def _train_one(
    name: str,
    problem: Problem,
    config: TrainConfig,
    lr: float | None,
    damping: float,
    data: dict,
    device: torch.device,
    progress: bool,
    on_epoch: Callable[[dict[str, np.ndarray]], None] = lambda _: None,
) -> dict[str, np.ndarray]:
    """Train one optimizer setting; returns per-epoch arrays (NaN after early stopping) and,
    under ``"lr"``, the learning rate the optimizer used (the given one or its default).

    ``on_epoch`` sees the arrays after every epoch (the caller writes them to disk).
    """
    model = problem.model(seed=config.seed, device=device)
    kw = (
        {}
        if name in ("sgd", "adam")
        else {"damping": damping, "kl_clip": config.kl_clip, "t1": config.t1, "t2": config.t2, "seed": config.seed}
    )
    opt = make_optimizer(name, model, problem.loss, lr=lr, weight_decay=config.weight_decay, **kw)
    n_train = data["images"].train.shape[0]
    n_batches = n_train // min(config.batch_size or problem.batch_size, n_train)
    if config.max_batches:
        n_batches = min(n_batches, config.max_batches)
    batches = problem.batches(data["images"], batch_size=config.batch_size, seed=config.seed, device=device)
    out = {k: np.full(config.epochs + 1, np.nan) for k in ("train_loss", "valid_loss", "wall_time")}
    out["lr"] = np.array([float(opt.param_groups[0]["lr"])])
    out["train_loss"][0] = _mean_loss(model, problem, data["x"], data["y"])
    out["valid_loss"][0] = _mean_loss(model, problem, data["vx"], data["vy"])
    out["wall_time"][0] = 0.0
    best, stale, clock = out["train_loss"][0], 0, 0.0
    for epoch in tqdm(range(1, config.epochs + 1), desc=name, disable=not progress, leave=False):
        start = time.perf_counter()
        for _ in range(n_batches):
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = per_sample_loss(problem.loss, model(x), y).mean()
            if not torch.isfinite(loss):
                raise FisherlabError(
                    f"{name} diverged (loss {float(loss.detach())}) at epoch {epoch}; lower --lr or raise --damping"
                )
            loss.backward()
            opt.step(inputs=x) if isinstance(opt, KroneckerOptimizer) else opt.step()
        clock += time.perf_counter() - start
        out["train_loss"][epoch] = _mean_loss(model, problem, data["x"], data["y"])
        out["valid_loss"][epoch] = _mean_loss(model, problem, data["vx"], data["vy"])
        out["wall_time"][epoch] = clock
        on_epoch(out)
        if out["train_loss"][epoch] < best:
            best, stale = out["train_loss"][epoch], 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return out


def run_training(config: TrainConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Train every optimizer (with optional grid search) and write the comparison dataset.

    The file is rewritten after every epoch (attribute ``complete = 0`` until the last
    optimizer finishes), so an interrupted run keeps every finished epoch. An optimizer in
    the middle of its grid search shows its best finished grid point, or the running one.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence of
            every grid point of an optimizer.
    """
    from fisherlab._version import __version__

    apply_threads(config.threads)
    problem = get_problem(config.problem)
    device = select_device(config.device)
    with ResultsWriter(out, {}, overwrite=overwrite) as writer:  # refuses an existing or locked output before any work
        images = problem.data(config.data_dir, seed=config.seed)
        if config.batch_size and config.batch_size > images.train.shape[0]:
            raise FisherlabError(
                f"--batch-size {config.batch_size} exceeds the {images.train.shape[0]} training examples of "
                f"{images.source}"
            )
        announce_data(images.source, images.stand_in)
        if images.valid.shape[0] == 0:
            print(
                f"fisherlab: warning: {images.source} leaves no validation images; valid_loss is recorded as NaN",
                file=sys.stderr,
            )
        x = images.train[: config.eval_samples].to(device)  # the losses are measured on these (all by default)
        vx = images.valid[: config.eval_samples].to(device)
        data = {
            "images": images,
            "x": problem.inputs(x),
            "y": problem.targets(x, images.train_labels, seed=config.seed),
            "vx": problem.inputs(vx),
            "vy": problem.targets(vx, images.valid_labels, seed=config.seed),
        }
        writer.attrs.update(
            {
                "title": f"fisherlab train: {problem.name}",
                "problem": problem.name,
                "data_source": images.source,
                "stand_in": int(images.stand_in),
                "config_json": config_json(config),
                "fisherlab_version": __version__,
                "torch_version": torch.__version__,
                "device": str(device),
                "complete": 0,
            }
        )
        results: dict[str, tuple[dict[str, np.ndarray], float, float]] = {}  # optimizer -> (arrays, lr, damping)

        def save() -> xr.Dataset:
            return writer.write(_training_dataset(config, results))

        for name in config.optimizers:
            lrs: tuple[float | None, ...] = config.lr or (None,)
            dampings = config.damping if name not in ("sgd", "adam") else (config.damping[0],)
            best: tuple[float, dict, float | None, float] | None = None
            for lr, damping in itertools.product(lrs, dampings):
                chosen_damping = damping if name not in ("sgd", "adam") else np.nan
                # until a grid point of this optimizer has finished, the file shows the running one
                on_epoch = partial(_show_running, results, save, name, chosen_damping) if best is None else _ignore
                try:
                    res = _train_one(name, problem, config, lr, damping, data, device, progress, on_epoch)
                except FisherlabError:
                    if len(lrs) * len(dampings) == 1:
                        raise
                    continue  # a diverging grid point is skipped, as in a grid search
                final = float(np.nanmin(res["train_loss"]))
                if best is None or final < best[0]:
                    best = (final, res, lr, damping)
                    results[name] = (res, float(res["lr"][0]), chosen_damping)
                    save()
            if best is None:
                raise FisherlabError(f"every grid point of {name} diverged")
        writer.attrs["complete"] = 1
        return save()


def _show_running(
    results: dict, save: Callable[[], object], name: str, damping: float, arrays: dict[str, np.ndarray]
) -> None:
    results[name] = (arrays, float(arrays["lr"][0]), damping)
    save()


def _ignore(arrays: dict[str, np.ndarray]) -> None:
    del arrays


def _training_dataset(
    config: TrainConfig, results: dict[str, tuple[dict[str, np.ndarray], float, float]]
) -> xr.Dataset:
    """The comparison dataset (dims ``optimizer``, ``epoch``) of the optimizers trained so far."""
    names = [n for n in config.optimizers if n in results]
    ds = xr.Dataset(
        {
            k: (("optimizer", "epoch"), np.stack([results[n][0][k] for n in names]))
            for k in ("train_loss", "valid_loss", "wall_time")
        }
        | {
            "lr": (("optimizer",), np.array([results[n][1] for n in names], dtype=np.float64)),
            "damping": (("optimizer",), np.array([results[n][2] for n in names], dtype=np.float64)),
        },
        coords={"optimizer": np.array(names, dtype=object), "epoch": np.arange(config.epochs + 1, dtype=np.int32)},
    )
    return annotate(ds)
