"""Tied weights: one Fisher block for a parameter that several modules use.

A language model's output layer often shares its weight with the input embedding (``lm_head.weight
is wte.weight``, ``[vocab, E]``). The per-sample gradient of the shared parameter is the sum of every
use's, so its Fisher block is one block, not two. It is built in the layout of the ``nn.Linear`` that
uses the weight (the *host*, ``[d_out = vocab, d_in = E]``, bias column last when the host has a bias)
with the other uses appended as more weight-sharing positions ``T`` (:mod:`fisherlab.layers`):

* an ``nn.Linear`` without a bias of its own: its input and output derivative as they are (a bias
  column of 0 when the host has one: this use adds nothing to the host's bias);
* an ``nn.Embedding``: ``DW = Σ_t onehot(i_t) e_tᵀ`` with ``e_t = dL/d(embedding output)_t``, so the
  factor roles are swapped: its positions have ``g = onehot(i_t)`` (vocabulary-sized, the same for
  every output direction; zero at the ``padding_idx``, which receives no gradient from the
  embedding) and ``a = e_t`` (bias column 0), which depends on the output direction.

Positions outside a batch's attention mask add nothing (their ``a`` and ``g`` are zero), as for every layer.

The normal form keeps ``a [N, T, d_in]`` the same for all ``V`` directions, so a block with an
embedding use holds one direction per sample: the empirical Fisher, or ``mc`` with one draw.
Folding the directions into samples (``a' [N V, T, d_in]``, ``g`` times ``√V``) would keep the block
itself exact but give it ``N V`` samples and one direction where every other block has ``N`` and
``V``, so the whole-network Fisher (cross-layer blocks, two-level KFAC, the natural gradient), which
pairs the rows ``(n, v)`` of every block, would no longer apply: :func:`tie_layers` refuses it instead
(``fisher="exact"``, ``mc_samples > 1``).

Which modules share a weight is found by identity among the parameters of every module of the model,
so a block of ``lm_head`` includes the embedding's uses also when only ``lm_head`` is chosen. The block
is named after the first module of the tied group (in the model's module order) among the chosen layers
(``transformer.wte`` for GPT-2 when both are chosen, ``lm_head`` when only it is); :attr:`Probe.layers`
maps that name to the host, whose layout the block has, and :attr:`Probe.tied` to the other uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.layers import layer_kind, layer_parameters
from fisherlab.losses import FisherKind

__all__ = ["append_tied_uses", "check_tied_directions", "tie_layers"]


def _linear(module: nn.Module) -> bool:
    kind = layer_kind(module)
    return kind is not None and kind.name == "linear"


def _use_unsupported(module: nn.Module) -> str:
    """Why ``module`` cannot be another use of a host's weight (empty when it can)."""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "an nn.Embedding with max_norm or scale_grad_by_freq (not a fixed function of its weight)"
        return ""
    if _linear(module):
        return "" if layer_parameters(module)[1] is None else "an nn.Linear with a bias of its own"
    return f"a {type(module).__name__}"


def tie_layers(
    model: nn.Module, layers: dict[str, nn.Module]
) -> tuple[dict[str, nn.Module], dict[str, dict[str, nn.Module]]]:
    """Merge the chosen layers that share a weight, and find every other use of a chosen layer's weight.

    Args:
        model: The network.
        layers: The chosen layers, ``{name: module}``.

    Returns:
        ``(layers, tied)``: the layers with each tied group as one entry (named after the group's ``nn.Linear``
        host, whose layout the block has, when it is chosen, else after its first chosen member in the
        model's module order; mapped to the host), and for each such
        entry the other modules that use its weight, ``{module path: module}``.

    Raises:
        FisherlabError: A group without an ``nn.Linear`` host, or with a use that cannot be appended
            (a Linear with a bias of its own, an embedding with ``max_norm``, another layer kind).
    """
    paths = list(model.named_modules())
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, m in paths:
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append((path, m))
    chosen_name = {id(m): name for name, m in layers.items()}
    merged: dict[str, nn.Module] = {}
    tied: dict[str, dict[str, nn.Module]] = {}
    done: set[int] = set()
    for name, m in layers.items():
        weight = layer_parameters(m)[0]
        group = holders.get(id(weight), [(name, m)])
        if len(group) == 1 or id(m) not in {id(g) for _, g in group}:  # not tied (or not a module of model)
            merged[name] = m
            continue
        if id(weight) in done:
            continue
        done.add(id(weight))
        hosts = [(path, g) for path, g in group if _linear(g)]
        every = ", ".join(path for path, _ in group)
        if not hosts:
            raise FisherlabError(
                f"the weight of {name!r} is shared by {every}: tied weights need an nn.Linear among them "
                "(the block's layout)"
            )
        host_path, host = hosts[0]
        uses = {path: g for path, g in group if g is not host}
        bad = [f"{path} ({why})" for path, g in uses.items() if (why := _use_unsupported(g))]
        if bad:
            raise FisherlabError(
                f"the weight of {name!r} is shared by {every}; these uses cannot be added to {host_path!r}'s "
                f"block: {', '.join(bad)}. Supported: nn.Embedding and bias-free nn.Linear modules"
            )
        # named after the host (the block has its layout) when it is chosen, else the first chosen use
        chosen = [chosen_name[id(g)] for _, g in group if id(g) in chosen_name]
        first = chosen_name.get(id(host), chosen[0])
        merged[first] = host
        tied[first] = uses
    return merged, tied


