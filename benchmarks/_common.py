"""What every benchmark shares: timing, the training-step baseline, peak memory, the machine, and
a :class:`Report` that prints aligned rows ``name  seconds  ratio-to-step`` and writes the same rows
(plus the machine and the arguments) as JSON.

A benchmark of its own (say, of a new method) is a module ``benchmarks/bench_<name>.py`` with a
``build_parser()`` and a ``main(argv)``::

    from pathlib import Path

    from benchmarks._common import Report, add_common_arguments, setup, step_baseline, timed, trained_problem

    SCRIPT = Path(__file__).stem


    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(parser, SCRIPT, repeats=3)
        return parser


    def main(argv: list[str] | None = None) -> int:
        args = build_parser().parse_args(argv)
        device = setup(args)  # --threads, then --device
        problem, model, x, train_step = trained_problem("mnist", device)
        report = Report.from_args(SCRIPT, args, device)
        report.set_baseline(step_baseline(train_step, device, args.repeats))  # in the same run
        report.row("my method", timed(lambda: ..., device, args.repeats)[0])
        report.write()
        return 0

Ratios always refer to a baseline measured in the same run (a shared machine's load changes
between runs); ``step_baseline`` is that measurement for every benchmark whose baseline is a
training step. ``--json PATH`` (default ``benchmarks/results/<script>.json``, not tracked) and
``--repeats N`` mean the same in every benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

#: Where the JSON of ``benchmarks/bench_X.py`` goes unless ``--json`` says otherwise (ignored by git).
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels are asynchronous); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, *, warmup: bool = True) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up run unless ``warmup=False``),
    synchronising CUDA around each run; and the last run's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    out = fn() if warmup else None
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


# --------------------------------------------------------------------------- the baseline


def make_train_step(
    problem: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One training step of ``model`` on the batch ``(x, y)`` with the problem's loss (mean over the batch)."""
    from fisherlab.losses import per_sample_loss

    def train_step() -> None:
        optimizer.zero_grad()
        per_sample_loss(problem.loss, model(x), y).mean().backward()
        optimizer.step()

    return train_step


