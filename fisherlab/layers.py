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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError, check_finite, check_same_device_dtype
from fisherlab.distributed import Shard

__all__ = [
    "LayerFactors",
    "conv_patches",
    "layer_input_factors",
    "layer_inputs",
    "layer_matrix",
    "layer_output_factors",
    "layer_outputs",
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
        compute_dtype: The dtype every sum over the factors runs in (``None``: their own).
            The probe stores the factors in the precision the model computed them in (a
            lossless copy, half the memory of float64) and sets this to the accumulation
            precision; :class:`fisherlab.fisher.ExactBlock` casts to it once.
        moment_dtype: The dtype KFAC's second moments ``A``, ``G`` are summed in (``None``:
            ``compute_dtype``). The ``mixed`` accumulation sets the model's precision: the
            metrics stay in float64 and these two sums run twice as fast.
        name: The layer's name, used in error messages.

    Raises:
        FisherlabError: On inconsistent shapes, dtypes or devices, or NaN/inf values.
    """

    a: Tensor
    g: Tensor
    shard: Shard | None = None
    compute_dtype: torch.dtype | None = None
    moment_dtype: torch.dtype | None = None
    name: str = ""

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
        layer = f"layer {self.name!r}" if self.name else "LayerFactors"
        check_finite(f"the per-sample inputs a of {layer}", self.a)
        check_finite(f"the per-sample output derivatives g of {layer}", self.g)

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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype sums over the factors run in (``compute_dtype``, else the stored one)."""
        return self.compute_dtype or self.a.dtype

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LayerFactors:
        """Return the factors cast to ``dtype`` (stored and computed in it) and/or moved to ``device``."""
        return LayerFactors(
            self.a.to(device=device, dtype=dtype),
            self.g.to(device=device, dtype=dtype),
            self.shard,
            None if dtype is not None else self.compute_dtype,
            self.moment_dtype,
            self.name,
        )

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
    return layer_inputs(module, [x], x.dtype)


def _unaugmented_input(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        return conv_patches(module, x)
    raise FisherlabError(f"cannot probe {type(module).__name__}: only nn.Linear and nn.Conv2d")


def layer_inputs(module: nn.Module, xs: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The bias-augmented inputs ``a [N, T, d_in]`` of every call ``xs`` of ``module`` in ``dtype``.

    The calls are concatenated along ``T`` (weight sharing); the result is written in one
    pass into a fresh tensor (no intermediate copies of the cast, the bias column or the calls).
    """
    parts = [_unaugmented_input(module, x) for x in xs]
    n, d = parts[0].shape[0], parts[0].shape[-1]
    bias = module.bias is not None
    a = parts[0].new_empty((n, sum(p.shape[1] for p in parts), d + bias), dtype=dtype)
    start = 0
    for p in parts:
        a[:, start : start + p.shape[1], :d].copy_(p)
        start += p.shape[1]
    if bias:
        a[..., d] = 1
    return a


def layer_output_factors(module: nn.Module, grad_output: Tensor) -> Tensor:
    """Bring ``dL/d(output)`` of a Linear or Conv2d layer to the form ``[N, T, d_out]`` (a view)."""
    if isinstance(module, nn.Conv2d):
        return grad_output.flatten(2).transpose(1, 2)
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


def layer_outputs(module: nn.Module, grads: Sequence[Sequence[Tensor]], dtype: torch.dtype) -> Tensor:
    """``g [N, V, T, d_out]`` in ``dtype`` from ``grads[v][c]``, ``dL/d(output)`` of call ``c`` for direction ``v``.

    Calls are concatenated along ``T``; one pass into a fresh tensor, as :func:`layer_inputs`.
    """
    views = [[layer_output_factors(module, gr) for gr in calls] for calls in grads]
    first = views[0][0]
    g = first.new_empty((first.shape[0], len(views), sum(v.shape[1] for v in views[0]), first.shape[-1]), dtype=dtype)
    for k, calls in enumerate(views):
        start = 0
        for v in calls:
            g[:, k, start : start + v.shape[1]].copy_(v)
            start += v.shape[1]
    return g


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
