"""Kronecker approximations of one exact Fisher block: KFAC, KPSVD, deflation, Lanczos,
KFAC-corrected (K §2.2, §3.1-3.3).

Each is a stateless function of an :class:`~fisherlab.fisher.ExactBlock` that returns an
:class:`Approximation`: the :class:`~fisherlab.kron.KronSum` plus the solver's iteration
count and convergence flag, and the vectors to warm-start the next snapshot with (K §4).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fisherlab._errors import ConvergenceWarning, FisherlabError
from fisherlab.block_operators import DenseBlockOperator, LiftedOperator, ScaledOperator
from fisherlab.distributed import all_reduce_sum
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.krylov import SingularTriplets, lanczos_svd, power_svd
from fisherlab.layers import LayerFactors
from fisherlab.method_registry import METHODS, ApproxConfig, MethodContext, MethodSpec, register, resolve_methods
from fisherlab.sample_span import SampleSpan, SpanMatrix, restricted_warm_starts
from fisherlab.vocabulary import PAPER_METHODS, Method

__all__ = [
    "PAPER_METHODS",
    "ApproxConfig",
    "Approximation",
    "Method",
    "SpanMatrix",
    "WarmStarts",
    "approximate_all",
    "deflation",
    "kfac",
    "kfac_corrected",
    "kfac_factors",
    "kpsvd",
    "lanczos",
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
        if span.in_basis is None:
            return replace(self, operator=operator)
        k_in = span.block.d_in
        warm = tuple(SpanMatrix(span.in_basis, w) if w.shape == (k_in, k_in) else w for w in self.warm_start)
        return replace(self, operator=operator, warm_start=warm)


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
        return kfac_factors(block).ins[0].to(ref.dtype) / block.factors.n_positions
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


def _deflated(block: ExactBlock, term: KronSum) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Products with ``R(F - sum_k out_k ⊗ in_k)``: subtract ``<vec in_, y> vec out`` (K §3.2.1)."""

    def mv(y: Tensor) -> Tensor:
        r = block.rearranged_matvec(y)
        for o, i in zip(term.outs, term.ins, strict=True):
            r = r - torch.sum(i * y) * o
        return r

    def rmv(x: Tensor) -> Tensor:
        r = block.rearranged_rmatvec(x)
        for o, i in zip(term.outs, term.ins, strict=True):
            r = r - torch.sum(o * x) * i
        return r

    return mv, rmv


#: Rounding noise of the deflated products ``R(F) y - <in_, y> out``, in units of ``eps ||first term||_F``:
#: a second stage whose residual is below it has converged as far as the arithmetic allows.
DEFLATION_NOISE = 100


def kfac_factors(block: ExactBlock | LayerFactors) -> KronSum:
    """KFAC ``G ⊗ A`` with ``A = (1/N) sum_{n,t} a a^T``, ``G = (1/(N T)) sum_{n,v,t} g g^T``.

    For ``T = 1`` this is ``E[g g^T] ⊗ E[ā ā^T]`` (K eq. 1); for conv layers the KFC
    factors of Grosse & Martens (2016) as written in T eq. (2.27). The sums run in
    ``factors.moment_dtype`` when set (the ``mixed`` accumulation: the model's precision) and
    ``A``, ``G`` are returned in it, as a KFAC optimizer uses them; :func:`kfac` casts them to
    the factors' compute dtype for the metrics.
    """
    factors = block.factors if isinstance(block, ExactBlock) else block
    a, g = factors.a, factors.g
    n, t = factors.n_samples, a.shape[1]
    work = factors.moment_dtype or factors.dtype
    a2 = a.reshape(-1, a.shape[-1]).to(work)
    g2 = g.reshape(-1, g.shape[-1]).to(work)
    with torch.autocast(a.device.type, enabled=False):  # a caller's autocast would sum float32 in bfloat16
        gg = all_reduce_sum(_scaled_gram(g2, 1 / (n * t)), factors.shard)
        aa = all_reduce_sum(_scaled_gram(a2, 1 / n), factors.shard)
    return KronSum((gg,), (aa,))


def _scaled_gram(x: Tensor, scale: float) -> Tensor:
    """``scale · xᵀx`` with the scaling inside the GEMM, made exactly symmetric.

    A GEMM does not sum ``(i, j)`` and ``(j, i)`` in the same order (float32 sums differed by
    up to 2.4e-7), and eigensolvers read one triangle while norms read all entries: error 2 of
    KFAC came out ×4.8 too large. ``(m + mᵀ) / 2`` is exactly symmetric (addition commutes).
    """
    m = torch.addmm(x.new_zeros(()), x.T, x, beta=0, alpha=scale)
    return _symmetric(m)


