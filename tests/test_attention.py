"""nn.MultiheadAttention probed (fisherlab.attention): the decomposed forward equals the fused one
(outputs, attention weights, dropout masks in train mode) to 1e-12; the in-projection and out_proj
blocks equal torch.func's per-sample gradients (self-attention, cross-attention from a memory,
three distinct inputs; batch first or not; key padding masks; add_zero_attn); a frozen
TransformerEncoderLayer in eval mode is probed (its fast path is switched off); kdim/add_bias_kv
give a clear reason and keep out_proj probeable; the module is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fisherlab._errors import FisherlabError
from fisherlab.attention import _IN_PROJECTION_HOOKS, _fast_path_off, decomposed_attention
from fisherlab.dense import per_sample_gradients
from fisherlab.layers import capture_calls
from fisherlab.losses import sample_targets
from fisherlab.probe import Probe
from tests.cases import rng
from tests.tolerances import EXACT64, ROUNDOFF64

E, HEADS, N, T, S = 4, 2, 4, 3, 2  # embedding, heads, batch, query positions, memory positions


class Attend(nn.Module):
    """Features ``x [N, T + S, E + 1]`` (last channel: 1 at padded positions) → attention → mean → Linear.

    ``inputs``: ``self`` (query = key = value = the T + S positions, padded keys masked), ``memory``
    (query the first T, key = value the last S), ``three`` (key and value two different tensors).
    """

    def __init__(self, inputs: str = "self", *, batch_first: bool = True, **mha: object) -> None:
        super().__init__()
        self.inputs, self.batch_first = inputs, batch_first
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **mha)  # type: ignore[arg-type]
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, 3]``."""
        pad = x[..., E] > 0
        out, _ = self.attn(*_qkv(self, x), key_padding_mask=pad if self.inputs == "self" else pad[:, T:])
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


def _qkv(model: Attend, x: Tensor) -> tuple[Tensor, ...]:
    """The query, key and value ``model`` hands its attention, ``query is key is value`` for self-attention
    and ``key is value`` for a memory, as the layers of nn.Transformer call it."""
    h = x[..., :E] if model.batch_first else x[..., :E].transpose(0, 1)
    if model.inputs == "self":
        return h, h, h
    q, k = (h[:, :T], h[:, T:]) if model.batch_first else (h[:T], h[T:])
    return q, k, k if model.inputs == "memory" else 2 * k + 1


def _batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = rng(seed)
    x = torch.randn(N, T + S, E + 1, generator=gen, dtype=torch.float64)
    x[..., E] = 0.0
    x[0, -1, E] = x[1, -2, E] = 1.0  # a padded position in two samples (a memory keeps one unpadded)
    return x, torch.randint(0, 3, (N,), generator=gen)


def _model(inputs: str = "self", **kw: object) -> Attend:
    torch.manual_seed(0)
    model = Attend(inputs, **kw).double()  # type: ignore[arg-type]
    with torch.no_grad():  # non-zero biases (MultiheadAttention starts them at 0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=rng(1), dtype=p.dtype))
    return model


