"""Pass 1: the exact error curves the allocator works on.

* :func:`fit_module_task` (shared and per-adapter parts): per module, one JD-Full at the largest
  shared rank ``R`` and nested bases inside it for every ``r <= R`` (:func:`nested_fit`), which
  give the exact shared-only error curve, and, on a grid of ``r``, the exact residual spectra of
  every adapter (:func:`~lorazip.solvers.residual.nested_residual_spectra`), plus the measured
  error of a residual component at each bit width (:func:`quant_profile`);
* :func:`rank_curves` (shared parts only: diagonal cores, a uniform rank, calibrated streaming):
  the error ``e_im(r)`` of every adapter for ``r = 1..max_rank``, one JD-Full at ``max_rank`` then
  nested fits inside it on the ``max_rank x max_rank`` cores (cheap, no re-reading).

From these curves the error of any choice is known exactly before anything is stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import lowbit
from ..backend import to_backend, to_torch
from ..io.collection import Collection
from ..solvers import Factors
from ..solvers.jd_full import jd_full_factors
from ..solvers.linalg import adapter_weights, factor_norms2
from ..solvers.residual import factor_products, factor_svd, nested_residual_spectra
from ..solvers.svd import spectra_from_grams
from .executor import map_modules
from .options import CompressOptions
from .streaming import MemoryPlan, streamed_factors


GRID = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)  # shared ranks whose residual spectra are measured


@dataclass
class ModuleFit:
    """Pass 1 of one module: nested bases and exact error curves.

    ``shared[r]``: (n,) squared error of the shared part alone at rank r (0..R);
    ``spectra[r]``: (n, m) squared residual singular values (descending) for r in the grid.
    """

    name: str
    d_out: int
    d_in: int
    U: torch.Tensor  # (d_out, R) float64
    V: torch.Tensor  # (d_in, R)
    XY: dict[int, tuple[torch.Tensor, torch.Tensor]]
    shared: dict[int, torch.Tensor]
    spectra: dict[int, torch.Tensor]
    norms2: torch.Tensor
    iters: int = 0
    converged: bool = True
    assign: torch.Tensor | None = None  # (n,) cluster of each adapter when K > 1 (then U: (K, d_out, R))
    quant: np.ndarray | None = None  # (N_CLASSES, len(BITS)) relative error of a residual component at each bit
    # width, by its position in its adapter's spectrum (lowbit.component_class; :func:`quant_profile`)
    basis_err: np.ndarray | None = None  # (n, B) squared error of a unit basis vector of U plus one of V (each
    # adapter's cluster's) stored at each of SHARED_BITS (:func:`basis_quant`)
    core_err: dict[int, np.ndarray] | None = None  # grid r -> (n, B) relative error of the rank-r cores' rows
    own: torch.Tensor | None = None  # (n, r_max) singular values of each adapter's delta (spectra_from_grams of
    # its Grams, as the build would compute them: it takes these and the norms instead of the Grams; None
    # where the fit's factors were not float32, the build's)

    @property
    def dim(self) -> int:
        return self.d_in + self.d_out

    @functools.cached_property
    def K(self) -> int:
        return 1 if self.U.dim() == 2 else self.U.shape[0]

    def residual_cap(self, r: int) -> int:
        return min(self.spectra[r].shape[1], self.d_out, self.d_in)

    def weighted(self, w: torch.Tensor) -> "ModuleFit":
        """This fit with every adapter's energies (its norm, shared-part errors and residual spectra)
        times ``w`` (n,): the curves of an objective weighting module ``m`` of adapter ``i`` by
        ``w_i`` (:func:`lorazip.metrics.module_weights`) for the allocator. Bases, cores and the
        relative quantisation profiles are shared with this fit; the build uses the fit itself (a
        weighted copy has no ``own``, so a build given one makes the true norms from the factors)."""
        w = w.to(self.norms2.dtype)
        return dataclasses.replace(self, norms2=self.norms2 * w, own=None,
                                   shared={r: e * w.to(e.dtype) for r, e in self.shared.items()},
                                   spectra={r: sp * w.to(sp.dtype)[:, None] for r, sp in self.spectra.items()})

    def shared_quant(self, r: int) -> np.ndarray | None:
        """(n, B, B) predicted squared error of the rank-``r`` shared part stored with its bases at
        ``SHARED_BITS[a]`` bits and its cores at ``SHARED_BITS[c]`` (:func:`shared_quant`; the cores'
        rows as measured at the grid ranks around ``r``, :func:`core_error_at`); None where nothing was
        measured. The cores are least squares for the stored bases, so of a basis vector's error the
        part inside the stored basis is taken up by them: ``r / d`` of it on a side of ``d`` dimensions
        (an error in no preferred direction), left out of the bases' term."""
        if not self.core_err or r <= 0 or r not in self.shared:
            return None
        inside = r * (1.0 / self.d_out + 1.0 / self.d_in) / 2  # U's and V's errors alike: their mean share
        return shared_quant(np.asarray(self.basis_err) * max(0.0, 1.0 - inside), core_error_at(self.core_err, r),
                            self.norms2 - self.shared[r])


