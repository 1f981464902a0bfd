"""A module's solution as stored: rounded to the storage dtype, with the exact errors of what is stored.

Shared by the module loop (:mod:`.modules`), the allocated build (:mod:`.build`) and calibrated
compression (:mod:`.whiten`).
"""

from __future__ import annotations

import torch

from ..metrics import squared_errors
from ..quantize import cat_stored, store_residual, store_rows, to_storage
from ..solvers.factors import Chunk, Factors, float64_chunk
from ..solvers.linalg import orth
from ..solvers.residual import residual_factors, residual_rows
from ..solvers.svd import spectra_from_grams


ERROR_CHUNK = 16  # adapters per chunk when measuring errors in float64 (kept in cache: 1.7x faster than 256)
# An adapter whose relative error, measured from float32 products, is at least this is kept as
# measured; below it, it is measured again in float64. A float32 product of length d is within about
# sqrt(d) u32 of its float64 value (u32 = 6e-8; probabilistic bound, Higham & Mary 2019), so the
# relative squared error e is known to ~4 sqrt(d) u32 / e: at e >= 0.5 and d = 4096 that is 3e-5 of e
# (measured on Lots-of-LoRAs shapes and the fixtures: at most 1e-6 of ||M||^2 absolute).
FLOAT32_MIN_ERROR = 0.5


def adapter_chunk(fac: Factors) -> int:
    """Adapters per float64 chunk of a module's factors in the builds and error passes
    (:func:`~lorazip.solvers.factors.float64_chunk`, at least :data:`ERROR_CHUNK`), at most what the
    factors are read in (``fac.chunk``)."""
    return max(1, min(float64_chunk(fac.d_out, fac.d_in, fac.rank, ERROR_CHUNK), fac.chunk))


def optimal_cores(B, A, U, V, assign):
    """``S_i = U_k^T M_i V_k`` for every adapter (``U``, ``V``: (K, d, r)), one basis per cluster."""
    if assign is None or U.shape[0] == 1:
        return (B.transpose(1, 2) @ U[0]).transpose(1, 2) @ (A @ V[0])
    out = torch.empty(B.shape[0], U.shape[2], V.shape[2], dtype=B.dtype)
    for k in torch.unique(assign):
        idx = assign == k
        out[idx] = (B[idx].transpose(1, 2) @ U[k]).transpose(1, 2) @ (A[idx] @ V[k])
    return out


class StoredBases:
    """A module's bases as stored (``U``, ``V``: (K, d, r), one pair per cluster; rounded bases are
    not exactly orthonormal), in float64 with their Grams and the pseudo-inverses of those that make
    cores least squares for them: made once per module, used for every chunk of adapters."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor):
        self.U, self.V = U.double().cpu(), V.double().cpu()
        self.GU, self.GV = (torch.stack([b.T @ b for b in X]) for X in (self.U, self.V))
        # pseudo-inverses: rounding may leave tiny bases rank-deficient
        self.iU = torch.stack([torch.linalg.pinv(g, hermitian=True) for g in self.GU])
        self.iV = torch.stack([torch.linalg.pinv(g, hermitian=True) for g in self.GV])

    def cores(self, S: torch.Tensor, assign=None) -> torch.Tensor:
        """The cores ``(U_k^T U_k)^-1 S_i (V_k^T V_k)^-1`` minimising ``||M_i - U_k S_i V_k^T||``, given
        ``S_i = U_k^T M_i V_k`` (:func:`optimal_cores`); ``assign``: each adapter's cluster ``k``."""
        out = S.clone()
        for k in range(self.U.shape[0]):
            idx = slice(None) if assign is None or self.U.shape[0] == 1 else assign == k
            out[idx] = self.iU[k] @ S[idx] @ self.iV[k]
        return out

    def errors(self, D, C, GB, GA, S):
        """``(||M_i - U S_i V^T||^2, ||M_i||^2)`` (one basis) from ``D_i = B_i^T U``, ``C_i = A_i V``,
        the adapters' Grams and the stored cores ``S``."""
        if S.dim() == 2:  # JD-Diag
            S = torch.diag_embed(S)
        n2 = (GB * GA).sum(dim=(1, 2))
        inner = ((D @ S) * C).sum(dim=(1, 2))
        recon = ((self.GU[0] @ S) * (S @ self.GV[0])).sum(dim=(1, 2))
        return (n2 - 2 * inner + recon).clamp_min(0), n2


