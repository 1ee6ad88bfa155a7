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
    "layer_kinds",  # the adapters of Conv1D, Embedding, LayerNorm, RMSNorm (registered on import)
    "attention",  # nn.MultiheadAttention's projections as module calls during a probe pass (a layer kind)
    "kron",
    "krylov",
    "operators",
    "block_operators",  # operators that are not Kronecker sums
    "method_registry",  # the names of the approximations and their builders
    "losses",
    "tied",  # one block for a weight several modules use (an output layer tied to the embedding)
    "data",
    "store",  # leaves
    "store_registry",  # the result stores by suffix (the HDF5-SWMR .nc store built in)
    "sample_span",  # a block restricted to the span of its per-sample factors, and back (fisher's methods use it)
    "fisher",
    "probe",
    "approximations.base",  # Approximation, warm starts, shared stages, the registry walk
    "approximations.deflated",  # the second Kronecker term of a deflated block
    "approximations.kfac_family",
    "approximations.kronecker_svd_family",
    "approximations.lanczos_family",
    "approximations",  # registers the families' methods in the papers' order
    "methods",  # the zoo (fisherlab/methods/*.py, one stage): EKFAC, Shampoo, diagonal, low rank, ...
    "metrics.reference",  # the metrics, one module per job
    "metrics.error1",
    "metrics.error2",
    "metrics.usage",  # how approximations are used: scale-free error, damped solve, Laplace KL
    "metrics.registry",  # every stored variable: per layer and method, per layer, whole network, run
    "metrics.evaluate",
    "metrics",
    "twolevel",
    "optim",  # the science
    "config",
    "gpt2",  # optional extra (transformers): the gpt2 problem's model, imported by problems on first use
    "problems",
    "results",
    "snapshot",  # one probe pass, every method and metric -> one dataset row
    "dashboards",  # a snapshot as named scalars, live to TensorBoard (FisherProbe's on_snapshot)
    "fisher_probe",  # FisherProbe: probing inside any training loop
    "launch",  # before a paper-problem run: layers, memory, the torchrun process group
    "probe_loop",  # probe_training, run_probe: the loops around FisherProbe
    "run",  # re-exports under the former home
    "lightning",  # optional extra: a callback around FisherProbe
    "hf",  # optional extra: a Hugging Face Trainer callback around FisherProbe
    "train",
    "plots",
    "dense",  # runs, files, figures, dense twins
    "testing",  # contract checks for operators of one's own
    "cli",
    "__main__",
    "__init__",
]


def _module_name(path: Path, package: Path) -> str:
    """``metrics.error2`` for ``fisherlab/metrics/error2.py``; a package's ``__init__`` is the package
    (``metrics``); ``__init__`` for the top package's own."""
    parts = path.relative_to(package).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: Path) -> dict[str, Path]:
    """Every module of the package, subpackages included, by :func:`_module_name`."""
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _stage(name: str) -> str:
    """A module's stage: its own entry in :data:`STAGES`, else its package's (a subpackage listed as
    one stage, like ``methods``, whose modules may import each other)."""
    while name not in STAGES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, which never run."""
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _type_only(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports at run time (type-only imports excluded), named as in
    :data:`STAGES`: ``fisherlab.metrics.error2`` is ``metrics.error2``, ``fisherlab.metrics`` (or a name
    from it that is not a submodule) ``metrics``."""
    package = Path(fisherlab.__file__).parent
    known = set(_modules(package))
    deps = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fisherlab"):
            module = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:
                sub = f"{module}.{alias.name}" if module else alias.name
                if sub in known:
                    deps.add(sub)  # a submodule imported by name: `from fisherlab.metrics import error2`
                elif module:
                    deps.add(module)
        elif isinstance(node, ast.Import):
            deps |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("fisherlab.")}
    own = _module_name(path, package) if path.is_relative_to(package) else path.stem
    return deps - {own, "__version__"}


