"""The probe loop: every ``every`` steps of a training run, probe the exact Fisher, build every
approximation, compute every registered metric and append it to the results.

:class:`FisherProbe` does it inside any training loop; :func:`probe_training` and
:func:`run_probe` (``fisherlab probe``) are loops of their own around it.

One probe pass feeds every method and metric of a snapshot; the pass happens on the batch
the next training step uses, before that step, and does not disturb it. The metrics are
those of the registry (:data:`fisherlab.metrics.BLOCK_METRICS`, ``LAYER_METRICS`` and, with
``two_level``, :data:`fisherlab.twolevel.TWO_LEVEL_METRICS`); nothing here names one metric.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch import distributed as dist
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.approximations import Approximation, WarmStarts, approximate_all, warm_starts
from fisherlab.config import ProbeConfig, apply_threads, select_device
from fisherlab.data import ImageData, announce_data
from fisherlab.distributed import Shard, all_reduce_sum, init_from_environment, shard_of_batch
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import probeable_layers
from fisherlab.losses import LossKind, as_enum, per_sample_loss
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, evaluate_block
from fisherlab.operators import BlockDiagonal
from fisherlab.probe import Probe, ProbeSnapshot
from fisherlab.problems import Problem, get_problem
from fisherlab.results import ResultsWriter, annotate, config_json, run_attrs, snapshot_dataset
from fisherlab.twolevel import TWO_LEVEL_METRICS, two_level_metrics

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FisherProbe", "probe_training", "run_probe"]


def _step(
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


def _rows(x: Tensor, shard: Shard | None) -> Tensor:
    return x if shard is None else x[shard.start : shard.start + shard.n_local]


def _split(n: int) -> Shard:
    """This process's contiguous rows of a global batch of ``n`` (as ``torch.tensor_split``),
    known on every rank without communication."""
    world = dist.get_world_size()
    return Shard(tuple(n // world + (1 if r < n % world else 0) for r in range(world)), dist.get_rank())


class FisherProbe:
    """Probe the exact Fisher inside any training loop: every ``every`` steps one probe pass,
    every approximation and every registered metric, appended to the results.

    The probe pass leaves training undisturbed (:class:`~fisherlab.probe.Probe`: no ``.grad``
    written, RNG streams and batch-norm statistics restored, autocast off inside, the model's
    mode untouched); the dataset has the schema ``fisherlab probe`` writes. ``probe_training``
    and ``fisherlab probe`` are this class inside a loop of their own.

    Args:
        model: Any ``nn.Module`` built from Linear/Conv2d layers (others are listed as skipped).
        loss: Its negative log-likelihood, ``"mse"``, ``"bce"`` or ``"ce"``.
        every: Probe when ``step % every == 0`` (default ``config.every``).
        layers: Module paths to measure (default: every Linear and Conv2d layer).
        methods: Registered method names (default ``config.methods``: the papers' five).
        metrics: Error metrics (default ``config.metrics``; without ``config`` error 1 only,
            ``("frobenius_error",)``: error 2 of the Kronecker-rank-2 methods costs 20x more on a
            small MLP; add ``"spectral_error"`` or pass ``config=ProbeConfig()`` for both).
        out: A ``.nc`` file to append every snapshot to (locked until :meth:`close`); ``None``
            keeps the snapshots in memory only.
        config: Every other setting (Fisher kind, metrics, tolerances, two-level, ...);
            loop fields (``iterations``, ``lr``, ``batch_size``, ``problem``) are ignored.
            Default :data:`USER_LOOP_CONFIG` (``ProbeConfig`` with error 1 only).
        overwrite: Replace an existing ``out``.
        writer: An open :class:`~fisherlab.results.ResultsWriter` instead of ``out`` (its
            owner closes it and sets its attributes).

    Example:
        >>> probe = FisherProbe(model, "ce", every=10, layers=["fc"], out="runs/probe.nc")  # doctest: +SKIP
        >>> for step, (x, y) in enumerate(loader):                                          # doctest: +SKIP
        ...     probe.step(step, x, y)          # before or after the user's own step       # doctest: +SKIP
        >>> ds = probe.close()                                                              # doctest: +SKIP

    Raises:
        FisherlabError: Unknown layers or methods, bad settings, an existing or locked ``out``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossKind | str,
        *,
        every: int | None = None,
        layers: list[str] | dict[str, nn.Module] | None = None,
        methods: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        out: str | Path | None = None,
        config: ProbeConfig | None = None,
        overwrite: bool = False,
        writer: ResultsWriter | None = None,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # probe the network itself: DDP's reducer expects a backward after each forward
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out = out if rank == 0 else None  # one writer: global rank 0
        writer = writer if rank == 0 else None
        given: dict[str, Any] = {"every": every, "methods": methods, "metrics": metrics}  # ProbeConfig validates
        config = replace(config or USER_LOOP_CONFIG, **{k: v for k, v in given.items() if v is not None})
        self.loss = as_enum(LossKind, loss, "loss")
        kwargs = {
            "fisher": config.fisher,
            "approx_fisher": config.approx_fisher,
            "mc_samples": config.mc_samples,
            "seed": config.seed + 1,
            "accumulate_dtype": config.accumulate.dtype,
            "moments_in_capture_dtype": config.accumulate.moments_in_capture_dtype,
        }
        self.names = list(Probe(model, self.loss, layers=layers, **kwargs).layers)  # type: ignore[arg-type]
        if layers is not None or writer is None:
            config = replace(config, layers=tuple(self.names))
        config.check_store_factors()
        self.config = config
        self.model = model
        self.probe = Probe(model, self.loss, layers=None if config.two_level else layers, **kwargs)  # type: ignore[arg-type]
        self._owns_writer = writer is None and out is not None
        self.writer = ResultsWriter(out, {}, overwrite=overwrite) if self._owns_writer else writer  # type: ignore[arg-type]
        probed = {
            f"{n}.{p}" if n else p for n, m in self.probe.layers.items() for p, _ in m.named_parameters(recurse=False)
        }
        skipped = [n for n, _ in model.named_parameters() if n not in probed]
        self.attrs: dict[str, str | int | float] = {}
        if writer is None:  # a loop fisherlab does not drive: say so in the provenance
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self.attrs.update(run_attrs(replace(config, problem=type(model).__name__), device, USER_LOOP, self.loss))
        self.attrs.update(
            {"probed_layers": ",".join(self.probe.layers), "skipped_parameters": ",".join(skipped) or "none"}
        )
        if self.writer is not None:
            self.writer.attrs.update(self.attrs)
        self._previous: dict[str, WarmStarts] = {}
        self._zero_warned: set[str] = set()  # layers whose zero-Fisher warning was given (once per run)
        self._cost_said = rank != 0  # the first snapshot's cost is said once, by rank 0
        self._snapshots: list[xr.Dataset] = []
        self._dataset: xr.Dataset | None = None
        self._t0 = time.perf_counter()
        self._closed = False

    def step(self, step: int, x: Tensor, y: Tensor | None, *, shard: Shard | None = None) -> xr.Dataset | None:
        """Probe the batch ``(x, y)`` when ``step % every == 0``; returns that snapshot, else ``None``.

        ``y`` are the true targets (for the training loss and ``∇h``); the MC Fisher samples its own.
        Under ``torch.distributed`` ``(x, y)`` are this rank's rows of the global batch; ``shard``
        says which when the caller knows (else every rank's row count is exchanged).
        """
        if self._closed:
            raise FisherlabError("this FisherProbe is closed; create a new one (with a new out) to probe again")
        if step % self.config.every:
            return None
        if shard is None:  # collective under torch.distributed: every rank probes its own rows
            shard = shard_of_batch(x.shape[0], x.device)
        started = time.perf_counter()
        # the Fisher and its metrics in full precision, with autograd even under torch.inference_mode()
        with torch.autocast(x.device.type, enabled=False), torch.inference_mode(False):
            ds, snap = _snapshot(
                step, self.probe, x, y, self.names, self.config, self._previous, self._t0, shard, self._zero_warned
            )  # type: ignore[arg-type]
        if not self._cost_said:
            self._cost_said = True
            tqdm.write(_cost_line(time.perf_counter() - started, x.device, self.names, self.config), file=sys.stderr)
        if self.writer is not None:
            stored = {name: (snap.factors[name].a, snap.factors[name].g) for name in self.config.store_factors}
            self.writer.append(ds, factors=stored)
        self._snapshots.append(ds)
        self._dataset = None
        return ds

    @property
    def dataset(self) -> xr.Dataset:
        """Every snapshot so far, with the run's attributes.

        Raises:
            FisherlabError: Before the first snapshot.
        """
        if self._dataset is None:
            if not self._snapshots:
                raise FisherlabError("no snapshot yet: call step() with a step that is a multiple of every")
            self._dataset = annotate(xr.concat(self._snapshots, dim="iteration"))
            self._dataset.attrs.update(self.writer.attrs if self.writer is not None else self.attrs)
        return self._dataset

    def close(self) -> xr.Dataset | None:
        """Release the output (when this probe opened it); returns the dataset (``None`` if never probed).

        :meth:`step` raises afterwards: the file is never reopened, so never truncated.
        """
        self._closed = True
        if self._owns_writer and self.writer is not None:
            self.writer.close()
            self._owns_writer = False
        return self.dataset if (self._dataset is not None or self._snapshots) else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The settings of :class:`FisherProbe` without ``config``: :class:`ProbeConfig`'s, error 1 only
#: (the cheap path inside a training loop; both errors: ``config=ProbeConfig()``).
USER_LOOP_CONFIG = ProbeConfig(metrics=("frobenius_error",))

#: ``data_source`` of a run whose data fisherlab did not choose.
USER_LOOP = "user data (your own training loop)"


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

    Works for any model built from Linear/Conv2d layers and any batch iterator; the CLI
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
            shard = _split(x.shape[0]) if distributed else None
            x, y = _rows(x, shard), _rows(y, shard)  # every process is handed the global batch: its rows
            snapshot = fisher_probe.step(it, x, y, shard=shard)
            if snapshot is not None:
                latest = snapshot.isel(iteration=-1, layer=0)
                summary = {m: f"{float(latest['frobenius_error'][i]):.3f}" for i, m in enumerate(config.methods)}
                bar.set_postfix(loss=f"{float(latest['train_loss']):.4g}", **summary)
            if it < config.iterations:
                _step(model, loss, optimizer, x, y, it, shard)
                bar.update(1)
    finally:
        bar.close()
    return fisher_probe.dataset


def _snapshot(
    it: int,
    probe: Probe,
    x: Tensor,
    y: Tensor,
    names: list[str],
    config: ProbeConfig,
    previous: dict[str, WarmStarts],
    t0: float,
    shard: Shard | None = None,
    zero_warned: set[str] | None = None,
) -> tuple[xr.Dataset, ProbeSnapshot]:
    """One snapshot: probe pass, every registered metric of every probed layer and method.

    A layer named in ``zero_warned`` does not warn again that its block is zero; a layer that
    warns is added (the warning is given once per layer and run).
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
            )
        if not ev.layer_values["fisher_frobenius_norm"] > 0:
            zero_warned.add(name)
        previous[name] = warm_starts(ev.approximations)
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
        order = list(snap.factors)
        kronecker = [m for m in methods if all(isinstance(current[n][m].operator, KronSum) for n in order)]
        diagonals = {
            m: BlockDiagonal(tuple(current[n][m].kron for n in order)) if m in kronecker else None for m in methods
        }
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
    return snapshot_dataset(it, names, list(methods), per_method, per_layer, scalars, extra, coords), snap


def _cost_line(seconds: float, device: torch.device, names: list[str], config: ProbeConfig) -> str:
    """One line saying what the first snapshot cost (time, peak memory) and how to make it cheaper."""
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    elif resource is not None:  # ru_maxrss: kB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        peak = f"peak memory {rss / 2**30:.2f} GiB (process)"
    else:  # pragma: no cover - Windows
        peak = "peak memory unknown"
    cheaper = "fewer layers or methods"
    if "spectral_error" in config.metrics:
        cheaper += (
            ", or error 1 only (metrics=('frobenius_error',), --metrics frobenius_error: "
            "error 2 of the rank-2 methods is the costly part)"
        )
    return (
        f"fisherlab: probe cost: first snapshot {seconds:.1f} s, {peak}, {len(names)} layer(s) x "
        f"{len(config.methods)} method(s), {', '.join(config.metrics)}; cheaper: {cheaper} "
        "(README: Probe your own training)"
    )


def resolve_layers(problem: Problem, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The layers ``--layers`` names on ``problem``: ``all`` is every probeable layer.

    Raises:
        FisherlabError: Unknown layer names, listing the problem's layers.
    """
    known = problem.layer_names()
    if tuple(layers) == ("all",):
        return tuple(known)
    bad = [name for name in layers if name not in known]
    if bad or not layers:
        listing = f"1 to {known[-1]}" if all(n.isdigit() for n in known) else ", ".join(known)
        raise FisherlabError(f"unknown layers {bad} for {problem.name}: it has layers {listing} (or all)")
    return tuple(layers)


def run_probe(config: ProbeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run ``fisherlab probe`` on one of the papers' problems and write ``out``.

    Raises:
        FisherlabError: Bad configuration, missing data, existing output, divergence.
    """
    config.check()
    apply_threads(config.threads)
    problem = get_problem(config.problem)
    config = replace(config, layers=resolve_layers(problem, config.layers))
    config.check_store_factors()  # before any work (FisherProbe checks it against the layers it finds)
    device = select_device(config.device)
    started = _init_distributed(device, config)
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
            result = _train_problem(problem, data, config, device, dtype, writer, progress)
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


def snapshot_bytes(problem: Problem, data: ImageData, config: ProbeConfig, batch_size: int) -> dict[str, float]:
    """An estimate of the memory one snapshot of a ``fisherlab probe`` run holds at once, in bytes:
    ``factors`` (every probed layer's per-sample factors, ``N (T d_in + V T d_out)`` numbers in float64)
    and ``gram`` (the largest layer's ``N V x N V`` Gram matrix); shapes from a forward pass on the meta
    device (no memory, no compute). ``V``: ``--mc-samples``, the number of outputs for ``exact``, 1 for
    ``empirical``."""
    model = problem.model(device="meta")
    layers = probeable_layers(model)
    probed = layers if config.two_level else {name: layers[name] for name in config.layers}
    shapes: dict[str, tuple[int, int, int]] = {}  # name -> (T, d_in, d_out)

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                shapes[name] = (output[0].numel() // module.out_channels, d_in + 1, module.out_channels)
            else:
                shapes[name] = (inputs[0][0].numel() // module.in_features, module.in_features + 1, module.out_features)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in probed.items()]
    try:
        output = model(problem.inputs(data.train[:1].to("meta")))
    finally:
        for handle in handles:
            handle.remove()
    v = {"mc": config.mc_samples, "exact": output[0].numel(), "empirical": 1}[config.fisher.value]
    n = batch_size
    factors = sum(n * (t * d_in + v * t * d_out) * 8 for t, d_in, d_out in shapes.values())
    return {"factors": float(factors), "gram": float((n * v) ** 2 * 8), "directions": v}


def available_bytes(device: torch.device) -> float | None:
    """Memory a run may still take: free GPU memory on CUDA, ``MemAvailable`` on Linux; ``None`` if unknown."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(problem: Problem, data: ImageData, config: ProbeConfig, device: torch.device) -> None:
    """Refuse, before any work, a run whose snapshot cannot fit in memory (instead of the OOM killer).

    Raises:
        FisherlabError: The estimate of :func:`snapshot_bytes` exceeds the available memory; names the
            setting that matters most.
    """
    available = available_bytes(device)
    if available is None:
        return
    n = config.batch_size or problem.batch_size
    need = snapshot_bytes(problem, data, config, min(n, data.train.shape[0]))
    total = need["factors"] + need["gram"]
    if total <= available:
        return
    v = int(need["directions"])
    settings = {
        "mc-samples": f"--mc-samples {v}" if config.fisher.value == "mc" and v > 1 else "",
        "layers": f"the --layers probed ({len(config.layers)})" if len(config.layers) > 1 else "",
        "batch-size": f"--batch-size {n}",
    }
    order = (
        ["mc-samples", "batch-size", "layers"]
        if need["gram"] > need["factors"]
        else ["mc-samples", "layers", "batch-size"]
    )
    named = [settings[key] for key in order if settings[key]]
    raise FisherlabError(
        f"a snapshot needs about {total / 2**30:.1f} GiB (per-sample factors {need['factors'] / 2**30:.1f} GiB, "
        f"Gram matrix of {n} x {v} directions {need['gram'] / 2**30:.1f} GiB) but {available / 2**30:.1f} GiB of "
        f"{'GPU ' if device.type == 'cuda' else ''}memory are available; lower {' or '.join(named)}"
    )


def _init_distributed(device: torch.device, config: ProbeConfig) -> bool:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA) after a handshake
    of world size and configuration (:func:`~fisherlab.distributed.init_from_environment`: a
    mismatch fails at once, with one line); ``True`` when this call joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=int(os.environ.get("FISHERLAB_DIST_TIMEOUT", "300")))
    init_from_environment(backend, timeout, settings=config_json(config))
    return True


def _train_problem(
    problem: Problem,
    data: ImageData,
    config: ProbeConfig,
    device: torch.device,
    dtype: torch.dtype,
    writer: ResultsWriter | None,
    progress: bool,
) -> xr.Dataset:
    """The paper problem's model, optimizer and batches, trained and probed by :func:`probe_training`."""
    model = problem.model(seed=config.seed, dtype=dtype, device=device)
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr or 1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr or 1e-2, momentum=0.9)
    batches = problem.batches(data, batch_size=config.batch_size, seed=config.seed, device=device, dtype=dtype)
    return _probe_training(  # run_probe checked the config
        model,
        problem.loss,
        batches,
        optimizer,
        config,
        layers=list(config.layers),
        writer=writer,
        progress=progress,
    )
