"""Clustered JD-Full: K groups of adapters, each with its own bases ``U_k, V_k`` per module.

Objective (the same weighted error JD-Full minimises, summed over modules):
``F = sum_i sum_m w_im (||M_im||^2 - ||U_{k(i)m}^T M_im V_{k(i)m}||^2)``, with ``w_im`` the
module-level weights of JD-Full (``1/||M_im||^2`` for relative weighting). Alternation:

1. *fit*: for every module and cluster, JD-Full on the cluster's adapters, warm-started from
   the cluster's current bases (subspace iteration from a warm start never loses captured
   energy, so F cannot increase);
2. *assign*: every adapter moves to the cluster whose bases keep most of its weighted energy,
   computed from the factors (``||U^T M V||^2 = ||(B^T U)^T (A V)||^2``); ties keep the current
   cluster. This is an exact minimisation over assignments, so F cannot increase;
3. empty clusters are re-seeded with the worst-fitting adapters (a single adapter's own fit is
   at least as good as any shared one, so F still cannot increase).

It stops when assignments stop changing or after ``max_rounds``. The start is one JD-Full over
all adapters (``K = 1``) and k-means (k-means++ seeding) on the adapters' normalised cores in
that shared basis; every cluster's first fit is warm-started from the shared bases, so the
result is never worse than JD-Full, and ``K = 1`` gives exactly JD-Full.

With ``per_module=True`` each module is clustered on its own (a separate assignment per module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .linalg import adapter_weights, factor_norms2
from .jd_full import jd_full

FactorSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ClusteredResult:
    """``U[m]``: (K, d_out, r), ``V[m]``: (K, d_in, r), ``cores[m]``: (n, r, r),
    ``assignment[m]``: (n,) (the same tensor for every module unless ``per_module``).
    ``history``: the objective F / (total weighted energy) after every round (non-increasing)."""

    U: list[torch.Tensor]
    V: list[torch.Tensor]
    cores: list[torch.Tensor]
    assignment: list[torch.Tensor]
    rounds: int
    converged: bool
    history: list[float] = field(default_factory=list)


def kmeans(X: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of ``X`` (n, p); returns labels (n,)."""
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [X[first]]
    d2 = (X - X[first]).square().sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial((d2 / total).float().cpu(), 1, generator=generator))
        centers.append(X[idx])
        d2 = torch.minimum(d2, (X - X[idx]).square().sum(1))
    C = torch.stack(centers)
    labels = torch.cdist(X, C).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = labels == j
            if members.any():
                C[j] = X[members].mean(0)
        new = torch.cdist(X, C).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _captured(B, A, U, V, w) -> torch.Tensor:
    """Weighted captured energy ``w_i ||U_k^T M_i V_k||^2`` for every adapter and cluster: (n, K)."""
    D = torch.einsum("ndr,kds->nkrs", B, U)  # B_i^T U_k: (n, K, r_i, r)
    C = torch.einsum("nrd,kds->nkrs", A, V)  # A_i V_k
    S = D.transpose(2, 3) @ C  # (n, K, r, r)
    return S.square().sum((2, 3)) * w[:, None]