def fit_module_task(collection: Collection, j: int, R: int, opts: CompressOptions,
                    assign: torch.Tensor | None = None, chunk: int | None = None, quant: np.ndarray | None = None,
                    grow: int | None = None, batch: "QuantBatch | None" = None, *, clock: dict[str, float],
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleFit:
    """Pass 1 on module ``j`` at largest shared rank ``R`` with the solver settings of ``opts``
    (``assign``: (n,) clusters, each with its own bases), reading its factors in float32 unless
    given (the caller's read-ahead), or ``chunk`` adapters at a time on every pass (a module larger
    than the memory limit); ``quant``: the module's :func:`quant_profile` when an earlier fit made
    it (it does not depend on ``R``); ``grow``: a larger rank to fit to instead where the module's
    adapters share directions at ``R`` (:func:`shares`; one basis only); ``batch``: in process, the
    :class:`QuantBatch` its quantisation measurements join (the caller runs it). The same function
    runs in process and as a Ray task (:mod:`.executor`)."""
    t0 = time.perf_counter()
    name = collection.modules[j].name
    fac = task_factors(collection, name, chunk, factors)
    t1 = time.perf_counter()
    fit = fit_factors(fac, name, R, weighting=opts.weighting, seed=opts.seed, tol=opts.tol, max_iters=opts.max_iters,
                      backend=opts.backend, assign=assign, quant=quant,
                      grow=grow if assign is None or int(assign.max()) == 0 else None, batch=batch)
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return fit


def task_factors(collection: Collection, name: str, chunk: int | None, factors) -> Factors:
    """A task's module factors in float32: the caller's read-ahead ``factors``, or read here,
    or (``chunk``) streamed that many adapters at a time on every pass."""
    if chunk is not None:
        return streamed_factors(collection, name, chunk, torch.float32)
    if factors is None:
        f = collection.module_factors(name, dtype=torch.float32, b_rows=True)
        factors = (f.B, f.A)
    return Factors.stacked(*factors)


def fit_module(B: torch.Tensor, A: torch.Tensor, name: str, R: int, *, weighting: str, seed: int, tol: float,
               max_iters: int, grid: tuple[int, ...] = GRID, assign: torch.Tensor | None = None) -> ModuleFit:
    """Pass 1 on one module's factors ``B`` (n, d_out, r_i), ``A`` (n, r_i, d_in); with ``assign``
    (n,) cluster indices, one fit per cluster on its adapters (:func:`_fit_clusters`)."""
    return fit_factors(Factors.stacked(B, A), name, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters,
                       grid=grid, assign=assign)


def fit_factors(fac: Factors, name: str, R: int, *, weighting: str, seed: int, tol: float, max_iters: int,
                grid: tuple[int, ...] = GRID, backend: str = "torch", assign: torch.Tensor | None = None,
                quant: np.ndarray | None = None, grow: int | None = None, profile: bool = True,
                batch: "QuantBatch | None" = None) -> ModuleFit:
    """:func:`fit_module` on :class:`~lorazip.solvers.factors.Factors`, in memory or streamed (then
    every product is a pass over the chunks; only ``(n, r, r)`` products are kept). ``backend``:
    the array library of the JD-Full step (:mod:`lorazip.backend`); the rest runs in torch. With
    ``assign`` naming more than one cluster (factors in memory), :func:`_fit_clusters`. ``grow``:
    fitted to that rank instead where the rank-``R`` bases show that the adapters share directions
    (:func:`shares`, decided before any curve is made). ``profile=False``: no :func:`quant_profile`
    (a cluster's fit inside :func:`_fit_clusters`, which profiles the whole module). ``batch``: a
    :class:`QuantBatch` the quantisation measurements (profile, bases', cores') are queued on; the
    fit's ``quant``, ``basis_err`` and ``core_err`` are set once it has run (by default, before return)."""
    if assign is not None and int(assign.max()) > 0:
        return _fit_clusters(fac.B, fac.A, name, R, assign, weighting=weighting, seed=seed, tol=tol,
                             max_iters=max_iters, grid=grid, backend=backend, quant=quant)
    growing = grow is not None and grow > R > 0
    # where the rank-R ascent comes to hold the energy that makes it grow, it stops there (the rank-R
    # fit is then not used): the same decision as after its convergence, without its sweeps
    stop = grow_stop(fac, R, weighting) if growing else None
    U, V, iters, conv, products = _bases(fac, R, weighting, seed, tol, max_iters, backend, stop=stop)
    if products is None:  # it held the bar: shares(), exactly as at convergence
        R = grow
        U, V, iters, conv, products = _bases(fac, R, weighting, seed, tol, max_iters, backend)
        growing = False
    GB, GA, BU, AV = products
    n2 = (GB * GA).sum((1, 2)).clamp_min(0)
    own = spectra_from_grams(GB, GA)
    S = BU.transpose(1, 2) @ AV
    if growing and shares(n2, n2 - S.square().sum((1, 2)), own.square(), R, fac.d_out + fac.d_in, 1, weighting):
        R = grow
        U, V, iters, conv, (GB, GA, BU, AV) = _bases(fac, R, weighting, seed, tol, max_iters, backend)
        S = BU.transpose(1, 2) @ AV
    d_out, d_in = fac.d_out, fac.d_in
    w = adapter_weights(n2, weighting)
    XY, kept = nested_fit(S, w, R, tol=tol, max_iters=max_iters, refine=set(grid))
    shared = {r: (n2 - kept[r]).clamp_min(0) for r in XY}
    on_grid = {r: XY[r] for r in grid if r <= R}
    spectra = nested_residual_spectra(None, None, U, V, S, on_grid, products=(GB, GA, BU, AV))
    first = next(iter(fac))
    n, pick = S.shape[0], _spread(S.shape[0])
    # the build reads float32 factors: the same Grams, so it may take these (not those of other dtypes)
    same = getattr(fac.like, "dtype", None) == torch.float32
    # the quantisation measurements: queued on the caller's batch (run with other modules'), else run now;
    # they fill arrays and a dict the fit holds (and so does any copy of it made meanwhile)
    now = batch is None
    batch = QuantBatch() if now else batch
    basis, cores, basis_parts = np.zeros((n, len(SHARED_BITS))), {}, []

    def basis_done(err: np.ndarray) -> None:
        basis_parts.append(err)
        if len(basis_parts) == 2:
            basis[:] = np.tile(basis_parts[0] + basis_parts[1], (n, 1))

    batch.add(_basis_steps(U), basis_done)
    batch.add(_basis_steps(V), basis_done)
    measured = sorted({r for r in _CORE_RANKS if r <= R} | ({R} if R > 0 else set()))  # and the top rank itself
    for r in measured:
        batch.add(_core_steps(XY[r][0].T @ S[pick] @ XY[r][1]),
                  functools.partial(lambda r, err: cores.__setitem__(r, np.tile(err, (n, 1))), r))
    if quant is None and profile:
        quant = np.zeros((lowbit.N_CLASSES, len(lowbit.BITS)))
        m = first.B.shape[0]  # the profile measures the first chunk's adapters, whose Grams these are
        batch.add(_quant_profile_steps(first.B, first.A, _PROFILE_ROWS, spectra.get(0), (GB[:m], GA[:m])),
                  functools.partial(np.copyto, quant))
    if now:
        batch.run()
    return ModuleFit(name, d_out, d_in, U, V, XY, shared, spectra, n2, iters, conv, quant=quant, basis_err=basis,
                     core_err=cores, own=own if same else None)


def _bases(fac: Factors, R: int, weighting: str, seed: int, tol: float, max_iters: int, backend: str,
           stop: Callable[[float], bool] | None = None):
    """JD-Full bases at rank ``R`` (float64, orthonormal), the solver's iterations and convergence,
    and every float64 product the curves need (``factor_products``), made in one pass over the
    factors (each chunk converted once). ``stop``: where it says the ascent holds enough
    (:func:`grow_stop`), the ascent stops there, and the products are None (not made)."""
    if R > 0:  # the JD-Full fit weighs adapters by its own (solver-precision) norms
        solver = fac if backend == "torch" else fac.converted(lambda t: to_backend(t, backend))
        top = jd_full_factors(solver, R, weighting=weighting, seed=seed, tol=tol, max_iters=max_iters,
                              second_start=False, stop=stop)  # the allocator weighs per-adapter SVD itself
        if top.stopped:
            return None, None, top.n_iters, False, None
        U, V = torch.linalg.qr(to_torch(top.U).double())[0], torch.linalg.qr(to_torch(top.V).double())[0]
        iters, conv = top.n_iters, top.converged
    else:
        U = torch.zeros(fac.d_out, 0, dtype=torch.float64)
        V = torch.zeros(fac.d_in, 0, dtype=torch.float64)
        iters, conv = 0, True
    return U, V, iters, conv, _chunked(factor_products(ch.B, ch.A, U, V, grams=True) for ch in fac)


SHARED_GAIN = 1.5  # a module's adapters share directions where a shared part holds this much more (:func:`shares`)


def shares(n2: torch.Tensor, shared_err: torch.Tensor, spectra0: torch.Tensor, R: int, dim: int, K: int,
           weighting: str) -> bool:
    """Whether a module's adapters share directions: its rank-``R`` shared part (bases and cores;
    ``shared_err`` (n,) the squared error it leaves of each adapter's energy ``n2``) holds at least
    :data:`SHARED_GAIN` times the energy that per-adapter truncated SVD parts of as many numbers
    hold (each adapter's leading ``numbers / (n dim)`` components, exact from ``spectra0`` (n, m),
    its squared singular values), in ``weighting``. Where adapters share nothing a shared direction
    holds no more of them than one of their own, so the ratio stays below 1 (iid factors of
    Lots-of-LoRAs shapes at rank 16: 0.81-0.86 at n = 64, 0.70-0.76 at 128, 0.03-0.04 at 1000); a
    planted shared subspace of rank 32 gives 5.2-5.8 (rank 24 in 256 dimensions, 64 adapters: 1.77),
    the bundled, GPT-2 and DistilBERT collections 0.85-1.09 (0.96-1.34 at other settings). There a
    module grows only where an allocation asks for it (``budget``): growing every module above 1
    changed no allocation measured there by more than 0.1% of its bytes or error and took a tenth of
    the bundled default run (a false grow costs time, a missed one bytes)."""
    n2 = n2.double()
    w = adapter_weights(n2, weighting).double()
    if float((w * n2).sum()) <= 0 or len(n2) == 0:
        return False
    shared = (n2 - shared_err.double()).clamp_min(0)
    return float((w * shared).sum()) >= SHARED_GAIN * own_energy(n2, spectra0, R, dim, K, weighting)


def own_energy(n2: torch.Tensor, spectra0: torch.Tensor, R: int, dim: int, K: int, weighting: str) -> float:
    """``sum_i w_i own_i``: the weighted energy that per-adapter truncated SVD parts of as many numbers
    as a rank-``R`` shared part (``K`` bases) hold, each adapter's leading ``numbers / (n dim)``
    components (:func:`shares`)."""
    n2 = n2.double()
    n = len(n2)
    w = adapter_weights(n2, weighting).double()
    k = own_components(R, dim, n, K)
    sp = spectra0.double().clamp_min(0)
    cum = torch.cat([torch.zeros(n, 1, dtype=sp.dtype), sp.cumsum(1)], 1)
    whole = min(int(k), sp.shape[1])
    own = cum[:, whole] + (k - whole) * (sp[:, whole] if whole < sp.shape[1] else 0.0)
    return float((w * own).sum())


def own_components(R: int, dim: int, n: int, K: int = 1) -> float:
    """Per-adapter SVD components (of ``dim`` numbers each) holding as many numbers as a rank-``R``
    shared part of ``K`` bases and ``n`` cores."""
    return (K * R * dim + n * R * R) / (n * dim)


_BAR_MARGIN = 1e-3  # relative: the solver's float32 weights and energies against the test's float64 ones


def grow_stop(fac: Factors, R: int, weighting: str) -> Callable[[float], bool] | None:
    """For a rank-``R`` JD-Full fit of ``fac`` (in memory) that grows where :func:`shares` says so:
    whether a weighted captured energy already passes that test whatever the ascent's sweeps still add
    (it reaches :data:`SHARED_GAIN` times :func:`own_energy`, from the chunk's Grams in the solver's
    float32, plus :data:`_BAR_MARGIN`). Each adapter's ``own`` is at least ``min(k, r) / r`` of its
    energy (its leading ``k`` of ``r`` components: a concave sum over descending values), so below
    that the test is not made (adapters that share nothing: no SVD of their Grams). None for streamed
    factors (their Grams are not kept, and making them would cost a pass)."""
    if not fac.in_memory:
        return None
    memo: dict = {}  # the Grams in float64 and norms, the lower bound, the bar: made once, on first need
    dim = fac.d_out + fac.d_in

    def enough(captured: float) -> bool:
        if "lower" not in memo:
            ch = next(iter(fac))
            memo["GB"], memo["GA"] = to_torch(ch.GB).double().cpu(), to_torch(ch.GA).double().cpu()  # the solver's
            memo["n2"] = n2 = (memo["GB"] * memo["GA"]).sum((1, 2)).clamp_min(0)
            w = adapter_weights(n2, weighting).double()
            k = own_components(R, dim, fac.n)
            memo["lower"] = SHARED_GAIN * float((w * n2).sum()) * min(k, fac.rank) / max(fac.rank, 1)
        if captured < memo["lower"] or memo["lower"] <= 0:
            return False
        if "bar" not in memo:
            spectra = spectra_from_grams(memo["GB"], memo["GA"]).square()
            memo["bar"] = SHARED_GAIN * own_energy(memo["n2"], spectra, R, dim, 1, weighting) * (1 + _BAR_MARGIN)
        return captured >= memo["bar"]

    return enough


def _chunked(parts) -> tuple[torch.Tensor, ...]:
    """Per-chunk tuples of tensors concatenated along the adapters (one chunk: as is)."""
    parts = list(parts)
    return parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))


