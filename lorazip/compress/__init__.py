"""Compression: a :class:`~lorazip.io.collection.Collection` in, an :class:`~lorazip.artifact.Artifact` out.

A run's settings are one :class:`~.options.CompressOptions`. What it stores is one
:class:`~.plan.Plan` per run: a fixed rank gives it directly (:func:`~.plan.fixed_rank_plan`), a
budget or a target lets the allocator choose it from exact error curves. The files, whose imports
run one way (each imports only those above it):

* :mod:`.options`: the settings, validated once;
* :mod:`.plan`: what is stored, module by module (grouping, shared rank, core type, residual
  ranks and bits, storage precision);
* :mod:`.measure`: a module's parts rounded to storage, with the exact errors of what is stored;
* :mod:`.curves`: pass 1, the exact error curves (shared-only, and shared with residuals and bits);
* :mod:`.allocate`: the allocator, pure functions from curves to a plan (no I/O);
* :mod:`.build`: pass 2 of an allocated plan, and the assembly of every artifact;
* :mod:`.modules`: the module loop that builds a fixed-rank plan (read-ahead, streaming, backends);
* :mod:`.budget`: budget and target runs (curves, allocation, build, a file that holds the budget);
* :mod:`.clusters`: K groups of adapters, and K for a budget or a target;
* :mod:`.executor`, :mod:`.streaming`, :mod:`.provenance`, :mod:`.whiten`: Ray tasks, the memory
  plan, source hashes, calibration.

``lorazip.compress`` is the function :func:`compress` (the package keeps the name bound to it,
see ``lorazip/__init__.py``); this package is ``sys.modules["lorazip.compress"]``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..artifact import Artifact
from ..errors import OptionError
from ..io.collection import Collection
from .modules import compress_modules
from .options import COMPUTE_DTYPES, DEFAULT_RANK, DEFAULT_TARGET_ERROR, CompressOptions

__all__ = ["compress", "compress_modules", "CompressOptions", "COMPUTE_DTYPES", "DEFAULT_RANK",
           "DEFAULT_TARGET_ERROR"]


def compress(
    collection: Collection,
    rank: int | None = None,
    *,
    options: CompressOptions | None = None,
    ranks: dict[str, int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    calibration=None,
    executor=None,
    timings: dict[str, float] | None = None,
    **settings: Any,
) -> Artifact:
    """Compress ``collection`` into one artifact.

    Parameters
    ----------
    collection : from :func:`lorazip.load_collection`.
    rank, settings : the run's settings, as :class:`CompressOptions` fields (``budget``,
        ``target_error``, ``target_stat``, ``clusters``, ``method``, ``storage_dtype``, ...),
        applied over ``options`` if given. ``rank``: shared rank per module, shared parts only (the
        paper's fixed-rank mode). ``budget`` (bytes of the file) or ``target_error`` (0..1): the
        allocator chooses, per module, a shared rank and per-adapter residual ranks and bits
        (:mod:`lorazip.compress.budget`), never worse than per-adapter SVD, uniform JD-Full or
        per-module JD at the same bytes. With none of them (jd-full) the target is
        :data:`DEFAULT_TARGET_ERROR`. ``clusters=K``: K groups of adapters with their own bases;
        "auto" chooses K for a budget or a target.
    ranks : a fixed-rank run's rank per module name (``rank`` elsewhere).
    progress : called as ``progress(done, total, what)``.
    calibration : statistics from :func:`lorazip.calibrate.calibrate` (or the path of their file):
        minimise the error of each module's outputs on the calibration inputs instead of its weights
        (:mod:`lorazip.compress.whiten`; a budget or target then bounds that error). The artifact
        records errors in both metrics.
    executor : a :class:`~lorazip.compress.executor.RayExecutor`: one Ray task per module.
    timings : filled with seconds spent reading, solving and measuring (fixed-rank runs); on Ray
        also ``module_reads``, how many times a task read a module's factors from the sources.

    Returns
    -------
    Artifact in memory (``.save(path)`` writes it). After a budget or target, its attribute
    ``allocation`` (or ``cluster_choice`` for clusters="auto") reports what was chosen and why
    (in memory only; the file records a summary in ``meta["allocation"]``).
    """
    if rank is not None:
        settings["rank"] = rank
    opts = CompressOptions.of(options, **settings)
    if ranks and (opts.allocates or opts.clusters == "auto"):
        raise OptionError("ranks per module apply to a fixed rank, not to a budget or a target error")
    collection = _calibrated(collection, calibration, opts)
    if opts.clusters == "auto":
        from .clusters import choose_clusters_or_mix

        return choose_clusters_or_mix(collection, opts, progress, executor)
    if opts.allocates:
        return _allocated(collection, opts, progress, executor)
    if opts.clusters != 1:
        opts = opts.fixed(method="jd-clustered")
    return compress_modules(collection, opts.fixed(), ranks=ranks, progress=progress, timings=timings,
                            executor=executor)


def _calibrated(collection: Collection, calibration, opts: CompressOptions) -> Collection:
    """The collection every solver reads: whitened by ``calibration`` when given."""
    if calibration is None:
        if opts.calibration_lambda is not None:
            raise OptionError("a calibration lambda needs calibration statistics")
        return collection
    from .whiten import DEFAULT_LAMBDA, whiten_collection

    lam = DEFAULT_LAMBDA if opts.calibration_lambda is None else opts.calibration_lambda
    return whiten_collection(collection, calibration, lam)


def _allocated(collection: Collection, opts: CompressOptions, progress, executor) -> Artifact:
    """A budget or a target: shared parts only (jd-diag, a uniform rank, calibration streamed under
    a memory limit), or shared and per-adapter parts, on K groups found at the shared rank if asked."""
    from .budget import compress_mixed, compress_shared
    from .whiten import streams_whitened

    if opts.method == "jd-diag" or opts.uniform_rank or streams_whitened(collection, opts.memory_limit):
        if opts.objective != "energy":  # jd-diag and a uniform rank are refused by the options already
            raise OptionError(f"objective {opts.objective} weighs per-adapter parts, which calibration streamed "
                              "under a memory limit does not store: raise --memory-limit or drop --objective")
        art, report = compress_shared(collection, opts, progress=progress, executor=executor)
    else:
        groupings = None
        if opts.clusters != 1:  # K groups found at the shared rank, then shared and residual parts on them
            from .clusters import cluster_adapters

            groupings = [cluster_adapters(collection, opts.clusters, opts, executor=executor)]
        art, report = compress_mixed(collection, opts, groupings=groupings, progress=progress, executor=executor)
    art.allocation = report
    return art
