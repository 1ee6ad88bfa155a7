"""The Hugging Face Trainer callback inside ``Trainer.train()`` on CPU (issue 19, part 4): it probes
the dict batch the Trainer hands a causal LM (padded right and left), leaves training unchanged, and
its scalars reach the Trainer's ``log_history`` and its TensorBoard integration (read back with
TensorBoard's own reader); ``unpack`` for other batches, once per step under gradient accumulation."""

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


class _BigramLM(nn.Module):
    """A causal LM of Linear layers in Hugging Face's calling style: ``model(input_ids, attention_mask,
    labels)`` -> ``CausalLMOutput(loss, logits)``, the loss HF's mean over supervised tokens (labels
    shifted by one inside, ``-100`` ignored); each position sees its own token only (no attention)."""

    def __init__(self, vocab: int = 7, width: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> Any:
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _Tokens(torch.utils.data.Dataset):
    """Sequences of 5 real tokens in 7 positions, padded right (even rows) or left (odd rows): 4
    supervised positions in each (labels ``-100`` at padding and at the first real token)."""

    def __init__(self) -> None:
        gen = rng(1)
        self.rows = []
        for i in range(32):
            ids = torch.zeros(7, dtype=torch.long)
            mask = torch.zeros(7, dtype=torch.long)
            real = slice(0, 5) if i % 2 == 0 else slice(2, 7)
            ids[real] = torch.randint(1, 7, (5,), generator=gen)
            mask[real] = 1
            labels = ids.masked_fill(mask == 0, -100)
            labels[real.start] = -100  # the first token is predicted by no position inside the mask
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


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


def _train(tmp_path: Path, model: nn.Module, data: torch.utils.data.Dataset, callbacks: list, **kwargs: Any) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=0.1,
        report_to="tensorboard",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kwargs,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer


def test_trainer_callback_probes_the_trainers_batches_and_reports_to_its_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A causal LM and its padded dict batches: snapshots at steps 0 and 2 in the file; training
    unchanged; the scalars of each snapshot in ``log_history`` at its step, in the Trainer's TensorBoard
    event file as ``train/<name>`` and in the probe's own as ``<name>``; the probe's loss (a sum over the
    4 supervised tokens of a sequence) is 4 x the Trainer's loss of the next step (the same batch)."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "hf_tb"))  # TensorBoardCallback's directory
    callback = fl.hf.FisherProbeCallback(
        every=2, out=tmp_path / "p.nc", methods=["kfac", "kpsvd"], tensorboard=tmp_path / "tb"
    )  # loss "causal_lm", the model's keyword arguments as the batch
    probed = _train(tmp_path, _BigramLM(), _Tokens(), [callback], max_steps=3)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "plain_tb"))
    plain = _train(tmp_path, _BigramLM(), _Tokens(), [], max_steps=3)
    for (name, a), b in zip(plain.model.state_dict().items(), probed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ds = load(tmp_path / "p.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2] and list(ds["layer"].values) == ["embed", "hidden", "head"]
    assert callback._hook is None and not (tmp_path / "p.nc.lock").exists()

    history = {h["step"]: h for h in probed.state.log_history if "fisher/train_loss" in h}
    losses = {h["step"]: h["loss"] for h in probed.state.log_history if "loss" in h}
    hf_events = tensorboard_scalars(tmp_path / "hf_tb")
    own_events = tensorboard_scalars(tmp_path / "tb")
    assert sorted(history) == [0, 2]
    assert sorted(t for t in hf_events if t.startswith("train/fisher/")) == sorted(f"train/{t}" for t in own_events)
    for step in (0, 2):
        scalars = snapshot_scalars(ds.sel(iteration=[step]))
        assert "fisher/frobenius_error/head/kpsvd" in scalars
        assert {k: v for k, v in history[step].items() if k.startswith("fisher/")} == scalars
        for name, value in scalars.items():
            assert (step, float(np.float32(value))) in hf_events[f"train/{name}"], name
            assert (step, float(np.float32(value))) in own_events[name], name
        assert scalars["fisher/train_loss"] == pytest.approx(4 * losses[step + 1], rel=1e-6)


def _unpack(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["x"], batch["labels"]


def test_trainer_callback_unpacks_other_batches_once_per_step_under_gradient_accumulation(tmp_path: Path) -> None:
    """``unpack`` maps the model's keyword arguments to ``(x, y)``; with 2 micro-batches per step each
    step is probed once (its first micro-batch); ``log=False`` reports nothing."""
    callback = fl.hf.FisherProbeCallback("ce", every=1, methods=["kfac"], unpack=_unpack, log=False)
    trainer = _train(tmp_path, _Classifier(), _Data(), [callback], max_steps=2, gradient_accumulation_steps=2)
    assert list(callback.dataset["iteration"].values) == [0, 1]
    assert not any(k.startswith("fisher/") for h in trainer.state.log_history for k in h)


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
