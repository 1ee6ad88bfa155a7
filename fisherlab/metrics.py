"""Errors of an approximation against the exact block, without dense blocks (K §4.1), and
the registry every stored metric is declared in.

* error 1: ``||F - F̂||_F / ||F||_F`` with
  ``||F - F̂||² = ||F||² - 2 <F, F̂> + ||F̂||²`` (Gram matrix, K Prop. 3.1 products, and
  ``||sum out_k ⊗ in_k||² = sum <out_k,out_l><in_k,in_l>``).
* error 2: ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` with both spectra sorted descending.
  ``F`` has at most ``r = min(N V, D)`` nonzero eigenvalues, all ``>= 0``, so
  ``sum_i (λ_i - μ_i)² = sum_{i<=r} (λ_i - μ_i)² + ||F̂||_F² - sum_{i<=r} μ_i²`` needs only
  the ``r`` largest eigenvalues of ``F̂``.

**The registry.** Every per-(layer, method) and per-layer quantity of a probe snapshot is one
entry of :data:`BLOCK_METRICS` / :data:`LAYER_METRICS`: its name, dims, long name, units,
definition and the function that computes it. The probe loop computes every entry, the
results schema (:mod:`fisherlab.results`), the figures' labels and the CLI help are generated
from them; adding a metric is adding one entry here (and its test).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import (
    PAPER_METHODS,
    ApproxConfig,
    Approximation,
    WarmStarts,
    approximate_all,
    restricted_warm_starts,
)
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import RitzValues, blas_threads, block_lanczos_eigenvalues
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import METHODS, resolve_methods
from fisherlab.operators import BlockOperator
from fisherlab.vocabulary import ERROR_METRICS, Spectrum, Variable

__all__ = [
    "BLOCK_METRICS",
    "ERROR_METRICS",
    "FROBENIUS_MEMORY_LIMIT",
    "FROBENIUS_RECOMPUTE_BELOW",
    "FROBENIUS_WORK_LIMIT",
    "LAYER_METRICS",
    "PER_LAYER",
    "PER_METHOD",
    "SPECTRAL_ATOL",
    "SPECTRAL_DENSE_SIDE",
    "SPECTRAL_GPU_MEMORY_FRACTION",
    "SPECTRAL_GPU_WORK_LIMIT",
    "SPECTRAL_MEMORY_LIMIT",
    "SPECTRAL_RTOL",
    "SPECTRAL_THREADS",
    "SPECTRAL_WORK_LIMIT",
    "BlockEvaluation",
    "BlockMetric",
    "BlockReference",
    "FrobeniusError",
    "LayerMetric",
    "SpectralError",
    "Spectrum",
    "Variable",
    "evaluate_block",
    "frobenius_error",
    "frobenius_error_resolved",
    "inner_with_block",
    "spectral_error",
    "spectral_error_bounded",
    "spectral_limits",
    "spectral_threads",
]

PER_METHOD = ("iteration", "layer", "method")
PER_LAYER = ("iteration", "layer")


@dataclass(frozen=True)
class BlockReference:
    """Quantities of the exact block computed once per snapshot and shared by all methods.

    Args:
        block: The exact block.
        norm_squared: ``||F||_F²``.
        spectrum: What error 2 compares (:class:`Spectrum`).
        layer: Layer name used in warnings.
        zeros: Eigenvalues of the approximations known to be 0 besides ``block.dim`` (``block``
            is the restriction of a larger one, :meth:`~fisherlab.fisher.ExactBlock.sample_span`).
    """

    block: ExactBlock
    norm_squared: Tensor
    spectrum: Spectrum = Spectrum.EIGENVALUES
    layer: str = ""
    zeros: int = 0
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls, block: ExactBlock, *, spectrum: Spectrum | str = Spectrum.EIGENVALUES, layer: str = "", zeros: int = 0
    ) -> BlockReference:
        """Compute the Gram matrix once; derive ``||F||_F²`` from it (and the spectrum when asked)."""
        return cls(block, block.frobenius_norm_squared(), Spectrum(spectrum), layer, zeros)

    @property
    def eigenvalues(self) -> Tensor:
        """The ``r = block.max_rank`` largest eigenvalues of ``F``, descending (from the Gram
        matrix, computed on first use: error 1 alone never needs them)."""
        if "eigenvalues" not in self.cache:
            self.cache["eigenvalues"] = self.block.eigenvalues()
        return self.cache["eigenvalues"]


def inner_with_block(block: ExactBlock, approx: BlockOperator) -> Tensor:
    """``<F, F̂>_F``: the closed form for a Kronecker sum (K Prop. 3.1 products), else the generic
    matrix-free route ``(1/N) Σ <DW, F̂ DW>`` (:meth:`~fisherlab.fisher.ExactBlock.inner_operator`)."""
    if isinstance(approx, KronSum):
        return block.inner(approx)
    return block.inner_operator(approx).to(block.factors.dtype)


#: Error 1 below this (in float64; times ``sqrt(eps / eps_float64)`` in other precisions, so always
#: in float32) is recomputed by a route that forms the difference ``F - F̂`` before squaring
#: (:func:`frobenius_error_resolved`): there the expansion's rounding, about ``eps ||F||²`` in
#: ``||F - F̂||²``, exceeds 1e-8 of the value (KFAC on a layer where it is exact gave 1.9e-8 for 1e-16).
FROBENIUS_RECOMPUTE_BELOW = 1e-3

#: Floating-point operations and bytes the non-cancelling route of error 1 may spend; beyond, the
#: expansion's value is stored with its resolution (``frobenius_error_resolution``).
FROBENIUS_WORK_LIMIT = 5e9
FROBENIUS_MEMORY_LIMIT = 2**28

#: The expansion's rounding error, in units of ``eps (||F||² + 2 |<F, F̂>| + ||F̂||²)`` times the square
#: root of the longest sum behind it (sums of ``n`` rounded terms err like ``sqrt(n) eps``).
_EXPANSION_ROUNDING = 8


@dataclass(frozen=True)
class FrobeniusError:
    """Error 1 and its resolution: ``|value - exact| <= resolution`` (to rounding).

    Args:
        value: Error 1.
        resolution: 0 when ``F - F̂`` was formed before squaring (rounding of order ``eps``);
            else the rounding of the expansion ``||F||² - 2 <F, F̂> + ||F̂||²``, which cancels
            when ``F̂ ≈ F``.
    """

    value: float
    resolution: float


def frobenius_error_resolved(ref: BlockReference, approx: BlockOperator) -> FrobeniusError:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), resolved down to the float64 floor where affordable.

    First by the expansion ``||F||² - 2 <F, F̂> + ||F̂||²`` from factors only (Gram matrix, K Prop.
    3.1 products); it cancels when ``F̂ ≈ F`` and resolves only ``sqrt(eps)`` relative. Below
    :data:`FROBENIUS_RECOMPUTE_BELOW` the difference is formed before squaring
    (:func:`_frobenius_difference`: the rearranged difference ``R(F) - R(F̂) = P Qᵀ`` through a QR
    of its smaller side, or dense for a small conv block), within :data:`FROBENIUS_WORK_LIMIT`
    and :data:`FROBENIUS_MEMORY_LIMIT`; beyond them the expansion's value is kept with its
    resolution. ``nan`` when ``F = 0``.
    """
    norm_squared = float(ref.norm_squared)
    inner = float(inner_with_block(ref.block, approx))
    approx_squared = float(approx.frobenius_norm_squared())
    sq = norm_squared - 2 * inner + approx_squared
    value = math.sqrt(max(sq, 0.0) / norm_squared) if norm_squared > 0 else math.nan
    if not (norm_squared > 0 and math.isfinite(value)):
        return FrobeniusError(value, math.nan)
    f = ref.block.factors
    eps = torch.finfo(f.dtype).eps
    if value < FROBENIUS_RECOMPUTE_BELOW * math.sqrt(eps / torch.finfo(torch.float64).eps):
        exact = _frobenius_difference(ref.block, approx)
        if exact is not None:
            return FrobeniusError(exact / math.sqrt(norm_squared), 0.0)
    longest = max(f.d_in * f.n_positions, f.d_out, f.n_samples * f.n_directions)
    delta = _EXPANSION_ROUNDING * math.sqrt(longest) * eps * (norm_squared + 2 * abs(inner) + approx_squared)
    low, high = math.sqrt(max(sq - delta, 0.0) / norm_squared), math.sqrt(max(sq + delta, 0.0) / norm_squared)
    return FrobeniusError(value, max(high - value, value - low))