@pytest.mark.parametrize("inputs", ["self", "memory", "three"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
def test_decomposed_forward_equals_fused(inputs: str, batch_first: bool, train: bool) -> None:
    """Outputs and averaged attention weights of the decomposed forward (in-projection captured, out_proj
    a module call) equal the fused forward's; in train mode the dropout masks are the same draws."""
    model = _model(inputs, batch_first=batch_first, dropout=0.5 if train else 0.0).train(train)
    x, _ = _batch()
    seen: list[tuple[int, ...]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        seen.append(tuple(out.shape))
        return out

    attn = model.attn
    for kw in ({"need_weights": True}, {"need_weights": False}):
        torch.manual_seed(5)
        fused = attn(*_qkv(model, x), **kw)
        with decomposed_attention(model), capture_calls(attn, hook):
            torch.manual_seed(5)
            ours = attn(*_qkv(model, x), **kw)
        torch.testing.assert_close(ours[0], fused[0], **ROUNDOFF64)
        if kw["need_weights"]:
            torch.testing.assert_close(ours[1], fused[1], **ROUNDOFF64)
    uses = {"self": 1, "memory": 2, "three": 3}[inputs]
    assert len(seen) == 2 * uses and seen[0] == (N, T + S if inputs == "self" else T, 3 * E)


@pytest.mark.parametrize(
    ("inputs", "batch_first", "mha"),
    [
        ("self", True, {}),
        ("self", False, {}),
        ("memory", True, {}),
        ("three", False, {"add_zero_attn": True}),
        ("self", True, {"bias": False}),
    ],
    ids=["self-batch-first", "self-seq-first", "memory", "three-zero-attn", "no-bias"],
)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_blocks_match_torch_func(inputs: str, batch_first: bool, mha: dict, fisher: str) -> None:
    """The in-projection ([3E, E+1]) and out_proj blocks of a padded batch equal (1/N) Σ ∇_n ∇_nᵀ with
    ∇_n torch.func's per-sample gradient (mc: at the targets the probe drew)."""
    model = _model(inputs, batch_first=batch_first, **mha)
    x, y = _batch()
    probe = Probe(model, "ce", fisher=fisher, seed=3)
    assert list(probe.layers) == ["attn", "attn.out_proj", "head"]
    snap = probe(x, y)
    if fisher == "mc":
        with torch.no_grad():
            y = sample_targets("ce", model(x), rng(3))  # type: ignore[arg-type]
    grads = per_sample_gradients(model, "ce", x, y, probe.layers)
    assert snap.factors["attn"].d_out == 3 * E and snap.factors["attn"].d_in == E + ("bias" not in mha)
    for name, block in snap.blocks().items():
        jac = grads[name].flatten(1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / N, **EXACT64, msg=name)
    assert not _IN_PROJECTION_HOOKS and "forward" not in model.attn.__dict__


def _encoder(frozen: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=6, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer).double()
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model.eval()


class _Encode(nn.Module):
    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.enc = _encoder(frozen)[0]
        self.head = nn.Linear(E, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x[..., :E], src_key_padding_mask=x[..., E] > 0).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA in the dense twin
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-eval-fast-path"])
def test_transformer_encoder_layer_matches_torch_func(frozen: bool) -> None:
    """The blocks of an nn.TransformerEncoderLayer (self_attn in-projection, out_proj, linear1, linear2)
    equal torch.func's. Frozen weights in eval mode, with no forward hook on the layer (the in-projection
    alone is captured without one), would take torch's fast path, which bypasses every submodule: the
    probe switches it off for the pass and back on after."""
    model = _Encode(frozen)
    x, y = _batch()
    layers = ["enc.self_attn"] if frozen else None
    probe = Probe(model, "ce", fisher="empirical", layers=layers)
    snap = probe(x, y)
    every = {"enc.self_attn", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2"}
    assert set(snap.factors) == {"enc.self_attn"} if frozen else every <= set(snap.factors)
    assert torch.backends.mha.get_fastpath_enabled()
    with _fast_path_off():
        grads = per_sample_gradients(model, "ce", x, y, probe.layers)
    for name, block in snap.blocks().items():
        jac = grads[name].flatten(1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / N, **EXACT64, msg=name)


@pytest.mark.parametrize("mha", [{"kdim": 3, "vdim": 3}, {"add_bias_kv": True}], ids=["kdim", "bias-kv"])
def test_unsupported_in_projection_keeps_out_proj_probeable(mha: dict) -> None:
    """Separate q/k/v weights and bias_k/bias_v: a clear reason for the module; its out_proj is probed
    all the same and equals torch.func's."""
    torch.manual_seed(0)
    model = Attend("memory", **mha).double() if "kdim" not in mha else _KdimAttend().double()
    x, y = _batch()
    with pytest.raises(FisherlabError, match="out_proj can be probed"):
        Probe(model, "ce", layers=["attn"])
    probe = Probe(model, "ce", layers=["attn.out_proj"], fisher="empirical")
    block = probe(x, y).blocks()["attn.out_proj"]
    jac = per_sample_gradients(model, "ce", x, y, probe.layers)["attn.out_proj"].flatten(1)
    torch.testing.assert_close(block.as_dense(), jac.T @ jac / N, **EXACT64)


class _KdimAttend(nn.Module):
    """Queries of width E attend to a memory of width 3 (kdim = vdim = 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=3, vdim=3, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor) -> Tensor:
        mem = x[:, T:, :3]
        return self.head(self.attn(x[:, :T, :E], mem, mem)[0].mean(1))


def test_unbatched_query_cannot_be_captured() -> None:
    """A 2-D (unbatched) query to a probed MultiheadAttention is a clear error, and the module is restored."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS)

        def forward(self, x: Tensor) -> Tensor:
            return torch.stack([self.attn(s, s, s)[0].mean(0) for s in x[..., :E]])

    model = Unbatched().double()
    x, _ = _batch()
    with pytest.raises(FisherlabError, match="unbatched query"):
        Probe(model, "mse", layers=["attn"], fisher="exact")(x, None)
    assert "forward" not in model.attn.__dict__ and not _IN_PROJECTION_HOOKS
    assert torch.backends.mha.get_fastpath_enabled()
