"""The allocator: pure functions from exact curves (:mod:`.curves`) to ranks and bits. No I/O.

* :func:`allocate_mixed`: shared rank (and, with bits, the widths of its bases and cores) per
  module and residual rank (and bits) per (adapter, module) for a budget of stored numbers (or
  bytes) or the fewest meeting an error target. For the mean, a Lagrangian search over the price
  of a number picks ``r_m`` (and its widths) per module, then the leftover
  numbers go greedily to the residual steps that remove most error per number; for the max,
  residual numbers go to the worst adapter first. The result is compared with per-adapter SVD alone,
  uniform JD-Full and per-module JD (from the same curves) and the best is kept. A target is met
  with the fewest numbers by bisection on the budget.
* :func:`allocate_shared`: shared ranks only (diagonal cores, a uniform rank): greedy on error
  removed per number from rank 1 everywhere (never worse than the best uniform rank), or one rank
  for every module with ``uniform``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from ..errors import OptionError
from .. import lowbit
from .curves import SHARED_BITS, ModuleFit, RankCurves, bit_levels
from .plan import Clusters, ModulePlan, Plan


_FLOOR = 1e-10  # a step removing less of the (relative) error than this only stores solver noise


STATS = ("mean", "max")


BITS = "bits"  # the storage candidate with low-bit parts (meta storage_dtype: int8)
# how a module's shared part may be stored with bits: (bits of the bases, bits of the cores)
SHARED_OPTIONS = tuple((a, c) for a in SHARED_BITS for c in SHARED_BITS)
_DEFAULT = SHARED_OPTIONS.index((8, 8))  # where nothing was measured (off the grid): 8 bits, no error predicted


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
    shared_bits: dict[str, tuple[int, int]] = field(default_factory=dict)  # per module: (bases, cores) bits

    def plan(self, fits: list[ModuleFit], storage_dtype: str, groups: Clusters | None = None) -> Plan:
        """This allocation as a :class:`~lorazip.compress.plan.Plan` stored in ``storage_dtype`` ("bits":
        residual rows at their bits), on one basis or the ``groups`` (K clusters)."""
        low = storage_dtype == BITS
        mods = tuple(ModulePlan(f.name, self.ranks[f.name], residual=np.asarray(self.residual[f.name], dtype=np.int64),
                                bits=self.bits.get(f.name) if low else None,
                                shared_bits=self.shared_bits.get(f.name, (8, 8)) if low and self.ranks[f.name] else None)
                     for f in fits)
        clustered = groups is not None and groups.K > 1
        return Plan("jd-clustered" if clustered else "jd-full", storage_dtype, mods, groups.K if clustered else 1,
                    groups if clustered else None, self.kind, self.errors)


def _shared_numbers(fit: ModuleFit, r: int, n: int) -> int:
    return fit.K * r * fit.dim + n * r * r


def shared_bytes(fit: ModuleFit, r: int, n: int, option: tuple[int, int]) -> int:
    """Bytes of a module's shared part at rank ``r`` stored low-bit (:func:`~lorazip.quantize.to_shared_lowbit`):
    every basis vector a packed row at ``option[0]`` bits, every core row at ``option[1]``, each row
    with a bfloat16 scale."""
    if r == 0:
        return 0
    bu, bc = option
    return (fit.K * r * (lowbit.row_bytes(fit.d_out, bu) + lowbit.row_bytes(fit.d_in, bu) + 4)
            + n * r * (lowbit.row_bytes(r, bc) + 2))


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


def _mix_numbers(fits, ranks, resid, n) -> int:
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


def by_adapter(who: np.ndarray, n: int) -> np.ndarray:
    """The stable argsort of steps' adapters ``who`` (each in ``0 .. n - 1``): each adapter's steps in
    their order. Where the indices fit 16 bits the sort is NumPy's radix sort (8x faster at 160,000
    steps than the merge sort of 32-bit keys; a stable sort's result is the same either way)."""
    return np.argsort(who.astype(np.uint16) if n <= 1 << 16 else who, kind="stable")