def test_no_import_from_a_later_stage() -> None:
    """Every module of the package imports only from earlier stages: a subpackage's modules by their
    dotted names (``metrics.error2``; its ``__init__`` by the package's name, after them), or the whole
    subpackage as one stage (``methods``)."""
    package = Path(fisherlab.__file__).parent
    modules: dict[str, set[str]] = {}
    for name, path in _modules(package).items():
        stage = _stage(name)
        modules.setdefault(stage, set()).update(_stage(d) for d in _imports(path) if _stage(d) != stage)
    assert modules.get("methods") and modules.get("metrics.error2"), "subpackages must be parsed"
    assert set(modules) <= set(STAGES), f"place new modules in STAGES: {set(modules) - set(STAGES)}"
    backward = [
        f"{m} -> {d}"
        for m, deps in modules.items()
        for d in deps
        if m != "__init__" and STAGES.index(d) > STAGES.index(m)
    ]
    assert not backward, backward


def test_the_import_check_sees_subpackages_and_skips_type_only_imports(tmp_path: Path) -> None:
    """``_imports`` names submodules by their dotted names and ignores ``if TYPE_CHECKING:`` imports."""
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from fisherlab.metrics.error2 import SpectralLimits\n"
        "from fisherlab.metrics import evaluate_block, registry\n"
        "import fisherlab.kron\n"
        "if TYPE_CHECKING:\n"
        "    from fisherlab.run import FisherProbe\n"
    )
    assert _imports(source) == {"metrics.error2", "metrics", "metrics.registry", "kron"}


def test_core_modules_do_not_import_heavy_optional_packages() -> None:
    """scikit-learn and scikit-image are not dependencies (the stand-in images are bundled)."""
    package = Path(fisherlab.__file__).parent
    imported = set()
    for path in _modules(package).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert not imported & {"sklearn", "skimage"}


def test_import_fisherlab_does_not_import_lightning_transformers_or_tensorboard() -> None:
    """The Lightning and Hugging Face callbacks and TensorBoard are optional extras: the core never
    imports them (``fisherlab.lightning`` and ``fisherlab.hf`` load on first use), and the gpt2 problem
    imports ``transformers`` only when it builds a model (not for ``--help`` or another problem)."""
    import subprocess
    import sys

    optional = ("lightning", "transformers", "tensorboard")
    code = (
        "import sys, fisherlab, fisherlab.cli, fisherlab.train; fisherlab.cli._parser(); "
        f"fisherlab.get_problem('curves').model(); print([m for m in {optional} if m in sys.modules])"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


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


#: Modules whose tests live in other test modules, with where: every other module ``fisherlab/<name>.py``
#: (or package ``fisherlab/<name>/``) has its own ``tests/test_<name>.py``. Keep this list short: a new
#: module gets its own test module.
COVERED_ELSEWHERE = {
    "__init__": "the public surface: test_docs.py (every name in __all__ documented), test_readme.py",
    "__main__": "two lines into cli.main: test_cli.py",
    "_version": "one string, stored as provenance (fisherlab_version) by every results test",
    "_errors": "the error and warning types, raised and matched by every module's tests and test_bad_inputs.py",
    "dense": "the brute-force twins themselves: the reference side of test_probe.py, test_fisher.py, test_metrics.py",
    "method_registry": "test_block_operators.py (a method of one's own registered, scored and stored)",
    "testing": "test_block_operators.py (check_block_operator on every operator type and device)",
    "vocabulary": "names only: test_the_vocabulary_names_what_the_registries_hold above",
}


def test_every_module_has_a_test_module() -> None:
    """Tests mirror the package (issue 17): ``tests/test_<name>.py`` for each module or subpackage."""
    package = Path(fisherlab.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.parent.name for p in package.glob("*/__init__.py")}
    tests = {p.stem.removeprefix("test_") for p in Path(__file__).parent.glob("test_*.py")}
    missing = sorted(modules - tests - set(COVERED_ELSEWHERE))
    assert not missing, f"add tests/test_<name>.py for {missing} (or say in COVERED_ELSEWHERE where they are tested)"
    stale = sorted(set(COVERED_ELSEWHERE) & tests | set(COVERED_ELSEWHERE) - modules)
    assert not stale, f"remove from COVERED_ELSEWHERE (own test module now, or no such module): {stale}"


def test_the_probe_loop_stays_small() -> None:
    """Issue 17: the probe loop module holds the loops only (at most 200 lines); the snapshot, the
    user-loop API and the launch checks live in modules of their own."""
    package = Path(fisherlab.__file__).parent
    assert len((package / "probe_loop.py").read_text().splitlines()) <= 200
