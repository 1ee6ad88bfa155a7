"""Losses: negative log-likelihoods on the network output and the Fisher's output directions.

For a loss ``L = -log p(y | z)`` on the network output ``z`` the Fisher of the parameters is
``E_x E_{y~p(y|z)} [∇L ∇Lᵀ]``. Every Fisher kind (:class:`FisherKind`) is a choice of output
directions ``d`` whose backpropagation gives ``g = dL/ds`` at each layer:

* ``mc`` — ``V`` targets drawn from the model's predictive distribution per input, each
  direction ``dL(y_v)/dz / sqrt(V)``: the papers' "exact FIM" (K §4, Martens & Grosse 2015);
* ``exact`` — the expectation over targets in closed form: the ``C`` columns of a square
  root ``S`` of the output Fisher, ``S Sᵀ = E_y[∇_z L ∇_z Lᵀ]``;
* ``empirical`` — the true targets (the empirical Fisher, Kunstner et al. 2019).

Language models (:class:`LossKind` ``causal_lm``, Hugging Face's conventions): logits
``z [N, T, C]``, labels ``y [N, T]``; logit position ``t`` predicts label ``t + 1`` (HF's shift,
``z[:, :-1]`` against ``y[:, 1:]``), labels :data:`IGNORE_INDEX` (``-100``) carry no loss, and the
per-sample loss is the sum of the token losses of the sequence, so ``N`` counts sequences
(README: the relation to HF's mean over tokens). Every direction is exactly zero at the logits of
unsupervised labels and at the last position; Monte Carlo targets are drawn at supervised labels
only, each from the model's prediction given the true prefix (teacher forcing), independently per
position, so the per-sequence Fisher is the sum of the per-token ones. The ``exact`` kind
backpropagates the ``C`` columns of every position's output-Fisher root (``(T - 1) C``
directions; refused beyond :data:`MAX_EXACT_SEQUENCE_DIRECTIONS`). ``seq_cls`` is ``ce`` on one
categorical per sequence (logits ``[N, C]``, labels ``[N]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.vocabulary import FisherKind, LossKind

__all__ = [
    "IGNORE_INDEX",
    "MAX_EXACT_SEQUENCE_DIRECTIONS",
    "FisherKind",
    "LossKind",
    "as_enum",
    "causal_lm_supervision",
    "check_output_targets",
    "check_targets",
    "model_logits",
    "output_directions",
    "output_fisher_sqrt",
    "output_gradient",
    "per_sample_loss",
    "sample_targets",
]


AnyEnum = TypeVar("AnyEnum", bound=Enum)

#: The label that carries no loss (Hugging Face's and ``nn.CrossEntropyLoss``'s ``ignore_index``).
IGNORE_INDEX = -100

#: The most output directions the ``exact`` Fisher of a sequence loss backpropagates (one per
#: position and class: ``(T - 1) C`` for ``causal_lm``, ``T C`` for ``ce`` on ``[N, T, C]``); beyond
#: it the probe refuses (use ``mc``), since every direction is one backward pass through the model.
MAX_EXACT_SEQUENCE_DIRECTIONS = 4096

#: Losses whose targets are integer class labels.
_CLASS_LOSSES = ("ce", "causal_lm", "seq_cls")


def as_enum(kind: type[AnyEnum], value: object, what: str) -> AnyEnum:
    """``kind(value)``, or a :class:`FisherlabError` that lists the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(e.value) for e in kind)
        raise FisherlabError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def model_logits(output: Any) -> Tensor:
    """The network output ``z`` in a model's return value.

    A tensor itself; else its ``logits`` (a Hugging Face ``ModelOutput`` or a mapping with a
    ``"logits"`` key); else the first element of a tuple or list (HF's ``return_dict=False``,
    whose first element is the logits when no ``labels`` were passed to the model).

    Raises:
        FisherlabError: When none of these holds a tensor.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise FisherlabError(
            f"cannot find the logits in the model's output ({type(output).__name__}): return a tensor, "
            "an object with .logits, or a tuple whose first element is the logits"
        )
    return logits


def per_sample_loss(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative log-likelihood ``[N]`` (summed over output units).

    ``causal_lm``: ``Σ_t CE(z[n, t], y[n, t + 1])`` over the labels that are not
    :data:`IGNORE_INDEX`, the sum of the sequence's token losses (HF's shift, without HF's
    division by the number of supervised tokens of the batch). ``seq_cls``: ``CE(z[n], y[n])``.
    """
    if loss == LossKind.CAUSAL_LM:
        n, t, c = z.shape
        tokens = nnf.cross_entropy(
            z[:, :-1].reshape(-1, c), y[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return tokens.reshape(n, t - 1).sum(1)
    if loss == LossKind.MSE:
        return 0.5 * ((z - y) ** 2).flatten(1).sum(1)
    if loss == LossKind.BCE:
        return nnf.binary_cross_entropy_with_logits(z, y, reduction="none").flatten(1).sum(1)
    if z.ndim > 2:  # [N, T, C] sequences: classes on the last dim, losses summed over positions
        return nnf.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").reshape(y.shape).flatten(1).sum(1)
    return nnf.cross_entropy(z, y, reduction="none")


def output_gradient(loss: LossKind, z: Tensor, y: Tensor) -> Tensor:
    """``dL/dz`` per sample, in closed form.

    ``causal_lm``: ``softmax(z[:, t]) - onehot(y[:, t + 1])`` where that label is supervised, exactly
    zero at the other positions and at the last one.
    """
    if loss == LossKind.MSE:
        return z - y
    if loss == LossKind.BCE:
        return torch.sigmoid(z) - y
    if loss == LossKind.CAUSAL_LM:
        target = y[:, 1:]
        keep = (target != IGNORE_INDEX)[..., None]
        grad = torch.zeros_like(z)
        grad[:, :-1] = torch.where(keep, _softmax_minus_onehot(z[:, :-1], target.clamp(min=0)), 0)
        return grad
    return _softmax_minus_onehot(z, y)


def _softmax_minus_onehot(z: Tensor, y: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1) - nnf.one_hot(y, z.shape[-1]).to(z.dtype)


def causal_lm_supervision(z: Tensor, labels: Tensor | None, attention_mask: Tensor | None) -> Tensor:
    """Which labels of a ``causal_lm`` batch carry a loss: ``[N, T]`` bool, in the labels' positions.

    Label ``t`` counts when ``t >= 1`` (the first token has no prediction), it is not
    :data:`IGNORE_INDEX` (when ``labels`` are given), and both ``t`` and the position ``t - 1`` that
    predicts it lie inside ``attention_mask`` (when given). The last rule makes a left-padded
    sequence count the predictions an unpadded one has: Hugging Face's loss on left-padded labels
    that are ``-100`` only at the pads would also count the first real token, predicted from a pad.

    Args:
        z: The logits ``[N, T, C]``.
        labels: ``[N, T]`` integer labels, or ``None`` (every position counts).
        attention_mask: ``[N, T]``, nonzero inside the sequence, or ``None``.

    Raises:
        FisherlabError: When the logits are not ``[N, T, C]`` or the labels or mask do not match them.
    """
    if z.ndim != 3:
        raise FisherlabError(f"loss 'causal_lm' needs logits of shape [N, T, C], got {list(z.shape)}")
    counted = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    counted[:, 0] = False
    if labels is not None:
        counted &= labels != IGNORE_INDEX
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(z.shape[:2]):
            raise FisherlabError(
                f"attention_mask of shape {list(attention_mask.shape)} does not match the logits {list(z.shape)}: "
                "expected [N, T]"
            )
        inside = attention_mask.to(device=z.device) != 0
        counted[:, 1:] &= inside[:, 1:] & inside[:, :-1]
    return counted


def sample_targets(
    loss: LossKind,
    z: Tensor,
    generator: torch.Generator,
    *,
    n_total: int | None = None,
    start: int = 0,
    supervised: Tensor | None = None,
) -> Tensor:
    """Draw ``y ~ p(y | z)`` with ``generator`` (never the global RNG).

    The random numbers are drawn for a global batch of ``n_total`` samples (default: this one)
    and rows ``start, start + 1, …`` are used, so that the target of sample ``n`` does not depend
    on how a batch is split over processes (:mod:`fisherlab.distributed`): inverse-CDF sampling
    from uniforms for ``ce``, ``seq_cls``, ``causal_lm`` and ``bce``, Gaussian noise for ``mse``.

    ``causal_lm``: labels ``[N, T]``, label ``t`` drawn from ``softmax(z[:, t - 1])`` where
    ``supervised`` (``[N, T]`` bool, :func:`causal_lm_supervision`; default every ``t >= 1``), else
    :data:`IGNORE_INDEX`. One uniform is drawn per position whether supervised or not, so a
    position's draw does not depend on the mask.
    """
    if loss == LossKind.CAUSAL_LM:
        if supervised is None:
            supervised = causal_lm_supervision(z, None, None)
        u = torch.rand((n_total or z.shape[0], z.shape[1]), generator=generator, device=z.device, dtype=z.dtype)
        drawn = _inverse_cdf(z[:, :-1], u[start : start + z.shape[0], 1:])
        y = torch.full(z.shape[:2], IGNORE_INDEX, dtype=torch.long, device=z.device)
        y[:, 1:] = drawn
        return y.masked_fill(~supervised, IGNORE_INDEX)
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
    return _inverse_cdf(z, u)


def _inverse_cdf(z: Tensor, u: Tensor) -> Tensor:
    """The class ``c`` with ``cdf(c - 1) <= u < cdf(c)`` of ``softmax(z)`` over the last dim."""
    cdf = torch.cumsum(torch.softmax(z, dim=-1), dim=-1)
    return torch.searchsorted(cdf.contiguous(), u[..., None].contiguous()).squeeze(-1).clamp(max=z.shape[-1] - 1)


def output_fisher_sqrt(loss: LossKind, z: Tensor) -> Tensor:
    """``S [N, out, C]`` with ``S Sᵀ`` the output Fisher ``E_y[∇_z L ∇_z Lᵀ]``.

    mse: ``I``; bce: ``diag(sqrt(p(1-p)))``; ce and seq_cls: ``diag(√p) - p √pᵀ``. Sequence
    logits (``ce`` on ``[N, T, C]``, ``causal_lm``) have one such root per position: see
    :func:`output_directions`.

    Raises:
        FisherlabError: For sequence logits.
    """
    flat = z.flatten(1)
    if loss == LossKind.CAUSAL_LM or (loss == LossKind.CE and z.ndim > 2):
        raise FisherlabError(
            f"output_fisher_sqrt takes one categorical per sample; loss {loss.value!r} on logits {list(z.shape)} "
            "has one per position (output_directions builds its exact directions position by position)"
        )
    eye = torch.eye(flat.shape[1], dtype=z.dtype, device=z.device)
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
    supervised: Tensor | None = None,
) -> list[Tensor]:
    """Output-space vectors ``[N, *out]`` to backpropagate, one per direction ``v``.

    ``Σ_v d_v d_vᵀ`` is, per sample, ``∇L ∇Lᵀ`` for the true target (empirical), an
    ``mc_samples``-draw estimate of its expectation (mc), or the expectation itself (exact).
    ``n_total`` and ``start`` place this batch in a global one (see :func:`sample_targets`).

    For ``causal_lm`` ``supervised`` (``[N, T]`` bool, :func:`causal_lm_supervision`) says which
    labels carry a loss (default: those of ``y`` that are not :data:`IGNORE_INDEX`, every
    ``t >= 1`` without ``y``); every direction is exactly zero at the logits that predict no
    such label and at the last position. Exact, sequence logits: ``C`` directions per position
    ``t`` (the columns of that position's ``diag(√p_t) - p_t √p_tᵀ``, zero elsewhere), since the
    output Fisher of independent positions is block diagonal.

    Raises:
        FisherlabError: No ``y`` for the empirical Fisher; more exact directions than
            :data:`MAX_EXACT_SEQUENCE_DIRECTIONS`.
    """
    zd = z.detach()
    if loss == LossKind.CAUSAL_LM and supervised is None:
        supervised = causal_lm_supervision(zd, y, None)
    if fisher == FisherKind.EMPIRICAL:
        if y is None:
            raise FisherlabError("the empirical Fisher needs the true targets y")
        if supervised is not None:
            y = y.masked_fill(~supervised, IGNORE_INDEX)
        return [output_gradient(loss, zd, y)]
    if fisher == FisherKind.MC:
        scale = mc_samples**-0.5
        draws = (
            sample_targets(loss, zd, generator, n_total=n_total, start=start, supervised=supervised)
            for _ in range(mc_samples)
        )
        return [scale * output_gradient(loss, zd, y_v) for y_v in draws]
    if supervised is not None:  # causal_lm: logit t carries the loss of label t + 1
        return _sequence_directions(loss, zd[:, :-1], supervised[:, 1:], pad=1)
    if loss == LossKind.CE and zd.ndim > 2:
        return _sequence_directions(loss, zd, torch.ones(zd.shape[:-1], dtype=torch.bool, device=zd.device), pad=0)
    root = output_fisher_sqrt(loss, zd)
    return [root[:, :, c].reshape(zd.shape) for c in range(root.shape[2])]


def _sequence_directions(loss: LossKind, z: Tensor, counted: Tensor, *, pad: int) -> list[Tensor]:
    """The exact directions of sequence logits ``z [N, T, C]``: for each position ``t`` and class ``c``,
    column ``c`` of ``diag(√p_t) - p_t √p_tᵀ`` at position ``t`` where ``counted``, zero elsewhere;
    ``pad`` zero positions appended (the last logit of ``causal_lm``)."""
    n, t, c = z.shape
    if t * c > MAX_EXACT_SEQUENCE_DIRECTIONS:
        raise FisherlabError(
            f"the exact Fisher of loss {loss.value!r} needs one backward pass per position and class: "
            f"{t} x {c} = {t * c} > {MAX_EXACT_SEQUENCE_DIRECTIONS} (fisherlab.losses.MAX_EXACT_SEQUENCE_DIRECTIONS); "
            "use the mc Fisher (--fisher mc) or empirical"
        )
    p = torch.softmax(z, dim=-1)
    root = torch.sqrt(p)
    blocks = (torch.diag_embed(root) - p[..., :, None] * root[..., None, :]) * counted[..., None, None]
    directions = []
    for position in range(t):
        for column in range(c):
            d = z.new_zeros((n, t + pad, c))
            d[:, position] = blocks[:, position, :, column]
            directions.append(d)
    return directions


def check_targets(loss: LossKind, x: Tensor, y: Tensor | None) -> None:
    """Refuse an empty batch or targets that do not fit ``loss``, saying what was expected.

    ``x`` is the batch's leading tensor (the inputs, or a dict batch's ``input_ids``).
    """
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
    shapes = {"ce": "[N] (or [N, T])", "causal_lm": "[N, T]", "seq_cls": "[N]"}
    if loss.value in _CLASS_LOSSES and (y.dtype.is_floating_point or y.dtype == torch.bool):
        raise FisherlabError(
            f"loss {loss.value!r} needs integer class targets of shape {shapes[loss.value]}, "
            f"got {y.dtype} {tuple(y.shape)}"
        )
    if loss.value not in _CLASS_LOSSES and not y.dtype.is_floating_point:
        raise FisherlabError(f"loss {loss.value!r} needs floating-point targets shaped like the output, got {y.dtype}")


def check_output_targets(loss: LossKind, z: Tensor, y: Tensor | None) -> None:
    """Refuse an output or targets that do not fit ``loss`` (after the forward pass).

    ``causal_lm`` needs logits ``[N, T, C]`` and labels ``[N, T]`` in ``0..C-1`` or
    :data:`IGNORE_INDEX`; ``seq_cls`` logits ``[N, C]`` and labels ``[N]``; ``y=None`` checks the
    output alone.
    """
    if loss == LossKind.CAUSAL_LM and z.ndim != 3:
        raise FisherlabError(f"loss 'causal_lm' needs logits of shape [N, T, C], got {list(z.shape)}")
    if loss == LossKind.SEQ_CLS and z.ndim != 2:
        raise FisherlabError(
            f"loss 'seq_cls' needs logits of shape [N, C] (one class per sequence), got {list(z.shape)}; "
            "per-token logits [N, T, C] are loss 'causal_lm' or 'ce'"
        )
    if y is None:
        return
    classes = loss.value in _CLASS_LOSSES
    expected = tuple(z.shape[:-1]) if classes else tuple(z.shape)
    if tuple(y.shape) != expected:
        kind = "integer class targets" if classes else "targets"
        raise FisherlabError(
            f"loss {loss.value!r} needs {kind} of shape {list(expected)} for output {list(z.shape)}, "
            f"got {list(y.shape)}"
        )
    if classes and y.numel():
        c = z.shape[-1]
        labels = y[y != IGNORE_INDEX] if loss == LossKind.CAUSAL_LM else y
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
        if low < 0 or high >= c:
            bad = low if low < 0 else high
            ignored = f" or {IGNORE_INDEX} (no loss)" if loss == LossKind.CAUSAL_LM else ""
            raise FisherlabError(
                f"loss {loss.value!r} got class label {bad}, but the output has {c} classes: "
                f"labels must lie in 0..{c - 1}{ignored}"
            )
    if loss == LossKind.BCE and y.numel():
        lowest, highest = float(y.min()), float(y.max())
        if not (0.0 <= lowest and highest <= 1.0):  # NaN fails too
            outside = lowest if not 0.0 <= lowest else highest
            raise FisherlabError(f"loss 'bce' needs targets in [0, 1], got {outside}")
