"""The methods as optimizers: the preconditioned direction equals a dense (F̂ + damping)⁻¹∇
computed by brute force; every optimizer lowers the loss; state_dict resume reproduces an
uninterrupted run; KL clipping bounds the step; the first step of every method, one- and two-level,
equals a dense twin built from torch.func per-sample gradients of the same batch (not from the
optimizer's stored approximation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisherlab._errors import FisherlabError
from fisherlab.approximations import Method
from fisherlab.dense import per_sample_gradients, rearrange
from fisherlab.kron import pi_damping
from fisherlab.losses import per_sample_loss
from fisherlab.optim import OPTIMIZER_NAMES, KroneckerOptimizer, layer_gradient, make_optimizer
from tests.cases import pi_damped_dense, regression_batch, small_mlp
from tests.tolerances import COARSE64, ITERATIVE, SOLVE64, scaled

DAMPING = 1e-2
#: A run resumed from a state_dict against the uninterrupted one: the same operations on the same
#: values, so only the roundoff of re-deriving the saved state (no relative part).
RESUMED = {"rtol": 0.0, "atol": 1e-12}


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    loss = per_sample_loss("mse", model(x), y).mean()  # type: ignore[arg-type]
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("method", list(Method))
def test_direction_matches_dense_solve(method: Method) -> None:
    """One step moves W by -lr (F̂ + π-damping)⁻¹∇W with F̂ the method's approximation (dense solve)."""
    model = small_mlp()
    x, y = regression_batch(32)
    opt = KroneckerOptimizer(model, "mse", method=method, lr=0.1, damping=1e-2, tol=1e-8)
    _backward(model, x, y)
    before = {n: layer_gradient(m, "data").clone() for n, m in opt.layers.items()}
    grads = {n: layer_gradient(m).clone() for n, m in opt.layers.items()}
    opt.step(inputs=x)
    for name, module in opt.layers.items():
        k = opt.approximation(name)
        out, in_ = pi_damping(k.outs[0], k.ins[0], 1e-2)
        dense = torch.kron(out, in_) + sum(torch.kron(o, i) for o, i in zip(k.outs[1:], k.ins[1:], strict=True))
        expected = torch.linalg.solve(dense, grads[name].flatten()).reshape(grads[name].shape)
        torch.testing.assert_close(before[name] - layer_gradient(module, "data"), 0.1 * expected, **SOLVE64)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_lowers_the_loss(name: str) -> None:
    """Twenty full-batch steps lower the training loss of a small regression MLP."""
    model = small_mlp((4, 8, 3))
    x, y = regression_batch(32, 1)
    lr = {"sgd": 0.05, "adam": 0.01}.get(name, 0.2)
    opt = make_optimizer(
        name, model, "mse", lr=lr, **({} if name in ("sgd", "adam") else {"damping": 1e-1, "max_iter": 5000})
    )
    first = _backward(model, x, y)
    for _ in range(20):
        _backward(model, x, y)
        opt.step(**({} if name in ("sgd", "adam") else {"inputs": x}))
    assert _backward(model, x, y) < 0.8 * first


@pytest.mark.parametrize("name", ["deflation", "kfac2l_residuals", "kfac2l_tko"])
def test_state_dict_resume_matches_uninterrupted(name: str) -> None:
    """Stop after 3 of 6 steps, save model and optimizer, restore into fresh objects: same parameters."""
    x, y = regression_batch(32, 2)

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for k in steps:
            xb = x[(k % 2) * 16 : (k % 2) * 16 + 16]
            _backward(model, xb, y[(k % 2) * 16 : (k % 2) * 16 + 16])
            opt.step(inputs=xb)

    kw = {"lr": 0.1, "damping": 1e-2, "t1": 2, "t2": 2, "kl_clip": 1.0}
    model_a = small_mlp((4, 6, 3))
    model_b = copy.deepcopy(model_a)
    opt_a = make_optimizer(name, model_a, "mse", **kw)
    run(model_a, opt_a, range(6))
    opt_b = make_optimizer(name, model_b, "mse", **kw)
    run(model_b, opt_b, range(3))
    saved_model, saved_opt = copy.deepcopy(model_b.state_dict()), copy.deepcopy(opt_b.state_dict())
    model_c = small_mlp((4, 6, 3), seed=99)
    model_c.load_state_dict(saved_model)
    opt_c = make_optimizer(name, model_c, "mse", **kw)
    opt_c.load_state_dict(saved_opt)
    run(model_c, opt_c, range(3, 6))
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(pa, pc, **RESUMED)


