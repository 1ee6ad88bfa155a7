"""``nn.MultiheadAttention`` as a probeable layer: its in-projection and its ``out_proj``.

``nn.MultiheadAttention.forward`` hands ``in_proj_weight``, ``in_proj_bias`` and ``out_proj``'s
weight and bias to ``F.multi_head_attention_forward``, so neither projection is a module call: a
forward hook on ``out_proj`` never fires, and the in-projection is no module at all. During a
probe pass (:func:`decomposed_attention`) the forward of each such module is replaced by an
equivalent one that

1. computes the in-projection itself, ``P = x W_inᵀ + b_in`` of shape ``[N, T, 3E]`` (batch
   first) for each distinct tensor ``x`` among query, key and value, and hands ``(x, P)`` to the
   capture hooks of the layer kind ``multihead_attention`` (the module itself, which owns
   ``in_proj_weight [3E, E]`` and ``in_proj_bias [3E]``);
2. runs torch's own ``F.multi_head_attention_forward`` on the projected ``q, k, v`` with identity
   projections in and out (``x Iᵀ = x`` exactly in floating point), so masks (``key_padding_mask``,
   ``attn_mask``, ``is_causal``), ``need_weights``, ``add_zero_attn`` and dropout are torch's code,
   drawing the same dropout masks from the same RNG state as the fused forward;
3. calls ``self.out_proj`` as a module on the attended values (batch first), so its ordinary
   forward hook fires and it is probed as any ``nn.Linear``.

Only the modules the probe looks at are replaced (an MHA probed itself or through its
``out_proj``); an ``out_proj`` alone keeps the fused in-projection (step 1 is skipped). The
cost is that of the identity products, ``4 N T E²`` more multiply-adds per call (``E²`` when only
``out_proj`` is probed). ``torch.backends.mha``'s fast path (``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder`` in eval mode with frozen weights, which bypasses every submodule call) is
switched off for the pass and restored after.

The block of the in-projection in the normal form of :mod:`fisherlab.layers`: ``a [N, T, E(+1)]``
the inputs and ``g [N, V, T, 3E]`` the derivatives ``dL/dP``; rows ``0:E`` of ``[d_out = 3E, d_in]``
are the queries', ``E:2E`` the keys', ``2E:3E`` the values'. Self-attention (``query is key is
value``, as ``nn.TransformerEncoderLayer`` calls it) is one use with ``T`` positions. Cross-attention
(``key is value`` from a memory, as ``nn.TransformerDecoderLayer``'s second attention) is two uses:
the query's ``T`` positions, whose ``g`` is zero outside rows ``0:E``, and the memory's ``S``, whose
``g`` is zero in rows ``0:E``; weight sharing concatenates them (``T + S`` positions), so
``DW_n = Σ_t g_nt a_ntᵀ`` is still the per-sample gradient (tested against ``torch.func``). Each
distinct input is projected with all ``3E`` rows, which for cross-attention costs one or two more
in-projections.

Not supported (a clear reason; ``out_proj`` stays probeable): ``kdim``/``vdim`` other than
``embed_dim`` (separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``) and
``add_bias_kv`` (``bias_k``, ``bias_v`` lie outside the in-projection). An unbatched (2-D) query
runs the fused forward; the in-projection of such a call cannot be captured (an error).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.layers import CaptureHook, LayerKind, register_layer_kind

__all__ = ["MULTIHEAD_ATTENTION", "decomposed_attention", "in_projection_unsupported"]

#: The in-projection hooks of each module, added by the ``multihead_attention`` kind's capture.
_IN_PROJECTION_HOOKS: weakref.WeakKeyDictionary[nn.MultiheadAttention, list[CaptureHook]] = weakref.WeakKeyDictionary()


def in_projection_unsupported(module: nn.Module) -> str:
    """Why the in-projection of the ``nn.MultiheadAttention`` ``module`` cannot be probed (empty when it can)."""
    if not getattr(module, "_qkv_same_embed_dim", True):
        return (
            "a MultiheadAttention with kdim or vdim other than embed_dim (separate q, k, v projection weights) "
            "is not supported; its out_proj can be probed"
        )
    if getattr(module, "bias_k", None) is not None:
        return (
            "a MultiheadAttention with add_bias_kv=True (bias_k and bias_v lie outside the in-projection) "
            "is not supported; its out_proj can be probed"
        )
    return ""


def _batch_first(module: nn.MultiheadAttention, t: Tensor) -> Tensor:
    return t if module.batch_first else t.transpose(0, 1)


def _projected(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
    """``q, k, v`` (sequence first ``[T, N, E]``) from the in-projection of each distinct input, the hooks
    seeing each one's batch-first input ``[N, T, E]`` and projection ``[N, T, 3E]``."""
    e = module.embed_dim
    inputs: list[Tensor] = []
    for t in (query, key, value):
        if not any(t is seen for seen in inputs):
            inputs.append(t)
    projections = []
    for t in inputs:
        x = _batch_first(module, t)
        p = nnf.linear(x, module.in_proj_weight, module.in_proj_bias)
        for hook in _IN_PROJECTION_HOOKS.get(module, []):
            p = hook(module, (x,), p)
        projections.append(p)
    parts = []
    for role, t in enumerate((query, key, value)):
        p = projections[next(i for i, seen in enumerate(inputs) if t is seen)]
        parts.append(p[..., role * e : (role + 1) * e].transpose(0, 1))
    return tuple(parts)


