"""Exact Fisher from per-sample factors vs its dense brute-force twin: van Loan products,
matvec, Gram matrix, norm, spectrum, inner products, the Kronecker-SVD identity (K eq. 7),
KFAC = exact block for one sample, cross-layer blocks."""

from __future__ import annotations

import itertools

import pytest
import torch

from fisherlab.approximations import kfac_factors
from fisherlab.dense import rearrange
from fisherlab.fisher import ExactBlock, cross_block_dense, full_fisher_dense
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference
from tests.cases import FACTOR_CASES, ids, make_factors, rng
from tests.tolerances import EXACT64


def _dense_from_definition(f: LayerFactors) -> torch.Tensor:
    """F = (1/N) sum_{n,v} vec(DW) vec(DW)^T with DW built by explicit loops over positions."""
    n, v, t, _ = f.g.shape
    dense = torch.zeros(f.dim, f.dim, dtype=f.a.dtype, device=f.a.device)
    for i in range(n):
        for j in range(v):
            dw = sum(torch.outer(f.g[i, j, s], f.a[i, s]) for s in range(t))
            dense += torch.outer(dw.flatten(), dw.flatten())
    return dense / n


@pytest.fixture(params=FACTOR_CASES, ids=ids(FACTOR_CASES))
def block(request: pytest.FixtureRequest, device: torch.device) -> ExactBlock:
    return ExactBlock(make_factors(request.param, device))


def test_as_dense_matches_definition(block: ExactBlock) -> None:
    """The dense view equals the loop-built definition of the block."""
    torch.testing.assert_close(block.as_dense(), _dense_from_definition(block.factors), **EXACT64)


def test_rearranged_products_match_dense(block: ExactBlock) -> None:
    """R(F) vec(Y) and R(F)^T vec(X) (K Prop. 3.1, all position pairs) equal the dense rearrangement."""
    f = block.factors
    r = rearrange(block.as_dense(), f.d_out, f.d_in)
    gen = rng(0)
    y = torch.randn(f.d_in, f.d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(f.d_out, f.d_out, generator=gen, dtype=torch.float64)
    scale = r.abs().max()
    torch.testing.assert_close(block.rearranged_matvec(y).flatten() / scale, r @ y.flatten() / scale, **EXACT64)
    torch.testing.assert_close(block.rearranged_rmatvec(x).flatten() / scale, r.T @ x.flatten() / scale, **EXACT64)
    torch.testing.assert_close(block.rearranged_dense(), r, **EXACT64)


def test_matvec_matches_dense(block: ExactBlock) -> None:
    """F vec(W) from factors equals the dense product."""
    f = block.factors
    w = torch.randn(f.d_out, f.d_in, generator=rng(1), dtype=torch.float64)
    torch.testing.assert_close(block.matvec(w).flatten(), block.as_dense() @ w.flatten(), **EXACT64)


def test_gram_norm_and_spectrum_match_dense(block: ExactBlock) -> None:
    """||F||_F = ||K||_F / N and the nonzero spectrum of F is that of K / N."""
    dense = block.as_dense()
    ref = BlockReference.of(block)
    torch.testing.assert_close(ref.norm_squared, (dense**2).sum(), **EXACT64)
    torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(dense), **EXACT64)
    ev = torch.sort(torch.linalg.eigvalsh(dense), descending=True).values[: block.max_rank]
    torch.testing.assert_close(ref.eigenvalues / ev[0], ev / ev[0], **EXACT64)


def test_inner_with_kronecker_sum_matches_dense(block: ExactBlock) -> None:
    """<F, sum_k X_k ⊗ Y_k>_F from factors equals the dense inner product."""
    f = block.factors
    gen = rng(2)
    k = KronSum(
        tuple(torch.randn(f.d_out, f.d_out, generator=gen, dtype=torch.float64) for _ in range(2)),
        tuple(torch.randn(f.d_in, f.d_in, generator=gen, dtype=torch.float64) for _ in range(2)),
    )
    torch.testing.assert_close(block.inner(k), (block.as_dense() * k.as_dense()).sum(), **EXACT64)


