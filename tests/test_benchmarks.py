"""The benchmarks' shared helper (``benchmarks/_common.py``) and that every benchmark imports and
builds its command line (issue 17). The benchmarks themselves are not run here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from benchmarks import _common

BENCHMARKS = sorted(p.stem for p in (Path(_common.__file__).parent).glob("bench_*.py"))


def test_every_benchmark_is_listed() -> None:
    assert {"bench_probe", "bench_peers", "bench_spectral", "bench_layers", "bench_store"} <= set(BENCHMARKS)
    assert {"bench_two_level", "bench_optim", "bench_distributed"} <= set(BENCHMARKS)


def test_timed_returns_a_positive_median_and_the_result() -> None:
    calls = []

    def fn() -> int:
        calls.append(1)
        return sum(range(1000))

    seconds, out = _common.timed(fn, torch.device("cpu"), 3)
    assert seconds > 0
    assert out == sum(range(1000))
    assert len(calls) == 4  # one warm-up, three timed
    _common.timed(fn, torch.device("cpu"), 2, warmup=False)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="repeats"):
        _common.timed(fn, torch.device("cpu"), 0)


def test_report_writes_valid_json_with_rows_ratios_and_machine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = _common.Report("bench_toy", json_path=tmp_path / "out" / "toy.json", arguments={"repeats": 2})
    report.line("a toy benchmark")
    report.set_baseline(0.002)
    report.row("twice a step", 0.004, method="kfac", value=torch.tensor(1.5))
    report.row("re-timed baseline", 0.003, baseline=0.001)
    report.row("missing peer", None, detail="(unavailable)")
    report.row("not finite", float("nan"))
    path = report.write()
    printed = capsys.readouterr().out
    assert "twice a step" in printed and "2.00 x step" in printed and "3.00 x step" in printed
    assert str(path) in printed

    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=pytest.fail)  # strict: no NaN
    assert path == tmp_path / "out" / "toy.json"
    assert doc["script"] == "bench_toy"
    assert doc["arguments"] == {"repeats": 2}
    assert doc["baseline"]["seconds"] == 0.002
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["training step (baseline)"]["ratio"] == pytest.approx(1.0)
    assert rows["twice a step"]["ratio"] == pytest.approx(2.0)
    assert rows["twice a step"]["method"] == "kfac" and rows["twice a step"]["value"] == 1.5
    assert rows["re-timed baseline"]["ratio"] == pytest.approx(3.0)
    assert rows["re-timed baseline"]["baseline_seconds"] == 0.001
    assert rows["missing peer"]["seconds"] is None and rows["missing peer"]["ratio"] is None
    assert rows["not finite"]["seconds"] is None
    assert "a toy benchmark" in doc["lines"]
    for key in ("cpu_count", "torch_threads", "load_average", "device", "device_name", "torch_version"):
        assert key in doc["machine"]
    assert doc["peak_memory"]["kind"] == "rss" and doc["peak_memory"]["bytes"] > 0

    with pytest.raises(ValueError, match="own keys"):
        report.row("clash", 1.0, ratio=2.0)


def test_peak_memory_and_machine_on_cpu() -> None:
    peak = _common.peak_memory(torch.device("cpu"))
    assert peak.kind == "rss" and peak.bytes > 2**20
    assert "GiB" in str(peak)
    info = _common.machine()
    assert info["torch_version"] == torch.__version__
    assert "machine:" in _common.describe(info)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_imports_and_builds_its_parser(name: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    parser = module.build_parser()
    args = parser.parse_args([])
    assert args.repeats >= 1
    assert args.json == _common.RESULTS / f"{name}.json"
    assert parser.parse_args(["--json", "x.json", "--repeats", "2"]).json == Path("x.json")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "--json" in capsys.readouterr().out
    assert callable(module.main)
