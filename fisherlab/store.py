"""A netCDF4 (HDF5) file that grows by one snapshot at a time along an unlimited ``iteration`` dim.

A probe run appends each snapshot instead of rewriting the file: ``O(1)`` I/O per snapshot,
so a run of thousands of snapshots spends a negligible share of its time writing. The file
is written in HDF5's single-writer/multiple-reader (SWMR) mode, which orders its metadata
writes so that the file stays readable whatever moment the writer dies at (``kill -9``
included); each row gets its ``snapshot_written`` flag only after its data are flushed, and
:func:`read` keeps only flagged rows. Readers may open the file while a run writes it.

Every variable of the first snapshot fixes the layout (dims, dtypes, attributes); later
snapshots must match it. Variables named ``factors_*`` (stored per-sample factors) are
chunked one row at a time and gzip-compressed.

:class:`NetCDFStore` is this file format as a :class:`~fisherlab.store_registry.ResultStore`
(the ``.nc`` store): :class:`AppendStore` to write, :func:`read` to read, and the netCDF3 files
``fisherlab train`` writes whole (by scipy).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import xarray as xr

from fisherlab._errors import FisherlabError

__all__ = ["HDF5_SIGNATURE", "WRITTEN", "AppendStore", "NetCDFStore", "is_hdf5", "open_hdf5", "read"]

#: The first bytes of every HDF5 (netCDF4) file.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Per-row flag: 1 once the row's data are on disk (written last).
WRITTEN = "snapshot_written"

#: Rows per chunk of the small per-snapshot variables.
_CHUNK_ROWS = 256

#: Metadata read attempts of an SWMR reader. HDF5's default (100) sleeps 1, 2, 4, ... ns between
#: attempts, so a damaged file (bad checksum on every attempt) reads for ~2^100 ns: forever. 24
#: attempts wait at most ~17 ms per metadata block, plenty for a concurrent writer's flush.
SWMR_READ_ATTEMPTS = 24


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` starts with the HDF5 signature (netCDF4 rather than netCDF3)."""
    with open(path, "rb") as fh:
        return fh.read(8) == HDF5_SIGNATURE


