"""FisherProbe inside a loop it does not drive (issue 10, part 1): training is undisturbed, the
dataset has the probe schema, frozen layers and autocast are handled."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fisherlab as fl
from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import kfac_factors
from fisherlab.fisher_probe import USER_LOOP
from fisherlab.results import load, validate


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def _train(model: nn.Module, probe: fl.FisherProbe | None, steps: int = 5) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            probe.step(step, x, y)
            assert all(p.grad is None for p in model.parameters()), "the probe wrote .grad"
            assert model.training
        loss = nn.functional.cross_entropy(model(x), y)  # dropout draws from the global RNG
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_probing_leaves_training_bitwise_unchanged(tmp_path: Path) -> None:
    """Same losses, parameters, batch-norm statistics and global RNG state with and without the probe."""
    plain, probed = _net(), _net()
    torch.manual_seed(123)
    expected = _train(plain, None)
    rng_plain = torch.get_rng_state()
    torch.manual_seed(123)
    probe = fl.FisherProbe(probed, "ce", every=2, methods=["kfac", "kpsvd"], out=tmp_path / "p.nc")
    got = _train(probed, probe)
    probe.close()
    assert got == expected
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ds = load(tmp_path / "p.nc")
    validate(ds)
    assert list(ds["iteration"].values) == [0, 2, 4] and list(ds["method"].values) == ["kfac", "kpsvd"]
    assert ds.attrs["data_source"] == USER_LOOP and ds.attrs["problem"] == "Sequential"
    assert ds.attrs["skipped_parameters"] == "1.weight,1.bias"  # batch norm is not probed
    assert not (tmp_path / "p.nc.lock").exists()


def test_the_issue_snippet_runs_as_written(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    probe = fl.FisherProbe(
        model,
        loss="ce",
        every=10,
        layers=["0", "3"],
        methods=["kfac", "kpsvd", "deflation"],
        out=str(tmp_path / "probe.nc"),
    )
    loader = [(torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))) for _ in range(12)]
    for step, (x, y) in enumerate(loader):
        probe.step(step, x, y)
    ds = probe.close()
    assert ds is not None and ds.sizes["iteration"] == 2 and list(ds["layer"].values) == ["0", "3"]
    assert bool(
        (ds["frobenius_error"].sel({"method": "kpsvd"}) <= ds["frobenius_error"].sel({"method": "kfac"}) + 1e-9).all()
    )


def test_autocast_does_not_change_the_measured_fisher() -> None:
    """Inside torch.autocast the probe pass runs in full precision: the same errors as outside."""
    model = _net().eval()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    config = fl.ProbeConfig(tol=1e-10, max_iter=5000)
    outside = fl.FisherProbe(model, "ce", every=1, config=config).step(0, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fl.FisherProbe(model, "ce", every=1, config=config).step(0, x, y)
    assert outside is not None and inside is not None
    torch.testing.assert_close(
        torch.as_tensor(inside["frobenius_error"].values),
        torch.as_tensor(outside["frobenius_error"].values),
        rtol=1e-8,
        atol=1e-12,
    )


def test_frozen_layers_are_probed_like_trainable_ones() -> None:
    """Parameters that do not require grad: the exact factors are those of a trainable copy."""
    frozen = _net().eval()
    trainable = copy.deepcopy(frozen)
    for p in frozen[0].parameters():
        p.requires_grad_(False)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    got = fl.Probe(frozen, "ce", fisher="exact")(x, y)
    expected = fl.Probe(trainable, "ce", fisher="exact")(x, y)
    for name in ("0", "4"):
        torch.testing.assert_close(got.factors[name].g, expected.factors[name].g, rtol=0, atol=0)
        torch.testing.assert_close(got.gradients[name], expected.gradients[name], rtol=0, atol=0)


def test_bad_arguments_are_one_clear_error(tmp_path: Path) -> None:
    model = _net()
    with pytest.raises(fl.FisherlabError, match="unknown layer"):
        fl.FisherProbe(model, "ce", layers=["nope"])
    with pytest.raises(fl.FisherlabError, match="unknown methods"):
        fl.FisherProbe(model, "ce", methods=["shampo"])
    with pytest.raises(fl.FisherlabError, match="unknown loss"):
        fl.FisherProbe(model, "hinge")
    with pytest.raises(fl.FisherlabError, match="no snapshot yet"):
        _ = fl.FisherProbe(model, "ce", every=3).dataset


def _errors_by_accumulation(*precisions: str) -> dict[str, object]:
    errors = {}
    for precision in precisions:
        model = _net()
        model.eval()  # no dropout: every run sees the same network
        config = fl.ProbeConfig(accumulate=precision, methods=("kfac", "kpsvd", "deflation"), every=1)
        probe = fl.FisherProbe(model, "ce", layers=["4"], config=config)
        gen = torch.Generator().manual_seed(1)
        probe.step(0, torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen))
        errors[precision] = probe.close()
    return errors


def test_float32_accumulation_stays_close_to_float64() -> None:
    """--accumulate float32: the factors are float32 and error 1 of every method is within 1e-3 of the
    float64 value (the floor the CLI help states), error 2 too; the default ``mixed`` (KFAC's moments
    summed in float32, all else in float64) moves KFAC's errors by float32 rounding only and the
    others' within their solver tolerance."""
    errors = _errors_by_accumulation("float64", "float32", "mixed")
    for name in ("frobenius_error", "spectral_error"):
        diff = abs(errors["float32"][name] - errors["float64"][name]).max()
        assert 0 < float(diff) < 1e-3, name
        mixed = abs(errors["mixed"][name] - errors["float64"][name])
        assert 0 < float(mixed.sel({"method": "kfac"}).max()) < 1e-5, name  # sel(method=...) is sel's own argument
        # the power iterations start from KFAC: they stop elsewhere within their tolerance (1e-6)
        assert float(mixed.sel({"method": ["kpsvd", "deflation"]}).max()) < 1e-6, name
    assert errors["float32"].attrs["accumulate"] == "float32"
    assert errors["mixed"].attrs["accumulate"] == "mixed"


