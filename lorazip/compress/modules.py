"""The module loop: compress every module of a collection at given ranks.

For each module: read the factors of all adapters, run the chosen solver on the chosen device,
round the bases and cores to the storage dtype and measure the exact error of what will be
stored (:mod:`.measure`). Only one module's factors are in memory at a time (the next one is
read meanwhile); a module larger than the memory limit is streamed in chunks of adapters.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..artifact import Artifact
from ..backend import to_backend, to_torch
from ..io.collection import Collection
from ..solvers import solve_factors
from ..solvers.clustered import jd_clustered
from ..solvers.factors import Chunk, Factors
from ..solvers.linalg import adapter_weights, factor_norms2
from ..solvers.one_side import one_side_bases
from .build import assemble
from .executor import RayExecutor, map_modules
from .measure import adapter_chunk, round_and_measure
from .options import COMPUTE_DTYPES, CompressOptions, resolve_device
from .plan import Plan, fixed_rank_plan
from .provenance import SourceHashes
from .streaming import MemoryPlan, release_freed_memory, streamed_factors
from .whiten import annotate, finish_whitened, whitening_of


def _one_side_solution(fac, r_out: int, r_in: int, weighting: str, K: int):
    """Bases of a module whose small side is kept whole (exact optimum), as (K, d, r) copies."""
    B, A = fac.B.double().cpu(), fac.A.double().cpu()
    U, V = one_side_bases(B, A, r_out, r_in, adapter_weights(factor_norms2(B, A), weighting))
    return U[None].expand(K, *U.shape).contiguous(), V[None].expand(K, *V.shape).contiguous()


class _FactorCache:
    """Module factors read on demand (one read ahead in a thread), kept while they fit in ``limit``."""

    def __init__(self, collection: Collection, device: torch.device, limit: int, dtype: torch.dtype):
        self.collection, self.dev, self.limit, self.dtype = collection, device, limit, dtype
        self._cpu: dict[int, object] = {}
        self._dev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[int, object] = {}
        self._pool = None

    def _read(self, j: int):
        return self.collection.module_factors(self.collection.modules[j].name, dtype=self.dtype, b_rows=True)

    def prefetch(self, j: int) -> None:
        if j in self._cpu or j in self._pending:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorazip-read")
        self._pending[j] = self._pool.submit(self._read, j)

    def cpu(self, j: int):
        fac = self._cpu.get(j)
        if fac is None:
            pending = self._pending.pop(j, None)
            fac = pending.result() if pending is not None else self._read(j)
            used = sum(f.B.nbytes + f.A.nbytes for f in self._cpu.values())
            if used + fac.B.nbytes + fac.A.nbytes <= self.limit:
                self._cpu[j] = fac
        return fac

    def device(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j in self._dev:
            return self._dev[j]
        fac = self.cpu(j)
        pair = (fac.B.to(self.dev), fac.A.to(self.dev))
        if j in self._cpu and self.dev.type != "cpu":
            self._dev[j] = pair
        return pair

    def drop(self, j: int) -> None:
        self._cpu.pop(j, None)
        self._dev.pop(j, None)

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@dataclass
class ModuleResult:
    """What a module task returns (small: no factors): the module's artifact tensors (bases,
    cores, spectra, assignment), per-adapter squared errors and norms (n,), its ``meta`` fields."""

    tensors: dict[str, torch.Tensor]
    sq_error: torch.Tensor
    norm2: torch.Tensor
    entry: dict[str, Any]
    weight_sq_error: torch.Tensor | None = None  # with calibration: the weight-space errors (n,)
    weight_norm2: torch.Tensor | None = None


def _read_module(collection: Collection, name: str, dtype: torch.dtype, dev,
                 clock: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Module ``name``'s stacked factors on ``dev``; ``clock["module_reads"]`` counts the reads."""
    f = collection.module_factors(name, dtype=dtype, b_rows=True)
    clock["module_reads"] = clock.get("module_reads", 0) + 1
    return f.B.to(dev), f.A.to(dev)


