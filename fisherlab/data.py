"""Image data for the papers' auto-encoder problems: embedded defaults and real-file loaders.

Nothing is downloaded. Without ``data_dir`` each problem uses data that ships with an
installed package or is generated:

* ``curves`` — a seeded generator faithful to the original CURVES (Hinton & Salakhutdinov
  2006): each 28×28 image shows a smooth curve through three random points, inked by the
  distance to the curve. The original is synthetic too.
* ``mnist`` — **stand-in**: the UCI hand-written digits (1 797 real 8×8 images, as scikit-learn
  ships them) resized to 20×20 and centred on a 28×28 canvas as MNIST is.
* ``faces`` — **stand-in**: 100 real 25×25 face crops of LFW (as scikit-image ships them in
  ``skimage.data.lfw_subset``), mirrored and shifted by at most one pixel (1 800 images).
* ``cifar10`` — **stand-in** for the CNN problem: the same digits as 3×32×32 images, 10 classes.

The two stand-in image sets are bundled in ``fisherlab/standins/`` (155 kB; sources and
licences in its README), so neither scikit-learn nor scikit-image is needed.

With ``data_dir`` the real files are read: MNIST IDX (``train-images-idx3-ubyte[.gz]``, and
``train-labels-idx1-ubyte[.gz]`` for the classifier), CIFAR-10 python batches,
FACES ``newfaces_rot_single.mat`` and CURVES ``digs3pts_1.mat`` as distributed with
Hinton & Salakhutdinov (2006).
"""

from __future__ import annotations

import gzip
import math
import pickle
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError

__all__ = ["ImageData", "announce_data", "curves_images", "load_images"]


@dataclass(frozen=True)
class ImageData:
    """Flattened images in ``[0, 1]`` split into training and validation sets.

    Args:
        train: ``[n_train, pixels]`` float32.
        valid: ``[n_valid, pixels]`` float32.
        source: Where the images come from (stored in the dataset attributes).
        train_labels: Class labels ``[n_train]`` when the data have them.
        valid_labels: Class labels ``[n_valid]`` when the data have them.
        stand_in: True when the images stand in for the paper's dataset (embedded
            substitutes); runs say so on the console and in figure titles.
    """

    train: Tensor
    valid: Tensor
    source: str
    train_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    stand_in: bool = False


def curves_images(n: int, *, seed: int = 0, size: int = 28, width: float = 0.8) -> Tensor:
    """Generate ``n`` CURVES-style images ``[n, size*size]`` in ``[0, 1]``.

    Three points are drawn uniformly in the image (1.5 px margin); the curve is the quadratic
    through them at parameters 0, ½, 1 (the smoothest interpolant through three points),
    sampled at 128 points; a pixel's ink is ``exp(-d² / (2 width²))`` with ``d`` its distance
    to the curve.
    """
    gen = torch.Generator().manual_seed(seed)
    f32 = torch.float32  # explicit: the same images whatever torch's default dtype is
    pts = 1.5 + (size - 4.0) * torch.rand(n, 3, 2, generator=gen, dtype=f32)
    t = torch.linspace(0, 1, 128, dtype=f32)
    basis = torch.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)], dim=1)  # Lagrange at 0, ½, 1
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(-1, 2).to(f32)
    # Squared distances as |g|² + |c|² - 2 g·c, one [pixels, 4] x [4, 128] product per image: torch.cdist's
    # own method, so the images are bitwise those it gave; the minimum over the curve is taken before the
    # (monotone) clamp and square root, and 16 images at a time stay in cache (6x faster than cdist on 512).
    g = torch.cat([grid.mul(-2), grid.pow(2).sum(-1, keepdim=True), torch.ones(grid.shape[0], 1, dtype=f32)], -1)
    out = []
    for start in range(0, n, 512):
        curve = torch.einsum("tk,nkd->ntd", basis, pts[start : start + 512])
        c = torch.cat([curve, torch.ones(*curve.shape[:2], 1, dtype=f32), curve.pow(2).sum(-1, keepdim=True)], -1)
        nearest = torch.cat([g.expand(len(part), -1, -1).matmul(part.mT).amin(dim=2) for part in c.split(16)])
        d2 = nearest.clamp_min(0).sqrt() ** 2
        out.append(torch.exp(-d2 / (2 * width**2)))
    return torch.cat(out) if out else torch.zeros(0, size * size, dtype=f32)


#: Characters per training sequence of the text stand-in (inputs; targets are shifted by one).
SEQUENCE_LENGTH = 128


