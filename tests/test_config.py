"""Run configurations: frozen, converted and validated once, on construction."""

from __future__ import annotations

import dataclasses

import pytest

from fisherlab import FisherlabError
from fisherlab.config import ProbeConfig, TrainConfig
from fisherlab.vocabulary import FisherKind


def test_configs_are_frozen_and_a_changed_copy_is_validated() -> None:
    config = ProbeConfig(fisher="exact", layers=["4"])
    assert config.fisher is FisherKind.EXACT and config.layers == ("4",)  # converted on construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every = 5  # type: ignore[misc]
    assert dataclasses.replace(config, every=5).every == 5
    with pytest.raises(FisherlabError, match="--every must be a positive integer"):
        dataclasses.replace(config, every=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ProbeConfig(iterations=0), "--iterations must be a positive integer"),
        (lambda: ProbeConfig(every=2.5), "--every must be a positive integer"),
        (lambda: ProbeConfig(tol=2.0), "--tol must lie in (0, 1)"),
        (lambda: ProbeConfig(threads=0), "--threads must be a positive integer"),
        (lambda: TrainConfig(epochs=0), "--epochs, --patience, --t1 and --t2 must be positive integers"),
        (lambda: TrainConfig(optimizers=("lbfgs",)), "unknown optimizers"),
    ],
)
def test_a_bad_setting_fails_on_construction(make, message: str) -> None:
    with pytest.raises(FisherlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_the_loop_rules_are_checked_by_the_run_that_drives_the_loop() -> None:
    """``every`` beyond ``iterations`` is fine for FisherProbe in a user's loop; probe_training refuses it."""
    config = ProbeConfig(iterations=5, every=10)
    with pytest.raises(FisherlabError, match="larger than --iterations"):
        config.check()
    with pytest.raises(FisherlabError, match="not probed"):
        ProbeConfig(layers=("5",), store_factors=("3",)).check_store_factors()
