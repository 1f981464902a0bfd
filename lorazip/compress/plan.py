"""What a compression run stores, module by module (:class:`Plan`).

Every mode produces a plan: ``--rank R`` is :func:`fixed_rank_plan` (shared rank R everywhere, no
residuals); ``--budget`` / ``--target-error`` are plans the allocator (:mod:`.allocate`) chooses from
exact curves; ``add`` builds with the artifact's bases fixed. The module loop (:mod:`.modules`) and
the allocated build (:mod:`.build`) turn a plan into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import OptionError
from .options import check_clusters


def _cap_record(m, requested: int, r_out: int, r_in: int) -> dict[str, Any]:
    """What was stored instead of the requested rank, and why (recorded per module)."""
    if r_out != r_in:
        side = f"d_out = {m.d_out}" if r_out == m.d_out else f"d_in = {m.d_in}"
        why = f"{side}: that side kept whole, the other at rank {max(r_out, r_in)}"
        return {"requested": requested, "rank": r_in, "rank_out": r_out, "reason": why}
    dims = min(m.d_out, m.d_in)
    why = f"min(d_out, d_in) = {dims}" if r_in == dims else f"sum of adapter ranks = {r_in}"
    return {"requested": requested, "rank": r_in, "reason": why}


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


@dataclass(frozen=True)
class ModulePlan:
    """What one module stores: shared bases of ``rank``, or, for a module whose small side is kept
    whole, ``one_side = (r_out, r_in)`` (exact in one step); residual parts of ``residual[i]``
    components for adapter ``i`` (None: none), each row at ``bits`` (None: the storage dtype); the
    shared part's ``shared_bits`` (bits of the bases, of the cores; None: the storage dtype); and,
    when the rank asked for was more than the module allows, ``capped`` (what was asked and why)."""

    name: str
    rank: int
    one_side: tuple[int, int] | None = None
    residual: np.ndarray | None = None
    bits: np.ndarray | None = None
    capped: dict[str, Any] | None = None
    shared_bits: tuple[int, int] | None = None


@dataclass(frozen=True)
class Plan:
    """What a run stores, per module, and how: every mode produces one.

    ``method`` says the core type and the grouping ("jd-full": full ``r x r`` cores on one basis;
    "jd-diag": diagonal cores; "svd": per-adapter cores; "jd-clustered": ``clusters`` groups found
    while solving); ``groups`` (a :class:`Clusters`) fixes the groups instead (an allocated run on K
    clusters); ``storage_dtype`` is the precision of every part ("bits": residual rows and shared
    parts at their bits). ``kind`` and ``predicted`` say what the allocator chose and the
    per-adapter error it predicts (None for a fixed rank)."""

    method: str
    storage_dtype: str
    modules: tuple[ModulePlan, ...]
    clusters: int = 1
    groups: Clusters | None = None
    kind: str = "fixed rank"
    predicted: np.ndarray | None = field(default=None, compare=False)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}


def fixed_rank_plan(collection, method: str, storage_dtype: str, rank: int, ranks: dict[str, int] | None = None,
                    clusters: int = 1) -> Plan:
    """The plan of a fixed-rank run: ``rank`` in every module (``ranks`` per module where given),
    shared parts only, on ``clusters`` groups for jd-clustered (ignored otherwise). A rank means "at most": a module allowing less (``min(d_out, d_in)``, the sum
    of its adapters' ranks, or one small side kept whole) is stored at its limit, which is exact."""
    ranks = dict(ranks or {})
    unknown = set(ranks) - {m.name for m in collection.modules}
    if unknown:
        raise OptionError(f"ranks given for modules not in the collection: {', '.join(sorted(unknown)[:3])}")
    if ranks and method == "jd-clustered":
        raise OptionError("per-module ranks are not supported with jd-clustered yet; use one --rank")
    if method == "jd-clustered":
        check_clusters(clusters, len(collection))
    out = []
    for m in collection.modules:
        r_m = ranks.get(m.name, rank)
        if isinstance(r_m, bool) or not isinstance(r_m, int) or r_m <= 0:
            raise OptionError(f"rank of module {m.name} must be a positive integer, got {r_m!r}")
        r_out, r_in = collection.shared_ranks(m.name, r_m)
        if method not in ("jd-full", "jd-clustered"):  # diagonal or per-adapter cores are square
            r_out = r_in = min(r_out, r_in)
        if (r_out, r_in) == (r_m, r_m):
            out.append(ModulePlan(m.name, r_m))
        else:  # stored at its limit
            out.append(ModulePlan(m.name, min(r_out, r_in), (r_out, r_in) if r_out != r_in else None,
                                  capped=_cap_record(m, r_m, r_out, r_in)))
    return Plan(method, storage_dtype, tuple(out), clusters if method == "jd-clustered" else 1)
