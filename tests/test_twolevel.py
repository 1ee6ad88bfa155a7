"""Two-level KFAC vs dense twins on small MLP and conv cases: F•u, F_coarse, Woodbury ζ, β*,
the gap by T eq. 4.6 = E(β*) − E(0) computed with a dense ζ, gap ≤ 0, and the structural
properties of the coarse spaces (T §3.3); β_TKO by T eq. 4.7b with F̄• of eq. 3.18 written out entry by
entry; the two-level metrics a probe stores (energy errors, cosines) from dense matrices; the spectral
coarse vector of a repeated eigenvalue."""

from __future__ import annotations

import pytest
import torch

from fisherlab.approximations import ApproxConfig, Method, approximate_all, kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.kron import pi_damping
from fisherlab.layers import LayerFactors
from fisherlab.operators import BlockDiagonal
from fisherlab.probe import Probe
from fisherlab.twolevel import (
    CoarseSpace,
    WholeFisher,
    coarse_basis,
    damped_kfac_solve,
    smallest_eigenvector,
    tko_coarse_operator,
    two_level,
    two_level_metrics,
)
from tests.cases import pi_damped_dense, plain_blocks, regression_batch, rng, small_mlp
from tests.tolerances import COARSE64, DAMPED_SOLVE, EXACT64, SOLVE64

#: A gap is a difference of two energies of the same size: the cancellation costs two digits of
#: COARSE64's, and the absolute part covers a gap of 0.
GAP = {"rel": 1e-7, "abs": 1e-12}

DAMPING = 1e-2
CASES = [
    {"id": "mlp", "t": (1, 1, 1), "dims": ((4, 3), (4, 5), (6, 2)), "n": 6, "v": 2},
    {"id": "conv", "t": (4, 3), "dims": ((5, 3), (3, 4)), "n": 5, "v": 1},
]


def _fisher(case: dict, seed: int = 0) -> WholeFisher:
    shapes = [(t, d_in, d_out) for t, (d_in, d_out) in zip(case["t"], case["dims"], strict=True)]
    return WholeFisher(plain_blocks(rng(seed), case["n"], case["v"], shapes))


def _grads(fisher: WholeFisher, seed: int = 1) -> list[torch.Tensor]:
    gen = rng(seed)
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
    torch.testing.assert_close(_flat(fisher.natural_gradient(grads, damping=DAMPING)), expected, **DAMPED_SOLVE)


@pytest.mark.parametrize("space", [c for c in CoarseSpace if c != CoarseSpace.TKO])  # β_TKO: tested below
def test_coarse_operator_beta_and_gap_match_dense(fisher: WholeFisher, space: CoarseSpace) -> None:
    """F_coarse = R₀F•R₀ᵀ, β* of eq. 3.11, and the gap of eq. 4.6 = E(β*) − E(0) with a dense ζ; gap ≤ 0."""
    grads = _grads(fisher)
    dense = fisher.as_dense(damping=DAMPING)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[space])
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
    torch.testing.assert_close(r0t @ res.betas[space.value], r0t @ beta, **COARSE64)

    def energy(x: torch.Tensor) -> float:
        return float((x - zeta) @ dense @ (x - zeta))

    gap_direct = energy(zeta_k + r0t @ beta) - energy(zeta_k)
    assert res.gaps[space.value] == pytest.approx(gap_direct, **GAP)
    assert res.energy_kfac == pytest.approx(energy(zeta_k), rel=SOLVE64["rtol"])
    assert res.energies[space.value] == pytest.approx(energy(zeta_k + r0t @ beta), **GAP)
    assert res.gaps[space.value] <= 1e-12


def test_tko_gap_matches_direct_and_coarse_operator_matches_dense() -> None:
    """β_TKO uses R₀F̄•R₀ᵀ of eq. 3.18 (dense twin for an MLP); its gap by eq. 4.6 equals E(β_TKO) − E(0)."""
    fisher = _fisher(CASES[0])
    grads = _grads(fisher)
    kfacs = [kfac_factors(b) for b in fisher.blocks]
    res = two_level(fisher, grads, damping=DAMPING, spaces=[CoarseSpace.TKO])
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
    assert res.gaps["tko"] == pytest.approx(direct, **GAP)


