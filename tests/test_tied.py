"""Tied weights (fisherlab.tied): one block for a parameter several modules use. The block of an output
layer tied to the input embedding, on a padded batch, equals torch.func's per-sample gradient of the
shared parameter (empirical and mc, with and without padding_idx and a head bias, the head chosen
alone or with the rest), and so do the mini-batch gradient and the whole-network Fisher with its cross
blocks, also for a causal LM with a right- or left-padded HF-style batch; two Linear modules sharing
a weight under the exact Fisher (several directions) match a Jacobian twin; several directions with an
embedding use, and uses that cannot be appended, are clear errors; the shared parameter is never
listed as skipped."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from fisherlab._errors import FisherlabError
from fisherlab.dense import per_sample_gradients
from fisherlab.fisher import ExactBlock
from fisherlab.fisher_probe import FisherProbe
from fisherlab.layers import layer_parameters, parameter_matrix
from fisherlab.losses import sample_targets
from fisherlab.probe import Probe
from tests.cases import rng
from tests.test_probe_lm import TinyCausalLM, effective_labels, hf_batch, sequence_loss
from tests.tolerances import EXACT64, scaled

VOCAB, DIM, N, T = 7, 4, 5, 4


class TiedLM(nn.Module):
    """Tokens ``[N, T]`` (0: padding) → embedding → Linear over positions, masked, causal mean → tied head."""

    def __init__(self, *, padding_idx: int | None = None, head_bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=head_bias)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[N, T, VOCAB]``; padded positions (the attention mask's zeros) are zeroed."""
        mask = (tokens != 0)[..., None].to(self.mix.weight.dtype)
        h = torch.tanh(self.mix(self.embed(tokens))) * mask
        h = h.cumsum(1) / torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(h * mask)


def _batch() -> tuple[Tensor, Tensor]:
    gen = rng(0)
    tokens = torch.randint(1, VOCAB, (N, T), generator=gen)
    tokens[0, -2:] = 0  # right padding
    tokens[1, :1] = 0  # left padding
    return tokens, torch.randint(0, VOCAB, (N, T), generator=gen)


def _model(**kw: object) -> TiedLM:
    torch.manual_seed(0)
    return TiedLM(**kw).double()  # type: ignore[arg-type]


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize(
    ("kw", "layers"),
    [({}, None), ({"padding_idx": 3}, None), ({"head_bias": True}, None), ({}, ["head"])],
    ids=["plain", "padding-idx", "head-bias", "head-alone"],
)
def test_tied_block_matches_torch_func(fisher: str, kw: dict, layers: list[str] | None) -> None:
    """The block and mini-batch gradient of the shared weight (head's layout [vocab, dim], embedding uses as
    positions with the roles swapped) equal torch.func's per-sample gradients of the shared parameter, and
    the whole-network Fisher (cross blocks included) equals (1/N) JᵀJ."""
    model = _model(**kw)
    tokens, y = _batch()
    probe = Probe(model, "ce", fisher=fisher, layers=layers, seed=4)
    assert probe.tied == {"head": {"embed": model.embed}} and probe.layers["head"] is model.head
    snap = probe(tokens, y)
    if fisher == "mc":
        with torch.no_grad():
            y = sample_targets("ce", model(tokens), rng(4))  # type: ignore[arg-type]
    grads = per_sample_gradients(model, "ce", tokens, y, probe.layers)
    block = snap.blocks()["head"]
    assert (block.d_out, block.d_in, block.factors.n_positions) == (VOCAB, DIM + kw.get("head_bias", 0), 2 * T)
    jac = {name: grads[name].flatten(1) for name in probe.layers}
    for name, b in snap.blocks().items():
        torch.testing.assert_close(b.as_dense(), jac[name].T @ jac[name] / N, **EXACT64, msg=name)
    if fisher == "empirical":
        torch.testing.assert_close(snap.gradients["head"], grads["head"].mean(0), **EXACT64)
    whole = torch.cat([jac[name] for name in snap.factors], 1)
    torch.testing.assert_close(snap.whole_fisher().as_dense(), whole.T @ whole / N, **EXACT64)


