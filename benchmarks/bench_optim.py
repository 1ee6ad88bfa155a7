"""Time per iteration of each optimizer relative to SGD (issue: optimizers; K App. C, Table 1).

MNIST auto-encoder at batch 512 (embedded stand-in data): each optimizer runs ``--steps``
iterations (forward, backward, step) after a warm-up; the time per iteration (the median over
``--repeats`` such runs) is printed with its ratio to SGD measured in the same run (SGD's
iteration is the training step the other benchmarks compare with). Kronecker methods use
T1 = 5, T2 = 20, so the figure averages refresh and non-refresh steps as training would.

    python -m benchmarks.bench_optim [--device cuda] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from benchmarks._common import Report, add_common_arguments, setup, timed
from fisherlab._errors import ConvergenceWarning
from fisherlab.losses import per_sample_loss
from fisherlab.optim import OPTIMIZER_NAMES, KroneckerOptimizer, make_optimizer
from fisherlab.problems import get_problem

SCRIPT = Path(__file__).stem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--steps", type=int, default=20, help="iterations per timed run (default 20)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES))
    return add_common_arguments(
        parser,
        SCRIPT,
        repeats=1,
        repeats_help="timed runs of --steps iterations each (median), after one warm-up iteration",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", ConvergenceWarning)
    device = setup(args)
    problem = get_problem(args.problem)
    x = problem.data(seed=0).train[: problem.batch_size].to(device)
    report = Report.from_args(SCRIPT, args, device, baseline_name="sgd", ratio_label="SGD", width=28)
    report.line(
        f"{problem.name} auto-encoder, batch {x.shape[0]}, device {device}, {args.steps} steps each (T1=5, T2=20); "
        "time per iteration"
    )
    for name in args.optimizers.split(","):
        model = problem.model(seed=0, device=device)
        kw = {} if name in ("sgd", "adam") else {"damping": 1e-2, "kl_clip": 1e-2, "t1": 5, "t2": 20}
        opt = make_optimizer(name, model, problem.loss, **kw)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            per_sample_loss(problem.loss, model(x), x).mean().backward()
            opt.step(inputs=x) if isinstance(opt, KroneckerOptimizer) else opt.step()

        def run(step: object = step) -> None:
            for _ in range(args.steps):
                step()  # type: ignore[operator]

        step()  # warm-up
        seconds = timed(run, device, args.repeats, warmup=False)[0] / args.steps
        if name == "sgd":  # the baseline (listed first by default; optimizers before it get no ratio)
            report.baseline = seconds
        report.row(name, seconds, optimizer=name)
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
