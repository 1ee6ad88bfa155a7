"""Kronecker sums vs dense: matvec, Frobenius norm, eigenvalues (one and two terms, dense and
block Lanczos paths), and the damped solves of K §3.4."""

from __future__ import annotations

import pytest
import torch

from fisherlab._errors import FisherlabError
from fisherlab.kron import KronSum, pi_damping
from tests.cases import rng, spd, symmetric
from tests.tolerances import DAMPED_SOLVE, EXACT64

#: Eigenvalues of a sum restricted to its factors' ranges, padded with exact zeros, against a dense
#: eigvalsh whose zero eigenvalues come out as roundoff of the largest: an absolute part at EXACT64's rtol.
ZERO_PADDED = {"rtol": 1e-10, "atol": 1e-10}


def _sum(rank: int, seed: int = 0) -> KronSum:
    gen = rng(seed)
    outs = (spd(4, gen),) + tuple(0.3 * symmetric(4, gen) for _ in range(rank - 1))
    ins = (spd(3, gen),) + tuple(symmetric(3, gen) for _ in range(rank - 1))
    return KronSum(outs, ins)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matvec_norm_trace_match_dense(rank: int) -> None:
    """matvec, ||·||_F and trace of a Kronecker sum equal the dense ones (acting on W.flatten())."""
    k = _sum(rank)
    w = torch.randn(4, 3, generator=rng(9), dtype=torch.float64)
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


def test_pi_damping_balances_traces() -> None:
    """π-damping adds √λ/π and π√λ with π² = (tr(in)/d_in)/(tr(out)/d_out) (K §2.2)."""
    gen = rng(1)
    out, in_ = spd(4, gen), 5 * spd(3, gen)
    o, i = pi_damping(out, in_, 0.01)
    pi = ((torch.trace(in_) / 3) / (torch.trace(out) / 4)).sqrt()
    torch.testing.assert_close(o - out, 0.1 / pi * torch.eye(4, dtype=torch.float64), **EXACT64)
    torch.testing.assert_close(i - in_, 0.1 * pi * torch.eye(3, dtype=torch.float64), **EXACT64)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_solve_matches_dense(rank: int, damping: float) -> None:
    """(A ⊗ B [+ C ⊗ D]) u = v by K §3.4 equals a dense solve of the π-damped system."""
    k = _sum(rank, seed=4)
    v = torch.randn(4, 3, generator=rng(5), dtype=torch.float64)
    out, in_ = pi_damping(k.outs[0], k.ins[0], damping) if damping else (k.outs[0], k.ins[0])
    damped = KronSum((out,) + k.outs[1:], (in_,) + k.ins[1:]).as_dense()
    expected = torch.linalg.solve(damped, v.flatten())
    torch.testing.assert_close(k.solve(v, damping=damping).flatten(), expected, **DAMPED_SOLVE)


def test_restriction_to_the_factor_ranges_keeps_every_nonzero_eigenvalue() -> None:
    """Out factors of rank 3 (of 10), in factors of rank 5 (of 8): the restricted sum is 3 x 5 and its
    eigenvalues, padded with zeros, are the dense eigenvalues of the whole sum."""
    gen = rng(5)
    basis_out = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    low_out = [
        basis_out @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ basis_out.T for d in ([3, 1, 0.5], [1, -2, 0.1])
    ]
    basis_in = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    low_in = [basis_in @ symmetric(5, gen) @ basis_in.T for _ in range(2)]
    k = KronSum(tuple(low_out), tuple(low_in))
    small = k.on_ranges()
    assert (small.d_out, small.d_in) == (3, 5)
    expected = torch.sort(torch.linalg.eigvalsh(k.as_dense()), descending=True).values
    got = torch.sort(torch.cat([small.eigenvalues(), torch.zeros(80 - 15, dtype=torch.float64)]), descending=True)
    torch.testing.assert_close(got.values, expected, **ZERO_PADDED)


def test_batched_matvec_equals_one_matrix_at_a_time() -> None:
    """The batched product (two GEMMs over all terms) equals the per-matrix product, any leading dims."""
    gen = rng(7)
    k = _sum(2)
    w = torch.randn(2, 3, k.d_out, k.d_in, generator=gen, dtype=torch.float64)
    expected = torch.stack([torch.stack([k.matvec(m) for m in row]) for row in w])
    torch.testing.assert_close(k.matvec(w), expected, **EXACT64)


