"""Probe the exact Fisher inside any training loop: :class:`FisherProbe`, the user-loop API.

Every ``every`` steps one probe pass (:class:`~fisherlab.probe.Probe`: the hooks), every
approximation and every registered metric of the probed layers
(:func:`~fisherlab.snapshot.assemble_snapshot`), appended to the results
(:class:`~fisherlab.results.ResultsWriter`), then handed to the ``on_snapshot`` callbacks (live
dashboards: :mod:`fisherlab.dashboards`). :func:`~fisherlab.probe_loop.probe_training` and
``fisherlab probe`` (:func:`~fisherlab.probe_loop.run_probe`) are this class inside a loop of
their own.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xarray as xr
from torch import Tensor, nn
from torch import distributed as dist
from tqdm.auto import tqdm

from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.approximations import WarmStarts
from fisherlab.config import ProbeConfig
from fisherlab.dashboards import SnapshotCallback, TensorBoardWriter
from fisherlab.distributed import Shard, shard_of_batch
from fisherlab.layers import kronecker_layers, layer_kind, layer_structure
from fisherlab.losses import LossKind, as_enum
from fisherlab.method_registry import not_applicable
from fisherlab.probe import Batch, Probe, batch_tensor
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
        model: Any ``nn.Module``; its modules of a registered layer kind (Linear, Conv2d, Conv1D, Embedding,
            LayerNorm, RMSNorm, MultiheadAttention) are probed, the others listed as skipped (attributes
            ``skipped_parameters``, ``skipped_modules`` with why, and ``fisher_coverage``).
        loss: Its negative log-likelihood (:class:`~fisherlab.losses.LossKind`): ``"mse"``, ``"bce"``, ``"ce"``,
            or for language models ``"causal_lm"`` (Hugging Face's shifted labels, ``-100`` ignored)
            and ``"seq_cls"``.
        every: Probe when ``step % every == 0`` (default ``config.every``).
        layers: Module paths to measure, ``"all"`` (the default: every module that can be probed) or
            ``"trainable"`` (those with a parameter that requires grad: a LoRA model's adapters).
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
        on_snapshot: A callable ``(step, snapshot) -> None`` or a list of them, run after each snapshot is in the
            results file, on every process (live dashboards; :func:`~fisherlab.dashboards.snapshot_scalars`
            flattens a snapshot into named scalars). Their exceptions propagate.
        tensorboard: A TensorBoard log directory: each snapshot's scalars are written there live,
            global step = ``step``, flushed at each snapshot, closed by :meth:`close`
            (:class:`~fisherlab.dashboards.TensorBoardWriter`; ``pip install 'fisherlab[hf]'``).
            Only global rank 0 writes it.

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
        layers: list[str] | dict[str, nn.Module] | str | None = None,
        methods: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        out: str | Path | None = None,
        config: ProbeConfig | None = None,
        overwrite: bool = False,
        writer: ResultsWriter | None = None,
        on_snapshot: SnapshotCallback | Sequence[SnapshotCallback] = (),
        tensorboard: str | Path | None = None,
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
        chosen = Probe(model, self.loss, layers=layers, **kwargs)  # type: ignore[arg-type]
        self.names = list(chosen.layers)
        if layers is not None or writer is None:
            config = replace(config, layers=tuple(self.names))
        config.check_store_factors()
        _check_layer_options(chosen.layers, config, model)
        self.config = config
        self.model = model
        # two-level KFAC needs every layer's Kronecker approximation (block-diagonal increments)
        self.probe = Probe(model, self.loss, layers=kronecker_layers(model) if config.two_level else layers, **kwargs)  # type: ignore[arg-type]
        callbacks = [on_snapshot] if callable(on_snapshot) else list(on_snapshot)
        if not all(callable(c) for c in callbacks):
            raise FisherlabError(f"on_snapshot takes callables (step, snapshot) -> None, got {on_snapshot!r}")
        # before the output is locked (a missing TensorBoard fails here); its file comes with the first snapshot
        self._tensorboard = TensorBoardWriter(tensorboard) if tensorboard is not None and rank == 0 else None
        self.on_snapshot: list[SnapshotCallback] = callbacks + [self._tensorboard] if self._tensorboard else callbacks
        self._owns_writer = writer is None and out is not None
        self.writer = ResultsWriter(out, {}, overwrite=overwrite) if self._owns_writer else writer  # type: ignore[arg-type]
        self.attrs: dict[str, str | int | float] = {}
        if writer is None:  # a loop fisherlab does not drive: say so in the provenance
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self.attrs.update(run_attrs(replace(config, problem=type(model).__name__), device, USER_LOOP, self.loss))
        self.attrs.update(_coverage_attrs(model, self.probe))
        self.attrs["methods_not_applicable"] = _methods_not_applicable(chosen.layers, config.methods)
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

    def step(self, step: int, x: Batch, y: Tensor | None = None, *, shard: Shard | None = None) -> xr.Dataset | None:
        """Probe the batch ``(x, y)`` when ``step % every == 0``; returns that snapshot, else ``None``.

        ``x`` is the model's input tensor or a Hugging Face style mapping (``input_ids``,
        ``attention_mask``, ``labels``, ...: :class:`~fisherlab.probe.Probe`). ``y`` are the true
        targets (for the training loss and ``∇h``; default a mapping's ``labels``); the MC Fisher
        samples its own. Under ``torch.distributed`` ``(x, y)`` are this rank's rows of the global
        batch; ``shard`` says which when the caller knows (else every rank's row count is exchanged).
        """
        if self._closed:
            raise FisherlabError("this FisherProbe is closed; create a new one (with a new out) to probe again")
        if step % self.config.every:
            return None
        lead = batch_tensor(x)
        if shard is None:  # collective under torch.distributed: every rank probes its own rows
            shard = shard_of_batch(lead.shape[0], lead.device)
        started = time.perf_counter()
        # the Fisher and its metrics in full precision, with autograd even under torch.inference_mode()
        with torch.autocast(lead.device.type, enabled=False), torch.inference_mode(False):
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
            tqdm.write(_cost_line(time.perf_counter() - started, lead.device, self.names, self.config), file=sys.stderr)
        if self.writer is not None:
            stored = {name: (snap.factors[name].a, snap.factors[name].g) for name in self.config.store_factors}
            self.writer.append(ds, factors=stored)
        self._snapshots.append(ds)
        self._dataset = None
        for callback in self.on_snapshot:  # after the file: a failing dashboard loses no snapshot
            callback(step, ds)
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
        """Release the output (when this probe opened it) and close the TensorBoard writer; returns
        the dataset (``None`` if never probed).

        :meth:`step` raises afterwards: the file is never reopened, so never truncated.
        """
        self._closed = True
        try:
            if self._owns_writer and self.writer is not None:
                self.writer.close()
                self._owns_writer = False
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
        return self.dataset if (self._dataset is not None or self._snapshots) else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _coverage_attrs(model: nn.Module, probe: Probe) -> dict[str, str | int | float]:
    """``probed_layers``, ``skipped_parameters`` (every parameter outside a probed block), ``skipped_modules``
    (``name: why``) and ``fisher_coverage``: the fraction of the trainable parameters (all of them when none
    is trainable) that lie inside a probed block, each shared parameter counted once."""
    probed_ids = {id(p) for m in probe.layers.values() for p in m.parameters(recurse=False)}
    skipped = [n for n, p in model.named_parameters() if id(p) not in probed_ids]
    params = list(model.parameters())  # each shared parameter once
    counted = [p for p in params if p.requires_grad] or params
    total = sum(p.numel() for p in counted)
    inside = sum(p.numel() for p in counted if id(p) in probed_ids)
    return {
        "probed_layers": ",".join(probe.layers),
        "skipped_parameters": ",".join(skipped) or "none",
        "skipped_modules": "; ".join(probe.skipped) or "none",
        "fisher_coverage": inside / total if total else 1.0,
    }


def _methods_not_applicable(layers: dict[str, nn.Module], methods: Sequence[str]) -> str:
    """``layer: method,method (why); ...`` for the methods that do not apply to a layer's block structure
    (a Kronecker method on a LayerNorm): said once, as one warning line, and kept as a run attribute."""
    by_structure: dict[str, list[str]] = {}
    for name, module in layers.items():
        by_structure.setdefault(layer_structure(module).value, []).append(name)
    entries, said = [], []
    for structure, names in by_structure.items():
        refused = not_applicable(methods, structure)
        if refused:
            why = next(iter(refused.values())).split(", not to ", 1)[-1]
            entries.append(f"{','.join(names)}: {','.join(refused)} (not built on {why})")
            said.append(f"{', '.join(refused)} on the {structure} blocks of {', '.join(names)}")
    if said:
        warnings.warn(
            f"methods that do not apply are not built, their errors stored as NaN: {'; '.join(said)} "
            "(attribute methods_not_applicable)",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    return "; ".join(entries) or "none"


def _check_layer_options(layers: dict[str, nn.Module], config: ProbeConfig, model: nn.Module) -> None:
    """Two-level KFAC takes the Kronecker layers only; stored factors need a fixed shape per layer.

    Raises:
        FisherlabError: A probed layer that is not a Kronecker layer with ``two_level``; an embedding in
            ``store_factors`` (its factors keep the batch's tokens only: their width changes per snapshot).
    """
    if config.two_level:
        kron = {id(m) for m in kronecker_layers(model).values()}
        other = [name for name, m in layers.items() if id(m) not in kron]
        if other:
            raise FisherlabError(
                f"two-level KFAC takes Linear, Conv2d and Conv1D layers only; probe {other} in a run without "
                "--two-level"
            )
    compact = [name for name in config.store_factors if name in layers and _one_hot(layers[name])]
    if compact:
        raise FisherlabError(
            f"--store-factors: {compact} keep the batch's tokens only (their width changes from snapshot to "
            "snapshot) and cannot be stored yet"
        )


def _one_hot(module: nn.Module) -> bool:
    kind = layer_kind(module)
    return kind is not None and kind.one_hot is not None


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
