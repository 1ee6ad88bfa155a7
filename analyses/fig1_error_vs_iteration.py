"""K Figure 1: error 1 and error 2 of every method against the training iteration (layer 5).

Runs ``fisherlab probe`` for the chosen problem unless the dataset already exists (or
``--recompute``), then draws the figure from the stored dataset.

    python analyses/fig1_error_vs_iteration.py --problem mnist          # paper scale: 2000 it., every 10
    python analyses/fig1_error_vs_iteration.py --smoke --output /tmp/f.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fisherlab.plots import error_figure, save_figure
from fisherlab.results import load
from fisherlab.run import ProbeConfig, run_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="curves", choices=["curves", "mnist", "faces"])
    parser.add_argument("--data-dir", default=None, help="real data files (default: embedded data)")
    parser.add_argument("--input", default=None, help="dataset to read or create (default: data/fig1_<problem>.nc)")
    parser.add_argument("--output", default=None, help="figure (default: data/fig1_<problem>.png)")
    parser.add_argument("--recompute", action="store_true", help="rerun the probe even if the dataset exists")
    parser.add_argument("--smoke", action="store_true", help="tiny run (20 iterations) for tests")
    args = parser.parse_args(argv)
    data = Path(args.input or f"data/fig1_{args.problem}.nc")
    figure = Path(args.output or data.with_suffix(".png"))
    if args.recompute or not data.exists():
        config = ProbeConfig(problem=args.problem, data_dir=args.data_dir, layers=("5",), optimizer="adam",
                             iterations=20 if args.smoke else 2000, every=5 if args.smoke else 10)
        run_probe(config, data, overwrite=True, progress=not args.smoke)
    save_figure(error_figure(load(data)), figure)
    print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
