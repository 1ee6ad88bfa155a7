"""Errors of an approximation against the exact block, without dense blocks (K §4.1), and
the registry every stored metric is declared in.

* error 1: ``||F - F̂||_F / ||F||_F`` with
  ``||F - F̂||² = ||F||² - 2 <F, F̂> + ||F̂||²`` (Gram matrix, K Prop. 3.1 products, and
  ``||sum out_k ⊗ in_k||² = sum <out_k,out_l><in_k,in_l>``).
* error 2: ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` with both spectra sorted descending.
  ``F`` has at most ``r = min(N V, D)`` nonzero eigenvalues, all ``>= 0``, so
  ``sum_i (λ_i - μ_i)² = sum_{i<=r} (λ_i - μ_i)² + ||F̂||_F² - sum_{i<=r} μ_i²`` needs only
  the ``r`` largest eigenvalues of ``F̂``.

**The registry.** Every per-(layer, method) and per-layer quantity of a probe snapshot is one
entry of :data:`BLOCK_METRICS` / :data:`LAYER_METRICS`: its name, dims, long name, units,
definition and the function that computes it. The probe loop computes every entry, the
results schema (:mod:`fisherlab.results`), the figures' labels and the CLI help are generated
from them; adding a metric is adding one entry here (and its test).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import ApproxConfig, Approximation, Method, WarmStarts, approximate_all
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum

__all__ = [
    "BLOCK_METRICS",
    "ERROR_METRICS",
    "LAYER_METRICS",
    "PER_LAYER",
    "PER_METHOD",
    "BlockEvaluation",
    "BlockMetric",
    "BlockReference",
    "LayerMetric",
    "Spectrum",
    "Variable",
    "evaluate_block",
    "frobenius_error",
    "spectral_error",
]

PER_METHOD = ("iteration", "layer", "method")
PER_LAYER = ("iteration", "layer")


class Spectrum(str, Enum):
    """What "spectrum" means in error 2 (stored in the dataset attribute ``spectrum``).

    ``eigenvalues`` follows the paper's text; ``singular_values`` (absolute eigenvalues,
    the same for PSD matrices) follows the authors' public code. They differ only for
    indefinite Kronecker-rank-2 approximations.
    """

    EIGENVALUES = "eigenvalues"
    SINGULAR_VALUES = "singular_values"


@dataclass(frozen=True)
class BlockReference:
    """Quantities of the exact block computed once per snapshot and shared by all methods.

    Args:
        block: The exact block.
        norm_squared: ``||F||_F²``.
        eigenvalues: The ``r = block.max_rank`` largest eigenvalues of ``F``, descending.
        spectrum: What error 2 compares (:class:`Spectrum`).
    """

    block: ExactBlock
    norm_squared: Tensor
    eigenvalues: Tensor
    spectrum: Spectrum = Spectrum.EIGENVALUES

    @classmethod
    def of(cls, block: ExactBlock, *, spectrum: Spectrum | str = Spectrum.EIGENVALUES) -> BlockReference:
        """Compute the Gram matrix once; derive ``||F||_F²`` and the spectrum from it."""
        gram = block.gram()
        n = block.factors.n_samples
        return cls(block, torch.sum(gram * gram) / n**2, block.eigenvalues(), Spectrum(spectrum))


def frobenius_error(ref: BlockReference, approx: KronSum) -> Tensor:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), from factors only.

    Returns 0-d tensor; ``nan`` when ``F = 0``.
    """
    sq = ref.norm_squared - 2 * ref.block.inner(approx) + approx.frobenius_norm_squared()
    return torch.sqrt(torch.clamp(sq, min=0) / ref.norm_squared)


def spectral_error(ref: BlockReference, approx: KronSum, *, spectrum: Spectrum | None = None) -> Tensor:
    """Error 2, ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` (K §4.1), sorted descending.

    Only the ``r`` largest eigenvalues of ``F̂`` are computed (exact products of factor
    eigenvalues for a single Kronecker product).

    Args:
        ref: The exact block's norm and spectrum.
        approx: The approximation.
        spectrum: Eigenvalues (the paper's text) or singular values; default ``ref.spectrum``.
    """
    spectrum = ref.spectrum if spectrum is None else Spectrum(spectrum)
    lam = ref.eigenvalues.clamp(min=0)
    mu = approx.eigenvalues(top=lam.numel(), by_magnitude=spectrum == Spectrum.SINGULAR_VALUES)
    r = mu.numel()
    head = torch.sum((lam[:r] - mu) ** 2) + torch.sum(lam[r:] ** 2)
    tail = torch.clamp(approx.frobenius_norm_squared() - torch.sum(mu**2), min=0)
    return torch.sqrt((head + tail) / torch.sum(lam**2))


# -- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """A stored variable of the results dataset: name, dims and its netCDF attributes."""

    name: str
    dims: tuple[str, ...]
    long_name: str
    units: str
    definition: str
    dtype: str = "float64"


@dataclass(frozen=True)
class BlockMetric(Variable):
    """A quantity of one (layer, method) pair: ``compute(reference, approximation) -> float``.

    ``error`` metrics compare the approximation with the exact block: they can be chosen with
    ``--metrics``, are NaN (with a warning) where the block is zero, and are drawn by
    :func:`fisherlab.plots.error_figure`.
    """

    compute: Callable[[BlockReference, Approximation], float] = field(default=lambda ref, a: math.nan, repr=False)
    error: bool = False
    cli_note: str = ""


