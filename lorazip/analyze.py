"""Before compressing: how compressible is a collection, and at which rank / number of clusters?

:func:`analyze` reads each module once and measures, from the factors only:

* the spectra (singular values) of every adapter's delta;
* the error of a shared JD-Full basis of rank ``r`` for every ``r`` in ``ranks`` versus each
  adapter's own truncated SVD at the same rank (the best any method can do per adapter).
  The ranks are fitted as a chain: rank ``r'`` starts from rank ``r``'s bases completed with
  data-driven directions, so the weighted objective cannot increase with rank. The solver runs
  with a loose tolerance (``tol=1e-3``, ``max_iters=50``): analysis, not the final artifact;
* the error of ``jd-clustered`` with ``K`` clusters (``lorazip.compress(..., clusters=K)``) for
  every ``K`` in ``clusters`` at every rank of ``cluster_ranks`` (default: ``ranks``);
* with ``target_error``, the configuration (rank, K) of the smallest storage whose mean
  per-adapter error meets it, and the per-adapter SVD rank that would;
* the bytes-vs-error ``frontier`` of three representations, from one set of exact curves per
  module (pass 1 of :mod:`lorazip.compress.curves`): shared parts only (the better of uniform
  JD-Full and per-module JD), per-adapter truncated SVD only (ranks spread greedily over
  adapter x module pairs), and the mix of shared and per-adapter residual parts that
  ``lorazip compress --budget`` chooses.

Errors are relative squared Frobenius errors, energy-weighted over an adapter's modules and
averaged over adapters, exactly as ``lorazip eval`` reports them (see docs/format.md).

:func:`plot_analysis` and :func:`plot_eval` draw figures with matplotlib (optional extra
``lorazip[plot]``, Agg backend, no display needed).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import OptionError, OutputError
from .io.collection import Collection
from .metrics import per_adapter, relative, squared_errors, summary
from .solvers import jd_full, spectra
from .solvers.linalg import WEIGHTINGS, adapter_weights, orth
from .solvers.jd_full import init_bases
from .solvers.svd import truncation_errors

REPORT_VERSION = 1
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_CLUSTERS = (1, 2, 4)
FRONTIER_POINTS = 12  # log-spaced budgets from 1% to 100% of the originals' numbers
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj`` (what the spectra panel groups by)."""
    return name.rsplit(".", 1)[-1]


def _check_list(values, what: str, low: int = 1) -> list[int]:
    try:
        out = sorted({int(v) for v in values})
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be whole numbers, got {values!r}") from None
    if not out or any(isinstance(v, bool) for v in values) or out[0] < low:
        raise OptionError(f"{what} must be positive whole numbers, got {list(values)!r}")
    return out


def _stats_rows(values: torch.Tensor) -> dict[str, list[float]]:
    """median / min / max over rows of (n, w) -> lists of length w."""
    if values.shape[0] == 0:
        return {"median": [], "min": [], "max": []}
    return {
        "median": values.median(0).values.tolist(),
        "min": values.min(0).values.tolist(),
        "max": values.max(0).values.tolist(),
    }


def _mean_present(rel: torch.Tensor, present: torch.Tensor) -> float:
    return float(rel[present].mean()) if bool(present.any()) else 0.0


def _shared_chain(B, A, norms2, ranks, weighting, max_iters, tol, seed, cdtype):
    """Absolute squared errors (n, len(ranks)) of shared JD-Full bases at each rank (a warm chain)."""
    n = B.shape[0]
    d_out, d_in = B.shape[1], A.shape[2]
    w = adapter_weights(norms2, weighting)
    out = torch.zeros(n, len(ranks), dtype=torch.float64)
    if float((w * norms2).sum()) <= 0:
        return out, [0] * len(ranks)
    Bc, Ac, wc = B.to(cdtype), A.to(cdtype), w.to(cdtype)
    gen = torch.Generator().manual_seed(seed)
    U = V = None
    iters = []
    prev_r = 0
    for c, r in enumerate(ranks):
        rr = min(r, d_out, d_in)
        if rr == prev_r:
            out[:, c] = out[:, c - 1]
            iters.append(0)
            continue
        warm = {}
        if U is not None:  # keep the previous span and add data-driven directions: the objective can only grow
            Ui, Vi = init_bases(Bc, Ac, wc, rr, gen)
            warm = {"U0": orth(torch.cat([U.to(cdtype), Ui], 1))[:, :rr],
                    "V0": orth(torch.cat([V.to(cdtype), Vi], 1))[:, :rr]}
        res = jd_full(Bc, Ac, rr, weights=wc, max_iters=max_iters, tol=tol, seed=seed, **warm)
        U, V = orth(res.U.double()), orth(res.V.double())
        S = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)
        out[:, c] = squared_errors(B, A, U, V, S)[0]
        iters.append(res.n_iters)
        prev_r = rr
    return out, iters


