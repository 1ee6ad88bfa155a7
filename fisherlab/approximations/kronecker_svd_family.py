"""The Kronecker-SVD family: KPSVD, the best single Kronecker product (K §3.1), and deflation,
Kronecker rank 2 by a second KPSVD of what the first misses (K §3.2.1; it reuses KPSVD).
"""

from __future__ import annotations

import time

from torch import Tensor

from fisherlab.approximations.base import Approximation, _report, _start, _terms
from fisherlab.approximations.deflated import _corrected
from fisherlab.fisher import ExactBlock
from fisherlab.krylov import power_svd
from fisherlab.method_registry import ApproxConfig, MethodContext, MethodSpec
from fisherlab.vocabulary import Method

__all__ = ["DEFLATION", "KPSVD", "deflation", "kpsvd"]


def kpsvd(
    block: ExactBlock,
    *,
    tol: float = ApproxConfig.tol,
    max_iter: int = ApproxConfig.max_iter,
    warm_start: tuple[Tensor, ...] = (),
    layer: str = "",
) -> Approximation:
    """Best single Kronecker product: ``argmin ||F - G ⊗ A||_F`` (K eq. 3).

    Power SVD (K Alg. 1) on the rearranged block ``R(F)`` with the matrix-free products of
    K Prop. 3.1; ``F`` is never formed. The factors are symmetric and, with the sign chosen
    so that ``tr(A) >= 0``, positive semidefinite (K Prop. 3.2).

    Args:
        block: The exact Fisher block.
        tol: Relative residual tolerance of the power SVD (K: ``ε = 1e-6``).
        max_iter: Iteration cap; reaching it warns with :class:`ConvergenceWarning`.
        warm_start: ``Approximation.warm_start`` of the previous snapshot.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.1, Thm. 3.1, Prop. 3.1-3.2, App. B.1.
    """
    start = time.perf_counter()
    trip = power_svd(
        block.rearranged_matvec, block.rearranged_rmatvec, _start(block, warm_start), tol=tol, max_iter=max_iter
    )
    _report(Method.KPSVD, trip, layer)
    kron = _terms(trip)
    return Approximation(
        Method.KPSVD.value,
        kron,
        trip.iterations,
        trip.converged,
        trip.residual,
        trip.rights,
        time.perf_counter() - start,
    )


def deflation(
    block: ExactBlock,
    *,
    tol: float = ApproxConfig.tol,
    max_iter: int = ApproxConfig.max_iter,
    warm_start: tuple[Tensor, ...] = (),
    first: Approximation | None = None,
    layer: str = "",
) -> Approximation:
    """Kronecker rank 2 by deflation: KPSVD, then KPSVD of ``F - R ⊗ S`` (K §3.2.1).

    Best Kronecker rank 2 with symmetric factors (for conv layers an antisymmetric pair can
    do better; see :func:`lanczos`).

    Args:
        block: The exact Fisher block.
        tol: Relative residual tolerance of both power SVDs.
        max_iter: Iteration cap of each power SVD.
        warm_start: ``Approximation.warm_start`` of the previous snapshot's deflation.
        first: An already computed :func:`kpsvd` of the same block, reused as first term.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.2.1.
    """
    if first is None:
        first = kpsvd(block, tol=tol, max_iter=max_iter, warm_start=warm_start[:1], layer=layer)
    return _corrected(Method.DEFLATION, block, first, tol=tol, max_iter=max_iter, warm_start=warm_start, layer=layer)


def _build_kpsvd(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return kpsvd(block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, layer=context.layer)


def _build_deflation(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    first = context.built[Method.KPSVD.value]
    return deflation(
        block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, first=first, layer=context.layer
    )


#: KPSVD's registry entry (registered by :mod:`fisherlab.approximations` in the papers' order).
KPSVD = MethodSpec("kpsvd", _build_kpsvd, "KPSVD", "kronecker_svd", span_invariant=True)
#: Deflation's registry entry: it reuses KPSVD as its first term.
DEFLATION = MethodSpec("deflation", _build_deflation, "deflation", "kronecker_svd", ("kpsvd",), span_invariant=True)
