"""Sums of Kronecker products ``sum_k out_k ⊗ in_k`` acting on ``W.flatten()`` (a
:class:`~fisherlab.operators.BlockOperator`).

``(X ⊗ Y) vec(W) = vec(X W Y^T)`` for row-major ``vec`` and ``W`` of shape ``[d_out, d_in]``,
so nothing here forms a ``d_out*d_in``-sized matrix except :meth:`KronSum.as_dense`, and
:meth:`KronSum.eigenvalues` for sums of two or more terms of moderate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError

__all__ = ["KronSolver", "KronSum", "pi_damping", "symmetric_eig_dense_limit"]

#: Above this side length error 2 never forms a multi-term ``KronSum`` densely.
symmetric_eig_dense_limit = 12_000


def pi_damping(out: Tensor, in_: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping ``(out + √λ/π I) ⊗ (in_ + π√λ I)`` (K §2.2).

    ``π = sqrt((tr(in_)/d_in) / (tr(out)/d_out))`` balances the two factors
    (Martens & Grosse 2015, §6.3); ``π = 1`` when a trace is not positive.

    Returns:
        The damped ``(out, in_)`` factors.

    References:
        Koroko et al. (2022), Sec. 2.2; Tselepidis et al., T eq. (2.30).
    """
    t_out = torch.trace(out) / out.shape[0]
    t_in = torch.trace(in_) / in_.shape[0]
    pi = torch.sqrt(t_in / t_out) if (t_out > 0 and t_in > 0) else torch.ones((), dtype=out.dtype)
    root = damping**0.5
    eye_o = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
    eye_i = torch.eye(in_.shape[0], dtype=in_.dtype, device=in_.device)
    return out + (root / pi) * eye_o, in_ + (root * pi) * eye_i


def _symmetric(m: Tensor) -> Tensor:
    """``(m + mᵀ) / 2``: exactly symmetric (addition commutes), so an eigensolver that reads one
    triangle sees the matrix that norms and products see (a product ``Uᵀ F U`` is not, to rounding)."""
    return (m + m.T) / 2


def _eigvalsh(m: Tensor) -> Tensor:
    """Eigenvalues of the symmetric part of ``m`` (``eigvalsh`` alone reads one triangle)."""
    return torch.linalg.eigvalsh(_symmetric(m))


def _sym_inv_sqrt(m: Tensor) -> Tensor:
    w, q = torch.linalg.eigh(_symmetric(m))
    if bool((w <= 0).any()):
        raise FisherlabError("damped Kronecker factor is not positive definite; increase damping")
    return (q * w.rsqrt()) @ q.T


