"""Two-level KFAC (T §3): products with the whole Fisher, coarse spaces, β*, the TKO
variant, the exact damped natural gradient, and the gap ``E(β*) - E(0)`` (T eq. 4.6).

Parameter vectors are lists of per-layer ``[d_out, d_in]`` matrices (bias column last), in
the order of the probed layers; ``W.flatten()`` of each, concatenated, is the vector ``θ``.
With ``J`` the ``[N V, p]`` matrix of per-sample gradients of all probed layers,
``F = JᵀJ / N`` and ``F• = F + λI`` (T eq. 2.17). Nothing here forms ``F``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.approximations import kfac_factors
from fisherlab.distributed import all_reduce_sum
from fisherlab.fisher import WholeFisher
from fisherlab.kron import KronSum, pi_damping
from fisherlab.metrics.registry import NETWORK_METRICS, NetworkMetric
from fisherlab.operators import BlockDiagonal, Params, axpy, dot, solve_all
from fisherlab.vocabulary import TKO, CoarseSpace

if TYPE_CHECKING:
    from fisherlab.approximations import Approximation
    from fisherlab.kron import KronSolver
    from fisherlab.probe import ProbeSnapshot

__all__ = [
    "TKO",
    "TWO_LEVEL_METRICS",
    "CoarseSpace",
    "TwoLevelResult",
    "WholeFisher",
    "coarse_basis",
    "coarse_solve",
    "coarse_step",
    "cosine",
    "damped_kfac_solve",
    "energy_error",
    "prolong",
    "restrict",
    "smallest_eigenvector",
    "tko_coarse_operator",
    "two_level",
    "two_level_metrics",
    "two_level_metrics_of_snapshot",
]


#: Coarse-space key of the Tselepidis-Kohler-Orvieto variant (T eq. 3.18, 4.7b).
def damped_kfac_solve(kfacs: Sequence[KronSum], grads: Params, *, damping: float) -> Params:
    """``ζ_KFAC = F•KFAC⁻¹ ∇h`` with π-damping per layer (T eq. 2.30, 3.3, 3.8)."""
    return BlockDiagonal(tuple(kfacs)).solve(grads, damping=damping)


def coarse_basis(
    space: CoarseSpace | str,
    kfacs: Sequence[KronSum],
    residual: Params,
    *,
    damping: float,
    fisher: WholeFisher | None = None,
    order: int = 2,
    solvers: Sequence[KronSolver] | None = None,
) -> list[Tensor]:
    """Per-layer coarse columns ``V_i`` of shape ``[m_i, d_out, d_in]`` (T eq. 3.21-3.38).

    * ``nicolaides``: ``V_i = 1`` (eq. 3.24).
    * ``spectral``: eigenvector of the smallest eigenvalue of the damped KFAC block,
      ``v_G ⊗ v_A`` (eq. 3.25-3.28); when that eigenvalue is repeated, the vector is chosen
      deterministically by :func:`smallest_eigenvector`.
    * ``krylov_nicolaides``: ``[1, K_i⁻¹ 1]`` (eq. 3.29 with ``m_i = 2``).
    * ``residuals``: ``K_i⁻¹ r_KFAC[i]`` (eq. 3.32).
    * ``krylov_residuals``: ``[v, K_i⁻¹ v]`` with ``v = K_i⁻¹ r_KFAC[i]`` (eq. 3.29 started
      from the residuals vector, so it contains the residuals coarse space).
    * ``taylor``: ``[w_1[i], …, w_q[i]]``, ``w_1 = F•KFAC⁻¹ r``, ``w_{j+1} = F•KFAC⁻¹ F• w_j``
      (eq. 3.36-3.38, ``q = order``; described but not implemented in T). ``q = 1`` is
      ``residuals``.

    Here ``K_i = [F•KFAC]_ii``. Columns may vanish (e.g. a zero residual); the solves in
    :func:`two_level` use a pseudo-inverse, so a rank-deficient basis is handled. ``solvers`` are the
    factorised ``K_i⁻¹`` (:meth:`BlockDiagonal.solvers` of ``kfacs`` with this ``damping``) when the
    caller already has them; else they are factorised here, for the spaces that use them.
    """
    space = CoarseSpace(space)
    if space == CoarseSpace.TKO:  # TKO changes β and F_coarse (T eq. 4.7b, 3.18), not the basis
        space = CoarseSpace.NICOLAIDES
    ones = [torch.ones(k.d_out, k.d_in, dtype=k.outs[0].dtype, device=k.outs[0].device) for k in kfacs]
    if space == CoarseSpace.NICOLAIDES:
        return [o[None] for o in ones]
    if space == CoarseSpace.SPECTRAL:
        cols = []
        for k in kfacs:
            out, in_ = pi_damping(k.outs[0], k.ins[0], damping)
            cols.append(torch.outer(smallest_eigenvector(out), smallest_eigenvector(in_))[None])
        return cols
    inv = BlockDiagonal(tuple(kfacs)).solvers(damping=damping) if solvers is None else solvers  # K_i⁻¹
    if space == CoarseSpace.KRYLOV_NICOLAIDES:
        return [torch.stack([o, f(o)]) for o, f in zip(ones, inv, strict=True)]
    w = [f(r) for f, r in zip(inv, residual, strict=True)]
    if space == CoarseSpace.RESIDUALS:
        return [x[None] for x in w]
    if space == CoarseSpace.KRYLOV_RESIDUALS:
        return [torch.stack([x, f(x)]) for x, f in zip(w, inv, strict=True)]
    if fisher is None:
        raise FisherlabError("the Taylor coarse space needs products with the whole Fisher")
    if order < 1:
        raise FisherlabError(f"Taylor order must be at least 1, got {order}")
    ws = [w]
    for _ in range(order - 1):
        fw = fisher.matvec(ws[-1], damping=damping)
        ws.append([f(x) for f, x in zip(inv, fw, strict=True)])
    return [torch.stack([wj[i] for wj in ws]) for i in range(len(kfacs))]


def smallest_eigenvector(m: Tensor, *, rtol: float = 1e-10) -> Tensor:
    """A unit eigenvector of the smallest eigenvalue of the symmetric ``m``, chosen deterministically.

    When the smallest eigenvalue is repeated (within ``rtol`` of the largest magnitude) any
    vector of its eigenspace would do and ``eigh`` returns an arbitrary one. This returns the
    normalised projection of the all-ones vector (the Nicolaides direction) onto that
    eigenspace, or of the first unit vector ``e_1, e_2, …`` not orthogonal to it; the sign is
    fixed so that the entries sum to a positive number (else the first nonzero entry is positive).
    """
    w, q = torch.linalg.eigh(m)
    tol = rtol * float(w.abs().max()) if w.numel() else 0.0
    space = q[:, w <= w[0] + tol]
    if space.shape[1] == 1:
        v = space[:, 0]
    else:
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        for probe in (torch.ones_like(w), *eye):
            v = space @ (space.T @ probe)
            if float(torch.linalg.norm(v)) > 1e-8 * float(torch.linalg.norm(probe)):
                break
        v = v / torch.linalg.norm(v)
    total = float(v.sum())
    if abs(total) > 1e-12:
        return v if total > 0 else -v
    first = v[torch.nonzero(v.abs() > 1e-12)[0, 0]]
    return v if float(first) > 0 else -v


def restrict(basis: list[Tensor], x: Params) -> Tensor:
    """``R₀ x``: the coarse components ``⟨V_ik, x_i⟩``."""
    return torch.cat([torch.einsum("koi,oi->k", v, xi) for v, xi in zip(basis, x, strict=True)])


def prolong(basis: list[Tensor], beta: Tensor) -> Params:
    """``R₀ᵀ β``: ``sum_k β_ik V_ik`` per layer."""
    out, start = [], 0
    for v in basis:
        out.append(torch.einsum("k,koi->oi", beta[start : start + v.shape[0]], v))
        start += v.shape[0]
    return out


def coarse_solve(f_coarse: Tensor, rhs: Tensor) -> Tensor:
    """``β = F_coarse⁺ rhs``: the minimum-norm solution (T eq. 3.11), so that a rank-deficient
    coarse basis (a vanished column) is handled; ``torch.linalg.pinv`` with ``hermitian=True``."""
    rtol = 10 * f_coarse.shape[0] * torch.finfo(f_coarse.dtype).eps
    return torch.linalg.pinv((f_coarse + f_coarse.T) / 2, hermitian=True, rtol=rtol) @ rhs


def tko_coarse_operator(
    fisher: WholeFisher, kfacs: Sequence[KronSum], basis: list[Tensor], *, damping: float
) -> Tensor:
    """``R₀ F̄• R₀ᵀ`` with F̄• of T eq. 3.18: damped KFAC blocks on the diagonal and
    ``E[g_i g_jᵀ] ⊗ E[ā_i ā_jᵀ]`` off it (Tselepidis, Kohler & Orvieto 2020).

    For conv layers ``ā`` is the mean over positions and ``g`` the sum over positions (so a
    Linear layer is unchanged): our extension, the paper defines 3.18 for MLPs.
    """
    n = fisher.n_samples
    a_bar = [b.factors.a.mean(1) for b in fisher.blocks]  # [N, d_in]
    g_sum = [b.factors.g.sum(2) for b in fisher.blocks]  # [N, V, d_out]
    sizes = [v.shape[0] for v in basis]
    m = sum(sizes)
    out = torch.zeros(m, m, dtype=basis[0].dtype, device=basis[0].device)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    for i, vi in enumerate(basis):
        for j, vj in enumerate(basis):
            if i == j:
                o, a = pi_damping(kfacs[i].outs[0], kfacs[i].ins[0], damping)
            else:
                o = all_reduce_sum(torch.einsum("nvo,nvp->op", g_sum[i], g_sum[j]), fisher.shard) / n
                a = all_reduce_sum(a_bar[i].T @ a_bar[j], fisher.shard) / n
            block = torch.einsum("koi,op,lpj,ij->kl", vi, o, vj, a)
            out[offs[i] : offs[i] + sizes[i], offs[j] : offs[j] + sizes[j]] = block
    return out


def coarse_step(
    space: CoarseSpace | str,
    fisher: WholeFisher,
    kfacs: Sequence[KronSum],
    grads: Params,
    residual: Params,
    *,
    damping: float,
    order: int = 2,
    solvers: Sequence[KronSolver] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """The coarse basis ``R₀ᵀ`` and coefficients of one two-level correction ``ζ_KFAC + R₀ᵀβ``.

    A coarse space gives ``β* = F_coarse⁻¹ R₀ r_KFAC`` (T eq. 3.11, 3.12); ``"tko"`` gives
    ``β_TKO = (R₀ F̄• R₀ᵀ)⁻¹ R₀ ∇h`` on the Nicolaides space (T eq. 4.7b with F̄• of eq. 3.18).
    ``solvers``: the factorised ``K_i⁻¹`` if the caller has them (see :func:`coarse_basis`).

    Returns:
        ``(basis, β)``; the correction is ``prolong(basis, β)``.
    """
    if space == CoarseSpace.TKO:
        basis = coarse_basis(CoarseSpace.NICOLAIDES, kfacs, residual, damping=damping)
        return basis, coarse_solve(tko_coarse_operator(fisher, kfacs, basis, damping=damping), restrict(basis, grads))
    basis = coarse_basis(space, kfacs, residual, damping=damping, fisher=fisher, order=order, solvers=solvers)
    return basis, coarse_solve(fisher.coarse_operator(basis, damping=damping), restrict(basis, residual))


@dataclass(frozen=True)
class TwoLevelResult:
    """Everything T §4.4 measures for one probed batch, plus the exact quantities.

    Args:
        zeta: The exact damped natural gradient ``ζ = F•⁻¹ ∇h`` (Woodbury).
        zeta_kfac: ``ζ_KFAC``.
        residual: ``r_KFAC = ∇h - F• ζ_KFAC`` (T eq. 3.13).
        energy_kfac: ``E(0) = ‖ζ_KFAC - ζ‖²_{F•}`` (T eq. 4.2).
        energy_zeta: ``‖ζ‖²_{F•}``, for relative errors.
        betas: ``β*`` (T eq. 3.11) per coarse space; key ``"tko"`` holds ``β_TKO`` (eq. 4.7b
            with ``F_coarse`` of eq. 3.18, Nicolaides space).
        increments: ``ζ_KFAC-2L = ζ_KFAC + R₀ᵀβ`` per coarse space (and ``"tko"``).
        gaps: ``E(β) - E(0)`` by T eq. 4.6 per coarse space (and ``"tko"``).
        energies: ``E(β) = ‖ζ_2L - ζ‖²_{F•}`` computed directly (not in the paper).
    """

    zeta: Params
    zeta_kfac: Params
    residual: Params
    energy_kfac: float
    energy_zeta: float
    betas: dict[str, Tensor]
    increments: dict[str, Params]
    gaps: dict[str, float]
    energies: dict[str, float]


def two_level(
    fisher: WholeFisher,
    grads: Params,
    *,
    damping: float,
    spaces: Sequence[CoarseSpace | str] = tuple(CoarseSpace),
    taylor_order: int = 2,
) -> TwoLevelResult:
    """ζ_KFAC, every two-level increment, β*, β_TKO, the gaps and the exact ζ for one batch.

    Args:
        fisher: The Fisher of all probed layers.
        grads: Mini-batch gradient ``∇h`` per layer, true targets (``ProbeSnapshot.gradients``).
        damping: ``λ`` of ``F• = F + λI`` and of the π-damped KFAC (T eq. 2.17, 2.30).
        spaces: Coarse spaces to evaluate (:attr:`CoarseSpace.TKO` for the Tselepidis-Kohler-Orvieto variant).
        taylor_order: ``q`` of the Taylor coarse space.

    References:
        Koroko et al., two-level KFAC (T), eq. 3.11-3.13, 3.18, 4.6, 4.7.
    """
    if damping <= 0:
        raise FisherlabError(f"--damping must be positive, got {damping}")
    kfacs = [kfac_factors(b).to(b.factors.dtype) for b in fisher.blocks]
    zeta = fisher.natural_gradient(grads, damping=damping)
    inv = BlockDiagonal(tuple(kfacs)).solvers(damping=damping)  # K_i⁻¹, factorised once for ζ_KFAC and the spaces
    zeta_k = solve_all(inv, grads)  # damped_kfac_solve
    residual = axpy(-1.0, fisher.matvec(zeta_k, damping=damping), grads)
    err_k = axpy(-1.0, zeta, zeta_k)
    energy_k = float(fisher.energy_inner(err_k, err_k, damping=damping))
    energy_z = float(fisher.energy_inner(zeta, zeta, damping=damping))
    betas: dict[str, Tensor] = {}
    incs: dict[str, Params] = {}
    gaps: dict[str, float] = {}
    energies: dict[str, float] = {}
    keys = list(dict.fromkeys(CoarseSpace(c).value for c in spaces))
    for key in keys:
        basis, beta = coarse_step(key, fisher, kfacs, grads, residual, damping=damping, order=taylor_order, solvers=inv)
        f_coarse = fisher.coarse_operator(basis, damping=damping)
        correction = prolong(basis, beta)
        betas[key] = beta
        incs[key] = axpy(1.0, correction, zeta_k)
        gaps[key] = float(beta @ f_coarse @ beta - 2 * dot(correction, residual))  # T eq. 4.6
        err = axpy(-1.0, zeta, incs[key])
        energies[key] = float(fisher.energy_inner(err, err, damping=damping))
    return TwoLevelResult(zeta, zeta_k, residual, energy_k, energy_z, betas, incs, gaps, energies)


def energy_error(fisher: WholeFisher, increment: Params, zeta: Params, *, damping: float) -> float:
    """``‖ζ_method - ζ‖_{F•} / ‖ζ‖_{F•}``."""
    err = axpy(-1.0, zeta, increment)
    return float(
        torch.sqrt(fisher.energy_inner(err, err, damping=damping) / fisher.energy_inner(zeta, zeta, damping=damping))
    )


def cosine(x: Params, y: Params) -> float:
    """Euclidean cosine between two parameter vectors."""
    return float(dot(x, y) / torch.sqrt(dot(x, x) * dot(y, y)))


# -- the two-level metrics of a probe snapshot (T §4.4) ------------------------------------

#: Stored variables of two-level runs (``--two-level``); ``coarse_space`` includes ``tko``: the
#: whole-network entries of the metric registry (:data:`fisherlab.metrics.NETWORK_METRICS`).
TWO_LEVEL_METRICS: tuple[NetworkMetric, ...] = NETWORK_METRICS


def two_level_metrics(
    fisher: WholeFisher,
    grads: Params,
    approximations: Mapping[str, BlockDiagonal | None],
    *,
    damping: float,
    spaces: Sequence[CoarseSpace | str],
    taylor_order: int = 2,
) -> tuple[dict[str, np.ndarray | float], list[str]]:
    """Every :data:`TWO_LEVEL_METRICS` value of one snapshot.

    Args:
        fisher: The Fisher of all probed layers.
        grads: ``∇h`` per layer (true targets).
        approximations: Per method, its block-diagonal approximation of ``F`` (one block per layer);
            ``None`` for a method whose operators are not Kronecker sums (its values are NaN).
        damping: ``λ``.
        spaces: Coarse spaces (:attr:`CoarseSpace.TKO` among them for β_TKO).
        taylor_order: ``q`` of the Taylor space.

    Returns:
        ``(values by variable name, the coarse_space labels)``; per-method values follow the
        order of ``approximations``; a method of Kronecker rank above 2 (K §3.4 solves rank ≤ 2
        only) is NaN.
    """
    res = two_level(fisher, grads, damping=damping, spaces=spaces, taylor_order=taylor_order)
    keys = list(dict.fromkeys(CoarseSpace(c).value for c in spaces))
    block_e = np.full(len(approximations), np.nan)
    block_c = np.full(len(approximations), np.nan)
    for mi, diagonal in enumerate(approximations.values()):
        if diagonal is None or max(k.rank for k in diagonal.blocks) > 2:  # type: ignore[attr-defined]
            continue
        zeta_m = diagonal.solve(grads, damping=damping)
        block_e[mi] = energy_error(fisher, zeta_m, res.zeta, damping=damping)
        block_c[mi] = cosine(zeta_m, res.zeta)
    values: dict[str, np.ndarray | float] = {
        "gap": np.array([res.gaps[c] for c in keys]),
        "energy_error": np.array([energy_error(fisher, res.increments[c], res.zeta, damping=damping) for c in keys]),
        "cosine": np.array([cosine(res.increments[c], res.zeta) for c in keys]),
        "energy_two_level": np.array([res.energies[c] for c in keys]),
        "block_energy_error": block_e,
        "block_cosine": block_c,
        "energy_kfac": res.energy_kfac,
        "energy_natural_gradient": res.energy_zeta,
    }
    return values, keys


def two_level_metrics_of_snapshot(
    snapshot: ProbeSnapshot,
    approximations: Mapping[str, Mapping[str, Approximation]],
    methods: Sequence[str],
    *,
    damping: float,
    spaces: Sequence[CoarseSpace | str],
    taylor_order: int = 2,
) -> tuple[dict[str, np.ndarray | float], list[str]]:
    """:func:`two_level_metrics` of one probe snapshot: the Fisher of every captured layer (in capture
    order), ``∇h`` of each, and per method the block-diagonal of its approximations of those layers.

    Args:
        snapshot: A probe pass over every layer (two-level increments need all of them).
        approximations: Per layer (every layer of ``snapshot``), per method, its approximation.
        methods: The methods, in the order of the per-method values.
        damping: ``λ``.
        spaces: Coarse spaces (:attr:`CoarseSpace.TKO` among them for β_TKO).
        taylor_order: ``q`` of the Taylor space.

    Returns:
        As :func:`two_level_metrics`; a method whose operator is not a :class:`~fisherlab.kron.KronSum`
        on every layer (no Kronecker solve) is NaN.
    """
    order = list(snapshot.factors)
    diagonals = {
        m: BlockDiagonal(tuple(approximations[n][m].kron for n in order))
        if all(isinstance(approximations[n][m].operator, KronSum) for n in order)
        else None
        for m in methods
    }
    return two_level_metrics(
        snapshot.whole_fisher(order),
        [snapshot.gradients[n] for n in order],
        diagonals,
        damping=damping,
        spaces=spaces,
        taylor_order=taylor_order,
    )
