"""Error 2, ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` (K §4.1), both spectra sorted descending: the engine.

``F`` has at most ``r = min(N V, D)`` nonzero eigenvalues, all ``>= 0``, so
``sum_i (λ_i - μ_i)² = sum_{i<=r} (λ_i - μ_i)² + ||F̂||_F² - sum_{i<=r} μ_i²`` needs only the ``r``
largest eigenvalues of ``F̂``: products of factor eigenvalues for one Kronecker term, closed forms
for operators that have them, else dense ``eigvalsh`` or block Lanczos on the matvec, whichever the
cost model (:func:`_dense_flops`, :func:`_lanczos_flops`) says is cheaper within the limits
(:class:`SpectralLimits`, passed explicitly or :meth:`SpectralLimits.for_device`). Where the needed
eigenvalues do not fit, error 2 is stored with a bound (:class:`SpectralError`), never a crash.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.kron import KronSum, symmetric_eig_dense_limit
from fisherlab.krylov import RitzValues, blas_threads, block_lanczos_eigenvalues, free_threads
from fisherlab.metrics.reference import BlockReference
from fisherlab.operators import BlockOperator
from fisherlab.sample_span import on_sample_span
from fisherlab.vocabulary import Spectrum

__all__ = [
    "SPECTRAL_ATOL",
    "SPECTRAL_DENSE_SIDE",
    "SPECTRAL_GPU_MEMORY_FRACTION",
    "SPECTRAL_GPU_WORK_LIMIT",
    "SPECTRAL_MEMORY_LIMIT",
    "SPECTRAL_RTOL",
    "SPECTRAL_THREADS",
    "SPECTRAL_WORK_LIMIT",
    "SpectralError",
    "SpectralLimits",
    "spectral_error",
    "spectral_error_bounded",
    "spectral_limits",
    "spectral_threads",
]

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

#: CPU threads of error 2's eigensolver (dense ``eigvalsh`` or block Lanczos) by default: ``None``
#: chooses (:func:`spectral_threads`); :attr:`SpectralLimits.threads` fixes it.
SPECTRAL_THREADS: int | None = None


@dataclass(frozen=True)
class SpectralLimits:
    """What error 2's eigensolver may spend, passed explicitly (:func:`spectral_error_bounded`,
    :class:`~fisherlab.metrics.reference.BlockReference`, :func:`~fisherlab.metrics.evaluate_block`).

    The defaults are the module constants; :meth:`for_device` gives them for a device (more memory
    and work on a GPU). Change one with :func:`dataclasses.replace`, e.g.
    ``replace(SpectralLimits.for_device(device), threads=1)``.

    Args:
        memory: Bytes the eigenvalues may take: a dense ``D x D`` block, or the eigensolver's block of
            vectors of length ``D`` (:data:`SPECTRAL_MEMORY_LIMIT`). Beyond it error 2 is bounded.
        work: Floating-point operations the eigensolver may spend on one error 2
            (:data:`SPECTRAL_WORK_LIMIT`); beyond, the value is stored with its bound.
        dense_side: Up to this side a multi-term ``F̂`` is diagonalised densely (:data:`SPECTRAL_DENSE_SIDE`).
        rtol: The eigensolver stops once the error-2 interval's half-width is within
            ``max(rtol * value, atol)`` (:data:`SPECTRAL_RTOL`).
        atol: See ``rtol`` (:data:`SPECTRAL_ATOL`).
        threads: CPU threads of the eigensolver; ``None`` chooses from the load (:func:`spectral_threads`).
        gpu_memory_fraction: On a CUDA device (:meth:`for_device`) the eigensolver may use this
            fraction of the free device memory, at least ``memory`` (:data:`SPECTRAL_GPU_MEMORY_FRACTION`).
        gpu_work: The work limit on a CUDA device (:data:`SPECTRAL_GPU_WORK_LIMIT`).
        dense_max_side: Above this side a multi-term ``F̂`` is never formed densely
            (:data:`fisherlab.kron.symmetric_eig_dense_limit`).
    """

    memory: int = SPECTRAL_MEMORY_LIMIT
    work: float = SPECTRAL_WORK_LIMIT
    dense_side: int = SPECTRAL_DENSE_SIDE
    rtol: float = SPECTRAL_RTOL
    atol: float = SPECTRAL_ATOL
    threads: int | None = SPECTRAL_THREADS
    gpu_memory_fraction: float = SPECTRAL_GPU_MEMORY_FRACTION
    gpu_work: float = SPECTRAL_GPU_WORK_LIMIT
    dense_max_side: int = symmetric_eig_dense_limit

    @classmethod
    def for_device(cls, device: torch.device) -> SpectralLimits:
        """The default limits on ``device``: on a CUDA device ``memory`` becomes
        ``max(memory, gpu_memory_fraction * free device memory)`` and ``work`` becomes ``gpu_work``."""
        limits = cls()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory = max(limits.memory, int(limits.gpu_memory_fraction * free))
            return replace(limits, memory=memory, work=limits.gpu_work)
        return limits


def spectral_limits(device: torch.device) -> tuple[int, float]:
    """Memory (bytes) and work (flops) the error-2 eigensolver may spend on ``device`` by default:
    those of :meth:`SpectralLimits.for_device`."""
    limits = SpectralLimits.for_device(device)
    return limits.memory, limits.work


def spectral_threads(device: torch.device, fixed: int | None = None) -> int | None:
    """CPU threads for error 2's heavy kernels (dense ``eigvalsh`` or block Lanczos):
    :func:`~fisherlab.krylov.free_threads`, torch's number less the cores other processes keep busy,
    unless ``fixed`` (:attr:`SpectralLimits.threads`) fixes it. ``None`` (unchanged) on a GPU."""
    return free_threads(device, fixed)


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
    limits: SpectralLimits | None = None,
) -> SpectralError:
    """Error 2 within a memory limit: exact where the needed eigenvalues fit, else bounded.

    Needs the ``r = min(N V, D)`` largest eigenvalues of ``F̂`` (:func:`_error_interval`), and
    far fewer when the spectra decay (the unknown rest is bounded). One Kronecker term: all of
    them exactly, from the factors' eigenvalues. More terms: restricted to the sample span
    (:func:`~fisherlab.sample_span.on_sample_span`) and, where a side exceeds the per-sample products
    its factors sum, the factors' ranges (:meth:`~fisherlab.kron.KronSum.on_ranges`, exact), then dense up to
    ``limits.dense_side`` or when that costs fewer flops than iterating for the ``r``
    eigenvalues (:func:`_dense_flops`, :func:`_lanczos_flops`; and ``F̂`` fits); otherwise the largest
    by block Lanczos on the batched Kronecker product
    (:func:`~fisherlab.krylov.block_lanczos_eigenvalues`, on the factors' device; its basis
    fills ``limits.memory`` and restarts thick beyond) until the interval's half-width is within
    ``max(limits.rtol value, limits.atol)`` or all ``r`` are known. When the solver has spent
    ``limits.work`` first: dense if ``F̂`` fits (``D <= limits.dense_max_side``), else the bounded
    value with a note.

    Where every eigenvalue of ``F̂`` is known (one term, dense) the tail ``Σ_{i>r} μ_i²`` is summed
    from them, so error 2 resolves to rounding; the returned bound covers that rounding, the
    eigensolver's residuals (:func:`_ritz_errors`) and the unknown eigenvalues. The CPU threads
    are :func:`spectral_threads`, restored afterwards.

    Any other block operator: its closed-form ``eigenvalues()`` (diagonal, eigenbasis-diagonal,
    dense), else its dense matrix when that fits and is cheaper, else block Lanczos on its ``matvec``.

    Args:
        ref: The exact block's norm and spectrum.
        approx: The approximation.
        spectrum: Eigenvalues or singular values; default ``ref.spectrum``.
        limits: What the eigensolver may spend; default ``ref.limits``, else
            :meth:`SpectralLimits.for_device` of the block's device.
    """
    device = ref.block.factors.a.device  # not ref.eigenvalues: those are computed below, with the threads chosen
    limits = limits or ref.limits or SpectralLimits.for_device(device)
    with blas_threads(spectral_threads(device, limits.threads)):
        return _spectral_error_bounded(ref, approx, spectrum, limits)


def _spectral_error_bounded(
    ref: BlockReference, approx: BlockOperator, spectrum: Spectrum | None, limits: SpectralLimits
) -> SpectralError:
    """:func:`spectral_error_bounded` (with the eigensolver's threads already chosen)."""
    spectrum = ref.spectrum if spectrum is None else Spectrum(spectrum)
    by_magnitude = spectrum == Spectrum.SINGULAR_VALUES
    kron = approx if isinstance(approx, KronSum) else None
    limit, work_limit = limits.memory, limits.work
    rtol, atol = limits.rtol, limits.atol
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
        kron = on_sample_span(ref.block, kron)
        full = dim
        # the factors' ranges (same eigenvalues but zeros) where a side has more dimensions than the per-sample
        # products its factors sum (a sharded wide layer), or where F̂ may be diagonalised densely and the
        # factors' SVDs (~4 rank side³ flops) cost little next to it: numerically rank-deficient factors shrink
        # it (CURVES layer 5's error 2 took twice as long without). Else the SVD (12 of 50 s of the papers'
        # five on a 128 x 1152 conv layer at batch 8) would find nothing to cut
        products = f.n_samples * f.n_positions
        few_samples = products * f.n_directions < kron.d_out or products < kron.d_in
        svd_flops = 4 * kron.rank * (kron.d_out**3 + kron.d_in**3)
        if few_samples or (dim <= limits.dense_max_side and svd_flops <= _dense_flops(dim) / 8):
            kron = kron.on_ranges()
        dim, zeros = kron.dim, full - kron.dim + ref.zeros
        d_out, d_in = kron.d_out, kron.d_in
        per_vector: float = 2 * (kron.rank - 1) * (d_out**2 * d_in + d_out * d_in**2) + 2 * d_out * d_in  # see below
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

    dense_fits = dim <= limits.dense_max_side and dim * dim * itemsize <= limit
    vectors = int(limit // (dim * itemsize))  # of length D, within the memory limit
    # block size: room for eigenvalue clusters and a basis of three blocks at least; narrow blocks
    # need fewer vectors (16-32: 5 s for the 257 x 256 layer of bench_spectral, 64: 7.7 s, 128: 11 s)
    width = min(32, max(16, r // 16), vectors // (3 + _SOLVER_COPIES), dim)
    max_dim = min(dim, vectors - _SOLVER_COPIES * width)
    # dense when small, or when cheaper than iterating for the r eigenvalues needed (a side of 2 562 and
    # r = 512: 1.4 s dense against 7 s of Lanczos, whose basis and checks grow like r² D and r³)
    if dense_fits and (
        dim <= limits.dense_side or _dense_flops(dim) <= _lanczos_flops(dim, r, max(width, 1), per_vector)
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
