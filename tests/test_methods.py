"""The methods of :mod:`fisherlab.methods` (issue 18) against dense twins built from their definitions.

With ``J`` the per-sample gradients (rows ``vec(DW_nv)``) and ``F = JᵀJ / N`` every twin below
is written from the issue's definition with dense textbook linear algebra, independently of the
factor-based builders; float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fisherlab as fl
from fisherlab.approximations import ApproxConfig, approximate_all
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.method_registry import METHODS
from fisherlab.metrics import inner_with_block
from fisherlab.operators import remembered_inner
from fisherlab.testing import check_block_operator
from tests.cases import FACTOR_CASES, ids, make_factors, rng
from tests.tolerances import EXACT64, SLACK, SOLVE64, as_approx

ZOO = ("diagonal", "ekfac", "tkfac", "shampoo2", "shampoo", "eshampoo", "kfac_reduce", "lowrank")
RANK = 3  # lowrank's k in these tests: below the rank of every case's F
CONFIG = ApproxConfig(lowrank_rank=RANK)
#: A layer wider than its batch: span-invariant methods are built on the sample span and lifted.
WIDE = {"id": "mlp-wide-N2", "n": 2, "v": 1, "t": 1, "d_in": 9, "d_out": 6, "seed": 7}
WIDE_CONV = {"id": "conv-wide-N1", "n": 1, "v": 2, "t": 2, "d_in": 7, "d_out": 6, "seed": 8}
CASES = [*FACTOR_CASES, WIDE, WIDE_CONV]
FLOOR = 1e-14  # error 1 of an exact approximation, formed before squaring (float64)
#: lowrank's error 1 against its error 2 (equal by Eckart–Young): two eigen-routes to the same tail; the
#: absolute part covers the tail's square root near the rounding floor.
EQUAL_ERRORS = {"rel": 1e-8, "abs": 1e-7}


def _sym(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def _basis(m: Tensor) -> Tensor:
    return torch.linalg.eigh(_sym(m)).eigenvectors


def _diagonal_in(f: Tensor, q: Tensor) -> Tensor:
    """``Q diag(diag(Qᵀ F Q)) Qᵀ``: the diagonal of ``F`` in the orthogonal basis ``Q``."""
    return q @ torch.diag(torch.diagonal(q.T @ f @ q)) @ q.T


def _psd_sqrt(m: Tensor) -> Tensor:
    """``M^{1/2}``, eigenvalues at the rounding of zero (``side · eps · λ_max``) taken as the zeros they are."""
    values, vectors = torch.linalg.eigh(_sym(m))
    values[values <= m.shape[0] * torch.finfo(m.dtype).eps * values.abs().max()] = 0
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


def _best_multiple(f: Tensor, x: Tensor) -> Tensor:
    """``c X`` with ``c = <F, X> / ‖X‖²``."""
    return torch.sum(f * x) / torch.sum(x * x) * x


def twins(block: ExactBlock, rank: int = RANK) -> dict[str, Tensor]:
    """Every method's dense matrix, from the definitions of issue 18."""
    fac = block.factors
    n, t, d_out, d_in = fac.n_samples, fac.n_positions, fac.d_out, fac.d_in
    jac = block.jacobian()  # [N V, D], rows vec(DW_nv)
    f = jac.T @ jac / n
    dw = jac.reshape(-1, d_out, d_in)
    a2, g2 = fac.a.reshape(-1, d_in), fac.g.reshape(-1, d_out)
    kfac_a, kfac_g = a2.T @ a2 / n, g2.T @ g2 / (n * t)  # KFAC (expand)
    a_bar, g_hat = fac.a.mean(1), fac.g.sum(2).reshape(-1, d_out)  # KFAC-reduce: ā averaged, ĝ summed
    left = torch.einsum("moi,mpi->op", dw, dw) / n  # L = (1/N) Σ DW DWᵀ
    right = torch.einsum("moi,moj->ij", dw, dw) / n  # R = (1/N) Σ DWᵀ DW
    values, vectors = torch.linalg.eigh(f)
    top = vectors[:, -rank:]
    return {
        "diagonal": torch.diag(torch.diagonal(f)),
        "ekfac": _diagonal_in(f, torch.kron(_basis(kfac_g), _basis(kfac_a))),
        "tkfac": torch.kron(kfac_g, kfac_a) * torch.trace(f) / (torch.trace(kfac_g) * torch.trace(kfac_a)),
        "shampoo2": _best_multiple(f, torch.kron(left, right)),
        "shampoo": _best_multiple(f, torch.kron(_psd_sqrt(left), _psd_sqrt(right))),
        "eshampoo": _diagonal_in(f, torch.kron(_basis(left), _basis(right))),
        "kfac_reduce": torch.kron(g_hat.T @ g_hat / n, a_bar.T @ a_bar / n),
        "lowrank": top @ torch.diag(values[-rank:].clamp(min=0)) @ top.T,
    }