def frobenius_error(ref: BlockReference, approx: BlockOperator) -> Tensor:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), from factors (:func:`frobenius_error_resolved`).

    Returns 0-d tensor; ``nan`` when ``F = 0``.
    """
    like = ref.norm_squared
    return torch.tensor(_frobenius(ref, approx).value, dtype=like.dtype, device=like.device)


def _frobenius(ref: BlockReference, approx: BlockOperator) -> FrobeniusError:
    """:func:`frobenius_error_resolved`, computed once per (reference, approximation)."""
    key = ("frobenius_error", id(approx))
    if key not in ref.cache:
        ref.cache[key] = (approx, frobenius_error_resolved(ref, approx))  # approx kept alive: its id stays unique
    return ref.cache[key][1]


def _upper(side: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column indices of the upper triangle of a ``side``-square matrix, and the weights
    (1 on the diagonal, √2 off it) that make Frobenius inner products of symmetric matrices dot
    products of their weighted upper triangles."""
    rows, cols = torch.triu_indices(side, side, device=like.device)
    weight = torch.full(rows.shape, math.sqrt(2.0), dtype=like.dtype, device=like.device)  # √2 in like's precision
    weight[rows == cols] = 1.0
    return rows, cols, weight


def _frobenius_difference(block: ExactBlock, approx: BlockOperator) -> float | None:
    """``||F - F̂||_F`` with the difference formed before squaring (error ``O(eps ||F||)``), or
    ``None`` where that costs more than the limits allow. Sharded: every process gathers the whole
    batch (within the limits) and computes the same value.

    Linear layers (``T = 1``, symmetric factors): ``R(F) - R(F̂) = P Qᵀ`` with the columns
    ``vec(g gᵀ) / √N``, ``vec(out_k)`` of ``P`` and ``vec(a aᵀ) / √N``, ``-vec(in_k)`` of ``Q``,
    upper triangles only (:func:`_upper`); with ``Q = U R`` (Householder QR of the smaller
    side), ``||P Qᵀ||_F = ||P Rᵀ||_F``. Conv layers: the dense block, when small.
    """
    f = block.factors
    itemsize, rows = f.a.element_size(), f.n_samples * f.n_directions
    kron = approx if isinstance(approx, KronSum) else None
    rank = 0 if kron is None else kron.rank
    linear = kron is not None and f.n_positions == 1 and all(torch.equal(m, m.T) for m in kron.outs + kron.ins)
    if kron is not None and linear:
        m = rows + rank
        s_out, s_in = f.d_out * (f.d_out + 1) // 2, f.d_in * (f.d_in + 1) // 2
        small, large = sorted((s_out, s_in))
        flops = 2 * small * m * m + 2 * large * m * min(small, m)
        memory = (small + large) * m * itemsize
    else:
        flops = 2 * (rows + rank) * f.dim * f.dim
        memory = (2 * f.dim + rows) * f.dim * itemsize
    if flops > FROBENIUS_WORK_LIMIT or memory > FROBENIUS_MEMORY_LIMIT:
        return None
    if f.shard is not None and f.shard.world_size > 1:  # the same decision on every process: the same inputs
        f = LayerFactors(f.shard.gather_rows(f.a), f.shard.gather_rows(f.g))
        block = ExactBlock(f)
    if kron is not None and linear:
        scale = f.n_samples**-0.5
        g = f.g[:, :, 0].reshape(-1, f.d_out)
        a = f.a[:, 0].repeat_interleave(f.n_directions, 0)
        ro, co, wo = _upper(f.d_out, g)
        ri, ci, wi = _upper(f.d_in, a)
        p = torch.cat([g[:, ro] * g[:, co] * (wo * scale), torch.stack([o[ro, co] for o in kron.outs]) * wo])
        q = torch.cat([a[:, ri] * a[:, ci] * (wi * scale), -torch.stack([i[ri, ci] for i in kron.ins]) * wi])
        if s_in > s_out:
            p, q = q, p  # p: the larger side
        if q.shape[1] >= m:
            q = torch.linalg.qr(q.T, mode="r").R  # Qᵀ = U R: ||P Qᵀ|| = ||P Rᵀ||
            return float(torch.linalg.matrix_norm(p.T @ q.T))
        return float(torch.linalg.matrix_norm(p.T @ q))
    return float(torch.linalg.matrix_norm(block.as_dense() - approx.as_dense().to(f.dtype)))


