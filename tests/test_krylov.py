"""Block Lanczos (restarted, on batched matvecs) against dense eigenvalues, its breakdown and memory
behaviour, and the eigensolver's thread context."""

from __future__ import annotations

import pytest
import torch

from fisherlab.kron import KronSum
from fisherlab.krylov import blas_threads, block_lanczos_eigenvalues
from tests.cases import rng, spd, symmetric
from tests.tolerances import EXACT64


@pytest.mark.parametrize(("wanted", "max_dim"), [(1, 80), (6, 80), (6, 16)])
def test_block_lanczos_finds_the_largest_magnitude_eigenvalues(wanted: int, max_dim: int) -> None:
    """Block Lanczos on the batched Kronecker product, with room for the whole space or (16 vectors)
    thick restarts: converged Ritz values are the largest-magnitude eigenvalues of the dense matrix,
    residuals within the tolerance."""
    gen = rng(3)
    k = KronSum((spd(10, gen), -0.8 * spd(10, gen)), (spd(8, gen), symmetric(8, gen)))  # indefinite
    ev = torch.linalg.eigvalsh(k.as_dense())
    expected = ev[torch.argsort(ev.abs(), descending=True)][:wanted]
    start = torch.randn(4, 10, 8, generator=gen, dtype=torch.float64)
    ritz = block_lanczos_eigenvalues(k.matvec, start, wanted, max_dim=max_dim, tol=1e-12)
    assert ritz.converged >= wanted and bool((ritz.residuals[:wanted] <= 1e-12 * ritz.values[0].abs()).all())
    torch.testing.assert_close(ritz.values[:wanted], expected, **EXACT64)
    if max_dim < 80:
        assert ritz.products > max_dim  # it restarted


def test_block_lanczos_on_an_invariant_start_block_keeps_an_orthonormal_basis() -> None:
    """A start block that spans an invariant subspace (breakdown): the next directions are still
    orthogonal to the basis, and every eigenvalue comes out right."""
    gen = rng(4)
    q = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64)).Q
    values = torch.linspace(3, 0.1, 12, dtype=torch.float64)
    a = q @ torch.diag(values) @ q.T
    start = q[:, :3].T.reshape(3, 3, 4)  # eigenvectors: A maps the start block into itself

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) @ a).reshape(x.shape)

    ritz = block_lanczos_eigenvalues(apply, start, 12, max_dim=12, tol=1e-12)
    torch.testing.assert_close(ritz.values, values, **EXACT64)


def test_blas_threads_sets_and_restores_the_thread_count() -> None:
    """The eigensolver's thread context sets torch's threads inside and restores them afterwards, also
    when the block raises; None leaves them alone."""
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
    gen = rng(6)
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
    torch.testing.assert_close(ritz.values[:8], diag[:8], **EXACT64)
    assert max(allocated) <= (8 * 8) ** 2 and ritz.products < 4096
