"""Per-adapter residual parts: the truncated SVD of what the shared part leaves, from factors.

For one module the shared part keeps ``U S_i V^T`` of ``M_i = B_i A_i``; the residual
``R_i = M_i - U S_i V^T = [B_i, -U S_i] [A_i; V^T]`` has rank at most ``r_i + r``. Its SVD
comes from triangular-like factors of ``[B_i, -U S_i] = Q_1 R_1`` and ``[A_i^T, V] = Q_2 R_2``
(from the small Grams where both are well conditioned, else thin QRs) and the SVD of the small
``R_1 R_2^T``, so no ``d x d`` matrix is formed. ``r = 0`` is the adapter's own
truncated SVD.

For the allocator, :func:`nested_residual_spectra` gives the residual spectra at many shared
ranks ``r`` of nested bases ``U_R X_r``, ``V_R Y_r`` at once: each adapter's residual lives in
``span([B_i, U_R]) x span([A_i^T, V_R])`` for every ``r``, so one pair of small Grams per
adapter serves all ranks, and each rank costs one small symmetric eigenproblem per adapter.
"""

from __future__ import annotations

import torch

from .factors import float64_chunk


def _stack_factors(B, A, U, V, S):
    """``[B_i, -U S_i]`` (n, d_out, r_i + r) and ``[A_i^T, V]`` (n, d_in, r_i + r)."""
    n = B.shape[0]
    if U.shape[-1] == 0:
        return B, A.transpose(1, 2)
    US = U @ S if U.dim() == 3 else torch.matmul(U[None], S)
    Vb = V.expand(n, *V.shape[-2:]) if V.dim() == 2 else V
    return torch.cat([B, -US], 2), torch.cat([A.transpose(1, 2), Vb], 2)


# The Gram route is taken for an adapter whose two m x m Grams have smallest / largest eigenvalue at
# least this (condition number of each stacked factor <= 1e4): its singular vectors are then accurate
# to about cond^2 * eps = 1e-8 of the residual, below the rounding of every storage but float32's
# (whose rows round at 6e-8), and the Grams' eigenvalues, accurate to eps of the largest, tell it
# reliably. Others (a shared part inside an adapter's own span makes ``[B_i, -U S_i]`` rank-deficient)
# take Householder QR.
_GRAM_COND = 1e-8


def residual_svd(B, A, U, V, S):
    """SVD of every residual ``M_i - U S_i V^T`` from factors.

    B : (n, d_out, r_i), A : (n, r_i, d_in) float64; U : (d_out, r) or (n, d_out, r) (per adapter,
    e.g. gathered cluster bases); V likewise; S : (n, r, r).
    Returns ``(P, s, Q)``: P (n, d_out, k), s (n, k) descending, Q (n, d_in, k), ``k = min(d_out, d_in,
    m)``, ``m = r_i + r``.

    With ``L = [B_i, -U S_i] = Q_L R_L`` and ``Rt = [A_i^T, V] = Q_R R_R`` the residual is
    ``Q_L (R_L R_R^T) Q_R^T``: the SVD of the small middle matrix gives it. Where both stacked factors
    are well conditioned (:data:`_GRAM_COND`), ``R`` comes from the eigendecomposition of the Gram
    ``L^T L = V_L D_L V_L^T`` (``Q_L = L V_L D_L^{-1/2}``, ``R_L = D_L^{1/2} V_L^T``) and the
    singular vectors are one product of each factor with an ``m x m`` matrix: a third of the time of
    two thin QRs and the products with ``Q``; elsewhere two thin QRs.
    """
    return factor_svd(*_stack_factors(B, A, U, V, S))


