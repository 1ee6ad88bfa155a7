"""The KFAC family: KFAC's factors, KFAC (K §2.2; KFC for conv layers) and KFAC-corrected, KFAC plus
the best Kronecker corrector of what it misses (K §3.3; it reuses KFAC).
"""

from __future__ import annotations

import time

from torch import Tensor

from fisherlab.approximations.base import Approximation, _second_moment
from fisherlab.approximations.deflated import _corrected
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import ApproxConfig, MethodContext, MethodSpec
from fisherlab.vocabulary import Method

__all__ = ["KFAC", "KFAC_CORRECTED", "kfac", "kfac_corrected", "kfac_factors"]


def kfac_factors(block: ExactBlock | LayerFactors) -> KronSum:
    """KFAC ``G ⊗ A`` with ``A = (1/N) sum_{n,t} a a^T``, ``G = (1/(N T)) sum_{n,v,t} g g^T``.

    For ``T = 1`` this is ``E[g g^T] ⊗ E[ā ā^T]`` (K eq. 1); for conv layers the KFC
    factors of Grosse & Martens (2016) as written in T eq. (2.27). The sums run in
    ``factors.moment_dtype`` when set (the ``mixed`` accumulation: the model's precision) and
    ``A``, ``G`` are returned in it, as a KFAC optimizer uses them; :func:`kfac` casts them to
    the factors' compute dtype for the metrics.
    """
    factors = block.factors if isinstance(block, ExactBlock) else block
    n, t = factors.n_samples, factors.a.shape[1]
    return KronSum((_second_moment(factors.g, 1 / (n * t), factors),), (_second_moment(factors.a, 1 / n, factors),))


def kfac(block: ExactBlock) -> Approximation:
    """KFAC: ``G ⊗ A`` with ``A = E[ā ā^T]``, ``G = E[g g^T]`` (K eq. 1; KFC for conv), see :func:`kfac_factors`.

    References:
        Martens & Grosse (2015); Grosse & Martens (2016); Koroko et al. (2022), Sec. 2.2.
    """
    start = time.perf_counter()
    kron = kfac_factors(block).to(block.factors.dtype)
    return Approximation(Method.KFAC.value, kron, 0, True, 0.0, seconds=time.perf_counter() - start)


def kfac_corrected(
    block: ExactBlock,
    *,
    tol: float = ApproxConfig.tol,
    max_iter: int = ApproxConfig.max_iter,
    warm_start: tuple[Tensor, ...] = (),
    first: Approximation | None = None,
    layer: str = "",
) -> Approximation:
    """KFAC plus the best Kronecker corrector: ``argmin ||F - G⊗A - Q⊗P||_F`` (K eq. 6).

    References:
        Koroko et al. (2022), Sec. 3.3.
    """
    first = kfac(block) if first is None else first
    return _corrected(
        Method.KFAC_CORRECTED, block, first, tol=tol, max_iter=max_iter, warm_start=warm_start, layer=layer
    )


def _build_kfac(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return kfac(block)


def _build_kfac_corrected(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    first = context.built[Method.KFAC.value]
    return kfac_corrected(
        block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, first=first, layer=context.layer
    )


#: KFAC's registry entry (registered by :mod:`fisherlab.approximations` in the papers' order).
KFAC = MethodSpec("kfac", _build_kfac, "KFAC (expand)", "kfac", span_invariant=True)
#: KFAC-corrected's registry entry: it reuses KFAC as its first term.
KFAC_CORRECTED = MethodSpec(
    "kfac_corrected", _build_kfac_corrected, "KFAC-corrected", "kfac", ("kfac",), span_invariant=True
)
