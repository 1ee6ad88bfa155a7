"""The Lanczos family: Kronecker rank ``k`` by restarted Lanczos bidiagonalization of the
rearranged block ``R(F)`` (K §3.2.2).
"""

from __future__ import annotations

import time

from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.approximations.base import Approximation, _padded, _report, _start, _terms, _usable
from fisherlab.fisher import ExactBlock
from fisherlab.krylov import lanczos_svd
from fisherlab.method_registry import ApproxConfig, MethodContext, MethodSpec
from fisherlab.vocabulary import Method

__all__ = ["LANCZOS", "lanczos"]


def lanczos(
    block: ExactBlock,
    *,
    rank: int = ApproxConfig.lanczos_rank,
    krylov_dim: int = ApproxConfig.krylov_dim,
    tol: float = ApproxConfig.tol,
    max_restarts: int = ApproxConfig.max_restarts,
    warm_start: tuple[Tensor, ...] = (),
    layer: str = "",
) -> Approximation:
    """Kronecker rank ``k`` by restarted Lanczos bidiagonalization of ``R(F)`` (K §3.2.2).

    The top ``rank`` singular triplets ``(σ_k, u_k, v_k)`` give the terms
    ``√σ_k MAT(u_k) ⊗ √σ_k MAT(v_k)``: the best Kronecker-rank-``k`` approximation for a
    Linear layer. For a conv layer (``T > 1``) ``R(F)`` also has singular vectors with
    antisymmetric factors; starting from a symmetric vector the iteration stays among the
    symmetric ones, so the result is the best approximation *with symmetric factors* (an
    antisymmetric⊗antisymmetric pair can do better: 13% of random conv blocks in issue 11).
    The same holds for :func:`deflation` and :func:`kfac_corrected`; the dataset attribute
    ``symmetric_factors`` records it.

    Args:
        block: The exact Fisher block.
        rank: Kronecker rank ``k >= 1``.
        krylov_dim: Krylov dimension per restart cycle (at least ``rank + 2``).
        tol: Relative residual tolerance.
        max_restarts: Cap on restart cycles; reaching it warns.
        warm_start: ``Approximation.warm_start`` of the previous snapshot.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.2.2, App. B.2 (Algorithm 2).
    """
    if rank < 1:
        raise FisherlabError(f"Lanczos rank must be at least 1, got {rank}")
    clock = time.perf_counter()
    start = _start(block, warm_start)
    if len(warm_start) > 1:  # restart direction of K §3.2.2: a combination of singular vectors
        combined = sum(warm_start[1:], start)
        start = combined if _usable(combined) else start
    trip = lanczos_svd(
        block.rearranged_matvec,
        block.rearranged_rmatvec,
        start,
        rank=rank,
        krylov_dim=max(krylov_dim, rank + 2),
        tol=tol,
        max_restarts=max_restarts,
    )
    _report(Method.LANCZOS, trip, layer)
    kron = _terms(_padded(trip, rank))
    return Approximation(
        Method.LANCZOS.value,
        kron,
        trip.iterations,
        trip.converged,
        trip.residual,
        trip.rights,
        time.perf_counter() - clock,
    )


def _build_lanczos(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return lanczos(
        block,
        rank=config.lanczos_rank,
        krylov_dim=config.krylov_dim,
        tol=config.tol,
        max_restarts=config.max_restarts,
        warm_start=context.warm,
        layer=context.layer,
    )


#: Lanczos's registry entry (registered by :mod:`fisherlab.approximations` in the papers' order).
LANCZOS = MethodSpec("lanczos", _build_lanczos, "Lanczos", "lanczos", span_invariant=True)