def round_and_measure(fac: Factors, U, V, cores, assign, refine: bool, storage_dtype: str, chunk: int,
                      spectra: torch.Tensor | None = None):
    """Round a module's solution to the storage dtype and measure it: with ``refine`` (JD bases
    solved in float32), the bases are re-orthonormalised in float64 and each adapter's core is the
    least-squares optimum for the bases as stored; then the exact errors of what is stored (from
    Grams of the rounded, for int8 the dequantised, factors) and the spectra, from the same Grams.

    One shared basis (``U``: (1, d, r)) with factors in float32: every product is one float32 matrix
    product over the module, and the adapters whose error comes out below :data:`FLOAT32_MIN_ERROR`
    are measured again in float64 (``chunk`` at a time), so every error is exact to ~3e-5 of itself.
    Otherwise (clusters, float64 factors) one float64 pass, ``chunk`` adapters at a time.

    ``spectra``: the adapters' singular values (n, r_i) where the solver made them from the same Grams
    (:attr:`~lorazip.solvers.jd_full.JDResult.spectra`): taken instead of made again (float32 factors).

    Returns ``(U, V, cores, errors2, norms2, spectra)`` with ``U``, ``V``, ``cores``
    :class:`~lorazip.quantize.Stored` in ``storage_dtype`` (int8: data and row scales).
    """
    if refine:
        U, V = orth(U.double().cpu()), orth(V.double().cpu())
    Us, Vs = to_storage(U.cpu(), storage_dtype), to_storage(V.cpu(), storage_dtype)
    if U.shape[0] == 1 and fac.like.dtype == torch.float32:
        return (Us, Vs, *_measure_shared(fac, Us.values, Vs.values, cores, refine, storage_dtype, chunk, spectra))
    Ur, Vr = Us.values.double(), Vs.values.double()
    bases = StoredBases(Ur, Vr)
    assign = None if assign is None else assign.long().cpu()
    out: dict[str, list] = {"c": [], "e": [], "n": [], "s": []}
    for ch in fac.split(chunk):
        B, A = ch.B.cpu().double(), ch.A.cpu().double()
        k = None if assign is None else assign[ch.start : ch.stop]
        c = bases.cores(optimal_cores(B, A, Ur, Vr, k), k) if refine else cores[ch.start : ch.stop].cpu()
        c = to_storage(c, storage_dtype)
        GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
        n2 = (GB * GA).sum(dim=(1, 2))
        e2, _ = squared_errors(B, A, Ur, Vr, c.values, k, norms2=n2)
        for key, x in zip("cens", (c, e2, n2, spectra_from_grams(GB, GA))):
            out[key].append(x)
        del ch, B, A  # a streamed chunk is freed before the next one is read
    e2, n2, sv = (torch.cat(out[key]) for key in "ens")
    return Us, Vs, cat_stored(out["c"]), e2, n2, sv


def _products(ch: Chunk, U, V):
    """``(B_i^T U, A_i V, B_i^T B_i, A_i A_i^T)`` of a chunk, in its dtype and on its device, then
    float64 on the CPU: the first two as one matrix product each (the chunk's ``(c r_i, d)`` layouts),
    the Grams as the chunk has them (the solver made them already)."""
    D = (ch.Bt2 @ U.to(ch.Bt2)).reshape(ch.size, ch.rank, U.shape[1])
    C = (ch.A2 @ V.to(ch.A2)).reshape(ch.size, ch.rank, V.shape[1])
    return tuple(x.cpu().double() for x in (D, C, ch.GB, ch.GA))


def _measure_shared(fac: Factors, Ur, Vr, cores, refine: bool, storage_dtype: str, chunk: int, spectra=None):
    """:func:`round_and_measure` for one shared basis and float32 factors (see there; ``spectra`` from the
    solver: each chunk's from the same Grams, but those of the adapters measured again in float64)."""
    bases = StoredBases(Ur, Vr)
    U, V = Ur[0], Vr[0]
    out: dict[str, list] = {"c": [], "e": [], "n": [], "s": []}
    for ch in fac:
        D, C, GB, GA = _products(ch, U, V)
        c = bases.cores(D.transpose(1, 2) @ C) if refine else cores[ch.start : ch.stop].cpu().double()
        e2, n2 = bases.errors(D, C, GB, GA, to_storage(c, storage_dtype).values.double())
        low = torch.nonzero(e2 < FLOAT32_MIN_ERROR * n2).flatten()  # (an all-zero delta is exact as it is)
        for s in range(0, len(low), chunk):  # again in float64
            idx = low[s : s + chunk]
            p = _products(Chunk(0, ch.B[idx].cpu().double(), ch.A[idx].cpu().double()), U, V)
            for t, x in zip((D, C, GB, GA), p):
                t[idx] = x
            if refine:
                c[idx] = bases.cores(p[0].transpose(1, 2) @ p[1])
        stored = to_storage(c, storage_dtype)
        e2, n2 = bases.errors(D, C, GB, GA, stored.values.double())
        if spectra is None:
            sv = spectra_from_grams(GB, GA)
        else:
            sv = spectra[ch.start : ch.stop].double().clone()
            if len(low):
                sv[low] = spectra_from_grams(GB[low], GA[low])
        for key, x in zip("cens", (stored, e2, n2, sv)):
            out[key].append(x)
        del ch  # a streamed chunk is freed before the next one is read
    e2, n2, sv = (torch.cat(out[key]) for key in "ens")
    return cat_stored(out["c"]), e2, n2, sv


def stored_residual(B, A, U64, V64, S64, k: torch.Tensor, assign, storage_dtype: str, bits, B32, A32):
    """A chunk's residual parts of ranks ``k`` against the stored shared part, as stored and as a reader
    gets them back (:func:`~lorazip.quantize.store_residual`'s ``(bs, as_, bq, aq)``), from float64
    factors ``B``, ``A`` (``B32``, ``A32``: the same in the dtype they were read in). Parts stored below
    float32 (low-bit, int8, 16-bit) come from float32 rows (:func:`~lorazip.solvers.residual.residual_rows`:
    the same small SVD, the products with the factors in float32), float32 parts from float64."""
    if storage_dtype == "float32" and bits is None:
        return store_residual(*residual_factors(B, A, U64, V64, S64, k, assign), k, storage_dtype, bits)
    f32 = [t if t.dtype == torch.float32 else None for t in (B32, A32)]
    return store_rows(*residual_rows(B, A, U64, V64, S64, k, assign, *f32), k, storage_dtype, bits)
