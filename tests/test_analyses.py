"""Each analysis script runs in smoke mode and writes its figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def test_fig1_smoke(tmp_path) -> None:
    """fig1_error_vs_iteration.py --smoke computes the dataset and draws K Figure 1."""
    spec = importlib.util.spec_from_file_location("fig1", ANALYSES / "fig1_error_vs_iteration.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    out = tmp_path / "fig1.png"
    assert module.main(["--smoke", "--input", str(tmp_path / "fig1.nc"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
