"""Probe the exact Fisher inside any training loop: :class:`FisherProbe`, the user-loop API.

Every ``every`` steps one probe pass (:class:`~fisherlab.probe.Probe`: the hooks), every
approximation and every registered metric of the probed layers
(:func:`~fisherlab.snapshot.assemble_snapshot`), appended to the results
(:class:`~fisherlab.results.ResultsWriter`). :func:`~fisherlab.probe_loop.probe_training` and
``fisherlab probe`` (:func:`~fisherlab.probe_loop.run_probe`) are this class inside a loop of
their own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xarray as xr
from torch import Tensor, nn
from torch import distributed as dist
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError
from fisherlab.approximations import WarmStarts
from fisherlab.config import ProbeConfig
from fisherlab.distributed import Shard, shard_of_batch
from fisherlab.losses import LossKind, as_enum
from fisherlab.probe import Probe
from fisherlab.results import ResultsWriter, annotate, run_attrs
from fisherlab.snapshot import assemble_snapshot

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["USER_LOOP", "USER_LOOP_CONFIG", "FisherProbe"]


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
        out: A results file to append every snapshot to (locked until :meth:`close`): ``.nc``, or
            the suffix of a store added with :func:`~fisherlab.store_registry.register_store`;
            ``None`` keeps the snapshots in memory only.
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
        self._nan_warned: set[tuple[str, str]] = set()  # (metric, reason) of NaN warnings given (once per run)
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
            ds, snap = assemble_snapshot(
                step,
                self.probe,
                x,
                y,
                self.names,
                self.config,
                self._previous,
                self._t0,
                shard,
                self._zero_warned,
                self._nan_warned,
            )
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
