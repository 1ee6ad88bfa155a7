"""Result stores: the protocol a results file format follows, and the registry that picks one by suffix.

A probe run appends one snapshot (a one-iteration ``xarray.Dataset``) at a time; a store
decides how those rows live on disk. :class:`~fisherlab.results.ResultsWriter`,
:func:`~fisherlab.results.load` and :func:`~fisherlab.results.load_factors` choose the store
by the output's suffix (:func:`store_for`) and hold the output lock, the schema and the
provenance themselves: a store knows no run configuration, no metric and no lock.

Built in: ``.nc``, the HDF5-SWMR netCDF4 store (:class:`~fisherlab.store.NetCDFStore`: every
finished snapshot survives ``kill -9``; also reads the netCDF3 files of ``fisherlab train``).
Another format is one class following :class:`ResultStore` and one line,
``register_store(".suffix", MyStore())``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import xarray as xr

from fisherlab._errors import FisherlabError
from fisherlab.store import NetCDFStore

__all__ = ["STORES", "Appender", "ResultStore", "register_store", "store_for"]

#: File attributes as stores take them.
Attrs = dict[str, str | int | float]


@runtime_checkable
class Appender(Protocol):
    """One output file open for appending, as :meth:`ResultStore.create` returns it."""

    @property
    def rows(self) -> int:
        """Snapshots finished on disk so far."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the file is closed (by :meth:`close`, or after a failed write)."""
        ...

    def append(self, snapshot: xr.Dataset) -> None:
        """Write one snapshot (same variables, dims and sizes as the first) as the next row.

        Raises:
            FisherlabError: A layout that differs from the first snapshot's, or a failed write
                (the appender is then closed, the file keeps its finished rows).
        """
        ...

    def close(self) -> None:
        """Finish the file; a no-op once closed.

        Raises:
            FisherlabError: The file cannot be finished (it keeps its finished rows).
        """
        ...


@runtime_checkable
class ResultStore(Protocol):
    """A results file format: create and append, write whole, read, read stored factors.

    Every data variable of a snapshot has ``iteration`` as its first dim; variables named
    ``factors_a_<layer>`` / ``factors_g_<layer>`` are stored per-sample factors (large: read
    only when asked). Paths are checked by the caller (it exists / it may be replaced); every
    failure is a one-line :class:`~fisherlab._errors.FisherlabError` naming the file.
    """

    def create(self, path: Path, first: xr.Dataset, attrs: Attrs) -> Appender:
        """Create ``path`` (replacing it) with the layout and attributes of ``first``, write ``first``
        as row 0 and return the open file; leaves no file when even ``first`` cannot be written."""
        ...

    def write(self, path: Path, ds: xr.Dataset) -> None:
        """Write a whole dataset (no ``iteration`` layout required; ``ds.attrs`` as file attributes),
        replacing ``path`` atomically: written to ``<name>.<pid>.tmp`` first, then ``os.replace``d
        (:class:`~fisherlab.results.ResultsWriter` removes such files left by a killed run)."""
        ...

    def read(self, path: Path, *, factors: bool = False) -> xr.Dataset:
        """Read the file fully into memory: every finished row, stored factors only with ``factors``."""
        ...

    def read_factors(self, path: Path, iteration: int, layer: str) -> dict[str, np.ndarray]:
        """The stored factors of ``layer`` at ``iteration``: ``{"a": [N, T, d_in], "g": [N, V, T, d_out]}``.

        Raises:
            FisherlabError: No factors of that layer, no such iteration, or an unreadable file.
        """
        ...


#: The result stores by file suffix (lower case, with the dot).
STORES: dict[str, ResultStore] = {".nc": NetCDFStore()}


def register_store(suffix: str, store: ResultStore, *, overwrite: bool = False) -> None:
    """Write and read results files ending in ``suffix`` with ``store``.

    Args:
        suffix: The file suffix, with its dot (``".zarr"``); compared case-insensitively.
        store: An object following :class:`ResultStore`.
        overwrite: Replace the store of a registered suffix.

    Raises:
        FisherlabError: A suffix without a leading dot, one already registered, or a store that
            lacks a method of :class:`ResultStore`.
    """
    if not suffix.startswith(".") or len(suffix) < 2:
        raise FisherlabError(f"register_store: a suffix starts with a dot, e.g. '.nc', got {suffix!r}")
    if not isinstance(store, ResultStore):
        missing = [m for m in ("create", "write", "read", "read_factors") if not callable(getattr(store, m, None))]
        raise FisherlabError(f"register_store({suffix!r}, store): the store lacks {', '.join(missing)}")
    if suffix.lower() in STORES and not overwrite:
        raise FisherlabError(f"a store for {suffix} is registered already (pass overwrite=True to replace it)")
    STORES[suffix.lower()] = store


def store_for(path: str | Path) -> ResultStore:
    """The store that writes and reads ``path``, by its suffix.

    Raises:
        FisherlabError: A suffix no store is registered for, naming the known ones.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in STORES:
        known = ", ".join(STORES)
        raise FisherlabError(
            f"no result store for {Path(path).name!r} (suffix {suffix or 'none'!r}); results files end in {known} "
            "(fisherlab.register_store adds a format)"
        )
    return STORES[suffix]
