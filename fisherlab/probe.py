"""The probe: one extra forward/backward pass that captures per-sample Fisher factors.

Forward hooks on the chosen modules of a registered layer kind (``nn.Linear``, ``nn.Conv2d``,
``transformers``' ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``, RMSNorm: :mod:`fisherlab.layers`,
:mod:`fisherlab.layer_kinds`) record each layer's input
(unfolded and bias-augmented, :mod:`fisherlab.layers`) and keep its output ``s``; the
derivatives ``g = dL/ds`` then come from ``torch.autograd.grad`` with respect to those
outputs, one backward per output direction. Parameters' ``.grad`` are never touched, the
sampling uses the probe's own ``torch.Generator``, the global RNG state (dropout masks) and
buffers (batch-norm running statistics) are restored afterwards, ``torch.autocast`` is switched
off inside the pass (the Fisher is taken in full precision) and the model's mode is left as it
is, so a probe pass leaves training undisturbed. Layers whose weights do not require grad are
probed too (their Fisher is defined all the same).

Which output directions are backpropagated (the Fisher kind) and the losses are in
:mod:`fisherlab.losses`; this module only captures.

A batch is a tensor ``x`` (the model is called as ``model(x)``) or a mapping in Hugging Face's
style (``input_ids``, ``attention_mask``, ``labels``, ...): the model is called as
``model(**batch)`` without ``labels``, which are the targets ``y`` instead (a model given labels
computes a loss of its own the probe never uses, and with ``return_dict=False`` would put it
before the logits); the logits are taken from the output by :func:`~fisherlab.losses.model_logits`.
``N`` and the device are those of the batch's first tensor (``input_ids``). The batch's
``attention_mask`` is the position mask of :func:`~fisherlab.layers.layer_inputs`: positions
outside it add nothing to any factor, and for ``causal_lm`` no label there, or predicted from
there, carries a loss (:func:`~fisherlab.losses.causal_lm_supervision`).

A module called several times in one forward pass (shared weights, e.g. a Linear layer
applied twice) contributes every call: the calls' inputs and output derivatives are
concatenated along the weight-sharing axis ``T``, so ``DW_n = sum over calls and positions``
is the true per-sample gradient (tested against ``torch.func``). A call whose input and output
have a leading dim of 1 while the batch has ``N > 1`` rows is broadcast over the batch (GPT-2's
position embedding of ``position_ids [1, T]``, a learned query): the hook hands the model its
output expanded to ``N`` rows (a view, the same values), so that each sample's share of the
gradient is its own.
is the true per-sample gradient (tested against ``torch.func``).

A layer kind may capture its uses otherwise than by a forward hook (``LayerKind.capture``):
``nn.MultiheadAttention``'s in-projection and ``out_proj``, which torch calls functionally, are
exposed by :func:`fisherlab.attention.decomposed_attention` for the duration of the pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from fisherlab._errors import FisherlabError, check_finite
from fisherlab.attention import decomposed_attention
from fisherlab.distributed import Shard, all_reduce_sum
from fisherlab.fisher import ExactBlock, WholeFisher
from fisherlab.layers import (
    LAYER_KINDS,
    LayerFactors,
    capture_calls,
    kind_label,
    layer_columns,
    layer_inputs,
    layer_kind,
    layer_outputs,
    layer_structure,
    probeable_layers,
    unsupported_reason,
    weight_gradient,
)
from fisherlab.losses import (
    IGNORE_INDEX,
    FisherKind,
    LossKind,
    as_enum,
    causal_lm_supervision,
    check_output_targets,
    check_targets,
    model_logits,
    output_directions,
    per_sample_loss,
)
from fisherlab.tied import append_tied_uses, check_tied_directions, tie_layers

__all__ = ["Batch", "Probe", "ProbeSnapshot", "batch_tensor", "probeable_layers"]

#: A batch of inputs: a tensor ``x`` (``model(x)``), or a mapping of keyword inputs in Hugging Face's
#: style (``model(**batch)``, ``labels`` excepted).
Batch: TypeAlias = Tensor | Mapping[str, Any]


def batch_tensor(batch: Batch) -> Tensor:
    """The tensor that gives a batch its size ``N`` and device: ``x`` itself, or a mapping's first tensor
    (``input_ids`` in a Hugging Face batch).

    Raises:
        FisherlabError: A mapping without a tensor, or neither a tensor nor a mapping.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        lead = next((v for v in batch.values() if isinstance(v, Tensor)), None)
        if lead is None:
            raise FisherlabError(f"the batch mapping holds no tensor (keys: {list(batch)})")
        return lead
    raise FisherlabError(
        f"a batch is a tensor x or a mapping such as {{'input_ids': ..., 'attention_mask': ...}}, "
        f"got {type(batch).__name__}"
    )


