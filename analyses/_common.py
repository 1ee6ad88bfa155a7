"""Shared command line of the analysis scripts: --input, --output, --recompute, --smoke.

A script computes its dataset when the file is missing (or with ``--recompute``) and otherwise
reuses it, but only after checking that the file was computed with the settings asked for (the
configuration stored in its ``config_json`` attribute); a file computed otherwise is refused with
one line naming the settings that differ. Smoke runs write under ``data/smoke/``, so a tiny run
never stands in for a paper-scale one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig, TrainConfig
from fisherlab.plots import save_figure
from fisherlab.results import config_json, load

#: Configuration fields that do not change what a run computes: a file that differs only in these is reused.
IGNORED_FIELDS = frozenset({"device", "threads"})


def default_input(stem: str, problem: str, *, smoke: bool) -> Path:
    """Where a script's dataset goes by default: ``data/<stem>_<problem>.nc``, smoke runs under ``data/smoke/``."""
    return Path("data/smoke" if smoke else "data") / f"{stem}_{problem}.nc"


def settings_differ(ds: xr.Dataset, config: ProbeConfig | TrainConfig) -> list[str]:
    """The settings of ``config`` that the dataset was not computed with, as ``field: stored -> requested``.

    A dataset without a stored configuration (``config_json``) cannot be checked: that is one entry too.
    """
    stored_json = ds.attrs.get("config_json")
    if not stored_json:
        return ["config_json: the file records no settings"]
    try:
        stored = json.loads(str(stored_json))
    except json.JSONDecodeError:
        return ["config_json: unreadable"]
    requested = json.loads(config_json(config))
    return [
        f"{key}: {json.dumps(stored.get(key))} -> {json.dumps(requested.get(key))}"
        for key in sorted(set(stored) | set(requested))
        if key not in IGNORED_FIELDS and stored.get(key) != requested.get(key)
    ]


def compute(config: ProbeConfig | TrainConfig, path: Path, *, progress: bool) -> None:
    """Run the probe or the training that ``config`` describes into ``path`` (replacing it)."""
    if isinstance(config, TrainConfig):
        from fisherlab.train import run_training

        run_training(config, path, overwrite=True, progress=progress)
    else:
        from fisherlab.probe_loop import run_probe

        run_probe(config, path, overwrite=True, progress=progress)


def obtain(config: ProbeConfig | TrainConfig, data: Path, *, recompute: bool, progress: bool) -> xr.Dataset:
    """The dataset ``config`` describes at ``data``: computed when missing (or with ``recompute``),
    otherwise reused after checking that it was computed with these settings.

    Raises:
        FisherlabError: A reused file computed with other settings (one line naming them).
    """
    if recompute or not data.exists():
        compute(config, data, progress=progress)
        return load(data)
    ds = load(data)
    differ = settings_differ(ds, config)
    if differ:
        raise FisherlabError(
            f"{data} was computed with other settings ({'; '.join(differ)}); "
            "pass --recompute to replace it, or --input another file"
        )
    print(f"reusing {data}: computed with the same settings (--recompute to compute it again)")
    return ds


def script_parser(doc: str, default_stem: str, problems: list[str], default_problem: str) -> argparse.ArgumentParser:
    """The options every analysis script shares: ``--problem``, ``--data-dir``, ``--input``, ``--output``,
    ``--recompute``, ``--smoke``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default=default_problem, choices=problems)
    parser.add_argument("--data-dir", default=None, help="real data files (default: embedded data)")
    parser.add_argument(
        "--input",
        default=None,
        help=f"dataset to read or create (default: data/{default_stem}_<problem>.nc; "
        f"with --smoke data/smoke/{default_stem}_<problem>.nc)",
    )
    parser.add_argument("--output", default=None, help="figure .png/.pdf (default: next to the dataset)")
    parser.add_argument("--recompute", action="store_true", help="recompute even if the dataset exists")
    parser.add_argument(
        "--smoke", "--quick", dest="smoke", action="store_true", help="tiny configuration (used by the tests)"
    )
    return parser


def figure_script(
    argv: list[str] | None,
    doc: str,
    default_stem: str,
    problems: list[str],
    default_problem: str,
    configure: Callable[[argparse.Namespace], ProbeConfig | TrainConfig],
    draw: Callable[[xr.Dataset], object],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the common options, compute the dataset when missing (or asked), check a reused one, draw the figure.

    Returns:
        0, or 2 after one ``<script>: error: ...`` line (a reused file computed with other settings,
        bad settings, an unreadable file).
    """
    parser = script_parser(doc, default_stem, problems, default_problem)
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    data = Path(args.input) if args.input else default_input(default_stem, args.problem, smoke=args.smoke)
    figure = Path(args.output or data.with_suffix(".png"))
    try:
        config = configure(args)
        ds = obtain(config, data, recompute=args.recompute, progress=not args.smoke)
        save_figure(draw(ds), figure)  # type: ignore[arg-type]
    except FisherlabError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {figure}")
    return 0
