"""Metrics that match how approximations are used (issue 18): dense twins of the scale-free error, the
damped-solve error and the Laplace KL divergence, their defaults, and cross-kind scoring."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fisherlab as fl
from fisherlab._errors import UndefinedMetricWarning
from fisherlab.config import ProbeConfig
from fisherlab.fisher import ExactBlock
from fisherlab.metrics import (
    BLOCK_METRICS,
    DEFAULT_METRICS,
    ERROR_METRICS,
    BlockReference,
    damped_solve,
    evaluate_block,
    scale_free_error,
)
from fisherlab.probe import Probe
from tests.cases import FACTOR_CASES, ids, make_factors, small_mlp

USAGE = ("scale_free_error", "solve_error", "kl_divergence")
#: MLP and conv cases, and a wide layer at a small batch (restricted to its sample span).
CASES = [
    *(c for c in FACTOR_CASES if c["id"] in ("mlp-N7-V1", "mlp-N9-V3", "conv-N5-V2-T4")),
    {"id": "mlp-wide-N3", "n": 3, "v": 1, "t": 1, "d_in": 9, "d_out": 7, "seed": 5},
]


def _setup(case: dict) -> tuple[ExactBlock, torch.Tensor, float]:
    block = ExactBlock(make_factors(case))
    gen = torch.Generator().manual_seed(case["seed"] + 100)
    gradient = torch.randn(block.d_out, block.d_in, generator=gen, dtype=torch.float64)
    damping = 0.05 * float(torch.trace(block.as_dense())) / block.dim
    return block, gradient, damping


def _dense_kl(f: torch.Tensor, f_hat: torch.Tensor, lam: float) -> float:
    """``KL(N(0, (F + λ)⁻¹) || N(0, (F̂ + λ)⁻¹))`` from its definition."""
    eye = torch.eye(f.shape[0], dtype=f.dtype)
    a, b = f + lam * eye, f_hat + lam * eye
    trace = torch.trace(b @ torch.linalg.inv(a))
    return float(0.5 * (trace - f.shape[0] + torch.logdet(a) - torch.logdet(b)))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_usage_metrics_match_their_dense_twins(case: dict) -> None:
    block, gradient, lam = _setup(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate_block(block, ["all"], metrics=ERROR_METRICS, damping=lam, gradient=gradient, layer="x")
    f = block.as_dense()
    eye = torch.eye(block.dim, dtype=f.dtype)
    exact = torch.linalg.solve(f + lam * eye, gradient.flatten())
    checked = 0
    for method, approximation in ev.approximations.items():
        f_hat = approximation.operator.as_dense().to(f.dtype)
        # scale-free error: min_c ||F - c F_hat|| / ||F||
        c = torch.sum(f * f_hat) / torch.sum(f_hat * f_hat)
        want = float(torch.linalg.matrix_norm(f - c * f_hat) / torch.linalg.matrix_norm(f))
        got = ev.values["scale_free_error"][method]
        assert got == pytest.approx(want, rel=1e-10, abs=1e-14), method
        assert got <= ev.values["frobenius_error"][method] * (1 + 1e-12) + 1e-14, method
        # solve error: ||(F_hat + λ)^-1 ∇ - (F + λ)^-1 ∇|| / ||(F + λ)^-1 ∇||
        x_hat = torch.linalg.solve(f_hat + lam * eye, gradient.flatten())
        want = float(torch.linalg.vector_norm(x_hat - exact) / torch.linalg.vector_norm(exact))
        _, how = damped_solve(approximation.operator, gradient, lam)
        solver = how in ("conjugate gradients", "dense solve")
        got = ev.values["solve_error"][method]
        assert got == pytest.approx(want, rel=1e-7 if solver else 1e-9, abs=1e-12), (method, how)
        # KL divergence of the Laplace posteriors, exact first
        definite = bool(torch.all(torch.linalg.eigvalsh((f_hat + f_hat.T) / 2) + lam > 0))
        got = ev.values["kl_divergence"][method]
        if definite:
            want = _dense_kl(f, f_hat, lam)
            assert got == pytest.approx(want, rel=1e-8, abs=1e-10 * block.dim), method
            assert got >= -1e-10, method
        else:
            assert math.isnan(got), method
        checked += 1
    assert checked >= 10


def test_scale_free_error_of_a_proportional_approximation_is_at_the_float64_floor() -> None:
    block = ExactBlock(make_factors(FACTOR_CASES[0]))
    ref = BlockReference.of(block)
    proportional = fl.DenseBlockOperator(3.7 * block.as_dense()).with_shape(block.d_out, block.d_in)
    assert scale_free_error(ref, proportional) < 1e-14
    kfac = evaluate_block(block, ["kfac"]).approximations["kfac"].operator
    scaled = type(kfac)(tuple(2.5 * o for o in kfac.outs), kfac.ins)
    assert scale_free_error(BlockReference.of(block), scaled) == pytest.approx(
        scale_free_error(BlockReference.of(block), kfac), rel=1e-12
    )


def test_solve_error_and_kl_are_opt_in_and_scale_free_error_always_computed() -> None:
    block, gradient, lam = _setup(FACTOR_CASES[1])
    assert ProbeConfig().metrics == DEFAULT_METRICS == ("frobenius_error", "spectral_error")
    assert ERROR_METRICS == tuple(m.name for m in BLOCK_METRICS if m.error)
    assert set(USAGE) <= set(ERROR_METRICS)
    ev = evaluate_block(block, ["kfac", "ekfac"], damping=lam, gradient=gradient)
    for method in ("kfac", "ekfac"):
        assert math.isfinite(ev.values["scale_free_error"][method])
        assert math.isnan(ev.values["solve_error"][method]) and math.isnan(ev.values["kl_divergence"][method])
    ev = evaluate_block(block, ["kfac"], metrics=("frobenius_error",))
    assert math.isfinite(ev.values["scale_free_error"]["kfac"])
    ProbeConfig(metrics=("frobenius_error", "solve_error", "kl_divergence"))  # selectable


def test_solve_error_without_a_gradient_is_nan_with_a_warning() -> None:
    block, _, lam = _setup(FACTOR_CASES[1])
    with pytest.warns(UndefinedMetricWarning, match="no mini-batch gradient"):
        ev = evaluate_block(block, ["kfac"], metrics=("frobenius_error", "solve_error"), damping=lam)
    assert math.isnan(ev.values["solve_error"]["kfac"])


def test_kl_without_closed_form_eigenvalues_is_nan_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from fisherlab.metrics import usage

    block, gradient, lam = _setup(FACTOR_CASES[1])
    monkeypatch.setattr(usage, "KL_DENSE_SIDE", 4)
    with pytest.warns(UndefinedMetricWarning, match="Kronecker-rank-2"):
        ev = evaluate_block(
            block, ["kfac", "kpsvd", "deflation"], metrics=ERROR_METRICS, damping=lam, gradient=gradient
        )
    assert math.isfinite(ev.values["kl_divergence"]["kfac"])  # one Kronecker product: closed form
    assert math.isnan(ev.values["kl_divergence"]["deflation"])


def test_usage_metrics_do_not_depend_on_the_scale_of_the_factors() -> None:
    case = FACTOR_CASES[1]
    block, gradient, lam = _setup(case)
    f = block.factors
    huge = ExactBlock(fl.LayerFactors(f.a * 2.0**60, f.g * 2.0**50))
    kwargs = {"metrics": ERROR_METRICS, "gradient": gradient}
    small = evaluate_block(block, ["kfac", "ekfac", "diagonal"], damping=lam, **kwargs)
    big = evaluate_block(huge, ["kfac", "ekfac", "diagonal"], damping=lam * 2.0**220, **kwargs)
    for metric in USAGE:
        for method in ("kfac", "ekfac", "diagonal"):
            assert big.values[metric][method] == pytest.approx(small.values[metric][method], rel=1e-9)


# ---------------------------------------------------------------------------------------------- cross-kind


def _batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = small_mlp((4, 6, 3), seed=3)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(11, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    return model, x, y


def test_the_probe_captures_both_kinds_in_one_pass() -> None:
    model, x, y = _batch()
    both = Probe(model, "ce", fisher="mc", approx_fisher="empirical", seed=4)(x, y)
    mc = Probe(model, "ce", fisher="mc", seed=4)(x, y)
    emp = Probe(model, "ce", fisher="empirical", seed=4)(x, y)
    assert both.approx_fisher == fl.FisherKind.EMPIRICAL
    for name in mc.factors:
        torch.testing.assert_close(both.factors[name].g, mc.factors[name].g, rtol=0, atol=0)  # MC draws unchanged
        torch.testing.assert_close(both.approx_factors[name].g, emp.factors[name].g, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(both.approx_factors[name].a, emp.factors[name].a, rtol=0, atol=0)
    same = Probe(model, "ce", fisher="mc", approx_fisher="mc", seed=4)(x, y)
    assert same.approx_factors == {} and same.approx_fisher is None


def test_approx_block_equal_to_the_block_changes_nothing() -> None:
    block, gradient, lam = _setup(FACTOR_CASES[3])
    kwargs = {"metrics": ERROR_METRICS, "damping": lam, "gradient": gradient}
    plain = evaluate_block(block, ["kfac", "kpsvd", "ekfac"], **kwargs)
    same = evaluate_block(block, ["kfac", "kpsvd", "ekfac"], approx_block=block, **kwargs)
    for metric in ("frobenius_error", "spectral_error", *USAGE):
        for method in ("kfac", "kpsvd", "ekfac"):
            a, b = plain.values[metric][method], same.values[metric][method]
            assert a == b or (math.isnan(a) and math.isnan(b)), (metric, method)


def test_kfac_of_the_empirical_fisher_scored_against_the_mc_block_matches_dense() -> None:
    model, x, y = _batch()
    snap = Probe(model, "ce", fisher="mc", approx_fisher="empirical", mc_samples=2, seed=1)(x, y)
    for name in snap.factors:
        mc_block, emp_block = snap.blocks()[name], snap.approx_block(name)
        assert emp_block is not None
        cross = evaluate_block(mc_block, ["kfac"], approx_block=emp_block, layer=name)
        kfac_emp = evaluate_block(emp_block, ["kfac"]).approximations["kfac"].operator.as_dense()
        f_mc = mc_block.as_dense()
        want = float(torch.linalg.matrix_norm(f_mc - kfac_emp) / torch.linalg.matrix_norm(f_mc))
        assert cross.values["frobenius_error"]["kfac"] == pytest.approx(want, rel=1e-10)
        torch.testing.assert_close(cross.approximations["kfac"].operator.as_dense(), kfac_emp)
        own = evaluate_block(mc_block, ["kfac"]).values["frobenius_error"]["kfac"]
        assert own != pytest.approx(want, rel=1e-6)  # a different question, a different number


def test_approx_fisher_is_a_setting_recorded_in_the_attributes() -> None:
    model, x, y = _batch()
    config = ProbeConfig(fisher="mc", approx_fisher="empirical", metrics=("frobenius_error",), methods=("kfac",))
    assert config.approx_kind == fl.FisherKind.EMPIRICAL and ProbeConfig().approx_kind == ProbeConfig().fisher
    probe = fl.FisherProbe(model, "ce", every=1, config=config)
    ds = probe.step(0, x, y)
    assert ds is not None and probe.attrs["approx_fisher"] == "empirical" and probe.attrs["fisher"] == "mc"
    snap = Probe(model, "ce", fisher="mc", approx_fisher="empirical", seed=config.seed + 1)(x, y)  # the same pass
    name = next(iter(snap.factors))
    want = evaluate_block(snap.blocks()[name], ["kfac"], approx_block=snap.approx_block(name))
    assert float(ds["frobenius_error"].sel({"layer": name, "method": "kfac"}).squeeze()) == pytest.approx(
        want.values["frobenius_error"]["kfac"], rel=1e-12
    )
    with pytest.raises(fl.FisherlabError, match="FisherKind"):
        ProbeConfig(approx_fisher="fisherish")


def test_closed_form_inner_products_are_not_used_across_kinds() -> None:
    """The methods whose ``<F, F̂>`` their builder remembers (diagonal of ``F`` in a basis, eigenpairs of ``F``,
    Frobenius-optimal scales) built from the empirical block and scored against the MC block: error 1 of the
    dense twin, not the remembered value (which is ``<F_emp, F̂>``)."""
    model, x, y = _batch()
    snap = Probe(model, "ce", fisher="mc", approx_fisher="empirical", mc_samples=2, seed=1)(x, y)
    methods = ["diagonal", "ekfac", "eshampoo", "lowrank", "shampoo2", "shampoo"]
    for name in snap.factors:
        mc_block, emp_block = snap.blocks()[name], snap.approx_block(name)
        assert emp_block is not None
        cross = evaluate_block(mc_block, methods, approx_block=emp_block, layer=name)
        own = evaluate_block(emp_block, methods).approximations
        f_mc = mc_block.as_dense()
        for method in methods:
            f_hat = own[method].operator.as_dense()
            want = float(torch.linalg.matrix_norm(f_mc - f_hat) / torch.linalg.matrix_norm(f_mc))
            assert cross.values["frobenius_error"][method] == pytest.approx(want, rel=1e-10), (name, method)


def test_a_nan_warning_is_given_once_per_run_per_metric_and_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """KL divergence without closed-form eigenvalues (a small dense limit) on two Kronecker-rank-2 methods, every
    layer and two snapshots of a FisherProbe run: one warning per reason (the reason's sizes differ by layer
    and do not count), not one per layer, method and snapshot; evaluate_block alone warns once per call."""
    from fisherlab.metrics import usage

    monkeypatch.setattr(usage, "KL_DENSE_SIDE", 4)
    model, x, y = _batch()
    config = ProbeConfig(methods=("kfac", "deflation", "lanczos"), metrics=("frobenius_error", "kl_divergence"))
    probe = fl.FisherProbe(model, "ce", every=1, config=config)
    assert len(probe.names) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            ds = probe.step(step, x, y)
    said = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(said) == 1 and "kl_divergence of deflation" in said[0] and "said once" in said[0], said
    assert ds is not None and bool(ds["kl_divergence"].sel({"method": "lanczos"}).isnull().all())
    block, gradient, lam = _setup(FACTOR_CASES[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            evaluate_block(block, ["deflation", "lanczos"], metrics=ERROR_METRICS, damping=lam, gradient=gradient)
    assert len([w for w in caught if "kl_divergence" in str(w.message)]) == 2  # once per call
