"""Named tolerances (DESIGN/STYLE §4.5), applied to quantities normalised by the reference's scale."""

EXACT64 = {"rtol": 1e-10, "atol": 1e-12}
ITERATIVE_TOL = 1e-10  # solver tolerance used in iterative tests
ITERATIVE = {"rtol": 1e-6, "atol": 1e-9}
SLACK = 1 + 1e-8  # inequality slack: lhs <= rhs * SLACK
STATIONARY = {"rtol": 1e-8, "atol": 0.0}  # error 1 of terms converged to tol 1e-6: second order in their residual
