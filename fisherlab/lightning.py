"""A PyTorch Lightning callback around :class:`~fisherlab.fisher_probe.FisherProbe`
(``pip install fisherlab[lightning]``).

Nothing else in fisherlab imports Lightning; ``fisherlab.lightning`` is imported on first use.

Example:
    >>> import lightning, fisherlab as fl                                          # doctest: +SKIP
    >>> probe = fl.lightning.FisherProbeCallback(every=10, out="runs/probe.nc")  # loss "ce"  # doctest: +SKIP
    >>> lightning.Trainer(callbacks=[probe]).fit(module, loader)                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.fisher_probe import FisherProbe
from fisherlab.losses import LossKind

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("fisherlab.lightning needs Lightning: pip install 'fisherlab[lightning]'") from None

__all__ = ["FisherProbeCallback"]


def _first_two(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a batch ``(x, y, ...)`` or ``{"x": ..., "y": ...}``."""
    if isinstance(batch, dict):
        return batch["x"], batch.get("y")
    if isinstance(batch, list | tuple) and len(batch) >= 1:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise FisherlabError("FisherProbeCallback cannot unpack this batch; pass unpack=lambda batch: (x, y)")


class FisherProbeCallback(Callback):
    """Probe the exact Fisher of the LightningModule every ``every`` optimizer steps.

    The probe runs at the start of a training batch, on that batch, before the module's own
    forward and backward, and leaves training undisturbed (see :class:`FisherProbe`). The
    module's ``forward(x)`` must return the network output the loss is taken on (logits for
    ``ce`` and ``bce``). With several processes only global rank 0 writes ``out``.

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
        unpack: ``batch -> (x, y)``; default: the first two entries of a tuple, or keys ``x``, ``y``.
        overwrite: Replace an existing ``out``.
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
        unpack: Callable[[Any], tuple[Tensor, Tensor | None]] = _first_two,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FisherlabError(f"every must be a positive integer, got {every!r}")
        self.loss, self.every, self.out, self.layers, self.methods = loss, every, out, layers, methods
        self.metrics = metrics
        self.config, self.unpack, self.overwrite = config, unpack, overwrite
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
