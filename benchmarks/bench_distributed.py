"""Time and peak memory per rank of one probe snapshot of a global batch spread over 1, 2 and 4
processes (issue 10), as ratios to one rank, measured in the same run.

MNIST auto-encoder (embedded data), layer 5, global batch 2 048, every method, error 1 and
error 2 (``--metrics frobenius_error`` skips error 2, whose dense eigenvalues of F̂ every rank
computes alike: it does not shrink with more ranks). Ranks are processes on this machine
(gloo); on a machine with fewer cores than ranks the times say more about oversubscription
than about the method.

    python -m benchmarks.bench_distributed                       # ranks 1 2 4
    python -m benchmarks.bench_distributed --ranks 1 2 --metrics frobenius_error [--json out.json]

Ratios are to the first ``--ranks`` entry (one rank by default), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import Report, add_common_arguments, peak_rss_bytes, setup, timed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).stem


def worker(world: int, rank: int, init: str, batch: int, metrics: tuple[str, ...], out: str, repeats: int = 1) -> None:
    """One rank: probe its rows of the global batch (after a warm-up snapshot; the median of ``repeats``
    snapshots), report time and memory."""
    import torch
    from torch import distributed as dist

    import fisherlab as fl

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", world_size=world, rank=rank)
    problem = fl.get_problem("mnist")
    model = problem.model(seed=0, dtype=torch.float64)
    x = problem.data(seed=0).train
    x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1)[:batch].double()
    rows = x.tensor_split(world)[rank]
    config = fl.ProbeConfig(layers=("5",), metrics=metrics)
    base = peak_rss_bytes()
    probe = fl.FisherProbe(model, "bce", every=1, layers=["5"], config=config)
    probe.step(0, rows, rows)  # warm-up (and warm starts, as in a run)
    iteration = iter(range(1, repeats + 1))
    seconds = timed(lambda: probe.step(next(iteration), rows, rows), torch.device("cpu"), repeats, warmup=False)[0]
    peak = peak_rss_bytes()
    Path(out).write_text(
        json.dumps({"rank": rank, "seconds": seconds, "peak_mib": peak / 2**20, "step_mib": (peak - base) / 2**20})
    )
    if world > 1:
        dist.destroy_process_group()


def run(world: int, batch: int, metrics: tuple[str, ...], repeats: int = 1) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"r{r}.json" for r in range(world)]
        code = "import sys, json; from benchmarks.bench_distributed import worker; worker(*json.loads(sys.argv[1]))"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    json.dumps([world, r, f"{tmp}/init", batch, list(metrics), str(outs[r]), repeats]),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            )
            for r in range(world)
        ]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"rank failed with status {p.returncode}")
        return [json.loads(o.read_text()) for o in outs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--metrics", default="frobenius_error,spectral_error")
    return add_common_arguments(
        parser,
        SCRIPT,
        repeats=1,
        repeats_help="timed snapshots per rank (median), after a warm-up snapshot",
        device=False,
        threads=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    metrics = tuple(args.metrics.split(","))
    report = Report.from_args(
        SCRIPT,
        args,
        device,
        baseline_name=f"{args.ranks[0]} ranks",
        ratio_label=f"{args.ranks[0]}-rank",
        width=10,
        unit="s",
    )
    report.line(
        f"MNIST auto-encoder layer 5, global batch {args.batch}, every method, metrics {','.join(metrics)}, "
        f"gloo on CPU ({os.cpu_count()} cores), one thread per rank; time, peak and snapshot memory per rank"
    )
    base: dict | None = None
    for world in args.ranks:
        rows = run(world, args.batch, metrics, args.repeats)
        t = max(r["seconds"] for r in rows)
        peak = max(r["peak_mib"] for r in rows)
        step = max(r["step_mib"] for r in rows)
        if base is None:
            base = {"t": t, "peak": peak, "step": step}
            report.baseline = t
        peak_ratio, step_ratio = peak / base["peak"], step / max(base["step"], 1e-9)
        report.row(
            f"{world} ranks",
            t,
            detail=f"peak {peak:6.0f} MiB/rank ({peak_ratio:.2f}x), snapshot {step:6.0f} MiB/rank ({step_ratio:.2f}x)",
            ranks=world,
            peak_mib_per_rank=peak,
            peak_ratio=peak_ratio,
            snapshot_mib_per_rank=step,
            snapshot_ratio=step_ratio,
        )
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
