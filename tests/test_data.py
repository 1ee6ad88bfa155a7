"""Embedded data (no download) and real-file loaders, with clear errors for missing files."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from fisherlab._errors import FisherlabError
from fisherlab.data import curves_images, load_images
from fisherlab.problems import PROBLEMS, get_problem, training_batches
from tests.cases import idx_images, idx_labels
from tests.tolerances import FLOAT32


def test_curves_generator_is_seeded_and_in_range() -> None:
    """Same seed, same images; values in [0, 1]; each image has ink along a curve."""
    a, b = curves_images(20, seed=3), curves_images(20, seed=3)
    assert torch.equal(a, b) and a.shape == (20, 784)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    ink = (a > 0.5).sum(1)
    assert bool((ink >= 5).all()) and bool((ink < 300).all())
    assert not torch.equal(a, curves_images(20, seed=4))


def test_curves_ink_is_the_distance_to_the_sampled_curve_by_cdist() -> None:
    """Dense twin: each pixel's ink is exp(-d² / (2 width²)), d its distance (``torch.cdist``) to the
    nearest of the 128 points sampled on the quadratic through the three drawn points; bitwise, on a
    number of images that is not a multiple of the generator's chunks."""
    n, size, width = 37, 28, 0.8
    gen = torch.Generator().manual_seed(9)
    pts = 1.5 + (size - 4.0) * torch.rand(n, 3, 2, generator=gen, dtype=torch.float32)
    t = torch.linspace(0, 1, 128, dtype=torch.float32)
    basis = torch.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)], dim=1)
    curve = torch.einsum("tk,nkd->ntd", basis, pts)
    grid = torch.cartesian_prod(torch.arange(size), torch.arange(size)).to(torch.float32)
    d = torch.cdist(grid.expand(n, -1, -1), curve).amin(dim=2)
    assert torch.equal(curves_images(n, seed=9), torch.exp(-(d**2) / (2 * width**2)))


@pytest.mark.parametrize("name", ["mnist", "faces"])
def test_embedded_standins(name: str) -> None:
    """Stand-ins have the problem's input size, lie in [0, 1], and say they are stand-ins."""
    data = load_images(name)
    problem = get_problem(name)
    assert data.train.shape[1] == problem.sizes[0] == problem.sizes[-1]
    assert data.train.shape[0] >= problem.batch_size
    assert float(data.train.min()) >= 0 and float(data.train.max()) <= 1
    assert "STAND-IN" in data.source


