"""JD-Diag: shared bases ``U, V`` (unit-norm columns, not orthogonal) and a diagonal core per adapter.

Fits ``M_i ~ U diag(sigma_i) V^T`` by weighted alternating least squares (a CP / PARAFAC
decomposition of the stack of ``M_i``), as in the paper's code, from the factors only:

* U-step: ``U = (sum_i w_i M_i V D_i) ((V^T V) * (Sigma^T W Sigma))^{-1}``, and V likewise;
* sigma-step: ``((U^T U) * (V^T V)) sigma_i = diag(U^T M_i V)`` per adapter.

It starts from the JD-Full bases of the same rank (their cores' diagonals), so it begins
from a good point; each ALS step is an exact block minimisation, so the weighted error
never increases. A tiny ridge keeps the r x r solves well posed.
"""

from __future__ import annotations

import torch

from ._linalg import adapter_weights, factor_norms2
from .jd_full import JDResult, jd_full

_RIDGE = 1e-12


def _solve_sym(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``X G = rhs`` for symmetric PSD ``G`` (rhs: (..., r)), with a relative ridge."""
    r = G.shape[-1]
    G = G + _RIDGE * (torch.diagonal(G, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / r)[..., None, None] * torch.eye(
        r, dtype=G.dtype, device=G.device
    )
    return torch.linalg.solve(G, rhs.transpose(-1, -2)).transpose(-1, -2)


def diag_objective(B, A, U, V, sigma, w, norms2) -> float:
    """Weighted squared error ``sum_i w_i ||M_i - U diag(sigma_i) V^T||^2`` from Grams."""
    proj = ((B.transpose(1, 2) @ U) * (A @ V).conj()).sum(1)  # diag(U^T M_i V): (n, r)
    G = (U.T @ U) * (V.T @ V)
    fit = norms2 - 2 * (sigma * proj).sum(1) + ((sigma @ G) * sigma).sum(1)
    return float((w * fit.clamp_min(0)).sum())


def jd_diag(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int,
    *,
    weights: torch.Tensor | None = None,
    weighting: str = "relative",
    max_iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
) -> JDResult:
    """Fit ``M_i ~ U diag(sigma_i) V^T``; returns cores of shape (n, r).

    Parameters are those of :func:`jd_full`; ``tol`` bounds the relative decrease of
    the weighted error between sweeps. ``objective`` is the weighted captured fraction.
    """
    norms2 = factor_norms2(B, A)
    w = adapter_weights(norms2, weighting) if weights is None else weights.to(B.dtype)
    total = float((w * norms2).sum()) or 1.0
    start = jd_full(B, A, rank, weights=w, max_iters=max_iters, tol=max(tol, 1e-4), seed=seed)
    U, V = start.U.clone(), start.V.clone()
    sigma = torch.diagonal(start.cores, dim1=1, dim2=2).clone()
    err = diag_objective(B, A, U, V, sigma, w, norms2)
    history = [1 - err / total]
    converged, it = False, 0
    for it in range(1, max_iters + 1):
        ws = sigma * w[:, None]
        # U-step: sum_i w_i B_i (A_i V) diag(sigma_i)
        rhs = (B @ ((A @ V) * ws[:, None, :])).sum(0)
        U = _solve_sym((V.T @ V) * (sigma.T @ ws), rhs)
        rhs = (A.transpose(1, 2) @ ((B.transpose(1, 2) @ U) * ws[:, None, :])).sum(0)
        V = _solve_sym((U.T @ U) * (sigma.T @ ws), rhs)
        # normalise columns, then the optimal sigma for these bases
        U = U / torch.linalg.norm(U, dim=0).clamp_min(1e-300)
        V = V / torch.linalg.norm(V, dim=0).clamp_min(1e-300)
        proj = ((B.transpose(1, 2) @ U) * (A @ V)).sum(1)
        sigma = _solve_sym((U.T @ U) * (V.T @ V), proj)
        new = diag_objective(B, A, U, V, sigma, w, norms2)
        history.append(1 - new / total)
        if err - new <= tol * max(err, 1e-300):
            converged = True
            err = new
            break
        err = new
    return JDResult(U, V, sigma, it, converged, history[-1], history)
