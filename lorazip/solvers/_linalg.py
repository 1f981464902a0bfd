"""Small linear-algebra pieces shared by the solvers (all on torch tensors, any device).

The solvers never form a ``d x d`` matrix: every operator here is given as a function
that applies it to a thin block of vectors.
"""

from __future__ import annotations

from typing import Callable

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]

WEIGHTINGS = ("relative", "absolute")


def adapter_weights(norms2: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-adapter weights ``w_i``: ``1/||M_i||^2`` (relative) or 1 (absolute); 0 for zero deltas."""
    if weighting == "relative":
        return torch.where(norms2 > 0, 1.0 / norms2.clamp_min(torch.finfo(norms2.dtype).tiny), 0.0)
    if weighting == "absolute":
        return torch.where(norms2 > 0, 1.0, 0.0).to(norms2.dtype)
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def orth(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``X`` (thin QR, signs fixed for determinism)."""
    Q, R = torch.linalg.qr(X, mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign.unsqueeze(-2)


def top_subspace(Q: torch.Tensor, apply: Operator, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz: the best ``r``-dimensional subspace of span(Q) for the PSD operator.

    Returns ``(U, eigenvalues)`` with ``U = Q @ (top-r eigenvectors of Q^T G Q)``.
    """
    T = Q.T @ apply(Q)
    T = 0.5 * (T + T.T)
    evals, evecs = torch.linalg.eigh(T)
    order = torch.argsort(evals, descending=True, stable=True)[:r]
    W = evecs[:, order]
    # Fix each eigenvector's sign (largest-magnitude entry positive) so runs are reproducible.
    idx = W.abs().argmax(dim=0)
    W = W * torch.where(W[idx, torch.arange(W.shape[1])] < 0, -1.0, 1.0).to(W.dtype)
    return orth(Q @ W), evals[order]


def subspace_iteration_step(U: torch.Tensor, apply: Operator, r: int) -> torch.Tensor:
    """One block step: Rayleigh-Ritz on span([U, G U]). Never decreases tr(U^T G U) for PSD G."""
    Q = orth(torch.cat([U, apply(U)], dim=1))  # (d, min(d, 2r))
    return top_subspace(Q, apply, r)[0]


def randomized_top_subspace(
    apply: Operator, d: int, r: int, *, generator: torch.Generator, dtype, device, n_power: int = 4, oversample: int = 8
) -> torch.Tensor:
    """Top-``r`` eigenvectors of a PSD operator by randomized subspace iteration (data-driven init)."""
    k = min(d, r + oversample)
    omega = torch.randn(d, k, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    Q = orth(apply(omega))
    for _ in range(n_power):
        Q = orth(apply(Q))
    return top_subspace(Q, apply, r)[0]


def subspace_change(U_old: torch.Tensor, U: torch.Tensor) -> float:
    """``||U - U_old U_old^T U||_F / ||U||_F``: 0 when the spans agree (the paper's stopping rule)."""
    num = torch.linalg.norm(U - U_old @ (U_old.T @ U))
    return float(num / torch.linalg.norm(U).clamp_min(torch.finfo(U.dtype).tiny))
