"""Errors of an approximation against the exact block, without dense blocks (K §4.1), and the
registry every stored variable is declared in: one module per job, in the order a snapshot uses them.

* :mod:`~fisherlab.metrics.reference`: :class:`BlockReference`, the exact block's quantities shared
  by all methods (``||F||_F²``, its eigenvalues on first use).
* :mod:`~fisherlab.metrics.error1`: error 1, ``||F - F̂||_F / ||F||_F`` with
  ``||F - F̂||² = ||F||² - 2 <F, F̂> + ||F̂||²`` (Gram matrix, K Prop. 3.1 products, and
  ``||sum out_k ⊗ in_k||² = sum <out_k,out_l><in_k,in_l>``), and the non-cancelling route where the
  expansion cancels.
* :mod:`~fisherlab.metrics.error2`: error 2, ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` with both
  spectra sorted descending. ``F`` has at most ``r = min(N V, D)`` nonzero eigenvalues, all ``>= 0``, so
  ``sum_i (λ_i - μ_i)² = sum_{i<=r} (λ_i - μ_i)² + ||F̂||_F² - sum_{i<=r} μ_i²`` needs only the ``r``
  largest eigenvalues of ``F̂``; the eigensolver's limits are a :class:`SpectralLimits` argument.
* :mod:`~fisherlab.metrics.usage`: metrics that match how approximations are used: the scale-free
  error ``min_c ||F - c F̂||_F / ||F||_F``, the error of the damped solve ``(F̂ + λI)⁻¹ ∇`` and the KL
  divergence of the Laplace posteriors ``N(0, (F + λI)⁻¹)`` and ``N(0, (F̂ + λI)⁻¹)``.
* :mod:`~fisherlab.metrics.registry`: every stored variable, per (layer, method)
  (:data:`BLOCK_METRICS`), per layer (:data:`LAYER_METRICS`), of the whole network
  (:data:`NETWORK_METRICS`) and of the run (:data:`RUN_METRICS`), one :class:`~fisherlab.vocabulary.Variable`
  shape; adding a metric is adding one entry there (and its test).
* :mod:`~fisherlab.metrics.evaluate`: :func:`evaluate_block`, restrict → approximate → measure → lift.
"""

from __future__ import annotations

from fisherlab.metrics.error1 import (
    FROBENIUS_MEMORY_LIMIT,
    FROBENIUS_RECOMPUTE_BELOW,
    FROBENIUS_WORK_LIMIT,
    FrobeniusError,
    frobenius_error,
    frobenius_error_resolved,
    inner_with_block,
)
from fisherlab.metrics.error2 import (
    SPECTRAL_ATOL,
    SPECTRAL_DENSE_SIDE,
    SPECTRAL_GPU_MEMORY_FRACTION,
    SPECTRAL_GPU_WORK_LIMIT,
    SPECTRAL_MEMORY_LIMIT,
    SPECTRAL_RTOL,
    SPECTRAL_THREADS,
    SPECTRAL_WORK_LIMIT,
    SpectralError,
    SpectralLimits,
    spectral_error,
    spectral_error_bounded,
    spectral_limits,
    spectral_threads,
)
from fisherlab.metrics.evaluate import BlockEvaluation, evaluate_block
from fisherlab.metrics.reference import BlockReference
from fisherlab.metrics.registry import (
    BLOCK_METRICS,
    LAYER_METRICS,
    NETWORK_METRICS,
    PER_LAYER,
    PER_METHOD,
    RUN_METRICS,
    BlockMetric,
    LayerMetric,
    NetworkMetric,
    RunMetric,
)
from fisherlab.metrics.usage import (
    approximation_eigenvalues,
    damped_solve,
    exact_damped_solve,
    kl_divergence,
    scale_free_error,
    solve_error,
)
from fisherlab.vocabulary import DEFAULT_METRICS, ERROR_METRICS, Spectrum, Variable

__all__ = [
    "BLOCK_METRICS",
    "DEFAULT_METRICS",
    "ERROR_METRICS",
    "FROBENIUS_MEMORY_LIMIT",
    "FROBENIUS_RECOMPUTE_BELOW",
    "FROBENIUS_WORK_LIMIT",
    "LAYER_METRICS",
    "NETWORK_METRICS",
    "PER_LAYER",
    "PER_METHOD",
    "RUN_METRICS",
    "SPECTRAL_ATOL",
    "SPECTRAL_DENSE_SIDE",
    "SPECTRAL_GPU_MEMORY_FRACTION",
    "SPECTRAL_GPU_WORK_LIMIT",
    "SPECTRAL_MEMORY_LIMIT",
    "SPECTRAL_RTOL",
    "SPECTRAL_THREADS",
    "SPECTRAL_WORK_LIMIT",
    "BlockEvaluation",
    "BlockMetric",
    "BlockReference",
    "FrobeniusError",
    "LayerMetric",
    "NetworkMetric",
    "RunMetric",
    "SpectralError",
    "SpectralLimits",
    "Spectrum",
    "Variable",
    "approximation_eigenvalues",
    "damped_solve",
    "evaluate_block",
    "exact_damped_solve",
    "frobenius_error",
    "frobenius_error_resolved",
    "inner_with_block",
    "kl_divergence",
    "scale_free_error",
    "solve_error",
    "spectral_error",
    "spectral_error_bounded",
    "spectral_limits",
    "spectral_threads",
]
