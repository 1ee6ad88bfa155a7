"""Contract checks for code that plugs into fisherlab: run them in your own tests.

:func:`check_block_operator` checks a block operator (an approximation of one layer's Fisher
block, see :class:`~fisherlab.operators.BlockOperator`) against the dense matrix it stands for:
every method it offers, on random batches, in the operator's own dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_block_operator"]


def _close(what: str, got: Tensor, want: Tensor, rtol: float, atol: float) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got.to(want) - want).abs().max()) if want.numel() else 0.0
    if not err <= atol + rtol * scale:
        raise AssertionError(f"{what}: max |difference| {err:.3g} exceeds {atol:.1g} + {rtol:.1g} x {scale:.3g}")


def check_block_operator(
    operator: object, dense: Tensor, *, rtol: float = 1e-10, atol: float = 1e-12, damping: float = 0.1, seed: int = 0
) -> None:
    """Assert that ``operator`` acts as the symmetric matrix ``dense`` ``[d_out d_in, d_out d_in]``.

    Checks ``d_out d_in`` against the side, ``matvec`` on a batch ``[3, d_out, d_in]`` and on one
    matrix, ``frobenius_norm_squared``, ``as_dense``, and where the operator has them
    ``eigenvalues()`` (all of them, descending), ``diagonal()`` and ``solve(v, damping=...)``
    (``(B + damping I)⁻¹ v`` for a PSD ``B``; a Kronecker sum's π-damping is checked by its own tests).

    Raises:
        AssertionError: Naming the first method that disagrees.
    """
    d_out, d_in = operator.d_out, operator.d_in  # type: ignore[attr-defined]
    side = dense.shape[0]
    if d_out * d_in != side:
        raise AssertionError(f"d_out d_in = {d_out} x {d_in} does not match the dense side {side}")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, d_out, d_in, generator=gen, dtype=dense.dtype).to(dense.device)
    want = (w.reshape(3, side) @ dense.T).reshape(3, d_out, d_in)
    _close("matvec on a batch", operator.matvec(w), want, rtol, atol)  # type: ignore[attr-defined]
    _close("matvec on one matrix", operator.matvec(w[0]), want[0], rtol, atol)  # type: ignore[attr-defined]
    norm = operator.frobenius_norm_squared()  # type: ignore[attr-defined]
    _close("frobenius_norm_squared", norm.reshape(1), torch.sum(dense**2).reshape(1), rtol, atol)
    _close("as_dense", operator.as_dense(), dense, rtol, atol)  # type: ignore[attr-defined]
    eigenvalues = getattr(operator, "eigenvalues", None)
    if callable(eigenvalues) and not hasattr(operator, "outs"):  # a KronSum's take options; checked below
        ev = eigenvalues()
        if ev is not None:
            want_ev = torch.sort(torch.linalg.eigvalsh((dense + dense.T) / 2), descending=True).values
            _close("eigenvalues", ev.flatten(), want_ev, rtol, atol)
    elif callable(eigenvalues):
        want_ev = torch.sort(torch.linalg.eigvalsh((dense + dense.T) / 2), descending=True).values
        _close("eigenvalues", eigenvalues(), want_ev, rtol, atol)
    diagonal = getattr(operator, "diagonal", None)
    if callable(diagonal):
        _close("diagonal", diagonal().flatten(), torch.diagonal(dense), rtol, atol)
    solve = getattr(operator, "solve", None)
    if callable(solve) and not hasattr(operator, "outs"):
        eye = torch.eye(side, dtype=dense.dtype, device=dense.device)
        want_x = torch.linalg.solve(dense + damping * eye, w[0].reshape(side)).reshape(d_out, d_in)
        scale = rtol * float(torch.linalg.cond(dense + damping * eye))
        _close("solve", solve(w[0], damping=damping), want_x, max(rtol, scale), atol)
