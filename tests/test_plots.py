"""Figures from results datasets: unique run labels, one legend for every panel, user strings
drawn literally (no mathtext), a readable two-level gap axis (issue 20, item 11), and stand-in data named
on the console and in every title."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

from fisherlab.data import announce_data, load_images
from fisherlab.plots import error_figure, plain, run_labels, save_figure, training_figure, two_level_figure
from fisherlab.results import annotate

#: A ``problem`` attribute that matplotlib's math parser cannot parse.
CRAFTED = r"$\foo{$ 5$"


def probe_dataset(layers: tuple[str, ...] = ("5",), *, problem: str = "curves", seed: int = 0) -> xr.Dataset:
    """A small probe-shaped dataset (dims iteration, layer, method) with random errors."""
    rng = np.random.default_rng(seed)
    shape = (4, len(layers), 2)
    coords = {"iteration": np.arange(4) * 2, "layer": list(layers), "method": ["kfac", "kpsvd"]}
    data = {m: (("iteration", "layer", "method"), rng.uniform(0.1, 1, shape)) for m in ("frobenius_error",)}
    return annotate(xr.Dataset(data, coords=coords, attrs={"problem": problem, "fisher": "mc"}))


def train_dataset(*, problem: str = "curves", valid: bool = True) -> xr.Dataset:
    """A small ``fisherlab train``-shaped dataset (dims optimizer, epoch)."""
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.1, 1, (2, 3))
    data = {
        "train_loss": (("optimizer", "epoch"), loss),
        "valid_loss": (("optimizer", "epoch"), loss if valid else np.full_like(loss, np.nan)),
        "wall_time": (("optimizer", "epoch"), np.cumsum(np.ones_like(loss), axis=1)),
    }
    coords = {"optimizer": ["sgd", "kfac"], "epoch": np.arange(3)}
    return annotate(xr.Dataset(data, coords=coords, attrs={"problem": problem}))


def two_level_dataset(*, problem: str = "curves") -> xr.Dataset:
    """Gaps of both signs spanning 1e-20 ... 1e4, as an exact coarse space next to a poor one gives."""
    rng = np.random.default_rng(0)
    gap = -(10.0 ** rng.uniform(-20, 4, (6, 3)))
    gap[:, 2] *= -1
    data = {
        "gap": (("iteration", "coarse_space"), gap),
        "energy_error": (("iteration", "coarse_space"), rng.uniform(1e-3, 1, (6, 3))),
        "block_energy_error": (("iteration", "method"), rng.uniform(1e-3, 1, (6, 2))),
    }
    spaces = ["nicolaides", "residuals", "tko"]
    coords = {"iteration": np.arange(6), "coarse_space": spaces, "method": ["kfac", "kpsvd"]}
    return annotate(xr.Dataset(data, coords=coords, attrs={"problem": problem, "two_level": 1}))


@pytest.mark.parametrize(
    ("paths", "labels"),
    [
        (["a/run.nc", "b/run.nc"], ["a/run", "b/run"]),
        (["x/a/run.nc", "y/a/run.nc", "z.nc"], ["x/a/run", "y/a/run", "z"]),
        (["/t/p.nc", "/t/q.nc"], ["p", "q"]),
        (["run.nc", "../x/run.nc"], ["run", "x/run"]),
        (["run.nc", "run.nc"], ["run", "run#2"]),
    ],
)
def test_run_labels_are_unique_and_short(paths: list[str], labels: list[str]) -> None:
    assert run_labels(paths) == labels


def _legend_labels(fig: plt.Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_error_figure_legend_gathers_every_panel() -> None:
    """Run b probes layer 6 only: its lines are in the first panel, not the last, yet in the legend."""
    fig = error_figure({"a": probe_dataset(("5", "6")), "b": probe_dataset(("5",), seed=1)})
    assert _legend_labels(fig) == ["kfac (a)", "kfac (b)", "kpsvd (a)", "kpsvd (b)"]
    plt.close(fig)


def test_training_figure_legend_gathers_every_panel() -> None:
    """Without validation data the last panel is empty; the legend still names every optimizer."""
    fig = training_figure(train_dataset(valid=False))
    assert _legend_labels(fig) == ["sgd", "kfac"]
    plt.close(fig)


@pytest.mark.parametrize(
    "draw",
    [
        lambda: error_figure(probe_dataset(problem=CRAFTED)),
        lambda: error_figure({CRAFTED: probe_dataset(problem=CRAFTED), "b": probe_dataset()}),
        lambda: training_figure(train_dataset(problem=CRAFTED)),
        lambda: two_level_figure(two_level_dataset(problem=CRAFTED)),
    ],
    ids=["error", "error-runs", "training", "two-level"],
)
def test_user_strings_are_drawn_literally(draw, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A `$` in a file attribute or label is text, never mathtext (which would fail to parse)."""
    fig = draw()
    assert plain(CRAFTED) in fig.get_suptitle()  # drawn as written: matplotlib shows \$ as $
    save_figure(fig, tmp_path / "f.png")


def test_two_level_gap_axis_is_readable() -> None:
    """Gaps over 24 decades: few labelled ticks, a linear range chosen from the data, no label outside the figure."""
    fig = two_level_figure(two_level_dataset())
    fig.canvas.draw()
    gap_axis = fig.axes[0]
    low, high = gap_axis.get_ylim()
    ticks = [t for t in gap_axis.get_yticks() if low <= t <= high]
    assert len(ticks) <= 9  # at most four decades per sign and 0
    assert gap_axis.yaxis.get_transform().linthresh >= 1e-9 * np.abs(two_level_dataset()["gap"]).max()
    positions = sorted(gap_axis.transData.transform([(0, t) for t in ticks])[:, 1])
    assert np.min(np.diff(positions)) > 12  # pixels: labels do not overprint
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:3]:
        box = ax.yaxis.label.get_window_extent(renderer)
        assert box.y0 >= 0 and box.y1 <= fig.bbox.y1 and box.x0 >= 0, ax.get_ylabel()  # not clipped
    plt.close(fig)


def test_stand_in_is_named_on_console_and_in_titles(capsys) -> None:
    """A stand-in run says so when it starts and in every figure title (defect 5)."""
    data = load_images("mnist")
    assert data.stand_in
    announce_data(data.source, data.stand_in)
    assert "STAND-IN data, not the paper's dataset" in capsys.readouterr().err
    values = np.full((1, 1, 1), 0.5)
    ds = xr.Dataset(
        {
            "frobenius_error": (("iteration", "layer", "method"), values),
            "spectral_error": (("iteration", "layer", "method"), values),
        },
        coords={"iteration": [0], "layer": ["5"], "method": ["kfac"]},
        attrs={"problem": "mnist", "data_source": data.source, "stand_in": 1},
    )
    assert "STAND-IN" in error_figure(ds)._suptitle.get_text()
    train = xr.Dataset(
        {k: (("optimizer", "epoch"), np.ones((1, 2))) for k in ("train_loss", "valid_loss", "wall_time")},
        coords={"optimizer": ["sgd"], "epoch": [0, 1]},
        attrs={"problem": "mnist", "data_source": data.source},
    )
    assert "STAND-IN" in training_figure(train)._suptitle.get_text()
    plt.close("all")