#: Memory (bytes) the eigenvalues of error 2 may take: a dense ``D x D`` block, or the
#: eigensolver's block of vectors of length ``D``. Beyond it error 2 is bounded, never a crash.
SPECTRAL_MEMORY_LIMIT = 2 * 2**30

#: The eigensolver stops growing its block once the error-2 interval's half-width is within
#: ``max(SPECTRAL_RTOL * value, SPECTRAL_ATOL)`` (error 2 is itself relative, so the absolute
#: part is a tenth of the 1e-8 the dense twins are compared at).
SPECTRAL_RTOL = 1e-6
SPECTRAL_ATOL = 1e-9

#: Up to this side a multi-term ``F̂`` is diagonalised densely (cheaper than iterating).
SPECTRAL_DENSE_SIDE = 1024

#: Floating-point operations the eigensolver may spend on one error 2 (about 40 s on a 2-core
#: CPU, a fraction of a second on a GPU); beyond, the value is stored with its bound.
SPECTRAL_WORK_LIMIT = 2e12

#: On a CUDA device the eigensolver may use this fraction of the free device memory (at
#: least :data:`SPECTRAL_MEMORY_LIMIT`) and :data:`SPECTRAL_GPU_WORK_LIMIT` flops (a few
#: seconds of an H100's float64 throughput).
SPECTRAL_GPU_MEMORY_FRACTION = 0.25
SPECTRAL_GPU_WORK_LIMIT = 1e14


