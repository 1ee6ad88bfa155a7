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
* inner products ``<F, X ⊗ Y>_F = vec(X)^T R(F) vec(Y)``;
* products with the whole Fisher of several layers through ``J u`` and ``Jᵀ c``
  (:class:`WholeFisher`, T App. A.2), cross blocks included.

Both operators here satisfy the protocols of :mod:`fisherlab.operators`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError
from fisherlab.distributed import Shard, all_reduce_sum
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.operators import BlockOperator, Params, axpy, dot
from fisherlab.sample_span import SampleSpan, restrict, span_bases
from fisherlab.vocabulary import BlockStructure

__all__ = ["ExactBlock", "WholeFisher", "cross_block_dense", "full_fisher_dense", "jvp", "vjp"]

_GRAM_CHUNK_ELEMENTS = 2**25
#: Conv layers keep their per-sample gradients when ``N V d_out d_in`` is at most this
#: (float64: 256 MiB); products then cost ``O(N V d_out d_in (d_out + d_in))`` instead of
#: ``O(N V T² (d_out + d_in))`` for the position-pair formulas. Above it, per-sample gradients
#: are formed again for every product in chunks of samples of at most this many elements,
#: when that costs fewer operations than the position pairs (large ``T``, small ``d_out d_in``).
PER_SAMPLE_GRADIENT_LIMIT = 2**25


#: Factors whose largest magnitude lies within ``2^±NORMALISE_EXPONENT`` are used as they are
#: (:meth:`ExactBlock.normalised`): ``||F||²`` (magnitude⁸ times sizes) and float32 moments stay in range.
NORMALISE_EXPONENT = 32


def _power_of_two_scale(t: Tensor, shard: Shard | None) -> float:
    """``2^e`` with ``e`` the exponent of ``max |t|`` (over every process when sharded), or 1 when
    that lies within ``2^±NORMALISE_EXPONENT`` or is 0 or not finite."""
    local = t.abs().amax().to(torch.float64) if t.numel() else t.new_zeros((), dtype=torch.float64)
    if shard is not None and shard.world_size > 1:
        every = torch.zeros(shard.world_size, dtype=torch.float64, device=t.device)
        every[shard.rank] = local
        local = shard.sum(every).amax()
    biggest = float(local)
    if not (math.isfinite(biggest) and biggest > 0):
        return 1.0
    exponent = math.frexp(biggest)[1]
    return 1.0 if abs(exponent) <= NORMALISE_EXPONENT else math.ldexp(1.0, exponent)


def _sandwich_out(dw: Tensor, y: Tensor) -> Tensor:
    """``Σ_m DW_m Y DW_mᵀ`` for ``dw [M, d_out, d_in]``: one GEMM ``[M d_out, d_in] × [d_in, d_in]``,
    then batched ``[d_out, d_in] × [d_in, d_out]`` products summed (1.7× the 3-operand einsum)."""
    m, d_out, d_in = dw.shape
    return torch.bmm((dw.reshape(-1, d_in) @ y).reshape(m, d_out, d_in), dw.transpose(1, 2)).sum(0)


def _sandwich_in(dw: Tensor, x: Tensor) -> Tensor:
    """``Σ_m DW_mᵀ X DW_m`` for ``dw [M, d_out, d_in]``: ``Xᵀ DW_m`` batched, then one GEMM over ``(m, out)``."""
    d_in = dw.shape[2]
    return torch.matmul(x.T, dw).reshape(-1, d_in).T @ dw.reshape(-1, d_in)


