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

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from fisherlab._errors import FisherlabError

__all__ = ["Shard", "all_reduce_sum", "init_from_environment", "local_rows", "shard_of_batch", "split_global_batch"]


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


def local_rows(x: Tensor, shard: Shard | None) -> Tensor:
    """This process's rows of the global batch ``x`` (all of it without ``shard``)."""
    return x if shard is None else x[shard.start : shard.start + shard.n_local]


def split_global_batch(n: int) -> Shard:
    """This process's contiguous rows of a global batch of ``n`` (as ``torch.tensor_split``),
    known on every rank without communication."""
    world = dist.get_world_size()
    return Shard(tuple(n // world + (1 if r < n % world else 0) for r in range(world)), dist.get_rank())


def init_from_environment(backend: str, timeout: timedelta, settings: str = "") -> None:
    """Join the process group that ``torchrun`` (or ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) describes, after a handshake that fails fast.

    Every rank posts its world size and ``settings`` (e.g. the run's configuration as JSON) in
    the rendezvous store; each compares with rank 0's. A rank that disagrees, or a rank 0 that
    does not hear from every rank within ``timeout``, stops every rank that is there with one
    :class:`FisherlabError` line, instead of a collective that waits out its timeout and ends in
    backend tracebacks.

    Raises:
        FisherlabError: Missing or bad environment variables, different world sizes or
            settings, or a rank that never joined.
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise FisherlabError(
            f"torch.distributed needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (launch with torchrun): {e}"
        ) from None
    if not 0 <= rank < world:
        raise FisherlabError(f"RANK must lie in 0..WORLD_SIZE-1, got RANK={rank}, WORLD_SIZE={world}")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent hosts the store
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store: Any = dist.PrefixStore(f"/worker/attempt_{attempt}", dist.TCPStore(host, port, None, False, timeout))
    else:  # rank 0 hosts it, without waiting for a world size that the ranks may not agree on
        store = dist.TCPStore(host, port, None, rank == 0, timeout, wait_for_workers=False, multi_tenant=True)
    _handshake(store, rank, world, settings, timeout.total_seconds())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _handshake(store: Any, rank: int, world: int, settings: str, timeout: float) -> None:
    """Compare every rank's world size and settings with rank 0's (see :func:`init_from_environment`)."""
    store.set(f"fisherlab/hello/{rank}", json.dumps({"world_size": world, "settings": settings}))
    if rank != 0:
        first = json.loads(store.get("fisherlab/hello/0"))
        problem = _disagreement(first, world, settings, rank)
        if problem:
            store.set("fisherlab/abort", problem)
            raise FisherlabError(problem)
        verdict = store.get("fisherlab/verdict").decode()  # rank 0's, once it heard every rank
        if verdict != "ok":
            raise FisherlabError(verdict)
        return
    deadline = time.monotonic() + 0.9 * timeout  # say why before the other ranks' own waits end
    keys = [f"fisherlab/hello/{r}" for r in range(1, world)]
    while True:
        if store.check(["fisherlab/abort"]):
            problem = store.get("fisherlab/abort").decode()
            break
        if store.check(keys):  # every rank is there: rank 0 compares each with itself
            hellos = [json.loads(store.get(k)) for k in keys]
            mine = {"world_size": world, "settings": settings}
            problems = (_disagreement(mine, h["world_size"], h["settings"], r) for r, h in enumerate(hellos, 1))
            problem = next((p for p in problems if p), "")
            break
        if time.monotonic() > deadline:
            missing = [r for r, k in enumerate(keys, 1) if not store.check([k])]
            problem = (
                f"ranks {missing} of WORLD_SIZE={world} did not join within {timeout:.0f} s "
                "(FISHERLAB_DIST_TIMEOUT); check that every process was started with the same world size"
            )
            break
        time.sleep(0.02)
    store.set("fisherlab/verdict", problem or "ok")
    if problem:
        raise FisherlabError(problem)


def _disagreement(first: dict[str, Any], world: int, settings: str, rank: int) -> str:
    """Why rank ``rank`` cannot run with rank 0 (its ``first`` hello), or ``""``."""
    if first["world_size"] != world:
        return (
            f"rank {rank} was started with WORLD_SIZE={world} but rank 0 with WORLD_SIZE={first['world_size']}; "
            "start every process with the same world size (torchrun --nproc-per-node)"
        )
    if first["settings"] != settings:
        return f"rank {rank} was started with other settings than rank 0; give every process the same options"
    return ""
