"""Losses: negative log-likelihoods on the network output and the Fisher's output directions.

For a loss ``L = -log p(y | z)`` on the network output ``z`` the Fisher of the parameters is
``E_x E_{y~p(y|z)} [∇L ∇Lᵀ]``. Every Fisher kind (:class:`FisherKind`) is a choice of output
directions ``d`` whose backpropagation gives ``g = dL/ds`` at each layer:

* ``mc`` — ``V`` targets drawn from the model's predictive distribution per input, each
  direction ``dL(y_v)/dz / sqrt(V)``: the papers' "exact FIM" (K §4, Martens & Grosse 2015);
* ``exact`` — the expectation over targets in closed form: the ``C`` columns of a square
  root ``S`` of the output Fisher, ``S Sᵀ = E_y[∇_z L ∇_z Lᵀ]``;
* ``empirical`` — the true targets (the empirical Fisher, Kunstner et al. 2019).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.vocabulary import FisherKind, LossKind

__all__ = [
    "FisherKind",
    "LossKind",
    "as_enum",
    "check_output_targets",
    "check_targets",
    "output_directions",
    "output_fisher_sqrt",
    "output_gradient",
    "per_sample_loss",
    "sample_targets",
]


AnyEnum = TypeVar("AnyEnum", bound=Enum)


def as_enum(kind: type[AnyEnum], value: object, what: str) -> AnyEnum:
    """``kind(value)``, or a :class:`FisherlabError` that lists the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(e.value) for e in kind)
        raise FisherlabError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def per_sample_loss(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative log-likelihood ``[N]`` (summed over output units)."""
    if loss == LossKind.MSE:
        return 0.5 * ((z - y) ** 2).flatten(1).sum(1)
    if loss == LossKind.BCE:
        return nnf.binary_cross_entropy_with_logits(z, y, reduction="none").flatten(1).sum(1)
    if z.ndim > 2:  # [N, T, C] sequences: classes on the last dim, losses summed over positions
        return nnf.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").reshape(y.shape).flatten(1).sum(1)
    return nnf.cross_entropy(z, y, reduction="none")


def output_gradient(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """``dL/dz`` per sample, in closed form."""
    if loss == LossKind.MSE:
        return z - y
    if loss == LossKind.BCE:
        return torch.sigmoid(z) - y
    return torch.softmax(z, dim=-1) - nnf.one_hot(y, z.shape[-1]).to(z.dtype)


def sample_targets(
    loss: LossKind, z: Tensor, generator: torch.Generator, *, n_total: int | None = None, start: int = 0
) -> Tensor:
    """Draw ``y ~ p(y | z)`` with ``generator`` (never the global RNG).

    The random numbers are drawn for a global batch of ``n_total`` samples (default: this one)
    and rows ``start, start + 1, …`` are used, so that the target of sample ``n`` does not depend
    on how a batch is split over processes (:mod:`fisherlab.distributed`): inverse-CDF sampling
    from uniforms for ``ce`` and ``bce``, Gaussian noise for ``mse``.
    """
    n = z.shape[0]
    total = n if n_total is None else n_total
    rows = slice(start, start + n)
    if loss == LossKind.MSE:
        noise = torch.randn((total, *z.shape[1:]), generator=generator, device=z.device, dtype=z.dtype)[rows]
        return z + noise
    if loss == LossKind.BCE:
        u = torch.rand((total, *z.shape[1:]), generator=generator, device=z.device, dtype=z.dtype)[rows]
        return (u < torch.sigmoid(z)).to(z.dtype)
    u = torch.rand((total, *z.shape[1:-1]), generator=generator, device=z.device, dtype=z.dtype)[rows]
    cdf = torch.cumsum(torch.softmax(z, dim=-1), dim=-1)
    return torch.searchsorted(cdf, u[..., None].contiguous()).squeeze(-1).clamp(max=z.shape[-1] - 1)


def output_fisher_sqrt(loss: LossKind, z: Tensor) -> Tensor:
    """``S [N, out, C]`` with ``S Sᵀ`` the output Fisher ``E_y[∇_z L ∇_z Lᵀ]``.

    mse: ``I``; bce: ``diag(sqrt(p(1-p)))``; ce: ``diag(√p) - p √pᵀ``.
    """
    flat = z.flatten(1)
    eye = torch.eye(flat.shape[1], dtype=z.dtype, device=z.device)
    if loss == LossKind.CE and z.ndim > 2:
        raise FisherlabError(
            "the exact Fisher of a sequence model's ce loss is not supported; use --fisher mc or empirical"
        )
    if loss == LossKind.MSE:
        return eye.expand(flat.shape[0], -1, -1)
    if loss == LossKind.BCE:
        p = torch.sigmoid(flat)
        return torch.diag_embed(torch.sqrt(p * (1 - p)))
    p = torch.softmax(flat, dim=-1)
    root = torch.sqrt(p)
    return torch.diag_embed(root) - p[:, :, None] * root[:, None, :]


def output_directions(
    loss: LossKind,
    fisher: FisherKind,
    z: Tensor,
    y: Tensor | None,
    *,
    generator: torch.Generator,
    mc_samples: int = 1,
    n_total: int | None = None,
    start: int = 0,
) -> list[Tensor]:
    """Output-space vectors ``[N, *out]`` to backpropagate, one per direction ``v``.

    ``Σ_v d_v d_vᵀ`` is, per sample, ``∇L ∇Lᵀ`` for the true target (empirical), an
    ``mc_samples``-draw estimate of its expectation (mc), or the expectation itself (exact).
    ``n_total`` and ``start`` place this batch in a global one (see :func:`sample_targets`).
    """
    zd = z.detach()
    if fisher == FisherKind.EMPIRICAL:
        if y is None:
            raise FisherlabError("the empirical Fisher needs the true targets y")
        return [output_gradient(loss, zd, y)]
    if fisher == FisherKind.MC:
        scale = mc_samples**-0.5
        draws = (sample_targets(loss, zd, generator, n_total=n_total, start=start) for _ in range(mc_samples))
        return [scale * output_gradient(loss, zd, y_v) for y_v in draws]
    root = output_fisher_sqrt(loss, zd)
    return [root[:, :, c].reshape(zd.shape) for c in range(root.shape[2])]


def check_targets(loss: LossKind, x: Tensor, y: Tensor | None) -> None:
    """Refuse an empty batch or targets that do not fit ``loss``, saying what was expected."""
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise FisherlabError(
            f"the probe needs a batch x of shape [N, ...] with N >= 1, got {getattr(x, 'shape', type(x).__name__)}"
        )
    if y is None:
        return
    if not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise FisherlabError(
            f"targets y must be a tensor with one row per sample ({x.shape[0]}), "
            f"got {getattr(y, 'shape', type(y).__name__)}"
        )
    if loss == LossKind.CE and (y.dtype.is_floating_point or y.dtype == torch.bool):
        raise FisherlabError(
            f"loss 'ce' needs integer class targets of shape [N] (or [N, T]), got {y.dtype} {tuple(y.shape)}"
        )
    if loss != LossKind.CE and not y.dtype.is_floating_point:
        raise FisherlabError(f"loss {loss.value!r} needs floating-point targets shaped like the output, got {y.dtype}")


def check_output_targets(loss: LossKind, z: Tensor, y: Tensor) -> None:
    """Refuse targets whose shape does not fit the output ``z`` (after the forward pass)."""
    expected = tuple(z.shape[:-1]) if loss == LossKind.CE else tuple(z.shape)
    if tuple(y.shape) != expected:
        kind = "integer class targets" if loss == LossKind.CE else "targets"
        raise FisherlabError(
            f"loss {loss.value!r} needs {kind} of shape {list(expected)} for output {list(z.shape)}, "
            f"got {list(y.shape)}"
        )
    if loss == LossKind.CE and y.numel():
        classes = z.shape[-1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise FisherlabError(
                f"loss 'ce' got class label {bad}, but the output has {classes} classes: "
                f"labels must lie in 0..{classes - 1}"
            )
    if loss == LossKind.BCE and y.numel():
        lowest, highest = float(y.min()), float(y.max())
        if not (0.0 <= lowest and highest <= 1.0):  # NaN fails too
            outside = lowest if not 0.0 <= lowest else highest
            raise FisherlabError(f"loss 'bce' needs targets in [0, 1], got {outside}")
