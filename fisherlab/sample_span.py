"""The sample span: a layer wider than its batch, restricted to the span of its per-sample factors.

``F = (1/N) Σ vec(DW) vec(DW)ᵀ`` with ``DW = Σ_t g aᵀ`` lives in ``span{g_nvt} ⊗ span{a_nt}``, of
dimension at most ``N V T · N T``. With orthonormal bases ``U_g``, ``U_a`` of the two spans
(:func:`span_basis`), ``F = (U_g ⊗ U_a) F' (U_g ⊗ U_a)ᵀ`` where ``F'`` is the block of the factors
``U_gᵀ g``, ``U_aᵀ a``. Every approximation of K (Kronecker factors are sums of per-sample products,
singular vectors of ``R(F)`` lie in its range) is the lifted approximation of ``F'``, and both errors
are the same: a wide layer at a small batch shrinks from ``d_out d_in`` to ``(N V T)(N T)``.

The whole feature, in the order a snapshot uses it:

* **restrict**: :func:`span_bases` and :func:`restrict` (behind
  :meth:`~fisherlab.fisher.ExactBlock.span_bases` and :meth:`~fisherlab.fisher.ExactBlock.sample_span`)
  give the :class:`SampleSpan` ``F'``; :func:`restricted_warm_starts` maps the previous snapshot's
  warm starts onto it;
* **approximate and measure** on ``F'`` (:func:`~fisherlab.approximations.approximate_all`,
  :func:`~fisherlab.metrics.evaluate_block`); error 2 of a Kronecker sum built on a whole block is
  restricted here too (:func:`on_sample_span`);
* **lift**: :meth:`SampleSpan.lift` (:meth:`~fisherlab.approximations.Approximation.lifted`), the warm
  starts kept on the span as :class:`SpanMatrix` (``k²`` numbers where the whole matrix has ``d_in²``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fisherlab.kron import KronSum
from fisherlab.krylov import blas_threads, free_threads
from fisherlab.layers import LayerFactors

if TYPE_CHECKING:  # type only: the exact block is the next stage (fisher imports this module)
    from fisherlab.fisher import ExactBlock

__all__ = [
    "SampleSpan",
    "SpanMatrix",
    "on_sample_span",
    "restrict",
    "restricted_warm_starts",
    "span_bases",
    "span_basis",
]


def span_basis(rows: Tensor, side: int) -> Tensor | None:
    """Orthonormal basis ``[side, k]`` of the span of the vectors ``rows.reshape(-1, side)``, when
    there are fewer of them than ``side`` (else ``None``): thin SVD, directions below
    ``side · eps`` of the largest singular value cut (Golub & Van Loan §5.4.1)."""
    cols = rows.reshape(-1, side)
    if cols.shape[0] >= side:
        return None
    with blas_threads(free_threads(cols.device)):  # LAPACK on the free cores (2.4 s against 0.3 s on a loaded CPU)
        u, sv, _ = torch.linalg.svd(cols.T, full_matrices=False)
    if not sv[0] > 0:
        return None
    return u[:, sv > side * torch.finfo(sv.dtype).eps * sv[0]]


def span_bases(factors: LayerFactors) -> tuple[Tensor | None, Tensor | None] | None:
    """Orthonormal bases ``(U_g, U_a)`` of ``span{g_nvt}`` and ``span{a_nt}`` (:func:`span_basis`;
    ``None`` for a side with at least as many vectors as dimensions); ``None`` on a sharded batch,
    where each process holds only its rows."""
    if factors.shard is not None and factors.shard.world_size > 1:
        return None
    return span_basis(factors.g, factors.d_out), span_basis(factors.a, factors.d_in)


@dataclass(frozen=True)
class SampleSpan:
    """An exact block restricted to the span of its per-sample factors (:func:`restrict`).

    Args:
        block: The restricted block ``F'`` (factors ``U_gᵀ g``, ``U_aᵀ a``).
        out_basis: ``U_g [d_out, k_out]`` (``None``: the output side is not restricted).
        in_basis: ``U_a [d_in, k_in]`` (``None``: the input side is not restricted).
        dim: Side ``d_out d_in`` of the unrestricted block.
    """

    block: ExactBlock
    out_basis: Tensor | None
    in_basis: Tensor | None
    dim: int

    @property
    def zeros(self) -> int:
        """Eigenvalues of the unrestricted block (and of any approximation of it) known to be 0."""
        return self.dim - self.block.dim

    def lift_out(self, m: Tensor) -> Tensor:
        """``U_g m U_gᵀ``: an output-side factor of ``F'`` as one of ``F``."""
        return m if self.out_basis is None else self.out_basis @ m @ self.out_basis.T

    def lift_in(self, m: Tensor) -> Tensor:
        """``U_a m U_aᵀ``: an input-side factor of ``F'`` as one of ``F``."""
        return m if self.in_basis is None else self.in_basis @ m @ self.in_basis.T

    def restrict_in(self, m: Tensor) -> Tensor:
        """``U_aᵀ m U_a``: an input-side matrix of ``F`` (a warm start) as one of ``F'``."""
        return m if self.in_basis is None else self.in_basis.T @ m @ self.in_basis

    def lift(self, kron: KronSum) -> KronSum:
        """An approximation of ``F'`` as the same approximation of ``F``."""
        return KronSum(tuple(self.lift_out(o) for o in kron.outs), tuple(self.lift_in(i) for i in kron.ins))


