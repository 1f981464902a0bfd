"""JD-Full: shared orthonormal bases ``U, V`` and a full ``r x r`` core per adapter.

Solves ``max_{U,V} sum_i w_i ||U^T M_i V||_F^2`` (the optimal cores are
``S_i = U^T M_i V``) by alternating block subspace iteration with Rayleigh-Ritz
(an inexact HOOI / Tucker-2 sweep), working only on the factors ``M_i = B_i A_i``:

* V-step, for fixed U: the operator ``sum_i w_i M_i^T U U^T M_i`` is applied as
  ``Q Q^T x`` with ``Q = [sqrt(w_i) A_i^T (B_i^T U)]_i`` (d_in x n r);
* U-step, for fixed V: ``P = [sqrt(w_i) B_i (A_i V)]_i`` (d_out x n r).

Each step does Rayleigh-Ritz on ``span([U, G U])``, so the objective never
decreases. Cost per sweep is ``O(n r_i r (d_in + d_out))``. Both bases start from
randomized subspace iteration on ``sum_i w_i M_i M_i^T`` and ``sum_i w_i M_i^T M_i``
(data-driven, seeded). Iteration stops when both subspaces move less than ``tol``
(``||U - U_old U_old^T U||_F / ||U||_F``), when a sweep improves the objective by less than
``tol`` (relative), or after ``max_iters`` sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backend import mT, namespace
from ._linalg import adapter_weights, factor_norms2, randomized_top_subspace, subspace_change, subspace_iteration_step


def _like(x, ref):
    """``x`` on ``ref``'s backend, device and dtype."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(x).to(device=ref.device, dtype=ref.dtype)
    xp = namespace(ref)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return xp.asarray(x, dtype=ref.dtype)


@dataclass
class JDResult:
    """Result of a joint factorisation of one module.

    ``U``: (d_out, r), ``V``: (d_in, r), ``cores``: (n, r, r) (JD-Full) or (n, r) (JD-Diag).
    ``objective``: weighted captured fraction ``sum w_i ||U^T M_i V||^2 / sum w_i ||M_i||^2``.
    """

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    n_iters: int
    converged: bool
    objective: float
    history: list[float] = field(default_factory=list)


def _flat(X):
    """(n, d, r) -> (d, n r)."""
    xp = namespace(X)
    n, d, r = X.shape
    return xp.reshape(xp.permute_dims(X, (1, 0, 2)), (d, n * r))


def init_bases(
    B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors of ``sum w_i M_i M_i^T`` and ``sum w_i M_i^T M_i`` from factors."""
    xp = namespace(B)
    Bw = B * xp.sqrt(w)[:, None, None]
    GB = mT(Bw) @ Bw  # (n, R, R)
    GA = A @ mT(A)  # (n, R, R)

    def apply_right(X):  # sum_i A_i^T GB_i A_i X
        return xp.sum(mT(A) @ (GB @ (A @ X)), axis=0)

    def apply_left(X):  # sum_i Bw_i GA_i Bw_i^T X
        return xp.sum(Bw @ (GA @ (mT(Bw) @ X)), axis=0)

    V = randomized_top_subspace(apply_right, B, A.shape[2], rank, generator=generator)
    U = randomized_top_subspace(apply_left, B, B.shape[1], rank, generator=generator)
    return U, V


def jd_full(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int,
    *,
    weights: torch.Tensor | None = None,
    weighting: str = "relative",
    max_iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
    U0: torch.Tensor | None = None,
    V0: torch.Tensor | None = None,
    tol_scale: float = 1.0,
) -> JDResult:
    """Fit shared bases and full cores to ``M_i = B[i] @ A[i]``.

    Parameters
    ----------
    B : (n, d_out, r_i) array, scale folded in; A : (n, r_i, d_in) array. torch tensors (CPU or
        CUDA), NumPy or CuPy arrays: the same code runs on each (:mod:`lorazip.backend`).
    rank : shared rank r, ``1 <= r <= min(d_out, d_in)``.
    weights : (n,) tensor, optional; overrides ``weighting`` ("relative" or "absolute").
    max_iters, tol : sweep limit and tolerance. Iteration stops when both subspaces move less
        than ``tol`` or a sweep raises the captured fraction by less than ``tol * tol_scale``
        times the larger of the captured and the lost fraction: the error has then converged even where near-degenerate directions
        still rotate (flat spectra converge slowly in subspace, not in error).
    seed : seeds the randomized initialisation.
    U0, V0 : warm start (orthonormal columns); the randomized init is skipped.

    Returns
    -------
    JDResult with cores ``S_i = U^T M_i V`` of shape (n, r, r).
    """
    n, d_out, _ = B.shape
    d_in = A.shape[2]
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    xp = namespace(B, A)
    norms2 = factor_norms2(B, A)
    w = adapter_weights(norms2, weighting) if weights is None else _like(weights, B)
    total = float(xp.sum(w * norms2))
    Bw = B * xp.sqrt(w)[:, None, None]
    gen = torch.Generator().manual_seed(seed)
    if U0 is None or V0 is None:
        U, V = init_bases(B, A, w, rank, gen)
    else:
        U, V = _like(U0, B), _like(V0, B)

    def objective(U, V):
        return float(xp.sum((mT(mT(Bw) @ U) @ (A @ V)) ** 2)) / total if total else 1.0

    history = [objective(U, V)]
    converged = False
    it = 0
    for it in range(1, max_iters + 1):
        U_old, V_old = U, V
        Q = _flat(mT(A) @ (mT(Bw) @ U))  # (d_in, n r)
        V = subspace_iteration_step(V, lambda X: Q @ (mT(Q) @ X), rank)
        P = _flat(Bw @ (A @ V))  # (d_out, n r)
        U = subspace_iteration_step(U, lambda X: P @ (mT(P) @ X), rank)
        history.append(float(xp.sum((mT(U) @ P) ** 2)) / total if total else 1.0)
        gain = history[-1] - history[-2]
        # relative to the larger of captured and lost energy: when little can be captured (flat
        # spectra), the error is what must be accurate, not the small captured fraction
        scale = max(history[-1], 1.0 - history[-1])
        if max(subspace_change(U_old, U), subspace_change(V_old, V)) < tol or gain <= tol * tol_scale * scale:
            converged = True
            break
    cores = mT(mT(B) @ U) @ (A @ V)
    return JDResult(U, V, cores, it, converged, history[-1], history)
