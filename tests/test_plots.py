"""Figures from results datasets: unique run labels, one legend for every panel, user strings
drawn literally (no mathtext), a readable two-level gap axis (issue 20, item 11), stand-in data named
on the console and in every title; many methods styled by family, and the method x layer summary heatmap
(issue 18)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

from fisherlab import cli
from fisherlab._errors import FisherlabError
from fisherlab.data import announce_data, load_images
from fisherlab.method_registry import METHODS
from fisherlab.plots import (
    FAMILY_COLOR,
    MAX_LAYER_PANELS,
    error_figure,
    fisher_label,
    method_order,
    method_style,
    method_styles,
    plain,
    run_figure,
    run_labels,
    save_figure,
    summary_figure,
    summary_medians,
    training_figure,
    two_level_figure,
)
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


#: A method no registry knows: a results file written with a user's own approximation.
USER_METHOD = "my_own_method"


def zoo_dataset(*, seed: int = 0) -> xr.Dataset:
    """Every registered method and one unregistered, two layers, six snapshots, some values missing."""
    rng = np.random.default_rng(seed)
    methods = [*METHODS, USER_METHOD]
    shape = (6, 2, len(methods))
    coords = {"iteration": np.arange(6) * 10, "layer": ["5", "6"], "method": methods}
    frob = 10.0 ** rng.uniform(-3, 0, shape)
    frob[2, 0, 1] = np.nan  # one snapshot without a value: the median skips it
    spectral = rng.uniform(0.1, 1, shape)
    spectral[:, 1, -1] = np.nan  # the user's method has no error 2 on layer 6
    data = {
        "frobenius_error": (("iteration", "layer", "method"), frob),
        "spectral_error": (("iteration", "layer", "method"), spectral),
    }
    return annotate(xr.Dataset(data, coords=coords, attrs={"problem": "mnist", "fisher": "mc"}))


def test_every_method_has_its_own_style_and_its_family_colour() -> None:
    """Styles are distinct per method; a family shares a hue (its first variant the family's colour);
    an unregistered name gets a style too, distinct from every registered one."""
    styles = method_styles([USER_METHOD, "another_one"])
    assert set(styles) == {*METHODS, USER_METHOD, "another_one"}
    assert len(set(styles.values())) == len(styles)
    assert method_style(USER_METHOD) == styles[USER_METHOD]
    assert method_style("kfac") == styles["kfac"]
    first_of_family: dict[str, str] = {}
    for name, spec in METHODS.items():
        first_of_family.setdefault(spec.family, name)
    for family, name in first_of_family.items():
        assert styles[name][0] == FAMILY_COLOR.get(family, styles[name][0])
    colours = [styles[name][0] for name in first_of_family.values()]
    assert len(set(colours)) == len(colours)  # families differ by colour
    assert styles[USER_METHOD][0] == FAMILY_COLOR["user"]


def test_error_figure_draws_many_methods_by_family() -> None:
    """13 methods and a user's: every line in its method's style, one legend entry each, grouped by family."""
    ds = zoo_dataset()
    fig = error_figure(ds, metrics=("frobenius_error",))
    styles = method_styles([USER_METHOD])
    drawn = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(drawn) == {*METHODS, USER_METHOD}
    for name, line in drawn.items():
        assert (line.get_color(), line.get_marker()) == styles[name][:2]
    labels = _legend_labels(fig)
    assert labels == method_order([str(m) for m in ds["method"].values])
    families = [METHODS[m].family if m in METHODS else "user" for m in labels]
    assert all(f not in families[i + 2 :] or families[i + 1] == f for i, f in enumerate(families[:-1]))  # contiguous
    plt.close(fig)


def test_summary_heatmap_shows_the_median_of_each_method_and_layer() -> None:
    """The heatmap's cells are the medians over iterations (NaN skipped), computed here with numpy per cell."""
    ds = zoo_dataset()
    for metric in ("frobenius_error", "spectral_error"):
        fig = summary_figure(ds, metric)
        ax = fig.axes[0]
        rows = [t.get_text().split(" (")[0] for t in ax.get_yticklabels()]
        cols = [t.get_text() for t in ax.get_xticklabels()]
        assert sorted(rows) == sorted(str(m) for m in ds["method"].values) and cols == ["5", "6"]
        shown = np.ma.filled(ax.images[0].get_array(), np.nan)
        for i, method in enumerate(rows):
            for j, layer in enumerate(cols):
                series = ds[metric].sel({"method": method, "layer": layer}).values
                expected = np.nanmedian(series) if np.isfinite(series).any() else np.nan
                np.testing.assert_allclose(shown[i, j], expected, rtol=1e-12)
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("n/a") == int(np.isnan(shown).sum())
        plt.close(fig)
    assert summary_medians(ds).sel({"method": "kfac", "layer": "5"}) == np.median(ds.frobenius_error.values[:, 0, 0])


def test_a_run_of_many_layers_is_drawn_as_the_summary_heatmap() -> None:
    """``fisherlab probe``'s figure: a panel per layer up to MAX_LAYER_PANELS layers, the heatmap beyond."""
    few = probe_dataset(tuple(str(i) for i in range(MAX_LAYER_PANELS)))
    many = probe_dataset(tuple(str(i) for i in range(MAX_LAYER_PANELS + 1)))
    fig_few, fig_many = run_figure(few), run_figure(many)
    assert len([ax for ax in fig_few.axes if ax.lines]) == MAX_LAYER_PANELS
    assert len(fig_many.axes[0].images) == 1 and len(fig_many.axes[0].get_xticklabels()) == MAX_LAYER_PANELS + 1
    plt.close(fig_few)
    plt.close(fig_many)


def test_summary_of_several_runs_and_missing_metric() -> None:
    runs = {"a": zoo_dataset(), "b": zoo_dataset(seed=1).isel(layer=[0])}
    medians = summary_medians(runs, "spectral_error")
    assert [str(x) for x in medians["layer"].values] == ["a: 5", "a: 6", "b: 5"]
    plt.close(summary_figure(runs, "spectral_error"))
    with pytest.raises(FisherlabError, match="has no solve_error"):
        summary_figure(zoo_dataset(), "solve_error")


def test_plot_summary_writes_the_heatmap(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`fisherlab plot run.nc --summary --metric spectral_error` writes the error figure and run-summary.png."""
    zoo_dataset().to_netcdf(tmp_path / "run.nc", engine="scipy")
    assert cli.main(["plot", str(tmp_path / "run.nc"), "--summary", "--metric", "spectral_error"]) == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert (tmp_path / "run-summary.png").stat().st_size > 10_000
    assert "run-summary.png" in capsys.readouterr().out
    (tmp_path / "run.png").unlink()
    assert cli.main(["plot", str(tmp_path / "run.nc"), "--summary", "--metric", "nope"]) == 2
    assert "has no nope" in capsys.readouterr().err and not (tmp_path / "run.png").exists()  # checked before drawing


def test_methods_whose_curves_coincide_across_families_are_told_apart() -> None:
    """Shampoo² lies on KPSVD: each method has a marker of its own, and a family of the zoo starts dashed
    where the papers' families start solid, so a zoo method's curve on a paper method's differs in marker
    and dash pattern while both keep their families' colours."""
    styles = method_styles()
    assert len({marker for _, marker, _ in styles.values()}) == len(styles)
    for paper, zoo in (("kpsvd", "shampoo2"), ("lanczos", "lowrank"), ("kfac", "diagonal")):
        assert styles[paper][2] == () and styles[zoo][2] != (), (paper, zoo)
        assert styles[paper][1] != styles[zoo][1], (paper, zoo)
    assert styles["shampoo2"][0] == FAMILY_COLOR["shampoo"] and styles["kpsvd"][0] == FAMILY_COLOR["kronecker_svd"]


def test_titles_name_the_approximations_fisher_kind_when_it_differs() -> None:
    """Cross-kind scoring (``--approx-fisher``) is named in the error figure's and the summary's titles."""
    ds = zoo_dataset()
    assert fisher_label(ds) == "Fisher: mc"
    cross = ds.assign_attrs(approx_fisher="empirical")
    same = ds.assign_attrs(approx_fisher="mc")
    want = "Fisher: mc, approximations from empirical"
    assert fisher_label(cross) == want and fisher_label(same) == "Fisher: mc"
    for fig in (error_figure(cross, metrics=("frobenius_error",)), summary_figure(cross)):
        shown = fig.get_suptitle() + " ".join(ax.get_title() for ax in fig.axes)
        assert want in shown
        plt.close(fig)
    fig = error_figure({"a": cross, "b": same}, metrics=("frobenius_error",))
    assert want in fig.get_suptitle() and "Fisher: mc)" in fig.get_suptitle()
    plt.close(fig)
