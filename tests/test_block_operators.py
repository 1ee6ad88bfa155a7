"""Operators that are not Kronecker sums, the generic matrix-free metrics on them, and the method
registry (``fl.register_method``) — each against dense twins (float64)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

import fisherlab as fl
from fisherlab.block_operators import (
    DenseBlockOperator,
    DiagonalBlockOperator,
    EigenbasisDiagonal,
    LiftedOperator,
    LowRankOperator,
)
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.method_registry import METHODS, register_method, resolve_methods, unregister_method
from fisherlab.metrics import BlockReference, SpectralLimits, frobenius_error, spectral_error_bounded
from fisherlab.testing import check_block_operator
from tests.cases import FACTOR_CASES, ids, make_factors, small_mlp
from tests.tolerances import EXACT64


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]


def _operators(d_out: int, d_in: int, device: torch.device) -> dict[str, tuple[object, torch.Tensor]]:
    """Each operator type with the dense matrix it stands for (built independently)."""
    gen = torch.Generator().manual_seed(0)
    side = d_out * d_in
    m = torch.randn(side, side, generator=gen, dtype=torch.float64)
    psd = (m @ m.T / side).to(device)
    s = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64).to(device) + 0.1
    q_out, q_in = _orthogonal(d_out, gen).to(device), _orthogonal(d_in, gen).to(device)
    q = torch.kron(q_out, q_in)
    k_out, k_in = d_out - 1, d_in - 1
    u_out = _orthogonal(d_out, gen)[:, :k_out].to(device)
    u_in = _orthogonal(d_in, gen)[:, :k_in].to(device)
    small = torch.randn(k_out * k_in, k_out * k_in, generator=gen, dtype=torch.float64).to(device)
    small = small @ small.T
    lift = torch.kron(u_out, u_in)
    eye_out = torch.eye(d_out, dtype=torch.float64, device=device)
    kron = fl.KronSum((psd[:d_out, :d_out] + eye_out,), (torch.eye(d_in, dtype=torch.float64, device=device),))
    u = _orthogonal(side, gen)[:, :3].to(device)  # three orthonormal columns
    lam = torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64, device=device)
    return {
        "dense": (DenseBlockOperator(psd, (d_out, d_in)), psd),
        "diagonal": (DiagonalBlockOperator(s), torch.diag(s.flatten())),
        "eigenbasis_diagonal": (EigenbasisDiagonal(q_out, q_in, s), q @ torch.diag(s.flatten()) @ q.T),
        "lifted": (LiftedOperator(DenseBlockOperator(small, (k_out, k_in)), u_out, u_in), lift @ small @ lift.T),
        "kron_sum": (kron, torch.kron(kron.outs[0], kron.ins[0])),
        "lowrank": (LowRankOperator(u.T.reshape(3, d_out, d_in), lam), u @ torch.diag(lam) @ u.T),
    }


@pytest.mark.parametrize("kind", ["dense", "diagonal", "eigenbasis_diagonal", "lifted", "kron_sum", "lowrank"])
def test_every_operator_type_meets_the_contract(kind: str, device: torch.device) -> None:
    operator, dense = _operators(3, 4, device)[kind]
    check_block_operator(operator, dense)


def test_contract_check_catches_a_wrong_operator() -> None:
    """The shipped check can fail: a diagonal operator checked against another matrix."""
    operator, dense = _operators(3, 4, torch.device("cpu"))["diagonal"]
    with pytest.raises(AssertionError, match="matvec"):
        check_block_operator(operator, dense + 1e-6)


@pytest.mark.parametrize("case", FACTOR_CASES, ids=ids(FACTOR_CASES))
@pytest.mark.parametrize("spectrum", ["eigenvalues", "singular_values"])
def test_generic_metrics_match_dense(case: dict, spectrum: str, device: torch.device) -> None:
    """Error 1 through ``(1/N) Σ <DW, F̂ DW>`` and error 2 through closed-form or dense eigenvalues."""
    block = ExactBlock(make_factors(case, device))
    ref = BlockReference.of(block, spectrum=spectrum)
    dense = block.as_dense()
    for kind, (operator, f_hat) in _operators(block.d_out, block.d_in, device).items():
        torch.testing.assert_close(
            frobenius_error(ref, operator), dense_frobenius_error(dense, f_hat), **EXACT64, msg=kind
        )
        res = spectral_error_bounded(ref, operator)
        want = float(dense_spectral_error(dense, f_hat, spectrum))
        assert res.value == pytest.approx(want, rel=1e-9, abs=1e-12) and res.bound <= 1e-9 * want + 1e-12, kind


class _MatvecOnly:
    """An operator with no closed-form eigenvalues: error 2 must come from block Lanczos on ``matvec``."""

    def __init__(self, inner: DenseBlockOperator) -> None:
        self.inner, self.d_out, self.d_in = inner, inner.d_out, inner.d_in

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        return self.inner.matvec(w)

    def frobenius_norm_squared(self) -> torch.Tensor:
        return self.inner.frobenius_norm_squared()

    def as_dense(self) -> torch.Tensor:
        raise AssertionError("the Lanczos route must not densify")


def test_generic_error_2_by_block_lanczos_on_matvec() -> None:
    """Past the memory limit of a dense eigensolve, the operator's matvec feeds block Lanczos."""
    factors = make_factors({"id": "x", "n": 4, "v": 1, "t": 1, "d_in": 15, "d_out": 10, "seed": 5})
    block = ExactBlock(factors)
    ref = BlockReference.of(block)
    f_hat = block.as_dense() + 0.01 * torch.eye(block.dim, dtype=torch.float64)  # F plus a small shift: rank D
    operator = _MatvecOnly(DenseBlockOperator(f_hat, (block.d_out, block.d_in)))
    res = spectral_error_bounded(ref, operator, limits=SpectralLimits(memory=150_000))  # dense D² needs 180 000 bytes
    want = float(dense_spectral_error(block.as_dense(), f_hat))
    assert res.eigenvalues < block.dim  # not all of them: the interval closed early
    assert abs(res.value - want) <= res.bound + 1e-7 * want and res.bound <= max(1e-6 * want, 1e-9)


