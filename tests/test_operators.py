"""The shared operator protocols and the block-diagonal container, against dense twins (float64)."""

from __future__ import annotations

import torch

from fisherlab.approximations import kfac_factors
from fisherlab.fisher import ExactBlock, WholeFisher
from fisherlab.kron import KronSum
from fisherlab.operators import BlockDiagonal, BlockOperator, ParamsOperator, axpy, dot
from fisherlab.twolevel import coarse_solve
from tests.cases import plain_factors, rng, spd
from tests.tolerances import EXACT64, SOLVE64

#: The top eigenvalues through the N x N Gram matrix vs eigvalsh of the D x D dense block: two
#: eigendecompositions of differently conditioned matrices (SOLVE64 with a looser absolute part).
GRAM_EIGENVALUES = {"rtol": 1e-9, "atol": 1e-10}


def _kron(d_out: int, d_in: int, rank: int, seed: int) -> KronSum:
    """``rank`` positive definite terms ``m mᵀ / d + I`` (outs first, then ins)."""
    gen = rng(seed)
    outs = tuple(spd(d_out, gen, width=1, ridge=1.0) for _ in range(rank))
    return KronSum(outs, tuple(spd(d_in, gen, width=1, ridge=1.0) for _ in range(rank)))


def test_operators_satisfy_the_protocols() -> None:
    block = ExactBlock(plain_factors(rng(0), 5, 1, 4, 3, v=2))
    kron = kfac_factors(block)
    assert isinstance(block, BlockOperator) and isinstance(kron, BlockOperator)
    assert isinstance(WholeFisher((block,)), ParamsOperator) and isinstance(BlockDiagonal((kron,)), ParamsOperator)


def test_block_operator_methods_match_their_dense_views() -> None:
    """matvec, inner and frobenius_norm of ExactBlock (conv-like T = 3) and KronSum equal the dense definitions."""
    block = ExactBlock(plain_factors(rng(0), 6, 3, 4, 3, v=2))
    kron = _kron(3, 4, 2, seed=1)
    w = torch.randn(3, 4, dtype=torch.float64)
    for op in (block, kron):
        dense = op.as_dense()
        torch.testing.assert_close(op.matvec(w).flatten(), dense @ w.flatten(), **EXACT64)
        torch.testing.assert_close(op.inner(kron), torch.sum(dense * kron.as_dense()), **EXACT64)
        torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense), **EXACT64)
    ev = torch.linalg.eigvalsh(block.as_dense()).flip(0)
    torch.testing.assert_close(block.eigenvalues(top=4), ev[:4], **GRAM_EIGENVALUES)


def test_block_diagonal_matvec_solve_and_dense() -> None:
    """BlockDiagonal.solve is (B_i + π-damping)⁻¹ per layer, as the dense block-diagonal solve."""
    blocks = (_kron(3, 4, 1, seed=2), _kron(2, 5, 2, seed=3))
    diag = BlockDiagonal(blocks)
    u = [torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)]
    flat = torch.cat([x.flatten() for x in u])
    torch.testing.assert_close(torch.cat([x.flatten() for x in diag.matvec(u)]), diag.as_dense() @ flat, **EXACT64)
    damping = 1e-2
    solved = diag.solve(u, damping=damping)
    for b, x, s in zip(blocks, u, solved, strict=True):
        torch.testing.assert_close(b.solve(x, damping=damping), s, **EXACT64)
    torch.testing.assert_close(dot(u, u), flat @ flat, **EXACT64)
    torch.testing.assert_close(torch.cat([x.flatten() for x in axpy(2.0, u, u)]), 3 * flat, **EXACT64)


def test_whole_fisher_matvec_matches_dense_with_cross_blocks() -> None:
    f1, f2 = plain_factors(rng(4), 7, 1, 4, 3, v=2), plain_factors(rng(5), 7, 1, 3, 2, v=2)
    fisher = WholeFisher((ExactBlock(f1), ExactBlock(f2)))
    u = [torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    flat = torch.cat([x.flatten() for x in u])
    got = torch.cat([x.flatten() for x in fisher.matvec(u, damping=0.1)])
    torch.testing.assert_close(got, fisher.as_dense(damping=0.1) @ flat, **EXACT64)


def test_coarse_solve_is_the_minimum_norm_solution() -> None:
    """β = F⁺ r for a rank-deficient PSD F (a vanished coarse column), as numpy's lstsq gives."""
    gen = rng(6)
    v = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    f = torch.zeros(5, 5, dtype=torch.float64)
    f[:4, :4] = v @ v.T  # rank 2 in a 5x5 system
    r = torch.randn(5, generator=gen, dtype=torch.float64)
    expected = torch.linalg.lstsq(f, r, rcond=1e-12, driver="gelsd").solution
    torch.testing.assert_close(coarse_solve(f, r), expected, **SOLVE64)


def test_a_remembered_inner_product_is_read_back_for_that_very_block_only() -> None:
    """``remember_inner`` keeps ``<F, B>`` for the block it was built from (held weakly): an equal block
    built again, another block, an operator without a cache, or the block gone give nothing."""
    from fisherlab.block_operators import DiagonalBlockOperator
    from fisherlab.operators import remember_inner, remembered_inner

    factors = plain_factors(rng(3), 5, 1, 4, 3)
    block = ExactBlock(factors)
    op = DiagonalBlockOperator(torch.ones(4, 3, dtype=torch.float64))
    value = torch.tensor(2.0, dtype=torch.float64)
    remember_inner(op, block, value)
    assert remembered_inner(op, block) is value
    assert remembered_inner(op, ExactBlock(factors)) is None  # equal, not the same: e.g. another kind's block
    assert remembered_inner(DiagonalBlockOperator(op.values), block) is None  # a new operator starts empty
    remember_inner(object(), block, value)  # no cache: nothing recorded, no error
    del block
    assert remembered_inner(op, ExactBlock(factors)) is None and op.cache["inner"][0]() is None
