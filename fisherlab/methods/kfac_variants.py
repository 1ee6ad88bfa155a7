"""Variants of KFAC: ``tkfac`` (trace-scaled) and ``kfac_reduce`` (for layers shared over positions).

Today's ``kfac`` is KFAC-expand (Eschenhagen et al. 2023): ``A = (1/N) Σ_nt a aᵀ``,
``G = (1/(N T)) Σ_nvt g gᵀ``, exact for a linear layer shared over positions with a loss per
position. KFAC-reduce averages the inputs and sums the output derivatives over the positions
before the outer products, exact where the outputs are averaged over positions before the loss.
"""

from __future__ import annotations

import time

from fisherlab.approximations import ApproxConfig, Approximation, kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import MethodContext, MethodSpec, register
from fisherlab.methods.diagonal import trace_of

__all__ = ["kfac_reduce", "reduced_factors", "tkfac"]


def tkfac(block: ExactBlock, kfac: KronSum) -> KronSum:
    """TKFAC (Gao et al. 2021): ``G ⊗ A`` scaled by ``tr F / (tr G tr A)``, so that its trace is ``F``'s
    (:meth:`~fisherlab.kron.KronSum.scaled`: its factor eigenvalues are KFAC's, computed once for both).

    Args:
        block: The exact block.
        kfac: Its KFAC ``G ⊗ A`` (one term).
    """
    out, in_ = kfac.outs[0], kfac.ins[0]
    denominator = out.trace() * in_.trace()
    scale = trace_of(block.factors) / denominator if float(denominator) > 0 else denominator * 0
    return kfac.scaled(scale)


def reduced_factors(factors: LayerFactors) -> LayerFactors:
    """``ā_n = (1/T) Σ_t a_nt`` and ``ĝ_nv = Σ_t g_nvt`` as factors of one position (``T = 1``)."""
    return LayerFactors(
        factors.a.mean(1, keepdim=True), factors.g.sum(2, keepdim=True), factors.shard, None, factors.moment_dtype
    )


def kfac_reduce(block: ExactBlock) -> KronSum:
    """KFAC-reduce (Eschenhagen et al., NeurIPS 2023): ``Ĝ ⊗ Â`` with ``Â = (1/N) Σ_n ā āᵀ`` and
    ``Ĝ = (1/N) Σ_nv ĝ ĝᵀ`` (:func:`reduced_factors`); equal to KFAC when ``T = 1``.

    Exact when every ``DW_nv = ĝ_nv ā_nᵀ`` and ``ĝ`` is independent of ``ā`` as KFAC assumes, e.g. a
    linear layer shared over positions whose outputs are averaged before an MSE loss.
    """
    return kfac_factors(reduced_factors(block.factors)).to(block.factors.dtype)


def _build_tkfac(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    first = context.built["kfac"]
    start = time.perf_counter()
    kron = tkfac(block, first.kron)
    return Approximation("tkfac", kron, 0, True, 0.0, seconds=first.seconds + time.perf_counter() - start)


def _build_kfac_reduce(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> KronSum:
    return kfac_reduce(block)


register(MethodSpec("tkfac", _build_tkfac, "TKFAC (trace-scaled KFAC)", "kfac", ("kfac",), span_invariant=True))
register(MethodSpec("kfac_reduce", _build_kfac_reduce, "KFAC (reduce)", "kfac", span_invariant=True))
