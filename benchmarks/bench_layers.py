"""Per-layer cost of a probe snapshot (every method, both errors) as ratios to a training step,
and peak memory, for any problem (issue 9, parts 1 and 2).

    python -m benchmarks.bench_layers --problem resnet18 --batch-size 8             # every conv layer
    python -m benchmarks.bench_layers --problem transformer                          # every Linear layer
    python -m benchmarks.bench_layers --problem faces --layers 1                     # target: <= 8 GiB

Each layer's row: the exact block's shared quantities, every approximation and every metric
(``evaluate_block``), seconds and ratio to one training step on the same batch measured in the
same run; then the probe pass of all listed layers and the process's peak resident memory.
Error 2 that had to be bounded (memory or work limit) is flagged with its bound.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings

import torch

from benchmarks.bench_probe import timed
from fisherlab.config import select_device
from fisherlab.fisher import ExactBlock
from fisherlab.losses import per_sample_loss
from fisherlab.metrics import evaluate_block
from fisherlab.probe import Probe
from fisherlab.problems import get_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="resnet18")
    parser.add_argument("--layers", default=None, help="comma-separated (default: every probeable layer)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the problem's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    problem = get_problem(args.problem)
    names = args.layers.split(",") if args.layers else problem.layer_names()
    model = problem.model(seed=0, device=device)
    data = problem.data(seed=0)
    x, y = next(problem.batches(data, batch_size=args.batch_size, device=device))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad()
        per_sample_loss(problem.loss, model(x), y).mean().backward()
        opt.step()

    step, _ = timed(train_step, device, 3)
    probe = Probe(model, problem.loss, layers=names, fisher="mc")
    start = time.perf_counter()
    snap = probe(x, y)
    t_probe = time.perf_counter() - start
    print(f"{problem.name}, batch {x.shape[0]}, device {device}; training step (baseline) {step * 1e3:.1f} ms")
    print(f"probe pass, {len(names)} layers: {t_probe:.2f} s = {t_probe / step:.1f}x step")
    total = 0.0
    for name in names:
        block = ExactBlock(snap.factors[name])
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ev = evaluate_block(block, layer=name)
        t = time.perf_counter() - start
        total += t
        bounds, values = ev.values["spectral_error_bound"], ev.values["spectral_error"]
        worst = max(bounds.values())  # never 0 (rounding): bounded where beyond the eigensolver's tolerance
        bounded = any(bounds[m] > max(1e-6 * values[m], 1e-9) for m in bounds)
        flag = f"  error 2 bounded (worst bound {worst:.2g})" if bounded else ""
        flag += "".join(f"\n      {w.category.__name__}: {w.message}" for w in caught)
        print(f"  {name:<22} D = {block.dim:>9}  {t:8.2f} s = {t / step:8.1f}x step{flag}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"all layers, every method, both errors: {total:.1f} s = {total / step:.0f}x step; peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