def _fit_clusters(B, A, name, R, assign, *, weighting, seed, tol, max_iters, grid, backend="torch",
                  quant=None) -> ModuleFit:
    """Pass 1 with K clusters: per cluster, the fit of :func:`fit_module` on its adapters (its own
    bases ``U_k``, ``V_k`` and nested ranks), the curves merged back into adapter order. One shared
    rank per module for every cluster, so ``U``: (K, d_out, R), ``XY[r]``: (K, R, r) each."""
    n, d_out, d_in = B.shape[0], B.shape[1], A.shape[2]
    K = int(assign.max()) + 1
    width = B.shape[2] + R
    shared = {r: torch.zeros(n, dtype=torch.float64) for r in range(R + 1)}
    spectra = {r: torch.zeros(n, width, dtype=torch.float64) for r in grid if r <= R}
    basis = np.zeros((n, len(SHARED_BITS)))
    cores: dict[int, np.ndarray] = {}
    Us, Vs, XYs, n2 = [], [], [], torch.zeros(n, dtype=torch.float64)
    own = torch.zeros(n, B.shape[2], dtype=torch.float64)
    iters, conv = 0, True
    eye_o, eye_i, eye_r = (torch.eye(d, R, dtype=torch.float64) for d in (d_out, d_in, R))
    for k in range(K):
        idx = torch.nonzero(assign == k).flatten()
        if len(idx) == 0:  # an empty cluster keeps any orthonormal bases: no adapter uses them
            Us.append(eye_o)
            Vs.append(eye_i)
            XYs.append({r: (eye_r[:, :r], eye_r[:, :r]) for r in range(R + 1)})
            continue
        f = fit_factors(Factors.stacked(B[idx], A[idx]), name, R, weighting=weighting, seed=seed, tol=tol,
                        max_iters=max_iters, grid=grid, backend=backend, profile=False)
        Us.append(f.U)
        Vs.append(f.V)
        XYs.append(f.XY)
        n2[idx] = f.norms2
        own = None if own is None or f.own is None else own.index_copy_(0, idx, f.own)
        for r in shared:
            shared[r][idx] = f.shared[r]
        for r in spectra:
            spectra[r][idx] = f.spectra[r]
        basis[idx.numpy()] = f.basis_err
        for r, err in f.core_err.items():
            cores.setdefault(r, np.zeros((n, len(SHARED_BITS))))[idx.numpy()] = err
        iters, conv = max(iters, f.iters), conv and f.converged
    XY = {r: (torch.stack([xy[r][0] for xy in XYs]), torch.stack([xy[r][1] for xy in XYs])) for r in range(R + 1)}
    return ModuleFit(name, d_out, d_in, torch.stack(Us), torch.stack(Vs), XY, shared, spectra, n2, iters, conv,
                     assign.long(), _profile(B, A, spectra, quant, True), basis, cores, own)


