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

def candidate_ks(n: int) -> list[int]:
    """K values tried by ``--clusters auto``: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ... and n."""
    ks = {k for k in (1, 2, 3, 4, 6, 8, 12) if k <= n}
    k = 16
    while k <= n:
        ks.update(x for x in (k, k * 3 // 2) if x <= n)
        k *= 2
    ks.add(n)
    return sorted(ks)


def choose_clusters(
    collection: Collection,
    rank: int,
    *,
    target_error: float | None = None,
    stat: str = "mean",
    budget: int | None = None,
    candidates: list[int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    groupings: dict[int, Any] | None = None,
    **kw,
) -> tuple[Artifact, list[dict[str, Any]], int]:
    """Return ``(artifact, curve, chosen_K)``; ``curve`` rows are ``{K, mean, median, max, params, bytes}``.
    ``groupings``, if given, gets the :class:`~lorazip.compress.mixed.Clusters` of every K tried
    (also of one that did not fit), for shared parts with per-adapter residuals on the same groups."""
    from .modules import compress_modules as compress

    if (target_error is None) == (budget is None):
        raise OptionError("choosing K needs exactly one of --target-error or --budget")
    if stat not in ("mean", "max"):
        raise OptionError(f"--target-stat must be mean or max, got {stat!r}")
    if target_error is not None and not 0 <= target_error <= 1:
        raise OptionError(f"--target-error must be between 0 and 1, got {target_error}")
    ks = candidates or candidate_ks(len(collection))
    curve: list[dict[str, Any]] = []
    chosen: tuple[dict[str, Any], Artifact] | None = None
    for step, K in enumerate(ks):
        art = compress(collection, rank, method="jd-clustered", clusters=K, **kw)
        if groupings is not None and K > 1:
            groupings[K] = grouping_of(art)
        rep = evaluate(art)
        row = {"K": K, **{s: rep["errors"][s] for s in ("mean", "median", "max")},
               "params": storage(art)["compressed_params"], "bytes": art.serialized_size()}
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
            if row[stat] <= target_error:
                break
    if chosen is None:
        raise OptionError(f"no K fits the budget of {budget:,} bytes at rank {rank} (K=1 needs {curve[0]['bytes']:,})")
    return chosen[1], curve, chosen[0]["K"]


def grouping_of(art: Artifact):
    """The :class:`~lorazip.compress.mixed.Clusters` of a jd-clustered artifact (K > 1)."""
    from .plan import Clusters

    cl = art.meta["clustering"]
    tensors = art.tensors()
    assign = [tensors[f"assign/{m['name']}"].long() for m in art.modules]
    return Clusters(cl["n_clusters"], assign, cl["per_module"], cl["rounds"], cl["converged"],
                    list(cl.get("objective_history", [])))


def cluster_adapters(collection: Collection, K: int, rank: int, *, per_module: bool = False, **kw):
    """K groups of adapters found by jd-clustered at ``rank`` (the same alternation as
    ``compress --clusters K``), as :class:`~lorazip.compress.mixed.Clusters`; ``kw``: settings of
    :func:`~lorazip.compress.modules.compress_modules`."""
    from .modules import compress_modules

    kw = {k: v for k, v in kw.items() if k not in ("keep_extras", "hash_sources")}
    art = compress_modules(collection, rank, method="jd-clustered", clusters=K, per_module_clusters=per_module,
                           keep_extras=False, hash_sources=False, **kw)
    return grouping_of(art)
