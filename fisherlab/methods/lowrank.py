"""``lowrank``: the best rank-``k`` approximation of the exact block, its top-``k`` eigenpairs.

``F = JᵀJ / N`` with ``J [N V, d_out d_in]`` the per-sample gradients, so the nonzero eigenpairs
of ``F`` come from the Gram matrix ``K = J Jᵀ``: ``K v = N λ v`` gives ``F u = λ u`` with
``u = Jᵀ v / √(N λ)`` (unit norm, since ``‖Jᵀ v‖² = vᵀ K v = N λ``). ``Jᵀ v = Σ_nv v_nv DW_nv`` is
formed from the factors (``Σ_t (Σ_v v_nv g_nvt) a_ntᵀ``), never ``J`` nor ``F``. The baseline that
every structured method should be compared with: by Eckart–Young no rank-``k`` operator has a
smaller error 1, which equals its error 2. ``k`` is :attr:`ApproxConfig.lowrank_rank` (default 10).
"""

from __future__ import annotations

import torch

from fisherlab.approximations import ApproxConfig
from fisherlab.block_operators import LowRankOperator
from fisherlab.distributed import all_reduce_sum
from fisherlab.fisher import ExactBlock
from fisherlab.krylov import blas_threads, free_threads
from fisherlab.method_registry import MethodContext, MethodSpec, register
from fisherlab.operators import remember_inner
from fisherlab.vocabulary import BlockStructure

__all__ = ["lowrank"]


def lowrank(block: ExactBlock, rank: int = 10) -> LowRankOperator:
    """The top ``rank`` eigenpairs of ``F`` as ``U diag(λ) Uᵀ`` (fewer where ``F`` has fewer nonzero ones).

    Eigenvalues of ``K / N`` below ``N V · eps · λ_max`` count as zero (rounding of the Gram matrix).
    Sharded: the Gram matrix is the whole batch's on every process, ``Jᵀ v`` is summed over processes.
    ``<F, U diag(λ) Uᵀ> = Σ λ_i u_iᵀ F u_i = ||λ||²`` is remembered for ``block``
    (:func:`~fisherlab.operators.remember_inner`: error 1 without a pass over the samples).
    """
    f = block.factors
    n, v = f.n_samples, f.n_directions
    gram = block.gram() / n
    with blas_threads(free_threads(gram.device)):  # LAPACK on the free cores
        values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    values, order = torch.sort(values, descending=True)
    floor = gram.shape[0] * torch.finfo(values.dtype).eps * float(values[0].clamp(min=0))
    keep = int(torch.sum(values[: min(rank, values.numel())] > floor))
    values, vectors = values[:keep], vectors[:, order[:keep]]
    coefficients = (vectors / torch.sqrt(n * values)).T.reshape(keep, n, v)  # v_i / √(N λ_i), [k, N, V]
    if f.shard is not None:
        coefficients = coefficients[:, f.shard.start : f.shard.start + f.n_local]
    cg = torch.einsum("knv,nvto->knto", coefficients, f.g)  # Σ_v c_nv g_nvt
    local = cg.reshape(keep, f.n_local * f.n_positions, f.d_out).transpose(1, 2) @ f.a.reshape(
        -1, f.d_in
    )  # Σ_nt (Σ_v c g) aᵀ
    operator = LowRankOperator(all_reduce_sum(local, f.shard), values)
    remember_inner(operator, block, operator.frobenius_norm_squared())
    return operator


def _build(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> LowRankOperator:
    return lowrank(block, config.lowrank_rank)


register(
    MethodSpec(
        "lowrank",
        _build,
        "low rank (top-k eigenpairs)",
        "lowrank",
        span_invariant=True,
        structures=(BlockStructure.KRONECKER.value, BlockStructure.ELEMENTWISE.value),  # any block
    )
)