def _relative(got: Tensor, want: Tensor) -> float:
    return float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))


def test_every_zoo_method_is_registered_and_the_default_is_unchanged() -> None:
    assert set(ZOO) <= set(METHODS)
    assert fl.PAPER_METHODS == ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
    assert fl.ProbeConfig().methods == fl.PAPER_METHODS
    assert METHODS["kfac"].long_name == "KFAC (expand)"
    assert not METHODS["diagonal"].span_invariant  # diag of the restricted block lifted is not diag(F)
    assert METHODS["ekfac"].reuses == ("kfac",) and METHODS["tkfac"].reuses == ("kfac",)
    assert METHODS["eshampoo"].reuses == ("shampoo2",) and METHODS["shampoo"].reuses == ("shampoo2",)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_methods_match_their_dense_twins(case: dict, device: torch.device) -> None:
    """Every operator equals its twin (≤ 1e-10 relative) and meets the operator contract against it."""
    block = ExactBlock(make_factors(case, device))
    built = approximate_all(block, ZOO, CONFIG)
    for name, dense in twins(block).items():
        operator = built[name].operator
        assert _relative(operator.as_dense(), dense) <= EXACT64["rtol"], name
        check_block_operator(operator, dense, **SOLVE64)  # solve: scaled by the condition number


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_errors_of_every_method_match_dense(case: dict) -> None:
    """Through ``evaluate_block`` (sample span where the method is span invariant, lifted): both errors of the
    dense twin, and error 2 from closed-form eigenvalues (no eigensolver: a bound of rounding only)."""
    block = ExactBlock(make_factors(case))
    ev = fl.evaluate_block(block, ZOO, CONFIG)
    dense = block.as_dense()
    for name, f_hat in twins(block).items():
        want1 = float(dense_frobenius_error(dense, f_hat))
        want2 = float(dense_spectral_error(dense, f_hat))
        assert ev.values["frobenius_error"][name] == pytest.approx(want1, **as_approx(SOLVE64)), name
        assert ev.values["spectral_error"][name] == pytest.approx(want2, **as_approx(SOLVE64)), name
        assert 0 < ev.values["spectral_error_bound"][name] <= 1e-12, name
        assert _relative(ev.approximations[name].operator.as_dense(), f_hat) <= EXACT64["rtol"], name


def _random_cases(count: int) -> list[dict]:
    gen = rng(18)
    cases = []
    for seed in range(count):
        n, v, t, d_in, d_out = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in RANDOM_RANGES)
        cases.append({"id": f"random-{seed}", "n": n, "v": v, "t": t, "d_in": d_in, "d_out": d_out, "seed": 100 + seed})
    return cases


RANDOM_RANGES = ((1, 12), (1, 4), (1, 5), (2, 8), (2, 7))
ORDER_CASES = [*FACTOR_CASES, *_random_cases(12)]
LINEAR_CASES = [c for c in FACTOR_CASES if c["t"] == 1]