def test_probe_stores_factors_in_the_model_precision_and_sums_in_the_accumulation_one() -> None:
    model = _net().eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    f = fl.Probe(model, "ce", layers=["4"], moments_in_capture_dtype=True)(x, y).factors["4"]
    assert f.a.dtype == f.g.dtype == torch.float32  # lossless copies of the model's values
    assert f.dtype == torch.float64 and f.moment_dtype == torch.float32
    assert fl.ExactBlock(f).factors.a.dtype == torch.float64  # every sum of the exact block in float64
    kfac = kfac_factors(f)  # A and G in the model's precision, as a KFAC optimizer uses them
    exact = kfac_factors(fl.LayerFactors(f.a.double(), f.g.double()))
    assert kfac.outs[0].dtype == kfac.ins[0].dtype == torch.float32
    kfac = kfac.to(torch.float64)
    torch.testing.assert_close(kfac.ins[0], exact.ins[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kfac.outs[0], exact.outs[0], rtol=1e-6, atol=1e-9)
    assert not torch.equal(kfac.ins[0], exact.ins[0])  # the moments were summed in float32


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_step_under_inference_mode_gives_the_snapshot_of_a_plain_step() -> None:
    """``step()`` inside ``torch.inference_mode()`` (a validation loop) probes as outside it, on inference
    tensors too."""
    x, y = _batch()
    model = _net().eval()
    expected = fl.FisherProbe(model, "ce", every=1, layers=["4"], methods=["kfac"]).step(0, x, y)
    probe = fl.FisherProbe(model, "ce", every=1, layers=["4"], methods=["kfac"])
    with torch.inference_mode():
        got = probe.step(0, x.clone(), y.clone())  # inference tensors
    assert got is not None and expected is not None
    assert float(got["frobenius_error"].sum()) == float(expected["frobenius_error"].sum())


def test_steps_beyond_32_bits_are_stored(tmp_path: Path) -> None:
    out = tmp_path / "big.nc"
    probe = fl.FisherProbe(_net().eval(), "ce", every=2, layers=["4"], methods=["kfac"], out=out)
    for step in (2**31, 2**40):
        probe.step(step, *_batch())
    probe.close()
    assert [int(i) for i in load(out)["iteration"].values] == [2**31, 2**40]


def test_snapshot_lists_the_skipped_modules_and_why() -> None:
    snap = fl.Probe(_net(), "ce", layers=["4"])(*_batch())
    assert snap.skipped[0] == "0: not among the chosen layers"
    assert snap.skipped[1].startswith("1: BatchNorm1d, only nn.Linear, nn.Conv2d, ")
    assert "nn.Embedding, nn.LayerNorm" in snap.skipped[1] and len(snap.skipped) == 2


def test_coverage_and_trainable_layers_are_run_attributes() -> None:
    """``fisher_coverage`` is the fraction of trainable parameters inside a probed block; ``layers="trainable"``
    leaves the frozen layers out (and out of the coverage's denominator); the skipped modules say why."""
    model = _net()
    model[0].requires_grad_(False)
    every = fl.FisherProbe(model, "ce", methods=["kfac"])
    assert every.attrs["probed_layers"] == "0,4"
    trainable = {"1.weight": 8, "1.bias": 8, "4.weight": 24, "4.bias": 3}
    assert every.attrs["fisher_coverage"] == pytest.approx(27 / sum(trainable.values()))
    assert "1: BatchNorm1d, only nn.Linear" in str(every.attrs["skipped_modules"])
    adapters = fl.FisherProbe(model, "ce", layers="trainable", methods=["kfac"])
    assert adapters.attrs["probed_layers"] == "4"
    assert adapters.attrs["fisher_coverage"] == every.attrs["fisher_coverage"]
    assert "0: frozen" in str(adapters.attrs["skipped_modules"])
    assert every.attrs["methods_not_applicable"] == "none"


def test_embeddings_are_not_stored_and_two_level_takes_kronecker_layers(tmp_path: Path) -> None:
    """An embedding's factors keep the batch's tokens (their width changes per snapshot): ``store_factors``
    refuses it; two-level KFAC refuses a layer norm among the probed layers; both one clear message."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with pytest.raises(fl.FisherlabError, match=r"\['0'\] keep the batch's tokens only"):
        fl.FisherProbe(model, "mse", layers=["0"], config=fl.ProbeConfig(store_factors=("0",)), out=tmp_path / "e.nc")
    with pytest.raises(fl.FisherlabError, match=r"two-level KFAC takes Linear, Conv2d and Conv1D .*probe \['1'\]"):
        fl.FisherProbe(model, "mse", layers=["1", "2"], config=fl.ProbeConfig(two_level=True))


def test_norm_layers_say_once_which_methods_do_not_apply() -> None:
    """A LayerNorm probed with Kronecker methods: one warning line for the run, the reason as a run attribute,
    NaN errors for those methods and finite ones for ``diagonal``; every parameter is covered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = fl.FisherProbe(model, "ce", every=1, methods=["kfac", "diagonal"])
        for step in range(2):
            probe.step(step, *_batch())
    said = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(said) == 1 and "kfac on the elementwise blocks of 1" in said[0]
    ds = probe.dataset
    assert ds.attrs["fisher_coverage"] == 1.0 and ds.attrs["skipped_modules"] == "none"
    assert str(ds.attrs["methods_not_applicable"]).startswith("1: kfac (not built on an elementwise block")
    assert bool(ds["frobenius_error"].sel({"layer": "1", "method": "kfac"}).isnull().all())
    assert bool(ds["frobenius_error"].sel({"method": "diagonal"}).notnull().all())


def test_zero_fisher_warns_once_per_layer_per_run() -> None:
    model = _net().eval()
    with torch.no_grad():
        model[4].weight.zero_()  # nothing reaches layer 0: its block is zero at every snapshot
    probe = fl.FisherProbe(model, "ce", every=1, methods=["kfac"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            probe.step(step, *_batch())
    zero = [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(zero) == 1 and "'0'" in str(zero[0].message)
    assert bool(probe.dataset["frobenius_error"].sel(layer="0").isnull().all())


def test_default_is_error_1_only_and_the_first_snapshot_says_its_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Without ``config`` FisherProbe measures error 1 only (the cheap path); ``config=ProbeConfig()`` both;
    the first snapshot's time and peak memory are said once, on one line."""
    cheap = fl.FisherProbe(_net().eval(), "ce", every=1, layers=["4"])
    for step in range(2):
        cheap.step(step, *_batch())
    full = fl.FisherProbe(_net().eval(), "ce", layers=["4"], config=fl.ProbeConfig(every=1))
    full.step(0, *_batch())
    assert bool(cheap.dataset["spectral_error"].isnull().all())
    assert bool(cheap.dataset["frobenius_error"].notnull().all())
    assert bool(full.dataset["spectral_error"].notnull().all())
    cost = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fisherlab: probe cost:")]
    assert len(cost) == 2  # one per probe
    assert " s, peak memory " in cost[0] and "GiB" in cost[0] and "error 1 only" in cost[1]


def test_step_after_close_raises_and_keeps_the_file(tmp_path: Path) -> None:
    """Three snapshots, close, one more step: an error, and the file still holds all three (issue 20 item 1:
    the step reopened the file for writing and truncated it to the one new snapshot)."""
    model = _net()
    probe = fl.FisherProbe(model, "ce", every=1, methods=["kfac"], out=tmp_path / "p.nc")
    _train(model, probe, steps=3)
    probe.close()
    with pytest.raises(fl.FisherlabError, match="closed"):
        probe.step(3, torch.randn(16, 6), torch.randint(0, 3, (16,)))
    assert list(load(tmp_path / "p.nc")["iteration"].values) == [0, 1, 2]
    assert not (tmp_path / "p.nc.lock").exists()
