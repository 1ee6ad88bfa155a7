"""Results files: schema, round trip, atomic rewrite after every snapshot, existing-path guard."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from fisherlab._errors import FisherlabError
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS
from fisherlab.results import ResultsWriter, annotate, load, snapshot_dataset, validate


def _snap(it: int) -> xr.Dataset:
    shape = (2, 3)
    per_method = {m.name: np.full(shape, it + 0.5).astype(m.dtype) for m in BLOCK_METRICS}  # every registered metric
    per_method["converged"] = np.ones(shape, dtype=np.int8)
    return snapshot_dataset(
        it,
        ["1", "5"],
        ["kfac", "kpsvd", "lanczos"],
        per_method,
        {m.name: np.ones(2) for m in LAYER_METRICS},
        {"train_loss": 1.0, "wall_time": 2.0, "probe_time": 0.1},
    )


def test_round_trip_and_schema(tmp_path) -> None:
    """Every snapshot is on disk right after append; the file round-trips identically and validates."""
    attrs = {"seed": 3, "fisher": "mc", "tol": 1e-6}
    writer = ResultsWriter(tmp_path / "r.nc", attrs)
    for it in (0, 10):
        writer.append(_snap(it))
        on_disk = load(tmp_path / "r.nc")  # while the writer still has the file open
        expected = annotate(xr.concat([_snap(i) for i in range(0, it + 1, 10)], dim="iteration"))
        expected.attrs = attrs
        xr.testing.assert_identical(on_disk[list(expected.data_vars)], expected)
    writer.close()
    xr.testing.assert_identical(xr.open_dataset(tmp_path / "r.nc").load()[list(expected.data_vars)], on_disk)
    validate(on_disk)
    assert on_disk.sizes == {"iteration": 2, "layer": 2, "method": 3}
    assert float(on_disk["frobenius_error"].sel({"method": "kpsvd", "layer": "5", "iteration": 10})) == 10.5
    assert on_disk.attrs["seed"] == 3 and on_disk["frobenius_error"].attrs["units"] == "1"
    assert not (tmp_path / "r.nc.tmp").exists()


def test_existing_output_is_refused(tmp_path) -> None:
    """An existing output path is an error unless overwrite is asked; nothing is touched."""
    path = tmp_path / "r.nc"
    path.write_text("keep me")
    with pytest.raises(FisherlabError, match="already exists"):
        ResultsWriter(path, {})
    assert path.read_text() == "keep me"
    ResultsWriter(path, {}, overwrite=True).append(_snap(0))
    validate(load(path))


def test_validate_and_load_reject_other_files(tmp_path) -> None:
    """A dataset without the variables, or a non-netCDF file, gives a clear error."""
    with pytest.raises(FisherlabError, match="lacks variable"):
        validate(xr.Dataset())
    bad = tmp_path / "bad.nc"
    bad.write_text("not netcdf")
    with pytest.raises(FisherlabError, match="cannot read"):
        load(bad)
    with pytest.raises(FisherlabError, match="no such results file"):
        load(tmp_path / "missing.nc")


def test_the_probe_schema_is_read_from_registries_of_one_shape() -> None:
    """Per (layer, method), per layer, whole-network (two-level) and run-level variables are registry entries
    of one shape (Variable subclasses with name, dims and attributes); the schemas are exactly those entries."""
    from fisherlab.metrics import NETWORK_METRICS, RUN_METRICS, BlockMetric, LayerMetric, NetworkMetric, RunMetric
    from fisherlab.results import TWO_LEVEL_VARIABLES, VARIABLES
    from fisherlab.twolevel import TWO_LEVEL_METRICS
    from fisherlab.vocabulary import Variable

    registries = {BlockMetric: BLOCK_METRICS, LayerMetric: LAYER_METRICS, RunMetric: RUN_METRICS}
    assert all(isinstance(v, kind) and isinstance(v, Variable) for kind, reg in registries.items() for v in reg)
    assert list(VARIABLES) == [v.name for reg in registries.values() for v in reg]
    assert all(isinstance(v, NetworkMetric) for v in NETWORK_METRICS) and TWO_LEVEL_METRICS is NETWORK_METRICS
    assert {v.name: v.dims for v in NETWORK_METRICS} == {k: dims for k, (dims, *_) in TWO_LEVEL_VARIABLES.items()}
    assert {v.name for v in RUN_METRICS} == {"train_loss", "wall_time", "probe_time"}
