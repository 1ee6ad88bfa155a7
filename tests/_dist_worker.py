"""One rank of the distributed tests: :func:`run` in a forked process, or
``python -m tests._dist_worker MODES WORLD RANK INIT_FILE OUT_DIR``.

MODES is a comma-separated list run in order in the same processes (each start of Python and
torch costs seconds of CPU): ``snapshot`` probes one global batch with every registered method, both
errors and two-level; rank 0 writes ``OUT_DIR/snapshot.nc``. ``die`` probes every step of a short run
writing ``OUT_DIR/die.nc``; rank 1 dies after the second snapshot.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch import distributed as dist

import fisherlab as fl
from tests.cases import small_mlp

GLOBAL_BATCH = 11  # not divisible by 2 or 3: shards of different sizes


def config() -> fl.ProbeConfig:
    return fl.ProbeConfig(
        methods=("all",),  # the papers' five and the zoo (issue 18): every distributed sum
        two_level=True,
        tol=1e-12,
        max_iter=20_000,
        krylov_dim=30,
        damping=1e-2,
        coarse_spaces=("nicolaides", "residuals", "taylor", "tko"),
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL_BATCH, 4, generator=gen, dtype=torch.float64), torch.randn(
        GLOBAL_BATCH, 3, generator=gen, dtype=torch.float64
    )


def rows(world: int, rank: int) -> slice:
    sizes = [len(p) for p in torch.arange(GLOBAL_BATCH).tensor_split(world)]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def snapshot(world: int, rank: int, out: str | Path | None) -> fl.FisherProbe:
    """The snapshot at step 0 of this rank's rows (the whole batch without a process group)."""
    x, y = global_batch()
    part = rows(world, rank)
    probe = fl.FisherProbe(small_mlp((4, 5, 3)), "mse", every=1, config=config(), out=out)
    probe.step(0, x[part], y[part])
    return probe


def die(world: int, rank: int, out: str | Path) -> None:
    """Probe steps 0..3 writing ``out``; rank 1 exits (status 3) after step 1, the others fail at step 2."""
    x, y = global_batch()
    probe = fl.FisherProbe(small_mlp((4, 5, 3)), "mse", every=1, methods=["kfac", "kpsvd"], out=out)
    for step in range(4):
        probe.step(step, x[rows(world, rank)], y[rows(world, rank)])
        if rank == 1 and step == 1:
            os._exit(3)  # a rank that dies mid-run
    probe.close()


def run(modes: list[str], world: int, rank: int, init: str, out: str) -> int:
    """Join the process group of ``world`` ranks (file rendezvous at ``init``) as ``rank`` and run ``modes``."""
    torch.set_num_threads(1)
    timeout = timedelta(seconds=60)  # a dead peer is usually seen at once (closed socket); never wait longer
    dist.init_process_group("gloo", init_method=f"file://{init}", world_size=world, rank=rank, timeout=timeout)
    try:
        for mode in modes:
            if mode == "snapshot":
                snapshot(world, rank, Path(out) / "snapshot.nc").close()
                dist.barrier()
            else:
                die(world, rank, Path(out) / "die.nc")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
