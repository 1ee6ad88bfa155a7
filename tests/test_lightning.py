"""The Lightning callback with a real Trainer on CPU (issue 10, part 2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import fisherlab as fl
from fisherlab.dashboards import snapshot_scalars
from fisherlab.results import load, validate
from tests.cases import rng


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks: list, seed: int = 0, logger: object = False) -> _Classifier:
    torch.manual_seed(seed)
    module = _Classifier()
    gen = rng(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    return module


# Lightning's own advice (num_workers, ...) and deprecations inside it are not under test
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_callback_probes_every_k_steps_and_leaves_training_unchanged(tmp_path: Path) -> None:
    callback = fl.lightning.FisherProbeCallback(
        every=2, out=tmp_path / "pl.nc", layers=["net.0", "net.2"], methods=["kfac", "deflation"]
    )
    probed = _fit([callback])
    plain = _fit([])
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ds = load(tmp_path / "pl.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2, 4] and list(ds["layer"].values) == ["net.0", "net.2"]
    assert bool(ds["frobenius_error"].notnull().all()) and not (tmp_path / "pl.nc.lock").exists()
    assert callback.dataset.sizes["iteration"] == 3


@pytest.mark.parametrize("every", [0, -1, 2.5])
def test_callback_refuses_every_below_one(every: object) -> None:
    with pytest.raises(fl.FisherlabError, match="every must be a positive integer"):
        fl.lightning.FisherProbeCallback(every=every)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_callback_logs_the_snapshot_scalars_to_the_trainers_logger(tmp_path: Path) -> None:
    """``log=True``: each snapshot's scalars arrive in the Trainer's logger (a CSVLogger) at the probe's
    step, under the names of :func:`snapshot_scalars`, with the dataset's values."""
    callback = fl.lightning.FisherProbeCallback(every=2, layers=["net.0", "net.2"], methods=["kfac", "kpsvd"])
    _fit([callback], logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0))
    rows = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    ds = callback.dataset
    assert list(ds["iteration"].values) == [0, 2, 4]
    for step in ds["iteration"].values:
        expected = snapshot_scalars(ds.sel(iteration=[step]))
        assert "fisher/frobenius_error/net.2/kpsvd" in expected and "fisher/train_loss" in expected
        row = rows[rows["step"] == step][list(expected)].dropna(how="all")
        assert len(row) == 1, f"one row of fisher scalars at step {step}"
        assert row.iloc[0].to_dict() == pytest.approx(expected, rel=1e-12)
    fisher_steps = rows.dropna(subset=["fisher/train_loss"])["step"].tolist()
    assert fisher_steps == [0, 2, 4]


def test_default_unpack_passes_a_hugging_face_mapping_whole() -> None:
    """``(x, y, ...)`` and ``{"x", "y"}`` give their first two; an HF-style mapping is the probe's batch as it is."""
    from fisherlab.lightning import _first_two

    x, y = torch.zeros(2, 3), torch.ones(2)
    assert _first_two((x, y, "extra")) == (x, y) and _first_two({"x": x, "y": y}) == (x, y)
    hf = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    assert _first_two(hf) == (hf, None)
