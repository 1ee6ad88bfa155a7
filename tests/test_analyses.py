"""Each analysis script runs in smoke mode and writes its figure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
SCRIPTS = ["fig1_error_vs_iteration", "fig2_optimizers", "t_fig2_4_two_level_training", "t_fig5_gap"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_analysis_smoke(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<script> --smoke` computes its dataset and draws its figure."""
    monkeypatch.syspath_prepend(str(ANALYSES))
    spec = importlib.util.spec_from_file_location(name, ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    out = tmp_path / f"{name}.png"
    assert module.main(["--smoke", "--input", str(tmp_path / f"{name}.nc"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    sys.modules.pop("_common", None)