def solve_module_task(collection: Collection, j: int, rank: int, one_side: tuple[int, int] | None,
                      chunk: int | None, opts: CompressOptions, *, clock: dict[str, float],
                      factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleResult:
    """Module ``j`` start to finish: read its factors (unless given ``factors``, the caller's
    read-ahead; streamed in chunks of ``chunk`` adapters if set), solve at ``rank`` (``one_side``:
    ``(r_out, r_in)`` of a module whose small side is kept whole), round to the storage dtype and
    measure the exact errors. The same function runs in process and as a Ray task
    (:mod:`.executor`); ``clock`` gets the seconds reading, solving and measuring."""
    info = collection.modules[j]
    dev = resolve_device(opts.device)
    cdtype = COMPUTE_DTYPES[opts.compute_dtype]
    for key in ("read_s", "solve_s", "error_s"):
        clock.setdefault(key, 0.0)
    t0 = time.perf_counter()
    if one_side is not None:  # exact in one step; small by construction
        B, A = factors if factors is not None else _read_module(collection, info.name, cdtype, "cpu", clock)
        U, V = _one_side_solution(Chunk(0, B, A), *one_side, opts.weighting, 1)
        clock["read_s"] += time.perf_counter() - t0
        return finish_module(Factors.stacked(B, A), info, U, V, None, None, 0, True, opts, clock, collection)
    to_solver = (lambda t: t) if opts.backend == "torch" else (lambda t: to_backend(t, opts.backend))
    if chunk is not None:  # larger than the memory limit: every pass reads chunks from disk
        fac = streamed_factors(collection, info.name, chunk, cdtype, dev, to_solver)
        fac_t = fac if opts.backend == "torch" else streamed_factors(collection, info.name, chunk, cdtype, dev)
    else:
        B, A = factors if factors is not None else _read_module(collection, info.name, cdtype, dev, clock)
        fac_t = Factors.stacked(B, A)
        fac = fac_t if opts.backend == "torch" else Factors.stacked(to_solver(B), to_solver(A))
    t1 = time.perf_counter()
    sol = solve_factors(opts.method, fac, rank, weighting=opts.weighting, seed=opts.seed, max_iters=opts.max_iters,
                        tol=opts.tol)
    if opts.backend != "torch":
        sol.U, sol.V, sol.cores = to_torch(sol.U), to_torch(sol.V), to_torch(sol.cores)
    clock["read_s"] += t1 - t0
    clock["solve_s"] += time.perf_counter() - t1
    # the solver's spectra are made from the Grams the error pass takes only where it ran on those factors
    spectra = sol.spectra if opts.backend == "torch" else None
    return finish_module(fac_t, info, sol.U, sol.V, sol.cores, sol.assignment, sol.n_iters, sol.converged, opts,
                         clock, collection, spectra=spectra)


def finish_module(fac: Factors, info, U, V, cores, assign, n_iters: int, converged: bool, opts: CompressOptions,
                  clock: dict[str, float], collection: Collection | None = None,
                  spectra: torch.Tensor | None = None) -> ModuleResult:
    """A solved module rounded to the storage dtype, with its exact errors (see :func:`round_and_measure`;
    ``spectra``: the adapters' singular values where the solver made them)."""
    t0 = time.perf_counter()
    refine = (opts.method in ("jd-full", "jd-clustered") and U.dtype != torch.float64) or cores is None
    wsq = wn2 = None
    if whitening_of(collection) is None:
        U, V, cores, sq, n2, sv = round_and_measure(fac, U, V, cores, assign, refine, opts.storage_dtype,
                                                    adapter_chunk(fac), spectra)
    else:  # calibration: a solution in whitened coordinates, mapped back (lorazip.compress.whiten)
        U, V, cores, sq, n2, sv, wsq, wn2 = finish_whitened(collection, info.name, fac, U, V, cores, assign, refine,
                                                            opts.storage_dtype, adapter_chunk(fac))
    tensors: dict[str, torch.Tensor] = {}
    U.put(tensors, f"U/{info.name}")
    V.put(tensors, f"V/{info.name}")
    cores.put(tensors, f"cores/{info.name}")
    if assign is not None:
        tensors[f"assign/{info.name}"] = assign.to(torch.int32).cpu()
    tensors[f"spectra/{info.name}"] = sv.float()
    clock["error_s"] = clock.get("error_s", 0.0) + time.perf_counter() - t0
    entry = {"rank": int(V.shape[2]), **({"rank_out": int(U.shape[2])} if U.shape[2] != V.shape[2] else {}),
             "n_clusters": int(U.shape[0]), "iters": n_iters, "converged": converged}
    return ModuleResult(tensors, sq, n2, entry, wsq, wn2)


def finish_clustered_task(collection: Collection, j: int, U, V, cores, assign, one_side: tuple[int, int] | None,
                          rounds: int, converged: bool, opts: CompressOptions, *, clock: dict[str, float],
                          factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleResult:
    """Module ``j`` of a clustered solution (``U``, ``V``: (K, d, r)), rounded and measured."""
    info = collection.modules[j]
    t0 = time.perf_counter()
    B, A = factors if factors is not None else _read_module(collection, info.name,
                                                            COMPUTE_DTYPES[opts.compute_dtype], "cpu", clock)
    clock["read_s"] = clock.get("read_s", 0.0) + time.perf_counter() - t0
    if one_side is not None:
        U, V = _one_side_solution(Chunk(0, B, A), *one_side, opts.weighting, U.shape[0])
        cores = None
    return finish_module(Factors.stacked(B, A), info, U, V, cores, assign, rounds, converged, opts, clock, collection)


def module_step_task(collection: Collection, name: str, dtype: torch.dtype, device: str, fn, args: tuple, *,
                     clock: dict[str, float], factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                     keep: bool = False):
    """``fn(B, A, *args)`` on module ``name``'s factors, read here in ``dtype`` onto ``device``
    unless given as ``factors`` (kept from an earlier step): a step of a solver that visits every
    module in turn (jd-clustered's rounds), as a Ray task. With ``keep``, returns ``(result,
    (B, A))``, the factors on the CPU, for the caller to keep for the next step."""
    dev = resolve_device(device)
    t0 = time.perf_counter()
    if factors is None:
        B, A = _read_module(collection, name, dtype, dev, clock)
    else:
        B, A = factors[0].to(dev), factors[1].to(dev)
    t1 = time.perf_counter()
    out = fn(B, A, *args)
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return (out, (B.cpu(), A.cpu())) if keep else out


def _step_tasks(executor, collection: Collection, dtype: torch.dtype, device: str, memory: int | None,
                held: dict[int, Any], keep: set[int]):
    """``map_modules`` for :func:`~lorazip.solvers.clustered.jd_clustered`: each per-module step
    as a task on ``executor`` that reads its module's factors itself, except the modules in
    ``keep``: their factors, read by their first step, stay in Ray's object store (``held``)
    for the later steps."""
    names = [m.name for m in collection.modules]

    def run(fn, args: list[tuple]) -> list:
        out: list = [None] * len(args)
        tasks = [(names[j], dtype, device, fn, a) for j, a in enumerate(args)]
        for j, got in map_modules(executor, module_step_task, collection, tasks, labels=names, memory=memory,
                                  phase=fn.__name__.strip("_"), held=held, keep=keep):
            out[j] = got
        return out

    return run


def compress_modules(
    collection: Collection,
    opts: CompressOptions | None = None,
    *,
    plan: Plan | None = None,
    ranks: dict[str, int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    timings: dict[str, float] | None = None,
    executor: "RayExecutor | None" = None,
) -> Artifact:
    """Build a fixed-rank plan: every module of ``collection`` solved at its rank (the module loop
    behind :func:`lorazip.compress`).

    Parameters
    ----------
    collection : Collection from :func:`lorazip.load_collection`.
    opts : the settings (:class:`~lorazip.compress.options.CompressOptions`; default: its defaults
        at ``rank`` 16). ``method``: "jd-full" (full r x r cores), "jd-diag" (diagonal cores),
        "jd-clustered" (``clusters`` groups with their own bases) or "svd" (per-adapter truncated
        SVD, the baseline); ``storage_dtype`` "auto" keeps the adapters' own precision; errors are
        always measured, in float64, on the stored (rounded, dequantised) values. A module needing
        more than a third of ``memory_limit`` is streamed from disk in chunks of adapters on every
        solver pass (jd-full and jd-diag; see :class:`MemoryPlan`); ``cache_bytes`` of factors stay
        in memory between clustering rounds.
    plan : what to store (:func:`~lorazip.compress.plan.fixed_rank_plan`); by default the plan of
        ``opts.shared_rank`` in every module, ``ranks`` per module where given. A rank means "at
        most": a module allowing less is stored at ``min(rank, d_out, d_in, sum of its adapters'
        ranks)``, which is exact there, and ``meta["modules"][j]["rank_capped"]`` records it.
    progress : called as ``progress(done, total, module_name)`` after each module.
    timings : if given, filled with seconds spent waiting for reads (``read_s``), solving
        (``solve_s``; streamed modules read inside it), measuring errors (``error_s``) and
        waiting for the sources' sha256, computed in the background (``hash_s``).
    executor : a :class:`~lorazip.compress.executor.RayExecutor` to solve each module as a Ray
        task that reads the module's factors itself (the sources must be visible to the workers);
        None (default): in this process. The artifact is the same either way.
    """
    opts = (opts or CompressOptions()).fixed()
    opts = opts.replace(storage_dtype=opts.stored_dtype(collection))
    if plan is None:
        plan = fixed_rank_plan(collection, opts.method, opts.storage_dtype, opts.shared_rank, ranks, opts.clusters)
    loop = _ModuleLoop(collection, opts, plan, progress, timings, executor)
    try:
        clustering = loop.run_clustered(executor) if plan.method == "jd-clustered" else loop.run(executor)
    except BaseException:
        loop.hashes.close()
        raise
    finally:
        loop.cache.close()  # stop the read-ahead thread, also when a module fails
    return loop.assemble(clustering)


class _ModuleLoop:
    """One fixed-rank build: module tasks in process or on Ray, results stored in module order."""

    def __init__(self, collection: Collection, opts: CompressOptions, plan: Plan, progress, timings, executor=None):
        self.collection, self.opts, self.plan, self.progress = collection, opts, plan, progress
        n, n_mod = len(collection), len(collection.modules)
        self.names = [m.name for m in collection.modules]
        self.tensors: dict[str, torch.Tensor] = {}
        self.sq_error = torch.zeros(n, n_mod, dtype=torch.float64)
        self.norm2 = torch.zeros(n, n_mod, dtype=torch.float64)
        self.weight_sq, self.weight_n2 = torch.zeros_like(self.sq_error), torch.zeros_like(self.norm2)  # calibration
        self.modules_meta: list[dict[str, Any]] = []
        self.arrived: dict[int, ModuleResult] = {}
        self.cdtype = COMPUTE_DTYPES[opts.compute_dtype]
        self.memory = MemoryPlan.make(collection, self.cdtype.itemsize, opts.memory_limit, plan.method)
        self.cache = _FactorCache(collection, resolve_device(opts.device), self.memory.cache_bytes(opts.cache_bytes),
                                  self.cdtype)
        self.hashes = SourceHashes(collection, opts.hash_sources, executor)
        self.clock = timings if timings is not None else {}
        for key in ("read_s", "solve_s", "error_s"):
            self.clock.setdefault(key, 0.0)

    def run(self, executor) -> None:
        """Every module solved at its rank, one task each."""
        mods = self.plan.modules
        args = [(j, mods[j].rank, mods[j].one_side, self.memory.chunk.get(j), self.opts) for j in range(len(mods))]
        self._collect(map_modules(executor, solve_module_task, self.collection, args, labels=self.names,
                                  clock=self.clock, local=self._read_ahead, memory=self.opts.memory_limit))

    def run_clustered(self, executor) -> dict[str, Any]:
        """jd-clustered: rounds over every module, then each module rounded and measured."""
        opts, K, n = self.opts, self.plan.clusters, len(self.collection)
        t0 = time.perf_counter()
        held: dict[int, Any] = {}  # on Ray: module factors kept in its object store between rounds
        steps = None if executor is None else _step_tasks(executor, self.collection, self.cdtype, opts.device,
                                                          opts.memory_limit, held, self._kept_on_ray())
        try:
            res = jd_clustered(
                list(range(len(self.names))), self.cache.device, K, [m.rank for m in self.plan.modules],
                weighting=opts.weighting, per_module=opts.per_module_clusters, max_rounds=opts.max_rounds,
                max_iters=opts.max_iters, tol=opts.tol, seed=opts.seed, map_modules=steps,
                dims=[(n, m.d_out, m.d_in) for m in self.collection.modules],
            )
            self.clock["solve_s"] += time.perf_counter() - t0  # includes reads (modules beyond the cache, each round)
            args = [(j, res.U[j], res.V[j], res.cores[j], res.assignment[j] if K > 1 else None, mod.one_side,
                     res.rounds, res.converged, opts) for j, mod in enumerate(self.plan.modules)]
            self._collect(map_modules(executor, finish_clustered_task, self.collection, args, labels=self.names,
                                      clock=self.clock, local=lambda j: self._read_ahead(j, on_device=False),
                                      memory=opts.memory_limit, phase="finish", held=held))
        finally:
            held.clear()  # frees the object store
        return {"n_clusters": K, "per_module": opts.per_module_clusters, "rounds": res.rounds,
                "converged": res.converged, "objective_history": res.history}

    def _kept_on_ray(self) -> set[int]:
        """The modules whose factors stay in Ray's object store between clustering rounds: the
        ones that fit, in module order, in the same ``cache_bytes`` as in one process."""
        keep, used, limit = set(), 0, self.cache.limit
        for j, size in enumerate(self.memory.module_bytes):
            if used + size > limit:
                continue
            keep.add(j)
            used += size
        return keep

    def _collect(self, results) -> None:
        """Store module results in module order as they arrive (in any order on Ray)."""
        for count, (j, res) in enumerate(results, 1):
            self.arrived[j] = res
            while len(self.modules_meta) in self.arrived:
                k = len(self.modules_meta)
                got, info, mod = self.arrived.pop(k), self.collection.modules[k], self.plan.modules[k]
                self.tensors.update(got.tensors)
                self.sq_error[:, k], self.norm2[:, k] = got.sq_error, got.norm2
                if got.weight_sq_error is not None:
                    self.weight_sq[:, k], self.weight_n2[:, k] = got.weight_sq_error, got.weight_norm2
                capped = {"rank_capped": mod.capped} if mod.capped is not None else {}
                self.modules_meta.append({**info.entry(), **got.entry, **capped})
            if self.progress:
                self.progress(count, len(self.names), self.names[j])

    def _read_ahead(self, j: int, on_device: bool = True) -> dict[str, Any]:
        """In process, module ``j``'s factors for its task from the cache (the next module is read
        meanwhile); the previous module is freed first."""
        if j > 0:
            self.cache.drop(j - 1)
            release_freed_memory()
        if j in self.memory.chunk:
            return {}
        if not on_device or self.plan.modules[j].one_side is not None:
            fac = self.cache.cpu(j)
            return {"factors": (fac.B, fac.A)}
        if j + 1 < len(self.names) and self.memory.prefetch(j):
            self.cache.prefetch(j + 1)  # read the next module while this one is solved
        return {"factors": self.cache.device(j)}

    def assemble(self, clustering: dict[str, Any] | None) -> Artifact:
        """The artifact: tensors, statistics, provenance and meta."""
        opts, ranks = self.opts, [m.rank for m in self.plan.modules]
        t0 = time.perf_counter()
        meta = {
            "method": self.plan.method,
            "rank": Counter(ranks).most_common(1)[0][0] if ranks else opts.shared_rank,
            "per_module_ranks": len(set(ranks)) > 1,
            "weighting": opts.weighting,
            "storage_dtype": opts.storage_dtype,
            "solver": {"max_iters": opts.max_iters, "tol": opts.tol, "seed": opts.seed,
                       "device": resolve_device(opts.device).type, "compute_dtype": opts.compute_dtype},
            "clustering": clustering,
        }
        wh = whitening_of(self.collection)
        if wh is not None:
            annotate(wh, meta, self.tensors, self.weight_sq, self.weight_n2)
        art = assemble(self.collection, meta, self.modules_meta, self.tensors, self.sq_error, self.norm2,
                       self.hashes, opts.keep_extras, opts.extras_dtype)
        self.clock["hash_s"] = time.perf_counter() - t0
        return art
