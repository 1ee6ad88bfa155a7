"""The approximations as optimizers (K §2.2, §3.4, §4.2, App. E; T §3.4, Algorithm 1).

:class:`KroneckerOptimizer` is a ``torch.optim.Optimizer``: after ``loss.backward()`` call
``opt.step(inputs=x)``. Every ``t1`` steps (every step for two-level, whose coarse correction
uses the current batch's Fisher, T Alg. 1) it runs a probe pass on ``x`` (targets sampled
from the model, K §4) and refreshes the per-layer approximation as an exponential moving
average of its Kronecker factors with ``ρ = min(1 - 1/k, α)`` (K §2.2); every ``t2`` steps
it refactorises the π-damped approximation. The step is

    ζ_i = (F̂_i + π-damping)⁻¹ (∇W_i + wd W_i)       (K eq. 2, §3.4 for rank 2)
    ζ ← ζ + R₀ᵀβ*                                    (two-level, T eq. 3.9-3.11), optional
    W_i ← W_i - lr ν ζ_i,  ν = min(1, sqrt(c / Σ_i |⟨ζ_i, ∇W_i⟩|))   (KL clipping, K App. E)

Parameters outside the preconditioned Linear/Conv2d/Conv1D layers (batch norm, embeddings, layer
norms: :func:`~fisherlab.layers.kronecker_layers`) take a plain SGD step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab._errors import FisherlabError
from fisherlab.approximations import ApproxConfig, approximate_all, kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSolver, KronSum
from fisherlab.layers import kronecker_layers, layer_matrix, layer_parameters, subtract_from_layer
from fisherlab.losses import LossKind
from fisherlab.operators import BlockDiagonal, solve_all
from fisherlab.probe import Probe, ProbeSnapshot
from fisherlab.twolevel import coarse_step, prolong
from fisherlab.vocabulary import OPTIMIZER_NAMES, TKO, CoarseSpace, Method

__all__ = ["OPTIMIZER_NAMES", "KroneckerOptimizer", "layer_gradient", "make_optimizer"]


def layer_gradient(module: nn.Module, attr: str = "grad") -> Tensor:
    """``[d_out, d_in]`` matrix of a Linear/Conv2d layer's gradient (or ``attr="data"``: weight), bias column last."""
    return layer_matrix(module, attr)


def _weight(module: nn.Module) -> Tensor:
    """A probed layer's weight parameter."""
    return layer_parameters(module)[0]


@dataclass(frozen=True)
class Schedule:
    """How the factors are refreshed and the steps clipped (K §2.2, App. E).

    Args:
        alpha: Cap of the moving-average weight ``ρ = min(1 − 1/k, alpha)``.
        t1: Refresh the factors every ``t1`` steps.
        t2: Refactorise the damped blocks every ``t2`` steps.
        kl_clip: KL clipping bound of the step (``None``: no clipping).
    """

    alpha: float
    t1: int
    t2: int
    kl_clip: float | None


