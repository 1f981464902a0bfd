"""A module's solution as stored: rounded to the storage dtype, with the exact errors of what is stored.

Shared by the module loop (:mod:`.modules`), the allocated build (:mod:`.build`) and calibrated
compression (:mod:`.whiten`).
"""

from __future__ import annotations

import torch

from ..metrics import squared_errors
from ..quantize import cat_stored, to_storage
from ..solvers.factors import Factors
from ..solvers.linalg import orth
from ..solvers.svd import spectra_from_grams


ERROR_CHUNK = 16  # adapters per chunk when measuring errors in float64 (kept in cache: 1.7x faster than 256)


def optimal_cores(B, A, U, V, assign):
    """``S_i = U_k^T M_i V_k`` for every adapter (``U``, ``V``: (K, d, r)), one basis per cluster."""
    if assign is None or U.shape[0] == 1:
        return (B.transpose(1, 2) @ U[0]).transpose(1, 2) @ (A @ V[0])
    out = torch.empty(B.shape[0], U.shape[2], V.shape[2], dtype=B.dtype)
    for k in torch.unique(assign):
        idx = assign == k
        out[idx] = (B[idx].transpose(1, 2) @ U[k]).transpose(1, 2) @ (A[idx] @ V[k])
    return out


def round_and_measure(fac: Factors, U, V, cores, assign, refine: bool, storage_dtype: str, chunk: int):
    """Round a module's solution to the storage dtype and measure it, in one float64 pass over
    the adapters (``chunk`` at a time): with ``refine`` (JD bases solved in float32), the bases
    are re-orthonormalised and the optimal cores recomputed in float64, so solving in float32
    costs nothing beyond the subspace itself; then the exact errors of what is stored (from
    Grams of the rounded, for int8 the dequantised, factors) and the spectra, from the same Grams.

    Returns ``(U, V, cores, errors2, norms2, spectra)`` with ``U``, ``V``, ``cores``
    :class:`~lorazip.quantize.Stored` in ``storage_dtype`` (int8: data and row scales).
    """
    if refine:
        U, V = orth(U.double().cpu()), orth(V.double().cpu())
    Us, Vs = to_storage(U.cpu(), storage_dtype), to_storage(V.cpu(), storage_dtype)
    Ur, Vr = Us.values, Vs.values
    U64, V64 = U.double().cpu(), V.double().cpu()
    assign = None if assign is None else assign.long().cpu()
    out: dict[str, list] = {"c": [], "e": [], "n": [], "s": []}
    for ch in fac.split(chunk):
        B, A = ch.B.cpu().double(), ch.A.cpu().double()
        k = None if assign is None else assign[ch.start : ch.stop]
        c = optimal_cores(B, A, U64, V64, k) if refine else cores[ch.start : ch.stop].cpu()
        c = to_storage(c, storage_dtype)
        GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
        n2 = (GB * GA).sum(dim=(1, 2))
        e2, _ = squared_errors(B, A, Ur, Vr, c.values, k, norms2=n2)
        for key, x in zip("cens", (c, e2, n2, spectra_from_grams(GB, GA))):
            out[key].append(x)
        del ch, B, A  # a streamed chunk is freed before the next one is read
    e2, n2, sv = (torch.cat(out[key]) for key in "ens")
    return Us, Vs, cat_stored(out["c"]), e2, n2, sv
