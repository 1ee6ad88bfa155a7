"""The normal form of one layer's per-sample Fisher factors.

Every supported layer (``nn.Linear``, ``nn.Conv2d``) is brought to the same *weight-sharing
format* (as in curvlinops' ``kfac_math``):

* ``a`` of shape ``[N, T, d_in]``: the layer input of each of the ``N`` samples at each of
  the ``T`` weight-sharing positions (``T = 1`` for ``nn.Linear``; the number of output
  pixels for ``nn.Conv2d``, whose input patches are unfolded with the layer's stride,
  padding and dilation). When the layer has a bias a column of ones is appended, so
  ``d_in = in_features + 1`` (Linear) or ``C_in * kh * kw + 1`` (Conv2d).
* ``g`` of shape ``[N, V, T, d_out]``: the derivative of the loss with respect to the
  pre-activation (layer output), for ``V`` output directions per sample: ``V`` Monte-Carlo
  label draws (already divided by ``sqrt(V)``), the ``C`` columns of the square root of the
  output Fisher (``FisherKind.EXACT``), or the one true label (``FisherKind.EMPIRICAL``).

Sample ``n`` and direction ``v`` give the weight gradient ``DW_nv = sum_t g_nvt a_nt^T`` of
shape ``[d_out, d_in]``, the layout of ``torch.cat([W, b[:, None]], 1)``. Flattened row-major
(as ``W.flatten()`` does) it is ``sum_t g_nvt ⊗ a_nt``, and the exact Fisher block is

    F = (1/N) sum_{n, v} vec(DW_nv) vec(DW_nv)^T,       acting on ``W.flatten()``.

This is the paper's ``F_ii = E[ā ā^T ⊗ g g^T]`` (K §2.1) with the Kronecker order swapped,
because the paper stacks columns and torch stores rows: every Kronecker product in fisherlab
is written ``out ⊗ in_`` with ``out`` of size ``d_out`` and ``in_`` of size ``d_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError, check_same_device_dtype
from fisherlab.distributed import Shard

__all__ = [
    "LayerFactors",
    "conv_patches",
    "layer_input_factors",
    "layer_matrix",
    "layer_output_factors",
    "probeable_layers",
    "subtract_from_layer",
    "weight_gradient",
    "weight_matrix",
]


@dataclass(frozen=True)
class LayerFactors:
    """Per-sample factors ``a [N, T, d_in]`` and ``g [N, V, T, d_out]`` of one layer.

    Args:
        a: Layer inputs, bias column included when the layer has a bias.
        g: Pre-activation derivatives, scaled so that ``F = (1/N) sum vec(DW) vec(DW)^T``.
        shard: When the batch is spread over processes, which rows of the global batch these
            are (:mod:`fisherlab.distributed`); ``N`` is then the global batch size.

    Raises:
        FisherlabError: On inconsistent shapes, dtypes or devices.
    """

    a: Tensor
    g: Tensor
    shard: Shard | None = None

    def __post_init__(self) -> None:
        if self.a.ndim != 3 or self.g.ndim != 4:
            raise FisherlabError(
                f"expected a of shape [N, T, d_in] and g of shape [N, V, T, d_out], got "
                f"{tuple(self.a.shape)} and {tuple(self.g.shape)}"
            )
        n, t, _ = self.a.shape
        if n == 0 or self.g.shape[1] == 0:
            raise FisherlabError(
                "factors need at least one sample and one direction, "
                f"got a {tuple(self.a.shape)}, g {tuple(self.g.shape)}"
            )
        if self.g.shape[0] != n or self.g.shape[2] != t:
            raise FisherlabError(f"a {tuple(self.a.shape)} and g {tuple(self.g.shape)} disagree in N or T")
        check_same_device_dtype(a=self.a, g=self.g)

    @classmethod
    def from_linear(cls, a: Tensor, g: Tensor, *, bias: bool = True) -> LayerFactors:
        """Build factors of a fully connected layer from ``a [N, d_in]`` and ``g [N, d_out]``.

        ``g`` may also be ``[N, V, d_out]`` (``V`` directions per sample). With ``bias``
        a column of ones is appended to ``a``.
        """
        if a.ndim != 2 or g.ndim not in (2, 3):
            raise FisherlabError("from_linear expects a [N, d_in] and g [N, d_out] or [N, V, d_out]")
        if bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        g = g[:, None] if g.ndim == 2 else g
        return cls(a[:, None, :], g[:, :, None, :])

    @property
    def n_samples(self) -> int:
        """``N``, the number of samples the Fisher averages over (the global batch when sharded)."""
        return self.a.shape[0] if self.shard is None else self.shard.n_total

    @property
    def n_local(self) -> int:
        """Samples held here (``N`` unless the batch is sharded over processes)."""
        return self.a.shape[0]

    @property
    def n_directions(self) -> int:
        """``V``, output directions per sample (MC draws or output-Fisher columns)."""
        return self.g.shape[1]

    @property
    def n_positions(self) -> int:
        """``T``, weight-sharing positions (1 for Linear layers)."""
        return self.a.shape[1]

    @property
    def d_in(self) -> int:
        """Input dimension, bias column included."""
        return self.a.shape[2]

    @property
    def d_out(self) -> int:
        """Output dimension (number of output units or channels)."""
        return self.g.shape[3]

    @property
    def dim(self) -> int:
        """``d_out * d_in``, the side of the Fisher block."""
        return self.d_in * self.d_out

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LayerFactors:
        """Return the factors cast to ``dtype`` and/or moved to ``device``."""
        return LayerFactors(self.a.to(device=device, dtype=dtype), self.g.to(device=device, dtype=dtype), self.shard)

    def per_sample_gradients(self) -> Tensor:
        """Weight gradients ``DW_nv = sum_t g_nvt a_nt^T`` of shape ``[N, V, d_out, d_in]``.

        Dense in ``d_out * d_in`` per sample: for small layers, tests and notebooks.
        """
        return torch.einsum("nvto,nti->nvoi", self.g, self.a)


def probeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All ``nn.Linear`` and ``nn.Conv2d`` modules of ``model`` by module path, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfold the input of ``conv`` into patches ``[N, T, C_in * kh * kw]``.

    Uses the layer's kernel size, stride, padding and dilation, so that
    ``conv(x)[n, :, t] = W.flatten(1) @ patches[n, t] + b`` at every output pixel ``t``.

    Raises:
        FisherlabError: For grouped convolutions or non-zero padding modes.
    """
    if conv.groups != 1:
        raise FisherlabError(f"Conv2d with groups={conv.groups} is not supported (groups=1 only)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        if isinstance(conv.padding, str) and conv.padding == "valid":
            padding: tuple[int, ...] | int = 0
        else:
            raise FisherlabError("Conv2d with string padding or non-zero padding_mode is not supported")
    else:
        padding = conv.padding  # type: ignore[assignment]
    cols = nnf.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2)


