"""Every ```python block of README.md runs as written (issue 20, item 10), in a fresh namespace
and an empty directory. A block whose first line is ``# not run in tests: <reason>`` is skipped
(it needs what the tests cannot provide: Lightning with a user's module, torchrun)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "# not run in tests:"
#: Opening fence (possibly indented inside a list item) up to the closing fence at the same indent.
BLOCK = re.compile(r"^(?P<indent> *)```python\n(?P<body>.*?)^(?P=indent)```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group("body"))) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks_and_few_exceptions() -> None:
    blocks = _blocks()
    assert len(blocks) >= 4
    assert sum(body.startswith(SKIP) for _, body in blocks) <= 1  # keep the exceptions minimal


@pytest.mark.parametrize(("line", "code"), _blocks(), ids=[f"line-{line}" for line, _ in _blocks()])
def test_readme_block_runs_as_written(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if code.startswith(SKIP):
        pytest.skip(code.splitlines()[0][len(SKIP) :].strip())
    import torch

    from fisherlab.method_registry import METHODS

    monkeypatch.chdir(tmp_path)
    registered = dict(METHODS)  # restored below: a block may register methods of its own
    torch.manual_seed(0)  # the blocks draw random data: the same draws whatever ran before in this process
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    finally:
        METHODS.clear()
        METHODS.update(registered)


def test_the_quick_start_installs_and_tests_as_ci_does() -> None:
    """The README's install-and-test command is the one .ci/run runs (extras included: ``hf`` for the
    gpt2 problem and notebook 07)."""
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    (command,) = [line for line in ci.splitlines() if line.startswith("pip install") and "pytest" in line]
    assert "[test,hf]" in command
    assert f"\n{command}\n" in README.read_text(encoding="utf-8")
