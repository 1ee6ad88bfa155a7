"""``fisherlab train``: compare optimizers on a problem (K §4.2, Figure 2; T §4, Figures 2-4).

Each optimizer trains a fresh copy of the network (same seed, same batch order) and records
training and validation loss after every epoch against epoch and wall time. Optional grid
search over learning rate and damping keeps the setting with the lowest final training loss
(as the papers do); early stopping ends a run after ``patience`` epochs without improvement
(T §4: patience 10). Results go to one xarray dataset with dims ``optimizer``, ``epoch``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError
from fisherlab.optim import OPTIMIZER_NAMES, KroneckerOptimizer, make_optimizer
from fisherlab.probe import per_sample_loss
from fisherlab.problems import Problem, get_problem
from fisherlab.results import ResultsWriter
from fisherlab.run import select_device

__all__ = ["TrainConfig", "run_training"]


@dataclass
class TrainConfig:
    """Configuration of a ``fisherlab train`` run (stored in ``config_json``)."""

    problem: str = "curves"
    data_dir: str | None = None
    optimizers: tuple[str, ...] = ("sgd", "adam", "kfac", "kpsvd", "deflation")
    epochs: int = 3
    batch_size: int | None = None
    lr: tuple[float, ...] = ()
    damping: tuple[float, ...] = (1e-2,)
    weight_decay: float = 1e-3
    kl_clip: float | None = 1e-2
    t1: int = 5
    t2: int = 20
    patience: int = 10
    max_batches: int | None = None
    device: str = "auto"
    seed: int = 0

    def check(self) -> None:
        """Validate values; raises :class:`FisherlabError` with what was expected."""
        unknown = [o for o in self.optimizers if o not in OPTIMIZER_NAMES]
        if unknown or not self.optimizers:
            raise FisherlabError(f"unknown optimizers {unknown}; choose from: {', '.join(OPTIMIZER_NAMES)}")
        if self.epochs < 1 or self.patience < 1 or self.t1 < 1 or self.t2 < 1:
            raise FisherlabError("--epochs, --patience, --t1 and --t2 must be positive integers")
        if any(v <= 0 for v in (*self.lr, *self.damping)) or not self.damping:
            raise FisherlabError("learning rates and dampings must be positive")
        if self.max_batches is not None and self.max_batches < 1:
            raise FisherlabError(f"--max-batches must be positive, got {self.max_batches}")


def _mean_loss(model: torch.nn.Module, problem: Problem, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        total = 0.0
        for start in range(0, x.shape[0], 1024):
            total += float(per_sample_loss(problem.loss, model(x[start : start + 1024]), y[start : start + 1024]).sum())
    return total / max(1, x.shape[0])


def _targets(problem: Problem, x: torch.Tensor, labels: torch.Tensor | None, seed: int) -> torch.Tensor:
    if problem.kind == "autoencoder":
        return x
    if problem.kind == "classifier":
        assert labels is not None
        return labels.to(x.device)
    gen = torch.Generator().manual_seed(seed + 7)
    teacher = torch.randn(problem.sizes[0], problem.sizes[-1], generator=gen).to(x) / problem.sizes[0] ** 0.5
    return x @ teacher


def _train_one(name: str, problem: Problem, config: TrainConfig, lr: float | None, damping: float, data: dict, device: torch.device,
               progress: bool) -> dict[str, np.ndarray]:
    """Train one optimizer setting; returns per-epoch arrays (NaN after early stopping)."""
    model = problem.model(seed=config.seed, device=device)
    kw = {} if name in ("sgd", "adam") else {"damping": damping, "kl_clip": config.kl_clip, "t1": config.t1, "t2": config.t2, "seed": config.seed}
    opt = make_optimizer(name, model, problem.loss, lr=lr, weight_decay=config.weight_decay, **kw)
    n_batches = data["x"].shape[0] // min(config.batch_size or problem.batch_size, data["x"].shape[0])
    if config.max_batches:
        n_batches = min(n_batches, config.max_batches)
    batches = problem.batches(data["images"], batch_size=config.batch_size, seed=config.seed, device=device)
    out = {k: np.full(config.epochs + 1, np.nan) for k in ("train_loss", "valid_loss", "wall_time")}
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
                raise FisherlabError(f"{name} diverged (loss {float(loss.detach())}) at epoch {epoch}; lower --lr or raise --damping")
            loss.backward()
            opt.step(inputs=x) if isinstance(opt, KroneckerOptimizer) else opt.step()
        clock += time.perf_counter() - start
        out["train_loss"][epoch] = _mean_loss(model, problem, data["x"], data["y"])
        out["valid_loss"][epoch] = _mean_loss(model, problem, data["vx"], data["vy"])
        out["wall_time"][epoch] = clock
        if out["train_loss"][epoch] < best:
            best, stale = out["train_loss"][epoch], 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return out


def run_training(config: TrainConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Train every optimizer (with optional grid search) and write the comparison dataset.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence of
            every grid point of an optimizer.
    """
    config.check()
    problem = get_problem(config.problem)
    device = select_device(config.device)
    images = problem.data(config.data_dir, seed=config.seed)
    x = images.train.to(device)
    vx = images.valid.to(device)
    data = {"images": images, "x": x, "y": _targets(problem, x, images.train_labels, config.seed),
            "vx": vx, "vy": _targets(problem, vx, images.valid_labels, config.seed)}
    from fisherlab import __version__

    writer = ResultsWriter(out, {"title": f"fisherlab train: {problem.name}", "problem": problem.name, "data_source": images.source,
                                 "config_json": json.dumps(asdict(config)), "fisherlab_version": __version__,
                                 "torch_version": torch.__version__, "device": str(device)}, overwrite=overwrite)
    rows = {k: [] for k in ("train_loss", "valid_loss", "wall_time")}
    chosen_lr, chosen_damping = [], []
    for name in config.optimizers:
        lrs: tuple[float | None, ...] = config.lr or (None,)
        dampings = config.damping if name not in ("sgd", "adam") else (config.damping[0],)
        best: tuple[float, dict, float | None, float] | None = None
        for lr, damping in itertools.product(lrs, dampings):
            try:
                res = _train_one(name, problem, config, lr, damping, data, device, progress)
            except FisherlabError:
                if len(lrs) * len(dampings) == 1:
                    raise
                continue  # a diverging grid point is skipped, as in a grid search
            final = float(np.nanmin(res["train_loss"]))
            if best is None or final < best[0]:
                best = (final, res, lr, damping)
        if best is None:
            raise FisherlabError(f"every grid point of {name} diverged")
        for k, column in rows.items():
            column.append(best[1][k])
        chosen_lr.append(np.nan if best[2] is None else best[2])
        chosen_damping.append(best[3] if name not in ("sgd", "adam") else np.nan)
    ds = xr.Dataset(
        {k: (("optimizer", "epoch"), np.stack(v)) for k, v in rows.items()}
        | {"lr": (("optimizer",), np.array(chosen_lr)), "damping": (("optimizer",), np.array(chosen_damping))},
        coords={"optimizer": np.array(config.optimizers, dtype=object), "epoch": np.arange(config.epochs + 1, dtype=np.int32)},
    )
    ds["train_loss"].attrs.update(long_name="training loss", units="1")
    ds["valid_loss"].attrs.update(long_name="validation loss", units="1")
    ds["wall_time"].attrs.update(long_name="training time", units="s")
    ds["lr"].attrs.update(long_name="learning rate chosen (NaN: optimizer default)", units="1")
    ds["damping"].attrs.update(long_name="damping chosen", units="1")
    return writer.write(ds)
