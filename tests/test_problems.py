"""Problems in a registry: a new problem is one ``register_problem`` call, and the probe loop,
``--problem`` and its help take it from there."""

from __future__ import annotations

from pathlib import Path

import pytest

import fisherlab as fl
from fisherlab import cli
from fisherlab.launch import resolve_layers
from fisherlab.losses import LossKind
from fisherlab.problems import PROBLEMS, AutoEncoder, Problem, ProblemKind, get_problem, register_problem
from fisherlab.results import load, validate


@pytest.fixture
def toy_problem() -> Problem:
    problem = register_problem(
        Problem(
            "toy_teacher",
            (6, 4, 3),
            LossKind.MSE,
            16,
            "6-4-3 MLP on a random linear teacher",
            ProblemKind.TEACHER,
            ("2",),
            build=lambda sizes: AutoEncoder(list(sizes)),
        )
    )
    yield problem
    PROBLEMS.pop(problem.name)


def test_a_registered_problem_runs_in_the_probe_loop(toy_problem: Problem, tmp_path) -> None:
    config = fl.ProbeConfig(problem=toy_problem.name, layers=("1", "2"), iterations=3, every=2, methods=("kfac",))
    ds = fl.run_probe(config, tmp_path / "toy.nc", progress=False)
    assert list(ds["layer"].values) == ["1", "2"] and list(ds["iteration"].values) == [0, 2]
    assert ds.attrs["problem"] == toy_problem.name
    assert ((ds["frobenius_error"] >= 0) & (ds["frobenius_error"] < 1)).all()


def test_problem_registry_feeds_the_cli_help(toy_problem: Problem) -> None:
    from fisherlab.cli import _parser

    _, commands = _parser()  # built after the registration: --problem's help lists the new problem
    for command in ("probe", "train"):
        assert "toy_teacher" in commands[command].format_help(), command


def test_every_problem_has_a_builder_and_a_kind() -> None:
    for problem in PROBLEMS.values():
        assert isinstance(problem.kind, ProblemKind) and callable(problem.build), problem.name
    with pytest.raises(fl.FisherlabError, match="already registered"):
        register_problem(PROBLEMS["curves"])


def test_probe_help_lists_every_problem_with_its_description() -> None:
    from fisherlab.cli import _parser

    help_text = _parser()[1]["probe"].format_help()
    for problem in PROBLEMS.values():
        assert f"{problem.name}  " in help_text and problem.description in help_text, problem.name


def test_transformer_problem_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fisherlab probe --problem transformer` on a Linear layer, an embedding and a layer norm: both errors
    stored where the methods apply; KFAC and deflation NaN on the layer norm, said once; the rest listed as skipped."""
    out = tmp_path / "t.nc"
    args = ["probe", "--problem", "transformer", "--iterations", "1", "--every", "1", "--batch-size", "2"]
    args += ["--figure", "none"]  # the figure is not under test here
    layers = ["--layers", "blocks.0.qkv,position,blocks.0.ln1", "--methods", "kfac,deflation,diagonal"]
    assert cli.main([*args, *layers, "--out", str(out), "--no-progress"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "do not apply" in line]
    assert len(said) == 1 and "kfac, deflation on the elementwise blocks of blocks.0.ln1" in said[0]
    ds = load(out)
    validate(ds)
    assert "embed.weight" in ds.attrs["skipped_parameters"] and "position.weight" not in ds.attrs["skipped_parameters"]
    assert 0 < ds.attrs["fisher_coverage"] < 1
    for metric in ("frobenius_error", "spectral_error"):
        applies = ds[metric].sel({"layer": ["blocks.0.qkv", "position"]})
        norm = ds[metric].sel({"layer": "blocks.0.ln1"})
        assert bool(applies.notnull().all()) and bool(norm.sel({"method": "diagonal"}).notnull().all())
        assert bool(norm.sel({"method": ["kfac", "deflation"]}).isnull().all())
    assert ds.attrs["stand_in"] == 1


def test_size_picks_a_variant_and_a_problem_of_one_size_refuses_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``--size`` (ProbeConfig.size) chooses among a problem's ``variants``; anything else is one line."""
    gpt2 = PROBLEMS["gpt2"]
    assert gpt2.sized(None) is gpt2 and gpt2.sized("tiny").sizes == gpt2.sizes
    assert gpt2.sized("small").sizes == (256, 768, 12, 12, 1024) and gpt2.sized("small").name == "gpt2"
    with pytest.raises(fl.FisherlabError, match=r"gpt2 comes in sizes tiny, small"):
        gpt2.sized("huge")
    with pytest.raises(fl.FisherlabError, match=r"curves comes in one size; --size applies to gpt2 \(tiny, small\)"):
        PROBLEMS["curves"].sized("small")
    assert "gpt2 tiny | small" in " ".join(cli._parser()[1]["probe"].format_help().split())
    assert cli.main(["probe", "--problem", "curves", "--size", "small", "--out", "x.nc"]) != 0
    assert "comes in one size" in capsys.readouterr().err


def test_gpt2_problem_end_to_end(tmp_path: Path) -> None:
    """`fisherlab probe --problem gpt2`: Hugging Face GPT-2 (tiny) on the embedded text, its default Conv1D MLP
    layer, the papers' five methods, both errors stored."""
    pytest.importorskip("transformers")
    out = tmp_path / "g.nc"
    args = ["probe", "--problem", "gpt2", "--iterations", "1", "--every", "1", "--batch-size", "2"]
    assert cli.main([*args, "--out", str(out), "--no-progress", "--figure", "none"]) == 0
    ds = load(out)
    validate(ds)
    assert list(ds["layer"].values) == ["transformer.h.1.mlp.c_fc"] and ds.sizes["method"] == 5
    assert bool(ds["frobenius_error"].notnull().all()) and bool(ds["spectral_error"].notnull().all())
    assert ds.attrs["stand_in"] == 1 and '"size": null' in ds.attrs["config_json"]


def test_transformer_problem_covers_every_parameter_with_layers_all() -> None:
    """`--layers all` on `transformer` names both embeddings and every layer norm: fisher_coverage 1.0."""
    problem = get_problem("transformer")
    layers = resolve_layers(problem, ("all",))
    assert {"embed", "position", "blocks.0.ln1", "ln", "head"} <= set(layers)
    assert resolve_layers(problem, ("trainable",)) == layers
    probe = fl.FisherProbe(problem.model(), "ce", layers=list(layers), methods=["diagonal"])
    assert probe.attrs["fisher_coverage"] == 1.0 and probe.attrs["skipped_parameters"] == "none"
