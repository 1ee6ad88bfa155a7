"""A Hugging Face ``transformers`` Trainer callback around :class:`~fisherlab.fisher_probe.FisherProbe`
(``pip install 'fisherlab[hf]'``).

Nothing else in fisherlab imports ``transformers``; ``fisherlab.hf`` is imported on first use.

Example:
    >>> import transformers, fisherlab as fl                                               # doctest: +SKIP
    >>> probe = fl.hf.FisherProbeCallback(every=50, out="runs/lm.nc", tensorboard="runs/tb")  # doctest: +SKIP
    >>> transformers.Trainer(model, args, train_dataset=data, callbacks=[probe]).train()  # doctest: +SKIP

How it reaches the batch. A ``TrainerCallback`` never sees the batch, so the callback puts a
forward pre-hook on the model (``with_kwargs=True``) when training begins: on a due step
(``state.global_step % every == 0``, armed in ``on_step_begin``, the first micro-batch under
gradient accumulation) the hook probes the keyword arguments the Trainer passes to the model
(``input_ids``, ``attention_mask``, ``labels``, ...) before the model's own forward. The probe's
own calls of the model pass through the hook untouched (a re-entry guard), and so do evaluation
forwards (the model is not in training mode then).

How the scalars reach the Trainer's reporting. They go through ``Trainer.log`` (the documented
"log ``logs`` on the various objects watching training"): appended to ``state.log_history`` and
handed to every callback's ``on_log``, so every ``report_to`` integration (TensorBoardCallback
writes them as ``train/fisher/...``, W&B, MLflow, ...) and the console printer receive them, at
``state.global_step`` = the snapshot's ``iteration``. Two lighter ways were ruled out by
``transformers``' own code (``trainer_callback.py``, ``trainer.py``): adding the scalars to the
``logs`` dict in ``on_log`` reaches neither ``log_history`` (``Trainer.log`` appends a copy before
calling ``on_log``) nor the integrations (``Trainer(callbacks=...)`` puts user callbacks after the
``report_to`` ones, and ``on_log`` calls callbacks in order); writing ``state.log_history``
directly reaches no integration. A callback is not handed its Trainer, so ``on_train_begin``
finds it as the nearest caller frame whose ``self`` is a ``transformers.Trainer`` (it is
``CallbackHandler``'s caller); or pass ``trainer=`` (``trainer.add_callback(FisherProbeCallback(...,
trainer=trainer))``), as TRL's callbacks take theirs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xarray as xr
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.dashboards import snapshot_scalars
from fisherlab.fisher_probe import FisherProbe
from fisherlab.losses import LossKind

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("fisherlab.hf needs transformers: pip install 'fisherlab[hf]'") from None

__all__ = ["FisherProbeCallback"]


#: Keyword arguments the Trainer adds to the model's call that are not data (``compute_loss``).
_NOT_DATA = ("num_items_in_batch",)


def _whole_batch(inputs: Mapping[str, Any]) -> tuple[Any, Tensor | None]:
    """The model's keyword arguments as the probe's batch (a mapping; its ``labels`` are the targets),
    without the Trainer's loss-normalisation argument ``num_items_in_batch``."""
    return {k: v for k, v in inputs.items() if k not in _NOT_DATA}, None


def _calling_trainer() -> Trainer | None:
    """The nearest caller whose ``self`` is a ``transformers.Trainer`` (``None`` when there is none)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # no reference cycle through the frames


class _TrainerLog:
    """An ``on_snapshot`` callback: ``Trainer.log`` of the snapshot's scalars. Called from the
    forward pre-hook, so at ``state.global_step`` = the snapshot's step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, step: int, snapshot: xr.Dataset) -> None:
        self.trainer.log(snapshot_scalars(snapshot))


