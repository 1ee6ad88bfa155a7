"""Error 2 of the Kronecker-rank-2 methods (deflation, Lanczos, KFAC-corrected) on several blocks, as
ratios to a training step measured in the same run, with one BLAS thread and with torch's default
(issue 9 part 1, issue 20 item 14).

Blocks (MC Fisher):

* ``mnist5-bench``: MNIST auto-encoder layer 5 (30 → 250, D = 7 750), batch 512, 20 Adam steps
  from seed 0 (the case of ``bench_probe``).
* ``mnist5-binary``: the same layer of a differently trained network (seed 1, binarised inputs,
  20 Adam steps, batch 512): clustered eigenvalues of F̂ near the cut.
* ``mnist5-init``: the same layer at initialisation (seed 2, no training).
* ``cnn2-b64``: cuda-convnet conv layer 2 (32 → 32 channels, 5×5, 16×16 positions, D = 25 632),
  batch 64, 20 Adam steps.
* ``linear257``: a 257 × 256 Linear layer (D = 65 792, N = 512; inputs and output derivatives
  with power-law covariances, as in trained networks).

The baseline is the MNIST training step (batch 512) under the same thread setting, timed again
before each case (the load of a shared machine changes within a run); the target is every case
within 5× of it. ``side``: F̂'s side after the restrictions, where it is diagonalised or iterated.
``--dense`` adds dense ``eigvalsh`` of the whole F̂ where it fits
(MNIST layer 5 only) and prints the difference.

    python -m benchmarks.bench_spectral [--device cuda] [--threads 1] [--dense] [--cases mnist5-binary,...] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks._common import Report, add_common_arguments, make_train_step, setup, step_baseline, timed
from fisherlab.approximations import Method, approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, spectral_error_bounded
from fisherlab.metrics.error2 import _error_interval
from fisherlab.probe import Probe
from fisherlab.problems import get_problem
from fisherlab.sample_span import on_sample_span

RANK2 = (Method.DEFLATION, Method.LANCZOS, Method.KFAC_CORRECTED)
SCRIPT = Path(__file__).stem
#: Training steps timed for the baseline before each case at least.
STEP_REPEATS = 5


def _dense_error_2(ref: BlockReference, kron) -> float:  # type: ignore[no-untyped-def]
    """The old method: every eigenvalue of F̂ by dense ``eigvalsh``."""
    lam = ref.eigenvalues.clamp(min=0)
    mu = torch.sort(torch.linalg.eigvalsh(kron.as_dense()), descending=True).values
    low, _ = _error_interval(lam, mu, float(kron.frobenius_norm_squared()), by_magnitude=False, complete=True)
    return (low / float(torch.sum(lam**2))) ** 0.5


def _trained(
    name: str,
    layer: str,
    device: torch.device,
    *,
    seed: int,
    steps: int,
    batch: int | None = None,
    binary: bool = False,
) -> tuple[ExactBlock, Callable[[], None]]:
    """Layer ``layer``'s exact block (MC Fisher) after ``steps`` Adam steps on one batch, and a training step."""
    problem = get_problem(name)
    model = problem.model(seed=seed, device=device)
    data = problem.data(seed=seed)
    n = batch or problem.batch_size
    x = data.train[:n].to(device)
    if binary:
        x = (x > 0.5).to(x.dtype)
    y = x if problem.kind == "autoencoder" else data.train_labels[:n].to(device)
    train_step = make_train_step(problem, model, x, y, torch.optim.Adam(model.parameters(), lr=1e-3))
    for _ in range(steps):
        train_step()
    torch.manual_seed(seed)
    return ExactBlock(Probe(model, problem.loss, layers=[layer], fisher="mc")(x, y).factors[layer]), train_step


