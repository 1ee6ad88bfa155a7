"""The approximations the field uses today, one module per family, each registered on import.

* :mod:`~fisherlab.methods.diagonal` — ``diagonal``: ``diag(F)``.
* :mod:`~fisherlab.methods.kfac_variants` — ``tkfac`` (KFAC scaled to ``tr F``) and ``kfac_reduce``
  (KFAC for layers shared over positions, inputs averaged and output derivatives summed first).
* :mod:`~fisherlab.methods.eigenbasis` — ``ekfac`` and ``eshampoo``: the diagonal of ``F`` in the
  eigenbasis of KFAC's or Shampoo's factors.
* :mod:`~fisherlab.methods.shampoo` — ``shampoo2`` (``c L ⊗ R``) and ``shampoo`` (``c L^½ ⊗ R^½``).
* :mod:`~fisherlab.methods.lowrank` — ``lowrank``: the best rank-``k`` approximation of ``F``.

With ``DW_nv = Σ_t g_nvt a_ntᵀ`` and ``F = (1/N) Σ_nv vec(DW_nv) vec(DW_nv)ᵀ`` (row-major,
``out ⊗ in``), every method is built from the per-sample factors, never from the dense block;
sums over samples are summed over processes (:func:`fisherlab.distributed.all_reduce_sum`).
``import fisherlab`` registers them all; the default ``--methods`` stays the papers' five.
"""

# a method's reuses register first: ekfac <- kfac, eshampoo and shampoo <- shampoo2 (registered before shampoo)
from fisherlab.methods import diagonal, kfac_variants, lowrank, shampoo  # isort: skip
from fisherlab.methods import eigenbasis  # isort: skip

__all__ = ["diagonal", "eigenbasis", "kfac_variants", "lowrank", "shampoo"]
