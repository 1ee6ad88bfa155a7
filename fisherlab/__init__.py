"""fisherlab: how well cheap Kronecker approximations match the exact Fisher of a network.

Public API, grouped by pipeline stage (losses → probe → exact Fisher → approximations →
metrics → two-level → config → results → run → figures).
"""

import sys as _sys


def _interrupted_at_start(kind: type[BaseException], value: BaseException, tb: object) -> None:
    """Ctrl-C while the ``fisherlab`` command still imports: one line, no traceback (exit 130 stays)."""
    if issubclass(kind, KeyboardInterrupt):
        print("fisherlab: interrupted", file=_sys.stderr)
    else:
        _sys.__excepthook__(kind, value, tb)  # type: ignore[arg-type]


_argv0 = (getattr(_sys, "argv", None) or [""])[0]
if _argv0 == "-m" or _argv0.endswith(("/fisherlab", "\\fisherlab", "fisherlab.exe")):
    _sys.excepthook = _interrupted_at_start  # `python -m fisherlab` / the console script, not an importing program

from fisherlab import layer_kinds, methods, optim, twolevel  # registers the layer kinds and the zoo (ekfac, ...)
from fisherlab._errors import ConvergenceWarning, FisherlabError
from fisherlab._version import __version__ as __version__
from fisherlab.approximations import (
    PAPER_METHODS,
    ApproxConfig,
    Approximation,
    Method,
    approximate_all,
    deflation,
    kfac,
    kfac_corrected,
    kpsvd,
    lanczos,
    warm_starts,
)
from fisherlab.block_operators import DenseBlockOperator, DiagonalBlockOperator, EigenbasisDiagonal, LowRankOperator
from fisherlab.config import ProbeConfig, TrainConfig
from fisherlab.dashboards import snapshot_scalars
from fisherlab.fisher import ExactBlock, WholeFisher, cross_block_dense, full_fisher_dense
from fisherlab.fisher_probe import FisherProbe
from fisherlab.kron import KronSum, pi_damping
from fisherlab.krylov import SingularTriplets, lanczos_svd, power_svd
from fisherlab.layers import LayerFactors, LayerKind, register_layer_kind
from fisherlab.losses import FisherKind, LossKind
from fisherlab.method_registry import METHODS, MethodSpec, register_method, unregister_method
from fisherlab.metrics import (
    BLOCK_METRICS,
    BlockEvaluation,
    BlockReference,
    SpectralLimits,
    Spectrum,
    evaluate_block,
    frobenius_error,
    spectral_error,
)
from fisherlab.operators import BlockDiagonal
from fisherlab.probe import Probe, ProbeSnapshot
from fisherlab.probe_loop import probe_training, run_probe
from fisherlab.problems import PROBLEMS, get_problem
from fisherlab.results import load
from fisherlab.store_registry import STORES, ResultStore, register_store
from fisherlab.vocabulary import BlockStructure

__all__ = [  # noqa: RUF022 (grouped by pipeline stage, not sorted)
    # probe
    "FisherKind",
    "LossKind",
    "Probe",
    "ProbeSnapshot",
    "LayerFactors",
    "LayerKind",
    "register_layer_kind",
    "BlockStructure",
    # exact Fisher
    "ExactBlock",
    "WholeFisher",
    "BlockDiagonal",
    "cross_block_dense",
    "full_fisher_dense",
    # approximations
    "ApproxConfig",
    "Approximation",
    "KronSum",
    "DenseBlockOperator",
    "DiagonalBlockOperator",
    "EigenbasisDiagonal",
    "LowRankOperator",
    "Method",
    "METHODS",
    "MethodSpec",
    "PAPER_METHODS",
    "register_method",
    "unregister_method",
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
    "warm_starts",
    # metrics
    "BLOCK_METRICS",
    "BlockReference",
    "SpectralLimits",
    "Spectrum",
    "frobenius_error",
    "spectral_error",
    "BlockEvaluation",
    "evaluate_block",
    # runs and results
    "PROBLEMS",
    "FisherProbe",
    "ProbeConfig",
    "TrainConfig",
    "get_problem",
    "load",
    "probe_training",
    "run_probe",
    "snapshot_scalars",
    "STORES",
    "ResultStore",
    "register_store",
    # modules
    "layer_kinds",
    "methods",
    "optim",
    "twolevel",
    # errors
    "ConvergenceWarning",
    "FisherlabError",
]


def __getattr__(name: str) -> object:
    """``fisherlab.lightning`` and ``fisherlab.hf`` on first use, so that ``import fisherlab`` never
    imports Lightning or ``transformers``."""
    if name in ("lightning", "hf"):
        import importlib

        return importlib.import_module(f"fisherlab.{name}")
    raise AttributeError(f"module 'fisherlab' has no attribute {name!r}")
