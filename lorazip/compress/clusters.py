"""Choosing the number of clusters K from an error target or a storage budget.

``choose_clusters`` compresses at increasing K (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...) and
returns the chosen artifact with the error-vs-K curve that led to the choice:

* with ``target_error``: the smallest K (hence the smallest storage) whose per-adapter error
  statistic (``mean`` or ``max``) meets the target; the largest K tried if none does;
* with ``budget`` (bytes of the artifact file): the lowest error among the K whose artifact
  fits, trying K only while the artifact still fits.
"""

from __future__ import annotations

from typing import Any, Callable

from ..artifact import Artifact
from ..errors import OptionError
from ..evaluate import evaluate, storage
from ..io.collection import Collection
from .options import CompressOptions, check_clusters
from .plan import Clusters

def candidate_ks(n: int) -> list[int]:
    """K values tried by ``--clusters auto``: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ... and n."""
    ks = {k for k in (1, 2, 3, 4, 6, 8, 12) if k <= n}
    k = 16
    while k <= n:
        ks.update(x for x in (k, k * 3 // 2) if x <= n)
        k *= 2
    ks.add(n)
    return sorted(ks)


def choose_clusters(collection: Collection, opts: CompressOptions, *, candidates: list[int] | None = None,
                    progress: Callable[[int, int, str], None] | None = None, groupings: dict[int, Any] | None = None,
                    executor=None) -> tuple[Artifact, list[dict[str, Any]], int]:
    """K groups of shared bases at ``opts.shared_rank`` for ``opts.budget`` or ``opts.goal``: returns
    ``(artifact, curve, chosen_K)``; ``curve`` rows are ``{K, mean, median, max, params, bytes}``.
    ``groupings``, if given, gets the :class:`~lorazip.compress.plan.Clusters` of every K tried
    (also of one that did not fit), for shared parts with per-adapter residuals on the same groups."""
    from .modules import compress_modules

    budget, target, stat = opts.budget, opts.goal, opts.target_stat
    if (target is None) == (budget is None):
        raise OptionError("choosing K needs exactly one of --target-error or --budget")
    ks = candidates or candidate_ks(len(collection))
    curve: list[dict[str, Any]] = []
    chosen: tuple[dict[str, Any], Artifact] | None = None
    for step, K in enumerate(ks):
        art = compress_modules(collection, opts.fixed(method="jd-clustered", clusters=K), executor=executor)
        if groupings is not None and K > 1:
            groupings[K] = grouping_of(art)
        row = _curve_row(K, art)
        curve.append(row)
        if progress:
            progress(step + 1, len(ks), f"K={K}: {stat} error {row[stat]:.4f}")
        if budget is not None:
            if row["bytes"] > budget:
                break  # storage grows with K: no larger K fits either
            if chosen is None or (row[stat], row["bytes"]) < (chosen[0][stat], chosen[0]["bytes"]):
                chosen = (row, art)
        else:
            chosen = (row, art)
            if row[stat] <= target:
                break
    if chosen is None:
        raise OptionError(f"no K fits the budget of {budget:,} bytes at rank {opts.shared_rank} "
                          f"(K=1 needs {curve[0]['bytes']:,})")
    return chosen[1], curve, chosen[0]["K"]


def _curve_row(K, art: Artifact) -> dict[str, Any]:
    """One row of the error-vs-K curve."""
    rep = evaluate(art)
    return {"K": K, **{s: rep["errors"][s] for s in ("mean", "median", "max")},
            "params": storage(art)["compressed_params"], "bytes": art.serialized_size()}


def choose_clusters_or_mix(collection: Collection, opts: CompressOptions, progress=None, executor=None) -> Artifact:
    """clusters="auto": K groups of shared bases at the shared rank (error-vs-K curve), or, when it
    does better for the budget or target, shared parts on the same groups (K = 1 and every K tried)
    with per-adapter residual parts."""
    groups: dict[int, Any] = {}
    try:
        art, curve, K = choose_clusters(collection, opts, progress=progress, groupings=groups, executor=executor)
    except OptionError:
        if opts.budget is None:
            raise
        art, curve, K = None, [], None  # no K fits the budget at this rank; the mix may
    if _mixable(collection, opts):
        mix = _mix_on(collection, opts, groups, executor)
        if mix is not None:
            k_mix = mix.allocation["n_clusters"]
            row = _curve_row("mix" if k_mix == 1 else f"mix K={k_mix}", mix)
            curve.append(row)
            if art is None or _better(row, curve, K, art, opts):
                art, K = mix, row["K"]
    if art is None:
        raise OptionError(f"nothing fits the budget of {opts.budget:,} bytes: neither K clusters at rank "
                          f"{opts.shared_rank} nor shared and per-adapter parts")
    art.cluster_choice = {"target_error": opts.goal, "target_stat": opts.target_stat, "budget": opts.budget,
                          "chosen": K, "curve": curve}
    return art


def _mixable(collection: Collection, opts: CompressOptions) -> bool:
    """Shared and per-adapter parts apply: jd-full, and not calibration streamed under a memory limit."""
    from .whiten import streams_whitened

    return opts.method == "jd-full" and not streams_whitened(collection, opts.memory_limit)


def _mix_on(collection: Collection, opts: CompressOptions, groups: dict[int, Any], executor) -> Artifact | None:
    """The mix on one basis and on every grouping tried (K = 2 found here if none was); None if nothing fits."""
    from .budget import compress_mixed

    if 2 not in groups and len(collection) >= 2:  # no K > 1 fitted at this rank: try the mix on K = 2
        groups[2] = cluster_adapters(collection, 2, opts, executor=executor)
    try:
        mix, report = compress_mixed(collection, opts, groupings=[None] + [groups[k] for k in sorted(groups)],
                                     executor=executor)
    except OptionError:
        return None
    mix.allocation = report
    return mix


def _better(row: dict[str, Any], curve: list[dict[str, Any]], K, art: Artifact, opts: CompressOptions) -> bool:
    """Whether the mix's ``row`` beats the chosen K's artifact ``art`` for the budget or the target."""
    stat = opts.target_stat
    chosen = next(r[stat] for r in curve if r["K"] == K)
    if opts.budget is not None:
        return (row[stat], row["bytes"]) < (chosen, art.serialized_size())
    return row[stat] <= opts.goal and (row["bytes"] < art.serialized_size() or chosen > opts.goal)


def grouping_of(art: Artifact):
    """The :class:`~lorazip.compress.plan.Clusters` of a jd-clustered artifact (K > 1)."""
    cl = art.meta["clustering"]
    tensors = art.tensors()
    assign = [tensors[f"assign/{m['name']}"].long() for m in art.modules]
    return Clusters(cl["n_clusters"], assign, cl["per_module"], cl["rounds"], cl["converged"],
                    list(cl.get("objective_history", [])))


def cluster_adapters(collection: Collection, K: int, opts: CompressOptions, executor=None) -> Clusters:
    """K groups of adapters found by jd-clustered at ``opts.shared_rank`` (the same alternation as
    ``compress --clusters K``), as :class:`~lorazip.compress.plan.Clusters`."""
    from .modules import compress_modules

    check_clusters(K, len(collection))
    art = compress_modules(collection, opts.fixed(method="jd-clustered", clusters=K, keep_extras=False,
                                                  hash_sources=False, backend="torch", extras_dtype="auto"),
                           executor=executor)
    return grouping_of(art)