def kfac(block: ExactBlock) -> Approximation:
    """KFAC: ``G ⊗ A`` with ``A = E[ā ā^T]``, ``G = E[g g^T]`` (K eq. 1; KFC for conv), see :func:`kfac_factors`.

    References:
        Martens & Grosse (2015); Grosse & Martens (2016); Koroko et al. (2022), Sec. 2.2.
    """
    start = time.perf_counter()
    kron = kfac_factors(block).to(block.factors.dtype)
    return Approximation(Method.KFAC.value, kron, 0, True, 0.0, seconds=time.perf_counter() - start)


def kpsvd(
    block: ExactBlock, *, tol: float = 1e-6, max_iter: int = 200, warm_start: tuple[Tensor, ...] = (), layer: str = ""
) -> Approximation:
    """Best single Kronecker product: ``argmin ||F - G ⊗ A||_F`` (K eq. 3).

    Power SVD (K Alg. 1) on the rearranged block ``R(F)`` with the matrix-free products of
    K Prop. 3.1; ``F`` is never formed. The factors are symmetric and, with the sign chosen
    so that ``tr(A) >= 0``, positive semidefinite (K Prop. 3.2).

    Args:
        block: The exact Fisher block.
        tol: Relative residual tolerance of the power SVD (K: ``ε = 1e-6``).
        max_iter: Iteration cap; reaching it warns with :class:`ConvergenceWarning`.
        warm_start: ``Approximation.warm_start`` of the previous snapshot.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.1, Thm. 3.1, Prop. 3.1-3.2, App. B.1.
    """
    start = time.perf_counter()
    trip = power_svd(
        block.rearranged_matvec, block.rearranged_rmatvec, _start(block, warm_start), tol=tol, max_iter=max_iter
    )
    _report(Method.KPSVD, trip, layer)
    kron = _terms(trip)
    return Approximation(
        Method.KPSVD.value,
        kron,
        trip.iterations,
        trip.converged,
        trip.residual,
        trip.rights,
        time.perf_counter() - start,
    )


def _corrected(
    method: Method,
    block: ExactBlock,
    first: Approximation,
    *,
    tol: float,
    max_iter: int,
    warm_start: tuple[Tensor, ...],
    layer: str,
) -> Approximation:
    start = time.perf_counter()
    mv, rmv = _deflated(block, first.kron)
    # The residual is relative to the term being computed (σ₂), not to the first term: relative
    # to σ₁ a small correction passed with a poor second term (KFAC-corrected error 1 +29%).
    # Only where σ₂ is at the rounding noise of the deflated products does σ₁ set the scale.
    noise = DEFLATION_NOISE * torch.finfo(block.factors.dtype).eps * float(first.kron.frobenius_norm())
    trip = power_svd(mv, rmv, _start(block, warm_start, 1), tol=tol, max_iter=max_iter, scale=noise / tol)
    _report(method, trip, layer)
    first_start = first.warm_start[:1] or (_start(block, ()),)
    kron = first.kron + _terms(trip)
    return Approximation(
        method.value,
        kron,
        first.iterations + trip.iterations,
        first.converged and trip.converged,
        max(first.residual, trip.residual),
        first_start + trip.rights,
        first.seconds + time.perf_counter() - start,
    )


def deflation(
    block: ExactBlock,
    *,
    tol: float = 1e-6,
    max_iter: int = 200,
    warm_start: tuple[Tensor, ...] = (),
    first: Approximation | None = None,
    layer: str = "",
) -> Approximation:
    """Kronecker rank 2 by deflation: KPSVD, then KPSVD of ``F - R ⊗ S`` (K §3.2.1).

    Best Kronecker rank 2 with symmetric factors (for conv layers an antisymmetric pair can
    do better; see :func:`lanczos`).

    Args:
        block: The exact Fisher block.
        tol: Relative residual tolerance of both power SVDs.
        max_iter: Iteration cap of each power SVD.
        warm_start: ``Approximation.warm_start`` of the previous snapshot's deflation.
        first: An already computed :func:`kpsvd` of the same block, reused as first term.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.2.1.
    """
    if first is None:
        first = kpsvd(block, tol=tol, max_iter=max_iter, warm_start=warm_start[:1], layer=layer)
    return _corrected(Method.DEFLATION, block, first, tol=tol, max_iter=max_iter, warm_start=warm_start, layer=layer)


