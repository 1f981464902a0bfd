"""Reconstruction-error report of an artifact: recorded, or recomputed against the originals.

The report (a plain dict, ``report_version`` 1, documented in docs/format.md) gives the
exact relative squared error per (adapter, module), per adapter (energy-weighted over
its modules) and over the collection, the per-adapter truncated-SVD baseline at the same
rank and at the same per-adapter storage, and the compression ratio in numbers and bytes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from . import lowbit
from .artifact import Artifact, missing_modules, split_modules
from .artifact import storage_summary as storage  # noqa: F401 (lorazip.evaluate.storage)
from .errors import ValidationError
from .layout import shared_widths
from .quantize import QSCALE
from .io.collection import load_collection
from .io.peft import sha256_file
from .metrics import objective_errors, per_adapter, relative, squared_errors, summary
from .solvers.svd import spectra_from_grams, truncation_errors

REPORT_VERSION = 2  # 2: svd_matched_storage is the greedy per-adapter SVD frontier (was one rank for all)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def _itemsize(storage_dtype: str | None) -> int:
    return _ITEMSIZE.get(storage_dtype or "float32", 4)


def int8_rounding(d_out: int, d_in: int) -> float:
    """Predicted share of a rank-1 part's energy that symmetric per-row int8 (step ``max|row| / 127``)
    loses when both of its factors are stored: a row of ``d`` Gaussian-like entries has
    ``max^2 ~ 2 ln(2d) ||row||^2 / d``, so its rounding noise ``d step^2 / 12`` is ``2 ln(2d) / (12 127^2)``
    of its energy (7e-5 at d = 576, matching the 1.2e-4 measured on the bundled collection for both
    factors)."""
    return sum(2 * math.log(2 * d) / (12 * 127**2) for d in (d_out, d_in))


def svd_matched_storage(spectra: list[torch.Tensor], dims: list[int], norms2: torch.Tensor, numbers: int,
                        rounding: list[float] | None = None) -> dict[str, Any]:
    """The simplest alternative at equal storage: every adapter kept separately, each of the
    modules it really has truncated by SVD, ranks spread greedily over all (adapter, module)
    pairs by error removed per stored number (a rank step of a module costs ``d_in + d_out``).

    spectra : per module (n, r_max) singular values of the original deltas; dims : ``d_in + d_out``
    per module; norms2 : (n, M) ``||M_im||^2``; numbers : the budget in stored numbers; rounding :
    per module, the share of each kept part's energy its storage precision loses (int8:
    :func:`int8_rounding`; the baseline then stores its numbers as the artifact does).
    Returns the per-adapter error summary plus ``numbers``, ``pairs`` and ``mean_rank``.
    """
    kept = [(1.0, 1.0)] * len(dims) if rounding is None else [(1 - r, 1 - r) for r in rounding]
    err, spent, taken, pairs = _greedy_svd(spectra, kept, [float(d) for d in dims], norms2, numbers)
    return {**summary(err.tolist()), "numbers": int(spent), "pairs": pairs, "mean_rank": taken / max(pairs, 1)}


def _greedy_svd(spectra: list[torch.Tensor], kept: list[tuple[float, float]], costs: list[float],
                norms2: torch.Tensor, budget: float) -> tuple[torch.Tensor, float, int, int]:
    """Per-adapter truncated SVD, ranks spread greedily over all (adapter, module) pairs by error
    removed per unit of ``budget``: a component of module j keeps the share ``kept[j][0]`` of its
    energy if it is its adapter's leading one, else ``kept[j][1]``, and costs ``costs[j]``. Returns
    the per-adapter errors (n,), the budget spent, the components kept and the (adapter, module) pairs."""
    n = norms2.shape[0]
    E = norms2.sum(1).clamp_min(1e-300)
    gains, cost, who = [], [], []
    for sv, k, c in zip(spectra, kept, costs):
        g = sv.square() / E[:, None]  # (n, r_max): error removed from adapter i's relative error
        if k != (1.0, 1.0):
            g = g * _by_component(k, g.shape[1], g.dtype)
        gains.append(g.flatten())
        cost.append(torch.full((g.numel(),), c, dtype=torch.float64))
        who.append(torch.arange(n).repeat_interleave(g.shape[1]))
    g, c, w = torch.cat(gains), torch.cat(cost), torch.cat(who)
    order = torch.argsort(g / c, descending=True, stable=True)  # within a pair, singular values descend
    take = order[torch.cumsum(c[order], 0) <= budget]
    removed = torch.zeros(n, dtype=torch.float64).index_add_(0, w[take], g[take])
    err = torch.where(norms2.sum(1) > 0, (1 - removed).clamp_min(0), torch.zeros_like(removed))
    return err, float(c[take].sum()), len(take), int((norms2 > 0).sum())


# The baselines use a module's own measured quantisation profile where the artifact records one
# (module metadata "quant" and "quant_rest", written by --budget / --target-error runs), else lorazip.lowbit's.
BASELINE_BITS = (2, 3, 4, 8, 16)  # per-adapter SVD with every factor at one of these precisions
LORAQUANT_GRID = [(ratio, hi, lo) for ratio in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99) for hi, lo in
                  ((3, 1), (4, 1), (3, 2), (4, 2), (8, 2), (8, 4))]


def _quant(mod: dict[str, Any], bits: int) -> tuple[float, float]:
    """Relative error of a component stored at ``bits`` (the leading one of its adapter, the others)."""
    if bits >= 16:
        return 0.0, 0.0
    lead, rest = lowbit.stored_profile(mod)[:, lowbit.BITS.index(bits)]
    return float(lead), float(rest)


def _by_component(pair: tuple[float, float], m: int, dtype: torch.dtype) -> torch.Tensor:
    """(m,) a value per component index: ``pair[0]`` for an adapter's leading component, ``pair[1]``
    for the others."""
    return torch.tensor([pair[0]] + [pair[1]] * (m - 1), dtype=dtype)[:m]


def _component_bytes(mod: dict[str, Any], bits: int) -> int:
    """Bytes of one stored SVD component of a module at ``bits``: both rows packed, and a bfloat16
    scale per row below 16 bits (the rows of lorazip.lowbit)."""
    if bits >= 16:
        return 2 * (mod["d_in"] + mod["d_out"])
    return sum(lowbit.row_bytes(d, bits) + 2 for d in (mod["d_in"], mod["d_out"]))


def svd_at_bits(spectra: list[torch.Tensor], modules: list[dict[str, Any]], norms2: torch.Tensor, nbytes: float,
                bits: int) -> dict[str, Any]:
    """Per-adapter truncated SVD with its factors at ``bits`` (16: float16), ranks spread greedily
    over all (adapter, module) pairs by error removed per byte within ``nbytes``; the error of a
    kept component is its quantisation error (the module's profile, else :data:`lowbit.DEFAULT_QUANT`)."""
    err, spent, taken, pairs = _greedy_svd(spectra, [tuple(1 - q for q in _quant(mod, bits)) for mod in modules],
                                           [float(_component_bytes(mod, bits)) for mod in modules], norms2, nbytes)
    return {**summary(err.tolist()), "bytes": spent, "pairs": pairs, "mean_rank": taken / max(pairs, 1),
            "scheme": f"SVD at {bits} bits"}


def loraquant_style(spectra: list[torch.Tensor], modules: list[dict[str, Any]], norms2: torch.Tensor,
                    nbytes: float) -> dict[str, Any] | None:
    """Per-adapter mixed precision in the manner of LoRAQuant (arXiv 2510.26690): each (adapter,
    module) delta through its SVD, the fewest leading components holding ``ratio`` of its energy
    at ``hi`` bits, the rest at ``lo`` bits; of :data:`LORAQUANT_GRID`, the best setting within
    ``nbytes`` (None if none fits)."""
    E = norms2.sum(1).clamp_min(1e-300)
    best = None
    # what does not depend on the setting, made once per module (the grid has 36 settings): the squared
    # singular values, each adapter's rank, the components before the one reaching each ratio, the
    # profile's errors and a component's bytes at each width
    widths = sorted({b for _, hi, lo in LORAQUANT_GRID for b in (hi, lo)})
    per_module = []
    for sv, mod in zip(spectra, modules):
        s2 = sv.square()
        cum = torch.cumsum(s2, 1)
        r = (s2 > 0).sum(1)
        idx = torch.arange(s2.shape[1])[None, :]
        leads = {ratio: torch.minimum((cum < ratio * cum[:, -1:]).sum(1) + 1, r)  # up to the one reaching it
                 for ratio in {g[0] for g in LORAQUANT_GRID}}
        below = {ratio: idx < lead[:, None] for ratio, lead in leads.items()}
        q = {b: _by_component(_quant(mod, b), s2.shape[1], s2.dtype) for b in widths}
        nb = {b: _component_bytes(mod, b) for b in widths}
        per_module.append((s2, r, leads, below, q, nb))
    for ratio, hi, lo in LORAQUANT_GRID:
        size, lost = 0.0, torch.zeros_like(E)
        for s2, r, leads, below, q, nb in per_module:
            lead = leads[ratio]
            err = s2 * torch.where(below[ratio], q[hi], q[lo])
            lost += err.sum(1)
            size += float((lead * nb[hi] + (r - lead) * nb[lo]).sum())
        if size > nbytes:
            continue
        err = torch.where(norms2.sum(1) > 0, (lost / E).clamp(0, 1), torch.zeros_like(E))
        if best is None or float(err.mean()) < best["mean"]:
            best = {**summary(err.tolist()), "bytes": size,
                    "scheme": f"LoRAQuant-style: {hi} bits to {ratio:g} of the energy, {lo} bits after"}
    return best


def best_svd_baseline(spectra, modules, norms2, nbytes: float, same: dict[str, Any]) -> dict[str, Any]:
    """The best alternative at ``nbytes``: ``same`` (per-adapter SVD at the artifact's precision),
    per-adapter SVD at each of :data:`BASELINE_BITS` and the LoRAQuant-style mixed precision;
    the lowest mean error, with ``alternatives`` {scheme: mean}."""
    cands = [same] + [svd_at_bits(spectra, modules, norms2, nbytes, b) for b in BASELINE_BITS]
    lq = loraquant_style(spectra, modules, norms2, nbytes)
    if lq is not None:
        cands.append(lq)
    best = min(cands, key=lambda c: c["mean"])
    return {**best, "alternatives": {c["scheme"]: c["mean"] for c in cands}}


def storage_bits(artifact: Artifact) -> dict[str, Any]:
    """How the numbers of an artifact are stored: ``histogram`` {bits: numbers} of its bases,
    cores and residual rows (float parts at 16 or 32), ``bytes`` of those parts with their
    scales and bit tables, ``bits_per_number`` (those bytes in bits over the numbers),
    ``pairs_at_nothing``: the (adapter, module) pairs an adapter adapts of which the artifact
    stores nothing (relative error 1), of ``pairs``, ``adapters_at_nothing``: the names of the adapters
    stored at nothing in every module, ``zero_update``: those whose update is zero in every module (an
    untrained LoRA: its error is 0, and it counts in the statistics), ``shared``: the distinct widths "bases/cores"
    of low-bit shared parts (format v6 ``shared_bits``) and ``low_residual``: whether residual rows
    are stored at 1-8 bits."""
    from collections import Counter

    hist: Counter = Counter()
    nbytes = numbers = 0
    keys = set(artifact.keys())
    shared = shared_widths(artifact.meta)
    for mod in artifact.modules:
        name, res = mod["name"], mod.get("residual") or {}
        low = res.get("bits")  # low-bit rows: packed (their bytes in the metadata), a bfloat16 scale per row
        widths = artifact.get(f"qbits/{name}").long() if low else None
        for key in (f"U/{name}", f"V/{name}", f"cores/{name}", f"resid_B/{name}", f"resid_A/{name}"):
            if key not in keys:
                continue
            count, width = artifact.tensor_size(key)
            if count == 0:
                continue
            if key in shared:  # codes packed at the module's width, row by row, a bfloat16 scale per row
                rows = artifact.tensor_size(QSCALE + key)[0]
                length = count // rows
                hist[shared[key]] += count
                nbytes += rows * (lowbit.row_bytes(length, shared[key]) + 2)
            elif low and key.startswith("resid_"):
                for b, cnt in zip(*torch.unique(widths, return_counts=True)):
                    hist[int(b)] += int(cnt) * (count // len(widths))
                nbytes += low["bytes"][0 if key.startswith("resid_B") else 1] + 2 * len(widths)
            else:
                hist[8 * width] += count
                scale = artifact.tensor_size(f"qscale/{key}") if f"qscale/{key}" in keys else (0, 0)
                nbytes += count * width + scale[0] * scale[1]
            numbers += count
        if low:
            nbytes += res["total_rank"]  # the bits table
    sq, n2 = artifact.stats()
    nothing = (n2 > 0) & (sq >= n2 * (1 - 1e-9))
    tags = sorted({"/".join(map(str, m["shared_bits"])) for m in artifact.modules if m.get("shared_bits")})
    return {"histogram": {str(b): hist[b] for b in sorted(hist)}, "numbers": numbers, "bytes": nbytes,
            "bits_per_number": 8 * nbytes / numbers if numbers else 0.0, "shared": tags,
            "low_residual": any((m.get("residual") or {}).get("bits") for m in artifact.modules),
            "pairs_at_nothing": int(nothing.sum()), "pairs": int((n2 > 0).sum()),
            "adapters_at_nothing": [artifact.names[i] for i in
                                    torch.nonzero(((n2 > 0) & ~nothing).sum(1) == 0).flatten().tolist() if n2[i].sum() > 0],
            "zero_update": [artifact.names[i] for i in torch.nonzero((n2 > 0).sum(1) == 0).flatten().tolist()]}


def extras_error(artifact: Artifact, rows: list[int] | None = None) -> dict[str, Any] | None:
    """Relative squared error of the non-LoRA tensors (``extras``) converted at compression by
    ``extras_dtype``, apart from the LoRA error: per adapter ``sum ||X - X_hat||^2 / sum ||X||^2``
    over its extras, summarised (mean, median, min, max) over the adapters that have extras, plus
    ``dtype``. None when the extras were stored as they came (or there are none)."""
    if not artifact._has("stats/extras_sq_error"):
        return None
    sq, n2 = artifact.get("stats/extras_sq_error").double(), artifact.get("stats/extras_norm2").double()
    if rows is not None:
        sq, n2 = sq[rows], n2[rows]
    have = n2 > 0
    return {"dtype": artifact.meta.get("extras_dtype"), "n_adapters": int(have.sum()),
            **summary(relative(sq[have], n2[have]).tolist())}


def recompute_errors(artifact: Artifact, sources, allow_pickle: bool, check_hashes: bool,
                     spectra_out: dict[int, torch.Tensor] | None = None, skipped_out: list[str] | None = None):
    """``(rows, sq, nn2)``: the artifact's rows of the adapters found in ``sources`` and their exact
    squared errors and squared norms (rows, modules), float64, against the re-read originals (whose
    sha256 must match the artifact's record when ``check_hashes``). ``spectra_out``, when given,
    receives each module's weight-space singular values of the originals; ``skipped_out`` the names
    of the source adapters the artifact does not hold (left out)."""
    coll = load_collection(sources, base_model=artifact.meta.get("base_model"), allow_pickle=allow_pickle)
    # the artifact's shape groups (sources of other shapes beside these would key the modules otherwise)
    coll.align(artifact.modules)
    by_name = {a.name: a for a in coll.adapters}
    rows = [i for i, name in enumerate(artifact.names) if name in by_name]
    if skipped_out is not None:
        held = set(artifact.names)
        skipped_out.extend(name for name in coll.names if name not in held)
    if not rows:
        raise ValidationError(f"none of the source adapters ({', '.join(coll.names[:3])}...) are in the artifact")
    if check_hashes:
        for i in rows:
            meta = artifact.meta["adapters"][i]
            for f in by_name[meta["name"]].files():
                want = meta["source"]["files"].get(f.name, {}).get("sha256")
                if want and sha256_file(f) != want:
                    raise ValidationError(f"{f}: sha256 differs from the file compressed into the artifact")
    sub = [coll.names.index(artifact.names[i]) for i in rows]
    n_mod = len(artifact.modules)
    sq = torch.zeros(len(rows), n_mod, dtype=torch.float64)
    nn2 = torch.zeros_like(sq)
    with artifact.reader():  # one open file for all the reads
        for j, mod in enumerate(artifact.modules):
            if mod["name"] not in {m.name for m in coll.modules}:
                continue  # no source adapter has this module: zero deltas, nothing to compare
            fac = coll.module_factors(mod["name"], sub)
            U, V, cores, assign = artifact.module_factors(mod["name"], rows)
            b, a, _ks = artifact.module_residuals(mod["name"], rows)  # format v2 (k = 0: none)
            sq[:, j], nn2[:, j] = squared_errors(fac.B, fac.A, U, V, cores, assign, residual=(b, a))
            if spectra_out is not None:  # the recorded spectra are of another metric (calibration)
                B, A = fac.B.double(), fac.A.double()
                spectra_out[j] = spectra_from_grams(B.transpose(1, 2) @ B, A @ A.transpose(1, 2))
    return rows, sq, nn2


def evaluate(
    artifact: Artifact,
    sources: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    check_hashes: bool = True,
) -> dict[str, Any]:
    """Error report of ``artifact``.

    Without ``sources`` the errors recorded at compression are reported; with them, the
    original adapters are re-read (after checking their sha256 against the artifact) and
    the errors recomputed exactly from the stored, possibly rounded, factors.

    An artifact compressed with calibration statistics records errors in the activation metric
    (``metric: "activation"``, what was optimised) and in weight space (``weight_errors``);
    errors recomputed against the originals are in weight space (``metric: "weight"``).
    """
    calibration = artifact.meta.get("calibration")
    weight_spectra = {} if calibration and sources is not None else None
    skipped: list[str] = []  # source adapters the artifact does not hold
    if sources is None:
        rows = list(range(len(artifact.names)))
        sq, nn2 = artifact.stats()
        sq, nn2 = sq.double(), nn2.double()
    else:
        rows, sq, nn2 = recompute_errors(artifact, sources, allow_pickle, check_hashes, weight_spectra, skipped)
    weight_err = _recorded_weight_errors(artifact) if calibration and sources is None else None
    adapter_err = per_adapter(sq, nn2)
    st = storage(artifact)
    stored = storage_bits(artifact)
    base_same, baseline = _svd_baselines(artifact, rows, nn2, weight_spectra, st, stored)
    clustering, assign = _clustering(artifact)
    return {
        "report_version": REPORT_VERSION,
        "artifact": str(artifact.path) if artifact.path else None,
        "extras_error": extras_error(artifact, rows),
        "recomputed": sources is not None,
        **({"sources_not_in_artifact": skipped} if sources is not None else {}),
        "method": artifact.method,
        "rank": artifact.meta.get("rank"),
        "weighting": artifact.meta.get("weighting"),
        "clustering": clustering,
        "storage_dtype": artifact.meta.get("storage_dtype"),
        "n_adapters": len(rows),
        "n_modules": len(artifact.modules),
        "errors": summary(adapter_err.tolist()),
        **({"objective": {"name": artifact.meta["objective"],
                          **summary(objective_errors(sq, nn2, artifact.meta["objective"]).tolist())}}
           if artifact.meta.get("objective", "energy") != "energy" else {}),
        "metric": "activation" if calibration and sources is None else "weight",
        **({"weight_errors": summary(weight_err.tolist())} if weight_err is not None else {}),
        **({"calibration": calibration} if calibration else {}),
        "baseline": baseline,
        "storage": st,
        "bits": {k: stored[k] for k in ("histogram", "bits_per_number", "pairs_at_nothing", "pairs", "shared",
                                        "low_residual", "adapters_at_nothing", "zero_update")},
        "split_modules": split_modules(artifact.modules, [artifact.meta["adapters"][i] for i in rows]),
        "adapters": _adapter_rows(artifact, rows, adapter_err, weight_err, base_same, nn2, assign),
        "modules": _module_rows(artifact, relative(sq, nn2), nn2),
    }


def _recorded_weight_errors(artifact: Artifact) -> torch.Tensor | None:
    """(n,) weight-space errors recorded by a calibrated compression (summed over modules), if any."""
    if not artifact._has("stats/weight_sq_error"):
        return None
    return relative(artifact.get("stats/weight_sq_error").double(), artifact.get("stats/weight_norm2").double())


def _svd_baselines(artifact: Artifact, rows: list[int], nn2: torch.Tensor, weight_spectra: dict[int, torch.Tensor] | None,
                   st: dict[str, Any], stored: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The report's ``baseline``, per-adapter SVD from the spectra of the originals (the stored
    ones, or ``weight_spectra`` where recomputed): at each pair's stored rank, and at the same
    storage; with the squared errors (rows, modules) of the first."""
    base_same, stored_rank, spectra = _svd_same_rank(artifact, rows, nn2, weight_spectra)
    pairs = nn2 > 0
    mixed_ranks = any(artifact._has(f"resid_ranks/{m['name']}") for m in artifact.modules) or len(
        {m["rank"] for m in artifact.modules}) > 1
    return base_same, {
        "svd_same_rank": {"rank": artifact.meta.get("rank"), "per_pair": mixed_ranks,
                          "mean_rank": float(stored_rank[pairs].mean()) if bool(pairs.any()) else 0.0,
                          **summary(per_adapter(base_same, nn2).tolist())},
        "svd_matched_storage": _svd_matched(artifact, rows, spectra, nn2, st, stored),
    }


def _svd_same_rank(artifact: Artifact, rows: list[int], nn2: torch.Tensor,
                   weight_spectra: dict[int, torch.Tensor] | None):
    """``(squared errors, stored ranks, spectra per module)`` of per-adapter SVD at each (adapter,
    module)'s stored rank ``r_m + k_i``."""
    base_same = torch.zeros_like(nn2)
    stored_rank = torch.zeros_like(nn2)
    spectra = []
    for j, mod in enumerate(artifact.modules):
        key = f"spectra/{mod['name']}"
        sv = weight_spectra[j] if weight_spectra and j in weight_spectra else artifact.get_rows(key, rows).double()
        kr = f"resid_ranks/{mod['name']}"
        ks = artifact.get(kr).long().reshape(-1)[rows] if artifact._has(kr) else torch.zeros(len(rows), dtype=torch.long)
        stored_rank[:, j] = mod["rank"] + ks
        base_same[:, j] = truncation_errors(sv, mod["rank"] + ks) * nn2[:, j]
        spectra.append(sv)
    return base_same, stored_rank, spectra


def _svd_matched(artifact: Artifact, rows: list[int], spectra: list[torch.Tensor], nn2: torch.Tensor,
                 st: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """Per-adapter SVD in the bytes of these adapters' parts: the best of its precisions."""
    names = artifact.names
    # numbers of the compressed parts of these adapters (all of them unless recomputing a subset)
    numbers = int(st["compressed_params"] * len(rows) / max(len(names), 1))
    int8 = artifact.meta.get("storage_dtype") == "int8"
    nbytes = stored["bytes"] * len(rows) / max(len(names), 1)  # the bytes of these adapters' parts
    if any((m.get("residual") or {}).get("bits") or m.get("shared_bits") for m in artifact.modules):
        # low-bit rows or shared parts: their bytes in int8
        numbers = int(nbytes)
    same = svd_matched_storage(spectra, [m["d_in"] + m["d_out"] for m in artifact.modules], nn2, numbers,
                               [int8_rounding(m["d_out"], m["d_in"]) for m in artifact.modules] if int8 else None)
    same["precision"] = artifact.meta.get("storage_dtype")
    same["bytes"] = numbers * _itemsize(artifact.meta.get("storage_dtype"))
    same["scheme"] = f"SVD in {same['precision'] or 'float32'}"
    return best_svd_baseline(spectra, artifact.modules, nn2, nbytes, same)


def _clustering(artifact: Artifact) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """The report's ``clustering`` (with cluster sizes for a shared assignment) and that assignment."""
    clustering = artifact.meta.get("clustering")
    assign = None
    if clustering and clustering.get("n_clusters", 1) > 1:
        clustering = dict(clustering)
        clustering.pop("objective_history", None)
        if not clustering.get("per_module"):
            assign = artifact.get(f"assign/{artifact.modules[0]['name']}").long()
            clustering["sizes"] = torch.bincount(assign, minlength=clustering["n_clusters"]).tolist()
    return clustering, assign


def _adapter_rows(artifact: Artifact, rows: list[int], adapter_err: torch.Tensor, weight_err: torch.Tensor | None,
                  base_same: torch.Tensor, nn2: torch.Tensor, assign: torch.Tensor | None) -> list[dict[str, Any]]:
    adapters = []
    for k, i in enumerate(rows):
        meta = artifact.meta["adapters"][i]
        adapters.append(
            {
                "name": artifact.names[i],
                "error": float(adapter_err[k]),
                **({"weight_error": float(weight_err[i])} if weight_err is not None else {}),
                "svd_same_rank_error": float(per_adapter(base_same[k : k + 1], nn2[k : k + 1])[0]),
                "missing_modules": missing_modules(artifact.modules, meta["ranks"]),
                **({"cluster": int(assign[i])} if assign is not None else {}),
            }
        )
    return adapters


def _module_rows(artifact: Artifact, rel: torch.Tensor, nn2: torch.Tensor) -> list[dict[str, Any]]:
    modules = []
    for j, mod in enumerate(artifact.modules):
        present = nn2[:, j] > 0
        vals = rel[present, j].tolist()
        modules.append({"name": mod["name"], **({"target": mod["target"]} if "target" in mod else {}), "rank": mod["rank"],
                        **({"rank_out": mod["rank_out"]} if "rank_out" in mod else {}),
                        **({"rank_capped": mod["rank_capped"]} if "rank_capped" in mod else {}),
                        **({"residual": mod["residual"]} if "residual" in mod else {}),
                        **{f"{k}_error": v for k, v in summary(vals).items()}})
    return modules
