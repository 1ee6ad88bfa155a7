"""Block operators that are not Kronecker sums: dense, diagonal, eigenbasis-diagonal, lifted.

Every approximation of a layer's Fisher block is a :class:`~fisherlab.operators.BlockOperator`
acting on ``[..., d_out, d_in]`` batches (row-major ``vec``, bias column last). The metrics use
what an operator offers: a closed form where it has one (``eigenvalues``, ``diagonal``), the
generic matrix-free route otherwise (``⟨F, F̂⟩ = (1/N) Σ vec(DW)ᵀ F̂ vec(DW)`` from ``matvec``;
eigenvalues from ``as_dense`` or block Lanczos on ``matvec``).

* :class:`DenseBlockOperator` — any symmetric matrix; small layers, and the way a researcher
  scores an approximation of their own (``fl.register_method``).
* :class:`DiagonalBlockOperator` — ``diag(s)``, ``s [d_out, d_in]``.
* :class:`EigenbasisDiagonal` — ``(Q_out ⊗ Q_in) diag(s) (Q_out ⊗ Q_in)ᵀ`` (EKFAC's form).
* :class:`LowRankOperator` — ``U diag(λ) Uᵀ`` with ``k`` orthonormal columns (the best rank-``k``
  approximation of a block, from its Gram matrix).
* :class:`LiftedOperator` — an operator of the block restricted to the sample span, as one of the
  whole block: ``(U_g ⊗ U_a) B (U_g ⊗ U_a)ᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError

__all__ = [
    "DenseBlockOperator",
    "DiagonalBlockOperator",
    "EigenbasisDiagonal",
    "LiftedOperator",
    "LowRankOperator",
    "ScaledOperator",
]


def _check_damping(damping: float) -> None:
    if not damping >= 0:
        raise FisherlabError(f"damping must be >= 0, got {damping}")


@dataclass(frozen=True)
class DenseBlockOperator:
    """A dense symmetric block ``M [D, D]`` with ``D = d_out d_in``; small layers only.

    Args:
        matrix: The symmetric matrix, indexed like ``weight_matrix(...).flatten()`` (row-major,
            output index slow, input index fast, bias column last).
        shape: ``(d_out, d_in)``; ``None`` until the method registry sets it from the block.
    """

    matrix: Tensor
    shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        m = self.matrix
        if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1]:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise FisherlabError(f"DenseBlockOperator needs a square [D, D] tensor, got {got}")
        if self.shape is not None and self.shape[0] * self.shape[1] != m.shape[0]:
            raise FisherlabError(
                f"DenseBlockOperator of side {m.shape[0]} does not fit a [d_out, d_in] = {list(self.shape)} layer "
                f"(side {self.shape[0] * self.shape[1]})"
            )

    def with_shape(self, d_out: int, d_in: int) -> DenseBlockOperator:
        """The same matrix acting on ``[d_out, d_in]`` matrices (checked)."""
        return replace(self, shape=(d_out, d_in))

    @property
    def d_out(self) -> int:
        """Output side."""
        return self._shape[0]

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        return self._shape[1]

    @property
    def _shape(self) -> tuple[int, int]:
        if self.shape is None:
            raise FisherlabError("DenseBlockOperator has no [d_out, d_in] shape yet: use with_shape(d_out, d_in)")
        return self.shape

    @property
    def dim(self) -> int:
        """Side ``D``."""
        return self.matrix.shape[0]

    def to(self, dtype: torch.dtype) -> DenseBlockOperator:
        """Cast."""
        return replace(self, matrix=self.matrix.to(dtype))

    def matvec(self, w: Tensor) -> Tensor:
        """``M vec(W)`` for each ``[d_out, d_in]`` matrix of a batch."""
        flat = w.reshape(*w.shape[:-2], -1)
        return (flat @ self.matrix.T.to(w.dtype)).reshape(w.shape)

    def frobenius_norm_squared(self) -> Tensor:
        """``‖M‖_F²``."""
        return torch.sum(self.matrix**2)

    def frobenius_norm(self) -> Tensor:
        """``‖M‖_F``."""
        return self.frobenius_norm_squared().sqrt()

    def diagonal(self) -> Tensor:
        """``diag(M)`` as a ``[d_out, d_in]`` matrix."""
        return torch.diagonal(self.matrix).reshape(self._shape)

    def eigenvalues(self) -> Tensor:
        """All eigenvalues, descending (dense ``eigvalsh`` of the symmetrised matrix)."""
        sym = (self.matrix + self.matrix.T) / 2
        return torch.sort(torch.linalg.eigvalsh(sym), descending=True).values

    def as_dense(self) -> Tensor:
        """``M``."""
        return self.matrix

    def solve(self, v: Tensor, *, damping: float = 0.0) -> Tensor:
        """``(M + damping I)⁻¹ vec(V)`` (Cholesky; ``M + damping I`` must be positive definite)."""
        _check_damping(damping)
        eye = torch.eye(self.dim, dtype=self.matrix.dtype, device=self.matrix.device)
        chol, info = torch.linalg.cholesky_ex(self.matrix + damping * eye)
        if int(info):
            raise FisherlabError("DenseBlockOperator.solve: M + damping I is not positive definite; raise the damping")
        flat = v.reshape(-1, self.dim).T.to(chol.dtype)
        return torch.cholesky_solve(flat, chol).T.reshape(v.shape).to(v.dtype)


class _DiagonalValues:
    """What an operator diagonal in some orthonormal basis shares: its eigenvalues ``s [d_out, d_in]``
    give its sides, its Frobenius norm (an orthogonal similarity keeps it) and its spectrum."""

    values: Tensor

    @property
    def d_out(self) -> int:
        """Output side."""
        return self.values.shape[0]

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        return self.values.shape[1]

    @property
    def dim(self) -> int:
        """Side ``d_out d_in``."""
        return self.values.numel()

    def frobenius_norm_squared(self) -> Tensor:
        """``Σ s²``."""
        return torch.sum(self.values**2)

    def frobenius_norm(self) -> Tensor:
        """``‖s‖``."""
        return self.frobenius_norm_squared().sqrt()

    def eigenvalues(self) -> Tensor:
        """``s``, sorted descending."""
        return torch.sort(self.values.flatten(), descending=True).values


@dataclass(frozen=True)
class DiagonalBlockOperator(_DiagonalValues):
    """``diag(vec s)``: one curvature value per weight, ``s [d_out, d_in]``.

    ``cache``: what the builder knows of it (:func:`~fisherlab.operators.remember_inner`).
    """

    values: Tensor
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __getstate__(self) -> dict:
        """Pickled without ``cache`` (it may hold weak references)."""
        return {**self.__dict__, "cache": {}}

    def to(self, dtype: torch.dtype) -> DiagonalBlockOperator:
        """Cast."""
        return replace(self, values=self.values.to(dtype))

    def matvec(self, w: Tensor) -> Tensor:
        """``s ∘ W``."""
        return self.values.to(w.dtype) * w

    def diagonal(self) -> Tensor:
        """``s``."""
        return self.values

    def as_dense(self) -> Tensor:
        """``diag(vec s)``."""
        return torch.diag(self.values.flatten())

    def solve(self, v: Tensor, *, damping: float = 0.0) -> Tensor:
        """``V / (s + damping)``."""
        _check_damping(damping)
        return v / (self.values + damping).to(v.dtype)


@dataclass(frozen=True)
class EigenbasisDiagonal(_DiagonalValues):
    """``(Q_out ⊗ Q_in) diag(vec s) (Q_out ⊗ Q_in)ᵀ``: a diagonal in a Kronecker eigenbasis (EKFAC, SOAP).

    Args:
        q_out: Orthogonal ``[d_out, d_out]``.
        q_in: Orthogonal ``[d_in, d_in]``.
        values: ``s [d_out, d_in]``, the eigenvalues.

    ``cache``: what the builder knows of it (:func:`~fisherlab.operators.remember_inner`).
    """

    q_out: Tensor
    q_in: Tensor
    values: Tensor
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __getstate__(self) -> dict:
        """Pickled without ``cache`` (it may hold weak references)."""
        return {**self.__dict__, "cache": {}}

    def to(self, dtype: torch.dtype) -> EigenbasisDiagonal:
        """Cast."""
        return EigenbasisDiagonal(self.q_out.to(dtype), self.q_in.to(dtype), self.values.to(dtype))

    def rotate(self, w: Tensor) -> Tensor:
        """``Q_outᵀ W Q_in``: a matrix in the eigenbasis."""
        return self.q_out.T.to(w.dtype) @ w @ self.q_in.to(w.dtype)

    def matvec(self, w: Tensor) -> Tensor:
        """``Q_out (s ∘ Q_outᵀ W Q_in) Q_inᵀ``."""
        return self.q_out.to(w.dtype) @ (self.values.to(w.dtype) * self.rotate(w)) @ self.q_in.T.to(w.dtype)

    def as_dense(self) -> Tensor:
        """The dense matrix; small layers only."""
        q = torch.kron(self.q_out, self.q_in)
        return q @ torch.diag(self.values.flatten()) @ q.T

    def solve(self, v: Tensor, *, damping: float = 0.0) -> Tensor:
        """``Q_out ((Q_outᵀ V Q_in) / (s + damping)) Q_inᵀ``."""
        _check_damping(damping)
        inner = self.rotate(v) / (self.values + damping).to(v.dtype)
        return self.q_out.to(v.dtype) @ inner @ self.q_in.T.to(v.dtype)


@dataclass(frozen=True)
class LowRankOperator:
    """``U diag(λ) Uᵀ = Σ_i λ_i vec(U_i) vec(U_i)ᵀ``: ``k`` orthonormal eigenvectors and their eigenvalues.

    Args:
        vectors: ``U [k, d_out, d_in]``, orthonormal in the Frobenius inner product.
        values: ``λ [k]``.

    ``cache``: what the builder knows of it (:func:`~fisherlab.operators.remember_inner`).
    """

    vectors: Tensor
    values: Tensor
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __getstate__(self) -> dict:
        """Pickled without ``cache`` (it may hold weak references)."""
        return {**self.__dict__, "cache": {}}

    def __post_init__(self) -> None:
        if self.vectors.ndim != 3 or self.values.shape != self.vectors.shape[:1]:
            raise FisherlabError(
                f"LowRankOperator needs vectors [k, d_out, d_in] and values [k], got {tuple(self.vectors.shape)} "
                f"and {tuple(self.values.shape)}"
            )

    @property
    def rank(self) -> int:
        """``k``."""
        return self.values.numel()

    @property
    def d_out(self) -> int:
        """Output side."""
        return self.vectors.shape[1]

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        return self.vectors.shape[2]

    @property
    def dim(self) -> int:
        """Side ``d_out d_in``."""
        return self.d_out * self.d_in

    def to(self, dtype: torch.dtype) -> LowRankOperator:
        """Cast."""
        return LowRankOperator(self.vectors.to(dtype), self.values.to(dtype))

    def _coefficients(self, w: Tensor) -> Tensor:
        """``Uᵀ vec(W)`` as ``[..., k]``."""
        return torch.einsum("koi,...oi->...k", self.vectors.to(w.dtype), w)

    def matvec(self, w: Tensor) -> Tensor:
        """``Σ_i λ_i <U_i, W> U_i``."""
        c = self._coefficients(w) * self.values.to(w.dtype)
        return torch.einsum("...k,koi->...oi", c, self.vectors.to(w.dtype))

    def frobenius_norm_squared(self) -> Tensor:
        """``Σ λ²``."""
        return torch.sum(self.values**2)

    def frobenius_norm(self) -> Tensor:
        """``‖λ‖``."""
        return self.frobenius_norm_squared().sqrt()

    def eigenvalues(self) -> Tensor:
        """``λ`` and ``d_out d_in - k`` zeros, descending."""
        zeros = self.values.new_zeros(self.dim - self.rank)
        return torch.sort(torch.cat([self.values, zeros]), descending=True).values

    def as_dense(self) -> Tensor:
        """``U diag(λ) Uᵀ``; small layers only."""
        u = self.vectors.reshape(self.rank, self.dim)
        return u.T @ (self.values[:, None] * u)

    def solve(self, v: Tensor, *, damping: float = 0.0) -> Tensor:
        """``(U diag(λ) Uᵀ + damping I)⁻¹ vec(V) = (V - Σ_i λ_i / (λ_i + damping) <U_i, V> U_i) / damping``.

        Raises:
            FisherlabError: ``damping = 0`` while ``k < d_out d_in`` (the operator is singular).
        """
        _check_damping(damping)
        if damping == 0:
            if self.rank < self.dim:
                raise FisherlabError("LowRankOperator.solve: the operator is singular; pass a positive damping")
            return torch.einsum(
                "...k,koi->...oi", self._coefficients(v) / self.values.to(v.dtype), self.vectors.to(v.dtype)
            )
        c = self._coefficients(v) * (self.values / (self.values + damping)).to(v.dtype)
        return (v - torch.einsum("...k,koi->...oi", c, self.vectors.to(v.dtype))) / damping


@dataclass(frozen=True)
class LiftedOperator:
    """``(U_out ⊗ U_in) B (U_out ⊗ U_in)ᵀ``: an operator ``B`` of a restricted block as one of the whole block.

    Args:
        operator: The operator on ``[k_out, k_in]`` matrices.
        out_basis: Orthonormal ``U_out [d_out, k_out]`` (``None``: the output side is not restricted).
        in_basis: Orthonormal ``U_in [d_in, k_in]`` (``None``: the input side is not restricted).
    """

    operator: object
    out_basis: Tensor | None
    in_basis: Tensor | None

    @property
    def d_out(self) -> int:
        """Output side of the whole block."""
        return self.operator.d_out if self.out_basis is None else self.out_basis.shape[0]  # type: ignore[attr-defined]

    @property
    def d_in(self) -> int:
        """Input side of the whole block."""
        return self.operator.d_in if self.in_basis is None else self.in_basis.shape[0]  # type: ignore[attr-defined]

    @property
    def dim(self) -> int:
        """Side ``d_out d_in``."""
        return self.d_out * self.d_in

    def _restrict(self, w: Tensor) -> Tensor:
        if self.out_basis is not None:
            w = self.out_basis.T.to(w.dtype) @ w
        return w if self.in_basis is None else w @ self.in_basis.to(w.dtype)

    def _lift(self, w: Tensor) -> Tensor:
        if self.out_basis is not None:
            w = self.out_basis.to(w.dtype) @ w
        return w if self.in_basis is None else w @ self.in_basis.T.to(w.dtype)

    def matvec(self, w: Tensor) -> Tensor:
        """``U_out B(U_outᵀ W U_in) U_inᵀ``."""
        return self._lift(self.operator.matvec(self._restrict(w)))  # type: ignore[attr-defined]

    def frobenius_norm_squared(self) -> Tensor:
        """``‖B‖_F²``: lifting by orthonormal bases keeps the norm."""
        return self.operator.frobenius_norm_squared()  # type: ignore[attr-defined]

    def frobenius_norm(self) -> Tensor:
        """``‖B‖_F``."""
        return self.frobenius_norm_squared().sqrt()

    def eigenvalues(self) -> Tensor | None:
        """``B``'s eigenvalues and ``dim - dim(B)`` zeros, descending (``None`` where ``B`` has no closed form)."""
        ev = getattr(self.operator, "eigenvalues", None)
        if ev is None:
            return None
        values = ev()
        if values is None:
            return None
        zeros = values.new_zeros(self.dim - values.numel())
        return torch.sort(torch.cat([values, zeros]), descending=True).values

    def as_dense(self) -> Tensor:
        """The dense matrix; small layers only."""
        b = self.operator.as_dense()  # type: ignore[attr-defined]
        eye_out = torch.eye(self.d_out, dtype=b.dtype, device=b.device)
        eye_in = torch.eye(self.d_in, dtype=b.dtype, device=b.device)
        u = torch.kron(
            eye_out if self.out_basis is None else self.out_basis.to(b.dtype),
            eye_in if self.in_basis is None else self.in_basis.to(b.dtype),
        )
        return u @ b @ u.T


