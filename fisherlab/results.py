"""The results dataset: schema, appending snapshot by snapshot, reading.

One ``xarray.Dataset`` per run with dims ``iteration``, ``layer``, ``method``. After every
snapshot the whole dataset is rewritten to a temporary file that then replaces the output
(``os.replace`` is atomic), so an interrupted run keeps every finished snapshot and a
reader never sees a half-written file. Files are netCDF3 written by scipy (no extra
dependency); open them with ``xarray.open_dataset(path)`` or :func:`load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from fisherlab._errors import FisherlabError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TWO_LEVEL_VARIABLES", "VARIABLES", "ResultsWriter", "annotate", "factors_dir", "load", "load_factors", "snapshot_dataset", "validate"]

#: name -> (dims, long_name, units, definition)
VARIABLES: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "frobenius_error": (
        ("iteration", "layer", "method"),
        "error 1 (relative Frobenius)",
        "1",
        "||F - F_hat||_F / ||F||_F (K Sec. 4.1); NaN where the block is zero (fisher_frobenius_norm = 0: undefined, a warning says so)",
    ),
    "spectral_error": (
        ("iteration", "layer", "method"),
        "error 2 (relative spectral)",
        "1",
        "||spec(F) - spec(F_hat)||_2 / ||spec(F)||_2, spectra sorted descending (K Sec. 4.1); see attr spectrum; NaN when not in attr metrics",
    ),
    "solver_iterations": (("iteration", "layer", "method"), "solver iterations", "1", "products with R(F) (mv+rmv pairs); 0 for kfac"),
    "converged": (("iteration", "layer", "method"), "solver converged", "1", "1 if every iterative stage met tol, else 0"),
    "solver_residual": (("iteration", "layer", "method"), "relative solver residual", "1", "max_k ||R(F)^T x_k - s_k y_k|| / s_1"),
    "approximation_time": (("iteration", "layer", "method"), "time to build the approximation", "s", "wall clock"),
    "fisher_frobenius_norm": (("iteration", "layer"), "||F||_F of the exact block", "1", "||K||_F / N, K the Gram matrix"),
    "train_loss": (("iteration",), "training loss", "1", "mean over the batch of the per-sample loss (summed over outputs)"),
    "wall_time": (("iteration",), "wall time since start", "s", "wall clock at the end of the snapshot"),
    "probe_time": (("iteration",), "probe pass time", "s", "forward + backward passes of the probe"),
}

#: Variables of two-level runs (``--two-level``), T §4.4; ``coarse_space`` includes ``tko``.
TWO_LEVEL_VARIABLES: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "gap": (("iteration", "coarse_space"), "E(beta*) - E(0)", "1",
            "<F_coarse beta, beta> - 2 <R0^T beta, r_KFAC> (T eq. 4.6); beta_TKO for coarse_space tko"),
    "energy_error": (("iteration", "coarse_space"), "relative energy-norm error of the two-level increment", "1",
                     "||zeta_2L - zeta||_F* / ||zeta||_F*, zeta = (F + lambda I)^-1 grad h exact (Woodbury)"),
    "cosine": (("iteration", "coarse_space"), "cosine(zeta_2L, zeta)", "1", "Euclidean cosine with the exact damped natural gradient"),
    "energy_two_level": (("iteration", "coarse_space"), "E(beta*)", "1", "||zeta_2L - zeta||^2_F* computed directly"),
    "block_energy_error": (("iteration", "method"), "relative energy-norm error, block-diagonal method", "1",
                           "||zeta_m - zeta||_F* / ||zeta||_F*, zeta_m[i] = (approximation_i + pi-damping)^-1 grad_i h"),
    "block_cosine": (("iteration", "method"), "cosine(zeta_m, zeta), block-diagonal method", "1", "Euclidean cosine"),
    "energy_kfac": (("iteration",), "E(0)", "1", "||zeta_KFAC - zeta||^2_F* (T eq. 4.2)"),
    "energy_natural_gradient": (("iteration",), "||zeta||^2_F*", "1", "squared energy norm of the exact damped natural gradient"),
}


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


def load(path: str | Path) -> xr.Dataset:
    """Read a results file fully into memory (the file is closed afterwards).

    Raises:
        FisherlabError: Missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"no such results file: {path}")
    try:
        with xr.open_dataset(path, engine="scipy") as ds:
            return ds.load()
    except (ValueError, OSError, TypeError) as exc:
        raise FisherlabError(f"cannot read {path} as a netCDF dataset: {exc}") from None


