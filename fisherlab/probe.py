"""The probe: one extra forward/backward pass that captures per-sample Fisher factors.

Forward hooks on the chosen ``nn.Linear``/``nn.Conv2d`` modules record each layer's input
(unfolded and bias-augmented, :mod:`fisherlab.layers`) and keep its output ``s``; the
derivatives ``g = dL/ds`` then come from ``torch.autograd.grad`` with respect to those
outputs, one backward per output direction. Parameters' ``.grad`` are never touched, the
sampling uses the probe's own ``torch.Generator``, and buffers (batch-norm running
statistics) are restored afterwards, so a probe pass leaves training undisturbed.

Fisher kinds (:class:`FisherKind`), for a loss ``-log p(y | z)`` on the network output ``z``:

* ``mc`` — ``V`` targets drawn from the model's predictive distribution per input, each
  direction ``dL(y_v)/dz / sqrt(V)``: the papers' "exact FIM" (K §4, Martens & Grosse 2015);
* ``exact`` — the expectation over targets in closed form: the ``C`` columns of a square
  root ``S`` of the output Fisher, ``S S^T = E_y[∇_z L ∇_z L^T]``;
* ``empirical`` — the true targets (the empirical Fisher, Kunstner et al. 2019).

A module called several times in one forward pass (shared weights, e.g. a Linear layer
applied twice) contributes every call: the calls' inputs and output derivatives are
concatenated along the weight-sharing axis ``T``, so ``DW_n = sum over calls and positions``
is the true per-sample gradient (tested against ``torch.func``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError, check_finite
from fisherlab.fisher import ExactBlock
from fisherlab.layers import LayerFactors, layer_input_factors, layer_output_factors

__all__ = ["FisherKind", "LossKind", "Probe", "ProbeSnapshot", "per_sample_loss", "probeable_layers"]


class FisherKind(str, Enum):
    """How the output directions ``g`` are chosen (see the module docstring)."""

    MC = "mc"
    EXACT = "exact"
    EMPIRICAL = "empirical"


class LossKind(str, Enum):
    """Negative log-likelihoods on the network output ``z`` (logits for bce and ce).

    ``mse``: Gaussian with unit variance, ``L = ½||y - z||²``; ``bce``: independent
    Bernoulli with ``p = sigmoid(z)`` (a sigmoid output layer with binary cross entropy);
    ``ce``: categorical with ``p = softmax(z)``, integer targets.
    """

    MSE = "mse"
    BCE = "bce"
    CE = "ce"


def per_sample_loss(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative log-likelihood ``[N]`` (summed over output units)."""
    if loss == LossKind.MSE:
        return 0.5 * ((z - y) ** 2).flatten(1).sum(1)
    if loss == LossKind.BCE:
        return nnf.binary_cross_entropy_with_logits(z, y, reduction="none").flatten(1).sum(1)
    return nnf.cross_entropy(z, y, reduction="none")


def _output_gradient(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """``dL/dz`` per sample, in closed form."""
    if loss == LossKind.MSE:
        return z - y
    if loss == LossKind.BCE:
        return torch.sigmoid(z) - y
    return torch.softmax(z, dim=-1) - nnf.one_hot(y, z.shape[-1]).to(z.dtype)


def _sample_targets(loss: LossKind, z: Tensor, generator: torch.Generator) -> Tensor:
    """Draw ``y ~ p(y | z)`` with the probe's generator."""
    if loss == LossKind.MSE:
        return z + torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    if loss == LossKind.BCE:
        return torch.bernoulli(torch.sigmoid(z), generator=generator)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]


def _output_fisher_sqrt(loss: LossKind, z: Tensor) -> Tensor:
    """``S [N, out, C]`` with ``S S^T`` the output Fisher ``E_y[∇_z L ∇_z L^T]``.

    mse: ``I``; bce: ``diag(sqrt(p(1-p)))``; ce: ``diag(√p) - p √p^T``.
    """
    flat = z.flatten(1)
    eye = torch.eye(flat.shape[1], dtype=z.dtype, device=z.device)
    if loss == LossKind.MSE:
        return eye.expand(flat.shape[0], -1, -1)
    if loss == LossKind.BCE:
        p = torch.sigmoid(flat)
        return torch.diag_embed(torch.sqrt(p * (1 - p)))
    p = torch.softmax(flat, dim=-1)
    root = torch.sqrt(p)
    return torch.diag_embed(root) - p[:, :, None] * root[:, None, :]


def probeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All ``nn.Linear`` and ``nn.Conv2d`` modules of ``model`` by module path, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


@dataclass(frozen=True)
class ProbeSnapshot:
    """What one probe pass captured.

    Args:
        factors: Per-layer factors (``LayerFactors``) in the accumulation dtype.
        loss: Mean true-target loss of the batch.
        gradients: Per-layer mini-batch gradient ``∇_W h`` with the true targets, shaped
            ``[d_out, d_in]`` (bias column last).
        fisher: The Fisher kind used.
    """

    factors: dict[str, LayerFactors]
    loss: float
    gradients: dict[str, Tensor]
    fisher: FisherKind
    skipped: tuple[str, ...] = field(default=())

    def blocks(self) -> dict[str, ExactBlock]:
        """The exact Fisher block of every probed layer."""
        return {name: ExactBlock(f) for name, f in self.factors.items()}


class Probe:
    """Capture per-sample Fisher factors of chosen layers of any model.

    Args:
        model: Any ``nn.Module`` whose output ``z`` feeds ``loss``.
        loss: The negative log-likelihood (``LossKind`` or its string value).
        layers: Module paths to probe, or a ``{name: module}`` mapping; ``None`` means every
            Linear and Conv2d layer.
        fisher: The Fisher kind (``FisherKind`` or its string value).
        mc_samples: ``V``, target draws per input for ``mc``.
        seed: Seed of the probe's own generator (MC targets).
        accumulate_dtype: Dtype of the returned factors (float64 by default).

    Raises:
        FisherlabError: Unknown layer names, unsupported layer types, bad options.

    Example:
        >>> probe = Probe(model, "bce", layers=["4"], fisher="mc")  # doctest: +SKIP
        >>> snap = probe(x, y); block = snap.blocks()["4"]          # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossKind | str,
        *,
        layers: Iterable[str] | dict[str, nn.Module] | None = None,
        fisher: FisherKind | str = FisherKind.MC,
        mc_samples: int = 1,
        seed: int = 0,
        accumulate_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.model = model
        self.loss = _enum(LossKind, loss, "loss")
        self.fisher = _enum(FisherKind, fisher, "Fisher type")
        if mc_samples < 1:
            raise FisherlabError(f"mc_samples must be at least 1, got {mc_samples}")
        self.mc_samples = mc_samples
        self.accumulate_dtype = accumulate_dtype
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.layers = _select_layers(model, layers)

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, x: Tensor, y: Tensor | None) -> ProbeSnapshot:
        """Run one probe pass on the batch ``(x, y)``.

        ``y`` (true targets) gives the batch loss and gradient ``∇h``; it may be ``None`` for
        ``mc`` and ``exact`` Fisher kinds (then ``loss`` is NaN and ``gradients`` empty).

        Raises:
            FisherlabError: NaN/inf in the output, loss or captured factors; ``y`` missing
                for the empirical Fisher.
        """
        if y is None and self.fisher == FisherKind.EMPIRICAL:
            raise FisherlabError("the empirical Fisher needs the true targets y")
        self._check_batch(x, y)
        inputs: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        outputs: dict[str, list[Tensor]] = {n: [] for n in self.layers}

        def hook(name: str) -> object:
            def fn(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
                # a module called several times per forward shares its weight across the calls:
                # every call adds positions, as conv positions do (weight-sharing format)
                inputs[name].append(layer_input_factors(module, args[0].detach()))
                outputs[name].append(out)

            return fn

        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]  # type: ignore[arg-type]
        try:
            with torch.enable_grad():
                z = self.model(x)
                check_finite("model output", z)
                missing = [n for n in self.layers if not outputs[n]]
                if missing:
                    raise FisherlabError(f"layers {missing} were not called in the forward pass")
                names = list(self.layers)
                outs = [o for n in names for o in outputs[n]]
                if y is not None:
                    losses = per_sample_loss(self.loss, z, y)
                    check_finite("loss", losses)
                    true_g = torch.autograd.grad(losses.sum(), outs, retain_graph=True)
                directions = self._directions(z, y)
                gs: list[list[Tensor]] = [[] for _ in outs]  # per call, per direction
                for k, d in enumerate(directions):
                    grads = torch.autograd.grad(z, outs, grad_outputs=d, retain_graph=k < len(directions) - 1)
                    for i, gr in enumerate(grads):
                        gs[i].append(gr)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for k, b in self.model.named_buffers():
                    b.copy_(buffers[k])
        dt = self.accumulate_dtype
        n = x.shape[0]
        factors: dict[str, LayerFactors] = {}
        gradients: dict[str, Tensor] = {}
        first = 0  # index of the layer's first call among ``outs``
        for name in names:
            module, calls = self.layers[name], range(first, first + len(outputs[name]))
            first += len(calls)
            a = torch.cat(inputs[name], dim=1).to(dt)
            g = torch.stack([_positions(module, [gs[c][k] for c in calls]) for k in range(len(directions))], dim=1).to(dt)
            check_finite(f"pre-activation derivatives of layer {name!r}", g)
            check_finite(f"activations of layer {name!r}", a)
            factors[name] = LayerFactors(a, g)
            if y is not None:
                g_true = _positions(module, [true_g[c] for c in calls]).to(dt)
                gradients[name] = torch.einsum("nto,nti->oi", g_true, a) / n
        loss = float(losses.detach().mean()) if y is not None else float("nan")
        return ProbeSnapshot(factors, loss, gradients, self.fisher)

    def _check_batch(self, x: Tensor, y: Tensor | None) -> None:
        """Refuse an empty batch or targets that do not fit the loss, with what was expected."""
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] == 0:
            raise FisherlabError(f"the probe needs a batch x of shape [N, ...] with N >= 1, got {getattr(x, 'shape', type(x).__name__)}")
        if y is None:
            return
        if not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise FisherlabError(f"targets y must be a tensor with one row per sample ({x.shape[0]}), got {getattr(y, 'shape', type(y).__name__)}")
        if self.loss == LossKind.CE and (y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1):
            raise FisherlabError(f"loss 'ce' needs integer class targets of shape [N], got {y.dtype} {tuple(y.shape)}")
        if self.loss != LossKind.CE and not y.dtype.is_floating_point:
            raise FisherlabError(f"loss {self.loss.value!r} needs floating-point targets shaped like the output, got {y.dtype}")

    def _directions(self, z: Tensor, y: Tensor | None) -> list[Tensor]:
        """Output-space vectors to backpropagate, ``[N, *out]`` each (see ``FisherKind``)."""
        zd = z.detach()
        if self.fisher == FisherKind.EMPIRICAL:
            assert y is not None
            return [_output_gradient(self.loss, zd, y)]
        if self.fisher == FisherKind.MC:
            gen = self._gen(zd.device)
            scale = self.mc_samples**-0.5
            return [scale * _output_gradient(self.loss, zd, _sample_targets(self.loss, zd, gen)) for _ in range(self.mc_samples)]
        root = _output_fisher_sqrt(self.loss, zd)
        return [root[:, :, c].reshape(zd.shape) for c in range(root.shape[2])]


def _positions(module: nn.Module, grads: list[Tensor]) -> Tensor:
    """``dL/d(output)`` of every call of ``module`` as ``[N, T, d_out]``, calls concatenated along ``T``."""
    return torch.cat([layer_output_factors(module, gr.detach()) for gr in grads], dim=1)


def _enum(kind: type[Enum], value: object, what: str) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(e.value for e in kind)  # type: ignore[attr-defined]
        raise FisherlabError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def _select_layers(model: nn.Module, layers: Iterable[str] | dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    if isinstance(layers, dict):
        chosen = dict(layers)
    else:
        modules = dict(model.named_modules())
        if layers is None:
            chosen = probeable_layers(model)
        else:
            chosen = {}
            for name in layers:
                if name not in modules:
                    known = ", ".join(probeable_layers(model)) or "none"
                    raise FisherlabError(f"unknown layer {name!r}; probeable layers: {known}")
                chosen[name] = modules[name]
    for name, m in chosen.items():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            raise FisherlabError(f"layer {name!r} is a {type(m).__name__}; only nn.Linear and nn.Conv2d can be probed")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise FisherlabError(f"layer {name!r} is a grouped Conv2d (groups={m.groups}); only groups=1 is supported")
    if not chosen:
        raise FisherlabError("no nn.Linear or nn.Conv2d layer to probe")
    return chosen
