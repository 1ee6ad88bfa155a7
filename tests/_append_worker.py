"""Appends snapshots (values = iteration, with stored factors) to argv[1] until killed; prints each
iteration once its append has returned. Used by tests/test_store.py."""

import sys

import numpy as np
import torch

from fisherlab.results import ResultsWriter, snapshot_dataset


def snapshot(it: int):
    per_method = {"frobenius_error": np.full((2, 3), float(it)), "converged": np.ones((2, 3), dtype=np.int8)}
    return snapshot_dataset(it, ["1", "5"], ["kfac", "kpsvd", "lanczos"], per_method, {}, {"train_loss": float(it)})


def factors(it: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(it)
    return torch.randn(64, 1, 40, generator=gen, dtype=torch.float64), torch.full((64, 1, 1, 30), float(it))


if __name__ == "__main__":
    writer = ResultsWriter(sys.argv[1], {"title": "kill test"})
    for it in range(10**6):
        writer.append(snapshot(it), factors={"5": factors(it)})
        print(it, flush=True)
