"""Run configurations and device choice: what ``fisherlab probe`` and ``fisherlab train`` take.

Fields are typed (enums for every choice), so a ``--config`` JSON file, the CLI flags and the
Python API are checked alike; each config is stored whole as JSON in the dataset attribute
``config_json``. Each field also carries its command-line flag (:class:`Flag` in the field's metadata:
the help, and where needed a metavar or the registry its values come from); :mod:`fisherlab.cli` generates
``fisherlab probe`` and ``fisherlab train``'s flags from the fields, so a field, its flag, default, type and
help are written once. The configs are frozen and validated once, on construction (a changed copy is
made with :func:`dataclasses.replace`, which validates the copy); validation raises
:class:`~fisherlab.FisherlabError` with the flag's name and what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from fisherlab._errors import FisherlabError
from fisherlab.method_registry import ApproxConfig, resolve_methods
from fisherlab.vocabulary import (
    DEFAULT_METRICS,
    ERROR_METRICS,
    OPTIMIZER_NAMES,
    PAPER_METHODS,
    Accumulation,
    BaseOptimizer,
    CoarseSpace,
    FisherKind,
    Precision,
    Spectrum,
)

__all__ = [
    "ApproxConfig",
    "BaseOptimizer",
    "Flag",
    "Precision",
    "ProbeConfig",
    "TrainConfig",
    "apply_threads",
    "select_device",
]


def _enum_tuple(kind: type[Enum], values: tuple, what: str) -> tuple:
    unknown = [v for v in values if v not in {e.value for e in kind}]
    if unknown or not values:
        raise FisherlabError(f"unknown {what} {unknown}; choose from: {', '.join(str(e.value) for e in kind)}")
    return tuple(kind(v) for v in values)


def _enum_value(kind: type[Enum], value: object) -> Enum:
    try:
        return kind(value)
    except ValueError:
        raise FisherlabError(
            f"unknown {kind.__name__} {value!r}; choose one of: {', '.join(str(e.value) for e in kind)}"
        ) from None


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line, in the field's ``metadata["flag"]``.

    :mod:`fisherlab.cli` makes ``--flag-name`` from the field's name, the default from the field's
    default and the type from its annotation (``int``, ``float``, ``str``; ``bool`` a switch; an enum with
    its values shown as choices; a tuple comma-separated); the rest is said here. A field without a flag
    says why in ``metadata["no_flag"]``.

    Attributes:
        help: The flag's help. ``{default}`` is replaced by the default (enums by their values, tuples
            comma-separated) and ``{choices}`` by the accepted values: an enum's, or the listing named by
            ``choices``.
        choices: The registry whose names a ``str`` field takes, by its name in the CLI's listings
            (``problems``, ``sizes``, ``methods``, ``metrics``): registries later than the configs, read when the
            parser is built, so the help lists what is registered then.
        metavar: The value's placeholder in the help (default: argparse's, the flag's name in capitals; an
            enum's values in braces).
        default_none: The flag's default is None, resolved by the CLI, not the field's (``--layers``: the
            problem's default layers).
        zero_disables: ``0`` on the command line means None (``--kl-clip 0``).
    """

    help: str
    choices: str | None = None
    metavar: str | None = None
    default_none: bool = False
    zero_disables: bool = False


def _flag(help: str, **flag: Any) -> dict[str, Flag]:
    """A config field's metadata: its :class:`Flag` (``flag``: the settings beside the help)."""
    return {"flag": Flag(help, **flag)}


