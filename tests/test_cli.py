"""The CLI end to end on the default problem (few iterations), the Python API on a user's conv
model, interrupted runs, and one clear message per bad input (exit status 2, no traceback)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fisherlab import cli
from fisherlab import run as run_module
from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.losses import LossKind
from fisherlab.method_registry import METHODS
from fisherlab.results import load, validate
from fisherlab.run import probe_training
from tests.cases import SmallConvNet, small_mlp


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
        cli.main(["probe", "--methods", "all", "--iterations", "2", "--every", "1", "--out", str(out), "--no-progress"])
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


def test_interrupted_run_keeps_finished_snapshots(tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C after the snapshot at iteration 4: the file holds iterations 0, 2, 4 and is valid."""
    real_step = run_module._step

    def step(model, loss, optimizer, x, y, iteration, *rest):  # type: ignore[no-untyped-def]
        if iteration == 5:
            raise KeyboardInterrupt
        return real_step(model, loss, optimizer, x, y, iteration, *rest)

    monkeypatch.setattr(run_module, "_step", step)
    out = tmp_path / "r.nc"
    assert cli.main(["probe", "--iterations", "10", "--every", "2", "--out", str(out), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    ds = load(out)
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2, 4]


def test_diverging_training_is_reported() -> None:
    """A non-finite training loss stops the run with a message, not a silent NaN."""
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FisherlabError, match="training loss became nan"):
        run_module._step(
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


def test_two_level_end_to_end(tmp_path) -> None:
    """--two-level probes every layer, stores gaps / energy errors per coarse space and draws T Fig. 5."""
    out = tmp_path / "gap.nc"
    status = cli.main(
        [
            "probe",
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
            "nicolaides,residuals,taylor",
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
    assert ds.attrs["probed_layers"] == ",".join(str(i) for i in range(1, 13))
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


def test_layers_all_names_every_probeable_layer() -> None:
    from fisherlab.problems import get_problem
    from fisherlab.run import resolve_layers

    resnet = get_problem("resnet18")
    every = resolve_layers(resnet, ("all",))
    assert len(every) == 21 and every[0] == "conv1" and "layer4.1.conv2" in every and every[-1] == "fc"
    assert resolve_layers(get_problem("mnist"), ("2", "5")) == ("2", "5")
    with pytest.raises(FisherlabError, match=r"unknown layers \['layer9'\].*conv1, layer1.0.conv1"):
        resolve_layers(resnet, ("layer9",))
