"""The layer kinds of :mod:`fisherlab.layer_kinds` against their dense twins (``torch.func`` per-sample
gradients, float64, weights shared over positions): ``transformers``' ``Conv1D``, ``nn.Embedding``
(compact one-hot over the batch's tokens, padding index, a call broadcast over the batch),
``nn.LayerNorm`` and RMSNorm (torch's, Llama's, Gemma's: elementwise blocks); per-sample gradients,
``||F||_F`` and the spectrum to 1e-10; ``diagonal`` on a LayerNorm equals the dense diagonal, the
Kronecker methods are NaN with the reason; unsupported options are one clear message."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import fisherlab as fl
from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import kfac_factors
from fisherlab.dense import per_sample_gradients
from fisherlab.layers import layer_kind, layer_matrix, subtract_from_layer
from fisherlab.probe import Probe, ProbeSnapshot
from fisherlab.vocabulary import BlockStructure
from tests.tolerances import EXACT64, FLOAT32, scaled

N, T = 4, 3


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in float64 with every parameter drawn from a seeded generator (norm weights away from 1)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _twin(
    model: nn.Module, loss: str, x: Tensor, y: Tensor, layers: list[str], tol: dict[str, float] = EXACT64
) -> ProbeSnapshot:
    """Probe ``layers`` (empirical Fisher) and check each block against the autograd reference: per-sample
    gradients (an embedding's compact block: its columns, zero elsewhere), ``||F||_F`` and the spectrum."""
    probe = Probe(model, loss, layers=layers, fisher="empirical")
    snap = probe(x, y)
    dense = per_sample_gradients(model, loss, x, y, probe.layers)
    for name in layers:
        factors, reference = snap.factors[name], dense[name]
        compact = reference
        if factors.columns is not None:
            outside = torch.ones(reference.shape[-1], dtype=torch.bool)
            outside[factors.columns] = False
            assert not reference[..., outside].any(), name  # the block is zero off the batch's tokens
            compact = reference[..., factors.columns]
        torch.testing.assert_close(factors.per_sample_gradients()[:, 0], compact, **tol)
        jac = reference.flatten(1)
        f = jac.T @ jac / x.shape[0]
        block = fl.ExactBlock(factors)
        torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(f), **tol)
        spectrum = torch.linalg.eigvalsh(f).flip(0)[: block.max_rank]
        torch.testing.assert_close(block.eigenvalues(), spectrum, **scaled(tol, float(spectrum[0])))
    return snap


def test_transformers_conv1d_is_a_transposed_linear_layer() -> None:
    """GPT-2's ``Conv1D`` (``W [d_in, d_out]``), shared over positions: its block in the ``[d_out, d_in]`` layout."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = _randomised(nn.Sequential(pytorch_utils.Conv1D(5, 4), nn.Tanh(), pytorch_utils.Conv1D(3, 5)), 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(N, T, 3, generator=gen, dtype=torch.float64)
    assert layer_kind(model[0]) is not None and layer_kind(model[0]).name == "conv1d"  # type: ignore[union-attr]
    snap = _twin(model, "mse", x, y, ["0", "2"])
    assert (snap.factors["0"].d_out, snap.factors["0"].d_in) == (5, 5)
    torch.testing.assert_close(layer_matrix(model[0]), torch.cat([model[0].weight.T, model[0].bias[:, None]], 1))
    before, delta = layer_matrix(model[0]), torch.randn(5, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        subtract_from_layer(model[0], delta)
    torch.testing.assert_close(layer_matrix(model[0]), before - delta, **EXACT64)


class _Tokens(nn.Module):
    """Token embedding (padding index 0) called twice, a position embedding called on ``[1, T]`` positions
    broadcast over the batch (GPT-2's ``wpe``), and a Linear head over every position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.position = nn.Embedding(T + 2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1])[None]
        x = self.embed(tokens) + self.position(positions) + 0.5 * self.embed(tokens.flip(1))
        return self.head(torch.tanh(x))


def test_embedding_block_keeps_the_batch_tokens_as_a_compact_one_hot() -> None:
    """Embeddings: the compact block over the batch's tokens equals the whole block's autograd twin, the padding
    index gets no column, a broadcast call is split per sample, and KFAC's ``A`` is ``diag(token counts) / N``."""
    model = _randomised(_Tokens(), 2)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 7, (N, T), generator=gen)  # 7, 8, 9 never occur; 0 is padding
    tokens[0, 0] = 0
    y = torch.randint(0, 3, (N, T), generator=gen)
    snap = _twin(model, "ce", tokens, y, ["embed", "position", "head"])
    embed = snap.factors["embed"]
    present = torch.unique(tokens[tokens != 0])
    torch.testing.assert_close(embed.columns, present)
    assert embed.a.shape == (N, 2 * T, len(present))  # two calls, one-hot over the batch's tokens only
    counts = torch.stack([2 * (tokens == c).sum() for c in present]).to(torch.float64)  # both calls
    torch.testing.assert_close(kfac_factors(embed).ins[0], torch.diag(counts) / N, **EXACT64)
    torch.testing.assert_close(snap.factors["position"].columns, torch.arange(T))
    full = layer_matrix(model.embed, "data")
    assert full.shape == (4, 10)  # the whole matrix, [embedding_dim, num_embeddings]