@dataclass(frozen=True)
class KronSum:
    """``sum_k out_k ⊗ in_k``, ``out_k`` of shape ``[d_out, d_out]``, ``in_k`` ``[d_in, d_in]``.

    Acts on ``W.flatten()`` for ``W`` of shape ``[d_out, d_in]`` (the torch weight layout,
    bias column last). The paper writes the same matrix ``in_k ⊗ out_k`` (column-major vec).

    A single product keeps the eigendecompositions of its factors once computed
    (:meth:`factor_eigh`, :meth:`factor_eigenvalues`): EKFAC's and SOAP's bases, Shampoo's roots,
    error 2 and the damped solve share them. ``cache`` holds them (and what a builder knows of the
    sum, :func:`fisherlab.operators.remember_inner`); a new sum (``to``, ``+``, ``dataclasses.replace``)
    starts with an empty one.

    Args:
        outs: Output-side factors (the paper's ``G``, ``S``, ``Q``).
        ins: Input-side factors (the paper's ``Ā``, ``R``, ``P``).
    """

    outs: tuple[Tensor, ...]
    ins: tuple[Tensor, ...]
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.outs) != len(self.ins) or not self.outs:
            raise FisherlabError("KronSum needs as many out factors as in factors, at least one")
        # row-major factors: einsum may return transposed views (it does when opt_einsum is
        # installed), on which torch.kron and other view-based code fail
        object.__setattr__(self, "outs", tuple(o.contiguous() for o in self.outs))
        object.__setattr__(self, "ins", tuple(i.contiguous() for i in self.ins))

    @property
    def rank(self) -> int:
        """The Kronecker rank (number of terms)."""
        return len(self.outs)

    @property
    def d_out(self) -> int:
        """Side of the output factors."""
        return self.outs[0].shape[0]

    @property
    def d_in(self) -> int:
        """Side of the input factors."""
        return self.ins[0].shape[0]

    @property
    def dim(self) -> int:
        """Side of the represented matrix."""
        return self.d_out * self.d_in

    def to(self, dtype: torch.dtype) -> KronSum:
        """The same sum with its factors cast to ``dtype`` (itself when they are in it)."""
        if self.outs[0].dtype == dtype:
            return self
        return KronSum(tuple(o.to(dtype) for o in self.outs), tuple(i.to(dtype) for i in self.ins))

    def __add__(self, other: KronSum) -> KronSum:
        """Concatenate the terms of two sums."""
        return KronSum(self.outs + other.outs, self.ins + other.ins)

    def matvec(self, w: Tensor) -> Tensor:
        """``(sum_k out_k ⊗ in_k) vec(W)`` returned as a ``[d_out, d_in]`` matrix (batched over
        leading dims of ``w``: two GEMMs for all terms and the whole batch)."""
        if w.ndim == 2:
            return sum((o @ w @ i.T for o, i in zip(self.outs, self.ins, strict=True)), torch.zeros_like(w))
        lead, (d_out, d_in), rank = w.shape[:-2], w.shape[-2:], self.rank
        b = w.reshape(-1, d_out, d_in).shape[0]
        right = w.reshape(-1, d_in) @ torch.cat([i.T for i in self.ins], dim=1)  # [b d_out, R d_in]: W in_kᵀ
        right = right.reshape(b, d_out, rank, d_in).permute(2, 1, 0, 3).reshape(rank * d_out, b * d_in)
        out = torch.cat(self.outs, dim=1) @ right  # Σ_k out_k (W in_kᵀ), every matrix of the batch at once
        return out.reshape(d_out, b, d_in).transpose(0, 1).reshape(*lead, d_out, d_in)

    def as_dense(self) -> Tensor:
        """The ``[d_out*d_in, d_out*d_in]`` matrix; small layers, tests and notebooks only."""
        return sum(torch.kron(o, i) for o, i in zip(self.outs, self.ins, strict=True))  # type: ignore[return-value]

    def frobenius_norm_squared(self) -> Tensor:
        """``||sum_k out_k ⊗ in_k||_F^2 = sum_kl <out_k, out_l><in_k, in_l>``."""
        o = torch.stack([x.flatten() for x in self.outs])
        i = torch.stack([x.flatten() for x in self.ins])
        return ((o @ o.T) * (i @ i.T)).sum()

    def frobenius_norm(self) -> Tensor:
        """``||sum_k out_k ⊗ in_k||_F``."""
        return self.frobenius_norm_squared().clamp(min=0).sqrt()

    def inner(self, kron: KronSum) -> Tensor:
        """``<self, kron>_F = sum_kl <out_k, out'_l><in_k, in'_l>``."""
        o = torch.stack([x.flatten() for x in self.outs]) @ torch.stack([x.flatten() for x in kron.outs]).T
        i = torch.stack([x.flatten() for x in self.ins]) @ torch.stack([x.flatten() for x in kron.ins]).T
        return (o * i).sum()

    def trace(self) -> Tensor:
        """``sum_k tr(out_k) tr(in_k)``."""
        return sum(
            (torch.trace(o) * torch.trace(i) for o, i in zip(self.outs, self.ins, strict=True)),
            torch.zeros((), dtype=self.outs[0].dtype),
        )

    def __getstate__(self) -> dict:
        """Pickled without ``cache`` (it may hold weak references): a loaded sum computes again."""
        return {**self.__dict__, "cache": {}}

    def _single(self, what: str) -> None:
        if self.rank != 1:
            raise FisherlabError(f"KronSum.{what} is defined for a single Kronecker product, this sum has {self.rank}")

    def factor_eigh(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((λ_out, Q_out), (λ_in, Q_in))``: eigenvalues (ascending) and eigenvectors of the symmetric
        parts of ``out`` and ``in_`` of a single Kronecker product, computed once (``eigh``) and kept.

        A sum made by :meth:`scaled` takes them from the sum it scales; one built from known
        eigendecompositions (Shampoo's roots) has them from :meth:`with_factor_eigh`.

        Raises:
            FisherlabError: More than one term.
        """
        self._single("factor_eigh")
        if "eigh" not in self.cache:
            if "scaled_from" in self.cache:
                parent, s_out, s_in = self.cache["scaled_from"]
                (e_out, q_out), (e_in, q_in) = parent.factor_eigh()
                self.cache["eigh"] = ((e_out * s_out, q_out), (e_in * s_in, q_in))
            else:
                out, in_ = torch.linalg.eigh(_symmetric(self.outs[0])), torch.linalg.eigh(_symmetric(self.ins[0]))
                self.cache["eigh"] = ((out.eigenvalues, out.eigenvectors), (in_.eigenvalues, in_.eigenvectors))
        return self.cache["eigh"]

    def factor_eigenvalues(self) -> tuple[Tensor, Tensor]:
        """``(λ_out, λ_in)`` of a single Kronecker product, ascending: from :meth:`factor_eigh` where that
        is known (here or in the sum this one scales), else ``eigvalsh`` (a third of ``eigh``'s cost), kept.

        Raises:
            FisherlabError: More than one term.
        """
        self._single("factor_eigenvalues")
        if "eigh" in self.cache:
            (e_out, _), (e_in, _) = self.cache["eigh"]
            return e_out, e_in
        if "eigvalsh" not in self.cache:
            if "scaled_from" in self.cache:
                parent, s_out, s_in = self.cache["scaled_from"]
                e_out, e_in = parent.factor_eigenvalues()
                self.cache["eigvalsh"] = (e_out * s_out, e_in * s_in)
            else:
                self.cache["eigvalsh"] = (_eigvalsh(self.outs[0]), _eigvalsh(self.ins[0]))
        return self.cache["eigvalsh"]

    def scaled(self, out_scale: float | Tensor, in_scale: float | Tensor = 1.0) -> KronSum:
        """``(s_out out) ⊗ (s_in in_)``; for ``s_out, s_in >= 0`` it shares this sum's factor
        eigendecompositions (computed when either sum first needs them, e.g. TKFAC's from KFAC's).

        Raises:
            FisherlabError: More than one term.
        """
        self._single("scaled")
        kron = KronSum((self.outs[0] * out_scale,), (self.ins[0] * in_scale,))
        if float(out_scale) >= 0 and float(in_scale) >= 0:  # else (or NaN) computed afresh when needed
            kron.cache["scaled_from"] = (self, out_scale, in_scale)
        return kron

    def with_factor_eigh(self, out_eigh: tuple[Tensor, Tensor], in_eigh: tuple[Tensor, Tensor]) -> KronSum:
        """This single product with the eigendecompositions ``(values ascending, vectors)`` of its
        factors given, where the builder knows them (``out = Q diag(λ) Qᵀ`` to rounding): no
        eigensolver for :meth:`factor_eigh`, :meth:`eigenvalues` or a damped solve later.

        Raises:
            FisherlabError: More than one term.
        """
        self._single("with_factor_eigh")
        self.cache["eigh"] = (out_eigh, in_eigh)
        return self

    def eigenvalues(self, *, top: int | None = None, by_magnitude: bool = False) -> Tensor:
        """Eigenvalues (factors must be symmetric), sorted descending.

        One term: all products ``λ_i(out) λ_j(in)``, exactly, in ``O(d_out^3 + d_in^3)``
        (:meth:`factor_eigenvalues`, computed once per sum).
        More terms: dense ``eigvalsh`` (for large blocks, the largest few come from
        :func:`~fisherlab.krylov.block_lanczos_eigenvalues` on :meth:`matvec`, see
        :func:`~fisherlab.metrics.spectral_error_bounded`).

        Args:
            top: Return only the ``top`` largest (all when ``None``).
            by_magnitude: Sort by absolute value and return absolute values, i.e. the
                singular values of the symmetric matrix.

        Returns:
            A 1-d tensor of length ``top`` (or ``dim``).
        """
        top = self.dim if top is None else min(top, self.dim)
        if self.rank == 1:
            ev = torch.outer(*self.factor_eigenvalues()).flatten()
        else:
            ev = _eigvalsh(self.as_dense())
        if by_magnitude:
            ev = ev.abs()
        return torch.sort(ev, descending=True).values[:top]

    def restricted(self, u: Tensor | None, v: Tensor | None) -> KronSum | None:
        """``Σ_k (uᵀ out_k u) ⊗ (vᵀ in_k v)`` for orthonormal columns ``u``, ``v`` (``None``: that side
        as is), or ``None`` unless every factor lies in those spans (``||f - P f P|| <= side · eps
        · ||f||``): then its eigenvalues are this sum's, but zeros."""

        def project(factors: tuple[Tensor, ...], basis: Tensor | None) -> tuple[Tensor, ...] | None:
            if basis is None:
                return factors
            small = tuple(_symmetric(basis.T @ f @ basis) for f in factors)
            for f, p in zip(factors, small, strict=True):
                tol = f.shape[0] * torch.finfo(f.dtype).eps * torch.linalg.norm(f)
                if torch.linalg.norm(f - basis @ p @ basis.T) > tol:
                    return None
            return small

        outs, ins = project(self.outs, u), project(self.ins, v)
        return None if outs is None or ins is None else KronSum(outs, ins)

    def on_ranges(self) -> KronSum:
        """The sum restricted to the joint ranges of its factors, ``Σ_k (Uᵀ out_k U) ⊗ (Vᵀ in_k V)``.

        ``U`` and ``V`` are orthonormal bases of ``range(Σ_k out_k²)`` and ``range(Σ_k in_k²)``
        (symmetric factors), so ``self = (U ⊗ V) [restricted] (U ⊗ V)ᵀ`` and the restricted sum
        has the same eigenvalues except for zeros. Factors built from ``N`` samples have rank at
        most ``N``: a layer wider than the batch shrinks (FACES layer 1: 2 000 → 1 024 outputs).
        ``U`` holds the left singular vectors of ``[out_1, out_2, ...]`` above ``side · eps`` of
        the largest singular value (the numerical rank), ``V`` likewise.
        """

        def basis(factors: tuple[Tensor, ...]) -> Tensor:
            u, sv, _ = torch.linalg.svd(torch.cat(factors, dim=1), full_matrices=False)
            return u[:, sv > factors[0].shape[0] * torch.finfo(sv.dtype).eps * sv[0]]

        u, v = basis(self.outs), basis(self.ins)
        return KronSum(
            tuple(_symmetric(u.T @ o @ u) for o in self.outs), tuple(_symmetric(v.T @ i @ v) for i in self.ins)
        )

    def solve(self, v: Tensor, *, damping: float = 0.0) -> Tensor:
        """Solve ``(K + damping) vec(U) = vec(V)`` for ``U`` of shape ``[d_out, d_in]``.

        The damping is the factored π-damping of the first term (:func:`pi_damping`), not
        ``+λI``. See :meth:`solver` for the method; this is ``self.solver(damping)(v)``.
        """
        _check_rhs(v, (self.outs[0].shape[0], self.ins[0].shape[0]))
        return self.solver(damping=damping)(v)

    def solver(self, *, damping: float = 0.0) -> KronSolver:
        """Factorise ``K + damping`` once for repeated solves (K §3.4).

        One term: ``U = out^{-1} V in_^{-1}``. Two terms ``A ⊗ B + C ⊗ D``: the simultaneous
        diagonalisation of K §3.4 (Martens & Grosse 2015, App. B):
        ``K1 = A^{-1/2} E1``, ``K2 = B^{-1/2} E2`` with ``A^{-1/2} C A^{-1/2} = E1 S1 E1^T``,
        ``B^{-1/2} D B^{-1/2} = E2 S2 E2^T``, then ``U = K1 [(K1^T V K2) ⊘ (1 + s1 s2^T)] K2^T``.
        The second term may be indefinite; the first, damped, must be positive definite.

        Raises:
            FisherlabError: For more than two terms or a singular system.

        References:
            Koroko et al. (2022), Sec. 3.4.
        """
        if not (math.isfinite(damping) and damping >= 0):
            raise FisherlabError(f"damping must be finite and non-negative, got {damping}")
        if self.rank > 2:
            raise FisherlabError("solve supports Kronecker rank 1 and 2 only")
        if not all(bool(torch.isfinite(m).all()) for m in self.outs + self.ins):
            raise FisherlabError(
                "Kronecker factors contain NaN or inf; the approximation broke down (lower the learning rate)"
            )
        out, in_ = pi_damping(self.outs[0], self.ins[0], damping) if damping > 0 else (self.outs[0], self.ins[0])
        if self.rank == 1:
            return KronSolver(torch.linalg.inv(out), torch.linalg.inv(in_).T, None)
        a_is, b_is = _sym_inv_sqrt(out), _sym_inv_sqrt(in_)
        s1, e1 = torch.linalg.eigh(_symmetric(a_is @ self.outs[1] @ a_is))
        s2, e2 = torch.linalg.eigh(_symmetric(b_is @ self.ins[1] @ b_is))
        denom = 1.0 + torch.outer(s1, s2)
        if bool((denom.abs() < 1e-12).any()):
            raise FisherlabError("Kronecker sum is singular; increase damping")
        return KronSolver(a_is @ e1, b_is @ e2, denom)


@dataclass(frozen=True)
class KronSolver:
    """A factorised damped Kronecker sum: ``U = L [(Lᵀ V R) ⊘ D] Rᵀ`` (rank 2) or ``L V R`` (rank 1)."""

    left: Tensor
    right: Tensor
    denom: Tensor | None

    def __call__(self, v: Tensor) -> Tensor:
        """Apply the inverse to ``V`` of shape ``[d_out, d_in]``.

        Raises:
            ValueError: ``V`` of another shape.
        """
        _check_rhs(v, (self.left.shape[0], self.right.shape[0]))
        if self.denom is None:
            return self.left @ v @ self.right
        return self.left @ ((self.left.T @ v @ self.right) / self.denom) @ self.right.T


def _check_rhs(v: Tensor, expected: tuple[int, int]) -> None:
    """Refuse a right-hand side that is not a ``[d_out, d_in]`` tensor, saying the shape expected."""
    if not isinstance(v, Tensor) or tuple(v.shape) != expected:
        got = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"solve expects a right-hand side of shape [d_out, d_in] = {list(expected)}, got {got}")
