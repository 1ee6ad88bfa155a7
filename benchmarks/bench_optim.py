"""Time per iteration of each optimizer relative to SGD (issue: optimizers; K App. C, Table 1).

MNIST auto-encoder at batch 512 (embedded stand-in data): each optimizer runs ``--steps``
iterations (forward, backward, step) after a warm-up; the median time per iteration is printed
with its ratio to SGD measured in the same run. Kronecker methods use T1 = 5, T2 = 20, so the
figure averages refresh and non-refresh steps as training would.

    python -m benchmarks.bench_optim [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from fisherlab._errors import ConvergenceWarning
from fisherlab.config import select_device
from fisherlab.losses import per_sample_loss
from fisherlab.optim import OPTIMIZER_NAMES, KroneckerOptimizer, make_optimizer
from fisherlab.problems import get_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES))
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    device = select_device(args.device)
    problem = get_problem(args.problem)
    x = problem.data(seed=0).train[: problem.batch_size].to(device)
    print(f"{problem.name} auto-encoder, batch {x.shape[0]}, device {device}, {args.steps} steps each (T1=5, T2=20)")
    results = {}
    for name in args.optimizers.split(","):
        model = problem.model(seed=0, device=device)
        kw = {} if name in ("sgd", "adam") else {"damping": 1e-2, "kl_clip": 1e-2, "t1": 5, "t2": 20}
        opt = make_optimizer(name, model, problem.loss, **kw)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            per_sample_loss(problem.loss, model(x), x).mean().backward()
            opt.step(inputs=x) if isinstance(opt, KroneckerOptimizer) else opt.step()

        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results[name] = (time.perf_counter() - start) / args.steps
        base = results.get("sgd", results[name])
        print(f"  {name:<28} {results[name] * 1e3:9.1f} ms/it  {results[name] / base:8.2f} x SGD", flush=True)


if __name__ == "__main__":
    main()
