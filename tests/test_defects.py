"""Regression tests for the defects of issue 11 that are not about one module's maths: weight
sharing, runs that lose or mix work, the Python API's bad inputs, stand-in data named as such,
a multi-layer probe whose layers die, and the deterministic spectral coarse vector."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from fisherlab import cli
from fisherlab._errors import FisherlabError, UndefinedMetricWarning
from fisherlab.approximations import approximate_all
from fisherlab.config import ProbeConfig
from fisherlab.data import announce_data
from fisherlab.dense import per_sample_gradients, rearrange
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.probe import Probe
from fisherlab.results import ResultsWriter, load, load_factors
from fisherlab.run import probe_training
from fisherlab.twolevel import smallest_eigenvector
from tests.cases import make_factors, small_mlp


class SharedLinear(nn.Module):
    """One Linear applied twice per sample (shared weights), once on a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(torch.stack([h, 0.5 * h], 1))).sum(1)  # second call on a length-2 sequence
        return self.head(h)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_module_called_twice_is_weight_sharing(fisher: str) -> None:
    """The Fisher block and gradient of a module called twice equal torch.func brute force (defect 11)."""
    torch.manual_seed(0)
    model = SharedLinear().double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    snap = Probe(model, "mse", fisher=fisher)(x, y)
    psg = per_sample_gradients(model, "mse", x, y, {"shared": model.shared})["shared"]
    torch.testing.assert_close(snap.gradients["shared"], psg.mean(0), rtol=1e-12, atol=1e-14)
    block = snap.blocks()["shared"]
    assert block.factors.n_positions == 3  # one position from the first call, two from the second
    if fisher == "empirical":
        jac = psg.reshape(7, -1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / 7, rtol=1e-12, atol=1e-14)
    else:  # MSE: the exact Fisher is JᵀJ over the output units, the Gauss-Newton matrix
        jac = torch.func.jacrev(
            lambda w: torch.func.functional_call(model, {**dict(model.named_parameters()), "shared.weight": w}, (x,))
        )(model.shared.weight.detach())
        jb = torch.func.jacrev(
            lambda b: torch.func.functional_call(model, {**dict(model.named_parameters()), "shared.bias": b}, (x,))
        )(model.shared.bias.detach())
        j = torch.cat([jac, jb[..., None]], -1).reshape(7 * 3, -1)
        torch.testing.assert_close(block.as_dense(), j.T @ j / 7, rtol=1e-10, atol=1e-12)


def test_rearranged_dense_matches_index_definition() -> None:
    """R(F)[(o1, o2), (i1, i2)] = F[(o1, i1), (o2, i2)], entry by entry (K eq. 7)."""
    block = ExactBlock(make_factors({"id": "x", "n": 3, "v": 2, "t": 2, "d_in": 3, "d_out": 2, "seed": 5}))
    f, d_out, d_in = block.as_dense(), block.factors.d_out, block.factors.d_in
    expected = torch.empty(d_out * d_out, d_in * d_in, dtype=f.dtype)
    for o1, o2, i1, i2 in itertools.product(range(d_out), range(d_out), range(d_in), range(d_in)):
        expected[o1 * d_out + o2, i1 * d_in + i2] = f[o1 * d_in + i1, o2 * d_in + i2]
    assert torch.equal(block.rearranged_dense(), expected)
    assert torch.equal(rearrange(f, d_out, d_in), expected)


def test_output_under_a_regular_file_is_refused(tmp_path, capsys) -> None:
    """An output whose directory cannot exist (a path under a regular file) fails for root too."""
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    status = cli.main(["probe", "--iterations", "2", "--every", "1", "--out", str(blocker / "r.nc"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("fisherlab: error: cannot create directory") and err.count("\n") == 1


def test_second_writer_of_the_same_output_is_refused(tmp_path) -> None:
    """Two runs writing one --out: the second is refused while the first holds the lock (defect 12)."""
    out = tmp_path / "r.nc"
    with ResultsWriter(out, {}), pytest.raises(FisherlabError, match="another fisherlab run is writing"):
        ResultsWriter(out, {}, overwrite=True)
    with ResultsWriter(out, {}, overwrite=True):  # released when the first finished
        pass


def test_stored_factors_live_in_the_results_file_and_overwrite_replaces_them(tmp_path) -> None:
    """--store-factors puts each snapshot's factors in the results file (compressed); --overwrite keeps only
    the new run's; load_factors reads one slice back, equal to a fresh probe of the same model."""
    out = tmp_path / "r.nc"
    base = [
        "probe",
        "--iterations",
        "2",
        "--layers",
        "6",
        "--methods",
        "kfac",
        "--metrics",
        "frobenius_error",
        "--store-factors",
        "6",
        "--out",
        str(out),
        "--no-progress",
        "--figure",
        "none",
    ]
    assert cli.main([*base, "--every", "1"]) == 0
    assert list(load(out, factors=True)["factors_a_6"]["iteration"].values) == [0, 1, 2]
    assert cli.main([*base, "--every", "2", "--overwrite"]) == 0
    stored = load(out, factors=True)
    assert list(stored["iteration"].values) == [0, 2] and "factors_a_6" not in load(out)
    d = load_factors(out, iteration=2, layer="6")
    torch.testing.assert_close(d["a"], torch.from_numpy(stored["factors_a_6"].values[1]), rtol=0, atol=0)
    assert ExactBlock(LayerFactors(d["a"], d["g"])).dim == 6 * 26  # type: ignore[arg-type]
    with pytest.raises(FisherlabError, match="no snapshot at iteration 1"):
        load_factors(out, iteration=1, layer="6")
    with pytest.raises(FisherlabError, match="no stored factors of layer '5'"):
        load_factors(out, iteration=2, layer="5")


def test_stored_factor_loader_refuses_code(tmp_path) -> None:
    """load_factors never unpickles: a crafted .pt handed in is refused with a clear error."""
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1), "g": print}, path)
    with pytest.raises(FisherlabError, match="no stored factors"):
        load_factors(path, iteration=0, layer="5")