@pytest.mark.parametrize("case", ORDER_CASES, ids=ids(ORDER_CASES))
def test_eigenbasis_diagonal_never_loses_to_its_kronecker_product(case: dict) -> None:
    """EKFAC ≤ KFAC and eshampoo ≤ shampoo, shampoo2 in error 1: each is the best diagonal in a basis that
    diagonalises the Kronecker product; lowrank's error 1 is its error 2 (Eckart–Young)."""
    ev = fl.evaluate_block(ExactBlock(make_factors(case)), ["kfac", *ZOO], CONFIG, metrics=["frobenius_error"])
    err = ev.values["frobenius_error"]

    def no_worse(first: str, second: str) -> bool:  # + FLOOR: both exact (N = 1) differ in rounding only
        return err[first] <= err[second] * SLACK + FLOOR

    assert no_worse("ekfac", "kfac") and no_worse("eshampoo", "shampoo") and no_worse("eshampoo", "shampoo2"), err
    full = fl.evaluate_block(ExactBlock(make_factors(case)), ["lowrank"], CONFIG).values
    assert full["frobenius_error"]["lowrank"] == pytest.approx(full["spectral_error"]["lowrank"], **EQUAL_ERRORS)


@pytest.mark.parametrize(
    "case", [c for c in FACTOR_CASES if c["t"] == 1], ids=ids([c for c in FACTOR_CASES if c["t"] == 1])
)
def test_kfac_reduce_is_kfac_without_weight_sharing(case: dict) -> None:
    built = approximate_all(ExactBlock(make_factors(case)), ["kfac", "kfac_reduce"])
    want = built["kfac"].operator.as_dense()
    assert _relative(built["kfac_reduce"].operator.as_dense(), want) <= 1e-14


