"""fisherlab: how well cheap Kronecker approximations match the exact Fisher of a network.

Public API, grouped by pipeline stage (probe → exact Fisher → approximations → metrics →
results → figures).
"""

from fisherlab import optim, twolevel
from fisherlab._errors import ConvergenceWarning, FisherlabError
from fisherlab.approximations import (
    Approximation,
    Method,
    approximate_all,
    deflation,
    kfac,
    kfac_corrected,
    kpsvd,
    lanczos,
)
from fisherlab.fisher import ExactBlock, cross_block_dense, full_fisher_dense
from fisherlab.kron import KronSum, pi_damping
from fisherlab.krylov import SingularTriplets, lanczos_svd, power_svd
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, Spectrum, frobenius_error, spectral_error
from fisherlab.probe import FisherKind, LossKind, Probe, ProbeSnapshot
from fisherlab.problems import PROBLEMS, get_problem
from fisherlab.results import load
from fisherlab.run import BlockEvaluation, ProbeConfig, evaluate_block, probe_training, run_probe

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 (grouped by pipeline stage, not sorted)
    # probe
    "FisherKind",
    "LossKind",
    "Probe",
    "ProbeSnapshot",
    "LayerFactors",
    # exact Fisher
    "ExactBlock",
    "cross_block_dense",
    "full_fisher_dense",
    # approximations
    "Approximation",
    "KronSum",
    "Method",
    "approximate_all",
    "deflation",
    "kfac",
    "kfac_corrected",
    "kpsvd",
    "lanczos",
    "lanczos_svd",
    "pi_damping",
    "power_svd",
    "SingularTriplets",
    # metrics
    "BlockReference",
    "Spectrum",
    "frobenius_error",
    "spectral_error",
    "BlockEvaluation",
    "evaluate_block",
    # runs and results
    "PROBLEMS",
    "ProbeConfig",
    "get_problem",
    "load",
    "probe_training",
    "run_probe",
    # modules
    "optim",
    "twolevel",
    # errors
    "ConvergenceWarning",
    "FisherlabError",
]
