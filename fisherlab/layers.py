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

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError, check_finite, check_same_device_dtype
from fisherlab.distributed import Shard

__all__ = [
    "LAYER_KINDS",
    "CaptureHook",
    "LayerFactors",
    "LayerKind",
    "capture_calls",
    "conv_patches",
    "layer_inputs",
    "layer_kind",
    "layer_matrix",
    "layer_output_factors",
    "layer_outputs",
    "layer_parameters",
    "probeable_layers",
    "register_layer_kind",
    "subtract_from_layer",
    "unsupported_reason",
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


#: ``(module, args, output) -> output``: called at every use of a probed layer with its input
#: ``args[0]`` and its output (the tensor whose derivative is ``g``); returns the output to use on
#: (the signature of an ``nn.Module`` forward hook).
CaptureHook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]


@dataclass(frozen=True)
class LayerKind:
    """How one module type maps onto the normal form ``a [N, T, d_in]``, ``g [N, V, T, d_out]``.

    One adapter per module type; :data:`LAYER_KINDS` is walked by :func:`layer_kind` (exact type
    first, then subclasses), so a new layer type is one :func:`register_layer_kind` call.

    Args:
        name: Short name (``linear``, ``conv2d``).
        module_type: The ``nn.Module`` subclass it handles.
        inputs: ``(module, x) -> [N, T, d]``: the layer input of one call without the bias column.
        outputs: ``(module, dL/d(output)) -> [N, T, d_out]``: the output derivative of one call.
        to_rows: A tensor of the weight's shape (the weight, its gradient) in fisherlab's ``[d_out, d]``
            row layout (a view where possible; ``W.flatten(1)`` for Linear and Conv2d).
        from_rows: ``([d_out, d], weight shape) -> tensor of the weight's shape``, the inverse.
        unsupported: ``module -> reason``; empty when the module can be probed.
        parameters: The attribute names of the weight and the bias (a missing or ``None`` bias: none).
        capture: ``(module, hook) -> context manager`` under which ``hook`` (:data:`CaptureHook`) is
            called at every use of the layer; ``None``: a forward hook on the module (a layer whose
            projection is not a module call, such as ``nn.MultiheadAttention``'s, needs its own).
    """

    name: str
    module_type: type[nn.Module]
    inputs: Callable[[nn.Module, Tensor], Tensor]
    outputs: Callable[[nn.Module, Tensor], Tensor]
    to_rows: Callable[[Tensor], Tensor] = field(default=lambda w: w.flatten(1))
    from_rows: Callable[[Tensor, torch.Size], Tensor] = field(default=lambda rows, shape: rows.reshape(shape))
    unsupported: Callable[[nn.Module], str] = field(default=lambda m: "")
    parameters: tuple[str, str] = ("weight", "bias")
    capture: Callable[[nn.Module, CaptureHook], AbstractContextManager[object]] | None = None


#: Every registered layer kind, in registration order.
LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind, *, overwrite: bool = False) -> LayerKind:
    """Add ``kind`` to :data:`LAYER_KINDS`; its modules become probeable everywhere."""
    if kind.name in LAYER_KINDS and not overwrite:
        raise FisherlabError(f"layer kind {kind.name!r} is already registered")
    LAYER_KINDS[kind.name] = kind
    return kind


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module`` (its exact type first, then a base class), or ``None``."""
    kinds = list(LAYER_KINDS.values())
    exact = [k for k in kinds if type(module) is k.module_type]
    found = exact or [k for k in kinds if isinstance(module, k.module_type)]
    return found[0] if found else None


def _kind(module: nn.Module) -> LayerKind:
    kind = layer_kind(module)
    if kind is None:
        known = ", ".join(k.module_type.__name__ for k in LAYER_KINDS.values())
        raise FisherlabError(f"cannot probe {type(module).__name__}: the registered layer kinds are {known}")
    return kind


def probeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` of a registered layer kind (``nn.Linear``, ``nn.Conv2d``), by module path, in order."""
    return {name: m for name, m in model.named_modules() if layer_kind(m) is not None}


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be probed (empty when it can)."""
    kind = layer_kind(module)
    if kind is None:
        known = " and ".join(f"nn.{k.module_type.__name__}" for k in LAYER_KINDS.values())
        return f"a {type(module).__name__}; only {known} can be probed"
    return kind.unsupported(module)


def layer_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight and the bias (``None``: none) of a probeable layer, named by its kind's ``parameters``."""
    weight_name, bias_name = _kind(module).parameters
    return getattr(module, weight_name), getattr(module, bias_name, None)


