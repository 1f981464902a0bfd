"""Ranks from a storage budget or an error target, per module or uniform.

Users think in bytes or in acceptable error, not in ranks. For every module lorazip first
measures the error curve ``e_im(r)`` of every adapter for ``r = 1..max_rank``: one JD-Full
at ``max_rank``, then nested JD-Full fits *inside* that subspace on the ``max_rank x max_rank``
cores (cheap, no re-reading). The curve of a module is its contribution to the mean
per-adapter error, ``c_m(r) = (1/n) sum_i e_im(r) / E_i`` with ``E_i = sum_m ||M_im||^2``, so
that ``sum_m c_m(r_m)`` is the collection's mean error for ranks ``r_m``.

Allocation is greedy on marginal gain per byte: starting from rank 1 everywhere, repeatedly
raise the module whose next rank buys the largest error decrease per byte (a rank step costs
``(d_in + d_out + n (2r + 1))`` numbers: one more basis column pair and a larger core), until
the budget is spent or the target met. ``uniform=True`` instead picks one rank for every
module. The final artifact is then compressed at the chosen ranks, and its exact size and
error are what the report shows (a budget is respected on the real file size: if the header
or rounding makes the artifact larger, the least valuable rank steps are taken back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..artifact import STORAGE_DTYPES, Artifact
from ..errors import OptionError
from ..io.collection import Collection
from ..solvers import Factors
from ..solvers.linalg import adapter_weights, factor_norms2
from ..solvers.jd_full import jd_full_factors
from .executor import map_modules
from .streaming import MemoryPlan, streamed_factors


@dataclass
class RankCurves:
    """``errors[m]``: (n, max_rank_m) absolute squared error of each adapter at ranks 1..max_rank_m;
    ``norms2``: (n, M) ``||M_im||^2``; ``dims[m] = d_in + d_out``."""

    modules: list[str]
    errors: list[torch.Tensor]
    norms2: torch.Tensor
    dims: list[int]

    def contribution(self) -> list[torch.Tensor]:
        """``c_m(r)`` for r = 0..max_rank_m (index 0: rank 0, error = the module's energy)."""
        E = self.norms2.sum(1).clamp_min(1e-300)  # per-adapter energy over modules
        n = self.norms2.shape[0]
        out = []
        for j, e in enumerate(self.errors):
            full = torch.cat([self.norms2[:, j : j + 1], e], 1)  # rank 0 keeps nothing
            out.append((full / E[:, None]).sum(0) / n)
        return out


def rank_curves(
    collection: Collection,
    max_rank: int,
    *,
    weighting: str = "relative",
    seed: int = 0,
    tol: float = 1e-4,
    max_iters: int = 500,
    memory_limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    executor=None,
) -> RankCurves:
    """Error of every adapter at every rank 1..max_rank, for every module (one pass over modules).

    ``memory_limit`` (bytes) streams modules larger than a third of it, as in :func:`lorazip.compress`;
    ``executor`` (a :class:`~lorazip.compress.executor.RayExecutor`) runs one Ray task per module.
    """
    plan = MemoryPlan.make(collection, 4, memory_limit, "jd-full")
    names = [m.name for m in collection.modules]
    args = [(j, max_rank, weighting, seed, tol, max_iters, plan.chunk.get(j)) for j in range(len(names))]
    got: list = [None] * len(names)
    for count, (j, curve) in enumerate(map_modules(executor, module_curve_task, collection, args, labels=names,
                                                    memory=memory_limit, phase="curves"), 1):
        got[j] = curve
        if progress:
            progress(count, len(names), names[j])
    errors, norms = [e for e, _ in got], [n2 for _, n2 in got]
    return RankCurves(names, errors, torch.stack(norms, 1), [m.d_in + m.d_out for m in collection.modules])


def module_curve_task(collection: Collection, j: int, max_rank: int, weighting: str, seed: int, tol: float,
                      max_iters: int, chunk: int | None, *, clock: dict[str, float]):
    """Module ``j``'s error curve: ``(errors (n, r_cap) at ranks 1..r_cap, norms2 (n,))``, its factors
    read here (streamed ``chunk`` adapters at a time if set); in process or as a Ray task."""
    info = collection.modules[j]
    t0 = time.perf_counter()
    if chunk is not None:
        fac = streamed_factors(collection, info.name, chunk, torch.float32)
    else:
        f = collection.module_factors(info.name, dtype=torch.float32)
        fac = Factors.stacked(f.B, f.A)
    t1 = time.perf_counter()
    r_cap = min(collection.shared_ranks(info.name, max_rank))  # square cores: the smaller side
    n2 = torch.cat([factor_norms2(ch.B, ch.A).clamp_min(0) for ch in fac]).double()
    w = adapter_weights(n2, weighting)
    top = jd_full_factors(fac, r_cap, weights=w, seed=seed, tol=tol, max_iters=max_iters)
    # Cores in float64; the nested fits see M_i through its projection S_i = U^T M_i V.
    U, V = top.U.double(), top.V.double()
    S = torch.cat([(ch.B.double().transpose(1, 2) @ U).transpose(1, 2) @ (ch.A.double() @ V)
                   for ch in fac.split(256)])
    outside = (n2 - S.square().sum((1, 2))).clamp_min(0)  # energy outside span(U) x span(V)
    e = torch.empty(len(n2), r_cap, dtype=torch.float64)
    # Warm starts: the HOSVD order of the cores (eigenvectors of sum w S S^T and sum w S^T S)
    # puts each nested fit next to its optimum, so a few sweeps suffice.
    ww = w.double()[:, None, None]
    W = torch.linalg.eigh((ww * S @ S.transpose(1, 2)).sum(0))[1].flip(1)
    Z = torch.linalg.eigh((ww * S.transpose(1, 2) @ S).sum(0))[1].flip(1)
    for r in range(1, r_cap + 1):
        kept = S.square().sum((1, 2)) if r == r_cap else \
            nested_kept(S, w.double(), W[:, :r], Z[:, :r], tol=tol, max_iters=max_iters)
        e[:, r - 1] = outside + (S.square().sum((1, 2)) - kept).clamp_min(0)
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return e, n2


def nested_kept(S: torch.Tensor, w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, *, tol: float = 1e-4,
                max_iters: int = 500) -> torch.Tensor:
    """Energy ``||X^T S_i Y||^2`` each adapter keeps at rank ``r`` of the small cores ``S``
    (n, R, R), with ``X, Y`` (R x r) maximising ``sum_i w_i ||X^T S_i Y||^2``.

    Exact alternating eigen-steps (HOOI) on the explicit ``R x R`` operators, from the warm start
    ``X, Y``: each step maximises over one side, so the objective never decreases. Stops when a
    sweep gains less than ``tol`` times the larger of the kept and the lost weighted energy.
    """
    X, Y = _nested_xy(S, w, X, Y, tol=tol, max_iters=max_iters)
    return (X.T @ S @ Y).square().sum((1, 2))


def nested_fit(S: torch.Tensor, w: torch.Tensor, R: int, *, tol: float = 1e-4, max_iters: int = 500,
               refine: set[int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Nested bases inside a rank-``R`` fit: ``{r: (X_r, Y_r)}`` for r = 0..R, (R, r) orthonormal,
    maximising ``sum_i w_i ||X^T S_i Y||^2`` for the cores ``S`` (n, R, R) (alternating exact
    eigen-steps from the HOSVD order, as :func:`nested_kept`). With ``refine``, only those ranks
    are refined; the others keep the HOSVD truncation (a valid basis, its error exact, slightly
    above the refined one)."""
    eye = torch.eye(R, dtype=S.dtype)
    out = {0: (eye[:, :0], eye[:, :0])}
    if R == 0:
        return out
    ww = w.double()[:, None, None]
    W = torch.linalg.eigh((ww * S @ S.transpose(1, 2)).sum(0))[1].flip(1)
    Z = torch.linalg.eigh((ww * S.transpose(1, 2) @ S).sum(0))[1].flip(1)
    for r in range(1, R):
        if refine is None or r in refine:
            out[r] = _nested_xy(S, w.double(), W[:, :r], Z[:, :r], tol=tol, max_iters=max_iters)
        else:
            out[r] = (W[:, :r], Z[:, :r])
    out[R] = (eye, eye)
    return out


def _nested_xy(S, w, X, Y, *, tol, max_iters):
    r = X.shape[1]
    total = float((w * S.square().sum((1, 2))).sum())
    prev = -1.0
    for _ in range(max_iters):
        SY = S @ Y
        X = torch.linalg.eigh(torch.einsum("n,nik,njk->ij", w, SY, SY))[1][:, -r:]
        SX = S.transpose(1, 2) @ X
        evals, vecs = torch.linalg.eigh(torch.einsum("n,nik,njk->ij", w, SX, SX))
        Y, kept = vecs[:, -r:], float(evals[-r:].sum())
        if kept - prev <= tol * max(kept, total - kept, 1e-300):
            break
        prev = kept
    return X, Y


def _step_cost(dim: int, n: int, r: int, diag: bool) -> int:
    """Numbers added by raising a module from rank r to r + 1."""
    return dim + n * (1 if diag else 2 * r + 1)


def allocate(
    curves: RankCurves,
    n: int,
    *,
    budget_numbers: int | None = None,
    target_error: float | None = None,
    uniform: bool = False,
    diag: bool = False,
) -> dict[str, int]:
    """Ranks per module meeting ``target_error`` (mean) with the fewest numbers, or the lowest
    mean error within ``budget_numbers``. Returns ``{module: rank}``."""
    c = curves.contribution()
    caps = [len(x) - 1 for x in c]
    if uniform:
        return dict(zip(curves.modules, _uniform(c, caps, curves.dims, n, budget_numbers, target_error, diag)))
    greedy = _greedy(c, caps, curves.dims, n, budget_numbers, target_error, diag)
    # Greedy on gain per byte is not optimal for every curve shape: never return worse than
    # the best uniform allocation under the same constraint.
    try:
        uni = _uniform(c, caps, curves.dims, n, budget_numbers, target_error, diag)
    except OptionError:
        uni = None
    if uni is not None:
        def score(ranks):
            err = sum(float(x[r]) for x, r in zip(c, ranks))
            size = sum(_numbers(d, n, r, diag) for d, r in zip(curves.dims, ranks))
            if target_error is not None:  # fewest numbers among those meeting the target
                return (err > target_error, size if err <= target_error else err)
            return (err, size)
        if score(uni) < score(greedy):
            greedy = uni
    return dict(zip(curves.modules, greedy))


def _uniform(c, caps, dims, n, budget_numbers, target_error, diag) -> list[int]:
    best = None
    for r in range(1, max(caps) + 1):
        ranks = [min(r, cap) for cap in caps]
        size = sum(_numbers(d, n, rr, diag) for d, rr in zip(dims, ranks))
        err = sum(float(x[rr]) for x, rr in zip(c, ranks))
        if budget_numbers is not None and size > budget_numbers:
            break
        best = ranks
        if target_error is not None and err <= target_error:
            break
    if best is None:
        raise OptionError("the budget is too small for rank 1 in every module")
    return best


def _greedy(c, caps, dims, n, budget_numbers, target_error, diag) -> list[int]:
    ranks = [1] * len(c)
    size = sum(_numbers(d, n, 1, diag) for d in dims)
    if budget_numbers is not None and size > budget_numbers:
        raise OptionError("the budget is too small for rank 1 in every module")
    err = sum(float(x[1]) for x in c)
    min_gain = 1e-6 * max(err, 1e-12)  # below this a step only buys solver noise
    while target_error is None or err > target_error:
        best_j, best_ratio = None, 0.0
        for j, x in enumerate(c):
            r = ranks[j]
            if r >= caps[j]:
                continue
            cost = _step_cost(dims[j], n, r, diag)
            if budget_numbers is not None and size + cost > budget_numbers:
                continue
            gain = float(x[r]) - float(x[r + 1])
            if gain <= min_gain:
                continue
            ratio = gain / cost
            if best_j is None or ratio > best_ratio:
                best_j, best_ratio = j, ratio
        if best_j is None:
            break
        r = ranks[best_j]
        size += _step_cost(dims[best_j], n, r, diag)
        err -= float(c[best_j][r]) - float(c[best_j][r + 1])
        ranks[best_j] = r + 1
    return ranks


def _numbers(dim: int, n: int, r: int, diag: bool) -> int:
    return r * dim + n * (r if diag else r * r)


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
    from .pipeline import compress_modules as compress

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
        ranks = allocate(curves, n, target_error=target_error, uniform=uniform, diag=diag)
        art = compress(collection, ranks=ranks, **common)
    else:
        # Fixed bytes besides bases and cores (stats, spectra, extras, header): measured on a
        # rank-1 artifact, then the remaining budget goes to ranks; shrink if the file is over.
        probe = compress(collection, ranks={m: 1 for m in curves.modules}, **common)
        overhead = probe.serialized_size() - itemsize * sum(_numbers(d, n, 1, diag) for d in curves.dims)
        numbers = (budget - overhead) // itemsize
        if numbers <= 0:
            raise OptionError(f"a budget of {budget:,} bytes cannot hold even rank 1 ({probe.serialized_size():,} bytes)")
        while True:
            ranks = allocate(curves, n, budget_numbers=numbers, uniform=uniform, diag=diag)
            art = compress(collection, ranks=ranks, **common)
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
