"""Cost of a probe snapshot relative to a training step (issue: probe; K App. C).

For the MNIST auto-encoder at batch 512 and layer 5 (30 → 250, a 7 750-sided block) it times
a training step (the baseline, measured in the same run), a probe pass, each approximation,
error 1 and error 2, and prints them as ratios to the training step; then it times error 1
and error 2 matrix-free against the dense computation (forming F and F̂, ``eigvalsh``).

    python -m benchmarks.bench_probe                 # CPU, or CUDA when available
    python -m benchmarks.bench_probe --device cuda --repeats 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks._common import Report, add_common_arguments, setup, step_baseline, timed, trained_problem
from fisherlab.approximations import Method, approximate_all
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.metrics import (
    BlockReference,
    frobenius_error,
    frobenius_error_resolved,
    spectral_error,
    spectral_error_bounded,
)
from fisherlab.probe import Probe

__all__ = ["build_parser", "main", "timed", "trained_problem"]  # timed, trained_problem: from _common, as before

SCRIPT = Path(__file__).stem


def _with_spectrum(ref: BlockReference) -> BlockReference:
    ref.eigenvalues  # noqa: B018 - computed on first use and kept
    return ref


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mnist")
    parser.add_argument("--layer", default="5")
    parser.add_argument(
        "--no-dense", action="store_true", help="skip the dense twins (they need ~2 GB and minutes on CPU)"
    )
    return add_common_arguments(parser, SCRIPT, repeats=3)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    problem, model, x, train_step = trained_problem(args.problem, device)
    probe = Probe(model, problem.loss, layers=[args.layer], fisher="mc")
    t_step = step_baseline(train_step, device, args.repeats)
    t_probe, snap = timed(lambda: probe(x, x), device, args.repeats)
    block = ExactBlock(snap.factors[args.layer])  # type: ignore[attr-defined]
    f = block.factors
    report = Report.from_args(SCRIPT, args, device, width=56)
    report.line(
        f"{problem.name} auto-encoder, batch {x.shape[0]}, layer {args.layer}: "
        f"d_in={f.d_in} (bias incl.), d_out={f.d_out}, "
        f"block side {f.dim}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
    )
    report.set_baseline(t_step)
    rows = [report.row("probe pass", t_probe)]
    # the spectrum is computed on first use: ask for it, as the row says (it is shared by every error 2)
    t_ref, ref = timed(lambda: _with_spectrum(BlockReference.of(block)), device, args.repeats)
    rows.append(report.row("Gram matrix, ||F||, spectrum of F (shared)", t_ref))
    approx = {}
    for m in Method:
        t, res = timed(lambda m=m: approximate_all(block, [m])[m], device, args.repeats)
        approx[m] = res
        its = res.iterations  # type: ignore[attr-defined]
        rows.append(report.row(f"approximation {m.value} ({its} it.)", t, method=m.value, iterations=its))
    for m, a in approx.items():
        # frobenius_error and spectral_error cache their result per (reference, approximation): time what they
        # compute once, or the warm-up run would leave the timed runs a dictionary look-up
        t1 = timed(lambda a=a: frobenius_error_resolved(ref, a.kron), device, args.repeats)[0]  # type: ignore[arg-type]
        rows.append(report.row(f"error 1 {m.value}", t1, method=m.value))
        t2 = timed(lambda a=a: spectral_error_bounded(ref, a.kron), device, args.repeats)[0]  # type: ignore[arg-type]
        rows.append(report.row(f"error 2 {m.value}", t2, method=m.value))
    report.row("total: probe pass + shared + all methods + both errors", sum(r["seconds"] for r in rows))
    report.line("  (issue 9 target on one H100: total <= 3x a training step)")
    if not args.no_dense:
        report.line("matrix-free vs dense (same layer, float64; dense forms F and F̂ and uses eigvalsh):")
        t_dense_f, dense = timed(block.as_dense, device, 1)
        for m in (Method.KPSVD, Method.DEFLATION):
            k = approx[m].kron  # type: ignore[attr-defined]
            t_mf1 = timed(
                lambda k=k: (BlockReference.of(block), frobenius_error(BlockReference.of(block), k)), device, 1
            )[0]
            t_d1, e1 = timed(lambda k=k: dense_frobenius_error(block.as_dense(), k.as_dense()), device, 1)
            t_mf2 = timed(lambda k=k: spectral_error(BlockReference.of(block), k), device, 1)[0]
            t_d2, e2 = timed(lambda k=k: dense_spectral_error(dense, k.as_dense()), device, 1)
            diff1 = abs(float(e1) - float(frobenius_error(ref, k)))  # type: ignore[arg-type]
            diff2 = abs(float(e2) - float(spectral_error(ref, k)))  # type: ignore[arg-type]
            report.row(
                f"{m.value} error 1 matrix-free",
                t_mf1,
                detail=f"dense {t_d1:7.3f} s, ratio {t_mf1 / t_d1:.4f}; |diff| {diff1:.1e}",
                method=m.value,
                dense_seconds=t_d1,
                matrix_free_over_dense=t_mf1 / t_d1,
                abs_diff=diff1,
            )
            report.row(
                f"{m.value} error 2 matrix-free",
                t_mf2,
                detail=f"dense {t_d2 + t_dense_f:7.3f} s, ratio {t_mf2 / (t_d2 + t_dense_f):.4f}; |diff| {diff2:.1e}",
                method=m.value,
                dense_seconds=t_d2 + t_dense_f,
                matrix_free_over_dense=t_mf2 / (t_d2 + t_dense_f),
                abs_diff=diff2,
            )
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
