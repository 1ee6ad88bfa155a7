"""Live dashboards: a probe snapshot as flat named scalars, and a TensorBoard writer of them.

The results file stays the source of truth (every variable, NaN with its reason, the provenance);
a dashboard shows the scalars of :func:`snapshot_scalars` as the run goes. They reach

* TensorBoard from ``FisherProbe(..., tensorboard="runs/tb")`` (:class:`TensorBoardWriter`);
* the Lightning logger from ``fisherlab.lightning.FisherProbeCallback(log=True)``;
* the Hugging Face Trainer's reporting (``log_history``, ``report_to``) from
  ``fisherlab.hf.FisherProbeCallback(log=True)``;

each one a user of ``FisherProbe(on_snapshot=[...])``: callables ``(step, snapshot) -> None`` run
after the snapshot is in the results file.

Names are ``<prefix>/<variable>/<labels...>``, the variable named as in the dataset and the labels
its coordinates in dimension order: ``fisher/frobenius_error/<layer>/<method>``,
``fisher/fisher_frobenius_norm/<layer>``, ``fisher/gap/<coarse_space>`` (two-level runs),
``fisher/train_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from fisherlab._errors import FisherlabError
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, NETWORK_METRICS, RUN_METRICS
from fisherlab.vocabulary import Variable

__all__ = ["DASHBOARD_VARIABLES", "SnapshotCallback", "TensorBoardWriter", "snapshot_scalars"]

#: What a dashboard shows of a snapshot: every error metric per layer and method (the solvers'
#: diagnostics, timings and resolutions stay in the file), every per-layer quantity (``||F||_F``),
#: the two-level variables where the run has them, and the run's loss and timings.
DASHBOARD_VARIABLES: tuple[Variable, ...] = (
    *(m for m in BLOCK_METRICS if m.error),
    *LAYER_METRICS,
    *NETWORK_METRICS,
    *RUN_METRICS,
)

#: A user of :class:`~fisherlab.fisher_probe.FisherProbe`'s ``on_snapshot``: called with the step
#: and the one-iteration snapshot dataset once the snapshot is in the results file.
SnapshotCallback = Callable[[int, xr.Dataset], object]


def snapshot_scalars(snapshot: xr.Dataset, *, prefix: str = "fisher") -> dict[str, float]:
    """One probe snapshot as flat named scalars, for a dashboard.

    Every variable of :data:`DASHBOARD_VARIABLES` the snapshot holds, one scalar per coordinate
    combination, named ``<prefix>/<variable>/<label>/...`` (labels in dimension order: layer then
    method). NaN values are left out: in a snapshot NaN means *not computed* (a metric not asked
    for) or *undefined* (a zero block, a warning said so); the file keeps them with their reason,
    a dashboard would only draw empty series of them, and some loggers refuse NaN. ``inf`` (an
    overflowing ``||F||_F``) is a value and is kept.

    Args:
        snapshot: What :meth:`FisherProbe.step <fisherlab.fisher_probe.FisherProbe.step>` returns:
            one iteration (an ``iteration`` dim of size 1, or none after ``ds.isel(iteration=k)``).
        prefix: First part of every name (``""``: none).

    Returns:
        ``{name: value}``, in the order of :data:`DASHBOARD_VARIABLES`, then of the coordinates.

    Raises:
        FisherlabError: Several iterations, or no variable of a probe snapshot.
    """
    if "iteration" in snapshot.dims:
        if snapshot.sizes["iteration"] != 1:
            raise FisherlabError(
                f"snapshot_scalars takes one snapshot, got {snapshot.sizes['iteration']} iterations; "
                "select one with ds.isel(iteration=[k])"
            )
        snapshot = snapshot.isel(iteration=0)
    present = [v for v in DASHBOARD_VARIABLES if v.name in snapshot]
    if not present:
        raise FisherlabError("the dataset holds no variable of a probe snapshot (frobenius_error, train_loss, ...)")
    head = [prefix] if prefix else []
    out: dict[str, float] = {}
    for variable in present:
        array = snapshot[variable.name]
        labels = [[str(label) for label in snapshot[dim].values] for dim in array.dims]
        values = np.asarray(array.values, dtype=np.float64)
        for index in np.ndindex(values.shape):
            value = float(values[index])
            if not math.isnan(value):
                parts = [labels[axis][i] for axis, i in enumerate(index)]
                out["/".join([*head, variable.name, *parts])] = value
    return out


class TensorBoardWriter:
    """Writes :func:`snapshot_scalars` of each snapshot to a TensorBoard event file (an
    ``on_snapshot`` callback; ``FisherProbe(tensorboard=...)`` makes and closes one).

    Each snapshot's scalars are written with the step as global step and flushed at once, so
    TensorBoard shows a snapshot as soon as it is taken. The event file is created with the first
    snapshot (a run that fails before leaves none). Needs the ``tensorboard`` package
    (``pip install 'fisherlab[hf]'`` or ``pip install tensorboard``), imported here only.

    Args:
        log_dir: The run's TensorBoard directory (created; point ``tensorboard --logdir`` at it or a parent).
        prefix: First part of every tag (see :func:`snapshot_scalars`).

    Raises:
        FisherlabError: TensorBoard is not installed.
    """

    def __init__(self, log_dir: str | Path, *, prefix: str = "fisher") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FisherlabError(
                "tensorboard= needs TensorBoard: pip install 'fisherlab[hf]' (or pip install tensorboard)"
            ) from None
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self._summary_writer = SummaryWriter
        self._writer: SummaryWriter | None = None
        self._closed = False

    def __call__(self, step: int, snapshot: xr.Dataset) -> None:
        """Write and flush one snapshot's scalars at global step ``step``.

        Raises:
            FisherlabError: The writer was closed.
        """
        if self._closed:
            raise FisherlabError(f"the TensorBoard writer of {self.log_dir} is closed")
        scalars = snapshot_scalars(snapshot, prefix=self.prefix)
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=str(self.log_dir))
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; a no-op once closed."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