def test_residual_space_contains_kfac_correction(fisher: WholeFisher) -> None:
    """R₀ᵀ[1, …, 1] = F•KFAC⁻¹ r_KFAC for the residuals coarse space (T eq. 3.32)."""
    grads = _grads(fisher)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[])
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
        torch.testing.assert_close(block @ x, lam_min * x, **SOLVE64)


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


def test_spectral_vector_is_deterministic_for_a_repeated_eigenvalue() -> None:
    """With a repeated smallest eigenvalue the vector is the normalised projection of 1 onto its
    eigenspace, whatever basis eigh returns (the same matrix, rotated inside the eigenspace)."""
    gen = rng(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    space = q[:, :3]
    expected = space @ (space.T @ torch.ones(5, dtype=torch.float64))
    expected = expected / expected.norm() * torch.sign(expected.sum())
    torch.testing.assert_close(smallest_eigenvector(m), expected, **SOLVE64)
    torch.testing.assert_close(smallest_eigenvector((m + m.T) / 2 + 0.0 * m), expected, **SOLVE64)
    eye = smallest_eigenvector(torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(eye, torch.full((4,), 0.5, dtype=torch.float64))


def _random_fisher(conv: bool) -> tuple[WholeFisher, list[torch.Tensor]]:
    gen = rng(11)
    shapes = [(4, 5, 3), (3, 4, 2)] if conv else [(1, 5, 3), (1, 4, 2)]  # (T, d_in, d_out)
    blocks = plain_blocks(gen, 6, 2, shapes)
    grads = [torch.randn(do, di, generator=gen, dtype=torch.float64) for _, di, do in shapes]
    return WholeFisher(blocks), grads


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_beta_tko_matches_eq_4_7b(conv: bool) -> None:
    """β_TKO = (R₀F̄•R₀ᵀ)⁻¹R₀∇h (T eq. 4.7b) with F̄• of eq. 3.18 built entry by entry: damped KFAC
    blocks on the diagonal, E[g_i g_jᵀ] ⊗ E[ā_i ā_jᵀ] off it (conv: ā averaged, g summed over positions)."""
    fisher, grads = _random_fisher(conv)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[CoarseSpace.TKO])
    n = fisher.n_samples
    rows = []
    for i, bi in enumerate(fisher.blocks):
        row = []
        for j, bj in enumerate(fisher.blocks):
            if i == j:
                f = bi.factors
                t = f.n_positions
                a_fac = sum(torch.outer(f.a[m, s], f.a[m, s]) for m in range(n) for s in range(t)) / n
                g_fac = sum(
                    torch.outer(f.g[m, v, s], f.g[m, v, s])
                    for m in range(n)
                    for v in range(f.n_directions)
                    for s in range(t)
                ) / (n * t)
                row.append(pi_damped_dense(g_fac, a_fac, DAMPING))
            else:
                g_i, g_j = bi.factors.g.sum(2), bj.factors.g.sum(2)
                a_i, a_j = bi.factors.a.mean(1), bj.factors.a.mean(1)
                gg = sum(torch.outer(g_i[m, v], g_j[m, v]) for m in range(n) for v in range(g_i.shape[1])) / n
                aa = sum(torch.outer(a_i[m], a_j[m]) for m in range(n)) / n
                row.append(torch.kron(gg, aa))
        rows.append(torch.cat(row, 1))
    f_bar = torch.cat(rows)
    r0t = torch.block_diag(*[torch.ones(g.numel(), 1, dtype=g.dtype) for g in grads])
    grad = torch.cat([g.flatten() for g in grads])
    beta = torch.linalg.solve(r0t.T @ f_bar @ r0t, r0t.T @ grad)
    torch.testing.assert_close(res.betas["tko"], beta, **SOLVE64)


def test_stored_two_level_metrics_match_dense() -> None:
    """energy_error, cosine (two-level increments) and block_energy_error, block_cosine (block-diagonal
    methods) of a probe snapshot equal their definitions on dense matrices."""
    model = small_mlp((4, 5, 3))
    x, y = regression_batch(24, 2)
    snap = Probe(model, "mse", fisher="exact")(x, y)
    methods = list(Method)
    config = ApproxConfig(tol=1e-12, max_iter=20_000, krylov_dim=40)
    approximations = {n: approximate_all(ExactBlock(f), methods, config) for n, f in snap.factors.items()}
    names = list(snap.factors)
    diagonals = {m: BlockDiagonal(tuple(approximations[n][m].kron for n in names)) for m in methods}
    values, spaces = two_level_metrics(
        snap.whole_fisher(names),
        [snap.gradients[n] for n in names],
        diagonals,
        damping=DAMPING,
        spaces=["nicolaides", "residuals"],
    )
    extra = {k: (None, v) for k, v in values.items()}
    coords = {"coarse_space": spaces}
    jac = torch.cat([ExactBlock(snap.factors[n]).jacobian() for n in names], 1)
    f_damped = jac.T @ jac / x.shape[0] + DAMPING * torch.eye(jac.shape[1], dtype=jac.dtype)
    grad = torch.cat([snap.gradients[n].flatten() for n in names])
    zeta = torch.linalg.solve(f_damped, grad)

    def energy_error(z: torch.Tensor) -> float:
        return float(((z - zeta) @ f_damped @ (z - zeta) / (zeta @ f_damped @ zeta)).sqrt())

    def cos(z: torch.Tensor) -> float:
        return float(z @ zeta / (z.norm() * zeta.norm()))

    for mi, m in enumerate(methods):
        dense_blocks = []
        for n in names:
            k = approximations[n][m].kron
            dense_blocks.append(
                pi_damped_dense(k.outs[0], k.ins[0], DAMPING)
                + sum(torch.kron(o, i) for o, i in zip(k.outs[1:], k.ins[1:], strict=True))
            )
        z_m = torch.linalg.solve(torch.block_diag(*dense_blocks), grad)
        assert float(extra["block_energy_error"][1][mi]) == pytest.approx(energy_error(z_m), rel=COARSE64["rtol"])
        assert float(extra["block_cosine"][1][mi]) == pytest.approx(cos(z_m), rel=COARSE64["rtol"])
    res = two_level(
        WholeFisher(tuple(ExactBlock(snap.factors[n]) for n in names)),
        [snap.gradients[n] for n in names],
        damping=DAMPING,
        spaces=["nicolaides", "residuals"],
    )
    kfac_blocks = []
    for n in names:
        k = kfac_factors(ExactBlock(snap.factors[n]))
        kfac_blocks.append(pi_damped_dense(k.outs[0], k.ins[0], DAMPING))
    zeta_kfac = torch.linalg.solve(torch.block_diag(*kfac_blocks), grad)
    residual = grad - f_damped @ zeta_kfac
    sizes = [b.shape[0] for b in kfac_blocks]
    for ci, space in enumerate(coords["coarse_space"][:2]):
        if space == "nicolaides":
            cols = [torch.ones(s, dtype=grad.dtype) for s in sizes]
        else:
            cols = [torch.linalg.solve(b, r) for b, r in zip(kfac_blocks, residual.split(sizes), strict=True)]
        r0t = torch.block_diag(*[c[:, None] for c in cols])
        z2 = zeta_kfac + r0t @ torch.linalg.solve(r0t.T @ f_damped @ r0t, r0t.T @ residual)
        assert float(extra["energy_error"][1][ci]) == pytest.approx(energy_error(z2), rel=COARSE64["rtol"])
        assert float(extra["cosine"][1][ci]) == pytest.approx(cos(z2), rel=COARSE64["rtol"])
        assert res.gaps[space] <= 0
