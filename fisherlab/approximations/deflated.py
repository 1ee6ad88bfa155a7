"""The second Kronecker term of a deflated block, shared by deflation (first term: KPSVD, K §3.2.1)
and KFAC-corrected (first term: KFAC, K §3.3): the best Kronecker product of ``F - first``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from fisherlab.approximations.base import Approximation, _report, _start, _terms
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import power_svd
from fisherlab.vocabulary import Method

__all__ = ["DEFLATION_NOISE"]


def _deflated(block: ExactBlock, term: KronSum) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Products with ``R(F - sum_k out_k ⊗ in_k)``: subtract ``<vec in_, y> vec out`` (K §3.2.1)."""

    def mv(y: Tensor) -> Tensor:
        r = block.rearranged_matvec(y)
        for o, i in zip(term.outs, term.ins, strict=True):
            r = r - torch.sum(i * y) * o
        return r

    def rmv(x: Tensor) -> Tensor:
        r = block.rearranged_rmatvec(x)
        for o, i in zip(term.outs, term.ins, strict=True):
            r = r - torch.sum(o * x) * i
        return r

    return mv, rmv


#: Rounding noise of the deflated products ``R(F) y - <in_, y> out``, in units of ``eps ||first term||_F``:
#: a second stage whose residual is below it has converged as far as the arithmetic allows.
DEFLATION_NOISE = 100


def _corrected(
    method: Method,
    block: ExactBlock,
    first: Approximation,
    *,
    tol: float,
    max_iter: int,
    warm_start: tuple[Tensor, ...],
    layer: str,
) -> Approximation:
    """``first`` plus the best Kronecker product of ``F - first`` (power SVD on the deflated products),
    its diagnostics those of both stages; warm-started from ``warm_start[1]``, the input side of the
    previous snapshot's second term."""
    start = time.perf_counter()
    mv, rmv = _deflated(block, first.kron)
    # The residual is relative to the term being computed (σ₂), not to the first term: relative
    # to σ₁ a small correction passed with a poor second term (KFAC-corrected error 1 +29%).
    # Only where σ₂ is at the rounding noise of the deflated products does σ₁ set the scale.
    noise = DEFLATION_NOISE * torch.finfo(block.factors.dtype).eps * float(first.kron.frobenius_norm())
    trip = power_svd(mv, rmv, _start(block, warm_start, 1), tol=tol, max_iter=max_iter, scale=noise / tol)
    _report(method, trip, layer)
    first_start = first.warm_start[:1] or (_start(block, ()),)
    kron = first.kron + _terms(trip)
    return Approximation(
        method.value,
        kron,
        first.iterations + trip.iterations,
        first.converged and trip.converged,
        max(first.residual, trip.residual),
        first_start + trip.rights,
        first.seconds + time.perf_counter() - start,
    )
