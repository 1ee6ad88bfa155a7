"""Kronecker sums vs dense: matvec, Frobenius norm, eigenvalues (one and two terms, dense and
block Lanczos paths), and the damped solves of K §3.4."""

from __future__ import annotations

import pytest
import torch

from fisherlab.kron import KronSum, pi_damping
from tests.tolerances import EXACT64


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return x @ x.T / d


def _sym(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return (x + x.T) / 2


def _sum(rank: int, seed: int = 0) -> KronSum:
    gen = torch.Generator().manual_seed(seed)
    outs = (_spd(4, gen),) + tuple(0.3 * _sym(4, gen) for _ in range(rank - 1))
    ins = (_spd(3, gen),) + tuple(_sym(3, gen) for _ in range(rank - 1))
    return KronSum(outs, ins)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matvec_norm_trace_match_dense(rank: int) -> None:
    """matvec, ||·||_F and trace of a Kronecker sum equal the dense ones (acting on W.flatten())."""
    k = _sum(rank)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dense = k.as_dense()
    torch.testing.assert_close(k.matvec(w).flatten(), dense @ w.flatten(), **EXACT64)
    torch.testing.assert_close(k.frobenius_norm_squared(), (dense**2).sum(), **EXACT64)
    torch.testing.assert_close(k.trace(), torch.trace(dense), **EXACT64)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_eigenvalues_match_dense(rank: int, by_magnitude: bool) -> None:
    """Eigenvalues (or singular values) sorted descending equal dense eigvalsh."""
    k = _sum(rank)
    ev = torch.linalg.eigvalsh(k.as_dense())
    ev = ev.abs() if by_magnitude else ev
    expected = torch.sort(ev, descending=True).values
    torch.testing.assert_close(k.eigenvalues(by_magnitude=by_magnitude), expected, **EXACT64)
    torch.testing.assert_close(k.eigenvalues(top=5, by_magnitude=by_magnitude), expected[:5], **EXACT64)


@pytest.mark.parametrize(("wanted", "max_dim"), [(1, 80), (6, 80), (6, 16)])
def test_block_lanczos_finds_the_largest_magnitude_eigenvalues(wanted: int, max_dim: int) -> None:
    """Block Lanczos on the batched Kronecker product, with room for the whole space or (16 vectors)
    thick restarts: converged Ritz values are the largest-magnitude eigenvalues of the dense matrix,
    residuals within the tolerance."""
    from fisherlab.krylov import block_lanczos_eigenvalues

    gen = torch.Generator().manual_seed(3)
    k = KronSum((_spd(10, gen), -0.8 * _spd(10, gen)), (_spd(8, gen), _sym(8, gen)))  # indefinite
    ev = torch.linalg.eigvalsh(k.as_dense())
    expected = ev[torch.argsort(ev.abs(), descending=True)][:wanted]
    start = torch.randn(4, 10, 8, generator=gen, dtype=torch.float64)
    ritz = block_lanczos_eigenvalues(k.matvec, start, wanted, max_dim=max_dim, tol=1e-12)
    assert ritz.converged >= wanted and bool((ritz.residuals[:wanted] <= 1e-12 * ritz.values[0].abs()).all())
    torch.testing.assert_close(ritz.values[:wanted], expected, rtol=1e-10, atol=1e-12)
    if max_dim < 80:
        assert ritz.products > max_dim  # it restarted


def test_block_lanczos_on_an_invariant_start_block_keeps_an_orthonormal_basis() -> None:
    """A start block that spans an invariant subspace (breakdown): the next directions are still
    orthogonal to the basis, and every eigenvalue comes out right."""
    from fisherlab.krylov import block_lanczos_eigenvalues

    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64)).Q
    values = torch.linspace(3, 0.1, 12, dtype=torch.float64)
    a = q @ torch.diag(values) @ q.T
    start = q[:, :3].T.reshape(3, 3, 4)  # eigenvectors: A maps the start block into itself

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) @ a).reshape(x.shape)

    ritz = block_lanczos_eigenvalues(apply, start, 12, max_dim=12, tol=1e-12)
    torch.testing.assert_close(ritz.values, values, rtol=1e-10, atol=1e-12)


