"""Shared command line of the analysis scripts: --input, --output, --recompute, --smoke."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from fisherlab.plots import save_figure
from fisherlab.results import load


def figure_script(
    argv: list[str] | None,
    doc: str,
    default_stem: str,
    problems: list[str],
    default_problem: str,
    compute: Callable[[argparse.Namespace, Path], None],
    draw: Callable[[xr.Dataset], object],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the common options, compute the dataset when missing (or asked), draw the figure."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default=default_problem, choices=problems)
    parser.add_argument("--data-dir", default=None, help="real data files (default: embedded data)")
    parser.add_argument(
        "--input", default=None, help=f"dataset to read or create (default: data/{default_stem}_<problem>.nc)"
    )
    parser.add_argument("--output", default=None, help="figure .png/.pdf (default: next to the dataset)")
    parser.add_argument("--recompute", action="store_true", help="recompute even if the dataset exists")
    parser.add_argument(
        "--smoke", "--quick", dest="smoke", action="store_true", help="tiny configuration (used by the tests)"
    )
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    data = Path(args.input or f"data/{default_stem}_{args.problem}.nc")
    figure = Path(args.output or data.with_suffix(".png"))
    if args.recompute or not data.exists():
        compute(args, data)
    save_figure(draw(load(data)), figure)  # type: ignore[arg-type]
    print(f"wrote {figure}")
    return 0