def restrict(block: ExactBlock, *, max_fraction: float = 0.5) -> SampleSpan | None:
    """``block`` restricted to the span of its per-sample factors, when that is at most ``max_fraction``
    of its side (else ``None``; also on a sharded batch). See the module docstring for why every
    approximation and both errors are the same on the restriction."""
    f = block.factors
    bases = block.span_bases
    if bases is None:
        return None
    out_basis, in_basis = bases
    k_out = f.d_out if out_basis is None else out_basis.shape[1]
    k_in = f.d_in if in_basis is None else in_basis.shape[1]
    if k_out * k_in > max_fraction * f.dim:
        return None
    a = f.a if in_basis is None else f.a @ in_basis
    g = f.g if out_basis is None else f.g @ out_basis
    restricted = LayerFactors(a, g, f.shard, name=f.name, structure=f.structure)
    return SampleSpan(replace(block, factors=restricted), out_basis, in_basis, f.dim)


@dataclass(frozen=True)
class SpanMatrix:
    """The input-side matrix ``U core Uᵀ`` kept as its basis ``U [d_in, k]`` (orthonormal) and ``core [k, k]``.

    A warm start of a layer restricted to its sample span
    (:meth:`~fisherlab.approximations.Approximation.lifted`); the next snapshot maps it onto its own
    span with a ``k × k'`` overlap, never forming ``d_in²``.
    """

    basis: Tensor
    core: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the whole matrix."""
        return (self.basis.shape[0], self.basis.shape[0])

    def on(self, basis: Tensor | None) -> Tensor:
        """``Vᵀ U core Uᵀ V`` for the orthonormal ``basis`` ``V`` (``None``: the whole matrix)."""
        if basis is None:
            return self.basis @ self.core @ self.basis.T
        overlap = basis.T @ self.basis
        return overlap @ self.core @ overlap.T


def restricted_warm_starts(
    warm: Mapping[str, tuple[Tensor | SpanMatrix, ...]] | None, span: SampleSpan | None
) -> dict[str, tuple[Tensor, ...]] | None:
    """Warm starts per method (``[d_in, d_in]`` matrices or :class:`SpanMatrix`, see
    :data:`~fisherlab.approximations.WarmStarts`) on ``span.block`` (``None``: the whole block)."""
    if warm is None:
        return None
    basis = None if span is None else span.in_basis

    def on_span(w: Tensor | SpanMatrix) -> Tensor:
        if isinstance(w, SpanMatrix):
            return w.on(basis)
        whole = span is not None and basis is not None and w.shape == (basis.shape[0], basis.shape[0])
        return span.restrict_in(w) if whole and span is not None else w

    return {m: tuple(on_span(w) for w in ws) for m, ws in warm.items()}


def on_sample_span(block: ExactBlock, approx: KronSum) -> KronSum:
    """``approx`` restricted to the span of the per-sample factors where that is smaller than a side.

    Every factor the methods build is a sum of per-sample products (``Σ g gᵀ``, ``Σ DW Y DWᵀ``, ...),
    so it lies in ``span{g_nvt}`` (output side) and ``span{a_nt}`` (input side), of dimension at most
    ``N V T`` and ``N T``: a thin SVD of the factors gives orthonormal bases at ``O(d (N T)²)``,
    far below the ``O(d³)`` of :meth:`~fisherlab.kron.KronSum.on_ranges` on a wide conv layer.
    Checked (:meth:`~fisherlab.kron.KronSum.restricted`); any other sum, or a sharded batch (each
    process holds only its rows), is returned as is. Used by error 2
    (:func:`~fisherlab.metrics.spectral_error_bounded`) on a block that was not restricted first.
    """
    if block.span_bases is None:
        return approx
    u, v = (None if b is None else b.to(approx.outs[0].dtype) for b in block.span_bases)
    if u is None and v is None:
        return approx
    restricted = approx.restricted(u, v)
    return approx if restricted is None else restricted