def jd_clustered(
    modules: Sequence[int],
    factors: FactorSource,
    n_clusters: int,
    rank: int | Sequence[int],
    *,
    weighting: str = "relative",
    per_module: bool = False,
    max_rounds: int = 30,
    max_iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
    n_init: int = 3,
    init: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    map_modules: Callable[[Callable, list[tuple]], list] | None = None,
    dims: Sequence[tuple[int, int, int]] | None = None,
) -> ClusteredResult:
    """Cluster ``n`` adapters into ``n_clusters`` groups with their own JD-Full bases.

    Parameters
    ----------
    modules : module ids passed to ``factors``.
    factors : ``factors(m) -> (B, A)``, ``B``: (n, d_out, r_i), ``A``: (n, r_i, d_in).
    n_clusters : K, ``1 <= K <= n``.
    rank : the shared rank, one for all modules or one per module (in ``modules`` order).
    n_init : independent k-means++ starts of the alternation; the lowest objective is kept.
    init : optional shared ``(U, V)`` per module to start from (skips the K = 1 fit).
    map_modules : ``map_modules(fn, args)`` returns ``[fn(*factors(m), *a) for m, a in zip(modules, args)]``
        (the default). Every per-module step goes through it, so a caller may run the steps
        elsewhere (Ray workers, :mod:`lorazip.compress.executor`): each ``fn`` is a module-level
        function of picklable arguments, and the results are combined here in module order.
    dims : ``(n, d_out, d_in)`` of every module (default: read through ``factors``).
    Other parameters as in :func:`~lorazip.solvers.jd_full.jd_full`.
    """
    ranks = [rank] * len(modules) if isinstance(rank, int) else list(rank)
    run = map_modules or (lambda fn, args: [fn(*factors(m), *a) for m, a in zip(modules, args)])
    if per_module:
        return _cluster_per_module(run, len(modules), n_clusters, ranks, weighting, max_rounds, max_iters, tol, seed,
                                   n_init, init)
    if dims is None:
        dims = [(B.shape[0], B.shape[1], A.shape[2]) for B, A in map(factors, modules)]
    n = dims[0][0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"number of clusters K={n_clusters} must be between 1 and the number of adapters ({n})")
    K = n_clusters
    gen = torch.Generator().manual_seed(seed)
    # The signatures' random projections come from ``gen`` in module order; each module's task
    # gets the generator's state at its turn, so the draws do not depend on where it runs.
    sig_states = [_projection_state(gen, min(K * ranks[j], _SIG_RANK, d_out, d_in)) if K > 1 else None
                  for j, (_, d_out, d_in) in enumerate(dims)]

    # Start: one JD-Full over all adapters per module; weights and norms per module.
    starts = run(_start_module, [
        (ranks[j], K, weighting, max_iters, tol, seed, None if init is None else init[j], sig_states[j])
        for j in range(len(modules))
    ])
    Us = [U[None].expand(K, *U.shape).clone() for U, *_ in starts]
    Vs = [V[None].expand(K, *V.shape).clone() for _, V, *_ in starts]
    weights = [st[2] for st in starts]
    energy = [st[3] for st in starts]
    total = float(sum(e.sum() for e in energy)) or 1.0
    if K == 1:  # exactly JD-Full
        return _jd_full_result(Us, Vs, [st[4] for st in starts], weights, energy, total)
    X = torch.cat([st[5] for st in starts], 1)
    del starts
    E = torch.stack(energy, 1).sum(1)  # (n,) weighted energy per adapter
    Us, Vs, assign, history, rounds, converged = _best_start(run, X, gen, n_init, Us, Vs, weights, E, total, K, ranks,
                                                             max_rounds, max_iters, tol, seed)
    cores_out = run(_final_cores, [(Us[j], Vs[j], assign) for j in range(len(modules))])
    return ClusteredResult(Us, Vs, cores_out, [assign] * len(modules), rounds, converged, history)


def _cluster_per_module(run, n_modules, n_clusters, ranks, weighting, max_rounds, max_iters, tol, seed, n_init,
                        init) -> ClusteredResult:
    """Each module clustered on its own (its own assignment); the history is the mean over modules."""
    parts = run(_cluster_one, [
        (n_clusters, ranks[j], weighting, max_rounds, max_iters, tol, seed, n_init,
         None if init is None else init[j])
        for j in range(n_modules)
    ])
    return ClusteredResult(
        [p.U[0] for p in parts], [p.V[0] for p in parts], [p.cores[0] for p in parts],
        [p.assignment[0] for p in parts], max(p.rounds for p in parts), all(p.converged for p in parts),
        [sum(h) / len(parts) for h in zip(*[_pad(p.history, max_rounds + 1) for p in parts])],
    )


