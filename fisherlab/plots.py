"""Figures drawn from a results dataset (they never train or probe).

:func:`error_figure` is K Figure 1: every registered error metric (error 1 and error 2)
against the training iteration, one column per layer, one line per method. Methods are coloured by
family (:attr:`~fisherlab.method_registry.MethodSpec.family`: ``kfac``, ``kronecker_svd``, ``shampoo``,
...), their variants told apart by marker, dash pattern and shade (:func:`method_styles`).
:func:`summary_figure` is a method × layer heatmap of a metric's median over a run.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
import xarray as xr
from matplotlib.colors import LogNorm, Normalize, SymLogNorm, to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.method_registry import METHODS
from fisherlab.metrics import BLOCK_METRICS, ERROR_METRICS
from fisherlab.vocabulary import PAPER_METHODS

__all__ = [
    "FAMILY_COLOR",
    "MAX_LAYER_PANELS",
    "METHOD_STYLE",
    "block_heatmaps",
    "data_label",
    "error_figure",
    "fisher_label",
    "method_family",
    "method_order",
    "method_style",
    "method_styles",
    "plain",
    "run_figure",
    "run_labels",
    "save_figure",
    "spectra_figure",
    "summary_figure",
    "summary_medians",
    "training_figure",
    "two_level_figure",
]

#: Base colour of each method family (:attr:`MethodSpec.family`): a family's variants share a hue.
FAMILY_COLOR: dict[str, str] = {
    "kfac": "#d62728",
    "kronecker_svd": "#1f77b4",
    "lanczos": "#9467bd",
    "diagonal": "#8c564b",
    "shampoo": "#2ca02c",
    "eigenbasis": "#17becf",
    "lowrank": "#7f7f7f",
    "user": "#e377c2",
}
#: Colours of families that :data:`FAMILY_COLOR` does not name, in order of first appearance.
_EXTRA_COLORS = ("#bcbd22", "#ff7f0e", "#393b79", "#637939", "#8c6d31", "#843c39")
#: Markers, one per method in registration order (names not in the registry after them): methods whose
#: curves coincide across families (Shampoo² on KPSVD) still show both markers.
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8", "x", "+", "1", "2", "3", "4")
#: Dash patterns of a family's variants, by their index in the family (registration order): a family of
#: the papers' methods starts solid, any other family dashed (its curves often lie on a paper method's),
#: later variants dashed otherwise, so coincident curves show through.
_VARIANT_DASHES: tuple[tuple[float, ...], ...] = ((), (6, 2), (2, 2), (8, 2, 2, 2), (4, 1, 1, 1), (1, 1), (10, 3))
#: Lightness of a family's variants (0 = the base colour, > 0 towards white, < 0 towards black).
_VARIANT_SHADES = (0.0, -0.25, 0.35, -0.45, 0.55, -0.6, 0.7)
#: Line widths per method: wider lines are drawn first, so a narrower coincident one sits on top.
_WIDTH = {"deflation": 2.6, "kfac": 1.6}
#: Dash patterns of overlaid runs (``fisherlab plot a.nc b.nc``): one per run.
RUN_DASHES: tuple[tuple[float, ...], ...] = ((), (5, 2), (1, 1.5), (7, 2, 1, 2), (3, 3))

Style = tuple[str, str, tuple[float, ...]]


def _shade(color: str, amount: float) -> str:
    """``color`` moved towards white (``amount > 0``) or black (``amount < 0``)."""
    rgb = np.array(to_rgb(color))
    rgb = rgb + (1 - rgb) * amount if amount > 0 else rgb * (1 + amount)
    red, green, blue = (float(c) for c in np.clip(rgb, 0, 1))
    return to_hex((red, green, blue))


def method_family(method: str) -> str:
    """A method's family (:attr:`MethodSpec.family`); ``user`` for names not in the registry
    (a results file written with a method of one's own)."""
    spec = METHODS.get(method)
    return spec.family if spec is not None else "user"


def method_styles(methods: Sequence[str] = ()) -> dict[str, Style]:
    """Colour, marker and dash pattern of every registered method and of ``methods``.

    Colour says the family (:data:`FAMILY_COLOR`), dash pattern and shade the variant: a registered
    method's variant is its index among the registered methods of its family, so a method looks the
    same in every figure. Every method has a marker of its own, and the families of the zoo start
    dashed, so curves that coincide across families (Shampoo² on KPSVD) stay apart. Names not in
    the registry join the ``user`` family after the registered user methods, in the order given.
    No two methods share a style.
    """
    families: dict[str, list[str]] = {}
    for name, spec in METHODS.items():
        families.setdefault(spec.family, []).append(name)
    unregistered = [n for n in dict.fromkeys(methods) if n not in METHODS]
    for name in unregistered:
        if name not in families.get("user", []):
            families.setdefault("user", []).append(name)
    marker_of = {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate([*METHODS, *unregistered])}
    extra = iter(_EXTRA_COLORS * (1 + len(families)))
    styles: dict[str, Style] = {}
    for family, names in families.items():
        base = FAMILY_COLOR.get(family) or next(extra)
        first_dash = 0 if any(n in PAPER_METHODS for n in names) else 1
        for i, name in enumerate(names):
            shade = _VARIANT_SHADES[i % len(_VARIANT_SHADES)]
            dashes = _VARIANT_DASHES[(i + first_dash) % len(_VARIANT_DASHES)]
            styles[name] = (_shade(base, shade), marker_of[name], dashes)
    return styles


def method_order(methods: Sequence[str]) -> list[str]:
    """``methods`` grouped by family (in registration order of the families), registered methods
    in registration order, names not in the registry last: the order of legends and heatmap rows."""
    registered = list(METHODS)
    rank_family = {f: i for i, f in enumerate(dict.fromkeys(s.family for s in METHODS.values()))}

    def key(name: str) -> tuple[int, int, int]:
        if name in METHODS:
            return (rank_family[METHODS[name].family], registered.index(name), 0)
        return (len(rank_family), len(registered), list(methods).index(name))

    return sorted(dict.fromkeys(methods), key=key)


class _MethodStyles(Mapping[str, Style]):
    """:data:`METHOD_STYLE`: the style of every registered method, looked up when asked (methods
    registered after ``import fisherlab.plots`` are in it too)."""

    def __getitem__(self, method: str) -> Style:
        if method not in METHODS:
            raise KeyError(method)
        return method_styles()[method]

    def __iter__(self) -> Iterator[str]:
        return iter(list(METHODS))

    def __len__(self) -> int:
        return len(METHODS)


#: Fixed colour, marker and dash pattern per registered method (:func:`method_styles`), so "kfac"
#: looks the same in every figure and methods whose curves coincide (deflation and KPSVD reach the
#: same optimum) stay visible: the one drawn later is dashed, so the one beneath shows through its gaps.
METHOD_STYLE: Mapping[str, Style] = _MethodStyles()


#: Axis labels of the registered metrics.
_LONG_NAMES = {m.name: m.long_name for m in BLOCK_METRICS}


def method_style(method: str) -> Style:
    """Colour, marker and dash pattern of a method (a name not in the registry: a ``user`` style)."""
    return method_styles([method])[method]


def plain(text: object) -> str:
    """A user string (file attribute, path, coordinate) as literal figure text: ``$`` escaped,
    so matplotlib never parses it as mathtext."""
    return str(text).replace("$", r"\$")


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """One unique label per results file: the shortest trailing part of each path (suffix
    dropped) that tells it from the others, e.g. ``a/run.nc``, ``b/run.nc`` -> ``a/run``, ``b/run``.
    A path given twice gets ``#2``, ``#3``, ... after its label."""
    parts = [Path(p).with_suffix("").parts or (str(p),) for p in paths]
    distinct = set(parts)
    depth = 1
    while depth < max(len(x) for x in parts) and len({x[-depth:] for x in distinct}) < len(distinct):
        depth += 1
    labels = ["/".join(x[-depth:]) for x in parts]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _legend_from_all(axes: np.ndarray, order: list[str] | None = None) -> tuple[list, list[str]]:
    """Handles and labels of every panel, each label once (first panel that has it wins);
    sorted by ``order`` when given (labels not in it last), and per-panel legends removed."""
    found: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    labels = list(found)
    if order is not None:
        rank = {label: i for i, label in enumerate(order)}
        labels = sorted(labels, key=lambda label: rank.get(label, len(rank)))
    return [found[label] for label in labels], labels


def _spans_decades(values: np.ndarray) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 0 and v.max() / v.min() > 10


def data_label(ds: xr.Dataset) -> str:
    """What data a run used, for figure titles: a stand-in is named as such."""
    source = str(ds.attrs.get("data_source", ""))
    stand_in = bool(int(ds.attrs.get("stand_in", 0))) or source.upper().startswith("STAND-IN")
    if stand_in:
        return "STAND-IN data, not the paper's"
    return source.split(" (")[0].split(":")[0] if source else "data not recorded"


def fisher_label(ds: xr.Dataset) -> str:
    """Which Fisher a run scored against, for figure titles: ``Fisher: mc``, and with ``--approx-fisher``
    of another kind (cross-kind scoring) ``Fisher: mc, approximations from empirical``."""
    fisher = str(ds.attrs.get("fisher", "?"))
    approx = str(ds.attrs.get("approx_fisher", "") or fisher)
    return f"Fisher: {fisher}" + (f", approximations from {approx}" if approx != fisher else "")


def error_figure(runs: xr.Dataset | dict[str, xr.Dataset], *, metrics: tuple[str, ...] | None = None) -> Figure:
    """Error metrics vs iteration per layer (rows: metrics, columns: layers), K Fig. 1.

    Each method has its own colour, marker and dash pattern. Several runs (a dict of
    datasets by label) are overlaid: colour and marker still say the method, the dash
    pattern says the run. A metric's axis is logarithmic when its values span more than a decade.

    Args:
        runs: One dataset, or several by label.
        metrics: Variables to draw; default every registered error metric the datasets hold
            (a file written before a metric was added still plots).

    Raises:
        FisherlabError: When the datasets lack the metrics asked for, or hold none.
    """
    datasets = runs if isinstance(runs, dict) else {"": runs}
    if metrics is None:
        metrics = tuple(m for m in ERROR_METRICS if any(m in ds for ds in datasets.values()))
        if not metrics:
            raise FisherlabError("the dataset has no error metric: not a fisherlab probe file?")
    else:
        for label, ds in datasets.items():
            missing = [m for m in metrics if m not in ds]
            if missing:
                raise FisherlabError(f"dataset {label} has no {', '.join(missing)}: not a fisherlab probe file?")
    computed = [m for m in metrics if any(m in ds and bool(ds[m].notnull().any()) for ds in datasets.values())]
    metrics = tuple(computed)  # skip metrics not computed (e.g. --metrics frobenius_error)
    if not metrics:
        raise FisherlabError("the dataset holds no computed error values to plot")
    layers = list(dict.fromkeys(str(x) for ds in datasets.values() for x in ds["layer"].values))
    canonical = method_order([str(m) for ds in datasets.values() for m in ds["method"].values])
    styles = method_styles(canonical)
    methods = sorted(canonical, key=lambda m: -_WIDTH.get(m, 1.4))  # wide lines first, narrower coincident ones on top
    fig, axes = plt.subplots(
        len(metrics), len(layers), figsize=(4.2 * len(layers) + 2.0, 3.2 * len(metrics)), squeeze=False, sharex=True
    )
    for row, metric in enumerate(metrics):
        log = any(_spans_decades(ds[metric].values) for ds in datasets.values() if metric in ds)
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            for run_index, (label, ds) in enumerate(datasets.items()):
                if layer not in [str(x) for x in ds["layer"].values] or metric not in ds:
                    continue
                for method in methods:
                    if method not in [str(m) for m in ds["method"].values]:
                        continue
                    color, marker, dashes = styles[method]
                    if len(datasets) > 1:
                        dashes = RUN_DASHES[run_index % len(RUN_DASHES)]
                    series = ds[metric].sel({"layer": layer, "method": method})
                    it = ds["iteration"].values
                    # offset markers per method so coincident curves show both markers
                    every = max(1, len(it) // 12)
                    ax.plot(
                        it,
                        series.values,
                        color=color,
                        marker=marker,
                        markersize=4,
                        lw=_WIDTH.get(method, 1.4),
                        dashes=dashes,
                        markevery=(methods.index(method) % every, every),
                        label=plain(f"{method} ({label})" if label else method),
                    )
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(_LONG_NAMES.get(metric, metric))
            ax.set_xlabel("training iteration")
            ax.set_title(plain(f"layer {layer}") if row == 0 else "")
            ax.grid(True, alpha=0.3)
    # one legend for every panel's lines: a run or method missing from the last panel still shows
    labels_by_run = [plain(f"{m} ({label})" if label else m) for m in canonical for label in datasets]
    handles, labels = _legend_from_all(axes, labels_by_run)
    # grouped by family (one hue each); many entries: smaller text, two columns past 16
    axes[0, -1].legend(
        handles,
        labels,
        title="method" + (" (run)" if len(datasets) > 1 else ""),
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize="small" if len(labels) > 6 else None,
        ncol=2 if len(labels) > 16 else 1,
        handlelength=3.0,
    )
    first = next(iter(datasets.values()))
    if len(datasets) == 1:
        title = (
            f"Fisher approximation errors: {first.attrs.get('problem', '?')} ({data_label(first)}), "
            f"{fisher_label(first)}, spectrum: {first.attrs.get('spectrum', '?')}"
        )
    else:
        cross = any(fisher_label(ds) != f"Fisher: {ds.attrs.get('fisher', '?')}" for ds in datasets.values())
        title = "Fisher approximation errors: " + "; ".join(
            f"{label} = {ds.attrs.get('problem', '?')} ({data_label(ds)}" + (f", {fisher_label(ds)})" if cross else ")")
            for label, ds in datasets.items()
        )
    fig.suptitle(plain(title))
    fig.tight_layout()
    return fig


def summary_medians(runs: xr.Dataset | dict[str, xr.Dataset], metric: str = "frobenius_error") -> xr.DataArray:
    """The median of ``metric`` over the iterations of a run, per method and layer (NaN skipped).

    Several runs (a dict by label) are side by side: their layers become ``<label>: <layer>``.
    Methods are grouped by family (:func:`method_order`); a method or layer a run lacks is NaN.

    Returns:
        A ``[method, layer]`` array named ``metric``.

    Raises:
        FisherlabError: A dataset without ``metric``.
    """
    datasets = runs if isinstance(runs, dict) else {"": runs}
    parts = []
    for label, ds in datasets.items():
        if metric not in ds:
            known = ", ".join(m for m in ERROR_METRICS if m in ds) or "none"
            raise FisherlabError(
                f"{'dataset ' + label + ' ' if label else 'the dataset '}has no {metric} (error metrics: {known})"
            )
        median = ds[metric].median("iteration", skipna=True) if "iteration" in ds[metric].dims else ds[metric]
        median = median.transpose("method", "layer")
        layers = [f"{label}: {x}" if label else str(x) for x in median["layer"].values]
        parts.append(median.assign_coords(layer=layers, method=[str(m) for m in median["method"].values]))
    out = xr.concat(parts, dim="layer", join="outer") if len(parts) > 1 else parts[0]
    out = out.sel({"method": method_order([str(m) for m in out["method"].values])})
    out.name = metric
    return out


#: Beyond this many layers a run's default figure is the summary heatmap: a panel per layer would be too wide.
MAX_LAYER_PANELS = 12


def run_figure(ds: xr.Dataset) -> Figure:
    """The figure ``fisherlab probe`` draws of its run: :func:`error_figure` (a panel per layer), or past
    :data:`MAX_LAYER_PANELS` layers (``--layers all`` on a transformer) the method × layer heatmap of median
    error 1 (:func:`summary_figure`); ``fisherlab plot FILE`` still draws every panel."""
    if ds.sizes.get("layer", 1) > MAX_LAYER_PANELS and "frobenius_error" in ds:
        return summary_figure(ds, "frobenius_error")
    return error_figure(ds)


def summary_figure(runs: xr.Dataset | dict[str, xr.Dataset], metric: str = "frobenius_error") -> Figure:
    """Method × layer heatmap of the median of ``metric`` over a run (``fisherlab plot --summary``).

    Rows are the methods grouped by family (a coloured bar on the left says the family), columns
    the layers; each cell shows its median. The colour scale is logarithmic when the medians span
    more than a decade; cells without a value (a metric not computed, a method a run lacks) are
    grey and read ``n/a``. See :func:`summary_medians` for several runs.

    Raises:
        FisherlabError: A dataset without ``metric``, or no value to show.
    """
    medians = summary_medians(runs, metric)
    values = medians.values.astype(float)
    finite = values[np.isfinite(values)]
    if not finite.size:
        raise FisherlabError(f"the dataset holds no computed {metric} values to summarise")
    methods = [str(m) for m in medians["method"].values]
    layers = [str(x) for x in medians["layer"].values]
    log = bool((finite > 0).all()) and _spans_decades(finite)
    norm = LogNorm(finite.min(), finite.max()) if log else Normalize(finite.min(), finite.max())
    width = 2.8 + 0.9 * max(len(layers), 2) + 0.05 * max(len(x) for x in layers)
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.38 * len(methods)), layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for i in range(len(methods)):
        for j in range(len(layers)):
            v = values[i, j]
            if np.isfinite(v):
                dark = norm(v) < 0.6  # light text on the dark end of viridis
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="#555555")
    styles = method_styles(methods)
    ax.set_yticks(range(len(methods)), [plain(f"{m} ({method_family(m)})") for m in methods])
    for tick, m in zip(ax.get_yticklabels(), methods, strict=True):
        tick.set_color(styles[m][0])  # the family's hue, as in the error figures
    ax.set_xticks(range(len(layers)), [plain(x) for x in layers], rotation=45 if len(layers) > 4 else 0, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("method (family)")
    long_name = _LONG_NAMES.get(metric, metric)
    fig.colorbar(im, ax=ax, label=plain(textwrap.fill(f"median {long_name}", 40)), shrink=0.9)
    first = runs if isinstance(runs, xr.Dataset) else next(iter(runs.values()))
    ax.set_title(
        plain(
            f"median over iterations: {first.attrs.get('problem', '?')} ({data_label(first)}), {fisher_label(first)}"
        ),
        fontsize=10,
    )
    return fig


def _lines(ax: plt.Axes, da: xr.DataArray, dim: str, *, log: bool) -> None:
    df = da.to_dataframe().reset_index()
    order = [str(v) for v in da[dim].values]
    styles = method_styles(order) if dim == "method" else None
    palette = {m: styles[m][0] for m in order} if styles else None
    markers = {m: styles[m][1] for m in order} if styles else True
    dashes = {m: styles[m][2] or "" for m in order} if styles else True
    sns.lineplot(
        data=df,
        x="iteration",
        y=da.name,
        hue=dim,
        style=dim,
        hue_order=order,
        style_order=order,
        palette=palette,
        markers=markers,
        dashes=dashes,
        markersize=4,
        ax=ax,
    )
    if log and _spans_decades(np.abs(da.values)):
        ax.set_yscale("log")
    ax.set_xlabel("training iteration")
    ax.set_ylabel(textwrap.fill(plain(da.attrs.get("long_name", str(da.name))), 36))  # long names on two lines
    ax.grid(True, alpha=0.3)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), title=dim.replace("_", " "))