def stdlib_text() -> str:
    """ASCII text that every Python installation carries: the docstrings of a fixed list of
    standard-library modules and of their public classes and functions, in a fixed order."""
    import argparse
    import collections
    import dataclasses
    import functools
    import inspect
    import itertools
    import json
    import pathlib
    import re
    import textwrap

    parts = []
    for module in (argparse, collections, dataclasses, functools, itertools, json, pathlib, re, textwrap):
        parts.append(module.__doc__ or "")
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
                parts.append(inspect.cleandoc(obj.__doc__))
    return "".join(c for c in "\n\n".join(parts) if 9 <= ord(c) < 128)


def _bundled(name: str) -> dict[str, np.ndarray]:
    """Arrays of a bundled stand-in file (``fisherlab/standins/``), read without pickle."""
    with (
        resources.files("fisherlab").joinpath("standins").joinpath(name).open("rb") as fh,
        np.load(fh, allow_pickle=False) as npz,
    ):
        return {key: npz[key] for key in npz.files}


def _uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1 797 UCI digits ``[n, 8, 8]`` (integers 0..16) and their labels ``[n]``."""
    arrays = _bundled("uci_digits.npz")
    return arrays["images"].astype(np.float32), arrays["labels"].astype(np.int64)


@lru_cache(maxsize=16)
def _embedded(problem: str, seed: int) -> ImageData:
    if problem == "curves":
        imgs = curves_images(20_000, seed=seed)
        return ImageData(
            imgs[:16_000], imgs[16_000:], "generated CURVES (seeded, faithful to Hinton & Salakhutdinov 2006)"
        )
    if problem == "mnist":
        images, target = _uci_digits()
        digits = torch.as_tensor(images, dtype=torch.float32)[:, None] / 16.0
        big = nnf.interpolate(digits, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
        imgs = nnf.pad(big, (4, 4, 4, 4)).flatten(1)
        perm = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(seed))
        imgs, labels = imgs[perm], torch.as_tensor(target)[perm]
        return ImageData(
            imgs[:1_500],
            imgs[1_500:],
            "STAND-IN for MNIST: UCI digits (bundled) resized to 28x28",
            labels[:1_500],
            labels[1_500:],
            stand_in=True,
        )
    if problem == "cifar10":
        images, target = _uci_digits()
        digits = torch.as_tensor(images, dtype=torch.float32)[:, None] / 16.0
        rgb = (
            nnf.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False)
            .clamp(0, 1)
            .expand(-1, 3, -1, -1)
        )
        perm = torch.randperm(rgb.shape[0], generator=torch.Generator().manual_seed(seed))
        imgs, labels = rgb[perm].reshape(rgb.shape[0], -1), torch.as_tensor(target)[perm]
        return ImageData(
            imgs[:1_500],
            imgs[1_500:],
            "STAND-IN for CIFAR-10: UCI digits (bundled) as 3x32x32 images, 10 classes",
            labels[:1_500],
            labels[1_500:],
            stand_in=True,
        )
    if problem == "text":
        codes = torch.tensor(list(stdlib_text().encode("ascii")), dtype=torch.int64)
        starts = torch.arange(0, codes.numel() - SEQUENCE_LENGTH - 1, SEQUENCE_LENGTH // 2)
        windows = codes[starts[:, None] + torch.arange(SEQUENCE_LENGTH + 1)]  # [n, T + 1] character codes
        windows = windows[torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))]
        n_valid = max(1, windows.shape[0] // 10)
        return ImageData(
            windows[n_valid:],
            windows[:n_valid],
            "STAND-IN text: docstrings of Python's standard library, ASCII characters, 129-character windows",
            stand_in=True,
        )
    if problem == "faces":
        faces = torch.as_tensor(_bundled("lfw_faces.npz")["faces"], dtype=torch.float32)
        faces = torch.cat([faces, faces.flip(-1)])
        padded = nnf.pad(faces[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        shifted = [padded[:, 1 + dy : 26 + dy, 1 + dx : 26 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        imgs = torch.cat(shifted).flatten(1)
        perm = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(seed))
        imgs = imgs[perm]
        return ImageData(
            imgs[:1_440],
            imgs[1_440:],
            "STAND-IN for FACES: LFW face crops (bundled), mirrored and shifted",
            stand_in=True,
        )
    raise FisherlabError(f"no embedded data for problem {problem!r}")


#: Pixels per image of each dataset, as the problems' input layers expect.
PIXELS = {"mnist": 784, "curves": 784, "faces": 625, "cifar10": 3 * 32 * 32}


#: Most bytes a data file may hold (decompressed): a small ``.gz`` that expands to gigabytes is refused
#: after reading this much, not decompressed into memory whole. MNIST's images are 47 MB.
MAX_DATA_BYTES = 2**31


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The (decompressed) bytes of ``path``: an IDX file up to the size its header announces (trailing
    bytes are not read), any file up to ``limit``.

    Raises:
        FisherlabError: Unreadable, or larger than ``limit`` (default :data:`MAX_DATA_BYTES`; announced or actual).
    """
    limit = MAX_DATA_BYTES if limit is None else limit
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = bytearray(fh.read(16))
            magic = int.from_bytes(raw[:4], "big")
            if magic in (2049, 2051) and len(raw) >= 8:  # IDX labels / images: the header gives the size
                dims = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1, 2 if magic == 2049 else 4)]
                announced = 4 + 4 * len(dims) + math.prod(dims)
                if announced > limit:
                    raise FisherlabError(
                        f"{path} announces {announced / 2**30:.1f} GiB of data (header {dims}); more than the "
                        f"{limit / 2**30:.1f} GiB fisherlab reads from one data file"
                    )
                limit = announced
            while len(raw) <= limit:
                chunk = fh.read(min(2**24, limit + 1 - len(raw)))
                if not chunk:
                    return bytes(raw)
                raw += chunk
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise FisherlabError(f"cannot read {path}: {exc}") from None
    if magic in (2049, 2051):
        return bytes(raw[:limit])  # the announced data; what follows is never decompressed
    raise FisherlabError(f"{path} expands to more than {limit / 2**30:.1f} GiB; not a data file fisherlab reads")


