"""`fisherlab train`: the comparison dataset (dims optimizer, epoch), grid search, early
stopping, K Figure 2, and bad input."""

from __future__ import annotations

import numpy as np

from fisherlab import cli
from fisherlab.config import TrainConfig
from fisherlab.results import load
from fisherlab.train import run_training


def test_train_end_to_end(tmp_path, capsys) -> None:
    """Every optimizer lowers the training loss; the dataset and the four-panel figure are written."""
    out = tmp_path / "t.nc"
    status = cli.main(
        [
            "train",
            "--optimizers",
            "adam,kfac,kpsvd,deflation,kfac2l_tko",
            "--epochs",
            "2",
            "--max-batches",
            "4",
            "--eval-samples",
            "512",
            "--batch-size",
            "64",
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
