"""Error 1 and error 2 computed from factors equal their dense twins (float64) for every method,
both spectrum conventions, on MLP and conv cases; a hand-made example checks the formulas."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch

from fisherlab import metrics
from fisherlab._errors import UndefinedMetricWarning
from fisherlab.approximations import ApproxConfig, Method, approximate_all, warm_starts
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, SpectralLimits, Spectrum, evaluate_block, frobenius_error, spectral_error
from tests.cases import FACTOR_CASES, ids, make_factors
from tests.tolerances import EXACT64

#: Error-2 limits that never diagonalise a multi-term F̂ densely (side 10 and below): block Lanczos.
NO_DENSE = SpectralLimits(dense_max_side=10)


@pytest.mark.parametrize("case", FACTOR_CASES, ids=ids(FACTOR_CASES))
@pytest.mark.parametrize("spectrum", list(Spectrum))
def test_errors_match_dense(case: dict, spectrum: Spectrum, device: torch.device) -> None:
    """frobenius_error and spectral_error equal the dense formulas for all five methods (on each device)."""
    block = ExactBlock(make_factors(case, device))
    ref = BlockReference.of(block)
    dense = block.as_dense()
    for method, approx in approximate_all(block, list(Method), ApproxConfig(tol=1e-8)).items():
        f_hat = approx.kron.as_dense()
        torch.testing.assert_close(
            frobenius_error(ref, approx.kron),
            dense_frobenius_error(dense, f_hat),
            rtol=1e-8,
            atol=1e-10,
            msg=method,
        )
        torch.testing.assert_close(
            spectral_error(ref, approx.kron, spectrum=spectrum),
            dense_spectral_error(dense, f_hat, spectrum),
            rtol=1e-8,
            atol=1e-10,
            msg=method,
        )


def test_spectrum_conventions_differ_for_indefinite_approximation() -> None:
    """Eigenvalue and singular-value error 2 differ when F̂ has negative eigenvalues, and agree when PSD."""
    f = LayerFactors(torch.eye(2, dtype=torch.float64)[:, None, :], torch.ones(2, 1, 1, 1, dtype=torch.float64))
    ref = BlockReference.of(ExactBlock(f))  # F = diag(0.5, 0.5)
    indefinite = KronSum(
        (torch.ones(1, 1, dtype=torch.float64),), (torch.diag(torch.tensor([0.5, -0.5], dtype=torch.float64)),)
    )
    ev = float(spectral_error(ref, indefinite, spectrum=Spectrum.EIGENVALUES))
    sv = float(spectral_error(ref, indefinite, spectrum=Spectrum.SINGULAR_VALUES))
    assert ev == pytest.approx(2**0.5)  # spectra (0.5, 0.5) vs (0.5, -0.5): ||(0, 1)|| / ||(0.5, 0.5)||
    assert sv == pytest.approx(0.0, abs=1e-12)  # |eigenvalues| (0.5, 0.5) match exactly
    assert float(frobenius_error(ref, indefinite)) == pytest.approx(2**0.5)  # ||diag(0, 1)|| / ||diag(.5, .5)||


def test_error_2_counts_the_zeros_of_a_restricted_block() -> None:
    """On a restricted block (``zeros`` eigenvalues 0 besides it) an indefinite F̂ with spectrum (0.5, -0.5)
    is (0.5, 0, -0.5) in the whole space: error 2 compares (0.5, 0.5) with (0.5, 0), for one and two terms."""
    f = LayerFactors(torch.eye(2, dtype=torch.float64)[:, None, :], torch.ones(2, 1, 1, 1, dtype=torch.float64))
    one = torch.ones(1, 1, dtype=torch.float64)
    rank1 = KronSum((one,), (torch.diag(torch.tensor([0.5, -0.5], dtype=torch.float64)),))
    rank2 = KronSum((one, one), tuple(torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ([0.5, 0], [0, -0.5])))
    for zeros, expected in ((0, 2**0.5), (1, 1.0)):
        ref = BlockReference.of(ExactBlock(f), zeros=zeros)  # F = diag(0.5, 0.5)
        for kron in (rank1, rank2):
            assert float(spectral_error(ref, kron, spectrum=Spectrum.EIGENVALUES)) == pytest.approx(expected)


def _rank2_case(seed: int = 0, batch: int = 40) -> tuple[BlockReference, KronSum, torch.Tensor]:
    """A Linear block (D = 12 x 31, N V = batch) and its deflation; the dense error 2 as reference."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, 1, 31, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.1, 31, dtype=torch.float64)
    block = ExactBlock(LayerFactors(a, torch.randn(batch, 1, 1, 12, generator=gen, dtype=torch.float64)))
    kron = approximate_all(block, [Method.DEFLATION], ApproxConfig(tol=1e-10, max_iter=5000))[Method.DEFLATION].kron
    return BlockReference.of(block), kron, dense_spectral_error(block.as_dense(), kron.as_dense())


