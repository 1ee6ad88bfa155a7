"""Live dashboards (issue 19, part 4): a snapshot as flat named scalars (names, values, NaN left
out), ``FisherProbe(on_snapshot=...)``, and ``FisherProbe(tensorboard=...)`` read back with
TensorBoard's own reader and compared with the dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import fisherlab as fl
from fisherlab.dashboards import DASHBOARD_VARIABLES, TensorBoardWriter, snapshot_scalars
from fisherlab.results import snapshot_dataset
from tests.cases import rng, small_mlp, tensorboard_scalars


def _snapshot(iteration: int = 3) -> xr.Dataset:
    """A hand-made snapshot: 2 layers x 2 methods, error 2 not computed (NaN), one undefined error 1."""
    per_method = {
        "frobenius_error": np.array([[0.5, 0.25], [np.nan, 0.125]]),
        "spectral_error": np.full((2, 2), np.nan),
        "solver_iterations": np.ones((2, 2)),
    }
    per_layer = {"fisher_frobenius_norm": np.array([2.0, np.inf])}
    scalars = {"train_loss": 1.5, "probe_time": 0.25, "wall_time": 4.0}
    extra = {"gap": (("coarse_space",), np.array([-0.5, np.nan])), "energy_kfac": ((), np.array(0.75))}
    coords = {"coarse_space": ["nico", "tko"]}
    return snapshot_dataset(iteration, ["fc1", "out"], ["kfac", "kpsvd"], per_method, per_layer, scalars, extra, coords)


def test_snapshot_scalars_names_values_and_nan_left_out() -> None:
    """Names ``fisher/<variable>/<layer>/<method>`` (then per layer, per space, per run) with the dataset's
    values; NaN left out, inf kept, diagnostics (solver iterations) not shown."""
    assert snapshot_scalars(_snapshot()) == {
        "fisher/frobenius_error/fc1/kfac": 0.5,
        "fisher/frobenius_error/fc1/kpsvd": 0.25,
        "fisher/frobenius_error/out/kpsvd": 0.125,
        "fisher/fisher_frobenius_norm/fc1": 2.0,
        "fisher/fisher_frobenius_norm/out": np.inf,
        "fisher/gap/nico": -0.5,
        "fisher/energy_kfac": 0.75,
        "fisher/train_loss": 1.5,
        "fisher/wall_time": 4.0,
        "fisher/probe_time": 0.25,
    }


def test_snapshot_scalars_prefix_and_one_iteration_of_many() -> None:
    """``prefix`` heads every name (``""``: none); one iteration selected from a dataset of several."""
    many = xr.concat([_snapshot(0), _snapshot(5)], dim="iteration")
    assert snapshot_scalars(many.isel(iteration=1), prefix="")["frobenius_error/fc1/kfac"] == 0.5
    assert "probe/train_loss" in snapshot_scalars(many.isel(iteration=[0]), prefix="probe")
    with pytest.raises(fl.FisherlabError, match="one snapshot, got 2 iterations"):
        snapshot_scalars(many)
    with pytest.raises(fl.FisherlabError, match="no variable of a probe snapshot"):
        snapshot_scalars(xr.Dataset({"x": ("iteration", [1.0])}))


def test_dashboard_variables_are_the_error_metrics_and_every_other_registry_kind() -> None:
    """Every error metric, and every per-layer, whole-network and run variable, each once."""
    from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS, NETWORK_METRICS, RUN_METRICS

    names = [v.name for v in DASHBOARD_VARIABLES]
    assert len(names) == len(set(names))
    assert set(names) == {m.name for m in BLOCK_METRICS if m.error} | {
        v.name for v in (*LAYER_METRICS, *NETWORK_METRICS, *RUN_METRICS)
    }


def _probe(tmp_path: Path, **kwargs: object) -> fl.FisherProbe:
    """A probe of a tiny MLP every 2 steps, two methods, error 1 (and the scale-free error)."""
    return fl.FisherProbe(
        small_mlp((4, 5, 3)), "ce", every=2, methods=["kfac", "kpsvd"], out=tmp_path / "p.nc", **kwargs
    )


def _steps(probe: fl.FisherProbe, steps: range) -> None:
    gen = rng(0)
    for step in steps:
        x, y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
        probe.step(step, x, y)


def test_on_snapshot_callbacks_run_after_the_file_with_the_snapshot(tmp_path: Path) -> None:
    """Each callback gets ``(step, snapshot)`` of every snapshot, once the snapshot is in the file (one
    callable alone or a list)."""
    seen: list[tuple[int, int]] = []

    def callback(step: int, snapshot: xr.Dataset) -> None:
        assert probe.writer is not None and int(snapshot["iteration"][0]) == step
        seen.append((step, probe.writer.appended))

    probe = _probe(tmp_path, on_snapshot=callback)
    _steps(probe, range(4))
    probe.close()
    assert seen == [(0, 1), (2, 2)]
    assert _probe(tmp_path, on_snapshot=[callback, callback], overwrite=True).on_snapshot == [callback, callback]


def test_on_snapshot_refuses_what_is_not_callable(tmp_path: Path) -> None:
    with pytest.raises(fl.FisherlabError, match="on_snapshot takes callables"):
        fl.FisherProbe(small_mlp(), "ce", on_snapshot=["not callable"])  # type: ignore[list-item]


def test_tensorboard_event_file_holds_the_dataset_values(tmp_path: Path) -> None:
    """Read back with TensorBoard's reader: every scalar of every snapshot at its step, equal to the
    dataset's value in float32 (TensorBoard's scalar type), flushed before the probe is closed."""
    pytest.importorskip("tensorboard")
    probe = _probe(tmp_path, tensorboard=tmp_path / "tb")
    _steps(probe, range(1))
    first = tensorboard_scalars(tmp_path / "tb")  # flushed at the snapshot: on disk before close
    assert first == {tag: [(0, float(np.float32(v)))] for tag, v in snapshot_scalars(probe.dataset).items()}
    _steps(probe, range(1, 4))
    ds = probe.close()
    assert ds is not None and list(ds["iteration"].values) == [0, 2]
    events = tensorboard_scalars(tmp_path / "tb")
    expected: dict[str, list[tuple[int, float]]] = {}
    for step in ds["iteration"].values:
        for tag, value in snapshot_scalars(ds.sel(iteration=[step])).items():
            expected.setdefault(tag, []).append((int(step), float(np.float32(value))))
    assert events == expected
    assert len(events) == 2 * 2 * 2 + 2 + 3  # (error 1, scale-free) x 2 layers x 2 methods, ||F|| x 2, run x 3
    fro = float(ds["frobenius_error"].sel({"iteration": 2, "layer": "2", "method": "kpsvd"}))
    assert events["fisher/frobenius_error/2/kpsvd"][1] == (2, pytest.approx(fro, rel=1e-7))


def test_tensorboard_missing_is_a_clear_error_before_the_output_is_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TensorBoard: an error naming the extra, and no results file or lock left behind."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    with pytest.raises(fl.FisherlabError, match=r"fisherlab\[hf\]"):
        fl.FisherProbe(small_mlp(), "ce", out=tmp_path / "p.nc", tensorboard=tmp_path / "tb")
    assert not list(tmp_path.iterdir())


def test_tensorboard_writer_creates_its_file_with_the_first_snapshot_and_refuses_after_close(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    writer = TensorBoardWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    writer(7, _snapshot(7))
    writer.close()
    assert tensorboard_scalars(tmp_path / "tb")["fisher/gap/nico"] == [(7, -0.5)]
    with pytest.raises(fl.FisherlabError, match="closed"):
        writer(8, _snapshot(8))
