"""The ``gpt2`` problem's model: Hugging Face GPT-2 from a config (no download), logits out, names and
tied embeddings kept; a shape-only pass on the meta device."""

from __future__ import annotations

import pytest
import torch

import fisherlab as fl

transformers = pytest.importorskip("transformers")

from fisherlab._errors import UndefinedMetricWarning
from fisherlab.gpt2 import BYTE_VOCABULARY, GPT2Logits, gpt2_config, gpt2_model
from fisherlab.launch import resolve_layers
from fisherlab.losses import per_sample_loss

#: (vocabulary, d_model, heads, layers, context): the smallest GPT-2 with every module kind
SIZES = (BYTE_VOCABULARY, 8, 2, 1, 16)


def test_logits_are_the_hugging_face_models_and_the_embeddings_stay_tied() -> None:
    """The subclass returns ``GPT2LMHeadModel``'s logits; names are Hugging Face's; ``lm_head`` is ``wte``
    after a dtype change; no dropout (two passes agree in training mode)."""
    torch.manual_seed(0)
    model = gpt2_model(SIZES).double()
    reference = transformers.GPT2LMHeadModel(gpt2_config(*SIZES)).double()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 128, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, BYTE_VOCABULARY) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, reference(input_ids=tokens).logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)  # model.train(): no dropout
    assert model.lm_head.weight is model.transformer.wte.weight
    names = dict(model.named_modules())
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.ln_f", "lm_head"} <= set(names)


def test_a_sequence_beyond_the_context_is_one_clear_error() -> None:
    with pytest.raises(fl.FisherlabError, match="17 tokens exceeds GPT-2's context of 16"):
        gpt2_model(SIZES)(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(fl.FisherlabError, match="heads"):
        gpt2_config(256, 10, 3, 1, 16)


def test_shapes_on_the_meta_device_match_a_real_pass() -> None:
    """``Problem.layer_names`` and the memory check build and run the model on the meta device."""
    with torch.device("meta"):
        meta = gpt2_model(SIZES)
    assert isinstance(meta, GPT2Logits) and meta.lm_head.weight.is_meta
    assert meta.lm_head.weight is meta.transformer.wte.weight
    assert meta(torch.zeros(2, 16, dtype=torch.int64, device="meta")).shape == (2, 16, BYTE_VOCABULARY)
    small = fl.get_problem("gpt2").sized("small")
    assert small.sizes == (256, 768, 12, 12, 1024)
    assert "transformer.h.11.mlp.c_fc" in small.layer_names()


def test_the_problem_is_seeded_and_trains_on_the_embedded_text() -> None:
    problem = fl.get_problem("gpt2")
    a, b = problem.model(seed=3), problem.model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    x, y = next(problem.batches(problem.data(), batch_size=2))
    assert x.shape == y.shape == (2, 128) and x.dtype == torch.int64
    loss = per_sample_loss(problem.loss, a(x), y)
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())


def test_every_parameter_of_the_problem_is_probed() -> None:
    """``--layers all`` on gpt2: every Conv1D, both embeddings (``wte`` with its tied ``lm_head`` as one block),
    every layer norm; ``fisher_coverage`` 1.0; a finite error wherever a method applies."""
    problem = fl.get_problem("gpt2")
    layers = problem.layer_names()
    assert problem.default_layers[0] in layers and "transformer.wpe" in layers and "transformer.ln_f" in layers
    assert resolve_layers(problem, ("all",)) == tuple(layers)
    model = problem.model(dtype=torch.float64)
    x, y = next(problem.batches(problem.data(), batch_size=2))
    with pytest.warns(UndefinedMetricWarning, match="elementwise"):  # KFAC does not apply to layer norms
        probe = fl.FisherProbe(model, "ce", layers=layers, methods=["kfac", "diagonal"])
    assert probe.attrs["fisher_coverage"] == 1.0 and probe.attrs["skipped_parameters"] == "none"
    error = probe.step(0, x, y)["frobenius_error"].isel(iteration=0)
    assert bool(error.sel({"method": "diagonal"}).notnull().all())
    norms = [name for name in layers if ".ln_" in name]
    assert bool(error.sel({"method": "kfac"}).drop_sel({"layer": norms}).notnull().all())
