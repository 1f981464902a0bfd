"""Exact reconstruction errors from small Gram matrices, and their aggregation.

For an adapter's delta ``M = B A`` and its reconstruction ``U S V^T`` (bases possibly
rounded to fp16/bf16, so not exactly orthonormal) the squared error is
``||M||^2 - 2 <M, U S V^T> + ||U S V^T||^2`` with every term an ``r x r`` trace:
``tr(GB GA)``, ``sum((B^T U) S * (A V))`` and ``tr(S^T (U^T U) S (V^T V))``.
"""

from __future__ import annotations

import statistics

import torch

from .solvers.linalg import factor_norms2


def squared_errors(
    B: torch.Tensor,
    A: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    cores: torch.Tensor,
    assignment: torch.Tensor | None = None,
    norms2: torch.Tensor | None = None,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute squared errors ``||M_i - U_k S_i V_k^T - b_i a_i||_F^2`` and norms ``||M_i||_F^2``.

    Parameters
    ----------
    B : (n, d_out, r_i), A : (n, r_i, d_in)
    U : (K, d_out, r) or (d_out, r); V : (K, d_in, r) or (d_in, r)
    cores : (n, r, r) full or (n, r) diagonal
    assignment : (n,) cluster index of each adapter (default: all 0)
    norms2 : (n,) ``||M_i||_F^2`` if already known (computed from Grams otherwise)
    residual : optional per-adapter residual parts ``(b, a)``: b (n, d_out, k), a (n, k, d_in),
        zero-padded to the largest k (format v2); the error is then that of the sum.

    Returns
    -------
    (errors2, norms2), both (n,) float64, errors clipped at 0.
    """
    B, A = B.double(), A.double()
    U = (U if U.dim() == 3 else U[None]).double()
    V = (V if V.dim() == 3 else V[None]).double()
    S = cores.double()
    if S.dim() == 2:
        S = torch.diag_embed(S)
    norms2 = factor_norms2(B, A) if norms2 is None else norms2.double()
    inner = torch.empty_like(norms2)
    recon = torch.empty_like(norms2)
    b = a = None
    if residual is not None and residual[0].shape[2] > 0:
        b, a = residual[0].double(), residual[1].double()
        # <M, b a> and ||b a||^2: traces of k x k and r_i x k products
        inner_r = ((B.transpose(1, 2) @ b) * (A @ a.transpose(1, 2))).sum(dim=(1, 2))
        recon_r = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
    if assignment is not None and U.shape[0] > 8:  # many bases (per-adapter SVD): gather them
        Ui, Vi = U[assignment], V[assignment]
        inner = (((B.transpose(1, 2) @ Ui) @ S) * (A @ Vi)).sum(dim=(1, 2))
        recon = (((Ui.transpose(1, 2) @ Ui) @ S) * (S @ (Vi.transpose(1, 2) @ Vi))).sum(dim=(1, 2))
        if b is not None:
            recon = recon + 2 * (S * ((Ui.transpose(1, 2) @ b) @ (a @ Vi))).sum(dim=(1, 2))
    else:
        groups = [(0, slice(None))] if assignment is None or U.shape[0] == 1 else \
            [(int(k), assignment == k) for k in torch.unique(assignment)]
        for k, idx in groups:  # one basis per cluster, broadcast: no per-adapter copy of U_k
            Uk, Vk, Sk = U[k], V[k], S[idx]
            D = B[idx].transpose(1, 2) @ Uk  # (m, r_i, r)
            C = A[idx] @ Vk  # (m, r_i, r)
            inner[idx] = ((D @ Sk) * C).sum(dim=(1, 2))
            recon[idx] = (((Uk.T @ Uk) @ Sk) * (Sk @ (Vk.T @ Vk))).sum(dim=(1, 2))
            if b is not None:  # cross term <U S V^T, b a> = <S, (U^T b)(a V)>
                recon[idx] += 2 * (Sk * ((Uk.T @ b[idx]) @ (a[idx] @ Vk))).sum(dim=(1, 2))
    if b is not None:
        inner, recon = inner + inner_r, recon + recon_r
    return (norms2 - 2 * inner + recon).clamp_min(0), norms2


def relative(errors2: torch.Tensor, norms2: torch.Tensor) -> torch.Tensor:
    """``errors2 / norms2``, with 0 where the original delta is zero (and reproduced as zero)."""
    return torch.where(norms2 > 0, errors2 / norms2.clamp_min(1e-300), torch.where(errors2 > 0, 1.0, 0.0).double())


def per_adapter(errors2: torch.Tensor, norms2: torch.Tensor) -> torch.Tensor:
    """Energy-weighted relative error of each adapter over its modules; inputs (n, m)."""
    return relative(errors2.sum(1), norms2.sum(1))


def objective_errors(errors2: torch.Tensor, norms2: torch.Tensor, objective: str = "energy") -> torch.Tensor:
    """Each adapter's error under a budget or target objective (:data:`~lorazip.compress.options.OBJECTIVES`),
    inputs (n, m): module ``m`` weighted by ``||dW_im||^(-2p)`` (``p`` = 0 energy, 1/2 sqrt, 1 module;
    modules of no energy weigh nothing), ``sum_m w_im err_im / sum_m w_im ||dW_im||^2``. "energy" is
    :func:`per_adapter`; "module" the mean of the modules' relative errors."""
    w = module_weights(norms2, objective)
    return per_adapter(errors2 * w, norms2 * w)


def module_weights(norms2: torch.Tensor, objective: str) -> torch.Tensor:
    """Weight of each (adapter, module) pair under ``objective`` (see :func:`objective_errors`), elementwise
    on squared norms of any shape."""
    p = {"energy": 0.0, "sqrt": 0.5, "module": 1.0}[objective]
    if p == 0:
        return torch.ones_like(norms2)
    n2 = norms2.double()
    return torch.where(n2 > 0, n2.clamp_min(1e-300) ** -p, torch.zeros_like(n2)).to(norms2.dtype)


def summary(values) -> dict[str, float]:
    """mean / median / min / max of a sequence of numbers."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": statistics.fmean(vals),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
    }