def test_restricted_projects_a_sum_inside_the_spans_and_refuses_one_outside() -> None:
    """Factors inside span(u) x span(v): same eigenvalues but zeros; a factor outside: None."""
    gen = rng(9)
    u = torch.linalg.qr(torch.randn(10, 4, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64)).Q
    k = KronSum(
        tuple(u @ symmetric(4, gen) @ u.T for _ in range(2)), tuple(v @ symmetric(3, gen) @ v.T for _ in range(2))
    )
    small = k.restricted(u, v)
    assert small is not None and (small.d_out, small.d_in) == (4, 3)
    expected = torch.sort(torch.linalg.eigvalsh(k.as_dense()), descending=True).values
    got = torch.sort(torch.cat([small.eigenvalues(), torch.zeros(80 - 12, dtype=torch.float64)]), descending=True)
    torch.testing.assert_close(got.values, expected, **ZERO_PADDED)
    outside = KronSum((k.outs[0] + 1e-3 * torch.eye(10, dtype=torch.float64), k.outs[1]), k.ins)
    assert outside.restricted(u, v) is None and outside.restricted(None, v) is not None


def test_factor_eigendecompositions_are_computed_once_and_shared_by_scaled_sums() -> None:
    """A single product's factor eigendecompositions equal dense ``eigh`` and are kept (the second call
    returns the same tensors); a sum made by ``scaled`` (TKFAC from KFAC) has its own eigenvalues, dense
    ``eigvalsh`` of its factors, from its parent's (computed once for both, whichever asks first); a
    negative scale shares nothing and is still right; sums of two terms refuse."""
    k = _sum(1, seed=3)
    s = k.scaled(2.5, 0.5)
    s_out, s_in = s.factor_eigenvalues()  # before the parent computed anything: computed on the parent
    assert "eigvalsh" in k.cache
    torch.testing.assert_close(s_out, torch.linalg.eigvalsh(s.outs[0]), **EXACT64)
    torch.testing.assert_close(s_in, torch.linalg.eigvalsh(s.ins[0]), **EXACT64)
    (e_out, q_out), (e_in, q_in) = k.factor_eigh()
    for e, q, m in ((e_out, q_out, k.outs[0]), (e_in, q_in, k.ins[0])):
        torch.testing.assert_close(q @ torch.diag(e) @ q.T, m, **EXACT64)
    assert k.factor_eigh()[0][1] is q_out  # kept
    (se_out, sq_out), _ = k.scaled(3.0).factor_eigh()
    assert sq_out is q_out and torch.equal(se_out, 3.0 * e_out)  # shared, not recomputed
    want = torch.sort(torch.linalg.eigvalsh(3.0 * k.as_dense()), descending=True).values
    torch.testing.assert_close(k.scaled(3.0).eigenvalues(), want, **EXACT64)
    negative = k.scaled(-1.0)
    assert "scaled_from" not in negative.cache
    torch.testing.assert_close(negative.factor_eigenvalues()[0], torch.linalg.eigvalsh(-k.outs[0]), **EXACT64)
    with pytest.raises(FisherlabError, match="single Kronecker product"):
        _sum(2).factor_eigh()


def test_given_factor_eigendecompositions_are_used_without_an_eigensolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """``with_factor_eigh``: the eigenvalues (error 2) and ``factor_eigh`` (the damped solve) are the given
    ones; no eigensolver runs (one would fail here)."""
    k = _sum(1, seed=4)
    (e_out, q_out), (e_in, q_in) = torch.linalg.eigh(k.outs[0]), torch.linalg.eigh(k.ins[0])
    given = KronSum(k.outs, k.ins).with_factor_eigh((e_out, q_out), (e_in, q_in))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an eigensolver ran")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    monkeypatch.setattr(torch.linalg, "eigvalsh", refuse)
    assert given.factor_eigh()[1][1] is q_in
    want = torch.sort(torch.outer(e_out, e_in).flatten(), descending=True).values
    assert torch.equal(given.eigenvalues(), want)
