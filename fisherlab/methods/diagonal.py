"""``diagonal``: the diagonal of the exact block, ``diag(F)_{oi} = (1/N) Σ_nv (DW_nv)_{oi}²``.

Not span invariant: the diagonal of the block restricted to the sample span, lifted back, is
not the diagonal of the block, so it is built on the whole block (``O(d_out d_in)`` memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.approximations import ApproxConfig
from fisherlab.block_operators import DiagonalBlockOperator
from fisherlab.distributed import all_reduce_sum
from fisherlab.fisher import PER_SAMPLE_GRADIENT_LIMIT, ExactBlock
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import MethodContext, MethodSpec, register
from fisherlab.operators import remember_inner
from fisherlab.vocabulary import BlockStructure

__all__ = ["diagonal", "diagonal_of", "trace_of"]

#: Per-weight curvatures make sense on every block, LayerNorm's and RMSNorm's elementwise ones included.
_BOTH = (BlockStructure.KRONECKER.value, BlockStructure.ELEMENTWISE.value)


def diagonal_of(factors: LayerFactors) -> Tensor:
    """``(1/N) Σ_nv DW_nv ∘ DW_nv`` as ``[d_out, d_in]``, without forming ``F``.

    ``T = 1``: ``(1/N) Σ_n (Σ_v g_nv²) (a_n²)ᵀ``, one GEMM. Shared layers: the per-sample
    gradients ``DW_nv = Σ_t g_nvt a_ntᵀ`` chunk by chunk of samples (at most
    :data:`~fisherlab.fisher.PER_SAMPLE_GRADIENT_LIMIT` elements at a time). Sharded: summed over processes.
    """
    a, g = factors.a, factors.g
    if factors.n_positions == 1:
        local = (g[:, :, 0] ** 2).sum(1).T @ (a[:, 0] ** 2)
    else:
        local = a.new_zeros(factors.d_out, factors.d_in)
        chunk = max(1, PER_SAMPLE_GRADIENT_LIMIT // (factors.n_directions * factors.dim))
        for start in range(0, factors.n_local, chunk):
            dw = torch.einsum("nvto,nti->nvoi", g[start : start + chunk], a[start : start + chunk])
            local = local + (dw**2).sum((0, 1))
    return all_reduce_sum(local, factors.shard) / factors.n_samples


def trace_of(factors: LayerFactors) -> Tensor:
    """``tr F = (1/N) Σ_nv ‖DW_nv‖²``: the sum of :func:`diagonal_of`."""
    return diagonal_of(factors).sum()


def diagonal(block: ExactBlock) -> DiagonalBlockOperator:
    """``diag(F)`` as a :class:`~fisherlab.block_operators.DiagonalBlockOperator` (its eigenvalues are its
    entries); ``<F, diag(d)> = Σ d ∘ diag(F) = ||d||²`` is remembered for ``block``
    (:func:`~fisherlab.operators.remember_inner`: error 1 without a pass over the samples)."""
    operator = DiagonalBlockOperator(diagonal_of(block.factors))
    remember_inner(operator, block, operator.frobenius_norm_squared())
    return operator


def _build(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> DiagonalBlockOperator:
    return diagonal(block)


register(MethodSpec("diagonal", _build, "diagonal", "diagonal", span_invariant=False, structures=_BOTH))
