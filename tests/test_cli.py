"""The CLI end to end on the default problem (few iterations), the Python API on a user's conv
model, interrupted runs, and one clear message per bad input (exit status 2, no traceback)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import typing
from enum import Enum

import numpy as np
import pytest
import torch

from fisherlab import cli, fisher_probe, probe_loop
from fisherlab._errors import FisherlabError
from fisherlab.config import Flag, ProbeConfig, TrainConfig
from fisherlab.losses import LossKind
from fisherlab.method_registry import METHODS
from fisherlab.probe_loop import probe_training
from fisherlab.problems import PROBLEMS
from fisherlab.results import load, validate
from tests.cases import SmallConvNet, deep_linear_problem, small_mlp


def test_probe_end_to_end(tmp_path, capsys) -> None:
    """`fisherlab probe` on the default problem writes a valid dataset, a figure and stored factors."""
    out = tmp_path / "r.nc"
    status = cli.main(
        [
            "probe",
            "--iterations",
            "4",
            "--every",
            "2",
            "--layers",
            "5,6",
            "--store-factors",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    ds = load(out)
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2, 4]
    assert list(ds["layer"].values) == ["5", "6"]
    assert list(ds["method"].values) == ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"]
    assert bool(ds["converged"].all())
    err = ds["frobenius_error"]
    assert bool((err.sel({"method": "kpsvd"}) <= err.sel({"method": "kfac"}) * (1 + 1e-8)).all())
    assert ds.attrs["fisher"] == "mc" and ds.attrs["spectrum"] == "eigenvalues" and "torch_version" in ds.attrs
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert load(out, factors=True)["factors_g_5"].sizes["iteration"] == 3  # --store-factors 5, in the same file
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "f.pdf")]) == 0
    assert (tmp_path / "f.pdf").exists()
    assert cli.main(["info", str(out)]) == 0


def test_probe_all_methods(tmp_path) -> None:
    """`--methods all` scores every registered method (the zoo of issue 18 included) on the default problem;
    the figure and `info` take them all; EKFAC <= KFAC and eshampoo <= shampoo on every snapshot."""
    out = tmp_path / "all.nc"
    assert (
        cli.main(["probe", "--methods", "all", "--iterations", "1", "--every", "1", "--out", str(out), "--no-progress"])
        == 0
    )
    ds = load(out)
    validate(ds)
    assert list(ds["method"].values) == list(METHODS)
    err = ds["frobenius_error"]
    assert bool(np.isfinite(err).all()) and bool(np.isfinite(ds["spectral_error"]).all())
    assert bool((err.sel({"method": "ekfac"}) <= err.sel({"method": "kfac"}) * (1 + 1e-8)).all())
    assert bool((err.sel({"method": "eshampoo"}) <= err.sel({"method": "shampoo"}) * (1 + 1e-8)).all())
    assert (tmp_path / "all.png").exists() and cli.main(["info", str(out)]) == 0


def test_config_file_and_flags(tmp_path) -> None:
    """--config supplies fields; explicit flags win; the resolved config is stored."""
    cfg = tmp_path / "c.json"
    cfg.write_text('{"iterations": 2, "every": 1, "methods": ["kfac", "kpsvd"], "fisher": "empirical"}')
    out = tmp_path / "r.nc"
    assert (
        cli.main(
            ["probe", "--config", str(cfg), "--every", "2", "--out", str(out), "--no-progress", "--figure", "none"]
        )
        == 0
    )
    ds = load(out)
    assert list(ds["iteration"].values) == [0, 2] and ds.attrs["fisher"] == "empirical"
    assert list(ds["method"].values) == ["kfac", "kpsvd"]


@pytest.mark.parametrize(("command", "config_class"), [("probe", ProbeConfig), ("train", TrainConfig)])
def test_every_config_field_is_a_flag_and_no_flags_give_the_defaults(command: str, config_class: type) -> None:
    """Each field of the command's config has its flag, generated from the field (``--flag-name``, help from its
    ``Flag``; an enum's values shown), unless it says why it has none; ``fisherlab <command>`` with no flags
    gives the config's defaults."""
    parser, commands = cli._parser()
    actions = {action.dest: action for action in commands[command]._actions}
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if "no_flag" in field.metadata:  # deliberately CLI-less: the reason is said
            assert isinstance(field.metadata["no_flag"], str) and field.metadata["no_flag"], field.name
            assert field.name not in actions, field.name
            continue
        assert isinstance(field.metadata.get("flag"), Flag), f"{field.name}: neither a flag nor a no_flag reason"
        action = actions[field.name]
        assert f"--{field.name.replace('_', '-')}" in action.option_strings or action.option_strings == [
            f"--no-{field.name.replace('_', '-')}"
        ]
        assert action.help and "{" not in action.help, field.name
        if isinstance(hints[field.name], type) and issubclass(hints[field.name], Enum):
            assert action.metavar == "{" + ",".join(e.value for e in hints[field.name]) + "}"
    args = parser.parse_args([command])
    config = cli._config(args) if command == "probe" else cli._config_from_args(TrainConfig, args)
    assert config == config_class()
    if command == "train":  # --kl-clip 0 disables clipping
        assert cli._config_from_args(TrainConfig, parser.parse_args(["train", "--kl-clip", "0"])).kl_clip is None


