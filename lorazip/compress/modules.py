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
from ..backend import BACKENDS, to_backend, to_torch
from ..errors import OptionError
from ..io.collection import Collection
from ..solvers import solve_factors
from ..solvers.clustered import jd_clustered
from ..solvers.factors import Chunk, Factors
from ..solvers.linalg import adapter_weights, factor_norms2
from ..solvers.one_side import one_side_bases
from .build import assemble
from .executor import RayExecutor, map_modules
from .measure import ERROR_CHUNK, round_and_measure
from .options import COMPUTE_DTYPES, CompressOptions, ModuleJob, resolve_device
from .plan import _cap_record
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
        return self.collection.module_factors(self.collection.modules[j].name, dtype=self.dtype)

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


def _read_module(collection: Collection, name: str, dtype: torch.dtype, dev) -> tuple[torch.Tensor, torch.Tensor]:
    f = collection.module_factors(name, dtype=dtype)
    return f.B.to(dev), f.A.to(dev)


def solve_module_task(collection: Collection, j: int, rank: int, one_side: tuple[int, int] | None,
                      chunk: int | None, job: ModuleJob, *, clock: dict[str, float],
                      factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleResult:
    """Module ``j`` start to finish: read its factors (unless given ``factors``, the caller's
    read-ahead; streamed in chunks of ``chunk`` adapters if set), solve at ``rank`` (``one_side``:
    ``(r_out, r_in)`` of a module whose small side is kept whole), round to the storage dtype and
    measure the exact errors. The same function runs in process and as a Ray task
    (:mod:`.executor`); ``clock`` gets the seconds reading, solving and measuring."""
    info = collection.modules[j]
    dev = resolve_device(job.device)
    cdtype = COMPUTE_DTYPES[job.compute_dtype]
    for key in ("read_s", "solve_s", "error_s"):
        clock.setdefault(key, 0.0)
    t0 = time.perf_counter()
    if one_side is not None:  # exact in one step; small by construction
        B, A = factors if factors is not None else _read_module(collection, info.name, cdtype, "cpu")
        U, V = _one_side_solution(Chunk(0, B, A), *one_side, job.weighting, 1)
        clock["read_s"] += time.perf_counter() - t0
        return finish_module(Factors.stacked(B, A), info, U, V, None, None, 0, True, job, clock, collection)
    to_solver = (lambda t: t) if job.backend == "torch" else (lambda t: to_backend(t, job.backend))
    if chunk is not None:  # larger than the memory limit: every pass reads chunks from disk
        fac = streamed_factors(collection, info.name, chunk, cdtype, dev, to_solver)
        fac_t = fac if job.backend == "torch" else streamed_factors(collection, info.name, chunk, cdtype, dev)
    else:
        B, A = factors if factors is not None else _read_module(collection, info.name, cdtype, dev)
        fac_t = Factors.stacked(B, A)
        fac = fac_t if job.backend == "torch" else Factors.stacked(to_solver(B), to_solver(A))
    t1 = time.perf_counter()
    sol = solve_factors(job.method, fac, rank, weighting=job.weighting, seed=job.seed, max_iters=job.max_iters,
                        tol=job.tol)
    if job.backend != "torch":
        sol.U, sol.V, sol.cores = to_torch(sol.U), to_torch(sol.V), to_torch(sol.cores)
    clock["read_s"] += t1 - t0
    clock["solve_s"] += time.perf_counter() - t1
    return finish_module(fac_t, info, sol.U, sol.V, sol.cores, sol.assignment, sol.n_iters, sol.converged, job,
                         clock, collection)


def finish_module(fac: Factors, info, U, V, cores, assign, n_iters: int, converged: bool, job: ModuleJob,
                  clock: dict[str, float], collection: Collection | None = None) -> ModuleResult:
    """A solved module rounded to the storage dtype, with its exact errors (see :func:`round_and_measure`)."""
    t0 = time.perf_counter()
    refine = (job.method in ("jd-full", "jd-clustered") and U.dtype != torch.float64) or cores is None
    wsq = wn2 = None
    if whitening_of(collection) is None:
        U, V, cores, sq, n2, sv = round_and_measure(fac, U, V, cores, assign, refine, job.storage_dtype,
                                          min(ERROR_CHUNK, fac.chunk))
    else:  # calibration: a solution in whitened coordinates, mapped back (lorazip.compress.whiten)
        U, V, cores, sq, n2, sv, wsq, wn2 = finish_whitened(collection, info.name, fac, U, V, cores, assign, refine,
                                                            job.storage_dtype, min(ERROR_CHUNK, fac.chunk))
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
                          rounds: int, converged: bool, job: ModuleJob, *, clock: dict[str, float],
                          factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleResult:
    """Module ``j`` of a clustered solution (``U``, ``V``: (K, d, r)), rounded and measured."""
    info = collection.modules[j]
    t0 = time.perf_counter()
    B, A = factors if factors is not None else _read_module(collection, info.name,
                                                            COMPUTE_DTYPES[job.compute_dtype], "cpu")
    clock["read_s"] = clock.get("read_s", 0.0) + time.perf_counter() - t0
    if one_side is not None:
        U, V = _one_side_solution(Chunk(0, B, A), *one_side, job.weighting, U.shape[0])
        cores = None
    return finish_module(Factors.stacked(B, A), info, U, V, cores, assign, rounds, converged, job, clock, collection)


def module_step_task(collection: Collection, name: str, dtype: torch.dtype, device: str, fn, args: tuple, *,
                     clock: dict[str, float]):
    """``fn(B, A, *args)`` on module ``name``'s factors, read here in ``dtype`` onto ``device``: a
    step of a solver that visits every module in turn (jd-clustered's rounds), as a Ray task."""
    t0 = time.perf_counter()
    B, A = _read_module(collection, name, dtype, resolve_device(device))
    t1 = time.perf_counter()
    out = fn(B, A, *args)
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return out


def _step_tasks(executor, collection: Collection, dtype: torch.dtype, device: str, memory: int | None):
    """``map_modules`` for :func:`~lorazip.solvers.clustered.jd_clustered`: each per-module step
    as a task on ``executor`` that reads its module's factors itself."""
    names = [m.name for m in collection.modules]

    def run(fn, args: list[tuple]) -> list:
        out: list = [None] * len(args)
        tasks = [(names[j], dtype, device, fn, a) for j, a in enumerate(args)]
        for j, got in map_modules(executor, module_step_task, collection, tasks, labels=names, memory=memory,
                                  phase=fn.__name__.strip("_")):
            out[j] = got
        return out

    return run


def compress_modules(
    collection: Collection,
    rank: int = 16,
    *,
    method: str = "jd-full",
    weighting: str = "relative",
    device: str = "auto",
    storage_dtype: str = "auto",
    compute_dtype: str = "float32",
    seed: int = 0,
    max_iters: int = 500,
    tol: float = 1e-4,
    ranks: dict[str, int] | None = None,
    backend: str = "torch",
    clusters: int = 1,
    per_module_clusters: bool = False,
    max_rounds: int = 30,
    keep_extras: bool = True,
    extras_dtype: str = "auto",
    hash_sources: bool = True,
    cache_bytes: int = 2 << 30,
    memory_limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    timings: dict[str, float] | None = None,
    executor: "RayExecutor | None" = None,
) -> Artifact:
    """Jointly compress every module of ``collection`` at given ranks (the module loop behind
    :func:`lorazip.compress`).

    Parameters
    ----------
    collection : Collection from :func:`lorazip.load_collection`.
    rank : shared rank r (per module, at most ``min(d_out, d_in)``).
    ranks : optional rank per module name (overrides ``rank`` there); see
        :func:`lorazip.compress.allocate.compress_to` to choose them from a budget or an error target.
    method : "jd-full" (full r x r cores), "jd-diag" (diagonal cores), "jd-clustered"
        (K groups with their own bases) or "svd" (per-adapter truncated SVD, the baseline).
    clusters, per_module_clusters, max_rounds : for "jd-clustered": K, one assignment per
        module instead of one per adapter, and the limit on fit/assign rounds.
    weighting : "relative" (each adapter counts equally) or "absolute".
    device : "auto", "cpu" or "cuda"; the same code runs on both.
    backend : "torch" (default), "numpy" or "cupy": the array library the JD-Full solver runs
        on (:mod:`lorazip.backend`; cupy runs on the GPU without a CUDA build of torch).
    storage_dtype : "float32", "float16", "bfloat16" or "int8" (symmetric per-row int8 with one
        scale per row, :mod:`lorazip.quantize`) for the stored bases and cores; "auto" (default)
        keeps the adapters' own precision (fp16 stays fp16, anything mixed is fp32). Errors are
        always measured on the stored (rounded, dequantised) values.
    compute_dtype : "float32" (default) or "float64" for the solver; errors are always
        measured in float64.
    seed, max_iters, tol : solver settings (seeded, deterministic on CPU).
    cache_bytes : module factors are kept in memory between clustering rounds up to this size
        (re-read from disk beyond it).
    memory_limit : bytes for module factors and their working copies (default: no limit). A module
        needing more than a third of it is streamed from disk in chunks of adapters on every
        solver pass (jd-full and jd-diag; slower, bounded memory); see :class:`MemoryPlan`.
    keep_extras : store non-LoRA tensors (``modules_to_save``) so export reproduces them.
    extras_dtype : "auto" (default: extras stored exactly as they came), "float32", "float16",
        "bfloat16" or "int8", applied to floating extras of 2+ dims (1-D ones only for float16 /
        bfloat16); their error is recorded apart (``stats/extras_*``) and export restores the
        original dtypes.
    progress : called as ``progress(done, total, module_name)`` after each module.
    timings : if given, filled with seconds spent waiting for reads (``read_s``), solving
        (``solve_s``; streamed modules read inside it), measuring errors (``error_s``) and
        waiting for the sources' sha256, computed in the background (``hash_s``).
    executor : a :class:`~lorazip.compress.executor.RayExecutor` to solve each module as a Ray
        task that reads the module's factors itself (the sources must be visible to the workers);
        None (default): in this process. The artifact is the same either way. ``timings`` then
        sums the tasks' seconds over the workers.

    Returns
    -------
    Artifact, in memory; ``.save(path)`` writes it.

    Raises
    ------
    OptionError for invalid settings. A rank larger than a module allows is not an error: the
    module is stored at ``min(rank, d_out, d_in, sum of its adapters' ranks)``, which is exact
    there, and ``meta["modules"][j]["rank_capped"]`` records it.
    """
    opts = CompressOptions(rank, method, weighting, device, storage_dtype, seed, max_iters, tol, compute_dtype,
                           extras_dtype)
    opts.check()
    if storage_dtype == "auto":
        storage_dtype = collection.storage_dtype()
    ranks = dict(ranks or {})
    unknown = set(ranks) - {m.name for m in collection.modules}
    if unknown:
        raise OptionError(f"ranks given for modules not in the collection: {', '.join(sorted(unknown)[:3])}")
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "torch" and method != "jd-full":
        raise OptionError(f"--backend {backend} runs jd-full only; use the torch backend for {method}")
    if ranks and method == "jd-clustered":
        raise OptionError("per-module ranks are not supported with jd-clustered yet; use one --rank")
    capped: dict[str, dict[str, Any]] = {}
    one_side: dict[str, tuple[int, int]] = {}  # modules whose small side is kept whole
    for m in collection.modules:
        r_m = ranks.setdefault(m.name, rank)
        if isinstance(r_m, bool) or not isinstance(r_m, int) or r_m <= 0:
            raise OptionError(f"rank of module {m.name} must be a positive integer, got {r_m!r}")
        r_out, r_in = collection.shared_ranks(m.name, r_m)
        if method not in ("jd-full", "jd-clustered"):  # diagonal or per-adapter cores are square
            r_out = r_in = min(r_out, r_in)
        if (r_out, r_in) != (r_m, r_m):  # a rank means "at most": store the module at its limit
            ranks[m.name] = min(r_out, r_in)
            capped[m.name] = _cap_record(m, r_m, r_out, r_in)
            if r_out != r_in:
                one_side[m.name] = (r_out, r_in)
    dev = resolve_device(device)
    n, n_mod = len(collection), len(collection.modules)
    if method == "jd-clustered" and not 1 <= clusters <= n:
        raise OptionError(f"--clusters {clusters} must be between 1 and the number of adapters ({n})")
    tensors: dict[str, torch.Tensor] = {}
    sq_error = torch.zeros(n, n_mod, dtype=torch.float64)
    norm2 = torch.zeros(n, n_mod, dtype=torch.float64)
    weight_sq, weight_n2 = torch.zeros_like(sq_error), torch.zeros_like(norm2)  # with calibration
    modules_meta = []
    cdtype = COMPUTE_DTYPES[compute_dtype]
    plan = MemoryPlan.make(collection, cdtype.itemsize, memory_limit, method)
    cache = _FactorCache(collection, dev, plan.cache_bytes(cache_bytes), cdtype)
    hashes = SourceHashes(collection, hash_sources)
    clock = timings if timings is not None else {}
    for key in ("read_s", "solve_s", "error_s"):
        clock.setdefault(key, 0.0)

    job = ModuleJob(method, weighting, storage_dtype, compute_dtype, seed, max_iters, tol, backend, device)
    names = [m.name for m in collection.modules]
    arrived: dict[int, ModuleResult] = {}

    def collect(results) -> None:
        """Store module results in module order as they arrive (in any order on Ray)."""
        for count, (j, res) in enumerate(results, 1):
            arrived[j] = res
            while len(modules_meta) in arrived:
                k = len(modules_meta)
                got, info = arrived.pop(k), collection.modules[k]
                tensors.update(got.tensors)
                sq_error[:, k], norm2[:, k] = got.sq_error, got.norm2
                if got.weight_sq_error is not None:
                    weight_sq[:, k], weight_n2[:, k] = got.weight_sq_error, got.weight_norm2
                capped_k = {"rank_capped": capped[info.name]} if info.name in capped else {}
                modules_meta.append({**info.entry(), **got.entry, **capped_k})
            if progress:
                progress(count, n_mod, names[j])

    def read_ahead(j: int, on_device: bool = True) -> dict[str, Any]:
        """In process, module ``j``'s factors for its task from the cache (the next module is read
        meanwhile); the previous module is freed first."""
        if j > 0:
            cache.drop(j - 1)
            release_freed_memory()
        if j in plan.chunk:
            return {}
        if not on_device or names[j] in one_side:
            fac = cache.cpu(j)
            return {"factors": (fac.B, fac.A)}
        if j + 1 < n_mod and plan.prefetch(j):
            cache.prefetch(j + 1)  # read the next module while this one is solved
        return {"factors": cache.device(j)}

    try:
        if method == "jd-clustered":
            t0 = time.perf_counter()
            steps = None if executor is None else _step_tasks(executor, collection, cdtype, device, memory_limit)
            res = jd_clustered(
                list(range(n_mod)), cache.device, clusters, [ranks[m] for m in names], weighting=weighting,
                per_module=per_module_clusters, max_rounds=max_rounds, max_iters=max_iters, tol=tol, seed=seed,
                map_modules=steps, dims=[(n, m.d_out, m.d_in) for m in collection.modules],
            )
            clock["solve_s"] += time.perf_counter() - t0  # includes reads: modules are revisited each round
            args = [(j, res.U[j], res.V[j], res.cores[j], res.assignment[j] if clusters > 1 else None,
                     one_side.get(names[j]), res.rounds, res.converged, job) for j in range(n_mod)]
            collect(map_modules(executor, finish_clustered_task, collection, args, labels=names, clock=clock,
                                local=lambda j: read_ahead(j, on_device=False), memory=memory_limit,
                                phase="finish"))
            clustering = {"n_clusters": clusters, "per_module": per_module_clusters, "rounds": res.rounds,
                          "converged": res.converged, "objective_history": res.history}
        else:
            clustering = None
            args = [(j, ranks[names[j]], one_side.get(names[j]), plan.chunk.get(j), job) for j in range(n_mod)]
            collect(map_modules(executor, solve_module_task, collection, args, labels=names, clock=clock,
                                local=read_ahead, memory=memory_limit))
    except BaseException:
        hashes.close()
        raise
    finally:
        cache.close()  # stop the read-ahead thread, also when a module fails
    t0 = time.perf_counter()
    meta = {
        "method": method,
        "rank": Counter(ranks.values()).most_common(1)[0][0] if ranks else rank,
        "per_module_ranks": len(set(ranks.values())) > 1,
        "weighting": weighting,
        "storage_dtype": storage_dtype,
        "solver": {"max_iters": max_iters, "tol": tol, "seed": seed, "device": dev.type,
                   "compute_dtype": compute_dtype},
        "clustering": clustering,
    }
    if whitening_of(collection) is not None:
        annotate(whitening_of(collection), meta, tensors, weight_sq, weight_n2)
    art = assemble(collection, meta, modules_meta, tensors, sq_error, norm2, hashes, keep_extras, extras_dtype)
    clock["hash_s"] = time.perf_counter() - t0
    return art
