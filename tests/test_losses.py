"""Losses and their output Fisher: Monte Carlo targets drawn per position; causal_lm is HF's shifted
cross entropy summed per sequence, its gradient closed form and zero where unsupervised, its MC targets
drawn at supervised labels only, its exact directions square to the per-position output Fisher."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as nnf

from fisherlab._errors import FisherlabError
from fisherlab.losses import (
    IGNORE_INDEX,
    MAX_EXACT_SEQUENCE_DIRECTIONS,
    FisherKind,
    LossKind,
    model_logits,
    output_directions,
    output_gradient,
    per_sample_loss,
    sample_targets,
)
from tests.cases import rng
from tests.tolerances import EXACT64, MONTE_CARLO


def test_mc_targets_are_drawn_per_position() -> None:
    """MC sampling for [N, T, C] logits gives one class per position, distributed as softmax."""
    z = torch.log(torch.tensor([[[0.7, 0.2, 0.1]] * 4], dtype=torch.float64)).expand(5000, 4, 3)
    y = sample_targets(LossKind.CE, z, rng(0))
    assert y.shape == (5000, 4)
    freq = torch.bincount(y.flatten(), minlength=3) / y.numel()
    torch.testing.assert_close(freq.double(), torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), **MONTE_CARLO)


def _lm_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [3, 5, 4] and labels [3, 5] with -100 at a pad, a prompt token and position 0 of one row."""
    gen = rng(1)
    z = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 5), generator=gen)
    y[0, 4] = y[1, 2] = y[2, 0] = IGNORE_INDEX
    return z, y


def test_causal_lm_loss_is_hf_shifted_cross_entropy_summed_per_sequence() -> None:
    """Σ_n per-sample loss / M = HF's mean over the M supervised tokens (logits[:, :-1] vs labels[:, 1:])."""
    z, y = _lm_case()
    losses = per_sample_loss(LossKind.CAUSAL_LM, z, y)
    hf_mean = nnf.cross_entropy(z[:, :-1].reshape(-1, 4), y[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    supervised = int((y[:, 1:] != IGNORE_INDEX).sum())
    assert losses.shape == (3,)
    assert float(losses.sum() / supervised) == pytest.approx(float(hf_mean), rel=1e-14)


def test_causal_lm_output_gradient_is_autograd_and_zero_where_unsupervised() -> None:
    """dL/dz in closed form equals autograd's; it is exactly zero at the logits of -100 labels and at the last."""
    z, y = _lm_case()
    zg = z.clone().requires_grad_()
    (auto,) = torch.autograd.grad(per_sample_loss(LossKind.CAUSAL_LM, zg, y).sum(), zg)
    closed = output_gradient(LossKind.CAUSAL_LM, z, y)
    torch.testing.assert_close(closed, auto, **EXACT64)
    assert not closed[:, -1].any() and not closed[0, 3].any() and not closed[1, 1].any()


def test_causal_lm_mc_targets_follow_the_previous_position_only_where_supervised() -> None:
    """Label t ~ softmax(z[:, t - 1]) at supervised labels, -100 elsewhere; a position's draw does not depend
    on the mask; the frequencies match the probabilities."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]], dtype=torch.float64)
    z = torch.log(p)[None].expand(6000, 3, 3)
    supervised = torch.tensor([False, True, True]).expand(6000, 3).clone()
    supervised[::2, 2] = False
    y = sample_targets(LossKind.CAUSAL_LM, z, rng(0), supervised=supervised)
    everywhere = sample_targets(LossKind.CAUSAL_LM, z, rng(0))
    assert torch.equal(y == IGNORE_INDEX, ~supervised)
    assert torch.equal(y[supervised], everywhere[supervised])
    for t in (1, 2):
        drawn = y[:, t][supervised[:, t]]
        freq = torch.bincount(drawn, minlength=3) / drawn.numel()
        torch.testing.assert_close(freq.double(), p[t - 1], **MONTE_CARLO)


def test_causal_lm_exact_directions_square_to_the_per_position_output_fisher() -> None:
    """Σ_v d_v d_vᵀ per sample = block-diag over logits t of (diag p_t − p_t p_tᵀ) where label t + 1 is
    supervised, zero blocks elsewhere (the last position included)."""
    z, y = _lm_case()
    dirs = output_directions(LossKind.CAUSAL_LM, FisherKind.EXACT, z, y, generator=rng(0))
    assert len(dirs) == 4 * 4  # (T - 1) C
    d = torch.stack(dirs, -1).flatten(1, 2)  # [N, T C, V]
    p = torch.softmax(z, -1)
    for n in range(3):
        blocks = [
            torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t])
            if t < 4 and y[n, t + 1] != IGNORE_INDEX
            else torch.zeros(4, 4, dtype=torch.float64)
            for t in range(5)
        ]
        torch.testing.assert_close(d[n] @ d[n].T, torch.block_diag(*blocks), **EXACT64)


def test_the_exact_sequence_fisher_refuses_too_many_directions() -> None:
    """More than MAX_EXACT_SEQUENCE_DIRECTIONS positions x classes: a clear error, not hours of backward passes."""
    z = torch.zeros(1, MAX_EXACT_SEQUENCE_DIRECTIONS // 8 + 2, 8, dtype=torch.float64)
    with pytest.raises(FisherlabError, match="use the mc Fisher"):
        output_directions(LossKind.CAUSAL_LM, FisherKind.EXACT, z, None, generator=rng(0))


def test_model_logits_finds_the_logits() -> None:
    """A tensor, ``.logits``, a mapping's ``"logits"`` and a tuple's first element."""
    z = torch.zeros(2, 3)
    for output in (z, SimpleNamespace(logits=z), {"logits": z}, (z, None), [z]):
        assert model_logits(output) is z
    with pytest.raises(FisherlabError, match="cannot find the logits"):
        model_logits({"hidden_states": z})
