"""Pass 2 of an allocated run: each module's chosen parts from its factors, rounded, with exact
errors (never a ``d x d`` matrix), and the assembly of any run's artifact (:func:`assemble`)."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .. import __version__
from .. import lowbit
from ..artifact import Artifact
from ..io.collection import Collection
from ..layout import round_small, trim_spectra
from ..metrics import squared_errors
from ..quantize import (LowBit, cat_stored, dry_shared_lowbit, dry_storage, store_extras, store_residual,
                        to_shared_lowbit, to_storage)
from ..solvers.factors import Factors
from ..solvers.residual import residual_factors
from ..solvers.svd import spectra_from_grams
from .allocate import BITS
from .curves import ModuleFit, task_factors
from .executor import map_modules
from .measure import StoredBases, adapter_chunk, optimal_cores, stored_residual
from .options import CompressOptions
from .plan import ModulePlan, Plan
from .provenance import SourceHashes, adapter_meta
from .spill import Spill
from .streaming import MemoryPlan, release_freed_memory
from .whiten import annotate, build_mixed_module, whitening_of


def core_scales(fit: ModuleFit) -> torch.dtype:
    """Scale dtype of a module's int8 cores, the same in the dry and the real assembly: float16
    unless a core could exceed float16's range (|S_i| <= ||M_i|| for orthonormal bases; twice that
    covers the int8 rounding of the bases)."""
    top = float(fit.norms2.max().sqrt()) if fit.norms2.numel() else 0.0
    return torch.float32 if 2 * top / 127 > torch.finfo(torch.float16).max else torch.float16


def keep_limit() -> int:
    """Bytes of pass-1 factors worth keeping for pass 2 instead of reading them again: a quarter
    of the memory available now (0 where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def _nbytes(f) -> int:
    return f.B.numel() * f.B.element_size() + f.A.numel() * f.A.element_size()


class FactorReads:
    """Module factors in float32, module by module in ``order``, the first read from construction
    on and each next one in a thread meanwhile (torch and the safetensors reads release the GIL),
    each module freed once taken.

    Pass 1 may ``keep`` modules (up to ``limit`` bytes in all): a later pass 1 (another grouping)
    takes them from ``keep`` as they are, and pass 2 from ``kept`` (freeing each) instead of
    reading them again. ``checked=False``: the reads of pass 2, whose values pass 1 checked
    (:meth:`~lorazip.io.peft.Adapter.factors`)."""

    def __init__(self, collection: Collection, *, keep: dict | None = None, limit: int = 0,
                 kept: dict | None = None, plan: MemoryPlan | None = None, order: list[int] | None = None,
                 checked: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.collection = collection
        self.names = [m.name for m in collection.modules]
        order = list(range(len(self.names))) if order is None else list(order)
        self._after = dict(zip(order, order[1:] + [len(self.names)]))  # the module read ahead of each
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorazip-read")
        self._next = {}
        self._kept = kept if kept is not None else {}
        self._keep = keep
        self._room = limit - sum(_nbytes(f) for f in (keep or {}).values())
        self._plan = plan  # under a memory limit: streamed modules are not read here, nor read ahead
        self._checked = checked
        if order:  # the first module is read from now on: a build does other work first (modules storing nothing)
            self._submit(order[0])

    def _submit(self, j: int, now: int | None = None) -> None:
        """Read module ``j`` in the thread; ``now``: the module being solved meanwhile (a read-ahead,
        which the memory plan allows next to the module after it only)."""
        if self._plan is not None and (j in self._plan.chunk or (now is not None and (
                j != now + 1 or not self._plan.prefetch(now)))):
            return
        if j < len(self.names) and j not in self._next and j not in self._kept and j not in (self._keep or {}):
            self._next[j] = self._pool.submit(self.collection.module_factors, self.names[j], dtype=torch.float32,
                                               b_rows=True, checked=self._checked)

    def get(self, j: int):
        self._submit(j)
        if self._keep is not None and j in self._keep:
            f = self._keep[j]
        elif j in self._kept:
            f = self._kept.pop(j)
        else:
            f = self._next.pop(j).result()
            if self._keep is not None and _nbytes(f) <= self._room:
                self._keep[j], self._room = f, self._room - _nbytes(f)
        nxt = self._after.get(j, j + 1)
        self._submit(nxt, now=j)
        if nxt >= len(self.names):
            self._pool.shutdown(wait=False)
        return f

    def factors(self, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module ``j``'s factors as a task's ``factors`` argument (:func:`~.executor.map_modules`);
        none for a streamed module, whose task reads it in chunks."""
        if self._plan is not None and j in self._plan.chunk:
            self._submit(self._after.get(j, j + 1), now=j)
            return {}
        f = self.get(j)
        return {"factors": (f.B, f.A)}

    def __del__(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class BuiltParts:
    """Pass 2 of one module: its stored parts, spectra and exact errors (None when dry)."""

    U: Any
    V: Any
    cores: Any
    resid_B: Any
    resid_A: Any
    spectra: torch.Tensor
    sq: torch.Tensor | None = None
    nn2: torch.Tensor | None = None
    wsq: torch.Tensor | None = None  # weight-space errors and norms of a whitened (calibrated) build
    wnn2: torch.Tensor | None = None


def dry_parts(collection, info, r: int, total: int, storage_dtype: str, core_scales, K: int = 1,
               bits: np.ndarray | None = None, shared_bits: tuple[int, int] | None = None) -> BuiltParts:
    n = len(collection)
    if bits is not None:
        b = torch.from_numpy(np.asarray(bits, dtype=np.uint8))
        rb, ra = (LowBit(torch.zeros(total, d, dtype=torch.uint8),
                         torch.zeros(total, lowbit.n_groups(d, lowbit.GROUP), dtype=torch.bfloat16), b)
                  for d in (info.d_out, info.d_in))
    else:
        rb = dry_storage((total, info.d_out), storage_dtype, torch.float32)
        ra = dry_storage((total, info.d_in), storage_dtype, torch.float32)
    if shared_bits:
        U, V = (dry_shared_lowbit((K, d, r), shared_bits[0], role) for d, role in ((info.d_out, "U"), (info.d_in, "V")))
        cores = dry_shared_lowbit((n, r, r), shared_bits[1], "cores")
    else:
        U, V = dry_storage((K, info.d_out, r), storage_dtype), dry_storage((K, info.d_in, r), storage_dtype)
        cores = dry_storage((n, r, r), storage_dtype, core_scales)
    return BuiltParts(U, V, cores, rb, ra, torch.zeros(n, collection.max_rank(info.name), dtype=torch.float32))


def _shared_storage(UX: torch.Tensor, VY: torch.Tensor, storage_dtype: str, shared_bits):
    """A module's bases as stored: at ``shared_bits[0]`` bits, or in the storage dtype (float16 scales
    for int8: orthonormal columns have entries <= 1)."""
    UX, VY = (t if t.dim() == 3 else t[None] for t in (UX, VY))
    if shared_bits:
        return to_shared_lowbit(UX, shared_bits[0], "U"), to_shared_lowbit(VY, shared_bits[0], "V")
    return to_storage(UX, storage_dtype, torch.float16), to_storage(VY, storage_dtype, torch.float16)



@dataclass
class Built:
    """A module's parts from a low-bit build with the residual ranks ``k`` (n,) and row ``bits`` they
    were built with: a later build of the same shared part (rank, widths) keeps the adapters whose
    ranks and bits did not change (:func:`build_module_task`'s ``before``)."""

    parts: BuiltParts
    rank: int
    shared_bits: tuple[int, int] | None
    k: torch.Tensor
    bits: torch.Tensor

    def same_shared(self, rank: int, shared_bits) -> bool:
        """Whether a plan's shared part (``rank``, ``shared_bits``) is the one these parts were built with."""
        return self.rank == rank and (tuple(self.shared_bits) if self.shared_bits else None) == (
            tuple(shared_bits) if shared_bits else None)

    def changed(self, k: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the adapters whose residual ranks or row bits differ in ``k``, ``bits``."""
        changed = self.k != k
        same = torch.nonzero(~changed).flatten()
        if len(same):
            rows_old = _rows(self.k, same)
            rows_new = _rows(k, same)
            owner = torch.repeat_interleave(same, k[same].long())
            diff = self.bits[rows_old] != bits[rows_new]
            changed[owner[diff]] = True
        return changed


def _rows(k: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Indices of the stored rows of adapters ``which`` (in order) when adapter ``i`` has ``k[i]`` rows."""
    k = k.long()
    start = torch.cumsum(k, 0) - k
    lens = k[which]
    base = torch.repeat_interleave(start[which] - (torch.cumsum(lens, 0) - lens), lens)
    return base + torch.arange(int(lens.sum()))


def _splice(old: LowBit, new: LowBit, k: torch.Tensor, changed: torch.Tensor, k_old: torch.Tensor) -> LowBit:
    """Residual rows in adapter order: the changed adapters' from ``new`` (their rows only, in
    order), the others' from ``old`` (built with ranks ``k_old``)."""
    n_old = old.data.shape[0]
    idx = torch.empty(int(k.sum()), dtype=torch.long)
    keep, redo = torch.nonzero(~changed).flatten(), torch.nonzero(changed).flatten()
    idx[_rows(k, keep)] = _rows(k_old, keep)
    idx[_rows(k, redo)] = n_old + torch.arange(int(k[redo].sum()))
    return type(old)(*(torch.cat([a, b])[idx] for a, b in zip(old, new)))


def _rebuild(fac: Factors, before: Built, k: torch.Tensor, bits: torch.Tensor, assign) -> BuiltParts:
    """:func:`build_module_task` for the adapters of ``before`` whose residual ranks or bits changed;
    the others keep their parts and errors. The shared part (bases, cores) is ``before``'s: the
    same inputs give the same values, and each adapter's residual is taken against them."""
    prev = before.parts
    changed = before.changed(k, bits)
    redo = torch.nonzero(changed).flatten()
    if len(redo) == 0:
        return prev
    ch = next(iter(fac))
    U64, V64 = prev.U.values.double(), prev.V.values.double()
    S_all = prev.cores.values
    row_new = _rows(k, redo)
    kr, br = k[redo], bits[row_new]
    at = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(kr.long(), 0)])
    out: dict[str, list] = {key: [] for key in ("b", "a", "sq")}
    step = adapter_chunk(fac)
    for s in range(0, len(redo), step):
        ids = redo[s : s + step]
        B32, A32 = ch.B[ids], ch.A[ids]
        B, A = B32.double(), A32.double()
        kc = kr[s : s + step]
        ac = None if assign is None else assign[ids]
        S64 = S_all[ids].double()
        bs, as_, bq, aq = stored_residual(B, A, U64, V64, S64, kc, ac, "int8", br[int(at[s]) : int(at[s + len(ids)])],
                                          B32, A32)
        sq, _ = squared_errors(B, A, U64, V64, S64, ac, norms2=prev.nn2[ids], residual=(bq, aq))
        for key, x in zip(("b", "a", "sq"), (bs, as_, sq)):
            out[key].append(x)
    sq = prev.sq.clone()
    sq[redo] = torch.cat(out["sq"])
    return BuiltParts(prev.U, prev.V, prev.cores, _splice(prev.resid_B, cat_stored(out["b"]), k, changed, before.k),
                      _splice(prev.resid_A, cat_stored(out["a"]), k, changed, before.k), prev.spectra, sq, prev.nn2)


def build_module_task(collection: Collection, j: int, U: torch.Tensor, V: torch.Tensor, X: torch.Tensor,
                      Y: torch.Tensor, k: torch.Tensor, storage_dtype: str, core_scales: torch.dtype,
                      assign: torch.Tensor | None = None, chunk: int | None = None, bits: torch.Tensor | None = None,
                      shared_bits: tuple[int, int] | None = None, before: Built | None = None,
                      known: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                      clock: dict[str, float], factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> BuiltParts:
    """Pass 2 on module ``j``: the shared part ``U X``, ``V Y`` (``U``: (d_out, R), ``X``: (R, r);
    with clusters ``assign`` (n,): ``U`` (K, d_out, R), ``X`` (K, R, r)) with its cores, and
    residual parts of ranks ``k`` (n,), from the factors (read in float32 unless given; ``chunk``
    adapters at a time for a module larger than the memory limit), rounded (``bits``: the bits of
    every residual row, stored low-bit; ``shared_bits``: those of the bases and of the cores, whose
    cores are then the least-squares ones for the stored bases), with the exact errors of what is
    stored. In process or as a Ray task. ``before``: this module from an earlier build of the same
    shared part at low bits (factors in memory): only the adapters whose residual ranks or bits
    changed are built again (:func:`_rebuild`; the same values as a build from scratch). ``known``:
    every adapter's ``||M_i||^2`` (n,) and singular values (n, r) from pass 1 (``ModuleFit.norms2``,
    ``ModuleFit.own``: the same float64 values from the same Grams), taken instead of the Grams."""
    t0 = time.perf_counter()
    name = collection.modules[j].name
    if whitening_of(collection) is not None:  # calibration: from the whitened fit (lorazip.compress.whiten)
        parts = build_mixed_module(collection, name, U @ X, V @ Y, k, storage_dtype, core_scales, assign)
        clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t0
        return BuiltParts(*parts[:5], parts[7].float(), *parts[5:7], *parts[8:])
    fac = task_factors(collection, name, chunk, factors)
    t1 = time.perf_counter()
    if before is not None:
        parts = _rebuild(fac, before, k, bits, assign)
        clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
        clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
        return parts
    Us, Vs = _shared_storage(U @ X, V @ Y, storage_dtype, shared_bits)
    U64, V64 = Us.values.double(), Vs.values.double()
    stored = StoredBases(U64, V64) if shared_bits else None
    out: dict[str, list] = {k_: [] for k_ in ("S", "b", "a", "sq", "n2", "sp")}
    row_at = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(k.long(), 0)])
    # no shared part: an adapter that stores no residual row has nothing to build, its error is its
    # norm (exactly what the products below give: every term is zero), known from pass 1
    bare = X.shape[-1] == 0 and known is not None and not shared_bits
    for ch in fac.split(adapter_chunk(fac)):  # every part below is per adapter: float64 a few adapters at a time
        kc = k[ch.start : ch.stop]
        live = torch.nonzero(kc > 0).flatten() if bare else None
        if live is not None and len(live) < len(kc):
            out_ch = _bare_chunk(ch, kc, live, U64, V64, storage_dtype, core_scales,
                                 None if bits is None else bits[int(row_at[ch.start]) : int(row_at[ch.stop])],
                                 None if assign is None else assign[ch.start : ch.stop],
                                 known[0][ch.start : ch.stop], known[1][ch.start : ch.stop])
            for key, x in zip(("S", "b", "a", "sq", "n2", "sp"), out_ch):
                out[key].append(x)
            continue
        B, A = ch.B.double(), ch.A.double()
        ac = None if assign is None else assign[ch.start : ch.stop]
        if shared_bits:
            Ss = to_shared_lowbit(stored.cores(optimal_cores(B, A, U64, V64, ac), ac),
                                  shared_bits[1], "cores")
        else:
            Ss = to_storage(optimal_cores(B, A, U64, V64, ac), storage_dtype, core_scales)
        S64 = Ss.values.double()
        # the residual of what is stored (rounded shared part), then rounded itself
        cb = None if bits is None else bits[int(row_at[ch.start]) : int(row_at[ch.stop])]
        bs, as_, bq, aq = stored_residual(B, A, U64, V64, S64, kc, ac, storage_dtype, cb, ch.B, ch.A)
        if known is None:
            GB, GA = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
            n2, own = (GB * GA).sum((1, 2)), spectra_from_grams(GB, GA)
        else:
            n2, own = known[0][ch.start : ch.stop], known[1][ch.start : ch.stop]
        sq, nn2 = squared_errors(B, A, U64, V64, S64, ac, norms2=n2, residual=(bq, aq))
        for key, x in zip(("S", "b", "a", "sq", "n2", "sp"), (Ss, bs, as_, sq, nn2, own)):
            out[key].append(x)
        del ch, B, A
    sq, nn2, spectra = (torch.cat(out[key]) for key in ("sq", "n2", "sp"))
    clock["read_s"] = clock.get("read_s", 0.0) + t1 - t0
    clock["solve_s"] = clock.get("solve_s", 0.0) + time.perf_counter() - t1
    return BuiltParts(Us, Vs, cat_stored(out["S"]), cat_stored(out["b"]), cat_stored(out["a"]), spectra.float(), sq, nn2)


def _bare_chunk(ch, kc: torch.Tensor, live: torch.Tensor, U64, V64, storage_dtype: str, core_scales, cb,
                ac, n2: torch.Tensor, own: torch.Tensor):
    """One chunk of :func:`build_module_task` of a module with no shared part where some adapters store
    no residual row: only the ``live`` ones are read, converted and built (each part is per adapter:
    the values of the whole chunk's, to their last bits, which batched products of fewer adapters may
    round differently, :func:`~lorazip.solvers.factors.float64_chunk`); the others' errors are their
    norms ``n2``. Returns the
    chunk's (cores, b rows, a rows, errors, norms, spectra)."""
    S = torch.zeros(len(kc), 0, 0, dtype=torch.float64)  # rank 0: what optimal_cores gives
    Ss = to_storage(S, storage_dtype, core_scales)
    sq = n2.double().clone()
    if len(live):
        B32, A32 = ch.B[live], ch.A[live]
        B, A = B32.double(), A32.double()
        al = None if ac is None else ac[live]
        bs, as_, bq, aq = stored_residual(B, A, U64, V64, S[live], kc[live], al, storage_dtype, cb, B32, A32)
        sq[live] = squared_errors(B, A, U64, V64, S[live], al, norms2=n2[live], residual=(bq, aq))[0]
    else:  # nothing read: the empty rows store_residual gives
        empty = kc[:0]
        bs, as_, _, _ = store_residual(torch.zeros(0, U64.shape[-2], 0, dtype=torch.float64),
                                       torch.zeros(0, 0, V64.shape[-2], dtype=torch.float64), empty, storage_dtype, cb)
    return Ss, bs, as_, sq, n2.double(), own


def build_allocation(collection: Collection, opts: CompressOptions, fits: list[ModuleFit], plan: Plan,
                     hashes: SourceHashes, *, target_error: float | None, progress=None, dry: bool = False,
                     executor=None, kept: dict | None = None, memory: MemoryPlan | None = None,
                     before: dict[int, Built] | None = None, built: dict[int, Built] | None = None,
                     spill: Spill | None = None) -> Artifact:
    """Pass 2 of an allocated ``plan``: each module's chosen parts from its factors and its pass-1
    ``fits``, rounded, with exact errors. ``dry`` builds the same tensors' shapes and dtypes without
    computing them, to measure the file size exactly. The shared part is rounded first (int8:
    quantised, then dequantised), the residual is taken against what is stored of it, then rounded
    itself; errors are those of the stored values. ``target_error``: what the file records as the
    run's target; ``kept``: pass-1 factors to take instead of reading them again. A low-bit build in
    this process fills ``built`` (if given) with each module's parts; given as ``before`` to a later
    build of the same fits, a module with the same shared part rebuilds only the adapters whose
    residual ranks or bits changed, and one with none changed is not read at all. ``spill``: each
    module's residual rows go to its files as they are built (:mod:`lorazip.compress.spill`)."""
    n, n_mod = len(collection), len(fits)
    out = _Assembly(n, n_mod, whitening_of(collection) is not None)
    resid = [torch.from_numpy(np.asarray(m.residual, dtype=np.int64)) for m in plan.modules]
    rbits = [None if m.bits is None or not len(m.bits) else torch.from_numpy(np.asarray(m.bits, dtype=np.uint8))
             for m in plan.modules]
    storage_dtype = "int8" if plan.storage_dtype == BITS else plan.storage_dtype  # the shared parts of low bits
    if dry:
        parts = ((j, dry_parts(collection, info, mod.rank, int(resid[j].sum()), storage_dtype, core_scales(fit),
                               fit.K, rbits[j], mod.shared_bits))
                 for j, (info, fit, mod) in enumerate(zip(collection.modules, fits, plan.modules)))
    else:
        reuse = plan.storage_dtype == BITS and executor is None and not out.whitened
        prev = {j: b for j, b in (before or {}).items() if reuse and rbits[j] is not None and
                not (memory and j in memory.chunk) and b.same_shared(plan.modules[j].rank, plan.modules[j].shared_bits)}
        same = {j for j, b in prev.items() if not bool(b.changed(resid[j], rbits[j]).any())}
        args = {j: (j, fit.U, fit.V, *fit.XY[mod.rank], resid[j], storage_dtype, core_scales(fit), fit.assign,
                    memory.chunk.get(j) if memory else None, rbits[j], mod.shared_bits, prev.get(j),
                    None if fit.own is None else (fit.norms2, fit.own))
                for j, (fit, mod) in enumerate(zip(fits, plan.modules)) if j not in same}
        # a module that stores nothing (no shared part, no residual row) is not read: every adapter's
        # error is its norm, from pass 1 (build_module_task's own shortcut, on factors never read)
        unread = {j for j in args if executor is None and not out.whitened and plan.modules[j].rank == 0 and
                  not int(resid[j].sum()) and fits[j].own is not None and not plan.modules[j].shared_bits and
                  prev.get(j) is None}
        todo = [j for j in args if j not in unread]
        for j in unread if kept is not None else ():
            kept.pop(j, None)  # pass 1's factors of a module not read again: freed now
        # whitened modules are re-read by their task
        reads = FactorReads(collection, kept=kept, plan=memory, order=todo, checked=False) \
            if executor is None and not out.whitened else None
        tasks = map_modules(executor, build_module_task, collection, [args[j] for j in todo],
                            labels=[collection.modules[j].name for j in todo],
                            local=(lambda pos: reads.factors(todo[pos])) if reads else None, phase="build")
        nothing = ((j, build_module_task(collection, *args[j], clock={}, factors=_unread(collection.modules[j],
                                                                                         fits[j].own.shape[1], n)))
                   for j in sorted(unread))
        parts = _in_order(itertools.chain(nothing, ((todo[pos], got) for pos, got in tasks)), same, prev)
        if spill is not None:
            parts = _spilled(parts, spill)
        if built is not None and reuse:
            parts = _keeping(parts, built, plan, resid, rbits)
    arrived: dict[int, BuiltParts] = {}
    for count, (j, got) in enumerate(parts, 1):
        arrived[j] = got
        while len(out.modules_meta) in arrived:  # stored in module order, whatever order they come in
            m = len(out.modules_meta)
            out.add(m, arrived.pop(m), collection.modules[m], fits[m], plan.modules[m], resid[m], rbits[m])
        if progress:
            progress(n_mod + count, 2 * n_mod, collection.modules[j].name)
    meta = _allocated_meta(opts, plan, storage_dtype, target_error)
    if out.whitened:
        annotate(whitening_of(collection), meta, out.tensors, out.wsq, out.wnn2)
    art = assemble(collection, meta, out.modules_meta, out.tensors, out.sq, out.nn2, hashes, opts.keep_extras,
                   opts.extras_dtype, dry)
    art.dry = dry
    return art


def _unread(info, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins of a module's factors ``B`` (n, d_out, rank), ``A`` (n, rank, d_in) that hold no memory
    (one zero, expanded): for a build that reads none of them."""
    zero = torch.zeros((), dtype=torch.float32)
    return zero.expand(n, info.d_out, rank), zero.expand(n, rank, info.d_in)


def _in_order(tasks, same: set[int], prev: dict[int, Built]):
    """The built modules as they come, with the unchanged ones (``prev``'s parts) among them."""
    for j in sorted(same):
        yield j, prev[j].parts
    yield from tasks


def _spilled(parts, spill: Spill):
    """Pass ``parts`` on with their rows file-backed; the memory the module's build freed (its factors,
    read or kept from pass 1, and its rows) handed back to the OS (glibc keeps freed heap otherwise)."""
    for j, got in parts:
        got = _held(got, spill)
        release_freed_memory()
        yield j, got


def _held(p: BuiltParts, spill: Spill) -> BuiltParts:
    """``p`` with its residual rows (the codes of low-bit rows, the stored values otherwise) file-backed."""
    rows = {key: part._replace(data=spill.hold(part.data)) for key in ("resid_B", "resid_A")
            if (part := getattr(p, key)) is not None and isinstance(getattr(part, "data", None), torch.Tensor)}
    return replace(p, **rows) if rows else p


def _keeping(parts, built: dict[int, Built], plan: Plan, resid, rbits):
    """Pass ``parts`` on, recording each low-bit module in ``built``."""
    for j, got in parts:
        if rbits[j] is not None:
            built[j] = Built(got, plan.modules[j].rank, plan.modules[j].shared_bits, resid[j], rbits[j])
        yield j, got


class _Assembly:
    """The tensors, statistics and module entries of a build, filled module by module."""

    def __init__(self, n: int, n_mod: int, whitened: bool):
        self.tensors: dict[str, torch.Tensor] = {}
        self.sq = torch.zeros(n, n_mod, dtype=torch.float64)
        self.nn2 = torch.zeros(n, n_mod, dtype=torch.float64)
        self.whitened = whitened
        self.wsq = torch.zeros(n, n_mod, dtype=torch.float64) if whitened else None
        self.wnn2 = torch.zeros(n, n_mod, dtype=torch.float64) if whitened else None
        self.modules_meta: list[dict[str, Any]] = []

    def add(self, m: int, p: BuiltParts, info, fit: ModuleFit, plan: ModulePlan, k: torch.Tensor,
            bits: torch.Tensor | None) -> None:
        """Module ``m``'s parts ``p`` as ``plan`` says, with residual ranks ``k`` (rows at ``bits``)."""
        tensors, name, total, r = self.tensors, info.name, int(k.sum()), plan.rank
        if p.sq is not None:
            self.sq[:, m], self.nn2[:, m] = p.sq, p.nn2
        if p.wsq is not None and self.wsq is not None:
            self.wsq[:, m], self.wnn2[:, m] = p.wsq, p.wnn2
        tensors[f"spectra/{name}"] = p.spectra
        p.U.put(tensors, f"U/{name}")
        p.V.put(tensors, f"V/{name}")
        p.cores.put(tensors, f"cores/{name}")
        if fit.K > 1:
            tensors[f"assign/{name}"] = fit.assign.to(torch.int32)
        entry = {**info.entry(), "rank": r, "n_clusters": fit.K, "iters": fit.iters, "converged": fit.converged}
        if plan.shared_bits and r:
            entry["shared_bits"] = [int(b) for b in plan.shared_bits]
        if fit.quant is not None:  # measured low-bit errors (lorazip.evaluate's baselines use them)
            entry["quant"], entry["quant_rest"] = lowbit.profile_meta(fit.quant)
        if total > 0:
            tensors[f"resid_ranks/{name}"] = k.to(torch.int32)
            p.resid_B.put(tensors, f"resid_B/{name}")
            p.resid_A.put(tensors, f"resid_A/{name}")
            entry["residual"] = {"max_rank": int(k.max()), "total_rank": total}
            if bits is not None:
                tensors[f"qbits/{name}"] = bits
                entry["residual"]["bits"] = {"group": "row", "bytes": [
                    lowbit.packed_bytes(info.d_out, bits.numpy()), lowbit.packed_bytes(info.d_in, bits.numpy())]}
        self.modules_meta.append(entry)


def _allocated_meta(opts: CompressOptions, plan: Plan, storage_dtype: str, target_error: float | None) -> dict[str, Any]:
    """``meta`` of an allocated build (before :func:`assemble` completes it)."""
    ranks = [m.rank for m in plan.modules]
    clustered = plan.groups is not None
    return {
        "method": plan.method,
        "rank": max(set(ranks), key=ranks.count),
        "per_module_ranks": len(set(ranks)) > 1,
        "weighting": opts.weighting,
        **({"objective": opts.objective} if opts.objective != "energy" else {}),
        "storage_dtype": storage_dtype,
        "solver": {"max_iters": opts.max_iters, "tol": opts.tol, "seed": opts.seed, "device": "cpu",
                   "compute_dtype": "float32"},
        "clustering": plan.groups.record() if clustered else None,
        "allocation": {
            "mode": "mixed", "chosen": plan.kind, "budget_bytes": opts.budget, "target_error": target_error,
            "target_stat": opts.target_stat, "predicted_mean_error": float(plan.predicted.mean()),
            "predicted_max_error": float(plan.predicted.max()),
        },
    }


def assemble(collection: Collection, meta: dict[str, Any], modules_meta: list, tensors: dict[str, torch.Tensor],
             sq_error: torch.Tensor, norm2: torch.Tensor, hashes: SourceHashes, keep_extras: bool,
             extras_dtype: str = "auto", dry: bool = False) -> Artifact:
    """The artifact of solved modules: statistics, provenance (waits for the source hashes),
    kept non-LoRA tensors (converted to ``extras_dtype`` unless "auto", their error recorded in
    ``stats/extras_sq_error`` / ``stats/extras_norm2``), and ``meta`` (method, ranks, solver
    settings) completed. ``dry``: a dry assembly's (its size alone counts: the spectra and
    statistics are not rounded to what a file holds)."""
    tensors["stats/sq_error"] = sq_error
    tensors["stats/norm2"] = norm2
    try:
        adapters_meta = [adapter_meta(a, hashes) for a in collection.adapters]
    finally:
        hashes.close()
    if keep_extras:
        n = len(collection.adapters)
        ex_sq, ex_n2 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i, a in enumerate(collection.adapters):
            ex_sq[i], ex_n2[i], orig = store_extras(tensors, i, a.extra_tensors() if a.extras else {}, extras_dtype)
            if orig:
                adapters_meta[i]["extras_dtypes"] = orig
        if extras_dtype != "auto" and any(a.extras for a in collection.adapters):
            tensors["stats/extras_sq_error"], tensors["stats/extras_norm2"] = ex_sq, ex_n2
            meta = {**meta, "extras_dtype": extras_dtype}
    meta = {"lorazip_version": __version__, "base_model": collection.base_model, **meta,
            "modules": modules_meta, "adapters": adapters_meta}
    trim_spectra(tensors, meta)
    if not dry:
        round_small(tensors, meta)
    return Artifact(meta, tensors=tensors)
