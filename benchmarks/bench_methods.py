"""Cost of every registered method (issue 18): build, error 1 and error 2, as ratios to a training step.

Default: the MNIST auto-encoder at batch 512, layer 5 (a 7 750-sided block), after 20 Adam steps,
every repeat timed and the median kept. Issue 18's targets on a 2-core CPU: every new method's build
≤ 2× a training step here, and its error 2 without an eigensolver where its eigenvalues are explicit;
at ResNet-18, batch 8, all 21 layers, every method, both errors within
2× of the papers' five's 62 s (the ``total`` line).

    python benchmarks/bench_methods.py                                   # MNIST layer 5, batch 512
    python benchmarks/bench_methods.py --problem resnet18 --batch-size 8 --layers all --repeats 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from benchmarks._common import Report, add_common_arguments, setup, step_baseline, timed, trained_problem
from fisherlab.approximations import approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.losses import per_sample_loss
from fisherlab.method_registry import METHODS
from fisherlab.metrics import BlockReference, frobenius_error, spectral_error
from fisherlab.probe import Probe
from fisherlab.problems import get_problem

SCRIPT = "bench_methods"


def problem_setup(
    name: str, batch_size: int | None, device: torch.device
) -> tuple[torch.nn.Module, object, tuple, Callable]:
    """Model, loss, batch ``(x, y)`` and a training step on it: :func:`trained_problem` for an
    auto-encoder at its own batch size, else the problem's first batch of ``batch_size`` after 20 Adam steps."""
    problem = get_problem(name)
    if problem.kind == "autoencoder" and batch_size in (None, problem.batch_size):
        problem, model, x, step = trained_problem(name, device)
        return model, problem.loss, (x, x), step
    model = problem.model(seed=0, device=device)
    x, y = next(problem.batches(problem.data(seed=0), batch_size=batch_size, device=device))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        per_sample_loss(problem.loss, model(x), y).mean().backward()
        opt.step()

    for _ in range(20):
        step()
    return model, problem.loss, (x, y), step


def _with_spectrum(ref: BlockReference) -> BlockReference:
    """``ref`` with the spectrum of ``F`` computed (shared by every method's error 2)."""
    _ = ref.eigenvalues
    return ref


def _uncached(ref: BlockReference) -> BlockReference:
    """``ref`` without its memoised errors (they are computed once per approximation): each timing computes."""
    for key in [k for k in ref.cache if k != "eigenvalues"]:
        del ref.cache[key]
    return ref


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--layers", default="5", help="comma-separated, or all (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the problem's")
    parser.add_argument("--methods", default="all", help="comma-separated registered methods (default: all)")
    return add_common_arguments(parser, SCRIPT, repeats=3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    layers = get_problem(args.problem).layer_names() if args.layers == "all" else args.layers.split(",")
    model, loss, (x, y), step = problem_setup(args.problem, args.batch_size, device)
    t_step = step_baseline(step, device, args.repeats)
    snap = Probe(model, loss, layers=layers, fisher="mc")(x, y)
    cost = {m: [0.0, 0.0, 0.0] for m in methods}  # build, error 1, error 2, summed over layers
    t_ref = 0.0
    for layer in layers:
        block = ExactBlock(snap.factors[layer])  # type: ignore[attr-defined]
        t, ref = timed(lambda block=block: _with_spectrum(BlockReference.of(block)), device, args.repeats)
        t_ref += t
        for m in methods:
            t_build, approx = timed(lambda m=m, b=block: approximate_all(b, [m])[m], device, args.repeats)
            op = approx.operator  # type: ignore[attr-defined]
            t1, _ = timed(lambda op=op, ref=ref: frobenius_error(_uncached(ref), op), device, args.repeats)
            t2, _ = timed(lambda op=op, ref=ref: spectral_error(_uncached(ref), op), device, args.repeats)
            for i, t in enumerate((t_build, t1, t2)):
                cost[m][i] += t
            print(f"  ... {layer} {m}: {t_build:.3f} + {t1:.3f} + {t2:.3f} s", file=sys.stderr, flush=True)
    report = Report.from_args(SCRIPT, args, device)
    report.line(
        f"{args.problem}, batch {x.shape[0]}, {len(layers)} layer(s) ({', '.join(layers[:3])}"
        f"{', ...' if len(layers) > 3 else ''}), every method's build, error 1 and error 2 summed over the layers"
    )
    report.set_baseline(t_step)
    report.row("shared: ||F|| (Gram matrix), spectrum of F", t_ref)
    for m, (b, e1, e2) in cost.items():
        for what, seconds in (("build", b), ("error 1", e1), ("error 2", e2)):
            report.row(f"{m}: {what}", seconds)
    total = t_ref + sum(sum(c) for c in cost.values())
    paper = t_ref + sum(sum(cost[m]) for m in ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected") if m in cost)
    report.row("total, every method, both errors", total)
    report.row("total, the papers' five", paper)
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