@pytest.mark.parametrize("batch", [40, 6])
@pytest.mark.parametrize("spectrum", list(Spectrum))
def test_iterative_error_2_matches_dense(spectrum: Spectrum, batch: int) -> None:
    """Beyond the dense limit, the largest eigenvalues by block Lanczos give error 2 to 1e-8."""
    from fisherlab.metrics import spectral_error_bounded

    ref, kron, _ = _rank2_case(batch=batch)  # 6 samples: factors of rank 6 < 12 outputs, restricted to their ranges
    dense = dense_spectral_error(ref.block.as_dense(), kron.as_dense(), spectrum)
    assert (kron.on_ranges().d_out < kron.d_out) == (batch == 6)
    res = spectral_error_bounded(ref, kron, spectrum=spectrum, limits=NO_DENSE)
    assert res.value == pytest.approx(float(dense), rel=1e-8) and res.bound <= 1e-8 * res.value and not res.note


@pytest.mark.parametrize("batch", [40, 6])
def test_error_2_cuts_the_factors_ranges_only_where_they_cannot_span_a_side(
    monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """40 samples: the factors of 40 products span both sides (12 and 31), the range SVD is skipped; 6 samples
    of a block not restricted to its sample span first (as on a sharded batch): it cuts the sides to 6.
    Error 2 is the dense one either way."""
    from fisherlab.metrics import error2, spectral_error_bounded

    ref, kron, _ = _rank2_case(batch=batch)
    dense = dense_spectral_error(ref.block.as_dense(), kron.as_dense(), Spectrum.EIGENVALUES)
    calls: list[int] = []
    on_ranges = KronSum.on_ranges

    def counting(self: KronSum) -> KronSum:
        calls.append(self.d_out)
        return on_ranges(self)

    monkeypatch.setattr(KronSum, "on_ranges", counting)
    monkeypatch.setattr(error2, "on_sample_span", lambda block, approx: approx)
    res = spectral_error_bounded(ref, kron, limits=NO_DENSE)
    assert calls == ([] if batch == 40 else [12])
    assert res.value == pytest.approx(float(dense), rel=1e-8) and not res.note


def test_error_2_cuts_rank_deficient_factors_where_the_approximation_is_diagonalised_densely(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """40 samples could span both sides, but 10 of the 31 inputs repeat others (the in-factors have rank 21):
    where F̂ is small enough to diagonalise densely the range SVD is cheap next to it and cuts the side;
    error 2 is the dense one."""
    from fisherlab.metrics import error2, spectral_error_bounded

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 1, 21, generator=gen, dtype=torch.float64)
    a = torch.cat([a, a[..., :10]], dim=-1)  # 31 inputs of rank 21
    block = ExactBlock(LayerFactors(a, torch.randn(40, 1, 1, 12, generator=gen, dtype=torch.float64)))
    kron = approximate_all(block, [Method.DEFLATION], ApproxConfig(tol=1e-10, max_iter=5000))[Method.DEFLATION].kron
    ref = BlockReference.of(block)
    dense = dense_spectral_error(block.as_dense(), kron.as_dense(), Spectrum.EIGENVALUES)
    sides: list[int] = []
    on_ranges = KronSum.on_ranges

    def counting(self: KronSum) -> KronSum:
        cut = on_ranges(self)
        sides.append(cut.d_in)
        return cut

    monkeypatch.setattr(KronSum, "on_ranges", counting)
    monkeypatch.setattr(error2, "on_sample_span", lambda block, approx: approx)
    res = spectral_error_bounded(ref, kron, limits=SpectralLimits())
    assert sides == [21]
    assert res.value == pytest.approx(float(dense), rel=1e-8) and not res.note


def test_iterative_error_2_of_an_indefinite_approximation_waits_for_the_positive_eigenvalues() -> None:
    """F̂ with large negative eigenvalues: the r largest-magnitude ones converge first, but error 2 (eigenvalue
    convention) needs the r algebraically largest; the iterative value still equals the dense one."""
    from fisherlab.metrics import spectral_error_bounded

    gen = torch.Generator().manual_seed(7)
    block = ExactBlock(
        LayerFactors(
            torch.randn(4, 1, 31, generator=gen, dtype=torch.float64),
            torch.randn(4, 1, 1, 12, generator=gen, dtype=torch.float64),
        )
    )
    ref = BlockReference.of(block)  # r = 4

    def spd(d: int) -> torch.Tensor:
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        return m @ m.T / d

    kron = KronSum((spd(12), -3 * spd(12)), (spd(31), spd(31)))  # the largest in magnitude are negative
    dense = dense_spectral_error(block.as_dense(), kron.as_dense(), Spectrum.EIGENVALUES)
    res = spectral_error_bounded(ref, kron, spectrum=Spectrum.EIGENVALUES, limits=NO_DENSE)
    assert res.value == pytest.approx(float(dense), rel=1e-8) and res.bound <= 1e-8 * res.value and not res.note


@pytest.mark.parametrize("spectrum", list(Spectrum))
def test_error_2_under_a_memory_limit_is_bounded_and_the_bound_holds(spectrum: Spectrum) -> None:
    """With room for a basis of 24 to 40 vectors (thick restarts keep 8 to 24 Ritz vectors, fewer than
    the 40 eigenvalues error 2 needs): the interval [value - bound, value + bound] holds the dense error 2;
    with room for no basis: NaN, an infinite bound and the reason."""
    from fisherlab.metrics import spectral_error_bounded
    from fisherlab.metrics.error2 import _SOLVER_COPIES

    ref, kron, _ = _rank2_case(1)
    dense = dense_spectral_error(ref.block.as_dense(), kron.as_dense(), spectrum)
    width = 8  # the block size for r = 40
    for basis in (24, 32, 40):
        limit = (basis + _SOLVER_COPIES * width) * kron.dim * 8
        res = spectral_error_bounded(ref, kron, spectrum=spectrum, limits=replace(NO_DENSE, memory=limit))
        assert 0 < res.eigenvalues <= basis - 2 * width and res.bound > 0 and "fit in" in res.note
        assert res.value - res.bound <= float(dense) <= res.value + res.bound
    none = spectral_error_bounded(ref, kron, limits=replace(NO_DENSE, memory=(2 + _SOLVER_COPIES) * kron.dim * 8))
    assert math.isnan(none.value) and none.bound == math.inf and "needs" in none.note


def test_bounded_error_2_is_stored_with_its_bound_and_one_warning() -> None:
    from fisherlab.metrics import evaluate_block

    ref, _, _ = _rank2_case(2)
    limits = replace(NO_DENSE, memory=8 * ref.block.dim * 8)
    with pytest.warns(UndefinedMetricWarning, match="error 2 of layer 'x'") as record:
        ev = evaluate_block(
            ref.block,
            [Method.KFAC, Method.DEFLATION],
            ApproxConfig(tol=1e-10, max_iter=5000),
            layer="x",
            limits=limits,
        )
    assert len(record) == 1  # deflation only: KFAC's single Kronecker product is exact
    assert 0 < ev.values["spectral_error_bound"][Method.KFAC] < 1e-12  # rounding only, never 0
    assert ev.values["spectral_error_bound"][Method.DEFLATION] > 0
    skipped = evaluate_block(ref.block, [Method.KFAC], metrics=("frobenius_error",))
    assert math.isnan(skipped.values["spectral_error_bound"][Method.KFAC])  # not computed with its error metric


def test_error_2_past_the_work_limit_is_bounded_and_the_bound_holds() -> None:
    """An eigensolver budget of a few block applications: bounded value, the note names the work limit,
    and the interval holds the dense error 2."""
    from fisherlab.metrics import spectral_error_bounded

    ref, kron, dense = _rank2_case(3)
    per_vector = 2 * 2 * (12**2 * 31 + 12 * 31**2)
    limits = replace(NO_DENSE, work=3 * 40 * per_vector)  # 3 iterations of 40 vectors
    res = spectral_error_bounded(ref, kron, limits=limits)
    assert res.bound > 0 and "work limit" in res.note
    assert res.value - res.bound <= float(dense) <= res.value + res.bound


@pytest.mark.parametrize("spectrum", list(Spectrum))
@pytest.mark.parametrize("conv", [False, True])
def test_errors_on_the_sample_span_match_the_whole_block(spectrum: Spectrum, conv: bool) -> None:
    """A layer wider than its batch (3 samples; conv: 2 positions each): evaluate_block works on the
    restricted block F' (sample_span) and its errors equal the dense ones of the whole block with the lifted
    approximations, which equal the approximations built on the whole block (to the solver tolerance);
    the warm starts it returns are whole-block ones and start the next evaluation."""
    from fisherlab.metrics import evaluate_block

    gen = torch.Generator().manual_seed(5)
    t = 2 if conv else 1
    a = torch.randn(3, t, 13, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 2, t, 20, generator=gen, dtype=torch.float64)
    block = ExactBlock(LayerFactors(a, g))
    span = block.sample_span()
    assert span is not None and span.block.d_in == 3 * t and span.block.d_out == 3 * 2 * t
    config = ApproxConfig(tol=1e-10, max_iter=5000)
    ev = evaluate_block(block, list(Method), config, spectrum=spectrum)
    whole = approximate_all(block, list(Method), config)
    dense = block.as_dense()
    for method, approx in ev.approximations.items():
        f_hat = approx.kron.as_dense()
        assert f_hat.shape == dense.shape
        torch.testing.assert_close(f_hat, whole[method].kron.as_dense(), rtol=1e-6, atol=1e-8, msg=method)
        assert ev.values["frobenius_error"][method] == pytest.approx(
            float(dense_frobenius_error(dense, f_hat)), rel=1e-8, abs=1e-10
        ), method
        assert ev.values["spectral_error"][method] == pytest.approx(
            float(dense_spectral_error(dense, f_hat, spectrum)), rel=1e-8, abs=1e-10
        ), method
        assert all(w.shape == (13, 13) for w in approx.warm_start)
    again = evaluate_block(block, list(Method), config, spectrum=spectrum, warm=warm_starts(ev.approximations))
    for method in Method:
        assert again.values["frobenius_error"][method] == pytest.approx(ev.values["frobenius_error"][method], rel=1e-7)


def test_approximations_of_a_wide_layer_are_lifted_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate_block's errors and warm starts need no lifting (a probe run without two-level keeps the warm
    starts only: lifting a wide layer's factors is d_in² numbers each); the warm starts are those of the
    lifted approximations, and the approximations are lifted on first use."""
    from fisherlab.metrics import evaluate_block
    from fisherlab.sample_span import SampleSpan

    gen = torch.Generator().manual_seed(5)
    block = ExactBlock(
        LayerFactors(
            torch.randn(3, 1, 13, generator=gen, dtype=torch.float64),
            torch.randn(3, 2, 1, 20, generator=gen, dtype=torch.float64),
        )
    )
    lift = SampleSpan.lift

    def refuse(self: SampleSpan, kron: KronSum) -> KronSum:
        raise AssertionError("lifted")

    monkeypatch.setattr(SampleSpan, "lift", refuse)
    ev = evaluate_block(block, ["kfac", "kpsvd", "ekfac"])
    warm = ev.warm_starts
    assert ev.span is not None and set(ev.on_span) == {"kfac", "kpsvd", "ekfac"}
    monkeypatch.setattr(SampleSpan, "lift", lift)
    lifted = warm_starts(ev.approximations)
    assert set(warm) == set(lifted) == {"kfac", "kpsvd", "ekfac"}
    for method, starts in lifted.items():
        assert len(starts) == len(warm[method])
        for got, want in zip(warm[method], starts, strict=True):
            torch.testing.assert_close(got.on(None), want.on(None), rtol=0, atol=0)
    assert ev.approximations["kpsvd"].kron.d_in == 13 and ev.approximations is ev.approximations  # once


def test_the_eigensolver_limits_follow_the_device(device: torch.device) -> None:
    """CPU: the defaults; CUDA: at least as much memory (a share of the free GPU memory), more work."""
    limits, default = SpectralLimits.for_device(device), SpectralLimits()
    memory, work = limits.memory, limits.work
    if device.type == "cpu":
        assert (memory, work) == (default.memory, default.work)
    else:
        assert memory >= default.memory and work == default.gpu_work


def test_a_warm_start_kept_on_its_span_maps_like_the_whole_matrix() -> None:
    """SpanMatrix(U, C) on another span V is Vᵀ (U C Uᵀ) V; on None it is U C Uᵀ."""
    from fisherlab.sample_span import SpanMatrix

    gen = torch.Generator().manual_seed(8)
    u = torch.linalg.qr(torch.randn(11, 4, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(11, 6, generator=gen, dtype=torch.float64)).Q
    core = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    whole = u @ core @ u.T
    w = SpanMatrix(u, core)
    assert w.shape == (11, 11)
    torch.testing.assert_close(w.on(None), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.on(v), v.T @ whole @ v, rtol=1e-12, atol=1e-12)


#: Blocks an approximation represents exactly: ``F = S ⊗ a aᵀ`` (one input vector for every sample and
#: position), on which KFAC (T = 1) and KPSVD (any T) are exact; error 1 must be at the float64 floor.
EXACT_CASES = [
    {"id": "kfac-linear", "n": 64, "v": 1, "t": 1, "d_in": 6, "d_out": 5, "method": "kfac"},
    {"id": "kfac-linear-V3", "n": 40, "v": 3, "t": 1, "d_in": 7, "d_out": 25, "method": "kfac"},
    {"id": "kfac-wide", "n": 8, "v": 1, "t": 1, "d_in": 30, "d_out": 20, "method": "kfac"},
    {"id": "kpsvd-conv", "n": 12, "v": 2, "t": 4, "d_in": 5, "d_out": 3, "method": "kpsvd"},
]
FLOAT64_FLOOR = 1e-12  # error 1 of an exact approximation (the expansion's floor was 1.5e-8..3e-8)


def _exact_block(case: dict, spread: float = 0.0) -> ExactBlock:
    gen = torch.Generator().manual_seed(0)
    n, v, t, d_in, d_out = case["n"], case["v"], case["t"], case["d_in"], case["d_out"]
    a = torch.randn(1, 1, d_in, generator=gen, dtype=torch.float64).expand(n, t, d_in).clone()
    a = a + spread * torch.randn(n, t, d_in, generator=gen, dtype=torch.float64)
    a[..., -1] = 1.0
    return ExactBlock(LayerFactors(a, torch.randn(n, v, t, d_out, generator=gen, dtype=torch.float64)))


@pytest.mark.parametrize("case", EXACT_CASES, ids=ids(EXACT_CASES))
def test_error_1_of_an_exact_approximation_is_at_the_float64_floor(case: dict) -> None:
    """Error 1 of an approximation that is exact is at the float64 floor (the expansion
    ||F||² - 2<F, F_hat> + ||F_hat||² cancelled to 1.9e-8), also as stored by evaluate_block."""
    block = _exact_block(case)
    evaluation = evaluate_block(block, [case["method"]], ApproxConfig(tol=1e-12), metrics=("frobenius_error",))
    method = Method(case["method"])
    approx = evaluation.approximations[method].kron
    assert float(dense_frobenius_error(block.as_dense(), approx.as_dense())) <= FLOAT64_FLOOR
    assert evaluation.values["frobenius_error"][method] <= FLOAT64_FLOOR
    assert evaluation.values["frobenius_error_resolution"][method] == 0.0
    assert float(frobenius_error(BlockReference.of(block), approx)) <= FLOAT64_FLOOR


@pytest.mark.parametrize("spread", [1e-6, 1e-4])
def test_small_error_1_matches_dense(spread: float) -> None:
    """Error 1 of a nearly exact KFAC equals the dense value to float64 accuracy (the expansion was off by 2e-3)."""
    block = _exact_block(EXACT_CASES[1], spread)
    kron = approximate_all(block, [Method.KFAC])[Method.KFAC].kron
    want = dense_frobenius_error(block.as_dense(), kron.as_dense())
    torch.testing.assert_close(frobenius_error(BlockReference.of(block), kron), want, **EXACT64)


def test_error_1_beyond_the_work_limit_keeps_the_expansion_with_its_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the non-cancelling route would cost too much, the expansion's value is stored with a resolution
    that covers its error."""
    monkeypatch.setattr(metrics.error1, "FROBENIUS_WORK_LIMIT", 0)
    for spread in (0.0, 1e-6):
        block = _exact_block(EXACT_CASES[0], spread)
        kron = approximate_all(block, [Method.KFAC])[Method.KFAC].kron
        res = metrics.frobenius_error_resolved(BlockReference.of(block), kron)
        want = float(dense_frobenius_error(block.as_dense(), kron.as_dense()))
        assert res.resolution > 0 and abs(res.value - want) <= res.resolution


#: Factors scaled by powers of two (so the scaled factors are exact): float64 overflowed ||F||² from
#: about 2^128 per side (NaN errors), lost digits in subnormals at 2^-270 and called a block of 2^-530
#: zero; float32 moments (``--accumulate mixed``) overflowed at 2^100.
SCALE_CASES = [
    {"id": "f64-a-2^128-g-2^128", "a": 128, "g": 128, "mixed": False},
    {"id": "f64-a-2^300", "a": 300, "g": 0, "mixed": False},
    {"id": "f64-g-2^-140", "a": 0, "g": -140, "mixed": False},
    {"id": "f64-a-2^-270", "a": -270, "g": 0, "mixed": False},
    {"id": "f64-a-2^-530", "a": -530, "g": 0, "mixed": False},
    {"id": "mixed-a-2^100", "a": 100, "g": 0, "mixed": True},
    {"id": "mixed-g-2^-100", "a": 0, "g": -100, "mixed": True},
]
SCALED_METHODS = ["kfac", "kpsvd", "deflation"]


def _scaled_evaluation(case: dict, a_exp: int, g_exp: int) -> metrics.BlockEvaluation:
    f = make_factors(FACTOR_CASES[1])
    a, g = f.a * 2.0**a_exp, f.g * 2.0**g_exp
    if case["mixed"]:
        f = LayerFactors(a.float(), g.float(), compute_dtype=torch.float64, moment_dtype=torch.float32)
    else:
        f = LayerFactors(a, g)
    return evaluate_block(ExactBlock(f), SCALED_METHODS, ApproxConfig(tol=1e-10))


@pytest.mark.parametrize("case", SCALE_CASES, ids=ids(SCALE_CASES))
def test_errors_do_not_depend_on_the_scale_of_the_factors(case: dict) -> None:
    """Both errors equal those of the unscaled block, with no warning; ||F||_F and the approximations
    carry the scale (the factors are normalised internally by powers of two, which is exact)."""
    reference = _scaled_evaluation(case, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = _scaled_evaluation(case, case["a"], case["g"])
    for name in ("frobenius_error", "spectral_error"):
        assert scaled.values[name] == reference.values[name], name
    scale = 2.0 ** (2 * (case["a"] + case["g"]))
    assert scaled.layer_values["fisher_frobenius_norm"] == reference.layer_values["fisher_frobenius_norm"] * scale
    kfac_ref, kfac_scaled = (e.approximations[Method.KFAC].kron for e in (reference, scaled))
    assert torch.equal(kfac_scaled.outs[0], kfac_ref.outs[0] * 2.0 ** (2 * case["g"]))
    assert torch.equal(kfac_scaled.ins[0], kfac_ref.ins[0] * 2.0 ** (2 * case["a"]))


def test_a_fisher_norm_beyond_float64_is_inf_with_a_warning() -> None:
    """||F||_F of 2^1600 times that of the unscaled block is stored as inf with a warning; the errors are exact."""
    case = {"mixed": False}
    reference = _scaled_evaluation(case, 0, 0)
    with pytest.warns(UndefinedMetricWarning, match="beyond float64"):
        scaled = _scaled_evaluation(case, 400, 400)
    assert scaled.layer_values["fisher_frobenius_norm"] == math.inf
    assert scaled.values["frobenius_error"] == reference.values["frobenius_error"]


def _kronecker_block(terms: int, seed: int = 11) -> ExactBlock:
    """A Linear block (D = 5 x 7, N = 40) that is exactly a sum of ``terms`` Kronecker products: every sample's
    output derivative is ±g_k for one of ``terms`` directions, so ``F = Σ_k g_k g_kᵀ ⊗ A_k``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 1, 7, generator=gen, dtype=torch.float64)
    directions = torch.randn(terms, 5, generator=gen, dtype=torch.float64)
    signs = torch.sign(torch.randn(40, generator=gen, dtype=torch.float64))
    g = signs[:, None] * directions[torch.arange(40) % terms]
    return ExactBlock(LayerFactors(a, g[:, None, None, :]))


KRONECKER_EXACT_CASES = [  # (Kronecker rank of the block, methods exact on it, route of error 2)
    (1, [Method.KFAC, Method.KPSVD], "factors"),
    (2, [Method.DEFLATION, Method.LANCZOS], "dense"),
    (2, [Method.DEFLATION, Method.LANCZOS], "lanczos"),
]


@pytest.mark.parametrize(
    ("terms", "methods", "route"), KRONECKER_EXACT_CASES, ids=[f"{c[0]}-{c[2]}" for c in KRONECKER_EXACT_CASES]
)
def test_error_2_of_an_exact_approximation_is_at_the_rounding_floor_or_bounded(
    terms: int, methods: list[Method], route: str
) -> None:
    """KFAC/KPSVD on a block that is one Kronecker product, deflation/Lanczos on one of Kronecker rank 2: the
    dense error 2 is ~1e-16; the stored one is too where every eigenvalue of F̂ is known (factors, dense), and
    its bound covers it and is never 0 (it was 3e-8 ± 0: ||F̂||² - Σ μ_i² cancelled). Through Lanczos, where
    only the leading eigenvalues are known, the bound covers what that cancellation leaves."""
    from fisherlab.metrics import spectral_error_bounded

    block = _kronecker_block(terms)
    ref = BlockReference.of(block)
    limits = NO_DENSE if route == "lanczos" else None
    for method, approx in approximate_all(block, methods, ApproxConfig(tol=1e-12, max_iter=5000)).items():
        dense = float(dense_spectral_error(block.as_dense(), approx.kron.as_dense()))
        res = spectral_error_bounded(ref, approx.kron, limits=limits)
        assert dense < 1e-14, method
        assert 0 < res.bound and abs(res.value - dense) <= res.bound, (method, res, dense)
        if route != "lanczos":
            assert res.value < 1e-14 and res.bound < 1e-13, (method, res)


@pytest.mark.parametrize("case", FACTOR_CASES, ids=ids(FACTOR_CASES))
@pytest.mark.parametrize("route", ["dense", "lanczos"])
def test_stored_error_2_is_within_its_bound_of_the_dense_value(case: dict, route: str) -> None:
    """Every method, both spectra, dense and Lanczos routes: |stored - dense| <= bound, bound > 0 (it was 0
    with the value off by the rounding of the formula and the eigensolver's residuals)."""
    from fisherlab.metrics import spectral_error_bounded

    limits = NO_DENSE if route == "lanczos" else None
    block = ExactBlock(make_factors(case))
    ref = BlockReference.of(block)
    for method, approx in approximate_all(block, list(Method), ApproxConfig(tol=1e-8)).items():
        f_hat = approx.kron.as_dense()
        for spectrum in Spectrum:
            dense = float(dense_spectral_error(block.as_dense(), f_hat, spectrum))
            res = spectral_error_bounded(ref, approx.kron, spectrum=spectrum, limits=limits)
            assert 0 < res.bound <= 1e-8 * max(res.value, 1e-6), (method, spectrum, res)
            assert abs(res.value - dense) <= res.bound + 1e-17, (method, spectrum, res, dense)


@pytest.mark.parametrize(("batch", "route"), [(80, "dense"), (20, "lanczos")])
def test_error_2_diagonalises_densely_when_that_is_cheaper_than_lanczos(
    monkeypatch: pytest.MonkeyPatch, batch: int, route: str
) -> None:
    """Above the dense side (patched to 10), r = 80 of a 372-sided F̂ (4 r < D, so it went to Lanczos, which
    needs ~2.5 r vectors, r² D reorthogonalisation and r³ checks: 5x slower on MNIST layer 5 at init) is
    diagonalised densely; r = 20 still iterates. Both equal the dense value."""
    from fisherlab.metrics import error2, spectral_error_bounded

    ref, kron, _ = _rank2_case(batch=batch)
    routes: list[str] = []
    lanczos = error2.block_lanczos_eigenvalues

    def recording(*args: object, **kwargs: object) -> object:
        routes.append("lanczos")
        return lanczos(*args, **kwargs)

    monkeypatch.setattr(error2, "block_lanczos_eigenvalues", recording)
    res = spectral_error_bounded(ref, kron, limits=SpectralLimits(dense_side=10))
    assert routes == ([] if route == "dense" else ["lanczos"])
    dense = float(dense_spectral_error(ref.block.as_dense(), kron.as_dense()))
    assert abs(res.value - dense) <= res.bound + 1e-17 and res.bound <= 1e-8 * res.value


@pytest.mark.parametrize(
    ("fixed", "load", "expected"),
    [(None, 0.3, "torch"), (None, 40.0, 1), (1, 0.3, 1)],
    ids=["idle", "loaded", "fixed"],
)
def test_error_2_runs_its_eigensolver_with_threads_that_fit_the_machine(
    monkeypatch: pytest.MonkeyPatch, fixed: int | None, load: float, expected: object
) -> None:
    """On a machine whose load average leaves no free core, error 2's eigensolver runs with one thread
    (two threads on a loaded 2-core machine took 81 s for a 1.5 s call); idle, torch's number;
    SpectralLimits.threads fixes it; torch's setting is restored afterwards."""
    from fisherlab import krylov
    from fisherlab.metrics import error2, spectral_error_bounded, spectral_threads

    ref, kron, _ = _rank2_case(batch=6)  # on one thread: on a loaded machine two spin for seconds of CPU
    outside = torch.get_num_threads()
    torch.set_num_threads(2)
    before = 2
    monkeypatch.setattr(krylov.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(krylov.os, "sched_getaffinity", lambda pid: set(range(2)))
    limits = replace(NO_DENSE, threads=fixed)
    want = before if expected == "torch" else expected
    assert spectral_threads(torch.device("cpu"), fixed) == want and spectral_threads(torch.device("meta")) is None
    seen: list[int] = []
    lanczos = error2.block_lanczos_eigenvalues

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return lanczos(*args, **kwargs)

    monkeypatch.setattr(error2, "block_lanczos_eigenvalues", recording)
    try:
        spectral_error_bounded(ref, kron, limits=limits)
        assert seen == [want] and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(outside)