def _ordinary(value: Any) -> Any:
    """A copy outside inference mode of an inference tensor (or of those in a mapping); others as they are."""
    if isinstance(value, Mapping):
        return {k: _ordinary(v) for k, v in value.items()}
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value


def _split_batch(batch: Batch, y: Tensor | None) -> tuple[Batch, Tensor | None, Tensor | None]:
    """``(model inputs, targets, position mask)``: a mapping loses its ``labels`` (the targets unless
    ``y`` is given) and gives its ``attention_mask`` as a bool ``[N, T]`` mask."""
    if not isinstance(batch, Mapping):
        return batch, y, None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    y = batch.get("labels") if y is None else y
    mask = batch.get("attention_mask")
    if mask is not None:
        n = batch_tensor(batch).shape[0]
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[0] != n:
            raise FisherlabError(
                f"attention_mask must be a [N={n}, T] tensor (1 inside the sequence, 0 at padding), "
                f"got {getattr(mask, 'shape', type(mask).__name__)}"
            )
        mask = mask != 0
    return inputs, y, mask


@dataclass(frozen=True)
class ProbeSnapshot:
    """What one probe pass captured.

    Args:
        factors: Per-layer factors (``LayerFactors``), stored in the model's precision and
            summed in the accumulation precision (``compute_dtype``).
        loss: Mean true-target loss of the batch.
        gradients: Per-layer mini-batch gradient ``∇_W h`` with the true targets, in the layout of the
            layer's block: ``[d_out, d_in]`` (bias column last; an embedding's columns ``factors[name].columns``
            only; a layer norm's ``[P, 1]``).
        fisher: The Fisher kind used.
        skipped: The model's modules with parameters that were not probed, each as
            ``"name: why"`` (e.g. ``"bn: BatchNorm2d, only nn.Linear, nn.Conv2d, ... are probed"``).
        approx_factors: Per-layer factors of a second Fisher kind captured in the same pass, to build
            approximations from (cross-kind scoring, ``Probe(approx_fisher=...)``); empty when that kind is
            ``fisher``'s.
        approx_fisher: That second kind (``None``: none).
    """

    factors: dict[str, LayerFactors]
    loss: float
    gradients: dict[str, Tensor]
    fisher: FisherKind
    skipped: tuple[str, ...] = field(default=())
    approx_factors: dict[str, LayerFactors] = field(default_factory=dict)
    approx_fisher: FisherKind | None = None

    def blocks(self) -> dict[str, ExactBlock]:
        """The exact Fisher block of every probed layer."""
        return {name: ExactBlock(f) for name, f in self.factors.items()}

    def approx_block(self, name: str) -> ExactBlock | None:
        """The block of layer ``name`` of the second Fisher kind (``None`` when none was captured)."""
        f = self.approx_factors.get(name)
        return None if f is None else ExactBlock(f)

    def whole_fisher(self, names: Iterable[str] | None = None) -> WholeFisher:
        """The Fisher of the layers ``names`` (default: all probed, in order) with their cross blocks."""
        order = list(self.factors) if names is None else list(names)
        return WholeFisher(tuple(ExactBlock(self.factors[n]) for n in order))