def _jd_full_result(Us, Vs, cores, weights, energy, total: float) -> ClusteredResult:
    """K = 1: the shared JD-Full start is the result, every adapter in cluster 0."""
    zero = torch.zeros(energy[0].shape[0], dtype=torch.long)
    resid = float(sum(((e - (c.square().sum((1, 2)) * w)).sum()) for e, c, w in zip(energy, cores, weights)))
    return ClusteredResult(Us, Vs, cores, [zero] * len(Us), 0, True, [resid / total])


def _best_start(run, X, gen, n_init, U_start, V_start, weights, E, total, K, ranks, max_rounds, max_iters, tol, seed):
    """The alternation from ``n_init`` independent k-means++ starts on the signatures ``X``, all
    from the shared bases; the one of lowest final objective wins (ties: the first)."""
    best = None
    for _ in range(n_init):
        start = kmeans(X, K, generator=gen)
        Us = [u.clone() for u in U_start]
        Vs = [v.clone() for v in V_start]
        res = _alternate(run, start, Us, Vs, weights, E, total, K, ranks, max_rounds, max_iters, tol, seed)
        if best is None or res[3][-1] < best[3][-1] - 1e-12:
            best = res
    return best


def _cluster_one(B, A, n_clusters, rank, weighting, max_rounds, max_iters, tol, seed, n_init, init):
    """``per_module``: one module clustered on its own."""
    return jd_clustered([0], lambda _: (B, A), n_clusters, rank, weighting=weighting, max_rounds=max_rounds,
                        max_iters=max_iters, tol=tol, seed=seed, n_init=n_init,
                        init=None if init is None else [init])


def _start_module(B, A, rank, K, weighting, max_iters, tol, seed, init, sig_state):
    """One module's start: ``(U, V, weights, weighted energy, cores (K = 1) or None, signature (K > 1) or None)``."""
    norms2 = factor_norms2(B, A)
    w = adapter_weights(norms2, weighting)
    if init is None:
        res = jd_full(B, A, rank, weights=w, max_iters=max_iters, tol=tol, seed=seed)
        U, V, cores = res.U, res.V, res.cores
    else:
        U, V = init
        cores = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)
    sig = None
    if K > 1:
        gen = torch.Generator()
        if sig_state is not None:
            gen.set_state(sig_state)
        sig = _signature(B, A, w, min(K * rank, _SIG_RANK, B.shape[1], A.shape[2]), seed, gen)
    return U, V, w, w * norms2, cores if K == 1 else None, sig


def _final_cores(B, A, U, V, assign):
    """``S_i = U_k^T M_i V_k`` with ``k`` the adapter's cluster: (n, r, r)."""
    Ui, Vi = U[assign], V[assign]
    return (B.transpose(1, 2) @ Ui).transpose(1, 2) @ (A @ Vi)


_SIG_RANK = 48  # rank of the shared basis in which adapters are compared at the start
_SIG_DIM = 1024  # signatures of all modules are sketched to at most this many numbers


