"""Dense twins built independently of the code under test (issue 11, defect 7): the optimizers'
steps from torch.func per-sample gradients of the same batch, β_TKO by T eq. 4.7b with
F̄• of eq. 3.18 for an MLP and a conv net, and the two-level metrics stored by a probe run
(energy errors and cosines) from dense matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherlab.approximations import Method, kfac_factors
from fisherlab.dense import per_sample_gradients, rearrange
from fisherlab.fisher import ExactBlock
from fisherlab.layers import LayerFactors
from fisherlab.losses import per_sample_loss
from fisherlab.operators import BlockDiagonal
from fisherlab.optim import KroneckerOptimizer, layer_gradient
from fisherlab.probe import Probe
from fisherlab.twolevel import WholeFisher, two_level, two_level_metrics
from tests.cases import small_mlp

DAMPING = 1e-2


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    return x, torch.tanh(2 * x[:, :3])


def _pi_damped(out: torch.Tensor, in_: torch.Tensor, damping: float) -> torch.Tensor:
    """(out + √λ/π I) ⊗ (in + √λ π I), π² = (tr in / d_in) / (tr out / d_out), written out densely."""
    pi = ((torch.trace(in_) / in_.shape[0]) / (torch.trace(out) / out.shape[0])) ** 0.5
    root = damping**0.5
    return torch.kron(
        out + root / pi * torch.eye(out.shape[0], dtype=out.dtype),
        in_ + root * pi * torch.eye(in_.shape[0], dtype=in_.dtype),
    )


def _factor_pair(
    vec_out: torch.Tensor, vec_in: torch.Tensor, sigma: torch.Tensor, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """√σ MAT(u) and √σ MAT(v), signed so that tr(in) ≥ 0 (the convention of K Prop. 3.2)."""
    out, in_ = sigma.sqrt() * vec_out.reshape(d_out, d_out), sigma.sqrt() * vec_in.reshape(d_in, d_in)
    return (-out, -in_) if torch.trace(in_) < 0 else (out, in_)


def _dense_preconditioner(method: Method, psg: torch.Tensor, a: torch.Tensor, damping: float) -> torch.Tensor:
    """The damped approximation of one layer as a dense matrix, from per-sample gradients ``psg
    [N, d_out, d_in]`` and inputs ``a [N, d_in]`` only (empirical Fisher, one direction)."""
    n, d_out, d_in = psg.shape
    jac = psg.reshape(n, -1)
    f = jac.T @ jac / n
    g = psg[:, :, -1]  # the bias column of DW = g aᵀ is g itself
    kfac = (g.T @ g / n, a.T @ a / n)
    u, s, vt = torch.linalg.svd(rearrange(f, d_out, d_in))
    first = _factor_pair(u[:, 0], vt[0], s[0], d_out, d_in)
    if method == Method.KFAC:
        return _pi_damped(*kfac, damping)
    if method == Method.KPSVD:
        return _pi_damped(*first, damping)
    if method in (Method.DEFLATION, Method.LANCZOS):
        second = _factor_pair(u[:, 1], vt[1], s[1], d_out, d_in)
        return _pi_damped(*first, damping) + torch.kron(*second)
    resid = rearrange(f - torch.kron(*kfac), d_out, d_in)  # KFAC-corrected: best corrector of F - KFAC
    u2, s2, vt2 = torch.linalg.svd(resid)
    return _pi_damped(*kfac, damping) + torch.kron(*_factor_pair(u2[:, 0], vt2[0], s2[0], d_out, d_in))


def _inputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Bias-augmented inputs of the two Linear layers of ``small_mlp``, by a plain forward pass."""
    hidden = torch.tanh(model[0](x)).detach()
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    return [torch.cat([x, ones], 1), torch.cat([hidden, ones], 1)]


def _first_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, **kw: object) -> dict[str, torch.Tensor]:
    """Take one empirical-Fisher step; return the update per layer (W_before - W_after) / lr."""
    opt = KroneckerOptimizer(
        model, "mse", lr=0.5, damping=DAMPING, fisher="empirical", tol=1e-12, max_iter=20_000, **kw
    )  # type: ignore[arg-type]
    model.zero_grad()
    per_sample_loss("mse", model(x), y).mean().backward()  # type: ignore[arg-type]
    before = {n: layer_gradient(m, "data").clone() for n, m in opt.layers.items()}
    opt.step(inputs=x, targets=y)
    return {n: (before[n] - layer_gradient(m, "data")) / 0.5 for n, m in opt.layers.items()}


