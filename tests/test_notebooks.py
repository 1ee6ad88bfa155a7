"""Every notebook runs top to bottom in smoke mode (FISHERLAB_SMOKE=1), so none can rot.

The code cells run in this process, one fresh namespace per notebook, from the notebook's
folder (a Jupyter kernel per notebook would add seconds of start-up and nothing tested).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute every code cell with the Agg backend and small settings; outputs in git stay empty."""
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs before committing"
    monkeypatch.setenv("FISHERLAB_SMOKE", "1")
    monkeypatch.chdir(path.parent)
    namespace: dict[str, object] = {"__name__": "__notebook__"}
    try:
        for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            exec(compile(cell.source, f"{path.name}[cell {index}]", "exec"), namespace)  # noqa: S102 - our own notebooks
    finally:
        plt.close("all")
