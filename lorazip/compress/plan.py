"""What a compression run stores, module by module (:class:`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
