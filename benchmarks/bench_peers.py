"""KFAC factors of every layer of the MNIST auto-encoder (MC Fisher, 1 sample, batch 512):
fisherlab side by side with its peers, each as a ratio to a training step measured in the
same run (issue 9, part 3).

Peers are optional; install them without their dependencies (a plain install pulls a CUDA torch):

    pip install --no-deps curvlinops-for-pytorch einconv linear_operator opt-einsum backpack-for-pytorch einops \
        unfoldNd nngeometry asdfghjkl
    python -m benchmarks.bench_peers [--repeats 5] [--device cuda] [--json out.json]

A peer that is not installed, or fails on this loss, is listed with the reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks._common import Report, add_common_arguments, setup, step_baseline, timed, trained_problem
from fisherlab.approximations import kfac_factors
from fisherlab.config import Accumulation
from fisherlab.probe import Probe

SCRIPT = Path(__file__).stem


def _fisherlab(model: nn.Module, x: torch.Tensor, accumulate: Accumulation) -> Callable[[], object]:
    probe = Probe(
        model,
        "bce",
        fisher="mc",
        accumulate_dtype=accumulate.dtype,
        moments_in_capture_dtype=accumulate.moments_in_capture_dtype,
    )
    return lambda: [kfac_factors(f) for f in probe(x, None).factors.values()]


def _curvlinops(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.BCEWithLogitsLoss(reduction="sum")

    def run() -> object:
        op = KFACLinearOperator(model, loss, params, [(x, x)], fisher_type="mc", check_deterministic=False)
        op.compute_kronecker_factors()  # lazy otherwise: the first product would compute them
        return op

    return run


def _backpack(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from backpack import backpack, extend
    from backpack.extensions import KFAC

    net = extend(model)
    loss = extend(nn.BCEWithLogitsLoss(reduction="sum"))
    binary = (x > 0.5).to(x.dtype)  # BackPACK's MC check wants 0/1 targets; the MC Fisher does not use them

    def run() -> object:
        net.zero_grad()
        with backpack(KFAC(mc_samples=1)):
            loss(net(x), binary).backward()
        return [p.kfac for p in net.parameters() if p.ndim == 2]

    return run


def _nngeometry(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """nngeometry's KFAC (PMatKFAC) on its Jacobian backend, with the MC Fisher of the Bernoulli
    likelihood (1 sample) written as nngeometry's own MC variants are: the log-likelihood of
    targets sampled from the model (its ``FIM_MonteCarlo`` has no binary variant)."""
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    def sampled_log_likelihood(inputs: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        targets = torch.bernoulli(torch.sigmoid(logits.detach()))
        return -nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1, keepdim=True)

    loader = DataLoader(TensorDataset(x), batch_size=x.shape[0])
    layers = LayerCollection.from_model(model)

    def run() -> object:
        backend = TorchHooksJacobianBackend(layer_collection=layers, model=model, function=sampled_log_likelihood)
        return PMatKFAC(generator=backend, examples=loader)

    return run


def _asdl(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    import asdl

    loss_types = [n for n in dir(asdl) if n.startswith("LOSS_")]
    raise NotImplementedError(f"asdl's Fisher takes {', '.join(loss_types)} only; this problem's loss is BCE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_arguments(parser, SCRIPT, repeats=5)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    problem, model, x, train_step = trained_problem("mnist", device)
    step = step_baseline(train_step, device, args.repeats)
    report = Report.from_args(SCRIPT, args, device, width=38, indent="")
    report.line(f"MNIST auto-encoder, batch {x.shape[0]}, all 8 layers, KFAC factors (MC, 1 sample), device {device}")
    report.set_baseline(step)
    rows: list[tuple[str, Callable[[], Callable[[], object]]]] = [
        ("fisherlab (default: mixed)", lambda: _fisherlab(model, x, Accumulation.MIXED)),
        ("fisherlab (--accumulate float64)", lambda: _fisherlab(model, x, Accumulation.FLOAT64)),
        ("fisherlab (--accumulate float32)", lambda: _fisherlab(model, x, Accumulation.FLOAT32)),
        ("curvlinops KFACLinearOperator", lambda: _curvlinops(model, x)),
        ("BackPACK KFAC", lambda: _backpack(problem.model(seed=0, device=device), x)),
        ("nngeometry PMatKFAC", lambda: _nngeometry(model, x)),
        ("asdl KFAC", lambda: _asdl(model, x)),
    ]
    for name, make in rows:
        try:
            t, _ = timed(make(), device, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a peer that is missing or refuses this loss is reported, not fatal
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            report.row(name, None, detail=f"(unavailable: {reason})", unavailable=reason)
            continue
        report.row(name, t)
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
