"""``shampoo2`` and ``shampoo``: Kronecker products of Shampoo's factors, scaled Frobenius-optimally.

``L = (1/N) Σ_nv DW DWᵀ = R(F) vec(I)`` and ``R = (1/N) Σ_nv DWᵀ DW = R(F)ᵀ vec(I)`` (one product
each with the rearranged block, K Prop. 3.1). ``shampoo2`` is ``c L ⊗ R``, one power-SVD step of
KPSVD from the identity (Morwani et al. 2025); ``shampoo`` is ``c L^{1/2} ⊗ R^{1/2}``, the curvature
that Shampoo's preconditioner ``L^{-1/4} ⊗ R^{-1/4}`` implies. Shampoo has no natural scale:
``c = <F, X ⊗ Y> / (‖X‖² ‖Y‖²)`` minimises ``‖F - c X ⊗ Y‖_F``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.approximations import ApproxConfig
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.method_registry import MethodContext, MethodSpec, register

__all__ = ["best_scaled", "shampoo", "shampoo2", "shampoo_factors"]


def _symmetric(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def shampoo_factors(block: ExactBlock) -> tuple[Tensor, Tensor]:
    """``(L, R)``: ``L = (1/N) Σ DW DWᵀ`` ``[d_out, d_out]`` and ``R = (1/N) Σ DWᵀ DW`` ``[d_in, d_in]``
    (summed over processes)."""
    like = block.factors.a
    eye_in = torch.eye(block.d_in, dtype=like.dtype, device=like.device)
    eye_out = torch.eye(block.d_out, dtype=like.dtype, device=like.device)
    return _symmetric(block.rearranged_matvec(eye_in)), _symmetric(block.rearranged_rmatvec(eye_out))


def best_scaled(block: ExactBlock, x: Tensor, y: Tensor) -> KronSum:
    """``c X ⊗ Y`` with ``c = <F, X ⊗ Y> / (‖X‖² ‖Y‖²)``, the factors normalised to balance them."""
    nx, ny = torch.linalg.matrix_norm(x), torch.linalg.matrix_norm(y)
    if not (float(nx) > 0 and float(ny) > 0):
        return KronSum((torch.zeros_like(x),), (torch.zeros_like(y),))
    x, y = x / nx, y / ny
    c = torch.sum(x * block.rearranged_matvec(y)).clamp(min=0)  # <F, X ⊗ Y> >= 0 for PSD X, Y
    root = c.sqrt()
    return KronSum((root * x,), (root * y,))


def _psd_sqrt(m: Tensor) -> Tensor:
    """``M^{1/2}`` of a PSD matrix; eigenvalues below ``side · eps · λ_max`` (rounding of a zero one,
    whose square root would be ``√eps``, not 0) are taken as 0."""
    values, vectors = torch.linalg.eigh(_symmetric(m))
    floor = m.shape[0] * torch.finfo(values.dtype).eps * float(values.abs().max()) if values.numel() else 0.0
    roots = torch.where(values > floor, values, torch.zeros_like(values)).sqrt()
    return _symmetric((vectors * roots) @ vectors.T)


def shampoo2(block: ExactBlock) -> KronSum:
    """``c L ⊗ R`` (:func:`shampoo_factors`, :func:`best_scaled`)."""
    left, right = shampoo_factors(block)
    return best_scaled(block, left, right)


def shampoo(block: ExactBlock) -> KronSum:
    """``c L^{1/2} ⊗ R^{1/2}`` (:func:`shampoo_factors`, :func:`best_scaled`)."""
    left, right = shampoo_factors(block)
    return best_scaled(block, _psd_sqrt(left), _psd_sqrt(right))


def _build_shampoo2(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> KronSum:
    return shampoo2(block)


def _build_shampoo(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> KronSum:
    return shampoo(block)


register(MethodSpec("shampoo2", _build_shampoo2, "Shampoo² (c L ⊗ R)", "shampoo", span_invariant=True))
register(MethodSpec("shampoo", _build_shampoo, "Shampoo (c L^½ ⊗ R^½)", "shampoo", span_invariant=True))
