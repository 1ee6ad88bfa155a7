"""Metrics that match how approximations are used: shape without scale, the damped solve, the Laplace posterior.

* :func:`scale_free_error`: ``min_c ||F - c F̂||_F / ||F||_F = sqrt(1 - <F, F̂>² / (||F||² ||F̂||²))``, from
  error 1's ingredients (:func:`~fisherlab.metrics.error1.inner_with_block`); where that cancels (``F̂``
  nearly proportional to ``F``) it is error 1 of ``c* F̂``, ``c* = <F, F̂> / ||F̂||²``, by error 1's
  non-cancelling route. Shampoo-type methods have no natural scale: this separates shape from scale.
* :func:`solve_error`: ``||(F̂ + λI)⁻¹ ∇ - (F + λI)⁻¹ ∇|| / ||(F + λI)⁻¹ ∇||``, ``∇`` the layer's
  mini-batch gradient and ``λ`` the run's ``damping``: the error of the natural-gradient direction
  (or influence query) the approximation is used for. Exact side by Woodbury on the per-sample
  factors, ``(F + λI)⁻¹ v = (v - Jᵀ (NλI + JJᵀ)⁻¹ J v) / λ`` with the Gram matrix ``JJᵀ``
  (:meth:`~fisherlab.fisher.WholeFisher.natural_gradient`); approximate side by
  :func:`damped_solve` (closed forms in an eigenbasis, else conjugate gradients).
* :func:`kl_divergence`: ``KL(N(0, (F + λI)⁻¹) || N(0, (F̂ + λI)⁻¹))`` (exact posterior first),
  ``½ [tr((F̂ + λ)(F + λ)⁻¹) - D + ln det(F + λ) - ln det(F̂ + λ)]``, where the eigenvalues of
  ``F̂`` are known in closed form or densely (:func:`approximation_eigenvalues`), else NaN with the
  reason (a warning).

Both ``solve_error`` and ``kl_divergence`` are invariant under ``F, F̂, λ -> s F, s F̂, s λ``
(:meth:`~fisherlab.fisher.ExactBlock.normalised` scales ``λ`` with the block), and the same on a block
restricted to its sample span (``F`` and ``F̂`` are both ``λI`` on the complement; the gradient's part
there is kept as :attr:`~fisherlab.metrics.reference.BlockReference.gradient_outside`).
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.block_operators import (
    DenseBlockOperator,
    DiagonalBlockOperator,
    EigenbasisDiagonal,
    LiftedOperator,
    LowRankOperator,
    ScaledOperator,
)
from fisherlab.fisher import WholeFisher
from fisherlab.kron import KronSum
from fisherlab.metrics.error1 import FROBENIUS_RECOMPUTE_BELOW, _frobenius_difference, _inner
from fisherlab.metrics.error2 import SPECTRAL_DENSE_SIDE
from fisherlab.metrics.reference import BlockReference
from fisherlab.operators import BlockOperator

__all__ = [
    "CG_MAX_ITER",
    "CG_RTOL",
    "DENSE_SOLVE_SIDE",
    "KL_DENSE_SIDE",
    "KL_MEMORY_LIMIT",
    "approximation_eigenvalues",
    "damped_solve",
    "exact_damped_solve",
    "kl_divergence",
    "scale_free_error",
    "solve_error",
]

#: Relative residual ``||b - (F̂ + λI) x|| / ||b||`` at which conjugate gradients stop.
CG_RTOL = 1e-10
#: Conjugate-gradient iterations allowed before the solve falls back to a dense one (or NaN).
CG_MAX_ITER = 5000
#: Up to this side a solve that conjugate gradients could not finish (indefinite ``F̂ + λI``) is dense.
DENSE_SOLVE_SIDE = 4096
#: Up to this side the eigenvalues of an ``F̂`` without a closed form are computed densely (KL).
KL_DENSE_SIDE = SPECTRAL_DENSE_SIDE
#: Bytes the per-sample gradients ``J [N V, D]`` of the KL's trace term may take.
KL_MEMORY_LIMIT = 2**28


def _reason(why: str) -> str:
    """A NaN's reason with its numbers masked (sides and sizes differ by layer, the reason does not)."""
    return re.sub(r"\d[\d.,]*", "#", why)


