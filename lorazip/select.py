"""Choosing the number of clusters K from an error target or a storage budget.

``choose_clusters`` compresses at increasing K (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...) and
returns the chosen artifact with the error-vs-K curve that led to the choice:

* with ``target_error``: the smallest K (hence the smallest storage) whose per-adapter error
  statistic (``mean`` or ``max``) meets the target; the largest K tried if none does;
* with ``budget`` (bytes of the artifact file): the lowest error among the K whose artifact
  fits, trying K only while the artifact still fits.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .artifact import Artifact
from .errors import OptionError
from .evaluate import evaluate, storage
from .io.collection import Collection

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, original_bytes: int | None = None, what: str = "budget") -> int:
    """Bytes from ``"500MB"``, ``"1.5GiB"``, ``"123456"`` or a ratio ``"50x"`` of ``original_bytes``
    (``what`` names the quantity in error messages)."""
    t = text.strip().upper().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)X", t)
    if m:
        if not original_bytes:
            raise OptionError(f"{what} {text!r} is a ratio but the original size is unknown")
        ratio = float(m.group(1))
        if ratio <= 0:
            raise OptionError(f"{what} ratio must be positive, got {text!r}")
        return int(original_bytes / ratio)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]I?B|B)?", t)
    if not m:
        raise OptionError(
            f"cannot read {what} {text!r}: use bytes like 500MB / 2GiB" + (", or a ratio like 50x" if original_bytes else "")
        )
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


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
    compress: Callable[..., Artifact],
    target_error: float | None = None,
    stat: str = "mean",
    budget: int | None = None,
    candidates: list[int] | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    **kw,
) -> tuple[Artifact, list[dict[str, Any]], int]:
    """Return ``(artifact, curve, chosen_K)``; ``curve`` rows are ``{K, mean, median, max, params, bytes}``."""
    if (target_error is None) == (budget is None):
        raise OptionError("choosing K needs exactly one of --target-error or --budget")
    if stat not in ("mean", "max"):
        raise OptionError(f"--target-stat must be mean or max, got {stat!r}")
    if target_error is not None and not 0 <= target_error <= 1:
        raise OptionError(f"--target-error must be between 0 and 1, got {target_error}")
    ks = candidates or candidate_ks(len(collection))
    curve: list[dict[str, Any]] = []
    chosen: tuple[dict[str, Any], Artifact] | None = None
    for K in ks:
        art = compress(collection, rank, method="jd-clustered", clusters=K, **kw)
        rep = evaluate(art)
        row = {"K": K, **{s: rep["errors"][s] for s in ("mean", "median", "max")},
               "params": storage(art)["compressed_params"], "bytes": art.serialized_size()}
        curve.append(row)
        if progress:
            progress(K, row)
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
