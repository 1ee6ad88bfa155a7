"""``shampoo2`` and ``shampoo``: Kronecker products of Shampoo's factors, scaled Frobenius-optimally.

``L = (1/N) Σ_nv DW DWᵀ = R(F) vec(I)`` and ``R = (1/N) Σ_nv DWᵀ DW = R(F)ᵀ vec(I)`` (one product
each with the rearranged block, K Prop. 3.1). ``shampoo2`` is ``c L ⊗ R``, one power-SVD step of
KPSVD from the identity (Morwani et al. 2025); ``shampoo`` is ``c L^{1/2} ⊗ R^{1/2}``, the curvature
that Shampoo's preconditioner ``L^{-1/4} ⊗ R^{-1/4}`` implies. Shampoo has no natural scale:
``c = <F, X ⊗ Y> / (‖X‖² ‖Y‖²)`` minimises ``‖F - c X ⊗ Y‖_F``.

Cost: ``shampoo`` reuses ``shampoo2``'s factors and their eigendecompositions (computed once, shared
with ``eshampoo``; the roots' are kept, so its error 2 needs no eigensolver), and both remember
``<F, F̂> = c² ‖X‖² ‖Y‖²`` from the scale's own product, so error 1 needs none.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from fisherlab.approximations import ApproxConfig, Approximation
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import blas_threads, free_threads
from fisherlab.method_registry import MethodContext, MethodSpec, register
from fisherlab.operators import remember_inner

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


def _best_scaled(block: ExactBlock, x: Tensor, y: Tensor) -> tuple[KronSum, Tensor, Tensor]:
    """``(c X ⊗ Y, a, b)`` with the sum's factors ``a X`` and ``b Y`` (:func:`best_scaled`)."""
    nx, ny = torch.linalg.matrix_norm(x), torch.linalg.matrix_norm(y)
    if not (float(nx) > 0 and float(ny) > 0):
        zero = nx.new_zeros(())
        kron = KronSum((torch.zeros_like(x),), (torch.zeros_like(y),))
        remember_inner(kron, block, zero)
        return kron, zero, zero
    c = torch.sum((x / nx) * block.rearranged_matvec(y / ny)).clamp(min=0)  # <F, X ⊗ Y> >= 0 for PSD X, Y
    root = c.sqrt()
    kron = KronSum((root * (x / nx),), (root * (y / ny),))
    remember_inner(kron, block, c * c)  # <F, c x ⊗ y> = c <F, x ⊗ y> = c² (x, y of unit norm)
    return kron, root / nx, root / ny


def best_scaled(block: ExactBlock, x: Tensor, y: Tensor) -> KronSum:
    """``c X ⊗ Y`` with ``c = <F, X ⊗ Y> / (‖X‖² ‖Y‖²)``, the factors normalised to balance them;
    ``<F, c X ⊗ Y> = c² ‖X‖² ‖Y‖²`` is remembered for ``block`` (:func:`~fisherlab.operators.remember_inner`:
    error 1 without another product with ``R(F)``)."""
    return _best_scaled(block, x, y)[0]


def _psd_root(values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``(√λ, M^{1/2})`` of a PSD matrix ``M = Q diag(λ) Qᵀ`` (``λ`` ascending, as ``eigh`` gives them);
    eigenvalues below ``side · eps · λ_max`` (rounding of a zero one, whose square root would be
    ``√eps``, not 0) are taken as 0, so the roots stay ascending."""
    floor = values.numel() * torch.finfo(values.dtype).eps * float(values.abs().max()) if values.numel() else 0.0
    roots = torch.where(values > floor, values, torch.zeros_like(values)).sqrt()
    return roots, _symmetric((vectors * roots) @ vectors.T)


def shampoo2(block: ExactBlock) -> KronSum:
    """``c L ⊗ R`` (:func:`shampoo_factors`, :func:`best_scaled`)."""
    left, right = shampoo_factors(block)
    return best_scaled(block, left, right)


def shampoo(block: ExactBlock, shampoo2_kron: KronSum | None = None) -> KronSum:
    """``c L^{1/2} ⊗ R^{1/2}`` (:func:`best_scaled`), from ``shampoo2``'s factors ``a L ⊗ b R`` (``a, b > 0``:
    their roots are ``√a L^{1/2}`` and ``√b R^{1/2}``, and ``c`` absorbs the scale) and their
    eigendecompositions (:meth:`~fisherlab.kron.KronSum.factor_eigh`, computed once and shared with
    ``eshampoo``'s basis and ``shampoo2``'s error 2; eigensolver on the free cores). The result keeps
    its own (the roots'), so its error 2 needs no eigensolver.

    Args:
        block: The exact block.
        shampoo2_kron: Its ``shampoo2`` (default: built here).
    """
    first = shampoo2(block) if shampoo2_kron is None else shampoo2_kron
    with blas_threads(free_threads(first.outs[0].device)):
        (e_left, q_left), (e_right, q_right) = first.factor_eigh()
    roots_left, left = _psd_root(e_left, q_left)
    roots_right, right = _psd_root(e_right, q_right)
    kron, a, b = _best_scaled(block, left, right)
    return kron.with_factor_eigh((roots_left * a, q_left), (roots_right * b, q_right))


def _build_shampoo2(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> KronSum:
    return shampoo2(block)


def _build_shampoo(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    """From ``shampoo2``'s factors and their eigendecompositions; its time includes ``shampoo2``'s build."""
    first = context.built["shampoo2"]
    start = time.perf_counter()
    kron = shampoo(block, first.kron)
    return Approximation("shampoo", kron, 0, True, 0.0, seconds=first.seconds + time.perf_counter() - start)


register(MethodSpec("shampoo2", _build_shampoo2, "Shampoo² (c L ⊗ R)", "shampoo", span_invariant=True))
register(MethodSpec("shampoo", _build_shampoo, "Shampoo (c L^½ ⊗ R^½)", "shampoo", ("shampoo2",), span_invariant=True))
