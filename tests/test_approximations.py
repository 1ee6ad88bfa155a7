"""Approximations vs dense oracles: KPSVD = top singular pair of R(F) (as a product), PSD and
symmetric factors, stationarity; rank-2 methods = best Kronecker-rank-2 approximation and
recover an exact rank-2 sum; the error orderings of K §4.1; non-convergence is flagged."""

from __future__ import annotations

import warnings

import pytest
import torch

from fisherlab._errors import ConvergenceWarning
from fisherlab.approximations import ApproxConfig, Method, approximate_all, kfac, kpsvd, lanczos, warm_starts
from fisherlab.dense import (
    dense_corrected_approximation,
    dense_frobenius_error,
    dense_kronecker_approximation,
    dense_spectral_error,
    rearrange,
)
from fisherlab.fisher import ExactBlock
from fisherlab.krylov import lanczos_svd, power_svd
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, evaluate_block, frobenius_error, spectral_error
from tests.cases import FACTOR_CASES, ids, make_factors
from tests.tolerances import EXACT64, ITERATIVE, ITERATIVE_TOL, SLACK, STATIONARY

ALL = list(Method)


@pytest.fixture(params=FACTOR_CASES, ids=ids(FACTOR_CASES))
def block(request: pytest.FixtureRequest, device: torch.device) -> ExactBlock:
    return ExactBlock(make_factors(request.param, device))


def _all(block: ExactBlock, **kw: object) -> dict:
    return approximate_all(block, ALL, ApproxConfig(tol=ITERATIVE_TOL, max_iter=5000, krylov_dim=30), **kw)  # type: ignore[arg-type]


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
    f = LayerFactors(
        torch.randn(2, 1, 4, generator=gen, dtype=torch.float64),
        torch.randn(2, 1, 1, 3, generator=gen, dtype=torch.float64),
    )
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
    trip = lanczos_svd(
        lambda y: m @ y,
        lambda x: m.T @ x,
        torch.ones(20, dtype=torch.float64),
        rank=3,
        krylov_dim=6,
        tol=1e-10,
        max_restarts=500,
    )
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
    torch.testing.assert_close(
        torch.outer(trip.lefts[0], trip.rights[0]), torch.outer(u[:, 0], vt[0]), rtol=0, atol=1e-9
    )


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
        cold = approximate_all(block, ALL, ApproxConfig(tol=1e-10, max_iter=5000))
        warm = approximate_all(block, ALL, ApproxConfig(tol=1e-10, max_iter=5000), warm=warm_starts(cold))
    for m in (Method.KPSVD, Method.DEFLATION, Method.KFAC_CORRECTED):
        assert warm[m].iterations < cold[m].iterations
    assert warm[Method.LANCZOS].iterations <= cold[Method.LANCZOS].iterations


def test_rearranged_dense_rank_bound() -> None:
    """Sanity: R(F) of a single sample has rank 1 (why KFAC is exact there)."""
    block = ExactBlock(make_factors({"id": "one", "n": 1, "v": 1, "t": 1, "d_in": 3, "d_out": 2, "seed": 0}))
    s = torch.linalg.svdvals(rearrange(block.as_dense(), 2, 3))
    assert float(s[1]) < 1e-12 * float(s[0])


def _rank_one_blocks() -> dict[str, ExactBlock]:
    """Blocks whose rearrangement R(F) has rank 1 (issue 11, defect 1)."""
    from fisherlab.probe import Probe

    torch.manual_seed(0)
    one_out = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.rand(32, 1, dtype=torch.float64).round()
    two_class = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    relu = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():  # one live ReLU: units 1 and 2 are dead for every input
        relu[0].weight[1:] = 0.0
        relu[0].bias[1:] = -1.0
    return {
        "linear-8-1": Probe(one_out, "bce")(x, y).blocks()["2"],
        "softmax-2-class": Probe(two_class, "ce", fisher="exact")(x, torch.randint(0, 2, (32,))).blocks()["2"],
        "one-live-relu": Probe(relu, "mse")(x, torch.zeros(32, 2, dtype=torch.float64)).blocks()["0"],
        "one-sample": ExactBlock(make_factors({"id": "n1", "n": 1, "v": 1, "t": 1, "d_in": 5, "d_out": 4, "seed": 3})),
    }


