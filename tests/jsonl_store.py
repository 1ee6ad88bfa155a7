"""A toy result store: one JSON line per snapshot (the first line holds the file attributes).

Not crash-safe or fast (every read parses the whole file); it shows what a store is: a class of
four methods following :class:`fisherlab.store_registry.ResultStore`, registered with one line,
``fl.register_store(".jsonl", JsonLinesStore())``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from fisherlab import FisherlabError


def _line(ds: xr.Dataset) -> str:
    row = ds.to_dict(data="list")
    row["dtypes"] = {name: "O" if v.dtype.kind in "OUS" else str(v.dtype) for name, v in ds.variables.items()}
    return json.dumps(row) + "\n"


def _dataset(line: str) -> xr.Dataset:
    row = json.loads(line)
    ds = xr.Dataset.from_dict(row)
    dtypes = row["dtypes"]
    return ds.assign({n: ds[n].astype(dtypes[n]) for n in ds.data_vars}).assign_coords(
        {n: ds[n].astype(dtypes[n]) for n in ds.coords}
    )


class _Appender:
    def __init__(self, path: Path, first: xr.Dataset, attrs: dict[str, str | int | float]) -> None:
        self.path, self.rows, self._fh = path, 0, path.open("w")
        self._fh.write(json.dumps({"attrs": attrs}) + "\n")
        self.append(first)

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def append(self, snapshot: xr.Dataset) -> None:
        self._fh.write(_line(snapshot))
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        self._fh.close()


class JsonLinesStore:
    """Snapshots as JSON lines (``xarray.Dataset.to_dict``)."""

    def create(self, path: Path, first: xr.Dataset, attrs: dict[str, str | int | float]) -> _Appender:
        return _Appender(path, first, attrs)

    def write(self, path: Path, ds: xr.Dataset) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"attrs": ds.attrs}) + "\n" + _line(ds.assign_attrs({})))
        os.replace(tmp, path)

    def read(self, path: Path, *, factors: bool = False) -> xr.Dataset:
        header, *rows = path.read_text().splitlines()
        ds = xr.concat([_dataset(row) for row in rows], dim="iteration") if len(rows) > 1 else _dataset(rows[0])
        ds.attrs = json.loads(header)["attrs"]
        return ds if factors else ds.drop_vars([n for n in ds.data_vars if str(n).startswith("factors_")])

    def read_factors(self, path: Path, iteration: int, layer: str) -> dict[str, np.ndarray]:
        ds = self.read(path, factors=True)
        if f"factors_a_{layer}" not in ds or iteration not in ds["iteration"]:
            raise FisherlabError(f"{path} holds no stored factors of layer {layer!r} at iteration {iteration}")
        return {k: ds[f"factors_{k}_{layer}"].sel(iteration=iteration).values for k in ("a", "g")}