def _decomposed_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with the in-projection exposed to the capture hooks and
    ``out_proj`` called as a module (the module docstring); same arguments and results."""
    capture = bool(_IN_PROJECTION_HOOKS.get(self))
    if query.dim() != 3:
        if capture:
            raise FisherlabError(
                f"a MultiheadAttention called with an unbatched query of shape {tuple(query.shape)}: "
                "the probe needs a batch dimension to capture its in-projection"
            )
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    eye = torch.eye(self.embed_dim, dtype=query.dtype, device=query.device)
    if capture:
        q, k, v = _projected(self, query, key, value)
        in_weight, in_bias, separate, qkv_weights = None, None, True, (eye, eye, eye)
    else:  # the fused in-projection: sequence first, keeping `query is key is value` as the module does
        q, k, v = (t.transpose(0, 1) for t in (query, key, value)) if self.batch_first else (query, key, value)
        if self.batch_first and key is value:
            v = k
            q = k if query is key else q
        in_weight, in_bias, separate = self.in_proj_weight, self.in_proj_bias, not self._qkv_same_embed_dim
        qkv_weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
    attended, weights = nnf.multi_head_attention_forward(
        q,
        k,
        v,
        self.embed_dim,
        self.num_heads,
        in_weight,
        in_bias,
        self.bias_k,
        self.bias_v,
        self.add_zero_attn,
        self.dropout,
        eye,
        None,
        training=self.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=separate,
        q_proj_weight=qkv_weights[0],
        k_proj_weight=qkv_weights[1],
        v_proj_weight=qkv_weights[2],
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = self.out_proj(attended.transpose(0, 1))  # [N, T, E]: its forward hook fires
    return (out if self.batch_first else out.transpose(0, 1)), weights


@contextmanager
def _fast_path_off() -> Iterator[None]:
    """``torch.backends.mha``'s fast path off (it bypasses every submodule call), restored after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def _decomposed(module: nn.MultiheadAttention) -> Iterator[None]:
    """``module.forward`` replaced by :func:`_decomposed_forward` (a no-op when it already is)."""
    current = module.__dict__.get("forward")
    if getattr(current, "__func__", None) is _decomposed_forward:
        yield
        return
    module.forward = types.MethodType(_decomposed_forward, module)  # type: ignore[method-assign]
    try:
        with _fast_path_off():
            yield
    finally:
        if current is None:
            del module.forward
        else:
            module.forward = current  # type: ignore[method-assign]


@contextmanager
def decomposed_attention(model: nn.Module, probed: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Within the context, every ``nn.MultiheadAttention`` of ``model`` calls its projections as the
    module docstring says, and ``torch.backends.mha``'s fast path is off.

    Args:
        model: Any network.
        probed: Only the attention modules among these, or whose ``out_proj`` is among these, are
            replaced (``None``: all).

    Example:
        >>> with decomposed_attention(model):  # doctest: +SKIP
        ...     z = model(x)                   # out_proj's forward hooks fire
    """
    chosen = None if probed is None else {id(m) for m in probed}
    with ExitStack() as stack:
        stack.enter_context(_fast_path_off())
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention) and (chosen is None or {id(m), id(m.out_proj)} & chosen):
                stack.enter_context(_decomposed(m))
        yield


@contextmanager
def _in_projection_capture(module: nn.Module, hook: CaptureHook) -> Iterator[None]:
    """``hook`` sees every in-projection of ``module`` (the ``multihead_attention`` kind's capture)."""
    assert isinstance(module, nn.MultiheadAttention)
    hooks = _IN_PROJECTION_HOOKS.setdefault(module, [])
    hooks.append(hook)
    try:
        with _decomposed(module):
            yield
    finally:
        hooks.remove(hook)
        if not hooks:
            del _IN_PROJECTION_HOOKS[module]


#: The layer kind of ``nn.MultiheadAttention``'s in-projection (``in_proj_weight [3E, E]``,
#: ``in_proj_bias [3E]``); its ``out_proj`` is an ``nn.Linear`` of its own.
MULTIHEAD_ATTENTION = register_layer_kind(
    LayerKind(
        "multihead_attention",
        nn.MultiheadAttention,
        inputs=lambda m, x: x.reshape(x.shape[0], -1, x.shape[-1]),
        outputs=lambda m, g: g.reshape(g.shape[0], -1, g.shape[-1]),
        unsupported=in_projection_unsupported,
        parameters=("in_proj_weight", "in_proj_bias"),
        capture=_in_projection_capture,
    )
)
