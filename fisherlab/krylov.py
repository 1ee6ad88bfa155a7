"""Matrix-free top singular triplets: power SVD (K Alg. 1) and restarted Lanczos
bidiagonalization (K Alg. 2, §3.2.2); top eigenvalues of a symmetric operator by block
Lanczos with thick restarts (for error 2 of Kronecker-rank-2 approximations).

The SVDs work on an operator given by two callables on *matrices*: ``mv(Y) = mat(A vec(Y))``
and ``rmv(X) = mat(A^T vec(X))``, so the rearranged Fisher never has to be formed; the
eigensolver on a callable that maps a batch of matrices ``[k, *shape]`` to their images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RitzValues",
    "SingularTriplets",
    "blas_threads",
    "block_lanczos_eigenvalues",
    "free_threads",
    "lanczos_svd",
    "power_svd",
]

MatVec = Callable[[Tensor], Tensor]

#: A Lanczos step whose new vector is below this fraction of the largest ``α`` so far ends
#: the Krylov space (breakdown): the space is invariant and the triplets found are exact.
_BREAKDOWN = 1e-12

#: Thick restarts in a row that neither converge a Ritz pair nor halve the first unconverged
#: residual end the block Lanczos solver.
_STALLED_RESTARTS = 10


@contextmanager
def blas_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, restoring the previous number afterwards
    (also on an exception); ``None`` or the current number: unchanged."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def free_threads(device: torch.device, fixed: int | None = None) -> int | None:
    """CPU threads for an eigensolver or SVD (LAPACK): torch's number, less the cores other processes keep busy.

    On a shared machine more threads than free cores spin against each other in LAPACK's
    memory-bound reductions (error 2's call took 81 s with two threads on a loaded 2-core machine,
    1.5 s with one; ``eigh`` of a 1 152-sided factor 4.5-8.3 s against 0.7-1.2 s), so these run
    with ``min(torch threads, cores - (1-minute load average - 1))``, at least 1, unless ``fixed``
    fixes it. ``None`` (unchanged) on a GPU. Use with :func:`blas_threads`.
    """
    if device.type != "cpu":
        return None
    if fixed is not None:
        return max(1, int(fixed))
    threads = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0] - 1.0  # the load this process adds is its own
    except (AttributeError, OSError):  # no affinity or load average on this platform
        return threads
    return max(1, min(threads, math.floor(cores - max(busy, 0.0) + 0.5)))


@dataclass(frozen=True)
class SingularTriplets:
    """Top singular triplets ``A y_k = σ_k x_k`` with solver diagnostics.

    Args:
        sigmas: ``[k]`` singular values, descending.
        lefts: ``k`` left vectors as matrices (output side of ``mv``).
        rights: ``k`` right vectors as matrices (input side of ``mv``).
        iterations: Operator applications (pairs of ``mv``/``rmv``) used.
        converged: Whether the residual met the tolerance.
        residual: Final relative residual ``max_k ||A^T x_k - σ_k y_k|| / σ_1``.
    """

    sigmas: Tensor
    lefts: tuple[Tensor, ...]
    rights: tuple[Tensor, ...]
    iterations: int
    converged: bool
    residual: float


def power_svd(
    mv: MatVec, rmv: MatVec, start: Tensor, *, tol: float, max_iter: int, scale: float = 0.0
) -> SingularTriplets:
    """Dominant singular triplet by the power SVD algorithm.

    Iterates ``x = A y / ||A y||``, ``z = A^T x``, ``σ = ||z||``, ``y = z / σ`` and stops when
    ``||A y - σ x|| <= tol * max(σ, scale)`` (the paper's absolute ``ε`` made relative, so
    that the criterion does not depend on the scale of the Fisher; deflated stages pass the
    rounding noise of their products (relative to the first term) over ``tol`` as ``scale``, so
    the second term is accurate relative to itself yet a vanishing one does not iterate on noise).
    An operator that vanishes on the start vector returns a zero triplet.

    Args:
        mv: ``Y ↦ mat(A vec(Y))``.
        rmv: ``X ↦ mat(A^T vec(X))``.
        start: Start vector (as a matrix) on the input side; warm starts pass the previous ``y``.
        tol: Relative residual tolerance (K uses ``ε = 1e-6``).
        max_iter: Iteration cap.
        scale: Lower bound of the residual's normaliser (0: relative to ``σ`` alone).

    Returns:
        One triplet; ``converged`` is False when ``max_iter`` was reached.

    References:
        Koroko et al. (2022), App. B.1, Algorithm 1.
    """
    y = _unit(start)
    ay = mv(y)
    sigma = torch.zeros((), dtype=start.dtype, device=start.device)
    x = ay
    residual = float("inf")
    for it in range(1, max_iter + 1):
        norm_ay = torch.linalg.norm(ay)
        if norm_ay == 0:
            return SingularTriplets(sigma[None], (torch.zeros_like(ay),), (y,), it, True, 0.0)
        x = ay / norm_ay
        z = rmv(x)
        sigma = torch.linalg.norm(z)
        if sigma == 0:
            return SingularTriplets(sigma[None], (torch.zeros_like(x),), (y,), it, True, 0.0)
        y = z / sigma
        ay = mv(y)
        residual = float(torch.linalg.norm(ay - sigma * x) / max(float(sigma), scale))
        if residual <= tol:
            return SingularTriplets(sigma[None], (x,), (y,), it, True, residual)
    return SingularTriplets(sigma[None], (x,), (y,), max_iter, False, residual)


def lanczos_svd(
    mv: MatVec,
    rmv: MatVec,
    start: Tensor,
    *,
    rank: int,
    krylov_dim: int,
    tol: float,
    max_restarts: int,
) -> SingularTriplets:
    """Top ``rank`` singular triplets by Golub-Kahan-Lanczos bidiagonalization with restarts.

    Each cycle builds ``A Q = P B`` (``B`` upper bidiagonal, ``krylov_dim`` columns, full
    reorthogonalisation), takes the SVD ``B = X Σ Y^T`` and the Ritz vectors ``P X``, ``Q Y``.
    Since ``A^T P = Q B^T + β q_{m+1} e_m^T``, the residual of triplet ``k`` is
    ``β |X[m, k]|``; the run stops when it is at most ``tol * σ_1`` for all ``k < rank``
    (checked after every step, so a cycle ends early once converged; the ``k × k`` SVD is
    negligible next to a product with ``A``). Otherwise it restarts from the sum of the ``rank``
    right Ritz vectors (K §3.2.2, step 3).

    Args:
        mv: ``Y ↦ mat(A vec(Y))``.
        rmv: ``X ↦ mat(A^T vec(X))``.
        start: Start vector (as a matrix) on the input side.
        rank: Number of triplets (the Kronecker rank), at least 1.
        krylov_dim: Krylov subspace dimension per cycle (``K`` in the paper).
        tol: Relative residual tolerance.
        max_restarts: Cycle cap.

    Returns:
        ``rank`` triplets (fewer when the operator's rank is smaller).

    References:
        Koroko et al. (2022), Sec. 3.2.2 and App. B.2, Algorithm 2; Golub & Kahan (1965).
    """
    in_shape, dtype, device = start.shape, start.dtype, start.device
    n_in = start.numel()
    q = _unit(start).flatten()
    iterations = 0
    best: SingularTriplets | None = None
    fresh_start_used = False
    for _ in range(max_restarts):
        qs: list[Tensor] = [q]
        ps: list[Tensor] = []
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        w_mat = mv(q.reshape(in_shape))
        out_shape = w_mat.shape
        w = w_mat.flatten()
        iterations += 1
        beta = torch.zeros((), dtype=dtype, device=device)
        exhausted = False
        for j in range(min(krylov_dim, n_in)):
            if ps:
                w = w - betas[-1] * ps[-1]
                pmat = torch.stack(ps)
                w = w - pmat.T @ (pmat @ w)
                w = w - pmat.T @ (pmat @ w)
            alpha = torch.linalg.norm(w)
            if alpha <= _BREAKDOWN * (max(alphas) if alphas else torch.linalg.norm(w_mat)):
                # The output-side Krylov space is exhausted: A q_j lies in span(P), so
                # A Q_{j+1} = P_j B̃ with B̃ the j × (j+1) bidiagonal *including* the last β.
                # Its SVD gives exact triplets of A on the Krylov space (residual zero).
                exhausted = bool(alphas)
                break
            ps.append(w / alpha)
            alphas.append(alpha)
            z = rmv(ps[-1].reshape(out_shape)).flatten() - alpha * qs[-1]
            qmat = torch.stack(qs)
            z = z - qmat.T @ (qmat @ z)
            z = z - qmat.T @ (qmat @ z)
            beta = torch.linalg.norm(z)
            exhausted = bool(beta <= _BREAKDOWN * max(alphas)) or len(qs) == n_in
            if (
                exhausted
                or j == krylov_dim - 1
                or (len(alphas) >= rank and _residual(alphas, betas, beta, rank) <= tol)
            ):
                break
            betas.append(beta)
            qs.append(z / beta)
            w = mv(qs[-1].reshape(in_shape)).flatten()
            iterations += 1
        k = len(alphas)
        if k == 0:
            # A annihilates the start vector: try once from a fixed random vector (a warm start
            # can be orthogonal to the row space); if A annihilates that too, A = 0.
            if not fresh_start_used:
                fresh_start_used = True
                q = _fixed_random(start).flatten()
                continue
            zeros_out = torch.zeros(out_shape, dtype=dtype, device=device)
            zeros_in = torch.zeros(in_shape, dtype=dtype, device=device)
            return SingularTriplets(
                torch.zeros(1, dtype=dtype, device=device), (zeros_out,), (zeros_in,), iterations, True, 0.0
            )
        n_cols = k + 1 if len(qs) > k else k  # α-breakdown keeps the last q and β (B̃ is k × (k+1))
        xb, sb, ybt = torch.linalg.svd(_bidiagonal(alphas, betas, n_cols), full_matrices=False)
        r = min(rank, k)
        pmat, qmat = torch.stack(ps), torch.stack(qs[:n_cols])
        lefts = tuple((pmat.T @ xb[:, i]).reshape(out_shape) for i in range(r))
        rights = tuple((qmat.T @ ybt[i]).reshape(in_shape) for i in range(r))
        if exhausted:
            resid = 0.0
        else:
            resid = float((beta * xb[k - 1, :r].abs()).max() / sb[0]) if sb[0] > 0 else 0.0
        best = SingularTriplets(sb[:r], lefts, rights, iterations, resid <= tol or exhausted, resid)
        if best.converged:
            return best
        q = sum(rights[1:], rights[0]).flatten()
        q = q / torch.linalg.norm(q)
    assert best is not None
    return best


def _fixed_random(like: Tensor) -> Tensor:
    """A unit vector shaped like ``like`` from a fixed seed (same on every device)."""
    r = torch.randn(like.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (r / torch.linalg.norm(r)).to(dtype=like.dtype, device=like.device)


def _unit(start: Tensor) -> Tensor:
    """``start`` normalised; a zero or non-finite start becomes :func:`_fixed_random`."""
    norm = torch.linalg.norm(start)
    if not bool(torch.isfinite(norm)) or float(norm) == 0:
        return _fixed_random(start)
    return start / norm


def _bidiagonal(alphas: list[Tensor], betas: list[Tensor], n_cols: int | None = None) -> Tensor:
    """Upper bidiagonal ``B`` (``k × n_cols``, ``n_cols`` is ``k`` or ``k + 1``) with ``alphas``
    on the diagonal and ``betas`` above it."""
    k = len(alphas)
    n_cols = k if n_cols is None else n_cols
    bmat = torch.zeros(k, n_cols, dtype=alphas[0].dtype, device=alphas[0].device)
    idx = torch.arange(k, device=alphas[0].device)
    bmat[idx, idx] = torch.stack(alphas)
    if n_cols > 1:
        bmat[idx[: n_cols - 1], idx[: n_cols - 1] + 1] = torch.stack(betas[: n_cols - 1])
    return bmat


def _residual(alphas: list[Tensor], betas: list[Tensor], beta: Tensor, rank: int) -> float:
    """Largest relative residual ``β |X[m, i]| / σ_1`` of the top ``rank`` Ritz triplets so far."""
    xb, sb, _ = torch.linalg.svd(_bidiagonal(alphas, betas))
    return float((beta * xb[-1, :rank].abs()).max() / sb[0]) if sb[0] > 0 else 0.0


def _orthonormal_rows(z: Tensor) -> tuple[Tensor, Tensor]:
    """``z = rᵀ q`` with orthonormal rows ``q`` and upper-triangular ``r``: Cholesky QR twice
    (two GEMMs; Fukaya et al. 2014), Householder QR when the Gram matrix is singular."""
    eye = torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    factor, q = eye, z
    for _ in range(2):
        lower, info = torch.linalg.cholesky_ex(q @ q.T)
        if bool(info.any()):
            qt, r = torch.linalg.qr(z.T)
            return qt.T, r
        q = torch.linalg.solve_triangular(lower, eye, upper=False) @ q  # L⁻¹ by a GEMM: faster than a wide solve
        factor = factor @ lower
    return q, factor.T


@dataclass(frozen=True)
class RitzValues:
    """Ritz pairs of a symmetric operator from :func:`block_lanczos_eigenvalues`.

    Args:
        values: ``[m]`` Ritz values, by descending magnitude.
        residuals: ``[m]`` residual norms ``||A x_i - θ_i x_i||``.
        converged: How many leading Ritz pairs (by magnitude) met the tolerance; these are
            taken as the ``converged`` largest-magnitude eigenvalues of ``A``.
        products: Operator applications (vectors) spent.
        flops: Floating-point operations spent (operator, orthogonalisation, projections).
    """

    values: Tensor
    residuals: Tensor
    converged: int
    products: int
    flops: float


def block_lanczos_eigenvalues(
    apply: Callable[[Tensor], Tensor],
    start: Tensor,
    wanted: int,
    *,
    max_dim: int,
    tol: float = 1e-10,
    product_flops: float = 0.0,
    max_flops: float = math.inf,
    enough: Callable[[RitzValues], bool] | None = None,
) -> RitzValues:
    """Largest-magnitude eigenvalues of a symmetric operator: block Lanczos with full
    reorthogonalisation and thick restarts.

    The basis ``Q`` grows a block at a time, ``Z = A Q_j`` projected out of the whole basis
    twice (classical Gram-Schmidt, "twice is enough"); the projections fill the Rayleigh
    quotient ``H = Qᵀ A Q`` explicitly, and the QR factor ``R`` of what remains couples the
    basis to the next block, so the Ritz pair ``(θ_i, Q s_i)`` has residual ``||R s_i[last]||``
    (Saad 2011, *Numerical Methods for Large Eigenvalue Problems*, §6.2 and §6.4; Golub & Van
    Loan §10.3.6). When the basis would exceed ``max_dim`` vectors the leading Ritz vectors are
    kept and the space restarted from them and the next block (thick restart, Wu & Simon
    2000): memory is ``O(max_dim D)`` whatever the number of iterations. Every step is one
    batched application of the operator and two GEMMs, on any device.

    Args:
        apply: ``[k, *shape] ↦ [k, *shape]``, the operator on each matrix of a batch.
        start: ``[b, *shape]`` start block (``b`` is the block size).
        wanted: Leading Ritz pairs that must converge.
        max_dim: Most basis vectors held at once (with the next block), ``>= 3 b``.
        tol: Residual tolerance relative to the largest Ritz value.
        product_flops: Flops of one operator application to one vector (for ``max_flops``).
        max_flops: Stop, with what converged, once this much work is spent.
        enough: Called on the Ritz values at every check; ``True`` stops early.

    Returns:
        :class:`RitzValues`; ``converged`` may be below ``wanted`` past ``max_flops``.
    """
    b, shape = start.shape[0], start.shape[1:]
    dim = start[0].numel()
    max_dim = min(max_dim, dim)
    if max_dim < min(3 * b, dim):
        raise ValueError(f"max_dim ({max_dim}) must hold three blocks of {b}")
    basis = start.new_empty(max_dim, dim)  # within the caller's memory limit; untouched rows cost nothing on a CPU
    capacity = min(max_dim, 8 * b)  # the Rayleigh quotient's side, grown by doubling (max_dim² zeros took seconds)
    h = start.new_zeros(capacity, capacity)
    basis[:b] = _orthonormal_rows(start.reshape(b, dim))[0]
    prev, lo, hi, products, flops, checked, checked_hi = 0, 0, b, 0, 0.0, 0.0, 0
    best, best_residual, stalled = 0, math.inf, 0  # progress so far, restarts that made none
    while True:
        width = hi - lo
        z = apply(basis[lo:hi].reshape(width, *shape)).reshape(width, dim)
        products += width
        q, local = basis[:hi], basis[prev:hi]
        c_local = local @ z.T  # the block recurrence: the previous and current blocks (all kept after a restart)
        z -= c_local.T @ local
        c = q @ z.T  # full reorthogonalisation, the second Gram-Schmidt pass of what remains
        z -= c.T @ q
        c[prev:hi] += c_local
        h[:hi, lo:hi], h[lo:hi, :hi] = c, c.T
        nxt, r = _orthonormal_rows(z)  # z = rᵀ nxt
        if bool((r.diagonal().abs() <= _BREAKDOWN * c.abs().max()).any()):  # (near) invariant space
            nxt = _orthonormal_rows(nxt - (nxt @ q.T) @ q)[0]  # directions that are new, whatever their size
        flops += width * product_flops + 4.0 * (2 * hi - prev) * dim * width + 6.0 * dim * width**2
        room = min(width, dim - hi)  # the next block (partial when it completes the space)
        full = hi + room > max_dim
        if not full and hi + room > capacity:
            capacity = min(max_dim, max(2 * capacity, hi + room))
            h = torch.nn.functional.pad(h[:hi, :hi], (0, capacity - hi, 0, capacity - hi))
        # a check (eigh of the Rayleigh quotient, ~9 hi³ flops) once the basis grew by a tenth and the work
        # since the last one has cost as much: checks take at most half the time, however small the side
        due = hi >= 1.1 * checked_hi and flops - checked >= 9.0 * hi**3
        if full or due or flops >= max_flops or hi == dim:
            theta, s = torch.linalg.eigh(h[:hi, :hi])
            order = torch.argsort(theta.abs(), descending=True)
            theta, s = theta[order], s[:, order]
            residuals = torch.linalg.norm(r @ s[lo:hi], dim=0) if hi < dim else torch.zeros_like(theta)
            flops += 9.0 * hi**3
            ok = (residuals <= tol * theta[0].abs()).tolist()
            converged = ok.index(False) if False in ok else hi
            ritz = RitzValues(theta, residuals, converged, products, flops)
            if converged >= wanted or hi == dim or flops >= max_flops or (enough is not None and enough(ritz)):
                return ritz
            checked, checked_hi = flops, hi
        if full:  # thick restart: the leading Ritz vectors, then the next block
            keep = max_dim - 2 * width
            if converged >= keep or stalled >= _STALLED_RESTARTS:  # the kept space is spent
                return ritz
            # progress: a pair more converged, or the first unconverged residual halved
            lead = float(residuals[min(converged, residuals.numel() - 1)])
            progress = converged > best or lead < 0.5 * best_residual
            stalled = 0 if progress else stalled + 1
            if progress:
                best, best_residual = converged, lead
            step = max(1, dim // 8)  # the kept vectors in place, a slice of columns at a time
            for j in range(0, dim, step):
                basis[:keep, j : j + step] = s[:, :keep].T @ basis[:hi, j : j + step]
            coupling = r @ s[lo:hi, :keep]
            h.zero_()
            h[:keep, :keep] = torch.diag(theta[:keep])
            h[keep : keep + width, :keep], h[:keep, keep : keep + width] = coupling, coupling.T
            flops += 2.0 * keep * hi * dim
            lo, hi = keep, keep + width
            basis[lo:hi] = nxt
            prev, checked_hi = 0, 0
        else:
            basis[hi : hi + room] = nxt[:room]
            prev, lo, hi = lo, hi, hi + room