class StepCurves:
    """Per module and grid rank: residual steps sorted for the Lagrangian and the greedy fill.
    ``bits``: components may be stored at 1-8 bits (:func:`bit_levels`), costs are bytes and each
    module's shared part is stored at one of the ``shared`` (bases, cores) widths, its predicted
    quantisation error (pass 1, :func:`~lorazip.compress.curves.shared_quant`) added to the
    truncation error; otherwise a component costs ``dim`` numbers."""

    def __init__(self, fits: list[ModuleFit], E: np.ndarray, bits: bool = False,
                 shared: tuple[tuple[int, int], ...] = SHARED_OPTIONS):
        n = len(E)
        self.shared = tuple(shared)  # with bits: the (bases, cores) widths a shared part may take
        c = np.where(E > 0, 1.0 / (n * np.maximum(E, 1e-300)), 0.0)  # contribution to the mean
        self.fits, self.n, self.E, self.c, self.bits = fits, n, E, c, bits
        self._shared_only: list[np.ndarray] | None = None
        self._uniform: dict[str, list[tuple]] = {}
        self._squant: dict[tuple[str, int], np.ndarray | None] = {}  # (module, rank) -> ModuleFit.shared_quant
        self._merges: dict[tuple[int, ...], tuple] = {}  # shared ranks -> all their steps merged (fill_mean)
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

    def hold_in(self, spill, least: int = 1 << 20) -> None:
        """Hold the step arrays of ``least`` bytes or more in ``spill``'s files (a large run's build:
        only a re-aim reads them again) and drop the merged steps (made again if needed)."""
        for row in (row for rows in self.opts for row in rows):
            for f in fields(row):
                arr = getattr(row, f.name)
                if isinstance(arr, np.ndarray) and not isinstance(arr, np.memmap) and arr.nbytes >= least:
                    setattr(row, f.name, spill.hold_array(arr))
        self._merges.clear()

    def uniform_ranks(self, score: Callable[[np.ndarray], float], stat: str) -> list[tuple]:
        """``(size, score, ranks)`` of one shared rank r = 1..R in every module (capped at each
        module's largest), no residual parts; computed once per statistic."""
        if stat not in self._uniform:
            none = [np.zeros(self.n, dtype=np.int64) for _ in self.fits]
            table = []
            for r in range(1, max(max(f.shared) for f in self.fits) + 1):
                rk = [min(r, max(f.shared)) for f in self.fits]
                table.append((self.size(rk, none), score(self.errors(rk, none, self.E)), rk))
            self._uniform[stat] = table
        return self._uniform[stat]

    def shared_curves(self) -> list[np.ndarray]:
        """Per module, the contribution to the mean error of its shared part alone at ranks 0..R
        (computed once: every budget the bisection of a target tries uses them)."""
        if self._shared_only is None:
            self._shared_only = [np.array([float((self.c * f.shared[r].numpy()).sum())
                                           for r in range(max(f.shared) + 1)]) for f in self.fits]
        return self._shared_only

    def _bit_row(self, r: int, base: float, sp: np.ndarray, levels: tuple[list, ...]) -> _Row:
        """``levels``: those of each class of components (:func:`lorazip.lowbit.component_class`)."""
        n, cap = sp.shape
        T = max(len(lv) for lv in levels)
        rho = np.ones((len(levels), T + 1))
        cost = np.zeros((len(levels), T + 1))
        for c, lv in enumerate(levels):  # a class with fewer levels: steps that remove nothing, never taken
            rho[c, 1:] = [x[2] for x in lv] + [lv[-1][2] if lv else 1.0] * (T - len(lv))
            cost[c, 1:] = [x[1] for x in lv] + [(lv[-1][1] if lv else 0) + 1.0] * (T - len(lv))
        cls = lowbit.position_classes(cap, len(levels))
        raw = sp[:, :, None] * (rho[:, :-1] - rho[:, 1:])[cls][None]  # (n, cap, T) error removed by each move up
        gain = (self.c[:, None, None] * raw).ravel()
        dc = np.broadcast_to(np.diff(cost, axis=1)[cls][None], raw.shape).ravel()
        live = np.nonzero(gain > 0)[0]  # steps that remove nothing are never taken
        slope = gain[live] / dc[live]
        order = live[np.argsort(-slope, kind="stable")]
        who = (order // (cap * T)).astype(np.int32)
        comp = ((order // T) % cap).astype(np.int16)
        lvl = (order % T).astype(np.int8)
        by = by_adapter(who, n)  # each adapter's steps, in the global order
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

    def shared_cost(self, fit: ModuleFit, r: int, option: int | None = None) -> float:
        """Cost of a module's shared part at rank ``r``: its numbers, or with bits its bytes stored
        as ``SHARED_OPTIONS[option]`` (bits of the bases, of the cores; None: 8 and 8)."""
        if not self.bits:
            return _shared_numbers(fit, r, self.n)
        return shared_bytes(fit, r, self.n, SHARED_OPTIONS[_DEFAULT if option is None else option])

    def shared_error(self, fit: ModuleFit, r: int, option: int | None) -> np.ndarray | None:
        """(n,) predicted squared error of storing the shared part at ``SHARED_OPTIONS[option]`` (None:
        8 bits; pass 1's measurement, :meth:`~lorazip.compress.curves.ModuleFit.shared_quant`); None
        without bits or where nothing was measured."""
        if not self.bits:
            return None
        if (fit.name, r) not in self._squant:  # every candidate and option asks again: computed once
            self._squant[fit.name, r] = fit.shared_quant(r)
        q = self._squant[fit.name, r]
        if q is None:
            return None
        a, c = SHARED_OPTIONS[_DEFAULT if option is None else option]
        return q[:, SHARED_BITS.index(a), SHARED_BITS.index(c)]

    def _options(self, fit: ModuleFit, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Cost and weighted error (each (O,)) of every way to store a module's shared part at rank ``r``;
        an option not measured costs an infinite error (8 bits, the default, is always allowed)."""
        if not self.bits:
            return np.array([self.shared_cost(fit, r)], dtype=np.float64), np.zeros(1)
        cost = np.array([self.shared_cost(fit, r, o) for o in range(len(SHARED_OPTIONS))], dtype=np.float64)
        err = np.full(len(SHARED_OPTIONS), np.inf)
        if r == 0:
            err[:] = 0.0
            return cost, err
        for o, option in enumerate(SHARED_OPTIONS):
            if option not in self.shared:
                continue
            e = self.shared_error(fit, r, o)
            err[o] = (0.0 if o == _DEFAULT else np.inf) if e is None else float((self.c * e).sum())
        return cost, err

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
                seg_c.append((cpos, row.base, self._options(fit, row.r), j, row.r))
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
        self._ocost = np.array([c[2][0] for c in seg_c], dtype=np.float64).reshape(len(seg_c), -1)
        self._oerr = np.array([c[2][1] for c in seg_c], dtype=np.float64).reshape(len(seg_c), -1)
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

    def lagrangian(self, lam: float) -> tuple[list[int], list[int], list[int | None]]:
        """Per module the grid rank, residual step count and (with bits) way to store the shared part
        (an index of :data:`SHARED_OPTIONS`) minimising error + lam * cost (the first row in grid order
        that is lower by more than 1e-18 than those before it). The shared part's option does not
        change the residual steps' gains, so it is chosen per row on its own."""
        return self.priced(lam)[:3]

    def priced(self, lam: float) -> tuple[list[int], list[int], list[int | None], float]:
        """:meth:`lagrangian` and the cost of its choice (added module by module, in order)."""
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
        opt = (self._oerr + lam * self._ocost).argmin(1)
        pick = np.arange(len(opt))
        val = self._base - self._cums[at] + lam * (self._ocost[pick, opt] + self._spend[at]) + self._oerr[pick, opt]
        best_val = np.full(len(self.fits), np.inf)
        best = np.zeros(len(self.fits), dtype=np.int64)
        for k in range(self._grid.shape[1]):
            idx = self._grid[:, k]
            ok = idx >= 0
            v = np.where(ok, val[np.maximum(idx, 0)], np.inf)
            better = ok & ((k == 0) | (v < best_val - 1e-18))
            best = np.where(better, idx, best)
            best_val = np.where(better, v, best_val)
        opts = opt[best].tolist() if self.bits else [None] * len(best)
        size = sum((self._ocost[best, opt[best]] + self._spend[at[best]]).tolist())
        return self._rank[best].tolist(), cnt[best].tolist(), opts, size

    def resid_from_counts(self, j: int, r: int, cnt: int) -> np.ndarray:
        """Steps per adapter (its residual rank at native precision) of the first ``cnt`` steps."""
        return np.bincount(self.row(j, r).who[:cnt], minlength=self.n)

    def fill_mean(self, ranks: list[int], counts: list[int], numbers: int,
                  opts: list[int | None] | None = None) -> list[np.ndarray]:
        """Greedy: spend what is left of ``numbers`` on residual steps by error removed per cost unit
        (``opts``: how each module's shared part is stored, :meth:`lagrangian`). Each module's steps
        are sorted by that ratio, so the greedy is a merge: every module's next steps (up to one that
        removes nothing) in one stable sort (ties: the lower module first), taken in order while they
        fit; a step that does not fit ends its module (it would not fit later either) and the others
        go on, the sums of costs kept in the order a step-by-step greedy would add them."""
        rows = [self.row(j, r) for j, r in enumerate(ranks)]
        opts = opts or [None] * len(ranks)
        used = sum(self.shared_cost(f, r, o) + (c * f.dim if row.costs is None else row.cumc[c])
                   for f, r, c, row, o in zip(self.fits, ranks, counts, rows, opts))
        all_cost, all_who, all_step, floors = self._merged(ranks, rows)
        start = np.asarray(counts, dtype=np.int64)
        stop = np.array([int(fl[i]) if (i := np.searchsorted(fl, c)) < len(fl) else len(row.gains)
                         for fl, c, row in zip(floors, counts, rows)], dtype=np.int64)
        # each module's steps from its count up to one that removes nothing, in the merged order
        live = (all_step >= start[all_who]) & (all_step < stop[all_who])
        taken = np.zeros(len(self.fits), dtype=np.int64)
        if live.any():
            cost, who = all_cost[live], all_who[live]
            alive = np.ones(len(cost), dtype=bool)
            while True:
                idx = np.nonzero(alive)[0]
                cum = np.cumsum(np.concatenate([[float(used)], cost[idx]]))[1:]
                k = int(np.argmax(cum > numbers)) if len(idx) and cum[-1] > numbers else len(idx)
                np.add.at(taken, who[idx[:k]], 1)
                if k == len(idx):
                    break
                used = cum[k - 1] if k else used
                alive[idx[: k + 1]] = False
                alive &= who != who[idx[k]]  # that module's next step did not fit: it is done
                # so is every module whose next step does not fit now: what is left only shrinks
                rest = np.nonzero(alive)[0]
                mods, first = np.unique(who[rest], return_index=True)
                done = mods[used + cost[rest[first]] > numbers]
                if len(done):
                    alive &= ~np.isin(who, done)
        return [self.resid_from_counts(j, r, c + int(t)) for j, (r, c, t) in enumerate(zip(ranks, counts, taken))]

    def _merged(self, ranks: list[int], rows: list[_Row]):
        """Every step of the rows of shared ``ranks`` in the greedy's order (error removed per cost
        unit, descending; ties: the lower module, then the earlier step): their costs, modules and
        places in their rows, and per row where its steps removing nothing are. The same for every
        budget a target's search tries, so computed once per choice of ranks (a few kept)."""
        key = tuple(ranks)
        hit = self._merges.get(key)
        if hit is None:
            keys, costs, owner, step, floors = [], [], [], [], []
            for j, (f, row) in enumerate(zip(self.fits, rows)):
                g = row.gains
                # bit rows keep their float32 costs (exact; sums are taken in float64), modules and
                # places as int32: at 1000 adapters x 96 modules a merge holds 7.7 M steps, 4 are kept
                cost = np.full(len(g), float(f.dim)) if row.costs is None else row.costs
                keys.append(g / cost)
                costs.append(cost)
                owner.append(np.full(len(g), j, dtype=np.int32))
                step.append(np.arange(len(g), dtype=np.int32))
                floors.append(np.flatnonzero(g <= _FLOOR))
            order = np.argsort(-np.concatenate(keys), kind="stable") if keys else np.zeros(0, dtype=np.int64)
            cat = (lambda parts: np.concatenate(parts)[order]) if keys else (lambda parts: np.zeros(0, dtype=np.int64))
            hit = (cat(costs), cat(owner), cat(step), floors)
            if len(self._merges) >= 4:
                self._merges.pop(next(iter(self._merges)))
            self._merges[key] = hit
        return hit

    def fill_max(self, ranks: list[int], numbers: int, E: np.ndarray,
                 opts: list[int | None] | None = None) -> list[np.ndarray]:
        """Greedy on the max: the worst adapter gets its best next step per cost unit, until the
        worst cannot improve within the budget."""
        if self.bits:
            return self._fill_max_steps(ranks, numbers, E, opts or [None] * len(ranks))
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

    def _fill_max_steps(self, ranks: list[int], numbers: int, E: np.ndarray, opts: list) -> list[np.ndarray]:
        """:meth:`fill_max` over bit steps: each adapter's steps in its own order."""
        n, fits = self.n, self.fits
        rows = [self.row(j, r) for j, r in enumerate(ranks)]
        own = []  # per module: per adapter the indices of its steps, in order
        for row in rows:
            by = by_adapter(row.who, n) if row is not None else np.zeros(0, dtype=np.int64)
            cnt = np.bincount(row.who, minlength=n) if row is not None else np.zeros(n, dtype=np.int64)
            own.append(np.split(by, np.cumsum(cnt)[:-1]))
        resid = [np.zeros(n, dtype=np.int64) for _ in fits]
        used = float(sum(self.shared_cost(f, r, o) for f, r, o in zip(fits, ranks, opts)))
        err = self.errors(ranks, resid, E, opts)
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

    def errors(self, ranks: list[int], resid: list[np.ndarray], E: np.ndarray,
               opts: list[int | None] | None = None) -> np.ndarray:
        """Predicted per-adapter error (n,) of ``ranks`` and residual steps ``resid`` per module
        (with bits, shared parts stored as ``opts``)."""
        if not self.bits:
            return _errors(self.fits, ranks, resid, E)
        tot = np.zeros_like(E)
        for j, (fit, r, k, o) in enumerate(zip(self.fits, ranks, resid, opts or [None] * len(ranks))):
            q = self.shared_error(fit, r, o)
            if q is not None:
                tot += q
            row = self.row(j, r)
            if row is None:
                tot += fit.shared[r].numpy()
                continue
            taken = np.nonzero(self._taken(row, np.asarray(k)))[0]
            removed = np.bincount(row.who[taken], weights=self._raws(row, taken), minlength=self.n)
            tot += np.maximum(fit.spectra[r].numpy().sum(1) - removed, 0)
        return np.where(E > 0, tot / np.maximum(E, 1e-300), 0.0)

    def size(self, ranks: list[int], resid: list[np.ndarray], opts: list[int | None] | None = None) -> float:
        """Cost (numbers, or bytes with bits) of ``ranks`` and residual steps ``resid``."""
        if not self.bits:
            return _mix_numbers(self.fits, ranks, resid, self.n)
        total = 0.0
        for j, (fit, r, k, o) in enumerate(zip(self.fits, ranks, resid, opts or [None] * len(ranks))):
            total += self.shared_cost(fit, r, o)
            row = self.row(j, r)
            if row is not None and np.any(k):
                total += float(row.costs[self._taken(row, np.asarray(k))].sum())
        return total

    def max_size(self) -> float:
        """The cost of every residual component at its highest precision, no shared part."""
        if not self.bits:
            full = [np.array([f.residual_cap(0)] * self.n) for f in self.fits]
            return _mix_numbers(self.fits, [0] * len(self.fits), full, self.n)
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
        return lowbit.stored_bits(level, row.levels)


def allocate_mixed(fits: list[ModuleFit], E: np.ndarray, *, numbers: int | None = None,
                   target_error: float | None = None, stat: str = "mean",
                   curves: "StepCurves | None" = None, seed: tuple[float, float] | None = None) -> Allocation:
    """Shared ranks and residual ranks for a budget of ``numbers`` stored values (lowest
    ``stat``), or the fewest numbers meeting ``target_error`` on ``stat`` (``seed``: the numbers and
    predicted ``stat`` of an earlier allocation on the same curves, where the search starts)."""
    if stat not in STATS:
        raise OptionError(f"target statistic must be mean or max, got {stat!r}")
    curves = curves if curves is not None else StepCurves(fits, E)  # sorted gains: the same for every budget
    if target_error is not None:
        chosen = _for_target(fits, E, target_error, stat, curves, seed)
    else:
        chosen = _for_numbers(fits, E, numbers, stat, curves)
    if curves.bits:  # steps -> residual ranks and the bits of every stored row
        for j, f in enumerate(fits):
            chosen.residual[f.name], chosen.bits[f.name] = curves.decode(j, chosen.ranks[f.name],
                                                                         chosen.residual[f.name])
    return chosen


def _for_numbers(fits: list[ModuleFit], E: np.ndarray, numbers: int, stat: str, curves: StepCurves) -> Allocation:
    """:func:`allocate_mixed` for a budget of ``numbers``, residual parts as step counts (not decoded)."""
    n = len(E)
    score = (lambda e: float(e.mean())) if stat == "mean" else (lambda e: float(e.max()))
    cands: list[Allocation] = []

    def add(kind, ranks, resid, opts=None):
        size = curves.size(ranks, resid, opts)
        if size <= numbers:
            e = curves.errors(ranks, resid, E, opts)
            stored = {f.name: SHARED_OPTIONS[o] for f, r, o in zip(fits, ranks, opts or []) if o is not None and r}
            cands.append(Allocation({f.name: r for f, r in zip(fits, ranks)},
                                    {f.name: k for f, k in zip(fits, resid)}, size, score(e), kind, e,
                                    shared_bits=stored))

    zeros = [0] * len(fits)
    # the mix: Lagrangian price per number, bisected to the budget, then greedy fill
    ranks, counts, opts, seen = _priced(fits, curves, numbers)
    if stat == "mean":
        add("mix", ranks, curves.fill_mean(ranks, counts, numbers, opts), opts)
        add("per-adapter SVD", zeros, curves.fill_mean(zeros, [0] * len(fits), numbers))
    else:
        for rk, op in seen[-6:] + [(ranks, opts), (zeros, None)]:
            add("mix" if any(rk) else "per-adapter SVD", rk, curves.fill_max(rk, numbers, E, op), op)
    # shared-only baselines on the full rank curves: uniform JD-Full and per-module JD
    none = [np.zeros(n, dtype=np.int64) for _ in fits]
    uniform = None
    for size, e, rk in curves.uniform_ranks(score, stat):  # the best uniform rank that fits; of equal errors,
        if size > numbers:                                    # the smallest
            break
        if uniform is None or e < uniform[0] - max(_FLOOR, 1e-6 * e):
            uniform = (e, rk)
    if uniform is not None:
        add("uniform JD-Full", uniform[1], none)
    add("per-module JD", _per_module_shared(fits, numbers, n, curves.shared_curves()), none)
    if not cands:
        raise OptionError("the budget is too small for any part: raise it")
    best = min(a.predicted for a in cands)
    near = [a for a in cands if a.predicted <= best + max(1e-9, 1e-6 * best)]  # ties: the fewest numbers
    chosen = min(near, key=lambda a: (a.numbers, a.predicted))
    for a in cands:
        chosen.alternatives[a.kind] = min(a.predicted, chosen.alternatives.get(a.kind, float("inf")))
    return chosen


def _priced(fits: list[ModuleFit], curves: StepCurves, numbers: int):
    """The shared ranks, residual step counts and shared options of the lowest price per number whose
    Lagrangian choice fits ``numbers`` (bisected in log space: prices span orders of magnitude), and
    every distinct choice of shared ranks and options met on the way that fit."""
    hi = max((row.gains[0] / row.cost(0, f.dim) for f, rows in zip(fits, curves.opts) for row in rows
              if len(row.gains)), default=1.0) * 2 + 1e-30
    lo = hi * 1e-15
    seen = []
    for _ in range(80):
        lam = math.sqrt(lo * hi)
        ranks, counts, opts, size = curves.priced(lam)
        if size > numbers:
            lo = lam
        else:
            hi = lam
            if (ranks, opts) not in seen:
                seen.append((ranks, opts))
        if hi <= lo * (1 + 1e-9):
            break
    ranks, counts, opts = curves.lagrangian(hi)
    return ranks, counts, opts, seen


def _per_module_shared(fits, numbers, n, curve: list[np.ndarray]) -> list[int]:
    """Shared ranks only (no residual), greedy on error removed per number (the v1 allocator), on
    each module's shared-only ``curve`` (:meth:`StepCurves.shared_curves`)."""
    ranks = [0] * len(fits)
    used = 0
    heap = []
    # per module the numbers each rank step adds and the error it removes (as Python floats and ints)
    steps = [(np.diff(_shared_numbers(f, np.arange(len(c)), n)).tolist(), (c[:-1] - c[1:]).tolist())
             for f, c in zip(fits, curve)]
    for j, (cost, gain) in enumerate(steps):
        if gain and gain[0] > _FLOOR:
            heap.append((-gain[0] / cost[0], j))
    heapq.heapify(heap)
    while heap:
        _, j = heapq.heappop(heap)
        r = ranks[j]
        cost, gain = steps[j]
        if used + cost[r] > numbers:
            continue
        used += cost[r]
        ranks[j] = r + 1
        if r + 1 < len(gain) and gain[r + 1] > _FLOOR:
            heapq.heappush(heap, (-gain[r + 1] / cost[r + 1], j))
    return ranks


def _for_target(fits, E, target, stat, curves, seed: tuple[float, float] | None = None) -> Allocation:
    """The allocation of the fewest numbers (to within 1/2000 of them) whose predicted ``stat``
    meets ``target``. A bracket of numbers, ``lo`` missing the target and ``hi`` meeting it, is
    narrowed from every residual part at its most (``hi``): first down by factors of 16 until a
    guess misses, then by the secant of log error against log numbers through the last two guesses
    (the curves fall roughly as a power of the numbers), each guess moved half the tolerance past
    the estimate, away from the end the last guess replaced, so that the bracket closes from both
    sides; a guess outside the bracket, or after three in a row that replaced the same end, or in a
    bracket under twice the tolerance, is its (geometric) middle instead. Each guess is one
    allocation at a budget (:func:`_for_numbers`): about half as many as a bisection's 12 to 16.
    A ``seed`` (numbers, predicted ``stat``) of an earlier allocation on the same curves (a re-aim
    after a build missed the target: a lower target, so more numbers) is one end of the first
    bracket and the first secant's other point: 3-5 guesses instead of 8-10."""
    if not 0 <= target <= 1:
        raise OptionError(f"target error must be between 0 and 1, got {target}")
    hi = max(int(math.ceil(curves.max_size())), 1)
    lo, best, last = 0, None, []  # the last two guesses (numbers, predicted error), newest last
    moved, slow = "hi", 0  # the end the last guess replaced; guesses in a row that replaced it
    if seed is not None and 0 < int(seed[0]) < hi and seed[1] > target > 0:  # known to miss: the lower end
        lo, moved = int(seed[0]), "lo"
        last = [(lo, float(seed[1]))]
        # first guess: the error falling as the numbers rise, locally (as the secant assumes below)
        guess = min(hi - 1, int(math.ceil(lo * seed[1] / target)) + max(1, hi // 2000) // 2)
        if guess > lo:
            got = _for_numbers(fits, E, guess, stat, curves)
            last.append((guess, got.predicted))
            if got.predicted <= target:
                hi, best, moved = guess, got, "hi"
            else:
                lo = guess
    if best is None and seed is None and stat == "mean" and target > 0:
        # per-adapter parts alone are one of every allocation's candidates, and their curve costs a
        # greedy fill per budget (not a whole allocation): where they meet the target, that many
        # numbers are an upper end every allocation meets, and one guess just below it tells whether
        # sharing does better (where it does not, the bracket is closed there)
        top = _per_adapter_meets(fits, E, target, curves, hi)
        got = _try_numbers(fits, E, top, stat, curves) if top is not None else None
        if got is not None and got.predicted <= target:
            hi, best, last = top, got, [(top, got.predicted)]
            mid = hi - 2 * max(1, hi // 2000)
            low = _try_numbers(fits, E, mid, stat, curves) if mid > 0 else None
            if low is not None:
                last.append((mid, low.predicted))
                if low.predicted <= target:
                    hi, best = mid, low
                else:
                    lo, moved = mid, "lo"
    if best is None:
        best = _for_numbers(fits, E, hi, stat, curves)
        if best.predicted > target:
            return best  # nothing meets it: the most there is
        last = (last + [(hi, best.predicted)])[-2:]
    while hi - lo > max(1, hi // 2000):
        tol = max(1, hi // 2000)
        mid = None
        if lo == 0:
            mid = hi // 16
        elif slow < 3 and len(last) == 2 and target > 0 and hi - lo > 2 * tol:
            (x0, f0), (x1, f1) = last
            if f0 > 0 and f1 > 0 and f0 != f1 and x0 != x1:
                est = math.exp(math.log(x1) + (math.log(target) - math.log(f1)) *
                               (math.log(x0) - math.log(x1)) / (math.log(f0) - math.log(f1)))
                if lo < est < hi:
                    mid = int(round(est)) + (tol // 2 if moved == "lo" else -(tol // 2))
        if mid is None:
            mid = int(math.sqrt(lo * hi)) if hi > 4 * lo else (lo + hi) // 2
            slow = 0
        mid = min(max(mid, lo + 1), hi - 1)
        got = _try_numbers(fits, E, mid, stat, curves)
        side = "hi" if got is not None and got.predicted <= target else "lo"
        if side == "hi":
            hi, best = mid, got
        else:
            lo = mid
        slow = slow + 1 if side == moved and lo > 0 else 1
        moved = side
        last = (last + [(mid, 1.0 if got is None else got.predicted)])[-2:]
    return best


def _try_numbers(fits, E, numbers: int, stat: str, curves: "StepCurves") -> Allocation | None:
    """:func:`_for_numbers`, or None where ``numbers`` hold no part at all."""
    try:
        return _for_numbers(fits, E, numbers, stat, curves)
    except OptionError:
        return None


def _per_adapter_meets(fits, E, target: float, curves: "StepCurves", hi: int) -> int | None:
    """The fewest numbers (to within 1/2000 of ``hi``) at which per-adapter parts alone (no shared part,
    the greedy fill of :func:`_for_numbers`' "per-adapter SVD" candidate) meet ``target`` on the mean;
    None where even ``hi`` does not. Bisected: a fill costs a few milliseconds where an allocation
    costs tens."""
    zeros = [0] * len(fits)

    def mean_at(numbers: int) -> float:
        return float(curves.errors(zeros, curves.fill_mean(zeros, zeros, numbers), E).mean())

    if mean_at(hi) > target:
        return None
    lo, tol = 0, max(1, hi // 2000)
    while hi - lo > tol:
        mid = (lo + hi) // 2
        if mean_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _step_cost(dim: int, n: int, r: int, diag: bool) -> int:
    """Numbers added by raising a module from rank r to r + 1."""
    return dim + n * (1 if diag else 2 * r + 1)


def allocate_shared(
    curves: RankCurves,
    n: int,
    *,
    budget_numbers: int | None = None,
    target_error: float | None = None,
    uniform: bool = False,
    diag: bool = False,
) -> dict[str, int]:
    """Ranks per module meeting ``target_error`` (mean) with the fewest numbers, or the lowest
    mean error within ``budget_numbers``. Returns ``{module: rank}``."""
    c = curves.contribution()
    caps = [len(x) - 1 for x in c]
    if uniform:
        return dict(zip(curves.modules, _uniform(c, caps, curves.dims, n, budget_numbers, target_error, diag)))
    greedy = _greedy(c, caps, curves.dims, n, budget_numbers, target_error, diag)
    # Greedy on gain per byte is not optimal for every curve shape: never return worse than
    # the best uniform allocation under the same constraint.
    try:
        uni = _uniform(c, caps, curves.dims, n, budget_numbers, target_error, diag)
    except OptionError:
        uni = None
    if uni is not None:
        def score(ranks):
            err = sum(float(x[r]) for x, r in zip(c, ranks))
            size = sum(rank_numbers(d, n, r, diag) for d, r in zip(curves.dims, ranks))
            if target_error is not None:  # fewest numbers among those meeting the target
                return (err > target_error, size if err <= target_error else err)
            return (err, size)
        if score(uni) < score(greedy):
            greedy = uni
    return dict(zip(curves.modules, greedy))


def _uniform(c, caps, dims, n, budget_numbers, target_error, diag) -> list[int]:
    best = None
    for r in range(1, max(caps) + 1):
        ranks = [min(r, cap) for cap in caps]
        size = sum(rank_numbers(d, n, rr, diag) for d, rr in zip(dims, ranks))
        err = sum(float(x[rr]) for x, rr in zip(c, ranks))
        if budget_numbers is not None and size > budget_numbers:
            break
        best = ranks
        if target_error is not None and err <= target_error:
            break
    if best is None:
        raise OptionError("the budget is too small for rank 1 in every module")
    return best


def _greedy(c, caps, dims, n, budget_numbers, target_error, diag) -> list[int]:
    ranks = [1] * len(c)
    size = sum(rank_numbers(d, n, 1, diag) for d in dims)
    if budget_numbers is not None and size > budget_numbers:
        raise OptionError("the budget is too small for rank 1 in every module")
    err = sum(float(x[1]) for x in c)
    min_gain = 1e-6 * max(err, 1e-12)  # below this a step only buys solver noise
    while target_error is None or err > target_error:
        best_j, best_ratio = None, 0.0
        for j, x in enumerate(c):
            r = ranks[j]
            if r >= caps[j]:
                continue
            cost = _step_cost(dims[j], n, r, diag)
            if budget_numbers is not None and size + cost > budget_numbers:
                continue
            gain = float(x[r]) - float(x[r + 1])
            if gain <= min_gain:
                continue
            ratio = gain / cost
            if best_j is None or ratio > best_ratio:
                best_j, best_ratio = j, ratio
        if best_j is None:
            break
        r = ranks[best_j]
        size += _step_cost(dims[best_j], n, r, diag)
        err -= float(c[best_j][r]) - float(c[best_j][r + 1])
        ranks[best_j] = r + 1
    return ranks


def rank_numbers(dim: int, n: int, r: int, diag: bool) -> int:
    return r * dim + n * (r if diag else r * r)
