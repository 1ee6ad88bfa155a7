"""A probe run: train a network and, every ``every`` iterations, probe the exact Fisher,
build every approximation, compute every metric and append it to the results file.

One probe pass feeds every method and metric of a snapshot; the pass happens on the batch
the next training step uses, before that step, and does not disturb it.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.approximations import Approximation, Method, approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.metrics import BlockReference, Spectrum, frobenius_error, spectral_error
from fisherlab.probe import FisherKind, LossKind, Probe, ProbeSnapshot, per_sample_loss
from fisherlab.problems import get_problem
from fisherlab.results import ResultsWriter, annotate, snapshot_dataset
from fisherlab.twolevel import CoarseSpace, WholeFisher, cosine, energy_error, two_level

__all__ = ["BlockEvaluation", "ProbeConfig", "evaluate_block", "probe_training", "run_probe", "select_device"]

ALL_METHODS = tuple(m.value for m in Method)


@dataclass
class ProbeConfig:
    """Everything a probe run needs; stored as JSON in the dataset attribute ``config_json``.

    Defaults give the embedded CURVES problem, layer 5, in about 50 s on an idle 2-core CPU.
    """

    problem: str = "curves"
    data_dir: str | None = None
    layers: tuple[str, ...] = ("5",)
    iterations: int = 500
    every: int = 10
    optimizer: str = "adam"
    lr: float | None = None
    batch_size: int | None = None
    fisher: str = "mc"
    mc_samples: int = 1
    methods: tuple[str, ...] = ALL_METHODS
    spectrum: str = "eigenvalues"
    metrics: tuple[str, ...] = ("frobenius_error", "spectral_error")
    tol: float = 1e-6
    max_iter: int = 500
    lanczos_rank: int = 2
    krylov_dim: int = 20
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    store_factors: tuple[str, ...] = field(default=())
    two_level: bool = False
    damping: float = 1e-3
    coarse_spaces: tuple[str, ...] = tuple(c.value for c in CoarseSpace)
    taylor_order: int = 2

    def check(self) -> None:
        """Validate values that do not depend on the model.

        Raises:
            FisherlabError: The first nonsensical value, with what was expected.
        """
        if self.iterations < 1:
            raise FisherlabError(f"--iterations must be a positive integer, got {self.iterations}")
        if self.every < 1:
            raise FisherlabError(f"--every must be a positive integer, got {self.every}")
        if self.every > self.iterations:
            raise FisherlabError(f"--every ({self.every}) is larger than --iterations ({self.iterations}): only iteration 0 would be probed")
        if self.mc_samples < 1:
            raise FisherlabError(f"--mc-samples must be at least 1, got {self.mc_samples}")
        if not 0 < self.tol < 1:
            raise FisherlabError(f"--tol must lie in (0, 1), got {self.tol}")
        if self.max_iter < 1 or self.lanczos_rank < 1 or self.krylov_dim < 2:
            raise FisherlabError("--max-iter and --lanczos-rank must be at least 1, --krylov-dim at least 2")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise FisherlabError(f"--lr must be finite and positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FisherlabError(f"--batch-size must be positive, got {self.batch_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise FisherlabError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.dtype not in ("float32", "float64"):
            raise FisherlabError(f"unknown dtype {self.dtype!r}; choose float32 or float64")
        for value, kind in ((self.fisher, FisherKind), (self.spectrum, Spectrum)):
            if value not in {e.value for e in kind}:
                raise FisherlabError(f"unknown {kind.__name__} {value!r}; choose one of: {', '.join(e.value for e in kind)}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise FisherlabError(f"unknown methods {unknown}; choose from: {', '.join(ALL_METHODS)}")
        bad_metrics = [m for m in self.metrics if m not in ("frobenius_error", "spectral_error")]
        if bad_metrics or "frobenius_error" not in self.metrics:
            raise FisherlabError(f"--metrics must include frobenius_error and may add spectral_error; got {list(self.metrics)}")
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise FisherlabError(f"--damping must be finite and positive, got {self.damping}")
        if self.taylor_order < 1:
            raise FisherlabError(f"--taylor-order must be at least 1, got {self.taylor_order}")
        bad_spaces = [c for c in self.coarse_spaces if c not in {e.value for e in CoarseSpace}]
        if bad_spaces:
            raise FisherlabError(f"unknown coarse spaces {bad_spaces}; choose from: {', '.join(e.value for e in CoarseSpace)}")
        missing = [name for name in self.store_factors if name not in self.layers]
        if missing:
            raise FisherlabError(f"--store-factors names layers {missing} that are not probed ({', '.join(self.layers)})")


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device.

    Raises:
        FisherlabError: A CUDA device requested where none is available, or a bad name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FisherlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FisherlabError("--device cuda was requested but no CUDA GPU is available; use --device auto or cpu")
    return device


@dataclass(frozen=True)
class BlockEvaluation:
    """Approximations of one exact block and their errors (K §4.1)."""

    approximations: dict[Method, Approximation]
    frobenius_errors: dict[Method, float]
    spectral_errors: dict[Method, float]
    times: dict[Method, float]
    fisher_norm: float


def evaluate_block(
    block: ExactBlock,
    methods: list[Method] | None = None,
    *,
    spectrum: Spectrum | str = Spectrum.EIGENVALUES,
    tol: float = 1e-6,
    max_iter: int = 500,
    lanczos_rank: int = 2,
    krylov_dim: int = 20,
    previous: dict[Method, Approximation] | None = None,
    layer: str = "",
    spectral: bool = True,
) -> BlockEvaluation:
    """Build every approximation of ``block`` and compute error 1 and error 2 of each.

    The Gram matrix (hence ``||F||_F`` and the spectrum) is computed once and shared. With
    ``spectral=False`` error 2 is skipped (stored as NaN): for Kronecker-rank-2 methods it
    needs the top eigenvalues of a ``d_out d_in``-sided matrix, the one cost that grows
    like ``(d_out d_in)^3``.
    """
    methods = list(Method) if methods is None else methods
    ref = BlockReference.of(block)
    approx = approximate_all(
        block,
        methods,
        tol=tol,
        max_iter=max_iter,
        lanczos_rank=lanczos_rank,
        krylov_dim=krylov_dim,
        previous=previous,
        layer=layer,
    )
    times = {m: a.seconds for m, a in approx.items()}
    if not float(ref.norm_squared) > 0:
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is zero (no gradient reaches it: dead or saturated units); "
            "error 1 and error 2 are undefined there and stored as NaN (fisher_frobenius_norm = 0)",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        nan = dict.fromkeys(approx, float("nan"))
        return BlockEvaluation(approx, nan, dict(nan), times, 0.0)
    spec = Spectrum(spectrum)
    fro = {m: float(frobenius_error(ref, a.kron)) for m, a in approx.items()}
    spe = {m: float(spectral_error(ref, a.kron, spectrum=spec)) if spectral else float("nan") for m, a in approx.items()}
    return BlockEvaluation(approx, fro, spe, times, float(ref.norm_squared.sqrt()))


def _step(model: nn.Module, loss: LossKind, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, iteration: int) -> float:
    optimizer.zero_grad(set_to_none=True)
    value = per_sample_loss(loss, model(x), y).mean()
    if not torch.isfinite(value):
        raise FisherlabError(f"training loss became {float(value.detach())} at iteration {iteration}; lower --lr (snapshots so far are saved)")
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
    methods = [Method(m) for m in config.methods]
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
                raise FisherlabError(f"the batch iterator ended after {it} batches; a run of {config.iterations} iterations needs "
                                     f"{config.iterations + 1} (pass an endless iterator, e.g. itertools.cycle(loader))") from None
            if it % config.every == 0:
                ds = _snapshot(it, probe, x, y, names, methods, config, previous, t0, writer)
                if writer is None:
                    snapshots.append(ds)
                latest = ds.isel(iteration=-1, layer=0)
                summary = {m.value: f"{float(latest['frobenius_error'][i]):.3f}" for i, m in enumerate(methods)}
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
    ds.attrs.update({"problem": type(model).__name__, "data_source": "user data (probe_training)", "fisher": config.fisher,
                     "spectrum": config.spectrum, "metrics": ",".join(config.metrics), "loss": loss.value,
                     "config_json": json.dumps(asdict(config))})
    return ds


def _snapshot(
    it: int,
    probe: Probe,
    x: Tensor,
    y: Tensor,
    names: list[str],
    methods: list[Method],
    config: ProbeConfig,
    previous: dict[str, dict[Method, Approximation]],
    t0: float,
    writer: ResultsWriter | None,
) -> xr.Dataset:
    start = time.perf_counter()
    snap = probe(x, y)
    probe_time = time.perf_counter() - start
    shape = (len(names), len(methods))
    arrays = {k: np.zeros(shape) for k in ("frobenius_error", "spectral_error", "solver_residual", "approximation_time")}
    iters = np.zeros(shape, dtype=np.int32)
    conv = np.zeros(shape, dtype=np.int8)
    norms = np.zeros(len(names))
    for name in snap.factors:
        if name not in names and config.two_level:  # block-diagonal increments need every layer
            previous[name] = approximate_all(
                ExactBlock(snap.factors[name]), methods, tol=config.tol, max_iter=config.max_iter,
                lanczos_rank=config.lanczos_rank, krylov_dim=config.krylov_dim, previous=previous.get(name), layer=name,
            )
    for li, name in enumerate(names):
        block = ExactBlock(snap.factors[name])
        ev = evaluate_block(
            block,
            methods,
            spectrum=config.spectrum,
            tol=config.tol,
            max_iter=config.max_iter,
            lanczos_rank=config.lanczos_rank,
            krylov_dim=config.krylov_dim,
            previous=previous.get(name),
            layer=name,
            spectral="spectral_error" in config.metrics,
        )
        previous[name] = ev.approximations
        norms[li] = ev.fisher_norm
        for mi, m in enumerate(methods):
            a = ev.approximations[m]
            arrays["frobenius_error"][li, mi] = ev.frobenius_errors[m]
            arrays["spectral_error"][li, mi] = ev.spectral_errors[m]
            arrays["solver_residual"][li, mi] = a.residual
            arrays["approximation_time"][li, mi] = ev.times[m]
            iters[li, mi] = a.iterations
            conv[li, mi] = int(a.converged)
        if writer is not None and name in config.store_factors:
            writer.store_factors(it, name, snap.factors[name].a, snap.factors[name].g)
    extra, coords, scalars = _two_level_variables(snap, methods, previous, config) if config.two_level else ({}, {}, {})
    ds = snapshot_dataset(
        it,
        names,
        [m.value for m in methods],
        {**arrays, "solver_iterations": iters, "converged": conv},
        {"fisher_frobenius_norm": norms},
        {"train_loss": snap.loss, "wall_time": time.perf_counter() - t0, "probe_time": probe_time, **scalars},
        extra,
        coords,
    )
    return writer.append(ds) if writer is not None else ds


def _two_level_variables(
    snap: ProbeSnapshot, methods: list[Method], approximations: dict[str, dict[Method, Approximation]], config: ProbeConfig
) -> tuple[dict[str, tuple[tuple[str, ...], np.ndarray]], dict[str, list[str]], dict[str, float]]:
    """T §4.4 quantities of one snapshot over all probed layers (see ``TWO_LEVEL_VARIABLES``)."""
    order = list(snap.factors)
    fisher = WholeFisher(tuple(ExactBlock(snap.factors[n]) for n in order))
    grads = [snap.gradients[n] for n in order]
    res = two_level(fisher, grads, damping=config.damping, spaces=config.coarse_spaces, taylor_order=config.taylor_order)
    spaces = [*config.coarse_spaces, "tko"]
    gap = np.array([res.gaps[c] for c in spaces])
    e2l = np.array([energy_error(fisher, res.increments[c], res.zeta, damping=config.damping) for c in spaces])
    cos2l = np.array([cosine(res.increments[c], res.zeta) for c in spaces])
    block_e = np.full(len(methods), np.nan)
    block_c = np.full(len(methods), np.nan)
    for mi, m in enumerate(methods):
        krons = [approximations[n][m].kron for n in order]
        if max(k.rank for k in krons) > 2:
            continue  # K §3.4 solves Kronecker rank <= 2 only (e.g. --lanczos-rank 3): left NaN
        zeta_m = [k.solve(g, damping=config.damping) for k, g in zip(krons, grads, strict=True)]
        block_e[mi] = energy_error(fisher, zeta_m, res.zeta, damping=config.damping)
        block_c[mi] = cosine(zeta_m, res.zeta)
    extra = {
        "gap": (("coarse_space",), gap),
        "energy_error": (("coarse_space",), e2l),
        "cosine": (("coarse_space",), cos2l),
        "energy_two_level": (("coarse_space",), np.array([res.energies[c] for c in spaces])),
        "block_energy_error": (("method",), block_e),
        "block_cosine": (("method",), block_c),
    }
    return extra, {"coarse_space": spaces}, {"energy_kfac": res.energy_kfac, "energy_natural_gradient": res.energy_zeta}


def run_attrs(config: ProbeConfig, device: torch.device, data_source: str, loss: LossKind, *, stand_in: bool = False) -> dict[str, str | int | float]:
    """Dataset attributes: the whole configuration, versions, device, conventions."""
    from fisherlab import __version__

    return {
        "title": f"fisherlab probe: {config.problem}",
        "problem": config.problem,
        "data_source": data_source,
        "stand_in": int(stand_in),
        "loss": loss.value,
        "seed": config.seed,
        "fisher": config.fisher,
        "mc_samples": config.mc_samples,
        "spectrum": config.spectrum,
        "metrics": ",".join(config.metrics),
        "two_level": int(config.two_level),
        "damping": config.damping,
        "coarse_spaces": ",".join([*config.coarse_spaces, "tko"]) if config.two_level else "",
        "taylor_order": config.taylor_order,
        "tol": config.tol,
        "optimizer": config.optimizer,
        "config_json": json.dumps(asdict(config)),
        "fisherlab_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kronecker_order": "out (d_out x d_out) kron in (d_in x d_in), acting on W.flatten() of W [d_out, d_in] with the bias as last column",
        "symmetric_factors": "every Kronecker factor is symmetric; for conv layers (T > 1) deflation, lanczos and kfac_corrected are the "
                             "best Kronecker-rank-k approximations with symmetric factors (an antisymmetric pair can do better there); "
                             "for Linear layers (T = 1) they are the best of all",
        "fisher_scaling": "F = (1/N) sum_n sum_v vec(DW_nv) vec(DW_nv)^T; per-sample loss summed over outputs; mc directions scaled by 1/sqrt(V)",
    }


def run_probe(config: ProbeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run ``fisherlab probe`` on one of the papers' problems and write ``out``.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence.
    """
    config.check()
    problem = get_problem(config.problem)
    known = problem.layer_names()
    bad = [name for name in config.layers if name not in known]
    if bad or not config.layers:
        listing = f"1 to {known[-1]}" if all(n.isdigit() for n in known) else ", ".join(known)
        raise FisherlabError(f"unknown layers {bad} for {problem.name}: it has layers {listing}")
    device = select_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
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
        return probe_training(model, problem.loss, batches, optimizer, config, layers=list(config.layers), writer=writer, progress=progress)


def announce_data(source: str, stand_in: bool) -> None:
    """Say on the console which data a run uses; a stand-in is named as such (stderr)."""
    print(f"fisherlab: data: {source}", file=sys.stderr)
    if stand_in:
        print("fisherlab: warning: this run uses STAND-IN data, not the paper's dataset; its errors are not the paper's "
              "(e.g. MNIST layer 5: KFAC error 1 peaks near 0.4 on the stand-in, 7.8 on real MNIST); pass --data-dir for the real files",
              file=sys.stderr)
