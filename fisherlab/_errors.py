"""Errors and warnings raised by fisherlab (one place, so the CLI can catch them)."""

from __future__ import annotations

import math

import torch

__all__ = ["ConvergenceWarning", "FisherlabError", "UndefinedMetricWarning", "check_finite", "check_same_device_dtype"]


class FisherlabError(ValueError):
    """Bad input or a run that cannot go on; the CLI prints the message without a traceback."""


class ConvergenceWarning(UserWarning):
    """An iterative solver (power SVD, Lanczos) stopped at its iteration cap before ``tol``."""


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this snapshot (e.g. a zero Fisher block) and stored as NaN."""


def check_finite(name: str, *tensors: torch.Tensor | float) -> None:
    """Raise :class:`FisherlabError` naming ``name`` when any value is NaN or infinite."""
    for t in tensors:
        ok = math.isfinite(t) if isinstance(t, float) else _all_finite(t)
        if not ok:
            raise FisherlabError(
                f"{name} contains NaN or inf values; lower the learning rate, check the data, or use --dtype float64"
            )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (a NaN or inf makes the sum non-finite);
    the entrywise test only when the sum overflowed."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_same_device_dtype(**tensors: torch.Tensor) -> None:
    """Raise ``FisherlabError`` when the given tensors disagree in device or dtype."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise FisherlabError(f"dtype mismatch: {name0} is {t0.dtype}, {name} is {t.dtype}")
        if t.device != t0.device:
            raise FisherlabError(f"device mismatch: {name0} is on {t0.device}, {name} on {t.device}")