def test_train_writes_every_epoch_and_survives_ctrl_c(tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C in epoch 2 of the second optimizer: exit 130, one line, the file holds every finished epoch."""
    from fisherlab import train

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
    from tests.test_bad_inputs import _idx_images

    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(40))
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


def test_stand_in_is_named_on_console_and_in_titles(capsys) -> None:
    """A stand-in run says so when it starts and in every figure title (defect 5)."""
    from fisherlab.data import load_images
    from fisherlab.plots import error_figure, training_figure

    data = load_images("mnist")
    assert data.stand_in
    announce_data(data.source, data.stand_in)
    assert "STAND-IN data, not the paper's dataset" in capsys.readouterr().err
    values = np.full((1, 1, 1), 0.5)
    ds = xr.Dataset(
        {
            "frobenius_error": (("iteration", "layer", "method"), values),
            "spectral_error": (("iteration", "layer", "method"), values),
        },
        coords={"iteration": [0], "layer": ["5"], "method": ["kfac"]},
        attrs={"problem": "mnist", "data_source": data.source, "stand_in": 1},
    )
    assert "STAND-IN" in error_figure(ds)._suptitle.get_text()
    train = xr.Dataset(
        {k: (("optimizer", "epoch"), np.ones((1, 2))) for k in ("train_loss", "valid_loss", "wall_time")},
        coords={"optimizer": ["sgd"], "epoch": [0, 1]},
        attrs={"problem": "mnist", "data_source": data.source},
    )
    assert "STAND-IN" in training_figure(train)._suptitle.get_text()
    import matplotlib.pyplot as plt

    plt.close("all")


def test_probe_of_several_layers_with_a_large_learning_rate() -> None:
    """Layers of different shapes, a learning rate that kills the ReLU units: no crash; a zero block
    warns and stores NaN, every other snapshot is finite (defect 9)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(0)
    batches = itertools.cycle(
        [
            (
                torch.randn(16, 6, generator=gen, dtype=torch.float64),
                torch.rand(16, 3, generator=gen, dtype=torch.float64),
            )
            for _ in range(3)
        ]
    )
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    config = ProbeConfig(iterations=6, every=1, metrics=("frobenius_error",), tol=1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = probe_training(model, "mse", batches, opt, config, layers=["0", "2"], progress=False)
    norms = ds["fisher_frobenius_norm"].values
    assert (norms == 0).any(), "the case must kill a layer"
    err = ds["frobenius_error"].values
    assert np.isnan(err[norms == 0]).all() and np.isfinite(err[norms > 0]).all()
    assert any(issubclass(w.category, UndefinedMetricWarning) for w in caught)


def test_python_api_bad_inputs() -> None:
    """Public entry points refuse bad input with a ValueError that says what was expected (defect 13)."""
    block = ExactBlock(make_factors({"id": "x", "n": 4, "v": 1, "t": 1, "d_in": 3, "d_out": 2, "seed": 0}))
    with pytest.raises(ValueError, match=r"unknown methods \['shampo'\]"):
        approximate_all(block, ["shampo"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one sample"):
        LayerFactors(torch.zeros(0, 1, 3), torch.zeros(0, 1, 1, 2))
    kron = KronSum((torch.eye(2, dtype=torch.float64),), (torch.eye(3, dtype=torch.float64),))
    for damping in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be finite and non-negative"):
            kron.solve(torch.ones(2, 3, dtype=torch.float64), damping=damping)
    model = small_mlp()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one row per sample"):
        Probe(model, "mse")(x, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point targets"):
        Probe(model, "mse")(x, torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class targets"):
        Probe(model, "ce")(x, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="N >= 1"):
        Probe(model, "mse")(x[:0], None)
    short = [(x, torch.zeros(5, 3, dtype=torch.float64))] * 2
    with pytest.raises(ValueError, match="batch iterator ended after 2 batches"):
        probe_training(
            model,
            "mse",
            short,
            torch.optim.SGD(model.parameters(), lr=0.1),
            ProbeConfig(iterations=3, every=1),
            progress=False,
        )


def test_spectral_vector_is_deterministic_for_a_repeated_eigenvalue() -> None:
    """With a repeated smallest eigenvalue the vector is the normalised projection of 1 onto its
    eigenspace, whatever basis eigh returns (the same matrix, rotated inside the eigenspace)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    space = q[:, :3]
    expected = space @ (space.T @ torch.ones(5, dtype=torch.float64))
    expected = expected / expected.norm() * torch.sign(expected.sum())
    torch.testing.assert_close(smallest_eigenvector(m), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(smallest_eigenvector((m + m.T) / 2 + 0.0 * m), expected, rtol=1e-9, atol=1e-12)
    eye = smallest_eigenvector(torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(eye, torch.full((4,), 0.5, dtype=torch.float64))