def _power_law_layer(d_in: int, d_out: int, n: int, device: torch.device) -> ExactBlock:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, 1, d_in, generator=gen, dtype=torch.float64) * torch.arange(1, d_in + 1) ** -1.0
    a[..., -1] = 1.0  # bias column
    g = torch.randn(n, 1, 1, d_out, generator=gen, dtype=torch.float64) * torch.arange(1, d_out + 1) ** -1.0
    return ExactBlock(LayerFactors(a.to(device), g.to(device)))


CASES: dict[str, Callable[[torch.device], ExactBlock]] = {
    "mnist5-bench": lambda d: _trained("mnist", "5", d, seed=0, steps=20)[0],
    "mnist5-binary": lambda d: _trained("mnist", "5", d, seed=1, steps=20, binary=True)[0],
    "mnist5-init": lambda d: _trained("mnist", "5", d, seed=2, steps=0)[0],
    "cnn2-b64": lambda d: _trained("cnn", "2", d, seed=0, steps=20, batch=64)[0],
    "linear257": lambda d: _power_law_layer(257, 256, 512, d),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(m.value for m in RANK2), help="comma-separated rank-2 methods")
    parser.add_argument("--dense", action="store_true", help="also dense eigvalsh of F̂ (MNIST layer 5 only)")
    return add_common_arguments(
        parser,
        SCRIPT,
        repeats=1,
        repeats_help=(
            f"timed runs (median, no warm-up) of each error 2; the training step baseline before each case "
            f"is the median of max({STEP_REPEATS}, repeats) after a warm-up"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    _, train_step = _trained("mnist", "5", device, seed=0, steps=20)
    step_repeats = max(STEP_REPEATS, args.repeats)
    report = Report.from_args(SCRIPT, args, device, unit="s", width=30)
    report.line(
        f"device {device}, {torch.get_num_threads()} threads; baseline: an MNIST training step (batch 512), "
        f"timed again before each case (median of {step_repeats}) so that ratios hold on a machine whose load changes"
    )
    report.line(
        f"{report.indent}{'case, method':<{report.width}}  {'time':>12}   {'ratio':>8}         "
        "D, side, r (eigenvalues of F), step: error 2 ± bound (eigenvalues)"
    )
    worst = 0.0
    for name in args.cases.split(","):
        block = CASES[name](device)
        ref = BlockReference.of(block)
        ref.eigenvalues, block.span_bases  # noqa: B018 - shared by the methods, not one method's error 2
        for key, approx in approximate_all(block, [Method(m) for m in args.methods.split(",")]).items():
            method = getattr(key, "value", key)  # approximate_all's keys are the methods' names
            step = step_baseline(train_step, device, step_repeats)
            t, res = timed(
                lambda a=approx, ref=ref: spectral_error_bounded(ref, a.kron), device, args.repeats, warmup=False
            )
            worst = max(worst, t / step)
            side = on_sample_span(block, approx.kron).on_ranges().dim
            r = ref.eigenvalues.numel()
            detail = (
                f"D {block.dim:>6}, side {side:>5}, r {r:>4}, step {step * 1e3:5.1f} ms: "
                f"{res.value:.6e} ± {res.bound:.1e} ({res.eigenvalues}){'; ' + res.note if res.note else ''}"  # type: ignore[attr-defined]
            )
            dense_diff = None
            if args.dense and name.startswith("mnist5"):
                dense_diff = abs(_dense_error_2(ref, approx.kron) - res.value)  # type: ignore[attr-defined]
                detail += f"; dense |diff| {dense_diff:.1e}"
            report.row(
                f"{name} {method}",
                t,
                baseline=step,
                detail=detail,
                case=name,
                method=method,
                dim=block.dim,
                side=side,
                rank=r,
                error_2=res.value,  # type: ignore[attr-defined]
                error_2_bound=res.bound,  # type: ignore[attr-defined]
                eigenvalues=res.eigenvalues,  # type: ignore[attr-defined]
                note=res.note,  # type: ignore[attr-defined]
                dense_abs_diff=dense_diff,
            )
    report.line(f"worst: {worst:.1f}x a training step (target 5x)")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
