"""The Hugging Face Trainer callback inside ``Trainer.train()`` on CPU (issue 19, part 4): it probes
the batch the Trainer hands the model, leaves training unchanged, and its scalars reach the Trainer's
``log_history`` and its TensorBoard integration (read back with TensorBoard's own reader).

Until dict batches and the ``causal_lm`` loss are on main the model is a classifier called with
keyword ``x`` and the callback's ``unpack`` hands ``(x, labels)`` to the probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

import fisherlab as fl
from fisherlab.dashboards import snapshot_scalars
from fisherlab.results import load, validate
from tests.cases import rng, tensorboard_scalars


class _Classifier(nn.Module):
    """``model(x=..., labels=...)`` -> ``{"loss", "logits"}`` as the Trainer wants; ``model(x)`` -> logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        logits = self.net(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = rng(1)
        self.x, self.y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _train(tmp_path: Path, callbacks: list) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        report_to="tensorboard",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=_Classifier(), args=args, train_dataset=_Data(), callbacks=callbacks)
    trainer.train()
    return trainer


def _unpack(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["x"], batch["labels"]


def test_trainer_callback_probes_the_trainers_batches_and_reports_to_its_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots at steps 0 and 2 in the file; training unchanged; the scalars of each snapshot in
    ``log_history`` at its step and in the Trainer's TensorBoard event file as ``train/<name>``, and in
    the probe's own as ``<name>``; the probe's loss is the Trainer's loss of the next step (same batch)."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "hf_tb"))  # TensorBoardCallback's directory
    callback = fl.hf.FisherProbeCallback(
        "ce", every=2, out=tmp_path / "p.nc", methods=["kfac", "kpsvd"], unpack=_unpack, tensorboard=tmp_path / "tb"
    )
    probed = _train(tmp_path, [callback])
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "plain_tb"))
    plain = _train(tmp_path, [])
    for (name, a), b in zip(plain.model.state_dict().items(), probed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ds = load(tmp_path / "p.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2] and list(ds["layer"].values) == ["net.0", "net.2"]
    assert callback._hook is None and not (tmp_path / "p.nc.lock").exists()

    history = {h["step"]: h for h in probed.state.log_history if "fisher/train_loss" in h}
    losses = {h["step"]: h["loss"] for h in probed.state.log_history if "loss" in h}
    hf_events = tensorboard_scalars(tmp_path / "hf_tb")
    own_events = tensorboard_scalars(tmp_path / "tb")
    assert sorted(history) == [0, 2]
    assert sorted(t for t in hf_events if t.startswith("train/fisher/")) == sorted(f"train/{t}" for t in own_events)
    for step in (0, 2):
        scalars = snapshot_scalars(ds.sel(iteration=[step]))
        assert "fisher/frobenius_error/net.2/kpsvd" in scalars
        assert {k: v for k, v in history[step].items() if k.startswith("fisher/")} == scalars
        for name, value in scalars.items():
            assert (step, float(np.float32(value))) in hf_events[f"train/{name}"], name
            assert (step, float(np.float32(value))) in own_events[name], name
        assert scalars["fisher/train_loss"] == pytest.approx(losses[step + 1], rel=1e-6)


def test_trainer_callback_without_a_trainer_to_log_through_says_so(tmp_path: Path) -> None:
    """``log=True`` outside a Trainer (events called by hand): a clear error naming the ways out."""
    callback = fl.hf.FisherProbeCallback("ce", every=1, unpack=_unpack)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(fl.FisherlabError, match="found no transformers.Trainer"):
        callback.on_train_begin(None, state, control, model=_Classifier())


@pytest.mark.parametrize("every", [0, -1, 2.5])
def test_trainer_callback_refuses_every_below_one(every: object) -> None:
    with pytest.raises(fl.FisherlabError, match="every must be a positive integer"):
        fl.hf.FisherProbeCallback(every=every)  # type: ignore[arg-type]
