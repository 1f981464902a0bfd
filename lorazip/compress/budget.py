"""Runs under a byte budget or an error target: fit the curves, allocate, build, check.

Per module ``m`` the artifact may hold a shared part (JD-Full bases ``U``, ``V`` at rank
``r_m >= 0`` with cores ``S_i``) plus, per adapter, a residual part: the truncated SVD of
``M_i - U S_i V^T`` at rank ``k_im >= 0``, each of its rows at 1-8 bits. ``r_m = 0`` is per-adapter
truncated SVD, ``k = 0`` is plain JD-Full. Which mix is best depends on the collection: shared
bases win when many adapters share directions, per-adapter parts win on small or diverse ones.
:func:`compress_mixed` fits the curves (:mod:`.curves`), allocates (:mod:`.allocate`) for every
storage candidate and grouping, and builds the best (:mod:`.build`); :func:`compress_shared` does the
same with shared parts only (diagonal cores, a uniform rank, calibrated streaming). A budget holds
on the real file: dry assemblies give the exact size of everything besides the parts.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from ..artifact import STORAGE_DTYPES, Artifact
from ..errors import OptionError
from ..io.collection import Collection
from ..metrics import module_weights, objective_errors
from ..quantize import QSCALE
from .allocate import BITS, Allocation, StepCurves, allocate_mixed, allocate_shared, rank_numbers
from .build import FactorReads, build_allocation, keep_limit
from .curves import ModuleFit, QuantBatch, fit_module_task, rank_curves, shares
from .executor import RayExecutor, map_modules
from .modules import compress_modules
from .options import CompressOptions
from .plan import Clusters
from .provenance import SourceHashes
from .spill import spill_for
from .streaming import MemoryPlan, release_freed_memory
from .whiten import whitening_of


_RETARGETS = 3  # a target missed by a quantised precision's rounding is aimed lower at most this often
_QUANT_ROOM = 1e-4  # of the relative error: int8's rounding adds 2-4e-5 (docs/method.md), kept below a target
_SLACK = 16  # bytes kept free in case a header field differs between the dry and the real assembly
_KEEP_ALL = 256 << 20  # float32 factors of a whole collection kept for pass 2 (the bundled one: 60 MB)
_FIRST_RANK = 16  # the shared rank pass 1 fits first (:meth:`_MixedRun.allocate`)
# a build whose residual codes take more (one byte a number) is not kept for a re-aim: holding them
# beside the packed artifact would raise the run's peak (a re-aim then builds from scratch)
_KEEP_CODES = 256 << 20


def _stat(errors: np.ndarray, stat: str) -> float:
    return float(errors.mean() if stat == "mean" else errors.max())


def compress_mixed(collection: Collection, opts: CompressOptions, *, groupings: "list[Clusters | None] | None" = None,
                   progress: Callable[[int, int, str], None] | None = None,
                   executor: "RayExecutor | None" = None) -> tuple[Artifact, dict[str, Any]]:
    """Shared and per-adapter parts chosen for ``opts.budget`` (bytes of the file), or the fewest
    bytes meeting ``opts.goal`` on ``opts.target_stat``; returns the artifact and the allocation
    report.

    ``storage_dtype="auto"``: the adapters' own precision (and float16 for float32 adapters) or,
    with ``opts.bits``, residual rows at 1-8 bits and shared parts in int8 (else int8 everywhere),
    whichever does better: candidates are built in order of prediction and the best built one is
    kept (lowest exact error; for a target the fewest bytes meeting it, a quantised one aimed
    :data:`_QUANT_ROOM` below it and re-aimed by a measured miss). ``groupings``: candidate groups
    of the adapters (:class:`~lorazip.compress.plan.Clusters`; None: one shared basis), each fitted
    and allocated; the best is built. With an ``executor`` both passes run one Ray task per module;
    the allocation runs here, on their small results. Under ``opts.memory_limit`` a module needing
    more than a third of it is read in chunks of adapters on every pass, and nothing is kept or
    read ahead beyond it."""
    run = _MixedRun(collection, opts, list(groupings or [None]), progress, executor)
    hashes = SourceHashes(collection, opts.hash_sources, executor)
    t0 = time.perf_counter()
    try:
        for cand in run.groupings:
            run.allocate(cand, hashes)
        if not run.best:
            raise run.failed or OptionError("the budget is too small for any part: raise it")
        t_fit = time.perf_counter() - t0
        art, dt, alloc, cand = run.build_best(hashes)
    finally:
        hashes.close()
    return art, run.report(art, dt, alloc, cand, t_fit)


class _MixedRun:
    """One budget or target run with shared and per-adapter parts: its candidates (groupings x
    storage precisions), their allocations, and the builds."""

    def __init__(self, collection: Collection, opts: CompressOptions, groupings: list, progress, executor):
        if (opts.budget is None) == (opts.goal is None):
            raise OptionError("give exactly one of a budget or a target error")
        self.collection, self.opts, self.groupings = collection, opts, groupings
        self.progress, self.executor = progress, executor
        self.budget, self.target, self.stat = opts.budget, opts.goal, opts.target_stat
        self.native = opts.stored_dtype(collection)
        # "auto": the adapters' own precision, float16 for float32 adapters, and int8 or, where bits can be
        # allocated (not under calibration), bits: residual components at 1-8 bits each, shared bases and
        # cores at 2-8 bits (which holds every int8 artifact: a component at 8 bits, with a smaller scale)
        low = BITS if opts.bits and whitening_of(collection) is None else "int8"
        self.dtypes = [self.native] + ([d for d in ("float16", low) if d != self.native and
                                        (d == low or self.native == "float32")]
                                       if opts.storage_dtype == "auto" else [])
        self.size_of = {dt: 1 if dt == BITS else torch.empty(0, dtype=STORAGE_DTYPES[dt]).element_size()
                        for dt in self.dtypes}
        self.memory = MemoryPlan.make(collection, 4, opts.memory_limit, "jd-full")  # pass 1 and 2 read float32
        if self.memory.chunk and any(c is not None and c.K > 1 for c in groupings):
            big = collection.modules[min(self.memory.chunk)].name
            raise OptionError(f"clusters with residual parts keep a module's factors in memory: module {big} needs "
                              f"more than a third of the memory limit; raise the limit or use one shared basis")
        if self.memory.chunk and whitening_of(collection) is not None:
            raise OptionError("calibration reads each module whole in pass 2: module "
                              f"{collection.modules[min(self.memory.chunk)].name} needs more than a third of the "
                              "memory limit")
        self.top = opts.max_rank if self.budget is None else \
            _affordable_rank(collection, self.budget // self.size_of[self.native], opts.max_rank)
        if self.budget is not None and BITS in self.dtypes:  # a shared part may be stored at 3 bits a number
            self.top = max(self.top, _affordable_rank(collection, self.budget * 8 // 3, opts.max_rank, spread=1))
        self.kept: dict = {}  # pass-1 factors that pass 2 need not read again (and further candidates)
        self.best: dict[str, tuple] = {}  # per storage dtype: (key, alloc, fits, grouping, curves, goal, E)
        self.tried: list[dict[str, Any]] = []
        self.failed: OptionError | None = None
        self._objective_fits: dict[int, tuple] = {}  # id of a list of fits -> (fits, their weighted copies)
        self.hashes: SourceHashes | None = None

    def fit(self, cand, tops: list[int], only: list[int] | None = None,
            before: dict[int, ModuleFit] | None = None, grow: list[int] | None = None) -> dict[int, ModuleFit]:
        """Pass 1 on one grouping: the exact curves of every module (or those in ``only``), module
        ``j`` fitted to shared rank ``tops[j]``, or to ``grow[j]`` where its adapters share
        directions at ``tops[j]`` (``before``: earlier fits, whose quantisation profiles do not
        depend on the rank)."""
        opts, coll = self.opts, self.collection
        names = [m.name for m in coll.modules]
        js = list(range(len(names))) if only is None else list(only)
        K = 1 if cand is None else cand.K
        batch = QuantBatch() if self.executor is None else None  # in process: the modules' quantiser calls together
        args = [(j, tops[j], opts, None if cand is None or cand.K == 1 else cand.assign[j], self.memory.chunk.get(j),
                 before[j].quant if before and j in before else None,
                 grow[j] if grow and grow[j] > tops[j] else None, batch) for j in js]
        # factors are kept for the next grouping's pass 1 (and then pass 2) where there is one, or where
        # all of them are small: for pass 2 alone the page cache serves the second read as well, in the
        # sources' own (often bfloat16) bytes; kept float32 copies only took memory from it (1000
        # adapters, 32 layers: the same 520 s, anonymous peak 10.2 -> 5.9 GiB) and slowed pass 1 beside
        # them (4 layers: 7 s of 23)
        keep = len(self.groupings) > 1 or sum(self.memory.module_bytes) <= _KEEP_ALL
        reads = FactorReads(coll, keep=self.kept, limit=keep_limit() if opts.memory_limit is None and keep else 0,
                            plan=self.memory, order=js) if self.executor is None else None
        fits: dict[int, ModuleFit] = {}
        for count, (pos, fit) in enumerate(map_modules(self.executor, fit_module_task, coll, args,
                                                        labels=[names[j] for j in js],
                                                        local=(lambda pos: reads.factors(js[pos])) if reads else None,
                                                        phase="fit"), 1):
            fits[js[pos]] = fit
            if self.progress:
                self.progress(count, len(js) + len(names), names[js[pos]] if K == 1 else f"K={K}: {names[js[pos]]}")
        if batch is not None:
            batch.run()  # every fit's quantisation measurements
        return fits

    def allocate(self, cand, hashes: SourceHashes) -> None:
        """Fit one grouping and allocate it at every storage precision; keep the best per precision.

        Pass 1 fits each module to shared rank :data:`_FIRST_RANK` first (or its largest, if lower). A
        module is fitted again to the largest rank worth trying, and everything allocated again, where
        its adapters share directions (:func:`_shares`) or an allocation at any precision gives it half
        of that rank or more. Where adapters share nothing, a shared direction holds no more of them
        than one of their own at a higher cost, at any rank; such a collection (iid factors: every
        module stays at rank 0 either way, tests/test_staged_fit.py) costs a rank-16 fit, not a rank-64 one."""
        coll = self.collection
        self.hashes = hashes  # for the dry assemblies of a deferred precision allocated later
        names = [m.name for m in coll.modules]
        caps = [min(self.top, min(coll.shared_ranks(name, self.opts.max_rank))) for name in names]
        tops = [min(c, _FIRST_RANK) for c in caps]
        fits = self.fit(cand, tops, grow=caps)  # a module sharing directions grows in its task
        tops = [max(fits[j].shared) for j in range(len(names))]
        while True:
            chosen, tried = self._allocations(cand, hashes, [fits[j] for j in range(len(names))])
            grow = [j for j in range(len(names)) if tops[j] < caps[j] and (
                _shares(fits[j], tops[j], self.opts.weighting) or
                any(2 * alloc.ranks[names[j]] >= tops[j] for alloc, _, _ in chosen.values()
                    if not isinstance(alloc, _Deferred)))]
            if not grow:
                break
            for j in grow:
                tops[j] = caps[j]
            fits.update(self.fit(cand, tops, only=grow, before=fits))
        for dt, (alloc, entry, key) in chosen.items():
            if dt in self.best and isinstance(alloc, _Deferred) != isinstance(self.best[dt][1], _Deferred):
                # another grouping's candidate: a deferred one's key is only a bound (on its bytes under a
                # target, on its error under a budget), so where the bound does not decide, the deferred
                # one is allocated to compare
                prev = self.best[dt]
                real, deferred = (prev[0], alloc) if isinstance(alloc, _Deferred) else (key, prev[1])
                # a budget: the real one's prediction above the deferred one's floor; a target: the real
                # one meets it with more bytes than the deferred one is known to need
                if (real[0] > deferred.floor) if self.budget is not None else (not real[0] and real[1] > deferred.bytes):
                    if isinstance(prev[1], _Deferred):
                        self._resolved(dt)  # in place (or dropped where it cannot be allocated)
                    else:
                        self.best[dt] = (key, alloc, *entry)
                        if not self._resolved(dt):
                            self.best[dt] = prev
                            continue
                        key, alloc, *entry = self.best[dt]
                        self.best[dt] = prev
            if dt not in self.best or key < self.best[dt][0]:
                self.best[dt] = (key, alloc, *entry)
        self.tried.extend(tried)  # the final round's candidates

    def _allocations(self, cand, hashes: SourceHashes, fits: list[ModuleFit]) -> tuple[dict[str, tuple], list]:
        """Per storage precision ``(allocation, (fits, grouping, curves, goal, E), key)`` of one
        grouping's fits (the precisions that fail are left out, their reason kept), and what each
        precision predicted (the report's ``clusters_tried``)."""
        real, fits = fits, self._weighted(fits)  # the allocator's curves; the builds use the real fits
        E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
        plain = StepCurves(fits, E)  # shared by every dtype and every budget the dry assembly tries
        K = 1 if cand is None else cand.K
        out, tried = {}, []
        # bits first: under a target a precision that cannot meet it in twice bits' bytes, under a
        # budget one whose error at the whole budget is above bits' prediction, is allocated only if
        # it is needed (bits' builds all miss the target, a re-aim reaches those bytes, or the bits
        # build comes out above that error)
        order = sorted(self.dtypes, key=lambda d: d != BITS)
        for dt in order:
            curves = StepCurves(fits, E, bits=True) if dt == BITS else plain
            goal = self.target
            if dt != self.native and self.target is not None:  # leave int8's rounding room under the target
                if self.target < 2 * _QUANT_ROOM:
                    continue
                goal = self.target - _QUANT_ROOM
            if self.target is not None and BITS in out and dt != BITS:
                bound = 2 * out[BITS][0].numbers * self.size_of[BITS]  # bytes
                if _misses(fits, E, bound // self.size_of[dt], goal, self.stat, curves):
                    out[dt] = (_Deferred(bound), (real, cand, curves, goal, E), (False, bound, math.inf))
                    tried.append({"K": K, "dtype": dt, "predicted": None, "needs_more_than_bytes": bound})
                    continue
            if self.budget is not None and BITS in out and dt != BITS:
                floor = _floor(fits, E, self.budget // self.size_of[dt], self.stat, curves)
                if floor > out[BITS][0].predicted:
                    out[dt] = (_Deferred(floor=floor), (real, cand, curves, goal, E), (floor, self.budget))
                    tried.append({"K": K, "dtype": dt, "predicted": None, "predicted_at_least": floor})
                    continue
            try:
                alloc = _allocate_to_size(self.collection, self.opts, real, E, goal, dt, self.size_of[dt], cand,
                                          hashes, curves, fits)
            except OptionError as exc:
                self.failed = self.failed or exc  # the first reason (the adapters' own dtype, one basis) is said
                tried.append({"K": K, "dtype": dt, "predicted": None})
                continue
            size = alloc.numbers * self.size_of[dt]
            tried.append({"K": K, "dtype": dt, "predicted": alloc.predicted, "numbers": alloc.numbers})
            key = ((alloc.predicted > self.target + 1e-12, size, alloc.predicted) if self.budget is None
                   else (alloc.predicted, size))
            out[dt] = (alloc, (real, cand, curves, goal, E), key)
        return out, tried

    def _weighted(self, fits: list[ModuleFit]) -> list[ModuleFit]:
        """The fits the allocator works on: ``fits`` themselves for the energy objective, else copies with
        each (adapter, module)'s energies weighted by the objective (:meth:`ModuleFit.weighted`), made once
        per list of fits."""
        if self.opts.objective == "energy":
            return fits
        if id(fits) not in self._objective_fits:
            live = {id(entry[2]) for entry in self.best.values()}  # copies of fits no candidate holds: dropped
            self._objective_fits = {k: v for k, v in self._objective_fits.items() if k in live}
            self._objective_fits[id(fits)] = (fits, [f.weighted(module_weights(f.norms2, self.opts.objective))
                                                     for f in fits])
        return self._objective_fits[id(fits)][1]

    def _errors(self, art: Artifact) -> np.ndarray:
        """Each adapter's exact error under the run's objective (the energy objective: :func:`per_adapter`)."""
        return objective_errors(*art.stats(), self.opts.objective).numpy()

    def _resolve_all(self) -> None:
        for d in list(self.best):
            self._resolved(d)

    def _resolved(self, dt: str) -> bool:
        """Allocate a deferred precision now (see :meth:`_allocations`); False where it cannot be."""
        key, alloc, fits, cand, curves, goal, E = self.best[dt]
        if not isinstance(alloc, _Deferred):
            return True
        try:
            alloc = _allocate_to_size(self.collection, self.opts, fits, E, goal, dt, self.size_of[dt], cand,
                                      self.hashes, curves, self._weighted(fits))
        except OptionError:
            del self.best[dt]
            return False
        size = alloc.numbers * self.size_of[dt]
        key = (alloc.predicted, size) if self.budget is not None else \
            (alloc.predicted > self.target + 1e-12, size, alloc.predicted)
        self.best[dt] = (key, alloc, fits, cand, curves, goal, E)
        self.tried.append({"K": 1 if cand is None else cand.K, "dtype": dt, "predicted": alloc.predicted,
                           "numbers": alloc.numbers})
        return True

    def build_best(self, hashes: SourceHashes):
        """Build the candidates in order of prediction; returns the best built ``(art, dtype, alloc, grouping)``.
        The curves of a quantised precision leave out (int8) or estimate (bits) its rounding: stop when
        what is built beats the next candidate's prediction (budget), or meets the target with fewer bytes."""
        order = sorted(self.best, key=lambda d: self.best[d][0])
        built = []  # (artifact, dtype, allocation, clusters, exact statistic): the best built is kept
        i = 0
        while i < len(order):
            if isinstance(self.best[order[i]][1], _Deferred):  # needed now: allocate the rest
                self._resolve_all()
            order = order[:i] + sorted((d for d in order[i:] if d in self.best), key=lambda d: self.best[d][0])
            if i == len(order):
                break
            dt = order[i]
            i += 1
            last = i == len(order)
            art, alloc, cand, got = self._build_aimed(dt, None if last else order[i], hashes)
            built.append((art, dt, alloc, cand, got))
            if last:
                break
            nxt = self.best[order[i]][1]
            if (min(b[4] for b in built) < (nxt.floor if isinstance(nxt, _Deferred) else nxt.predicted)) \
                    if self.budget is not None else got <= self.target + 1e-12:
                break
        self._release()  # before the sizes below pack the artifact (its codes and the packed file at once)

        def key(b):  # budget: the lowest error; target: the fewest bytes meeting it, else the lowest error
            if self.budget is not None:
                return b[4], b[0].serialized_size()
            return (0, b[0].serialized_size()) if b[4] <= self.target + 1e-12 else (1, b[4])

        art, dt, alloc, cand, _ = min(built, key=key)
        if self.budget is not None and art.serialized_size() > self.budget:
            raise OptionError(f"could not fit the artifact into {self.budget:,} bytes")  # pragma: no cover
        return art, dt, alloc, cand

    def _release(self) -> None:
        """Drop what only the allocations and builds needed: every candidate's pass-1 fits and step
        curves (the report takes their allocations alone) and the kept factors. At 1000 adapters the
        fits and curves of a bits candidate take about half the memory of the artifact's codes
        (1 GB beside 2.4 GB at 8 layers), and packing the artifact holds its codes and the packed
        file at once: that moment was the run's peak."""
        for d, (key, alloc, *_) in list(self.best.items()):
            self.best[d] = (key, alloc, None, None, None, None, None)
        self._objective_fits.clear()
        self.kept.clear()
        release_freed_memory()

    def _build_aimed(self, dt: str, after: str | None, hashes: SourceHashes):
        """Build precision ``dt``; for a target missed by rounding, aim lower by the miss (measured, not
        assumed) while that still needs fewer bytes than the next precision ``after``."""
        _, alloc, fits, cand, curves, goal, E = self.best[dt]
        retargets = 0 if self.budget is not None or after is None else _RETARGETS
        built: dict | None = None  # a re-aimed build keeps what did not change (small builds only)
        for attempt in range(retargets + 1):
            plan = alloc.plan(fits, dt, cand)
            rows = _rows_bytes(self.collection, plan)
            keep = retargets and rows <= min(_KEEP_CODES, keep_limit())
            before, built = built, {} if keep else None
            spill = spill_for(rows, self.opts.memory_limit)
            if spill is not None:  # a large build: the step curves too (only a re-aim reads them)
                for entry in self.best.values():
                    if entry[4] is not None:
                        entry[4].hold_in(spill)
                release_freed_memory()
            art = build_allocation(self.collection, self.opts, fits, plan, hashes,
                                   target_error=self.target, progress=self.progress, executor=self.executor,
                                   kept=self.kept, memory=self.memory,  # each kept module freed once built
                                   before=before, built=built, spill=spill)
            del before
            got = _stat(self._errors(art), self.stat)
            if attempt == retargets or got <= self.target + 1e-12:
                break
            # lower by 1.25 times the miss past the target, and at least to the target less the model's
            # own miss (what was built over what was predicted): an allocation can land well below the
            # goal it was given, and lowering the goal by the miss past the target alone may not move it
            goal = min(goal - (got - self.target) * 1.25, self.target - (got - alloc.predicted)) - 1e-6
            try:
                retry = _allocate_to_size(self.collection, self.opts, fits, E, goal, dt, self.size_of[dt], cand,
                                          hashes, curves, self._weighted(fits), seed=(alloc.numbers, alloc.predicted))
            except OptionError:
                break
            nxt = self.best[after][1]
            if isinstance(nxt, _Deferred) and retry.numbers * self.size_of[dt] >= nxt.bytes:
                self._resolve_all()  # needed now: the re-aim has reached the bytes they were known to need
                rest = [d for d in self.best if d != dt and self.best[d][0] >= self.best[dt][0]]
                after = min(rest, key=lambda d: self.best[d][0]) if rest else None
                nxt = self.best[after][1] if after is not None else None
            if nxt is not None and not isinstance(nxt, _Deferred) and \
                    retry.numbers * self.size_of[dt] >= nxt.numbers * self.size_of[after]:
                break
            alloc = retry
            self.tried.append({"K": 1 if cand is None else cand.K, "dtype": dt, "predicted": alloc.predicted,
                               "numbers": alloc.numbers, "retarget": goal})
            del art  # the missed build is not kept while the re-aimed one is made (its parts: most of the peak)
        return art, alloc, cand, got

    def report(self, art: Artifact, dt: str, alloc: Allocation, cand, t_fit: float) -> dict[str, Any]:
        """What was chosen and why (``artifact.allocation``)."""
        from ..evaluate import storage_bits

        errs = alloc.errors
        report = {
            "mode": "mixed",
            "chosen": alloc.kind,
            "why": f"predicted {self.stat} error " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(
                alloc.alternatives.items(), key=lambda kv: kv[1])) + " at these bytes",
            "alternatives": alloc.alternatives,
            "budget_bytes": self.budget,
            "target_error": self.target,
            "target_stat": self.stat,
            "n_clusters": 1 if cand is None else cand.K,
            "storage_dtype": "int8" if dt == BITS else dt,
            "bits": storage_bits(art),
            "dtypes": {d: self.best[d][1].predicted for d in self.best},  # None: not allocated (needs more bytes)
            "ranks": alloc.ranks,
            "residual_ranks": {m: {"total": int(k.sum()), "max": int(k.max()) if len(k) else 0}
                               for m, k in alloc.residual.items()},
            **({"objective": self.opts.objective} if self.opts.objective != "energy" else {}),
            "predicted_mean_error": float(errs.mean()),
            "predicted_max_error": float(errs.max()),
            "artifact_bytes": art.serialized_size(),
            "fit_s": t_fit,
        }
        if len(self.groupings) > 1 or len(self.dtypes) > 1:
            report["clusters_tried"] = self.tried
        return report


def _rows_bytes(collection: Collection, plan) -> int:
    """Bytes of a build's residual rows in memory: low-bit codes one byte per number (before the file
    packs them), other rows in their storage dtype."""
    item = 1 if plan.storage_dtype == BITS else STORAGE_DTYPES[plan.storage_dtype].itemsize
    return item * sum(int(np.sum(m.residual)) * (info.d_out + info.d_in)
                      for m, info in zip(plan.modules, collection.modules) if m.residual is not None)


class _Deferred:
    """A storage precision not allocated yet: at the target it needs more than ``bytes``; under a
    budget its predicted error is at least ``floor``."""

    predicted = None

    def __init__(self, bytes_: int | None = None, floor: float | None = None):
        self.bytes, self.floor = bytes_, floor


def _floor(fits: list[ModuleFit], E: np.ndarray, numbers: int, stat: str, curves: StepCurves) -> float:
    """The error a precision's allocation cannot go below under a budget of ``numbers`` stored values
    (the greedy allocation of all of them, the file's own bytes not deducted: its prediction falls
    as numbers are added); -inf where that allocation fails (then the precision is allocated as usual)."""
    try:
        return allocate_mixed(fits, E, numbers=int(numbers), stat=stat, curves=curves).predicted
    except OptionError:
        return -math.inf


def _misses(fits: list[ModuleFit], E: np.ndarray, numbers: int, goal: float, stat: str, curves: StepCurves) -> bool:
    """Whether ``numbers`` stored values cannot meet ``goal`` (the allocation there predicts more)."""
    try:
        return allocate_mixed(fits, E, numbers=int(numbers), stat=stat, curves=curves).predicted > goal
    except OptionError:
        return True


def _shares(fit: ModuleFit, R: int, weighting: str) -> bool:
    """:func:`~lorazip.compress.curves.shares` of a fit at shared rank ``R``."""
    if 0 not in fit.spectra:
        return False
    return shares(fit.norms2, fit.shared[R], fit.spectra[0], R, fit.dim, fit.K, weighting)


def _allocate_to_size(collection: Collection, opts: CompressOptions, fits: list[ModuleFit], E: np.ndarray,
                      target_error: float | None, storage_dtype: str, itemsize: int, clusters, hashes: SourceHashes,
                      curves: StepCurves | None = None, weighted: list[ModuleFit] | None = None,
                      seed: tuple[float, float] | None = None) -> Allocation:
    """The allocation for ``opts.budget`` bytes of the file (numbers refined on dry assemblies, which
    give the exact size of everything besides the parts) or for ``target_error``. ``weighted``: the
    fits the allocator works on where the objective weights them (:meth:`_MixedRun._weighted`);
    the dry assemblies use ``fits``. ``seed``: where a target's search starts (:func:`allocate_mixed`)."""
    budget, stat = opts.budget, opts.target_stat
    alloc_fits = fits if weighted is None else weighted
    if budget is None:
        return allocate_mixed(alloc_fits, E, target_error=target_error, stat=stat, curves=curves, seed=seed)
    numbers = max((budget - _overhead_bytes(collection, fits, opts.keep_extras)) // itemsize, 0)  # a first guess
    best = None
    for _attempt in range(6):  # sizes are exact from a dry assembly; the solve runs once
        alloc = allocate_mixed(alloc_fits, E, numbers=numbers, stat=stat, curves=curves)
        dry = build_allocation(collection, opts, fits, alloc.plan(fits, storage_dtype, clusters), hashes,
                               target_error=target_error, dry=True)
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
            _too_small(dry, budget, fixed)
    if best is None:
        raise OptionError(f"could not fit the artifact into {budget:,} bytes")
    return best


def _too_small(dry: Artifact, budget: int, fixed: int) -> None:
    """The error of a budget that cannot hold even the header and statistics."""
    extras = sum(t.numel() * t.element_size() for k, t in dry.tensors().items() if k.startswith("extras/"))
    embeddings = any(k.endswith("base_layer.weight") for k in dry.tensors() if k.startswith("extras/"))
    what = "modules_to_save heads" + ("; embedding weights PEFT saved with a LoRA on an embedding, the base "
                                      "model's own unless its vocabulary was resized" if embeddings else "")
    how = "leave them out (--no-extras)" if dry.meta.get("extras_dtype") == "int8" else \
        "store them in int8 (--extras-dtype int8) or leave them out (--no-extras)"
    hint = f", of which {extras:,} are the adapters' kept non-LoRA tensors ({what}): {how}" if extras else ""
    raise OptionError(f"a budget of {budget:,} bytes cannot hold even the artifact's header and "
                      f"statistics ({int(fixed):,} bytes{hint})")


def _affordable_rank(collection: Collection, numbers: int, max_rank: int, spread: int = 2) -> int:
    """The largest shared rank worth fitting under a budget: twice (``spread``) the largest uniform
    rank whose bases and cores fit (a module may take more than the uniform share, hardly more than
    twice; with 3-bit parts, priced below what they cost with their scales, the uniform rank itself)."""
    n = len(collection)
    dims = [m.d_in + m.d_out for m in collection.modules]
    r = 0
    while r < max_rank and sum((r + 1) * d + n * (r + 1) ** 2 for d in dims) <= numbers:
        r += 1
    return min(max_rank, max(spread * r, 1))


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




def compress_shared(collection: Collection, opts: CompressOptions, *,
                    progress: Callable[[int, int, str], None] | None = None,
                    executor: "RayExecutor | None" = None) -> tuple[Artifact, dict[str, Any]]:
    """Shared parts only for ``opts.budget`` (bytes of the file) or a mean ``opts.goal``: ranks per
    module (one for all with ``opts.uniform_rank``) from the exact curves of :func:`rank_curves`
    (:func:`~lorazip.compress.allocate.allocate_shared`), built by the module loop. Used for jd-diag,
    a uniform rank and calibration streamed under a memory limit. A budget holds on the real file:
    the fixed bytes are measured on a rank-1 artifact, and rank steps are taken back while it is over."""
    budget, target = opts.budget, opts.goal
    if (budget is None) == (target is None):
        raise OptionError("give exactly one of --budget or --target-error")
    storage_dtype = opts.stored_dtype(collection)
    # bytes per stored number: 1 for int8, whose row scales are overhead (measured on the probe below,
    # and the shrink loop takes back rank steps if the file is still over)
    itemsize = torch.tensor([], dtype=STORAGE_DTYPES[storage_dtype]).element_size()
    n, diag, uniform = len(collection), opts.method == "jd-diag", opts.uniform_rank
    curves = rank_curves(collection, opts.max_rank, weighting=opts.weighting, seed=opts.seed,
                         memory_limit=opts.memory_limit, progress=progress, executor=executor)
    fixed = opts.fixed(storage_dtype=storage_dtype)

    def build(ranks: dict[str, int]) -> Artifact:
        return compress_modules(collection, fixed, ranks=ranks, executor=executor)

    if budget is None:
        ranks = allocate_shared(curves, n, target_error=target, uniform=uniform, diag=diag)
        art = build(ranks)
    else:
        probe = build({m: 1 for m in curves.modules})
        overhead = probe.serialized_size() - itemsize * sum(rank_numbers(d, n, 1, diag) for d in curves.dims)
        numbers = (budget - overhead) // itemsize
        if numbers <= 0:
            raise OptionError(f"a budget of {budget:,} bytes cannot hold even rank 1 ({probe.serialized_size():,} bytes)")
        while True:
            ranks = allocate_shared(curves, n, budget_numbers=numbers, uniform=uniform, diag=diag)
            art = build(ranks)
            size = art.serialized_size()
            if size <= budget:
                break
            numbers -= (size - budget) // itemsize + 1
            if numbers <= 0:
                raise OptionError(f"a budget of {budget:,} bytes cannot hold even rank 1")
    predicted = sum(float(c[ranks[m]]) for m, c in zip(curves.modules, curves.contribution()))
    return art, {"mode": "uniform" if uniform else "per-module", "budget_bytes": budget, "target_error": target,
                 "ranks": ranks, "predicted_mean_error": predicted, "artifact_bytes": art.serialized_size()}