def _frontier_fit(collection, name, B, A, max_rank, weighting, seed, tol, max_iters):
    """Pass 1 of ``compress --budget`` on one module: exact shared and residual curves. Only the
    curves are kept (the bases are not needed to predict errors)."""
    from .compress.curves import fit_module

    R = min(max_rank, min(collection.shared_ranks(name, max_rank)))
    fit = fit_module(B, A, name, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters)
    fit.U, fit.V, fit.XY = fit.U.new_zeros(fit.d_out, 0), fit.V.new_zeros(fit.d_in, 0), {}  # frees the bases
    return fit


def _frontier(fits, orig_params: int, nbytes: int, points: int = FRONTIER_POINTS) -> list[dict[str, Any]]:
    """Mean error against stored numbers (and bytes) of the mix, shared parts only and per-adapter
    SVD only, at ``points`` log-spaced budgets from 1% to 100% of the originals' numbers, and of the
    mix with bits (``bits``: every residual component at its own 1-8 bits, shared parts in int8, in
    the same bytes; predicted from the measured quantisation errors).

    Every point comes from the same pass-1 curves (:func:`~lorazip.compress.allocate.allocate_mixed`
    at that budget). A line is the lower envelope: what fits a budget fits every larger one, so
    each value is the best at that budget or any smaller one. A representation that fits no
    budget up to a point is ``None`` there."""
    from .compress.allocate import StepCurves, allocate_mixed

    if not fits or orig_params <= 0:
        return []
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    budgets = sorted({max(int(round(v)), 1) for v in np.geomspace(0.01, 1.0, points) * orig_params})
    bits = StepCurves(fits, E, bits=True) if all(f.quant is not None for f in fits) else None
    rows: list[dict[str, Any]] = []
    best = {"mix": None, "shared_only": None, "per_adapter": None, "bits": None}
    for numbers in budgets:
        try:
            alloc = allocate_mixed(fits, E, numbers=numbers, stat="mean")
        except OptionError:  # too small for any part
            continue
        alt = alloc.alternatives
        shared = [alt[k] for k in ("uniform JD-Full", "per-module JD") if k in alt]
        # .predicted is the chosen candidate, of near-ties the one of fewest numbers: take the lowest
        got = {"mix": float(min(alloc.predicted, *alt.values())),
               "shared_only": float(min(shared)) if shared else None,
               "per_adapter": float(alt["per-adapter SVD"]) if "per-adapter SVD" in alt else None,
               "bits": None}
        if bits is not None:  # the same bytes with every residual component at its own 1-8 bits (predicted)
            try:
                got["bits"] = float(allocate_mixed(fits, E, numbers=numbers * nbytes, stat="mean",
                                                   curves=bits).predicted)
            except OptionError:
                pass
        for k, v in got.items():
            if v is not None and (best[k] is None or v < best[k]):
                best[k] = v
        rows.append({"numbers": numbers, "bytes": numbers * nbytes, **best})
    return rows