@pytest.mark.parametrize("name", ["linear-8-1", "softmax-2-class", "one-live-relu", "one-sample"])
@pytest.mark.parametrize("rank", [2, 3])
def test_lanczos_exact_on_kronecker_rank_one_blocks(name: str, rank: int) -> None:
    """On a block with rank R(F) = 1 Lanczos ends with the exact answer (error 1 ≈ 0, converged),
    also when asked for more terms than R(F) has; the missing terms are zero (defect 1)."""
    block = _rank_one_blocks()[name]
    s = torch.linalg.svdvals(block.rearranged_dense())
    assert bool((s[1:] <= 1e-12 * s[0]).all())  # the case really is Kronecker rank 1
    ref = BlockReference.of(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning
        approx = lanczos(block, rank=rank)
    assert approx.converged and approx.kron.rank == rank
    assert float(frobenius_error(ref, approx.kron)) <= 1e-6
    kpsvd_err = float(frobenius_error(ref, kpsvd(block).kron))
    assert float(frobenius_error(ref, approx.kron)) <= kpsvd_err + 1e-6


@pytest.mark.parametrize("rank", [3, 5])
def test_lanczos_rank_above_rank_of_rearrangement(rank: int) -> None:
    """R(F) of two Linear samples has rank 2; asking for rank 3 or 5 gives the exact block."""
    gen = torch.Generator().manual_seed(7)
    block = ExactBlock(
        LayerFactors(
            torch.randn(2, 1, 4, generator=gen, dtype=torch.float64),
            torch.randn(2, 1, 1, 3, generator=gen, dtype=torch.float64),
        )
    )
    approx = lanczos(block, rank=rank)
    assert approx.converged and approx.kron.rank == rank
    assert float(frobenius_error(BlockReference.of(block), approx.kron)) <= 1e-7


def test_lanczos_svd_breakdown_keeps_last_column() -> None:
    """An operator of rank 1: the α-breakdown must keep β and the last q (exact after one cycle)."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    m = 3.0 * torch.outer(u / u.norm(), v / v.norm())
    trip = lanczos_svd(
        lambda y: m @ y,
        lambda x: m.T @ x,
        torch.ones(5, dtype=torch.float64),
        rank=2,
        krylov_dim=10,
        tol=1e-6,
        max_restarts=50,
    )
    assert trip.converged and trip.residual == 0.0
    torch.testing.assert_close(trip.sigmas[0], torch.tensor(3.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(3.0 * torch.outer(trip.lefts[0], trip.rights[0]), m, rtol=0, atol=1e-12)


def test_zero_block_gives_zero_terms_of_the_right_shapes() -> None:
    """All-zero g (a dead layer): every method returns zero terms shaped [d_out]², [d_in]² (defect 9/13)."""
    f = LayerFactors(torch.randn(6, 1, 5, dtype=torch.float64), torch.zeros(6, 1, 1, 3, dtype=torch.float64))
    approx = approximate_all(ExactBlock(f), ALL)
    for a in approx.values():
        assert all(o.shape == (3, 3) for o in a.kron.outs) and all(i.shape == (5, 5) for i in a.kron.ins)
        assert float(a.kron.frobenius_norm_squared()) == 0.0


#: float32 factors of a CURVES-layer-7-shaped block (25 x 7, batch 256), where KFAC is nearly
#: exact (inputs close to one vector) or exact (one input vector: ``F = G ⊗ a aᵀ``).
MIXED_CASES = [{"id": "near-kfac", "spread": 1e-2}, {"id": "exact-kfac", "spread": 0.0}]


def _mixed_block(spread: float) -> ExactBlock:
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = 256, 7, 25
    a = torch.randn(1, 1, d_in, generator=gen) + spread * torch.randn(n, 1, d_in, generator=gen)
    a[..., -1] = 1.0
    g = torch.randn(n, 1, 1, d_out, generator=gen) * 1e-2
    return ExactBlock(LayerFactors(a, g, compute_dtype=torch.float64, moment_dtype=torch.float32))


@pytest.mark.parametrize("case", MIXED_CASES, ids=ids(MIXED_CASES))
def test_kfac_of_mixed_accumulation_is_symmetric_and_error_2_matches_dense(case: dict) -> None:
    """KFAC's moments summed in float32 (``--accumulate mixed``) are exactly symmetric, so error 2
    equals the dense error 2 of the same F_hat (a GEMM's asymmetry made it x300 too large)."""
    block = _mixed_block(case["spread"])
    approx = kfac(block).kron
    for m in approx.outs + approx.ins:
        assert torch.equal(m, m.T)
    got = spectral_error(BlockReference.of(block), approx)
    want = dense_spectral_error(block.as_dense(), approx.as_dense())
    torch.testing.assert_close(got, want, **EXACT64)


#: Blocks where KFAC (and the best Kronecker product) is nearly exact, so the second term is a
#: small correction: a Linear layer, and a layer wider than its batch (the sample-span route of
#: ``evaluate_block``, every probe snapshot).
SMALL_CORRECTION_CASES = [
    {"id": "linear", "n": 64, "d_in": 6, "d_out": 5, "spread": 3e-5, "seed": 0},
    {"id": "linear-b", "n": 64, "d_in": 6, "d_out": 5, "spread": 3e-5, "seed": 1},
    {"id": "sample-span", "n": 6, "d_in": 20, "d_out": 16, "spread": 3e-5, "seed": 2},
]


@pytest.mark.parametrize("case", SMALL_CORRECTION_CASES, ids=ids(SMALL_CORRECTION_CASES))
def test_second_stage_at_the_default_tolerance_matches_the_dense_optimal_term(case: dict) -> None:
    """Deflation and KFAC-corrected at the default tolerance give the dense optimal second term of
    their first term (its stopping test was relative to the first term: a poor second term passed)."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, d_in, d_out, spread = case["n"], case["d_in"], case["d_out"], case["spread"]
    a = torch.randn(1, 1, d_in, generator=gen, dtype=torch.float64)
    a = a + spread * torch.randn(n, 1, d_in, generator=gen, dtype=torch.float64)
    a[..., -1] = 1.0
    g = torch.randn(n, 1, 1, d_out, generator=gen, dtype=torch.float64) * (1 + spread * a[:, None, :, :1])
    block = ExactBlock(LayerFactors(a, g))
    assert (block.sample_span() is not None) == (case["id"] == "sample-span")
    evaluation = evaluate_block(block, list(Method), ApproxConfig(), metrics=("frobenius_error",))
    dense = block.as_dense()
    for method, first in ((Method.DEFLATION, Method.KPSVD), (Method.KFAC_CORRECTED, Method.KFAC)):
        approx = evaluation.approximations[method]
        assert approx.converged
        optimal = dense_corrected_approximation(dense, evaluation.approximations[first].kron.as_dense(), d_out, d_in)
        want = dense_frobenius_error(dense, optimal)
        torch.testing.assert_close(dense_frobenius_error(dense, approx.kron.as_dense()), want, **STATIONARY)


def test_approximate_all_works_on_the_sample_span_of_a_wide_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer wider than its batch: approximate_all builds on the span (as evaluate_block does) and
    returns the same approximations, lifted to the whole layer."""
    from fisherlab.approximations import kronecker_svd_family
    from fisherlab.metrics import evaluate_block

    gen = torch.Generator().manual_seed(3)
    wide = ExactBlock(
        LayerFactors.from_linear(
            torch.randn(6, 40, generator=gen, dtype=torch.float64),
            torch.randn(6, 2, 9, generator=gen, dtype=torch.float64),
        )
    )
    sides: list[int] = []
    real = kronecker_svd_family.kpsvd  # what the registered KPSVD builder calls
    monkeypatch.setattr(
        kronecker_svd_family, "kpsvd", lambda block, **kw: (sides.append(block.dim), real(block, **kw))[1]
    )
    config = ApproxConfig(tol=ITERATIVE_TOL)
    got = approximate_all(wide, ALL, config)
    assert sides == [9 * 6]  # the span: 9 output x 6 input directions, not 9 x 41
    expected = evaluate_block(wide, ALL, config).approximations
    for m in ALL:
        assert got[m].kron.outs[0].shape == (9, 9) and got[m].kron.ins[0].shape == (41, 41)
        scale = float(expected[m].kron.frobenius_norm())
        diff = float((got[m].kron.as_dense() - expected[m].kron.as_dense()).norm())
        assert diff <= ITERATIVE["rtol"] * scale, m


def test_solver_defaults_are_written_once() -> None:
    """ApproxConfig, ProbeConfig and the CLI's --tol/--max-iter/--lanczos-rank/--krylov-dim share one set of
    defaults."""
    from fisherlab.cli import _parser
    from fisherlab.config import ProbeConfig

    assert ProbeConfig().approx == ApproxConfig()
    probe_args = _parser()[0].parse_args(["probe"])
    cfg = ApproxConfig()
    assert (probe_args.tol, probe_args.max_iter, probe_args.lanczos_rank, probe_args.krylov_dim) == (
        cfg.tol,
        cfg.max_iter,
        cfg.lanczos_rank,
        cfg.krylov_dim,
    )
