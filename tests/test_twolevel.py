"""Two-level KFAC vs dense twins on small MLP and conv cases: F•u, F_coarse, Woodbury ζ, β*,
the gap by T eq. 4.6 = E(β*) − E(0) computed with a dense ζ, gap ≤ 0, and the structural
properties of the coarse spaces (T §3.3)."""

from __future__ import annotations

import pytest
import torch

from fisherlab.approximations import kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.kron import pi_damping
from fisherlab.layers import LayerFactors
from fisherlab.twolevel import (
    CoarseSpace,
    WholeFisher,
    coarse_basis,
    damped_kfac_solve,
    tko_coarse_operator,
    two_level,
)
from tests.tolerances import EXACT64

DAMPING = 1e-2
CASES = [
    {"id": "mlp", "t": (1, 1, 1), "dims": ((4, 3), (4, 5), (6, 2)), "n": 6, "v": 2},
    {"id": "conv", "t": (4, 3), "dims": ((5, 3), (3, 4)), "n": 5, "v": 1},
]


def _fisher(case: dict, seed: int = 0) -> WholeFisher:
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for t, (d_in, d_out) in zip(case["t"], case["dims"], strict=True):
        a = torch.randn(case["n"], t, d_in, generator=gen, dtype=torch.float64)
        g = torch.randn(case["n"], case["v"], t, d_out, generator=gen, dtype=torch.float64)
        blocks.append(ExactBlock(LayerFactors(a, g)))
    return WholeFisher(tuple(blocks))


def _grads(fisher: WholeFisher, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b.factors.d_out, b.factors.d_in, generator=gen, dtype=torch.float64) for b in fisher.blocks]


def _flat(x: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in x])


def _dense_r0t(basis: list[torch.Tensor]) -> torch.Tensor:
    """R₀ᵀ as a dense block-diagonal [p, m] matrix (T eq. 3.21)."""
    return torch.block_diag(*[v.flatten(1).T for v in basis])


@pytest.fixture(params=CASES, ids=[c["id"] for c in CASES])
def fisher(request: pytest.FixtureRequest) -> WholeFisher:
    return _fisher(request.param)


def test_matvec_and_energy_match_dense(fisher: WholeFisher) -> None:
    """F•u = JᵀJu/N + λu and ⟨x, y⟩_F• equal their dense twins (T App. A.2)."""
    u, w = _grads(fisher, 2), _grads(fisher, 3)
    dense = fisher.as_dense(damping=DAMPING)
    torch.testing.assert_close(_flat(fisher.matvec(u, damping=DAMPING)), dense @ _flat(u), **EXACT64)
    torch.testing.assert_close(fisher.energy_inner(u, w, damping=DAMPING), _flat(u) @ dense @ _flat(w), **EXACT64)


def test_woodbury_natural_gradient_matches_dense_solve(fisher: WholeFisher) -> None:
    """ζ = (F + λI)⁻¹∇h by Woodbury equals torch.linalg.solve on the dense F•."""
    grads = _grads(fisher)
    expected = torch.linalg.solve(fisher.as_dense(damping=DAMPING), _flat(grads))
    torch.testing.assert_close(_flat(fisher.natural_gradient(grads, damping=DAMPING)), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("space", list(CoarseSpace))
def test_coarse_operator_beta_and_gap_match_dense(fisher: WholeFisher, space: CoarseSpace) -> None:
    """F_coarse = R₀F•R₀ᵀ, β* of eq. 3.11, and the gap of eq. 4.6 = E(β*) − E(0) with a dense ζ; gap ≤ 0."""
    grads = _grads(fisher)
    dense = fisher.as_dense(damping=DAMPING)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[space], tko=False)
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    basis = coarse_basis(space, kfacs, res.residual, damping=DAMPING, fisher=fisher)
    r0t = _dense_r0t(basis)
    f_coarse = r0t.T @ dense @ r0t
    torch.testing.assert_close(fisher.coarse_operator(basis, damping=DAMPING), f_coarse, **EXACT64)
    zeta = torch.linalg.solve(dense, _flat(grads))
    zeta_k = _flat(res.zeta_kfac)
    r = _flat(grads) - dense @ zeta_k
    torch.testing.assert_close(_flat(res.residual), r, **EXACT64)
    beta = torch.linalg.solve(f_coarse, r0t.T @ r)
    torch.testing.assert_close(r0t @ res.betas[space.value], r0t @ beta, rtol=1e-8, atol=1e-10)

    def energy(x: torch.Tensor) -> float:
        return float((x - zeta) @ dense @ (x - zeta))

    gap_direct = energy(zeta_k + r0t @ beta) - energy(zeta_k)
    assert res.gaps[space.value] == pytest.approx(gap_direct, rel=1e-7, abs=1e-12)
    assert res.energy_kfac == pytest.approx(energy(zeta_k), rel=1e-9)
    assert res.energies[space.value] == pytest.approx(energy(zeta_k + r0t @ beta), rel=1e-7, abs=1e-12)
    assert res.gaps[space.value] <= 1e-12