class Probe:
    """Capture per-sample Fisher factors of chosen layers of any model.

    Args:
        model: Any ``nn.Module`` whose output ``z`` feeds ``loss``.
        loss: The negative log-likelihood (``LossKind`` or its string value).
        layers: Module paths to probe, or a ``{name: module}`` mapping; ``None`` or ``"all"``: every module
            of a registered layer kind that holds parameters and can be probed (others are listed in
            ``skipped`` with why); ``"trainable"``: those of them with a parameter that requires grad
            (a LoRA model's adapters).
        fisher: The Fisher kind (``FisherKind`` or its string value).
        mc_samples: ``V``, target draws per input for ``mc``.
        seed: Seed of the probe's own generator (MC targets).
        accumulate_dtype: Dtype every sum over the factors runs in (float64 by default); the factors
            are stored in the model's precision when that is not higher (a lossless copy).
        moments_in_capture_dtype: Mark the factors so that KFAC's second moments are summed in
            the precision the model computed them in (``LayerFactors.moment_dtype``; the
            ``mixed`` accumulation of :class:`fisherlab.config.Accumulation`).
        approx_fisher: A second Fisher kind whose output derivatives are captured in the same pass
            (:attr:`ProbeSnapshot.approx_factors`: approximations built from one kind, scored against
            the other); ``None`` or ``fisher``'s kind: none.

    Attributes:
        layers: The probed layers, ``{block name: module}``; a weight several modules use is one block
            (:mod:`fisherlab.tied`), named after the first of them among the chosen layers and mapped to
            the ``nn.Linear`` whose layout it has.
        tied: For each such block, the other modules that use its weight, ``{module path: module}``.

    Raises:
        FisherlabError: Unknown layer names, unsupported layer types, bad options, a tied weight with an
            embedding use under a Fisher kind with several directions per sample.

    Example:
        >>> probe = Probe(model, "bce", layers=["4"], fisher="mc")  # doctest: +SKIP
        >>> snap = probe(x, y); block = snap.blocks()["4"]          # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossKind | str,
        *,
        layers: Iterable[str] | dict[str, nn.Module] | str | None = None,
        fisher: FisherKind | str = FisherKind.MC,
        mc_samples: int = 1,
        seed: int = 0,
        accumulate_dtype: torch.dtype = torch.float64,
        moments_in_capture_dtype: bool = False,
        approx_fisher: FisherKind | str | None = None,
    ) -> None:
        self.model = model
        self.loss = as_enum(LossKind, loss, "loss")
        self.fisher = as_enum(FisherKind, fisher, "Fisher type")
        second = None if approx_fisher is None else as_enum(FisherKind, approx_fisher, "Fisher type")
        self.approx_fisher = None if second == self.fisher else second
        if mc_samples < 1:
            raise FisherlabError(f"mc_samples must be at least 1, got {mc_samples}")
        self.mc_samples = mc_samples
        self.accumulate_dtype = accumulate_dtype
        self.moments_in_capture_dtype = moments_in_capture_dtype
        self.seed = seed
        self._generator: torch.Generator | None = None
        # modules sharing a weight: one block, named after the first chosen (fisherlab.tied)
        self.layers, self.tied = tie_layers(model, _select_layers(model, layers))
        check_tied_directions(self.tied, [k for k in (self.fisher, self.approx_fisher) if k], mc_samples)
        self.skipped = _skipped_modules(model, self.layers, trainable=layers == "trainable")

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def rng_state(self) -> Tensor | None:
        """State of the probe's own generator (MC targets); ``None`` before the first pass."""
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: Tensor, device: torch.device | str = "cpu") -> None:
        """Restore a state from :meth:`rng_state` (e.g. from an optimizer's ``state_dict``)."""
        self._generator = torch.Generator(device=device)
        self._generator.set_state(state.cpu().to(torch.uint8))

    def __call__(self, x: Batch, y: Tensor | None = None, *, shard: Shard | None = None) -> ProbeSnapshot:
        """Run one probe pass on the batch ``(x, y)``.

        ``x`` is a tensor (``model(x)``) or a mapping of keyword inputs (``model(**x)`` without
        ``labels``; module docstring); the logits are the output itself, its ``.logits`` or its
        first element. With ``shard`` the batch is this process's rows of a global batch
        (:mod:`fisherlab.distributed`): the factors are marked with it, MC targets depend on the
        global sample index only, and the loss and ``∇h`` are those of the global batch.

        ``y`` (true targets; default a mapping's ``labels``) gives the batch loss and gradient
        ``∇h``; it may be ``None`` for ``mc`` and ``exact`` Fisher kinds (then ``loss`` is NaN and
        ``gradients`` empty; for ``causal_lm`` every label inside the attention mask counts).

        Raises:
            FisherlabError: NaN/inf in the output, loss or captured factors; ``y`` missing
                for the empirical Fisher; a batch, targets or attention mask of the wrong shape.
        """
        lead = batch_tensor(x)
        if torch.is_inference_mode_enabled() or lead.is_inference():
            # the probe needs autograd: run it outside inference mode, on ordinary copies of the batch
            with torch.inference_mode(False):
                return self(_ordinary(x), _ordinary(y), shard=shard)
        inputs, y, position_mask = _split_batch(x, y)
        if y is None and FisherKind.EMPIRICAL in (self.fisher, self.approx_fisher):
            raise FisherlabError("the empirical Fisher needs the true targets y (a dict batch: its 'labels')")
        check_targets(self.loss, lead, y)
        uses = {f"{n} <- {path}": (n, m) for n, tied in self.tied.items() for path, m in tied.items()}
        # the layers, then the other uses of tied weights
        captured_inputs: dict[str, list[Tensor]] = {n: [] for n in [*self.layers, *uses]}
        outputs: dict[str, list[Tensor]] = {n: [] for n in captured_inputs}
        n_batch = lead.shape[0]

        def hook(name: str) -> object:
            def fn(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
                # a module called several times per forward shares its weight across the calls:
                # every call adds positions, as conv positions do (weight-sharing format)
                inp = args[0].detach()
                if n_batch > 1 and inp.ndim and out.ndim and inp.shape[0] == 1 and out.shape[0] == 1:
                    # broadcast over the batch ([1, T] position ids): each sample its own view of the output
                    inp, out = inp.expand(n_batch, *inp.shape[1:]), out.expand(n_batch, *out.shape[1:])
                captured_inputs[name].append(inp)  # brought to [N, T, d_in] (and cast) after the pass
                if not out.requires_grad:  # frozen weights and input: give the output a place in the graph
                    out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
                outputs[name].append(out)
                return out

            return fn

        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        captures = ExitStack()
        device = lead.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            # MultiheadAttention calls its projections as modules during the pass (fisherlab.attention)
            captures.enter_context(decomposed_attention(self.model, self.layers.values()))
            for layer, m in [*self.layers.items(), *((key, m) for key, (_, m) in uses.items())]:
                captures.enter_context(capture_calls(m, hook(layer)))  # type: ignore[arg-type]
            # the global RNG (dropout) is restored afterwards, autocast is off (the Fisher in full precision)
            with torch.random.fork_rng(devices=cuda), torch.autocast(device.type, enabled=False), torch.enable_grad():
                z = model_logits(self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs))
                check_finite("model output", z)
                missing = [n for n in self.layers if not outputs[n]]
                if missing:
                    raise FisherlabError(f"layers {missing} were not called in the forward pass")
                names = list(self.layers)
                outs = [o for n in outputs for o in outputs[n]]
                check_output_targets(self.loss, z, y)
                supervised = None
                if self.loss == LossKind.CAUSAL_LM:  # no loss outside the attention mask, nor predicted from there
                    supervised = causal_lm_supervision(z, y, position_mask)
                    y = None if y is None else y.masked_fill(~supervised, IGNORE_INDEX)
                if y is not None:
                    losses = per_sample_loss(self.loss, z, y)
                    check_finite("loss", losses)
                    true_g = torch.autograd.grad(losses.sum(), outs, retain_graph=True)
                kinds = [self.fisher] if self.approx_fisher is None else [self.fisher, self.approx_fisher]
                per_kind = [
                    output_directions(
                        self.loss,
                        kind,
                        z,
                        y,
                        generator=self._gen(z.device),
                        mc_samples=self.mc_samples,
                        n_total=None if shard is None else shard.n_total,
                        start=0 if shard is None else shard.start,
                        supervised=supervised,
                    )
                    for kind in kinds
                ]
                directions = per_kind[0]
                every = [d for ds in per_kind for d in ds]
                gs: list[list[Tensor]] = [[] for _ in outs]  # per call, per direction (both kinds, in order)
                for k, d in enumerate(every):
                    grads = torch.autograd.grad(z, outs, grad_outputs=d, retain_graph=k < len(every) - 1)
                    for i, gr in enumerate(grads):
                        gs[i].append(gr)
        finally:
            captures.close()
            with torch.no_grad():
                for key, b in self.model.named_buffers():
                    b.copy_(buffers[key])
        dt = self.accumulate_dtype
        n = lead.shape[0] if shard is None else shard.n_total
        factors: dict[str, LayerFactors] = {}
        approx_factors: dict[str, LayerFactors] = {}
        gradients: dict[str, Tensor] = {}
        offsets = dict(zip(outputs, accumulate((len(o) for o in outputs.values()), initial=0), strict=False))

        def with_uses(name: str, a: Tensor, g: Tensor, ks: Iterable[int | None]) -> tuple[Tensor, Tensor]:
            """``a``, ``g`` with the other uses of a tied weight appended, directions ``ks`` (None: true targets)."""
            if name not in self.tied:
                return a, g
            found = []
            for key in (k for k, (host, _) in uses.items() if host == name):
                calls = range(offsets[key], offsets[key] + len(outputs[key]))
                grads = [[true_g[c] if k is None else gs[c][k] for c in calls] for k in ks]
                found.append((uses[key][1], captured_inputs[key], grads))
            return append_tied_uses(self.layers[name], a, g, found, position_mask=position_mask)

        first = 0  # index of the layer's first call among ``outs``
        for name in names:
            module, calls = self.layers[name], range(first, first + len(outputs[name]))
            first += len(calls)
            # stored in the model's precision (lossless) unless a lower one was asked for; summed in ``dt``
            captured = captured_inputs[name][0].dtype
            captured = captured if captured.is_floating_point else gs[calls[0]][0].dtype  # an embedding's: its output's
            store = captured if captured.itemsize <= dt.itemsize else dt
            xs = captured_inputs[name]
            columns = layer_columns(module, xs, shard)  # an embedding's tokens in the batch (None: every column)
            a_layer = layer_inputs(module, xs, store, columns=columns, position_mask=position_mask)
            g = layer_outputs(module, [[gs[c][k] for c in calls] for k in range(len(directions))], store, xs=xs)
            a, g = with_uses(name, a_layer, g, range(len(directions)))
            check_finite(f"pre-activation derivatives of layer {name!r}", g)
            check_finite(f"activations of layer {name!r}", a)
            moments = torch.promote_types(store, torch.float32) if self.moments_in_capture_dtype else dt
            structure = layer_structure(module)
            factors[name] = LayerFactors(a, g, shard, dt, moments, name, structure, columns)
            if self.approx_fisher is not None:
                second = range(len(directions), len(every))
                g2 = layer_outputs(module, [[gs[c][k] for c in calls] for k in second], store, xs=xs)
                a2, g2 = with_uses(name, a_layer, g2, second)
                check_finite(f"pre-activation derivatives ({self.approx_fisher.value}) of layer {name!r}", g2)
                approx_factors[name] = LayerFactors(a2, g2, shard, dt, moments, name, structure, columns)
            if y is not None:
                g_true = layer_outputs(module, [[true_g[c] for c in calls]], dt, xs=xs)
                a_true, g_true = with_uses(name, a_layer, g_true, [None])
                gradients[name] = all_reduce_sum(weight_gradient(a_true.to(dt), g_true[:, 0].to(dt)), shard) / n
        loss = float(all_reduce_sum(losses.detach().sum().to(dt), shard)) / n if y is not None else float("nan")
        return ProbeSnapshot(factors, loss, gradients, self.fisher, self.skipped, approx_factors, self.approx_fisher)