def _warn(ref: BlockReference, method: str, metric: str, why: str) -> None:
    """One :class:`UndefinedMetricWarning` per (metric, reason): per run where the references share
    :attr:`BlockReference.warned <fisherlab.metrics.reference.BlockReference.warned>` (the probe's), else
    per reference; the first layer and method it happens to are named."""
    said = ref.warned if ref.warned is not None else ref.cache.setdefault("warned", set())
    key = (metric, _reason(why))
    if key in said:
        return
    said.add(key)
    warnings.warn(
        f"{metric} of {method or 'an approximation'} on layer {ref.layer!r} is stored as NaN: {why} (said once: "
        "further NaNs for this reason, other methods and layers included, are not warned about again)",
        UndefinedMetricWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------- scale-free


def _scaled(approx: BlockOperator, c: float) -> BlockOperator:
    """``c F̂``, a Kronecker sum where ``F̂`` is one (error 1's non-cancelling route needs it)."""
    if isinstance(approx, KronSum):
        return KronSum(tuple(c * o for o in approx.outs), approx.ins)
    return ScaledOperator(approx, c)


def scale_free_error(ref: BlockReference, approx: BlockOperator) -> float:
    """``min_c ||F - c F̂||_F / ||F||_F = sqrt(1 - <F, F̂>² / (||F||² ||F̂||²))``: error 1 up to the best scale.

    The minimiser is ``c* = <F, F̂> / ||F̂||²`` (any sign). The formula is ``1 - cos²`` and cancels when
    ``F̂`` is nearly proportional to ``F``: below :data:`~fisherlab.metrics.error1.FROBENIUS_RECOMPUTE_BELOW`
    it is recomputed as error 1 of ``c* F̂`` with the difference formed before squaring (where that fits
    error 1's limits). 1 when ``F̂ = 0``; NaN when ``F = 0``.
    """
    norm_squared = float(ref.norm_squared)
    if not norm_squared > 0:
        return math.nan
    inner = _inner(ref, approx)  # shared with error 1
    approx_squared = float(approx.frobenius_norm_squared())
    if not approx_squared > 0:
        return 1.0
    cos_squared = inner * inner / (norm_squared * approx_squared)
    value = math.sqrt(max(1.0 - cos_squared, 0.0))
    eps = torch.finfo(ref.block.factors.dtype).eps
    if value < FROBENIUS_RECOMPUTE_BELOW * math.sqrt(eps / torch.finfo(torch.float64).eps):
        exact = _frobenius_difference(ref.block, _scaled(approx, inner / approx_squared))
        if exact is not None:
            return exact / math.sqrt(norm_squared)
    return value


# ---------------------------------------------------------------------------------------------- solves


def exact_damped_solve(ref: BlockReference, v: Tensor, damping: float) -> Tensor:
    """``(F + λI)⁻¹ vec(V)`` by Woodbury on the per-sample factors: ``(v - Jᵀ (NλI + JJᵀ)⁻¹ J v) / λ``
    (:meth:`~fisherlab.fisher.WholeFisher.natural_gradient`: one ``N V``-sided solve with the Gram matrix)."""
    return WholeFisher((ref.block,)).natural_gradient([v], damping=damping)[0]


def _conjugate_gradients(approx: BlockOperator, b: Tensor, damping: float) -> Tensor | None:
    """``(F̂ + λI)⁻¹ b`` by conjugate gradients on ``F̂ w + λ w`` to :data:`CG_RTOL`; ``None`` on breakdown
    (non-positive curvature: ``F̂ + λI`` indefinite) or after :data:`CG_MAX_ITER` iterations."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.sum(r * r)
    target = (CG_RTOL * torch.linalg.vector_norm(b)) ** 2
    for _ in range(CG_MAX_ITER):
        if rr <= target:
            return x
        ap = approx.matvec(p) + damping * p
        curvature = torch.sum(p * ap)
        if not curvature > 0:
            return None
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.sum(r * r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x if rr <= target else None


def damped_solve(approx: object, v: Tensor, damping: float) -> tuple[Tensor | None, str]:
    """``(F̂ + λI)⁻¹ vec(V)`` (``+λI``, not :meth:`KronSum.solve <fisherlab.kron.KronSum.solve>`'s π-damping)
    and how it was computed (or why not: ``None``).

    Closed forms where ``F̂`` has its eigenvalues in an eigenbasis: a single Kronecker product
    ``out ⊗ in`` (``(Q_out ⊗ Q_in)(Λ_out ⊗ Λ_in + λ)⁻¹(Q_out ⊗ Q_in)ᵀ`` from the factors'
    eigendecompositions, :meth:`~fisherlab.kron.KronSum.factor_eigh`),
    :class:`~fisherlab.block_operators.EigenbasisDiagonal`,
    :class:`~fisherlab.block_operators.DiagonalBlockOperator`,
    :class:`~fisherlab.block_operators.LowRankOperator` and
    :class:`~fisherlab.block_operators.DenseBlockOperator` (their ``solve``), lifted and scaled ones
    through the operator they wrap; any other operator by conjugate gradients (:func:`_conjugate_gradients`),
    densely when those break down on an indefinite ``F̂ + λI`` of side at most :data:`DENSE_SOLVE_SIDE`.
    """
    if isinstance(approx, KronSum) and approx.rank == 1:
        (lo, qo), (li, qi) = approx.factor_eigh()  # computed once per sum, shared with EKFAC's basis and error 2
        qo, qi = qo.to(v.dtype), qi.to(v.dtype)
        inner = (qo.T @ v @ qi) / (torch.outer(lo, li).to(v.dtype) + damping)
        return qo @ inner @ qi.T, "closed form (one Kronecker product)"
    if isinstance(approx, EigenbasisDiagonal | DiagonalBlockOperator | LowRankOperator):
        return approx.solve(v, damping=damping), "closed form"
    if isinstance(approx, DenseBlockOperator):
        try:
            return approx.solve(v, damping=damping), "dense Cholesky"
        except FisherlabError:
            return None, "F_hat + damping I is not positive definite"
    if isinstance(approx, ScaledOperator) and approx.factor > 0:
        x, how = damped_solve(approx.operator, v, damping / approx.factor)
        return (None if x is None else x / approx.factor), how
    if isinstance(approx, LiftedOperator):
        restricted = approx._restrict(v)
        x, how = damped_solve(approx.operator, restricted, damping)
        if x is None:
            return None, how
        return approx._lift(x) + (v - approx._lift(restricted)) / damping, how
    x = _conjugate_gradients(approx, v, damping)  # type: ignore[arg-type]
    if x is not None:
        return x, "conjugate gradients"
    side = v.numel()
    if side > DENSE_SOLVE_SIDE:
        return None, (
            f"conjugate gradients did not reach {CG_RTOL:g} in {CG_MAX_ITER} iterations (F_hat + damping I "
            f"indefinite or ill-conditioned) and the side {side} exceeds {DENSE_SOLVE_SIDE} for a dense solve"
        )
    dense = approx.as_dense().to(v.dtype)  # type: ignore[attr-defined]
    eye = torch.eye(side, dtype=v.dtype, device=v.device)
    return torch.linalg.solve(dense + damping * eye, v.reshape(-1)).reshape(v.shape), "dense solve"


def solve_error(ref: BlockReference, approx: BlockOperator, method: str = "") -> float:
    """``||(F̂ + λI)⁻¹ ∇ - (F + λI)⁻¹ ∇|| / ||(F + λI)⁻¹ ∇||``, ``∇`` = :attr:`BlockReference.gradient
    <fisherlab.metrics.reference.BlockReference.gradient>`, ``λ`` = its ``damping``.

    On a block restricted to its sample span, ``∇``'s part outside the span (norm
    ``gradient_outside``) is solved alike by both sides (``/λ``): it adds to the denominator only.
    NaN (a warning says why) without a gradient or damping, or where ``F̂ + λI`` cannot be solved with.
    """
    if ref.gradient is None or ref.damping is None:
        _warn(ref, method, "solve_error", "no mini-batch gradient given (evaluate_block(..., gradient=, damping=))")
        return math.nan
    grad, damping = ref.gradient.to(ref.block.factors.dtype), ref.damping
    if "exact_solve" not in ref.cache:
        ref.cache["exact_solve"] = exact_damped_solve(ref, grad, damping)
    exact = ref.cache["exact_solve"]
    approximate, how = damped_solve(approx, grad, damping)
    if approximate is None:
        _warn(ref, method, "solve_error", how)
        return math.nan
    denominator = math.sqrt(float(torch.sum(exact * exact)) + (ref.gradient_outside / damping) ** 2)
    if not denominator > 0:
        return math.nan
    return float(torch.linalg.vector_norm(approximate.to(exact.dtype) - exact)) / denominator


# ---------------------------------------------------------------------------------------------- KL


def approximation_eigenvalues(approx: object) -> tuple[Tensor | None, str]:
    """Every eigenvalue of ``F̂`` (fewer: the rest are 0), or ``None`` and why not.

    Closed forms (a single Kronecker product, diagonal, eigenbasis-diagonal, low-rank, lifted and
    scaled ones of those); densely up to side :data:`KL_DENSE_SIDE` (``eigvalsh`` of ``as_dense``).
    """
    if isinstance(approx, KronSum):
        if approx.rank == 1 or approx.dim <= KL_DENSE_SIDE:
            return approx.eigenvalues(), ""
        return None, (
            f"the eigenvalues of a Kronecker-rank-{approx.rank} approximation of side {approx.dim} have no closed "
            f"form and exceed the dense limit {KL_DENSE_SIDE}"
        )
    closed = getattr(approx, "eigenvalues", None)
    if callable(closed) and not isinstance(approx, DenseBlockOperator):
        values = closed()
        if values is not None:
            return values, ""
    dim = getattr(approx, "dim", None) or approx.d_out * approx.d_in  # type: ignore[attr-defined]
    if dim <= KL_DENSE_SIDE:
        dense = approx.as_dense()  # type: ignore[attr-defined]
        return torch.linalg.eigvalsh((dense + dense.T) / 2), ""
    return None, (
        f"{type(approx).__name__} has no closed-form eigenvalues and its side {dim} exceeds the dense "
        f"limit {KL_DENSE_SIDE}"
    )


def _kl_reference(ref: BlockReference) -> tuple[Tensor, Tensor, Tensor] | str:
    """``(J, κ, W)``: per-sample gradients ``[N V, D]`` and the eigendecomposition ``K = W diag(κ) Wᵀ`` of
    the Gram matrix, once per reference; or why they are not available."""
    if "kl_reference" not in ref.cache:
        f = ref.block.factors
        rows = f.n_samples * f.n_directions
        if f.shard is not None and f.shard.world_size > 1:
            ref.cache["kl_reference"] = "the batch is sharded over processes"
        elif rows * f.dim * f.a.element_size() > KL_MEMORY_LIMIT:
            ref.cache["kl_reference"] = (
                f"the per-sample gradients [{rows}, {f.dim}] exceed {KL_MEMORY_LIMIT / 2**20:.0f} MiB"
            )
        else:
            gram = ref.block.gram()
            kappa, w = torch.linalg.eigh((gram + gram.T) / 2)
            ref.cache["kl_reference"] = (ref.block.jacobian(), kappa.clamp(min=0), w)
    return ref.cache["kl_reference"]


def kl_divergence(ref: BlockReference, approx: BlockOperator, method: str = "") -> float:
    """``KL(N(0, (F + λI)⁻¹) || N(0, (F̂ + λI)⁻¹))``: the exact Laplace posterior first.

    ``= ½ [tr((F̂ + λ)(F + λ)⁻¹) - D + ln det(F + λ) - ln det(F̂ + λ)]``, computed without ``D``-sized
    cancellation: with ``μ`` the eigenvalues of ``F`` (the Gram matrix's ``κ / N``) and ``ν`` those of ``F̂``,

    ``2 KL = tr(F̂ (F + λ)⁻¹) - Σ μ/(μ + λ) + Σ log1p(μ/λ) - Σ log1p(ν/λ)``,

    ``tr(F̂ (F + λ)⁻¹) = (tr F̂ - tr((NλI + K)⁻¹ J F̂ Jᵀ)) / λ`` by Woodbury (``N V`` products of ``F̂``).
    NaN (a warning says why) where ``ν`` is not available (:func:`approximation_eigenvalues`), where
    ``F̂ + λI`` is not positive definite, without a damping, or where ``J`` does not fit.
    """
    if ref.damping is None:
        _warn(ref, method, "kl_divergence", "no damping given (evaluate_block(..., damping=))")
        return math.nan
    lam = ref.damping
    nu, why = approximation_eigenvalues(approx)
    if nu is None:
        _warn(ref, method, "kl_divergence", why)
        return math.nan
    nu = nu.to(ref.block.factors.dtype)
    if not bool(torch.all(nu + lam > 0)):
        _warn(ref, method, "kl_divergence", "F_hat + damping I is not positive definite (an indefinite F_hat)")
        return math.nan
    exact = _kl_reference(ref)
    if isinstance(exact, str):
        _warn(ref, method, "kl_divergence", exact)
        return math.nan
    jac, kappa, w = exact
    n = ref.block.factors.n_samples
    f = ref.block.factors
    dw = jac.reshape(-1, f.d_out, f.d_in)
    chunk = max(1, KL_MEMORY_LIMIT // max(1, 8 * f.dim))
    products = (approx.matvec(dw[s : s + chunk]).reshape(-1, f.dim).to(jac.dtype) for s in range(0, len(dw), chunk))
    m = torch.cat([jac @ p.T for p in products], 1)  # J F̂ Jᵀ, [N V, N V]
    rotated = torch.einsum("ai,ab,bi->i", w, m, w)
    trace_approx_inverse = (float(nu.sum()) - float(torch.sum(rotated / (n * lam + kappa)))) / lam
    mu = kappa / n
    two_kl = (
        trace_approx_inverse
        - float(torch.sum(mu / (mu + lam)))
        + float(torch.sum(torch.log1p(mu / lam)))
        - float(torch.sum(torch.log1p(nu / lam)))
    )
    return 0.5 * two_kl
