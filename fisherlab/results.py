"""The results dataset: schema (generated from the metric registry), provenance attributes,
appending snapshot by snapshot, stored factors, reading.

One ``xarray.Dataset`` per run with dims ``iteration``, ``layer``, ``method``. The file format
is the result store of the output's suffix (:mod:`fisherlab.store_registry`); the built-in
``.nc`` store appends each snapshot to a netCDF4 file (:class:`~fisherlab.store.AppendStore`:
``O(1)`` I/O per snapshot, every finished snapshot survives ``kill -9``), with stored
per-sample factors in the same file, compressed; ``fisherlab train`` results (small, written
whole) are netCDF3 by scipy, replaced atomically. Open either with :func:`load` (or
``xarray.open_dataset(path)`` once the run has finished). Here: the schema, the provenance,
the output lock and the writer; the bytes on disk are the store's.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, NETWORK_METRICS, RUN_METRICS
from fisherlab.store_registry import Appender, store_for
from fisherlab.vocabulary import LossKind, Variable

if TYPE_CHECKING:
    from typing_extensions import Self

    from fisherlab.config import ProbeConfig, TrainConfig  # provenance only (run_attrs, config_json)

__all__ = [
    "RUN_VARIABLES",
    "TRAIN_VARIABLES",
    "TWO_LEVEL_VARIABLES",
    "VARIABLES",
    "OutputLock",
    "ResultsWriter",
    "annotate",
    "config_json",
    "factor_variables",
    "load",
    "load_factors",
    "run_attrs",
    "snapshot_dataset",
    "validate",
]

#: Variables of every probe snapshot besides the Fisher's: the training run itself (the run-level
#: entries of the metric registry, :data:`fisherlab.metrics.RUN_METRICS`).
RUN_VARIABLES: tuple[Variable, ...] = RUN_METRICS

#: Variables of ``fisherlab train`` (dims ``optimizer``, ``epoch``).
TRAIN_VARIABLES: tuple[Variable, ...] = (
    Variable("train_loss", ("optimizer", "epoch"), "training loss", "1", "mean per-sample loss over the training set"),
    Variable(
        "valid_loss", ("optimizer", "epoch"), "validation loss", "1", "NaN when the data leave no validation images"
    ),
    Variable(
        "wall_time",
        ("optimizer", "epoch"),
        "training time",
        "s",
        "wall clock of the optimizer steps, evaluation excluded",
    ),
    Variable(
        "lr", ("optimizer",), "learning rate used", "1", "best grid point; the optimizer's default when none is given"
    ),
    Variable("damping", ("optimizer",), "damping chosen", "1", "best grid point; NaN for sgd and adam"),
)


def _schema(variables: tuple[Variable, ...]) -> dict[str, tuple[tuple[str, ...], str, str, str]]:
    return {v.name: (v.dims, v.long_name, v.units, v.definition) for v in variables}


#: The probe schema, generated from the metric registry (per layer and method, per layer, per run):
#: name -> (dims, long_name, units, definition).
VARIABLES: dict[str, tuple[tuple[str, ...], str, str, str]] = _schema((*BLOCK_METRICS, *LAYER_METRICS, *RUN_METRICS))

#: Variables of two-level runs (``--two-level``), T §4.4: the registry's whole-network entries;
#: ``coarse_space`` includes ``tko``.
TWO_LEVEL_VARIABLES: dict[str, tuple[tuple[str, ...], str, str, str]] = _schema(NETWORK_METRICS)


def validate(ds: xr.Dataset) -> None:
    """Check a probe dataset against the schema.

    Raises:
        FisherlabError: Missing variables or wrong dims.
    """
    for name, (dims, *_rest) in VARIABLES.items():
        if name not in ds:
            raise FisherlabError(f"dataset lacks variable {name!r}; is it a fisherlab probe file?")
        if ds[name].dims != dims:
            raise FisherlabError(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
    if int(ds.attrs.get("two_level", 0)):
        for name, (dims, *_rest) in TWO_LEVEL_VARIABLES.items():
            if name not in ds or ds[name].dims != dims:
                raise FisherlabError(f"two-level dataset lacks variable {name!r} with dims {dims}")


def load(path: str | Path, *, factors: bool = False) -> xr.Dataset:
    """Read a results file fully into memory (the file is closed afterwards).

    A probe file whose run died or still runs reads as of its last finished snapshot.

    Args:
        path: A results file of ``fisherlab probe`` or ``fisherlab train`` (``.nc``, or the suffix of
            a registered store), read by the store of its suffix.
        factors: Also read stored per-sample factors (``factors_a_<layer>``, ``factors_g_<layer>``).

    Raises:
        FisherlabError: Missing or unreadable file, or a suffix no store is registered for.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"no such results file: {path}")
    try:
        store = store_for(path)
    except FisherlabError as exc:
        raise FisherlabError(f"cannot read {path}: {exc}") from None
    return store.read(path, factors=factors)