def _signature(B, A, w, sig_rank: int, seed: int, gen: torch.Generator) -> torch.Tensor:
    """Per-adapter, sign- and mixing-invariant description of one module: the normalised Grams
    ``S S^T`` and ``S^T S`` of its core in a shared basis of rank ``K r`` (which can hold every
    cluster's subspace), randomly projected to a fixed size. Returns (n, p)."""
    res = jd_full(B, A, sig_rank, weights=w, max_iters=30, tol=1e-4, seed=seed)
    S = res.cores * w.sqrt().to(res.cores.dtype)[:, None, None]
    G = torch.cat([(S @ S.transpose(1, 2)).flatten(1), (S.transpose(1, 2) @ S).flatten(1)], 1)
    p = min(G.shape[1], _SIG_DIM // 4)
    if p < G.shape[1]:
        omega = torch.randn(G.shape[1], p, generator=gen, dtype=torch.float64).to(G) / p**0.5
        G = G @ omega
    return G


def _projection_state(gen: torch.Generator, sig_rank: int) -> torch.Tensor | None:
    """The state of ``gen`` for the random projection of one module's signature (rank ``sig_rank``),
    advanced past its draw as :func:`_signature` would; None when no projection is drawn."""
    width = 2 * sig_rank * sig_rank
    p = min(width, _SIG_DIM // 4)
    if p >= width:
        return None
    state = gen.get_state()
    torch.randn(width, p, generator=gen, dtype=torch.float64)
    return state


def _alternate(run, assign, Us, Vs, weights, E, total, K, ranks, max_rounds, max_iters, tol, seed):
    """Fit / assign rounds from one start; returns (Us, Vs, assign, history, rounds, converged).
    ``run`` maps a per-module step over the modules (see ``map_modules`` of :func:`jd_clustered`)."""
    n = assign.shape[0]
    assign, fresh = _reseed_empty(assign, K, E, torch.zeros(n, dtype=E.dtype))
    history: list[float] = []
    converged = False
    rounds = 0
    members_cache: list[dict[int, tuple[int, ...]]] = [{} for _ in Us]
    for rounds in range(1, max_rounds + 1):
        steps = run(_round_step, [(assign, fresh, Us[j], Vs[j], weights[j], ranks[j], members_cache[j], max_iters,
                                   tol, seed) for j in range(len(Us))])
        captured = torch.zeros(n, K, dtype=E.dtype, device=E.device)
        for j, (U, V, cached, cap) in enumerate(steps):
            Us[j], Vs[j], members_cache[j] = U, V, cached
            captured += cap
        err = E[:, None] - captured  # (n, K) weighted residual of every adapter under every cluster
        current = err.gather(1, assign[:, None]).squeeze(1)
        history.append(float(current.sum()) / total)
        best = err.argmin(1)
        # keep the current cluster on ties (no churn between equally good clusters)
        new = torch.where(err.gather(1, best[:, None]).squeeze(1) < current, best, assign)
        new, fresh = _reseed_empty(new, K, E, err.gather(1, new[:, None]).squeeze(1))
        if torch.equal(new, assign):
            converged = True
            break
        assign = new
    return Us, Vs, assign, history, rounds, converged


def _round_step(B, A, assign, fresh, U, V, w, rank, cached, max_iters, tol, seed):
    """One module's part of a round: refit the clusters whose members changed (warm-started),
    then every adapter's weighted captured energy under every cluster. Returns
    ``(U, V, members per refitted cluster, captured (n, K))``."""
    U, V, cached = U.clone(), V.clone(), dict(cached)
    for k in range(U.shape[0]):
        idx = (assign == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        members = tuple(idx.tolist())
        if cached.get(k) != members:  # refit only clusters whose membership changed
            # a re-seeded cluster starts from its adapter's own data, not from stale bases
            warm = {} if k in fresh else {"U0": U[k], "V0": V[k]}
            res = jd_full(B[idx], A[idx], rank, weights=w[idx], max_iters=max_iters, tol=tol, seed=seed, **warm)
            U[k], V[k] = res.U, res.V
            cached[k] = members
    return U, V, cached, _captured(B, A, U, V, w)


def _pad(h: list[float], length: int) -> list[float]:
    return h + [h[-1]] * (length - len(h)) if h else [0.0] * length


def _reseed_empty(assign: torch.Tensor, K: int, E: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """Give every empty cluster the worst-fitting adapter of a cluster that keeps >= 1 member.

    Returns the new assignment and the re-seeded clusters (whose bases must be re-initialised).
    """
    assign = assign.clone()
    fresh: set[int] = set()
    counts = torch.bincount(assign, minlength=K)
    order = torch.argsort(err, descending=True, stable=True).tolist()
    for k in (counts == 0).nonzero().flatten().tolist():
        for i in order:
            if counts[assign[i]] > 1:
                counts[assign[i]] -= 1
                assign[i] = k
                counts[k] += 1
                fresh.add(k)
                break
    return assign, fresh
