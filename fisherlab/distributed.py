"""The exact Fisher of a global batch spread over several processes (``torch.distributed``).

Each process keeps the per-sample factors of its own rows of the global batch (a
:class:`Shard`). Every quantity that is a sum over samples — KFAC factors, the van Loan
products ``R(F)v`` and ``R(F)ᵀu`` inside power SVD and Lanczos, ``⟨F, F̂⟩``, ``F u`` and ``Jᵀc``
of two-level — is summed locally and all-reduced, so every process holds the same result and
runs the same iterations. Quantities that need all pairs of samples (the Gram matrix, hence
``||F||_F`` and the spectrum, and Woodbury's ``N V``-sided solve) are assembled block by block:
each process computes its rows against one visiting shard at a time, so a process never holds
more than two shards of factors. Works with gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from fisherlab._errors import FisherlabError

__all__ = ["Shard", "all_reduce_sum", "shard_of_batch"]


@dataclass(frozen=True)
class Shard:
    """This process's rows ``[start, start + counts[rank])`` of a global batch of ``sum(counts)`` samples.

    Args:
        counts: Samples held by each rank, in rank order.
        rank: This process's rank in ``group``.
        group: The process group (``None``: the default one).
    """

    counts: tuple[int, ...]
    rank: int
    group: Any = None

    @property
    def world_size(self) -> int:
        """Number of processes sharing the batch."""
        return len(self.counts)

    @property
    def n_total(self) -> int:
        """``N``, the global batch size."""
        return sum(self.counts)

    @property
    def n_local(self) -> int:
        """Samples of this process."""
        return self.counts[self.rank]

    @property
    def start(self) -> int:
        """Global index of this process's first sample."""
        return sum(self.counts[: self.rank])

    def sum(self, t: Tensor) -> Tensor:
        """``Σ_ranks t`` on every rank (a new tensor)."""
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def broadcast(self, t: Tensor | None, src: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Rank ``src``'s tensor ``t`` (of ``shape``) on every rank."""
        buf = (
            t.contiguous()
            if self.rank == src and t is not None
            else torch.empty(shape, dtype=like.dtype, device=like.device)
        )
        dist.broadcast(
            buf, src=dist.get_global_rank(self.group, src) if self.group is not None else src, group=self.group
        )
        return buf

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` stacked in rank order, on every rank; ``t`` has the same number of
        rows per sample on every rank (e.g. ``V`` rows of a Gram matrix per sample)."""
        per_sample = t.shape[0] // self.n_local
        parts = [
            self.broadcast(t if r == self.rank else None, r, (c * per_sample, *t.shape[1:]), t)
            for r, c in enumerate(self.counts)
        ]
        return torch.cat(parts)


def all_reduce_sum(t: Tensor, shard: Shard | None) -> Tensor:
    """``t`` summed over the processes of ``shard`` (``t`` itself without one)."""
    return t if shard is None else shard.sum(t)


def shard_of_batch(n_local: int, device: torch.device | str = "cpu", group: Any = None) -> Shard | None:
    """The :class:`Shard` of this process when ``torch.distributed`` is initialised, else ``None``.

    Collective: every rank of ``group`` must call it (with its own ``n_local``).

    Raises:
        FisherlabError: A rank without samples.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
    sizes = tuple(int(c.item()) for c in counts)
    if min(sizes) < 1:
        raise FisherlabError(f"every rank needs at least one sample of the global batch; got {list(sizes)}")
    return Shard(sizes, dist.get_rank(group), group)