def test_tko_gap_matches_direct_and_coarse_operator_matches_dense() -> None:
    """β_TKO uses R₀F̄•R₀ᵀ of eq. 3.18 (dense twin for an MLP); its gap by eq. 4.6 equals E(β_TKO) − E(0)."""
    fisher = _fisher(CASES[0])
    grads = _grads(fisher)
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    res = two_level(fisher, grads, damping=DAMPING, spaces=[], tko=True)
    basis = coarse_basis("nicolaides", kfacs, res.residual, damping=DAMPING)
    n = fisher.n_samples
    blocks = []
    for i, bi in enumerate(fisher.blocks):
        row = []
        for j, bj in enumerate(fisher.blocks):
            if i == j:
                o, a = pi_damping(kfacs[i].outs[0], kfacs[i].ins[0], DAMPING)
            else:
                gi, gj = bi.factors.g[:, :, 0], bj.factors.g[:, :, 0]
                o = torch.einsum("nvo,nvp->op", gi, gj) / n
                a = bi.factors.a[:, 0].T @ bj.factors.a[:, 0] / n
            row.append(torch.kron(o, a))
        blocks.append(torch.cat(row, dim=1))
    f_bar = torch.cat(blocks)
    r0t = _dense_r0t(basis)
    torch.testing.assert_close(
        tko_coarse_operator(fisher, kfacs, basis, damping=DAMPING), r0t.T @ f_bar @ r0t, **EXACT64
    )
    dense = fisher.as_dense(damping=DAMPING)
    zeta = torch.linalg.solve(dense, _flat(grads))
    zk = _flat(res.zeta_kfac)
    zt = _flat(res.increments["tko"])
    direct = float((zt - zeta) @ dense @ (zt - zeta) - (zk - zeta) @ dense @ (zk - zeta))
    assert res.gaps["tko"] == pytest.approx(direct, rel=1e-7, abs=1e-12)


def test_residual_space_contains_kfac_correction(fisher: WholeFisher) -> None:
    """R₀ᵀ[1, …, 1] = F•KFAC⁻¹ r_KFAC for the residuals coarse space (T eq. 3.32)."""
    grads = _grads(fisher)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[], tko=False)
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    basis = coarse_basis("residuals", kfacs, res.residual, damping=DAMPING)
    expected = damped_kfac_solve(kfacs, res.residual, damping=DAMPING)
    torch.testing.assert_close(
        _dense_r0t(basis) @ torch.ones(len(basis), dtype=torch.float64), _flat(expected), **EXACT64
    )


def test_spectral_vector_is_smallest_eigenvector(fisher: WholeFisher) -> None:
    """The spectral column is an eigenvector of the damped KFAC block for its smallest eigenvalue."""
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    basis = coarse_basis("spectral", kfacs, _grads(fisher), damping=DAMPING)
    for k, v in zip(kfacs, basis, strict=True):
        o, a = pi_damping(k.outs[0], k.ins[0], DAMPING)
        block = torch.kron(o, a)
        lam_min = torch.linalg.eigvalsh(block)[0]
        x = v[0].flatten()
        torch.testing.assert_close(block @ x, lam_min * x, rtol=1e-9, atol=1e-12)


def test_taylor_order_one_is_residuals(fisher: WholeFisher) -> None:
    """Taylor with q = 1 equals the residuals coarse space; q = 2 adds F•KFAC⁻¹F• w₁ (T eq. 3.38)."""
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    r = _grads(fisher, 5)
    t1 = coarse_basis("taylor", kfacs, r, damping=DAMPING, fisher=fisher, order=1)
    res = coarse_basis("residuals", kfacs, r, damping=DAMPING)
    for x, y in zip(t1, res, strict=True):
        torch.testing.assert_close(x, y, **EXACT64)
    t2 = coarse_basis("taylor", kfacs, r, damping=DAMPING, fisher=fisher, order=2)
    w2 = damped_kfac_solve(kfacs, fisher.matvec([v[0] for v in res], damping=DAMPING), damping=DAMPING)
    for x, y in zip(t2, w2, strict=True):
        torch.testing.assert_close(x[1], y, **EXACT64)


def test_rank_deficient_basis_is_handled() -> None:
    """A layer whose gradient and factors vanish gives a zero residual column: no crash, gap still ≤ 0."""
    fisher = _fisher(CASES[0])
    blocks = list(fisher.blocks)
    f0 = blocks[1].factors
    blocks[1] = ExactBlock(LayerFactors(f0.a, torch.zeros_like(f0.g)))
    fisher = WholeFisher(tuple(blocks))
    grads = _grads(fisher)
    grads[1] = torch.zeros_like(grads[1])
    res = two_level(fisher, grads, damping=DAMPING)
    for key, gap in res.gaps.items():
        assert torch.isfinite(torch.tensor(gap)), key
        if key != "tko":
            assert gap <= 1e-12, key
