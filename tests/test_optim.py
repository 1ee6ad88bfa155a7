"""The methods as optimizers: the preconditioned direction equals a dense (F̂ + damping)⁻¹∇
computed by brute force; every optimizer lowers the loss; state_dict resume reproduces an
uninterrupted run; KL clipping bounds the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisherlab._errors import FisherlabError
from fisherlab.approximations import Method
from fisherlab.kron import pi_damping
from fisherlab.losses import per_sample_loss
from fisherlab.optim import OPTIMIZER_NAMES, KroneckerOptimizer, layer_gradient, make_optimizer
from tests.cases import small_mlp


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    return x, torch.tanh(x[:, :3] * 2)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    loss = per_sample_loss("mse", model(x), y).mean()  # type: ignore[arg-type]
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("method", list(Method))
def test_direction_matches_dense_solve(method: Method) -> None:
    """One step moves W by -lr (F̂ + π-damping)⁻¹∇W with F̂ the method's approximation (dense solve)."""
    model = small_mlp()
    x, y = _data()
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
        torch.testing.assert_close(before[name] - layer_gradient(module, "data"), 0.1 * expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_lowers_the_loss(name: str) -> None:
    """Twenty full-batch steps lower the training loss of a small regression MLP."""
    model = small_mlp((4, 8, 3))
    x, y = _data(1)
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
    x, y = _data(2)

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
        torch.testing.assert_close(pa, pc, rtol=0, atol=1e-12)


def test_kl_clipping_bounds_the_step() -> None:
    """With KL clipping c, Σ|⟨ν ζ, ∇⟩| ≤ c (K App. E): a tiny c shrinks the step."""
    x, y = _data(3)
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
    x, y = _data()
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