@dataclass(frozen=True)
class ScaledOperator:
    """``c B``: an operator of a rescaled block (:meth:`~fisherlab.fisher.ExactBlock.normalised`) scaled back.

    Args:
        operator: ``B``.
        factor: ``c > 0``.
    """

    operator: object
    factor: float

    @property
    def d_out(self) -> int:
        """Output side."""
        return self.operator.d_out  # type: ignore[attr-defined]

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        return self.operator.d_in  # type: ignore[attr-defined]

    def matvec(self, w: Tensor) -> Tensor:
        """``c B vec(W)``."""
        return self.factor * self.operator.matvec(w)  # type: ignore[attr-defined]

    def frobenius_norm_squared(self) -> Tensor:
        """``c² ‖B‖_F²``."""
        return self.factor**2 * self.operator.frobenius_norm_squared()  # type: ignore[attr-defined]

    def frobenius_norm(self) -> Tensor:
        """``c ‖B‖_F``."""
        return self.frobenius_norm_squared().sqrt()

    def eigenvalues(self) -> Tensor | None:
        """``c`` times ``B``'s eigenvalues (``None`` where ``B`` has no closed form)."""
        ev = getattr(self.operator, "eigenvalues", None)
        values = ev() if callable(ev) else None
        return None if values is None else self.factor * values

    def as_dense(self) -> Tensor:
        """The dense matrix; small layers only."""
        return self.factor * self.operator.as_dense()  # type: ignore[attr-defined]
