"""K Figure 2: SGD, Adam, KFAC, KPSVD, deflation, Lanczos and KFAC-corrected as optimizers
(training / validation loss against epoch and time), one problem per run.

    python analyses/fig2_optimizers.py --problem mnist       # paper scale: 100 epochs, grid over lr and damping
    python analyses/fig2_optimizers.py --smoke --output /tmp/k2.png
"""

from __future__ import annotations

import sys

from _common import figure_script

from fisherlab.config import TrainConfig
from fisherlab.plots import training_figure


def configure(args):  # type: ignore[no-untyped-def]
    """The run this figure needs, as asked on the command line."""
    optimizers = ("sgd", "adam", "kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
    if args.smoke:
        config = TrainConfig(
            problem=args.problem, optimizers=("sgd", "kfac", "kpsvd"), epochs=1, max_batches=1, eval_samples=256
        )
    else:
        config = TrainConfig(
            problem=args.problem,
            data_dir=args.data_dir,
            optimizers=optimizers,
            epochs=100,
            lr=(1e-2, 1e-1, 1.0),
            damping=(1e-3, 1e-2, 1e-1),
            patience=10,
        )
    return config


def main(argv: list[str] | None = None) -> int:
    return figure_script(argv, __doc__, "k_fig2", ["curves", "mnist", "faces"], "curves", configure, training_figure)


if __name__ == "__main__":
    sys.exit(main())
