"""`fisherlab train`: the comparison dataset (dims optimizer, epoch), grid search, early
stopping, K Figure 2, bad input, an interrupted run keeps its finished epochs, no validation set is NaN."""

from __future__ import annotations

import itertools

import numpy as np

from fisherlab import cli, train
from fisherlab.config import TrainConfig
from fisherlab.problems import PROBLEMS
from fisherlab.results import load
from fisherlab.train import run_training
from tests.cases import deep_linear_problem, idx_images


def test_train_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    """Every optimizer lowers the training loss; the dataset and the four-panel figure are written.
    On deeplinear64 cut to 4 layers (tests.cases.deep_linear_problem); the paper problems are trained by the
    tests below, analyses/fig2_optimizers.py and t_fig2_4_two_level_training.py --smoke and notebook 04."""
    problem = deep_linear_problem(4)
    monkeypatch.setitem(PROBLEMS, problem.name, problem)
    out = tmp_path / "t.nc"
    status = cli.main(
        [
            "train",
            "--problem",
            problem.name,
            "--optimizers",
            "adam,kfac,kpsvd,deflation,kfac2l_tko",
            "--epochs",
            "2",
            "--max-batches",
            "2",
            "--eval-samples",
            "256",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0, capsys.readouterr().err
    ds = load(out)
    assert ds.sizes == {"optimizer": 5, "epoch": 3}
    loss = ds["train_loss"].values
    assert np.all(loss[:, -1] < loss[:, 0])
    assert np.all(np.diff(ds["wall_time"].values, axis=1) > 0)
    assert (tmp_path / "t.png").stat().st_size > 10_000
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "fig2.pdf")]) == 0


def test_grid_search_keeps_best_and_early_stopping(tmp_path) -> None:
    """The grid point with the lowest training loss is kept; patience 1 stops a stalled run early."""
    config = TrainConfig(optimizers=("sgd",), epochs=3, max_batches=3, lr=(1e-6, 1e-2), patience=1, eval_samples=512)
    ds = run_training(config, tmp_path / "g.nc", progress=False)
    assert float(ds["lr"].sel({"optimizer": "sgd"})) == 1e-2
    tiny = run_training(
        TrainConfig(optimizers=("sgd",), epochs=4, max_batches=1, lr=(1e-12,), patience=1, eval_samples=256),
        tmp_path / "s.nc",
        progress=False,
    )
    assert np.isnan(tiny["train_loss"].values[0, -1])  # stopped before the last epoch


def test_train_bad_input(tmp_path, capsys) -> None:
    """Unknown optimizers and nonsense numbers give one clear message."""
    assert cli.main(["train", "--optimizers", "sgd,shampoo", "--out", str(tmp_path / "x.nc")]) == 2
    assert "unknown optimizers" in capsys.readouterr().err
    assert cli.main(["train", "--epochs", "0", "--out", str(tmp_path / "x.nc")]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_stored_lr_is_the_one_used(tmp_path) -> None:
    """Without --lr each optimizer's default is stored, never NaN (issue 20, item 13)."""
    optimizers = ("sgd", "adam", "kfac")
    config = TrainConfig("deeplinear64", optimizers=optimizers, epochs=1, max_batches=1, batch_size=32, eval_samples=64)
    ds = run_training(config, tmp_path / "d.nc", progress=False)
    assert ds["lr"].values.tolist() == [1e-2, 1e-3, 1.0]  # kfac: 1 under KL clipping
    assert load(tmp_path / "d.nc")["lr"].values.tolist() == [1e-2, 1e-3, 1.0]


def test_train_offers_the_transformer(tmp_path, capsys) -> None:
    """`fisherlab train --problem transformer` runs, and the help lists it (issue 20, item 13)."""
    _parser, commands = cli._parser()
    assert "transformer" in commands["train"].format_help()
    out = tmp_path / "t.nc"
    argv = ["train", "--problem", "transformer", "--optimizers", "sgd", "--epochs", "1", "--max-batches", "1"]
    assert cli.main([*argv, "--eval-samples", "16", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert load(out).attrs["problem"] == "transformer"


def test_train_writes_every_epoch_and_survives_ctrl_c(tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C in epoch 2 of the second optimizer: exit 130, one line, the file holds every finished epoch."""
    real = train._mean_loss
    calls = itertools.count()

    def interrupting(*args: object) -> float:
        if (
            next(calls) == 10
        ):  # sgd: 3 evaluations x (train, valid); adam: initial and epoch 1 done, epoch 2 interrupted
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "_mean_loss", interrupting)
    out = tmp_path / "t.nc"
    status = cli.main(
        ["train", "--optimizers", "sgd,adam", "--epochs", "2", "--max-batches", "2", "--eval-samples", "256"]
        + ["--out", str(out), "--no-progress"]
    )
    assert status == 130 and capsys.readouterr().err.strip().endswith(f"interrupted; finished epochs are in {out}")
    ds = load(out)
    assert list(ds["optimizer"].values) == ["sgd", "adam"] and ds.attrs["complete"] == 0
    assert bool(np.isfinite(ds["train_loss"].sel({"optimizer": "sgd"})).all())
    assert np.isfinite(ds["train_loss"].sel({"optimizer": "adam"}).values).tolist() == [True, True, False]


def test_no_validation_data_is_nan_and_said(tmp_path, capsys) -> None:
    """Real MNIST files with fewer than 50 001 images leave no validation set: NaN, said on the console (defect 4)."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(40))
    out = tmp_path / "t.nc"
    status = cli.main(
        [
            "train",
            "--problem",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--optimizers",
            "sgd",
            "--epochs",
            "1",
            "--batch-size",
            "20",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    assert "no validation images; valid_loss is recorded as NaN" in capsys.readouterr().err
    ds = load(out)
    assert bool(ds["valid_loss"].isnull().all()) and bool(ds["train_loss"].notnull().all())