def spectral_limits(device: torch.device) -> tuple[int, float]:
    """Memory (bytes) and work (flops) the error-2 eigensolver may spend on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(SPECTRAL_MEMORY_LIMIT, int(SPECTRAL_GPU_MEMORY_FRACTION * free)), SPECTRAL_GPU_WORK_LIMIT
    return SPECTRAL_MEMORY_LIMIT, SPECTRAL_WORK_LIMIT


#: CPU threads of error 2's eigensolver (dense ``eigvalsh`` or block Lanczos): ``None`` chooses
#: (:func:`spectral_threads`), an int fixes it.
SPECTRAL_THREADS: int | None = None


def spectral_threads(device: torch.device) -> int | None:
    """CPU threads for error 2's heavy kernels: torch's number, less the cores other processes keep busy.

    On a shared machine more BLAS threads than free cores spin against each other (the same call
    took 81 s with two threads on a loaded 2-core machine, 1.5 s with one), so the eigensolver
    runs with ``min(torch threads, cores - (1-minute load average - 1))``, at least 1, unless
    :data:`SPECTRAL_THREADS` fixes it. ``None`` (unchanged) on a GPU.
    """
    if device.type != "cpu":
        return None
    if SPECTRAL_THREADS is not None:
        return max(1, int(SPECTRAL_THREADS))
    threads = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0] - 1.0  # the load this process adds is its own
    except (AttributeError, OSError):  # no affinity or load average on this platform
        return threads
    return max(1, min(threads, math.floor(cores - max(busy, 0.0) + 0.5)))


def _dense_flops(dim: int) -> float:
    """Flops of ``eigvalsh`` on side ``dim`` (tridiagonalisation, 4/3 dim³, at GEMM-like speed) and
    forming ``F̂``; calibrated on a 2-core CPU against :func:`_lanczos_flops` (1.5 dim³ in all)."""
    return 1.5 * dim**3


def _lanczos_flops(dim: int, needed: int, width: int, per_vector: float) -> float:
    """Flops block Lanczos is expected to spend on ``needed`` eigenvalues: about ``2.5 needed`` basis
    vectors (measured: 2.4-2.6 for MNIST layer 5 and a 257 × 256 layer), each one product and a
    reorthogonalisation against the basis so far, and its checks (at most as much again, plus the last)."""
    k = min(dim, 2.5 * needed + 2 * width)
    steps = k * per_vector + 2.0 * k * k * dim
    return 2 * steps + 9.0 * k**3


#: Blocks of vectors of length ``D`` the eigensolver holds besides its basis (the block's
#: image, the next block, QR and GEMM workspace): the basis is ``memory_limit / (D itemsize)``
#: vectors less this many blocks.
_SOLVER_COPIES = 4


@dataclass(frozen=True)
class SpectralError:
    """Error 2 with a guarantee: ``|value - exact| <= bound``.

    Args:
        value: Error 2 (the midpoint of the interval the unknown eigenvalues leave).
        bound: How far the exact error 2 of this ``F̂`` can be from ``value``: the half-width of
            that interval, widened by the rounding of the formula and of the eigenvalues (a few
            ``ε`` relative where every eigenvalue of ``F̂`` was computed, ``~ε / value`` where
            ``||F̂||² - Σ μ_i²`` was needed) and by the eigensolver's stopping tolerance (its
            residuals); never 0. ``inf`` (and ``value`` NaN) when no eigenvalue fit in memory.
        eigenvalues: How many eigenvalues of ``F̂`` were computed.
        note: Why the value is bounded or missing (empty when within tolerance).
        unknown: The part of ``bound`` due to eigenvalues not computed (the half-width of the
            interval alone): what the eigensolver's stopping test compares with the tolerance.
    """

    value: float
    bound: float
    eigenvalues: int
    note: str = ""
    unknown: float = 0.0


def _error_interval(
    lam: Tensor,
    mu: Tensor,
    norm_squared: float,
    *,
    by_magnitude: bool,
    mu_next: float | None = None,
    mu_floor: float | None = None,
    complete: bool = False,
) -> tuple[float, float]:
    """Bounds of ``||spec F - spec F̂||²`` from the ``m`` largest eigenvalues ``mu`` of ``F̂``.

    With ``λ`` the ``r`` largest eigenvalues of ``F`` (all others 0) and ``μ`` those of ``F̂``,
    both descending, the squared distance is
    ``Σ_{i≤m} (λ_i - μ_i)² + Σ_{m<i≤r} (λ_i² - 2 λ_i μ_i) + (||F̂||² - Σ_{i≤m} μ_i²)``;
    only ``X = Σ_{m<i≤r} λ_i μ_i`` is unknown, and ``mu_floor <= μ_i ≤ mu_next`` (default
    ``μ_m``; singular values are ``>= 0``) with ``Σ_{i>m} μ_i² = ||F̂||² - Σ_{i≤m} μ_i²`` bound
    it (Cauchy-Schwarz). For ``m ≥ r`` both bounds are the exact value.

    ``complete``: ``mu`` holds every eigenvalue of ``F̂`` (zeros may be left out), so the tail
    ``Σ_{i>r} μ_i²`` is summed from them instead of ``||F̂||² - Σ_{i≤r} μ_i²``, which cancels to
    ``ε ||F̂||²`` when ``F̂ ≈ F`` (a floor of ``√ε`` on error 2).
    """
    if complete:
        tail_squared = float(torch.sum(mu[lam.numel() :] ** 2))
    mu = mu[: lam.numel()]
    m, r = mu.numel(), lam.numel()
    head = float(torch.sum((lam[:m] - mu) ** 2))
    rest = tail_squared if complete else max(norm_squared - float(torch.sum(mu**2)), 0.0)
    tail = lam[m:r]
    s1, s2 = float(tail.sum()), float(torch.sum(tail**2))
    cauchy = math.sqrt(s2 * rest)
    if mu_next is None and m:
        mu_next = float(mu[-1])
    x_high = min(max(mu_next, 0.0) * s1, cauchy) if mu_next is not None else cauchy
    x_low = 0.0 if by_magnitude else (-cauchy if mu_floor is None else max(-cauchy, min(mu_floor, 0.0) * s1))
    return max(head + s2 - 2 * x_high + rest, 0.0), max(head + s2 - 2 * x_low + rest, 0.0)


def _ritz_errors(ritz: RitzValues, count: int, scale: float) -> Tensor:
    """Bounds on how far each of the ``count`` leading Ritz values is from its eigenvalue.

    A Ritz pair with residual ``ρ_i`` has an eigenvalue within ``ρ_i``, and within ``ρ_i² / gap_i``
    when the rest of the spectrum is at least ``gap_i`` away (Kato-Temple; Parlett, *The Symmetric
    Eigenvalue Problem*, §11.7). ``gap_i`` is taken from the other Ritz values, less their residuals
    (the unconverged ones hold the rest of the spectrum below the converged ones), and ``scale``
    (``~ε ||F̂||``) is added for the rounding of the Rayleigh-Ritz step.
    """
    theta, rho = ritz.values, ritz.residuals
    out = torch.empty(count, dtype=torch.float64)
    values, residuals = theta.tolist(), rho.tolist()
    for i in range(count):
        gap = math.inf
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                gap = min(gap, abs(abs(values[i]) - abs(values[j])) - residuals[j])
        if i + 1 >= len(values):
            gap = 0.0  # nothing known below: the first-order bound
        rho_i = residuals[i]
        out[i] = min(rho_i, rho_i**2 / gap) if gap > rho_i else rho_i
    return out + scale


def _leading_eigenvalues(
    ritz: RitzValues, *, by_magnitude: bool, dim: int, r: int, zeros: int = 0
) -> tuple[Tensor, float | None, float | None]:
    """The largest eigenvalues the converged Ritz values determine, and bounds on the others.

    The ``c`` converged values are the ``c`` largest in magnitude, so every other eigenvalue
    has ``|μ| <= τ = |θ_c|``. By magnitude: ``|θ_1..θ_c|`` and ``τ``. Algebraically: the
    positive ones among them are the largest eigenvalues (every positive eigenvalue above
    ``τ`` is among them), the rest are ``<= τ``, and the ``i``-th largest is ``>= -τ`` for
    ``i <= D - (converged negatives)``, so for all ``i <= r`` when ``r`` is within that.
    ``zeros``: eigenvalues known to be 0 besides the operator's ``dim`` (see
    :meth:`~fisherlab.kron.KronSum.on_ranges`).

    Returns:
        ``(mu, mu_next, mu_floor)`` for :func:`_error_interval`.
    """
    c = ritz.converged
    values = ritz.values[:c]
    if c == 0:
        return values, None, None
    if c == dim:
        mu = torch.cat([values.abs() if by_magnitude else values, values.new_zeros(zeros)])
        return torch.sort(mu, descending=True).values, None, None
    tau = float(values[-1].abs())
    if by_magnitude:
        return values.abs(), tau, None
    negatives = int((values < 0).sum())
    floor = -tau if r <= dim + zeros - negatives else None
    return torch.sort(values[values > 0], descending=True).values, tau, floor


def _on_sample_span(block: ExactBlock, approx: KronSum) -> KronSum:
    """``approx`` restricted to the span of the per-sample factors where that is smaller than a side.

    Every factor the methods build is a sum of per-sample products (``Σ g gᵀ``, ``Σ DW Y DWᵀ``, ...),
    so it lies in ``span{g_nvt}`` (output side) and ``span{a_nt}`` (input side), of dimension at most
    ``N V T`` and ``N T``: a thin SVD of the factors gives orthonormal bases at ``O(d (N T)²)``,
    far below the ``O(d³)`` of :meth:`~fisherlab.kron.KronSum.on_ranges` on a wide conv layer.
    Checked (:meth:`~fisherlab.kron.KronSum.restricted`); any other sum, or a sharded batch (each
    process holds only its rows), is returned as is.
    """
    if block.span_bases is None:
        return approx
    u, v = (None if b is None else b.to(approx.outs[0].dtype) for b in block.span_bases)
    if u is None and v is None:
        return approx
    restricted = approx.restricted(u, v)
    return approx if restricted is None else restricted


def _in_first_eigenbasis(approx: KronSum) -> tuple[Callable[[Tensor], Tensor], float]:
    """``F̂`` in the eigenbasis ``U_out ⊗ U_in`` of its first term (an orthogonal similarity: the
    same eigenvalues), where that term is diagonal: a batched product costs an elementwise
    multiply plus the other terms' GEMMs, half the flops for Kronecker rank 2. Returns the
    product on ``[k, d_out, d_in]`` batches and its flops per matrix."""
    e_out, u_out = torch.linalg.eigh(approx.outs[0])
    e_in, u_in = torch.linalg.eigh(approx.ins[0])
    diagonal = e_out[:, None] * e_in[None, :]
    rest = KronSum(
        tuple(u_out.T @ o @ u_out for o in approx.outs[1:]), tuple(u_in.T @ i @ u_in for i in approx.ins[1:])
    )

    def product(w: Tensor) -> Tensor:
        return rest.matvec(w) + diagonal * w

    d_out, d_in = approx.d_out, approx.d_in
    return product, 2 * rest.rank * (d_out**2 * d_in + d_out * d_in**2) + 2 * d_out * d_in


def spectral_error_bounded(
    ref: BlockReference,
    approx: BlockOperator,
    *,
    spectrum: Spectrum | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    memory_limit: int | None = None,
) -> SpectralError:
    """Error 2 within a memory limit: exact where the needed eigenvalues fit, else bounded.

    Needs the ``r = min(N V, D)`` largest eigenvalues of ``F̂`` (:func:`_error_interval`), and
    far fewer when the spectra decay (the unknown rest is bounded). One Kronecker term: all of
    them exactly, from the factors' eigenvalues. More terms: restricted to the factors' ranges
    (:meth:`~fisherlab.kron.KronSum.on_ranges`, exact), then dense up to
    :data:`SPECTRAL_DENSE_SIDE` or when that costs fewer flops than iterating for the ``r``
    eigenvalues (:func:`_dense_flops`, :func:`_lanczos_flops`; and ``F̂`` fits); otherwise the largest
    by block Lanczos on the batched Kronecker product
    (:func:`~fisherlab.krylov.block_lanczos_eigenvalues`, on the factors' device; its basis
    fills ``memory_limit``, default :func:`spectral_limits` of the device, and restarts thick
    beyond) until the interval's half-width is within ``max(rtol value, atol)`` or all ``r``
    are known. When the solver has spent the device's work limit first: dense if ``F̂`` fits
    (``D <= kron.symmetric_eig_dense_limit``), else the bounded value with a note.

    Where every eigenvalue of ``F̂`` is known (one term, dense) the tail ``Σ_{i>r} μ_i²`` is summed
    from them, so error 2 resolves to rounding; the returned bound covers that rounding, the
    eigensolver's residuals (:func:`_ritz_errors`) and the unknown eigenvalues. The CPU threads
    are :func:`spectral_threads`, restored afterwards.

    Any other block operator: its closed-form ``eigenvalues()`` (diagonal, eigenbasis-diagonal,
    dense), else its dense matrix when that fits and is cheaper, else block Lanczos on its ``matvec``.
    """
    with blas_threads(spectral_threads(ref.eigenvalues.device)):
        return _spectral_error_bounded(ref, approx, spectrum, rtol, atol, memory_limit)


def _spectral_error_bounded(
    ref: BlockReference,
    approx: BlockOperator,
    spectrum: Spectrum | None,
    rtol: float | None,
    atol: float | None,
    memory_limit: int | None,
) -> SpectralError:
    """:func:`spectral_error_bounded` (with the eigensolver's threads already chosen)."""
    from fisherlab import kron as kron_module

    spectrum = ref.spectrum if spectrum is None else Spectrum(spectrum)
    by_magnitude = spectrum == Spectrum.SINGULAR_VALUES
    kron = approx if isinstance(approx, KronSum) else None
    device_memory, work_limit = spectral_limits(ref.eigenvalues.device)
    limit = device_memory if memory_limit is None else memory_limit
    rtol = SPECTRAL_RTOL if rtol is None else rtol
    atol = SPECTRAL_ATOL if atol is None else atol
    lam = ref.eigenvalues.clamp(min=0)
    den = float(torch.sum(lam**2))
    r, dim = lam.numel(), approx.d_out * approx.d_in
    like = kron.outs[0] if kron is not None else lam
    itemsize = like.element_size()
    norm_squared = float(approx.frobenius_norm_squared())
    # rounding, in the probabilistic model of Higham & Mary (2019, SIAM J. Sci. Comput. 41, A2815): a
    # backward-stable step on n numbers errs by ~√n ε of its scale. The eigenvalues of F: its Gram matrix
    # (side N V, entries summed over T² position pairs and d_out + d_in products; scale trace F); of F̂:
    # products and projections of its factors and the eigensolver (scale Σ_k ||out_k||_F ||in_k||_F)
    eps = max(torch.finfo(like.dtype).eps, torch.finfo(lam.dtype).eps)
    f = ref.block.factors
    sides = approx.d_out + approx.d_in

    def gamma(n: int) -> float:
        return eps * math.sqrt(n)

    lam_error = gamma(f.n_samples * f.n_directions + f.n_positions**2 * (f.d_out + f.d_in)) * float(lam.sum())
    if kron is not None:
        scale = sum(
            float(torch.linalg.matrix_norm(o) * torch.linalg.matrix_norm(i)) for o, i in zip(kron.outs, kron.ins)
        )
    else:
        scale = math.sqrt(norm_squared)

    def result(
        mu: Tensor,
        mu_next: float | None = None,
        mu_floor: float | None = None,
        *,
        complete: bool,
        mu_error: Tensor | float,
    ) -> SpectralError:
        """``mu``: the leading eigenvalues of ``F̂`` (``complete``: all of them), each within ``mu_error``."""
        low, high = _error_interval(
            lam, mu, norm_squared, by_magnitude=by_magnitude, mu_next=mu_next, mu_floor=mu_floor, complete=complete
        )
        lo, hi = math.sqrt(low / den), math.sqrt(high / den)
        value = (lo + hi) / 2
        errors = torch.as_tensor(mu_error, dtype=torch.float64).flatten().cpu()
        if complete:  # ||spec F - spec F̂|| over every eigenvalue moves by at most the norms of their errors
            spread, shift = 0.0, lam_error + float(torch.linalg.vector_norm(errors))
        else:  # ∂/∂μ_i (Σ (λ_i - μ_i)² + ||F̂||² - Σ μ_i²) = -2 λ_i; ||F̂||² and Σ μ_i² round at γ scale²
            m = min(mu.numel(), r)
            paired = torch.sort(errors, descending=True).values[:m] if errors.numel() > 1 else errors.expand(m)
            spread = 2 * float(torch.sum(lam[: paired.numel()].double().cpu() * paired)) + gamma(sides + m) * scale**2
            shift = lam_error
        low_r = max(math.sqrt(max(low - spread, 0.0)) - shift, 0.0) / math.sqrt(den)
        high_r = (math.sqrt(high + spread) + shift) / math.sqrt(den)
        bound = max(value - low_r, high_r - value)
        return SpectralError(value, bound, mu.numel(), unknown=(hi - lo) / 2)

    if kron is not None and kron.rank == 1:  # every eigenvalue, exactly: products of the factors' eigenvalues
        mu = kron.eigenvalues(by_magnitude=by_magnitude)
        if ref.zeros:
            mu = torch.sort(torch.cat([mu, mu.new_zeros(min(r, ref.zeros))]), descending=True).values
        return result(mu, complete=True, mu_error=gamma(sides) * scale)
    closed = getattr(approx, "eigenvalues", None) if kron is None else None
    closed_values = closed() if callable(closed) else None
    if closed_values is not None:  # a diagonal, eigenbasis-diagonal or dense operator: all of them
        ev = closed_values.flatten().to(lam)
        ev = torch.cat([ev.abs() if by_magnitude else ev, ev.new_zeros(min(r, ref.zeros))])
        return result(torch.sort(ev, descending=True).values, complete=True, mu_error=gamma(dim + sides) * scale)
    if kron is not None:
        kron = _on_sample_span(ref.block, kron)
        full, kron = dim, kron.on_ranges()  # same eigenvalues but zeros; smaller when the batch is
        dim, zeros = kron.dim, full - kron.dim + ref.zeros
        d_out, d_in = kron.d_out, kron.d_in
        per_vector = 2 * (kron.rank - 1) * (d_out**2 * d_in + d_out * d_in**2) + 2 * d_out * d_in  # see below
    else:
        zeros, d_out, d_in = ref.zeros, approx.d_out, approx.d_in
        per_vector = 2 * d_out * d_in * (d_out + d_in)  # a matvec of a Kronecker-like operator (unknown: a guess)

    def all_eigenvalues() -> Tensor:
        if kron is not None:
            return kron.eigenvalues(by_magnitude=by_magnitude)
        dense_hat = approx.as_dense().to(lam)
        ev = torch.linalg.eigvalsh((dense_hat + dense_hat.T) / 2)
        return ev.abs() if by_magnitude else ev

    def dense() -> SpectralError:
        ev = torch.cat([all_eigenvalues().to(lam), lam.new_zeros(min(r, zeros))])
        return result(torch.sort(ev, descending=True).values, complete=True, mu_error=gamma(dim + sides) * scale)

    dense_fits = dim <= kron_module.symmetric_eig_dense_limit and dim * dim * itemsize <= limit
    vectors = int(limit // (dim * itemsize))  # of length D, within the memory limit
    # block size: room for eigenvalue clusters and a basis of three blocks at least; narrow blocks
    # need fewer vectors (16-32: 5 s for the 257 x 256 layer of bench_spectral, 64: 7.7 s, 128: 11 s)
    width = min(32, max(16, r // 16), vectors // (3 + _SOLVER_COPIES), dim)
    max_dim = min(dim, vectors - _SOLVER_COPIES * width)
    # dense when small, or when cheaper than iterating for the r eigenvalues needed (a side of 2 562 and
    # r = 512: 1.4 s dense against 7 s of Lanczos, whose basis and checks grow like r² D and r³)
    if dense_fits and (
        dim <= SPECTRAL_DENSE_SIDE or _dense_flops(dim) <= _lanczos_flops(dim, r, max(width, 1), per_vector)
    ):
        return dense()
    if width < 1:
        need = (3 + _SOLVER_COPIES) * dim * itemsize / 2**30
        return SpectralError(
            math.nan, math.inf, 0, f"the eigensolver's smallest basis for F_hat (D = {dim}) needs {need:.1f} GiB"
        )
    tol = max(1e-10, 50 * torch.finfo(like.dtype).eps)
    gen = torch.Generator().manual_seed(0)
    if kron is not None:
        operator, per_vector = _in_first_eigenbasis(kron)  # the same count
    else:
        operator = approx.matvec
    start = torch.randn(width, d_out, d_in, generator=gen, dtype=torch.float64)

    def interval(ritz: RitzValues) -> SpectralError:
        mu, mu_next, mu_floor = _leading_eigenvalues(ritz, by_magnitude=by_magnitude, dim=dim, r=r, zeros=zeros)
        errors = _ritz_errors(ritz, ritz.converged, gamma(dim + sides) * scale)
        complete = ritz.converged == dim
        return result(mu, mu_next, mu_floor, complete=complete, mu_error=errors if complete or mu.numel() else 0.0)

    def within_tolerance(res: SpectralError) -> bool:
        return res.unknown <= max(rtol * res.value, atol)

    ritz = block_lanczos_eigenvalues(
        operator,
        start.to(dtype=like.dtype, device=like.device),
        r if by_magnitude else dim,  # algebraic order: negative eigenvalues interleave, `enough` decides
        max_dim=max_dim,
        tol=tol,
        product_flops=per_vector,
        max_flops=work_limit,
        enough=lambda ritz: within_tolerance(interval(ritz)),
    )
    res = interval(ritz)
    if within_tolerance(res):
        return res
    if dense_fits:
        return dense()
    why = (
        f"the eigensolver's work limit ({work_limit:.0e} flops)"
        if ritz.flops >= work_limit
        else f"{limit / 2**30:.1f} GiB"
    )
    return SpectralError(
        res.value, res.bound, res.eigenvalues, f"{res.eigenvalues} of the {r} eigenvalues fit in {why}", res.unknown
    )


def spectral_error(ref: BlockReference, approx: BlockOperator, *, spectrum: Spectrum | None = None) -> Tensor:
    """Error 2, ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` (K §4.1), sorted descending.

    Only the ``r`` largest eigenvalues of ``F̂`` are needed (exact products of factor
    eigenvalues for a single Kronecker product); see :func:`spectral_error_bounded` for the
    memory limit and the bound stored beside the value.

    Args:
        ref: The exact block's norm and spectrum.
        approx: The approximation.
        spectrum: Eigenvalues (the paper's text) or singular values; default ``ref.spectrum``.
    """
    return torch.tensor(_spectral(ref, approx, spectrum).value, dtype=ref.eigenvalues.dtype)


def _spectral(ref: BlockReference, approx: BlockOperator, spectrum: Spectrum | None = None) -> SpectralError:
    """:func:`spectral_error_bounded`, computed once per (reference, approximation, spectrum)."""
    key = ("spectral_error", id(approx), spectrum)
    if key not in ref.cache:
        res = spectral_error_bounded(ref, approx, spectrum=spectrum)
        if res.note:
            warnings.warn(
                f"error 2 of layer {ref.layer!r}: {res.note}; stored as {res.value:.6g} with spectral_error_bound "
                f"{res.bound:.2g}",
                UndefinedMetricWarning,
                stacklevel=3,
            )
        ref.cache[key] = (approx, res)  # the approximation is kept alive so that its id stays unique
    return ref.cache[key][1]


# -- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockMetric(Variable):
    """A quantity of one (layer, method) pair: ``compute(reference, approximation) -> float``.

    ``error`` metrics compare the approximation with the exact block: they can be chosen with
    ``--metrics``, are NaN (with a warning) where the block is zero, and are drawn by
    :func:`fisherlab.plots.error_figure`.
    """

    compute: Callable[[BlockReference, Approximation], float] = field(default=lambda ref, a: math.nan, repr=False)
    error: bool = False
    cli_note: str = ""
    accompanies: str = ""  # an error metric this one belongs to: NaN whenever that one is skipped


@dataclass(frozen=True)
class LayerMetric(Variable):
    """A quantity of the exact block of one layer: ``compute(reference) -> float``."""

    compute: Callable[[BlockReference], float] = field(default=lambda ref: math.nan, repr=False)
    power: int = 0  # F scaled by c scales this by c**power (multiplied back after ExactBlock.normalised)


BLOCK_METRICS: tuple[BlockMetric, ...] = (
    BlockMetric(
        "frobenius_error",
        PER_METHOD,
        "error 1 (relative Frobenius)",
        "1",
        "||F - F_hat||_F / ||F||_F (K Sec. 4.1); NaN where the block is zero "
        "(fisher_frobenius_norm = 0: undefined, a warning says so)",
        compute=lambda ref, a: _frobenius(ref, a.operator).value,
        error=True,
        cli_note="always computed",
    ),
    BlockMetric(
        "frobenius_error_resolution",
        PER_METHOD,
        "resolution of error 1",
        "1",
        "|frobenius_error - exact| <= this (to rounding): 0 when F - F_hat was formed before squaring (always below "
        f"{FROBENIUS_RECOMPUTE_BELOW:g}, in float32 always, within {FROBENIUS_WORK_LIMIT:.0e} flops and "
        f"{FROBENIUS_MEMORY_LIMIT / 2**20:.0f} MiB), else the rounding of "
        "||F||^2 - 2 <F, F_hat> + ||F_hat||^2, which cancels when F_hat ~ F (about sqrt(eps) relative)",
        compute=lambda ref, a: _frobenius(ref, a.operator).resolution,
        accompanies="frobenius_error",
    ),
    BlockMetric(
        "spectral_error",
        PER_METHOD,
        "error 2 (relative spectral)",
        "1",
        "||spec(F) - spec(F_hat)||_2 / ||spec(F)||_2, spectra sorted descending (K Sec. 4.1); see attr spectrum; "
        "NaN when not in attr metrics",
        compute=lambda ref, a: _spectral(ref, a.operator).value,
        error=True,
        cli_note="Kronecker-rank-2 methods need the top eigenvalues of a d_out d_in-sided matrix; bounded in memory",
    ),
    BlockMetric(
        "spectral_error_bound",
        PER_METHOD,
        "bound on the error of error 2",
        "1",
        "|spectral_error - exact error 2 of F_hat| <= this, never 0: rounding of the formula and the eigenvalues and "
        "the eigensolver's residuals, plus the interval the unknown small eigenvalues leave when only the "
        f"largest fit in the eigensolver's memory or work limit ({SPECTRAL_MEMORY_LIMIT / 2**30:.0f} GiB and "
        f"{SPECTRAL_WORK_LIMIT:.0e} flops on CPU; a warning says so), inf when none did (value NaN)",
        compute=lambda ref, a: _spectral(ref, a.operator).bound,
        accompanies="spectral_error",
    ),
    BlockMetric(
        "solver_iterations",
        PER_METHOD,
        "solver iterations",
        "1",
        "products with R(F) (mv+rmv pairs); 0 for kfac",
        compute=lambda ref, a: a.iterations,
        dtype="int32",
    ),
    BlockMetric(
        "converged",
        PER_METHOD,
        "solver converged",
        "1",
        "1 if every iterative stage met tol, else 0",
        compute=lambda ref, a: int(a.converged),
        dtype="int8",
    ),
    BlockMetric(
        "solver_residual",
        PER_METHOD,
        "relative solver residual",
        "1",
        "max over stages of ||R^T x - s y|| / s, R the (deflated) rearranged block and s the singular value the "
        "stage computes (Lanczos: / s_1)",
        compute=lambda ref, a: a.residual,
    ),
    BlockMetric(
        "approximation_time",
        PER_METHOD,
        "time to build the approximation",
        "s",
        "wall clock",
        compute=lambda ref, a: a.seconds,
    ),
)

LAYER_METRICS: tuple[LayerMetric, ...] = (
    LayerMetric(
        "fisher_frobenius_norm",
        PER_LAYER,
        "||F||_F of the exact block",
        "1",
        "||K||_F / N, K the Gram matrix; inf where it exceeds float64 (a warning says so)",
        compute=lambda ref: float(ref.norm_squared.sqrt()),
        power=1,
    ),
)


@dataclass(frozen=True)
class BlockEvaluation:
    """Approximations of one exact block and every registered metric of them (K §4.1).

    Args:
        approximations: Per method name.
        values: ``values[metric][method]`` for every :data:`BLOCK_METRICS` entry (NaN for an
            error metric not asked for, or undefined).
        layer_values: ``layer_values[metric]`` for every :data:`LAYER_METRICS` entry.
    """

    approximations: dict[str, Approximation]
    values: dict[str, dict[str, float]]
    layer_values: dict[str, float]


def _scaled_back(value: float, factor: float, power: int) -> float:
    """``value * factor**power`` that overflows to inf (Python's ``**`` raises instead)."""
    for _ in range(power):
        value *= factor
    return value


def evaluate_block(
    block: ExactBlock,
    methods: Sequence[object] | None = None,
    config: ApproxConfig | None = None,
    *,
    spectrum: Spectrum | str = Spectrum.EIGENVALUES,
    metrics: Sequence[str] = ERROR_METRICS,
    warm: WarmStarts | None = None,
    layer: str = "",
) -> BlockEvaluation:
    """Build every approximation of ``block`` and compute every registered metric of each.

    Restrict → approximate → measure → lift: a layer wider than its batch is first restricted to
    the span of its per-sample factors (:meth:`~fisherlab.fisher.ExactBlock.sample_span`: the same
    approximations and errors on a smaller block) for every method registered ``span_invariant``
    (the papers' five); the others are built and measured on the whole block. Approximations are
    returned lifted to the whole block. The Gram matrix (hence ``||F||_F`` and the spectrum) is
    computed once per block and shared. Error metrics not in ``metrics`` are stored as NaN (error 2
    of Kronecker-rank-2 methods is the one cost that grows like ``(d_out d_in)^3``). A zero block
    warns once (:class:`UndefinedMetricWarning`) and gives NaN errors.

    Args:
        block: The exact block.
        methods: Registered method names (default: the papers' five), ``all`` or ``package.module:attribute``.
        config: Solver settings.
        spectrum: What error 2 compares.
        metrics: Error metrics to compute.
        warm: Warm starts per method (:func:`~fisherlab.approximations.warm_starts`).
        layer: Layer name used in warnings.
    """
    names = resolve_methods(PAPER_METHODS if methods is None else methods)
    block, s_out, s_in = block.normalised()  # extreme scales: F = s_out² s_in² F', errors are relative
    span = block.sample_span()  # a wide layer at a small batch: the same errors on a smaller block
    on_span = [m for m in names if span is not None and METHODS[m].span_invariant]
    whole = [m for m in names if m not in on_span]
    refs: dict[str, BlockReference] = {}
    approx: dict[str, Approximation] = {}
    if on_span:
        assert span is not None
        ref = BlockReference.of(span.block, spectrum=spectrum, layer=layer, zeros=span.zeros)
        warm_on_span = restricted_warm_starts(warm, span)
        built = approximate_all(span.block, on_span, config, warm=warm_on_span, layer=layer, restrict=False)
        for name, a in built.items():
            refs[name], approx[name] = ref, a
    if whole:
        ref = BlockReference.of(block, spectrum=spectrum, layer=layer)
        for name, a in approximate_all(block, whole, config, warm=warm, layer=layer, restrict=False).items():
            refs[name], approx[name] = ref, a
    any_ref = next(iter(refs.values()), None) or BlockReference.of(block, spectrum=spectrum, layer=layer)
    zero = not float(any_ref.norm_squared) > 0
    if zero:
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is zero (no gradient reaches it: dead or saturated units); "
            "error 1 and error 2 are undefined there and stored as NaN (fisher_frobenius_norm = 0)",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    values: dict[str, dict[str, float]] = {}
    skipped = {m.name for m in BLOCK_METRICS if m.error and (zero or m.name not in metrics)}
    for metric in BLOCK_METRICS:
        skip = metric.name in skipped or metric.accompanies in skipped
        values[metric.name] = {m: math.nan if skip else float(metric.compute(refs[m], approx[m])) for m in names}
    layer_values = {
        metric.name: _scaled_back(float(metric.compute(any_ref)), s_out * s_in, 2 * metric.power)
        for metric in LAYER_METRICS
    }
    if not all(math.isfinite(v) for v in layer_values.values()) and not zero:
        exponent = 2 * (math.log2(s_out) + math.log2(s_in))
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is beyond float64 (||F||_F ~ 2^{exponent:.0f} x "
            f"{float(any_ref.norm_squared.sqrt()):.3g}); its errors, relative, are stored, "
            "fisher_frobenius_norm as inf",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    if span is not None:
        approx = {m: approx[m].lifted(span) if m in on_span else approx[m] for m in names}
    approx = {m: a.scaled(s_out, s_in) for m, a in approx.items()}
    return BlockEvaluation(approx, values, layer_values)