def _symlog_axis(ax: plt.Axes, values: np.ndarray, *, decades: int = 8, ticks_per_sign: int = 4) -> None:
    """A ``symlog`` y axis for values of both signs spanning many decades (T Fig. 5's gap).

    The linear range around 0 reaches up to the smallest nonzero magnitude, but at least to
    ``10^-decades`` of the largest (smaller values are rounding, not signal); at most
    ``ticks_per_sign`` labelled decades per sign, so labels never overprint.
    """
    v = np.abs(values[np.isfinite(values) & (values != 0)])
    if not v.size:
        return
    top = float(v.max())
    k0 = math.floor(math.log10(max(float(v.min()), top * 10.0**-decades)))
    k1 = math.ceil(math.log10(top))
    ax.set_yscale("symlog", linthresh=10.0**k0, linscale=1.0)
    step = max(1, math.ceil((k1 - k0) / ticks_per_sign))
    powers = [10.0**k for k in range(k1, k0, -step)] or [10.0**k1]
    ticks = [0.0]
    ticks += powers if bool((values > 0).any()) else []
    ticks += [-x for x in powers] if bool((values < 0).any()) else []
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())


def two_level_figure(ds: xr.Dataset) -> Figure:
    """T Figure 5 (gap ``E(β*) - E(0)`` vs iteration per coarse space, ``symlog`` axis) and the
    relative energy-norm errors of the two-level and block-diagonal increments.

    Raises:
        FisherlabError: When the dataset has no two-level variables (run with ``--two-level``).
    """
    if "gap" not in ds:
        raise FisherlabError("dataset has no two-level results; run fisherlab probe with --two-level")
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), layout="constrained")
    _lines(axes[0], ds["gap"], "coarse_space", log=False)
    _symlog_axis(axes[0], ds["gap"].values)
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_title("T Fig. 5: gap (negative = closer to the natural gradient)")
    _lines(axes[1], ds["energy_error"], "coarse_space", log=True)
    axes[1].set_title("two-level increments vs exact ζ")
    _lines(axes[2], ds["block_energy_error"], "method", log=True)
    axes[2].set_title("block-diagonal increments vs exact ζ")
    fig.suptitle(
        plain(
            f"Two-level KFAC: {ds.attrs.get('problem', '?')} ({data_label(ds)}), "
            f"damping {ds.attrs.get('damping', '?')}, Fisher: {ds.attrs.get('fisher', '?')}"
        )
    )
    return fig