@dataclass(frozen=True)
class ExactBlock:
    """The exact Fisher block ``F_ii`` of one layer, as per-sample factors.

    Args:
        factors: ``a [N, T, d_in]`` and ``g [N, V, T, d_out]`` (see :mod:`fisherlab.layers`),
            cast once to their ``compute_dtype``.

    References:
        Koroko et al. (2022), Sec. 2.1 and Prop. 3.1; Grosse & Martens (2016) for conv layers.
    """

    factors: LayerFactors

    def __post_init__(self) -> None:
        f = self.factors
        if f.compute_dtype is not None and f.compute_dtype != f.a.dtype:  # stored in the model's precision
            object.__setattr__(self, "factors", f.to(f.compute_dtype))

    @property
    def dim(self) -> int:
        """Side ``d_out * d_in`` of the block."""
        return self.factors.dim

    @property
    def d_out(self) -> int:
        """Output side of the matrices the block acts on."""
        return self.factors.d_out

    @property
    def d_in(self) -> int:
        """Input side, bias column included."""
        return self.factors.d_in

    @property
    def structure(self) -> BlockStructure:
        """How the per-sample gradients are built (:class:`~fisherlab.vocabulary.BlockStructure`): the
        methods that apply to this block are those that declare it (``MethodSpec.structures``)."""
        return self.factors.structure

    @property
    def max_rank(self) -> int:
        """An upper bound on the rank: ``min(N V, d_out d_in)``."""
        f = self.factors
        return min(f.n_samples * f.n_directions, f.dim)

    def normalised(self) -> tuple[ExactBlock, float, float]:
        """``(block', s_out, s_in)`` with ``F = s_out² s_in² F'``: the factors divided by powers of two
        near their largest magnitudes (exact: floating point commutes with them) when those lie
        outside ``2^±NORMALISE_EXPONENT``, else ``(self, 1, 1)``.

        Errors are relative, so they are those of ``F'``; an approximation of ``F'`` is one of ``F``
        with its output factors times ``s_out²`` and input factors times ``s_in²``. Without it
        factors of 1e80 overflowed ``||F||²`` (NaN errors), 1e-80 lost digits in subnormals and
        1e-160 underflowed to a "zero" block (float32 moments, ``--accumulate mixed``, at far
        smaller scales). Sharded: the same scales on every process.
        """
        f = self.factors
        s_out, s_in = (_power_of_two_scale(t, f.shard) for t in (f.g, f.a))
        if s_out == 1 and s_in == 1:
            return self, 1.0, 1.0
        factors = LayerFactors(f.a / s_in, f.g / s_out, f.shard, None, f.moment_dtype, f.name, f.structure, f.columns)
        return ExactBlock(factors), s_out, s_in

    def sample_span(self, *, max_fraction: float = 0.5) -> SampleSpan | None:
        """The block restricted to the span of its per-sample factors, when that is at most
        ``max_fraction`` of its side (else ``None``; also on a sharded batch): :func:`fisherlab.sample_span.restrict`.

        ``F = (1/N) Σ vec(DW) vec(DW)ᵀ`` with ``DW = Σ_t g aᵀ`` lives in ``span{g_nvt} ⊗ span{a_nt}``:
        every approximation of K and both errors are the same on the restriction ``F'``, and a wide
        layer at a small batch shrinks from ``d_out d_in`` to ``(N V T)(N T)`` (:mod:`fisherlab.sample_span`).
        """
        return restrict(self, max_fraction=max_fraction)

    @cached_property
    def span_bases(self) -> tuple[Tensor | None, Tensor | None] | None:
        """Orthonormal bases ``(U_g, U_a)`` of ``span{g_nvt}`` and ``span{a_nt}``
        (:func:`fisherlab.sample_span.span_bases`), computed once per block."""
        return span_bases(self.factors)

    @cached_property
    def route(self) -> str:
        """How products of a conv layer are computed: ``linear`` (``T = 1``), ``cached`` (per-sample
        gradients kept), ``chunks`` (formed again per product, chunk by chunk of samples) or
        ``pairs`` (all position pairs), whichever is cheapest within :data:`PER_SAMPLE_GRADIENT_LIMIT`."""
        f = self.factors
        t, d_in, d_out, v = f.n_positions, f.d_in, f.d_out, f.n_directions
        if t == 1:
            return "linear"
        product = v * f.dim * (d_in + d_out)  # DW Y DWᵀ per sample, DW kept
        pairs = t * d_in * d_in + t * t * d_in + v * (t * t * d_out + t * d_out * d_out)
        if f.n_local * v * f.dim <= PER_SAMPLE_GRADIENT_LIMIT and product <= pairs:
            return "cached"
        return "chunks" if product + v * f.dim * t < pairs else "pairs"  # chunks form DW again per product

    @cached_property
    def _dw(self) -> Tensor | None:
        """Per-sample gradients ``[N V, d_out, d_in]`` of a conv layer when small enough, else None."""
        f = self.factors
        if self.route != "cached":
            return None
        return f.per_sample_gradients().reshape(-1, f.d_out, f.d_in)

    def _dw_chunks(self) -> Iterator[Tensor]:
        """Per-sample gradients ``[c V, d_out, d_in]`` of consecutive chunks of samples (bounded memory)."""
        f = self.factors
        chunk = max(1, PER_SAMPLE_GRADIENT_LIMIT // (f.n_directions * f.dim))
        for start in range(0, f.n_local, chunk):
            part = LayerFactors(f.a[start : start + chunk], f.g[start : start + chunk])
            yield part.per_sample_gradients().reshape(-1, f.d_out, f.d_in)

    def rearranged_matvec(self, y: Tensor) -> Tensor:
        """``R(F) vec(Y) = (1/N) sum_{n,v} DW_nv Y DW_nv^T``, a ``[d_out, d_out]`` matrix.

        For ``T = 1`` this is ``(1/N) sum (a^T Y a) g g^T`` (K Prop. 3.1); for conv layers it
        goes through the per-sample gradients (kept, or formed chunk by chunk) or sums over all
        position pairs, whichever :attr:`route` says is cheaper. Sharded: summed over processes.
        """
        a, g = self.factors.a, self.factors.g
        if self._dw is not None:
            local = _sandwich_out(self._dw, y)
        elif self.route == "chunks":
            local = sum(_sandwich_out(dw, y) for dw in self._dw_chunks())  # type: ignore[assignment]
        elif a.shape[1] == 1:
            c = torch.einsum("ni,ij,nj->n", a[:, 0], y, a[:, 0])
            local = torch.einsum("nvo,n,nvp->op", g[:, :, 0], c, g[:, :, 0])
        else:
            c = torch.einsum("nti,ij,nsj->nts", a, y, a)
            local = torch.einsum("nvto,nts,nvsp->op", g, c, g)
        return all_reduce_sum(local, self.factors.shard) / self.factors.n_samples

    def rearranged_rmatvec(self, x: Tensor) -> Tensor:
        """``R(F)^T vec(X) = (1/N) sum_{n,v} DW_nv^T X DW_nv``, a ``[d_in, d_in]`` matrix."""
        a, g = self.factors.a, self.factors.g
        if self._dw is not None:
            local = _sandwich_in(self._dw, x)
        elif self.route == "chunks":
            local = sum(_sandwich_in(dw, x) for dw in self._dw_chunks())  # type: ignore[assignment]
        elif a.shape[1] == 1:
            c = torch.einsum("nvo,op,nvp->n", g[:, :, 0], x, g[:, :, 0])
            local = torch.einsum("ni,n,nj->ij", a[:, 0], c, a[:, 0])
        else:
            c = torch.einsum("nvto,op,nvsp->nts", g, x, g)
            local = torch.einsum("nti,nts,nsj->ij", a, c, a)
        return all_reduce_sum(local, self.factors.shard) / self.factors.n_samples

    def matvec(self, w: Tensor) -> Tensor:
        """``F vec(W)`` as a ``[d_out, d_in]`` matrix: ``(1/N) sum DW <DW, W> = Jᵀ(J w) / N``."""
        local = vjp(self.factors, jvp(self.factors, w))
        return all_reduce_sum(local, self.factors.shard) / self.factors.n_samples

    def gram(self) -> Tensor:
        """Gram matrix ``K[(n,v),(m,w)] = <DW_nv, DW_mw>`` of shape ``[N V, N V]``, computed once per block.

        ``T = 1``: ``(a_n·a_m)(g_nv·g_mw)``; conv layers sum over all position pairs
        ``(t, s)``, in chunks of samples to bound memory.
        """
        return self._gram

    @cached_property
    def _gram(self) -> Tensor:
        shard = self.factors.shard
        if shard is None and self.route == "chunks":  # row block i against every column block j, formed again
            chunks = self._dw_chunks
            return torch.cat([torch.cat([di.flatten(1) @ dj.flatten(1).T for dj in chunks()], 1) for di in chunks()])
        if shard is None:
            return _cross_gram(self.factors, self.factors, self._dw, self._dw)
        return shard.gather_rows(self._gram_rows)  # rows [n_local V, N V] of every rank

    @cached_property
    def _gram_rows(self) -> Tensor:
        """This process's rows of the Gram matrix: its samples against one visiting shard at a time."""
        shard, f = self.factors.shard, self.factors
        assert shard is not None
        cols = []
        for src in range(shard.world_size):
            count = shard.counts[src]
            a = shard.broadcast(f.a if src == shard.rank else None, src, (count, *f.a.shape[1:]), f.a)
            g = shard.broadcast(f.g if src == shard.rank else None, src, (count, *f.g.shape[1:]), f.g)
            cols.append(_cross_gram(LayerFactors(f.a, f.g), LayerFactors(a, g), self._dw, None))
        return torch.cat(cols, dim=1)

    def frobenius_norm_squared(self) -> Tensor:
        """``||F||_F² = ||K||_F² / N²`` (sharded: each process's rows of ``K``, summed; no full ``K``)."""
        shard, n = self.factors.shard, self.factors.n_samples
        if shard is None:
            return torch.sum(self.gram() ** 2) / n**2
        return shard.sum(torch.sum(self._gram_rows**2)) / n**2

    def frobenius_norm(self) -> Tensor:
        """``||F||_F = ||K||_F / N``."""
        return self.frobenius_norm_squared().sqrt()

    def eigenvalues(self, *, top: int | None = None) -> Tensor:
        """The ``top`` (default ``max_rank``) largest eigenvalues of ``F``, descending (those of ``K / N``).

        Beyond ``max_rank`` every eigenvalue is 0, so at most ``max_rank`` are returned.
        """
        k = self.gram() / self.factors.n_samples
        ev = torch.linalg.eigvalsh(
            (k + k.T) / 2
        )  # a GEMM's Gram is symmetric only to rounding; eigvalsh reads one triangle
        return torch.sort(ev, descending=True).values[: min(self.max_rank, top or self.max_rank)]

    def inner(self, kron: KronSum) -> Tensor:
        """``<F, sum_k out_k ⊗ in_k>_F = sum_k <out_k, R(F) vec(in_k)>``."""
        return sum(
            (torch.sum(o * self.rearranged_matvec(i)) for o, i in zip(kron.outs, kron.ins, strict=True)),
            torch.zeros((), dtype=self.factors.a.dtype, device=self.factors.a.device),
        )

    def inner_operator(self, operator: BlockOperator) -> Tensor:
        """``<F, B>_F = (1/N) Σ_{n,v} <DW_nv, B DW_nv>`` for any block operator ``B`` (its ``matvec``
        on batches of per-sample gradients, chunk by chunk: the generic matrix-free route)."""
        chunks = [self._dw] if self._dw is not None else self._dw_chunks()
        local = sum(
            (torch.sum(dw * operator.matvec(dw)) for dw in chunks),
            torch.zeros((), dtype=self.factors.a.dtype, device=self.factors.a.device),
        )
        return all_reduce_sum(local, self.factors.shard) / self.factors.n_samples

    def jacobian(self) -> Tensor:
        """Per-sample gradients as rows, ``[N V, d_out d_in]`` (``F = J^T J / N``); dense."""
        f = self.factors
        return f.per_sample_gradients().reshape(f.n_local * f.n_directions, -1)

    def as_dense(self) -> Tensor:
        """The dense ``[d_out d_in, d_out d_in]`` block; small layers, tests and notebooks only."""
        jac = self.jacobian()
        return jac.T @ jac / self.factors.n_samples

    def rearranged_dense(self) -> Tensor:
        """Dense ``R(F)`` of shape ``[d_out^2, d_in^2]``; small layers and tests only."""
        d_out, d_in = self.factors.d_out, self.factors.d_in
        f = self.as_dense().reshape(d_out, d_in, d_out, d_in)
        return f.permute(0, 2, 1, 3).reshape(d_out * d_out, d_in * d_in)


def _cross_gram(first: LayerFactors, second: LayerFactors, dw_first: Tensor | None, dw_second: Tensor | None) -> Tensor:
    """``[<DW_nv, DW'_mw>]`` of shape ``[n V, m V']`` between two sets of samples of one layer.

    ``T = 1``: ``(a_n·a'_m)(g_nv·g'_mw)``; conv layers: through per-sample gradients when both
    are given or small, else over all position pairs in chunks of samples to bound memory.
    """
    a, g, a2, g2 = first.a, first.g, second.a, second.g
    n, v, t, _ = g.shape
    m, v2 = g2.shape[0], g2.shape[1]
    if t == 1:
        aa = a[:, 0] @ a2[:, 0].T
        gg = g[:, :, 0].reshape(n * v, -1) @ g2[:, :, 0].reshape(m * v2, -1).T
        return gg * aa.repeat_interleave(v, 0).repeat_interleave(v2, 1)
    if dw_first is not None:
        if dw_second is None and m * v2 * first.dim <= PER_SAMPLE_GRADIENT_LIMIT:
            dw_second = second.per_sample_gradients().reshape(-1, first.d_out, first.d_in)
        if dw_second is not None:
            return dw_first.flatten(1) @ dw_second.flatten(1).T
    rows = []
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, m * v * v2 * t * t))
    for start in range(0, n, chunk):
        aa = torch.einsum("nti,msi->nmts", a[start : start + chunk], a2)
        gg = torch.einsum("nvto,mwso->nvmwts", g[start : start + chunk], g2)
        rows.append(torch.einsum("nmts,nvmwts->nvmw", aa, gg).reshape(-1, m * v2))
    return torch.cat(rows)


