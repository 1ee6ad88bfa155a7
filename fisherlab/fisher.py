"""The exact Fisher of a layer, kept as per-sample factors and never formed densely.

With ``DW_nv = sum_t g_nvt a_nt^T`` (see :mod:`fisherlab.layers`) and
``F = (1/N) sum_{n,v} vec(DW_nv) vec(DW_nv)^T`` every quantity the papers need is a
contraction of ``(a, g)``:

* van Loan products (K Prop. 3.1): with ``R(F) = sum vec(out) vec(in_)^T`` the rearrangement
  for which ``||F - X ⊗ Y||_F = ||R(F) - vec X vec Y^T||_F``,
  ``R(F) vec(Y) = (1/N) sum DW Y DW^T`` and ``R(F)^T vec(X) = (1/N) sum DW^T X DW``; for a
  conv layer ``DW Y DW^T = G_n^T (A_n Y A_n^T) G_n`` sums over all position pairs.
* the Gram matrix ``K = [<DW_nv, DW_mw>]``: ``||F||_F = ||K||_F / N`` and the nonzero
  eigenvalues of ``F`` are those of ``K / N``;
* inner products ``<F, X ⊗ Y>_F = vec(X)^T R(F) vec(Y)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors

__all__ = ["ExactBlock", "cross_block_dense", "full_fisher_dense"]

_GRAM_CHUNK_ELEMENTS = 2**25
#: Conv layers keep their per-sample gradients when ``N V d_out d_in`` is at most this
#: (float64: 256 MiB); products then cost ``O(N V d_out d_in (d_out + d_in))`` instead of
#: ``O(N V T² (d_out + d_in))`` for the position-pair formulas.
PER_SAMPLE_GRADIENT_LIMIT = 2**25


@dataclass(frozen=True)
class ExactBlock:
    """The exact Fisher block ``F_ii`` of one layer, as per-sample factors.

    Args:
        factors: ``a [N, T, d_in]`` and ``g [N, V, T, d_out]`` (see :mod:`fisherlab.layers`).

    References:
        Koroko et al. (2022), Sec. 2.1 and Prop. 3.1; Grosse & Martens (2016) for conv layers.
    """

    factors: LayerFactors

    @property
    def dim(self) -> int:
        """Side ``d_out * d_in`` of the block."""
        return self.factors.dim

    @property
    def max_rank(self) -> int:
        """An upper bound on the rank: ``min(N V, d_out d_in)``."""
        f = self.factors
        return min(f.n_samples * f.n_directions, f.dim)

    @cached_property
    def _dw(self) -> Tensor | None:
        """Per-sample gradients ``[N V, d_out, d_in]`` of a conv layer when small enough, else None."""
        f = self.factors
        if f.n_positions == 1 or f.n_samples * f.n_directions * f.dim > PER_SAMPLE_GRADIENT_LIMIT:
            return None
        return f.per_sample_gradients().reshape(-1, f.d_out, f.d_in)

    def rearranged_matvec(self, y: Tensor) -> Tensor:
        """``R(F) vec(Y) = (1/N) sum_{n,v} DW_nv Y DW_nv^T``, a ``[d_out, d_out]`` matrix.

        For ``T = 1`` this is ``(1/N) sum (a^T Y a) g g^T`` (K Prop. 3.1); for conv layers it
        sums over all position pairs, through the per-sample gradients when they are small.
        """
        a, g = self.factors.a, self.factors.g
        n = a.shape[0]
        if self._dw is not None:
            return torch.einsum("moi,ij,mpj->op", self._dw, y, self._dw) / n
        if a.shape[1] == 1:
            c = torch.einsum("ni,ij,nj->n", a[:, 0], y, a[:, 0])
            return torch.einsum("nvo,n,nvp->op", g[:, :, 0], c, g[:, :, 0]) / n
        c = torch.einsum("nti,ij,nsj->nts", a, y, a)
        return torch.einsum("nvto,nts,nvsp->op", g, c, g) / n

    def rearranged_rmatvec(self, x: Tensor) -> Tensor:
        """``R(F)^T vec(X) = (1/N) sum_{n,v} DW_nv^T X DW_nv``, a ``[d_in, d_in]`` matrix."""
        a, g = self.factors.a, self.factors.g
        n = a.shape[0]
        if self._dw is not None:
            return torch.einsum("moi,op,mpj->ij", self._dw, x, self._dw) / n
        if a.shape[1] == 1:
            c = torch.einsum("nvo,op,nvp->n", g[:, :, 0], x, g[:, :, 0])
            return torch.einsum("ni,n,nj->ij", a[:, 0], c, a[:, 0]) / n
        c = torch.einsum("nvto,op,nvsp->nts", g, x, g)
        return torch.einsum("nti,nts,nsj->ij", a, c, a) / n

    def matvec(self, w: Tensor) -> Tensor:
        """``F vec(W)`` as a ``[d_out, d_in]`` matrix: ``(1/N) sum DW <DW, W>``."""
        a, g = self.factors.a, self.factors.g
        coef = torch.einsum("nvto,oi,nti->nv", g, w, a)
        return torch.einsum("nv,nvto,nti->oi", coef, g, a) / a.shape[0]

    def gram(self) -> Tensor:
        """Gram matrix ``K[(n,v),(m,w)] = <DW_nv, DW_mw>`` of shape ``[N V, N V]``.

        ``T = 1``: ``(a_n·a_m)(g_nv·g_mw)``; conv layers sum over all position pairs
        ``(t, s)``, in chunks of samples to bound memory.
        """
        a, g = self.factors.a, self.factors.g
        n, v, t, _ = g.shape
        if self._dw is not None:
            flat = self._dw.flatten(1)
            return flat @ flat.T
        if t == 1:
            aa = a[:, 0] @ a[:, 0].T
            gf = g[:, :, 0].reshape(n * v, -1)
            return (gf @ gf.T) * aa.repeat_interleave(v, 0).repeat_interleave(v, 1)
        rows = []
        chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, n * v * v * t * t))
        for start in range(0, n, chunk):
            aa = torch.einsum("nti,msi->nmts", a[start : start + chunk], a)
            gg = torch.einsum("nvto,mwso->nvmwts", g[start : start + chunk], g)
            rows.append(torch.einsum("nmts,nvmwts->nvmw", aa, gg).reshape(-1, n * v))
        return torch.cat(rows)

    def frobenius_norm(self, gram: Tensor | None = None) -> Tensor:
        """``||F||_F = ||K||_F / N``."""
        gram = self.gram() if gram is None else gram
        return torch.linalg.matrix_norm(gram) / self.factors.n_samples

    def eigenvalues(self, gram: Tensor | None = None) -> Tensor:
        """The ``max_rank`` largest eigenvalues of ``F``, descending (those of ``K / N``)."""
        gram = self.gram() if gram is None else gram
        ev = torch.linalg.eigvalsh(gram / self.factors.n_samples)
        return torch.sort(ev, descending=True).values[: self.max_rank]

    def inner(self, kron: KronSum) -> Tensor:
        """``<F, sum_k out_k ⊗ in_k>_F = sum_k <out_k, R(F) vec(in_k)>``."""
        return sum(
            (torch.sum(o * self.rearranged_matvec(i)) for o, i in zip(kron.outs, kron.ins, strict=True)),
            torch.zeros((), dtype=self.factors.a.dtype, device=self.factors.a.device),
        )

    def kfac(self) -> KronSum:
        """KFAC ``G ⊗ A`` with ``A = (1/N) sum_{n,t} a a^T``, ``G = (1/(N T)) sum_{n,v,t} g g^T``.

        For ``T = 1`` this is ``E[g g^T] ⊗ E[ā ā^T]`` (K eq. 1); for conv layers the KFC
        factors of Grosse & Martens (2016) as written in T eq. (2.27).
        """
        a, g = self.factors.a, self.factors.g
        n, t = a.shape[0], a.shape[1]
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        return KronSum((g2.T @ g2 / (n * t),), (a2.T @ a2 / n,))

    def jacobian(self) -> Tensor:
        """Per-sample gradients as rows, ``[N V, d_out d_in]`` (``F = J^T J / N``); dense."""
        f = self.factors
        return f.per_sample_gradients().reshape(f.n_samples * f.n_directions, -1)

    def as_dense(self) -> Tensor:
        """The dense ``[d_out d_in, d_out d_in]`` block; small layers, tests and notebooks only."""
        jac = self.jacobian()
        return jac.T @ jac / self.factors.n_samples

    def rearranged_dense(self) -> Tensor:
        """Dense ``R(F)`` of shape ``[d_out^2, d_in^2]``; small layers and tests only."""
        d_out, d_in = self.factors.d_out, self.factors.d_in
        f = self.as_dense().reshape(d_out, d_in, d_out, d_in)
        return f.permute(0, 2, 1, 3).reshape(d_out * d_out, d_in * d_in)


def cross_block_dense(first: ExactBlock, second: ExactBlock) -> Tensor:
    """Dense cross-layer block ``F_ij = (1/N) J_i^T J_j`` (K §2.1); small layers only.

    Both blocks must come from the same probe pass (same samples and directions).
    """
    return first.jacobian().T @ second.jacobian() / first.factors.n_samples


def full_fisher_dense(blocks: list[ExactBlock]) -> Tensor:
    """The full Fisher ``F = J^T J / N`` of all probed layers, in the order given; small nets only."""
    jac = torch.cat([b.jacobian() for b in blocks], dim=1)
    return jac.T @ jac / blocks[0].factors.n_samples
