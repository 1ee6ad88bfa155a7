"""``fisherlab probe | plot | info``: a thin layer over :mod:`fisherlab.run` and :mod:`fisherlab.plots`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime
from pathlib import Path

from fisherlab._errors import ConvergenceWarning, FisherlabError
from fisherlab.run import ALL_METHODS, ProbeConfig

__all__ = ["main"]

PROBE_EXAMPLES = """examples:
  fisherlab probe                                   # CURVES (generated), layer 5, ~1 min on a laptop CPU
  fisherlab probe --problem mnist --data-dir ~/mnist --layers 5 --iterations 2000 --every 10 \\
                  --optimizer adam --fisher mc --device cuda --out data/mnist.nc
  fisherlab probe --problem faces --layers 2,5 --methods kfac,kpsvd --fisher exact --out data/faces.nc
  fisherlab probe --problem mnist --two-level --damping 1e-3 --out data/gap.nc
"""

PLOT_EXAMPLES = """examples:
  fisherlab plot data/mnist.nc                      # writes data/mnist.png
  fisherlab plot data/mnist.nc --out figures/fig1_mnist.pdf
"""


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherlab", description="Probe the exact Fisher during training and measure Kronecker approximations against it.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = ProbeConfig()
    p = sub.add_parser("probe", help="train a problem and probe the exact Fisher every k iterations",
                       epilog=PROBE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", default=d.problem,
                   help="curves | mnist | faces | cnn | deeplinear64 | deeplinear14 (default: %(default)s; embedded data, no download)")
    p.add_argument("--data-dir", default=None, help="directory with the real data files (MNIST IDX, FACES/CURVES .mat); default: embedded data")
    p.add_argument("--layers", type=_csv, default=None, help="comma-separated layer numbers, 1 = first layer (default: 5 for the auto-encoders)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="training iterations (default: %(default)s)")
    p.add_argument("--every", type=int, default=d.every, help="probe every k iterations (default: %(default)s)")
    p.add_argument("--optimizer", default=d.optimizer, help="sgd | adam, the independent optimizer that trains the network (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 for adam, 1e-2 for sgd)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's (curves 256, mnist 512, faces 1024)")
    p.add_argument("--fisher", default=d.fisher, help="mc | exact | empirical (default: %(default)s)")
    p.add_argument("--mc-samples", type=int, default=d.mc_samples, help="target draws per input for --fisher mc (default: %(default)s)")
    p.add_argument("--methods", type=_csv, default=d.methods, help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all)")
    p.add_argument("--spectrum", default=d.spectrum, help="eigenvalues (paper text) | singular_values (authors' code) for error 2")
    p.add_argument("--metrics", type=_csv, default=d.metrics,
                   help="frobenius_error[,spectral_error] (default: both; error 2 of rank-2 methods costs a dense eigvalsh of the block)")
    p.add_argument("--tol", type=float, default=d.tol, help="relative tolerance of power SVD and Lanczos (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=d.max_iter, help="power SVD iteration cap (default: %(default)s)")
    p.add_argument("--lanczos-rank", type=int, default=d.lanczos_rank, help="Kronecker rank of the Lanczos method (default: %(default)s)")
    p.add_argument("--krylov-dim", type=int, default=d.krylov_dim, help="Krylov dimension per Lanczos restart (default: %(default)s)")
    p.add_argument("--two-level", action="store_true",
                   help="also probe every layer and measure two-level KFAC (T): gaps E(beta*)-E(0), energy errors vs the exact natural gradient")
    p.add_argument("--damping", type=float, default=d.damping, help="lambda of F + lambda I and of the pi-damped KFAC (default: %(default)s)")
    p.add_argument("--coarse-spaces", type=_csv, default=d.coarse_spaces, help=f"subset of {','.join(d.coarse_spaces)} (tko is always added)")
    p.add_argument("--taylor-order", type=int, default=d.taylor_order, help="q of the Taylor coarse space (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default: auto = CUDA when available)")
    p.add_argument("--dtype", default=d.dtype, help="training dtype float32 | float64; the probe always accumulates in float64")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, data order and MC targets (default: %(default)s)")
    p.add_argument("--store-factors", type=_csv, default=(), help="layers whose per-sample factors are saved at each snapshot (<out>.factors/)")
    p.add_argument("--config", default=None, help="JSON file with the same fields as the flags (flags given explicitly win)")
    p.add_argument("--out", default=None, help="results file .nc (default: data/probe-<problem>-<time>.nc)")
    p.add_argument("--figure", default=None, help="figure path .png/.pdf (default: next to --out); 'none' to skip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser("plot", help="draw error 1 and error 2 vs iteration (K Figure 1) from a results file",
                       epilog=PLOT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("path", help="results file written by fisherlab probe")
    q.add_argument("--out", default=None, help="figure path .png or .pdf (default: the results path with .png)")
    t = sub.add_parser("train", help="compare optimizers on a problem (K Figure 2, T Figures 2-4)",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fisherlab.train import TrainConfig

    td = TrainConfig()
    t.add_argument("--problem", default=td.problem)
    t.add_argument("--data-dir", default=None)
    t.add_argument("--optimizers", type=_csv, default=td.optimizers,
                   help="sgd, adam, kfac, kpsvd, deflation, lanczos, kfac_corrected, kfac2l_<coarse space>, kfac2l_tko")
    t.add_argument("--epochs", type=int, default=td.epochs)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=_floats, default=(), help="one value, or several for a grid search (default per optimizer)")
    t.add_argument("--damping", type=_floats, default=td.damping, help="one value or a grid (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=td.weight_decay)
    t.add_argument("--kl-clip", type=float, default=td.kl_clip, help="KL clipping constant c (K App. E); 0 disables")
    t.add_argument("--t1", type=int, default=td.t1, help="refresh factors every T1 steps")
    t.add_argument("--t2", type=int, default=td.t2, help="refactorise the damped approximation every T2 steps")
    t.add_argument("--patience", type=int, default=td.patience, help="early stopping patience in epochs")
    t.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch (quick runs)")
    t.add_argument("--device", default=td.device)
    t.add_argument("--seed", type=int, default=td.seed)
    t.add_argument("--out", default=None, help="results file .nc (default: data/train-<problem>-<time>.nc)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="print dims, methods and attributes of a results file")
    i.add_argument("path")
    return parser


def _config(args: argparse.Namespace, argv: list[str]) -> ProbeConfig:
    fields = ProbeConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FisherlabError(f"cannot read --config {args.config}: {exc}") from None
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise FisherlabError(f"--config has unknown fields {unknown}")
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in loaded.items():
            if key not in given:
                values[key] = tuple(value) if isinstance(value, list) else value
    if values["layers"] is None:
        from fisherlab.problems import get_problem

        values["layers"] = get_problem(values["problem"]).default_layers
    return ProbeConfig(**values)


def _probe(args: argparse.Namespace, argv: list[str]) -> int:
    from fisherlab.plots import error_figure, save_figure, two_level_figure
    from fisherlab.run import run_probe

    config = _config(args, argv)
    out = Path(args.out or f"data/probe-{config.problem}-{datetime.now():%Y%m%d-%H%M%S}.nc")
    if out.suffix != ".nc":
        raise FisherlabError(f"--out must end in .nc, got {out.name}")
    figure = None if args.figure == "none" else Path(args.figure or out.with_suffix(".png"))
    if figure is not None and figure.suffix.lower() not in (".png", ".pdf"):
        raise FisherlabError(f"--figure must end in .png or .pdf, got {figure.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("once", ConvergenceWarning)
        try:
            ds = run_probe(config, out, overwrite=args.overwrite, progress=not args.no_progress)
        except KeyboardInterrupt:
            print(f"fisherlab: interrupted; finished snapshots are in {out}", file=sys.stderr)
            return 130
    if figure is not None:
        save_figure(error_figure(ds), figure)
        if config.two_level:
            save_figure(two_level_figure(ds), _two_level_path(figure))
    last = ds.isel(iteration=-1)
    parts = [f"{m}={float(last['frobenius_error'].sel({'method': m}).mean()):.3g}" for m in ds["method"].values]
    print(f"wrote {out} ({ds.sizes['iteration']} snapshots){'' if figure is None else f' and {figure}'}; "
          f"error 1 at iteration {int(last['iteration'])}: {' '.join(parts)}")
    return 0


def _two_level_path(figure: Path) -> Path:
    """Where the two-level figure goes: ``<figure stem>-twolevel<suffix>``."""
    return figure.with_name(f"{figure.stem}-twolevel{figure.suffix}")


def _plot(args: argparse.Namespace) -> int:
    from fisherlab.plots import error_figure, save_figure, two_level_figure
    from fisherlab.results import load

    ds = load(args.path)
    out = Path(args.out) if args.out else Path(args.path).with_suffix(".png")
    if "optimizer" in ds.dims:
        from fisherlab.plots import training_figure

        print(f"wrote {save_figure(training_figure(ds), out)}")
        return 0
    written = [save_figure(error_figure(ds), out)]
    if "gap" in ds:
        written.append(save_figure(two_level_figure(ds), _two_level_path(out)))
    print("wrote " + " and ".join(str(w) for w in written))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fisherlab.plots import save_figure, training_figure
    from fisherlab.train import TrainConfig, run_training

    config = TrainConfig(problem=args.problem, data_dir=args.data_dir, optimizers=args.optimizers, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, damping=args.damping, weight_decay=args.weight_decay,
                         kl_clip=args.kl_clip or None, t1=args.t1, t2=args.t2, patience=args.patience,
                         max_batches=args.max_batches, device=args.device, seed=args.seed)
    out = Path(args.out or f"data/train-{config.problem}-{datetime.now():%Y%m%d-%H%M%S}.nc")
    if out.suffix != ".nc":
        raise FisherlabError(f"--out must end in .nc, got {out.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("once", ConvergenceWarning)
        ds = run_training(config, out, overwrite=args.overwrite, progress=not args.no_progress)
    figure = save_figure(training_figure(ds), out.with_suffix(".png"))
    final = " ".join(f"{o}={float(ds['train_loss'].sel({'optimizer': o}).dropna('epoch')[-1]):.4g}" for o in ds["optimizer"].values)
    print(f"wrote {out} and {figure}; final training loss: {final}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from fisherlab.results import load

    ds = load(args.path)
    print(ds)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fisherlab`` command; returns the exit status.

    Bad input (``FisherlabError``) prints one ``fisherlab: error: ...`` line and returns 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "probe":
            return _probe(args, argv)
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
