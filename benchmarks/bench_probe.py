"""Cost of a probe snapshot relative to a training step (issue: probe; K App. C).

For the MNIST auto-encoder at batch 512 and layer 5 (30 → 250, a 7 750-sided block) it times
a training step (the baseline, measured in the same run), a probe pass, each approximation,
error 1 and error 2, and prints them as ratios to the training step; then it times error 1
and error 2 matrix-free against the dense computation (forming F and F̂, ``eigvalsh``).

    python benchmarks/bench_probe.py                 # CPU, or CUDA when available
    python benchmarks/bench_probe.py --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from fisherlab.approximations import Method, approximate_all
from fisherlab.config import select_device
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.losses import per_sample_loss
from fisherlab.metrics import BlockReference, frobenius_error, spectral_error
from fisherlab.probe import Probe
from fisherlab.problems import Problem, get_problem


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up), synchronising CUDA."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def trained_problem(
    name: str, device: torch.device
) -> tuple[Problem, torch.nn.Module, torch.Tensor, Callable[[], None]]:
    """The problem's network after 20 Adam steps on one batch (so its Fisher is not trivial),
    that batch, and a training step on it (the baseline all ratios refer to)."""
    problem = get_problem(name)
    model = problem.model(seed=0, device=device)
    x = problem.data(seed=0).train[: problem.batch_size].to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad()
        per_sample_loss(problem.loss, model(x), x).mean().backward()
        opt.step()

    for _ in range(20):
        train_step()
    return problem, model, x, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--layer", default="5")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-dense", action="store_true", help="skip the dense twins (they need ~2 GB and minutes on CPU)"
    )
    args = parser.parse_args()
    device = select_device(args.device)
    problem, model, x, train_step = trained_problem(args.problem, device)
    probe = Probe(model, problem.loss, layers=[args.layer], fisher="mc")
    t_step, _ = timed(train_step, device, args.repeats)
    t_probe, snap = timed(lambda: probe(x, x), device, args.repeats)
    block = ExactBlock(snap.factors[args.layer])  # type: ignore[attr-defined]
    f = block.factors
    print(
        f"{problem.name} auto-encoder, batch {x.shape[0]}, layer {args.layer}: "
        f"d_in={f.d_in} (bias incl.), d_out={f.d_out}, "
        f"block side {f.dim}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
    )
    print(f"training step (baseline): {t_step * 1e3:.1f} ms")
    rows = [("probe pass", t_probe)]
    t_ref, ref = timed(lambda: BlockReference.of(block), device, args.repeats)
    rows.append(("Gram matrix, ||F||, spectrum of F (shared)", t_ref))
    approx = {}
    for m in Method:
        t, res = timed(lambda m=m: approximate_all(block, [m])[m], device, args.repeats)
        approx[m] = res
        rows.append((f"approximation {m.value} ({res.iterations} it.)", t))  # type: ignore[attr-defined]
    for m, a in approx.items():
        rows.append((f"error 1 {m.value}", timed(lambda a=a: frobenius_error(ref, a.kron), device, args.repeats)[0]))  # type: ignore[arg-type]
        rows.append((f"error 2 {m.value}", timed(lambda a=a: spectral_error(ref, a.kron), device, args.repeats)[0]))  # type: ignore[arg-type]
    rows.append(("total: probe pass + shared + all methods + both errors", sum(t for _, t in rows)))
    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        print(f"  {name:<{width}}  {t * 1e3:10.1f} ms  {t / t_step:8.2f} x step")
    print("  (issue 9 target on one H100: total <= 3x a training step)")
    if args.no_dense:
        return
    print("matrix-free vs dense (same layer, float64; dense forms F and F̂ and uses eigvalsh):")
    t_dense_f, dense = timed(block.as_dense, device, 1)
    for m in (Method.KPSVD, Method.DEFLATION):
        k = approx[m].kron  # type: ignore[attr-defined]
        t_mf1 = timed(lambda k=k: (BlockReference.of(block), frobenius_error(BlockReference.of(block), k)), device, 1)[
            0
        ]
        t_d1, e1 = timed(lambda k=k: dense_frobenius_error(block.as_dense(), k.as_dense()), device, 1)
        t_mf2 = timed(lambda k=k: spectral_error(BlockReference.of(block), k), device, 1)[0]
        t_d2, e2 = timed(lambda k=k: dense_spectral_error(dense, k.as_dense()), device, 1)
        print(
            f"  {m.value:<10} error 1: matrix-free {t_mf1:7.3f} s, dense {t_d1:7.3f} s, ratio {t_mf1 / t_d1:.4f}; "
            f"|diff| {abs(float(e1) - float(frobenius_error(ref, k))):.1e}"
        )
        print(
            f"  {m.value:<10} error 2: matrix-free {t_mf2:7.3f} s, dense {t_d2 + t_dense_f:7.3f} s, "
            f"ratio {t_mf2 / (t_d2 + t_dense_f):.4f}; "
            f"|diff| {abs(float(e2) - float(spectral_error(ref, k))):.1e}"
        )


if __name__ == "__main__":
    main()