class AppendStore:
    """Create ``path`` with the layout of ``first`` and append it; :meth:`append` adds more.

    Args:
        path: The file (replaced if it exists).
        first: A one-iteration dataset (every data variable has ``iteration`` as first dim).
        attrs: File attributes (str/int/float).

    Raises:
        FisherlabError: The file cannot be created.
    """

    def __init__(self, path: str | Path, first: xr.Dataset, attrs: dict[str, str | int | float]) -> None:
        self.path = Path(path)
        self.rows = 0
        try:
            self._h5 = h5py.File(self.path, "w", libver="latest")
        except OSError as exc:
            raise FisherlabError(f"cannot create {self.path}: {_reason(exc)}") from None
        try:
            self._create(first, attrs)
        except (OSError, RuntimeError) as exc:  # h5py's write errors (a full disk, an I/O error)
            self._abandon()
            self.path.unlink(missing_ok=True)  # it holds no finished snapshot: leave no half-made file
            raise FisherlabError(f"cannot write the first snapshot to {self.path}: {_reason(exc)}") from None

    def _create(self, first: xr.Dataset, attrs: dict[str, str | int | float]) -> None:
        """Lay the file out after ``first``, switch to SWMR and write ``first`` as row 0."""
        nc = h5netcdf.File(self._h5, "a")
        self._layout = {name: (v.dims, v.shape[1:]) for name, v in first.data_vars.items()}
        nc.dimensions = {d: (None if d == "iteration" else n) for d, n in first.sizes.items()}
        for name, coord in first.coords.items():
            if name == "iteration":
                continue
            var = nc.create_variable(name, coord.dims, dtype=_h5_dtype(coord.values))
            var[...] = coord.values
        nc.create_variable("iteration", ("iteration",), dtype=first["iteration"].dtype, chunks=(_CHUNK_ROWS,))
        nc.create_variable(WRITTEN, ("iteration",), dtype="i1", chunks=(_CHUNK_ROWS,), fillvalue=0)
        nc.variables[WRITTEN].attrs.update(
            long_name="snapshot completely written", units="1", definition="1 once the row's data are on disk"
        )
        for name, var in first.data_vars.items():
            factors = str(name).startswith("factors_")
            rows = 1 if factors else _CHUNK_ROWS
            created = nc.create_variable(
                name,
                var.dims,
                dtype=var.dtype,
                chunks=(rows, *var.shape[1:]),
                compression="gzip" if factors else None,
                shuffle=factors,
            )
            created.attrs.update(_plain(var.attrs))
        nc.attrs.update(_plain(attrs))
        self._h5.flush()
        nc.close()  # the netCDF layout is complete; rows go through h5py (the file stays open)
        self._h5.swmr_mode = True  # from here on only appends: the file stays consistent on a crash
        self._datasets = {name: self._h5[name] for name in [*first.data_vars, "iteration", WRITTEN]}
        self._write_row(first)

    def append(self, snapshot: xr.Dataset) -> None:
        """Write one snapshot as the next row and flush it (data first, then its flag).

        Rows are appended through h5py directly (``resize`` + write of each dataset that has
        the ``iteration`` dim); the netCDF metadata made at creation stays valid.

        Raises:
            FisherlabError: A variable, dim or size that differs from the first snapshot.
        """
        if set(snapshot.data_vars) != set(self._layout):
            diff = sorted(map(str, set(snapshot.data_vars) ^ set(self._layout)))
            raise FisherlabError(f"snapshot variables differ from the first snapshot's: {diff}")
        for name, var in snapshot.data_vars.items():
            dims, shape = self._layout[name]
            if var.dims != dims or var.shape[1:] != shape:
                raise FisherlabError(
                    f"variable {name!r} of iteration {int(snapshot['iteration'][0])} has shape {var.shape[1:]}, the "
                    f"first snapshot's was {shape} (a results file keeps one layout; stored factors need one batch "
                    "size)"
                )
        if self._h5 is None:
            raise FisherlabError(f"{self.path} is closed (an earlier write failed or close() was called)")
        try:
            self._write_row(snapshot)
        except (OSError, RuntimeError) as exc:  # h5py's write errors (a full disk, an I/O error)
            self._abandon()
            raise FisherlabError(
                f"cannot write iteration {int(snapshot['iteration'][0])} to {self.path}: {_reason(exc)}; the file "
                f"keeps its {self.rows} finished snapshots"
            ) from None

    def _write_row(self, snapshot: xr.Dataset) -> None:
        """Write ``snapshot`` as the next row: data, flush, then its ``snapshot_written`` flag, flush."""
        row, data = self.rows, self._datasets
        for dataset in data.values():
            dataset.resize(row + 1, axis=0)
        data["iteration"][row] = snapshot["iteration"].values[0]
        for name, var in snapshot.data_vars.items():
            data[name][row] = var.values[0]
        for name, dataset in data.items():
            if name != WRITTEN:
                dataset.flush()
        self._h5.flush()
        data[WRITTEN][row] = 1
        data[WRITTEN].flush()
        self._h5.flush()
        self.rows = row + 1

    @property
    def closed(self) -> bool:
        """Whether the file is closed (by :meth:`close`, or after a failed write)."""
        return self._h5 is None

    def close(self) -> None:
        """Close the file (it stays readable without SWMR afterwards); a no-op once closed.

        Raises:
            FisherlabError: The final metadata cannot be written (the file keeps its finished snapshots).
        """
        if self._h5 is None:
            return
        try:
            self._h5.close()
        except (OSError, RuntimeError) as exc:
            self._abandon()
            raise FisherlabError(
                f"cannot finish {self.path}: {_reason(exc)}; the file keeps its {self.rows} finished snapshots"
            ) from None
        self._h5 = None

    def _abandon(self) -> None:
        """Close the file after a failed write without writing anything more to it.

        HDF5 cannot close a file whose metadata it failed to write (it retries at exit and can
        crash the process), so its file descriptor is first pointed at ``/dev/null``: what HDF5
        still flushes goes nowhere, and the file keeps exactly the rows flushed before, each
        flagged only once complete (SWMR's write order), readable as after ``kill -9``.
        """
        h5, self._h5 = self._h5, None
        if h5 is None:
            return
        try:
            fd = h5.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, RuntimeError, ValueError, TypeError):
            pass
        try:
            h5.close()
        except (OSError, RuntimeError, ValueError):
            pass


