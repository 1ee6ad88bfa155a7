"""Cost of the two-level quantities of one snapshot relative to a training step (T §3-4).

MNIST auto-encoder, batch 512, all 8 layers probed: probe pass, ζ_KFAC and r_KFAC, the exact
damped natural gradient (Woodbury), each coarse space (basis, F_coarse, β*, gap), TKO, and the
block-diagonal increments of every single-layer method, as ratios to a training step
measured in the same run.

    python -m benchmarks.bench_two_level [--device cuda] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks._common import Report, add_common_arguments, setup, step_baseline, timed, trained_problem
from fisherlab.approximations import Method, approximate_all, kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.probe import Probe
from fisherlab.twolevel import CoarseSpace, WholeFisher, damped_kfac_solve, two_level

SCRIPT = Path(__file__).stem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--damping", type=float, default=1e-3)
    return add_common_arguments(parser, SCRIPT, repeats=3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    problem, model, x, train_step = trained_problem(args.problem, device)
    t_step = step_baseline(train_step, device, args.repeats)
    probe = Probe(model, problem.loss, fisher="mc")
    t_probe, snap = timed(lambda: probe(x, x), device, args.repeats)
    names = list(snap.factors)  # type: ignore[attr-defined]
    fisher = WholeFisher(tuple(ExactBlock(snap.factors[n]) for n in names))  # type: ignore[attr-defined]
    grads = [snap.gradients[n] for n in names]  # type: ignore[attr-defined]
    lam = args.damping
    report = Report.from_args(SCRIPT, args, device, width=54)
    report.line(
        f"{problem.name} auto-encoder, batch {x.shape[0]}, {len(names)} layers, "
        f"{sum(b.dim for b in fisher.blocks):,} parameters, "
        f"damping {lam}, device {device}"
    )
    report.set_baseline(t_step)
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
    base = timed(lambda: two_level(fisher, grads, damping=lam, spaces=[]), device, args.repeats)[0]
    rows.append(("shared: zeta, zeta_KFAC, r_KFAC, E(0)", base))
    for space in (c for c in CoarseSpace if c != CoarseSpace.TKO):
        t = timed(lambda s=space: two_level(fisher, grads, damping=lam, spaces=[s]), device, args.repeats)[0]
        rows.append((f"coarse space {space.value} (basis, F_coarse, beta*, gap)", t - base))
    t = timed(lambda: two_level(fisher, grads, damping=lam, spaces=[CoarseSpace.TKO]), device, args.repeats)[0]
    rows.append(("TKO (F_coarse of eq. 3.18)", t - base))
    for m in Method:
        t_approx, approx = timed(lambda m=m: [approximate_all(b, [m])[m].kron for b in fisher.blocks], device, 1)
        t_solve = timed(
            lambda a=approx: [k.solve(g, damping=lam) for k, g in zip(a, grads, strict=True)], device, args.repeats
        )[0]  # type: ignore[attr-defined]
        rows.append((f"block-diagonal {m.value}: approximations, all layers", t_approx))
        rows.append((f"block-diagonal {m.value}: damped solves", t_solve))
    report.width = max(len(name) for name, _ in rows)
    for name, t in rows:
        report.row(name, t)
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