class OutputLock:
    """An exclusive lock on ``path`` (``flock``) that deletes its file on release, safely.

    Deleting a lock file races with a process that opened it just before: that process would
    lock the deleted file while a third creates and locks a new one. So :meth:`acquire`
    checks, once it holds the lock, that ``path`` still names the file it locked, and tries
    again otherwise; :meth:`release` deletes the file while it still holds the lock. The OS
    releases the lock of a process that dies (a leftover file is then harmless). Where
    ``fcntl`` is missing (Windows) ``filelock`` is used and the file is kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._fallback: object | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; ``False`` when another process holds it.

        Raises:
            OSError: The lock file cannot be created.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            from filelock import FileLock, Timeout

            self._fallback = FileLock(str(self.path))
            try:
                self._fallback.acquire(timeout=0)
            except Timeout:
                return False
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                now = os.stat(self.path)
                mine = os.fstat(fd)
                same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # the holder deleted the file after we opened it: lock the current one

    def release(self) -> None:
        """Delete the lock file (still holding the lock), then release it; a no-op when not held."""
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()  # type: ignore[attr-defined]
            self._fallback = None
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the only descriptor releases the flock


class ResultsWriter:
    """Appends snapshot datasets to the file on disk (or writes a whole dataset).

    The writer holds a lock on ``<path>.lock`` (``filelock``; released by :meth:`close`, on
    leaving a ``with`` block, or when the process dies), so a second run with the same
    output is refused instead of silently overwriting the first.

    Args:
        path: Output file; its suffix chooses the result store (``.nc``: :class:`~fisherlab.store.NetCDFStore`).
        attrs: Run attributes (str/int/float only); may be completed before the first write.
        overwrite: Replace an existing file; otherwise an existing path is an error.

    Raises:
        FisherlabError: Existing path without ``overwrite``, unwritable directory, another
            run writing the same path, a suffix no store is registered for.
    """

    def __init__(self, path: str | Path, attrs: dict[str, str | int | float], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.store = store_for(self.path)
        if self.path.is_dir():
            raise FisherlabError(f"output {self.path} is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FisherlabError(f"cannot create directory {self.path.parent}: {exc.strerror}") from None
        if not os.access(self.path.parent, os.W_OK):
            raise FisherlabError(f"output directory {self.path.parent} is not writable")
        self._store: Appender | None = None
        self._appended = 0
        self._closed = False
        self.write_seconds = 0.0  # time spent appending snapshots
        self._lock = OutputLock(Path(str(self.path) + ".lock"))
        try:
            held = self._lock.acquire()
        except OSError as exc:
            raise FisherlabError(f"cannot lock {self.path}: {exc.strerror}") from None
        if not held:
            raise FisherlabError(
                f"another fisherlab run is writing {self.path} (lock {self.path}.lock held); choose another --out"
            )
        if self.path.exists() and not overwrite:
            self.close()
            raise FisherlabError(f"output {self.path} already exists; choose another --out or pass --overwrite")
        for stale in self.path.parent.glob(f"{glob.escape(self.path.name)}.*.tmp"):  # a killed run's <name>.<pid>.tmp
            if stale.name[len(self.path.name) + 1 : -4].isdigit():  # (we hold the lock: no live run writes them)
                stale.unlink(missing_ok=True)
        self.attrs = attrs

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def appended(self) -> int:
        """Snapshots appended to the file so far."""
        return self._appended

    def close(self) -> None:
        """Close the file and release the output lock (the file keeps every appended snapshot);
        a no-op once closed. Appending afterwards raises (it never reopens, so never truncates)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._store is not None:
                self._store.close()
        finally:
            self._store = None
            self._lock.release()

    def append(self, snapshot: xr.Dataset, factors: dict[str, tuple[Tensor, Tensor]] | None = None) -> None:
        """Append one snapshot (and the per-sample factors ``{layer: (a, g)}`` to store) to the file.

        The first snapshot fixes the file's layout; the run attributes are written with it.
        """
        if self._closed:
            raise FisherlabError(f"{self.path} was closed; a closed results writer appends nothing (open a new one)")
        start = time.perf_counter()
        snapshot = annotate(snapshot.copy())
        for name, (a, g) in (factors or {}).items():
            snapshot = snapshot.assign(factor_variables(name, a, g))
        try:
            if self._store is None:
                self._store = self.store.create(self.path, snapshot, dict(self.attrs))
            else:
                self._store.append(snapshot)
        except FisherlabError:
            if self._store is None or self._store.closed:  # a failed write: release the output, write no more
                self.close()
            raise
        self._appended = self._store.rows
        self.write_seconds += time.perf_counter() - start

    def write(self, ds: xr.Dataset) -> xr.Dataset:
        """Write a whole dataset with the run attributes, replacing the file atomically (the store's
        :meth:`~fisherlab.store_registry.ResultStore.write`: temporary file, then ``os.replace``)."""
        ds.attrs = dict(self.attrs)
        self.store.write(self.path, ds)
        return ds


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Give every schema variable of ``ds`` its ``long_name``, ``units`` and ``definition``
    (the probe schema, or the train schema for a dataset with an ``optimizer`` dim)."""
    schema = _schema(TRAIN_VARIABLES) if "optimizer" in ds.dims else VARIABLES | TWO_LEVEL_VARIABLES
    for name, (_dims, long_name, units, definition) in schema.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units, definition=definition)
    return ds


def factor_variables(layer: str, a: Tensor, g: Tensor) -> dict[str, xr.DataArray]:
    """One snapshot's per-sample factors of ``layer`` as variables ``factors_a_<layer>``
    ``[iteration, sample, position, d_in]`` and ``factors_g_<layer>``
    ``[iteration, sample, direction, position, d_out]`` (K eq. (2.4): ``DW = g aᵀ`` per position)."""
    pos, d_in, direction, d_out = (f"{d}_{layer}" for d in ("position", "d_in", "direction", "d_out"))
    return {
        f"factors_a_{layer}": xr.DataArray(a.detach().cpu().numpy()[None], dims=("iteration", "sample", pos, d_in)),
        f"factors_g_{layer}": xr.DataArray(
            g.detach().cpu().numpy()[None], dims=("iteration", "sample", direction, pos, d_out)
        ),
    }


def load_factors(path: str | Path, iteration: int, layer: str) -> dict[str, Tensor | int | str]:
    """Read the per-sample factors of one layer at one iteration from a results file
    (stored with ``--store-factors``); the ``.nc`` store reads only that slice.

    Returns:
        ``{"a": [N, T, d_in], "g": [N, V, T, d_out], "iteration": int, "layer": str}``.

    Raises:
        FisherlabError: Missing file, or no factors of that layer or iteration in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"no such results file: {path}")
    try:
        store = store_for(path)
    except FisherlabError as exc:
        raise FisherlabError(f"{path} holds no stored factors: {exc}") from None
    found = store.read_factors(path, iteration, layer)
    a, g = (torch.from_numpy(np.ascontiguousarray(found[k])) for k in ("a", "g"))
    return {"a": a, "g": g, "iteration": iteration, "layer": layer}