def _reason(exc: BaseException) -> str:
    """A one-line reason from an h5py error: the OS message when it carries one (``No space left on device``)."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found and found.group(1):
        return found.group(1)
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _plain(attrs: dict) -> dict[str, str | int | float]:
    """Attributes as Python ``str``/``int``/``float`` (numpy scalars and strings converted)."""
    out: dict[str, str | int | float] = {}
    for key, value in attrs.items():
        if isinstance(value, str):
            out[key] = str(value)
        elif isinstance(value, (bool, np.bool_, int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
    return out


def _h5_dtype(values: np.ndarray) -> object:
    return h5py.string_dtype() if values.dtype.kind in "OUS" else values.dtype


@functools.cache
def _set_read_attempts() -> object | None:
    """HDF5's ``H5Pset_metadata_read_attempts`` (not wrapped by h5py), or ``None`` where it cannot be found."""
    try:
        function = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts  # found in h5py's libhdf5
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return function


def open_hdf5(path: str | Path) -> h5py.File:
    """Open an HDF5 file for reading without ever hanging on a damaged file.

    A finished file opens the normal way (a damaged one fails at once). A file whose writer
    still runs or was killed is refused by the normal open ("truncated" while it grows, "already
    open for write" after ``kill -9``); it is then opened in SWMR-read mode with a bounded number
    of metadata read attempts (:data:`SWMR_READ_ATTEMPTS`), so a damaged one fails within a second.

    Raises:
        OSError, RuntimeError: The file cannot be read (h5py's errors; callers name the file).
    """
    try:
        return h5py.File(path, "r")
    except OSError:
        pass
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    set_attempts = _set_read_attempts()
    if set_attempts is not None:
        set_attempts(fapl.id, SWMR_READ_ATTEMPTS)  # type: ignore[operator]
    fid = h5py.h5f.open(str(path).encode(), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


class _SizedOnce(h5netcdf.dimensions.Dimension):
    """An unlimited dimension of a file open for one :func:`read`, its size computed once.

    h5netcdf computes an unlimited dimension's size (the longest variable along it) from every variable
    that uses it, at each query of each variable's shape: quadratic in the variables, it was 80% of reading
    a two-level run's file (0.5 s of 0.6 s)."""

    _once: int | None = None

    @property
    def size(self) -> int:
        if self._once is None:
            self._once = super().size
        return self._once


def _size_once(nc: h5netcdf.File) -> None:
    """Make ``nc``'s unlimited dimensions :class:`_SizedOnce` (this open file only)."""
    for dim in nc.dimensions.values():
        if type(dim) is h5netcdf.dimensions.Dimension and dim.isunlimited():
            dim.__class__ = _SizedOnce


def read(path: str | Path, *, drop_factors: bool = True) -> xr.Dataset:
    """Read a file of :class:`AppendStore` into memory: the rows whose ``snapshot_written`` is 1.

    Opens with :func:`open_hdf5`, so a file whose writer died (or still runs) reads as of its last
    flushed snapshot, and a damaged file raises instead of hanging.

    Args:
        path: The file.
        drop_factors: Leave out stored per-sample factors (read them with
            :func:`fisherlab.results.load_factors`).
    """
    with open_hdf5(path) as h5, h5netcdf.File(h5, "r") as nc:
        _size_once(nc)
        drop = [n for n in nc.variables if n.startswith("factors_")] if drop_factors else []
        with xr.open_dataset(xr.backends.H5NetCDFStore(nc), drop_variables=drop) as ds:
            ds = ds.load()
    ds = ds.assign_coords({n: c.astype(object) for n, c in ds.coords.items() if c.dtype.kind == "U"})  # as netCDF3
    if WRITTEN in ds:
        ds = ds.isel(iteration=np.flatnonzero(ds[WRITTEN].values == 1)).drop_vars(WRITTEN)
    return ds


def _is_netcdf3(path: Path) -> bool:
    """Whether the file starts with the netCDF3 signature ``CDF`` (what ``fisherlab train`` writes)."""
    try:
        with path.open("rb") as f:
            return f.read(3) == b"CDF"
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (h5py's can span several)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class NetCDFStore:
    """The ``.nc`` result store: probe runs appended to netCDF4 in HDF5-SWMR mode (:class:`AppendStore`),
    whole datasets (``fisherlab train``) written as netCDF3 by scipy; reads both.

    Every finished snapshot survives ``kill -9``; a file whose writer died or still runs reads as of
    its last finished snapshot; a damaged file is one error line, never a hang (:func:`open_hdf5`).
    """

    def create(self, path: Path, first: xr.Dataset, attrs: dict[str, str | int | float]) -> AppendStore:
        """Create ``path`` with the layout of ``first`` and write ``first`` (see :class:`AppendStore`)."""
        return AppendStore(path, first, attrs)

    def write(self, path: Path, ds: xr.Dataset) -> None:
        """Write ``ds`` as netCDF3 (scipy) to ``<name>.<pid>.tmp``, then ``os.replace`` it onto ``path``."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            ds.to_netcdf(tmp, engine="scipy")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FisherlabError(f"cannot write {path}: {exc.strerror}") from None

    def read(self, path: Path, *, factors: bool = False) -> xr.Dataset:
        """Read a netCDF4 probe file (its finished rows, :func:`read`) or a netCDF3 file into memory.

        Raises:
            FisherlabError: Neither netCDF4 nor netCDF3, or damaged.
        """
        if not is_hdf5(path) and not _is_netcdf3(path):
            raise FisherlabError(f"cannot read {path}: not a fisherlab results file (neither netCDF4/HDF5 nor netCDF3)")
        try:
            if is_hdf5(path):
                return read(path, drop_factors=not factors)
            with xr.open_dataset(path, engine="scipy") as ds:
                return ds.load()
        except (ValueError, OSError, RuntimeError, TypeError, KeyError) as exc:  # RuntimeError: h5py, damaged metadata
            raise FisherlabError(
                f"cannot read {path} as a netCDF dataset (damaged or not netCDF): {_first_line(exc)}"
            ) from None

    def read_factors(self, path: Path, iteration: int, layer: str) -> dict[str, np.ndarray]:
        """Read only the factors of ``layer`` at ``iteration`` (one chunk each) from a netCDF4 probe file.

        Raises:
            FisherlabError: Not netCDF4, no factors of that layer or iteration, or a damaged file.
        """
        names = (f"factors_a_{layer}", f"factors_g_{layer}")
        if not is_hdf5(path):
            raise FisherlabError(f"{path} holds no stored factors (not a netCDF4 probe file)")
        try:
            with open_hdf5(path) as h5:
                if not all(n in h5 for n in names):
                    raise FisherlabError(f"{path} holds no stored factors of layer {layer!r} (--store-factors)")
                rows = np.flatnonzero((h5["iteration"][:] == iteration) & (h5[WRITTEN][:] == 1))
                if not rows.size:
                    raise FisherlabError(f"{path} has no snapshot at iteration {iteration}")
                a, g = (np.asarray(h5[n][int(rows[0])]) for n in names)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise FisherlabError(f"cannot read factors from {path} (damaged file?): {_first_line(exc)}") from None
        return {"a": a, "g": g}
