"""The one factory of the tests' cases: small random factors (as data with ids), blocks, symmetric
matrices, batches, models and data files. Every draw comes from an explicit ``torch.Generator`` (or
an explicit seed), so a case is the same wherever it is built."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from fisherlab.fisher import ExactBlock
from fisherlab.layers import LayerFactors
from fisherlab.problems import PROBLEMS, Problem

FACTOR_CASES = [
    {"id": "mlp-N7-V1", "n": 7, "v": 1, "t": 1, "d_in": 4, "d_out": 3, "seed": 0},
    {"id": "mlp-N9-V3", "n": 9, "v": 3, "t": 1, "d_in": 5, "d_out": 4, "seed": 1},
    {"id": "mlp-N40-wide", "n": 40, "v": 1, "t": 1, "d_in": 6, "d_out": 5, "seed": 2},
    {"id": "conv-N5-V2-T4", "n": 5, "v": 2, "t": 4, "d_in": 5, "d_out": 3, "seed": 3},
    {"id": "conv-N6-V1-T9", "n": 6, "v": 1, "t": 9, "d_in": 4, "d_out": 4, "seed": 4},
]
_KEYS = {"id", "n", "v", "t", "d_in", "d_out", "seed"}


def make_factors(case: dict, device: torch.device | str = "cpu") -> LayerFactors:
    """Random float64 factors (drawn on the CPU, then moved to ``device``); the activations are
    correlated with the derivatives so that KFAC is not accidentally exact."""
    unknown = set(case) - _KEYS
    if unknown:
        raise KeyError(f"unknown case keys {unknown}")
    gen = rng(case["seed"])
    n, v, t, di, do = case["n"], case["v"], case["t"], case["d_in"], case["d_out"]
    a = torch.randn(n, t, di, generator=gen, dtype=torch.float64)
    a[..., -1] = 1.0  # bias column
    g = torch.randn(n, v, t, do, generator=gen, dtype=torch.float64) * (1 + a[:, None, :, :1].abs())
    return LayerFactors(a.to(device), g.to(device))


def ids(cases: list[dict]) -> list[str]:
    return [c["id"] for c in cases]


def rng(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the source of every draw of a case."""
    return torch.Generator().manual_seed(seed)


def plain_factors(gen: torch.Generator, n: int, t: int, d_in: int, d_out: int, v: int = 1) -> LayerFactors:
    """Uncorrelated standard-normal float64 factors ``a [n, t, d_in]`` then ``g [n, v, t, d_out]``, both
    drawn from ``gen`` in that order (no bias column: for checks that need no structure)."""
    a = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64)
    return LayerFactors(a, torch.randn(n, v, t, d_out, generator=gen, dtype=torch.float64))


def plain_blocks(gen: torch.Generator, n: int, v: int, shapes: list[tuple[int, int, int]]) -> tuple[ExactBlock, ...]:
    """One exact block of ``plain_factors`` per ``(t, d_in, d_out)`` in ``shapes``, drawn in turn from ``gen``."""
    return tuple(ExactBlock(plain_factors(gen, n, t, d_in, d_out, v)) for t, d_in, d_out in shapes)


def spd(d: int, gen: torch.Generator, *, width: int = 2, ridge: float = 0.0) -> torch.Tensor:
    """A symmetric positive (semi-)definite ``x xᵀ / d (+ ridge I)``, ``x [d, width d]`` drawn from ``gen``."""
    x = torch.randn(d, width * d, generator=gen, dtype=torch.float64)
    m = x @ x.T / d
    return m + ridge * torch.eye(d, dtype=torch.float64) if ridge else m


def symmetric(d: int, gen: torch.Generator) -> torch.Tensor:
    """A symmetric indefinite ``(x + xᵀ) / 2``, ``x [d, d]`` drawn from ``gen``."""
    x = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return (x + x.T) / 2


def regression_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float64 inputs of width 4 and smooth targets ``tanh(2 x[:, :3])`` for ``small_mlp`` under mse."""
    gen = rng(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, torch.tanh(2 * x[:, :3])


def pi_damped_dense(out: torch.Tensor, in_: torch.Tensor, damping: float) -> torch.Tensor:
    """(out + √λ/π I) ⊗ (in + √λ π I), π² = (tr in / d_in) / (tr out / d_out), written out densely: the
    dense twin of a π-damped factor pair, built without ``fisherlab.kron`` (optimizer and two-level tests)."""
    pi = ((torch.trace(in_) / in_.shape[0]) / (torch.trace(out) / out.shape[0])) ** 0.5
    root = damping**0.5
    return torch.kron(
        out + root / pi * torch.eye(out.shape[0], dtype=out.dtype),
        in_ + root * pi * torch.eye(in_.shape[0], dtype=in_.dtype),
    )


class SmallConvNet(nn.Module):
    """Conv (stride 2, padding 1, dilation) + conv without bias + linear head."""

    def __init__(self, n_out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 2, kernel_size=2, dilation=2, bias=False)
        self.fc = nn.Linear(2 * 1 * 1, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.flatten(1))


def small_mlp(
    sizes: tuple[int, ...] = (4, 5, 3), seed: int = 0, activation: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """A float64 MLP of Linear layers (torch's initialisation under ``torch.manual_seed(seed)``), ``activation``
    between them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).double()


def deep_linear_problem(layers: int = 4) -> Problem:
    """``deeplinear64`` (T §4.3: Linear layers of 10 units, batch norm between them) cut to ``layers`` layers,
    named ``deeplinear<layers>``: register it (``monkeypatch.setitem(PROBLEMS, p.name, p)``) to run a command's
    whole path on a paper network in a second, where 64 layers (O(L²) two-level coarse blocks, a Kronecker
    step per layer) or the default problem's 784-wide factors take several."""
    return dataclasses.replace(
        PROBLEMS["deeplinear64"], name=f"deeplinear{layers}", sizes=(10,) * (layers + 1), default_layers=("2",)
    )


def idx_images(n: int, rows: int = 28, cols: int = 28, *, data_bytes: int | None = None) -> bytes:
    """An MNIST IDX image file of ``n`` random images (cut to ``data_bytes`` bytes of pixels if given)."""
    header = b"".join(v.to_bytes(4, "big") for v in (2051, n, rows, cols))
    body = np.random.default_rng(0).integers(0, 255, n * rows * cols, dtype=np.uint8).tobytes()
    return header + body[: data_bytes if data_bytes is not None else len(body)]


def idx_labels(n: int, *, magic: int = 2049, top: int = 9) -> bytes:
    """An MNIST IDX label file of ``n`` labels ``0, 1, ...`` capped at ``top``, the last one ``top``."""
    labels = np.minimum(np.arange(n) % 10, top).astype(np.uint8)
    labels[-1] = top
    return magic.to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes()


def tensorboard_scalars(log_dir: object) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``log_dir``, read back with TensorBoard's own
    reader: ``{tag: [(step, value), ...]}`` (values as stored: float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
