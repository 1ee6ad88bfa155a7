"""The exact block's side of every metric: quantities computed once per snapshot and shared by all methods.

:class:`BlockReference` holds the block, ``||F||_F²`` (from the Gram matrix), and on first use the ``r``
largest eigenvalues of ``F`` (error 2), with what the measurements need to know about it: the spectrum
convention, the layer's name for warnings, the eigenvalues known to be 0 besides a restricted block
(:mod:`fisherlab.sample_span`) and the error-2 engine's limits (:class:`~fisherlab.metrics.error2.SpectralLimits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from fisherlab.fisher import ExactBlock
from fisherlab.vocabulary import Spectrum

if TYPE_CHECKING:  # type only: error 2 reads its limits from the reference
    from fisherlab.metrics.error2 import SpectralLimits

__all__ = ["BlockReference"]


@dataclass(frozen=True)
class BlockReference:
    """Quantities of the exact block computed once per snapshot and shared by all methods.

    Args:
        block: The exact block.
        norm_squared: ``||F||_F²``.
        spectrum: What error 2 compares (:class:`Spectrum`).
        layer: Layer name used in warnings.
        zeros: Eigenvalues of the approximations known to be 0 besides ``block.dim`` (``block``
            is the restriction of a larger one, :meth:`~fisherlab.fisher.ExactBlock.sample_span`).
        limits: What error 2's eigensolver may spend (``None``: :meth:`SpectralLimits.for_device
            <fisherlab.metrics.error2.SpectralLimits.for_device>` of the block's device).
        damping: ``λ`` of ``F + λI`` (the solve error and the KL divergence, :mod:`fisherlab.metrics.usage`),
            in the block's scale (``None``: those metrics are NaN).
        gradient: The layer's mini-batch gradient ``∇`` as ``[d_out, d_in]`` on this block (restricted to the
            sample span with it; ``None``: the solve error is NaN).
        gradient_outside: ``||∇ - P ∇||`` of the part of the whole block's gradient outside a restricted
            block's span (0 for an unrestricted block): both solves divide it by ``λ`` alike.
        warned: The ``(metric, reason)`` pairs whose NaN warning was given already (shared by the references
            of a run, :func:`~fisherlab.metrics.evaluate_block`'s ``warned``): not given again; ``None``: once
            per reference.
    """

    block: ExactBlock
    norm_squared: Tensor
    spectrum: Spectrum = Spectrum.EIGENVALUES
    layer: str = ""
    zeros: int = 0
    limits: SpectralLimits | None = None
    damping: float | None = None
    gradient: Tensor | None = None
    gradient_outside: float = 0.0
    warned: set[tuple[str, str]] | None = field(default=None, compare=False, repr=False)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        block: ExactBlock,
        *,
        spectrum: Spectrum | str = Spectrum.EIGENVALUES,
        layer: str = "",
        zeros: int = 0,
        limits: SpectralLimits | None = None,
        damping: float | None = None,
        gradient: Tensor | None = None,
        gradient_outside: float = 0.0,
        warned: set[tuple[str, str]] | None = None,
    ) -> BlockReference:
        """Compute the Gram matrix once; derive ``||F||_F²`` from it (and the spectrum when asked)."""
        norm_squared = block.frobenius_norm_squared()
        return cls(
            block, norm_squared, Spectrum(spectrum), layer, zeros, limits, damping, gradient, gradient_outside, warned
        )

    @property
    def eigenvalues(self) -> Tensor:
        """The ``r = block.max_rank`` largest eigenvalues of ``F``, descending (from the Gram
        matrix, computed on first use: error 1 alone never needs them)."""
        if "eigenvalues" not in self.cache:
            self.cache["eigenvalues"] = self.block.eigenvalues()
        return self.cache["eigenvalues"]