def factor_svd(L, Rt, grams: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``(P, s, Q)``: the SVD of every ``L_i Rt_i^T`` from its factors ``L`` (n, d_out, m), ``Rt`` (n,
    d_in, m), float64, ``k = min(d_out, d_in, m)`` columns (:func:`residual_svd`'s routes: the Grams'
    eigendecompositions where both factors are well conditioned, two thin QRs elsewhere). ``grams``:
    ``(L^T L, Rt^T Rt)`` where the caller has them (not made again)."""
    n, m = L.shape[0], L.shape[2]
    k = min(L.shape[1], Rt.shape[1], m)
    if n == 0 or k == 0:
        return L.new_empty(n, L.shape[1], k), L.new_empty(n, k), Rt.new_empty(n, Rt.shape[1], k)
    if k < m:  # more columns than rows: the Grams are singular
        return _qr_route(L, Rt, k)
    good, (eL, VL, eR, VR) = _gram_eigs(L, Rt, grams)
    if bool(good.all()):  # the common case: no copies of the factors
        return _gram_route(L, Rt, eL, VL, eR, VR)
    if not bool(good.any()):
        return _qr_route(L, Rt, k)
    out = (L.new_empty(n, L.shape[1], k), L.new_empty(n, k), Rt.new_empty(n, Rt.shape[1], k))
    fast, slow = torch.nonzero(good).flatten(), torch.nonzero(~good).flatten()
    for rows, got in ((fast, _gram_route(L[fast], Rt[fast], eL[fast], VL[fast], eR[fast], VR[fast])),
                      (slow, _qr_route(L[slow], Rt[slow], k))):
        for whole, part in zip(out, got):
            whole[rows] = part
    return out


def _gram_eigs(L, Rt, grams: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``(good, (eL, VL, eR, VR))``: the eigendecompositions of the stacked factors' Grams (``grams``
    where given) and which adapters may take the Gram route (both Grams conditioned within
    :data:`_GRAM_COND`, neither zero)."""
    GL, GR = (L.transpose(1, 2) @ L, Rt.transpose(1, 2) @ Rt) if grams is None else grams
    eL, VL = torch.linalg.eigh(GL)
    eR, VR = torch.linalg.eigh(GR)
    good = (eL[:, 0] >= _GRAM_COND * eL[:, -1]) & (eR[:, 0] >= _GRAM_COND * eR[:, -1]) & (eL[:, -1] > 0) & (
        eR[:, -1] > 0)
    return good, (eL, VL, eR, VR)


def _gram_mixers(eL, VL, eR, VR):
    """``(M_L, s, M_R)`` of well-conditioned stacked factors from their Grams' eigendecompositions: the
    residual's singular values ``s`` and the ``m x m`` matrices that give its singular vectors,
    ``L M_L`` and ``Rt M_R``."""
    hL, hR = eL.sqrt(), eR.sqrt()
    W, s, Zh = torch.linalg.svd(hL[:, :, None] * (VL.transpose(1, 2) @ VR) * hR[:, None, :])
    return VL @ (W / hL[:, :, None]), s, VR @ (Zh.transpose(1, 2) / hR[:, :, None])


def _gram_route(L, Rt, eL, VL, eR, VR):
    """:func:`residual_svd` of well-conditioned stacked factors from their Grams' eigendecompositions."""
    ML, s, MR = _gram_mixers(eL, VL, eR, VR)
    return L @ ML, s, Rt @ MR


def _qr_route(L, Rt, k: int):
    """:func:`residual_svd` from two thin Householder QRs ``L = Q_1 R_1``, ``Rt = Q_2 R_2`` (any
    conditioning) and the SVD ``R_1 R_2^T = W diag(s) Z^T``: ``Q_1 W``, ``s``, ``Q_2 Z``, ``k`` columns."""
    Q1, R1 = torch.linalg.qr(L)
    Q2, R2 = torch.linalg.qr(Rt)
    W, s, Zh = torch.linalg.svd(R1 @ R2.transpose(1, 2))
    return Q1 @ W[:, :, :k], s[:, :k], Q2 @ Zh.transpose(1, 2)[:, :, :k]


def _residual_cap(B, A, U, ranks: torch.Tensor) -> int:
    """The most residual components any adapter keeps: its requested ``ranks``, at most the rank every
    residual has at most."""
    cap = min(B.shape[1], A.shape[2], B.shape[2] + U.shape[-1])
    return min(int(ranks.max()), cap) if ranks.numel() else 0


def _groups(U, V, ranks: torch.Tensor, assign):
    """``(U_c, V_c, rows)`` of each cluster (one for 2-D bases; ``assign`` (n,) each adapter's, all
    cluster 0 when None) with the adapters of it that keep a residual, taken one cluster at a time (no
    per-adapter copies of the bases); clusters with none are left out."""
    groups = [(U, V, ranks > 0)] if U.dim() == 2 else [
        (U[c], V[c], (ranks > 0) & (assign == c if assign is not None else c == 0)) for c in range(U.shape[0])]
    for Uc, Vc, sel in groups:
        rows = torch.nonzero(sel).flatten()
        if len(rows):
            yield Uc, Vc, rows


def _roots(s, k_max: int, keep):
    """Square roots of the first ``k_max`` singular values, zero where ``keep`` (n, k_max) is: what each
    factor of a kept component carries."""
    return s[:, :k_max].clamp_min(0).sqrt() * keep


def residual_factors(B, A, U, V, S, ranks: torch.Tensor, assign: torch.Tensor | None = None):
    """Truncated SVD of each residual at rank ``ranks[i]``, split evenly between the factors:
    ``b`` (n, d_out, k_max), ``a`` (n, k_max, d_in), zero beyond each adapter's rank.

    ``U``, ``V``: (d, r) bases, or (K, d, r) the bases of K clusters with ``assign`` (n,) each
    adapter's (all cluster 0 when None), taken one cluster at a time (no per-adapter copies)."""
    n, d_out, d_in = B.shape[0], B.shape[1], A.shape[2]
    k_max = _residual_cap(B, A, U, ranks)
    b, a = B.new_zeros(n, d_out, k_max), A.new_zeros(n, k_max, d_in)
    if k_max == 0:
        return b, a
    for Uc, Vc, rows in _groups(U, V, ranks, assign):
        P, s, Q = residual_svd(B[rows], A[rows], Uc, Vc, S[rows])
        keep = (torch.arange(k_max)[None, :] < ranks[rows][:, None]).to(s.dtype)
        root = _roots(s, k_max, keep)
        b[rows] = P[:, :, :k_max] * root[:, None, :]
        a[rows] = (Q[:, :, :k_max] * root[:, None, :]).transpose(1, 2)
    return b, a


def residual_rows(B, A, U, V, S, ranks: torch.Tensor, assign: torch.Tensor | None = None, B32=None, A32=None):
    """:func:`residual_factors` as float32 rows: ``b_i^T`` (n, k_max, d_out) and ``a_i`` (n, k_max, d_in),
    zero beyond each adapter's rank, for parts stored below float32 precision.

    The decisions and the small SVD are :func:`residual_factors`'s, from the same float64 Grams; only
    the products with the factors, two thirds of its work and most of its memory traffic, are made
    in float32 (``B32``, ``A32``: the factors in float32, converted from ``B``, ``A`` if not given)
    and give the rows in the layout they are stored in (no transposed copies). Each row's values are
    then within about ``cond * 6e-8`` of the float64 ones (``cond <= 1e4``, :data:`_GRAM_COND`; about
    1 on real collections): far below the rounding of 16-bit, int8 and low-bit storage, whose errors
    are measured on the stored values anyway. Ill-conditioned adapters take the float64 QR route."""
    n, d_out, d_in = B.shape[0], B.shape[1], A.shape[2]
    k_max = _residual_cap(B, A, U, ranks)
    rb, ra = torch.zeros(n, k_max, d_out), torch.zeros(n, k_max, d_in)
    if k_max == 0:
        return rb, ra
    B32 = B.float() if B32 is None else B32
    A32 = A.float() if A32 is None else A32
    for Uc, Vc, rows in _groups(U, V, ranks, assign):
        whole = len(rows) == n
        Bs, As, Ss = (B, A, S) if whole else (B[rows], A[rows], S[rows])
        L, Rt = _stack_factors(Bs, As, Uc, Vc, Ss)
        keep = (torch.arange(k_max)[None, :] < ranks[rows][:, None]).double()
        if min(L.shape[1], Rt.shape[1]) < L.shape[2]:  # the Grams are singular: QR (float64)
            rb[rows], ra[rows] = _qr_rows(L, Rt, k_max, keep)
            continue
        good, (eL, VL, eR, VR) = _gram_eigs(L, Rt)
        fast = torch.nonzero(good).flatten()
        if len(fast):
            every = len(fast) == len(rows)  # the common case: no gathered copies
            f = slice(None) if every else fast
            ML, s, MR = _gram_mixers(eL[f], VL[f], eR[f], VR[f])
            root = _roots(s, k_max, keep[f])
            # rows b_i^T = (M_L[:, :k] root)^T L_i^T, likewise a_i from T_i
            mb = (ML[:, :, :k_max] * root[:, None, :]).transpose(1, 2).float()
            ma = (MR[:, :, :k_max] * root[:, None, :]).transpose(1, 2).float()
            sub = rows[f]
            Lt, T = _stack_rows(B32 if whole and every else B32[sub], A32 if whole and every else A32[sub],
                                Uc, Vc, Ss[f])
            if whole and every:
                rb, ra = mb @ Lt, ma @ T
            else:
                rb[sub], ra[sub] = mb @ Lt, ma @ T
        slow = torch.nonzero(~good).flatten()
        if len(slow):
            rb[rows[slow]], ra[rows[slow]] = _qr_rows(L[slow], Rt[slow], k_max, keep[slow])
    return rb, ra


def _qr_rows(L, Rt, k_max: int, keep):
    """:func:`residual_rows` of stacked factors through :func:`_qr_route` (float64, any conditioning)."""
    P, s, Q = _qr_route(L, Rt, min(L.shape[1], Rt.shape[1], L.shape[2]))
    root = _roots(s, k_max, keep)
    return ((P[:, :, :k_max] * root[:, None, :]).transpose(1, 2).float(),
            (Q[:, :, :k_max] * root[:, None, :]).transpose(1, 2).float())


def _stack_rows(B32, A32, U, V, S):
    """``[B_i, -U S_i]^T`` (n, r_i + r, d_out) and ``[A_i; V^T]`` (n, r_i + r, d_in) in float32 (views of
    the factors where there is no shared part)."""
    if U.shape[-1] == 0:
        return B32.transpose(1, 2), A32
    n = B32.shape[0]
    US = (U @ S if U.dim() == 3 else torch.matmul(U[None], S)).float()
    Vt = (V.transpose(-1, -2) if V.dim() == 3 else V.T.expand(n, *V.T.shape)).float()
    return torch.cat([B32.transpose(1, 2), -US.transpose(1, 2)], 1), torch.cat([A32, Vt], 1)


def _psd_sqrt(G):
    """Symmetric square root of PSD matrices (n, m, m) (eigenvalues clipped at 0)."""
    evals, Q = torch.linalg.eigh(G)
    return (Q * evals.clamp_min(0).sqrt()[:, None, :]) @ Q.transpose(1, 2)


_JITTER = 1e-13  # relative to the largest diagonal entry: far below the curves' eps-level accuracy


def _gram_factor(G):
    """``F`` with ``F F^T = G`` for PSD matrices (n, m, m): Cholesky of ``G + jitter I`` (cheap),
    the symmetric square root where that fails (G numerically indefinite)."""
    m = G.shape[-1]
    if m == 0:
        return G
    tiny = _JITTER * G.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(G.dtype).tiny)
    F, info = torch.linalg.cholesky_ex(G + tiny[:, None, None] * torch.eye(m, dtype=G.dtype))
    bad = torch.nonzero(info).flatten()
    if len(bad):
        F[bad] = _psd_sqrt(G[bad])
    return F


