"""Figures drawn from a results dataset (they never train or probe).

:func:`error_figure` is K Figure 1: error 1 and error 2 against the training iteration,
one column per layer, one line per method.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
import xarray as xr
from matplotlib.figure import Figure
from torch import Tensor

from fisherlab._errors import FisherlabError

__all__ = ["METHOD_STYLE", "block_heatmaps", "error_figure", "save_figure", "spectra_figure", "training_figure", "two_level_figure"]

#: Fixed order, colour and marker per method, so "kfac" looks the same in every figure.
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "kfac": ("#d62728", "o"),
    "kpsvd": ("#1f77b4", "s"),
    "deflation": ("#2ca02c", "^"),
    "lanczos": ("#9467bd", "v"),
    "kfac_corrected": ("#ff7f0e", "D"),
}


def _spans_decades(values: np.ndarray) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 0 and v.max() / v.min() > 10


def error_figure(ds: xr.Dataset, *, metrics: tuple[str, ...] = ("frobenius_error", "spectral_error")) -> Figure:
    """Error 1 and error 2 vs iteration per layer (rows: metrics, columns: layers), K Fig. 1.

    A metric's axis is logarithmic when its values span more than a decade.

    Raises:
        FisherlabError: When the dataset lacks the metrics.
    """
    missing = [m for m in metrics if m not in ds]
    if missing:
        raise FisherlabError(f"dataset has no {', '.join(missing)}: not a fisherlab probe file?")
    metrics = tuple(m for m in metrics if bool(ds[m].notnull().any()))  # skip metrics not computed (--metrics)
    if not metrics:
        raise FisherlabError("the dataset holds no computed error values to plot")
    layers = [str(x) for x in ds["layer"].values]
    methods = [str(m) for m in ds["method"].values]
    palette = {m: METHOD_STYLE.get(m, ("#7f7f7f", "x"))[0] for m in methods}
    markers = {m: METHOD_STYLE.get(m, ("#7f7f7f", "x"))[1] for m in methods}
    fig, axes = plt.subplots(len(metrics), len(layers), figsize=(4.2 * len(layers) + 1.5, 3.2 * len(metrics)), squeeze=False, sharex=True)
    for row, metric in enumerate(metrics):
        df = ds[metric].to_dataframe().reset_index()
        log = _spans_decades(ds[metric].values)
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            sub = df[df["layer"] == layer]
            sns.lineplot(data=sub, x="iteration", y=metric, hue="method", style="method", hue_order=methods, style_order=methods,
                         palette=palette, markers=markers, dashes=False, markersize=4, ax=ax, legend=(row == 0 and col == len(layers) - 1))
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(ds[metric].attrs.get("long_name", metric))
            ax.set_xlabel("training iteration")
            ax.set_title(f"layer {layer}" if row == 0 else "")
            ax.grid(True, alpha=0.3)
    leg = axes[0, -1].get_legend()
    if leg is not None:
        leg.set_title("method")
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1.0))
    source = ds.attrs.get("problem", "")
    fig.suptitle(f"Fisher approximation errors ({source}, Fisher: {ds.attrs.get('fisher', '?')}, spectrum: {ds.attrs.get('spectrum', '?')})")
    fig.tight_layout()
    return fig


def _lines(ax: plt.Axes, da: xr.DataArray, dim: str, *, log: bool) -> None:
    df = da.to_dataframe().reset_index()
    order = [str(v) for v in da[dim].values]
    palette = {m: METHOD_STYLE[m][0] for m in order} if set(order) <= set(METHOD_STYLE) else None
    sns.lineplot(data=df, x="iteration", y=da.name, hue=dim, style=dim, hue_order=order, style_order=order,
                 palette=palette, markers=True, dashes=False, markersize=4, ax=ax)
    if log and _spans_decades(np.abs(da.values)):
        ax.set_yscale("log")
    ax.set_xlabel("training iteration")
    ax.set_ylabel(da.attrs.get("long_name", str(da.name)))
    ax.grid(True, alpha=0.3)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), title=dim.replace("_", " "))


def two_level_figure(ds: xr.Dataset) -> Figure:
    """T Figure 5 (gap ``E(β*) - E(0)`` vs iteration per coarse space, ``symlog`` axis) and the
    relative energy-norm errors of the two-level and block-diagonal increments.

    Raises:
        FisherlabError: When the dataset has no two-level variables (run with ``--two-level``).
    """
    if "gap" not in ds:
        raise FisherlabError("dataset has no two-level results; run fisherlab probe with --two-level")
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    _lines(axes[0], ds["gap"], "coarse_space", log=False)
    scale = float(np.nanmax(np.abs(ds["gap"].values))) if ds["gap"].size else 1.0
    axes[0].set_yscale("symlog", linthresh=max(scale * 1e-6, 1e-300))
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_title("T Fig. 5: gap (negative = closer to the natural gradient)")
    _lines(axes[1], ds["energy_error"], "coarse_space", log=True)
    axes[1].set_title("two-level increments vs exact ζ")
    _lines(axes[2], ds["block_energy_error"], "method", log=True)
    axes[2].set_title("block-diagonal increments vs exact ζ")
    fig.suptitle(f"Two-level KFAC ({ds.attrs.get('problem', '')}, damping {ds.attrs.get('damping', '?')}, Fisher: {ds.attrs.get('fisher', '?')})")
    fig.tight_layout()
    return fig


def training_figure(ds: xr.Dataset) -> Figure:
    """K Figure 2 / T Figures 2-4: training and validation loss against epoch and wall time.

    Raises:
        FisherlabError: When the dataset is not a ``fisherlab train`` result.
    """
    if "optimizer" not in ds.dims:
        raise FisherlabError("dataset has no optimizer dim: not a fisherlab train file")
    df = ds[["train_loss", "valid_loss", "wall_time"]].to_dataframe().reset_index().dropna()
    order = [str(o) for o in ds["optimizer"].values]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = [("epoch", "train_loss"), ("wall_time", "train_loss"), ("epoch", "valid_loss"), ("wall_time", "valid_loss")]
    for ax, (x, y) in zip(axes, panels, strict=True):
        sns.lineplot(data=df, x=x, y=y, hue="optimizer", style="optimizer", hue_order=order, style_order=order,
                     markers=True, dashes=False, markersize=4, ax=ax, legend=ax is axes[-1])
        if _spans_decades(ds[y].values):
            ax.set_yscale("log")
        ax.set_xlabel("epoch" if x == "epoch" else "time (s)")
        ax.set_ylabel(ds[y].attrs.get("long_name", y))
        ax.grid(True, alpha=0.3)
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Optimizers on {ds.attrs.get('problem', '')} ({ds.attrs.get('data_source', '')[:60]})")
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
    vmax = float(exact[:max_side, :max_side].abs().max())
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items(), strict=True):
        im = ax.imshow(m[:max_side, :max_side].cpu().numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="entry")
    return fig


def spectra_figure(spectra: dict[str, Tensor]) -> Figure:
    """Sorted eigenvalue magnitudes (log scale) of the exact block and each approximation."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ev in spectra.items():
        color = METHOD_STYLE.get(name, ("black", ""))[0]
        v = torch.sort(ev.abs(), descending=True).values.cpu().numpy()
        ax.plot(np.arange(1, v.size + 1), np.maximum(v, 1e-300), label=name, color=color, lw=2 if name == "exact" else 1)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("index (sorted)")
    ax.set_ylabel("|eigenvalue|")
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
