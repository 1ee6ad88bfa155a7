"""The method registry: every approximation fisherlab can build, by name.

A method is a :class:`MethodSpec`: its name (the ``method`` coordinate of the dataset), a
builder, what it reuses (deflation ← KPSVD, KFAC-corrected ← KFAC: built first on the same
block and handed over) and whether it may be built on the block restricted to the span of its
per-sample factors (``span_invariant``: every factor is a sum of per-sample products, so the
restricted build lifted back is the same approximation). :func:`fisherlab.approximate_all`
walks the registry; the probe loop, ``evaluate_block``, ``FisherProbe`` and the CLI take any
registered name.

A researcher scores an approximation of their own with :func:`register_method`::

    def my_diagonal(block, config):
        return fl.DenseBlockOperator(torch.diag(torch.diagonal(block.as_dense())))

    fl.register_method("my_diagonal", my_diagonal)
    fl.evaluate_block(block, ["kfac", "my_diagonal"])

or, from the command line, ``fisherlab probe --methods kfac,my_pkg.module:my_diagonal``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fisherlab._errors import FisherlabError
from fisherlab.vocabulary import BlockStructure

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "METHODS",
    "ApproxConfig",
    "MethodContext",
    "MethodSpec",
    "method_names",
    "not_applicable",
    "register_method",
    "resolve_methods",
    "unregister_method",
]


@dataclass(frozen=True)
class ApproxConfig:
    """Settings of the iterative methods, shared by the probe run, ``evaluate_block`` and the optimizers.

    Its defaults are the only ones: :class:`~fisherlab.config.ProbeConfig` and the CLI flags
    (``--tol``, ``--max-iter``, ``--lanczos-rank``, ``--krylov-dim``) take theirs from here.

    Args:
        tol: Relative residual tolerance of power SVD and Lanczos (K: ``ε = 1e-6``).
        max_iter: Power SVD iteration cap per stage; reaching it warns (``ConvergenceWarning``).
        lanczos_rank: Kronecker rank of the Lanczos method.
        krylov_dim: Krylov dimension per Lanczos restart cycle (at least ``lanczos_rank + 2`` is used).
        max_restarts: Cap on Lanczos restart cycles.
        lowrank_rank: Rank ``k`` of the ``lowrank`` method (the top-``k`` eigenpairs of the block).

    Raises:
        FisherlabError: A tolerance outside ``(0, 1)`` or caps below 1 (``krylov_dim`` below 2).
    """

    tol: float = 1e-6
    max_iter: int = 500
    lanczos_rank: int = 2
    krylov_dim: int = 20
    max_restarts: int = 50
    lowrank_rank: int = 10

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tol) and 0 < self.tol < 1):
            raise FisherlabError(f"--tol must lie in (0, 1), got {self.tol}")
        if self.max_iter < 1 or self.lanczos_rank < 1 or self.krylov_dim < 2 or self.max_restarts < 1:
            raise FisherlabError("--max-iter and --lanczos-rank must be at least 1, --krylov-dim at least 2")
        if self.lowrank_rank < 1:
            raise FisherlabError(f"--lowrank-rank must be at least 1, got {self.lowrank_rank}")


@dataclass(frozen=True)
class MethodContext:
    """What a builder gets besides the block and the solver settings.

    Args:
        warm: This method's warm starts from the previous snapshot (K §4); empty on the first.
        built: The approximations it declared in ``reuses``, already built on the same block.
        layer: The layer's name, for warnings.
    """

    warm: tuple[Tensor, ...] = ()
    built: Mapping[str, Any] = field(default_factory=dict)
    layer: str = ""


#: ``build(block, config, context)``: an ``Approximation`` (with solver diagnostics) or any block operator.
Builder = Callable[[Any, Any, MethodContext], Any]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Args:
        name: The ``method`` coordinate (``[a-z0-9_]``, unique).
        build: ``build(block, config, context)`` returning an ``Approximation`` or a block operator
            (:class:`~fisherlab.operators.BlockOperator`; a :class:`~fisherlab.block_operators.DenseBlockOperator`
            gets its shape from the block).
        long_name: For legends and ``fisherlab info``.
        family: Groups methods in figures (``kfac``, ``kronecker_svd``, ``lanczos``, ``user``, ...).
        reuses: Methods built first on the same block and passed in ``context.built``.
        span_invariant: Whether building it on the sample-span restriction and lifting it back gives
            the same operator (true when every factor is a sum of per-sample products). ``False`` is
            always safe: the method is then built on the whole block.
        structures: The block structures it applies to (:class:`~fisherlab.vocabulary.BlockStructure`
            values): ``kronecker`` only by default; ``diagonal`` and ``lowrank`` add ``elementwise``
            (LayerNorm, RMSNorm). On a block of another structure it is not built and its errors are
            NaN with the reason (:func:`not_applicable`).
    """

    name: str
    build: Builder
    long_name: str = ""
    family: str = "user"
    reuses: tuple[str, ...] = ()
    span_invariant: bool = False
    structures: tuple[str, ...] = (BlockStructure.KRONECKER.value,)

    def __post_init__(self) -> None:
        known = {s.value for s in BlockStructure}
        bad = [s for s in self.structures if str(getattr(s, "value", s)) not in known]
        if bad or not self.structures:
            raise FisherlabError(
                f"method {self.name!r}: structures must be a non-empty subset of {sorted(known)}, got {self.structures}"
            )
        object.__setattr__(self, "structures", tuple(str(getattr(s, "value", s)) for s in self.structures))

    def applies_to(self, structure: BlockStructure | str) -> bool:
        """Whether the method is built on blocks of this structure."""
        return str(getattr(structure, "value", structure)) in self.structures