def analyze(
    collection: Collection,
    ranks: Sequence[int] = DEFAULT_RANKS,
    clusters: Sequence[int] = DEFAULT_CLUSTERS,
    *,
    target_error: float | None = None,
    cluster_ranks: Sequence[int] | None = None,
    weighting: str = "relative",
    max_iters: int = 50,
    tol: float = 1e-3,
    max_rounds: int = 10,
    seed: int = 0,
    compute_dtype: str = "float32",
    frontier: bool = True,
    frontier_max_rank: int = 64,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Compressibility report of ``collection`` (a plain dict, ``report_version`` 1).

    Parameters
    ----------
    ranks : shared ranks to try (a module's rank is capped at ``min(d_out, d_in)``).
    clusters : numbers of clusters K to try with ``jd-clustered`` (K = 1 is the shared curve;
        K larger than the number of adapters is skipped).
    cluster_ranks : ranks at which K is varied (default ``ranks``; ranks above what a module
        allows are skipped).
    target_error : pick the (rank, K) of least storage whose mean per-adapter error is at most this.
    weighting, seed, compute_dtype : as for :func:`lorazip.compress`.
    max_iters, tol, max_rounds : solver settings (loose by default: this is an estimate).
    frontier : also compute the bytes-vs-error frontier (shared only, per-adapter SVD only, the
        mix of ``compress --budget``); ``frontier_max_rank``: its largest shared rank per module
        (``--max-rank`` of ``compress``).
    progress : ``progress(done, total, item)`` after each module and each clustered run.

    Returns
    -------
    dict with ``ranks``, ``clusters``, ``rank_curve`` (per rank: shared and per-adapter SVD
    error statistics, numbers stored), ``cluster_curve`` (per rank and K), ``modules`` (per
    module: spectra median/min/max across adapters, mean error per rank shared and SVD),
    ``module_types`` (the same grouped by module type, spectra normalised to unit norm),
    ``pick`` and ``pick_svd`` (with ``target_error``), ``frontier`` (rows ``{numbers, bytes, mix,
    shared_only, per_adapter}``, or ``None`` without ``frontier``), sizes and timing.
    """
    t0 = time.perf_counter()
    s = _settings(ranks, clusters, cluster_ranks, target_error, weighting, max_iters, tol, max_rounds, seed,
                  compute_dtype, frontier, frontier_max_rank)
    n = len(collection)
    steps = len(collection.modules) + sum(1 for r in s.cluster_ranks for K in s.clusters if 1 < K <= n)
    sweep = _sweep_modules(collection, s, progress, steps)
    nbytes = _BYTES.get(collection.storage_dtype(), 4)
    rank_curve = _rank_curve(collection, s, sweep, nbytes)
    cluster_curve = _cluster_curve(collection, s, rank_curve, nbytes, progress, steps)
    return _report(collection, s, sweep, rank_curve, cluster_curve, nbytes, t0)


@dataclass(frozen=True)
class _Settings:
    """The checked options of :func:`analyze`."""

    ranks: list[int]
    clusters: list[int]
    cluster_ranks: list[int]
    target_error: float | None
    weighting: str
    max_iters: int
    tol: float
    max_rounds: int
    seed: int
    compute_dtype: str
    frontier_max_rank: int | None  # None: no frontier

    def solver(self) -> dict[str, Any]:
        """The report's ``solver`` entry."""
        return {"max_iters": self.max_iters, "tol": self.tol, "max_rounds": self.max_rounds, "seed": self.seed,
                "compute_dtype": self.compute_dtype,
                **({"frontier_max_rank": self.frontier_max_rank} if self.frontier_max_rank is not None else {})}


def _settings(ranks, clusters, cluster_ranks, target_error, weighting, max_iters, tol, max_rounds, seed,
              compute_dtype, frontier, frontier_max_rank) -> _Settings:
    """:func:`analyze`'s options, checked (OptionError)."""
    ranks = _check_list(ranks, "ranks")
    clusters = _check_list(clusters, "clusters")
    cranks = ranks if cluster_ranks is None else _check_list(cluster_ranks, "cluster ranks")
    if weighting not in WEIGHTINGS:
        raise OptionError(f"unknown weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
    if compute_dtype not in ("float32", "float64"):
        raise OptionError(f"unknown compute dtype {compute_dtype!r}; choose float64 or float32")
    if target_error is not None and not 0 <= target_error <= 1:
        raise OptionError(f"--target-error must be between 0 and 1, got {target_error}")
    if max_iters < 1 or not tol > 0:
        raise OptionError("max_iters must be >= 1 and tol > 0")
    if frontier and (isinstance(frontier_max_rank, bool) or not isinstance(frontier_max_rank, Integral)
                     or frontier_max_rank < 1):
        raise OptionError(f"the frontier's max rank must be a positive whole number, got {frontier_max_rank!r}")
    return _Settings(ranks, clusters, cranks, target_error, weighting, max_iters, tol, max_rounds, seed, compute_dtype,
                     int(frontier_max_rank) if frontier else None)


@dataclass
class _Sweep:
    """What one pass over the modules measured: squared errors (n, M, len(ranks)) of the shared
    chain and of per-adapter SVD, squared norms (n, M), the report's module rows, the unit spectra
    by module type, the originals' numbers and the frontier's pass-1 curves (one per module)."""

    sq_shared: torch.Tensor
    sq_svd: torch.Tensor
    norms: torch.Tensor
    mod_rows: list[dict[str, Any]] = field(default_factory=list)
    by_type: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    orig_params: int = 0
    fits: list = field(default_factory=list)


def _sweep_modules(collection: Collection, s: _Settings, progress, steps: int) -> _Sweep:
    """Read each module once: its spectra, the shared chain over the ranks, per-adapter SVD at
    each rank and (with a frontier) its pass-1 curves; progress after each module."""
    n, n_mod = len(collection), len(collection.modules)
    sq_shared = torch.zeros(n, n_mod, len(s.ranks), dtype=torch.float64)
    sweep = _Sweep(sq_shared, torch.zeros_like(sq_shared), torch.zeros(n, n_mod, dtype=torch.float64))
    cdtype = torch.float32 if s.compute_dtype == "float32" else torch.float64
    for j, info in enumerate(collection.modules):
        fac = collection.module_factors(info.name, dtype=torch.float64)
        B, A = fac.B, fac.A
        norms2 = fac.norms2()
        sweep.norms[:, j] = norms2
        sweep.orig_params += int(fac.ranks.sum()) * (info.d_in + info.d_out)
        sv = spectra(B, A)
        chain, iters = _shared_chain(B, A, norms2, s.ranks, s.weighting, s.max_iters, s.tol, s.seed, cdtype)
        sweep.sq_shared[:, j] = chain
        for c, r in enumerate(s.ranks):
            sweep.sq_svd[:, j, c] = truncation_errors(sv, min(r, info.d_out, info.d_in)) * norms2
        if s.frontier_max_rank is not None:
            sweep.fits.append(_frontier_fit(collection, info.name, B, A, s.frontier_max_rank, s.weighting, s.seed,
                                            s.tol, s.max_iters))
        sweep.mod_rows.append(_module_row(info, j, s.ranks, sv, norms2, chain, iters, sweep))
        if progress:
            progress(j + 1, steps, info.name)
    return sweep


def _module_row(info, j: int, ranks: list[int], sv: torch.Tensor, norms2: torch.Tensor, chain: torch.Tensor,
                iters: list[int], sweep: _Sweep) -> dict[str, Any]:
    """The report's row of module ``j``; its adapters' unit spectra join ``sweep.by_type``."""
    present = norms2 > 0
    svp = sv[present].float()
    unit = svp / torch.linalg.norm(svp, dim=1, keepdim=True).clamp_min(1e-30)
    sweep.by_type.setdefault(module_type(info.name), []).append(unit)
    return {
        "name": info.name,
        "type": module_type(info.name),
        "d_out": info.d_out,
        "d_in": info.d_in,
        "n_adapters": int(present.sum()),
        "ranks": [min(r, info.d_out, info.d_in) for r in ranks],
        "spectra": _stats_rows(svp),
        "shared": [_mean_present(relative(chain[:, c], norms2), present) for c in range(len(ranks))],
        "svd": [_mean_present(relative(sweep.sq_svd[:, j, c], norms2), present) for c in range(len(ranks))],
        "sweeps": iters,
    }


def _dims(collection: Collection) -> list[tuple[int, int]]:
    """Per module ``(d_in + d_out, min(d_in, d_out))``: numbers per rank of a basis pair, rank cap."""
    return [(m.d_in + m.d_out, min(m.d_in, m.d_out)) for m in collection.modules]


def _params(collection: Collection, r: int, K: int) -> int:
    """Numbers stored by shared bases of rank ``r`` in ``K`` clusters and every adapter's core."""
    n = len(collection)
    return sum(K * min(r, cap) * d + n * min(r, cap) ** 2 for d, cap in _dims(collection))


def _svd_params(collection: Collection, r: int) -> int:
    """Numbers stored by every adapter's own truncated SVD at rank ``r``: in each module it adapts,
    ``min(r, r_i) (d_in + d_out)`` (its delta has rank at most its own ``r_i``; a rank above that
    stores nothing more), so never more than the adapters' own factors."""
    dims = {m.name: m.d_in + m.d_out for m in collection.modules}
    return sum(min(r, spec.rank) * dims[name] for a in collection.adapters for name, spec in a.modules.items())


def _rank_curve(collection: Collection, s: _Settings, sweep: _Sweep, nbytes: int) -> list[dict[str, Any]]:
    """Per rank: shared and per-adapter SVD error statistics and what each stores."""
    rank_curve = []
    for c, r in enumerate(s.ranks):
        sh = per_adapter(sweep.sq_shared[:, :, c], sweep.norms)
        sd = per_adapter(sweep.sq_svd[:, :, c], sweep.norms)
        p = _params(collection, r, 1)
        rank_curve.append({
            "rank": r,
            "shared": summary(sh.tolist()),
            "svd": summary(sd.tolist()),
            "kept_shared": 1 - float(sh.mean()),
            "kept_svd": 1 - float(sd.mean()),
            "params": p,
            "bytes": p * nbytes,
            "ratio_params": sweep.orig_params / p if p else 0.0,
            "svd_params": _svd_params(collection, r),
        })
    return rank_curve


def _cluster_curve(collection: Collection, s: _Settings, rank_curve: list[dict[str, Any]], nbytes: int,
                   progress, steps: int) -> list[dict[str, Any]]:
    """Per cluster rank and K: the error statistics of ``jd-clustered`` (K = 1: the shared curve);
    progress after each clustered run."""
    n = len(collection)
    cluster_curve = []
    dims = _dims(collection)
    max_cluster_rank = min(cap for _, cap in dims) if dims else 0
    done = len(collection.modules)
    for r in s.cluster_ranks:
        for K in s.clusters:
            if K > n:
                continue
            if K == 1:
                if r in s.ranks:
                    cluster_curve.append(_unclustered_row(rank_curve[s.ranks.index(r)]))
                continue
            if r > max_cluster_rank:
                continue
            err = _clustered_errors(collection, s, r, K)
            p = _params(collection, r, K)
            cluster_curve.append({"rank": r, "K": K, **{k: v for k, v in summary(err.tolist()).items() if k != "min"},
                                  "params": p, "bytes": p * nbytes})
            done += 1
            if progress:
                progress(done, steps, f"rank {r}, K={K}")
    return cluster_curve


def _unclustered_row(row: dict[str, Any]) -> dict[str, Any]:
    """A rank curve row as the cluster curve's K = 1 row."""
    return {"rank": row["rank"], "K": 1, **{k: row["shared"][k] for k in ("mean", "median", "max")},
            "params": row["params"], "bytes": row["bytes"]}


def _clustered_errors(collection: Collection, s: _Settings, r: int, K: int) -> torch.Tensor:
    """Per-adapter errors of ``jd-clustered`` at rank ``r`` with ``K`` clusters."""
    from .compress.modules import compress_modules
    from .compress.options import CompressOptions

    art = compress_modules(collection, CompressOptions(
        rank=r, method="jd-clustered", clusters=K, weighting=s.weighting, seed=s.seed, max_iters=s.max_iters,
        tol=s.tol, max_rounds=s.max_rounds, compute_dtype=s.compute_dtype, device="cpu", hash_sources=False,
        keep_extras=False))
    sq, nn = art.stats()
    return per_adapter(sq.double(), nn.double())


def _picks(target_error: float | None, rank_curve: list[dict[str, Any]], cluster_curve: list[dict[str, Any]],
           orig_params: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """With a target: the (rank, K) of least storage whose mean error meets it, and the least
    per-adapter SVD rank that does (None where none does, or without a target)."""
    pick = pick_svd = None
    if target_error is None:
        return pick, pick_svd
    have = {(row["rank"], row["K"]) for row in cluster_curve}
    rows = cluster_curve + [_unclustered_row(row) for row in rank_curve if (row["rank"], 1) not in have]
    ok = [row for row in rows if row["mean"] <= target_error]
    if ok:
        best = min(ok, key=lambda row: (row["params"], row["mean"], row["K"]))
        pick = {**best, "ratio_params": orig_params / best["params"] if best["params"] else 0.0,
                "larger_than_originals": best["params"] > orig_params}
    svd_ok = [row for row in rank_curve if row["svd"]["mean"] <= target_error]
    if svd_ok:
        row = min(svd_ok, key=lambda row: row["rank"])
        pick_svd = {"rank": row["rank"], "mean": row["svd"]["mean"], "params": row["svd_params"]}
    return pick, pick_svd


def _module_types(sweep: _Sweep, ranks: list[int]) -> dict[str, dict[str, Any]]:
    """The module rows grouped by module type, spectra normalised to unit norm."""
    types = {}
    for t, units in sweep.by_type.items():
        width = max(u.shape[1] for u in units)
        stack = torch.cat([torch.nn.functional.pad(u, (0, width - u.shape[1])) for u in units])
        members = [row for row in sweep.mod_rows if row["type"] == t]
        types[t] = {
            "n_modules": len(members),
            "spectra": _stats_rows(stack),
            "shared": [statistics.fmean(row["shared"][c] for row in members) for c in range(len(ranks))],
            "svd": [statistics.fmean(row["svd"][c] for row in members) for c in range(len(ranks))],
        }
    return types


def _report(collection: Collection, s: _Settings, sweep: _Sweep, rank_curve: list[dict[str, Any]],
            cluster_curve: list[dict[str, Any]], nbytes: int, t0: float) -> dict[str, Any]:
    pick, pick_svd = _picks(s.target_error, rank_curve, cluster_curve, sweep.orig_params)
    types = _module_types(sweep, s.ranks)
    return {
        "report_version": REPORT_VERSION,
        "base_model": collection.base_model,
        "n_adapters": len(collection),
        "n_modules": len(collection.modules),
        "weighting": s.weighting,
        "storage_dtype": collection.storage_dtype(),
        "original_params": sweep.orig_params,
        "ranks": s.ranks,
        "clusters": s.clusters,
        "cluster_ranks": s.cluster_ranks,
        "solver": s.solver(),
        "rank_curve": rank_curve,
        "cluster_curve": cluster_curve,
        "target_error": s.target_error,
        "pick": pick,
        "pick_svd": pick_svd,
        "frontier": _frontier(sweep.fits, sweep.orig_params, nbytes) if s.frontier_max_rank is not None else None,
        "module_types": types,
        "modules": sweep.mod_rows,
        "timing_s": time.perf_counter() - t0,
    }


# -- figures -------------------------------------------------------------------------------

def _figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'lorazip[plot]'") from None
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, no pyplot state
    return fig


def _int_locator():
    try:
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'lorazip[plot]'") from None

    return MaxNLocator(integer=True)


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure as PNG atomically (temp file + rename)."""
    from .artifact import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        try:
            fig.savefig(tmp, format="png", dpi=110)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def plot_analysis(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Three panels: spectra per module type (median and range across adapters), error versus
    rank (shared basis versus per-adapter SVD), error versus K (one line per rank); a fourth,
    the bytes-vs-error frontier (log-log), when the report has one."""
    front = report.get("frontier") or []
    fig = _figure(4 if front else 3)
    ax1, ax2, ax3, *ax4 = fig.subplots(1, 4 if front else 3)
    for t, info in sorted(report["module_types"].items()):
        sp = info["spectra"]
        if not sp["median"]:
            continue
        x = range(1, len(sp["median"]) + 1)
        line = ax1.plot(x, sp["median"], marker=".", label=f"{t} ({info['n_modules']})")[0]
        ax1.fill_between(x, [max(v, 1e-12) for v in sp["min"]], sp["max"], color=line.get_color(), alpha=0.2)
    ax1.set_yscale("log")
    ax1.xaxis.set_major_locator(_int_locator())
    ax1.set_xlabel("singular value index")
    ax1.set_ylabel("sigma_k / ||sigma|| (median, range)")
    ax1.set_title("spectra per module type")
    if report["module_types"]:
        ax1.legend(fontsize="small")

    ranks = [row["rank"] for row in report["rank_curve"]]
    ax2.plot(ranks, [row["shared"]["mean"] for row in report["rank_curve"]], marker="o", label="shared basis (mean)")
    ax2.plot(ranks, [row["shared"]["max"] for row in report["rank_curve"]], ls=":", color="C0",
             label="shared basis (max)")
    ax2.plot(ranks, [row["svd"]["mean"] for row in report["rank_curve"]], marker="s", label="per-adapter SVD (mean)")
    if report.get("target_error") is not None:
        ax2.axhline(report["target_error"], color="grey", ls="--", label="target")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("rank")
    ax2.set_ylabel("relative squared error")
    ax2.set_ylim(bottom=0)
    ax2.set_title("error vs rank")
    ax2.legend(fontsize="small")

    by_rank: dict[int, list[tuple[int, float]]] = {}
    for row in report["cluster_curve"]:
        by_rank.setdefault(row["rank"], []).append((row["K"], row["mean"]))
    for r, pts in sorted(by_rank.items()):
        pts.sort()
        ax3.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"rank {r}")
    if report.get("pick"):
        ax3.plot([report["pick"]["K"]], [report["pick"]["mean"]], marker="*", ms=14, color="k", ls="",
                 label=f"pick: rank {report['pick']['rank']}, K={report['pick']['K']}")
    ks = sorted({row["K"] for row in report["cluster_curve"]})
    if ks:
        ax3.set_xticks(ks)
    ax3.set_xlabel("clusters K")
    ax3.set_ylabel("mean relative squared error")
    ax3.set_ylim(bottom=0)
    ax3.set_title("error vs K (jd-clustered)")
    if by_rank:
        ax3.legend(fontsize="small")
    if front:
        _plot_frontier(ax4[0], front)
    fig.suptitle(f"lorazip analyze: {report['n_adapters']} adapters, {report['n_modules']} modules")
    return _save(fig, path)


def _plot_frontier(ax, rows: list[dict[str, Any]]) -> None:
    """Mean error against bytes, log-log, one line per representation (an error below 1e-9, exact
    up to rounding, is not drawn: it would only stretch the log axis)."""
    for key, label, style in (("shared_only", "shared only (JD-Full)", {"marker": "o"}),
                              ("per_adapter", "per-adapter SVD only", {"marker": "s"}),
                              ("mix", "mix at the adapters' precision", {"marker": "*", "ms": 9, "color": "k"}),
                              ("bits", "mix with 1-8 bits (compress --budget)", {"marker": "^", "color": "C3"})):
        pts = [(row["bytes"], row[key]) for row in rows if row.get(key) is not None and row[key] > 1e-9]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes stored (bases, cores, residual parts)")
    ax.set_ylabel("mean relative squared error")
    ax.set_title("bytes vs error frontier")
    ax.legend(fontsize="small")


def error_matrix(artifact, sources=None, *, allow_pickle: bool = False):
    """``(adapter names, module names, relative errors (n, M), per-adapter errors (n,), present (n, M))``,
    recorded at compression, or recomputed against ``sources``."""
    if sources is None:
        rows = list(range(len(artifact.names)))
        sq, nn = artifact.stats()
    else:
        from .evaluate import recompute_errors

        rows, sq, nn = recompute_errors(artifact, sources, allow_pickle, True)
    sq, nn = sq.double(), nn.double()
    names = [artifact.names[i] for i in rows]
    return names, [m["name"] for m in artifact.modules], relative(sq, nn), per_adapter(sq, nn), nn > 0


def plot_eval(artifact, path: str | os.PathLike, sources=None, *, allow_pickle: bool = False) -> Path:
    """Distribution of errors: histogram over adapters, heat map adapters x modules, box plot per
    module type."""
    names, modules, rel, err, present = error_matrix(artifact, sources, allow_pickle=allow_pickle)
    fig = _figure(3)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    vals = err.tolist()
    ax1.hist(vals, bins=min(40, max(5, len(vals))), color="C0")
    if vals:
        ax1.axvline(statistics.fmean(vals), color="k", ls="--", label=f"mean {statistics.fmean(vals):.3f}")
        ax1.legend(fontsize="small")
    ax1.set_xlabel("relative squared error (per adapter)")
    ax1.set_ylabel("adapters")
    ax1.set_title("errors across adapters")

    shown = torch.where(present, rel, torch.full_like(rel, float("nan"))).float().numpy()
    im = ax2.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax2, label="relative squared error")
    ax2.xaxis.set_major_locator(_int_locator())
    ax2.yaxis.set_major_locator(_int_locator())
    ax2.set_xlabel(f"modules ({len(modules)}, in artifact order)")
    ax2.set_ylabel(f"adapters ({len(names)})")
    if len(names) <= 40:
        ax2.set_yticks(range(len(names)), names, fontsize="x-small")
    ax2.set_title("adapters x modules")

    groups: dict[str, list[float]] = {}
    for j, m in enumerate(modules):
        groups.setdefault(module_type(m), []).extend(rel[present[:, j], j].tolist())
    labels = sorted(groups)
    ax3.boxplot([groups[t] or [0.0] for t in labels])
    ax3.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize="small")
    ax3.set_ylabel("relative squared error (adapter, module)")
    ax3.set_title("per module type")
    fig.suptitle(f"lorazip eval: {artifact.path or 'artifact'}")
    return _save(fig, path)


__all__ = ["analyze", "plot_analysis", "plot_eval", "error_matrix", "module_type",
           "DEFAULT_RANKS", "DEFAULT_CLUSTERS"]
