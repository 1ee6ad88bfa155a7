"""The vocabulary: the names of every choice fisherlab offers, and nothing that computes.

Settings (:mod:`fisherlab.config`), storage (:mod:`fisherlab.results`) and provenance import
these names without importing the machinery that implements them. Every enum is a ``str``
enum whose values are what the CLI takes and the dataset stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

__all__ = [
    "DEFAULT_METRICS",
    "ERROR_METRICS",
    "OPTIMIZER_NAMES",
    "PAPER_METHODS",
    "TKO",
    "Accumulation",
    "BaseOptimizer",
    "BlockStructure",
    "CoarseSpace",
    "FisherKind",
    "LossKind",
    "Method",
    "Precision",
    "ProblemKind",
    "Spectrum",
    "Variable",
]


class Method(str, Enum):
    """Approximation methods; the values are the ``method`` coordinate of the dataset."""

    KFAC = "kfac"
    KPSVD = "kpsvd"
    DEFLATION = "deflation"
    LANCZOS = "lanczos"
    KFAC_CORRECTED = "kfac_corrected"


class FisherKind(str, Enum):
    """How the output directions are chosen (see the module docstring)."""

    MC = "mc"
    EXACT = "exact"
    EMPIRICAL = "empirical"


class LossKind(str, Enum):
    """Negative log-likelihoods on the network output ``z`` (logits for bce and ce).

    ``mse``: Gaussian with unit variance, ``L = ½||y - z||²``; ``bce``: independent
    Bernoulli with ``p = sigmoid(z)`` (a sigmoid output layer with binary cross entropy);
    ``ce``: categorical with ``p = softmax(z)`` over the last dim, integer targets; a sequence
    model's logits ``[N, T, C]`` with targets ``[N, T]`` are ``T`` categoricals per sample
    (next-token prediction), their losses summed.

    The language-model losses take Hugging Face's conventions: ``causal_lm``: logits
    ``[N, T, C]`` and labels ``[N, T]``, position ``t`` predicts label ``t + 1`` (HF's shift:
    ``logits[:, :-1]`` against ``labels[:, 1:]``), labels ``-100`` carry no loss, and the per-sample
    loss is the *sum* of the token losses of the sequence (``N`` = sequences; README: how this
    relates to HF's mean over tokens); ``seq_cls``: sequence classification, logits ``[N, C]``,
    labels ``[N]`` (``ce`` on one categorical per sequence).
    """

    MSE = "mse"
    BCE = "bce"
    CE = "ce"
    CAUSAL_LM = "causal_lm"
    SEQ_CLS = "seq_cls"


class Spectrum(str, Enum):
    """What "spectrum" means in error 2 (stored in the dataset attribute ``spectrum``).

    ``eigenvalues`` follows the paper's text; ``singular_values`` (absolute eigenvalues,
    the same for PSD matrices) follows the authors' public code. They differ only for
    indefinite Kronecker-rank-2 approximations.
    """

    EIGENVALUES = "eigenvalues"
    SINGULAR_VALUES = "singular_values"


class CoarseSpace(str, Enum):
    """Coarse spaces of T §3.3 (values are the dataset's ``coarse_space`` coordinate).

    ``tko`` is the Tselepidis-Kohler-Orvieto variant (T §4.4): the Nicolaides basis with ``β_TKO``
    of T eq. 4.7b and ``F_coarse`` of eq. 3.18 instead of ``β*`` of eq. 3.11.
    """

    NICOLAIDES = "nicolaides"
    SPECTRAL = "spectral"
    KRYLOV_NICOLAIDES = "krylov_nicolaides"
    RESIDUALS = "residuals"
    KRYLOV_RESIDUALS = "krylov_residuals"
    TAYLOR = "taylor"
    TKO = "tko"


#: The value of :attr:`CoarseSpace.TKO`, for code that compares strings.
TKO: str = CoarseSpace.TKO.value


class BlockStructure(str, Enum):
    """How a layer's per-sample gradient is built from its factors (:mod:`fisherlab.layers`).

    ``kronecker``: ``DW_nv = Σ_t g_nvt a_ntᵀ`` with inputs ``a`` and output derivatives ``g`` of their
    own sizes (Linear, Conv2d, Conv1D, Embedding): the block is a sum of Kronecker products and the
    Kronecker methods apply. ``elementwise``: the layer scales its input elementwise (LayerNorm,
    RMSNorm), its per-sample gradient is a vector ``u_nv`` of its own, written ``g = u``, ``a = 1``: a
    Kronecker method on it would be trivially exact, so only the methods that declare this
    structure (``MethodSpec.structures``: ``diagonal``, ``lowrank``) are built.
    """

    KRONECKER = "kronecker"
    ELEMENTWISE = "elementwise"


class BaseOptimizer(str, Enum):
    """The independent optimizer that trains the network during a probe run."""

    SGD = "sgd"
    ADAM = "adam"


class Precision(str, Enum):
    """The floating-point precision of training (``dtype``)."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype."""
        return torch.float64 if self == Precision.FLOAT64 else torch.float32


class Accumulation(str, Enum):
    """The precision of the probe's factors and of the sums over them (``accumulate``).

    ``mixed`` (the default): the per-sample factors (exact copies of the model's values) and
    every quantity of the exact block and of the metrics in float64, but KFAC's second moments
    ``A`` and ``G`` summed in the precision the model computed them in. Their rounding
    (about 1e-7 relative in float32) moves error 1 by far less than any approximation error
    it measures, and the sums take half the time of float64 ones (benchmarks/bench_peers.py).
    ``float64``: every sum in float64. ``float32``: everything in float32 (fastest; error 1
    then has a floor near 1e-3 from cancellation).
    """

    MIXED = "mixed"
    FLOAT64 = "float64"
    FLOAT32 = "float32"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored factors and of the metrics."""
        return torch.float32 if self == Accumulation.FLOAT32 else torch.float64

    @property
    def moments_in_capture_dtype(self) -> bool:
        """Whether KFAC's second moments are summed in the model's precision."""
        return self == Accumulation.MIXED


class ProblemKind(str, Enum):
    """Where a problem's training targets come from (:meth:`Problem.targets`)."""

    AUTOENCODER = "autoencoder"  # the inputs
    CLASSIFIER = "classifier"  # the data's class labels
    LANGUAGE = "language"  # the next character of a text window
    TEACHER = "teacher"  # a fixed random linear map of Gaussian inputs


@dataclass(frozen=True)
class Variable:
    """A stored variable of the results dataset: name, dims and its netCDF attributes."""

    name: str
    dims: tuple[str, ...]
    long_name: str
    units: str
    definition: str
    dtype: str = "float64"


#: Every optimizer ``fisherlab train`` and :func:`fisherlab.optim.make_optimizer` take.
OPTIMIZER_NAMES: tuple[str, ...] = (
    "sgd",
    "adam",
    *(m.value for m in Method),
    *(f"kfac2l_{c.value}" for c in CoarseSpace),
)


#: The papers' five methods: the default ``--methods`` of every run.
PAPER_METHODS: tuple[str, ...] = tuple(m.value for m in Method)

#: The error metrics of :data:`fisherlab.metrics.BLOCK_METRICS` (``--metrics`` chooses among them;
#: ``frobenius_error`` and ``scale_free_error`` always): their names, for settings that must not import
#: the metrics.
ERROR_METRICS: tuple[str, ...] = (
    "frobenius_error",
    "spectral_error",
    "scale_free_error",
    "solve_error",
    "kl_divergence",
)

#: The error metrics computed unless ``--metrics`` says otherwise (the solve error and the KL divergence are opt-in).
DEFAULT_METRICS: tuple[str, ...] = ("frobenius_error", "spectral_error")
