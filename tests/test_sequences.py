"""Sequence models: Linear layers applied at every position (T = sequence length), ce over
positions, and the transformer problem (issue 9, part 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisherlab import cli
from fisherlab.dense import per_sample_gradients
from fisherlab.losses import per_sample_loss
from fisherlab.probe import Probe
from fisherlab.problems import Transformer
from fisherlab.results import load, validate


def _tiny() -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(vocab=11, d_model=8, heads=2, n_blocks=1, length=6).double()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 11, (5, 6), generator=gen), torch.randint(0, 11, (5, 6), generator=gen)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA in the dense twin
def test_sequence_fisher_matches_torch_func() -> None:
    """Empirical Fisher of every Linear layer of a causal transformer (positions share the weight)
    equals (1/N) Σ ∇_n ∇_nᵀ with ∇_n the torch.func gradient of sample n's loss summed over positions."""
    model, x, y = _tiny()
    snap = Probe(model, "ce", fisher="empirical")(x, y)
    grads = per_sample_gradients(model, "ce", x, y, dict(Probe(model, "ce").layers))
    for name, block in snap.blocks().items():
        assert block.factors.n_positions == 6
        jac = grads[name].flatten(1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / 5, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(snap.gradients[name], grads[name].mean(0), rtol=1e-10, atol=1e-12)
    assert snap.loss == pytest.approx(float(per_sample_loss("ce", model(x), y).mean().detach()), rel=1e-12)  # type: ignore[arg-type]


def test_mc_targets_are_drawn_per_position() -> None:
    """MC sampling for [N, T, C] logits gives one class per position, distributed as softmax."""
    from fisherlab.losses import LossKind, sample_targets

    z = torch.log(torch.tensor([[[0.7, 0.2, 0.1]] * 4], dtype=torch.float64)).expand(5000, 4, 3)
    y = sample_targets(LossKind.CE, z, torch.Generator().manual_seed(0))
    assert y.shape == (5000, 4)
    freq = torch.bincount(y.flatten(), minlength=3) / y.numel()
    torch.testing.assert_close(freq.double(), torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), rtol=0, atol=0.02)


def test_transformer_problem_end_to_end(tmp_path: Path) -> None:
    """`fisherlab probe --problem transformer`: embedding and layer norms listed as skipped, both errors stored."""
    out = tmp_path / "t.nc"
    args = ["probe", "--problem", "transformer", "--iterations", "1", "--every", "1", "--batch-size", "2"]
    assert (
        cli.main([*args, "--layers", "blocks.0.qkv", "--methods", "kfac,deflation", "--out", str(out), "--no-progress"])
        == 0
    )
    ds = load(out)
    validate(ds)
    assert "embed.weight" in ds.attrs["skipped_parameters"] and "blocks.0.ln1.weight" in ds.attrs["skipped_parameters"]
    assert bool(ds["frobenius_error"].notnull().all()) and bool(ds["spectral_error"].notnull().all())
    assert ds.attrs["stand_in"] == 1