def snapshot_dataset(
    iteration: int,
    layers: list[str],
    methods: list[str],
    per_method: dict[str, np.ndarray],
    per_layer: dict[str, np.ndarray],
    scalars: dict[str, float],
    extra: dict[str, tuple[tuple[str, ...], np.ndarray]] | None = None,
    coords: dict[str, list[str]] | None = None,
) -> xr.Dataset:
    """Build a one-iteration dataset from arrays shaped ``[layer, method]`` / ``[layer]``.

    ``extra`` adds variables with other dims (without ``iteration``), ``coords`` their labels.
    """
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name, arr in per_method.items():
        data_vars[name] = (("iteration", "layer", "method"), arr[None])
    for name, arr in per_layer.items():
        data_vars[name] = (("iteration", "layer"), arr[None])
    for name, value in scalars.items():
        data_vars[name] = (("iteration",), np.array([value], dtype=np.float64))
    for name, (dims, arr) in (extra or {}).items():
        data_vars[name] = (("iteration", *dims), arr[None])
    all_coords: dict[str, np.ndarray] = {
        "iteration": np.array([iteration], dtype=np.int64),
        "layer": np.array(layers, dtype=object),
        "method": np.array(methods, dtype=object),
    }
    all_coords |= {k: np.array(v, dtype=object) for k, v in (coords or {}).items()}
    return xr.Dataset(data_vars, coords=all_coords)


def run_attrs(
    config: ProbeConfig, device: torch.device, data_source: str, loss: LossKind, *, stand_in: bool = False
) -> dict[str, str | int | float]:
    """Provenance attributes of a probe run: the whole configuration, versions, device, conventions."""
    from fisherlab._version import __version__

    return {
        "title": f"fisherlab probe: {config.problem}",
        "problem": config.problem,
        "data_source": data_source,
        "stand_in": int(stand_in),
        "loss": loss.value,
        "seed": config.seed,
        "fisher": config.fisher.value,
        "approx_fisher": config.approx_kind.value,
        "mc_samples": config.mc_samples,
        "accumulate": config.accumulate.value,
        "spectrum": config.spectrum.value,
        "metrics": ",".join(config.metrics),
        "two_level": int(config.two_level),
        "damping": config.damping,
        "coarse_spaces": ",".join(c.value for c in config.coarse_spaces) if config.two_level else "",
        "taylor_order": config.taylor_order,
        "tol": config.tol,
        "optimizer": config.optimizer.value,
        "config_json": config_json(config),
        "fisherlab_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kronecker_order": "out (d_out x d_out) kron in (d_in x d_in), acting on W.flatten() of W [d_out, d_in] "
        "with the bias as last column",
        "symmetric_factors": "every Kronecker factor is symmetric; for conv layers (T > 1) deflation, lanczos and "
        "kfac_corrected are the "
        "best Kronecker-rank-k approximations with symmetric factors (an antisymmetric pair can do better there); "
        "for Linear layers (T = 1) they are the best of all",
        "fisher_scaling": "F = (1/N) sum_n sum_v vec(DW_nv) vec(DW_nv)^T; per-sample loss summed over outputs; "
        "mc directions scaled by 1/sqrt(V)",
    }


def config_json(config: ProbeConfig | TrainConfig) -> str:
    """The whole configuration as JSON (enum fields as their values), for ``config_json``."""
    return json.dumps(asdict(config))
