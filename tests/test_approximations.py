"""Approximations vs dense oracles: KPSVD = top singular pair of R(F) (as a product), PSD and
symmetric factors, stationarity; rank-2 methods = best Kronecker-rank-2 approximation and
recover an exact rank-2 sum; the error orderings of K §4.1; non-convergence is flagged."""

from __future__ import annotations

import warnings

import pytest
import torch

from fisherlab._errors import ConvergenceWarning
from fisherlab.approximations import Method, approximate_all, kpsvd, lanczos
from fisherlab.dense import dense_kronecker_approximation, rearrange
from fisherlab.fisher import ExactBlock
from fisherlab.krylov import lanczos_svd, power_svd
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, frobenius_error
from tests.cases import FACTOR_CASES, ids, make_factors
from tests.tolerances import ITERATIVE, ITERATIVE_TOL, SLACK

ALL = list(Method)


@pytest.fixture(params=FACTOR_CASES, ids=ids(FACTOR_CASES))
def block(request: pytest.FixtureRequest) -> ExactBlock:
    return ExactBlock(make_factors(request.param))


def _all(block: ExactBlock, **kw: object) -> dict:
    return approximate_all(block, ALL, tol=ITERATIVE_TOL, max_iter=5000, krylov_dim=30, **kw)  # type: ignore[arg-type]


def test_kpsvd_equals_dense_top_singular_pair(block: ExactBlock) -> None:
    """KPSVD's G ⊗ A equals the dense rank-1 SVD truncation of R(F), compared as the product."""
    f = block.factors
    approx = _all(block)[Method.KPSVD].kron
    expected = dense_kronecker_approximation(block.as_dense(), f.d_out, f.d_in, 1)
    scale = expected.abs().max()
    torch.testing.assert_close(approx.as_dense() / scale, expected / scale, **ITERATIVE)


@pytest.mark.parametrize("method", [Method.DEFLATION, Method.LANCZOS])
def test_rank2_equals_dense_best_rank2(block: ExactBlock, method: Method) -> None:
    """Deflation and Lanczos both give the best Kronecker-rank-2 approximation (dense SVD of R(F))."""
    f = block.factors
    approx = _all(block)[method].kron
    expected = dense_kronecker_approximation(block.as_dense(), f.d_out, f.d_in, 2)
    scale = expected.abs().max()
    torch.testing.assert_close(approx.as_dense() / scale, expected / scale, **ITERATIVE)


def test_kpsvd_factors_symmetric_psd(block: ExactBlock) -> None:
    """KPSVD factors are symmetric and positive semidefinite (K Prop. 3.2)."""
    k = _all(block)[Method.KPSVD].kron
    for m in (k.outs[0], k.ins[0]):
        torch.testing.assert_close(m, m.T, rtol=0, atol=1e-14 * float(m.abs().max()))
        assert float(torch.linalg.eigvalsh(m).min()) >= -1e-8 * float(torch.linalg.eigvalsh(m).max())


def test_kpsvd_is_stationary(block: ExactBlock) -> None:
    """The gradient of ||F - G ⊗ A||_F² w.r.t. (G, A) vanishes at the KPSVD factors (autograd)."""
    k = _all(block)[Method.KPSVD].kron
    dense = block.as_dense()
    g = k.outs[0].clone().requires_grad_(True)
    a = k.ins[0].clone().requires_grad_(True)
    loss = ((dense - torch.kron(g, a)) ** 2).sum()
    grad_g, grad_a = torch.autograd.grad(loss, (g, a))
    scale = float((dense**2).sum()) / float(torch.linalg.matrix_norm(g.detach()))
    assert float(grad_g.abs().max()) <= 1e-6 * scale
    assert float(grad_a.abs().max()) <= 1e-6 * float((dense**2).sum()) / float(torch.linalg.matrix_norm(a.detach()))


def test_error_orderings(block: ExactBlock) -> None:
    """KPSVD ≤ KFAC; rank-2 ≤ KPSVD; rank-2 ≤ KFAC-corrected ≤ KFAC (error 1, K §4.1)."""
    ref = BlockReference.of(block)
    err = {m: float(frobenius_error(ref, a.kron)) for m, a in _all(block).items()}
    assert err[Method.KPSVD] <= err[Method.KFAC] * SLACK
    for rank2 in (Method.DEFLATION, Method.LANCZOS):
        assert err[rank2] <= err[Method.KPSVD] * SLACK
        assert err[rank2] <= err[Method.KFAC_CORRECTED] * SLACK
    assert err[Method.KFAC_CORRECTED] <= err[Method.KFAC] * SLACK


