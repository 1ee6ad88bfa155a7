"""Appends snapshots (values = iteration, with stored factors) to a file until killed, reporting each
iteration once its append has returned: :func:`append_until_killed` (tests/test_store.py forks a
process that runs it), or ``python -m tests._append_worker FILE`` (prints the iterations)."""

import os
import sys
from collections.abc import Callable

import numpy as np
import torch

from fisherlab.results import ResultsWriter, snapshot_dataset


def snapshot(it: int):
    per_method = {"frobenius_error": np.full((2, 3), float(it)), "converged": np.ones((2, 3), dtype=np.int8)}
    return snapshot_dataset(it, ["1", "5"], ["kfac", "kpsvd", "lanczos"], per_method, {}, {"train_loss": float(it)})


def factors(it: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(it)
    return torch.randn(64, 1, 40, generator=gen, dtype=torch.float64), torch.full((64, 1, 1, 30), float(it))


def append_until_killed(path: str | os.PathLike, report: Callable[[int], None]) -> None:
    """Append snapshot after snapshot to ``path`` as fast as possible; ``report(it)`` after each."""
    writer = ResultsWriter(path, {"title": "kill test"})
    for it in range(10**6):
        writer.append(snapshot(it), factors={"5": factors(it)})
        report(it)


if __name__ == "__main__":
    append_until_killed(sys.argv[1], lambda it: print(it, flush=True))
