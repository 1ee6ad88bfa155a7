"""Cost of every registered method (issue 18): build, error 1 and error 2, as ratios to a training step.

Default: the MNIST auto-encoder at batch 512, layer 5 (a 7 750-sided block), after 20 Adam steps,
every repeat timed and the median kept. Timed as the probe runs them (``evaluate_block``): a
span-invariant method on a layer wider than its batch is built and measured on the block restricted
to its sample span (the build includes lifting it back), the others on the whole block; error 1
includes the scale-free error (which shares its products); the errors are computed after every
build, as in the probe, so factor eigendecompositions one method computed serve another's error 2.

Issue 18's targets on a 2-core CPU: every new method's build ≤ 2× a training step here, and its
error 2 without an eigensolver where its eigenvalues are explicit; at ResNet-18, batch 8, all 21
layers, every method, both errors within 2× of the papers' five's 62 s (the ``total`` lines and
their ratio, both measured in the same run: the machine is shared).

    python benchmarks/bench_methods.py                                   # MNIST layer 5, batch 512
    python benchmarks/bench_methods.py --problem resnet18 --batch-size 8 --layers all --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from benchmarks._common import (
    Report,
    add_common_arguments,
    setup,
    step_baseline,
    synchronize,
    timed,
    trained_problem,
)
from fisherlab.approximations import PAPER_METHODS, approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.losses import per_sample_loss
from fisherlab.method_registry import METHODS
from fisherlab.metrics import BlockReference, frobenius_error, scale_free_error, spectral_error
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


def _shared_eigenvalues(ref: BlockReference) -> BlockReference:
    """``ref`` with the spectrum of ``F`` computed (shared by every method's error 2)."""
    _ = ref.eigenvalues
    return ref


class Target:
    """Where the probe builds and measures a method on one layer (:func:`~fisherlab.metrics.evaluate_block`):
    the block restricted to its sample span when that is smaller and the method is span invariant, else
    the whole block; the approximations are measured unlifted and lifted afterwards."""

    def __init__(self, block: ExactBlock, device: torch.device, repeats: int) -> None:
        self.t_span, self.span = timed(lambda: block.sample_span(), device, repeats)
        self.whole = block
        self.refs: dict[int, BlockReference] = {}
        self.t_refs = 0.0
        for target in {id(b): b for b in (block, None if self.span is None else self.span.block) if b}.values():
            zeros = self.span.zeros if self.span is not None and target is self.span.block else 0

            def reference(target: ExactBlock = target, zeros: int = zeros) -> BlockReference:
                return _shared_eigenvalues(BlockReference.of(target, zeros=zeros))

            t, self.refs[id(target)] = timed(reference, device, repeats)
            self.t_refs += t

    def of(self, method: str) -> tuple[ExactBlock, str]:
        """The block ``method`` is built and measured on, and the route in words."""
        if self.span is not None and METHODS[method].span_invariant:
            b = self.span.block
            return b, f"sample span {b.d_out} x {b.d_in}"
        return self.whole, f"whole block {self.whole.d_out} x {self.whole.d_in}"

    def fresh_ref(self, block: ExactBlock) -> BlockReference:
        """A reference without memoised errors (each timing computes), the spectrum of ``F`` kept."""
        ref = self.refs[id(block)]
        fresh = BlockReference.of(block, zeros=ref.zeros)
        fresh.cache["eigenvalues"] = ref.eigenvalues
        return fresh


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--layers", default="5", help="comma-separated, or all (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the problem's")
    parser.add_argument("--methods", default="all", help="comma-separated registered methods (default: all)")
    return add_common_arguments(parser, SCRIPT, repeats=3)


def _errors(
    target: Target, block: ExactBlock, methods: list[str], device: torch.device, repeats: int
) -> dict[str, list[float]]:
    """Error 1 (with the scale-free error, which shares its products) and error 2 of every method built on
    ``block`` together, as the probe computes them: every build first (a method's factor eigendecompositions
    serve the others' error 2), then error 1 of each, then error 2 of each; median of ``repeats`` fresh
    builds and references (after a warm-up)."""
    times: dict[str, list[list[float]]] = {m: [[], []] for m in methods}
    for repeat in range(repeats + 1):
        built = approximate_all(block, methods, restrict=False)
        ref = target.fresh_ref(block)
        for column, measure in enumerate((_error_1, _error_2)):
            for m in methods:
                synchronize(device)
                start = time.perf_counter()
                measure(ref, built[m].operator)
                synchronize(device)
                if repeat:  # the first is the warm-up
                    times[m][column].append(time.perf_counter() - start)
    return {m: [sorted(t)[len(t) // 2] for t in ts] for m, ts in times.items()}


def _error_1(ref: BlockReference, operator: object) -> None:
    frobenius_error(ref, operator)  # type: ignore[arg-type]
    scale_free_error(ref, operator)  # type: ignore[arg-type]


def _error_2(ref: BlockReference, operator: object) -> None:
    spectral_error(ref, operator)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    layers = get_problem(args.problem).layer_names() if args.layers == "all" else args.layers.split(",")
    model, loss, (x, y), step = problem_setup(args.problem, args.batch_size, device)
    t_step = step_baseline(step, device, args.repeats)
    snap = Probe(model, loss, layers=layers, fisher="mc")(x, y)
    cost = {m: [0.0, 0.0, 0.0] for m in methods}  # build, error 1, error 2, summed over layers
    routes: dict[str, set[str]] = {m: set() for m in methods}
    t_shared = 0.0
    for layer in layers:
        target = Target(ExactBlock(snap.factors[layer]), device, args.repeats)  # type: ignore[attr-defined]
        t_shared += target.t_span + target.t_refs
        by_block: dict[int, list[str]] = {}
        for m in methods:
            block, route = target.of(m)
            routes[m].add(route)
            by_block.setdefault(id(block), []).append(m)
            span = target.span if block is not target.whole else None

            def build(m: str = m, block: ExactBlock = block, span: object = span) -> object:
                built = approximate_all(block, [m], restrict=False)[m]
                return built if span is None else built.lifted(span)  # type: ignore[arg-type]

            cost[m][0] += timed(build, device, args.repeats)[0]
        for ms in by_block.values():
            block, _ = target.of(ms[0])
            for m, (t1, t2) in _errors(target, block, ms, device, args.repeats).items():
                cost[m][1] += t1
                cost[m][2] += t2
        print(f"  ... {layer}: " + ", ".join(f"{m} {sum(cost[m]):.2f} s" for m in methods), file=sys.stderr, flush=True)
    report = Report.from_args(SCRIPT, args, device)
    report.line(
        f"{args.problem}, batch {x.shape[0]}, {len(layers)} layer(s) ({', '.join(layers[:3])}"
        f"{', ...' if len(layers) > 3 else ''}), every method's build, error 1 and error 2 summed over the layers"
    )
    report.line(
        "timed as the probe runs them (evaluate_block): span-invariant methods built and measured on the block "
        "restricted to its sample span when that is smaller (build includes lifting back), the others on the "
        "whole block; build includes the reused methods' (ekfac: kfac's); error 1 includes the scale-free error; "
        "errors of all methods after all builds, as the probe (shared factor eigendecompositions)"
    )
    report.set_baseline(t_step)
    report.row("shared: sample span, ||F||, spectrum of F", t_shared)
    for m, (b, e1, e2) in cost.items():
        route = "; ".join(sorted(routes[m]))
        for what, seconds in (("build", b), ("error 1", e1), ("error 2", e2)):
            report.row(f"{m}: {what}", seconds, detail=route if what == "build" else "", method=m, route=route)
    total = t_shared + sum(sum(c) for c in cost.values())
    paper = t_shared + sum(sum(cost[m]) for m in PAPER_METHODS if m in cost)
    report.row("total, every method, both errors", total)
    report.row("total, the papers' five", paper)
    report.line(f"ratio every method / the papers' five: {total / paper:.2f} (issue 18's target: at most 2)")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
