"""Language models through the probe: dict batches (HF style) and the ``causal_lm`` / ``seq_cls`` losses.

A tiny causal model (embeddings, not probed; Linear layers over positions; causal attention that
honours ``attention_mask``) in float64. Checks: per-sample gradients of every Linear equal torch.func's
gradients of the summed sequence loss (empirical and MC, right and left padding); the exact Fisher
equals (1/N) Σ JᵀHJ with H the per-position output Fisher; a padded batch's exact block equals that of
the same sequences unpadded; KFAC's factors agree between left and right padding; padding rows of
``a`` are zero (``layer_inputs``' ``position_mask``); outputs with ``.logits``, tuples and tensors
give the same snapshot; the ``(x, y)`` API, inference mode and ``FisherProbe.step`` with a dict
batch; ``seq_cls`` on pooled logits; bad batches give clear errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from fisherlab._errors import FisherlabError
from fisherlab.approximations import kfac_factors
from fisherlab.fisher import ExactBlock
from fisherlab.fisher_probe import FisherProbe
from fisherlab.layers import layer_inputs
from fisherlab.losses import IGNORE_INDEX, LossKind, sample_targets
from fisherlab.probe import Probe
from tests.cases import rng
from tests.tolerances import BITWISE, EXACT64

VOCAB, WIDTH, CLASSES = 7, 4, 3
LINEARS = ["q", "k", "v", "o", "mlp", "head"]
#: Three sequences of lengths 5, 3, 4 (tokens 1..6; 0 is the pad token) and their labels: the tokens
#: themselves, a prompt token of the first one masked with -100 (no loss on predicting it).
SEQUENCES = [[3, 1, 4, 1, 5], [2, 6, 5], [3, 5, 6, 2]]
PROMPT_MASKED = {(0, 2)}


@dataclass
class LMOutput:
    """A Hugging Face style output: the logits as an attribute."""

    logits: Tensor
    loss: Tensor | None = None


class TinyCausalLM(nn.Module):
    """Token and position embeddings (not probed), one causal self-attention with ``q, k, v, o`` Linear layers
    that honours ``attention_mask`` (HF style: masked keys get the dtype's minimum, position ids count the
    tokens inside the mask), a Linear MLP and a Linear head over every position (weights shared over T).
    ``classes``: a sequence classifier instead (the head on the mean of the hidden states inside the mask)."""

    def __init__(self, style: str = "tensor", classes: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.style = style
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(8, WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.mlp = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, classes or VOCAB)
        self.classes = classes
        self.double()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> object:
        t = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.wte(input_ids) + self.wpe((mask.cumsum(-1) - 1).clamp(min=0))
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / WIDTH**0.5
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril() & (mask[:, None, :] != 0)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        h = h + self.o(torch.softmax(scores, -1) @ self.v(h))
        h = torch.tanh(h + self.mlp(torch.tanh(h)))
        if self.classes:
            h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.head(h)
        if self.style == "logits":
            return LMOutput(logits)
        return (logits, h) if self.style == "tuple" else logits


def hf_batch(side: str) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` padded on ``side`` (``"right"``, ``"left"``), as HF's
    collators give them: labels -100 at the pads (and at the prompt-masked token) only."""
    t = max(map(len, SEQUENCES))
    ids = torch.zeros(len(SEQUENCES), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for n, seq in enumerate(SEQUENCES):
        cols = range(len(seq)) if side == "right" else range(t - len(seq), t)
        for i, col in enumerate(cols):
            ids[n, col], mask[n, col] = seq[i], 1
            labels[n, col] = IGNORE_INDEX if (n, i) in PROMPT_MASKED else seq[i]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def on(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def effective_labels(batch: dict[str, Tensor]) -> Tensor:
    """The labels that carry a loss, written out by hand: HF's labels, less the first real token of every
    sequence (predicted from a pad when left-padded; unpadded it has no prediction at all)."""
    labels = batch["labels"].clone()
    first = batch["attention_mask"].argmax(1)
    labels[torch.arange(len(labels)), first] = IGNORE_INDEX
    return labels


def sequence_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """One sequence's loss, written independently of fisherlab: Σ_t -log softmax(logits[t])[labels[t + 1]]
    over the labels that are not -100 (HF's shift, summed over the sequence)."""
    logp = torch.log_softmax(logits[:-1], -1)
    target = labels[1:]
    keep = target != IGNORE_INDEX
    return -(logp.gather(-1, target.clamp(min=0)[:, None])[:, 0] * keep).sum()


def twin_gradients(model: nn.Module, batch: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``[N, d_out, d_in + 1]`` of every Linear by torch.func (functional_call, vmap,
    grad) of the summed sequence loss with ``labels``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], ids: Tensor, mask: Tensor, lab: Tensor) -> Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return sequence_loss(logits[0], lab)

    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"], labels)
    return {n: torch.cat([grads[f"{n}.weight"], grads[f"{n}.bias"][..., None]], -1) for n in LINEARS}


def unpadded(n: int) -> dict[str, Tensor]:
    """Sequence ``n`` alone, without padding (a batch of one)."""
    batch = hf_batch("right")
    length = len(SEQUENCES[n])
    return {k: v[n : n + 1, :length] for k, v in batch.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_empirical_per_sample_gradients_match_torch_func(side: str) -> None:
    """Empirical causal_lm: DW_n of every Linear equals torch.func's gradient of sequence n's summed loss,
    and ∇h their mean; padding rows of a are zero."""
    model, batch = TinyCausalLM(), hf_batch(side)
    snap = Probe(model, "causal_lm", fisher="empirical")(batch)
    expected = twin_gradients(model, batch, effective_labels(batch))
    for name in LINEARS:
        f = snap.factors[name]
        torch.testing.assert_close(f.per_sample_gradients()[:, 0], expected[name], **EXACT64, msg=name)
        torch.testing.assert_close(snap.gradients[name], expected[name].mean(0), **EXACT64, msg=name)
        assert not f.a[batch["attention_mask"] == 0].any()  # the bias column too
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
    loss = sum(float(sequence_loss(z, y)) for z, y in zip(logits, effective_labels(batch), strict=True))
    assert snap.loss == pytest.approx(loss / 3, rel=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mc_per_sample_gradients_use_targets_drawn_by_the_generator(side: str) -> None:
    """MC causal_lm (one draw): DW_n equals torch.func's gradient of the loss at targets drawn by
    ``sample_targets`` from the probe's seed at the supervised labels (-100 elsewhere)."""
    model, batch = TinyCausalLM(), hf_batch(side)
    snap = Probe(model, "causal_lm", fisher="mc", seed=5)(batch)
    with torch.no_grad():
        z = model(batch["input_ids"], batch["attention_mask"])
    supervised = effective_labels(batch) != IGNORE_INDEX
    drawn = sample_targets(LossKind.CAUSAL_LM, z, rng(5), supervised=supervised)
    assert torch.equal(drawn == IGNORE_INDEX, ~supervised)
    expected = twin_gradients(model, batch, drawn)
    for name in LINEARS:
        torch.testing.assert_close(snap.factors[name].per_sample_gradients()[:, 0], expected[name], **EXACT64)


def dense_exact_fisher(model: nn.Module, batch: dict[str, Tensor], labels: Tensor, name: str) -> Tensor:
    """(1/N) Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt over the logits t that predict a supervised label,
    J_nt the Jacobian of logits t by torch.func.jacrev."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = 0
    for n in range(len(labels)):
        inputs = {"input_ids": batch["input_ids"][n : n + 1], "attention_mask": batch["attention_mask"][n : n + 1]}

        def logits(w: Tensor, b: Tensor, inputs: dict[str, Tensor] = inputs) -> Tensor:
            return functional_call(model, {**params, f"{name}.weight": w, f"{name}.bias": b}, (), inputs)[0]

        jw, jb = jacrev(logits, argnums=(0, 1))(params[f"{name}.weight"], params[f"{name}.bias"])
        jac = torch.cat([jw, jb[..., None]], -1).flatten(2)  # [T, C, D]
        with torch.no_grad():
            p = torch.softmax(logits(params[f"{name}.weight"], params[f"{name}.bias"]), -1)
        for t in range(labels.shape[1] - 1):
            if labels[n, t + 1] != IGNORE_INDEX:
                h = torch.diag(p[t]) - torch.outer(p[t], p[t])
                total = total + jac[t].T @ h @ jac[t]
    return total / len(labels)


@pytest.mark.parametrize("side", ["right", "left"])
def test_exact_fisher_matches_jacobian_twin_and_the_unpadded_sequences(side: str) -> None:
    """Exact causal_lm: the block equals (1/N) Σ JᵀHJ over the supervised predictions, and the mean of the
    blocks of the same sequences run alone without padding."""
    model, batch = TinyCausalLM(), hf_batch(side)
    snap = Probe(model, "causal_lm", fisher="exact")(batch)
    alone = [Probe(model, "causal_lm", fisher="exact")(unpadded(n)) for n in range(3)]
    for name in ("q", "head"):
        block = ExactBlock(snap.factors[name]).as_dense()
        torch.testing.assert_close(block, dense_exact_fisher(model, batch, effective_labels(batch), name), **EXACT64)
        mean = sum(ExactBlock(s.factors[name]).as_dense() for s in alone) / 3
        torch.testing.assert_close(block, mean, **EXACT64)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_kfac_factors_agree_between_left_and_right_padding(fisher: str, device: torch.device) -> None:
    """KFAC's A and G of every Linear are the same for a left- and a right-padded batch (padding adds
    nothing to any factor), and so are the exact blocks."""
    model = TinyCausalLM().to(device)
    left, right = (Probe(model, "causal_lm", fisher=fisher)(on(hf_batch(side), device)) for side in ("left", "right"))
    for name in LINEARS:
        kl, kr = kfac_factors(left.factors[name]), kfac_factors(right.factors[name])
        torch.testing.assert_close(kl.ins[0], kr.ins[0], **EXACT64, msg=name)
        torch.testing.assert_close(kl.outs[0], kr.outs[0], **EXACT64, msg=name)
        dense_left = ExactBlock(left.factors[name]).as_dense()
        torch.testing.assert_close(dense_left, ExactBlock(right.factors[name]).as_dense(), **EXACT64, msg=name)


def test_layer_inputs_zero_the_masked_positions_of_matching_calls() -> None:
    """``position_mask`` zeroes a's rows (bias column included) in calls with the mask's T only."""
    linear = nn.Linear(3, 2).double()
    gen = rng(0)
    seq, other = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    a = layer_inputs(linear, [seq, other], torch.float64, position_mask=mask)
    plain = layer_inputs(linear, [seq, other], torch.float64)
    assert a.shape == (2, 5, 4)
    torch.testing.assert_close(a[:, :4], plain[:, :4] * mask[..., None], **BITWISE)
    torch.testing.assert_close(a[:, 4], plain[:, 4], **BITWISE)  # a call of one position: untouched
    with pytest.raises(FisherlabError, match="position_mask must be"):
        layer_inputs(linear, [seq], torch.float64, position_mask=mask.long())


def test_outputs_with_logits_tuples_and_tensors_give_the_same_snapshot() -> None:
    """``.logits``, a tuple's first element and a tensor are the same logits; the (x, y) API without a mask
    equals the dict batch without one."""
    batch = {k: v for k, v in hf_batch("right").items() if k != "attention_mask"}
    snaps = [Probe(TinyCausalLM(style), "causal_lm", fisher="mc", seed=2)(batch) for style in ("logits", "tuple")]
    snaps.append(Probe(TinyCausalLM(), "causal_lm", fisher="mc", seed=2)(batch["input_ids"], batch["labels"]))
    for snap in snaps[1:]:
        assert snap.loss == snaps[0].loss
        for name in LINEARS:
            torch.testing.assert_close(snap.factors[name].g, snaps[0].factors[name].g, **BITWISE)
            torch.testing.assert_close(snap.factors[name].a, snaps[0].factors[name].a, **BITWISE)


def test_labels_are_not_passed_to_the_model() -> None:
    """The model gets the batch's inputs without ``labels`` (an HF model would compute its own loss)."""
    seen: list[set[str]] = []
    model = TinyCausalLM()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    Probe(model, "causal_lm")(hf_batch("left"))
    assert seen == [{"input_ids", "attention_mask"}]


def test_fisher_probe_step_takes_a_dict_batch_also_under_inference_mode(device: torch.device) -> None:
    """``FisherProbe.step(step, batch)`` with an HF batch; inside ``torch.inference_mode()`` (inference tensors)
    it gives the snapshot of a plain call."""
    model = TinyCausalLM().to(device)
    with FisherProbe(model, "causal_lm", every=1, layers=["q", "head"], methods=["kfac"]) as probe:
        plain = probe.step(0, on(hf_batch("left"), device))
    with (
        FisherProbe(model, "causal_lm", every=1, layers=["q", "head"], methods=["kfac"]) as probe,
        torch.inference_mode(),
    ):
        batch = on(hf_batch("left"), device)
        assert batch["input_ids"].is_inference()
        got = probe.step(0, batch)
    assert plain is not None and got is not None
    assert float(plain["train_loss"][0]) > 0
    for var in ("train_loss", "frobenius_error", "fisher_frobenius_norm"):
        torch.testing.assert_close(torch.as_tensor(got[var].values), torch.as_tensor(plain[var].values), **BITWISE)


def test_seq_cls_per_sample_gradients_match_torch_func() -> None:
    """seq_cls: logits [N, C] of a pooled padded sequence, labels [N]; empirical DW_n equals torch.func's."""
    model = TinyCausalLM(classes=CLASSES)
    batch = {**hf_batch("left"), "labels": torch.tensor([2, 0, 1])}
    snap = Probe(model, "seq_cls", fisher="empirical")(batch)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], ids: Tensor, mask: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})[0]
        return -torch.log_softmax(logits, -1).gather(-1, label[None])[0]

    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(
        params, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    for name in LINEARS:
        expected = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][..., None]], -1)
        torch.testing.assert_close(snap.factors[name].per_sample_gradients()[:, 0], expected, **EXACT64)
    assert ExactBlock(Probe(model, "seq_cls", fisher="exact")(batch).factors["head"]).factors.n_directions == CLASSES