def kfac_corrected(
    block: ExactBlock,
    *,
    tol: float = 1e-6,
    max_iter: int = 200,
    warm_start: tuple[Tensor, ...] = (),
    first: Approximation | None = None,
    layer: str = "",
) -> Approximation:
    """KFAC plus the best Kronecker corrector: ``argmin ||F - G⊗A - Q⊗P||_F`` (K eq. 6).

    References:
        Koroko et al. (2022), Sec. 3.3.
    """
    first = kfac(block) if first is None else first
    return _corrected(
        Method.KFAC_CORRECTED, block, first, tol=tol, max_iter=max_iter, warm_start=warm_start, layer=layer
    )


def lanczos(
    block: ExactBlock,
    *,
    rank: int = 2,
    krylov_dim: int = 20,
    tol: float = 1e-6,
    max_restarts: int = 50,
    warm_start: tuple[Tensor, ...] = (),
    layer: str = "",
) -> Approximation:
    """Kronecker rank ``k`` by restarted Lanczos bidiagonalization of ``R(F)`` (K §3.2.2).

    The top ``rank`` singular triplets ``(σ_k, u_k, v_k)`` give the terms
    ``√σ_k MAT(u_k) ⊗ √σ_k MAT(v_k)``: the best Kronecker-rank-``k`` approximation for a
    Linear layer. For a conv layer (``T > 1``) ``R(F)`` also has singular vectors with
    antisymmetric factors; starting from a symmetric vector the iteration stays among the
    symmetric ones, so the result is the best approximation *with symmetric factors* (an
    antisymmetric⊗antisymmetric pair can do better: 13% of random conv blocks in issue 11).
    The same holds for :func:`deflation` and :func:`kfac_corrected`; the dataset attribute
    ``symmetric_factors`` records it.

    Args:
        block: The exact Fisher block.
        rank: Kronecker rank ``k >= 1``.
        krylov_dim: Krylov dimension per restart cycle (at least ``rank + 2``).
        tol: Relative residual tolerance.
        max_restarts: Cap on restart cycles; reaching it warns.
        warm_start: ``Approximation.warm_start`` of the previous snapshot.
        layer: Layer name used in warnings.

    References:
        Koroko et al. (2022), Sec. 3.2.2, App. B.2 (Algorithm 2).
    """
    if rank < 1:
        raise FisherlabError(f"Lanczos rank must be at least 1, got {rank}")
    clock = time.perf_counter()
    start = _start(block, warm_start)
    if len(warm_start) > 1:  # restart direction of K §3.2.2: a combination of singular vectors
        combined = sum(warm_start[1:], start)
        start = combined if _usable(combined) else start
    trip = lanczos_svd(
        block.rearranged_matvec,
        block.rearranged_rmatvec,
        start,
        rank=rank,
        krylov_dim=max(krylov_dim, rank + 2),
        tol=tol,
        max_restarts=max_restarts,
    )
    _report(Method.LANCZOS, trip, layer)
    kron = _terms(_padded(trip, rank))
    return Approximation(
        Method.LANCZOS.value,
        kron,
        trip.iterations,
        trip.converged,
        trip.residual,
        trip.rights,
        time.perf_counter() - clock,
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


def _build_kfac(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return kfac(block)


def _build_kpsvd(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return kpsvd(block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, layer=context.layer)


def _build_deflation(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    first = context.built[Method.KPSVD.value]
    return deflation(
        block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, first=first, layer=context.layer
    )


def _build_lanczos(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    return lanczos(
        block,
        rank=config.lanczos_rank,
        krylov_dim=config.krylov_dim,
        tol=config.tol,
        max_restarts=config.max_restarts,
        warm_start=context.warm,
        layer=context.layer,
    )


def _build_kfac_corrected(block: ExactBlock, config: ApproxConfig, context: MethodContext) -> Approximation:
    first = context.built[Method.KFAC.value]
    return kfac_corrected(
        block, tol=config.tol, max_iter=config.max_iter, warm_start=context.warm, first=first, layer=context.layer
    )


for _spec in (
    MethodSpec("kfac", _build_kfac, "KFAC (expand)", "kfac", span_invariant=True),
    MethodSpec("kpsvd", _build_kpsvd, "KPSVD", "kronecker_svd", span_invariant=True),
    MethodSpec("deflation", _build_deflation, "deflation", "kronecker_svd", ("kpsvd",), span_invariant=True),
    MethodSpec("lanczos", _build_lanczos, "Lanczos", "lanczos", span_invariant=True),
    MethodSpec("kfac_corrected", _build_kfac_corrected, "KFAC-corrected", "kfac", ("kfac",), span_invariant=True),
):
    register(_spec)


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
        FisherlabError: An unknown method name (a ``ValueError``).
    """
    names = resolve_methods(methods)
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
