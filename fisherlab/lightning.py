"""A PyTorch Lightning callback around :class:`~fisherlab.fisher_probe.FisherProbe`
(``pip install fisherlab[lightning]``).

Nothing else in fisherlab imports Lightning; ``fisherlab.lightning`` is imported on first use.

Example:
    >>> import lightning, fisherlab as fl                                          # doctest: +SKIP
    >>> probe = fl.lightning.FisherProbeCallback(every=10, out="runs/probe.nc")  # loss "ce"  # doctest: +SKIP
    >>> lightning.Trainer(callbacks=[probe]).fit(module, loader)                  # doctest: +SKIP

Each snapshot's scalars (:func:`~fisherlab.dashboards.snapshot_scalars`) also go to the Trainer's
loggers, live (``log=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xarray as xr
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.dashboards import snapshot_scalars
from fisherlab.fisher_probe import FisherProbe
from fisherlab.losses import LossKind
from fisherlab.probe import Batch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("fisherlab.lightning needs Lightning: pip install 'fisherlab[lightning]'") from None

__all__ = ["FisherProbeCallback"]


def _first_two(batch: Any) -> tuple[Batch, Tensor | None]:
    """``(x, y)`` from a batch ``(x, y, ...)`` or ``{"x": ..., "y": ...}``; any other mapping (a Hugging Face
    style ``input_ids``, ``attention_mask``, ``labels``) is the probe's batch as it is (targets: its ``labels``)."""
    if isinstance(batch, Mapping):
        return (batch["x"], batch.get("y")) if "x" in batch else (batch, None)
    if isinstance(batch, list | tuple) and len(batch) >= 1:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise FisherlabError("FisherProbeCallback cannot unpack this batch; pass unpack=lambda batch: (x, y)")


class _LoggerReport:
    """An ``on_snapshot`` callback: a snapshot's scalars to every logger of ``trainer``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, step: int, snapshot: xr.Dataset) -> None:
        scalars = snapshot_scalars(snapshot)
        for logger in self.trainer.loggers:
            logger.log_metrics(scalars, step=step)


class FisherProbeCallback(Callback):
    """Probe the exact Fisher of the LightningModule every ``every`` optimizer steps.

    The probe runs at the start of a training batch, on that batch, before the module's own
    forward and backward, and leaves training undisturbed (see :class:`FisherProbe`). The
    module's ``forward(x)`` must return the network output the loss is taken on (logits for
    ``ce`` and ``bce``). With several processes only global rank 0 writes ``out``.

    With ``log=True`` each snapshot's scalars (:func:`~fisherlab.dashboards.snapshot_scalars`:
    ``fisher/frobenius_error/<layer>/<method>``, ``fisher/fisher_frobenius_norm/<layer>``,
    ``fisher/train_loss``, ...) go to every logger of the Trainer (``trainer.loggers``:
    TensorBoard, CSV, W&B, ...) at once, with the probe's step as step, through
    ``logger.log_metrics`` (rank zero only, as Lightning's loggers do). Not through
    ``LightningModule.log``: that is allowed in ``on_train_batch_start``, but its values reach the
    loggers only every ``log_every_n_steps`` steps (a snapshot in between would arrive late, under
    another step, or be overwritten), and they would fill ``callback_metrics`` and the progress bar.

    Args:
        loss: The negative log-likelihood of the module's output: ``"ce"`` (default, a classifier's
            logits), ``"bce"`` or ``"mse"``.
        every: Probe when ``trainer.global_step % every == 0`` (once per step under gradient accumulation).
        out: The ``.nc`` file every snapshot is appended to (``None``: kept in memory, see :attr:`dataset`).
        layers: Module paths inside the LightningModule, ``"all"`` (the default: every layer of a registered
            kind) or ``"trainable"``.
        methods: Method names (default: all five).
        metrics: Error metrics (default: error 1 only, the cheap path; see :class:`FisherProbe`).
        config: Every other probe setting (:class:`~fisherlab.ProbeConfig`).
        unpack: ``batch -> (x, y)``; default: the first two entries of a tuple, keys ``x``, ``y``, or
            a Hugging Face style mapping as it is (the module's ``forward(**batch)``, targets its ``labels``).
        overwrite: Replace an existing ``out``.
        log: Send each snapshot's scalars to the Trainer's loggers (none configured: nothing is sent).
        tensorboard: A TensorBoard log directory the probe writes the same scalars to itself
            (see :class:`~fisherlab.fisher_probe.FisherProbe`; not needed with Lightning's
            ``TensorBoardLogger`` and ``log=True``).
    """

    def __init__(
        self,
        loss: LossKind | str = LossKind.CE,
        *,
        every: int = 10,
        out: str | Path | None = None,
        layers: list[str] | str | None = None,
        methods: list[str] | None = None,
        metrics: list[str] | None = None,
        config: ProbeConfig | None = None,
        unpack: Callable[[Any], tuple[Batch, Tensor | None]] = _first_two,
        overwrite: bool = False,
        log: bool = True,
        tensorboard: str | Path | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FisherlabError(f"every must be a positive integer, got {every!r}")
        self.loss, self.every, self.out, self.layers, self.methods = loss, every, out, layers, methods
        self.metrics = metrics
        self.config, self.unpack, self.overwrite = config, unpack, overwrite
        self.log, self.tensorboard = log, tensorboard
        self.probe: FisherProbe | None = None
        self._last_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hook the probe onto the module (on its device); rank 0 opens the output."""
        out = self.out if trainer.is_global_zero else None
        self.probe = FisherProbe(
            pl_module,
            self.loss,
            every=self.every,
            layers=self.layers,
            methods=self.methods,
            metrics=self.metrics,
            out=out,
            config=self.config,
            overwrite=self.overwrite,
            on_snapshot=[_LoggerReport(trainer)] if self.log else [],
            tensorboard=self.tensorboard if trainer.is_global_zero else None,
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Probe this batch when the step is due (before the module's own forward/backward)."""
        step = trainer.global_step
        if self.probe is None or step == self._last_step or step % self.every:
            return
        self._last_step = step
        x, y = self.unpack(batch)
        self.probe.step(step, x, y)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Release the output; the dataset stays available as :attr:`dataset`."""
        if self.probe is not None:
            self.probe.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Release the output; every finished snapshot is on disk."""
        self.on_train_end(trainer, pl_module)

    @property
    def dataset(self) -> xr.Dataset:
        """Every snapshot so far (see :attr:`FisherProbe.dataset`)."""
        if self.probe is None:
            raise FisherlabError("the callback has not started: no snapshot yet")
        return self.probe.dataset
