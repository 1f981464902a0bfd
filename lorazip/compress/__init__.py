"""Compression: a :class:`~lorazip.io.collection.Collection` in, an :class:`~lorazip.artifact.Artifact` out.

* :mod:`.pipeline`: the module loop (read-ahead, streaming, backend conversion, exact errors);
* :mod:`.mixed`: shared and per-adapter residual parts under a byte budget or an error target;
* :mod:`.allocate`: shared ranks only under a budget or a target (jd-diag, uniform, streamed);
* :mod:`.clusters`: the number of clusters K for a budget or a target;
* :mod:`.streaming`: the memory plan for modules larger than memory;
* :mod:`.provenance`: source hashes and adapter metadata.

``lorazip.compress`` is the function :func:`compress` (the package keeps the name bound to it,
see ``lorazip/__init__.py``); this package is ``sys.modules["lorazip.compress"]``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..artifact import Artifact
from ..errors import OptionError
from ..io.collection import Collection
from .modules import compress_modules
from .options import COMPUTE_DTYPES, CompressOptions

__all__ = ["compress", "compress_modules", "CompressOptions", "COMPUTE_DTYPES"]


DEFAULT_RANK = 16  # the paper's fixed-rank mode, and the rank at which --clusters groups the adapters
# With none of rank, budget and target: the mean error at which the bundled collection keeps >= 99% of
# its adapters' task gain (docs/task_eval.md: every adapter with error <= 0.031 kept >= 0.99, and the
# weight-space budget runs lose 0.31 of their mean error in retention).
DEFAULT_TARGET_ERROR = 0.03


def default_target_error(rank: int | None, budget: int | None, target_error: float | None, method: str,
                         uniform_rank: bool) -> float | None:
    """The target a run without ``rank``, ``budget`` and ``target_error`` aims at (jd-full, not a
    uniform rank): :data:`DEFAULT_TARGET_ERROR`; None where the run is not such a default run."""
    if rank is None and budget is None and target_error is None and method == "jd-full" and not uniform_rank:
        return DEFAULT_TARGET_ERROR
    return None


def compress(
    collection: Collection,
    rank: int | None = None,
    *,
    budget: int | None = None,
    target_error: float | None = None,
    target_stat: str = "mean",
    clusters: int | str = 1,
    method: str = "jd-full",
    uniform_rank: bool = False,
    max_rank: int = 64,
    progress: Callable[[int, int, str], None] | None = None,
    calibration=None,
    calibration_lambda: float | None = None,
    **options: Any,
) -> Artifact:
    """Compress ``collection`` into one artifact.

    Parameters
    ----------
    collection : from :func:`lorazip.load_collection`.
    rank : shared rank per module (at most; a module allowing less is stored at its limit).
        Shared parts only, no per-adapter residuals: the paper's fixed-rank mode. With none of
        ``rank``, ``budget`` and ``target_error`` (jd-full, with or without clusters), the target
        is :data:`DEFAULT_TARGET_ERROR` (mean); otherwise ``rank`` defaults to :data:`DEFAULT_RANK`
        (also the rank at which ``clusters`` groups the adapters).
    budget : bytes of the artifact file. With ``target_error`` (0..1) instead: the fewest bytes
        whose per-adapter error statistic ``target_stat`` ("mean" or "max") meets it. Either one
        lets the allocator choose, per module, a shared rank and per-adapter residual ranks
        (:mod:`lorazip.compress.mixed`), never worse than per-adapter SVD, uniform JD-Full or
        per-module JD at the same bytes; with a ``memory_limit`` large modules are read in chunks of
        adapters on every pass. With ``method="jd-diag"``, ``uniform_rank=True``, or calibration
        under a ``memory_limit`` it allocates shared ranks only
        (:func:`~lorazip.compress.allocate.compress_to`). With ``clusters=K``: shared parts on the
        K groups jd-clustered finds at ``rank``, with residuals. With ``storage_dtype="auto"`` (the
        default) the allocator stores int8 instead of the adapters' own precision where that
        gives the lower error (:func:`~lorazip.compress.mixed.compress_mixed`).
    clusters : K groups of adapters with their own bases ("jd-clustered"), or "auto" to choose K
        for ``budget`` / ``target_error`` at ``rank``.
    method : "jd-full", "jd-diag", "jd-clustered" or "svd" (per-adapter truncated SVD).
    max_rank : largest shared rank the allocator considers.
    progress : called as ``progress(done, total, what)``.
    calibration : statistics from :func:`lorazip.calibrate.calibrate` (or the path of their file):
        minimise the error of each module's outputs on the calibration inputs instead of its weights
        (:mod:`lorazip.compress.whiten`; ``budget`` / ``target_error`` then bound that error). The
        artifact records errors in both metrics. ``calibration_lambda``: the regulariser
        (``C + lambda * mean(diag C) * I``; default :data:`~lorazip.compress.whiten.DEFAULT_LAMBDA`).
    options : settings of :func:`~lorazip.compress.pipeline.compress_modules` (weighting, device,
        backend, storage_dtype ("int8": per-row int8, :mod:`lorazip.quantize`), compute_dtype, seed,
        max_iters, tol, keep_extras, extras_dtype, hash_sources, memory_limit, per_module_clusters,
        max_rounds, ...).

    Returns
    -------
    Artifact in memory (``.save(path)`` writes it). After a budget or target, its attribute
    ``allocation`` (or ``cluster_choice`` for clusters="auto") reports what was chosen and why
    (in memory only; the file records a summary in ``meta["allocation"]``).
    """
    if target_stat not in ("mean", "max"):
        raise OptionError(f"target statistic must be mean or max, got {target_stat!r}")
    if rank is None:
        target_error = default_target_error(rank, budget, target_error, method, uniform_rank) or target_error
        rank = DEFAULT_RANK
    if calibration is not None:  # every solver then reads whitened factors
        from .whiten import DEFAULT_LAMBDA, whiten_collection

        collection = whiten_collection(collection, calibration,
                                       DEFAULT_LAMBDA if calibration_lambda is None else calibration_lambda)
    elif calibration_lambda is not None:
        raise OptionError("a calibration lambda needs calibration statistics")
    if budget is not None and target_error is not None:
        raise OptionError("give a budget or a target error, not both")
    if clusters == "auto":
        return _choose_clusters_or_mix(collection, rank, budget, target_error, target_stat, method, max_rank,
                                       progress, options)
    if isinstance(clusters, str):
        try:
            clusters = int(clusters)
        except ValueError:
            raise OptionError(f"clusters must be a number or 'auto', got {clusters!r}") from None
    if budget is not None or target_error is not None:
        if method not in ("jd-full", "jd-diag"):
            raise OptionError(f"a budget or a target error allocates jd-full or jd-diag parts, not {method}")
        if clusters != 1 and (method != "jd-full" or uniform_rank):
            raise OptionError("a budget or a target error with K clusters allocates jd-full parts with residuals: "
                              "drop --method jd-diag and --uniform-rank")
        # calibration under a memory limit: the shared-only allocator, which streams whitened modules
        calibrated_stream = calibration is not None and options.get("memory_limit") is not None
        if method == "jd-diag" or uniform_rank or calibrated_stream:
            from .budget import compress_to

            kw = {k: v for k, v in options.items() if k not in ("per_module_clusters", "max_rounds")}
            art, report = compress_to(collection, budget=budget, target_error=target_error, max_rank=max_rank,
                                      uniform=uniform_rank, method=method, progress=progress, **kw)
        else:
            from .budget import compress_mixed

            unknown = set(options) - _MIXED_OPTIONS
            if unknown:
                raise OptionError(f"option(s) {', '.join(sorted(unknown))} do not apply to a budget or target")
            groups = None
            if clusters != 1:  # K groups found at ``rank``, then shared and residual parts on them
                from .clusters import cluster_adapters

                if not 1 <= clusters <= len(collection):
                    raise OptionError(f"--clusters {clusters} must be between 1 and the number of adapters "
                                      f"({len(collection)})")
                groups = [cluster_adapters(collection, clusters, rank,
                                           per_module=options.get("per_module_clusters", False),
                                           **{k: v for k, v in options.items() if k in _CLUSTER_PASSED})]
            art, report = compress_mixed(collection, budget=budget, target_error=target_error, stat=target_stat,
                                         max_rank=max_rank, progress=progress, clusters=groups,
                                         **{k: v for k, v in options.items() if k in _MIXED_PASSED})
        art.allocation = report
        return art
    if clusters != 1:
        if method not in ("jd-full", "jd-clustered"):
            raise OptionError(f"clusters need method jd-clustered (jd-full per cluster), not {method}")
        method, options["clusters"] = "jd-clustered", clusters
    return compress_modules(collection, rank, method=method, progress=progress, **options)


# options of compress_modules that a budget or target run takes (the rest would be ignored)
_MIXED_PASSED = {"weighting", "storage_dtype", "seed", "tol", "max_iters", "keep_extras", "extras_dtype",
                 "hash_sources", "executor", "memory_limit", "backend"}
_CLUSTER_PASSED = {"weighting", "storage_dtype", "seed", "tol", "max_iters", "executor", "device", "compute_dtype",
                   "max_rounds", "cache_bytes", "memory_limit"}
_MIXED_OPTIONS = _MIXED_PASSED | {"device", "compute_dtype", "per_module_clusters", "max_rounds", "cache_bytes",
                                  "timings"}




def _choose_clusters_or_mix(collection, rank, budget, target_error, target_stat, method, max_rank, progress,
                            options) -> Artifact:
    """clusters="auto": K groups of shared bases at ``rank`` (error-vs-K curve), or, when it does
    better for the budget or target, shared parts on the same groups (K = 1 and every K tried)
    with per-adapter residual parts."""
    from ..evaluate import evaluate
    from .clusters import choose_clusters
    from .whiten import whitening_of

    groups: dict[int, Any] = {}
    try:
        art, curve, K = choose_clusters(collection, rank, target_error=target_error, stat=target_stat,
                                        budget=budget, progress=progress, groupings=groups, **options)
    except OptionError:
        if budget is None:
            raise
        art, curve, K = None, [], None  # no K fits the budget at this rank; the mix may
    mixable = method == "jd-full" and not (whitening_of(collection) is not None and options.get("memory_limit"))
    if mixable:
        kw = {k: v for k, v in options.items() if k in _MIXED_PASSED}
        from .budget import compress_mixed

        if 2 not in groups and len(collection) >= 2:
            from .clusters import cluster_adapters  # no K > 1 fitted at this rank: try the mix on K = 2

            groups[2] = cluster_adapters(collection, 2, rank, per_module=options.get("per_module_clusters", False),
                                         **{k: v for k, v in options.items() if k in _CLUSTER_PASSED})
        cands = [None] + [groups[k] for k in sorted(groups)]
        try:
            mix, report = compress_mixed(collection, budget=budget, target_error=target_error, stat=target_stat,
                                         max_rank=max_rank, clusters=cands, **kw)
        except OptionError:
            mix = None
        if mix is not None:
            mix.allocation = report
            rep = evaluate(mix)
            k_mix = report["n_clusters"]
            row = {"K": "mix" if k_mix == 1 else f"mix K={k_mix}",
                   **{s: rep["errors"][s] for s in ("mean", "median", "max")},
                   "params": rep["storage"]["compressed_params"], "bytes": mix.serialized_size()}
            curve.append(row)
            better = art is None or (
                (row[target_stat], row["bytes"]) < (_stat_of(curve, K, target_stat), art.serialized_size())
                if budget is not None else
                row[target_stat] <= target_error and (row["bytes"] < art.serialized_size()
                                                      or _stat_of(curve, K, target_stat) > target_error))
            if better:
                art, K = mix, row["K"]
    if art is None:
        raise OptionError(f"nothing fits the budget of {budget:,} bytes: neither K clusters at rank {rank} "
                          "nor shared and per-adapter parts")
    art.cluster_choice = {"target_error": target_error, "target_stat": target_stat, "budget": budget,
                          "chosen": K, "curve": curve}
    return art


def _stat_of(curve, K, stat) -> float:
    return next(row[stat] for row in curve if row["K"] == K)