def check_tied_directions(tied: dict[str, dict[str, nn.Module]], kinds: Sequence[FisherKind], mc_samples: int) -> None:
    """Refuse Fisher kinds with several directions per sample when a tied block has an embedding use.

    Raises:
        FisherlabError: ``exact`` or ``mc`` with ``mc_samples > 1`` (module docstring: why).
    """
    embedded = [name for name, uses in tied.items() if any(isinstance(u, nn.Embedding) for u in uses.values())]
    if not embedded:
        return
    many = [k.value for k in kinds if k == FisherKind.EXACT or (k == FisherKind.MC and mc_samples > 1)]
    if many:
        raise FisherlabError(
            f"the tied blocks {embedded} (a weight shared with an nn.Embedding) hold one output direction per "
            f"sample: use the empirical Fisher or mc with mc_samples=1, not {', '.join(many)}"
            + (f" with mc_samples={mc_samples}" if "mc" in many else "")
        )


def append_tied_uses(
    host: nn.Module,
    a: Tensor,
    g: Tensor,
    uses: Sequence[tuple[nn.Module, Sequence[Tensor], Sequence[Sequence[Tensor]]]],
    *,
    position_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The host's factors with every other use of its weight appended as positions (module docstring).

    Args:
        host: The ``nn.Linear`` whose layout the block has.
        a: Its inputs ``[N, T, d_in]`` (bias column last when it has a bias).
        g: Its output derivatives ``[N, V, T, d_out]``.
        uses: Per other use ``(module, inputs of its calls, grads[v][c])`` with ``grads[v][c]`` the derivative
            of the loss with respect to the output of call ``c`` for direction ``v``.
        position_mask: ``[N, T_seq]`` bool (a batch's ``attention_mask``): in a call with ``T_seq``
            positions, those where it is ``False`` add nothing (their ``a`` and ``g`` are zero), as in
            :func:`fisherlab.layers.layer_inputs`.

    Returns:
        ``(a, g)`` with ``T`` grown by the uses' positions, in ``a``'s and ``g``'s dtypes.

    Raises:
        FisherlabError: An embedding use with more than one direction.
    """
    bias = layer_parameters(host)[1] is not None
    parts_a, parts_g = [a], [g]
    for module, xs, grads in uses:
        for c, x in enumerate(xs):
            if isinstance(module, nn.Embedding):
                if len(grads) != 1:
                    raise FisherlabError(f"an embedding use of a tied weight needs one direction, got {len(grads)}")
                use_a, ids = _positions(grads[0][c]), x.reshape(x.shape[0], -1)
                use_g = nnf.one_hot(ids, module.num_embeddings).to(g.dtype)[:, None]
                if module.padding_idx is not None:  # the embedding gives its padding row no gradient
                    use_g = use_g * (ids != module.padding_idx)[:, None, :, None]
            else:
                use_a, use_g = _positions(x), torch.stack([_positions(calls[c]) for calls in grads], 1)
            use_a = use_a.to(a.dtype)
            if bias:
                use_a = torch.cat([use_a, use_a.new_zeros((*use_a.shape[:-1], 1))], -1)
            if position_mask is not None and position_mask.shape[1] == use_a.shape[1]:
                use_a = use_a * position_mask[..., None]
                use_g = use_g * position_mask[:, None, :, None]
            parts_a.append(use_a)
            parts_g.append(use_g.to(g.dtype))
    return torch.cat(parts_a, 1), torch.cat(parts_g, 2)


def _positions(t: Tensor) -> Tensor:
    """``[N, ..., d]`` as ``[N, T, d]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])
