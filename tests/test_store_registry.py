"""Result stores by suffix: a store of one's own (a toy JSON-lines store) is one module and one
registry line; FisherProbe writes it and ``fl.load`` / ``load_factors`` read it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import xarray as xr
from torch import nn

import fisherlab as fl
from fisherlab.results import ResultsWriter, load_factors, validate
from fisherlab.store import NetCDFStore
from fisherlab.store_registry import STORES, ResultStore, register_store, store_for
from tests.jsonl_store import JsonLinesStore


@pytest.fixture
def jsonl() -> Iterator[None]:
    fl.register_store(".jsonl", JsonLinesStore())  # the one registry line
    yield
    del STORES[".jsonl"]


def test_the_built_in_store_is_netcdf() -> None:
    assert set(STORES) == {".nc"} and isinstance(store_for("a/b.NC"), NetCDFStore)
    assert isinstance(STORES[".nc"], ResultStore)


def test_a_store_of_ones_own_is_written_by_fisher_probe_and_read_by_load(tmp_path: Path, jsonl: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    config = fl.ProbeConfig(metrics=("frobenius_error",), layers=("0", "2"), store_factors=("2",))
    out = tmp_path / "x.jsonl"
    probe = fl.FisherProbe(model, "ce", every=2, methods=["kfac", "kpsvd"], out=out, config=config)
    for step in range(5):
        probe.step(step, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    in_memory = probe.close()
    assert in_memory is not None
    ds = fl.load(out)
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2, 4] and "factors_a_2" not in ds
    xr.testing.assert_identical(ds, in_memory)  # values, dtypes, attributes
    d = load_factors(out, iteration=2, layer="2")
    stored = fl.load(out, factors=True)["factors_g_2"].sel(iteration=2).values
    assert d["a"].shape[:2] == (8, 1) and torch.equal(d["g"], torch.from_numpy(stored))
    assert not (tmp_path / "x.jsonl.lock").exists()


def test_whole_datasets_go_through_the_store_too(tmp_path: Path, jsonl: None) -> None:
    ds = xr.Dataset({"train_loss": (("optimizer", "epoch"), [[1.0, 0.5]])}, coords={"optimizer": ["sgd"]})
    with ResultsWriter(tmp_path / "t.jsonl", {"seed": 1}) as writer:
        writer.write(ds)
    back = fl.load(tmp_path / "t.jsonl")
    assert back.attrs == {"seed": 1} and back["train_loss"].values.tolist() == [[1.0, 0.5]]


def test_an_unknown_suffix_names_the_known_ones(tmp_path: Path) -> None:
    for call in (lambda p: ResultsWriter(p, {}), fl.load, lambda p: load_factors(p, 0, "1")):
        path = tmp_path / "x.zarr"
        path.touch()
        with pytest.raises(fl.FisherlabError, match=r"no result store for 'x.zarr' .*results files end in \.nc"):
            call(path)
    with pytest.raises(fl.FisherlabError, match="no result store"):
        fl.FisherProbe(nn.Linear(2, 2), "mse", out=tmp_path / "y.csv")
    assert not (tmp_path / "y.csv.lock").exists()


def test_register_store_refuses_bad_entries() -> None:
    with pytest.raises(fl.FisherlabError, match="starts with a dot"):
        register_store("jsonl", JsonLinesStore())
    with pytest.raises(fl.FisherlabError, match="registered already"):
        register_store(".nc", JsonLinesStore())
    with pytest.raises(fl.FisherlabError, match="lacks create, write, read, read_factors"):
        register_store(".x", object())  # type: ignore[arg-type]
    assert set(STORES) == {".nc"}
