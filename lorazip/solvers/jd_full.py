"""JD-Full: shared orthonormal bases ``U, V`` and a full ``r x r`` core per adapter.

Solves ``max_{U,V} sum_i w_i ||U^T M_i V||_F^2`` (the optimal cores are
``S_i = U^T M_i V``) by alternating block subspace iteration with Rayleigh-Ritz
(an inexact HOOI / Tucker-2 sweep), working only on the factors ``M_i = B_i A_i``.
Both steps apply an operator of one form, a sum over adapters of ``F_i^T C_i F_i``:

* V-step, for fixed U: ``G_V = sum_i w_i M_i^T U U^T M_i = sum_i A_i^T C_i A_i`` with the
  ``r_i x r_i`` coefficient ``C_i = w_i K_i K_i^T``, ``K_i = B_i^T U``;
* U-step, for fixed V: ``G_U = sum_i B_i D_i B_i^T`` with ``D_i = w_i L_i L_i^T``, ``L_i = A_i V``.

Stacking the ``F_i`` as one ``(n r_i, d)`` matrix makes each application two matrix
products. A step does Rayleigh-Ritz on ``span([V, G_V V])``, so the objective never
decreases; ``G_V V = A^T (C L)`` reuses ``L``, and the projected ``2r x 2r`` matrix is
``Z^T C Z`` with ``Z = A Q = [L, A Q_new]`` (``Q = [V, Q_new]``, ``Q_new`` an orthonormal basis of
the part of ``G_V V`` orthogonal to ``V``), whose columns also give the next ``L``: a sweep costs two
products of width ``r`` with each factor,
``O(n r_i r (d_in + d_out))``. Every pass is a sum over chunks
of adapters (:class:`~lorazip.solvers.factors.Factors`), so the same code runs in memory or
streams a module larger than memory. ``V`` starts from a randomized range of ``sum_i w_i M_i^T M_i``
and ``U`` from one of the U-step's operator for that ``V`` (data-driven, seeded; :func:`_start`). Iteration stops when both subspaces move less than ``tol``
(``||U - U_old U_old^T U||_F / ||U||_F``), when a sweep improves the objective by less than
``tol`` (relative), or after ``max_iters`` sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backend import mT, namespace
from ..backend import randn, to_torch
from .linalg import adapter_weights, orth, orth_complement, top_eigvecs
from .factors import Factors
from .svd import spectra_from_grams


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
    ``stopped``: the ascent ended early, where its ``stop`` said it held enough (:func:`jd_full_factors`).
    ``spectra``: each adapter's singular values (n, r_i), float64 from its Grams, where the start made them
    (:func:`_individual_or_start`), else None: the error pass takes them instead of making them again.
    """

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    n_iters: int
    converged: bool
    objective: float
    history: list[float] = field(default_factory=list)
    stopped: bool = False
    spectra: torch.Tensor | None = None


def _F2(ch, side: str):
    return ch.A2 if side == "A" else ch.Bt2


def _blocks(P, c: int, r: int):
    """(c r, k) -> (c, r, k)."""
    return namespace(P).reshape(P, (c, r, P.shape[-1]))


def _coefficients(projections, w_chunks):
    """``C_i = w_i P_i P_i^T`` per chunk, from the other side's projections ``P_i`` (r_i x r)."""
    return [wc[:, None, None] * (P @ mT(P)) for P, wc in zip(projections, w_chunks)]


def _apply(fac: Factors, side: str, C, X):
    """``sum_i F_i^T C_i F_i X``: one pass over the chunks."""
    xp, out = namespace(X), None
    for ch, Cc in zip(fac, C):
        F2 = _F2(ch, side)
        Y = mT(F2) @ xp.reshape(Cc @ _blocks(F2 @ X, *Cc.shape[:2]), (F2.shape[0], X.shape[1]))
        out = Y if out is None else out + Y
        del ch, F2  # a streamed chunk is freed before the next one is read
    return out


def _backproject(fac: Factors, side: str, C, P):
    """``sum_i F_i^T C_i P_i`` for known projections ``P_i = F_i X``: ``G X`` without ``F X``."""
    xp, out = namespace(fac.like), None
    for ch, Cc, Pc in zip(fac, C, P):
        F2 = _F2(ch, side)
        Y = mT(F2) @ xp.reshape(Cc @ Pc, (F2.shape[0], Pc.shape[2]))
        out = Y if out is None else out + Y
        del ch, F2  # a streamed chunk is freed before the next one is read
    return out


