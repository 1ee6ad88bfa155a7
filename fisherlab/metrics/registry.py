"""The registry every stored variable of a probe snapshot is declared in, one shape for all of them.

Each entry is a :class:`~fisherlab.vocabulary.Variable` (name, dims, long name, units, definition,
dtype) of one of four kinds, by what it is a quantity of:

* :class:`BlockMetric` in :data:`BLOCK_METRICS`: one (layer, method) pair,
  ``compute(reference, approximation)`` (the errors of :mod:`~fisherlab.metrics.error1` and
  :mod:`~fisherlab.metrics.error2`, the solvers' diagnostics);
* :class:`LayerMetric` in :data:`LAYER_METRICS`: the exact block of one layer, ``compute(reference)``;
* :class:`NetworkMetric` in :data:`NETWORK_METRICS`: the whole network's Fisher (all layers, cross
  blocks included), computed together by the run option that turns them on (two-level, T §4.4);
* :class:`RunMetric` in :data:`RUN_METRICS`: the training run itself (loss, timings), measured by
  the probe loop.

The probe loop computes every entry, the results schema (:mod:`fisherlab.results`), the figures'
labels and the CLI help are generated from them; adding a metric is adding one entry here (and its test).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fisherlab.approximations import Approximation
from fisherlab.metrics.error1 import FROBENIUS_MEMORY_LIMIT, FROBENIUS_RECOMPUTE_BELOW, FROBENIUS_WORK_LIMIT, _frobenius
from fisherlab.metrics.error2 import SPECTRAL_MEMORY_LIMIT, SPECTRAL_WORK_LIMIT, _spectral
from fisherlab.metrics.reference import BlockReference
from fisherlab.metrics.usage import CG_RTOL, KL_DENSE_SIDE, kl_divergence, scale_free_error, solve_error
from fisherlab.vocabulary import Variable

__all__ = [
    "BLOCK_METRICS",
    "LAYER_METRICS",
    "NETWORK_METRICS",
    "PER_LAYER",
    "PER_METHOD",
    "PER_SPACE",
    "RUN_METRICS",
    "BlockMetric",
    "LayerMetric",
    "NetworkMetric",
    "RunMetric",
]

PER_METHOD = ("iteration", "layer", "method")
PER_LAYER = ("iteration", "layer")
PER_SPACE = ("iteration", "coarse_space")
PER_NETWORK_METHOD = ("iteration", "method")


@dataclass(frozen=True)
class BlockMetric(Variable):
    """A quantity of one (layer, method) pair: ``compute(reference, approximation) -> float``.

    ``error`` metrics compare the approximation with the exact block: they can be chosen with
    ``--metrics``, are NaN (with a warning) where the block is zero, and are drawn by
    :func:`fisherlab.plots.error_figure`. An ``always`` error metric is computed whatever
    ``--metrics`` says (it costs nothing beyond error 1).
    """

    compute: Callable[[BlockReference, Approximation], float] = field(default=lambda ref, a: math.nan, repr=False)
    error: bool = False
    cli_note: str = ""
    accompanies: str = ""  # an error metric this one belongs to: NaN whenever that one is skipped
    always: bool = False  # an error metric computed whatever --metrics says


@dataclass(frozen=True)
class LayerMetric(Variable):
    """A quantity of the exact block of one layer: ``compute(reference) -> float``."""

    compute: Callable[[BlockReference], float] = field(default=lambda ref: math.nan, repr=False)
    power: int = 0  # F scaled by c scales this by c**power (multiplied back after ExactBlock.normalised)


@dataclass(frozen=True)
class NetworkMetric(Variable):
    """A quantity of the whole network's Fisher at one snapshot (all probed layers, cross blocks
    included), stored when the run ``option`` is on and computed together with the others of that
    option (``two_level``: :func:`fisherlab.twolevel.two_level_metrics`)."""

    option: str = "two_level"


@dataclass(frozen=True)
class RunMetric(Variable):
    """A quantity of the training run itself at one snapshot (its loss, timings), measured by the
    probe loop around the probe pass."""


BLOCK_METRICS: tuple[BlockMetric, ...] = (
    BlockMetric(
        "frobenius_error",
        PER_METHOD,
        "error 1 (relative Frobenius)",
        "1",
        "||F - F_hat||_F / ||F||_F (K Sec. 4.1); NaN where the block is zero "
        "(fisher_frobenius_norm = 0: undefined, a warning says so)",
        compute=lambda ref, a: _frobenius(ref, a.operator).value,
        error=True,
        cli_note="always computed",
    ),
    BlockMetric(
        "frobenius_error_resolution",
        PER_METHOD,
        "resolution of error 1",
        "1",
        "|frobenius_error - exact| <= this (to rounding): 0 when F - F_hat was formed before squaring (always below "
        f"{FROBENIUS_RECOMPUTE_BELOW:g}, in float32 always, within {FROBENIUS_WORK_LIMIT:.0e} flops and "
        f"{FROBENIUS_MEMORY_LIMIT / 2**20:.0f} MiB), else the rounding of "
        "||F||^2 - 2 <F, F_hat> + ||F_hat||^2, which cancels when F_hat ~ F (about sqrt(eps) relative)",
        compute=lambda ref, a: _frobenius(ref, a.operator).resolution,
        accompanies="frobenius_error",
    ),
    BlockMetric(
        "spectral_error",
        PER_METHOD,
        "error 2 (relative spectral)",
        "1",
        "||spec(F) - spec(F_hat)||_2 / ||spec(F)||_2, spectra sorted descending (K Sec. 4.1); see attr spectrum; "
        "NaN when not in attr metrics",
        compute=lambda ref, a: _spectral(ref, a.operator).value,
        error=True,
        cli_note="Kronecker-rank-2 methods need the top eigenvalues of a d_out d_in-sided matrix; bounded in memory",
    ),
    BlockMetric(
        "spectral_error_bound",
        PER_METHOD,
        "bound on the error of error 2",
        "1",
        "|spectral_error - exact error 2 of F_hat| <= this, never 0: rounding of the formula and the eigenvalues and "
        "the eigensolver's residuals, plus the interval the unknown small eigenvalues leave when only the "
        f"largest fit in the eigensolver's memory or work limit ({SPECTRAL_MEMORY_LIMIT / 2**30:.0f} GiB and "
        f"{SPECTRAL_WORK_LIMIT:.0e} flops on CPU; a warning says so), inf when none did (value NaN)",
        compute=lambda ref, a: _spectral(ref, a.operator).bound,
        accompanies="spectral_error",
    ),
    BlockMetric(
        "scale_free_error",
        PER_METHOD,
        "scale-free error 1",
        "1",
        "min_c ||F - c F_hat||_F / ||F||_F = sqrt(1 - <F, F_hat>^2 / (||F||^2 ||F_hat||^2)): error 1 up to the best "
        "scale c* = <F, F_hat> / ||F_hat||^2, shape without scale; where F_hat is nearly proportional to F, error 1 "
        "of c* F_hat by its non-cancelling route",
        compute=lambda ref, a: scale_free_error(ref, a.operator),
        error=True,
        always=True,
        cli_note="always computed, from error 1's products",
    ),
    BlockMetric(
        "solve_error",
        PER_METHOD,
        "error of the damped solve",
        "1",
        "||(F_hat + lambda I)^-1 grad - (F + lambda I)^-1 grad|| / ||(F + lambda I)^-1 grad||, grad the layer's "
        "mini-batch gradient, lambda the attr damping: the error of the natural-gradient direction; exact side by "
        "Woodbury on the per-sample factors, F_hat's in closed form in an eigenbasis, else conjugate gradients to "
        f"{CG_RTOL:g}; NaN when not in attr metrics",
        compute=lambda ref, a: solve_error(ref, a.operator, a.method),
        error=True,
        cli_note="uses --damping and the batch gradient; conjugate gradients for Kronecker-rank-2 methods",
    ),
    BlockMetric(
        "kl_divergence",
        PER_METHOD,
        "KL divergence of the Laplace posteriors",
        "nat",
        "KL(N(0, (F + lambda I)^-1) || N(0, (F_hat + lambda I)^-1)) = 1/2 [tr((F_hat + lambda)(F + lambda)^-1) - D "
        "+ ln det(F + lambda) - ln det(F_hat + lambda)], exact posterior first, lambda the attr damping; NaN when "
        "not in attr metrics, and where the eigenvalues of F_hat have no closed form and its side exceeds "
        f"{KL_DENSE_SIDE} or F_hat + lambda I is indefinite (a warning says why)",
        compute=lambda ref, a: kl_divergence(ref, a.operator, a.method),
        error=True,
        cli_note="uses --damping; NaN where F_hat's eigenvalues are neither closed-form nor small enough",
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
        "max over stages of ||R^T x - s y|| / s, R the (deflated) rearranged block and s the singular value the "
        "stage computes (Lanczos: / s_1)",
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
        "||K||_F / N, K the Gram matrix; inf where it exceeds float64 (a warning says so)",
        compute=lambda ref: float(ref.norm_squared.sqrt()),
        power=1,
    ),
)

PER_SPACE = ("iteration", "coarse_space")
PER_NETWORK_METHOD = ("iteration", "method")

#: Whole-network variables of two-level runs (``--two-level``, T §4.4), computed together by
#: :func:`fisherlab.twolevel.two_level_metrics`; ``coarse_space`` includes ``tko``.
NETWORK_METRICS: tuple[NetworkMetric, ...] = (
    NetworkMetric(
        "gap",
        PER_SPACE,
        "E(beta*) - E(0)",
        "1",
        "<F_coarse beta, beta> - 2 <R0^T beta, r_KFAC> (T eq. 4.6); beta_TKO for coarse_space tko",
    ),
    NetworkMetric(
        "energy_error",
        PER_SPACE,
        "relative energy-norm error of the two-level increment",
        "1",
        "||zeta_2L - zeta||_F* / ||zeta||_F*, zeta = (F + lambda I)^-1 grad h exact (Woodbury)",
    ),
    NetworkMetric(
        "cosine", PER_SPACE, "cosine(zeta_2L, zeta)", "1", "Euclidean cosine with the exact damped natural gradient"
    ),
    NetworkMetric("energy_two_level", PER_SPACE, "E(beta*)", "1", "||zeta_2L - zeta||^2_F* computed directly"),
    NetworkMetric(
        "block_energy_error",
        PER_NETWORK_METHOD,
        "relative energy-norm error, block-diagonal method",
        "1",
        "||zeta_m - zeta||_F* / ||zeta||_F*, zeta_m[i] = (approximation_i + pi-damping)^-1 grad_i h",
    ),
    NetworkMetric(
        "block_cosine", PER_NETWORK_METHOD, "cosine(zeta_m, zeta), block-diagonal method", "1", "Euclidean cosine"
    ),
    NetworkMetric("energy_kfac", ("iteration",), "E(0)", "1", "||zeta_KFAC - zeta||^2_F* (T eq. 4.2)"),
    NetworkMetric(
        "energy_natural_gradient",
        ("iteration",),
        "||zeta||^2_F*",
        "1",
        "squared energy norm of the exact damped natural gradient",
    ),
)


#: Variables of every probe snapshot besides the Fisher's: the training run itself.
RUN_METRICS: tuple[RunMetric, ...] = (
    RunMetric(
        "train_loss",
        ("iteration",),
        "training loss",
        "1",
        "mean over the batch of the per-sample loss (summed over outputs)",
    ),
    RunMetric("wall_time", ("iteration",), "wall time since start", "s", "wall clock at the end of the snapshot"),
    RunMetric("probe_time", ("iteration",), "probe pass time", "s", "forward + backward passes of the probe"),
)
