"""The probe: per-sample gradients equal torch.func's (Linear and Conv2d with stride, padding,
dilation, with and without bias; every loss); the ``exact`` Fisher equals JᵀHJ built by
torch.func; ``mc`` with many draws approaches ``exact``; a probe pass leaves training
undisturbed; bad input gives clear errors; a module called twice is weight sharing; a sequence model's
Linear layers (positions share the weight) match torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from fisherlab._errors import FisherlabError
from fisherlab.dense import per_sample_gradients
from fisherlab.fisher import ExactBlock
from fisherlab.losses import FisherKind, LossKind, per_sample_loss
from fisherlab.losses import output_fisher_sqrt as _output_fisher_sqrt
from fisherlab.losses import sample_targets as _sample_targets
from fisherlab.probe import Probe
from fisherlab.problems import Transformer
from tests.cases import SmallConvNet, rng, small_mlp
from tests.tolerances import BITWISE, EXACT64, ROUNDOFF64

#: The losses of one output per sample (``causal_lm``'s twins: test_probe_lm.py); ``seq_cls`` is ``ce`` on ``[N, C]``.
ONE_OUTPUT_LOSSES = [LossKind.MSE, LossKind.BCE, LossKind.CE, LossKind.SEQ_CLS]


def _problem(kind: str, loss: LossKind) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    n_out = 3
    if kind == "mlp":
        model, x = small_mlp((4, 5, n_out)), torch.randn(6, 4, dtype=torch.float64)
    else:
        model, x = SmallConvNet(n_out).double(), torch.randn(6, 2, 5, 5, dtype=torch.float64)
    if loss in (LossKind.CE, LossKind.SEQ_CLS):
        y = torch.randint(0, n_out, (6,))
    elif loss == LossKind.BCE:
        y = torch.rand(6, n_out, dtype=torch.float64)
    else:
        y = torch.randn(6, n_out, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("loss", ONE_OUTPUT_LOSSES)
def test_empirical_per_sample_gradients_match_torch_func(kind: str, loss: LossKind) -> None:
    """DW_n = sum_t g_nt a_nt^T from the hooks equals torch.func's per-sample gradient (true targets)."""
    model, x, y = _problem(kind, loss)
    snap = Probe(model, loss, fisher="empirical")(x, y)
    expected = per_sample_gradients(model, loss, x, y, Probe(model, loss).layers)
    for name, f in snap.factors.items():
        torch.testing.assert_close(f.per_sample_gradients()[:, 0], expected[name], **EXACT64)
        torch.testing.assert_close(snap.gradients[name], expected[name].mean(0), **EXACT64)


@pytest.mark.parametrize("loss", ONE_OUTPUT_LOSSES)
def test_mc_per_sample_gradients_use_sampled_targets(loss: LossKind) -> None:
    """With one draw, mc directions are the per-sample gradients at targets sampled by the probe's generator."""
    model, x, y_true = _problem("conv", loss)
    snap = Probe(model, loss, fisher="mc", seed=11)(x, y_true)
    with torch.no_grad():
        z = model(x)
    y = _sample_targets(loss, z, rng(11))
    expected = per_sample_gradients(model, loss, x, y, Probe(model, loss).layers)
    for name, f in snap.factors.items():
        torch.testing.assert_close(f.per_sample_gradients()[:, 0], expected[name], **EXACT64)


