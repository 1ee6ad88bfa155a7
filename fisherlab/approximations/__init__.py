"""Kronecker approximations of one exact Fisher block: KFAC, KPSVD, deflation, Lanczos,
KFAC-corrected (K §2.2, §3.1-3.3), one module per family, in the method registry.

Each is a stateless function of an :class:`~fisherlab.fisher.ExactBlock` that returns an
:class:`Approximation`: the :class:`~fisherlab.kron.KronSum` plus the solver's iteration
count and convergence flag, and the vectors to warm-start the next snapshot with (K §4).

- :mod:`~fisherlab.approximations.base`: :class:`Approximation`, warm starts, the shared start
  vectors and Kronecker terms, and :func:`approximate_all` (the registry walk);
- :mod:`~fisherlab.approximations.deflated`: the second Kronecker term of a deflated block;
- :mod:`~fisherlab.approximations.kfac_family`: ``kfac_factors``, ``kfac``, ``kfac_corrected`` (← KFAC);
- :mod:`~fisherlab.approximations.kronecker_svd_family`: ``kpsvd``, ``deflation`` (← KPSVD);
- :mod:`~fisherlab.approximations.lanczos_family`: ``lanczos``.

Each family module declares its :class:`~fisherlab.method_registry.MethodSpec` (name, builder,
what it reuses); they are registered here, in the papers' order: the order of ``all`` and of the
``method`` coordinate. A method of one's own is registered with
:func:`~fisherlab.method_registry.register_method` (or ``register(MethodSpec(...))``).
"""

from __future__ import annotations

from fisherlab.approximations.base import (
    Approximation,
    SpanMatrix,
    WarmStarts,
    approximate_all,
    restricted_warm_starts,
    warm_starts,
)
from fisherlab.approximations.base import (
    _scaled_gram as _scaled_gram,
)
from fisherlab.approximations.kfac_family import KFAC, KFAC_CORRECTED, kfac, kfac_corrected, kfac_factors
from fisherlab.approximations.kronecker_svd_family import DEFLATION, KPSVD, deflation, kpsvd
from fisherlab.approximations.lanczos_family import LANCZOS, lanczos
from fisherlab.method_registry import METHODS as METHODS
from fisherlab.method_registry import ApproxConfig, register
from fisherlab.method_registry import MethodContext as MethodContext
from fisherlab.method_registry import MethodSpec as MethodSpec
from fisherlab.method_registry import register_method as register_method
from fisherlab.method_registry import resolve_methods as resolve_methods
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

for _spec in (KFAC, KPSVD, DEFLATION, LANCZOS, KFAC_CORRECTED):  # the papers' order
    register(_spec)