class NoLogits(nn.Module):
    """A model whose output holds no logits (a dict of hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.lin = nn.Embedding(VOCAB, 2), nn.Linear(2, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"hidden": self.lin(self.wte(input_ids))}


def test_bad_language_model_batches_raise_clear_errors() -> None:
    """Labels out of range, the wrong logits for the loss, a bad attention mask, no tensor, no logits,
    no labels for the empirical Fisher, too many exact directions."""
    model, batch = TinyCausalLM(), hf_batch("right")
    with pytest.raises(FisherlabError, match=r"class label 7.*0\.\.6 or -100"):
        Probe(model, "causal_lm")({**batch, "labels": batch["labels"].masked_fill(batch["labels"] == 5, 7)})
    with pytest.raises(FisherlabError, match=r"'seq_cls' needs logits of shape \[N, C\]"):
        Probe(model, "seq_cls")({**batch, "labels": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(FisherlabError, match=r"'causal_lm' needs integer class targets of shape \[N, T\]"):
        Probe(model, "causal_lm")(batch["input_ids"], batch["labels"].double())
    with pytest.raises(FisherlabError, match="attention_mask must be a"):
        Probe(model, "causal_lm")({**batch, "attention_mask": batch["attention_mask"][0]})
    with pytest.raises(FisherlabError, match="holds no tensor"):
        Probe(model, "causal_lm")({"text": "hello"})
    with pytest.raises(FisherlabError, match="cannot find the logits"):
        Probe(NoLogits(), "causal_lm")(batch)
    with pytest.raises(FisherlabError, match="the empirical Fisher needs the true targets"):
        Probe(model, "causal_lm", fisher="empirical")({k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(FisherlabError, match="one backward pass per position and class"):
        long = batch["input_ids"].repeat(1, 200)[:, :700]  # (700 - 1) x 7 directions
        Probe(nn.Sequential(nn.Embedding(VOCAB, 2), nn.Linear(2, VOCAB)).double(), "causal_lm", fisher="exact")(long)
