"""Error 1 and error 2 computed from factors equal their dense twins (float64) for every method,
both spectrum conventions, on MLP and conv cases; a hand-made example checks the formulas."""

from __future__ import annotations

import pytest
import torch

from fisherlab.approximations import ApproxConfig, Method, approximate_all
from fisherlab.dense import dense_frobenius_error, dense_spectral_error
from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum
from fisherlab.layers import LayerFactors
from fisherlab.metrics import BlockReference, Spectrum, frobenius_error, spectral_error
from tests.cases import FACTOR_CASES, ids, make_factors


@pytest.mark.parametrize("case", FACTOR_CASES, ids=ids(FACTOR_CASES))
@pytest.mark.parametrize("spectrum", list(Spectrum))
def test_errors_match_dense(case: dict, spectrum: Spectrum) -> None:
    """frobenius_error and spectral_error equal the dense formulas for all five methods."""
    block = ExactBlock(make_factors(case))
    ref = BlockReference.of(block)
    dense = block.as_dense()
    for method, approx in approximate_all(block, list(Method), ApproxConfig(tol=1e-8)).items():
        f_hat = approx.kron.as_dense()
        torch.testing.assert_close(
            frobenius_error(ref, approx.kron),
            dense_frobenius_error(dense, f_hat),
            rtol=1e-8,
            atol=1e-10,
            msg=method.value,
        )
        torch.testing.assert_close(
            spectral_error(ref, approx.kron, spectrum=spectrum),
            dense_spectral_error(dense, f_hat, spectrum),
            rtol=1e-8,
            atol=1e-10,
            msg=method.value,
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