def _read_idx(path: Path, pixels: int) -> np.ndarray:
    """Images of an IDX file (magic 2051) as ``[n, rows * cols]`` uint8, checked against the header."""
    raw = _read_bytes(path)
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
        raise FisherlabError(f"{path} is not an MNIST IDX image file (magic number 2051 and a 16-byte header expected)")
    n, rows, cols = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if n == 0 or rows * cols == 0:
        raise FisherlabError(f"{path} holds no images (header: {n} images of {rows}x{cols})")
    if rows * cols != pixels:
        raise FisherlabError(
            f"{path} has {rows}x{cols} images; this problem needs {pixels} pixels per image (28x28 for MNIST)"
        )
    if len(raw) - 16 < n * rows * cols:
        raise FisherlabError(
            f"{path} is truncated: its header announces {n} images of {rows}x{cols} "
            f"({n * rows * cols} bytes) but it holds {len(raw) - 16}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16, count=n * rows * cols).reshape(n, rows * cols).copy()


def _mnist_labels(data_dir: Path, n_images: int) -> Tensor | None:
    """Labels of an IDX label file (magic 2049), one per image, each in 0..9; None if absent."""
    for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz", "train-labels.idx1-ubyte"):
        path = data_dir / name
        if path.is_file():
            raw = _read_bytes(path)
            if len(raw) < 8 or int.from_bytes(raw[:4], "big") != 2049:
                raise FisherlabError(
                    f"{path} is not an MNIST IDX label file (magic number 2049 and an 8-byte header expected)"
                )
            n = int.from_bytes(raw[4:8], "big")
            if n < n_images or len(raw) - 8 < n_images:
                raise FisherlabError(
                    f"{path} has {min(n, len(raw) - 8)} labels for {n_images} images; one label per image expected"
                )
            labels = np.frombuffer(raw, dtype=np.uint8, offset=8, count=n_images).astype(np.int64)
            if labels.max() > 9:
                raise FisherlabError(f"{path} has label {int(labels.max())}; MNIST labels are 0 to 9")
            return torch.as_tensor(labels)
    return None


def _find(data_dir: Path, names: list[str], problem: str) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FisherlabError(f"no {problem} data in {data_dir}: expected one of {', '.join(names)}")


def _mat_array(path: Path, keys: list[str], pixels: int) -> np.ndarray:
    """The first of ``keys`` in a MATLAB file as ``[n, pixels]`` float32 (either orientation)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # noqa: BLE001 - a user file: any failure becomes one error; scipy raises MatReadError, ValueError, TypeError, ... on bad files
        raise FisherlabError(f"cannot read {path} as a MATLAB .mat file: {exc}") from None
    for key in keys:
        if key in mat:
            try:
                arr = np.asarray(mat[key], dtype=np.float32)
            except (TypeError, ValueError):
                raise FisherlabError(f"{path}: variable {key!r} is not a numeric array") from None
            if arr.ndim == 2 and arr.shape[1] != pixels and arr.shape[0] == pixels:
                arr = arr.T
            if arr.ndim != 2 or arr.shape[1] != pixels or arr.shape[0] == 0:
                raise FisherlabError(
                    f"{path}: variable {key!r} has shape {arr.shape}; expected [images, {pixels}] (or its transpose)"
                )
            if not np.isfinite(arr).all():
                raise FisherlabError(f"{path}: variable {key!r} contains NaN or inf")
            return arr
    raise FisherlabError(
        f"{path} has none of the variables {keys}; found {sorted(k for k in mat if not k.startswith('__'))}"
    )


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 python batch holds: builtins and plain numpy arrays.

    ``pickle.load`` on a file from elsewhere can run any code; this unpickler refuses every
    global except numpy's array reconstruction, so a crafted file fails before running anything.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.numeric", "_frombuffer"),  # numpy arrays at pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core (and warns on the old path)
                try:
                    return super().find_class(module.replace("numpy.core.", "numpy._core.", 1), name)
                except ImportError:  # numpy 1.x
                    pass
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it contains a pickled {module}.{name}, which a CIFAR-10 batch does not have")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 3072]`` uint8 and labels ``[n]`` of one CIFAR-10 python batch, safely."""
    try:
        with open(path, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a user file: any failure becomes one error; garbage bytes raise UnpicklingError, EOFError, ValueError, ...
        raise FisherlabError(f"refusing {path}: not a CIFAR-10 python batch ({exc})") from None
    data = d.get(b"data", d.get("data")) if isinstance(d, dict) else None
    labels = d.get(b"labels", d.get("labels")) if isinstance(d, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.ndim != 2
        or data.shape[1] != 3072
        or not isinstance(labels, list | np.ndarray)
    ):
        raise FisherlabError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with 'data' [n, 3072] and 'labels' [n]"
        )
    labels = np.asarray(labels)
    if (
        labels.shape != (data.shape[0],)
        or labels.dtype.kind not in "iu"
        or (labels.size and (labels.min() < 0 or labels.max() > 9))
    ):
        raise FisherlabError(f"{path}: 'labels' must hold {data.shape[0]} integers from 0 to 9")
    return data.astype(np.uint8), labels.astype(np.int64)


def _real(problem: str, data_dir: Path) -> ImageData:
    if not data_dir.is_dir():
        raise FisherlabError(f"data directory {data_dir} does not exist")
    if problem == "mnist":
        path = _find(
            data_dir, ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte"], problem
        )
        raw = _read_idx(path, PIXELS["mnist"])
        imgs = torch.as_tensor(raw, dtype=torch.float32) / 255.0
        labels = _mnist_labels(data_dir, raw.shape[0])
        return ImageData(
            imgs[:50_000],
            imgs[50_000:60_000],
            f"MNIST from {path}",
            None if labels is None else labels[:50_000],
            None if labels is None else labels[50_000:60_000],
        )
    if problem == "cifar10":
        batches = [data_dir / f"data_batch_{i}" for i in range(1, 6)]
        if not all(b.is_file() for b in batches):
            raise FisherlabError(
                f"no cifar10 data in {data_dir}: expected data_batch_1 … data_batch_5 (CIFAR-10 python version)"
            )
        pairs = [_cifar_batch(b) for b in batches]
        imgs = torch.as_tensor(np.concatenate([p[0] for p in pairs]), dtype=torch.float32) / 255.0
        labels = torch.as_tensor(np.concatenate([p[1] for p in pairs]))
        return ImageData(imgs[:45_000], imgs[45_000:], f"CIFAR-10 from {data_dir}", labels[:45_000], labels[45_000:])
    if problem == "faces":
        path = _find(data_dir, ["newfaces_rot_single.mat"], problem)
        imgs = torch.as_tensor(_mat_array(path, ["newfaces_single", "newfaces"], PIXELS["faces"]))
        return ImageData(imgs[:82_800], imgs[82_800:103_500], f"FACES from {path}")
    if problem == "curves":
        path = _find(data_dir, ["digs3pts_1.mat"], problem)
        imgs = torch.as_tensor(_mat_array(path, ["bdata"], PIXELS["curves"]))
        return ImageData(imgs[:16_000], imgs[16_000:20_000], f"CURVES from {path}")
    raise FisherlabError(f"no loader for problem {problem!r}")


def load_images(problem: str, data_dir: str | Path | None = None, *, seed: int = 0) -> ImageData:
    """Images of an auto-encoder problem: real files from ``data_dir``, else embedded.

    Raises:
        FisherlabError: Unknown problem, missing directory or files (the message names the
            expected files), unreadable files.
    """
    if data_dir is None:
        return _embedded(problem, seed)
    return _real(problem, Path(data_dir).expanduser())


def announce_data(source: str, stand_in: bool) -> None:
    """Say on the console which data a run uses; a stand-in is named as such (stderr)."""
    print(f"fisherlab: data: {source}", file=sys.stderr)
    if stand_in:
        print(
            "fisherlab: warning: this run uses STAND-IN data, not the paper's dataset; its errors are not the paper's "
            "(e.g. MNIST layer 5: KFAC error 1 peaks near 0.4 on the stand-in, 7.8 on real MNIST); "
            "pass --data-dir for the real files",
            file=sys.stderr,
        )
