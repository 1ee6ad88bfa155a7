"""``fisherlab probe | plot | train | info``: a thin layer over :mod:`fisherlab.probe_loop`, :mod:`fisherlab.train`
and :mod:`fisherlab.plots`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import typing
import warnings
from datetime import datetime
from enum import Enum
from pathlib import Path

from fisherlab._errors import ConvergenceWarning, FisherlabError, UndefinedMetricWarning
from fisherlab.config import ProbeConfig, TrainConfig
from fisherlab.method_registry import METHODS
from fisherlab.metrics import BLOCK_METRICS
from fisherlab.problems import PROBLEMS
from fisherlab.store_registry import STORES

__all__ = ["main"]

PROBE_EXAMPLES = """examples:
  fisherlab probe                                   # CURVES (generated), layer 5, ~50 s on an idle 2-core CPU
  fisherlab probe --problem mnist --data-dir ~/mnist --layers 5 --iterations 2000 --every 10 \\
                  --optimizer adam --fisher mc --device cuda --out data/mnist.nc
  fisherlab probe --problem faces --layers 2,5 --methods kfac,kpsvd --fisher exact --out data/faces.nc
  fisherlab probe --problem mnist --two-level --damping 1e-3 --out data/gap.nc
"""

PLOT_EXAMPLES = """examples:
  fisherlab plot data/mnist.nc                      # writes data/mnist.png
  fisherlab plot data/mnist.nc --out figures/fig1_mnist.pdf
  fisherlab plot data/zoo.nc --summary              # + data/zoo-summary.png: method x layer median error 1
  fisherlab plot data/zoo.nc --summary --metric spectral_error
"""


CONFIG_HELP = "JSON file with the same fields as the flags (flags given explicitly win)"

TRAIN_EXAMPLES = """examples:
  fisherlab train --problem curves --epochs 5
  fisherlab train --problem mnist --optimizers sgd,adam,kfac,deflation,kfac2l_residuals --lr 0.1,1 --damping 1e-3,1e-2
"""


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _metrics_listing() -> str:
    """The error metrics of the metric registry, for ``--metrics``' help."""
    errors = [m for m in BLOCK_METRICS if m.error]
    return "; ".join(f"{m.name}: {m.long_name}" + (f" ({m.cli_note})" if m.cli_note else "") for m in errors)


#: The listings a :class:`~fisherlab.config.Flag`'s ``choices`` names, read when the parser is built.
_LISTINGS: dict[str, typing.Callable[[], str]] = {
    "problems": lambda: " | ".join(PROBLEMS),
    "methods": lambda: ", ".join(METHODS),
    "metrics": _metrics_listing,
    "sizes": lambda: "; ".join(f"{p.name} {' | '.join(dict(p.variants))}" for p in PROBLEMS.values() if p.variants),
}


def _problem_table() -> str:
    """The registered problems with their descriptions (``Problem.description``), for the help's epilog."""
    width = max(len(name) for name in PROBLEMS)
    rows = [f"  {name:<{width}}  {problem.description}" for name, problem in PROBLEMS.items()]
    return "\nproblems (--problem):\n" + "\n".join(rows) + "\n"


