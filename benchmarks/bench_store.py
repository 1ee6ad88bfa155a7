"""Writing results: appending one snapshot to the netCDF4 file vs rewriting the whole file after
every snapshot (the former method), over a run of many snapshots (issue 9, part 5).

The snapshots have the layout of a K Figure 1 run (one layer, five methods, every registered
metric). Appending costs the same at the first and the last snapshot; a rewrite grows with
the run, so a run of S snapshots spends O(S²) writing.

    python -m benchmarks.bench_store [--snapshots 2000] [--json out.json]

Ratios here are to one append (the mean over the run), measured in the same run: there is no
training step in writing results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from benchmarks._common import Report, add_common_arguments, setup, timed
from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS
from fisherlab.results import ResultsWriter, annotate, load, snapshot_dataset

METHODS = ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"]
SCRIPT = Path(__file__).stem


def snapshot(it: int) -> xr.Dataset:
    rng = np.random.default_rng(it)
    return snapshot_dataset(
        it,
        ["5"],
        METHODS,
        {m.name: rng.random((1, len(METHODS))) for m in BLOCK_METRICS},
        {m.name: rng.random(1) for m in LAYER_METRICS},
        {"train_loss": 1.0, "wall_time": float(it), "probe_time": 0.1},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=2000, help="snapshots of the run (default 2000)")
    return add_common_arguments(
        parser,
        SCRIPT,
        repeats=1,
        repeats_help="timed runs (median) of each rewrite; each append is timed once, as a run does it",
        device=False,
        threads=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = setup(args)
    n = args.snapshots
    if n < 10:
        raise SystemExit(f"--snapshots must be at least 10, got {n}")
    snaps = [snapshot(i) for i in range(n)]
    report = Report.from_args(SCRIPT, args, device, baseline_name="one append", ratio_label="append", width=44)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "append.nc"
        times = []
        with ResultsWriter(path, {"title": "bench"}) as writer:
            for s in snaps:
                start = time.perf_counter()
                writer.append(s)
                times.append(time.perf_counter() - start)
        assert load(path).sizes["iteration"] == n
        t = np.array(times)
        k = min(100, n)
        report.line(f"append, {n} snapshots: total {t.sum():.2f} s")
        report.set_baseline(float(t.mean()), "one append, mean")
        first, last = float(t[:k].mean()), float(t[-k:].mean())
        report.row(f"append, first {k} (mean)", first)
        report.row(f"append, last {k} (mean)", last, detail=f"(ratio last/first {last / first:.2f})")
        snaps[0].to_netcdf(Path(tmp) / "warm-up.nc", engine="scipy")  # the first scipy write pays imports
        rewrite = []
        for s in sorted({10, n // 10, n // 2, n}):
            # what the former writer did after snapshot s
            def write(s: int = s) -> None:
                annotate(xr.concat(snaps[:s], dim="iteration")).to_netcdf(Path(tmp) / "rewrite.nc", engine="scipy")

            sec = timed(write, device, args.repeats, warmup=False)[0]
            rewrite.append((s, sec))
            report.row(f"rewrite of {s:5d} snapshots", sec, snapshots=s)
        # the former writer concatenated and rewrote s snapshots after snapshot s: integrate the (linear) cost
        slope = (rewrite[-1][1] - rewrite[0][1]) / (rewrite[-1][0] - rewrite[0][0])
        total = sum(rewrite[0][1] + slope * (s - rewrite[0][0]) for s in range(1, n + 1))
        report.row(f"appending, {n} snapshots (total)", float(t.sum()), snapshots=n)
        report.row(
            f"rewriting after each, {n} snapshots (~total)",
            total,
            detail=f"= {total / t.sum():.1f}x appending",
            snapshots=n,
            over_appending=total / t.sum(),
        )
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
