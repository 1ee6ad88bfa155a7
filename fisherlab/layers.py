"""The normal form of one layer's per-sample Fisher factors, and the registry of layer kinds.

Every supported layer (``nn.Linear``, ``nn.Conv2d`` here; ``transformers``' ``Conv1D``,
``nn.Embedding``, ``nn.LayerNorm`` and RMSNorm in :mod:`fisherlab.layer_kinds`) is brought to the
same *weight-sharing format* (as in curvlinops' ``kfac_math``):

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

Two variations of the form, marked on the factors (:class:`LayerFactors`):

* **one-hot inputs kept as indices** (``nn.Embedding``, the Linear layer ``y = Wᵀ onehot(i)``): ``a``
  is a *compact* one-hot ``[N, T, k]`` over the ``k`` distinct indices of the batch, ``columns``
  says which (ascending). The block is the exact block restricted to those columns of
  ``[d_out, num_embeddings]``; it is exactly zero on every other column, so its norm, spectrum
  and every approximation's error are those of the whole block, at ``k ≤ N T`` instead of the
  vocabulary size. KFAC's input factor ``A`` is then ``diag(token counts) / N``.
* **elementwise blocks** (:class:`~fisherlab.vocabulary.BlockStructure` ``elementwise``: LayerNorm,
  RMSNorm, ``y = x̂ ∘ w + b``): the per-sample gradient is a vector
  ``u_nv = [Σ_t g_nvt ∘ x̂_nt ; Σ_t g_nvt]`` (weight, bias), written ``g = u [N, V, 1, P]`` with
  ``a = 1 [N, 1, 1]``, so ``DW_nv = u_nv`` is ``[P, 1]``, the layout of
  ``torch.cat([w.flatten(), b.flatten()])[:, None]``. Every product, the Gram matrix and the
  dense views are the machinery above; the Kronecker methods are not built on it (they would be
  trivially exact), only the methods that declare the structure.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError, check_finite, check_same_device_dtype
from fisherlab.distributed import Shard
from fisherlab.vocabulary import BlockStructure

__all__ = [
    "LAYER_KINDS",
    "CaptureHook",
    "LayerFactors",
    "LayerKind",
    "capture_calls",
    "conv_patches",
    "kind_label",
    "kronecker_layers",
    "layer_columns",
    "layer_inputs",
    "layer_kind",
    "layer_matrix",
    "layer_output_factors",
    "layer_outputs",
    "layer_parameters",
    "layer_structure",
    "parameter_matrix",
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
        structure: How ``DW`` is built (:class:`~fisherlab.vocabulary.BlockStructure`): ``kronecker``
            (``Σ_t g aᵀ``) or ``elementwise`` (``a = 1 [N, 1, 1]``, ``g`` the per-sample gradient vectors).
            The methods that apply are chosen by it (``MethodSpec.structures``).
        columns: For one-hot inputs kept as indices (``nn.Embedding``): the indices (token ids,
            ascending) of the ``d_in`` columns of ``a`` in the layer's whole ``[d_out, num_embeddings]``
            matrix; the block is zero on every other column. ``None``: ``a`` holds every column.

    Raises:
        FisherlabError: On inconsistent shapes, dtypes or devices, or NaN/inf values.
    """

    a: Tensor
    g: Tensor
    shard: Shard | None = None
    compute_dtype: torch.dtype | None = None
    moment_dtype: torch.dtype | None = None
    name: str = ""
    structure: BlockStructure = BlockStructure.KRONECKER
    columns: Tensor | None = None

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
        if self.structure is BlockStructure.ELEMENTWISE and self.a.shape[1:] != (1, 1):
            raise FisherlabError(
                f"the elementwise factors of {layer} need a = 1 of shape [N, 1, 1] and g [N, V, 1, P], "
                f"got a {tuple(self.a.shape)}"
            )
        if self.columns is not None and tuple(self.columns.shape) != (self.a.shape[2],):
            raise FisherlabError(
                f"{layer}: columns must list the {self.a.shape[2]} input columns of a, got shape "
                f"{tuple(self.columns.shape)}"
            )
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
            self.structure,
            None if self.columns is None else self.columns.to(device=device),
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

    One adapter per module type; :data:`LAYER_KINDS` is walked by :func:`layer_kind` (the module's own
    class first, then its bases), so a new layer type is one :func:`register_layer_kind` call.

    Args:
        name: Short name (``linear``, ``conv2d``).
        module_type: The ``nn.Module`` subclass it handles, or a pattern matched (``fnmatch``, case
            sensitive) against the qualified names ``module.Class`` of the module's class and its bases:
            ``"transformers.pytorch_utils.Conv1D"`` matches that class without importing ``transformers``,
            ``"*RMSNorm"`` every class whose name ends in ``RMSNorm``.
        inputs: ``(module, x) -> [N, T, d]``: the layer input of one call without the bias column. For
            one-hot kinds (``one_hot``) the indices ``[N, T]`` instead (negative: no input, e.g. a
            padding index); for ``elementwise`` kinds the derivative of the output with respect to the
            weight, ``x̂ [N, T, D]`` (the normalised input of a norm layer).
        outputs: ``(module, dL/d(output)) -> [N, T, d_out]``: the output derivative of one call
            (``elementwise``: ``[N, T, D]``, matching ``inputs``).
        to_rows: A tensor of the weight's shape (the weight, its gradient) in fisherlab's ``[d_out, d]``
            row layout (a view where possible; ``W.flatten(1)`` for Linear and Conv2d).
        from_rows: ``([d_out, d], weight shape) -> tensor of the weight's shape``, the inverse.
        unsupported: ``module -> reason``; empty when the module can be probed.
        structure: ``kronecker`` (``DW = Σ_t g aᵀ``) or ``elementwise`` (``DW = [Σ_t g ∘ x̂ ; Σ_t g]``, the
            weight and bias gradients stacked: ``[P, 1]`` with ``P`` the number of parameters).
        one_hot: For layers whose input is one-hot (``nn.Embedding``): ``module -> number of columns``
            (the vocabulary size); the inputs are kept as indices and ``a`` is a compact one-hot over the
            indices of the batch (:func:`layer_columns`), never a vocabulary-sized dense input.
        parameters: The attribute names of the weight and the bias (a missing or ``None`` bias: none).
        capture: ``(module, hook) -> context manager`` under which ``hook`` (:data:`CaptureHook`) is
            called at every use of the layer; ``None``: a forward hook on the module (a layer whose
            projection is not a module call, such as ``nn.MultiheadAttention``'s, needs its own).
    """

    name: str
    module_type: type[nn.Module] | str
    inputs: Callable[[nn.Module, Tensor], Tensor]
    outputs: Callable[[nn.Module, Tensor], Tensor]
    to_rows: Callable[[Tensor], Tensor] = field(default=lambda w: w.flatten(1))
    from_rows: Callable[[Tensor, torch.Size], Tensor] = field(default=lambda rows, shape: rows.reshape(shape))
    unsupported: Callable[[nn.Module], str] = field(default=lambda m: "")
    structure: BlockStructure = BlockStructure.KRONECKER
    one_hot: Callable[[nn.Module], int] | None = None

    def matches(self, cls: type) -> bool:
        """Whether this kind handles modules of exactly the class ``cls`` (not its subclasses)."""
        if isinstance(self.module_type, str):
            return fnmatch.fnmatchcase(f"{cls.__module__}.{cls.__qualname__}", self.module_type)
        return cls is self.module_type

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
    """The registered kind of ``module``: the first kind (in registration order) that matches its own
    class, else one of its bases, nearest first; ``None`` when none does."""
    for cls in type(module).__mro__:
        for kind in LAYER_KINDS.values():
            if kind.matches(cls):
                return kind
    return None


def kind_label(kind: LayerKind) -> str:
    """How messages name a kind: ``nn.Linear`` for torch's classes, else the class or pattern."""
    t = kind.module_type
    if isinstance(t, str):
        return t
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__


def _known() -> str:
    labels = [kind_label(k) for k in LAYER_KINDS.values()]
    return ", ".join(labels[:-1]) + f" and {labels[-1]}" if len(labels) > 1 else "".join(labels)


def _kind(module: nn.Module) -> LayerKind:
    kind = layer_kind(module)
    if kind is None:
        raise FisherlabError(f"cannot probe {type(module).__name__}: the registered layer kinds are {_known()}")
    return kind


def _has_parameters(module: nn.Module, *, trainable: bool = False) -> bool:
    return any(p.requires_grad or not trainable for p in module.parameters(recurse=False))


def probeable_layers(model: nn.Module, *, trainable: bool = False) -> dict[str, nn.Module]:
    """Every module of ``model`` that can be probed, by module path, in order: of a registered kind
    (:data:`LAYER_KINDS`), holding parameters of its own, and supported (:func:`unsupported_reason` empty).

    With ``trainable`` only those with a parameter that requires grad (the trainable adapters of a
    LoRA model, not its frozen base layers).
    """
    return {
        name: m
        for name, m in model.named_modules()
        if layer_kind(m) is not None and _has_parameters(m, trainable=trainable) and not unsupported_reason(m)
    }


def kronecker_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The probeable layers whose block acts on the layer's whole ``[d_out, d_in]`` matrix with
    Kronecker structure (Linear, Conv2d, Conv1D; not embeddings, whose blocks keep the batch's
    columns only, nor elementwise blocks): the layers the Kronecker optimizers and two-level KFAC use."""
    return {name: m for name, m in probeable_layers(model).items() if _whole_kronecker(_kind(m))}


def _whole_kronecker(kind: LayerKind) -> bool:
    return kind.structure is BlockStructure.KRONECKER and kind.one_hot is None


def layer_structure(module: nn.Module) -> BlockStructure:
    """The block structure of a probeable module (its kind's)."""
    return _kind(module).structure


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be probed (empty when it can)."""
    kind = layer_kind(module)
    if kind is None:
        return f"a {type(module).__name__}; only {_known()} can be probed"
    return kind.unsupported(module)


def layer_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight and the bias (``None``: none) of a probeable layer, named by its kind's ``parameters``."""
    weight_name, bias_name = _kind(module).parameters
    bias = getattr(module, bias_name, None)  # none, or not a tensor (a flag of some modules): no bias
    return getattr(module, weight_name), bias if isinstance(bias, Tensor) else None


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


def layer_columns(module: nn.Module, xs: Sequence[Tensor], shard: Shard | None = None) -> Tensor | None:
    """The input columns a one-hot layer's block keeps: the distinct indices of every call ``xs``,
    ascending (an embedding's token ids; a padding index excluded); ``None`` for other kinds. A batch
    of padding only keeps column 0 (its block is zero: no gradient reaches the layer), so that the
    block keeps a shape.

    Sharded (:mod:`fisherlab.distributed`): the indices of the whole global batch, the same on every process.
    """
    kind = _kind(module)
    return None if kind.one_hot is None else _columns(kind, module, xs, shard)


def _columns(kind: LayerKind, module: nn.Module, xs: Sequence[Tensor], shard: Shard | None) -> Tensor:
    """:func:`layer_columns` of a one-hot kind."""
    assert kind.one_hot is not None
    ids = torch.cat([kind.inputs(module, x).flatten() for x in xs])
    ids = ids[ids >= 0]
    if shard is None or shard.world_size == 1:
        columns = torch.unique(ids)
    else:
        present = torch.zeros(kind.one_hot(module), dtype=torch.float32, device=ids.device)
        present[ids] = 1
        columns = torch.nonzero(shard.sum(present)).flatten()
    return columns if columns.numel() else torch.zeros(1, dtype=ids.dtype, device=ids.device)


def layer_inputs(
    module: nn.Module,
    xs: Sequence[Tensor],
    dtype: torch.dtype,
    *,
    columns: Tensor | None = None,
    position_mask: Tensor | None = None,
) -> Tensor:
    """The bias-augmented inputs ``a [N, T, d_in]`` of every call ``xs`` of ``module`` in ``dtype``.

    The calls are concatenated along ``T`` (weight sharing); the result is written in one
    pass into a fresh tensor (no intermediate copies of the cast, the bias column or the calls).
    One-hot kinds (``nn.Embedding``): the compact one-hot ``[N, T, k]`` over ``columns`` (default
    :func:`layer_columns` of ``xs``). Elementwise kinds: ``a = 1`` of shape ``[N, 1, 1]``.

    ``position_mask`` (``[N, T_seq]`` bool, a batch's ``attention_mask``): in every call with
    ``T_seq`` positions, the rows ``a[n, t]`` where it is ``False`` are zero, bias column included,
    so padding adds nothing to any factor (KFAC's ``A`` included). The per-sample gradients are
    unchanged as long as the model honours the mask (``g`` is zero there already). Calls with
    another number of positions are left as they are.
    """
    kind = _kind(module)
    if kind.structure is BlockStructure.ELEMENTWISE:
        return xs[0].new_ones((xs[0].shape[0], 1, 1), dtype=dtype)
    parts = [kind.inputs(module, x) for x in xs]
    if kind.one_hot is not None:
        keep = _columns(kind, module, xs, None) if columns is None else columns
        parts = [torch.eq(p.unsqueeze(-1), keep) for p in parts]  # [N, T, k]: one-hot over the batch's indices
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


def layer_outputs(
    module: nn.Module,
    grads: Sequence[Sequence[Tensor]],
    dtype: torch.dtype,
    *,
    xs: Sequence[Tensor] | None = None,
) -> Tensor:
    """``g [N, V, T, d_out]`` in ``dtype`` from ``grads[v][c]``, ``dL/d(output)`` of call ``c`` for direction ``v``.

    Calls are concatenated along ``T``; one pass into a fresh tensor, as :func:`layer_inputs`.
    Elementwise kinds need the calls' inputs ``xs``: ``g [N, V, 1, P]`` holds the per-sample gradient
    vectors ``[Σ_t g_nvt ∘ x̂_nt ; Σ_t g_nvt]`` (weight, then bias), summed in float64.

    Raises:
        FisherlabError: An elementwise kind without ``xs``.
    """
    kind = _kind(module)
    if kind.structure is BlockStructure.ELEMENTWISE:
        if xs is None:
            raise FisherlabError(f"the elementwise layer kind {kind.name!r} needs the layer's inputs xs for g")
        return _elementwise_outputs(module, kind, grads, xs, dtype)
    views = [[layer_output_factors(module, gr) for gr in calls] for calls in grads]
    first = views[0][0]
    g = first.new_empty((first.shape[0], len(views), sum(v.shape[1] for v in views[0]), first.shape[-1]), dtype=dtype)
    for k, calls in enumerate(views):
        start = 0
        for v in calls:
            g[:, k, start : start + v.shape[1]].copy_(v)
            start += v.shape[1]
    return g


def _elementwise_outputs(
    module: nn.Module, kind: LayerKind, grads: Sequence[Sequence[Tensor]], xs: Sequence[Tensor], dtype: torch.dtype
) -> Tensor:
    """``u [N, V, 1, P]``: ``Σ_calls Σ_t [g ∘ x̂ ; g]`` with ``x̂`` the kind's ``inputs`` (recomputed here,
    after the pass, from the captured inputs: nothing but those is kept during the pass)."""
    work = torch.float64
    with torch.no_grad(), torch.autocast(xs[0].device.type, enabled=False):
        hats = [kind.inputs(module, x).to(work) for x in xs]
    n, d = hats[0].shape[0], hats[0].shape[-1]
    bias = layer_parameters(module)[1] is not None
    u = hats[0].new_zeros((n, len(grads), 1, d * (1 + bias)))
    for k, calls in enumerate(grads):
        for hat, gr in zip(hats, calls, strict=True):
            out = kind.outputs(module, gr).to(work)
            u[:, k, 0, :d] += torch.einsum("ntd,ntd->nd", out, hat)
            if bias:
                u[:, k, 0, d:] += out.sum(1)
    return u.to(dtype)


def weight_gradient(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_{n,t} g_nt a_ntᵀ``: the ``[d_out, d_in]`` gradient of ``a [N, T, d_in]`` and ``g [N, T, d_out]``."""
    return torch.einsum("nto,nti->oi", g, a)


def weight_matrix(weight: Tensor, bias: Tensor | None, *, batch_dims: int = 0) -> Tensor:
    """The ``[..., d_out, d_in]`` layout of fisherlab: ``weight`` flattened per output row, bias as last column.

    ``batch_dims`` leading dims are kept (1 for per-sample gradients ``[N, *weight.shape]``).
    """
    w = weight.flatten(batch_dims + 1)
    return w if bias is None else torch.cat([w, bias[..., None]], dim=-1)


def parameter_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None, *, batch_dims: int = 0) -> Tensor:
    """``weight`` and ``bias`` of ``module`` (or tensors of their shapes: gradients, per-sample gradients
    with ``batch_dims`` leading dims) in the layout of its block: :func:`weight_matrix` of the kind's
    ``to_rows`` (``[d_out, d_in]``, bias column last; an embedding's whole ``[dim, num_embeddings]``),
    or for elementwise kinds ``[P, 1]``, the weight then the bias flattened."""
    kind = _kind(module)
    if kind.structure is BlockStructure.ELEMENTWISE:
        parts = [weight.flatten(batch_dims)] + ([] if bias is None else [bias.flatten(batch_dims)])
        return torch.cat(parts, dim=-1)[..., None]
    to_rows = kind.to_rows
    for _ in range(batch_dims):
        to_rows = torch.vmap(to_rows)
    return weight_matrix(to_rows(weight), bias, batch_dims=batch_dims)


def layer_matrix(module: nn.Module, attr: str = "data") -> Tensor:
    """A probeable layer's parameters (``attr="data"``) or gradients (``"grad"``) in its block's layout
    (:func:`parameter_matrix`): ``[d_out, d_in]``, bias column last."""
    weight, bias = layer_parameters(module)
    if attr == "data":
        return parameter_matrix(module, weight.detach(), None if bias is None else bias.detach())
    return parameter_matrix(module, getattr(weight, attr), None if bias is None else getattr(bias, attr))


def subtract_from_layer(module: nn.Module, delta: Tensor) -> None:
    """``W -= delta`` for an update in the layout of :func:`layer_matrix`."""
    kind = _kind(module)
    weight, bias = layer_parameters(module)
    if kind.structure is BlockStructure.ELEMENTWISE:
        weight.sub_(delta[: weight.numel(), 0].reshape(weight.shape))
        if bias is not None:
            bias.sub_(delta[weight.numel() :, 0].reshape(bias.shape))
        return
    n_w = kind.to_rows(weight).shape[1]
    weight.sub_(kind.from_rows(delta[:, :n_w], weight.shape))
    if bias is not None:
        bias.sub_(delta[:, n_w])
