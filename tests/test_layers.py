"""Layer kinds: a new module type is one registered adapter, and the exact Fisher of a layer of
that kind equals its dense twin (torch.func per-sample gradients); ``LayerFactors`` constructors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fisherlab as fl
from fisherlab.dense import per_sample_gradients
from fisherlab.layers import LAYER_KINDS, LayerKind, layer_matrix, register_layer_kind, subtract_from_layer
from fisherlab.probe import Probe
from tests.cases import rng
from tests.tolerances import EXACT64


class TransposedLinear(nn.Module):
    """``y = x W + b`` with ``W [in, out]``: the layout of Hugging Face's GPT-2 ``Conv1D``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=torch.float64) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.fixture
def transposed_kind() -> Iterator[LayerKind]:
    kind = register_layer_kind(
        LayerKind(
            "transposed_linear",
            TransposedLinear,
            inputs=lambda m, x: x.reshape(x.shape[0], -1, x.shape[-1]),
            outputs=lambda m, g: g.reshape(g.shape[0], -1, g.shape[-1]),
            to_rows=lambda w: w.T,
            from_rows=lambda rows, shape: rows.T,
        )
    )
    yield kind
    LAYER_KINDS.pop(kind.name)


def test_a_registered_layer_kind_is_probed_exactly(transposed_kind: LayerKind) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    probe = Probe(model, "mse", fisher="empirical")
    assert list(probe.layers) == ["0", "2"]
    snap = probe(x, y)
    expected = per_sample_gradients(model, "mse", x, y, probe.layers)
    for name, factors in snap.factors.items():
        torch.testing.assert_close(factors.per_sample_gradients()[:, 0], expected[name], **EXACT64)
    dense = expected["0"].flatten(1)
    torch.testing.assert_close(fl.ExactBlock(snap.factors["0"]).as_dense(), dense.T @ dense / 7, **EXACT64)


def test_layer_matrix_round_trips_through_the_kind(transposed_kind: LayerKind) -> None:
    layer = TransposedLinear(3, 2)
    before = layer_matrix(layer)
    torch.testing.assert_close(before, torch.cat([layer.weight.T, layer.bias[:, None]], 1).detach())
    delta = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        subtract_from_layer(layer, delta)
    torch.testing.assert_close(layer_matrix(layer), before - delta, **EXACT64)


def test_an_unregistered_module_is_one_clear_error() -> None:
    with pytest.raises(fl.FisherlabError, match=r"is a TransposedLinear; only nn.Linear, nn.Conv2d, .*nn.Embedding"):
        Probe(nn.Sequential(TransposedLinear(3, 2)), "mse", layers=["0"])


def test_layer_factors_from_linear() -> None:
    """``LayerFactors.from_linear(a [N, d], g [N, d_out])`` appends the bias column and adds T = V = 1."""
    gen = rng(0)
    a, g = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    factors = fl.LayerFactors.from_linear(a, g)
    assert factors.a.shape == (5, 1, 4) and factors.g.shape == (5, 1, 1, 2)
    dw = torch.einsum("no,ni->noi", g, torch.cat([a, torch.ones(5, 1, dtype=torch.float64)], 1))
    torch.testing.assert_close(factors.per_sample_gradients()[:, 0], dw, **EXACT64)
    no_bias = fl.LayerFactors.from_linear(a, g, bias=False)
    assert no_bias.a.shape == (5, 1, 3)
