"""Runs under a byte budget or an error target: fit the curves, allocate, build, check.

Per module ``m`` the artifact may hold a shared part (JD-Full bases ``U``, ``V`` at rank
``r_m >= 0`` with cores ``S_i``) plus, per adapter, a residual part: the truncated SVD of
``M_i - U S_i V^T`` at rank ``k_im >= 0``, each of its rows at 1-8 bits. ``r_m = 0`` is per-adapter
truncated SVD, ``k = 0`` is plain JD-Full. Which mix is best depends on the collection: shared
bases win when many adapters share directions, per-adapter parts win on small or diverse ones.
:func:`compress_mixed` fits the curves (:mod:`.curves`), allocates (:mod:`.allocate`) for every
storage candidate and grouping, and builds the best (:mod:`.build`); :func:`compress_to` does the
same with shared parts only (diagonal cores, a uniform rank, calibrated streaming). A budget holds
on the real file: dry assemblies give the exact size of everything besides the parts.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np
import torch

from ..artifact import STORAGE_DTYPES, Artifact
from ..backend import BACKENDS
from ..errors import OptionError
from ..io.collection import Collection
from ..metrics import per_adapter
from ..quantize import QSCALE
from .allocate import BITS, Allocation, StepCurves, allocate_mixed, allocate_shared, _rank_numbers
from .build import FactorReads, build_allocation, keep_limit
from .curves import ModuleFit, fit_module_task, rank_curves
from .executor import RayExecutor, map_modules
from .modules import compress_modules
from .options import check_extras_dtype
from .plan import Clusters
from .provenance import SourceHashes
from .streaming import MemoryPlan
from .whiten import whitening_of


_RETARGETS = 3  # a target missed by a quantised precision's rounding is aimed lower at most this often


_QUANT_ROOM = 1e-4  # of the relative error: int8's rounding adds 2-4e-5 (docs/method.md), kept below a target


_SLACK = 16  # bytes kept free in case a header field differs between the dry and the real assembly


def _stat(errors: np.ndarray, stat: str) -> float:
    return float(errors.mean() if stat == "mean" else errors.max())


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
            reads = FactorReads(collection, keep=kept, limit=keep_limit() if memory_limit is None else 0,
                           plan=plan) if executor is None else None
            fits: list[ModuleFit] = [None] * n_mod  # type: ignore[list-item]
            for count, (j, fit) in enumerate(map_modules(executor, fit_module_task, collection, args, labels=names,
                                                          local=reads.factors if reads else None, phase="fit"), 1):
                fits[j] = fit
                if progress:
                    progress(count, 2 * n_mod, names[j] if K == 1 else f"K={K}: {names[j]}")
            del reads
            E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
            plain = StepCurves(fits, E)  # shared by every dtype and every budget the dry assembly tries
            for dt in dtypes:
                curves = StepCurves(fits, E, bits=True) if dt == BITS else plain
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
                art = build_allocation(collection, fits, alloc, dt, weighting, seed, tol, max_iters, hashes, keep_extras,
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
        dry = build_allocation(collection, fits, alloc, storage_dtype, weighting, seed, tol, max_iters, hashes, keep_extras,
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


def compress_to(
    collection: Collection,
    *,
    budget: int | None = None,
    target_error: float | None = None,
    max_rank: int = 64,
    uniform: bool = False,
    method: str = "jd-full",
    storage_dtype: str = "auto",
    progress: Callable[[int, int, str], None] | None = None,
    **kw: Any,
) -> tuple[Artifact, dict[str, Any]]:
    """Compress with ranks chosen for a byte ``budget`` (of the artifact file) or a mean
    ``target_error``; returns the artifact and a report of the allocation. Shared parts only
    (no residuals): used for jd-diag, ``uniform=True`` and streamed modules."""

    if (budget is None) == (target_error is None):
        raise OptionError("give exactly one of --budget or --target-error")
    if method not in ("jd-full", "jd-diag"):
        raise OptionError(f"rank allocation supports jd-full and jd-diag, not {method}")
    if target_error is not None and not 0 <= target_error <= 1:
        raise OptionError(f"--target-error must be between 0 and 1, got {target_error}")
    if storage_dtype == "auto":
        storage_dtype = collection.storage_dtype()
    # bytes per stored number: 1 for int8, whose row scales are overhead (measured on the probe below,
    # and the shrink loop takes back rank steps if the file is still over)
    itemsize = torch.tensor([], dtype=STORAGE_DTYPES[storage_dtype]).element_size()
    n = len(collection)
    diag = method == "jd-diag"
    curves = rank_curves(collection, max_rank, weighting=kw.get("weighting", "relative"), seed=kw.get("seed", 0),
                         memory_limit=kw.get("memory_limit"), progress=progress, executor=kw.get("executor"))
    common = dict(method=method, storage_dtype=storage_dtype, **kw)
    if budget is None:
        ranks = allocate_shared(curves, n, target_error=target_error, uniform=uniform, diag=diag)
        art = compress_modules(collection, ranks=ranks, **common)
    else:
        # Fixed bytes besides bases and cores (stats, spectra, extras, header): measured on a
        # rank-1 artifact, then the remaining budget goes to ranks; shrink if the file is over.
        probe = compress_modules(collection, ranks={m: 1 for m in curves.modules}, **common)
        overhead = probe.serialized_size() - itemsize * sum(_rank_numbers(d, n, 1, diag) for d in curves.dims)
        numbers = (budget - overhead) // itemsize
        if numbers <= 0:
            raise OptionError(f"a budget of {budget:,} bytes cannot hold even rank 1 ({probe.serialized_size():,} bytes)")
        while True:
            ranks = allocate_shared(curves, n, budget_numbers=numbers, uniform=uniform, diag=diag)
            art = compress_modules(collection, ranks=ranks, **common)
            size = art.serialized_size()
            if size <= budget:
                break
            numbers -= (size - budget) // itemsize + 1
            if numbers <= 0:
                raise OptionError(f"a budget of {budget:,} bytes cannot hold even rank 1")
    predicted = sum(float(c[ranks[m]]) for m, c in zip(curves.modules, curves.contribution()))
    report = {
        "mode": "uniform" if uniform else "per-module",
        "budget_bytes": budget,
        "target_error": target_error,
        "ranks": ranks,
        "predicted_mean_error": predicted,
        "artifact_bytes": art.serialized_size(),
    }
    return art, report