def test_the_shared_weight_is_not_skipped() -> None:
    """With the Linear layers chosen, the embedding, whose only parameter is the probed head's, is neither a
    skipped module nor a skipped parameter; an untied embedding is both."""
    linear = ["mix", "head"]
    tied = _model()
    assert not [s for s in Probe(tied, "ce", layers=linear).skipped if s.startswith("embed")]
    assert "embed" not in FisherProbe(tied, "ce", layers=linear).attrs["skipped_parameters"]
    untied = _model()
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    assert [s for s in Probe(untied, "ce", layers=linear).skipped if s.startswith("embed")]
    assert "embed.weight" in str(FisherProbe(untied, "ce", layers=linear).attrs["skipped_parameters"])


@pytest.mark.parametrize(
    "options",
    [{"fisher": "exact"}, {"fisher": "mc", "mc_samples": 2}, {"fisher": "empirical", "approx_fisher": "exact"}],
    ids=["exact", "mc-2", "approx-exact"],
)
def test_several_directions_with_an_embedding_use_are_refused(options: dict) -> None:
    """A tied block with an embedding use holds one direction per sample: a clear error otherwise."""
    with pytest.raises(FisherlabError, match="one output direction per sample"):
        Probe(_model(), "ce", **options)


class SharedLinear(nn.Module):
    """``second`` (no bias) applies ``first``'s weight again."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3]`` to ``[N, 2]``."""
        return self.out(self.second(torch.tanh(self.first(x))))


@pytest.mark.parametrize("layers", [None, ["second"]], ids=["both-chosen", "second-alone"])
def test_linear_modules_sharing_a_weight_under_the_exact_fisher(layers: list[str] | None) -> None:
    """Two Linear modules sharing a weight, the exact Fisher (two directions): the block (named after the
    first chosen, in the first Linear's layout with its bias) equals (1/N) Σ Jᵀ J by torch.func (MSE: H = I)."""
    torch.manual_seed(0)
    model = SharedLinear().double()
    x = torch.randn(N, 3, generator=rng(2), dtype=torch.float64)
    probe = Probe(model, "mse", fisher="exact", layers=layers)
    name = "first" if layers is None else "second"
    assert probe.layers[name] is model.first and probe.tied == {name: {"second": model.second}}
    block = probe(x, None).blocks()[name]
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    j = torch.cat([jac["first.weight"], jac["first.bias"][..., None]], -1).flatten(2)  # [N, C, d_out d_in]
    torch.testing.assert_close(block.as_dense(), torch.einsum("ncp,ncq->pq", j, j) / N, **EXACT64)