def test_rank2_recovers_exact_kronecker_rank2_block() -> None:
    """A block that is exactly a sum of two Kronecker products is recovered (error 1 ≈ 0).

    Two samples, one direction: F = (1/2)(g1g1ᵀ⊗a1a1ᵀ + g2g2ᵀ⊗a2a2ᵀ) has Kronecker rank 2.
    """
    gen = torch.Generator().manual_seed(7)
    f = LayerFactors(torch.randn(2, 1, 4, generator=gen, dtype=torch.float64), torch.randn(2, 1, 1, 3, generator=gen, dtype=torch.float64))
    block = ExactBlock(f)
    ref = BlockReference.of(block)
    approx = _all(block)
    for m in (Method.DEFLATION, Method.LANCZOS):
        assert float(frobenius_error(ref, approx[m].kron)) < 1e-6
    assert float(frobenius_error(ref, approx[Method.KPSVD].kron)) > 1e-3  # rank 1 cannot


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_lanczos_any_rank_matches_dense(rank: int) -> None:
    """Lanczos with Kronecker rank k gives the best rank-k approximation for k = 2, 3, 4."""
    block = ExactBlock(make_factors(FACTOR_CASES[2]))
    f = block.factors
    approx = lanczos(block, rank=rank, krylov_dim=8, tol=1e-10, max_restarts=500)
    assert approx.converged
    expected = dense_kronecker_approximation(block.as_dense(), f.d_out, f.d_in, rank)
    scale = expected.abs().max()
    torch.testing.assert_close(approx.kron.as_dense() / scale, expected / scale, **ITERATIVE)


def test_lanczos_svd_restarts_on_random_matrix() -> None:
    """Restarted Golub-Kahan-Lanczos with a small Krylov space finds the top 3 singular values."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = torch.tensor([10.0, 9.0, 8.5] + [1.0 / (i + 1) for i in range(17)], dtype=torch.float64)
    m = u[:, :20] @ torch.diag(s) @ v.T
    trip = lanczos_svd(lambda y: m @ y, lambda x: m.T @ x, torch.ones(20, dtype=torch.float64), rank=3, krylov_dim=6, tol=1e-10, max_restarts=500)
    assert trip.converged and trip.iterations > 6  # needed restarts
    torch.testing.assert_close(trip.sigmas, s[:3], rtol=1e-9, atol=0)


def test_power_svd_matches_svd() -> None:
    """Power SVD's σ₁ and singular vectors match torch.linalg.svd."""
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    trip = power_svd(lambda y: m @ y, lambda x: m.T @ x, torch.ones(7, dtype=torch.float64), tol=1e-12, max_iter=10_000)
    u, s, vt = torch.linalg.svd(m)
    assert trip.converged
    torch.testing.assert_close(trip.sigmas[0], s[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.outer(trip.lefts[0], trip.rights[0]), torch.outer(u[:, 0], vt[0]), rtol=0, atol=1e-9)


def test_non_convergence_is_warned_and_stored() -> None:
    """Hitting max_iter warns with ConvergenceWarning and records converged=False."""
    block = ExactBlock(make_factors(FACTOR_CASES[1]))
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        approx = kpsvd(block, tol=1e-15, max_iter=1)
    assert not approx.converged and approx.iterations == 1 and approx.residual > 1e-15


def test_warm_start_saves_iterations() -> None:
    """A warm start from the previous snapshot's vectors needs fewer iterations than a cold one."""
    block = ExactBlock(make_factors(FACTOR_CASES[2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cold = approximate_all(block, ALL, tol=1e-10, max_iter=5000)
        warm = approximate_all(block, ALL, tol=1e-10, max_iter=5000, previous=cold)
    for m in (Method.KPSVD, Method.DEFLATION, Method.KFAC_CORRECTED):
        assert warm[m].iterations < cold[m].iterations
    assert warm[Method.LANCZOS].iterations <= cold[Method.LANCZOS].iterations


def test_rearranged_dense_rank_bound() -> None:
    """Sanity: R(F) of a single sample has rank 1 (why KFAC is exact there)."""
    block = ExactBlock(make_factors({"id": "one", "n": 1, "v": 1, "t": 1, "d_in": 3, "d_out": 2, "seed": 0}))
    s = torch.linalg.svdvals(rearrange(block.as_dense(), 2, 3))
    assert float(s[1]) < 1e-12 * float(s[0])