class FisherProbeCallback(TrainerCallback):
    """Probe the exact Fisher of the Trainer's model every ``every`` optimizer steps, on the
    training batch, and report each snapshot to the Trainer's logging.

    The probe leaves training undisturbed (see :class:`~fisherlab.fisher_probe.FisherProbe`);
    the snapshot of step ``s`` is taken at parameters after ``s`` updates, on the batch of update
    ``s + 1``, before the model's own forward (see the module docstring for the hook and the
    logging path). With several processes only global rank 0 writes ``out`` and ``tensorboard``.

    Args:
        loss: The negative log-likelihood of the model's output (default ``"causal_lm"``).
        every: Probe when ``state.global_step % every == 0``.
        out: The results file every snapshot is appended to (``None``: kept in memory, see :attr:`dataset`).
        layers: Module paths inside the model (default: every supported layer).
        methods: Method names (default: the papers' five).
        metrics: Error metrics (default: error 1 only, the cheap path; see :class:`FisherProbe`).
        config: Every other probe setting (:class:`~fisherlab.ProbeConfig`).
        unpack: ``model kwargs -> (x, y)`` handed to :meth:`FisherProbe.step`; default: the
            keyword arguments as one mapping and no separate targets.
        overwrite: Replace an existing ``out``.
        log: Report each snapshot's scalars (:func:`~fisherlab.dashboards.snapshot_scalars`) through
            ``Trainer.log``: ``log_history`` and every ``report_to`` integration (names there:
            TensorBoardCallback prefixes ``train/``); the console printer shows them too.
        tensorboard: A TensorBoard log directory the probe writes the same scalars to itself
            (names without ``train/``; independent of ``report_to``).
        trainer: The Trainer to report through; default: found when training begins.

    Raises:
        FisherlabError: ``every`` below 1; at ``on_train_begin``, ``log=True`` and no Trainer found.
    """

    def __init__(
        self,
        loss: LossKind | str = "causal_lm",
        *,
        every: int = 50,
        out: str | Path | None = None,
        layers: list[str] | None = None,
        methods: list[str] | None = None,
        metrics: list[str] | None = None,
        config: ProbeConfig | None = None,
        unpack: Callable[[Mapping[str, Any]], tuple[Any, Tensor | None]] = _whole_batch,
        overwrite: bool = False,
        log: bool = True,
        tensorboard: str | Path | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FisherlabError(f"every must be a positive integer, got {every!r}")
        self.loss, self.every, self.out, self.layers, self.methods = loss, every, out, layers, methods
        self.metrics, self.config, self.unpack, self.overwrite = metrics, config, unpack, overwrite
        self.log, self.tensorboard, self._given_trainer = log, tensorboard, trainer
        self.trainer: Trainer | None = None  # the one reported through, while training
        self.probe: FisherProbe | None = None
        self._hook: RemovableHandle | None = None
        self._due = False  # the next training forward is probed
        self._step = -1
        self._probing = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Hook the probe onto the model; rank 0 opens the outputs."""
        model: nn.Module | None = kwargs.get("model")
        if model is None:
            raise FisherlabError("FisherProbeCallback needs the model: the Trainer passes it to on_train_begin")
        self.trainer = self._given_trainer
        if self.log and self.trainer is None:
            self.trainer = _calling_trainer()  # CallbackHandler's caller
        if self.log and self.trainer is None:
            raise FisherlabError(
                "FisherProbeCallback(log=True) reports through Trainer.log but found no transformers.Trainer "
                "calling it; pass trainer=..., or log=False"
            )
        zero = state.is_world_process_zero
        self.probe = FisherProbe(
            model,
            self.loss,
            every=self.every,
            layers=self.layers,
            methods=self.methods,
            metrics=self.metrics,
            out=self.out if zero else None,
            config=self.config,
            overwrite=self.overwrite,
            on_snapshot=[_TrainerLog(self.trainer)] if self.log and self.trainer is not None else [],
            tensorboard=self.tensorboard if zero else None,
        )
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Arm the hook when this optimizer step is due (once, whatever the gradient accumulation)."""
        step = state.global_step
        self._due = step % self.every == 0 and step != self._step
        if self._due:
            self._step = step

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Probe the batch of a due training forward (the model's keyword arguments), before the forward."""
        if not self._due or self._probing or not module.training or self.probe is None:
            return
        self._due = False
        if args:
            raise FisherlabError(
                "FisherProbeCallback probes the keyword arguments the Trainer passes to the model, "
                f"but the model was called with {len(args)} positional argument(s)"
            )
        x, y = self.unpack(kwargs)
        self._probing = True  # the probe calls the model itself
        try:
            self.probe.step(self._step, x, y)
        finally:
            self._probing = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the hook and release the outputs; the dataset stays available as :attr:`dataset`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.probe is not None:
            self.probe.close()
        self.trainer = None

    @property
    def dataset(self) -> xr.Dataset:
        """Every snapshot so far (see :attr:`FisherProbe.dataset`)."""
        if self.probe is None:
            raise FisherlabError("the callback has not started: no snapshot yet")
        return self.probe.dataset
