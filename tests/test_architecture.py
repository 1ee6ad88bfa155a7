"""The package's layout: each module imports only from modules above it in the data flow (issue 8)."""

from __future__ import annotations

import ast
from pathlib import Path

import fisherlab

#: Pipeline stages, first to last. Leaves first; ``cli`` and ``__init__`` may import anything.
STAGES = [
    "_version",
    "_errors",
    "vocabulary",  # the names of every choice: settings and storage import these, not machinery
    "distributed",  # process groups: sums over samples, shards of a global batch
    "layers",
    "kron",
    "krylov",
    "operators",
    "block_operators",  # operators that are not Kronecker sums
    "method_registry",  # the names of the approximations and their builders
    "losses",
    "data",
    "store",  # leaves
    "store_registry",  # the result stores by suffix (the HDF5-SWMR .nc store built in)
    "fisher",
    "probe",
    "approximations",
    "methods",  # the zoo (fisherlab/methods/*.py): EKFAC, Shampoo, diagonal, low rank, ...
    "metrics",
    "twolevel",
    "optim",  # the science
    "config",
    "problems",
    "results",
    "snapshot",  # one probe pass, every method and metric -> one dataset row
    "fisher_probe",  # FisherProbe: probing inside any training loop
    "launch",  # before a paper-problem run: layers, memory, the torchrun process group
    "probe_loop",  # probe_training, run_probe: the loops around FisherProbe
    "run",  # re-exports under the former home
    "lightning",  # optional extra: a callback around FisherProbe
    "train",
    "plots",
    "dense",  # runs, files, figures, dense twins
    "testing",  # contract checks for operators of one's own
    "cli",
    "__main__",
    "__init__",
]


def _imports(path: Path) -> set[str]:
    """The stages (top-level modules, or ``methods`` for the subpackage) that ``path`` imports from."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fisherlab"):
            parts = node.module.split(".")
            deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.Import):
            deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fisherlab.")}
    return deps - {_stage(path)}


def _stage(path: Path) -> str:
    """A top-level module is its own stage; every module of ``fisherlab/methods/`` is stage ``methods``."""
    return "methods" if path.parent.name == "methods" else path.stem


def _modules(package: Path) -> dict[str, set[str]]:
    """Imports per stage, the subpackage's modules merged into one."""
    modules: dict[str, set[str]] = {}
    for path in [*package.glob("*.py"), *package.glob("methods/*.py")]:
        modules.setdefault(_stage(path), set()).update(_imports(path))
    return modules


def test_no_import_from_a_later_stage() -> None:
    package = Path(fisherlab.__file__).parent
    modules = _modules(package)
    assert modules.get("methods"), "fisherlab/methods/*.py must be parsed"
    assert set(modules) <= set(STAGES), f"place new modules in STAGES: {set(modules) - set(STAGES)}"
    backward = [
        f"{m} -> {d}"
        for m, deps in modules.items()
        for d in deps
        if m != "__init__" and STAGES.index(d) > STAGES.index(m)
    ]
    assert not backward, backward


def test_core_modules_do_not_import_heavy_optional_packages() -> None:
    """scikit-learn and scikit-image are not dependencies (the stand-in images are bundled)."""
    package = Path(fisherlab.__file__).parent
    imported = set()
    for path in [*package.glob("*.py"), *package.glob("methods/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert not imported & {"sklearn", "skimage"}


def test_import_fisherlab_does_not_import_lightning() -> None:
    """The Lightning callback is an optional extra: the core never imports Lightning."""
    import subprocess
    import sys

    code = "import sys, fisherlab, fisherlab.cli, fisherlab.train; print('lightning' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_the_vocabulary_names_what_the_registries_hold() -> None:
    """Settings import names from the vocabulary, not the registries: the two must agree."""
    from fisherlab import vocabulary
    from fisherlab.method_registry import METHODS
    from fisherlab.metrics import BLOCK_METRICS

    assert vocabulary.ERROR_METRICS == tuple(m.name for m in BLOCK_METRICS if m.error)
    assert set(vocabulary.PAPER_METHODS) <= set(METHODS)


def test_config_imports_no_implementation_module() -> None:
    """Settings name things; they do not compute them."""
    package = Path(fisherlab.__file__).parent
    assert _imports(package / "config.py") <= {"_errors", "vocabulary", "method_registry"}


def test_the_probe_loop_stays_small() -> None:
    """Issue 17: the probe loop module holds the loops only (at most 200 lines); the snapshot, the
    user-loop API and the launch checks live in modules of their own."""
    package = Path(fisherlab.__file__).parent
    assert len((package / "probe_loop.py").read_text().splitlines()) <= 200