def test_a_batch_of_padding_only_is_a_zero_block() -> None:
    """Every token the padding index: one empty column, a zero block, NaN errors with the zero-block warning."""
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Linear(3, 2)).double()
    tokens, y = torch.zeros(N, T, dtype=torch.long), torch.randn(N, T, 2, dtype=torch.float64)
    factors = Probe(model, "mse", layers=["0"])(tokens, y).factors["0"]
    assert factors.a.shape == (N, T, 1) and not factors.a.any()
    with pytest.warns(UndefinedMetricWarning, match="is zero"):
        ev = fl.evaluate_block(fl.ExactBlock(factors), ["kfac"], layer="0")
    assert math.isnan(ev.values["frobenius_error"]["kfac"]) and ev.layer_values["fisher_frobenius_norm"] == 0


@pytest.mark.parametrize(
    ("option", "message"), [({"max_norm": 1.0}, "max_norm=1.0"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq")]
)
def test_unsupported_embedding_options_are_one_clear_message(option: dict[str, object], message: str) -> None:
    """``max_norm`` and ``scale_grad_by_freq`` are refused when named, listed as skipped with why under ``all``."""
    model = nn.Sequential(nn.Embedding(5, 2, **option), nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(fl.FisherlabError, match=message):
        Probe(model, "mse", layers=["0"])
    probe = Probe(model, "mse", layers="all")
    assert list(probe.layers) == ["1"] and message in probe.skipped[0]


def _norms() -> list[tuple[str, Callable[[], nn.Module]]]:
    cases: list[tuple[str, Callable[[], nn.Module]]] = [
        ("layernorm", lambda: nn.LayerNorm(4)),
        ("layernorm-no-bias", lambda: nn.LayerNorm(4, bias=False)),
        ("rmsnorm", lambda: nn.RMSNorm(4)),
    ]
    try:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return cases
    return [*cases, ("llama", lambda: LlamaRMSNorm(4)), ("gemma", lambda: GemmaRMSNorm(4))]


@pytest.mark.parametrize("make", [m for _, m in _norms()], ids=[i for i, _ in _norms()])
def test_norm_layers_are_elementwise_blocks_equal_to_their_twin(
    make: Callable[[], nn.Module], request: pytest.FixtureRequest
) -> None:
    """LayerNorm and RMSNorm shared over positions: per-sample ``[Σ_t g ∘ x̂ ; Σ_t g]`` equals autograd's
    ``[weight; bias]`` gradient (Llama's float32 normalisation and Gemma's ``1 + w`` included)."""
    model = _randomised(nn.Sequential(nn.Linear(3, 4), make(), nn.Tanh(), nn.Linear(4, 2)), 4)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(N, T, 3, generator=gen, dtype=torch.float64), torch.randn(N, T, 2, generator=gen).double()
    # Gemma multiplies in float32 (x.float()): autograd's own reference carries float32 rounding there
    tol = FLOAT32 if request.node.callspec.id == "gemma" else EXACT64
    snap = _twin(model, "mse", x, y, ["1"], tol)
    factors = snap.factors["1"]
    assert factors.structure is BlockStructure.ELEMENTWISE and factors.a.shape == (N, 1, 1)
    assert factors.g.shape == (N, 1, 1, sum(p.numel() for p in model[1].parameters()))


def test_layer_norm_over_several_dims() -> None:
    """``LayerNorm((2, 3))`` normalises the last two dims: ``P = 12`` parameters per block."""
    model = _randomised(
        nn.Sequential(nn.Linear(3, 6), nn.Unflatten(-1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten(-2), nn.Linear(6, 2)),
        6,
    )
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(N, T, 3, generator=gen, dtype=torch.float64), torch.randn(N, T, 2, generator=gen).double()
    assert _twin(model, "mse", x, y, ["2"]).factors["2"].d_out == 12


def test_elementwise_block_runs_the_methods_that_apply_and_nan_with_reason_for_the_others() -> None:
    """On a LayerNorm block ``diagonal`` is the dense diagonal and ``lowrank`` is built; the Kronecker methods are
    NaN with their reason and one warning line, and ``approximate_all`` refuses them by name."""
    model = _randomised(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)), 8)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(N, T, 3, generator=gen, dtype=torch.float64), torch.randn(N, T, 2, generator=gen).double()
    block = fl.ExactBlock(Probe(model, "mse", layers=["1"], fisher="empirical")(x, y).factors["1"])
    with pytest.warns(UndefinedMetricWarning, match="kfac, kpsvd do not apply to the elementwise block") as caught:
        ev = fl.evaluate_block(block, ["kfac", "diagonal", "kpsvd", "lowrank"], layer="ln")
    assert len(caught) == 1
    assert set(ev.not_applicable) == {"kfac", "kpsvd"} and "trivially exact" in ev.not_applicable["kfac"]
    assert math.isnan(ev.values["frobenius_error"]["kfac"]) and math.isnan(ev.values["spectral_error"]["kpsvd"])
    assert ev.values["solver_iterations"]["kfac"] == 0
    assert all(math.isfinite(ev.values["frobenius_error"][m]) for m in ("diagonal", "lowrank"))
    dense = block.as_dense()
    diagonal = ev.approximations["diagonal"].operator.as_dense()
    torch.testing.assert_close(diagonal, torch.diag(torch.diagonal(dense)), **EXACT64)
    with pytest.raises(fl.FisherlabError, match="kfac applies to kronecker blocks, not to an elementwise block"):
        fl.approximate_all(block, ["kfac"])


def test_a_norm_that_is_not_affine_in_its_weight_is_refused() -> None:
    """A class named ``*RMSNorm`` whose output is not affine in its weight: one clear message, not a wrong block."""

    class SquaredRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.full((4,), 0.7, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight**2

    model = nn.Sequential(nn.Linear(3, 4), SquaredRMSNorm(), nn.Linear(4, 2)).double()
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    with pytest.raises(fl.FisherlabError, match="not affine in its weight"):
        Probe(model, "mse", layers=["1"])(x, y)


def test_norm_layer_matrix_is_weight_then_bias() -> None:
    """``layer_matrix`` of a LayerNorm is ``[weight; bias]`` as ``[P, 1]``; ``subtract_from_layer`` inverts it."""
    norm = _randomised(nn.LayerNorm(3), 10)
    before = layer_matrix(norm)
    torch.testing.assert_close(before, torch.cat([norm.weight, norm.bias])[:, None])
    delta = torch.arange(6, dtype=torch.float64)[:, None]
    with torch.no_grad():
        subtract_from_layer(norm, delta)
    torch.testing.assert_close(layer_matrix(norm), before - delta, **EXACT64)


class _Logits(nn.Module):
    """A Hugging Face causal LM called on ``input_ids``, returning its logits ``[N, T, vocab]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def _tiny_gpt2() -> nn.Module:
    """A one-block GPT-2 (d 8, vocab 11), untied (tied weights are one block of their own), float64, no dropout."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"  # torch.func's vmap in the dense twin
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_tiny_gpt2_every_module_equals_its_twin() -> None:
    """A real GPT-2: ``wte`` (tokens), ``wpe`` (called on ``[1, T]`` positions), every LayerNorm and ``Conv1D``
    and ``lm_head``: each exact block equals autograd's, and every parameter is covered."""
    model = _Logits(_tiny_gpt2())
    gen = torch.Generator().manual_seed(11)
    ids, y = torch.randint(0, 11, (N, 5), generator=gen), torch.randint(0, 11, (N, 5), generator=gen)
    layers = list(Probe(model, "ce", layers="all").layers)
    kinds = {layer_kind(dict(model.named_modules())[n]).name for n in layers}  # type: ignore[union-attr]
    assert kinds == {"embedding", "layernorm", "conv1d", "linear"} and len(layers) == 10
    _twin(model, "ce", ids, y, layers)
    assert fl.FisherProbe(model, "ce", layers="all", methods=["diagonal"]).attrs["fisher_coverage"] == 1.0


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
def test_lora_adapters_are_the_trainable_layers() -> None:
    """``layers="trainable"`` on a LoRA-wrapped GPT-2 probes the adapters ``lora_A``, ``lora_B`` only (their blocks
    equal autograd's); the frozen base layers are listed as skipped, and the adapters are the whole coverage."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = _Logits(peft.get_peft_model(_tiny_gpt2(), config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(12), dtype=p.dtype))
    probe = Probe(model, "ce", layers="trainable")
    assert [n.rsplit(".", 2)[-2] for n in probe.layers] == ["lora_A", "lora_B"]
    assert any("wte: frozen" in s for s in probe.skipped)
    gen = torch.Generator().manual_seed(13)
    ids, y = torch.randint(0, 11, (N, 5), generator=gen), torch.randint(0, 11, (N, 5), generator=gen)
    _twin(model, "ce", ids, y, list(probe.layers))
    assert fl.FisherProbe(model, "ce", layers="trainable", methods=["kfac"]).attrs["fisher_coverage"] == 1.0