@pytest.mark.parametrize("method", list(Method))
def test_optimizer_step_matches_dense_twin_of_the_same_batch(method: Method) -> None:
    """First step = (F̂ + π-damping)⁻¹∇h, F̂ built densely from torch.func per-sample gradients of
    the batch (not from the optimizer's stored approximation)."""
    model = small_mlp()
    x, y = _batch()
    psg = per_sample_gradients(model, "mse", x, y, {"0": model[0], "2": model[2]})
    inputs = _inputs(model, x)
    step = _first_step(model, x, y, method=method)
    for (name, grads), a in zip(psg.items(), inputs, strict=True):
        expected = torch.linalg.solve(_dense_preconditioner(method, grads, a, DAMPING), grads.mean(0).flatten())
        torch.testing.assert_close(step[name].flatten(), expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("space", ["nicolaides", "residuals"])
def test_two_level_optimizer_step_matches_dense_twin(space: str) -> None:
    """Two-level step = ζ_KFAC + R₀ᵀβ*, β* = (R₀F•R₀ᵀ)⁻¹R₀ r_KFAC (T eq. 3.9-3.11), all dense."""
    model = small_mlp()
    x, y = _batch(1)
    psg = per_sample_gradients(model, "mse", x, y, {"0": model[0], "2": model[2]})
    inputs = _inputs(model, x)
    step = _first_step(model, x, y, method="kfac", two_level=space)
    blocks = [_dense_preconditioner(Method.KFAC, g, a, DAMPING) for g, a in zip(psg.values(), inputs, strict=True)]
    grad = torch.cat([g.mean(0).flatten() for g in psg.values()])
    jac = torch.cat([g.reshape(g.shape[0], -1) for g in psg.values()], 1)
    f_damped = jac.T @ jac / x.shape[0] + DAMPING * torch.eye(jac.shape[1], dtype=jac.dtype)
    kfac_block = torch.block_diag(*blocks)
    zeta_kfac = torch.linalg.solve(kfac_block, grad)
    residual = grad - f_damped @ zeta_kfac
    sizes = [b.shape[0] for b in blocks]
    if space == "nicolaides":
        cols = [torch.ones(s, dtype=grad.dtype) for s in sizes]
    else:
        cols = [torch.linalg.solve(b, r) for b, r in zip(blocks, residual.split(sizes), strict=True)]
    r0t = torch.block_diag(*[c[:, None] for c in cols])
    beta = torch.linalg.solve(r0t.T @ f_damped @ r0t, r0t.T @ residual)
    expected = zeta_kfac + r0t @ beta
    got = torch.cat([step[n].flatten() for n in psg])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def _random_fisher(conv: bool) -> tuple[WholeFisher, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    shapes = [(4, 5, 3), (3, 4, 2)] if conv else [(1, 5, 3), (1, 4, 2)]  # (T, d_in, d_out)
    blocks = [
        ExactBlock(
            LayerFactors(
                torch.randn(6, t, di, generator=gen, dtype=torch.float64),
                torch.randn(6, 2, t, do, generator=gen, dtype=torch.float64),
            )
        )
        for t, di, do in shapes
    ]
    grads = [torch.randn(do, di, generator=gen, dtype=torch.float64) for _, di, do in shapes]
    return WholeFisher(tuple(blocks)), grads


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_beta_tko_matches_eq_4_7b(conv: bool) -> None:
    """β_TKO = (R₀F̄•R₀ᵀ)⁻¹R₀∇h (T eq. 4.7b) with F̄• of eq. 3.18 built entry by entry: damped KFAC
    blocks on the diagonal, E[g_i g_jᵀ] ⊗ E[ā_i ā_jᵀ] off it (conv: ā averaged, g summed over positions)."""
    fisher, grads = _random_fisher(conv)
    res = two_level(fisher, grads, damping=DAMPING, spaces=[], tko=True)
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
                row.append(_pi_damped(g_fac, a_fac, DAMPING))
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
    torch.testing.assert_close(res.betas["tko"], beta, rtol=1e-9, atol=1e-12)


def test_stored_two_level_metrics_match_dense() -> None:
    """energy_error, cosine (two-level increments) and block_energy_error, block_cosine (block-diagonal
    methods) of a probe snapshot equal their definitions on dense matrices."""
    model = small_mlp((4, 5, 3))
    x, y = _batch(2)
    snap = Probe(model, "mse", fisher="exact")(x, y)
    from fisherlab.approximations import ApproxConfig, approximate_all

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
                _pi_damped(k.outs[0], k.ins[0], DAMPING)
                + sum(torch.kron(o, i) for o, i in zip(k.outs[1:], k.ins[1:], strict=True))
            )
        z_m = torch.linalg.solve(torch.block_diag(*dense_blocks), grad)
        assert float(extra["block_energy_error"][1][mi]) == pytest.approx(energy_error(z_m), rel=1e-8)
        assert float(extra["block_cosine"][1][mi]) == pytest.approx(cos(z_m), rel=1e-8)
    res = two_level(
        WholeFisher(tuple(ExactBlock(snap.factors[n]) for n in names)),
        [snap.gradients[n] for n in names],
        damping=DAMPING,
        spaces=["nicolaides", "residuals"],
    )
    kfac_blocks = []
    for n in names:
        k = kfac_factors(ExactBlock(snap.factors[n]))
        kfac_blocks.append(_pi_damped(k.outs[0], k.ins[0], DAMPING))
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
        assert float(extra["energy_error"][1][ci]) == pytest.approx(energy_error(z2), rel=1e-8)
        assert float(extra["cosine"][1][ci]) == pytest.approx(cos(z2), rel=1e-8)
        assert res.gaps[space] <= 0
