"""Each analysis script runs in smoke mode and writes its figure; reused datasets are checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import matplotlib.pyplot as plt
import pytest
import xarray as xr

from fisherlab.results import config_json

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
SCRIPTS = ["fig1_error_vs_iteration", "fig2_optimizers", "t_fig2_4_two_level_training", "t_fig5_gap"]
#: Dataset stem and default problem of each script (its default input is data/<stem>_<problem>.nc).
STEMS = {
    "fig1_error_vs_iteration": "fig1_curves",
    "fig2_optimizers": "k_fig2_curves",
    "t_fig2_4_two_level_training": "t_fig2_4_deeplinear64",
    "t_fig5_gap": "t_fig5_curves",
}


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ANALYSES))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    spec = importlib.util.spec_from_file_location(name, ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_analysis_smoke(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<script> --smoke` computes its dataset and draws its figure."""
    module = _script(name, monkeypatch)
    out = tmp_path / f"{name}.png"
    assert module.main(["--smoke", "--input", str(tmp_path / f"{name}.nc"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    sys.modules.pop("_common", None)


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_data_never_stands_in_for_paper_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Smoke and paper-scale runs write apart; a reused file is announced; a file computed with
    other settings is refused with one line naming them (issue 20, item 7)."""
    module = _script(name, monkeypatch)
    common = sys.modules["_common"]
    computed: list[Path] = []

    def fake_compute(config: object, path: Path, *, progress: bool) -> None:  # the run itself is not under test
        computed.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        xr.Dataset(attrs={"config_json": config_json(config)}).to_netcdf(path, engine="scipy")  # type: ignore[arg-type]

    monkeypatch.setattr(common, "compute", fake_compute)
    for draw in ("error_figure", "training_figure", "two_level_figure"):
        monkeypatch.setattr(module, draw, lambda ds: plt.figure(figsize=(1, 1)), raising=False)
    monkeypatch.chdir(tmp_path)
    smoke, paper = Path(f"data/smoke/{STEMS[name]}.nc"), Path(f"data/{STEMS[name]}.nc")

    assert module.main(["--smoke"]) == 0
    assert module.main([]) == 0  # the paper-scale run does not reuse the smoke data
    assert computed == [smoke, paper]
    capsys.readouterr()

    assert module.main(["--smoke"]) == 0
    assert computed == [smoke, paper]
    assert f"reusing {smoke}" in capsys.readouterr().out

    assert module.main(["--input", str(smoke)]) == 2  # paper-scale settings asked of smoke data
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: " in err and "--recompute" in err
    assert "iterations: " in err or "epochs: " in err
    assert computed == [smoke, paper]

    assert module.main(["--input", str(smoke), "--recompute"]) == 0
    assert computed == [smoke, paper, smoke]


def test_reused_file_without_settings_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that records no configuration cannot be checked, so it is not reused."""
    _script("fig1_error_vs_iteration", monkeypatch)
    common = sys.modules["_common"]
    from fisherlab.config import ProbeConfig

    assert common.settings_differ(xr.Dataset(), ProbeConfig()) == ["config_json: the file records no settings"]
    same = xr.Dataset(attrs={"config_json": config_json(ProbeConfig(device="cpu", threads=1))})
    assert common.settings_differ(same, ProbeConfig()) == []  # device and threads do not change the numbers
    other = xr.Dataset(attrs={"config_json": config_json(ProbeConfig(iterations=4, seed=1))})
    assert common.settings_differ(other, ProbeConfig()) == ["iterations: 4 -> 500", "seed: 1 -> 0"]


@pytest.mark.slow
def test_zoo_methods_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`zoo_methods.py --smoke` runs every registered method on the three problems, writes each
    problem's dataset, error figure and summary heatmap under data/smoke/, and prints the table."""
    from fisherlab.method_registry import METHODS

    module = _script("zoo_methods", monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert module.main(["--smoke"]) == 0
    for problem in ("mnist", "transformer", "resnet18"):
        ds = xr.load_dataset(tmp_path / f"data/smoke/zoo_{problem}.nc")
        assert [str(m) for m in ds["method"].values] == list(METHODS)
        assert (tmp_path / f"data/smoke/zoo_{problem}.png").stat().st_size > 10_000
        assert (tmp_path / f"data/smoke/zoo_{problem}-summary.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "median error per method" in out and "Shampoo² vs KPSVD" in out and "EKFAC vs KFAC" in out
    rows = {line.split()[0] for line in out.splitlines() if line and not line.startswith(("median", "method"))}
    assert set(METHODS) <= rows  # one row per method
    sys.modules.pop("_common", None)


def test_zoo_methods_keeps_smoke_apart_and_checks_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Smoke and full runs write apart, a reused file is announced, one computed otherwise refused;
    --input names one problem's file only."""
    module = _script("zoo_methods", monkeypatch)
    common = sys.modules["_common"]
    computed: list[Path] = []

    def fake_compute(config: object, path: Path, *, progress: bool) -> None:
        computed.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        xr.Dataset(attrs={"config_json": config_json(config)}).to_netcdf(path, engine="scipy")  # type: ignore[arg-type]

    monkeypatch.setattr(common, "compute", fake_compute)
    for draw in ("error_figure", "summary_figure"):
        monkeypatch.setattr(module, draw, lambda ds, *a: plt.figure(figsize=(1, 1)))
    monkeypatch.setattr(module, "report", lambda results: "table")
    monkeypatch.chdir(tmp_path)
    smoke = [Path(f"data/smoke/zoo_{p}.nc") for p in ("mnist", "transformer", "resnet18")]
    assert module.main(["--smoke"]) == 0
    assert module.main(["--problem", "mnist"]) == 0
    assert computed == [*smoke, Path("data/zoo_mnist.nc")]
    capsys.readouterr()
    assert module.main(["--smoke", "--problem", "transformer"]) == 0
    assert f"reusing {smoke[1]}" in capsys.readouterr().out
    assert module.main(["--problem", "mnist", "--input", str(smoke[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "iterations: " in err and "--recompute" in err
    assert module.main(["--input", str(smoke[0])]) == 2  # all problems, one file
    assert "pass --problem" in capsys.readouterr().err
    assert len(computed) == 4