def test_problem_architectures_match_paper() -> None:
    """Layer sizes, losses and batch sizes of K App. D."""
    assert PROBLEMS["mnist"].sizes == (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    assert PROBLEMS["faces"].sizes == (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
    assert PROBLEMS["curves"].sizes == (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
    assert [PROBLEMS[p].batch_size for p in ("curves", "mnist", "faces")] == [256, 512, 1024]
    assert [PROBLEMS[p].loss.value for p in ("curves", "mnist", "faces")] == ["bce", "bce", "mse"]


def test_missing_real_files_name_the_expected_files(tmp_path) -> None:
    """An empty data directory gives an error naming the files that were looked for."""
    with pytest.raises(FisherlabError, match="train-images-idx3-ubyte"):
        load_images("mnist", tmp_path)
    with pytest.raises(FisherlabError, match="newfaces_rot_single.mat"):
        load_images("faces", tmp_path)
    with pytest.raises(FisherlabError, match="digs3pts_1.mat"):
        load_images("curves", tmp_path)
    with pytest.raises(FisherlabError, match="does not exist"):
        load_images("mnist", tmp_path / "nowhere")
    with pytest.raises(FisherlabError, match="unknown problem 'cifar'"):
        get_problem("cifar")


def test_mnist_idx_loader(tmp_path) -> None:
    """A gzipped IDX file is read and scaled to [0, 1]."""
    images = np.arange(3 * 784, dtype=np.uint8).reshape(3, 784)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + images.tobytes())
    data = load_images("mnist", tmp_path)
    torch.testing.assert_close(data.train, torch.as_tensor(images, dtype=torch.float32) / 255, **FLOAT32)


def test_mat_loaders(tmp_path) -> None:
    """CURVES and FACES .mat files are read (FACES stored pixels × images, as distributed)."""
    savemat(tmp_path / "digs3pts_1.mat", {"bdata": np.random.rand(20, 784)})
    assert load_images("curves", tmp_path).train.shape == (20, 784)  # all 20 fall in the first 16 000
    savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": np.random.rand(625, 30)})
    assert load_images("faces", tmp_path).train.shape == (30, 625)
    savemat(tmp_path / "newfaces_rot_single.mat", {"other": np.zeros(3)})
    with pytest.raises(FisherlabError, match="none of the variables"):
        load_images("faces", tmp_path)


def test_training_batches_order_is_its_own() -> None:
    """Batch order depends only on the loader seed, not on the global RNG."""
    images = torch.arange(10.0)[:, None]
    first = next(training_batches(images, 4, seed=1))
    torch.manual_seed(123)
    torch.rand(5)
    assert torch.equal(first, next(training_batches(images, 4, seed=1)))


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_every_problem_builds_and_names_its_layers(name: str) -> None:
    """Each problem's network maps a batch of its data to outputs its loss accepts; layers are named."""
    problem = get_problem(name)
    data = problem.data(seed=0)
    model = problem.model(seed=0)
    x, y = next(problem.batches(data, batch_size=4))
    from fisherlab.losses import per_sample_loss

    assert per_sample_loss(problem.loss, model(x), y).shape == (4,)
    names = problem.layer_names()
    assert set(problem.default_layers) <= set(names)
    if name.startswith("resnet"):
        assert names[0] == "conv1" and names[-1] == "fc" and len(names) == (21 if name == "resnet18" else 37)


@pytest.fixture
def float64_default():
    """``torch.set_default_dtype(torch.float64)`` for one test, restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_curves_generator_ignores_the_default_dtype(float64_default: None) -> None:
    """Under a float64 default dtype the generator gives the same float32 images (it raised a dtype error)."""
    images = curves_images(16, seed=2)
    torch.set_default_dtype(torch.float32)
    assert images.dtype == torch.float32 and torch.equal(images, curves_images(16, seed=2))


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_every_problem_data_under_a_float64_default_dtype(name: str) -> None:
    """``problem.data()`` after ``torch.set_default_dtype(torch.float64)`` gives the data of the float32 default."""
    problem = get_problem(name)
    reference = problem.data(seed=0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = problem.data(seed=0)
        x, y = next(problem.batches(data, batch_size=4))
    finally:
        torch.set_default_dtype(before)
    for got, want in ((data.train, reference.train), (data.valid, reference.valid)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert x.dtype == (torch.int64 if problem.kind == "language" else torch.float32)
    assert y.dtype == (torch.int64 if problem.kind in ("language", "classifier") else torch.float32)


def test_real_cifar_layout_loads(tmp_path: Path) -> None:
    """Well-formed python batches (protocols 2 and 5, numpy arrays inside) are accepted."""
    for i in range(1, 6):
        d = {
            b"batch_label": b"training batch",
            b"labels": [i % 10] * 3,
            b"data": np.full((3, 3072), i, np.uint8),
            b"filenames": [b"x"] * 3,
        }
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=2 if i % 2 else 5))
    data = load_images("cifar10", tmp_path)
    assert data.train.shape == (15, 3072) and not data.stand_in


def test_gzipped_mnist_with_labels_loads(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(12)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels(12))
    data = load_images("mnist", tmp_path)
    assert data.train.shape == (12, 784) and data.train_labels is not None and data.valid.shape[0] == 0
    assert os.path.basename(str(tmp_path)) in data.source
