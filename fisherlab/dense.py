"""Naive dense brute force: the reference every matrix-free computation is tested against.

Everything here forms full matrices (``O(D²)`` memory for a block of side ``D``) and uses
only textbook linear algebra and ``torch.func`` per-sample gradients. Use it on small
layers, in tests and in notebooks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fisherlab.layers import layer_parameters, parameter_matrix
from fisherlab.losses import LossKind, per_sample_loss

__all__ = [
    "dense_corrected_approximation",
    "dense_frobenius_error",
    "dense_kronecker_approximation",
    "dense_spectral_error",
    "per_sample_gradients",
    "rearrange",
]


def per_sample_gradients(
    model: nn.Module, loss: LossKind | str, x: Tensor, y: Tensor, layers: dict[str, nn.Module]
) -> dict[str, Tensor]:
    """Per-sample gradients ``[N, d_out, d_in]`` (bias as last column) by ``torch.func``.

    Each layer's in the layout of its block (:func:`~fisherlab.layers.parameter_matrix`): an embedding's
    whole ``[N, dim, num_embeddings]`` (the probe's compact block is its ``columns``), a LayerNorm's
    ``[N, P, 1]`` (weight, then bias).

    Args:
        model: The network.
        loss: Its negative log-likelihood.
        x: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]`` (e.g. sampled ones).
        layers: ``{name: module}`` of probeable layers (weights in the layer kind's row layout). A weight
            shared by several modules (:mod:`fisherlab.tied`) gets the gradient of the shared parameter,
            every use summed.
    """
    loss = LossKind(loss)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        z = functional_call(model, p, (xi[None],))
        return per_sample_loss(loss, z, yi[None]).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    name_of = {id(p): n for n, p in model.named_parameters()}  # a tied weight: under its first name
    out = {}
    for name, module in layers.items():
        weight, bias = layer_parameters(module)
        bias_grad = None if bias is None else grads[name_of[id(bias)]]
        out[name] = parameter_matrix(module, grads[name_of[id(weight)]], bias_grad, batch_dims=1)
    return out


def rearrange(f: Tensor, d_out: int, d_in: int) -> Tensor:
    """Van Loan rearrangement ``R(F)[(o1,o2),(i1,i2)] = F[(o1,i1),(o2,i2)]``, by indexing.

    ``||F - X ⊗ Y||_F = ||R(F) - vec X vec Y^T||_F`` (K Thm. 3.1, eq. 7).
    """
    return f.reshape(d_out, d_in, d_out, d_in).permute(0, 2, 1, 3).reshape(d_out**2, d_in**2)


def dense_kronecker_approximation(f: Tensor, d_out: int, d_in: int, rank: int) -> Tensor:
    """Best Kronecker-rank-``rank`` approximation of a dense ``F`` by a full SVD of ``R(F)``."""
    u, s, vt = torch.linalg.svd(rearrange(f, d_out, d_in), full_matrices=False)
    terms = [s[k] * torch.kron(u[:, k].reshape(d_out, d_out), vt[k].reshape(d_in, d_in)) for k in range(rank)]
    return torch.stack(terms).sum(0)


def dense_corrected_approximation(f: Tensor, first: Tensor, d_out: int, d_in: int) -> Tensor:
    """``first`` plus the best Kronecker product approximating ``F - first`` (K §3.2.1, §3.3): the
    top singular term of ``R(F) - R(first)`` by a full SVD. Deflation with ``first`` the best
    Kronecker product, KFAC-corrected with ``first`` KFAC."""
    u, s, vt = torch.linalg.svd(rearrange(f - first, d_out, d_in), full_matrices=False)
    return first + s[0] * torch.kron(u[:, 0].reshape(d_out, d_out), vt[0].reshape(d_in, d_in))


def dense_frobenius_error(f: Tensor, f_hat: Tensor) -> Tensor:
    """``||F - F̂||_F / ||F||_F`` of dense matrices."""
    return torch.linalg.matrix_norm(f - f_hat) / torch.linalg.matrix_norm(f)


def dense_spectral_error(f: Tensor, f_hat: Tensor, spectrum: str = "eigenvalues") -> Tensor:
    """``||spec(F) - spec(F̂)||_2 / ||spec(F)||_2`` with all eigenvalues, sorted descending.

    ``spectrum="singular_values"`` compares absolute values (a ``metrics.Spectrum`` member works too).
    """
    lam = torch.linalg.eigvalsh(f)
    mu = torch.linalg.eigvalsh((f_hat + f_hat.T) / 2)
    if spectrum == "singular_values":
        lam, mu = lam.abs(), mu.abs()
    lam, mu = torch.sort(lam, descending=True).values, torch.sort(mu, descending=True).values
    return torch.linalg.vector_norm(lam - mu) / torch.linalg.vector_norm(lam)