BAD_INPUTS = [
    (["--problem", "cifar"], "unknown problem 'cifar'"),
    (["--methods", "kfac,shampo"], "unknown methods"),
    (["--layers", "99"], "unknown layers"),
    (["--iterations", "-3"], "--iterations must be a positive integer"),
    (["--iterations", "5", "--every", "10"], "larger than --iterations"),
    (["--fisher", "true"], "unknown FisherKind"),
    (["--spectrum", "both"], "unknown Spectrum"),
    (["--metrics", "spectral_error"], "--metrics must include frobenius_error"),
    (["--two-level", "--damping", "0"], "--damping must be finite and positive"),
    (["--two-level", "--coarse-spaces", "coarsest"], "unknown coarse spaces"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--data-dir", "/nonexistent/mnist", "--problem", "mnist"], "does not exist"),
    (["--figure", "fig.svg"], "must end in .png or .pdf"),
    (["--store-factors", "3"], "not probed"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_message(tmp_path, capsys, args: list[str], message: str) -> None:
    """Each bad input: exit status 2, one 'fisherlab: error:' line naming the problem, no file written."""
    out = tmp_path / "r.nc"
    status = cli.main(["probe", "--iterations", "2", "--every", "1", "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("fisherlab: error:") and message in err and "Traceback" not in err
    assert not out.exists()


def test_existing_and_unwritable_outputs(tmp_path, capsys) -> None:
    """An existing --out is kept untouched; an output directory that cannot be created is reported."""
    out = tmp_path / "r.nc"
    out.write_text("earlier results")
    assert cli.main(["probe", "--iterations", "2", "--every", "1", "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "earlier results"
    blocker = tmp_path / "plain-file"  # a directory that cannot exist, for root too (chmod does not stop root)
    blocker.write_text("x")
    assert (
        cli.main(
            ["probe", "--iterations", "2", "--every", "1", "--out", str(blocker / "sub" / "r.nc"), "--no-progress"]
        )
        == 2
    )
    assert "cannot create directory" in capsys.readouterr().err


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("where", "at", "interrupt", "status", "message", "kept"),
    [
        ("step", 5, _ctrl_c, 130, "interrupted; finished snapshots are in {out}", [0, 2, 4]),
        ("step", 5, _sigterm, 143, "terminated (SIGTERM); finished snapshots are in {out}", [0, 2, 4]),
        ("snapshot", 0, _ctrl_c, 130, "interrupted; no snapshot had finished, nothing was written", None),
        ("snapshot", 0, _sigterm, 143, "terminated (SIGTERM); no snapshot had finished, nothing was written", None),
    ],
)
def test_interrupted_run_keeps_finished_snapshots(
    tmp_path, monkeypatch, capsys, where: str, at: int, interrupt, status: int, message: str, kept: list[int] | None
) -> None:
    """Ctrl-C or SIGTERM after the snapshot at iteration 4: the file holds iterations 0, 2, 4 and is valid;
    before the first snapshot: no file, and the message does not claim one (issue 20 item 6). One line, the
    lock released, exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    module, name = {"step": (probe_loop, "train_step"), "snapshot": (fisher_probe, "assemble_snapshot")}[where]
    real = getattr(module, name)

    def interrupted(*args):  # type: ignore[no-untyped-def]
        if args[5 if where == "step" else 0] == at:  # train_step(model, loss, optimizer, x, y, iteration), snapshot(it)
            interrupt()
        return real(*args)

    monkeypatch.setattr(module, name, interrupted)
    out = tmp_path / "r.nc"
    args = ["probe", "--iterations", "10", "--every", "2", "--methods", "kfac", "--metrics", "frobenius_error"]
    assert cli.main([*args, "--out", str(out), "--no-progress", "--figure", "none"]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fisherlab: " + message.format(out=out) and "Traceback" not in "".join(err)
    assert not (tmp_path / "r.nc.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if kept is None:
        assert not out.exists()
    else:
        ds = load(out)
        validate(ds)
        assert list(ds["iteration"].values) == kept


def test_diverging_training_is_reported() -> None:
    """A non-finite training loss stops the run with a message, not a silent NaN."""
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FisherlabError, match="training loss became nan"):
        probe_loop.train_step(
            model, LossKind.MSE, opt, torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 7
        )


def test_probe_training_on_user_conv_model() -> None:
    """The Python API probes a user's Conv2d/Linear model with its own loss and data, in memory."""
    torch.manual_seed(0)
    model = SmallConvNet(4).double()
    data = itertools.cycle(
        [(torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(3)]
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = ProbeConfig(iterations=4, every=2, fisher="exact", tol=1e-10)
    ds = probe_training(model, "ce", data, opt, config, progress=False)
    validate(ds)
    assert list(ds["layer"].values) == ["conv1", "conv2", "fc"]
    err = ds["frobenius_error"]
    for rank2 in ("deflation", "lanczos"):
        assert bool((err.sel({"method": rank2}) <= err.sel({"method": "kpsvd"}) * (1 + 1e-8)).all())


def test_frobenius_only_run(tmp_path) -> None:
    """--metrics frobenius_error skips error 2 (NaN, recorded in attrs) and still plots error 1."""
    out = tmp_path / "r.nc"
    assert (
        cli.main(
            [
                "probe",
                "--iterations",
                "2",
                "--every",
                "1",
                "--metrics",
                "frobenius_error",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    ds = load(out)
    assert ds.attrs["metrics"] == "frobenius_error"
    assert bool(ds["spectral_error"].isnull().all()) and bool(ds["frobenius_error"].notnull().all())
    assert (tmp_path / "r.png").exists()


def test_two_level_end_to_end(tmp_path, monkeypatch) -> None:
    """--two-level probes every layer, stores gaps / energy errors per coarse space and draws T Fig. 5.
    On deeplinear64 cut to 4 layers (tests.cases.deep_linear_problem); the paper problems are run two-level
    by analyses/t_fig5_gap.py --smoke and notebook 03 in the tests."""
    problem = deep_linear_problem(4)
    monkeypatch.setitem(PROBLEMS, problem.name, problem)
    out = tmp_path / "gap.nc"
    status = cli.main(
        [
            "probe",
            "--problem",
            problem.name,
            "--two-level",
            "--damping",
            "1e-2",
            "--iterations",
            "1",
            "--every",
            "1",
            "--batch-size",
            "32",
            "--methods",
            "kfac,deflation",
            "--coarse-spaces",
            "nicolaides,residuals,taylor,tko",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    ds = load(out)
    validate(ds)
    assert list(ds["coarse_space"].values) == ["nicolaides", "residuals", "taylor", "tko"]
    assert ds.attrs["two_level"] == 1 and ds.attrs["damping"] == 1e-2
    assert ds.attrs["probed_layers"] == "1,2,3,4" and ds.attrs["problem"] == problem.name
    gaps = ds["gap"].sel({"coarse_space": ["nicolaides", "residuals", "taylor"]})
    assert bool((gaps <= 1e-9 * ds["energy_kfac"]).all())  # β* never increases the F•-error (T eq. 3.19)
    torch.testing.assert_close(
        torch.as_tensor(ds["energy_two_level"].values - ds["energy_kfac"].values[:, None]),
        torch.as_tensor(ds["gap"].values),
        rtol=1e-6,
        atol=1e-9 * float(ds["energy_kfac"].max()),
    )
    assert bool(ds["block_energy_error"].notnull().all())
    assert (tmp_path / "gap-twolevel.png").exists()
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again-twolevel.png").exists()


def test_plot_overlays_runs_of_the_same_file_name(tmp_path, monkeypatch, capsys) -> None:
    """`plot a/run.nc b/run.nc` draws two runs, labelled a/run and b/run (issue 20, item 11)."""
    from fisherlab import plots
    from tests.test_plots import probe_dataset

    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        probe_dataset(seed=seed).to_netcdf(tmp_path / name / "run.nc", engine="scipy")
    drawn: list[list[str]] = []
    real = plots.error_figure
    monkeypatch.setattr(plots, "error_figure", lambda runs: drawn.append(list(runs)) or real(runs))
    paths = [str(tmp_path / "a" / "run.nc"), str(tmp_path / "b" / "run.nc")]
    assert cli.main(["plot", *paths, "--out", str(tmp_path / "both.png")]) == 0
    assert drawn == [["a/run", "b/run"]]


def test_plot_probe_and_train_files_together_is_one_error(tmp_path, capsys) -> None:
    from tests.test_plots import probe_dataset, train_dataset

    probe_dataset().to_netcdf(tmp_path / "probe.nc", engine="scipy")
    train_dataset().to_netcdf(tmp_path / "train.nc", engine="scipy")
    for order in ((tmp_path / "probe.nc", tmp_path / "train.nc"), (tmp_path / "train.nc", tmp_path / "probe.nc")):
        assert cli.main(["plot", *map(str, order), "--out", str(tmp_path / "f.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fisherlab: error: ") and "train.nc is a train file" in err


def test_info_shows_every_attribute_whole(tmp_path, capsys) -> None:
    """Every attribute is listed; a long one is folded over lines, not cut (issue 20, item 11)."""
    from tests.test_plots import probe_dataset

    ds = probe_dataset()
    long_value = " ".join(f"word{i}" for i in range(80))
    ds.attrs = {f"attribute_{i}": f"value {i}" for i in range(28)} | {"long": long_value}
    ds.to_netcdf(tmp_path / "r.nc", engine="scipy")
    assert cli.main(["info", str(tmp_path / "r.nc")]) == 0
    out = capsys.readouterr().out
    assert all(f"attribute_{i} " in out for i in range(28))
    attributes = out.split("Attributes (29):\n")[1]
    assert " ".join(attributes.split()).endswith("long " + long_value)  # whole, folded
    assert max(len(line) for line in out.splitlines()) <= 110


def test_foreign_file_is_not_a_results_file(tmp_path, capsys) -> None:
    """A file that is not netCDF says so, without advice to install netcdf4 (issue 20, item 11)."""
    (tmp_path / "x.nc").write_text("hello\n")
    for command in ("info", "plot"):
        assert cli.main([command, str(tmp_path / "x.nc")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a fisherlab results file" in err and "pip" not in err


def test_output_under_a_regular_file_is_refused(tmp_path, capsys) -> None:
    """An output whose directory cannot exist (a path under a regular file) fails for root too."""
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    status = cli.main(["probe", "--iterations", "2", "--every", "1", "--out", str(blocker / "r.nc"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("fisherlab: error: cannot create directory") and err.count("\n") == 1
