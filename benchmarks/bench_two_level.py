"""Cost of the two-level quantities of one snapshot relative to a training step (T §3-4).

MNIST auto-encoder, batch 512, all 8 layers probed: probe pass, ζ_KFAC and r_KFAC, the exact
damped natural gradient (Woodbury), each coarse space (basis, F_coarse, β*, gap), TKO, and the
block-diagonal increments of every single-layer method, as ratios to a training step
measured in the same run.

    python benchmarks/bench_two_level.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse

from benchmarks.bench_probe import timed, trained_problem
from fisherlab.approximations import Method, approximate_all, kfac_factors
from fisherlab.config import select_device
from fisherlab.fisher import ExactBlock
from fisherlab.probe import Probe
from fisherlab.twolevel import CoarseSpace, WholeFisher, damped_kfac_solve, two_level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = select_device(args.device)
    problem, model, x, train_step = trained_problem(args.problem, device)
    t_step, _ = timed(train_step, device, args.repeats)
    probe = Probe(model, problem.loss, fisher="mc")
    t_probe, snap = timed(lambda: probe(x, x), device, args.repeats)
    names = list(snap.factors)  # type: ignore[attr-defined]
    fisher = WholeFisher(tuple(ExactBlock(snap.factors[n]) for n in names))  # type: ignore[attr-defined]
    grads = [snap.gradients[n] for n in names]  # type: ignore[attr-defined]
    lam = args.damping
    print(
        f"{problem.name} auto-encoder, batch {x.shape[0]}, {len(names)} layers, "
        f"{sum(b.dim for b in fisher.blocks):,} parameters, "
        f"damping {lam}, device {device}"
    )
    print(f"training step (baseline): {t_step * 1e3:.1f} ms")
    rows = [("probe pass (all layers)", t_probe)]
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    rows.append(
        ("KFAC factors, all layers", timed(lambda: [kfac_factors(b) for b in fisher.blocks], device, args.repeats)[0])
    )
    rows.append(
        (
            "zeta_KFAC (damped solves)",
            timed(lambda: damped_kfac_solve(kfacs, grads, damping=lam), device, args.repeats)[0],
        )
    )
    zk = damped_kfac_solve(kfacs, grads, damping=lam)
    rows.append(
        ("r_KFAC = grad - F* zeta_KFAC", timed(lambda: fisher.matvec(zk, damping=lam), device, args.repeats)[0])
    )
    rows.append(
        ("exact zeta by Woodbury", timed(lambda: fisher.natural_gradient(grads, damping=lam), device, args.repeats)[0])
    )
    base = timed(lambda: two_level(fisher, grads, damping=lam, spaces=[], tko=False), device, args.repeats)[0]
    rows.append(("shared: zeta, zeta_KFAC, r_KFAC, E(0)", base))
    for space in CoarseSpace:
        t = timed(lambda s=space: two_level(fisher, grads, damping=lam, spaces=[s], tko=False), device, args.repeats)[0]
        rows.append((f"coarse space {space.value} (basis, F_coarse, beta*, gap)", t - base))
    t = timed(lambda: two_level(fisher, grads, damping=lam, spaces=[], tko=True), device, args.repeats)[0]
    rows.append(("TKO (F_coarse of eq. 3.18)", t - base))
    for m in Method:
        t_approx, approx = timed(lambda m=m: [approximate_all(b, [m])[m].kron for b in fisher.blocks], device, 1)
        t_solve = timed(
            lambda a=approx: [k.solve(g, damping=lam) for k, g in zip(a, grads, strict=True)], device, args.repeats
        )[0]  # type: ignore[attr-defined]
        rows.append((f"block-diagonal {m.value}: approximations, all layers", t_approx))
        rows.append((f"block-diagonal {m.value}: damped solves", t_solve))
    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        print(f"  {name:<{width}}  {t * 1e3:10.1f} ms  {t / t_step:8.2f} x step")


if __name__ == "__main__":
    main()
