"""The API reference (mkdocs + mkdocstrings, built with warnings as errors in .ci/run) documents
every public name: each name in ``fisherlab.__all__`` lives in a module that a page of docs/api
renders, and has a docstring."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import fisherlab

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _documented_modules() -> set[str]:
    return {
        m for page in (DOCS / "api").glob("*.md") for m in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.MULTILINE)
    }


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = _documented_modules()
    missing, undocumented = [], []
    for name in fisherlab.__all__:
        obj = getattr(fisherlab, name)
        if inspect.ismodule(obj):
            home = obj.__name__
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            home = obj.__module__
            if not (obj.__doc__ or "").strip():
                undocumented.append(name)
        else:  # a constant: the documented module that holds this very object
            home = next((m for m in documented if getattr(__import__(m, fromlist=["_"]), name, None) is obj), "")
        if home not in documented:
            missing.append(f"{name} ({home or 'no documented module holds it'})")
    assert not missing, f"add their modules to a page of docs/api: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_package_module_has_a_page() -> None:
    package = Path(fisherlab.__file__).parent
    modules = {
        ".".join(("fisherlab", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if p.relative_to(package).as_posix() not in {"__init__.py", "__main__.py"}
    }
    assert modules <= _documented_modules(), sorted(modules - _documented_modules())
