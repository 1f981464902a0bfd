"""JD-Diag: shared bases ``U, V`` (unit-norm columns, not orthogonal) and a diagonal core per adapter.

Fits ``M_i ~ U diag(sigma_i) V^T`` by weighted alternating least squares (a CP / PARAFAC
decomposition of the stack of ``M_i``), as in the paper's code, from the factors only:

* U-step: ``U = (sum_i w_i M_i V D_i) ((V^T V) * (Sigma^T W Sigma))^{-1}``, and V likewise;
* sigma-step: ``((U^T U) * (V^T V)) sigma_i = diag(U^T M_i V)`` per adapter.

It starts from the JD-Full bases of the same rank (their cores' diagonals), so it begins
from a good point; each ALS step is an exact block minimisation, so the weighted error
never increases. A tiny ridge keeps the r x r solves well posed. Every step is a sum over
adapters, computed chunk by chunk (:class:`~lorazip.solvers.factors.Factors`).
"""

from __future__ import annotations

import torch

from .factors import Factors
from .jd_full import JDResult, jd_full_factors, norms_and_weights

_RIDGE = 1e-12


def _solve_sym(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``X G = rhs`` for symmetric PSD ``G`` (rhs: (..., r)), with a relative ridge."""
    r = G.shape[-1]
    G = G + _RIDGE * (torch.diagonal(G, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / r)[..., None, None] * torch.eye(
        r, dtype=G.dtype, device=G.device
    )
    return torch.linalg.solve(G, rhs.transpose(-1, -2)).transpose(-1, -2)


def _diag_proj(fac: Factors, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``diag(U^T M_i V)`` for every adapter, (n, r): one pass."""
    return torch.cat([((ch.B.transpose(1, 2) @ U) * (ch.A @ V)).sum(1) for ch in fac])


def _objective(proj, U, V, sigma, w, norms2) -> float:
    """Weighted squared error ``sum_i w_i ||M_i - U diag(sigma_i) V^T||^2`` from Grams."""
    G = (U.T @ U) * (V.T @ V)
    fit = norms2 - 2 * (sigma * proj).sum(1) + ((sigma @ G) * sigma).sum(1)
    return float((w * fit.clamp_min(0)).sum())


def diag_objective(B, A, U, V, sigma, w, norms2) -> float:
    """Weighted squared error ``sum_i w_i ||M_i - U diag(sigma_i) V^T||^2`` from Grams."""
    return _objective(_diag_proj(Factors.stacked(B, A), U, V), U, V, sigma, w, norms2)


def jd_diag(B: torch.Tensor, A: torch.Tensor, rank: int, **kw) -> JDResult:
    """Fit ``M_i ~ U diag(sigma_i) V^T``; returns cores of shape (n, r).

    Parameters are those of :func:`~lorazip.solvers.jd_full.jd_full`; ``tol`` bounds the
    relative decrease of the weighted error between sweeps. ``objective`` is the weighted
    captured fraction.
    """
    return jd_diag_factors(Factors.stacked(B, A), rank, **kw)


def jd_diag_factors(
    fac: Factors,
    rank: int,
    *,
    weights: torch.Tensor | None = None,
    weighting: str = "relative",
    max_iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
) -> JDResult:
    """:func:`jd_diag` on :class:`~lorazip.solvers.factors.Factors` (in memory or streamed)."""
    norms2, w = norms_and_weights(fac, weighting, weights)
    total = float((w * norms2).sum()) or 1.0
    start = jd_full_factors(fac, rank, weights=w, max_iters=max_iters, tol=max(tol, 1e-4), seed=seed)
    U, V = start.U.clone(), start.V.clone()
    sigma = torch.diagonal(start.cores, dim1=1, dim2=2).clone()
    err = _objective(_diag_proj(fac, U, V), U, V, sigma, w, norms2)
    history = [1 - err / total]
    converged, it = False, 0
    for it in range(1, max_iters + 1):
        ws = sigma * w[:, None]
        # U-step: sum_i w_i B_i (A_i V) diag(sigma_i) as one product per chunk
        rhs = sum(ch.Bt2.T @ ((ch.A @ V) * ws[ch.start : ch.stop, None, :]).reshape(-1, rank) for ch in fac)
        U = _solve_sym((V.T @ V) * (sigma.T @ ws), rhs)
        rhs = sum(ch.A2.T @ ((ch.B.transpose(1, 2) @ U) * ws[ch.start : ch.stop, None, :]).reshape(-1, rank)
                  for ch in fac)
        V = _solve_sym((U.T @ U) * (sigma.T @ ws), rhs)
        # normalise columns, then the optimal sigma for these bases
        U = U / torch.linalg.norm(U, dim=0).clamp_min(1e-300)
        V = V / torch.linalg.norm(V, dim=0).clamp_min(1e-300)
        proj = _diag_proj(fac, U, V)
        sigma = _solve_sym((U.T @ U) * (V.T @ V), proj)
        new = _objective(proj, U, V, sigma, w, norms2)
        history.append(1 - new / total)
        if err - new <= tol * max(err, 1e-300):
            converged = True
            err = new
            break
        err = new
    return JDResult(U, V, sigma, it, converged, history[-1], history)