def _rayleigh_ritz(fac: Factors, side: str, C, Q, r: int, P=None):
    """Best ``r``-dimensional subspace of span(Q) (orthonormal) for ``G = sum_i F_i^T C_i F_i``.

    Returns ``(X, P, captured)``: the basis ``X = Q W``, its projections ``P_i = F_i X`` per
    chunk and ``tr(X^T G X)``. One pass: ``Q^T G Q = sum_i Z_i^T C_i Z_i`` with ``Z_i = F_i Q``.
    ``P``: the projections ``F_i Q[:, :k]`` of ``Q``'s first ``k`` columns where they are known
    (per chunk), so that only the other columns are multiplied by the factors.
    """
    xp, k = namespace(Q), 0 if P is None else P[0].shape[2]
    Z, T = [], None
    for i, (ch, Cc) in enumerate(zip(fac, C)):
        Zc = _blocks(_F2(ch, side) @ (Q if k == 0 else Q[:, k:]), *Cc.shape[:2])
        if k:
            Zc = xp.concat([P[i], Zc], axis=2)
        Tc = xp.sum(mT(Zc) @ (Cc @ Zc), axis=0)
        T = Tc if T is None else T + Tc
        Z.append(Zc)
        del ch
    W, evals = top_eigvecs(T, r)
    return Q @ W, [Zc @ W for Zc in Z], float(xp.sum(evals)), W


def _ritz_extended(fac: Factors, side: str, C, X, P, Y, r: int):
    """:func:`_rayleigh_ritz` on ``span([X, Y])`` for an orthonormal ``X`` whose projections
    ``P_i = F_i X`` are known: ``Q = [X, orth_complement(X, Y)]`` starts with ``X`` itself, so only the
    new columns are multiplied by the factors, half the products of the step.

    Returns ``(X_new, P_new, captured, moved)``; ``moved`` is how far the subspace moved,
    ``||X_new - X X^T X_new||_F / ||X_new||_F``, read off the Ritz vectors' coefficients on the new
    columns (``X_new = X W_1 + Q_new W_2`` with ``Q_new`` orthonormal and orthogonal to ``X``, so it is
    ``||W_2||_F / sqrt(r)``) without a product of width ``d``."""
    xp = namespace(X)
    X_new, P_new, cap, W = _rayleigh_ritz(fac, side, C, xp.concat([X, orth_complement(X, Y)], axis=1), r, P)
    W2 = W[X.shape[1]:, :]
    return X_new, P_new, cap, float(xp.linalg.vector_norm(W2)) / max(r, 1) ** 0.5


def _orthonormal(X):
    """``X`` if its columns are orthonormal (to 1e-4), else an orthonormal basis of their span: a
    sweep's Rayleigh-Ritz basis begins with ``X`` and reuses its projections, which needs it."""
    xp = namespace(X)
    err = float(xp.max(xp.abs(mT(X) @ X - xp.eye(X.shape[1], dtype=X.dtype, device=getattr(X, "device", None)))))
    return X if err <= 1e-4 else orth(X)


def _project(fac: Factors, side: str, X):
    """Projections ``F_i X`` per chunk, each (c, r_i, k)."""
    return [_blocks(_F2(ch, side) @ X, ch.size, ch.rank) for ch in fac]


def _chunk_weights(fac: Factors, w):
    """``w`` split like the chunks of ``fac`` (without reading them)."""
    return [w[s:e] for s, e in fac.spans()]


def _grams(fac: Factors, side: str, w_chunks):
    """``w_i F_i F_i^T`` per chunk (the coefficients of ``sum_i w_i M_i^T M_i`` on the other side)."""
    out = []
    for ch, wc in zip(fac, w_chunks):
        out.append(wc[:, None, None] * (ch.GA if side == "A" else ch.GB))
        del ch
    return out


def _init_side(fac: Factors, side: str, C, d: int, r: int, generator, n_power: int, oversample: int = 8):
    """Randomized subspace iteration for the top-``r`` eigenvectors of ``sum_i F_i^T C_i F_i``."""
    xp = namespace(fac.like)
    k = min(d, r + oversample)
    Q = orth(_apply(fac, side, C, randn(xp, fac.like, (d, k), generator)))
    for _ in range(n_power):
        Q = orth(_apply(fac, side, C, Q))
    return _rayleigh_ritz(fac, side, C, Q, r)[:3]


