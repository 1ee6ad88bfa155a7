"""The adapters of the other parameterised layers: ``transformers``' ``Conv1D``, ``nn.Embedding``,
``nn.LayerNorm`` and RMSNorm (torch's and Hugging Face's), each one :func:`~fisherlab.layers.register_layer_kind`.

* ``conv1d`` — GPT-2's projections ``y = x W + b`` with ``W [d_in, d_out]``: a Linear layer whose
  weight is stored transposed; its block is in the usual ``[d_out, d_in]`` layout (``to_rows = Wᵀ``).
  Matched by qualified class name, so ``transformers`` is never imported by fisherlab.
* ``embedding`` — ``y = W[i]``, the Linear layer ``Wᵀ onehot(i)`` (``d_out`` = embedding dim): the
  inputs are kept as indices and ``a`` is a compact one-hot over the batch's distinct tokens
  (:mod:`fisherlab.layers`); a ``padding_idx`` gets no gradient, so its positions have no input.
  ``max_norm`` (renormalises the looked-up rows inside the forward pass) and ``scale_grad_by_freq``
  (a gradient that depends on the whole batch's token counts) are not supported.
* ``layernorm``, ``rmsnorm`` — ``y = x̂ ∘ w + b`` with ``x̂`` the normalised input:
  elementwise blocks (:class:`~fisherlab.vocabulary.BlockStructure`), per-sample gradient vectors
  ``[Σ_t g ∘ x̂ ; Σ_t g]``. ``x̂`` is recomputed after the pass from the captured input:
  ``F.layer_norm`` / ``F.rms_norm`` without affine parameters for torch's classes; for any other class
  whose name ends in ``RMSNorm`` (``LlamaRMSNorm``, ``GemmaRMSNorm``, ...) as the module's own output
  with the weight set to one minus that with the weight set to zero (bias zero): the derivative of
  an output affine in the weight, with the module's own dtype casts (Llama casts ``x̂`` to the input
  dtype before the product, Gemma multiplies by ``1 + w`` in float32), checked to be affine.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.layers import LayerKind, register_layer_kind
from fisherlab.vocabulary import BlockStructure

__all__ = ["CONV1D", "EMBEDDING", "LAYER_NORM", "RMS_NORM", "normalised_input"]


def _positions(x: Tensor) -> Tensor:
    """``[N, ..., d]`` as ``[N, T, d]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


CONV1D = register_layer_kind(
    LayerKind(
        "conv1d",
        "transformers.pytorch_utils.Conv1D",
        inputs=lambda m, x: _positions(x),
        outputs=lambda m, g: _positions(g),
        to_rows=lambda w: w.T,
        from_rows=lambda rows, shape: rows.T.reshape(shape),
    )
)


def _token_ids(embedding: nn.Module, x: Tensor) -> Tensor:
    """The indices ``[N, T]`` of one call, ``-1`` where the token is the padding index (no gradient)."""
    ids = x.reshape(x.shape[0], -1)
    padding = getattr(embedding, "padding_idx", None)
    return ids if padding is None else ids.masked_fill(ids == padding, -1)


def _embedding_unsupported(embedding: nn.Module) -> str:
    if getattr(embedding, "max_norm", None) is not None:
        return (
            f"an Embedding with max_norm={embedding.max_norm} is not supported (the forward pass renormalises the "
            "rows it looks up, in place)"
        )
    if getattr(embedding, "scale_grad_by_freq", False):
        return (
            "an Embedding with scale_grad_by_freq=True is not supported (its gradient depends on the token counts "
            "of the whole batch, so it has no per-sample gradient)"
        )
    return ""


EMBEDDING = register_layer_kind(
    LayerKind(
        "embedding",
        nn.Embedding,
        inputs=_token_ids,
        outputs=lambda m, g: _positions(g),
        to_rows=lambda w: w.T,
        from_rows=lambda rows, shape: rows.T.reshape(shape),
        unsupported=_embedding_unsupported,
        one_hot=lambda m: int(m.num_embeddings),  # type: ignore[arg-type]
    )
)


def _weight_numel(module: nn.Module) -> int:
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight.numel()


def _elementwise_unsupported(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return f"a {type(module).__name__} without a weight parameter has nothing to probe"
    return ""


def _affine_difference(module: nn.Module, x: Tensor) -> Tensor:
    """``f(x; w = 1) - f(x; w = 0)`` (bias 0): ``∂y/∂w`` of a module whose output is affine in its weight.

    Raises:
        FisherlabError: ``f(w = 2) - f(w = 1)`` differs from it beyond rounding: the output is not affine in the weight.
    """
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias = getattr(module, "bias", None)
    fixed = {"bias": torch.zeros_like(bias)} if isinstance(bias, Tensor) else {}

    def at(value: float) -> Tensor:
        return functional_call(module, {"weight": torch.full_like(weight, value), **fixed}, (x,))

    zero, one = at(0.0), at(1.0)
    hat = one - zero
    step = at(2.0) - one
    scale = max(float(hat.abs().amax()), float(zero.abs().amax())) if hat.numel() else 0.0
    # the module may compute in float32 whatever its input (Gemma: x.float()); 3 x̂ - 2 x̂ rounds there
    eps = max(torch.finfo(hat.dtype).eps, torch.finfo(torch.float32).eps)
    tolerance = 64 * eps * max(scale, 1e-300)
    if float((step - hat).abs().amax()) > tolerance:
        raise FisherlabError(
            f"{type(module).__name__}'s output is not affine in its weight (y(w=2) - y(w=1) != y(w=1) - y(w=0)): "
            "fisherlab's RMSNorm kind needs y = x̂ ∘ s(w) + b with s affine; register a layer kind of its own"
        )
    return hat


_TORCH_RMS_NORM: type[nn.Module] | None = getattr(nn, "RMSNorm", None)  # torch >= 2.4


def normalised_input(module: nn.Module, x: Tensor) -> Tensor:
    """``x̂ [N, T, D]`` of a LayerNorm or RMSNorm call on ``x``: the derivative of its output with respect to
    its weight, ``D`` the number of weights, ``T`` every position before the normalised dims."""
    d = _weight_numel(module)
    if isinstance(module, nn.LayerNorm):
        hat = nnf.layer_norm(x, module.normalized_shape, None, None, module.eps)
    elif _TORCH_RMS_NORM is not None and type(module) is _TORCH_RMS_NORM:
        hat = nnf.rms_norm(x, module.normalized_shape, None, module.eps)  # type: ignore[arg-type]
    else:
        hat = _affine_difference(module, x)
    if hat.numel() % (x.shape[0] * d):
        raise FisherlabError(
            f"{type(module).__name__}: the output {tuple(hat.shape)} does not end in the weight's {d} entries"
        )
    return hat.reshape(x.shape[0], -1, d)


def _elementwise_kind(name: str, module_type: type[nn.Module] | str) -> LayerKind:
    return LayerKind(
        name,
        module_type,
        inputs=normalised_input,
        outputs=lambda m, g: g.reshape(g.shape[0], -1, _weight_numel(m)),
        to_rows=lambda w: w.reshape(-1, 1),
        unsupported=_elementwise_unsupported,
        structure=BlockStructure.ELEMENTWISE,
    )


LAYER_NORM = register_layer_kind(_elementwise_kind("layernorm", nn.LayerNorm))
#: torch's ``nn.RMSNorm`` and every other class whose name ends in ``RMSNorm`` (Hugging Face's ``LlamaRMSNorm``,
#: ``GemmaRMSNorm``, ...).
RMS_NORM = register_layer_kind(_elementwise_kind("rmsnorm", "*RMSNorm"))