def training_figure(ds: xr.Dataset) -> Figure:
    """K Figure 2 / T Figures 2-4: training and validation loss against epoch and wall time.

    Raises:
        FisherlabError: When the dataset is not a ``fisherlab train`` result.
    """
    if "optimizer" not in ds.dims:
        raise FisherlabError("dataset has no optimizer dim: not a fisherlab train file")
    df = ds[["train_loss", "valid_loss", "wall_time"]].to_dataframe().reset_index()
    order = [str(o) for o in ds["optimizer"].values]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = [
        ("epoch", "train_loss"),
        ("wall_time", "train_loss"),
        ("epoch", "valid_loss"),
        ("wall_time", "valid_loss"),
    ]
    for ax, (x, y) in zip(axes, panels, strict=True):
        panel = df.dropna(subset=[x, y])
        if panel.empty:
            ax.text(
                0.5,
                0.5,
                "no validation data" if y == "valid_loss" else "no data",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        sns.lineplot(
            data=panel,
            x=x,
            y=y,
            hue="optimizer",
            style="optimizer",
            hue_order=order,
            style_order=order,
            markers=True,
            dashes=False,
            markersize=4,
            ax=ax,
        )
        if _spans_decades(ds[y].values):
            ax.set_yscale("log")
        ax.set_xlabel("epoch" if x == "epoch" else "time (s)")
        ax.set_ylabel(ds[y].attrs.get("long_name", y))
        ax.grid(True, alpha=0.3)
    handles, labels = _legend_from_all(axes, order)  # every panel's: the last may lack an optimizer
    labels = [plain(label) for label in labels]
    axes[-1].legend(handles, labels, title="optimizer", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(plain(f"Optimizers on {ds.attrs.get('problem', '?')} ({data_label(ds)})"))
    fig.tight_layout()
    return fig


def block_heatmaps(exact: Tensor, approximations: dict[str, Tensor], *, max_side: int = 400) -> Figure:
    """The exact block next to each approximation as heatmaps (dense views; small layers).

    Args:
        exact: Dense exact block ``[D, D]``.
        approximations: Dense approximations by method name.
        max_side: Show only the leading ``max_side × max_side`` corner of larger blocks.
    """
    mats = {"exact": exact, **approximations}
    corner = exact[:max_side, :max_side].abs().flatten().cpu().double()
    # Fisher entries span many decades: a symmetric log scale from the median entry to the
    # largest keeps the structure visible (a linear scale shows a flat grey square)
    vmax = float(corner.max()) or 1.0
    positive = corner[corner > 0]
    linthresh = float(positive.median()) if positive.numel() else vmax
    norm = SymLogNorm(linthresh=min(linthresh, vmax), vmin=-vmax, vmax=vmax, base=10)
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items(), strict=True):
        im = ax.imshow(m[:max_side, :max_side].cpu().numpy(), cmap="RdBu_r", norm=norm)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="entry (symmetric log scale)")
    return fig


def spectra_figure(spectra: dict[str, Tensor]) -> Figure:
    """Sorted eigenvalue magnitudes (log scale) of the exact block and each approximation."""
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = method_styles([n for n in spectra if n != "exact"])
    for name, ev in spectra.items():
        color, _marker, dashes = styles.get(name, ("black", "", ()))
        v = torch.sort(ev.abs(), descending=True).values.double().cpu().numpy()
        # eigenvalues below the float64 resolution of the largest are rounding noise, not spectrum
        v = v[v > v[0] * 1e-14] if v.size and v[0] > 0 else v[:0]
        ax.plot(np.arange(1, v.size + 1), v, label=name, color=color, dashes=dashes, lw=2 if name == "exact" else 1)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("index (sorted)")
    ax.set_ylabel("|eigenvalue| (above 1e-14 of the largest)")
    ax.legend(title="method")
    ax.grid(True, alpha=0.3)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG or PDF (by suffix) and close the figure.

    Raises:
        FisherlabError: For other suffixes or an unwritable path.
    """
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf"):
        raise FisherlabError(f"figure path must end in .png or .pdf, got {path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except OSError as exc:
        raise FisherlabError(f"cannot write figure {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path