def _dense_exact_fisher(model: nn.Module, loss: LossKind, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(1/N) sum_n J_nᵀ H_n J_n with J from torch.func.jacrev and H the output Fisher."""
    prefix = {id(m): n for n, m in model.named_modules()}[id(module)]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)
    w = jac[f"{prefix}.weight"].flatten(3)
    if module.bias is not None:
        w = torch.cat([w, jac[f"{prefix}.bias"][..., None]], dim=-1)
    j = w.flatten(2)  # [N, C, D]
    with torch.no_grad():
        s = _output_fisher_sqrt(loss, model(x))
    h = s @ s.transpose(1, 2)
    return torch.einsum("ncd,nce,nef->df", j, h, j) / x.shape[0]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("loss", ONE_OUTPUT_LOSSES)
def test_exact_fisher_matches_jacobian_twin(kind: str, loss: LossKind) -> None:
    """fisher='exact' gives the block (1/N) Σ Jᵀ H J with H the closed-form output Fisher."""
    model, x, y = _problem(kind, loss)
    snap = Probe(model, loss, fisher="exact")(x, y)
    probe_layers = Probe(model, loss).layers
    for name, f in snap.factors.items():
        dense = ExactBlock(f).as_dense()
        torch.testing.assert_close(dense, _dense_exact_fisher(model, loss, x, probe_layers[name]), **EXACT64)


def test_output_fisher_sqrt_squares_to_output_fisher() -> None:
    """S Sᵀ = diag(p) − p pᵀ (softmax) and diag(p(1−p)) (sigmoid)."""
    z = torch.randn(4, 5, dtype=torch.float64)
    p = torch.softmax(z, -1)
    s = _output_fisher_sqrt(LossKind.CE, z)
    torch.testing.assert_close(s @ s.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :], **EXACT64)
    q = torch.sigmoid(z)
    s = _output_fisher_sqrt(LossKind.BCE, z)
    torch.testing.assert_close(s @ s.transpose(1, 2), torch.diag_embed(q * (1 - q)), **EXACT64)


@pytest.mark.parametrize("loss", ONE_OUTPUT_LOSSES)
def test_mc_approaches_exact(loss: LossKind) -> None:
    """The mc block's relative distance to the exact block shrinks like 1/√V (V = 16 → 1600)."""
    model, x, y = _problem("mlp", loss)
    exact = ExactBlock(Probe(model, loss, fisher="exact")(x, y).factors["0"]).as_dense()
    errs = []
    for v in (16, 1600):
        mc = ExactBlock(Probe(model, loss, fisher="mc", mc_samples=v, seed=3)(x, y).factors["0"]).as_dense()
        errs.append(float(torch.linalg.matrix_norm(mc - exact) / torch.linalg.matrix_norm(exact)))
    assert errs[1] < 0.1
    assert errs[1] < errs[0] / 4  # √100 = 10 expected; 4 leaves room for noise


def test_probe_leaves_training_undisturbed() -> None:
    """No .grad left on parameters, batch-norm statistics restored, global RNG untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    snap = Probe(model, "ce", fisher="mc", mc_samples=3)(x, y)
    assert set(snap.factors) == {"0", "3"}
    assert all(p.grad is None for p in model.parameters())
    for k, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[k], **BITWISE)
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_layers_and_options_raise_clear_errors() -> None:
    """Unknown layer names, non-Linear/Conv2d layers, grouped convs, bad Fisher kinds."""
    model = small_mlp()
    with pytest.raises(FisherlabError, match="unknown layer 'nope'.*probeable layers: 0, 2"):
        Probe(model, "mse", layers=["nope"])
    with pytest.raises(FisherlabError, match="is a Tanh"):
        Probe(model, "mse", layers=["1"])
    with pytest.raises(FisherlabError, match="groups=2"):
        Probe(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "mse")
    with pytest.raises(FisherlabError, match="unknown Fisher type 'true'"):
        Probe(model, "mse", fisher="true")
    with pytest.raises(FisherlabError, match="unknown loss"):
        Probe(model, "hinge")


def test_nan_output_is_reported() -> None:
    """NaN in the model output gives a FisherlabError naming it, not a silent NaN."""
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FisherlabError, match="model output contains NaN"):
        Probe(model, "mse")(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))


def test_fisher_kind_values() -> None:
    """Enum values are the strings stored in the dataset."""
    assert [k.value for k in FisherKind] == ["mc", "exact", "empirical"]


class SharedLinear(nn.Module):
    """One Linear applied twice per sample (shared weights), once on a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(torch.stack([h, 0.5 * h], 1))).sum(1)  # second call on a length-2 sequence
        return self.head(h)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_module_called_twice_is_weight_sharing(fisher: str) -> None:
    """The Fisher block and gradient of a module called twice equal torch.func brute force (defect 11)."""
    torch.manual_seed(0)
    model = SharedLinear().double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    snap = Probe(model, "mse", fisher=fisher)(x, y)
    psg = per_sample_gradients(model, "mse", x, y, {"shared": model.shared})["shared"]
    torch.testing.assert_close(snap.gradients["shared"], psg.mean(0), **ROUNDOFF64)
    block = snap.blocks()["shared"]
    assert block.factors.n_positions == 3  # one position from the first call, two from the second
    if fisher == "empirical":
        jac = psg.reshape(7, -1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / 7, **ROUNDOFF64)
    else:  # MSE: the exact Fisher is JᵀJ over the output units, the Gauss-Newton matrix
        jac = torch.func.jacrev(
            lambda w: torch.func.functional_call(model, {**dict(model.named_parameters()), "shared.weight": w}, (x,))
        )(model.shared.weight.detach())
        jb = torch.func.jacrev(
            lambda b: torch.func.functional_call(model, {**dict(model.named_parameters()), "shared.bias": b}, (x,))
        )(model.shared.bias.detach())
        j = torch.cat([jac, jb[..., None]], -1).reshape(7 * 3, -1)
        torch.testing.assert_close(block.as_dense(), j.T @ j / 7, **EXACT64)


def _tiny() -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(vocab=11, d_model=8, heads=2, n_blocks=1, length=6).double()
    gen = rng(1)
    return model, torch.randint(0, 11, (5, 6), generator=gen), torch.randint(0, 11, (5, 6), generator=gen)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA in the dense twin
def test_sequence_fisher_matches_torch_func() -> None:
    """Empirical Fisher of every layer of a causal transformer (positions share the weight: Linear layers,
    token and position embeddings, layer norms) equals (1/N) Σ ∇_n ∇_nᵀ with ∇_n the torch.func gradient
    of sample n's loss summed over positions (an embedding's block: the columns of the batch's tokens)."""
    model, x, y = _tiny()
    snap = Probe(model, "ce", fisher="empirical")(x, y)
    grads = per_sample_gradients(model, "ce", x, y, dict(Probe(model, "ce").layers))
    assert set(snap.factors) == {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    for name, block in snap.blocks().items():
        columns = block.factors.columns
        reference = grads[name] if columns is None else grads[name][..., columns]
        assert block.factors.n_positions == (1 if block.structure.value == "elementwise" else 6)
        jac = reference.flatten(1)
        torch.testing.assert_close(block.as_dense(), jac.T @ jac / 5, **EXACT64, msg=name)
        torch.testing.assert_close(snap.gradients[name], reference.mean(0), **EXACT64)
    assert snap.loss == pytest.approx(float(per_sample_loss("ce", model(x), y).mean().detach()), rel=ROUNDOFF64["rtol"])  # type: ignore[arg-type]