def norms_and_weights(fac: Factors, weighting: str, weights=None):
    """``(||M_i||^2, w_i)`` for every adapter, one pass."""
    xp = namespace(fac.like)
    parts = [xp.sum(ch.GB * ch.GA, axis=(1, 2)) for ch in fac]  # factor_norms2, from the chunk's Grams
    norms2 = parts[0] if len(parts) == 1 else xp.concat(parts)
    w = adapter_weights(norms2, weighting) if weights is None else _like(weights, fac.like)
    return norms2, w


def _components(fac: Factors) -> list:
    """Per chunk, each adapter's singular values (c, r), descending, from its Grams, with the Grams
    (float64, CPU) for :func:`_vectors` of the few adapters chosen later (a chunk in memory keeps its
    Grams; a streamed one is read again)."""
    out = []
    for ch in fac:
        GB, GA = (to_torch(G).double().cpu() for G in (ch.GB, ch.GA))
        out.append((spectra_from_grams(GB, GA), GB, GA))
        del ch
    return out


def _vectors(GB, GA):
    """The coefficients of adapters' singular vectors in their factors, from their Grams (float64):
    ``(X, Y)`` (k, r, r) with ``u_j = B_i X_i[:, j]`` and ``v_j = A_i^T Y_i[:, j]``. ``M_i = Q_b H_b H_a
    Q_a^T`` (``H`` the Grams' square roots, ``Q_b = B_i H_b^+``, ``Q_a = A_i^T H_a^+``) and ``H_b H_a =
    W S Z^T``: ``X = H_b^+ W``, ``Y = H_a^+ Z``."""
    Hb, Hb_inv = _root_and_pinv(GB)
    Ha, Ha_inv = _root_and_pinv(GA)
    W, _, Zh = torch.linalg.svd(Hb @ Ha)
    return Hb_inv @ W, Ha_inv @ Zh.transpose(1, 2)


