"""What every operator in fisherlab shares, and the block-diagonal container.

Two protocols, both satisfied structurally (no base class to inherit):

* :class:`BlockOperator` — one layer's block acting on ``[d_out, d_in]`` matrices (the
  layout of :func:`fisherlab.layers.weight_matrix`, ``vec`` = row-major ``flatten``):
  :class:`~fisherlab.fisher.ExactBlock` and :class:`~fisherlab.kron.KronSum`.
* :class:`ParamsOperator` — an operator on parameter vectors of several layers, kept as
  lists of per-layer ``[d_out, d_in]`` matrices (:data:`Params`):
  :class:`~fisherlab.fisher.WholeFisher` and :class:`BlockDiagonal`.

Each has a dense view (small sizes, tests and notebooks only) that its dense twin in the
tests compares against.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError

if TYPE_CHECKING:
    from fisherlab.kron import KronSolver

__all__ = [
    "BlockDiagonal",
    "BlockOperator",
    "Params",
    "ParamsOperator",
    "axpy",
    "dot",
    "remember_inner",
    "remembered_inner",
    "solve_all",
]

#: A parameter vector: per layer a ``[d_out, d_in]`` matrix, bias column last.
Params = list[Tensor]


@runtime_checkable
class BlockOperator(Protocol):
    """A symmetric operator on ``[d_out, d_in]`` matrices: one layer's Fisher block or an approximation of it.

    Required: ``d_out``, ``d_in``, ``matvec`` (on ``[..., d_out, d_in]`` batches),
    ``frobenius_norm_squared`` and ``as_dense``. Optional, used where present: ``eigenvalues()``
    (all of them, descending: error 2 without an eigensolver), ``solve(v, damping=...)`` (the
    optimizers), ``inner(kron)`` (a closed-form ``<B, Σ out ⊗ in>``). The metrics fall back to the
    generic matrix-free route: ``<F, B> = (1/N) Σ <DW, B DW>`` and block Lanczos on ``matvec``.
    :func:`fisherlab.testing.check_block_operator` checks an operator against its dense matrix.
    """

    @property
    def d_out(self) -> int:
        """Output side (rows of the matrices it acts on)."""
        ...

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        ...

    def matvec(self, w: Tensor) -> Tensor:
        """``B vec(W)`` for each ``[d_out, d_in]`` matrix of a batch ``[..., d_out, d_in]``."""
        ...

    def frobenius_norm_squared(self) -> Tensor:
        """``‖B‖_F²``."""
        ...

    def as_dense(self) -> Tensor:
        """The ``[d_out d_in, d_out d_in]`` matrix; small layers only."""
        ...


@runtime_checkable
class ParamsOperator(Protocol):
    """A symmetric operator on parameter vectors of several layers (:data:`Params`)."""

    def matvec(self, u: Params) -> Params:
        """``A u`` per layer."""
        ...

    def as_dense(self) -> Tensor:
        """The dense matrix acting on the concatenated ``flatten`` of the layers; small nets only."""
        ...


def remember_inner(operator: object, block: object, value: Tensor) -> None:
    """Record ``<F, B>_F`` of ``operator`` ``B`` with the exact block ``F`` it was built from, where the
    builder knows it without a pass over the samples: ``||s||²`` for ``s`` the diagonal of ``F`` in an
    orthonormal basis (``<F, Q diag(s) Qᵀ> = Σ s ∘ diag(Qᵀ F Q) = Σ s²``: diagonal, EKFAC, SOAP's basis),
    ``Σ λ²`` for eigenpairs of ``F`` (low rank), ``c²`` for a Frobenius-optimal scale ``c`` (Shampoo).

    Kept in the operator's ``cache`` (operators without one record nothing) with a weak reference
    to ``block``: only that very block reads it back (:func:`remembered_inner`), never another kind's,
    a rescaled or a restricted one, and the operator does not keep the block alive.
    """
    cache = getattr(operator, "cache", None)
    if isinstance(cache, dict):
        cache["inner"] = (weakref.ref(block), value)


def remembered_inner(operator: object, block: object) -> Tensor | None:
    """``<F, B>_F`` recorded by :func:`remember_inner` for this very ``block``, else ``None``."""
    cache = getattr(operator, "cache", None)
    known = cache.get("inner") if isinstance(cache, dict) else None
    if known is None or known[0]() is not block:
        return None
    return known[1]


def dot(x: Params, y: Params) -> Tensor:
    """Euclidean inner product of two parameter vectors."""
    return sum(
        (torch.sum(a * b) for a, b in zip(x, y, strict=True)), torch.zeros((), dtype=x[0].dtype, device=x[0].device)
    )


def axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    """``alpha x + y`` layer by layer."""
    return [alpha * a + b for a, b in zip(x, y, strict=True)]


@dataclass(frozen=True)
class BlockDiagonal:
    """``diag(B_1, …, B_L)``: one block per layer, no interaction between layers.

    The block-diagonal approximations of the papers (KFAC and the Kronecker methods applied
    layer by layer, K §2.2) used alike by the probe run (block-diagonal energy errors), two-level
    KFAC (T §3: the first level) and the optimizers.

    Args:
        blocks: One :class:`BlockOperator` per layer, in the order of the parameter vectors.
    """

    blocks: tuple[BlockOperator, ...]

    def __post_init__(self) -> None:
        if not self.blocks:
            raise FisherlabError("a block-diagonal operator needs at least one block")

    def matvec(self, u: Params) -> Params:
        """``B_i u_i`` for every layer ``i``."""
        return [b.matvec(x) for b, x in zip(self.blocks, u, strict=True)]

    def solvers(self, *, damping: float) -> list[KronSolver]:
        """Factorise every π-damped block once (:meth:`KronSum.solver`, K §3.4) for repeated solves."""
        return [b.solver(damping=damping) for b in self.blocks]  # type: ignore[attr-defined]

    def solve(self, g: Params, *, damping: float) -> Params:
        """``(B_i + π-damping)⁻¹ g_i`` per layer (K eq. 2, §3.4; T eq. 2.30, 3.3)."""
        return solve_all(self.solvers(damping=damping), g)

    def as_dense(self) -> Tensor:
        """``torch.block_diag`` of the dense blocks; small nets only."""
        return torch.block_diag(*[b.as_dense() for b in self.blocks])


def solve_all(solvers: Sequence[KronSolver], g: Params) -> Params:
    """Apply factorised solvers (from :meth:`BlockDiagonal.solvers`) layer by layer."""
    return [s(x) for s, x in zip(solvers, g, strict=True)]
