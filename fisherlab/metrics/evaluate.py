"""One exact block, every registered metric of every method: restrict → approximate → measure → lift.

:func:`evaluate_block` restricts a layer wider than its batch to its sample span
(:mod:`fisherlab.sample_span`), builds the approximations (:func:`~fisherlab.approximations.approximate_all`),
computes every entry of the registry (:mod:`fisherlab.metrics.registry`) against one
:class:`~fisherlab.metrics.reference.BlockReference` per block, and lifts the approximations back
(on first use of :attr:`BlockEvaluation.approximations`: a probe run keeps only the warm starts).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.approximations import PAPER_METHODS, ApproxConfig, Approximation, WarmStarts, approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.method_registry import METHODS, not_applicable, resolve_methods
from fisherlab.metrics.error2 import SpectralLimits
from fisherlab.metrics.reference import BlockReference
from fisherlab.metrics.registry import BLOCK_METRICS, LAYER_METRICS
from fisherlab.sample_span import SampleSpan, restricted_warm_starts
from fisherlab.vocabulary import DEFAULT_METRICS, Spectrum

__all__ = ["BlockEvaluation", "evaluate_block"]


@dataclass(frozen=True)
class BlockEvaluation:
    """Approximations of one exact block and every registered metric of them (K §4.1).

    Args:
        built: Per method name, as built and measured: on the sample span ``span`` for the methods in
            ``on_span``, at the normalised scale ``scales`` (:meth:`~fisherlab.fisher.ExactBlock.normalised`).
        values: ``values[metric][method]`` for every :data:`BLOCK_METRICS` entry (NaN for an
            error metric not asked for, or undefined).
        layer_values: ``layer_values[metric]`` for every :data:`LAYER_METRICS` entry.
        not_applicable: ``{method: why}`` for the methods asked for that do not apply to the block's
            structure (``MethodSpec.structures``): not built, their errors NaN.
        span: The sample span the methods in ``on_span`` were built on (``None``: none).
        on_span: Those methods.
        scales: ``(s_out, s_in)`` of the normalised block (``(1, 1)``: as given).
    """

    built: dict[str, Approximation]
    values: dict[str, dict[str, float]]
    layer_values: dict[str, float]
    not_applicable: dict[str, str] = field(default_factory=dict)
    span: SampleSpan | None = None
    on_span: tuple[str, ...] = ()
    scales: tuple[float, float] = (1.0, 1.0)

    @cached_property
    def approximations(self) -> dict[str, Approximation]:
        """Per method name, the approximation of the whole block: lifted from the sample span and scaled
        back, on first use (a wide layer's lifted factors are ``d_in²`` numbers each, 16 % of its
        evaluation: a probe run without two-level keeps only the warm starts, :attr:`warm_starts`)."""
        s_out, s_in = self.scales
        span = self.span
        return {
            m: (a.lifted(span) if span is not None and m in self.on_span else a).scaled(s_out, s_in)
            for m, a in self.built.items()
        }

    @property
    def warm_starts(self) -> WarmStarts:
        """The warm starts of the next snapshot per method (:func:`~fisherlab.approximations.warm_starts` of
        :attr:`approximations`), without lifting the approximations: on the span as
        :class:`~fisherlab.sample_span.SpanMatrix`."""
        span = self.span
        return {
            m: a.lifted_warm_start(span) if span is not None and m in self.on_span else a.warm_start
            for m, a in self.built.items()
        }


def _scaled_back(value: float, factor: float, power: int) -> float:
    """``value * factor**power`` that overflows to inf (Python's ``**`` raises instead)."""
    for _ in range(power):
        value *= factor
    return value


def _scaled_like(block: ExactBlock, s_out: float, s_in: float) -> ExactBlock:
    """``block`` with its factors divided by the exact block's scales (:meth:`ExactBlock.normalised`)."""
    if s_out == 1 and s_in == 1:
        return block
    f = block.factors
    return ExactBlock(replace(f, a=f.a / s_in, g=f.g / s_out, compute_dtype=None))


def _restricted_gradient(gradient: Tensor | None, span: SampleSpan) -> tuple[Tensor | None, float]:
    """``(U_gᵀ ∇ U_a, ||∇ - U_g U_gᵀ ∇ U_a U_aᵀ||)``: the gradient on the sample span and the norm of its part
    outside (formed, not subtracted in squares)."""
    if gradient is None:
        return None, 0.0
    u_out, u_in = span.out_basis, span.in_basis
    g = gradient.to(span.block.factors.dtype)
    restricted = g if u_out is None else u_out.T.to(g.dtype) @ g
    restricted = restricted if u_in is None else restricted @ u_in.to(g.dtype)
    back = restricted if u_out is None else u_out.to(g.dtype) @ restricted
    back = back if u_in is None else back @ u_in.T.to(g.dtype)
    return restricted, float(torch.linalg.matrix_norm(g - back))


def evaluate_block(
    block: ExactBlock,
    methods: Sequence[object] | None = None,
    config: ApproxConfig | None = None,
    *,
    spectrum: Spectrum | str = Spectrum.EIGENVALUES,
    metrics: Sequence[str] = DEFAULT_METRICS,
    warm: WarmStarts | None = None,
    layer: str = "",
    limits: SpectralLimits | None = None,
    damping: float | None = None,
    gradient: Tensor | None = None,
    approx_block: ExactBlock | None = None,
    warn_not_applicable: bool = True,
    warned: set[tuple[str, str]] | None = None,
) -> BlockEvaluation:
    """Build every approximation of ``block`` and compute every registered metric of each.

    Restrict → approximate → measure → lift: a layer wider than its batch is first restricted to
    the span of its per-sample factors (:meth:`~fisherlab.fisher.ExactBlock.sample_span`: the same
    approximations and errors on a smaller block) for every method registered ``span_invariant``
    (the papers' five); the others are built and measured on the whole block. Approximations are
    returned lifted to the whole block (on first use: :attr:`BlockEvaluation.approximations`). The Gram
    matrix (hence ``||F||_F`` and the spectrum) is computed once per block and shared. Error metrics
    not in ``metrics`` are stored as NaN (error 2 of Kronecker-rank-2 methods is the one cost that
    grows like ``(d_out d_in)^3``). A zero block warns once (:class:`UndefinedMetricWarning`) and gives NaN errors.

    Args:
        block: The exact block.
        methods: Registered method names (default: the papers' five), ``all`` or ``package.module:attribute``.
        config: Solver settings.
        spectrum: What error 2 compares.
        metrics: Error metrics to compute.
        warm: Warm starts per method (:func:`~fisherlab.approximations.warm_starts`).
        layer: Layer name used in warnings.
        limits: What error 2's eigensolver may spend (default: :meth:`SpectralLimits.for_device
            <fisherlab.metrics.error2.SpectralLimits.for_device>` of the block's device).
        damping: ``λ`` of ``F + λI`` for the solve error and the KL divergence (:mod:`fisherlab.metrics.usage`;
            ``None``: those are NaN with a warning when asked for).
        gradient: The layer's mini-batch gradient ``∇`` as ``[d_out, d_in]`` (bias column last) for the
            solve error (``None``: NaN with a warning when asked for).
        approx_block: The block to build the approximations from (cross-kind scoring: e.g. KFAC of the
            empirical Fisher scored against the MC block); default ``block``. Its factors must share
            ``block``'s layer shape; the sample-span restriction is not used then.
        warn_not_applicable: Warn (:class:`UndefinedMetricWarning`, one line) when methods do not apply to
            the block's structure (a Kronecker method on a LayerNorm): they are not built and their errors
            stored as NaN, with the reason in :attr:`BlockEvaluation.not_applicable`.
        warned: The ``(metric, reason)`` pairs whose NaN warning (solve error, KL divergence) was given
            already: not given again, and the ones given now are added. Pass one set for a whole run (the
            probe does) to hear each reason once; ``None``: once per call.
    """
    asked = resolve_methods(PAPER_METHODS if methods is None else methods)
    refused = not_applicable(asked, block.structure)
    if refused and warn_not_applicable:
        warnings.warn(
            f"methods {', '.join(refused)} do not apply to the {block.structure.value} block of layer {layer!r} "
            f"({next(iter(refused.values()))}): not built, their errors stored as NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    names = tuple(m for m in asked if m not in refused)
    if approx_block is block:
        approx_block = None
    if approx_block is not None and (approx_block.d_out, approx_block.d_in) != (block.d_out, block.d_in):
        raise FisherlabError(
            f"approx_block of layer {layer!r} is [{approx_block.d_out}, {approx_block.d_in}], the exact block "
            f"[{block.d_out}, {block.d_in}]: they must be blocks of one layer"
        )
    warned = set() if warned is None else warned
    block, s_out, s_in = block.normalised()  # extreme scales: F = s_out² s_in² F', errors are relative
    if approx_block is not None:
        approx_block = _scaled_like(approx_block, s_out, s_in)
    if damping is not None:
        damping = damping / (s_out * s_in) ** 2  # F + λI = s² (F' + λ/s² I): the same relative metrics
    # a wide layer at a small batch: the same errors on a smaller block (approximations of this block only)
    span = block.sample_span() if approx_block is None else None
    on_span = [m for m in names if span is not None and METHODS[m].span_invariant]
    whole = [m for m in names if m not in on_span]
    refs: dict[str, BlockReference] = {}
    approx: dict[str, Approximation] = {}
    if on_span:
        assert span is not None
        restricted, outside = _restricted_gradient(gradient, span)
        ref = BlockReference.of(
            span.block,
            spectrum=spectrum,
            layer=layer,
            zeros=span.zeros,
            limits=limits,
            damping=damping,
            gradient=restricted,
            gradient_outside=outside,
            warned=warned,
        )
        warm_on_span = restricted_warm_starts(warm, span)
        built = approximate_all(span.block, on_span, config, warm=warm_on_span, layer=layer, restrict=False)
        for name, a in built.items():
            refs[name], approx[name] = ref, a
    if whole:
        ref = BlockReference.of(
            block, spectrum=spectrum, layer=layer, limits=limits, damping=damping, gradient=gradient, warned=warned
        )
        source = block if approx_block is None else approx_block
        for name, a in approximate_all(source, whole, config, warm=warm, layer=layer, restrict=False).items():
            refs[name], approx[name] = ref, a
    any_ref = next(iter(refs.values()), None) or BlockReference.of(block, spectrum=spectrum, layer=layer, limits=limits)
    zero = not float(any_ref.norm_squared) > 0
    if zero:
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is zero (no gradient reaches it: dead or saturated units); "
            "error 1 and error 2 are undefined there and stored as NaN (fisher_frobenius_norm = 0)",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    values: dict[str, dict[str, float]] = {}
    skipped = {m.name for m in BLOCK_METRICS if m.error and (zero or (m.name not in metrics and not m.always))}
    unbuilt = {m: Approximation(m, None, 0, False, math.nan, seconds=0.0) for m in refused}  # no operator
    for metric in BLOCK_METRICS:
        skip = metric.name in skipped or metric.accompanies in skipped
        values[metric.name] = {m: math.nan if skip else float(metric.compute(refs[m], approx[m])) for m in names}
        error = metric.error or bool(metric.accompanies)
        values[metric.name] |= {m: math.nan if error else float(metric.compute(any_ref, unbuilt[m])) for m in refused}
        values[metric.name] = {m: values[metric.name][m] for m in asked}
    layer_values = {
        metric.name: _scaled_back(float(metric.compute(any_ref)), s_out * s_in, 2 * metric.power)
        for metric in LAYER_METRICS
    }
    if not all(math.isfinite(v) for v in layer_values.values()) and not zero:
        exponent = 2 * (math.log2(s_out) + math.log2(s_in))
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is beyond float64 (||F||_F ~ 2^{exponent:.0f} x "
            f"{float(any_ref.norm_squared.sqrt()):.3g}); its errors, relative, are stored, "
            "fisher_frobenius_norm as inf",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return BlockEvaluation(
        {m: approx[m] for m in names}, values, layer_values, refused, span, tuple(on_span), (s_out, s_in)
    )