def _skipped_modules(model: nn.Module, probed: dict[str, nn.Module], *, trainable: bool = False) -> tuple[str, ...]:
    """``"name: why"`` for every module that holds parameters of its own and is not probed."""
    skipped = []
    covered = {id(p) for m in probed.values() for p in m.parameters(recurse=False)}  # a tied weight: its every user
    kinds = ", ".join(kind_label(k) for k in LAYER_KINDS.values())
    for name, m in model.named_modules():
        if name in probed or all(id(p) in covered for p in m.parameters(recurse=False)):
            continue
        if layer_kind(m) is None:
            why = f"{type(m).__name__}, only {kinds} are probed"
        elif unsupported_reason(m):
            why = unsupported_reason(m)
        elif trainable and not any(p.requires_grad for p in m.parameters(recurse=False)):
            why = "frozen (no parameter requires grad; layers='trainable')"
        else:
            why = "not among the chosen layers"
        skipped.append(f"{name or '(the model itself)'}: {why}")
    return tuple(skipped)


def _select_layers(model: nn.Module, layers: Iterable[str] | dict[str, nn.Module] | str | None) -> dict[str, nn.Module]:
    if isinstance(layers, dict):
        chosen = dict(layers)
    elif layers is None or layers in ("all", "trainable"):
        chosen = probeable_layers(model, trainable=layers == "trainable")
    elif isinstance(layers, str):
        raise FisherlabError(f"layers is a list of module paths, 'all' or 'trainable', got the string {layers!r}")
    else:
        modules = dict(model.named_modules())
        chosen = {}
        for name in layers:
            if name not in modules:
                known = ", ".join(probeable_layers(model)) or "none"
                raise FisherlabError(f"unknown layer {name!r}; probeable layers: {known}")
            chosen[name] = modules[name]
    for name, m in chosen.items():
        reason = unsupported_reason(m)
        if reason:
            raise FisherlabError(
                f"layer {name!r} is {reason}" if layer_kind(m) is None else f"layer {name!r}: {reason}"
            )
    if not chosen:
        skipped = "; ".join(_skipped_modules(model, {}, trainable=layers == "trainable")) or "none"
        raise FisherlabError(f"no layer of a registered kind to probe (modules with parameters: {skipped})")
    return chosen
