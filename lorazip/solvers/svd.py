"""Per-adapter truncated SVD, from the factors: the baseline every joint method is judged by.

``M_i = B_i A_i`` has the SVD of its ``r_i x r_i`` core ``R_B R_A^T`` (thin QR of ``B_i``
and ``A_i^T``), so the spectrum and the best rank-``k`` approximation of every adapter
cost ``O(r_i^2 (d_in + d_out))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVDResult:
    """Per-adapter rank-``k`` truncations: ``M_i ~ U[i] diag(S[i]) V[i]^T``.

    ``U``: (n, d_out, k), ``V``: (n, d_in, k), ``S``: (n, k); ``spectra``: (n, r_max) all singular values.
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    spectra: torch.Tensor


def spectra(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of every ``M_i = B[i] @ A[i]``, descending, shape (n, r_max)."""
    _, RB = torch.linalg.qr(B, mode="reduced")
    _, RA = torch.linalg.qr(A.transpose(1, 2), mode="reduced")
    return torch.linalg.svdvals(RB @ RA.transpose(1, 2))


def spectra_from_grams(GB: torch.Tensor, GA: torch.Tensor) -> torch.Tensor:
    """Singular values of every ``M_i = B_i A_i`` from ``GB_i = B_i^T B_i`` and ``GA_i = A_i A_i^T``
    (n, r, r), descending: the square roots of the eigenvalues of ``GB^1/2 GA GB^1/2``. In
    float64 the squared values are exact to ``eps ||M_i||^2``, all that truncation errors need."""
    evals, Q = torch.linalg.eigh(GB)
    H = (Q * evals.clamp_min(0).sqrt()[:, None, :]) @ Q.transpose(1, 2)
    return torch.linalg.eigvalsh(H @ GA @ H).clamp_min(0).sqrt().flip(-1)


def truncation_errors(sv: torch.Tensor, k: "int | torch.Tensor") -> torch.Tensor:
    """Relative squared error of the best rank-``k`` approximation, from spectra (n, r_max);
    ``k`` is one rank or one per row (n,)."""
    e = sv.square()
    total = e.sum(1)
    if isinstance(k, torch.Tensor):
        kept = (e * (torch.arange(e.shape[1]) < k.reshape(-1, 1))).sum(1)
    else:
        kept = e[:, : max(k, 0)].sum(1)
    return torch.where(total > 0, (total - kept).clamp_min(0) / total.clamp_min(1e-300), 0.0)


def individual_svd(B: torch.Tensor, A: torch.Tensor, rank: int) -> SVDResult:
    """Best rank-``rank`` approximation of each adapter on its own (Eckart-Young)."""
    QB, RB = torch.linalg.qr(B, mode="reduced")
    QA, RA = torch.linalg.qr(A.transpose(1, 2), mode="reduced")
    P, S, Wh = torch.linalg.svd(RB @ RA.transpose(1, 2))
    k = min(rank, S.shape[1])
    U = QB @ P[:, :, :k]
    V = QA @ Wh.transpose(1, 2)[:, :, :k]
    Sk = S[:, :k]
    if k < rank:  # an adapter of lower rank: zero columns carry zero singular values
        pad = rank - k
        U = torch.nn.functional.pad(U, (0, pad))
        V = torch.nn.functional.pad(V, (0, pad))
        Sk = torch.nn.functional.pad(Sk, (0, pad))
    return SVDResult(U, V, Sk, S)