# help shared by both configs' flags
_DATA_DIR = "directory with the real data files (MNIST IDX, FACES/CURVES .mat); default: embedded data, no download"
_BATCH_SIZE = "default: the paper's (curves 256, mnist 512, faces 1024)"
_DEVICE = "auto | cpu | cuda | cuda:N (default: auto = CUDA when available)"
_SEED = "seed of initialisation, data order and MC targets (default: {default})"
_THREADS = "CPU threads of torch (default: torch's choice, one per core)"


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe run needs; stored as JSON in the dataset attribute ``config_json``.

    Defaults give the embedded CURVES problem, layer 5, in about 50 s on an idle 2-core CPU.
    String values of enum fields are accepted and converted, lists made tuples. Frozen: change a
    copy with :func:`dataclasses.replace`.

    Raises:
        FisherlabError: The first nonsensical value, with what was expected (on construction).
    """

    problem: str = field(
        default="curves",
        metadata=_flag("{choices} (default: {default}; embedded data, no download)", choices="problems"),
    )
    size: str | None = field(
        default=None,
        metadata=_flag(
            "model size of a problem that comes in several: {choices} (default: its first)", choices="sizes"
        ),
    )
    data_dir: str | None = field(default=None, metadata=_flag(_DATA_DIR))
    layers: tuple[str, ...] = field(
        default=("5",),
        metadata=_flag(
            "comma-separated layer numbers, 1 = first layer, or module paths (resnet18: layer4.0.conv2), all "
            "(every layer of a registered kind: embeddings and layer norms too) or trainable (those with a "
            "trainable parameter) (default: 5 for the auto-encoders)",
            default_none=True,
        ),
    )
    iterations: int = field(default=500, metadata=_flag("training iterations (default: {default})"))
    every: int = field(default=10, metadata=_flag("probe every k iterations (default: {default})"))
    optimizer: BaseOptimizer = field(
        default=BaseOptimizer.ADAM,
        metadata=_flag("the independent optimizer that trains the network (default: {default})"),
    )
    lr: float | None = field(default=None, metadata=_flag("learning rate (default: 1e-3 for adam, 1e-2 for sgd)"))
    batch_size: int | None = field(default=None, metadata=_flag(_BATCH_SIZE))
    fisher: FisherKind = field(
        default=FisherKind.MC,
        metadata=_flag(
            "the Fisher probed: mc (sampled targets), exact (expectation over the model's outputs) or empirical "
            "(the data's targets) (default: {default})"
        ),
    )
    approx_fisher: FisherKind | None = field(
        default=None,
        metadata=_flag(
            "build the approximations from this Fisher kind and score them against the exact block of --fisher "
            "(cross-kind scoring, attribute approx_fisher; default: --fisher's kind)"
        ),
    )
    mc_samples: int = field(default=1, metadata=_flag("target draws per input for --fisher mc (default: {default})"))
    methods: tuple[str, ...] = field(
        default=PAPER_METHODS,
        metadata=_flag(
            "comma-separated registered methods ({choices}), 'all', or package.module:attribute for one of your own "
            "(fisherlab.register_method); default: the papers' five",
            choices="methods",
        ),
    )
    spectrum: Spectrum = field(
        default=Spectrum.EIGENVALUES,
        metadata=_flag("eigenvalues (paper text) or singular_values (authors' code) for error 2 (default: {default})"),
    )
    metrics: tuple[str, ...] = field(
        default=DEFAULT_METRICS,
        metadata=_flag(
            "comma-separated error metrics, frobenius_error always included (default: {default}). {choices}",
            choices="metrics",
        ),
    )
    # the solver defaults are ApproxConfig's (one place)
    tol: float = field(
        default=ApproxConfig.tol, metadata=_flag("relative tolerance of power SVD and Lanczos (default: {default})")
    )
    max_iter: int = field(default=ApproxConfig.max_iter, metadata=_flag("power SVD iteration cap (default: {default})"))
    lanczos_rank: int = field(
        default=ApproxConfig.lanczos_rank, metadata=_flag("Kronecker rank of the Lanczos method (default: {default})")
    )
    krylov_dim: int = field(
        default=ApproxConfig.krylov_dim, metadata=_flag("Krylov dimension per Lanczos restart (default: {default})")
    )
    lowrank_rank: int = field(
        default=ApproxConfig.lowrank_rank,
        metadata=_flag("rank k of the lowrank method, the top-k eigenpairs of each block (default: {default})"),
    )
    device: str = field(default="auto", metadata=_flag(_DEVICE))
    dtype: Precision = field(default=Precision.FLOAT32, metadata=_flag("training dtype (default: {default})"))
    accumulate: Accumulation = field(
        default=Accumulation.MIXED,
        metadata=_flag(
            "precision of the probe's factors and sums: mixed (factors and metrics in float64, KFAC's moments "
            "in the model's precision), float64, or float32 (fastest, but error 1 then has a floor near 1e-3) "
            "(default: {default})"
        ),
    )
    seed: int = field(default=0, metadata=_flag(_SEED))
    store_factors: tuple[str, ...] = field(
        default=(),
        metadata=_flag("layers whose per-sample factors are stored at each snapshot, compressed, in the results file"),
    )
    two_level: bool = field(
        default=False,
        metadata=_flag(
            "also probe every layer and measure two-level KFAC (T): gaps E(beta*)-E(0), "
            "energy errors vs the exact natural gradient"
        ),
    )
    damping: float = field(
        default=1e-3,
        metadata=_flag(
            "lambda of F + lambda I (two-level, solve_error, kl_divergence) and of the pi-damped KFAC "
            "(default: {default})"
        ),
    )
    coarse_spaces: tuple[CoarseSpace, ...] = field(
        default=tuple(CoarseSpace), metadata=_flag("subset of {choices} (default: all)")
    )
    taylor_order: int = field(default=2, metadata=_flag("q of the Taylor coarse space (default: {default})"))
    threads: int | None = field(default=None, metadata=_flag(_THREADS))

    def __post_init__(self) -> None:
        """Convert (strings to enums, lists to tuples) and validate every setting, once."""
        convert = object.__setattr__  # frozen: the conversions happen here or nowhere
        for name, kind in (
            ("optimizer", BaseOptimizer),
            ("fisher", FisherKind),
            ("spectrum", Spectrum),
            ("dtype", Precision),
            ("accumulate", Accumulation),
        ):
            convert(self, name, _enum_value(kind, getattr(self, name)))
        if self.approx_fisher is not None:
            convert(self, "approx_fisher", _enum_value(FisherKind, self.approx_fisher))
        for name in ("layers", "metrics", "store_factors"):
            if isinstance(getattr(self, name), list):
                convert(self, name, tuple(getattr(self, name)))
        convert(self, "methods", resolve_methods(self.methods))
        if not self.methods:
            raise FisherlabError("--methods names no method")
        if self.coarse_spaces:
            convert(self, "coarse_spaces", _enum_tuple(CoarseSpace, tuple(self.coarse_spaces), "coarse spaces"))
        self._validate()

    @property
    def approx_kind(self) -> FisherKind:
        """The Fisher kind the approximations are built from (``approx_fisher``, default ``fisher``)."""
        return self.fisher if self.approx_fisher is None else self.approx_fisher

    def _validate(self) -> None:
        """Each setting on its own (:meth:`check` adds the loop's rule between two of them)."""
        _ = self.approx  # tolerance and caps: ApproxConfig validates its own fields
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise FisherlabError(f"--every must be a positive integer, got {self.every!r}")
        _check_seed(self.seed)
        if self.mc_samples < 1:
            raise FisherlabError(f"--mc-samples must be at least 1, got {self.mc_samples}")
        bad_metrics = [m for m in self.metrics if m not in ERROR_METRICS]
        if bad_metrics or "frobenius_error" not in self.metrics:
            raise FisherlabError(
                f"--metrics must include frobenius_error and may add {', '.join(ERROR_METRICS[1:])}; "
                f"got {list(self.metrics)}"
            )
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise FisherlabError(f"--damping must be finite and positive, got {self.damping}")
        if self.taylor_order < 1:
            raise FisherlabError(f"--taylor-order must be at least 1, got {self.taylor_order}")
        if self.iterations < 1:
            raise FisherlabError(f"--iterations must be a positive integer, got {self.iterations}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise FisherlabError(f"--lr must be finite and positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FisherlabError(f"--batch-size must be positive, got {self.batch_size}")
        _check_threads(self.threads)

    @property
    def approx(self) -> ApproxConfig:
        """The solver settings of the approximations."""
        return ApproxConfig(
            tol=self.tol,
            max_iter=self.max_iter,
            lanczos_rank=self.lanczos_rank,
            krylov_dim=self.krylov_dim,
            lowrank_rank=self.lowrank_rank,
        )

    def check(self) -> None:
        """The rule between settings that a run driving its own loop adds (:func:`~fisherlab.run.probe_training`,
        ``fisherlab probe``): ``every`` at most ``iterations``. :class:`~fisherlab.run.FisherProbe` inside a
        loop it does not drive ignores ``iterations``; every other setting was validated on construction.

        Raises:
            FisherlabError: ``--every`` larger than ``--iterations``.
        """
        if self.every > self.iterations:
            raise FisherlabError(
                f"--every ({self.every}) is larger than --iterations ({self.iterations}): "
                "only iteration 0 would be probed"
            )

    def check_store_factors(self) -> None:
        """``store_factors`` names probed layers: checked where the layers are resolved against the model
        (:class:`~fisherlab.run.FisherProbe`), since ``layers`` may say ``all`` or be given there.

        Raises:
            FisherlabError: A layer in ``store_factors`` that is not probed.
        """
        missing = [name for name in self.store_factors if name not in self.layers]
        if missing:
            raise FisherlabError(
                f"--store-factors names layers {missing} that are not probed ({', '.join(self.layers)})"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of a ``fisherlab train`` run (stored in ``config_json``).

    Frozen and validated on construction (change a copy with :func:`dataclasses.replace`).

    Raises:
        FisherlabError: The first nonsensical value, with what was expected.
    """

    problem: str = field(default="curves", metadata=_flag("{choices} (default: {default})", choices="problems"))
    data_dir: str | None = field(default=None, metadata=_flag(_DATA_DIR))
    optimizers: tuple[str, ...] = field(
        default=("sgd", "adam", "kfac", "kpsvd", "deflation"),
        metadata=_flag(
            "comma-separated: sgd, adam, kfac, kpsvd, deflation, lanczos, kfac_corrected, kfac2l_<coarse space> "
            "(tko included) (default: {default})"
        ),
    )
    epochs: int = field(default=3, metadata=_flag("epochs per optimizer (default: {default})"))
    batch_size: int | None = field(default=None, metadata=_flag(_BATCH_SIZE))
    lr: tuple[float, ...] = field(
        default=(),
        metadata=_flag(
            "one value, or several for a grid search (default: sgd 1e-2, adam 1e-3, Kronecker methods 1 with KL "
            "clipping)"
        ),
    )
    damping: tuple[float, ...] = field(
        default=(1e-2,), metadata=_flag("one value or a grid, Kronecker methods only (default: {default})")
    )
    weight_decay: float = field(default=1e-3, metadata=_flag("coupled L2 coefficient (default: {default})"))
    kl_clip: float | None = field(
        default=1e-2,
        metadata=_flag("KL clipping constant c (K App. E); 0 disables (default: {default})", zero_disables=True),
    )
    t1: int = field(default=5, metadata=_flag("refresh factors every T1 steps (default: {default})"))
    t2: int = field(
        default=20, metadata=_flag("refactorise the damped approximation every T2 steps (default: {default})")
    )
    patience: int = field(default=10, metadata=_flag("early stopping patience in epochs (default: {default})"))
    max_batches: int | None = field(
        default=None, metadata=_flag("cap on batches per epoch for quick runs (default: a whole epoch)")
    )
    eval_samples: int | None = field(
        default=None,
        metadata=_flag("training and validation losses on the first N images of each set (default: all; quick runs)"),
    )
    device: str = field(default="auto", metadata=_flag(_DEVICE))
    seed: int = field(default=0, metadata=_flag(_SEED))
    threads: int | None = field(default=None, metadata=_flag(_THREADS))

    def __post_init__(self) -> None:
        """Validate every setting, once."""
        for name in ("optimizers", "lr", "damping"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [o for o in self.optimizers if o not in OPTIMIZER_NAMES]
        if unknown or not self.optimizers:
            raise FisherlabError(f"unknown optimizers {unknown}; choose from: {', '.join(OPTIMIZER_NAMES)}")
        if self.epochs < 1 or self.patience < 1 or self.t1 < 1 or self.t2 < 1:
            raise FisherlabError("--epochs, --patience, --t1 and --t2 must be positive integers")
        if self.epochs > MAX_EPOCHS:
            raise FisherlabError(f"--epochs must be at most {MAX_EPOCHS:,}, got {self.epochs:,}")
        _check_seed(self.seed)
        for flag, values in (("--lr", self.lr), ("--damping", self.damping)):
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise FisherlabError(f"{flag} values must be finite and positive, got {', '.join(map(str, bad))}")
        if not self.damping:
            raise FisherlabError("--damping needs at least one value")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FisherlabError(f"--weight-decay must be finite and non-negative, got {self.weight_decay}")
        if self.kl_clip is not None and not (math.isfinite(self.kl_clip) and self.kl_clip > 0):
            raise FisherlabError(f"--kl-clip must be finite and positive (0 disables it), got {self.kl_clip}")
        if self.max_batches is not None and self.max_batches < 1:
            raise FisherlabError(f"--max-batches must be positive, got {self.max_batches}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise FisherlabError(f"--eval-samples must be positive, got {self.eval_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FisherlabError(f"--batch-size must be positive, got {self.batch_size}")
        _check_threads(self.threads)


#: Largest ``--epochs`` (the results hold one row per epoch and optimizer).
MAX_EPOCHS = 1_000_000

#: Seeds are non-negative 63-bit integers (torch's generators take 64 bits; the probe uses ``seed + 1``).
MAX_SEED = 2**63 - 1


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise FisherlabError(f"--seed must be an integer from 0 to 2**63 - 1, got {seed}")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise FisherlabError(f"--threads must be a positive integer, got {threads}")


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (default: torch's own choice).

    On a shared machine torch's default (one thread per core) can cost several times the CPU
    time of one thread for the same small-batch run.
    """
    if threads is not None:
        torch.set_num_threads(threads)


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device.

    Raises:
        FisherlabError: A CUDA device requested where none is available, or a bad name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FisherlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FisherlabError("--device cuda was requested but no CUDA GPU is available; use --device auto or cpu")
    return device
