"""GPT-2 as the ``gpt2`` problem trains it: the Hugging Face architecture, built from a
:class:`transformers.GPT2Config`, randomly initialised (no download, no tokenizer files).

This module imports ``transformers`` (the ``fisherlab[hf]`` extra); :mod:`fisherlab.problems`
imports it only when the ``gpt2`` problem builds a model, so ``fisherlab --help`` and every
other problem run without it.

The vocabulary is byte-level: 256 token ids, the bytes of the text (the embedded stand-in text
is ASCII, ids below 128). Dropout is off, so the model is a deterministic function of its
inputs and its Fisher is the one a probe pass measures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fisherlab._errors import FisherlabError

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise FisherlabError(
        'the gpt2 problem needs transformers: pip install "fisherlab[hf]" (or pip install transformers)'
    ) from exc

__all__ = ["BYTE_VOCABULARY", "GPT2Logits", "gpt2_config", "gpt2_model"]

#: Token ids of the byte-level vocabulary: one per byte value.
BYTE_VOCABULARY = 256


def gpt2_config(vocab: int, d_model: int, heads: int, n_layers: int, context: int) -> GPT2Config:
    """A GPT-2 configuration of the given widths, without dropout and without a key-value cache.

    Args:
        vocab: Vocabulary size (256: bytes).
        d_model: Width of the residual stream (``n_embd``).
        heads: Attention heads per layer (``n_head``); must divide ``d_model``.
        n_layers: Transformer blocks (``n_layer``).
        context: Most positions (``n_positions``): the longest sequence the model takes.

    Raises:
        FisherlabError: ``heads`` does not divide ``d_model``, or a non-positive width.
    """
    if min(vocab, d_model, heads, n_layers, context) < 1:
        raise FisherlabError(f"GPT-2 widths must be positive, got {(vocab, d_model, heads, n_layers, context)}")
    if d_model % heads:
        raise FisherlabError(f"GPT-2 needs heads ({heads}) to divide d_model ({d_model})")
    return GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )


class GPT2Logits(GPT2LMHeadModel):
    """:class:`transformers.GPT2LMHeadModel` whose ``forward`` returns the logits tensor
    ``[N, T, vocab]``, as fisherlab's training loop and probe take a model's output.

    The modules keep Hugging Face's names (``transformer.wte``, ``transformer.h.0.attn.c_attn``,
    ``transformer.h.0.mlp.c_fc``, ``lm_head``, …) and the output embedding stays tied to the
    input embedding (``lm_head.weight is transformer.wte.weight``). Everything else is the
    parent's (``save_pretrained``, ``from_pretrained``, the config).
    """

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """Logits ``[N, T, vocab]`` of the next token at every position of ``input_ids [N, T]``;
        ``kwargs`` (``attention_mask``, …) go to :class:`~transformers.GPT2LMHeadModel`.

        Raises:
            FisherlabError: A sequence longer than the model's context (``n_positions``).
        """
        if input_ids.shape[-1] > self.config.n_positions:
            raise FisherlabError(
                f"a sequence of {input_ids.shape[-1]} tokens exceeds GPT-2's context of {self.config.n_positions}"
            )
        if input_ids.is_meta and "attention_mask" not in kwargs:
            # shapes only (Problem.layer_names, launch.snapshot_bytes): Hugging Face's mask code reads values,
            # which meta tensors lack, unless it is handed the 4-D causal mask it would build
            n, t = input_ids.shape
            kwargs["attention_mask"] = torch.ones(t, t, dtype=torch.bool, device="meta").tril().expand(n, 1, t, t)
        return super().forward(input_ids=input_ids, use_cache=False, **kwargs).logits


def gpt2_model(sizes: tuple[int, ...]) -> GPT2Logits:
    """A freshly initialised :class:`GPT2Logits` of ``sizes = (vocabulary, d_model, heads, layers,
    context)`` (Hugging Face's initialisation, drawn from torch's global generator)."""
    return GPT2Logits(gpt2_config(*sizes))
