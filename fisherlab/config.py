"""Run configurations and device choice: what ``fisherlab probe`` and ``fisherlab train`` take.

Fields are typed (enums for every choice), so a ``--config`` JSON file, the CLI flags and the
Python API are checked alike; each config is stored whole as JSON in the dataset attribute
``config_json``. The configs are frozen and validated once, on construction (a changed copy is
made with :func:`dataclasses.replace`, which validates the copy); validation raises
:class:`~fisherlab.FisherlabError` with the flag's name and what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from enum import Enum

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

__all__ = ["ApproxConfig", "BaseOptimizer", "Precision", "ProbeConfig", "TrainConfig", "apply_threads", "select_device"]


def _enum_tuple(kind: type[Enum], values: tuple, what: str) -> tuple:
    unknown = [v for v in values if v not in {e.value for e in kind}]
    if unknown or not values:
        raise FisherlabError(f"unknown {what} {unknown}; choose from: {', '.join(e.value for e in kind)}")  # type: ignore[attr-defined]
    return tuple(kind(v) for v in values)


def _enum_value(kind: type[Enum], value: object) -> Enum:
    try:
        return kind(value)
    except ValueError:
        raise FisherlabError(
            f"unknown {kind.__name__} {value!r}; choose one of: {', '.join(e.value for e in kind)}"
        ) from None  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe run needs; stored as JSON in the dataset attribute ``config_json``.

    Defaults give the embedded CURVES problem, layer 5, in about 50 s on an idle 2-core CPU.
    String values of enum fields are accepted and converted, lists made tuples. Frozen: change a
    copy with :func:`dataclasses.replace`.

    Raises:
        FisherlabError: The first nonsensical value, with what was expected (on construction).
    """

    problem: str = "curves"
    data_dir: str | None = None
    layers: tuple[str, ...] = ("5",)
    iterations: int = 500
    every: int = 10
    optimizer: BaseOptimizer = BaseOptimizer.ADAM
    lr: float | None = None
    batch_size: int | None = None
    fisher: FisherKind = FisherKind.MC
    approx_fisher: FisherKind | None = None
    mc_samples: int = 1
    methods: tuple[str, ...] = PAPER_METHODS
    spectrum: Spectrum = Spectrum.EIGENVALUES
    metrics: tuple[str, ...] = DEFAULT_METRICS
    tol: float = ApproxConfig.tol  # the solver defaults are ApproxConfig's (one place)
    max_iter: int = ApproxConfig.max_iter
    lanczos_rank: int = ApproxConfig.lanczos_rank
    krylov_dim: int = ApproxConfig.krylov_dim
    lowrank_rank: int = ApproxConfig.lowrank_rank
    device: str = "auto"
    dtype: Precision = Precision.FLOAT32
    accumulate: Accumulation = Accumulation.MIXED
    seed: int = 0
    store_factors: tuple[str, ...] = field(default=())
    two_level: bool = False
    damping: float = 1e-3
    coarse_spaces: tuple[CoarseSpace, ...] = tuple(CoarseSpace)
    taylor_order: int = 2
    threads: int | None = None

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

    problem: str = "curves"
    data_dir: str | None = None
    optimizers: tuple[str, ...] = ("sgd", "adam", "kfac", "kpsvd", "deflation")
    epochs: int = 3
    batch_size: int | None = None
    lr: tuple[float, ...] = ()
    damping: tuple[float, ...] = (1e-2,)
    weight_decay: float = 1e-3
    kl_clip: float | None = 1e-2
    t1: int = 5
    t2: int = 20
    patience: int = 10
    max_batches: int | None = None
    eval_samples: int | None = None
    device: str = "auto"
    seed: int = 0
    threads: int | None = None

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