@dataclass(frozen=True)
class LayerMetric(Variable):
    """A quantity of the exact block of one layer: ``compute(reference) -> float``."""

    compute: Callable[[BlockReference], float] = field(default=lambda ref: math.nan, repr=False)


BLOCK_METRICS: tuple[BlockMetric, ...] = (
    BlockMetric(
        "frobenius_error",
        PER_METHOD,
        "error 1 (relative Frobenius)",
        "1",
        "||F - F_hat||_F / ||F||_F (K Sec. 4.1); NaN where the block is zero "
        "(fisher_frobenius_norm = 0: undefined, a warning says so)",
        compute=lambda ref, a: float(frobenius_error(ref, a.kron)),
        error=True,
        cli_note="always computed",
    ),
    BlockMetric(
        "spectral_error",
        PER_METHOD,
        "error 2 (relative spectral)",
        "1",
        "||spec(F) - spec(F_hat)||_2 / ||spec(F)||_2, spectra sorted descending (K Sec. 4.1); see attr spectrum; "
        "NaN when not in attr metrics",
        compute=lambda ref, a: float(spectral_error(ref, a.kron)),
        error=True,
        cli_note="Kronecker-rank-2 methods need the top eigenvalues of a d_out d_in-sided matrix",
    ),
    BlockMetric(
        "solver_iterations",
        PER_METHOD,
        "solver iterations",
        "1",
        "products with R(F) (mv+rmv pairs); 0 for kfac",
        compute=lambda ref, a: a.iterations,
        dtype="int32",
    ),
    BlockMetric(
        "converged",
        PER_METHOD,
        "solver converged",
        "1",
        "1 if every iterative stage met tol, else 0",
        compute=lambda ref, a: int(a.converged),
        dtype="int8",
    ),
    BlockMetric(
        "solver_residual",
        PER_METHOD,
        "relative solver residual",
        "1",
        "max_k ||R(F)^T x_k - s_k y_k|| / s_1",
        compute=lambda ref, a: a.residual,
    ),
    BlockMetric(
        "approximation_time",
        PER_METHOD,
        "time to build the approximation",
        "s",
        "wall clock",
        compute=lambda ref, a: a.seconds,
    ),
)

LAYER_METRICS: tuple[LayerMetric, ...] = (
    LayerMetric(
        "fisher_frobenius_norm",
        PER_LAYER,
        "||F||_F of the exact block",
        "1",
        "||K||_F / N, K the Gram matrix",
        compute=lambda ref: float(ref.norm_squared.sqrt()),
    ),
)

#: Names of the error metrics (``--metrics`` chooses among them; ``frobenius_error`` always).
ERROR_METRICS: tuple[str, ...] = tuple(m.name for m in BLOCK_METRICS if m.error)


@dataclass(frozen=True)
class BlockEvaluation:
    """Approximations of one exact block and every registered metric of them (K §4.1).

    Args:
        approximations: Per method.
        values: ``values[metric][method]`` for every :data:`BLOCK_METRICS` entry (NaN for an
            error metric not asked for, or undefined).
        layer_values: ``layer_values[metric]`` for every :data:`LAYER_METRICS` entry.
    """

    approximations: dict[Method, Approximation]
    values: dict[str, dict[Method, float]]
    layer_values: dict[str, float]

    @property
    def frobenius_errors(self) -> dict[Method, float]:
        """Error 1 per method."""
        return self.values["frobenius_error"]

    @property
    def spectral_errors(self) -> dict[Method, float]:
        """Error 2 per method (NaN when not computed)."""
        return self.values["spectral_error"]

    @property
    def times(self) -> dict[Method, float]:
        """Seconds to build each approximation."""
        return {m: a.seconds for m, a in self.approximations.items()}

    @property
    def fisher_norm(self) -> float:
        """``||F||_F``."""
        return self.layer_values["fisher_frobenius_norm"]


def evaluate_block(
    block: ExactBlock,
    methods: Sequence[Method | str] | None = None,
    config: ApproxConfig | None = None,
    *,
    spectrum: Spectrum | str = Spectrum.EIGENVALUES,
    metrics: Sequence[str] = ERROR_METRICS,
    warm: WarmStarts | None = None,
    layer: str = "",
) -> BlockEvaluation:
    """Build every approximation of ``block`` and compute every registered metric of each.

    The Gram matrix (hence ``||F||_F`` and the spectrum) is computed once and shared. Error
    metrics not in ``metrics`` are stored as NaN (error 2 of Kronecker-rank-2 methods is the
    one cost that grows like ``(d_out d_in)^3``). A zero block warns once
    (:class:`UndefinedMetricWarning`) and gives NaN errors.
    """
    methods = list(Method) if methods is None else [Method(m) for m in methods]
    ref = BlockReference.of(block, spectrum=spectrum)
    approx = approximate_all(block, methods, config, warm=warm, layer=layer)
    zero = not float(ref.norm_squared) > 0
    if zero:
        warnings.warn(
            f"the exact Fisher block of layer {layer!r} is zero (no gradient reaches it: dead or saturated units); "
            "error 1 and error 2 are undefined there and stored as NaN (fisher_frobenius_norm = 0)",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    values: dict[str, dict[Method, float]] = {}
    for metric in BLOCK_METRICS:
        skip = metric.error and (zero or metric.name not in metrics)
        values[metric.name] = {m: math.nan if skip else float(metric.compute(ref, a)) for m, a in approx.items()}
    layer_values = {metric.name: float(metric.compute(ref)) for metric in LAYER_METRICS}
    return BlockEvaluation(approx, values, layer_values)