def _shown(value: object) -> str:
    """A default or a choice as written on the command line: enums by value, tuples comma-separated."""
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return str(value.value if isinstance(value, Enum) else value)


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--flag-name`` per field of ``config_class`` that has a :class:`~fisherlab.config.Flag`: default
    from the field's default, type from its annotation (enums as their values, checked by the config so a bad
    value is one ``fisherlab: error:`` line; tuples comma-separated; ``bool`` a switch), help from the flag."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # Optional: the flag takes the other type
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
        enum = next((k for k in (kind, item) if isinstance(k, type) and issubclass(k, Enum)), None)
        choices = _LISTINGS[flag.choices]() if flag.choices else _shown(tuple(enum)) if enum else ""
        name = "--" + f.name.replace("_", "-")
        help_text = flag.help.format(default=_shown(f.default), choices=choices).replace("%", "%%")
        default = None if flag.default_none else f.default
        if kind is bool:
            if default:
                parser.add_argument(f"--no-{name[2:]}", dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(name, action="store_true", help=help_text)
            continue
        options: dict[str, typing.Any] = {"default": default, "help": help_text, "metavar": flag.metavar}
        if item is not None:
            options["type"] = _floats if item is float else _csv
        elif enum is not None:
            options["default"] = None if default is None else _shown(default)  # the config converts and checks it
            options["metavar"] = flag.metavar or "{" + ",".join(e.value for e in enum) + "}"
        elif kind in (int, float):
            options["type"] = kind
        parser.add_argument(name, **options)


def _config_from_args(config_class: type, args: argparse.Namespace, **values: object) -> typing.Any:
    """``config_class`` from the parsed flags (and ``--config`` fields) of its fields, ``values`` winning."""
    for f in dataclasses.fields(config_class):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        flag = f.metadata.get("flag")
        values[f.name] = None if flag is not None and flag.zero_disables and value == 0 else value
    return config_class(**values)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from fisherlab._version import __version__

    parser = argparse.ArgumentParser(
        prog="fisherlab",
        description="Probe the exact Fisher during training and measure Kronecker approximations against it.",
    )
    parser.add_argument("--version", action="version", version=f"fisherlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "probe",
        help="train a problem and probe the exact Fisher every k iterations",
        epilog=PROBE_EXAMPLES + _problem_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(p, ProbeConfig)
    p.add_argument("--config", default=None, help=CONFIG_HELP)
    p.add_argument("--out", default=None, help="results file .nc (default: data/probe-<problem>-<time>.nc)")
    p.add_argument("--figure", default=None, help="figure path .png/.pdf (default: next to --out); 'none' to skip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser(
        "plot",
        help="draw error 1 and error 2 vs iteration (K Figure 1) from one or several results files",
        epilog=PLOT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument(
        "paths",
        nargs="+",
        metavar="path",
        help="results files written by fisherlab probe (several: overlaid, one dash pattern per run)",
    )
    q.add_argument("--out", default=None, help="figure path .png or .pdf (default: the first results path with .png)")
    q.add_argument(
        "--summary",
        action="store_true",
        help="also draw a method x layer heatmap of the median of --metric over each run, at <out>-summary.png",
    )
    q.add_argument("--metric", default="frobenius_error", help="metric of the --summary heatmap (default: %(default)s)")
    t = sub.add_parser(
        "train",
        help="compare optimizers on a problem (K Figure 2, T Figures 2-4)",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(t, TrainConfig)
    t.add_argument("--config", default=None, help=CONFIG_HELP)
    t.add_argument("--out", default=None, help="results file .nc (default: data/train-<problem>-<time>.nc)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print dims, methods and attributes of a results file")
    i.add_argument("path")
    return parser, {"probe": p, "train": t}


def _config(args: argparse.Namespace) -> ProbeConfig:
    from fisherlab.problems import get_problem

    problem = get_problem(args.problem).sized(args.size)  # an unknown problem or size: one line, before any work
    if args.layers is not None:
        return _config_from_args(ProbeConfig, args)
    return _config_from_args(ProbeConfig, args, layers=problem.default_layers)


def _config_defaults(path: str, config_class: type) -> dict[str, object]:
    """Fields of a ``--config`` JSON file, type-checked against ``config_class``, as parser defaults.

    They become the subcommand's defaults, so argparse itself decides that flags given on the
    command line (abbreviated or not) win.

    Raises:
        FisherlabError: Unreadable file, unknown field, or a value of the wrong type, naming
            the file, the field and what was expected.
    """
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FisherlabError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise FisherlabError(f"--config {path} must hold a JSON object of fields, got {type(loaded).__name__}")
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(loaded) - set(hints))
    if unknown:
        raise FisherlabError(f"--config {path} has unknown fields {unknown}; known: {', '.join(hints)}")
    return {key: _typed(value, hints[key], f"--config {path}: field {key!r}") for key, value in loaded.items()}


def _typed(value: object, hint: object, where: str) -> object:
    """``value`` checked (and lists made tuples) against a config field's type ``hint``."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        item = args[0]
        if not isinstance(value, list):
            example = '["5", "6"]' if item is str else "[0.1, 1.0]"
            raise FisherlabError(f"{where} must be a list, e.g. {example}; got {json.dumps(value)}")
        return tuple(_typed(v, item, where) for v in value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        choices = [e.value for e in hint]
        if value not in choices:
            raise FisherlabError(f"{where} must be one of {', '.join(choices)}; got {json.dumps(value)}")
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif hint is str:
        ok = isinstance(value, str | int) and not isinstance(value, bool)  # layer names may be written as numbers
        value = str(value) if ok else value
    else:
        ok = True
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        expected = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
            name, name
        )
        raise FisherlabError(f"{where} must be {expected}; got {json.dumps(value)}")
    return value


def _check_out(out: Path) -> None:
    """``--out`` must end in the suffix of a registered result store (``.nc`` built in)."""
    if out.suffix.lower() not in STORES:
        raise FisherlabError(f"--out must end in {' or '.join(STORES)}, got {out.name}")


def _probe(args: argparse.Namespace) -> int:
    from fisherlab.plots import run_figure, save_figure, two_level_figure
    from fisherlab.probe_loop import run_probe

    config = _config(args)
    out = Path(args.out or f"data/probe-{config.problem}-{datetime.now():%Y%m%d-%H%M%S}.nc")
    _check_out(out)
    figure = None if args.figure == "none" else Path(args.figure or out.with_suffix(".png"))
    if figure is not None and figure.suffix.lower() not in (".png", ".pdf"):
        raise FisherlabError(f"--figure must end in .png or .pdf, got {figure.name}")
    started = time.time()
    try:
        ds = run_probe(config, out, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, out, started, "snapshots")
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 writes, draws and reports
        return 0
    if figure is not None:
        save_figure(run_figure(ds), figure)  # many layers: the summary heatmap
        if config.two_level:
            save_figure(two_level_figure(ds), _two_level_path(figure))
    last = ds.isel(iteration=-1)
    parts = [f"{m}={float(last['frobenius_error'].sel({'method': m}).mean()):.3g}" for m in ds["method"].values]
    print(
        f"wrote {out} ({ds.sizes['iteration']} snapshots){'' if figure is None else f' and {figure}'}; "
        f"error 1 at iteration {int(last['iteration'])}: {' '.join(parts)}"
    )
    return 0


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler: a run ends as on Ctrl-C (output closed, lock released)."""

    status = 128 + signal.SIGTERM


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _interrupted(exc: KeyboardInterrupt, out: Path, started: float, what: str) -> int:
    """Say where the finished ``what`` (snapshots, epochs) are, or that there are none; the exit status
    (130 for Ctrl-C, 143 for SIGTERM)."""
    cause = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    written = out.is_file() and out.stat().st_mtime >= started - 1  # this run's file, not an old one
    where = f"finished {what} are in {out}" if written else f"no {what[:-1]} had finished, nothing was written"
    print(f"fisherlab: {cause}; {where}", file=sys.stderr)
    return getattr(exc, "status", 130)


def _two_level_path(figure: Path) -> Path:
    """Where the two-level figure goes: ``<figure stem>-twolevel<suffix>``."""
    return figure.with_name(f"{figure.stem}-twolevel{figure.suffix}")


def _plot(args: argparse.Namespace) -> int:
    from fisherlab.plots import (
        error_figure,
        run_labels,
        save_figure,
        summary_figure,
        training_figure,
        two_level_figure,
    )
    from fisherlab.results import load

    # keyed by a unique label (the shortest distinguishing path), so a/run.nc and b/run.nc are two runs
    datasets = dict(zip(run_labels(args.paths), (load(path) for path in args.paths), strict=True))
    out = Path(args.out) if args.out else Path(args.paths[0]).with_suffix(".png")
    first = next(iter(datasets.values()))
    train_files = [p for p, ds in zip(args.paths, datasets.values(), strict=True) if "optimizer" in ds.dims]
    if train_files and len(datasets) > 1:
        raise FisherlabError(
            f"plot overlays several fisherlab probe files or draws one train file; {', '.join(train_files)} "
            f"{'is a train file' if len(train_files) == 1 else 'are train files'}: plot each on its own"
        )
    if train_files:
        print(f"wrote {save_figure(training_figure(first), out)}")
        return 0
    for path, ds in zip(args.paths, datasets.values(), strict=True):
        if "method" not in ds.dims:
            raise FisherlabError(f"{path} has no method dim: not a fisherlab probe file")
    runs = datasets if len(datasets) > 1 else first
    summary = summary_figure(runs, args.metric) if args.summary else None  # a bad --metric: no file written
    written = [save_figure(error_figure(runs), out)]
    if summary is not None:
        written.append(save_figure(summary, out.with_name(f"{out.stem}-summary{out.suffix}")))
    if len(datasets) == 1 and "gap" in first:
        written.append(save_figure(two_level_figure(first), _two_level_path(out)))
    print("wrote " + " and ".join(str(w) for w in written))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fisherlab.plots import save_figure, training_figure
    from fisherlab.train import run_training

    config = _config_from_args(TrainConfig, args)
    out = Path(args.out or f"data/train-{config.problem}-{datetime.now():%Y%m%d-%H%M%S}.nc")
    _check_out(out)
    started = time.time()
    try:
        ds = run_training(config, out, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, out, started, "epochs")
    figure = save_figure(training_figure(ds), out.with_suffix(".png"))
    final = " ".join(
        f"{o}={float(ds['train_loss'].sel({'optimizer': o}).dropna('epoch')[-1]):.4g}" for o in ds["optimizer"].values
    )
    print(f"wrote {out} and {figure}; final training loss: {final}")
    return 0


def _info(args: argparse.Namespace) -> int:
    """Print dims, coordinates and variables, then every attribute, long values folded (none cut)."""
    import textwrap

    import xarray as xr

    from fisherlab.results import load

    ds = load(args.path)
    bare = ds.copy()
    bare.attrs = {}
    with xr.set_options(display_max_rows=10_000):
        print(bare)
    print(f"Attributes ({len(ds.attrs)}):")
    width = max((len(str(key)) for key in ds.attrs), default=0)
    for key, value in ds.attrs.items():
        lines = str(value).splitlines() or [""]
        folded = [part for line in lines for part in textwrap.wrap(line, 100 - width) or [""]]
        print(f"    {key:<{width}}  {folded[0]}")
        for part in folded[1:]:
            print(f"    {'':<{width}}  {part}")
    return 0


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Show a warning as one ``fisherlab: warning: ...`` line on stderr (no source line)."""
    print(f"fisherlab: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` command; returns the exit status.

    Bad input (``FisherlabError``) prints one ``fisherlab: error: ...`` line and returns 2.
    Warnings (a solver that did not converge, an undefined metric) print one line each, once.
    Ctrl-C returns 130 and SIGTERM 143, each after one line (a run closes its file, keeping every
    finished snapshot, and releases its lock); a closed pipe on stdout returns 141 quietly.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM ends a run as Ctrl-C does
    try:
        return _main(args, argv, parser, commands)
    except KeyboardInterrupt as exc:  # outside a run (plot, info, start-up): one line
        print(
            "fisherlab: " + ("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"), file=sys.stderr
        )
        return getattr(exc, "status", 130)
    except BrokenPipeError:  # `fisherlab info f | head -1`: the reader left; stop quietly as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
        os.close(devnull)
        return 128 + signal.SIGPIPE
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(
    args: argparse.Namespace,
    argv: list[str],
    parser: argparse.ArgumentParser,
    commands: dict[str, argparse.ArgumentParser],
) -> int:
    """:func:`main` after parsing: the command, errors and warnings as one line each."""
    with warnings.catch_warnings():
        warnings.simplefilter("once", ConvergenceWarning)
        warnings.simplefilter("once", UndefinedMetricWarning)
        warnings.showwarning = _one_line_warning
        try:
            if getattr(args, "config", None):
                config_class = ProbeConfig if args.command == "probe" else TrainConfig
                commands[args.command].set_defaults(**_config_defaults(args.config, config_class))
                args = parser.parse_args(argv)  # flags given explicitly win over the config's values
            if args.command == "probe":
                return _probe(args)
            if args.command == "plot":
                return _plot(args)
            if args.command == "train":
                return _train(args)
            return _info(args)
        except FisherlabError as exc:
            print(f"fisherlab: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