class BadTie(nn.Module):
    """``first``'s weight used again by a Linear with a bias of its own, or by an embedding with ``max_norm``."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3, bias=False)
        self.other = nn.Linear(3, 3) if use == "linear-with-bias" else nn.Embedding(3, 3, max_norm=1.0)
        self.other.weight = self.first.weight


@pytest.mark.parametrize(
    ("use", "match"),
    [("linear-with-bias", "an nn.Linear with a bias of its own"), ("embedding-max-norm", "max_norm")],
)
def test_uses_that_cannot_be_appended_are_clear_errors(use: str, match: str) -> None:
    """A use with a bias of its own, or an embedding that renormalises its weight: a clear error."""
    with pytest.raises(FisherlabError, match=match):
        Probe(BadTie(use), "mse", layers=["first"])


def test_second_fisher_kind_of_a_tied_block() -> None:
    """With approx_fisher the tied block's second kind has the embedding positions of its own directions:
    empirical blocks scored against mc ones, each equal to its torch.func twin."""
    model = _model()
    tokens, y = _batch()
    probe = Probe(model, "ce", fisher="empirical", approx_fisher="mc", seed=4)
    snap = probe(tokens, y)
    with torch.no_grad():
        y_mc = sample_targets("ce", model(tokens), rng(4))  # type: ignore[arg-type]
    for block, targets in ((snap.blocks()["head"], y), (snap.approx_block("head"), y_mc)):
        jac = per_sample_gradients(model, "ce", tokens, targets, probe.layers)["head"].flatten(1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / N, **EXACT64)  # type: ignore[union-attr]


@pytest.mark.parametrize("side", ["right", "left"])
def test_tied_head_of_a_causal_lm_with_a_dict_batch(side: str) -> None:
    """A causal LM whose head is tied to its token embedding, probed with a padded HF-style batch
    (causal_lm, empirical): the tied block equals torch.func's per-sample gradients of the shared
    weight (head bias column included), and positions outside the attention mask add nothing."""
    model, batch = TinyCausalLM(), hf_batch(side)
    model.head.weight = model.wte.weight
    probe = Probe(model, "causal_lm", fisher="empirical")
    assert probe.tied == {"head": {"wte": model.wte}} and probe.layers["head"] is model.head
    snap = probe(batch)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], ids: Tensor, mask: Tensor, lab: Tensor) -> Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return sequence_loss(logits[0], lab)

    labels = effective_labels(batch)
    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"], labels)
    expected = torch.cat([grads["wte.weight"], grads["head.bias"][..., None]], -1)
    factors = snap.factors[next(iter(probe.tied))]
    torch.testing.assert_close(factors.per_sample_gradients()[:, 0], expected, **EXACT64)
    t = batch["input_ids"].shape[1]
    assert factors.n_positions == 2 * t and not factors.a[:, t:][batch["attention_mask"] == 0].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_tiny_tied_gpt2_on_a_padded_batch_every_block_equals_autograd(side: str) -> None:
    """Issue 19's done-when: a real (tiny) GPT-2 with ``lm_head`` tied to ``wte``, a padded dict batch, loss
    ``causal_lm``, every module probed (``layers="all"``): each block's per-sample gradients, ``||F||_F`` and
    spectrum equal autograd's per-sample gradients of the sequence loss (a loop over the padded rows, each run
    as a batch of one with its mask), the tied block's those of the shared parameter; ``fisher_coverage`` = 1."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = hf_batch(side)
    batch["input_ids"] = batch["input_ids"] % 11
    batch["labels"] = batch["labels"].where(batch["labels"] < 0, batch["labels"] % 11)
    probe = Probe(model, "causal_lm", layers="all", fisher="empirical")
    assert "lm_head" in probe.tied and "transformer.wte" in probe.tied["lm_head"]
    snap = probe(batch)
    assert {"transformer.h.0.attn.c_attn", "transformer.wpe", "transformer.ln_f", "lm_head"} <= set(snap.factors)
    labels = effective_labels(batch)
    per_sample: list[dict[str, Tensor]] = []
    for n in range(len(labels)):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"][n : n + 1], attention_mask=batch["attention_mask"][n : n + 1])
        sequence_loss(out.logits[0], labels[n]).backward()
        per_sample.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    key = {id(p): k for k, p in model.named_parameters()}  # a tied weight under its first name
    for name, factors in snap.factors.items():
        module = probe.layers[name]
        weight, bias = layer_parameters(module)
        rows = [
            parameter_matrix(module, g[key[id(weight)]], None if bias is None else g[key[id(bias)]]) for g in per_sample
        ]
        reference = torch.stack(rows)
        if factors.columns is not None:  # an embedding's compact block: the batch's tokens (positions) only
            reference = reference[..., factors.columns]
        torch.testing.assert_close(factors.per_sample_gradients()[:, 0], reference, **EXACT64, msg=name)
        block = ExactBlock(factors)
        jac = reference.flatten(1)
        f = jac.T @ jac / len(labels)
        torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(f), rtol=1e-8, atol=0, msg=name)
        spectrum = torch.linalg.eigvalsh(f).flip(0)[: block.max_rank]
        torch.testing.assert_close(
            block.eigenvalues(), spectrum, **scaled({"rtol": 1e-8, "atol": 1e-12}, float(spectrum[0])), msg=name
        )
    assert FisherProbe(model, "causal_lm", layers="all", methods=["diagonal"]).attrs["fisher_coverage"] == 1.0
