"""Activation-aware compression: every solver runs on whitened factors.

With calibration statistics (:mod:`lorazip.calibrate`) a module's input second moment per token
``C = (1/N) sum_t x_t x_t^T`` is regularised and factored once per module,
``C + lambda * mean(diag C) * I = L L^T`` (Cholesky, ``L`` lower triangular, d_in x d_in). Then for
any ``D`` (d_out x d_in) ``||D L||_F^2 = tr(D C_reg D^T)``, the mean squared output error of ``D``
on the calibration inputs (plus ``lambda`` times a weight error). So the activation error of
``M_i - M_hat_i`` is the plain weight error of ``(M_i - M_hat_i) L``, and the whole solver stack
(JD-Full, JD-Diag, clusters, per-adapter SVD, the allocators and their residual parts) runs
unchanged on the whitened factors ``(B_i, A_i L)``: ``A_i L`` is ``r_i x d_in``, nothing of size
``d x d`` is formed from the adapters. A solution ``U S_i V'^T`` in whitened coordinates maps back
to ``U S_i V^T`` with ``V = L^{-T} V'`` (a triangular solve), residual factors ``a_i`` likewise;
``U`` and the cores are unchanged, so serving and export (which only multiply) are too.

Embeddings: the delta lorazip stores is the ``(num_embeddings, dim)`` table, its rows picked by
one-hot token ids, so the metric weighs rows: ``||G (M - M_hat)||^2`` with ``G = diag(g)``,
``g_t = sqrt(p_t + lambda * mean(p))``, ``p_t`` the share of tokens with id ``t``; whitened
factors ``(G B_i, A_i)``, and ``U = G^{-1} U'``.

:class:`WhitenedCollection` is a :class:`~lorazip.io.collection.Collection` whose
``module_factors`` return whitened factors (computed in float64 from the originals, then cast),
so every reader of factors (the module loop, read-ahead, streaming, the allocators) needs no
change. Where a module's solution is stored, :func:`finish_whitened` and :func:`build_mixed_module`
map the bases back, round them to the storage dtype and measure, exactly and in float64 from
re-read original factors, both the activation error (which the artifact's ``stats/sq_error``
then holds, like the whitened ``spectra/``) and the weight error (per adapter, summed over its
modules: ``stats/weight_sq_error``, ``stats/weight_norm2``, (n,)). ``meta["calibration"]`` records the statistics' sha256, ``lambda`` and
``whitened: true``: the stored ``V`` (``U`` for embeddings) is not orthonormal.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import OptionError, ValidationError
from ..io.collection import Collection
from ..metrics import squared_errors
from ..quantize import cat_stored, store_residual, to_storage
from ..solvers.linalg import orth
from ..solvers.residual import residual_factors
from ..solvers.svd import spectra_from_grams
from .measure import optimal_cores, round_and_measure, stored_residual

DEFAULT_LAMBDA = 1e-2  # chosen on held-out calibration text, docs/calibration.md#lambda


class ModuleWhitening:
    """The whitening of one module: ``L`` (d_in, d_in) lower triangular on the input side
    (``side="in"``), or ``g`` (d_out,) on the token side of an embedding (``side="out"``).
    ``identity``: the statistics are exactly ``I`` (nothing to do, bit for bit)."""

    def __init__(self, name: str, side: str, factor: torch.Tensor):
        self.name, self.side, self.factor = name, side, factor
        if side == "in":
            self.identity = bool(torch.equal(factor, torch.eye(factor.shape[0], dtype=factor.dtype)))
        else:
            self.identity = bool((factor == 1).all())

    @classmethod
    def from_moment(cls, name: str, moment: torch.Tensor, tokens: int, kind: str, lam: float) -> ModuleWhitening:
        """``C / N + lam * mean(diag(C / N)) * I``, factored (``moment``: (d, d) or token counts (d,))."""
        if tokens <= 0:
            raise ValidationError(f"module {name!r}: the calibration statistics hold no tokens")
        C = moment.double() / tokens
        diag = C if kind == "embedding" else torch.diagonal(C)
        mean = float(diag.mean())
        if not mean > 0:
            raise ValidationError(f"module {name!r}: its calibration inputs are all zero")
        if kind == "embedding":
            return cls(name, "out", (C + lam * mean).sqrt())
        Creg = C + (lam * mean) * torch.eye(C.shape[0], dtype=torch.float64) if lam else C
        L, info = torch.linalg.cholesky_ex(Creg)
        if int(info) != 0:
            raise OptionError(f"module {name!r}: the calibration statistics are singular ({tokens} tokens for "
                              f"d_in {C.shape[0]}); use a calibration lambda > 0 or more text")
        return cls(name, "in", L)

    # factors: B (n, d_out, r), A (n, r, d_in)
    def factors(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened ``(B, A L)`` or ``(G B, A)``, computed in float64, returned in the input dtype."""
        if self.identity:
            return B, A
        if self.side == "in":
            return B, (A.double() @ self.factor).to(A.dtype)
        return (self.factor[:, None] * B.double()).to(B.dtype), A

    def part(self, part: str, X: torch.Tensor) -> torch.Tensor:
        """One factor (``"A"`` or ``"B"``) whitened."""
        if self.identity or (part == "A") != (self.side == "in"):
            return X
        return (X.double() @ self.factor).to(X.dtype) if part == "A" else (self.factor[:, None] * X.double()).to(X.dtype)

    def _in_back(self, X: torch.Tensor) -> torch.Tensor:  # L^{-T} X for X (..., d_in, k)
        return torch.linalg.solve_triangular(self.factor.mT, X, upper=True)

    def _out_back(self, X: torch.Tensor) -> torch.Tensor:  # G^+ X: rows of tokens never seen (lambda = 0) are 0
        g = self.factor[:, None]
        return torch.where(g > 0, X / torch.where(g > 0, g, 1.0), 0.0)

    def bases_back(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened bases ``(U', V')`` (float64; (d, r) or (K, d, r)) to the stored ``(U, V)``."""
        if self.identity:
            return U, V
        if self.side == "in":
            return U, self._in_back(V)
        return self._out_back(U), V

    def bases_fwd(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored bases to whitened coordinates (to measure the activation error of what is stored)."""
        if self.identity:
            return U, V
        if self.side == "in":
            return U, self.factor.mT @ V
        return U * self.factor[:, None], V

    def residual_back(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual factors ``b`` (n, d_out, k), ``a`` (n, k, d_in) from whitened coordinates."""
        if self.identity:
            return b, a
        if self.side == "in":
            return b, self._in_back(a.transpose(1, 2)).transpose(1, 2)
        return self._out_back(b), a

    def residual_fwd(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.identity:
            return b, a
        if self.side == "in":
            return b, a @ self.factor
        return b * self.factor[:, None], a


class Whitening:
    """Whitening of every module of a collection from calibration statistics (one module's
    factor held at a time, plus the one read ahead)."""

    def __init__(self, stats, lam: float, collection: Collection):
        from ..calibrate import CalibrationStats, load_calibration

        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:  # NaN fails >= 0 too
            raise OptionError(f"calibration lambda must be a number >= 0, got {lam!r}")
        self.stats = stats if isinstance(stats, CalibrationStats) else load_calibration(stats)
        self.lam = float(lam)
        self._cache: dict[str, ModuleWhitening] = {}
        missing, wrong = [], []
        for m in collection.modules:
            e = self.stats.modules.get(m.name)
            if e is None:
                missing.append(m.name)
                continue
            want = ("embedding", m.d_out) if m.layout == "embedding" else ("linear", m.d_in)
            if (e.kind, e.dim) != want:
                wrong.append(f"{m.name} ({e.kind} {e.dim}, the adapters' {want[0]} {want[1]})")
        where = f" ({self.stats.path})" if self.stats.path else ""
        if missing:
            raise ValidationError(
                f"the calibration statistics{where} have no entry for module(s) {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}: run `lorazip calibrate` with --adapters of this collection")
        if wrong:
            raise ValidationError(f"the calibration statistics{where} do not fit module(s) {', '.join(wrong[:3])}: "
                                  "calibrate the base model the adapters were trained on")

    def module(self, name: str) -> ModuleWhitening:
        wm = self._cache.get(name)
        if wm is None:
            e = self.stats.modules[name]
            wm = ModuleWhitening.from_moment(name, self.stats.moment(name), e.tokens, e.kind, self.lam)
            while len(self._cache) >= 2:  # the module being solved and the one read ahead
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = wm
        return wm

    def record(self) -> dict[str, Any]:
        """``meta["calibration"]`` of an artifact compressed with these statistics."""
        return {"sha256": self.stats.sha256, "lambda": self.lam, "whitened": True, "metric": "activation",
                "n_tokens": self.stats.n_tokens, "base_model": self.stats.base_model,
                "file": os.path.basename(str(self.stats.path)) if self.stats.path else None}


class WhitenedCollection(Collection):
    """The same adapters, whose factors read whitened (:class:`Whitening`); ``original`` is the
    collection itself."""

    def __init__(self, collection: Collection, whitening: Whitening):
        self.__dict__.update(collection.__dict__)
        self.original, self.whitening = collection, whitening

    def module_factors(self, name, indices=None, dtype=torch.float64, width=None, b_rows=False, checked=True):
        wm = self.whitening.module(name)
        if wm.identity:  # read as today (the scale folded into B in ``dtype``): bit for bit
            return self.original.module_factors(name, indices, dtype=dtype, width=width, b_rows=b_rows,
                                                checked=checked)
        f = self.original.module_factors(name, indices, dtype=torch.float64, width=width, checked=checked)
        B, A = wm.factors(f.B, f.A)
        f.B, f.A = B.to(dtype), A.to(dtype)
        return f

    def module_factor(self, name, indices, part, dtype, width):
        wm = self.whitening.module(name)
        if wm.identity:
            return self.original.module_factor(name, indices, part, dtype, width)
        X = self.original.module_factor(name, indices, part, torch.float64, width)
        return wm.part(part, X).to(dtype)


def whiten_collection(collection: Collection, calibration, lam: float = DEFAULT_LAMBDA) -> WhitenedCollection:
    """``collection`` read through the whitening of ``calibration`` (a path or
    :class:`~lorazip.calibrate.CalibrationStats`); checks that it covers every module first."""
    if isinstance(collection, WhitenedCollection):
        raise OptionError("the collection is already whitened")
    return WhitenedCollection(collection, Whitening(calibration, lam, collection))


def whitening_of(collection) -> Whitening | None:
    return getattr(collection, "whitening", None)


def streams_whitened(collection, memory_limit: int | None) -> bool:
    """Calibration under a memory limit: whitened modules are read in chunks, which only the
    shared-only allocation does (pass 2 of the mixed one reads each module whole)."""
    return whitening_of(collection) is not None and memory_limit is not None


def annotate(whitening: Whitening, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
             weight_sq: torch.Tensor, weight_n2: torch.Tensor) -> None:
    """Record the calibration and the weight-space errors in an artifact being assembled: per
    adapter, summed over its modules (``(n,)``; what the report gives; 16 bytes per adapter)."""
    meta["calibration"] = whitening.record()
    tensors["stats/weight_sq_error"] = weight_sq.sum(1)
    tensors["stats/weight_norm2"] = weight_n2.sum(1)


def _exact_chunks(coll: WhitenedCollection, name: str, n: int, chunk: int, width: int):
    """``(start, stop, B, A, Bw, Aw)``: original and whitened factors in float64, ``chunk`` adapters at a time."""
    wm = coll.whitening.module(name)
    for s in range(0, n, chunk):
        f = coll.original.module_factors(name, range(s, min(n, s + chunk)), dtype=torch.float64, width=width)
        Bw, Aw = wm.factors(f.B, f.A)
        yield s, min(n, s + chunk), f.B, f.A, Bw, Aw


def finish_whitened(coll: WhitenedCollection, name: str, fac, U, V, cores, assign, refine: bool,
                  storage_dtype: str, chunk: int):
    """:func:`lorazip.compress.measure.round_and_measure` for whitened solutions: ``U``, ``V``, ``cores``
    in whitened coordinates; the bases are mapped back, rounded, and both errors measured exactly.

    Returns ``(U, V, cores, errors2, norms2, spectra, weight_errors2, weight_norms2)``: stored
    (:class:`~lorazip.quantize.Stored`) bases and cores, activation errors, norms and spectra of the
    whitened deltas, weight errors and norms.
    """

    wm = coll.whitening.module(name)
    if wm.identity:  # C = I: today's computation, bit for bit
        Us, Vs, cs, e2, n2, sv = round_and_measure(fac, U, V, cores, assign, refine, storage_dtype, chunk)
        return Us, Vs, cs, e2, n2, sv, e2.clone(), n2.clone()
    if refine:
        U, V = orth(U.double().cpu()), orth(V.double().cpu())
    U64, V64 = U.double().cpu(), V.double().cpu()  # whitened
    Us, Vs = (to_storage(x, storage_dtype) for x in wm.bases_back(U64, V64))
    Ur, Vr = Us.values.double(), Vs.values.double()  # stored, original coordinates
    Urw, Vrw = wm.bases_fwd(Ur, Vr)  # stored, whitened
    assign = None if assign is None else assign.long().cpu()
    out: dict[str, list] = {k: [] for k in ("c", "e", "n", "s", "we", "wn")}
    for s, e, B, A, Bw, Aw in _exact_chunks(coll, name, fac.n, chunk, fac.rank):
        k = None if assign is None else assign[s:e]
        c = optimal_cores(Bw, Aw, U64, V64, k) if refine else cores[s:e].cpu()
        c = to_storage(c, storage_dtype)
        GB, GA = Bw.transpose(1, 2) @ Bw, Aw @ Aw.transpose(1, 2)
        n2 = (GB * GA).sum(dim=(1, 2))
        e2, _ = squared_errors(Bw, Aw, Urw, Vrw, c.values, k, norms2=n2)
        we, wn = squared_errors(B, A, Ur, Vr, c.values, k)
        for key, x in zip(("c", "e", "n", "s", "we", "wn"), (c, e2, n2, spectra_from_grams(GB, GA), we, wn)):
            out[key].append(x)
    e2, n2, sv, we, wn = (torch.cat(out[key]) for key in ("e", "n", "s", "we", "wn"))
    return Us, Vs, cat_stored(out["c"]), e2, n2, sv, we, wn


def build_mixed_module(coll: WhitenedCollection, name: str, U: torch.Tensor, V: torch.Tensor, k: torch.Tensor,
                       storage_dtype: str, core_scales: torch.dtype, assign: torch.Tensor | None = None):
    """Pass 2 of :func:`lorazip.compress.budget.compress_mixed` for one module, from its whitened fit:
    ``U``, ``V`` (whitened, orthonormal, rank r; with clusters ``assign`` (n,): (K, d, r)) and
    residual ranks ``k`` (n,).

    The shared part is stored first (bases mapped back and rounded; cores against what is stored),
    the residual is the truncated SVD, in whitened coordinates, of what the stored shared part
    leaves; its ``a`` factors (``b`` for embeddings) are mapped back and rounded. Returns
    ``(Us, Vs, Ss, bs, as_, errors2, norms2, spectra, weight_errors2, weight_norms2)``.
    """

    wm = coll.whitening.module(name)
    # C = I: read as pass 2 does without calibration (float32, bit for bit); else exactly, in float64
    f = coll.original.module_factors(name, dtype=torch.float32 if wm.identity else torch.float64)
    B0, A0 = f.B.double(), f.A.double()
    B, A = wm.factors(B0, A0)
    Ub, Vb = wm.bases_back(U, V)
    Us = to_storage(Ub if Ub.dim() == 3 else Ub[None], storage_dtype, torch.float16)
    Vs = to_storage(Vb if Vb.dim() == 3 else Vb[None], storage_dtype, torch.float16)
    Ur, Vr = Us.values.double(), Vs.values.double()  # (K, d, r)
    Uw, Vw = wm.bases_fwd(Ur, Vr)
    Ss = to_storage(optimal_cores(B, A, Uw, Vw, assign), storage_dtype, core_scales)
    S64 = Ss.values.double()
    if wm.identity:  # C = I: the residual as pass 2 makes it without calibration (bit for bit)
        bs, as_, bp, ap = stored_residual(B, A, Uw, Vw, S64, k, assign, storage_dtype, None, f.B, f.A)
        bw, aw = bp, ap
    else:
        parts = residual_factors(B, A, Uw, Vw, S64, k, assign)
        bs, as_, bp, ap = store_residual(*wm.residual_back(*parts), k, storage_dtype)
        bw, aw = wm.residual_fwd(bp, ap)
    GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
    n2 = (GB * GA).sum((1, 2))
    sq, n2 = squared_errors(B, A, Uw, Vw, S64, assign, norms2=n2, residual=(bw, aw))
    wsq, wn2 = squared_errors(B0, A0, Ur, Vr, S64, assign, residual=(bp, ap))
    return Us, Vs, Ss, bs, as_, sq, n2, spectra_from_grams(GB, GA), wsq, wn2


def activation_errors(artifact, collection: Collection, calibration, lam: float = DEFAULT_LAMBDA,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-space squared errors and norms, (n, M) float64, of ANY artifact of
    ``collection`` (also one compressed in weight space) under ``calibration``: each stored part
    is taken to whitened coordinates and compared with the whitened original factors, exactly.
    Rows follow ``artifact.names`` (adapters missing from ``collection`` are zero), columns its modules."""
    wcoll = calibration if isinstance(calibration, WhitenedCollection) else whiten_collection(collection, calibration, lam)
    by_name = {a.name: i for i, a in enumerate(wcoll.adapters)}
    rows = [i for i, name in enumerate(artifact.names) if name in by_name]
    sub = [by_name[artifact.names[i]] for i in rows]
    sq = torch.zeros(len(artifact.names), len(artifact.modules), dtype=torch.float64)
    n2 = torch.zeros_like(sq)
    present = {m.name for m in wcoll.modules}
    for j, mod in enumerate(artifact.modules):
        if mod["name"] not in present:
            continue
        wm = wcoll.whitening.module(mod["name"])
        f = wcoll.module_factors(mod["name"], sub, dtype=torch.float64)
        U, V, cores, assign = artifact.module_factors(mod["name"], rows)
        b, a, _ks = artifact.module_residuals(mod["name"], rows)
        Uw, Vw = wm.bases_fwd(U.double(), V.double())
        bw, aw = wm.residual_fwd(b.double(), a.double())
        sq[rows, j], n2[rows, j] = squared_errors(f.B, f.A, Uw, Vw, cores, assign, residual=(bw, aw))
    return sq, n2
