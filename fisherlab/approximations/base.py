"""What every approximation method shares: :class:`Approximation` (a block operator with its
solver diagnostics), warm starts between snapshots (K §4), the start vectors and Kronecker terms
of the power SVD and Lanczos stages, and :func:`approximate_all`, which walks the method registry.

The methods themselves live one module per family (:mod:`~fisherlab.approximations.kfac_family`,
:mod:`~fisherlab.approximations.kronecker_svd_family`, :mod:`~fisherlab.approximations.lanczos_family`)
and are found here only through :data:`~fisherlab.method_registry.METHODS`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fisherlab._errors import ConvergenceWarning, FisherlabError
from fisherlab.block_operators import DenseBlockOperator, LiftedOperator, ScaledOperator
from fisherlab.distributed import all_reduce_sum
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import SingularTriplets
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import METHODS, ApproxConfig, MethodContext, not_applicable, resolve_methods
from fisherlab.sample_span import SampleSpan, SpanMatrix, restricted_warm_starts
from fisherlab.vocabulary import Method

__all__ = [
    "Approximation",
    "SpanMatrix",
    "WarmStarts",
    "approximate_all",
    "restricted_warm_starts",
    "warm_starts",
]


@dataclass(frozen=True)
class Approximation:
    """An approximation of one exact block (a block operator) with its solver diagnostics.

    Args:
        method: The method's registered name (the ``method`` coordinate).
        operator: The approximation, a :class:`~fisherlab.operators.BlockOperator`: a
            :class:`~fisherlab.kron.KronSum` ``sum_k out_k ⊗ in_k`` for the papers' methods.
        iterations: Products with ``R(F)`` (pairs ``mv``/``rmv``) used; 0 for KFAC.
        converged: Whether every iterative stage met its tolerance.
        residual: Largest relative residual of the iterative stages (0 for KFAC).
        warm_start: Input-side vectors to start the next snapshot from.
        seconds: Wall time to build it, shared stages included (deflation counts its KPSVD).
    """

    method: str
    operator: Any
    iterations: int
    converged: bool
    residual: float
    warm_start: tuple[Tensor | SpanMatrix, ...] = ()
    seconds: float = 0.0

    @property
    def kron(self) -> KronSum:
        """The operator as a Kronecker sum (the papers' methods; the optimizers and two-level need one).

        Raises:
            FisherlabError: The method's operator is not a Kronecker sum.
        """
        if not isinstance(self.operator, KronSum):
            raise FisherlabError(
                f"method {self.method!r} is a {type(self.operator).__name__}, not a Kronecker sum "
                "(the optimizers and two-level KFAC take Kronecker methods only)"
            )
        return self.operator

    def scaled(self, s_out: float, s_in: float) -> Approximation:
        """This approximation of ``F'`` as one of ``F = s_out² s_in² F'`` (:meth:`ExactBlock.normalised`):
        output factors times ``s_out²``, input factors times ``s_in²`` (powers of two: exact); any
        other operator times ``s_out² s_in²``."""
        if s_out == 1 and s_in == 1:
            return self
        if not isinstance(self.operator, KronSum):
            return replace(self, operator=ScaledOperator(self.operator, s_out**2 * s_in**2))
        kron = KronSum(tuple(o * s_out**2 for o in self.kron.outs), tuple(i * s_in**2 for i in self.kron.ins))
        return replace(self, operator=kron)

    def lifted(self, span: SampleSpan) -> Approximation:
        """This approximation of the restricted block ``span.block`` as the approximation of the
        whole block (:meth:`~fisherlab.fisher.ExactBlock.sample_span`); its warm starts stay on
        the span (:class:`SpanMatrix`: ``k²`` numbers where the whole matrix has ``d_in²``)."""
        if isinstance(self.operator, KronSum):
            operator: Any = span.lift(self.operator)
        else:
            operator = LiftedOperator(self.operator, span.out_basis, span.in_basis)
        return replace(self, operator=operator, warm_start=self.lifted_warm_start(span))

    def lifted_warm_start(self, span: SampleSpan) -> tuple[Tensor | SpanMatrix, ...]:
        """The warm start of :meth:`lifted` without lifting the operator: input-side matrices of the
        restricted block kept on the span (:class:`SpanMatrix`)."""
        if span.in_basis is None:
            return self.warm_start
        k_in = span.block.d_in
        return tuple(
            SpanMatrix(span.in_basis, w) if isinstance(w, Tensor) and w.shape == (k_in, k_in) else w
            for w in self.warm_start
        )


def _symmetric(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def _terms(triplets: SingularTriplets) -> KronSum:
    """Kronecker terms ``√σ mat(x) ⊗ √σ mat(y)``, symmetrised, signed so ``tr(in_) >= 0``."""
    outs, ins = [], []
    for sigma, x, y in zip(triplets.sigmas, triplets.lefts, triplets.rights, strict=True):
        root = torch.sqrt(sigma)
        out, in_ = root * _symmetric(x), root * _symmetric(y)
        if torch.trace(in_) < 0:
            out, in_ = -out, -in_
        outs.append(out)
        ins.append(in_)
    return KronSum(tuple(outs), tuple(ins))


def _scaled_gram(x: Tensor, scale: float) -> Tensor:
    """``scale · xᵀx`` with the scaling inside the GEMM, made exactly symmetric.

    A GEMM does not sum ``(i, j)`` and ``(j, i)`` in the same order (float32 sums differed by
    up to 2.4e-7), and eigensolvers read one triangle while norms read all entries: error 2 of
    KFAC came out ×4.8 too large. ``(m + mᵀ) / 2`` is exactly symmetric (addition commutes).
    """
    m = torch.addmm(x.new_zeros(()), x.T, x, beta=0, alpha=scale)
    return _symmetric(m)


def _second_moment(x: Tensor, scale: float, factors: LayerFactors) -> Tensor:
    """``scale · Σ x xᵀ`` over the rows of ``x [..., d]`` and every process holding samples
    (``factors.shard``), summed in ``factors.moment_dtype`` when set (else the compute dtype).

    KFAC's factors (:func:`~fisherlab.approximations.kfac_family.kfac_factors`) are two of these; the
    input-side one is also the cold start of every power SVD and Lanczos run (:func:`_start`).
    """
    work = factors.moment_dtype or factors.dtype
    rows = x.reshape(-1, x.shape[-1]).to(work)
    with torch.autocast(x.device.type, enabled=False):  # a caller's autocast would sum float32 in bfloat16
        return all_reduce_sum(_scaled_gram(rows, scale), factors.shard)


def _start(block: ExactBlock, warm: tuple[Tensor, ...], index: int = 0) -> Tensor:
    """Warm start ``warm[index]`` if usable, else a fixed start for a cold run.

    The cold start of the first term is the KFAC input factor (PSD, close to the solution);
    later terms start from a fixed random symmetric matrix, which cannot be orthogonal to
    the wanted vector the way a deflated direction can.
    """
    d_in = block.factors.d_in
    if len(warm) > index and warm[index].shape == (d_in, d_in) and _usable(warm[index]):
        return warm[index]
    ref = block.factors.a
    if index == 0:
        kfac_in = _second_moment(ref, 1 / block.factors.n_samples, block.factors)  # KFAC's A (kfac_factors)
        return kfac_in.to(ref.dtype) / block.factors.n_positions
    gen = torch.Generator().manual_seed(index)
    m = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64).to(dtype=ref.dtype, device=ref.device)
    return m + m.T


def _usable(start: Tensor) -> bool:
    """A start vector must be finite and nonzero (a vanished operator leaves zero vectors)."""
    norm = torch.linalg.norm(start)
    return bool(torch.isfinite(norm)) and float(norm) > 0


def _report(method: Method, triplets: SingularTriplets, layer: str) -> None:
    if not triplets.converged:
        warnings.warn(
            f"{method.value} did not converge on layer {layer!r} in {triplets.iterations} "
            f"iterations (relative residual {triplets.residual:.2e}); stored as not converged",
            ConvergenceWarning,
            stacklevel=3,
        )


def _padded(triplets: SingularTriplets, rank: int) -> SingularTriplets:
    """Append zero triplets up to ``rank``: when ``R(F)`` has a smaller rank (one output unit,
    ``N = 1``, a dead layer) the best Kronecker-rank-``rank`` approximation has zero terms,
    as deflation's second stage returns; the Kronecker rank stays what was asked for."""
    missing = rank - triplets.sigmas.numel()
    if missing <= 0:
        return triplets
    x0, y0 = triplets.lefts[0], triplets.rights[0]
    sigmas = torch.cat([triplets.sigmas, triplets.sigmas.new_zeros(missing)])
    lefts = triplets.lefts + (torch.zeros_like(x0),) * missing
    rights = triplets.rights + (torch.zeros_like(y0),) * missing
    return SingularTriplets(sigmas, lefts, rights, triplets.iterations, triplets.converged, triplets.residual)


#: Warm starts per method: the ``Approximation.warm_start`` vectors of the previous snapshot.
WarmStarts = Mapping[str, tuple["Tensor | SpanMatrix", ...]]


def warm_starts(approximations: Mapping[str, Approximation] | None) -> WarmStarts:
    """The warm-start vectors of a previous snapshot's approximations (K §4), for :func:`approximate_all`."""
    return {str(getattr(m, "value", m)): a.warm_start for m, a in (approximations or {}).items()}


def _as_approximation(name: str, result: Any, block: ExactBlock, seconds: float) -> Approximation:
    """A builder's result as an :class:`Approximation` (an operator gets solver-free diagnostics)."""
    if isinstance(result, Approximation):
        return result
    if isinstance(result, DenseBlockOperator) and result.shape is None:
        result = result.with_shape(block.d_out, block.d_in)
    for needed in ("matvec", "frobenius_norm_squared"):
        if not callable(getattr(result, needed, None)):
            raise FisherlabError(
                f"method {name!r} returned a {type(result).__name__}, which has no {needed}(): a method builds an "
                "Approximation or a block operator (fisherlab.operators.BlockOperator, e.g. fl.DenseBlockOperator)"
            )
    d_out, d_in = getattr(result, "d_out", block.d_out), getattr(result, "d_in", block.d_in)
    if (d_out, d_in) != (block.d_out, block.d_in):
        raise FisherlabError(
            f"method {name!r} returned an operator on [{d_out}, {d_in}] matrices for a [{block.d_out}, {block.d_in}] "
            "layer"
        )
    return Approximation(name, result, 0, True, 0.0, seconds=seconds)


def approximate_all(
    block: ExactBlock,
    methods: Sequence[object],
    config: ApproxConfig | None = None,
    *,
    warm: WarmStarts | None = None,
    layer: str = "",
    restrict: bool = True,
) -> dict[str, Approximation]:
    """Every requested approximation of one block, walking the method registry
    (:data:`~fisherlab.method_registry.METHODS`): a method's declared reuses are built first and
    shared (deflation reuses KPSVD, KFAC-corrected reuses KFAC), and each warm-starts from
    ``warm`` (K §4). Factors at extreme scales are normalised first and the approximations
    scaled back.

    A layer wider than its batch is first restricted to the span of its per-sample factors
    (:meth:`~fisherlab.fisher.ExactBlock.sample_span`, as :func:`~fisherlab.metrics.evaluate_block`
    does): the same approximations, built on a smaller block and returned lifted to the whole one.

    Args:
        block: The exact block.
        methods: Registered method names (or :class:`Method` members, ``all``, ``package.module:attribute``).
        config: Solver settings (default :class:`ApproxConfig`).
        warm: Warm starts per method, e.g. ``warm_starts(previous_snapshot_approximations)``.
        layer: Layer name used in warnings.
        restrict: Build on the sample span when that is smaller (``False``: on ``block`` as given,
            e.g. when it is already a restriction).

    Returns:
        ``{name: Approximation}`` in the order asked for.

    Raises:
        FisherlabError: An unknown method name (a ``ValueError``), or a method that does not apply to the
            block's structure (``MethodSpec.structures``: a Kronecker method on a LayerNorm's elementwise
            block; :func:`~fisherlab.metrics.evaluate_block` stores NaN for those instead).
    """
    names = resolve_methods(methods)
    refused = not_applicable(names, block.structure)
    if refused:
        where = f" of layer {layer!r}" if layer else ""
        raise FisherlabError(f"cannot build on the {block.structure.value} block{where}: {'; '.join(refused.values())}")
    block, s_out, s_in = block.normalised()  # extreme scales: the same approximations, scaled back
    if s_out != 1 or s_in != 1:
        found = approximate_all(block, names, config, warm=warm, layer=layer, restrict=restrict)
        return {m: a.scaled(s_out, s_in) for m, a in found.items()}
    span = block.sample_span() if restrict else None
    on_span = [m for m in names if span is not None and METHODS[m].span_invariant]
    out: dict[str, Approximation] = {}
    if on_span:
        assert span is not None
        built = _approximate_all(span.block, on_span, config, restricted_warm_starts(warm, span), layer)
        out.update({m: a.lifted(span) for m, a in built.items()})
    rest = [m for m in names if m not in on_span]
    if rest:
        out.update(_approximate_all(block, rest, config, warm, layer))
    return {m: out[m] for m in names}


def _approximate_all(
    block: ExactBlock, names: Sequence[str], config: ApproxConfig | None, warm: WarmStarts | None, layer: str
) -> dict[str, Approximation]:
    """:func:`approximate_all` on ``block`` as given: the registry walk."""
    cfg = config or ApproxConfig()
    starts = warm or {}
    built: dict[str, Approximation] = {}

    def start_of(name: str) -> tuple[Tensor, ...]:
        return tuple(w.on(None) if isinstance(w, SpanMatrix) else w for w in starts.get(name, ()))

    def build(name: str) -> Approximation:
        if name not in built:
            spec = METHODS[name]
            for reused in spec.reuses:
                build(reused)
            warm_start = start_of(name)
            if not warm_start:  # a reused first stage starts where its user's first term left off
                warm_start = next((start_of(s.name)[:1] for s in METHODS.values() if name in s.reuses), ())
            context = MethodContext(warm_start, {r: built[r] for r in spec.reuses}, layer)
            clock = time.perf_counter()
            built[name] = _as_approximation(name, spec.build(block, cfg, context), block, time.perf_counter() - clock)
        return built[name]

    return {name: build(name) for name in names}