class KroneckerOptimizer(torch.optim.Optimizer):
    """KFAC, KPSVD, deflation, Lanczos, KFAC-corrected, optionally two-level, as an optimizer.

    Args:
        model: The network; its Linear, Conv2d and Conv1D layers are preconditioned (embeddings, whose blocks
            keep the batch's tokens only, and layer norms, whose blocks have no Kronecker structure, take SGD steps).
        loss: The network's negative log-likelihood (for the probe's sampled targets).
        method: ``kfac``, ``kpsvd``, ``deflation``, ``lanczos`` or ``kfac_corrected``.
        lr: Learning rate.
        damping: λ of the π-damping (T eq. 2.30) and of ``F•`` for two-level.
        weight_decay: Coupled L2 coefficient added to the gradient.
        alpha: Cap of the moving-average coefficient ``ρ = min(1 - 1/k, α)`` (K: 0.95).
        t1: Refresh the factors every ``t1`` steps.
        t2: Refactorise the damped approximation every ``t2`` steps.
        kl_clip: ``c`` of KL clipping (K App. E); ``None`` disables it.
        two_level: A coarse space name for two-level KFAC (T §3), ``"tko"`` for
            Tselepidis-Kohler-Orvieto (additive, T eq. 3.18), or ``None``.
        fisher: Fisher kind of the probe (``mc`` as in the papers).
        seed: Seed of the probe's target sampling.
        tol: Power SVD / Lanczos tolerance.
        max_iter: Power SVD iteration cap (a warm start continues at the next refresh; a
            cap reached warns with ``ConvergenceWarning``).

    References:
        Koroko et al. (2022), K §2.2, §3, §4.2, App. E; Koroko et al. (T), §3.4 Algorithm 1.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossKind | str,
        *,
        method: Method | str = Method.KFAC,
        lr: float = 1e-2,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        alpha: float = 0.95,
        t1: int = 1,
        t2: int = 1,
        kl_clip: float | None = None,
        two_level: str | None = None,
        fisher: str = "mc",
        seed: int = 0,
        tol: float = ApproxConfig.tol,
        max_iter: int = ApproxConfig.max_iter,
    ) -> None:
        if lr <= 0 or damping <= 0 or t1 < 1 or t2 < 1 or not 0 <= alpha < 1 or weight_decay < 0:
            raise FisherlabError("need lr > 0, damping > 0, t1 >= 1, t2 >= 1, 0 <= alpha < 1, weight_decay >= 0")
        if kl_clip is not None and kl_clip <= 0:
            raise FisherlabError(f"kl_clip must be positive, got {kl_clip}")
        self.method = Method(method)
        if two_level is not None and two_level != TKO:
            CoarseSpace(two_level)  # validates the name
        self.two_level = two_level
        layers = kronecker_layers(model)
        if not layers:
            raise FisherlabError("KroneckerOptimizer: the model has no Linear, Conv2d or Conv1D layer to precondition")
        self.probe = Probe(model, loss, layers=layers, fisher=fisher, seed=seed)
        self.layers = self.probe.layers
        self.approx_config = ApproxConfig(tol=tol, max_iter=max_iter)
        self.hyper = Schedule(alpha, t1, t2, kl_clip)
        layer_params = {id(p) for m in self.layers.values() for p in m.parameters(recurse=False)}
        other = [p for p in model.parameters() if id(p) not in layer_params and p.requires_grad]
        params: list[Tensor] = [_weight(m) for m in self.layers.values()]
        params += [b for m in self.layers.values() if (b := layer_parameters(m)[1]) is not None]
        groups: list[dict[str, Any]] = [{"params": params, "kind": "preconditioned"}]
        if other:
            groups.append({"params": other, "kind": "sgd"})
        super().__init__(groups, {"lr": lr, "damping": damping, "weight_decay": weight_decay})
        self._solvers: list[KronSolver] = []
        self._snapshot: ProbeSnapshot | None = None

    # -- state kept in self.state[weight] so that state_dict round-trips -------------------
    def _layer_state(self, name: str) -> dict[str, Any]:
        return self.state[_weight(self.layers[name])]

    @property
    def steps(self) -> int:
        """Number of steps taken."""
        first = self._layer_state(next(iter(self.layers)))
        return int(first.get("step", 0))

    def approximation(self, name: str) -> KronSum | None:
        """The current (moving-average) approximation of a layer's Fisher block."""
        st = self._layer_state(name)
        if "outs" not in st:
            return None
        return KronSum(tuple(st["outs"]), tuple(st["ins"]))

    def block_diagonal(self) -> BlockDiagonal:
        """The current approximation of the whole Fisher: one block per preconditioned layer."""
        blocks = [self.approximation(n) for n in self.layers]
        if any(b is None for b in blocks):
            raise FisherlabError("no approximation yet: step() has not refreshed the factors")
        return BlockDiagonal(tuple(blocks))  # type: ignore[arg-type]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore factors, warm starts, step counts and the probe's generator."""
        super().load_state_dict(state_dict)
        self._solvers = []
        first = self._layer_state(next(iter(self.layers)))
        if "probe_rng" in first:  # load_state_dict casts it to the parameters' dtype; set_rng_state casts back
            self.probe.set_rng_state(first["probe_rng"], _weight(self.layers[next(iter(self.layers))]).device)

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, *, inputs: Tensor | None = None, targets: Tensor | None = None
    ) -> float | None:
        """One preconditioned step; ``inputs`` (the batch) is needed when factors refresh.

        ``targets`` are needed only with ``fisher="empirical"`` (the MC Fisher samples its own).

        Raises:
            FisherlabError: Missing ``inputs`` at a refresh, or missing gradients.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.steps
        group = self.param_groups[0]
        lr, damping, wd = group["lr"], group["damping"], group["weight_decay"]
        refresh = k % self.hyper.t1 == 0
        if refresh or self.two_level is not None:  # two-level: F• of the current batch (T Alg. 1)
            if inputs is None:
                raise FisherlabError("step(inputs=x) is needed: the optimizer probes the Fisher on this batch")
            with torch.enable_grad():
                self._snapshot = self.probe(inputs, targets)
        if refresh:
            assert self._snapshot is not None
            self._refresh(self._snapshot)
        grads: dict[str, Tensor] = {}
        for name, module in self.layers.items():
            if _weight(module).grad is None:
                raise FisherlabError(f"layer {name!r} has no gradient; call loss.backward() before step()")
            g = layer_gradient(module)
            grads[name] = g + wd * layer_gradient(module, "data") if wd else g
        if k % self.hyper.t2 == 0 or not self._solvers:
            self._solvers = self.block_diagonal().solvers(damping=damping)
        dt = self.approximation(next(iter(self.layers))).outs[0].dtype  # type: ignore[union-attr]
        zeta = dict(zip(self.layers, solve_all(self._solvers, [grads[n].to(dt) for n in self.layers]), strict=True))
        if self.two_level is not None:
            zeta = self._coarse_correction(zeta, grads, damping)
        nu = 1.0
        if self.hyper.kl_clip is not None:
            inner = sum(float(torch.sum(zeta[n] * grads[n].to(dt)).abs()) for n in self.layers)
            nu = min(1.0, (self.hyper.kl_clip / inner) ** 0.5) if inner > 0 else 1.0
        for name, module in self.layers.items():
            subtract_from_layer(module, (lr * nu) * zeta[name].to(_weight(module).dtype))
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * (p.grad + group["weight_decay"] * p))
        for name in self.layers:
            self._layer_state(name)["step"] = k + 1
        rng = self.probe.rng_state()
        if rng is not None:
            self._layer_state(next(iter(self.layers)))["probe_rng"] = rng
        return loss

    def _refresh(self, snap: ProbeSnapshot) -> None:
        """Update the moving averages of the approximation factors from a probe pass."""
        for name in self.layers:
            st = self._layer_state(name)
            block = ExactBlock(snap.factors[name])
            warm = {self.method.value: tuple(st["warm"])} if "warm" in st else None
            # on the whole layer: the moving averages and the state_dict keep whole-layer factors and warm starts
            built = approximate_all(block, [self.method], self.approx_config, warm=warm, layer=name, restrict=False)
            new = built[self.method.value]
            refreshes = int(st.get("refreshes", 0)) + 1
            rho = min(1.0 - 1.0 / refreshes, self.hyper.alpha)
            if "outs" in st and len(st["outs"]) == new.kron.rank:
                st["outs"] = [rho * o + (1 - rho) * n for o, n in zip(st["outs"], new.kron.outs, strict=True)]
                st["ins"] = [rho * i + (1 - rho) * n for i, n in zip(st["ins"], new.kron.ins, strict=True)]
            else:
                st["outs"], st["ins"] = list(new.kron.outs), list(new.kron.ins)
            st["warm"] = list(new.warm_start)
            st["refreshes"] = refreshes

    def _coarse_correction(
        self, zeta: dict[str, Tensor], grads: dict[str, Tensor], damping: float
    ) -> dict[str, Tensor]:
        """``ζ + R₀ᵀβ``: β* (T eq. 3.11) or β_TKO (eq. 4.7b with F_coarse of eq. 3.18)."""
        assert self._snapshot is not None and self.two_level is not None
        names = list(self.layers)
        fisher = self._snapshot.whole_fisher(names)
        dt = self._snapshot.factors[names[0]].dtype
        g = [grads[n].to(dt) for n in names]
        zk = [zeta[n].to(dt) for n in names]
        kfacs = [kfac_factors(b).to(dt) for b in fisher.blocks]
        residual = (
            g
            if self.two_level == TKO
            else [gi - fi for gi, fi in zip(g, fisher.matvec(zk, damping=damping), strict=True)]
        )
        basis, beta = coarse_step(self.two_level, fisher, kfacs, g, residual, damping=damping)
        corr = prolong(basis, beta)
        return {n: zeta[n] + c.to(zeta[n].dtype) for n, c in zip(names, corr, strict=True)}


def make_optimizer(name: str, model: nn.Module, loss: LossKind | str, **kwargs: Any) -> torch.optim.Optimizer:
    """Build an optimizer by name: ``sgd`` (momentum 0.9), ``adam``, a method name, or
    ``kfac2l_<coarse space>`` / ``kfac2l_tko`` for two-level KFAC.

    Default learning rates: SGD 1e-2, Adam 1e-3, Kronecker methods 1.0 with KL clipping
    (which then bounds the step) and 1e-2 without.

    Raises:
        FisherlabError: Unknown name.
    """
    lr = kwargs.pop("lr", None)
    wd = kwargs.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr or 1e-2, momentum=0.9, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr or 1e-3, weight_decay=wd)
    lr = lr or (1.0 if kwargs.get("kl_clip") else 1e-2)  # KL clipping bounds the step (K App. E)
    if name.startswith("kfac2l_"):
        return KroneckerOptimizer(model, loss, method="kfac", lr=lr, two_level=name.removeprefix("kfac2l_"), **kwargs)
    if name in {m.value for m in Method}:
        return KroneckerOptimizer(model, loss, method=name, lr=lr, **kwargs)
    raise FisherlabError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZER_NAMES)}")