@pytest.fixture
def user_method() -> Iterator[str]:
    """A researcher's method: the exact diagonal of F, built densely (small layers)."""

    def exact_diagonal(block: ExactBlock, config: fl.ApproxConfig) -> DenseBlockOperator:
        return DenseBlockOperator(torch.diag(torch.diagonal(block.as_dense())))

    register_method("exact_diagonal", exact_diagonal, long_name="diag(F), dense")
    yield "exact_diagonal"
    unregister_method("exact_diagonal")


@pytest.mark.parametrize("case", [FACTOR_CASES[0], FACTOR_CASES[3]], ids=ids([FACTOR_CASES[0], FACTOR_CASES[3]]))
def test_registered_method_is_scored_by_evaluate_block(case: dict, user_method: str) -> None:
    block = ExactBlock(make_factors(case))
    ev = fl.evaluate_block(block, ["kfac", user_method], fl.ApproxConfig(tol=1e-8))
    dense = block.as_dense()
    f_hat = torch.diag(torch.diagonal(dense))
    assert list(ev.approximations) == ["kfac", user_method]
    assert ev.values["frobenius_error"][user_method] == pytest.approx(
        float(dense_frobenius_error(dense, f_hat)), rel=1e-10
    )
    assert ev.values["spectral_error"][user_method] == pytest.approx(
        float(dense_spectral_error(dense, f_hat)), rel=1e-10
    )
    assert ev.values["solver_iterations"][user_method] == 0 and ev.values["converged"][user_method] == 1


def test_registered_method_on_a_layer_wider_than_its_batch(user_method: str) -> None:
    """The papers' methods run on the sample span, a user's method on the whole block: both exact."""
    block = ExactBlock(make_factors({"id": "w", "n": 2, "v": 1, "t": 1, "d_in": 9, "d_out": 6, "seed": 7}))
    assert block.sample_span() is not None
    ev = fl.evaluate_block(block, ["kpsvd", user_method], fl.ApproxConfig(tol=1e-10))
    dense = block.as_dense()
    for name in ("kpsvd", user_method):
        f_hat = ev.approximations[name].operator.as_dense()
        assert ev.values["frobenius_error"][name] == pytest.approx(
            float(dense_frobenius_error(dense, f_hat)), rel=1e-8
        ), name


def test_registered_method_is_stored_by_fisher_probe(user_method: str, tmp_path) -> None:
    model = small_mlp((4, 5, 3))
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    probe = fl.FisherProbe(model, "ce", every=1, methods=["kfac", user_method], out=tmp_path / "p.nc")
    probe.step(0, x, y)
    ds = probe.close()
    assert list(ds["method"].values) == ["kfac", user_method]
    errors = ds["frobenius_error"].sel({"method": user_method}).values
    assert errors.shape == (1, 2) and (errors > 0).all() and (errors < 1).all()
    stored = fl.load(tmp_path / "p.nc")
    assert user_method in list(stored["method"].values)


def test_methods_by_module_reference_and_all() -> None:
    """``package.module:attribute`` imports and registers a builder; ``all`` is every registered name."""
    try:
        assert resolve_methods(["kfac", "tests.test_block_operators:scaled_identity"]) == ("kfac", "scaled_identity")
        assert "scaled_identity" in resolve_methods(["all"])
        block = ExactBlock(make_factors(FACTOR_CASES[0]))
        ev = fl.evaluate_block(block, ["scaled_identity"])
        dense = block.as_dense()
        f_hat = torch.eye(block.dim, dtype=torch.float64) * torch.trace(dense) / block.dim
        assert ev.values["frobenius_error"]["scaled_identity"] == pytest.approx(
            float(dense_frobenius_error(dense, f_hat)), rel=1e-10
        )
    finally:
        unregister_method("scaled_identity")


def scaled_identity(block: ExactBlock, config: fl.ApproxConfig) -> DiagonalBlockOperator:
    """``(tr F / D) I`` as a diagonal operator: a method loaded by ``--methods tests.test_block_operators:...``."""
    f = block.factors
    trace = torch.sum(f.per_sample_gradients() ** 2) / f.n_samples
    return DiagonalBlockOperator(torch.full((block.d_out, block.d_in), float(trace) / block.dim, dtype=torch.float64))


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["nonexistent"], "unknown methods \\['nonexistent'\\]"),
        (["no_such_module_xyz:f"], "cannot import"),
        (["fisherlab:no_such_builder"], "has no attribute"),
        ([3], "named by a string"),
    ],
)
def test_bad_method_names_are_one_clear_error(methods: list, message: str) -> None:
    with pytest.raises(fl.FisherlabError, match=message):
        resolve_methods(methods)


def test_a_builder_returning_a_wrong_operator_is_refused() -> None:
    register_method("wrong_shape", lambda block, config: DiagonalBlockOperator(torch.ones(2, 2, dtype=torch.float64)))
    try:
        with pytest.raises(fl.FisherlabError, match="wrong_shape.*for a"):
            fl.approximate_all(ExactBlock(make_factors(FACTOR_CASES[0])), ["wrong_shape"])
        with pytest.raises(fl.FisherlabError, match="already registered"):
            register_method("wrong_shape", lambda block, config: None)
    finally:
        unregister_method("wrong_shape")
    assert "wrong_shape" not in METHODS and not math.isnan(0.0)
