"""``ekfac`` and ``eshampoo``: the diagonal of ``F`` in a Kronecker eigenbasis ``Q_out ⊗ Q_in``.

``s_ij = (1/N) Σ_nv (Q_outᵀ DW_nv Q_in)_ij²`` is the diagonal of ``F`` in that basis, the
Frobenius-optimal operator diagonal there; with ``Q_outᵀ DW Q_in = Σ_t (Q_outᵀ g)(Q_inᵀ a)ᵀ`` it is
:func:`~fisherlab.methods.diagonal.diagonal_of` of the rotated factors. EKFAC (George et al. 2018)
takes KFAC's eigenbasis, so its error 1 never exceeds KFAC's; eshampoo takes the eigenbasis of
Shampoo's ``L`` and ``R`` (SOAP's basis), so its error 1 never exceeds ``shampoo``'s or ``shampoo2``'s.

Span invariant: inside the sample span the eigenvectors are those of the restricted factors, and
the directions outside it get ``s = 0`` on the whole block too.

Cost: the basis is the reused method's :meth:`~fisherlab.kron.KronSum.factor_eigh`, computed once
and shared (with KFAC's error 2, with Shampoo's roots), with the eigensolver on the free cores
(:func:`~fisherlab.krylov.free_threads`); ``<F, F̂> = Σ s ∘ diag(Qᵀ F Q) = ||s||²`` is remembered
(:func:`~fisherlab.operators.remember_inner`), so error 1 needs no pass over the samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from fisherlab.approximations import ApproxConfig, Approximation
from fisherlab.block_operators import EigenbasisDiagonal
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import blas_threads, free_threads
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import MethodContext, MethodSpec, register
from fisherlab.methods.diagonal import diagonal_of
from fisherlab.operators import remember_inner

__all__ = ["eigenbasis_diagonal", "ekfac", "eshampoo"]


def eigenbasis_diagonal(block: ExactBlock, q_out: Tensor, q_in: Tensor) -> EigenbasisDiagonal:
    """``(Q_out ⊗ Q_in) diag(s) (Q_out ⊗ Q_in)ᵀ`` with ``s`` the diagonal of ``F`` in that basis;
    ``<F, F̂> = ||s||²`` is remembered for ``block`` (:func:`~fisherlab.operators.remember_inner`).

    Args:
        block: The exact block.
        q_out: Orthogonal ``[d_out, d_out]``.
        q_in: Orthogonal ``[d_in, d_in]``.
    """
    f = block.factors
    rotated = LayerFactors(f.a @ q_in.to(f.a.dtype), f.g @ q_out.to(f.g.dtype), f.shard)
    operator = EigenbasisDiagonal(q_out, q_in, diagonal_of(rotated))
    remember_inner(operator, block, operator.frobenius_norm_squared())
    return operator


def _in_eigenbasis_of(block: ExactBlock, kron: KronSum) -> EigenbasisDiagonal:
    """In the eigenbasis of ``kron``'s factors (its :meth:`~fisherlab.kron.KronSum.factor_eigh`, kept for
    the reused method's error 2; eigensolver on the free cores)."""
    with blas_threads(free_threads(kron.outs[0].device)):
        (_, q_out), (_, q_in) = kron.factor_eigh()
    return eigenbasis_diagonal(block, q_out, q_in)


def ekfac(block: ExactBlock, kfac: KronSum) -> EigenbasisDiagonal:
    """EKFAC: KFAC's eigenbasis (of ``G`` and ``A``) with the diagonal of ``F`` in it."""
    return _in_eigenbasis_of(block, kfac)


def eshampoo(block: ExactBlock, shampoo2: KronSum) -> EigenbasisDiagonal:
    """SOAP's basis, the eigenvectors of Shampoo's ``L`` and ``R`` (those of ``shampoo2``'s factors),
    with the diagonal of ``F`` in it."""
    return _in_eigenbasis_of(block, shampoo2)


def _reusing(
    name: str, reused: str, build: Callable[[ExactBlock, KronSum], EigenbasisDiagonal]
) -> Callable[[ExactBlock, ApproxConfig, MethodContext], Approximation]:
    """A builder in the basis of the reused method's Kronecker factors; its time includes the reused build."""

    def builder(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
        first = context.built[reused]
        start = time.perf_counter()
        operator = build(block, first.kron)
        return Approximation(name, operator, 0, True, 0.0, seconds=first.seconds + time.perf_counter() - start)

    return builder


register(MethodSpec("ekfac", _reusing("ekfac", "kfac", ekfac), "EKFAC", "kfac", ("kfac",), span_invariant=True))
register(
    MethodSpec(
        "eshampoo",
        _reusing("eshampoo", "shampoo2", eshampoo),
        "eShampoo (SOAP basis)",
        "shampoo",
        ("shampoo2",),
        span_invariant=True,
    )
)
