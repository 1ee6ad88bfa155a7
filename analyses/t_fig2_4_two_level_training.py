"""T Figures 2-4: KFAC against the two-level KFAC optimizers (NICO, SPECTRAL, RESIDU,
KRY-NICO, KRY-RESIDU, PREVIOUS = TKO), with SGD and Adam as baselines. Figure 2: the
auto-encoders; Figure 3: the CNNs (cnn, resnet18, resnet34); Figure 4: the deep linear networks.

    python analyses/t_fig2_4_two_level_training.py --problem deeplinear64
    python analyses/t_fig2_4_two_level_training.py --smoke --output /tmp/t4.png
"""

from __future__ import annotations

import sys

from _common import figure_script

from fisherlab.config import TrainConfig
from fisherlab.plots import training_figure

PROBLEMS = ["curves", "mnist", "faces", "cnn", "resnet18", "resnet34", "deeplinear64", "deeplinear14"]


def configure(args):  # type: ignore[no-untyped-def]
    """The run this figure needs, as asked on the command line."""
    two_level = (
        "kfac2l_nicolaides",
        "kfac2l_spectral",
        "kfac2l_residuals",
        "kfac2l_krylov_nicolaides",
        "kfac2l_krylov_residuals",
        "kfac2l_tko",
    )
    if args.smoke:
        config = TrainConfig(
            problem=args.problem,
            optimizers=("kfac", "kfac2l_residuals", "kfac2l_tko"),
            epochs=1,
            max_batches=2,
            batch_size=64,
            eval_samples=256,
        )
    else:
        config = TrainConfig(
            problem=args.problem,
            data_dir=args.data_dir,
            optimizers=("sgd", "adam", "kfac", *two_level),
            epochs=100,
            lr=(1e-3, 1e-2, 1e-1, 1.0),
            damping=(1e-3, 1e-2, 1e-1),
            weight_decay=1e-3,
            patience=10,
        )
    return config


def main(argv: list[str] | None = None) -> int:
    return figure_script(argv, __doc__, "t_fig2_4", PROBLEMS, "deeplinear64", configure, training_figure)


if __name__ == "__main__":
    sys.exit(main())