def step_baseline(train_step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """The denominator of every ratio: the median time of a training step on the benchmark's batch,
    measured in the same run as what it is compared with (after one warm-up step)."""
    return timed(train_step, device, repeats)[0]


def trained_problem(
    name: str, device: torch.device, *, steps: int = 20
) -> tuple[Any, torch.nn.Module, torch.Tensor, Callable[[], None]]:
    """The problem's network after ``steps`` Adam steps on one batch (so its Fisher is not trivial),
    that batch, and a training step on it (the baseline all ratios refer to). The target is the
    input (the auto-encoders of the papers)."""
    from fisherlab.problems import get_problem

    problem = get_problem(name)
    model = problem.model(seed=0, device=device)
    x = problem.data(seed=0).train[: problem.batch_size].to(device)
    train_step = make_train_step(problem, model, x, x, torch.optim.Adam(model.parameters(), lr=1e-3))
    for _ in range(steps):
        train_step()
    return problem, model, x, train_step


# --------------------------------------------------------------------------- memory and machine


@dataclass(frozen=True)
class PeakMemory:
    """A peak memory reading: the process's peak resident set on CPU, CUDA's max allocated on GPU."""

    kind: str  # "rss" or "cuda_max_allocated"
    bytes: int

    @property
    def gib(self) -> float:
        return self.bytes / 2**30

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __str__(self) -> str:
        label = "peak RSS" if self.kind == "rss" else "peak CUDA allocated"
        return f"{label} {self.gib:.2f} GiB"


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory(device: torch.device) -> PeakMemory:
    """Peak memory on ``device``: the process's RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU."""
    if device.type == "cuda":
        return PeakMemory("cuda_max_allocated", int(torch.cuda.max_memory_allocated(device)))
    return PeakMemory("rss", peak_rss_bytes())


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What the figures depend on: CPU count, torch threads, load average, device (and its name), versions."""
    import fisherlab

    device = device or torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "device": str(device),
        "device_name": name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "fisherlab_version": fisherlab.__version__,
    }


def describe(info: dict[str, Any]) -> str:
    """One line of :func:`machine`'s description."""
    load = " ".join(f"{x:.2f}" for x in info["load_average"]) if info["load_average"] else "n/a"
    return (
        f"machine: {info['cpu_count']} CPUs, {info['torch_threads']} torch threads, load average {load}; "
        f"device {info['device']} ({info['device_name']}); torch {info['torch_version']}, "
        f"fisherlab {info['fisherlab_version']}"
    )


# --------------------------------------------------------------------------- command line


def default_json(script: str) -> Path:
    """``benchmarks/results/<script>.json``."""
    return RESULTS / f"{script}.json"


def add_common_arguments(
    parser: argparse.ArgumentParser,
    script: str,
    *,
    repeats: int,
    repeats_help: str = "timed runs of each measurement (median), after a warm-up run",
    device: bool = True,
    threads: bool = True,
) -> argparse.ArgumentParser:
    """``--repeats``, ``--json`` and (unless turned off) ``--device`` and ``--threads``, the same in every benchmark."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"{repeats_help} (default {repeats})")
    parser.add_argument(
        "--json",
        type=Path,
        default=default_json(script),
        metavar="PATH",
        help=f"write the printed figures and the machine here (default benchmarks/results/{script}.json)",
    )
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    if threads:
        parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and check ``--repeats``; the device ``--device`` names (CPU where there is no such flag)."""
    from fisherlab.config import select_device

    if getattr(args, "repeats", 1) < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return select_device(args.device) if hasattr(args, "device") else torch.device("cpu")


# --------------------------------------------------------------------------- the report

_RESERVED = {"name", "seconds", "ratio", "baseline_seconds"}


def _plain(value: Any) -> Any:
    """``value`` as strict JSON: tensors and numpy scalars as numbers, non-finite floats as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path | torch.device):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # tensors, numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "value") and isinstance(value.value, str):  # enums
        return value.value
    return str(value)


@dataclass
class Report:
    """Rows ``name  seconds  ratio`` printed as they are measured, aligned in columns, and written with
    the machine's description and the arguments as JSON by :meth:`write`.

    The ratio of a row is its seconds over the baseline (:meth:`set_baseline`, or ``baseline=`` for a
    row whose baseline was re-timed); ``**fields`` are further figures stored with the row, ``detail``
    is text printed after it (usually the same fields, formatted).
    """

    script: str
    json_path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    arguments: dict[str, Any] = field(default_factory=dict)
    baseline_name: str = "training step"
    ratio_label: str = "step"
    unit: str = "ms"
    width: int = 44
    indent: str = "  "
    baseline: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in ("ms", "s"):
            raise ValueError(f"unit must be 'ms' or 's', got {self.unit!r}")
        self.machine = self.machine or machine(self.device)
        self.line(describe(self.machine))

    @classmethod
    def from_args(cls, script: str, args: argparse.Namespace, device: torch.device, **kwargs: Any) -> Report:
        """A report for ``script`` whose JSON goes to ``--json`` and records every argument."""
        return cls(script, json_path=args.json, device=device, arguments=vars(args), **kwargs)

    def line(self, text: str) -> None:
        """Print a line of text (a header, a total, a note) and keep it for the JSON."""
        print(text, flush=True)
        self.lines.append(text)

    def set_baseline(self, seconds: float, name: str | None = None) -> None:
        """Record the baseline (the denominator of the ratios) and print it as a row of ratio 1."""
        self.baseline = seconds
        self.baseline_name = name or self.baseline_name
        self.row(f"{self.baseline_name} (baseline)", seconds, baseline_row=True)

    def ratio(self, seconds: float | None, baseline: float | None = None) -> float | None:
        base = baseline if baseline is not None else self.baseline
        return None if seconds is None or not base else seconds / base

    def _format(self, name: str, seconds: float | None, ratio: float | None) -> str:
        if seconds is None:
            time_text = f"{'—':>10} {self.unit:<2}"
        elif self.unit == "ms":
            time_text = f"{seconds * 1e3:10.1f} ms"
        else:
            time_text = f"{seconds:10.3f} s "
        ratio_text = f"{ratio:8.2f} x {self.ratio_label}" if ratio is not None else ""
        return f"{self.indent}{name:<{self.width}}  {time_text}  {ratio_text}".rstrip()

    def row(
        self,
        name: str,
        seconds: float | None,
        *,
        baseline: float | None = None,
        detail: str = "",
        baseline_row: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        """Print and keep one measurement (``seconds`` None: not measured, e.g. a peer that is missing)."""
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"fields {sorted(clash)} are a row's own keys")
        ratio = self.ratio(seconds, baseline)
        print(self._format(name, seconds, ratio) + (f"  {detail}" if detail else ""), flush=True)
        row = {
            "name": name,
            "seconds": seconds,
            "ratio": ratio,
            "baseline_seconds": baseline if baseline is not None else self.baseline,
            **({"baseline": True} if baseline_row else {}),
            **({"detail": detail} if detail else {}),
            **fields,
        }
        self.rows.append(row)
        return row

    def as_dict(self) -> dict[str, Any]:
        """The JSON document: script, time, arguments, machine, baseline, rows, printed lines, peak memory."""
        peak = peak_memory(self.device)
        return _plain(
            {
                "script": self.script,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv[1:],
                "arguments": self.arguments,
                "machine": self.machine,
                "load_average_at_end": machine(self.device)["load_average"],
                "baseline": {"name": self.baseline_name, "seconds": self.baseline, "ratio_label": self.ratio_label},
                "rows": self.rows,
                "lines": self.lines,
                "peak_memory": {"kind": peak.kind, "bytes": peak.bytes},
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )

    def write(self, path: Path | str | None = None) -> Path:
        """Write :meth:`as_dict` as JSON to ``path`` (default: the report's ``json_path``, else
        ``benchmarks/results/<script>.json``) and say where."""
        target = Path(path) if path is not None else (self.json_path or default_json(self.script))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"figures written to {target}", flush=True)
        return target
