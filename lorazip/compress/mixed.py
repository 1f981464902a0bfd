"""One allocator over shared and per-adapter parts, for ``--budget`` and ``--target-error``.

Per module ``m`` the artifact may hold a shared part (JD-Full bases ``U``, ``V`` at rank
``r_m >= 0`` with cores ``S_i``) plus, per adapter, a residual part: the truncated SVD of
``M_i - U S_i V^T`` at rank ``k_im >= 0``. ``r_m = 0`` is per-adapter truncated SVD, ``k = 0``
is plain JD-Full. Which mix is best depends on the collection: shared bases win when many
adapters share directions, per-adapter parts win on small or diverse collections.

Pass 1 fits, per module, one JD-Full at the largest shared rank ``R`` and nested bases inside
it for every ``r <= R`` (:func:`~lorazip.compress.allocate.nested_fit`), which gives the exact
shared-only error curve, and, on a grid of ``r``, the exact residual spectra of every adapter
(:func:`~lorazip.solvers.residual.nested_residual_spectra`). From these curves the error of any
choice ``(r_m, k_im)`` is known exactly before anything is stored.

The allocation minimises the reported statistic (mean or max of the per-adapter
energy-weighted relative error) under a byte budget: for the mean, a Lagrangian search over
the price of a byte picks ``r_m`` per module, then the leftover bytes go greedily to the
residual steps that remove most error per byte; for the max, residual bytes go to the worst
adapter first. The result is then compared with per-adapter SVD alone, uniform JD-Full and
per-module JD (all from the same curves) and the best is kept, so it is never worse than any
of them. A target error is met with the fewest bytes by bisection on the budget.

Pass 2 re-reads each module once, builds the chosen parts from the factors (never a ``d x d``
matrix), rounds them to the storage dtype and measures the exact error of what is stored.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..artifact import STORAGE_DTYPES, Artifact
from ..backend import BACKENDS, to_backend, to_torch
from ..errors import OptionError
from ..io.collection import Collection
from ..metrics import per_adapter, squared_errors
from .. import lowbit
from ..quantize import QSCALE, LowBit, cat_stored, dry_storage, store_residual, to_storage
from ..solvers import Factors
from ..solvers.linalg import adapter_weights
from ..solvers.jd_full import jd_full_factors
from ..solvers.residual import factor_products, nested_residual_spectra, residual_factors
from ..solvers.svd import spectra_from_grams
from .allocate import nested_fit
from .executor import RayExecutor, map_modules
from .pipeline import _optimal_cores
from .provenance import SourceHashes
from .streaming import MemoryPlan, streamed_factors
from .whiten import annotate, build_mixed_module, whitening_of

GRID = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # shared ranks whose residual spectra are measured
_BUILD_CHUNK = 16  # adapters per float64 chunk in pass 2 (kept in cache, as the errors of compress_modules)
_FLOOR = 1e-10  # a step removing less of the (relative) error than this only stores solver noise
STATS = ("mean", "max")


@dataclass
class ModuleFit:
    """Pass 1 of one module: nested bases and exact error curves.

    ``shared[r]``: (n,) squared error of the shared part alone at rank r (0..R);
    ``spectra[r]``: (n, m) squared residual singular values (descending) for r in the grid.
    """

    name: str
    d_out: int
    d_in: int
    U: torch.Tensor  # (d_out, R) float64
    V: torch.Tensor  # (d_in, R)
    XY: dict[int, tuple[torch.Tensor, torch.Tensor]]
    shared: dict[int, torch.Tensor]
    spectra: dict[int, torch.Tensor]
    norms2: torch.Tensor
    iters: int = 0
    converged: bool = True
    assign: torch.Tensor | None = None  # (n,) cluster of each adapter when K > 1 (then U: (K, d_out, R))
    quant: np.ndarray | None = None  # (len(BITS),) relative error of a residual component at each bit width

    @property
    def dim(self) -> int:
        return self.d_in + self.d_out

    @property
    def K(self) -> int:
        return 1 if self.U.dim() == 2 else self.U.shape[0]

    def residual_cap(self, r: int) -> int:
        return min(self.spectra[r].shape[1], self.d_out, self.d_in)


def fit_module_task(collection: Collection, j: int, R: int, weighting: str, seed: int, tol: float, max_iters: int,
                    assign: torch.Tensor | None = None, chunk: int | None = None, backend: str = "torch", *,
                    clock: dict[str, float], factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleFit:
    """Pass 1 on module ``j`` (``assign``: (n,) clusters, each with its own bases), reading its
    factors in float32 unless given (the caller's read-ahead), or ``chunk`` adapters at a time on
    every pass (a module larger than the memory limit); the same function runs in process and as a
    Ray task (:mod:`.executor`)."""
    t0 = time.perf_counter()
    name = collection.modules[j].name
    fac = _task_factors(collection, name, chunk, factors)
    t1 = time.perf_counter()
    fit = fit_factors(fac, name, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters, backend=backend,
                      assign=assign)
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return fit


def _task_factors(collection: Collection, name: str, chunk: int | None, factors) -> Factors:
    """A task's module factors in float32: the caller's read-ahead ``factors``, or read here,
    or (``chunk``) streamed that many adapters at a time on every pass."""
    if chunk is not None:
        return streamed_factors(collection, name, chunk, torch.float32)
    if factors is None:
        f = collection.module_factors(name, dtype=torch.float32)
        factors = (f.B, f.A)
    return Factors.stacked(*factors)


def fit_module(B: torch.Tensor, A: torch.Tensor, name: str, R: int, *, weighting: str, seed: int, tol: float,
               max_iters: int, grid: tuple[int, ...] = GRID, assign: torch.Tensor | None = None) -> ModuleFit:
    """Pass 1 on one module's factors ``B`` (n, d_out, r_i), ``A`` (n, r_i, d_in); with ``assign``
    (n,) cluster indices, one fit per cluster on its adapters (:func:`_fit_clusters`)."""
    return fit_factors(Factors.stacked(B, A), name, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters,
                       grid=grid, assign=assign)


def fit_factors(fac: Factors, name: str, R: int, *, weighting: str, seed: int, tol: float, max_iters: int,
                grid: tuple[int, ...] = GRID, backend: str = "torch", assign: torch.Tensor | None = None) -> ModuleFit:
    """:func:`fit_module` on :class:`~lorazip.solvers.factors.Factors`, in memory or streamed (then
    every product is a pass over the chunks; only ``(n, r, r)`` products are kept). ``backend``:
    the array library of the JD-Full step (:mod:`lorazip.backend`); the rest runs in torch. With
    ``assign`` naming more than one cluster (factors in memory), :func:`_fit_clusters`."""
    if assign is not None and int(assign.max()) > 0:
        return _fit_clusters(fac.B, fac.A, name, R, assign, weighting=weighting, seed=seed, tol=tol,
                             max_iters=max_iters, grid=grid, backend=backend)
    d_out, d_in = fac.d_out, fac.d_in
    if R > 0:  # the JD-Full fit weighs adapters by its own (solver-precision) norms
        solver = fac if backend == "torch" else fac.converted(lambda t: to_backend(t, backend))
        top = jd_full_factors(solver, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters)
        U, V = torch.linalg.qr(to_torch(top.U).double())[0], torch.linalg.qr(to_torch(top.V).double())[0]
        iters, conv = top.n_iters, top.converged
    else:
        U, V = torch.zeros(d_out, 0, dtype=torch.float64), torch.zeros(d_in, 0, dtype=torch.float64)
        iters, conv = 0, True
    # then every float64 product the curves need in one pass: each chunk converted once
    GB, GA, BU, AV = _chunked(factor_products(ch.B, ch.A, U, V, grams=True) for ch in fac)
    n2 = (GB * GA).sum((1, 2)).clamp_min(0)
    w = adapter_weights(n2, weighting)
    S = BU.transpose(1, 2) @ AV
    XY = nested_fit(S, w, R, tol=tol, max_iters=max_iters, refine=set(grid))
    shared = {r: (n2 - (X.T @ S @ Y).square().sum((1, 2))).clamp_min(0) for r, (X, Y) in XY.items()}
    on_grid = {r: XY[r] for r in grid if r <= R}
    spectra = nested_residual_spectra(None, None, U, V, S, on_grid, products=(GB, GA, BU, AV))
    first = next(iter(fac))
    return ModuleFit(name, d_out, d_in, U, V, XY, shared, spectra, n2, iters, conv,
                     quant=quant_profile(first.B, first.A))


def _chunked(parts) -> tuple[torch.Tensor, ...]:
    """Per-chunk tuples of tensors concatenated along the adapters (one chunk: as is)."""
    parts = list(parts)
    return parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))


def _fit_clusters(B, A, name, R, assign, *, weighting, seed, tol, max_iters, grid, backend="torch") -> ModuleFit:
    """Pass 1 with K clusters: per cluster, the fit of :func:`fit_module` on its adapters (its own
    bases ``U_k``, ``V_k`` and nested ranks), the curves merged back into adapter order. One shared
    rank per module for every cluster, so ``U``: (K, d_out, R), ``XY[r]``: (K, R, r) each."""
    n, d_out, d_in = B.shape[0], B.shape[1], A.shape[2]
    K = int(assign.max()) + 1
    width = B.shape[2] + R
    shared = {r: torch.zeros(n, dtype=torch.float64) for r in range(R + 1)}
    spectra = {r: torch.zeros(n, width, dtype=torch.float64) for r in grid if r <= R}
    Us, Vs, XYs, n2 = [], [], [], torch.zeros(n, dtype=torch.float64)
    iters, conv = 0, True
    eye_o, eye_i, eye_r = (torch.eye(d, R, dtype=torch.float64) for d in (d_out, d_in, R))
    for k in range(K):
        idx = torch.nonzero(assign == k).flatten()
        if len(idx) == 0:  # an empty cluster keeps any orthonormal bases: no adapter uses them
            Us.append(eye_o)
            Vs.append(eye_i)
            XYs.append({r: (eye_r[:, :r], eye_r[:, :r]) for r in range(R + 1)})
            continue
        f = fit_factors(Factors.stacked(B[idx], A[idx]), name, R, weighting=weighting, seed=seed, tol=tol,
                        max_iters=max_iters, grid=grid, backend=backend)
        Us.append(f.U)
        Vs.append(f.V)
        XYs.append(f.XY)
        n2[idx] = f.norms2
        for r in shared:
            shared[r][idx] = f.shared[r]
        for r in spectra:
            spectra[r][idx] = f.spectra[r]
        iters, conv = max(iters, f.iters), conv and f.converged
    XY = {r: (torch.stack([xy[r][0] for xy in XYs]), torch.stack([xy[r][1] for xy in XYs])) for r in range(R + 1)}
    return ModuleFit(name, d_out, d_in, torch.stack(Us), torch.stack(Vs), XY, shared, spectra, n2, iters, conv,
                     assign.long(), quant_profile(B, A))


_PROFILE_ROWS = 48  # residual components whose quantisation is measured per module


def quant_profile(B: torch.Tensor, A: torch.Tensor, rows: int = _PROFILE_ROWS) -> np.ndarray:
    """Relative squared error of a residual component stored at each of :data:`lowbit.BITS`,
    measured on the module's own per-adapter SVD components (the ``rows`` that matter most,
    each adapter's components weighed by its relative energy): ``sum err / sum sigma^2`` with
    ``err = ||x y^T - x_hat y_hat^T||^2`` of the stored rows ``x = sqrt(sigma) u``, ``y = sqrt(sigma) v``."""
    B, A = B.double(), A.double()
    n = B.shape[0]
    if n == 0 or B.shape[2] == 0:
        return np.zeros(len(lowbit.BITS))
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))
    W, sv, Zh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))
    n2 = sv.square().sum(1).clamp_min(1e-300)
    weight = sv.square() / n2[:, None]  # (n, m) each component's share of its adapter's energy
    top = torch.argsort(weight.reshape(-1), descending=True, stable=True)[:rows]
    top = top[weight.reshape(-1)[top] > 0]
    if len(top) == 0:
        return np.zeros(len(lowbit.BITS))
    i, q = top // sv.shape[1], top % sv.shape[1]
    root = sv[i, q].sqrt()[:, None]
    x = (Qb[i] @ W[i])[torch.arange(len(top)), :, q] * root  # (rows, d_out)
    y = (Qa[i] @ Zh[i].transpose(1, 2))[torch.arange(len(top)), :, q] * root
    w = 1.0 / n2[i]
    T = len(lowbit.BITS)
    widths = np.repeat(np.array(lowbit.BITS), len(top))  # every row at every width, in one call per side
    xs, ys = x.repeat(T, 1), y.repeat(T, 1)
    xh = torch.from_numpy(lowbit.dequantize(*lowbit.quantize(xs, widths), widths)).double()
    yh = torch.from_numpy(lowbit.dequantize(*lowbit.quantize(ys, widths), widths)).double()
    err = ((xs * xs).sum(1) * (ys * ys).sum(1) - 2 * (xs * xh).sum(1) * (ys * yh).sum(1)
           + (xh * xh).sum(1) * (yh * yh).sum(1)).clamp_min(0).reshape(T, -1)
    return ((w[None] * err).sum(1) / (w * sv[i, q].square()).sum()).numpy()


def bit_levels(fit: ModuleFit) -> list[tuple[int, int, float]]:
    """:func:`lorazip.lowbit.levels` of a module's residual components, from its measured profile."""
    return lowbit.levels(fit.d_out, fit.d_in, fit.quant)


# -- allocation ---------------------------------------------------------------------------------

@dataclass
class Allocation:
    """Shared rank per module and residual rank per (adapter, module); ``predicted``: the statistic."""

    ranks: dict[str, int]
    residual: dict[str, np.ndarray]
    numbers: int
    predicted: float
    kind: str
    errors: np.ndarray = field(default=None, repr=False)  # (n,) predicted per-adapter error
    alternatives: dict[str, float] = field(default_factory=dict)  # predicted statistic of each candidate
    bits: dict[str, np.ndarray | None] = field(default_factory=dict)  # per module: bits of each residual row


@dataclass
class Clusters:
    """K groups of adapters, each with its own shared bases: ``assign[j]`` (n,) the cluster of every
    adapter in module ``j`` (one tensor for all modules unless ``per_module``), as jd-clustered
    found them (:func:`lorazip.compress.clusters.cluster_adapters`)."""

    K: int
    assign: list[torch.Tensor]
    per_module: bool = False
    rounds: int = 0
    converged: bool = True
    history: list[float] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """``meta["clustering"]`` of an artifact built on these clusters."""
        return {"n_clusters": self.K, "per_module": self.per_module, "rounds": self.rounds,
                "converged": self.converged, "objective_history": self.history}


def _shared_numbers(fit: ModuleFit, r: int, n: int) -> int:
    return fit.K * r * fit.dim + n * r * r


def _errors(fits: list[ModuleFit], ranks: list[int], resid: list[np.ndarray], E: np.ndarray) -> np.ndarray:
    """Predicted per-adapter error (n,) of a choice, exact from the curves."""
    tot = np.zeros_like(E)
    for fit, r, k in zip(fits, ranks, resid):
        if r in fit.spectra:
            sp = fit.spectra[r].numpy()
            cum = np.concatenate([np.zeros((sp.shape[0], 1)), np.cumsum(sp, 1)], 1)
            kept = cum[np.arange(sp.shape[0]), np.minimum(k, sp.shape[1])]
            tot += np.maximum(sp.sum(1) - kept, 0)
        else:  # off the grid: shared part only
            tot += fit.shared[r].numpy()
    return np.where(E > 0, tot / np.maximum(E, 1e-300), 0.0)


def _numbers(fits, ranks, resid, n) -> int:
    return int(sum(_shared_numbers(f, r, n) + int(k.sum()) * f.dim for f, r, k in zip(fits, ranks, resid)))


def _worst_first(err: np.ndarray, steps: list[list], take: Callable[[int, int], "float | None"]) -> None:
    """The greedy on the max: the worst adapter takes its best next step (``steps[i]``: a heap of
    (-gain per cost, module)); ``take(j, i)`` stores it and returns the error it removes, or None
    when it does not fit (that module is then done for the adapter). Ends when the worst adapter
    cannot improve."""
    worst = [(-err[i], i) for i in range(len(err))]
    heapq.heapify(worst)
    while worst:
        e, i = heapq.heappop(worst)
        while steps[i]:
            _, j = heapq.heappop(steps[i])
            gain = take(j, i)
            if gain is not None:
                heapq.heappush(worst, (e + gain, i))
                break
        else:
            break  # the worst adapter cannot improve: the max is final


@dataclass
class _Row:
    """One module at one grid shared rank ``r``: its residual steps sorted by error removed per
    cost unit. A step is one component (native precision: ``costs`` None, each costs the module's
    ``dim`` numbers) or one move of a component up a bit level (:func:`bit_levels`; costs in
    bytes; steps that remove nothing are left out). ``gains``: weighted error removed, ``who``:
    the adapter; with bits also ``comp`` / ``lvl`` (component, level reached) and ``pos`` (the
    step's place among its adapter's steps, which come in the same order)."""

    r: int
    base: float
    gains: np.ndarray
    cums: np.ndarray
    who: np.ndarray
    costs: np.ndarray | None = None
    cumc: np.ndarray | None = None
    slopes: np.ndarray | None = None
    comp: np.ndarray | None = None
    lvl: np.ndarray | None = None
    pos: np.ndarray | None = None
    levels: list | None = None

    def cost(self, c: int, dim: int) -> float:
        return dim if self.costs is None else float(self.costs[c])


class _Curves:
    """Per module and grid rank: residual steps sorted for the Lagrangian and the greedy fill.
    ``bits``: components may be stored at 1-8 bits (:func:`bit_levels`), costs are bytes and the
    shared parts cost one byte a number (int8); otherwise a component costs ``dim`` numbers."""

    def __init__(self, fits: list[ModuleFit], E: np.ndarray, bits: bool = False):
        n = len(E)
        c = np.where(E > 0, 1.0 / (n * np.maximum(E, 1e-300)), 0.0)  # contribution to the mean
        self.fits, self.n, self.c, self.bits = fits, n, c, bits
        self.opts: list[list[_Row]] = []
        for fit in fits:
            levels = bit_levels(fit) if bits else None
            rows = []
            for r, sp in fit.spectra.items():
                cap = fit.residual_cap(r)
                spn = sp.numpy()
                g = c[:, None] * spn[:, :cap]
                base = float(g.sum()) + float((c * (spn[:, cap:].sum(1))).sum())
                if levels is None:
                    flat = g.ravel()
                    order = np.argsort(-flat, kind="stable")
                    gains = flat[order]
                    who = np.repeat(np.arange(n), cap)[order]
                    rows.append(_Row(r, base, gains, np.concatenate([[0.0], np.cumsum(gains)]), who))
                else:
                    rows.append(self._bit_row(r, base, spn[:, :cap], levels))
            self.opts.append(rows)

    def _bit_row(self, r: int, base: float, sp: np.ndarray, levels: list) -> _Row:
        n, cap = sp.shape
        T = len(levels)
        rho = np.array([1.0] + [lv[2] for lv in levels])
        cost = np.array([0] + [lv[1] for lv in levels], dtype=np.float64)
        raw = sp[:, :, None] * (rho[:-1] - rho[1:])[None, None, :]  # (n, cap, T) error removed by each move up
        gain = (self.c[:, None, None] * raw).ravel()
        dc = np.broadcast_to(np.diff(cost)[None, None, :], raw.shape).ravel()
        live = np.nonzero(gain > 0)[0]  # steps that remove nothing are never taken
        slope = gain[live] / dc[live]
        order = live[np.argsort(-slope, kind="stable")]
        who = (order // (cap * T)).astype(np.int32)
        comp = ((order // T) % cap).astype(np.int16)
        lvl = (order % T).astype(np.int8)
        by = np.argsort(who, kind="stable")  # each adapter's steps, in the global order
        counts = np.bincount(who, minlength=n)
        pos = np.empty(len(order), dtype=np.int32)
        pos[by] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        gains, costs = gain[order], dc[order].astype(np.float32)
        return _Row(r, base, gains, np.concatenate([[0.0], np.cumsum(gains)]), who, costs,
                    np.concatenate([[0.0], np.cumsum(costs, dtype=np.float64)]), gains / costs, comp, lvl, pos,
                    levels)

    def _raws(self, row: _Row, idx) -> np.ndarray:
        """Unweighted error removed by the steps ``idx`` of a bit row (0 for adapters of no energy)."""
        c = self.c[row.who[idx]]
        return np.where(c > 0, row.gains[idx] / np.where(c > 0, c, 1.0), 0.0)

    def shared_cost(self, fit: ModuleFit, r: int) -> float:
        """Cost of a module's shared part at rank ``r``: its numbers, or with bits its bytes in int8
        with the row scales (float16, one per row of ``U``, ``V`` and of each core), which at small
        ranks cost as much as the numbers."""
        numbers = _shared_numbers(fit, r, self.n)
        if not self.bits or r == 0:
            return numbers
        return numbers + 2 * (fit.K * fit.dim + self.n * r)

    def row(self, j: int, r: int) -> _Row | None:
        return next((row for row in self.opts[j] if row.r == r), None)

    def _flatten(self) -> None:
        """Every row of every module in flat arrays, so :meth:`lagrangian` is a few array operations
        per price instead of a search per row (it runs thousands of times per allocation)."""
        keys, scale, cums, spend, seg, seg_c, rows_of = [], [], [], [], [], [], []
        pos = cpos = 0
        width = max(len(rows) for rows in self.opts) if self.opts else 0
        for j, (fit, rows) in enumerate(zip(self.fits, self.opts)):
            for row in rows:
                native = row.costs is None
                keys.append(row.gains if native else row.slopes)
                scale.append(float(fit.dim) if native else 1.0)
                cums.append(row.cums)
                spend.append(np.arange(len(row.cums), dtype=np.float64) * fit.dim if native else row.cumc)
                seg.append((pos, len(row.gains)))
                seg_c.append((cpos, row.base, self.shared_cost(fit, row.r), j, row.r))
                pos += len(row.gains)
                cpos += len(row.cums)
            rows_of.append(len(rows))
        self._keys = np.concatenate(keys) if keys else np.zeros(0)
        self._rscale = np.array(scale, dtype=np.float64)
        self._cums = np.concatenate(cums) if cums else np.zeros(0)
        self._spend = np.concatenate(spend) if spend else np.zeros(0)
        starts = np.array([a for a, _ in seg], dtype=np.int64)
        self._lens = np.array([b for _, b in seg], dtype=np.int64)
        self._starts = starts
        self._depth = int(self._lens.max(initial=0)).bit_length() + 1
        self._cstart = np.array([c[0] for c in seg_c], dtype=np.int64)
        self._base = np.array([c[1] for c in seg_c], dtype=np.float64)
        self._shared = np.array([c[2] for c in seg_c], dtype=np.float64)
        self._rank = np.array([c[4] for c in seg_c], dtype=np.int64)
        # the rows keep views into the flat arrays (their own copies are freed)
        at = 0
        for rows in self.opts:
            for row in rows:
                a, n_ = int(starts[at]), int(self._lens[at])
                c = int(self._cstart[at])
                if row.costs is None:
                    row.gains = self._keys[a : a + n_]
                else:
                    row.slopes, row.cumc = self._keys[a : a + n_], self._spend[c : c + n_ + 1]
                row.cums = self._cums[c : c + n_ + 1]
                at += 1
        # (module, k) -> flat row index, -1 where a module has fewer rows
        self._grid = np.full((len(self.fits), width), -1, dtype=np.int64)
        at = 0
        for j, cnt in enumerate(rows_of):
            self._grid[j, :cnt] = np.arange(at, at + cnt)
            at += cnt

    def lagrangian(self, lam: float) -> tuple[list[int], list[int]]:
        """Per module the grid rank and residual step count minimising error + lam * cost (the
        first row in grid order that is lower by more than 1e-18 than those before it)."""
        if not hasattr(self, "_keys"):
            self._flatten()
        # per row the steps worth their price, key > lam * scale: a binary search in every row at once
        # (each row's keys descend)
        thr = lam * self._rscale
        lo, hi = np.zeros(len(self._lens), dtype=np.int64), self._lens.copy()
        for _ in range(self._depth):
            active = lo < hi
            mid = (lo + hi) // 2
            v = self._keys[np.minimum(self._starts + mid, max(len(self._keys) - 1, 0))] if len(self._keys) else \
                np.zeros(len(mid))
            right = active & (v > thr)
            lo = np.where(right, mid + 1, lo)
            hi = np.where(active & ~right, mid, hi)
        cnt = lo
        at = self._cstart + cnt
        val = self._base - self._cums[at] + lam * (self._shared + self._spend[at])
        best_val = np.full(len(self.fits), np.inf)
        best = np.zeros(len(self.fits), dtype=np.int64)
        for k in range(self._grid.shape[1]):
            idx = self._grid[:, k]
            ok = idx >= 0
            v = np.where(ok, val[np.maximum(idx, 0)], np.inf)
            better = ok & ((k == 0) | (v < best_val - 1e-18))
            best = np.where(better, idx, best)
            best_val = np.where(better, v, best_val)
        return self._rank[best].tolist(), cnt[best].tolist()

    def resid_from_counts(self, j: int, r: int, cnt: int) -> np.ndarray:
        """Steps per adapter (its residual rank at native precision) of the first ``cnt`` steps."""
        return np.bincount(self.row(j, r).who[:cnt], minlength=self.n)

    def fill_mean(self, ranks: list[int], counts: list[int], numbers: int) -> list[np.ndarray]:
        """Greedy: spend what is left of ``numbers`` on residual steps by error removed per cost unit."""
        rows = [self.row(j, r) for j, r in enumerate(ranks)]
        used = sum(self.shared_cost(f, r) + (c * f.dim if row.costs is None else row.cumc[c])
                   for f, r, c, row in zip(self.fits, ranks, counts, rows))
        heap = [(-row.gains[c] / row.cost(c, f.dim), j) for j, (f, row, c) in enumerate(zip(self.fits, rows, counts))
                if c < len(row.gains) and row.gains[c] > _FLOOR]
        heapq.heapify(heap)
        counts = list(counts)
        while heap:
            _, j = heapq.heappop(heap)
            f, row = self.fits[j], rows[j]
            step = row.cost(counts[j], f.dim)
            if used + step > numbers:
                continue
            used += step
            counts[j] += 1
            if counts[j] < len(row.gains) and row.gains[counts[j]] > _FLOOR:
                heapq.heappush(heap, (-row.gains[counts[j]] / row.cost(counts[j], f.dim), j))
        return [self.resid_from_counts(j, r, c) for j, (r, c) in enumerate(zip(ranks, counts))]

    def fill_max(self, ranks: list[int], numbers: int, E: np.ndarray) -> list[np.ndarray]:
        """Greedy on the max: the worst adapter gets its best next step per cost unit, until the
        worst cannot improve within the budget."""
        if self.bits:
            return self._fill_max_steps(ranks, numbers, E)
        n, fits = self.n, self.fits
        resid = [np.zeros(n, dtype=np.int64) for _ in fits]
        used = sum(_shared_numbers(f, r, n) for f, r in zip(fits, ranks))
        sp = [f.spectra[r].numpy() for f, r in zip(fits, ranks)]
        caps = [f.residual_cap(r) for f, r in zip(fits, ranks)]
        err = _errors(fits, ranks, resid, E)
        inv = np.where(E > 0, 1.0 / np.maximum(E, 1e-300), 0.0)
        steps = []  # per adapter: heap of (-gain per number, module)
        for i in range(n):
            h = [(-sp[j][i, 0] * inv[i] / f.dim, j) for j, f in enumerate(fits)
                 if caps[j] > 0 and sp[j][i, 0] * inv[i] > _FLOOR]
            heapq.heapify(h)
            steps.append(h)

        def take(j: int, i: int) -> float | None:
            nonlocal used
            if used + fits[j].dim > numbers:
                return None
            k = resid[j][i]
            used += fits[j].dim
            resid[j][i] = k + 1
            if k + 1 < caps[j] and sp[j][i, k + 1] * inv[i] > _FLOOR:
                heapq.heappush(steps[i], (-sp[j][i, k + 1] * inv[i] / fits[j].dim, j))
            return sp[j][i, k] * inv[i]

        _worst_first(err, steps, take)
        return resid

    def _fill_max_steps(self, ranks: list[int], numbers: int, E: np.ndarray) -> list[np.ndarray]:
        """:meth:`fill_max` over bit steps: each adapter's steps in its own order."""
        n, fits = self.n, self.fits
        rows = [self.row(j, r) for j, r in enumerate(ranks)]
        own = []  # per module: per adapter the indices of its steps, in order
        for row in rows:
            by = np.argsort(row.who, kind="stable") if row is not None else np.zeros(0, dtype=np.int64)
            cnt = np.bincount(row.who, minlength=n) if row is not None else np.zeros(n, dtype=np.int64)
            own.append(np.split(by, np.cumsum(cnt)[:-1]))
        resid = [np.zeros(n, dtype=np.int64) for _ in fits]
        used = float(sum(self.shared_cost(f, r) for f, r in zip(fits, ranks)))
        err = self.errors(ranks, resid, E)
        inv = np.where(E > 0, 1.0 / np.maximum(E, 1e-300), 0.0)

        def step(j: int, i: int):
            at = resid[j][i]
            if at >= len(own[j][i]):
                return None
            g = float(self._raws(rows[j], own[j][i][at])) * inv[i]
            return (-g / rows[j].costs[own[j][i][at]], j) if g > _FLOOR else None

        steps = []
        for i in range(n):
            h = [s_ for s_ in (step(j, i) for j in range(len(fits))) if s_ is not None]
            heapq.heapify(h)
            steps.append(h)

        def take(j: int, i: int) -> float | None:
            nonlocal used
            at = own[j][i][resid[j][i]]
            if used + rows[j].costs[at] > numbers:
                return None
            used += rows[j].costs[at]
            resid[j][i] += 1
            nxt = step(j, i)
            if nxt is not None:
                heapq.heappush(steps[i], nxt)
            return float(self._raws(rows[j], at)) * inv[i]

        _worst_first(err, steps, take)
        return resid

    def _taken(self, row: _Row, counts: np.ndarray) -> np.ndarray:
        return row.pos < counts[row.who]

    def errors(self, ranks: list[int], resid: list[np.ndarray], E: np.ndarray) -> np.ndarray:
        """Predicted per-adapter error (n,) of ``ranks`` and residual steps ``resid`` per module."""
        if not self.bits:
            return _errors(self.fits, ranks, resid, E)
        tot = np.zeros_like(E)
        for j, (fit, r, k) in enumerate(zip(self.fits, ranks, resid)):
            row = self.row(j, r)
            if row is None:
                tot += fit.shared[r].numpy()
                continue
            taken = np.nonzero(self._taken(row, np.asarray(k)))[0]
            removed = np.bincount(row.who[taken], weights=self._raws(row, taken), minlength=self.n)
            tot += np.maximum(fit.spectra[r].numpy().sum(1) - removed, 0)
        return np.where(E > 0, tot / np.maximum(E, 1e-300), 0.0)

    def size(self, ranks: list[int], resid: list[np.ndarray]) -> float:
        """Cost (numbers, or bytes with bits) of ``ranks`` and residual steps ``resid``."""
        if not self.bits:
            return _numbers(self.fits, ranks, resid, self.n)
        total = 0.0
        for j, (fit, r, k) in enumerate(zip(self.fits, ranks, resid)):
            total += self.shared_cost(fit, r)
            row = self.row(j, r)
            if row is not None and np.any(k):
                total += float(row.costs[self._taken(row, np.asarray(k))].sum())
        return total

    def max_size(self) -> float:
        """The cost of every residual component at its highest precision, no shared part."""
        if not self.bits:
            full = [np.array([f.residual_cap(0)] * self.n) for f in self.fits]
            return _numbers(self.fits, [0] * len(self.fits), full, self.n)
        return float(sum(self.row(j, 0).cumc[-1] for j in range(len(self.fits))))

    def decode(self, j: int, r: int, k: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Residual ranks (n,) and, with bits, the bits of every stored row (adapter by adapter,
        component by component) of ``k`` steps per adapter in module ``j`` at shared rank ``r``."""
        row = self.row(j, r)
        if not self.bits or row is None:
            return np.asarray(k), None
        taken = self._taken(row, np.asarray(k))
        cap = int(row.comp.max()) + 1 if len(row.comp) else 0
        level = np.zeros((self.n, cap), dtype=np.int64)
        np.maximum.at(level, (row.who[taken], row.comp[taken]), row.lvl[taken] + 1)
        ranks = (level > 0).sum(1)
        widths = np.array([0] + [lv[0] for lv in row.levels], dtype=np.uint8)
        bits = np.concatenate([widths[level[i, : ranks[i]]] for i in range(self.n)]) if ranks.sum() else \
            np.zeros(0, dtype=np.uint8)
        if (bits == 0).any():
            raise AssertionError("residual steps do not form a prefix of each adapter's components")  # pragma: no cover
        return ranks, bits.astype(np.uint8)


def allocate_mixed(fits: list[ModuleFit], E: np.ndarray, *, numbers: int | None = None,
                   target_error: float | None = None, stat: str = "mean",
                   curves: "_Curves | None" = None) -> Allocation:
    """Shared ranks and residual ranks for a budget of ``numbers`` stored values (lowest
    ``stat``), or the fewest numbers meeting ``target_error`` on ``stat``."""
    if stat not in STATS:
        raise OptionError(f"target statistic must be mean or max, got {stat!r}")
    if target_error is not None:
        return _for_target(fits, E, target_error, stat, curves if curves is not None else _Curves(fits, E))
    n = len(E)
    curves = curves if curves is not None else _Curves(fits, E)  # sorted gains: the same for every budget
    score = (lambda e: float(e.mean())) if stat == "mean" else (lambda e: float(e.max()))
    cands: list[Allocation] = []

    def add(kind, ranks, resid):
        size = curves.size(ranks, resid)
        if size <= numbers:
            e = curves.errors(ranks, resid, E)
            cands.append(Allocation({f.name: r for f, r in zip(fits, ranks)},
                                    {f.name: k for f, k in zip(fits, resid)}, size, score(e), kind, e))

    zeros = [0] * len(fits)
    # the mix: Lagrangian price per number, bisected to the budget, then greedy fill
    hi = max((row.gains[0] / row.cost(0, f.dim) for f, rows in zip(fits, curves.opts) for row in rows
              if len(row.gains)), default=1.0) * 2 + 1e-30
    lo = hi * 1e-15  # prices span orders of magnitude: bisect in log space
    seen_ranks = []
    for _ in range(80):
        lam = math.sqrt(lo * hi)
        ranks, counts = curves.lagrangian(lam)
        size = sum(curves.shared_cost(f, r) + (c * f.dim if row.costs is None else row.cumc[c])
                   for j, (f, r, c) in enumerate(zip(fits, ranks, counts)) for row in [curves.row(j, r)])
        if size > numbers:
            lo = lam
        else:
            hi = lam
            if ranks not in seen_ranks:
                seen_ranks.append(ranks)
        if hi <= lo * (1 + 1e-9):
            break
    ranks, counts = curves.lagrangian(hi)
    if stat == "mean":
        add("mix", ranks, curves.fill_mean(ranks, counts, numbers))
        add("per-adapter SVD", zeros, curves.fill_mean(zeros, [0] * len(fits), numbers))
    else:
        for rk in seen_ranks[-6:] + [ranks, zeros]:
            add("mix" if any(rk) else "per-adapter SVD", rk, curves.fill_max(rk, numbers, E))
    # shared-only baselines on the full rank curves: uniform JD-Full and per-module JD
    none = [np.zeros(n, dtype=np.int64) for _ in fits]
    R = max(max(f.shared) for f in fits)
    uniform = None
    for r in range(1, R + 1):  # the best uniform rank that fits; of equal errors, the smallest
        rk = [min(r, max(f.shared)) for f in fits]
        if curves.size(rk, none) > numbers:
            break
        e = score(curves.errors(rk, none, E))
        if uniform is None or e < uniform[0] - max(_FLOOR, 1e-6 * e):
            uniform = (e, rk)
    if uniform is not None:
        add("uniform JD-Full", uniform[1], none)
    add("per-module JD", _per_module_shared(fits, numbers, n, E, stat), none)
    if not cands:
        raise OptionError("the budget is too small for any part: raise it")
    best = min(a.predicted for a in cands)
    near = [a for a in cands if a.predicted <= best + max(1e-9, 1e-6 * best)]  # ties: the fewest numbers
    chosen = min(near, key=lambda a: (a.numbers, a.predicted))
    for a in cands:
        chosen.alternatives[a.kind] = min(a.predicted, chosen.alternatives.get(a.kind, float("inf")))
    if curves.bits:  # steps -> residual ranks and the bits of every stored row
        for j, f in enumerate(fits):
            chosen.residual[f.name], chosen.bits[f.name] = curves.decode(j, chosen.ranks[f.name],
                                                                         chosen.residual[f.name])
    return chosen


def _per_module_shared(fits, numbers, n, E, stat) -> list[int]:
    """Shared ranks only (no residual), greedy on error removed per number (the v1 allocator)."""
    c = np.where(E > 0, 1.0 / (n * np.maximum(E, 1e-300)), 0.0)
    ranks = [0] * len(fits)
    used = 0
    curve = [np.array([float((c * f.shared[r].numpy()).sum()) for r in range(max(f.shared) + 1)]) for f in fits]
    heap = []
    for j, f in enumerate(fits):
        if len(curve[j]) > 1 and curve[j][0] - curve[j][1] > _FLOOR:
            heap.append((-(curve[j][0] - curve[j][1]) / _shared_numbers(f, 1, n), j))
    heapq.heapify(heap)
    while heap:
        _, j = heapq.heappop(heap)
        f, r = fits[j], ranks[j]
        cost = _shared_numbers(f, r + 1, n) - _shared_numbers(f, r, n)
        if used + cost > numbers:
            continue
        used += cost
        ranks[j] = r + 1
        if r + 2 < len(curve[j]) and curve[j][r + 1] - curve[j][r + 2] > _FLOOR:
            nxt = _shared_numbers(f, r + 2, n) - _shared_numbers(f, r + 1, n)
            heapq.heappush(heap, (-(curve[j][r + 1] - curve[j][r + 2]) / nxt, j))
    return ranks


def _for_target(fits, E, target, stat, curves) -> Allocation:
    if not 0 <= target <= 1:
        raise OptionError(f"target error must be between 0 and 1, got {target}")
    hi = max(int(math.ceil(curves.max_size())), 1)
    best = allocate_mixed(fits, E, numbers=hi, stat=stat, curves=curves)
    lo = 0
    while hi - lo > max(1, hi // 2000):
        mid = (lo + hi) // 2
        try:
            got = allocate_mixed(fits, E, numbers=mid, stat=stat, curves=curves)
        except OptionError:
            lo = mid
            continue
        if got.predicted <= target:
            hi, best = mid, got
        else:
            lo = mid
    return best


# -- pass 1, allocation, pass 2 -------------------------------------------------------------------

def compress_mixed(
    collection: Collection,
    *,
    budget: int | None = None,
    target_error: float | None = None,
    stat: str = "mean",
    max_rank: int = 64,
    weighting: str = "relative",
    storage_dtype: str = "auto",
    seed: int = 0,
    tol: float = 1e-4,
    max_iters: int = 500,
    keep_extras: bool = True,
    extras_dtype: str = "auto",
    hash_sources: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    executor: "RayExecutor | None" = None,
    clusters: "list[Clusters | None] | None" = None,
    memory_limit: int | None = None,
    backend: str = "torch",
    bits: bool = True,
) -> tuple[Artifact, dict[str, Any]]:
    """Compress with shared and per-adapter parts chosen for a byte ``budget`` of the artifact
    file, or the fewest bytes meeting ``target_error`` on ``stat``; returns the artifact and
    the allocation report. ``storage_dtype="auto"``: the adapters' own precision (and float16 for
    float32 adapters) or, with ``bits``, residual rows at 1-8 bits (else int8), whichever does
    better: candidates are built in order of prediction and the best built one is kept (lowest
    exact error; for a target the fewest bytes meeting it, a quantised one aimed
    :data:`_QUANT_ROOM` below it and re-aimed by a measured miss). ``clusters``: candidate groupings of the adapters (:class:`Clusters`;
    None: one shared basis), each fitted and allocated; the one with the lowest statistic (for a
    target: the fewest bytes meeting it) is built. With ``storage_dtype="int8"`` a stored number is
    one byte; the row scales are overhead that the dry assembly measures. With an ``executor`` both
    passes run one Ray task per module (:mod:`.executor`); the allocation runs here, on their small
    results. ``memory_limit`` (bytes for module factors and their copies): a module needing more
    than a third of it is read ``chunk`` adapters at a time on every pass (:class:`MemoryPlan`),
    and nothing is kept or read ahead beyond it. ``backend``: the array library of the JD-Full fits.
    ``bits`` (with ``storage_dtype="auto"``): also try storing each residual component at 1, 2, 3, 4
    or 8 bits, chosen with the ranks (:func:`bit_levels`), the shared parts in int8."""
    from ..evaluate import storage_bits
    from .pipeline import check_extras_dtype

    if (budget is None) == (target_error is None):
        raise OptionError("give exactly one of a budget or a target error")
    native = collection.storage_dtype() if storage_dtype == "auto" else storage_dtype
    if native not in STORAGE_DTYPES:
        raise OptionError(f"unknown dtype {native!r}; choose from {', '.join(STORAGE_DTYPES)}")
    # "auto": the adapters' own precision, float16 for float32 adapters, and int8 or, where bits can be
    # allocated (not under calibration), bits: residual components at 1-8 bits each, shared parts in int8
    # (which holds every int8 artifact: a component at 8 bits, with a smaller scale)
    low = BITS if bits and whitening_of(collection) is None else "int8"
    dtypes = [native] + ([d for d in ("float16", low) if d != native and (d == low or native == "float32")]
                         if storage_dtype == "auto" else [])
    size_of = {dt: 1 if dt == BITS else torch.empty(0, dtype=STORAGE_DTYPES[dt]).element_size() for dt in dtypes}
    check_extras_dtype(extras_dtype)
    candidates = list(clusters or [None])
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    plan = MemoryPlan.make(collection, 4, memory_limit, "jd-full")  # pass 1 and 2 read float32
    if plan.chunk and any(c is not None and c.K > 1 for c in candidates):
        big = collection.modules[min(plan.chunk)].name
        raise OptionError(f"clusters with residual parts keep a module's factors in memory: module {big} needs "
                          f"more than a third of the memory limit; raise the limit or use one shared basis")
    if plan.chunk and whitening_of(collection) is not None:
        raise OptionError("calibration reads each module whole in pass 2: module "
                          f"{collection.modules[min(plan.chunk)].name} needs more than a third of the memory limit")
    hashes = SourceHashes(collection, hash_sources)
    t0 = time.perf_counter()
    try:
        n_mod = len(collection.modules)
        names = [m.name for m in collection.modules]
        top = _affordable_rank(collection, budget // size_of[native], max_rank) if budget is not None else max_rank
        kept: dict = {}  # pass-1 factors that pass 2 need not read again (and further candidates)
        best: dict[str, tuple] = {}  # per storage dtype: (key, alloc, fits, clusters)
        tried = []
        failed: OptionError | None = None
        for cand in candidates:
            K = 1 if cand is None else cand.K
            args = [(j, min(top, min(collection.shared_ranks(name, max_rank))), weighting, seed, tol, max_iters,
                     None if cand is None or cand.K == 1 else cand.assign[j], plan.chunk.get(j), backend)
                    for j, name in enumerate(names)]
            reads = _Reads(collection, keep=kept, limit=keep_limit() if memory_limit is None else 0,
                           plan=plan) if executor is None else None
            fits: list[ModuleFit] = [None] * n_mod  # type: ignore[list-item]
            for count, (j, fit) in enumerate(map_modules(executor, fit_module_task, collection, args, labels=names,
                                                          local=reads.factors if reads else None, phase="fit"), 1):
                fits[j] = fit
                if progress:
                    progress(count, 2 * n_mod, names[j] if K == 1 else f"K={K}: {names[j]}")
            del reads
            E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
            plain = _Curves(fits, E)  # shared by every dtype and every budget the dry assembly tries
            for dt in dtypes:
                curves = _Curves(fits, E, bits=True) if dt == BITS else plain
                goal = target_error
                if dt != native and target_error is not None:  # leave int8's rounding room under the target
                    if target_error < 2 * _QUANT_ROOM:
                        continue
                    goal = target_error - _QUANT_ROOM
                try:
                    alloc = _allocate_to_size(collection, fits, E, budget, goal, stat, dt, size_of[dt],
                                              weighting, seed, tol, max_iters, keep_extras, extras_dtype, cand, hashes,
                                              curves)
                except OptionError as exc:
                    failed = failed or exc  # the first reason (the adapters' own dtype, one basis) is the one said
                    tried.append({"K": K, "dtype": dt, "predicted": None})
                    continue
                size = alloc.numbers * size_of[dt]
                tried.append({"K": K, "dtype": dt, "predicted": alloc.predicted, "numbers": alloc.numbers})
                key = ((alloc.predicted > target_error + 1e-12, size, alloc.predicted) if budget is None
                       else (alloc.predicted, size))
                if dt not in best or key < best[dt][0]:
                    best[dt] = (key, alloc, fits, cand, curves, goal, E)
        if not best:
            raise failed or OptionError("the budget is too small for any part: raise it")
        t_fit = time.perf_counter() - t0
        # int8's curves leave out its rounding (2-4e-5 of each row's energy): when they predict it
        # does better, build it and keep it if its exact error still beats the other's prediction
        order = sorted(best, key=lambda d: best[d][0])
        built = []  # (key, artifact, dtype, allocation, clusters): the best built is kept
        for i, dt in enumerate(order):
            _, alloc, fits, cand, curves, goal, E = best[dt]
            last = i + 1 == len(order)
            for attempt in range(1 if budget is not None or last else _RETARGETS + 1):
                art = _build(collection, fits, alloc, dt, weighting, seed, tol, max_iters, hashes, keep_extras,
                             progress, target_error, stat, budget, extras_dtype, executor=executor,
                             kept=kept if last else dict(kept), clusters=cand, plan=plan)
                got = _stat(per_adapter(*art.stats()).numpy(), stat)
                if budget is not None or last or got <= target_error + 1e-12 or attempt == _RETARGETS:
                    break
                # a target missed by rounding: aim lower by the miss (measured, not assumed), while that
                # still needs fewer bytes than the next precision
                goal -= (got - target_error) * 1.25 + 1e-6
                try:
                    retry = _allocate_to_size(collection, fits, E, budget, goal, stat, dt, size_of[dt],
                                              weighting, seed, tol, max_iters, keep_extras, extras_dtype, cand, hashes,
                                              curves)
                except OptionError:
                    break
                if retry.numbers * size_of[dt] >= best[order[i + 1]][1].numbers * size_of[order[i + 1]]:
                    break
                alloc = retry
                tried.append({"K": 1 if cand is None else cand.K, "dtype": dt, "predicted": alloc.predicted,
                              "numbers": alloc.numbers, "retarget": goal})
            meets = budget is None and got <= target_error + 1e-12
            key = (got, art.serialized_size()) if budget is not None else (
                (0, art.serialized_size()) if meets else (1, got))
            built.append((key, art, dt, alloc, cand))
            if last:
                break
            # the curves of a quantised precision leave out (int8) or estimate (bits) its rounding: stop when
            # what is built beats the next candidate's prediction (budget), or meets the target with fewer bytes
            if (min(b[0] for b in built)[0] < best[order[i + 1]][1].predicted) if budget is not None else meets:
                break
        _, art, dt, alloc, cand = min(built, key=lambda b: b[0])
        storage_dtype = dt
        kept.clear()
        if budget is not None and art.serialized_size() > budget:
            raise OptionError(f"could not fit the artifact into {budget:,} bytes")  # pragma: no cover
    finally:
        hashes.close()
    errs = alloc.errors
    report = {
        "mode": "mixed",
        "chosen": alloc.kind,
        "why": f"predicted {stat} error " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(
            alloc.alternatives.items(), key=lambda kv: kv[1])) + " at these bytes",
        "alternatives": alloc.alternatives,
        "budget_bytes": budget,
        "target_error": target_error,
        "target_stat": stat,
        "n_clusters": 1 if cand is None else cand.K,
        "storage_dtype": "int8" if storage_dtype == BITS else storage_dtype,
        "bits": storage_bits(art),
        "dtypes": {d: best[d][1].predicted for d in best},
        "ranks": alloc.ranks,
        "residual_ranks": {m: {"total": int(k.sum()), "max": int(k.max()) if len(k) else 0}
                           for m, k in alloc.residual.items()},
        "predicted_mean_error": float(errs.mean()),
        "predicted_max_error": float(errs.max()),
        "artifact_bytes": art.serialized_size(),
        "fit_s": t_fit,
    }
    if len(candidates) > 1 or len(dtypes) > 1:
        report["clusters_tried"] = tried
    return art, report


BITS = "bits"  # the storage candidate with low-bit residual rows (meta storage_dtype: int8)
_RETARGETS = 3  # a target missed by a quantised precision's rounding is aimed lower at most this often


def _stat(errors: np.ndarray, stat: str) -> float:
    return float(errors.mean() if stat == "mean" else errors.max())


def _allocate_to_size(collection, fits, E, budget, target_error, stat, storage_dtype, itemsize, weighting, seed,
                      tol, max_iters, keep_extras, extras_dtype, clusters, hashes, curves=None) -> Allocation:
    """The allocation for a budget of file bytes (numbers refined on dry assemblies, which give
    the exact size of everything besides the parts) or for a target error."""
    if budget is None:
        return allocate_mixed(fits, E, target_error=target_error, stat=stat, curves=curves)
    numbers = max((budget - _overhead_bytes(collection, fits, keep_extras)) // itemsize, 0)  # a first guess
    best = None
    for _attempt in range(6):  # sizes are exact from a dry assembly; the solve runs once
        alloc = allocate_mixed(fits, E, numbers=numbers, stat=stat, curves=curves)
        dry = _build(collection, fits, alloc, storage_dtype, weighting, seed, tol, max_iters, hashes, keep_extras,
                     None, target_error, stat, budget, extras_dtype, dry=True, clusters=clusters)
        size = dry.serialized_size()
        # int8: the row scales grow with the parts, so they are priced per stored number (with bits the
        # allocation prices every scale itself)
        scales = 0 if storage_dtype == BITS else sum(
            t.numel() * t.element_size() for key, t in dry.tensors().items() if key.startswith(QSCALE))
        fixed = size - itemsize * alloc.numbers - scales
        exact = int((budget - _SLACK - fixed) // (itemsize + scales / max(alloc.numbers, 1)))  # numbers that fit
        if size <= budget - _SLACK:
            if best is None or alloc.predicted < best.predicted:
                best = alloc
            if exact - alloc.numbers <= min(f.dim for f in fits):
                break  # the estimate of the overhead left less than one step unused
            numbers = exact
        else:
            numbers = min(numbers - 1, exact)
        if numbers < 0:
            extras = sum(t.numel() * t.element_size() for k, t in dry.tensors().items() if k.startswith("extras/"))
            hint = (f", of which {extras:,} are the adapters' kept non-LoRA tensors (modules_to_save): "
                    "store them in int8 or leave them out") if extras else ""
            raise OptionError(f"a budget of {budget:,} bytes cannot hold even the artifact's header and "
                              f"statistics ({fixed:,} bytes{hint})")
    if best is None:
        raise OptionError(f"could not fit the artifact into {budget:,} bytes")
    return best


def _affordable_rank(collection: Collection, numbers: int, max_rank: int) -> int:
    """The largest shared rank worth fitting under a budget: twice the largest uniform rank whose
    bases and cores fit (a module may take more than the uniform share, hardly more than twice)."""
    n = len(collection)
    dims = [m.d_in + m.d_out for m in collection.modules]
    r = 0
    while r < max_rank and sum((r + 1) * d + n * (r + 1) ** 2 for d in dims) <= numbers:
        r += 1
    return min(max_rank, max(2 * r, 1))


def _overhead_bytes(collection: Collection, fits: list[ModuleFit], keep_extras: bool) -> int:
    """A first guess at the bytes besides bases, cores and residual factors (the dry assembly
    measures them): statistics, packed spectra and residual ranks (format v3), extras, and the
    header with its compressed metadata."""
    n, M = len(collection), len(fits)
    size = 2 * 8 * n * M + 4 * sum(s.rank for a in collection.adapters for s in a.modules.values())
    size += 2 * n * M  # resid_ranks
    if keep_extras:
        size += sum(p.stat().st_size for a in collection.adapters if a.extras for p in [a.weights_file]) // 4
    meta = [{"name": a.name, "config": a.config, "ranks": {m: s.rank for m, s in a.modules.items()},
             "path": str(a.path.resolve()), "extras": a.extras} for a in collection.adapters]
    size += len(json.dumps(meta)) // 8 + n * 100 + M * 300
    return size


_QUANT_ROOM = 1e-4  # of the relative error: int8's rounding adds 2-4e-5 (docs/method.md), kept below a target
_SLACK = 16  # bytes kept free in case a header field differs between the dry and the real assembly


def _core_scales(fit: ModuleFit) -> torch.dtype:
    """Scale dtype of a module's int8 cores, the same in the dry and the real assembly: float16
    unless a core could exceed float16's range (|S_i| <= ||M_i|| for orthonormal bases; twice that
    covers the int8 rounding of the bases)."""
    top = float(fit.norms2.max().sqrt()) if fit.norms2.numel() else 0.0
    return torch.float32 if 2 * top / 127 > torch.finfo(torch.float16).max else torch.float16


def keep_limit() -> int:
    """Bytes of pass-1 factors worth keeping for pass 2 instead of reading them again: a quarter
    of the memory available now (0 where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def _nbytes(f) -> int:
    return f.B.numel() * f.B.element_size() + f.A.numel() * f.A.element_size()


class _Reads:
    """Module factors in float32, module by module, the next one read in a thread meanwhile
    (torch and the safetensors reads release the GIL), each module freed once taken.

    Pass 1 may ``keep`` modules (up to ``limit`` bytes in all): a later pass 1 (another grouping)
    takes them from ``keep`` as they are, and pass 2 from ``kept`` (freeing each) instead of
    reading them again."""

    def __init__(self, collection: Collection, *, keep: dict | None = None, limit: int = 0,
                 kept: dict | None = None, plan: MemoryPlan | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.collection = collection
        self.names = [m.name for m in collection.modules]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorazip-read")
        self._next = {}
        self._kept = kept if kept is not None else {}
        self._keep = keep
        self._room = limit - sum(_nbytes(f) for f in (keep or {}).values())
        self._plan = plan  # under a memory limit: streamed modules are not read here, nor read ahead

    def _submit(self, j: int, ahead: bool = False) -> None:
        if self._plan is not None and (j in self._plan.chunk or (ahead and not self._plan.prefetch(j - 1))):
            return
        if j < len(self.names) and j not in self._next and j not in self._kept and j not in (self._keep or {}):
            self._next[j] = self._pool.submit(self.collection.module_factors, self.names[j], dtype=torch.float32)

    def get(self, j: int):
        self._submit(j)
        if self._keep is not None and j in self._keep:
            f = self._keep[j]
        elif j in self._kept:
            f = self._kept.pop(j)
        else:
            f = self._next.pop(j).result()
            if self._keep is not None and _nbytes(f) <= self._room:
                self._keep[j], self._room = f, self._room - _nbytes(f)
        self._submit(j + 1, ahead=True)
        if j + 1 >= len(self.names):
            self._pool.shutdown(wait=False)
        return f

    def factors(self, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module ``j``'s factors as a task's ``factors`` argument (:func:`~.executor.map_modules`);
        none for a streamed module, whose task reads it in chunks."""
        if self._plan is not None and j in self._plan.chunk:
            self._submit(j + 1, ahead=True)
            return {}
        f = self.get(j)
        return {"factors": (f.B, f.A)}

    def __del__(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Parts:
    """Pass 2 of one module: its stored parts, spectra and exact errors (None when dry)."""

    U: Any
    V: Any
    cores: Any
    resid_B: Any
    resid_A: Any
    spectra: torch.Tensor
    sq: torch.Tensor | None = None
    nn2: torch.Tensor | None = None
    wsq: torch.Tensor | None = None  # weight-space errors and norms of a whitened (calibrated) build
    wnn2: torch.Tensor | None = None


def _dry_parts(collection, info, r: int, total: int, storage_dtype: str, core_scales, K: int = 1,
               bits: np.ndarray | None = None) -> _Parts:
    n = len(collection)
    if bits is not None:
        b = torch.from_numpy(np.asarray(bits, dtype=np.uint8))
        rb, ra = (LowBit(torch.zeros(total, d, dtype=torch.uint8),
                         torch.zeros(total, lowbit.n_groups(d, lowbit.GROUP), dtype=torch.bfloat16), b)
                  for d in (info.d_out, info.d_in))
    else:
        rb = dry_storage((total, info.d_out), storage_dtype, torch.float32)
        ra = dry_storage((total, info.d_in), storage_dtype, torch.float32)
    return _Parts(
        dry_storage((K, info.d_out, r), storage_dtype), dry_storage((K, info.d_in, r), storage_dtype),
        dry_storage((n, r, r), storage_dtype, core_scales), rb, ra,
        torch.zeros(n, collection.max_rank(info.name), dtype=torch.float32),
    )


def build_module_task(collection: Collection, j: int, U: torch.Tensor, V: torch.Tensor, X: torch.Tensor,
                      Y: torch.Tensor, k: torch.Tensor, storage_dtype: str, core_scales: torch.dtype,
                      assign: torch.Tensor | None = None, chunk: int | None = None, bits: torch.Tensor | None = None,
                      *, clock: dict[str, float], factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Parts:
    """Pass 2 on module ``j``: the shared part ``U X``, ``V Y`` (``U``: (d_out, R), ``X``: (R, r);
    with clusters ``assign`` (n,): ``U`` (K, d_out, R), ``X`` (K, R, r)) with its cores, and
    residual parts of ranks ``k`` (n,), from the factors (read in float32 unless given; ``chunk``
    adapters at a time for a module larger than the memory limit), rounded (``bits``: the bits of
    every residual row, stored low-bit), with the exact errors of what is stored. In process or as
    a Ray task."""
    t0 = time.perf_counter()
    name = collection.modules[j].name
    if whitening_of(collection) is not None:  # calibration: from the whitened fit (lorazip.compress.whiten)
        parts = build_mixed_module(collection, name, U @ X, V @ Y, k, storage_dtype, core_scales, assign)
        clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t0
        return _Parts(*parts[:5], parts[7].float(), *parts[5:7], *parts[8:])
    fac = _task_factors(collection, name, chunk, factors)
    t1 = time.perf_counter()
    UX, VY = U @ X, V @ Y
    Us = to_storage(UX if UX.dim() == 3 else UX[None], storage_dtype, torch.float16)  # orthonormal: |entries| <= 1
    Vs = to_storage(VY if VY.dim() == 3 else VY[None], storage_dtype, torch.float16)
    U64, V64 = Us.values.double(), Vs.values.double()
    out: dict[str, list] = {k_: [] for k_ in ("S", "b", "a", "sq", "n2", "sp")}
    row_at = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(k.long(), 0)])
    for ch in fac.split(_BUILD_CHUNK):  # every part below is per adapter: float64 a few adapters at a time
        B, A = ch.B.double(), ch.A.double()
        kc = k[ch.start : ch.stop]
        ac = None if assign is None else assign[ch.start : ch.stop]
        Ss = to_storage(_optimal_cores(B, A, U64, V64, ac), storage_dtype, core_scales)
        S64 = Ss.values.double()
        # the residual of what is stored (rounded shared part), then rounded itself
        cb = None if bits is None else bits[int(row_at[ch.start]) : int(row_at[ch.stop])]
        bs, as_, bq, aq = store_residual(*residual_factors(B, A, U64, V64, S64, kc, ac), kc, storage_dtype, cb)
        GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
        n2 = (GB * GA).sum((1, 2))
        sq, nn2 = squared_errors(B, A, U64, V64, S64, ac, norms2=n2, residual=(bq, aq))
        for key, x in zip(("S", "b", "a", "sq", "n2", "sp"), (Ss, bs, as_, sq, nn2, spectra_from_grams(GB, GA))):
            out[key].append(x)
        del ch, B, A
    sq, nn2, spectra = (torch.cat(out[key]) for key in ("sq", "n2", "sp"))
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return _Parts(Us, Vs, cat_stored(out["S"]), cat_stored(out["b"]), cat_stored(out["a"]), spectra.float(), sq, nn2)


def _build(collection, fits, alloc, storage_dtype, weighting, seed, tol, max_iters, hashes, keep_extras,
           progress, target_error, stat, budget, extras_dtype: str = "auto", dry: bool = False,
           executor=None, kept: dict | None = None, clusters: "Clusters | None" = None,
           plan: MemoryPlan | None = None) -> Artifact:
    """Pass 2: each module's chosen parts from its factors, rounded, with exact errors. ``dry``
    builds the same tensors' shapes and dtypes without computing them, to measure the file size
    exactly. The shared part is rounded first (int8: quantised, then dequantised), the residual
    is taken against what is stored of it, then rounded itself; errors are those of the stored values."""
    from .pipeline import assemble

    n, n_mod = len(collection), len(fits)
    tensors: dict[str, torch.Tensor] = {}
    sq = torch.zeros(n, n_mod, dtype=torch.float64)
    nn2 = torch.zeros(n, n_mod, dtype=torch.float64)
    modules_meta = []
    names = [info.name for info in collection.modules]
    wh = whitening_of(collection)
    wsq = torch.zeros(n, n_mod, dtype=torch.float64) if wh is not None else None
    wnn2 = torch.zeros(n, n_mod, dtype=torch.float64) if wh is not None else None
    resid = [torch.from_numpy(np.asarray(alloc.residual[fit.name], dtype=np.int64)) for fit in fits]
    rbits = [alloc.bits.get(fit.name) if storage_dtype == BITS else None for fit in fits]
    rbits = [None if b is None or not len(b) else torch.from_numpy(np.asarray(b, dtype=np.uint8)) for b in rbits]
    storage_dtype = "int8" if storage_dtype == BITS else storage_dtype  # the shared parts of a low-bit build
    if dry:
        parts = ((j, _dry_parts(collection, info, alloc.ranks[fit.name], int(resid[j].sum()), storage_dtype,
                                _core_scales(fit), fit.K, rbits[j]))
                 for j, (info, fit) in enumerate(zip(collection.modules, fits)))
    else:
        args = []
        for j, fit in enumerate(fits):
            r = alloc.ranks[fit.name]
            args.append((j, fit.U, fit.V, *fit.XY[r], resid[j], storage_dtype, _core_scales(fit), fit.assign,
                         plan.chunk.get(j) if plan else None, rbits[j]))
        reads = _Reads(collection, kept=kept, plan=plan) if executor is None and wh is None else None  # whitened: re-read there
        parts = map_modules(executor, build_module_task, collection, args, labels=names,
                            local=reads.factors if reads else None, phase="build")
    arrived: dict[int, _Parts] = {}
    for count, (j, got) in enumerate(parts, 1):
        arrived[j] = got
        while len(modules_meta) in arrived:  # stored in module order, whatever order they come in
            m = len(modules_meta)
            p, info, fit, k = arrived.pop(m), collection.modules[m], fits[m], resid[m]
            name, r, total = info.name, alloc.ranks[fits[m].name], int(resid[m].sum())
            if p.sq is not None:
                sq[:, m], nn2[:, m] = p.sq, p.nn2
            if p.wsq is not None and wsq is not None:
                wsq[:, m], wnn2[:, m] = p.wsq, p.wnn2
            tensors[f"spectra/{name}"] = p.spectra
            p.U.put(tensors, f"U/{name}")
            p.V.put(tensors, f"V/{name}")
            p.cores.put(tensors, f"cores/{name}")
            if fit.K > 1:
                tensors[f"assign/{name}"] = fit.assign.to(torch.int32)
            entry = {**info.entry(), "rank": r, "n_clusters": fit.K, "iters": fit.iters, "converged": fit.converged}
            if fit.quant is not None:  # measured low-bit errors (lorazip.evaluate's baselines use them)
                entry["quant"] = [float(f"{x:.4g}") for x in fit.quant]
            if total > 0:
                tensors[f"resid_ranks/{name}"] = k.to(torch.int32)
                p.resid_B.put(tensors, f"resid_B/{name}")
                p.resid_A.put(tensors, f"resid_A/{name}")
                entry["residual"] = {"max_rank": int(k.max()), "total_rank": total}
                if rbits[m] is not None:
                    tensors[f"qbits/{name}"] = rbits[m]
                    entry["residual"]["bits"] = {"group": "row", "bytes": [
                        lowbit.packed_bytes(info.d_out, rbits[m].numpy()), lowbit.packed_bytes(info.d_in, rbits[m].numpy())]}
            modules_meta.append(entry)
        if progress:
            progress(n_mod + count, 2 * n_mod, names[j])
    ranks = list(alloc.ranks.values())
    clustered = clusters is not None and clusters.K > 1
    meta = {
        "method": "jd-clustered" if clustered else "jd-full",
        "rank": max(set(ranks), key=ranks.count),
        "per_module_ranks": len(set(ranks)) > 1,
        "weighting": weighting,
        "storage_dtype": storage_dtype,
        "solver": {"max_iters": max_iters, "tol": tol, "seed": seed, "device": "cpu", "compute_dtype": "float32"},
        "clustering": clusters.record() if clustered else None,
        "allocation": {
            "mode": "mixed", "chosen": alloc.kind, "budget_bytes": budget, "target_error": target_error,
            "target_stat": stat, "predicted_mean_error": float(alloc.errors.mean()),
            "predicted_max_error": float(alloc.errors.max()),
        },
    }
    if wh is not None:
        annotate(wh, meta, tensors, wsq, wnn2)
    return assemble(collection, meta, modules_meta, tensors, sq, nn2, hashes, keep_extras, extras_dtype)