_PROFILE_ROWS = 32  # residual components of each class whose quantisation is measured per module


def _profile(B, A, spectra: dict, quant: np.ndarray | None, measure: bool) -> np.ndarray | None:
    """A fit's quantisation profile: ``quant`` where an earlier fit made it, else measured (rows
    chosen by the residual spectra at shared rank 0) unless ``measure`` is False."""
    if quant is not None or not measure:
        return quant
    return quant_profile(B, A, spectra=spectra.get(0))


def quant_profile(B: torch.Tensor, A: torch.Tensor, rows: int = _PROFILE_ROWS,
                  spectra: torch.Tensor | None = None, grams: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> np.ndarray:
    """(N_CLASSES, len(BITS)) relative squared error of a residual component stored at each of
    :data:`lowbit.BITS`, by its class (:func:`lorazip.lowbit.component_class`: each adapter's leading
    component, the second, the 3rd-4th, the 5th-8th, the rest; later singular vectors quantise worse,
    the second 1.1-1.5x the leading one's error and the 9th-16th up to 1.6x, more at more bits, on the
    bundled, GPT-2 and DistilBERT collections). Each row is measured on the module's own per-adapter SVD
    components of its class (the ``rows`` holding the largest shares of their adapter's energy,
    each adapter weighed by its relative energy): ``sum err / sum sigma^2`` with
    ``err = ||x y^T - x_hat y_hat^T||^2`` of the stored rows ``x = sqrt(sigma) u``, ``y = sqrt(sigma) v``.
    The rows never decrease with the class (:func:`_classes`). ``spectra`` (n, m): the adapters'
    squared singular values where the caller has them (pass 1's residual spectra at shared rank 0);
    they choose the components, and only the adapters holding them are decomposed; ``grams``: their
    float64 ``(B^T B, A A^T)`` (n, r, r) where the caller has them (pass 1: the decompositions start
    from them)."""
    return run_quantised(_quant_profile_steps(B, A, rows, spectra, grams))


def _quant_profile_steps(B, A, rows: int, spectra, grams=None):
    """:func:`quant_profile` as quantiser steps (:func:`run_quantised`); ``grams``: float64 ``(B^T B,
    A A^T)`` where the caller has them."""
    n, T, C = B.shape[0], len(lowbit.BITS), lowbit.N_CLASSES
    if n == 0 or B.shape[2] == 0:
        return np.zeros((C, T))
    if spectra is None:
        sel = torch.arange(n)
    else:
        sq = spectra[:n].double().clamp_min(0)
        sel = torch.unique(torch.cat([_leading(sq, rows, c) for c in range(C)]) // sq.shape[1])
        if len(sel) == 0:
            return np.zeros((C, T))
    # the selected adapters' SVDs a block at a time, keeping only the rows measured (the singular vectors of
    # up to N_CLASSES * rows adapters in float64 at once were a few hundred MB at Lots-of-LoRAs shapes)
    parts = [_block_svd(B, A, blk, grams) for blk in torch.split(sel, _PROFILE_BLOCK)]
    sv = torch.cat([p[1] for p in parts])
    n2 = sv.square().sum(1).clamp_min(1e-300)
    tops = [_leading(sv.square(), rows, c) for c in range(C)]
    top = torch.cat(tops)
    if len(top) == 0:
        return np.zeros((C, T))
    i, q = top // sv.shape[1], top % sv.shape[1]
    root = sv[i, q].sqrt()[:, None]
    first = torch.cumsum(torch.tensor([0] + [len(p[2]) for p in parts]), 0)  # each block's first adapter
    x, y = torch.empty(len(top), B.shape[1], dtype=torch.float64), torch.empty(len(top), A.shape[2], dtype=torch.float64)
    for k, (P, _, Q) in enumerate(parts):  # each row's one singular vector, from its block
        mine = torch.nonzero((i >= first[k]) & (i < first[k + 1])).flatten()
        il, ql = i[mine] - first[k], q[mine]
        x[mine] = P[il, :, ql] * root[mine]
        y[mine] = Q[il, :, ql] * root[mine]
    w = 1.0 / n2[i]
    ref = w * sv[i, q].square()
    lens = [len(t) for t in tops]
    del parts, sv, n2, tops, top, i, q, root  # only the rows wait for the quantiser
    widths = np.repeat(np.array(lowbit.BITS), len(x))  # every row at every width, in one call per side
    xs, ys = x.repeat(T, 1), y.repeat(T, 1)
    xh, yh = yield [(xs, widths), (ys, widths)]
    xh, yh = torch.from_numpy(xh).double(), torch.from_numpy(yh).double()
    err = ((xs * xs).sum(1) * (ys * ys).sum(1) - 2 * (xs * xh).sum(1) * (ys * yh).sum(1)
           + (xh * xh).sum(1) * (yh * yh).sum(1)).clamp_min(0).reshape(T, -1)
    out, at = [], 0
    for m in lens:
        k = slice(at, at + m)
        at += m
        out.append((w[k][None] * err[:, k]).sum(1) / ref[k].sum() if m else None)
    return _classes([o.numpy() if o is not None else None for o in out], lens)


_PROFILE_BLOCK = 32  # adapters decomposed at a time by the profile


def _block_svd(B, A, idx: torch.Tensor, grams):
    """``(P, s, Q)`` (:func:`~lorazip.solvers.residual.factor_svd`) of the adapters ``idx`` of factors
    ``B`` (n, d_out, r), ``A`` (n, r, d_in) in float64, from the Grams ``grams`` (float64 ``(B^T B,
    A A^T)`` of all n) where given. ``B`` in the solvers' layout (the transpose of (n, r, d_out)) is
    gathered in that layout (4x faster than gathering the transposed view)."""
    rows = B.stride(1) == 1 and B.shape[1] > 1  # B_i^T are the rows of an (n, r, d_out) array
    b = B.transpose(1, 2)[idx].double().transpose(1, 2) if rows else B[idx].double()
    return factor_svd(b, A[idx].double().transpose(1, 2), None if grams is None else (grams[0][idx], grams[1][idx]))


def run_quantised(steps):
    """Run quantiser ``steps`` (a generator that yields one list of ``(rows, widths)`` requests, is sent
    the dequantised rows of each as float32 NumPy, and returns its result) now: a batch of one."""
    result: list = []
    batch = QuantBatch()
    batch.add(steps, result.append)
    batch.run()
    return result[0]


class QuantBatch:
    """Quantiser requests of many modules' pass-1 measurements, run together: rows of one length are
    quantised in one call (each row's codes and scale are its own, so the values are those of a call
    per module; on the bundled collection 720 calls of a few hundred rows each were a fifth of pass 1,
    most of it each call's fixed cost). ``limit``: bytes of pending rows at which the batch runs
    (large modules' rows are not held long)."""

    def __init__(self, limit: int = 32 << 20):
        self.limit, self._pending, self._bytes = limit, [], 0

    def add(self, steps, done: Callable) -> None:
        """Queue ``steps`` (see :func:`run_quantised`); ``done(result)`` is called once they have run."""
        try:
            requests = next(steps)
        except StopIteration as finished:
            done(finished.value)
            return
        self._pending.append((steps, requests, done))
        self._bytes += sum(x.numel() * x.element_size() for x, _ in requests)
        if self._bytes >= self.limit:
            self.run()

    def run(self) -> None:
        """Quantise every pending request (one call per row length) and finish their steps."""
        pending, self._pending, self._bytes = self._pending, [], 0
        by_length: dict[int, list[tuple[int, int]]] = {}
        for a, (_, requests, _) in enumerate(pending):
            for b, (x, _) in enumerate(requests):
                by_length.setdefault(int(x.shape[1]), []).append((a, b))
        backs: dict[tuple[int, int], np.ndarray] = {}
        for keys in by_length.values():
            xs = [pending[a][1][b][0].float() for a, b in keys]
            ws = [np.asarray(pending[a][1][b][1]) for a, b in keys]
            widths = np.concatenate(ws)
            back = lowbit.dequantize(*lowbit.quantize(torch.cat(xs), widths), widths)
            at = 0
            for key, x in zip(keys, xs):
                backs[key] = back[at : at + len(x)]
                at += len(x)
        for a, (steps, requests, done) in enumerate(pending):
            try:
                steps.send([backs[(a, b)] for b in range(len(requests))])
            except StopIteration as finished:
                done(finished.value)
            else:
                raise RuntimeError("quantiser steps yield once")


def _classes(rows: list, counts: list[int]) -> np.ndarray:
    """(N_CLASSES, T) profile from each class's measured row (None: nothing measured, as a class past
    every adapter's rank; it takes the nearest earlier class's row, the first measured one for the
    classes before it), made non-decreasing with the class, width by width, by the least-squares
    monotone fit (pool-adjacent-violators, each class weighed by the ``counts`` of rows it was measured
    on): a component is never predicted to quantise better than a later one of its adapter, so each
    adapter's steps come in the allocator's order by position (stored components stay a prefix of each
    adapter's), and classes that quantise alike (iid factors) are pooled, not raised to the worst."""
    got = [i for i, r in enumerate(rows) if r is not None]
    if not got:
        return np.zeros((len(rows), len(lowbit.BITS)))
    filled = np.stack([rows[max([i for i in got if i <= c], default=got[0])] for c in range(len(rows))])
    weight = np.array([float(counts[c]) if rows[c] is not None else 0.0 for c in range(len(rows))])
    return np.stack([_monotone(filled[:, t], weight) for t in range(filled.shape[1])], 1)


def _monotone(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in ``w``-weighted least squares (pool-adjacent-
    violators); entries of weight 0 follow their block."""
    blocks: list[list[float]] = []  # [weighted sum, weight, length]
    for v, c in zip(y, w):
        blocks.append([v * c, c, 1, v])
        while len(blocks) > 1 and _mean(blocks[-2]) > _mean(blocks[-1]):
            s2, c2, n2, v2 = blocks.pop()
            blocks[-1][0] += s2
            blocks[-1][1] += c2
            blocks[-1][2] += n2
            if blocks[-1][1] == 0:
                blocks[-1][3] = max(blocks[-1][3], v2)
    return np.concatenate([[_mean(b)] * b[2] for b in blocks])


def _mean(block: list[float]) -> float:
    return block[0] / block[1] if block[1] > 0 else block[3]


def _leading(sq: torch.Tensor, rows: int, cls: int | None = None) -> torch.Tensor:
    """Flat indices into ``sq`` (n, m) (adapters' squared singular values) of the ``rows`` components
    holding the largest shares of their adapter's energy (ties in order; none of zero share);
    ``cls``: among the components of that class only (:func:`lorazip.lowbit.component_class`)."""
    share = sq / sq.sum(1, keepdim=True).clamp_min(1e-300)
    if cls is not None:
        keep = torch.from_numpy(lowbit.component_class(np.arange(share.shape[1])) == cls)[None, :]
        share = torch.where(keep, share, torch.zeros_like(share))
    share = share.reshape(-1)
    top = torch.argsort(share, descending=True, stable=True)[:rows]
    return top[share[top] > 0]


SHARED_BITS = (2, 3, 4, 8)  # widths the shared bases and the cores of a module may be stored at
_SAMPLE = 32  # basis vectors and adapters' cores quantised to measure a width's relative error
_ROWS = 256  # rows of those cores
# grid ranks whose cores are measured, every one above 1 (rows of 1 value are stored exactly by their scale); the
# ranks between are interpolated (core_error_at). Until 2026-12-07 4, 16 and 64, the others taking the nearest:
# longer rows quantise worse (a row's scale covers its largest value), and rank-32 cores, measured at 16,
# were predicted 23-30% under their error at 3-4 bits (1000 adapters in a planted rank-32 subspace)
_CORE_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def core_error_at(core_err: dict[int, np.ndarray], r: int) -> np.ndarray:
    """The cores' relative error at shared rank ``r`` from those measured at grid ranks (``core_err``:
    rank -> (n, B)): linear in ``log2 r`` between the measured ranks around it, the nearest outside them."""
    ks = sorted(core_err)
    lo = max((k for k in ks if k <= r), default=ks[0])
    hi = min((k for k in ks if k >= r), default=ks[-1])
    if lo == hi or r <= lo:
        return core_err[lo]
    t = (math.log2(r) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return (1 - t) * core_err[lo] + t * core_err[hi]


def _spread(n: int, k: int = _SAMPLE) -> torch.Tensor:
    """Up to ``k`` indices evenly spaced over ``0 .. n - 1``."""
    return torch.from_numpy(np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)))


def _relative_errors(rows: torch.Tensor) -> np.ndarray:
    """(B,) squared error of storing ``rows`` (N, L) at each of :data:`SHARED_BITS` (one scale per
    row), over their squared norm: one quantiser call for every width."""
    return run_quantised(_relative_steps(rows))


def _relative_steps(rows: torch.Tensor):
    """:func:`_relative_errors` as quantiser steps (:func:`run_quantised`)."""
    N, L = rows.shape
    total = float(rows.square().sum())
    if N == 0 or L == 0 or total == 0:
        return np.zeros(len(SHARED_BITS))
    widths = np.repeat(np.array(SHARED_BITS), N)
    x = rows.float().repeat(len(SHARED_BITS), 1)
    (back,) = yield [(x, widths)]
    back = torch.from_numpy(back).double()
    err = (back - rows.double().repeat(len(SHARED_BITS), 1)).square().sum(1).reshape(len(SHARED_BITS), N).sum(1)
    return err.numpy() / total


def basis_quant(U: torch.Tensor) -> np.ndarray:
    """(B,) squared error ``||u - u_hat||^2`` of a unit basis vector stored at each of
    :data:`SHARED_BITS` (one scale per vector, :func:`~lorazip.quantize.to_shared_lowbit`), the mean
    over up to 32 of the columns of ``U`` (d, R) (evenly spaced)."""
    return run_quantised(_basis_steps(U))


def _basis_steps(U: torch.Tensor):
    if U.shape[-1] == 0:
        return np.zeros(len(SHARED_BITS))
    return (yield from _relative_steps(U[:, _spread(U.shape[1])].T))


def core_quant(C: torch.Tensor) -> np.ndarray:
    """(B,) relative squared error of the rows of cores ``C`` (m, r, r) stored at each of
    :data:`SHARED_BITS` (one scale per row), measured on up to 256 of them (evenly spaced)."""
    return run_quantised(_core_steps(C))


def _core_steps(C: torch.Tensor):
    rows = C.reshape(-1, C.shape[-1])
    return (yield from _relative_steps(rows[_spread(rows.shape[0], _ROWS)]))


def shared_quant(eps: np.ndarray, rel: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    """Predicted squared error (n, B, B) added by storing a shared part ``U C_i V^T`` (orthonormal
    bases) with its bases at ``SHARED_BITS[a]`` bits and its cores at ``SHARED_BITS[c]``: ``eps[a]``
    (:func:`basis_quant` of ``U`` plus that of ``V``; (B,) or per adapter (n, B)) times the energy
    ``kept`` (n,) each adapter keeps in the part (an error ``e`` on basis vector ``j`` costs
    ``||e||^2 ||C_i[j, :]||^2``, summed over ``j``), plus the cores' relative error ``rel[c]``
    (:func:`core_quant`) times ``kept``. First order: products of two errors are left out."""
    k = kept.double().clamp_min(0).numpy()[:, None, None]
    eps, rel = np.asarray(eps), np.asarray(rel)
    return k * (eps[..., :, None] + rel[..., None, :])


def bit_levels(fit: ModuleFit) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """:func:`lorazip.lowbit.levels` of a module's residual components from its measured profile:
    those of each adapter's leading component and those of the others."""
    return lowbit.class_levels(fit.d_out, fit.d_in, fit.quant)


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
    top = jd_full_factors(fac, r_cap, weights=w, seed=seed, tol=tol, max_iters=max_iters, second_start=False)
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
               refine: set[int] | None = None) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]],
                                                        dict[int, torch.Tensor]]:
    """Nested bases inside a rank-``R`` fit: ``{r: (X_r, Y_r)}`` for r = 0..R, (R, r) orthonormal,
    maximising ``sum_i w_i ||X^T S_i Y||^2`` for the cores ``S`` (n, R, R) (alternating exact
    eigen-steps from the HOSVD order, as :func:`nested_kept`), and the energy ``||X_r^T S_i Y_r||^2``
    each adapter keeps at each rank. With ``refine``, only those ranks are refined; the others keep
    the HOSVD truncation (a valid basis, its error exact, slightly above the refined one), whose
    kept energies are leading blocks of one rotated ``W^T S_i Z``: two cumulative sums, not a
    product per rank."""
    eye = torch.eye(R, dtype=S.dtype)
    out = {0: (eye[:, :0], eye[:, :0])}
    kept = {0: torch.zeros(S.shape[0], dtype=S.dtype)}
    if R == 0:
        return out, kept
    ww = w.double()[:, None, None]
    W = torch.linalg.eigh((ww * S @ S.transpose(1, 2)).sum(0))[1].flip(1)
    Z = torch.linalg.eigh((ww * S.transpose(1, 2) @ S).sum(0))[1].flip(1)
    blocks = (W.T @ S @ Z).square().cumsum(1).cumsum(2)  # [i, a, b]: energy of the leading (a+1) x (b+1) block
    for r in range(1, R):
        if refine is None or r in refine:
            out[r] = _nested_xy(S, w.double(), W[:, :r], Z[:, :r], tol=tol, max_iters=max_iters)
            kept[r] = (out[r][0].T @ S @ out[r][1]).square().sum((1, 2))
        else:
            out[r] = (W[:, :r], Z[:, :r])
            kept[r] = blocks[:, r - 1, r - 1]
    out[R] = (eye, eye)
    kept[R] = S.square().sum((1, 2))
    return out, kept


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