def factor_products(B, A, U=None, V=None, chunk: int | None = None, grams: bool | None = None):
    """float64 ``(B^T B, A A^T)`` or, given bases, ``(B^T U, A V)`` (with ``grams=True`` all four:
    ``(B^T B, A A^T, B^T U, A V)``) of stacked factors in any dtype, converted ``chunk`` adapters at
    a time (no float64 copy of the factors; each chunk converted once and used while it is in cache:
    8 adapters' 4096 x 16 factors are 8 MB in float64; chunks of 64 made the products 1.8x slower at
    n = 1000, with the same results bit for bit there; other sizes may differ in the last bits,
    :func:`~lorazip.solvers.factors.float64_chunk`). By default :func:`~lorazip.solvers.factors.float64_chunk`
    (8 at those shapes; a small module's adapters at once)."""
    n = B.shape[0]
    if chunk is None:
        chunk = float64_chunk(B.shape[1], A.shape[2], B.shape[2])
    grams = U is None if grams is None else grams
    outs = None
    for s in range(0, n, chunk):
        b, a = B[s : s + chunk].double(), A[s : s + chunk].double()
        parts = (b.transpose(1, 2) @ b, a @ a.transpose(1, 2)) if grams else ()
        if U is not None:
            parts += (b.transpose(1, 2) @ U, a @ V)
        if outs is None:
            outs = [torch.empty((n, *p.shape[1:]), dtype=torch.float64) for p in parts]
        for o, p in zip(outs, parts):
            o[s : s + chunk] = p
    if outs is None:  # no adapters
        r = B.shape[2]
        shapes = ([(r, r)] * 2 if grams else []) + ([(r, U.shape[1])] * 2 if U is not None else [])
        return tuple(torch.zeros(0, *sh, dtype=torch.float64) for sh in shapes)
    return tuple(outs)


