"""Errors of an approximation against the exact block, without dense blocks (K §4.1).

* error 1: ``||F - F̂||_F / ||F||_F`` with
  ``||F - F̂||² = ||F||² - 2 <F, F̂> + ||F̂||²`` (Gram matrix, K Prop. 3.1 products, and
  ``||sum out_k ⊗ in_k||² = sum <out_k,out_l><in_k,in_l>``).
* error 2: ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` with both spectra sorted descending.
  ``F`` has at most ``r = min(N V, D)`` nonzero eigenvalues, all ``>= 0``, so
  ``sum_i (λ_i - μ_i)² = sum_{i<=r} (λ_i - μ_i)² + ||F̂||_F² - sum_{i<=r} μ_i²`` needs only
  the ``r`` largest eigenvalues of ``F̂``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from fisherlab.fisher import ExactBlock
from fisherlab.kron import KronSum

__all__ = ["BlockReference", "Spectrum", "frobenius_error", "spectral_error"]


class Spectrum(str, Enum):
    """What "spectrum" means in error 2 (stored in the dataset attribute ``spectrum``).

    ``eigenvalues`` follows the paper's text; ``singular_values`` (absolute eigenvalues,
    the same for PSD matrices) follows the authors' public code. They differ only for
    indefinite Kronecker-rank-2 approximations.
    """

    EIGENVALUES = "eigenvalues"
    SINGULAR_VALUES = "singular_values"


@dataclass(frozen=True)
class BlockReference:
    """Quantities of the exact block computed once per snapshot and shared by all methods.

    Args:
        block: The exact block.
        norm_squared: ``||F||_F²``.
        eigenvalues: The ``r = block.max_rank`` largest eigenvalues of ``F``, descending.
    """

    block: ExactBlock
    norm_squared: Tensor
    eigenvalues: Tensor

    @classmethod
    def of(cls, block: ExactBlock) -> BlockReference:
        """Compute the Gram matrix once; derive ``||F||_F²`` and the spectrum from it."""
        gram = block.gram()
        n = block.factors.n_samples
        return cls(block, torch.sum(gram * gram) / n**2, block.eigenvalues(gram))


def frobenius_error(ref: BlockReference, approx: KronSum) -> Tensor:
    """Error 1, ``||F - F̂||_F / ||F||_F`` (K §4.1), from factors only.

    Returns 0-d tensor; ``nan`` when ``F = 0``.
    """
    sq = ref.norm_squared - 2 * ref.block.inner(approx) + approx.frobenius_norm_squared()
    return torch.sqrt(torch.clamp(sq, min=0) / ref.norm_squared)


def spectral_error(ref: BlockReference, approx: KronSum, *, spectrum: Spectrum = Spectrum.EIGENVALUES) -> Tensor:
    """Error 2, ``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` (K §4.1), sorted descending.

    Only the ``r`` largest eigenvalues of ``F̂`` are computed (exact products of factor
    eigenvalues for a single Kronecker product).

    Args:
        ref: The exact block's norm and spectrum.
        approx: The approximation.
        spectrum: Eigenvalues (default, the paper's text) or singular values.
    """
    lam = ref.eigenvalues.clamp(min=0)
    by_mag = spectrum == Spectrum.SINGULAR_VALUES
    mu = approx.eigenvalues(top=lam.numel(), by_magnitude=by_mag)
    r = mu.numel()
    head = torch.sum((lam[:r] - mu) ** 2) + torch.sum(lam[r:] ** 2)
    tail = torch.clamp(approx.frobenius_norm_squared() - torch.sum(mu**2), min=0)
    return torch.sqrt((head + tail) / torch.sum(lam**2))
