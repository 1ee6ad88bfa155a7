"""Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), from factors, without dense blocks.

``||F - F̂||² = ||F||² - 2 <F, F̂> + ||F̂||²`` (Gram matrix, K Prop. 3.1 products, and
``||sum out_k ⊗ in_k||² = sum <out_k,out_l><in_k,in_l>``): the expansion cancels when ``F̂ ≈ F``, so
below :data:`FROBENIUS_RECOMPUTE_BELOW` the difference is formed before squaring (the non-cancelling
route, :func:`_frobenius_difference`) within :data:`FROBENIUS_WORK_LIMIT` and
:data:`FROBENIUS_MEMORY_LIMIT`; beyond them the expansion's value is kept with its resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.metrics.reference import BlockReference
from fisherlab.operators import BlockOperator, remembered_inner

__all__ = [
    "FROBENIUS_MEMORY_LIMIT",
    "FROBENIUS_RECOMPUTE_BELOW",
    "FROBENIUS_WORK_LIMIT",
    "FrobeniusError",
    "frobenius_error",
    "frobenius_error_resolved",
    "inner_with_block",
]


def inner_with_block(block: ExactBlock, approx: BlockOperator) -> Tensor:
    """``<F, F̂>_F``: what the builder remembered for this very block (:func:`~fisherlab.operators.remember_inner`:
    ``||s||²`` for the diagonal of ``F`` in a basis, ``Σ λ²`` for eigenpairs of ``F``, ``c²`` for a
    Frobenius-optimal scale), else the closed form for a Kronecker sum (K Prop. 3.1 products), else the
    generic matrix-free route ``(1/N) Σ <DW, F̂ DW>`` (:meth:`~fisherlab.fisher.ExactBlock.inner_operator`)."""
    known = remembered_inner(approx, block)
    if known is not None:
        return known.to(block.factors.dtype)
    if isinstance(approx, KronSum):
        return block.inner(approx)
    return block.inner_operator(approx).to(block.factors.dtype)


#: Error 1 below this (in float64; times ``sqrt(eps / eps_float64)`` in other precisions, so always
#: in float32) is recomputed by a route that forms the difference ``F - F̂`` before squaring
#: (:func:`frobenius_error_resolved`): there the expansion's rounding, about ``eps ||F||²`` in
#: ``||F - F̂||²``, exceeds 1e-8 of the value (KFAC on a layer where it is exact gave 1.9e-8 for 1e-16).
FROBENIUS_RECOMPUTE_BELOW = 1e-3

#: Floating-point operations and bytes the non-cancelling route of error 1 may spend; beyond, the
#: expansion's value is stored with its resolution (``frobenius_error_resolution``).
FROBENIUS_WORK_LIMIT = 5e9
FROBENIUS_MEMORY_LIMIT = 2**28

#: The expansion's rounding error, in units of ``eps (||F||² + 2 |<F, F̂>| + ||F̂||²)`` times the square
#: root of the longest sum behind it (sums of ``n`` rounded terms err like ``sqrt(n) eps``).
_EXPANSION_ROUNDING = 8


@dataclass(frozen=True)
class FrobeniusError:
    """Error 1 and its resolution: ``|value - exact| <= resolution`` (to rounding).

    Args:
        value: Error 1.
        resolution: 0 when ``F - F̂`` was formed before squaring (rounding of order ``eps``);
            else the rounding of the expansion ``||F||² - 2 <F, F̂> + ||F̂||²``, which cancels
            when ``F̂ ≈ F``.
    """

    value: float
    resolution: float


def frobenius_error_resolved(ref: BlockReference, approx: BlockOperator) -> FrobeniusError:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), resolved down to the float64 floor where affordable.

    First by the expansion ``||F||² - 2 <F, F̂> + ||F̂||²`` from factors only (Gram matrix, K Prop.
    3.1 products); it cancels when ``F̂ ≈ F`` and resolves only ``sqrt(eps)`` relative. Below
    :data:`FROBENIUS_RECOMPUTE_BELOW` the difference is formed before squaring
    (:func:`_frobenius_difference`: the rearranged difference ``R(F) - R(F̂) = P Qᵀ`` through a QR
    of its smaller side, or dense for a small conv block), within :data:`FROBENIUS_WORK_LIMIT`
    and :data:`FROBENIUS_MEMORY_LIMIT`; beyond them the expansion's value is kept with its
    resolution. ``nan`` when ``F = 0``.
    """
    norm_squared = float(ref.norm_squared)
    inner = _inner(ref, approx)
    approx_squared = float(approx.frobenius_norm_squared())
    sq = norm_squared - 2 * inner + approx_squared
    value = math.sqrt(max(sq, 0.0) / norm_squared) if norm_squared > 0 else math.nan
    if not (norm_squared > 0 and math.isfinite(value)):
        return FrobeniusError(value, math.nan)
    f = ref.block.factors
    eps = torch.finfo(f.dtype).eps
    if value < FROBENIUS_RECOMPUTE_BELOW * math.sqrt(eps / torch.finfo(torch.float64).eps):
        exact = _frobenius_difference(ref.block, approx)
        if exact is not None:
            return FrobeniusError(exact / math.sqrt(norm_squared), 0.0)
    longest = max(f.d_in * f.n_positions, f.d_out, f.n_samples * f.n_directions)
    delta = _EXPANSION_ROUNDING * math.sqrt(longest) * eps * (norm_squared + 2 * abs(inner) + approx_squared)
    low, high = math.sqrt(max(sq - delta, 0.0) / norm_squared), math.sqrt(max(sq + delta, 0.0) / norm_squared)
    return FrobeniusError(value, max(high - value, value - low))