#: Every registered method, in registration order (the papers' five first).
METHODS: dict[str, MethodSpec] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c == "_" for c in name):
        raise FisherlabError(f"a method name is a non-empty identifier ([A-Za-z0-9_]), got {name!r}")
    return name


def register(spec: MethodSpec, *, overwrite: bool = False) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (its reuses must be registered already)."""
    _check_name(spec.name)
    if spec.name in METHODS and not overwrite:
        raise FisherlabError(f"method {spec.name!r} is already registered (pass overwrite=True to replace it)")
    missing = [r for r in spec.reuses if r not in METHODS]
    if missing:
        raise FisherlabError(f"method {spec.name!r} reuses unregistered methods: {', '.join(missing)}")
    narrower = [r for r in spec.reuses if not set(spec.structures) <= set(METHODS[r].structures)]
    if narrower:
        raise FisherlabError(
            f"method {spec.name!r} applies to {', '.join(spec.structures)} blocks but reuses {', '.join(narrower)}, "
            "which does not"
        )
    METHODS[spec.name] = spec
    return spec


def register_method(
    name: str,
    build: Callable[[Any, Any], Any],
    *,
    long_name: str = "",
    span_invariant: bool = False,
    structures: tuple[str, ...] = (BlockStructure.KRONECKER.value,),
    overwrite: bool = False,
) -> MethodSpec:
    """Register an approximation of one's own, scored like the built-in ones everywhere.

    Args:
        name: Its ``method`` coordinate.
        build: ``build(block, config) -> operator`` with ``block`` an :class:`~fisherlab.fisher.ExactBlock`
            (per-sample factors, ``as_dense()`` for small layers) and ``config`` the
            :class:`~fisherlab.approximations.ApproxConfig`; the operator follows
            :class:`~fisherlab.operators.BlockOperator` (``matvec`` on ``[..., d_out, d_in]``,
            ``frobenius_norm_squared``, ``as_dense``; ``eigenvalues()`` and ``solve`` where it has them),
            e.g. :class:`~fisherlab.block_operators.DenseBlockOperator` for a small layer.
        long_name: For legends (default: ``name``).
        span_invariant: See :class:`MethodSpec` (leave ``False`` unless you know).
        structures: The block structures it applies to (default ``("kronecker",)``; add ``"elementwise"`` for
            a method that makes sense on the per-parameter blocks of LayerNorm and RMSNorm).
        overwrite: Replace a method of the same name.

    Returns:
        The registered :class:`MethodSpec`.
    """
    if not callable(build):
        raise FisherlabError(f"register_method({name!r}, build): build must be callable, got {type(build).__name__}")

    def builder(block: Any, config: Any, context: MethodContext) -> Any:
        return build(block, config)

    spec = MethodSpec(name, builder, long_name or name, "user", (), span_invariant, tuple(structures))
    return register(spec, overwrite=overwrite)


def unregister_method(name: str) -> None:
    """Remove a method (and nothing that reuses it may stay registered)."""
    users = [s.name for s in METHODS.values() if name in s.reuses]
    if users:
        raise FisherlabError(f"method {name!r} is reused by {', '.join(users)}; unregister those first")
    METHODS.pop(name, None)


def not_applicable(names: Iterable[str], structure: BlockStructure | str) -> dict[str, str]:
    """``{method: why}`` for the registered methods among ``names`` that do not apply to blocks of ``structure``."""
    value = str(getattr(structure, "value", structure))
    article = "an" if value[:1] in "aeiou" else "a"
    exact = value == BlockStructure.ELEMENTWISE.value
    why = " (a Kronecker factorisation of per-parameter gradient vectors is trivially exact)" if exact else ""
    return {
        name: f"{name} applies to {' and '.join(METHODS[name].structures)} blocks, not to {article} {value} block{why}"
        for name in names
        if not METHODS[name].applies_to(value)
    }


def method_names() -> tuple[str, ...]:
    """Every registered method's name."""
    return tuple(METHODS)


def _load(reference: str) -> str:
    """Import ``package.module:attribute`` and register what it names; returns the method's name."""
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FisherlabError(f"--methods {reference}: cannot import {module_name!r} ({err})") from None
    obj = getattr(module, attribute, None)
    if obj is None:
        raise FisherlabError(f"--methods {reference}: module {module_name!r} has no attribute {attribute!r}")
    if isinstance(obj, MethodSpec):
        if obj.name not in METHODS or METHODS[obj.name] is not obj:
            register(obj, overwrite=True)
        return obj.name
    if attribute in METHODS:  # the module registered it on import, or an earlier call did
        return attribute
    register_method(attribute, obj)
    return attribute


def resolve_methods(names: Iterable[object]) -> tuple[str, ...]:
    """Method names from names, enum members, ``all`` (every registered method) or
    ``package.module:attribute`` (imported and registered), in order, without repeats.

    Raises:
        FisherlabError: An unknown name.
    """
    out: list[str] = []
    for item in names:
        value = getattr(item, "value", item)
        if not isinstance(value, str):
            raise FisherlabError(f"a method is named by a string, got {item!r}")
        found = list(METHODS) if value == "all" else [_load(value) if ":" in value else value]
        for name in found:
            if name not in METHODS:
                raise FisherlabError(
                    f"unknown methods [{name!r}]; choose from: {', '.join(METHODS)}, all, or package.module:attribute"
                )
            if name not in out:
                out.append(name)
    return tuple(out)
