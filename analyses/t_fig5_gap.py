"""T Figure 5: the gap E(β*) − E(0) of every coarse space and of TKO during training, and the
energy-norm errors against the exact damped natural gradient.

    python analyses/t_fig5_gap.py --problem mnist             # paper: auto-encoders and cnn
    python analyses/t_fig5_gap.py --smoke --output /tmp/t5.png
"""

from __future__ import annotations

import sys

from _common import figure_script

from fisherlab.approximations import Method
from fisherlab.config import ProbeConfig
from fisherlab.plots import two_level_figure
from fisherlab.vocabulary import CoarseSpace


def configure(args):  # type: ignore[no-untyped-def]
    """The run this figure needs, as asked on the command line."""
    config = ProbeConfig(
        problem=args.problem,
        data_dir=args.data_dir,
        two_level=True,
        damping=1e-3,
        layers=("5",) if args.problem != "cnn" else ("2",),
        metrics=("frobenius_error",),
        iterations=1 if args.smoke else 1000,
        every=1 if args.smoke else 50,
        batch_size=32 if args.smoke else None,
        methods=("kfac",) if args.smoke else tuple(Method),
        coarse_spaces=("nicolaides", "residuals", "tko") if args.smoke else tuple(CoarseSpace),
    )
    return config


def main(argv: list[str] | None = None) -> int:
    return figure_script(
        argv, __doc__, "t_fig5", ["curves", "mnist", "faces", "cnn"], "curves", configure, two_level_figure
    )


if __name__ == "__main__":
    sys.exit(main())