def test_kl_clipping_bounds_the_step() -> None:
    """With KL clipping c, Σ|⟨ν ζ, ∇⟩| ≤ c (K App. E): a tiny c shrinks the step."""
    x, y = regression_batch(32, 3)
    moves = []
    for clip in (None, 1e-8):
        model = small_mlp()
        opt = KroneckerOptimizer(model, "mse", lr=1.0, damping=1e-2, kl_clip=clip)
        _backward(model, x, y)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(inputs=x)
        moves.append(sum(float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before, strict=True)))
    assert moves[1] < 1e-2 * moves[0]


def test_bad_use_is_reported() -> None:
    """Missing inputs at a refresh, unknown names and bad hyper-parameters give clear errors."""
    model = small_mlp()
    x, y = regression_batch(32)
    opt = KroneckerOptimizer(model, "mse")
    _backward(model, x, y)
    with pytest.raises(FisherlabError, match="step\\(inputs=x\\)"):
        opt.step()
    with pytest.raises(FisherlabError, match="unknown optimizer"):
        make_optimizer("shampoo", model, "mse")
    with pytest.raises(FisherlabError, match="damping > 0"):
        KroneckerOptimizer(model, "mse", damping=0)
    with pytest.raises(ValueError, match="coarse"):
        KroneckerOptimizer(model, "mse", two_level="coarsest")


def test_embeddings_and_layer_norms_take_sgd_steps() -> None:
    """Embeddings (a block over the batch's tokens only) and layer norms (no Kronecker structure) are not
    preconditioned: the optimizer probes the Linear layers and moves the others by plain SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    tokens, y = torch.randint(0, 7, (8, 2)), torch.randn(8, 2, 3, dtype=torch.float64)
    opt = KroneckerOptimizer(model, "mse", lr=0.1)
    assert list(opt.layers) == ["2"]
    before = model[1].weight.detach().clone()
    _backward(model, tokens, y)
    expected = before - 0.1 * model[1].weight.grad
    opt.step(inputs=tokens)
    torch.testing.assert_close(model[1].weight.detach(), expected)
    with pytest.raises(FisherlabError, match="no Linear, Conv2d or Conv1D layer"):
        KroneckerOptimizer(nn.Sequential(nn.Embedding(7, 4)), "mse")


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
        return pi_damped_dense(*kfac, damping)
    if method == Method.KPSVD:
        return pi_damped_dense(*first, damping)
    if method in (Method.DEFLATION, Method.LANCZOS):
        second = _factor_pair(u[:, 1], vt[1], s[1], d_out, d_in)
        return pi_damped_dense(*first, damping) + torch.kron(*second)
    resid = rearrange(f - torch.kron(*kfac), d_out, d_in)  # KFAC-corrected: best corrector of F - KFAC
    u2, s2, vt2 = torch.linalg.svd(resid)
    return pi_damped_dense(*kfac, damping) + torch.kron(*_factor_pair(u2[:, 0], vt2[0], s2[0], d_out, d_in))


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
    x, y = regression_batch(24)
    psg = per_sample_gradients(model, "mse", x, y, {"0": model[0], "2": model[2]})
    inputs = _inputs(model, x)
    step = _first_step(model, x, y, method=method)
    for (name, grads), a in zip(psg.items(), inputs, strict=True):
        expected = torch.linalg.solve(_dense_preconditioner(method, grads, a, DAMPING), grads.mean(0).flatten())
        torch.testing.assert_close(step[name].flatten(), expected, **scaled(ITERATIVE, float(expected.abs().max())))


@pytest.mark.parametrize("space", ["nicolaides", "residuals"])
def test_two_level_optimizer_step_matches_dense_twin(space: str) -> None:
    """Two-level step = ζ_KFAC + R₀ᵀβ*, β* = (R₀F•R₀ᵀ)⁻¹R₀ r_KFAC (T eq. 3.9-3.11), all dense."""
    model = small_mlp()
    x, y = regression_batch(24, 1)
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
    torch.testing.assert_close(got, expected, **scaled(COARSE64, float(expected.abs().max())))