def nested_residual_spectra(B, A, U_R, V_R, S_R, XY: dict[int, tuple[torch.Tensor, torch.Tensor]],
                            products: tuple[torch.Tensor, ...] | None = None):
    """Residual squared singular values at several nested shared ranks, from small Grams.

    B, A : one module's factors (n, d_out, r_i), (n, r_i, d_in), float64; U_R (d_out, R), V_R
    (d_in, R) orthonormal top-rank bases, S_R (n, R, R) = U_R^T M_i V_R; ``XY[r] = (X_r, Y_r)``
    (R, r) orthonormal, defining the rank-r bases ``U_R X_r``, ``V_R Y_r`` with optimal cores
    ``X_r^T S_R Y_r``. Returns ``{r: (n, r_i + R)}`` squared singular values, descending
    (``r = 0``: those of ``M_i`` itself).

    At rank r the residual lives in ``span L_r x span T_r`` with ``L_r = [B_i, U_R X_r]`` and
    ``T_r = [A_i^T, V_R Y_r]``: it is ``L_r C_r T_r^T`` with the small ``C_r = diag(I, -X_r^T S_R
    Y_r)``, so its squared singular values are the eigenvalues of ``H^T C^T G_L C H`` with
    ``H H^T = G_T`` (a Cholesky factor; Grams ``G_L = L_r^T L_r``, ``G_T = T_r^T T_r``, made of ``B^T B``, ``B^T U_R X_r``, ``A A^T``,
    ``A V_R Y_r``), of size ``r_i + r``: nothing of size ``d`` beyond those products.
    ``products``: ``(B^T B, A A^T, B^T U_R, A V_R)``, float64, when the caller has them
    (:func:`factor_products`).
    """
    R = U_R.shape[1]
    if products is None:
        GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
        BU, AV = B.transpose(1, 2) @ U_R, A @ V_R  # (n, r_i, R)
    else:  # then B and A are not read (a streamed module passes None)
        GB, GA, BU, AV = products
    n, r_i = GB.shape[0], GB.shape[1]
    dt = GB.dtype
    out = {}
    for r, (X, Y) in XY.items():
        eye = torch.eye(r, dtype=dt).expand(n, r, r)
        BUr, AVr = BU @ X, AV @ Y  # (n, r_i, r)
        GL = torch.cat([torch.cat([GB, BUr], 2), torch.cat([BUr.transpose(1, 2), eye], 2)], 1)
        GT = torch.cat([torch.cat([GA, AVr], 2), torch.cat([AVr.transpose(1, 2), eye], 2)], 1)
        HT = _gram_factor(GT)  # HT HT^T = G_T: eig(HT^T C^T G_L C HT) = eig(C^T G_L C G_T)
        CH = torch.cat([HT[:, :r_i], -((X.T @ S_R @ Y) @ HT[:, r_i:])], 1)  # C_r HT, C_r block diagonal
        K = CH.transpose(1, 2) @ (GL @ CH)
        sv = torch.linalg.eigvalsh(0.5 * (K + K.transpose(1, 2))).flip(-1).clamp_min(0)
        out[r] = torch.cat([sv, sv.new_zeros(n, R - r)], 1)  # the residual has rank <= r_i + r
    return out
