"""Time and peak memory per rank of one probe snapshot of a global batch spread over 1, 2 and 4
processes (issue 10), as ratios to one rank, measured in the same run.

MNIST auto-encoder (embedded data), layer 5, global batch 2 048, every method, error 1 and
error 2 (``--metrics frobenius_error`` skips error 2, whose dense eigenvalues of F̂ every rank
computes alike: it does not shrink with more ranks). Ranks are processes on this machine
(gloo); on a machine with fewer cores than ranks the times say more about oversubscription
than about the method.

    python -m benchmarks.bench_distributed                       # ranks 1 2 4
    python -m benchmarks.bench_distributed --ranks 1 2 --metrics frobenius_error
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(world: int, rank: int, init: str, batch: int, metrics: tuple[str, ...], out: str) -> None:
    """One rank: probe its rows of the global batch once (after a warm-up snapshot), report time and memory."""
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
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = fl.FisherProbe(model, "bce", every=1, layers=["5"], config=config)
    probe.step(0, rows, rows)  # warm-up (and warm starts, as in a run)
    start = time.perf_counter()
    probe.step(1, rows, rows)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(
        json.dumps({"rank": rank, "seconds": seconds, "peak_mib": peak / 1024, "step_mib": (peak - base) / 1024})
    )
    if world > 1:
        dist.destroy_process_group()


def run(world: int, batch: int, metrics: tuple[str, ...]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"r{r}.json" for r in range(world)]
        code = "import sys, json; from benchmarks.bench_distributed import worker; worker(*json.loads(sys.argv[1]))"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps([world, r, f"{tmp}/init", batch, list(metrics), str(outs[r])])],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            )
            for r in range(world)
        ]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"rank failed with status {p.returncode}")
        return [json.loads(o.read_text()) for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--metrics", default="frobenius_error,spectral_error")
    args = parser.parse_args(argv)
    metrics = tuple(args.metrics.split(","))
    print(
        f"MNIST auto-encoder layer 5, global batch {args.batch}, every method, metrics {','.join(metrics)}, "
        f"gloo on CPU ({os.cpu_count()} cores), one thread per rank"
    )
    base: dict | None = None
    print(
        f"{'ranks':>5} {'time/rank s':>12} {'ratio':>6} {'peak MiB/rank':>14} {'ratio':>6} "
        f"{'snapshot MiB/rank':>18} {'ratio':>6}"
    )
    for world in args.ranks:
        rows = run(world, args.batch, metrics)
        t = max(r["seconds"] for r in rows)
        peak = max(r["peak_mib"] for r in rows)
        step = max(r["step_mib"] for r in rows)
        base = base or {"t": t, "peak": peak, "step": step}
        print(
            f"{world:>5} {t:>12.2f} {t / base['t']:>6.2f} {peak:>14.0f} {peak / base['peak']:>6.2f} {step:>18.0f} "
            f"{step / max(base['step'], 1e-9):>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
