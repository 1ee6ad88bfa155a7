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
    "run",
    "lightning",  # optional extra: a callback around run.FisherProbe
    "train",
    "plots",
    "dense",  # runs, files, figures, dense twins
    "testing",  # contract checks for operators of one's own
    "cli",
    "__main__",
    "__init__",
]


#: A subpackage is one stage; its modules are in layers too, first to last.
SUBSTAGES = {
    "approximations": [
        "base",  # Approximation, warm starts, shared stages, the registry walk
        "deflated",  # the second Kronecker term of a deflated block
        "kfac_family",
        "kronecker_svd_family",
        "lanczos_family",
        "__init__",  # registers the families' methods in the papers' order
    ],
    "methods": ["diagonal", "kfac_variants", "lowrank", "shampoo", "eigenbasis", "__init__"],  # the zoo
}


def _dotted(path: Path) -> list[str]:
    """``fisherlab/approximations/base.py`` -> ``["approximations", "base"]``."""
    package = Path(fisherlab.__file__).parent
    return list(path.relative_to(package).with_suffix("").parts)


def _imported_modules(path: Path) -> set[tuple[str, ...]]:
    """The fisherlab modules ``path`` imports, as name parts below ``fisherlab``."""
    deps: set[tuple[str, ...]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fisherlab"):
            parts = tuple(node.module.split(".")[1:])
            deps |= {parts} if parts else {(a.name,) for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.Import):
            deps |= {tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("fisherlab.")}
    return deps


def _imports(path: Path) -> set[str]:
    """The stages ``path`` imports from (a subpackage's modules: the subpackage's stage)."""
    return {d[0] for d in _imported_modules(path)} - {_dotted(path)[0] if len(_dotted(path)) > 1 else path.stem}


def _package_modules() -> dict[str, set[str]]:
    """Each stage's imports; a subpackage's modules pooled under their stage."""
    package = Path(fisherlab.__file__).parent
    modules: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        stage = _dotted(path)[0]
        if stage in SUBSTAGES or path.parent == package:
            modules.setdefault(stage, set()).update(_imports(path))
    return modules


def test_no_import_from_a_later_stage() -> None:
    modules = _package_modules()
    assert all(modules.get(sub) for sub in SUBSTAGES), "every subpackage's modules must be parsed"
    assert set(modules) <= set(STAGES), f"place new modules in STAGES: {set(modules) - set(STAGES)}"
    backward = [
        f"{m} -> {d}"
        for m, deps in modules.items()
        for d in deps
        if m != "__init__" and STAGES.index(d) > STAGES.index(m)
    ]
    assert not backward, backward


def test_subpackage_modules_are_in_layers() -> None:
    """Inside a subpackage too, no module imports from one after it (the families import the base, not each other
    backwards)."""
    package = Path(fisherlab.__file__).parent
    for sub, order in SUBSTAGES.items():
        found = {p.stem for p in (package / sub).glob("*.py")}
        assert found == set(order), f"place the modules of fisherlab.{sub} in SUBSTAGES: {found ^ set(order)}"
        backward = [
            f"{sub}.{path.stem} -> {sub}.{dep[1]}"
            for path in (package / sub).glob("*.py")
            for dep in _imported_modules(path)
            if len(dep) > 1 and dep[0] == sub and order.index(dep[1]) > order.index(path.stem)
        ]
        assert not backward, backward


def test_core_modules_do_not_import_heavy_optional_packages() -> None:
    """scikit-learn and scikit-image are not dependencies (the stand-in images are bundled)."""
    package = Path(fisherlab.__file__).parent
    imported = set()
    for path in package.rglob("*.py"):
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