class ResultsWriter:
    """Accumulates snapshot datasets and keeps the file on disk up to date.

    The writer holds a lock on ``<path>.lock`` (``filelock``; released by :meth:`close`, on
    leaving a ``with`` block, or when the process dies), so a second run with the same
    output is refused instead of silently overwriting the first.

    Args:
        path: Output file (``.nc``).
        attrs: Run attributes (str/int/float only); may be completed before the first write.
        overwrite: Replace an existing file (and the stored factors of the earlier run);
            otherwise an existing path is an error.

    Raises:
        FisherlabError: Existing path without ``overwrite``, unwritable directory, another
            run writing the same path.
    """

    def __init__(self, path: str | Path, attrs: dict[str, str | int | float], *, overwrite: bool = False) -> None:
        from filelock import FileLock, Timeout

        self.path = Path(path)
        if self.path.is_dir():
            raise FisherlabError(f"output {self.path} is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FisherlabError(f"cannot create directory {self.path.parent}: {exc.strerror}") from None
        if not os.access(self.path.parent, os.W_OK):
            raise FisherlabError(f"output directory {self.path.parent} is not writable")
        self._lock = FileLock(str(self.path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise FisherlabError(f"another fisherlab run is writing {self.path} (lock {self.path}.lock held); choose another --out") from None
        except OSError as exc:
            raise FisherlabError(f"cannot lock {self.path}: {exc.strerror}") from None
        if self.path.exists() and not overwrite:
            self.close()
            raise FisherlabError(f"output {self.path} already exists; choose another --out or pass --overwrite")
        if overwrite:
            self._clear_stored_factors()
        self.attrs = attrs
        self.snapshots: list[xr.Dataset] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the output lock (the file stays as last written)."""
        self._lock.release()
        Path(self._lock.lock_file).unlink(missing_ok=True)

    @property
    def factors_dir(self) -> Path:
        """Where ``--store-factors`` puts per-snapshot factors: ``<out>.factors/``."""
        return factors_dir(self.path)

    def store_factors(self, iteration: int, layer: str, a: Tensor, g: Tensor) -> Path:
        """Save one layer's per-sample factors ``a``, ``g`` of one snapshot as a tensors-only
        ``.pt`` file (read it back with :func:`load_factors`)."""
        folder = self.factors_dir
        folder.mkdir(exist_ok=True)
        path = folder / f"iter{iteration:06d}_layer{layer}.pt"
        torch.save({"a": a.cpu(), "g": g.cpu(), "iteration": iteration, "layer": layer}, path)
        return path

    def _clear_stored_factors(self) -> None:
        folder = self.factors_dir
        if folder.is_dir():
            for old in folder.glob("iter*_layer*.pt"):
                old.unlink()

    def append(self, snapshot: xr.Dataset) -> xr.Dataset:
        """Add one snapshot and rewrite the file; returns the whole dataset so far."""
        self.snapshots.append(snapshot)
        ds = xr.concat(self.snapshots, dim="iteration") if len(self.snapshots) > 1 else snapshot
        return self.write(annotate(ds))

    def write(self, ds: xr.Dataset) -> xr.Dataset:
        """Write a whole dataset with the run attributes: temporary file, then ``os.replace``."""
        ds.attrs = dict(self.attrs)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            ds.to_netcdf(tmp, engine="scipy")
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FisherlabError(f"cannot write {self.path}: {exc.strerror}") from None
        return ds


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Give every schema variable of ``ds`` its ``long_name``, ``units`` and ``definition``."""
    for name, (_dims, long_name, units, definition) in (VARIABLES | TWO_LEVEL_VARIABLES).items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units, definition=definition)
    return ds


def factors_dir(out: str | Path) -> Path:
    """Where ``--store-factors`` puts the factors of the run writing ``out``: ``<out>.factors/``."""
    out = Path(out)
    return out.with_name(out.name + ".factors")


def load_factors(path: str | Path) -> dict[str, Tensor | int | str]:
    """Read a stored-factors file with ``torch.load(weights_only=True)``: tensors, ints and
    strings only, so a crafted file cannot run code.

    Returns:
        ``{"a": [N, T, d_in], "g": [N, V, T, d_out], "iteration": int, "layer": str}``.

    Raises:
        FisherlabError: Missing file, or a file that is not a tensors-only factors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FisherlabError(f"no such factors file: {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a user file: any failure becomes one error; torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise FisherlabError(f"cannot read {path} as a fisherlab factors file: {str(exc).splitlines()[0]}") from None
    if not isinstance(d, dict) or not isinstance(d.get("a"), Tensor) or not isinstance(d.get("g"), Tensor):
        raise FisherlabError(f"{path} is not a fisherlab factors file (expected a dict with tensors 'a' and 'g')")
    return d


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
        "iteration": np.array([iteration], dtype=np.int32),
        "layer": np.array(layers, dtype=object),
        "method": np.array(methods, dtype=object),
    }
    all_coords |= {k: np.array(v, dtype=object) for k, v in (coords or {}).items()}
    return xr.Dataset(data_vars, coords=all_coords)