def test_kronecker_svd_identity(block: ExactBlock) -> None:
    """||F - X ⊗ Y||_F = ||R(F) - vec X vec Y^T||_F for arbitrary X, Y (K Thm. 3.1, eq. 7)."""
    f = block.factors
    gen = rng(3)
    x = torch.randn(f.d_out, f.d_out, generator=gen, dtype=torch.float64)
    y = torch.randn(f.d_in, f.d_in, generator=gen, dtype=torch.float64)
    dense = block.as_dense()
    lhs = torch.linalg.matrix_norm(dense - torch.kron(x, y))
    rhs = torch.linalg.matrix_norm(rearrange(dense, f.d_out, f.d_in) - torch.outer(x.flatten(), y.flatten()))
    torch.testing.assert_close(lhs, rhs, **EXACT64)


def test_kfac_exact_for_one_sample() -> None:
    """With one sample and one direction (T = 1) the block is exactly G ⊗ A."""
    f = make_factors({"id": "one", "n": 1, "v": 1, "t": 1, "d_in": 4, "d_out": 3, "seed": 5})
    block = ExactBlock(f)
    torch.testing.assert_close(kfac_factors(block).as_dense(), block.as_dense(), **EXACT64)


def test_kfac_not_exact_for_many_samples() -> None:
    """Sanity check that the previous oracle can fail: KFAC differs from F for N > 1."""
    block = ExactBlock(make_factors(FACTOR_CASES[2]))
    assert torch.linalg.matrix_norm(
        kfac_factors(block).as_dense() - block.as_dense()
    ) > 1e-3 * torch.linalg.matrix_norm(block.as_dense())


def test_cross_blocks_assemble_full_fisher() -> None:
    """Diagonal blocks of the full F are the layer blocks; off-diagonal ones are F_ij = J_i^T J_j / N."""
    gen = rng(4)
    a1, a2 = (
        torch.randn(6, 1, 3, generator=gen, dtype=torch.float64),
        torch.randn(6, 1, 4, generator=gen, dtype=torch.float64),
    )
    g1, g2 = (
        torch.randn(6, 2, 1, 2, generator=gen, dtype=torch.float64),
        torch.randn(6, 2, 1, 3, generator=gen, dtype=torch.float64),
    )
    b1, b2 = ExactBlock(LayerFactors(a1, g1)), ExactBlock(LayerFactors(a2, g2))
    full = full_fisher_dense([b1, b2])
    d1 = b1.dim
    torch.testing.assert_close(full[:d1, :d1], b1.as_dense(), **EXACT64)
    torch.testing.assert_close(full[d1:, d1:], b2.as_dense(), **EXACT64)
    torch.testing.assert_close(full[:d1, d1:], cross_block_dense(b1, b2), **EXACT64)
    manual = (
        sum(
            torch.outer(torch.outer(g1[n, v, 0], a1[n, 0]).flatten(), torch.outer(g2[n, v, 0], a2[n, 0]).flatten())
            for n in range(6)
            for v in range(2)
        )
        / 6
    )
    torch.testing.assert_close(cross_block_dense(b1, b2), manual, **EXACT64)


@pytest.mark.parametrize("case", FACTOR_CASES, ids=ids(FACTOR_CASES))
def test_kfac_factors_follow_t_eq_2_27(case: dict) -> None:
    """A = (1/N) Σ_{n,t} a aᵀ and G = (1/(N T)) Σ_{n,v,t} g gᵀ (K eq. 1; T eq. 2.27 for conv), by loops."""
    f = make_factors(case)
    n, v, t, _ = f.g.shape
    a_loop = sum(torch.outer(f.a[i, s], f.a[i, s]) for i in range(n) for s in range(t)) / n
    g_loop = sum(torch.outer(f.g[i, j, s], f.g[i, j, s]) for i in range(n) for j in range(v) for s in range(t)) / (
        n * t
    )
    kfac = kfac_factors(ExactBlock(f))
    torch.testing.assert_close(kfac.ins[0], a_loop, **EXACT64)
    torch.testing.assert_close(kfac.outs[0], g_loop, **EXACT64)