def test_blas_threads_sets_and_restores_the_thread_count() -> None:
    """The eigensolver's thread context sets torch's threads inside and restores them afterwards, also
    when the block raises; None leaves them alone."""
    from fisherlab.krylov import blas_threads

    before = torch.get_num_threads()
    with blas_threads(None):
        assert torch.get_num_threads() == before
    other = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="inside"), blas_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_block_lanczos_grows_its_rayleigh_quotient_as_used() -> None:
    """Room for the whole space (max_dim = D = 4 096) but 8 eigenvalues wanted: the zeroed Rayleigh quotient
    grows with the vectors used, not max_dim (it zeroed a D x D matrix: 1.4 s, 2 GiB for D = 15 936)."""
    from fisherlab.krylov import block_lanczos_eigenvalues

    gen = torch.Generator().manual_seed(6)
    diag = torch.cat(
        [torch.linspace(10, 5, 8, dtype=torch.float64), torch.rand(4088, generator=gen, dtype=torch.float64)]
    )
    allocated: list[int] = []
    original = torch.Tensor.new_zeros

    def counting(self: torch.Tensor, *size: object, **kwargs: object) -> torch.Tensor:
        out = original(self, *size, **kwargs)
        allocated.append(out.numel())
        return out

    start = torch.randn(8, 64, 64, generator=gen, dtype=torch.float64)
    try:
        torch.Tensor.new_zeros = counting  # type: ignore[method-assign]
        ritz = block_lanczos_eigenvalues(lambda w: w * diag.reshape(64, 64), start, 8, max_dim=4096, tol=1e-12)
    finally:
        torch.Tensor.new_zeros = original  # type: ignore[method-assign]
    torch.testing.assert_close(ritz.values[:8], diag[:8], rtol=1e-10, atol=1e-12)
    assert max(allocated) <= (8 * 8) ** 2 and ritz.products < 4096


def test_pi_damping_balances_traces() -> None:
    """π-damping adds √λ/π and π√λ with π² = (tr(in)/d_in)/(tr(out)/d_out) (K §2.2)."""
    gen = torch.Generator().manual_seed(1)
    out, in_ = _spd(4, gen), 5 * _spd(3, gen)
    o, i = pi_damping(out, in_, 0.01)
    pi = ((torch.trace(in_) / 3) / (torch.trace(out) / 4)).sqrt()
    torch.testing.assert_close(o - out, 0.1 / pi * torch.eye(4, dtype=torch.float64), **EXACT64)
    torch.testing.assert_close(i - in_, 0.1 * pi * torch.eye(3, dtype=torch.float64), **EXACT64)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_solve_matches_dense(rank: int, damping: float) -> None:
    """(A ⊗ B [+ C ⊗ D]) u = v by K §3.4 equals a dense solve of the π-damped system."""
    k = _sum(rank, seed=4)
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, in_ = pi_damping(k.outs[0], k.ins[0], damping) if damping else (k.outs[0], k.ins[0])
    damped = KronSum((out,) + k.outs[1:], (in_,) + k.ins[1:]).as_dense()
    expected = torch.linalg.solve(damped, v.flatten())
    torch.testing.assert_close(k.solve(v, damping=damping).flatten(), expected, rtol=1e-9, atol=1e-11)


def test_restriction_to_the_factor_ranges_keeps_every_nonzero_eigenvalue() -> None:
    """Out factors of rank 3 (of 10), in factors of rank 5 (of 8): the restricted sum is 3 x 5 and its
    eigenvalues, padded with zeros, are the dense eigenvalues of the whole sum."""
    gen = torch.Generator().manual_seed(5)
    basis_out = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    low_out = [
        basis_out @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ basis_out.T for d in ([3, 1, 0.5], [1, -2, 0.1])
    ]
    basis_in = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    low_in = [basis_in @ _sym(5, gen) @ basis_in.T for _ in range(2)]
    k = KronSum(tuple(low_out), tuple(low_in))
    small = k.on_ranges()
    assert (small.d_out, small.d_in) == (3, 5)
    expected = torch.sort(torch.linalg.eigvalsh(k.as_dense()), descending=True).values
    got = torch.sort(torch.cat([small.eigenvalues(), torch.zeros(80 - 15, dtype=torch.float64)]), descending=True)
    torch.testing.assert_close(got.values, expected, rtol=1e-10, atol=1e-10)


def test_batched_matvec_equals_one_matrix_at_a_time() -> None:
    """The batched product (two GEMMs over all terms) equals the per-matrix product, any leading dims."""
    gen = torch.Generator().manual_seed(7)
    k = _sum(2)
    w = torch.randn(2, 3, k.d_out, k.d_in, generator=gen, dtype=torch.float64)
    expected = torch.stack([torch.stack([k.matvec(m) for m in row]) for row in w])
    torch.testing.assert_close(k.matvec(w), expected, **EXACT64)


def test_restricted_projects_a_sum_inside_the_spans_and_refuses_one_outside() -> None:
    """Factors inside span(u) x span(v): same eigenvalues but zeros; a factor outside: None."""
    gen = torch.Generator().manual_seed(9)
    u = torch.linalg.qr(torch.randn(10, 4, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64)).Q
    k = KronSum(tuple(u @ _sym(4, gen) @ u.T for _ in range(2)), tuple(v @ _sym(3, gen) @ v.T for _ in range(2)))
    small = k.restricted(u, v)
    assert small is not None and (small.d_out, small.d_in) == (4, 3)
    expected = torch.sort(torch.linalg.eigvalsh(k.as_dense()), descending=True).values
    got = torch.sort(torch.cat([small.eigenvalues(), torch.zeros(80 - 12, dtype=torch.float64)]), descending=True)
    torch.testing.assert_close(got.values, expected, rtol=1e-10, atol=1e-10)
    outside = KronSum((k.outs[0] + 1e-3 * torch.eye(10, dtype=torch.float64), k.outs[1]), k.ins)
    assert outside.restricted(u, v) is None and outside.restricted(None, v) is not None
