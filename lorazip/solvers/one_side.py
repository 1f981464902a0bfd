"""Exact shared bases for a module whose small side is kept whole (classification heads).

A head with ``d_out = 2`` outputs and rank-8 adapters cannot hold a square rank-8 core, but a
shared basis need not be square: with ``U = I`` (the whole output space, ``r_out = d_out``)
the best input basis for ``sum_i w_i ||M_i - M_i V V^T||^2`` is the top-``r_in`` right singular
subspace of the stacked ``sqrt(w_i) M_i``, and the cores ``S_i = M_i V`` are ``(d_out, r_in)``.
This is the global optimum (no iteration), and exact once ``r_in`` reaches the rank of the
stack (at most the sum of the adapters' ranks). The same holds with the sides swapped.
The stack is formed from ``R_i A_i`` (``B_i = Q_i R_i``), never from ``d x d`` products.
"""

from __future__ import annotations

import torch


def _right_basis(X: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` right singular vectors of ``X`` (rows, d), signs fixed (largest entry positive)."""
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    V = Vh[:r].T
    idx = V.abs().argmax(0)
    sign = torch.sign(V[idx, torch.arange(V.shape[1])])
    return V * torch.where(sign == 0, torch.ones_like(sign), sign)


def one_side_bases(B: torch.Tensor, A: torch.Tensor, r_out: int, r_in: int, weights: torch.Tensor):
    """Bases ``U`` (d_out, r_out), ``V`` (d_in, r_in) with one side whole (``r_out == d_out`` or
    ``r_in == d_in``), optimal for the weighted sum of squared errors.

    B : (n, d_out, r_i), A : (n, r_i, d_in), weights : (n,).
    """
    n, d_out, _ = B.shape
    d_in = A.shape[2]
    if r_out != d_out and r_in != d_in:
        raise ValueError(f"one side must be whole: r_out={r_out} of {d_out}, r_in={r_in} of {d_in}")
    w = weights.to(B.dtype).clamp_min(0).sqrt()[:, None, None]
    if r_out == d_out:  # ||M_i x|| = ||R_i A_i x|| with B_i = Q_i R_i
        R = torch.linalg.qr(B, mode="r")[1]
        V = _right_basis((w * (R @ A)).reshape(-1, d_in), r_in)
        return torch.eye(d_out, dtype=B.dtype), V
    R = torch.linalg.qr(A.transpose(1, 2), mode="r")[1]  # A_i^T = Q_i R_i
    U = _right_basis((w * (R @ B.transpose(1, 2))).reshape(-1, d_out), r_out)
    return U, torch.eye(d_in, dtype=B.dtype)
