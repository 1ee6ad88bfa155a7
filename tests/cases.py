"""Small random cases shared by the tests, as data with ids."""

from __future__ import annotations

import torch
from torch import nn

from fisherlab.layers import LayerFactors

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
    gen = torch.Generator().manual_seed(case["seed"])
    n, v, t, di, do = case["n"], case["v"], case["t"], case["d_in"], case["d_out"]
    a = torch.randn(n, t, di, generator=gen, dtype=torch.float64)
    a[..., -1] = 1.0  # bias column
    g = torch.randn(n, v, t, do, generator=gen, dtype=torch.float64) * (1 + a[:, None, :, :1].abs())
    return LayerFactors(a.to(device), g.to(device))


def ids(cases: list[dict]) -> list[str]:
    return [c["id"] for c in cases]


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


def small_mlp(sizes: tuple[int, ...] = (4, 5, 3), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()
