"""K Figure 1: error 1 and error 2 of every method against the training iteration (layer 5).

python analyses/fig1_error_vs_iteration.py --problem mnist          # paper scale: 2000 it., every 10
python analyses/fig1_error_vs_iteration.py --problem mnist --every 1 --metrics frobenius_error --recompute
python analyses/fig1_error_vs_iteration.py --smoke --output /tmp/f.png
"""

from __future__ import annotations

import sys

from _common import figure_script

from fisherlab.config import ProbeConfig
from fisherlab.plots import error_figure


def configure(args):  # type: ignore[no-untyped-def]
    """The run this figure needs, as asked on the command line."""
    config = ProbeConfig(
        problem=args.problem,
        data_dir=args.data_dir,
        layers=("5",),
        optimizer="adam",
        iterations=4 if args.smoke else 2000,
        every=2 if args.smoke else args.every,
        metrics=tuple(args.metrics.split(",")),
        batch_size=64 if args.smoke else None,
    )
    return config


def options(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--every", type=int, default=10, help="probe every k iterations (default: %(default)s)")
    parser.add_argument(
        "--metrics", default="frobenius_error,spectral_error", help="error metrics (default: %(default)s)"
    )


def main(argv: list[str] | None = None) -> int:
    return figure_script(
        argv, __doc__, "fig1", ["curves", "mnist", "faces"], "curves", configure, error_figure, options=options
    )


if __name__ == "__main__":
    sys.exit(main())