@pytest.mark.parametrize(
    "case", [c for c in FACTOR_CASES if c["t"] > 1], ids=ids([c for c in FACTOR_CASES if c["t"] > 1])
)
@pytest.mark.parametrize("route", ["pairs", "chunks"])
def test_conv_position_pair_route_matches_dense(case: dict, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the per-sample-gradient limit, the all-position-pairs formulas and the chunked
    per-sample gradients (chunks of 2 samples) equal the dense twin."""
    from fisherlab import fisher as fisher_module

    factors = make_factors(case)
    monkeypatch.setattr(fisher_module, "PER_SAMPLE_GRADIENT_LIMIT", 2 * factors.n_directions * factors.dim)
    block = ExactBlock(factors)
    assert block.route in ("pairs", "chunks") and block._dw is None
    block.__dict__["route"] = route  # both routes, whichever the cost model prefers here
    f = block.factors
    r = rearrange(_dense_from_definition(f), f.d_out, f.d_in)
    gen = rng(0)
    y = torch.randn(f.d_in, f.d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(f.d_out, f.d_out, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(block.rearranged_matvec(y).flatten(), r @ y.flatten(), **EXACT64)
    torch.testing.assert_close(block.rearranged_rmatvec(x).flatten(), r.T @ x.flatten(), **EXACT64)
    jac = block.jacobian()
    torch.testing.assert_close(block.gram(), jac @ jac.T, **EXACT64)


def test_route_follows_the_operation_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many positions and small layers go through per-sample gradients (kept below the limit, formed
    chunk by chunk above it: ResNet's first stages), few positions and wide layers through position pairs."""
    from fisherlab import fisher as fisher_module

    monkeypatch.setattr(fisher_module, "PER_SAMPLE_GRADIENT_LIMIT", 100)

    def route(t: int, d_in: int, d_out: int) -> str:
        return ExactBlock(LayerFactors(torch.zeros(3, t, d_in), torch.zeros(3, 1, t, d_out))).route

    assert route(64, 10, 4) == "chunks" and route(4, 50, 40) == "pairs" and route(1, 50, 40) == "linear"
    monkeypatch.setattr(fisher_module, "PER_SAMPLE_GRADIENT_LIMIT", 2**25)
    assert route(64, 10, 4) == "cached"
    # ResNet-18 layer4 conv (16 positions, 4 609 inputs): the per-sample gradients fit at batch 3, but
    # DW Y DWᵀ costs 35x the position pairs (their rank is only T)
    assert route(16, 4609, 512) == "pairs"


def test_rearranged_dense_matches_index_definition() -> None:
    """R(F)[(o1, o2), (i1, i2)] = F[(o1, i1), (o2, i2)], entry by entry (K eq. 7)."""
    block = ExactBlock(make_factors({"id": "x", "n": 3, "v": 2, "t": 2, "d_in": 3, "d_out": 2, "seed": 5}))
    f, d_out, d_in = block.as_dense(), block.factors.d_out, block.factors.d_in
    expected = torch.empty(d_out * d_out, d_in * d_in, dtype=f.dtype)
    for o1, o2, i1, i2 in itertools.product(range(d_out), range(d_out), range(d_in), range(d_in)):
        expected[o1 * d_out + o2, i1 * d_in + i2] = f[o1 * d_in + i1, o2 * d_in + i2]
    assert torch.equal(block.rearranged_dense(), expected)
    assert torch.equal(rearrange(f, d_out, d_in), expected)
