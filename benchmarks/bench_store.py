"""Writing results: appending one snapshot to the netCDF4 file vs rewriting the whole file after
every snapshot (the former method), over a run of many snapshots (issue 9, part 5).

The snapshots have the layout of a K Figure 1 run (one layer, five methods, every registered
metric). Appending costs the same at the first and the last snapshot; a rewrite grows with
the run, so a run of S snapshots spends O(S²) writing.

    python -m benchmarks.bench_store [--snapshots 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from fisherlab.metrics import BLOCK_METRICS, LAYER_METRICS
from fisherlab.results import ResultsWriter, annotate, load, snapshot_dataset

METHODS = ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.snapshots
    snaps = [snapshot(i) for i in range(n)]
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
        print(f"append, {n} snapshots: total {t.sum():.2f} s; per snapshot: first 100 {t[:100].mean() * 1e3:.2f} ms, ")
        print(f"  last 100 {t[-100:].mean() * 1e3:.2f} ms (ratio last/first {t[-100:].mean() / t[:100].mean():.2f})")
        rewrite = []
        snaps[0].to_netcdf(Path(tmp) / "warm-up.nc", engine="scipy")  # the first scipy write pays imports
        for s in sorted({10, n // 10, n // 2, n}):
            start = time.perf_counter()  # what the former writer did after snapshot s
            annotate(xr.concat(snaps[:s], dim="iteration")).to_netcdf(Path(tmp) / "rewrite.nc", engine="scipy")
            rewrite.append((s, time.perf_counter() - start))
        # the former writer concatenated and rewrote s snapshots after snapshot s: integrate the (linear) cost
        slope = (rewrite[-1][1] - rewrite[0][1]) / (rewrite[-1][0] - rewrite[0][0])
        total = sum(rewrite[0][1] + slope * (s - rewrite[0][0]) for s in range(1, n + 1))
        for s, sec in rewrite:
            print(f"rewrite of {s:5d} snapshots: {sec * 1e3:8.2f} ms  ({sec / t.mean():6.1f}x one append)")
        print(f"rewriting after every snapshot, {n} snapshots: ~{total:.1f} s = {total / t.sum():.1f}x appending")
    return 0


if __name__ == "__main__":
    sys.exit(main())