def frobenius_error(ref: BlockReference, approx: BlockOperator) -> Tensor:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), from factors (:func:`frobenius_error_resolved`).

    Returns 0-d tensor; ``nan`` when ``F = 0``.
    """
    like = ref.norm_squared
    return torch.tensor(_frobenius(ref, approx).value, dtype=like.dtype, device=like.device)


def _inner(ref: BlockReference, approx: BlockOperator) -> float:
    """``<F, F̂>_F`` (:func:`inner_with_block`), computed once per (reference, approximation): error 1 and the
    scale-free error (:mod:`fisherlab.metrics.usage`) share it."""
    key = ("inner", id(approx))
    if key not in ref.cache:
        ref.cache[key] = (approx, float(inner_with_block(ref.block, approx)))  # approx kept alive: its id stays unique
    return ref.cache[key][1]


def _frobenius(ref: BlockReference, approx: BlockOperator) -> FrobeniusError:
    """:func:`frobenius_error_resolved`, computed once per (reference, approximation)."""
    key = ("frobenius_error", id(approx))
    if key not in ref.cache:
        ref.cache[key] = (approx, frobenius_error_resolved(ref, approx))  # approx kept alive: its id stays unique
    return ref.cache[key][1]


def _upper(side: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column indices of the upper triangle of a ``side``-square matrix, and the weights
    (1 on the diagonal, √2 off it) that make Frobenius inner products of symmetric matrices dot
    products of their weighted upper triangles."""
    rows, cols = torch.triu_indices(side, side, device=like.device)
    weight = torch.full(rows.shape, math.sqrt(2.0), dtype=like.dtype, device=like.device)  # √2 in like's precision
    weight[rows == cols] = 1.0
    return rows, cols, weight


def _frobenius_difference(block: ExactBlock, approx: BlockOperator) -> float | None:
    """``||F - F̂||_F`` with the difference formed before squaring (error ``O(eps ||F||)``), or
    ``None`` where that costs more than the limits allow. Sharded: every process gathers the whole
    batch (within the limits) and computes the same value.

    Linear layers (``T = 1``, symmetric factors): ``R(F) - R(F̂) = P Qᵀ`` with the columns
    ``vec(g gᵀ) / √N``, ``vec(out_k)`` of ``P`` and ``vec(a aᵀ) / √N``, ``-vec(in_k)`` of ``Q``,
    upper triangles only (:func:`_upper`); with ``Q = U R`` (Householder QR of the smaller
    side), ``||P Qᵀ||_F = ||P Rᵀ||_F``. Conv layers: the dense block, when small.
    """
    f = block.factors
    itemsize, rows = f.a.element_size(), f.n_samples * f.n_directions
    kron = approx if isinstance(approx, KronSum) else None
    rank = 0 if kron is None else kron.rank
    linear = kron is not None and f.n_positions == 1 and all(torch.equal(m, m.T) for m in kron.outs + kron.ins)
    if kron is not None and linear:
        m = rows + rank
        s_out, s_in = f.d_out * (f.d_out + 1) // 2, f.d_in * (f.d_in + 1) // 2
        small, large = sorted((s_out, s_in))
        flops = 2 * small * m * m + 2 * large * m * min(small, m)
        memory = (small + large) * m * itemsize
    else:
        flops = 2 * (rows + rank) * f.dim * f.dim
        memory = (2 * f.dim + rows) * f.dim * itemsize
    if flops > FROBENIUS_WORK_LIMIT or memory > FROBENIUS_MEMORY_LIMIT:
        return None
    if f.shard is not None and f.shard.world_size > 1:  # the same decision on every process: the same inputs
        f = LayerFactors(f.shard.gather_rows(f.a), f.shard.gather_rows(f.g))
        block = ExactBlock(f)
    if kron is not None and linear:
        scale = f.n_samples**-0.5
        g = f.g[:, :, 0].reshape(-1, f.d_out)
        a = f.a[:, 0].repeat_interleave(f.n_directions, 0)
        ro, co, wo = _upper(f.d_out, g)
        ri, ci, wi = _upper(f.d_in, a)
        p = torch.cat([g[:, ro] * g[:, co] * (wo * scale), torch.stack([o[ro, co] for o in kron.outs]) * wo])
        q = torch.cat([a[:, ri] * a[:, ci] * (wi * scale), -torch.stack([i[ri, ci] for i in kron.ins]) * wi])
        if s_in > s_out:
            p, q = q, p  # p: the larger side
        if q.shape[1] >= m:
            q = torch.linalg.qr(q.T, mode="r").R  # Qᵀ = U R: ||P Qᵀ|| = ||P Rᵀ||
            return float(torch.linalg.matrix_norm(p.T @ q.T))
        return float(torch.linalg.matrix_norm(p.T @ q))
    return float(torch.linalg.matrix_norm(block.as_dense() - approx.as_dense().to(f.dtype)))