class _Shared(nn.Module):
    """One Linear layer applied at every position of ``x [N, T, d_in]``; outputs averaged over the positions
    (``reduce``) or kept per position (``expand``) before the MSE loss."""

    def __init__(self, reduce: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.reduce = reduce

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        return z.mean(1) if self.reduce else z.flatten(1)


@pytest.mark.parametrize("setting", ["reduce", "expand"])
def test_kfac_reduce_and_expand_are_exact_where_the_theory_says(setting: str) -> None:
    """Exact Fisher of a linear layer shared over T = 5 positions (Eschenhagen et al. 2023): outputs averaged
    before an MSE loss, KFAC-reduce is exact (error 1 at the float64 floor) and KFAC-expand is not; an MSE
    loss per position, the other way round."""
    torch.manual_seed(0)
    model = _Shared(setting == "reduce").double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = model(x).detach() + torch.randn(6, 3 if setting == "reduce" else 15, dtype=torch.float64)
    snap = fl.Probe(model, "mse", fisher="exact")(x, y)
    (block,) = snap.blocks().values()
    assert block.factors.n_positions == 5
    err = fl.evaluate_block(block, ["kfac", "kfac_reduce"]).values["frobenius_error"]
    exact, other = ("kfac_reduce", "kfac") if setting == "reduce" else ("kfac", "kfac_reduce")
    assert err[exact] <= 10 * FLOOR and err[other] > 1e-2, err


def test_lowrank_rank_setting() -> None:
    """``k`` is a setting; a block of smaller rank gives only its nonzero eigenpairs (exact)."""
    block = ExactBlock(make_factors(FACTOR_CASES[0]))  # rank N V = 7
    assert approximate_all(block, ["lowrank"], ApproxConfig(lowrank_rank=2))["lowrank"].operator.rank == 2
    built = approximate_all(block, ["lowrank"])  # default k = 10
    assert ApproxConfig().lowrank_rank == 10 and built["lowrank"].operator.rank == 7
    assert _relative(built["lowrank"].operator.as_dense(), block.as_dense()) <= EXACT64["rtol"]
    with pytest.raises(fl.FisherlabError, match="--lowrank-rank must be at least 1"):
        ApproxConfig(lowrank_rank=0)


def test_zoo_on_a_zero_block_is_zero() -> None:
    """A dead layer: every method returns the zero operator, no NaN."""
    factors = make_factors(FACTOR_CASES[3])
    block = ExactBlock(fl.LayerFactors(factors.a, torch.zeros_like(factors.g)))
    for name, approx in approximate_all(block, ZOO).items():
        dense = approx.operator.as_dense()
        assert torch.isfinite(dense).all() and float(dense.abs().max()) == 0, name


#: The methods whose builder knows ``<F, F̂>`` without a pass over the samples (remember_inner).
REMEMBERED = ("diagonal", "ekfac", "eshampoo", "lowrank", "shampoo2", "shampoo")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_remembered_inner_products_match_dense(case: dict) -> None:
    """``<F, F̂>`` in closed form (``||s||²`` for the diagonal of ``F`` in a basis, ``||λ||²`` for eigenpairs of
    ``F``, ``c²`` for Shampoo's scale) equals the dense ``<F, F̂>`` of the twin and the generic matrix-free
    route (the same block built again, which the remembered value is not for), ≤ 1e-10 relative."""
    block = ExactBlock(make_factors(case))
    built = approximate_all(block, REMEMBERED, CONFIG, restrict=False)
    dense = block.as_dense()
    for name, f_hat in twins(block).items():
        if name not in REMEMBERED:
            continue
        operator = built[name].operator
        known = remembered_inner(operator, block)
        assert known is not None, name
        want = float(torch.sum(dense * f_hat))
        assert float(known) == pytest.approx(want, **as_approx(EXACT64)), name
        assert float(inner_with_block(block, operator)) == float(known), name  # error 1 takes it
        generic = float(inner_with_block(ExactBlock(block.factors), operator))
        assert generic == pytest.approx(want, **as_approx(EXACT64)), name


def test_error_2_of_explicit_eigenvalues_runs_no_eigensolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Error 2 of the diagonal, eigenbasis-diagonal, low-rank and Shampoo operators, and of KFAC, TKFAC and
    Shampoo² once EKFAC's and SOAP's bases were built, needs no eigensolver (one would fail here), and
    the eigendecompositions of the factors are computed once: G, A, L and R (4 ``eigh``, not 6)."""
    from fisherlab.metrics import BlockReference, spectral_error_bounded

    block = ExactBlock(make_factors(FACTOR_CASES[3]))
    calls: list[int] = []
    eigh = torch.linalg.eigh

    def counting(m: Tensor, *args: object, **kwargs: object) -> object:
        calls.append(m.shape[0])
        return eigh(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    names = ["kfac", "tkfac", "shampoo2", "shampoo", "ekfac", "eshampoo", "diagonal"]
    built = approximate_all(block, names, CONFIG, restrict=False)
    assert sorted(calls) == sorted([block.d_out, block.d_in] * 2), calls
    ref = BlockReference.of(block)
    _ = ref.eigenvalues  # F's own (the Gram matrix's), shared by every method
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    dense = block.as_dense()
    want = {n: float(dense_spectral_error(dense, built[n].operator.as_dense())) for n in names}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an eigensolver ran")

    for solver in ("eigh", "eigvalsh", "eig", "eigvals", "svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, solver, refuse)
    for name in names:
        res = spectral_error_bounded(ref, built[name].operator)
        assert res.value == pytest.approx(want[name], **as_approx(SOLVE64)), name


def test_approximations_pickle_without_their_caches() -> None:
    """The caches (remembered ``<F, F̂>`` with a weak reference to the block, factor eigendecompositions) are
    not pickled: an approximation sent to another process is the same operator, computing them again."""
    import pickle

    block = ExactBlock(make_factors(FACTOR_CASES[3]))
    for name, approx in approximate_all(block, ZOO, CONFIG, restrict=False).items():
        assert approx.operator.cache or name == "kfac_reduce", name  # the one that remembers nothing
        loaded = pickle.loads(pickle.dumps(approx.operator))
        assert loaded.cache == {} and torch.equal(loaded.as_dense(), approx.operator.as_dense()), name