@contextmanager
def _forward_hook(module: nn.Module, hook: CaptureHook) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def capture_calls(module: nn.Module, hook: CaptureHook) -> AbstractContextManager[object]:
    """A context under which ``hook`` sees every use of ``module``: its kind's ``capture``, else (also for
    a module of no registered kind) a forward hook."""
    kind = layer_kind(module)
    return kind.capture(module, hook) if kind is not None and kind.capture is not None else _forward_hook(module, hook)


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfold the input of ``conv`` into patches ``[N, T, C_in * kh * kw]``.

    Uses the layer's kernel size, stride, padding and dilation, so that
    ``conv(x)[n, :, t] = W.flatten(1) @ patches[n, t] + b`` at every output pixel ``t``.

    Raises:
        FisherlabError: For grouped convolutions or non-zero padding modes.
    """
    reason = _conv_unsupported(conv)
    if reason:
        raise FisherlabError(f"Conv2d {reason}")
    padding = 0 if isinstance(conv.padding, str) else conv.padding
    cols = nnf.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2)


def _conv_unsupported(conv: nn.Module) -> str:
    if conv.groups != 1:
        return f"with groups={conv.groups} is not supported (groups=1 only)"
    if conv.padding_mode != "zeros" or (isinstance(conv.padding, str) and conv.padding != "valid"):
        return "with string padding or non-zero padding_mode is not supported"
    return ""


register_layer_kind(
    LayerKind(
        "linear",
        nn.Linear,
        inputs=lambda m, x: x.reshape(x.shape[0], -1, x.shape[-1]),
        outputs=lambda m, g: g.reshape(g.shape[0], -1, g.shape[-1]),
    )
)
register_layer_kind(
    LayerKind(
        "conv2d",
        nn.Conv2d,
        inputs=lambda m, x: conv_patches(m, x),  # type: ignore[arg-type]
        outputs=lambda m, g: g.flatten(2).transpose(1, 2),
        unsupported=_conv_unsupported,
    )
)


def layer_inputs(
    module: nn.Module, xs: Sequence[Tensor], dtype: torch.dtype, *, position_mask: Tensor | None = None
) -> Tensor:
    """The bias-augmented inputs ``a [N, T, d_in]`` of every call ``xs`` of ``module`` in ``dtype``.

    The calls are concatenated along ``T`` (weight sharing); the result is written in one
    pass into a fresh tensor (no intermediate copies of the cast, the bias column or the calls).

    ``position_mask`` (``[N, T_seq]`` bool, a batch's ``attention_mask``): in every call with
    ``T_seq`` positions, the rows ``a[n, t]`` where it is ``False`` are zero, bias column included,
    so padding adds nothing to any factor (KFAC's ``A`` included). The per-sample gradients are
    unchanged as long as the model honours the mask (``g`` is zero there already). Calls with
    another number of positions are left as they are.
    """
    kind = _kind(module)
    parts = [kind.inputs(module, x) for x in xs]
    n, d = parts[0].shape[0], parts[0].shape[-1]
    bias = layer_parameters(module)[1] is not None
    if position_mask is not None and (
        position_mask.dtype != torch.bool or position_mask.ndim != 2 or len(position_mask) != n
    ):
        raise FisherlabError(
            f"position_mask must be [N={n}, T] bool, got {position_mask.dtype} {list(position_mask.shape)}"
        )
    a = parts[0].new_empty((n, sum(p.shape[1] for p in parts), d + bias), dtype=dtype)
    if bias:
        a[..., d] = 1
    start = 0
    for p in parts:
        a[:, start : start + p.shape[1], :d].copy_(p)
        if position_mask is not None and p.shape[1] == position_mask.shape[1]:
            a[:, start : start + p.shape[1]].masked_fill_(~position_mask[..., None], 0)
        start += p.shape[1]
    return a


def layer_output_factors(module: nn.Module, grad_output: Tensor) -> Tensor:
    """Bring ``dL/d(output)`` of a probeable layer to the form ``[N, T, d_out]`` (a view)."""
    return _kind(module).outputs(module, grad_output)


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
    """A probeable layer's parameters (``attr="data"``) or gradients (``"grad"``) as ``[d_out, d_in]``."""
    kind = _kind(module)
    weight, bias = layer_parameters(module)
    if attr == "data":
        return weight_matrix(kind.to_rows(weight.detach()), None if bias is None else bias.detach())
    return weight_matrix(kind.to_rows(getattr(weight, attr)), None if bias is None else getattr(bias, attr))


def subtract_from_layer(module: nn.Module, delta: Tensor) -> None:
    """``W -= delta`` for a ``[d_out, d_in]`` update in the layout of :func:`weight_matrix`."""
    kind = _kind(module)
    weight, bias = layer_parameters(module)
    n_w = kind.to_rows(weight).shape[1]
    weight.sub_(kind.from_rows(delta[:, :n_w], weight.shape))
    if bias is not None:
        bias.sub_(delta[:, n_w])