def layer_input_factors(module: nn.Module, x: Tensor) -> Tensor:
    """The bias-augmented input ``a [N, T, d_in]`` of a Linear or Conv2d layer."""
    if isinstance(module, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    elif isinstance(module, nn.Conv2d):
        a = conv_patches(module, x)
    else:
        raise FisherlabError(f"cannot probe {type(module).__name__}: only nn.Linear and nn.Conv2d")
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def layer_output_factors(module: nn.Module, grad_output: Tensor) -> Tensor:
    """Bring ``dL/d(output)`` of a Linear or Conv2d layer to the form ``[N, T, d_out]``."""
    if isinstance(module, nn.Conv2d):
        return grad_output.flatten(2).transpose(1, 2)
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


def weight_gradient(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_{n,t} g_nt a_ntᵀ``: the ``[d_out, d_in]`` gradient of ``a [N, T, d_in]`` and ``g [N, T, d_out]``."""
    return torch.einsum("nto,nti->oi", g, a)


def weight_matrix(weight: Tensor, bias: Tensor | None, *, batch_dims: int = 0) -> Tensor:
    """The ``[..., d_out, d_in]`` layout of fisherlab: ``weight`` flattened per output row, bias as last column.

    ``batch_dims`` leading dims are kept (1 for per-sample gradients ``[N, *weight.shape]``).
    """
    w = weight.flatten(batch_dims + 1)
    return w if bias is None else torch.cat([w, bias[..., None]], dim=-1)


def layer_matrix(module: nn.Module, attr: str = "data") -> Tensor:
    """A Linear/Conv2d layer's parameters (``attr="data"``) or gradients (``"grad"``) as ``[d_out, d_in]``."""
    weight = module.weight.detach() if attr == "data" else getattr(module.weight, attr)
    bias = None if module.bias is None else (module.bias.detach() if attr == "data" else getattr(module.bias, attr))
    return weight_matrix(weight, bias)


def subtract_from_layer(module: nn.Module, delta: Tensor) -> None:
    """``W -= delta`` for a ``[d_out, d_in]`` update in the layout of :func:`weight_matrix`."""
    n_w = module.weight[0].numel()
    module.weight.sub_(delta[:, :n_w].reshape(module.weight.shape))
    if module.bias is not None:
        module.bias.sub_(delta[:, n_w])
