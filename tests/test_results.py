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


def test_second_writer_of_the_same_output_is_refused(tmp_path) -> None:
    """Two runs writing one --out: the second is refused while the first holds the lock (defect 12)."""
    out = tmp_path / "r.nc"
    with ResultsWriter(out, {}), pytest.raises(FisherlabError, match="another fisherlab run is writing"):
        ResultsWriter(out, {}, overwrite=True)
    with ResultsWriter(out, {}, overwrite=True):  # released when the first finished
        pass


def test_stored_factors_live_in_the_results_file_and_overwrite_replaces_them(tmp_path) -> None:
    """--store-factors puts each snapshot's factors in the results file (compressed); --overwrite keeps only
    the new run's; load_factors reads one slice back, equal to a fresh probe of the same model."""
    import torch

    from fisherlab import cli
    from fisherlab.fisher import ExactBlock
    from fisherlab.layers import LayerFactors
    from fisherlab.results import load_factors
    from tests.tolerances import BITWISE

    out = tmp_path / "r.nc"
    base = [
        "probe",
        "--iterations",
        "2",
        "--layers",
        "6",
        "--methods",
        "kfac",
        "--metrics",
        "frobenius_error",
        "--store-factors",
        "6",
        "--out",
        str(out),
        "--no-progress",
        "--figure",
        "none",
    ]
    assert cli.main([*base, "--every", "1"]) == 0
    assert list(load(out, factors=True)["factors_a_6"]["iteration"].values) == [0, 1, 2]
    assert cli.main([*base, "--every", "2", "--overwrite"]) == 0
    stored = load(out, factors=True)
    assert list(stored["iteration"].values) == [0, 2] and "factors_a_6" not in load(out)
    d = load_factors(out, iteration=2, layer="6")
    torch.testing.assert_close(d["a"], torch.from_numpy(stored["factors_a_6"].values[1]), **BITWISE)
    assert ExactBlock(LayerFactors(d["a"], d["g"])).dim == 6 * 26  # type: ignore[arg-type]
    with pytest.raises(FisherlabError, match="no snapshot at iteration 1"):
        load_factors(out, iteration=1, layer="6")
    with pytest.raises(FisherlabError, match="no stored factors of layer '5'"):
        load_factors(out, iteration=2, layer="5")


def test_stored_factor_loader_refuses_code(tmp_path) -> None:
    """load_factors never unpickles: a crafted .pt handed in is refused with a clear error."""
    import torch

    from fisherlab.results import load_factors

    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1), "g": print}, path)
    with pytest.raises(FisherlabError, match="no stored factors"):
        load_factors(path, iteration=0, layer="5")