def jvp(factors: LayerFactors, w: Tensor) -> Tensor:
    """``J w`` of one layer as ``[N, V]``: ``(J w)_nv = <DW_nv, W> = Σ_t g_nvtᵀ W a_nt`` (T App. A.2)."""
    return torch.einsum("nvto,oi,nti->nv", factors.g, w, factors.a)


def vjp(factors: LayerFactors, c: Tensor) -> Tensor:
    """``Jᵀ c`` of one layer for ``c [N, V]``: ``Σ_{n,v} c_nv DW_nv`` as ``[d_out, d_in]``."""
    return torch.einsum("nv,nvto,nti->oi", c, factors.g, factors.a)


@dataclass(frozen=True)
class WholeFisher:
    """The Fisher of several layers, cross blocks included: ``F = JᵀJ / N`` (T App. A.2).

    ``J`` is the ``[N V, p]`` matrix of per-sample gradients of all the layers; nothing forms
    ``F`` or ``J`` except :meth:`as_dense`. Satisfies :class:`~fisherlab.operators.ParamsOperator`.

    Args:
        blocks: The exact blocks of every layer, from one probe pass (same samples and directions).
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

    @property
    def n_directions(self) -> int:
        """``V``."""
        return self.blocks[0].factors.n_directions

    def jvp(self, u: Params) -> Tensor:
        """``J u`` as ``[N, V]``: the sum over layers of :func:`jvp`."""
        return sum(jvp(b.factors, ui) for b, ui in zip(self.blocks, u, strict=True))  # type: ignore[return-value]

    @property
    def shard(self) -> Shard | None:
        """The processes the batch is spread over (``None``: this process holds it all)."""
        return self.blocks[0].factors.shard

    def vjp(self, c: Tensor) -> Params:
        """``Jᵀ c`` per layer for ``c [N, V]`` (this process's rows of it when sharded; summed over processes)."""
        return [all_reduce_sum(vjp(b.factors, c), self.shard) for b in self.blocks]

    def matvec(self, u: Params, *, damping: float = 0.0) -> Params:
        """``F• u = Jᵀ(J u) / N + λ u`` (T App. A.2)."""
        fu = self.vjp(self.jvp(u) / self.n_samples)
        return axpy(damping, u, fu) if damping else fu

    def energy_inner(self, x: Params, y: Params, *, damping: float) -> Tensor:
        """``⟨x, y⟩_{F•} = (Jx)·(Jy) / N + λ x·y``."""
        local = torch.sum(self.jvp(x) * self.jvp(y))
        return all_reduce_sum(local, self.shard) / self.n_samples + damping * dot(x, y)

    def gram(self) -> Tensor:
        """``J Jᵀ = Σ_i K_i`` of shape ``[N V, N V]`` (sum of the per-layer Gram matrices)."""
        return sum(b.gram() for b in self.blocks)  # type: ignore[return-value]

    def natural_gradient(self, grads: Params, *, damping: float) -> Params:
        """The exact damped natural gradient ``ζ = (F + λI)⁻¹ ∇h`` by Woodbury.

        ``ζ = (∇h - Jᵀ (NλI + JJᵀ)⁻¹ J ∇h) / λ``: one ``N V``-sided solve, no ``p``-sided one.
        """
        if damping <= 0:
            raise FisherlabError("the exact natural gradient needs a positive damping λ")
        gram = self.gram()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        jg = self.jvp(grads)
        jg = jg if self.shard is None else self.shard.gather_rows(jg)  # [N, V] of the global batch
        c = torch.linalg.solve(self.n_samples * damping * eye + gram, jg.reshape(-1)).reshape(
            self.n_samples, self.n_directions
        )
        if self.shard is not None:
            c = c[self.shard.start : self.shard.start + self.shard.n_local]
        return [(g - jc) / damping for g, jc in zip(grads, self.vjp(c), strict=True)]

    def coarse_operator(self, basis: list[Tensor], *, damping: float) -> Tensor:
        """``F_coarse = R₀ F• R₀ᵀ = (J R₀ᵀ)ᵀ(J R₀ᵀ)/N + λ R₀R₀ᵀ`` (T eq. 3.12, App. A.3).

        Args:
            basis: Per layer the coarse columns ``V_i`` as ``[m_i, d_out, d_in]``.
        """
        cols = [
            torch.einsum("nvto,koi,nti->nvk", b.factors.g, v, b.factors.a)
            for b, v in zip(self.blocks, basis, strict=True)
        ]
        jr = torch.cat(cols, dim=2).reshape(-1, sum(v.shape[0] for v in basis))
        gram_v = torch.block_diag(*[v.flatten(1) @ v.flatten(1).T for v in basis])
        return all_reduce_sum(jr.T @ jr, self.shard) / self.n_samples + damping * gram_v

    def jacobian(self) -> Tensor:
        """``J`` as ``[N V, p]``, the layers' :meth:`ExactBlock.jacobian` side by side; dense."""
        return torch.cat([b.jacobian() for b in self.blocks], dim=1)

    def as_dense(self, *, damping: float = 0.0) -> Tensor:
        """Dense ``F•`` of all the layers; small networks, tests and notebooks only."""
        jac = self.jacobian()
        f = jac.T @ jac / self.n_samples
        return f + damping * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)


def cross_block_dense(first: ExactBlock, second: ExactBlock) -> Tensor:
    """Dense cross-layer block ``F_ij = (1/N) J_iᵀ J_j`` (K §2.1); small layers only.

    Both blocks must come from the same probe pass (same samples and directions).
    """
    return first.jacobian().T @ second.jacobian() / first.factors.n_samples


def full_fisher_dense(blocks: list[ExactBlock]) -> Tensor:
    """The full Fisher ``F = JᵀJ / N`` of all probed layers, in the order given; small nets only."""
    return WholeFisher(tuple(blocks)).as_dense()
