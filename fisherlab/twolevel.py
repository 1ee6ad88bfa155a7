"""Two-level KFAC (T §3): products with the whole Fisher, coarse spaces, β*, the TKO
variant, the exact damped natural gradient, and the gap ``E(β*) - E(0)`` (T eq. 4.6).

Parameter vectors are lists of per-layer ``[d_out, d_in]`` matrices (bias column last), in
the order of the probed layers; ``W.flatten()`` of each, concatenated, is the vector ``θ``.
With ``J`` the ``[N V, p]`` matrix of per-sample gradients of all probed layers,
``F = JᵀJ / N`` and ``F• = F + λI`` (T eq. 2.17). Nothing here forms ``F``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum, pi_damping

__all__ = [
    "CoarseSpace",
    "TwoLevelResult",
    "WholeFisher",
    "coarse_basis",
    "damped_kfac_solve",
    "pinv_solve",
    "prolong",
    "restrict",
    "smallest_eigenvector",
    "two_level",
]

Params = list[Tensor]


def _dot(x: Params, y: Params) -> Tensor:
    return sum((torch.sum(a * b) for a, b in zip(x, y, strict=True)), torch.zeros((), dtype=x[0].dtype, device=x[0].device))


def _axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    return [alpha * a + b for a, b in zip(x, y, strict=True)]


@dataclass(frozen=True)
class WholeFisher:
    """The Fisher of all probed layers, ``F = JᵀJ / N``, from per-sample factors (T App. A.2).

    Args:
        blocks: The exact blocks of every probed layer, from one probe pass (same samples
            and directions).
    """

    blocks: tuple[ExactBlock, ...]

    def __post_init__(self) -> None:
        n = {(b.factors.n_samples, b.factors.n_directions) for b in self.blocks}
        if len(n) != 1:
            raise FisherlabError("WholeFisher needs blocks from one probe pass (same N and V)")

    @property
    def n_samples(self) -> int:
        """``N``."""
        return self.blocks[0].factors.n_samples

    def jvp(self, u: Params) -> Tensor:
        """``J u`` as ``[N, V]``: ``(J u)_nv = sum_i sum_t g_nvt,iᵀ U_i a_nt,i`` (T App. A.2)."""
        return sum(torch.einsum("nvto,oi,nti->nv", b.factors.g, ui, b.factors.a) for b, ui in zip(self.blocks, u, strict=True))  # type: ignore[return-value]

    def vjp(self, c: Tensor) -> Params:
        """``Jᵀ c`` for ``c`` of shape ``[N, V]``: ``sum_{n,v,t} c_nv g_nvt a_ntᵀ`` per layer."""
        return [torch.einsum("nv,nvto,nti->oi", c, b.factors.g, b.factors.a) for b in self.blocks]

    def matvec(self, u: Params, *, damping: float = 0.0) -> Params:
        """``F• u = Jᵀ(J u) / N + λ u`` (T App. A.2)."""
        fu = self.vjp(self.jvp(u) / self.n_samples)
        return _axpy(damping, u, fu) if damping else fu

    def energy_inner(self, x: Params, y: Params, *, damping: float) -> Tensor:
        """``⟨x, y⟩_{F•} = (Jx)·(Jy) / N + λ x·y``."""
        return torch.sum(self.jvp(x) * self.jvp(y)) / self.n_samples + damping * _dot(x, y)

    def gram(self) -> Tensor:
        """``J Jᵀ = sum_i K_i`` of shape ``[N V, N V]`` (sum of the per-layer Gram matrices)."""
        return sum(b.gram() for b in self.blocks)  # type: ignore[return-value]

    def natural_gradient(self, grads: Params, *, damping: float) -> Params:
        """The exact damped natural gradient ``ζ = (F + λI)⁻¹ ∇h`` by Woodbury.

        ``ζ = (∇h - Jᵀ (NλI + JJᵀ)⁻¹ J ∇h) / λ``: one ``N V``-sided solve, no ``p``-sided one.
        """
        if damping <= 0:
            raise FisherlabError("the exact natural gradient needs a positive damping λ")
        gram = self.gram()
        n, v = self.blocks[0].factors.n_samples, self.blocks[0].factors.n_directions
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        jg = self.jvp(grads).reshape(-1)
        c = torch.linalg.solve(n * damping * eye + gram, jg).reshape(n, v)
        return [(g - jc) / damping for g, jc in zip(grads, self.vjp(c), strict=True)]

    def coarse_operator(self, basis: list[Tensor], *, damping: float) -> Tensor:
        """``F_coarse = R₀ F• R₀ᵀ = (J R₀ᵀ)ᵀ(J R₀ᵀ)/N + λ R₀R₀ᵀ`` (T eq. 3.12, App. A.3).

        Args:
            basis: Per layer the coarse columns ``V_i`` as ``[m_i, d_out, d_in]``.
        """
        cols = [torch.einsum("nvto,koi,nti->nvk", b.factors.g, v, b.factors.a) for b, v in zip(self.blocks, basis, strict=True)]
        jr = torch.cat(cols, dim=2).reshape(-1, sum(v.shape[0] for v in basis))
        gram_v = torch.block_diag(*[v.flatten(1) @ v.flatten(1).T for v in basis])
        return jr.T @ jr / self.n_samples + damping * gram_v

    def as_dense(self, *, damping: float = 0.0) -> Tensor:
        """Dense ``F•`` of all probed layers; small networks, tests and notebooks only."""
        jac = torch.cat([b.jacobian() for b in self.blocks], dim=1)
        f = jac.T @ jac / self.n_samples
        return f + damping * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)


class CoarseSpace(str, Enum):
    """Coarse spaces of T §3.3 (values are the dataset's ``coarse_space`` coordinate)."""

    NICOLAIDES = "nicolaides"
    SPECTRAL = "spectral"
    KRYLOV_NICOLAIDES = "krylov_nicolaides"
    RESIDUALS = "residuals"
    KRYLOV_RESIDUALS = "krylov_residuals"
    TAYLOR = "taylor"


def damped_kfac_solve(kfacs: Sequence[KronSum], grads: Params, *, damping: float) -> Params:
    """``ζ_KFAC = F•KFAC⁻¹ ∇h`` with π-damping per layer (T eq. 2.30, 3.3, 3.8)."""
    return [k.solve(g, damping=damping) for k, g in zip(kfacs, grads, strict=True)]


def coarse_basis(
    space: CoarseSpace | str,
    kfacs: Sequence[KronSum],
    residual: Params,
    *,
    damping: float,
    fisher: WholeFisher | None = None,
    order: int = 2,
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
    :func:`two_level` use a pseudo-inverse, so a rank-deficient basis is handled.
    """
    space = CoarseSpace(space)
    inv = [lambda x, k=k: k.solve(x, damping=damping) for k in kfacs]
    ones = [torch.ones(k.d_out, k.d_in, dtype=k.outs[0].dtype, device=k.outs[0].device) for k in kfacs]
    if space == CoarseSpace.NICOLAIDES:
        return [o[None] for o in ones]
    if space == CoarseSpace.SPECTRAL:
        cols = []
        for k in kfacs:
            out, in_ = pi_damping(k.outs[0], k.ins[0], damping)
            cols.append(torch.outer(smallest_eigenvector(out), smallest_eigenvector(in_))[None])
        return cols
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


def pinv_solve(mat: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm solution of a symmetric PSD system (drops a rank-deficient part)."""
    w, q = torch.linalg.eigh((mat + mat.T) / 2)
    cutoff = w.abs().max() * mat.shape[0] * torch.finfo(mat.dtype).eps * 10 if w.numel() else 0
    inv_w = torch.where(w > cutoff, 1.0 / w, torch.zeros_like(w))
    return q @ (inv_w * (q.T @ rhs))


def tko_coarse_operator(fisher: WholeFisher, kfacs: Sequence[KronSum], basis: list[Tensor], *, damping: float) -> Tensor:
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
                o = torch.einsum("nvo,nvp->op", g_sum[i], g_sum[j]) / n
                a = a_bar[i].T @ a_bar[j] / n
            block = torch.einsum("koi,op,lpj,ij->kl", vi, o, vj, a)
            out[offs[i] : offs[i] + sizes[i], offs[j] : offs[j] + sizes[j]] = block
    return out


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
    tko: bool = True,
) -> TwoLevelResult:
    """ζ_KFAC, every two-level increment, β*, β_TKO, the gaps and the exact ζ for one batch.

    Args:
        fisher: The Fisher of all probed layers.
        grads: Mini-batch gradient ``∇h`` per layer, true targets (``ProbeSnapshot.gradients``).
        damping: ``λ`` of ``F• = F + λI`` and of the π-damped KFAC (T eq. 2.17, 2.30).
        spaces: Coarse spaces to evaluate.
        taylor_order: ``q`` of the Taylor coarse space.
        tko: Also evaluate the Tselepidis-Kohler-Orvieto variant.

    References:
        Koroko et al., two-level KFAC (T), eq. 3.11-3.13, 3.18, 4.6, 4.7.
    """
    if damping <= 0:
        raise FisherlabError(f"--damping must be positive, got {damping}")
    kfacs = [b.kfac() for b in fisher.blocks]
    zeta = fisher.natural_gradient(grads, damping=damping)
    zeta_k = damped_kfac_solve(kfacs, grads, damping=damping)
    residual = _axpy(-1.0, fisher.matvec(zeta_k, damping=damping), grads)
    err_k = _axpy(-1.0, zeta, zeta_k)
    energy_k = float(fisher.energy_inner(err_k, err_k, damping=damping))
    energy_z = float(fisher.energy_inner(zeta, zeta, damping=damping))
    betas: dict[str, Tensor] = {}
    incs: dict[str, Params] = {}
    gaps: dict[str, float] = {}
    energies: dict[str, float] = {}

    def record(key: str, basis: list[Tensor], beta: Tensor, f_coarse: Tensor) -> None:
        correction = prolong(basis, beta)
        betas[key] = beta
        incs[key] = _axpy(1.0, correction, zeta_k)
        gaps[key] = float(beta @ f_coarse @ beta - 2 * _dot(correction, residual))  # T eq. 4.6
        err = _axpy(-1.0, zeta, incs[key])
        energies[key] = float(fisher.energy_inner(err, err, damping=damping))

    for space in spaces:
        space = CoarseSpace(space)
        basis = coarse_basis(space, kfacs, residual, damping=damping, fisher=fisher, order=taylor_order)
        f_coarse = fisher.coarse_operator(basis, damping=damping)
        record(space.value, basis, pinv_solve(f_coarse, restrict(basis, residual)), f_coarse)
    if tko:
        basis = coarse_basis(CoarseSpace.NICOLAIDES, kfacs, residual, damping=damping)
        f_bar = tko_coarse_operator(fisher, kfacs, basis, damping=damping)
        record("tko", basis, pinv_solve(f_bar, restrict(basis, grads)), fisher.coarse_operator(basis, damping=damping))
    return TwoLevelResult(zeta, zeta_k, residual, energy_k, energy_z, betas, incs, gaps, energies)


def energy_error(fisher: WholeFisher, increment: Params, zeta: Params, *, damping: float) -> float:
    """``‖ζ_method - ζ‖_{F•} / ‖ζ‖_{F•}``."""
    err = _axpy(-1.0, zeta, increment)
    return float(torch.sqrt(fisher.energy_inner(err, err, damping=damping) / fisher.energy_inner(zeta, zeta, damping=damping)))


def cosine(x: Params, y: Params) -> float:
    """Euclidean cosine between two parameter vectors."""
    return float(_dot(x, y) / torch.sqrt(_dot(x, x) * _dot(y, y)))
