"""Per-adapter residual parts: the truncated SVD of what the shared part leaves, from factors.

For one module the shared part keeps ``U S_i V^T`` of ``M_i = B_i A_i``; the residual
``R_i = M_i - U S_i V^T = [B_i, -U S_i] [A_i; V^T]`` has rank at most ``r_i + r``. Its SVD
comes from two thin QRs, ``[B_i, -U S_i] = Q_1 R_1`` and ``[A_i^T, V] = Q_2 R_2``, and the SVD
of the small ``R_1 R_2^T``, so no ``d x d`` matrix is formed. ``r = 0`` is the adapter's own
truncated SVD.

For the allocator, :func:`nested_residual_spectra` gives the residual spectra at many shared
ranks ``r`` of nested bases ``U_R X_r``, ``V_R Y_r`` at once: each adapter's residual lives in
``span([B_i, U_R]) x span([A_i^T, V_R])`` for every ``r``, so one pair of QRs per adapter
serves all ranks, and each rank costs one small SVD per adapter.
"""

from __future__ import annotations

import torch


def _stack_factors(B, A, U, V, S):
    """``[B_i, -U S_i]`` (n, d_out, r_i + r) and ``[A_i^T, V]`` (n, d_in, r_i + r)."""
    n = B.shape[0]
    if U.shape[-1] == 0:
        return B, A.transpose(1, 2)
    US = U @ S if U.dim() == 3 else torch.matmul(U[None], S)
    Vb = V.expand(n, *V.shape[-2:]) if V.dim() == 2 else V
    return torch.cat([B, -US], 2), torch.cat([A.transpose(1, 2), Vb], 2)


def residual_svd(B, A, U, V, S):
    """SVD of every residual ``M_i - U S_i V^T`` from factors.

    B : (n, d_out, r_i), A : (n, r_i, d_in) float64; U : (d_out, r) or (n, d_out, r) (per adapter,
    e.g. gathered cluster bases); V likewise; S : (n, r, r).
    Returns ``(P, s, Q)``: P (n, d_out, m), s (n, m) descending, Q (n, d_in, m), ``m = r_i + r``.
    """
    L, Rt = _stack_factors(B, A, U, V, S)
    Q1, R1 = torch.linalg.qr(L)
    Q2, R2 = torch.linalg.qr(Rt)
    W, s, Zh = torch.linalg.svd(R1 @ R2.transpose(1, 2))
    return Q1 @ W, s, Q2 @ Zh.transpose(1, 2)


def residual_factors(B, A, U, V, S, ranks: torch.Tensor):
    """Truncated SVD of each residual at rank ``ranks[i]``, split evenly between the factors:
    ``b`` (n, d_out, k_max), ``a`` (n, k_max, d_in), zero beyond each adapter's rank."""
    k_max = int(ranks.max()) if ranks.numel() else 0
    n, d_out, d_in = B.shape[0], B.shape[1], A.shape[2]
    if k_max == 0:
        return B.new_zeros(n, d_out, 0), A.new_zeros(n, 0, d_in)
    P, s, Q = residual_svd(B, A, U, V, S)
    k_max = min(k_max, s.shape[1])
    keep = (torch.arange(k_max)[None, :] < ranks[:, None]).to(s.dtype)
    root = s[:, :k_max].clamp_min(0).sqrt() * keep
    return P[:, :, :k_max] * root[:, None, :], (Q[:, :, :k_max] * root[:, None, :]).transpose(1, 2)


def nested_residual_spectra(B, A, U_R, V_R, S_R, XY: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """Residual singular values at several nested shared ranks.

    B, A : one module's factors (n, d_out, r_i), (n, r_i, d_in), float64; U_R (d_out, R), V_R
    (d_in, R) the top-rank bases, S_R (n, R, R) = U_R^T M_i V_R; ``XY[r] = (X_r, Y_r)`` (R, r)
    orthonormal, defining the rank-r bases ``U_R X_r``, ``V_R Y_r`` (optimal cores
    ``X_r^T S_R Y_r``). Returns ``{r: (n, r_i + R) squared singular values, descending}`` and,
    for ``r = 0``, those of ``M_i`` itself.
    """
    n = B.shape[0]
    R = U_R.shape[1]
    Ub = U_R.expand(n, *U_R.shape)
    Vb = V_R.expand(n, *V_R.shape)
    Q1, R1 = torch.linalg.qr(torch.cat([B, Ub], 2))  # span([B_i, U_R]) for every r
    Q2, R2 = torch.linalg.qr(torch.cat([A.transpose(1, 2), Vb], 2))
    r_i = B.shape[2]
    # coordinates in (Q1, Q2): M_i -> R1[:, :, :r_i] R2[:, :, :r_i]^T; U_R -> R1[:, :, r_i:]; V_R -> R2[:, :, r_i:]
    Mc = R1[:, :, :r_i] @ R2[:, :, :r_i].transpose(1, 2)
    Uc, Vc = R1[:, :, r_i:], R2[:, :, r_i:]
    out = {}
    for r, (X, Y) in XY.items():
        if r == 0:
            core = Mc
        else:
            P = X @ X.T
            Qp = Y @ Y.T
            core = Mc - Uc @ (P @ S_R @ Qp) @ Vc.transpose(1, 2)
        # squared singular values = eigenvalues of the Gram (float64: exact to eps ||M_i||^2)
        out[r] = torch.linalg.eigvalsh(core @ core.transpose(1, 2)).flip(-1).clamp_min(0)
    del R
    return out
