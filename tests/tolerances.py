"""Named tolerances (DESIGN/STYLE §4.5), applied to quantities normalised by the reference's scale.

A tolerance says how the two sides were computed; a test that needs one not listed here names it
locally with a comment saying why. ``scaled(tol, s)`` multiplies the absolute part by the reference's
scale ``s`` for quantities that are not of order one."""

BITWISE = {"rtol": 0.0, "atol": 0.0}  # the same bits: a copy, a round trip through a file, an untouched buffer
ROUNDOFF64 = {"rtol": 1e-12, "atol": 1e-14}  # the same float64 sums in another order (no solve, no eigensolver)
EXACT64 = {"rtol": 1e-10, "atol": 1e-12}
SOLVE64 = {"rtol": 1e-9, "atol": 1e-12}  # float64 through one dense solve or symmetric eigendecomposition
DAMPED_SOLVE = {"rtol": 1e-9, "atol": 1e-11}  # a damped solve by a structured route (eigenbases, Woodbury) vs dense
COARSE64 = {"rtol": 1e-8, "atol": 1e-10}  # a coarse (R₀ F R₀ᵀ) solve on top of a fine one: two solves deep
ITERATIVE_TOL = 1e-10  # solver tolerance used in iterative tests
ITERATIVE = {"rtol": 1e-6, "atol": 1e-9}
SLACK = 1 + 1e-8  # inequality slack: lhs <= rhs * SLACK
STATIONARY = {"rtol": 1e-8, "atol": 0.0}  # error 1 of terms converged to tol 1e-6: second order in their residual
FLOAT32 = {"rtol": 1.3e-6, "atol": 1e-5}  # a float32 path: torch.testing's float32 defaults, O(1) quantities
MONTE_CARLO = {"rtol": 0.0, "atol": 0.02}  # frequencies of >= 10⁴ draws vs their probabilities: ~6 standard errors


def scaled(tol: dict[str, float], scale: float) -> dict[str, float]:
    """``tol`` with its absolute part multiplied by ``scale`` (e.g. the reference's largest entry)."""
    return {"rtol": tol["rtol"], "atol": tol["atol"] * scale}


def as_approx(tol: dict[str, float]) -> dict[str, float]:
    """``tol`` as ``pytest.approx``'s keywords (``rel``, ``abs``)."""
    return {"rel": tol["rtol"], "abs": tol["atol"]}