def init_bases(
    B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, rank: int, generator: torch.Generator, n_power: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors of ``sum w_i M_i M_i^T`` and ``sum w_i M_i^T M_i`` from factors."""
    fac, wc = Factors.stacked(B, A), [w]
    V, _, _ = _init_side(fac, "A", _grams(fac, "B", wc), fac.d_in, rank, generator, n_power)
    U, _, _ = _init_side(fac, "B", _grams(fac, "A", wc), fac.d_out, rank, generator, n_power)
    return U, V


def _start(fac: Factors, wc, rank: int, generator, n_power: int | None):
    """``(U, K, V, L)``: the start of the ascent, with the projections ``K_i = B_i^T U``, ``L_i = A_i V``.

    ``V`` from a randomized range of ``sum_i w_i M_i^T M_i`` (``n_power`` power iterations), then
    ``U`` from one of the U-step's own operator ``G_U(V)``: the first half-sweep, sketched. ``None``:
    one power iteration while the stacked factors are wider than tall (``n r_i < d_in``: few adapters
    for the dimension, where the ascent runs many sweeps and a better start saves some), none
    otherwise (many adapters: the operator's tail is too flat for a power step to sharpen the start,
    and one or two sweeps finish; at 1000 Lots-of-LoRAs adapters the power step was an eighth of the
    run). With one, six reads of the factors and eight products with them; without, five and six (both
    bases from their Grams with two power iterations each took ten reads and sixteen products).
    benchmarks/solver_start.py: at n = 1000 the solve takes 0.6x the time at the same errors, at n = 64
    and 128 about the same time and errors (within 2e-4), lower errors on the bundled and GPT-2 ones."""
    V, L, _ = _start_v(fac, wc, rank, generator, n_power)
    U, K, _ = _init_side(fac, "B", _coefficients(L, wc), fac.d_out, rank, generator, 0)
    return U, K, V, L


def _start_v(fac: Factors, wc, rank: int, generator, n_power: int | None):
    """The first half of :func:`_start`: ``(V, L, tr(V^T G_V V))`` for the V-step's operator of the
    weighted Grams, ``G_V = sum_i w_i M_i^T M_i``."""
    if n_power is None:
        n_power = 1 if fac.n * fac.rank < fac.d_in else 0
    return _init_side(fac, "A", _grams(fac, "B", wc), fac.d_in, rank, generator, n_power)


def _individual_or_start(fac: Factors, wc, energies, rank: int, generator, n_power: int | None, captured):
    """``((U, K, V, L), spectra)``: :func:`_individual_start` where its components hold :data:`_INDIVIDUAL_GAIN`
    times what :func:`_start` does, else :func:`_start` (the same result as deciding after both), and every
    adapter's singular values (n, r_i) where they were made to choose components (else None).
    ``energies``: ``w_i ||M_i||^2`` (n,).

    The data-driven ``V`` holds at most ``tr(V^T G_V V)`` whatever ``U`` (``||U^T M_i V|| <= ||M_i V||``):
    where the single components hold twice that, the U half of the data-driven start is not made. No
    ``r`` components hold more than the ``r`` largest energies: where those are under twice what the
    data-driven start holds (adapters that share directions), no adapter's SVD is made."""
    most = float(torch.sort(to_torch(energies).double().cpu().flatten(), descending=True).values[:rank].sum())
    V, L, bound = _start_v(fac, wc, rank, generator, n_power)
    def enough(held: float, than: float) -> bool:
        return held > 0 and held >= _INDIVIDUAL_GAIN * than

    def spectra(chosen):
        parts = [S for S, _, _ in chosen[0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    chosen = None
    if most >= _INDIVIDUAL_GAIN * bound:
        chosen = _best_components(fac, wc, rank)
        alt = _individual_start(fac, chosen, rank, None, V) if enough(chosen[3], bound) else None
        if alt is not None:
            return alt, spectra(chosen)
    U, K, _ = _init_side(fac, "B", _coefficients(L, wc), fac.d_out, rank, generator, 0)
    c0 = captured(K, L)
    if most < _INDIVIDUAL_GAIN * c0:
        return (U, K, V, L), None if chosen is None else spectra(chosen)
    chosen = chosen if chosen is not None else _best_components(fac, wc, rank)
    alt = _individual_start(fac, chosen, rank, U, V) if enough(chosen[3], c0) else None
    return ((U, K, V, L) if alt is None else alt), spectra(chosen)


def jd_full(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int,
    **kw,
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
        times the larger of the captured and the lost fraction: the error has then converged
        even where near-degenerate directions still rotate (flat spectra converge slowly in
        subspace, not in error).
    seed : seeds the randomized initialisation.
    U0, V0 : warm start (orthonormal columns); the randomized init is skipped.

    Returns
    -------
    JDResult with cores ``S_i = U^T M_i V`` of shape (n, r, r).
    """
    return jd_full_factors(Factors.stacked(B, A), rank, **kw)


def jd_full_factors(
    fac: Factors,
    rank: int,
    *,
    weights=None,
    weighting: str = "relative",
    max_iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
    U0=None,
    V0=None,
    tol_scale: float = 1.0,
    n_power: int | None = None,
    second_start: bool = True,
    stop: Callable[[float], bool] | None = None,
) -> JDResult:
    """:func:`jd_full` on :class:`~lorazip.solvers.factors.Factors`: in memory or streamed
    chunk by chunk (each sweep reads every chunk four times).

    ``stop``: called with the weighted captured energy ``sum w_i ||U^T M_i V||^2`` (absolute, in the
    solver's precision and weights) at the start and after every sweep; where it returns True the
    ascent ends there (``stopped=True``, not converged). The ascent never lowers that energy, so a
    caller that only needs to know the optimum holds at least some amount (pass 1 deciding to fit a
    larger rank) learns it without the sweeps to convergence.

    The objective is not concave: alternating ascent from the data-driven start can stop at a
    local maximum. Where the theory gives a bound, at rank ``r >= n`` (the span of every adapter's
    leading ``r // n`` singular directions is then feasible, and holds each adapter's truncated SVD),
    a second ascent starts from that span and the better of the two is returned, so the result is
    never worse than per-adapter truncated SVD at rank ``r // n`` (mean relative error). At ``r < n``
    the ascent starts from the span of the ``r`` singular directions of single adapters that hold the
    most weighted energy instead, where those alone hold at least twice what the data-driven start
    holds (:func:`_individual_start`: adapters that share little). ``second_start=False`` skips both (the
    allocator's pass 1, which weighs per-adapter SVD itself)."""
    d_out, d_in = fac.d_out, fac.d_in
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    args = dict(weights=weights, weighting=weighting, max_iters=max_iters, tol=tol, seed=seed, tol_scale=tol_scale,
                n_power=n_power)
    res = _ascend(fac, rank, U0=U0, V0=V0, individual=second_start and fac.n > rank, stop=stop, **args)
    if res.stopped:
        return res
    if second_start and U0 is None and V0 is None and 2 <= fac.n <= rank:
        U1, V1 = _union_start(fac, rank, res.U, res.V)
        alt = _ascend(fac, rank, U0=U1, V0=V1, individual=False, **args)
        if alt.objective > res.objective:
            alt.n_iters += res.n_iters
            return alt
    return res


def _union_start(fac: Factors, rank: int, U, V):
    """Bases spanning every adapter's leading ``rank // n`` left and right singular directions (from
    its factors), completed to ``rank`` columns by the directions of ``U``, ``V``."""
    k = rank // fac.n
    left, right = [], []
    for ch in fac:
        B, A = to_torch(ch.B).double().cpu(), to_torch(ch.A).double().cpu()
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.transpose(1, 2))
        W, _, Zh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))
        left.append((Qb @ W[:, :, :k]).transpose(1, 2).reshape(-1, B.shape[1]))
        right.append((Qa @ Zh.transpose(1, 2)[:, :, :k]).transpose(1, 2).reshape(-1, A.shape[2]))

    U1, V1 = (_like(_spanning(torch.cat(rows), X, rank), fac.like) for rows, X in ((left, U), (right, V)))
    if U1.shape[1] < rank or V1.shape[1] < rank:  # degenerate: fewer independent directions than rank
        return U, V
    return U1, V1


_INDIVIDUAL_GAIN = 2.0  # single adapters' directions replace the data-driven start where they hold this much more


def _best_components(fac: Factors, wc, rank: int):
    """The ``rank`` singular components of single adapters with the most weighted energy
    ``w_i sigma_ij^2`` (every adapter's from its Grams, :func:`_components`): ``(comps, adapters,
    indices, held)``, ``held`` their energies' sum (0 where every adapter is zero)."""
    comps = _components(fac)
    scores = [to_torch(w).double().cpu()[:, None] * S.square() for w, (S, _, _) in zip(wc, comps)]
    flat = torch.cat(scores).flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:rank]
    order = order[flat[order] > 0]
    width = scores[0].shape[1]
    return comps, order // width, order % width, float(flat[order].sum())


def _individual_start(fac: Factors, chosen, rank: int, U, V):
    """``(U, K, V, L)`` spanning the components ``chosen`` (:func:`_best_components`, at least one), with
    their projections; ``U``, ``V``: the data-driven bases, which complete the spans where the chosen
    directions span fewer than ``rank`` (``U`` None: then ``None``).

    ``U^T M_i V`` holds every chosen component of adapter ``i`` exactly (its left and right vectors are
    in the spans, and orthogonal to the adapter's others), so the objective of this start is at least
    the chosen energies' sum: known from each adapter's small SVD (from the Grams ``B_i^T B_i``,
    ``A_i A_i^T`` every chunk holds), before any product with the factors. Where adapters share little,
    the data-driven start mixes all of them and the ascent spends its sweeps concentrating on a few
    (64 iid Lots-of-LoRAs-shaped adapters at rank 32: captured 0.004 at the start, 0.036 after 8-10
    sweeps); this start holds 0.037-0.041 (6-14x the data-driven start) and is a local maximum within a
    sweep. Where adapters share directions the data-driven start holds about as much (the bundled and
    fixture collections: 1.0-1.5x) and its ascent ends higher (GPT-2's c_attn at ranks 1-3: 0.16-0.41
    against 0.13-0.37 from this start, at 1.01-1.18x); no module measured (the bundled, GPT-2 and
    DistilBERT collections at ranks 1-16, the tests' collections, 64 iid adapters) ended lower from this
    start at 2x or more (docs/method.md), hence :data:`_INDIVIDUAL_GAIN`.
    ``M_i = B_i A_i`` with ``B_i = Q_b H_b``, ``A_i^T = Q_a H_a`` (``H`` the Grams' square roots) and
    ``H_b H_a = W S Z^T``: the components' vectors are ``B_i H_b^+ w_j`` and ``A_i^T H_a^+ z_j``.
    Reads the chunks that hold a chosen adapter once more, and every chunk for the projections."""
    xp = namespace(fac.like)
    comps, pick_i, pick_j, _ = chosen
    cols_u, cols_v = [], []
    for (start, stop), ch, (_, GB, GA) in zip(fac.spans(), fac, comps):
        here = (pick_i >= start) & (pick_i < stop)
        if not bool(here.any()):
            continue
        i, j = pick_i[here] - start, pick_j[here]
        cb, ca = _vectors(GB[i], GA[i])
        at = torch.arange(len(i))
        B = to_torch(xp.take(ch.B, xp.asarray(i.numpy(), device=getattr(fac.like, "device", None)), axis=0))
        A = to_torch(xp.take(ch.A, xp.asarray(i.numpy(), device=getattr(fac.like, "device", None)), axis=0))
        cols_u.append((B.double().cpu() @ cb[at, :, j, None])[..., 0])
        cols_v.append((A.double().cpu().transpose(1, 2) @ ca[at, :, j, None])[..., 0])
        del ch
    U1, V1 = (_like(_spanning(torch.cat(cols), X, rank), fac.like) for cols, X in ((cols_u, U), (cols_v, V)))
    if U1.shape[1] < rank or V1.shape[1] < rank:  # fewer independent directions than the rank (U None)
        return None
    return U1, _project(fac, "B", U1), V1, _project(fac, "A", V1)


def _root_and_pinv(G):
    """Square root and pseudo-inverse square root of PSD Grams (n, r, r), eigenvalues under ``1e-12``
    times each one's largest taken as zero (padding, rank-deficient factors)."""
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(0)
    keep = lam > 1e-12 * lam.amax(-1, keepdim=True).clamp_min(1e-300)
    root = lam.sqrt()
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return (Q * root[:, None, :]) @ Q.transpose(1, 2), (Q * inv[:, None, :]) @ Q.transpose(1, 2)


def _spanning(rows, X, rank: int):
    """An orthonormal basis (d, at most ``rank``; float64, CPU) of the span of ``rows`` (k, d), completed
    by the directions of ``X`` (if given) where they span fewer than ``rank``."""
    cols = rows.T if X is None else torch.cat([rows.T, to_torch(X).double().cpu()], 1)
    Q, R = torch.linalg.qr(cols)
    keep = R.diagonal().abs() > 1e-10 * max(float(R.diagonal().abs().max()), 1e-300)
    return Q[:, keep][:, :rank].contiguous()


def _ascend(fac: Factors, rank: int, *, weights, weighting: str, max_iters: int, tol: float, seed: int, U0, V0,
            tol_scale: float, n_power: int | None, individual: bool = False,
            stop: Callable[[float], bool] | None = None) -> JDResult:
    """Alternating ascent from ``U0``, ``V0`` (or the data-driven start; with ``individual``, from
    :func:`_individual_start` where that holds twice as much), ended early where it holds
    ``stop`` (:func:`jd_full_factors`)."""
    xp = namespace(fac.like)
    individual = individual and U0 is None and V0 is None
    norms2, w = norms_and_weights(fac, weighting, weights)
    total = float(xp.sum(w * norms2))
    wc = _chunk_weights(fac, w)

    def captured(K, L):
        return sum(float(xp.sum(wi[:, None, None] * (mT(Ki) @ Li) ** 2)) for Ki, Li, wi in zip(K, L, wc))

    sv = None
    if individual and total:
        (U, K, V, L), sv = _individual_or_start(fac, wc, w * norms2, rank, torch.Generator().manual_seed(seed),
                                                n_power, captured)
    elif U0 is None or V0 is None:
        U, K, V, L = _start(fac, wc, rank, torch.Generator().manual_seed(seed), n_power)
    else:
        U, V = (_orthonormal(_like(X, fac.like)) for X in (U0, V0))
        K, L = _project(fac, "B", U), _project(fac, "A", V)
    history = [captured(K, L) / total if total else 1.0]
    converged = False
    it = 0

    def holds() -> bool:
        return stop is not None and total > 0 and bool(stop(history[-1] * total))

    stopped = holds()  # the start may hold it already: no sweep
    for it in range(1, 1 if stopped else max_iters + 1):
        C = _coefficients(K, wc)  # V-step: G_V = sum_i A_i^T C_i A_i
        V, L, _, moved_V = _ritz_extended(fac, "A", C, V, L, _backproject(fac, "A", C, L), rank)
        D = _coefficients(L, wc)  # U-step: G_U = sum_i B_i D_i B_i^T
        U, K, cap, moved_U = _ritz_extended(fac, "B", D, U, K, _backproject(fac, "B", D, K), rank)
        history.append(cap / total if total else 1.0)
        gain = history[-1] - history[-2]
        # relative to the larger of captured and lost energy: when little can be captured (flat
        # spectra), the error is what must be accurate, not the small captured fraction
        scale = max(history[-1], 1.0 - history[-1])
        if holds():
            stopped = True
            break
        if max(moved_U, moved_V) < tol or gain <= tol * tol_scale * scale:
            converged = True
            break
    parts = [mT(Ki) @ Li for Ki, Li in zip(K, L)]
    cores = parts[0] if len(parts) == 1 else xp.concat(parts)
    return JDResult(U, V, cores, it, converged, history[-1], history, stopped, sv)
