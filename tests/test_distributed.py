"""The exact Fisher of a global batch over 1, 2 and 3 processes (gloo, float64) equals the
single-process one; a dying rank leaves every finished snapshot; DDP under torchrun (issue 10).

A fresh process spends seconds of CPU starting Python and torch, so the tests share two launches:
torchrun's two ranks run the DDP script and then the two-rank snapshot; three ranks forked from this
process (torch already imported) run the three-rank snapshot and then the run in which a rank dies."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import distributed as dist

from fisherlab._errors import FisherlabError
from fisherlab.distributed import _handshake
from fisherlab.results import load, validate
from tests import _dist_worker as worker
from tests.tolerances import scaled

ROOT = Path(__file__).resolve().parents[1]
#: Sums over ranks, in float64, in another order than one process's: roundoff of the largest entry.
REDUCED = {"rtol": 0.0, "atol": 1e-10}
#: Wall-clock and solver bookkeeping (iteration counts may differ by one at the tolerance): not compared.
NOT_COMPARED = {"approximation_time", "wall_time", "probe_time", "solver_iterations", "solver_residual", "converged"}


def _rank(modes: str, world: int, rank: int, tmp_path: Path) -> None:
    """A forked rank: its output goes to ``rank<r>.log``; its exit status is :func:`worker.run`'s."""
    log = open(tmp_path / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 - the process ends with it
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    sys.exit(worker.run(modes.split(","), world, rank, str(tmp_path / "init"), str(tmp_path)))


def _spawn(modes: str, world: int, tmp_path: Path) -> list[tuple[int | None, str]]:
    """Run ``world`` ranks of :mod:`tests._dist_worker` doing ``modes`` (comma-separated) in turn; they
    write under ``tmp_path``. Forked from this process, which has imported torch and fisherlab already (a
    fresh Python per rank would spend seconds of CPU on that). Returns each rank's (exit status, output)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(modes, world, r, tmp_path)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    for r, p in enumerate(procs):
        p.join(timeout=120)
        if p.exitcode is None:
            p.kill()
            p.join()
        results.append((p.exitcode, (tmp_path / f"rank{r}.log").read_text()))
    return results


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[int | None, str]], Path]:
    """Three processes (file rendezvous) that write the snapshot of the global batch, then run the short
    run in which rank 1 dies: one start of Python and torch per rank for both tests."""
    out = tmp_path_factory.mktemp("three")
    return _spawn("snapshot,die", 3, out), out


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """A user's DDP training script with FisherProbe inside, launched by torchrun (2 processes, gloo);
    the same two ranks then write the snapshot of the global batch (``_ddp_script.py``'s second argument)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "tests" / "_ddp_script.py"),
        str(out / "ddp.nc"),
        str(out / "snapshot.nc"),
    ]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180), out


def _assert_same(got, expected) -> None:  # type: ignore[no-untyped-def]
    assert set(got.data_vars) == set(expected.data_vars)
    for name in sorted(set(expected.data_vars) - NOT_COMPARED):
        a, b = np.asarray(got[name].values, dtype=float), np.asarray(expected[name].values, dtype=float)
        scale = np.maximum(1.0, np.abs(b))  # NaN where undefined (two-level of a non-Kronecker method): compared as NaN
        tol = scaled(REDUCED, float(np.nanmax(scale)) if np.isfinite(scale).any() else 0.0)
        assert np.allclose(a, b, **tol, equal_nan=True), (name, a, b)


@pytest.fixture(scope="module")
def reference() -> object:
    return worker.snapshot(1, 0, None).dataset


def test_world_size_1_equals_one_process(reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0)
    try:
        _assert_same(worker.snapshot(1, 0, None).dataset, reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_every_metric_equals_the_single_process_value(world: int, reference, request) -> None:  # type: ignore[no-untyped-def]
    """Shards of 6+5 (under torchrun) and 4+4+3 samples: every error, norm and two-level quantity within 1e-10."""
    if world == 2:
        result, out = request.getfixturevalue("torchrun")
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        results, out = request.getfixturevalue("three_ranks")
        assert "Traceback" not in results[1][1], results[1][1][-3000:]  # rank 1 only dies later, on purpose
    ds = load(out / "snapshot.nc")
    validate(ds)
    _assert_same(ds, reference)
    assert bool(ds["frobenius_error"].notnull().all()) and bool(ds["gap"].notnull().all())


def test_a_dying_rank_leaves_every_finished_snapshot(three_ranks) -> None:  # type: ignore[no-untyped-def]
    results, out = three_ranks
    assert results[1][0] == 3, results[1][1][-3000:]
    assert results[0][0] not in (0, None) and results[2][0] not in (0, None)  # they fail at the next collective
    ds = load(out / "die.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 1]


def test_ddp_script_with_fisher_probe_under_torchrun(torchrun) -> None:  # type: ignore[no-untyped-def]
    """A user's DDP training script with FisherProbe inside, launched by torchrun (2 processes, gloo)."""
    result, out = torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    ds = load(out / "ddp.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 3] and ds.attrs["probed_layers"] == "0,2"
    assert torch.isfinite(torch.as_tensor(ds["frobenius_error"].values)).all()


def _handshakes(worlds: list[int], settings: list[str]) -> list[str]:
    """Run the start-up handshake of ranks ``0, 1, ...`` (in threads, on one rendezvous store):
    what each rank raised (``""`` for none)."""
    master = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    stores = [master] + [
        dist.TCPStore("127.0.0.1", master.port, None, False, timedelta(seconds=30)) for _ in worlds[1:]
    ]
    outcome = [""] * len(worlds)

    def run(rank: int) -> None:
        try:
            _handshake(stores[rank], rank, worlds[rank], settings[rank], 30.0)
        except FisherlabError as e:
            outcome[rank] = str(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(worlds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    return outcome


@pytest.mark.parametrize(
    ("worlds", "settings", "message"),
    [
        ([3, 2], ["a", "a"], "rank 1 was started with WORLD_SIZE=2 but rank 0 with WORLD_SIZE=3"),
        ([2, 3], ["a", "a"], "rank 1 was started with WORLD_SIZE=3 but rank 0 with WORLD_SIZE=2"),
        ([2, 2], ["a", "b"], "rank 1 was started with other settings than rank 0"),
        ([3, 3, 3], ["a", "a", "a"], ""),
    ],
    ids=["rank0-expects-more", "rank1-expects-more", "other-settings", "agree"],
)
def test_startup_handshake_fails_fast_on_mismatched_ranks(worlds: list[int], settings: list[str], message: str) -> None:
    """Processes that disagree on WORLD_SIZE or settings stop at once, every one with the same one-line
    error, where they used to wait out the collective timeout and end in gloo tracebacks."""
    start = time.monotonic()
    outcome = _handshakes(worlds, settings)
    assert time.monotonic() - start < 10
    assert all(got.startswith(message) if message else got == "" for got in outcome), outcome
    assert len(set(outcome)) == 1  # every rank says the same line
