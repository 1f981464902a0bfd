"""Low-bit baselines for issue 23: what a user would pick instead of lorazip's bit allocation.

Every baseline stores each (adapter, module) LoRA delta ``dW = s B A`` on its own (no sharing
between adapters), reparameterised by its SVD ``dW = sum_j sigma_j u_j v_j^T`` as components
``b_j = sqrt(sigma_j) u_j`` (length d_out) and ``a_j = sqrt(sigma_j) v_j`` (length d_in). The
SVD comes from the factors (QR of B and A^T, SVD of the r x r core), never from a d x d product.
Rows are quantised with lorazip's own quantiser (:mod:`lorazip.lowbit`: 1/2/3/4/8-bit codes,
one MSE-optimal scale per group of ``lowbit.GROUP`` values (None: one per row; ``--group N``
for groups of N), scales counted in the bytes at the size a file stores them), so the
comparison is about *allocation*, not about the quantiser. 16 bits means float16 rows, no scales.

* :func:`svd_at_bits`: per-adapter truncated SVD at one code width; ranks are spread greedily
  over all (adapter, module) pairs by energy-weighted error removed per byte (component j of
  adapter i gains ``sigma_j^2 / E_i``, E_i = adapter i's total energy, which is the greedy step
  for the mean of per-adapter relative errors), skipping what does not fit, until the budget is
  used. Bookkeeping: 1 byte per (adapter, module) for its rank.
* :func:`loraquant_style`: LoRAQuant (Mirzaei, Wen, Cao, Mou, "LoRAQuant: Mixed-Precision
  Quantization of LoRA to Ultra-Low Bits", arXiv 2510.26690, Oct 2025; official code
  github.com/Anonymous890920/LoRAQuant). Each LoRA (each adapter's module) is reparameterised
  as ``B' = U S^1/2``, ``A' = S^1/2 V^T``; the leading ``h`` components (h = the smallest count
  whose cumulative squared singular values reach the ratio ``rho`` of the total, at least 1; the
  official code's ``loraquant_ratio`` takes one fewer, which the rho grid covers) form
  a high-precision sub-LoRA quantised at ``high`` bits, the other ``r - h`` a low-precision
  sub-LoRA at ``low`` bits (the paper: 1-bit sign x per-group mean magnitude, which is exactly
  ``lowbit`` at 1 bit; ``low=0`` drops the tail, a variant the paper does not have). Groups of
  128 run along each column of B' and each row of A' (the official ``--along_column_B``
  setting): here the rows are the same vectors, grouped as lowbit is told (``--group 128`` for
  the paper's groups; the default is lorazip's own choice). Not followed: the paper's RTN for
  the high part is asymmetric min-max with a zero point (``lowbit`` uses MSE-optimal symmetric
  scales instead, at least as accurate) and its optional SGD refinement of the high-part factors (``--opt``) is not run; the official
  code's bit count ignores scales, here they are paid. LoRAQuant has no byte budget: every
  configuration of a grid (rho x high bits x low bits) is one point, and at each budget the
  best configuration that fits is reported (the envelope: the best a user could tune), once
  over the whole grid and once over the paper's form only (tail kept at 1-2 bits).
  Bookkeeping: 2 bytes per (adapter, module) (h and r).

Errors are exact on the dequantised factors, in factored form (Gram products, never d x d):
``e_i = sum_m ||dW_im - B^_im A^_im||^2 / sum_m ||dW_im||^2``; the collection figure is the mean
of e_i (the max is reported too), the same definition as lorazip's report
(:func:`lorazip.metrics.per_adapter`). Bytes are compared with the original LoRA factors in their
own dtype (modules_to_save extras excluded everywhere). The baselines pay only their numbers,
scales and the bookkeeping above; lorazip's figure is its whole artifact FILE (safetensors
header, metadata and statistics included).

    python benchmarks/bits_baselines.py [SOURCES ...] [--json out.json] [--markdown out.md]
        [--plot out.png] [--group N|row] [--no-lorazip]

Default sources: examples/fortunes/adapters and ../shared/fixtures/real-adapters/{gpt2,
distilbert-base-uncased}; 8 budgets log-spaced from 0.5% to 30% of the original LoRA bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorazip import lowbit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COLLECTIONS = [
    ROOT / "examples/fortunes/adapters",
    ROOT.parent / "shared/fixtures/real-adapters/gpt2",
    ROOT.parent / "shared/fixtures/real-adapters/distilbert-base-uncased",
]
LEVELS = (1, 2, 3, 4, 8, 16)  # code widths prepared for every component (16: float16, no scales)
SVD_BITS = (2, 3, 4, 8, 16)
LORAQUANT_GRID = {
    "rho": (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "high": (2, 3, 4, 8),
    "low": (0, 1, 2),  # 0: the tail is dropped
}
LORAQUANT_NO_DROP = {**LORAQUANT_GRID, "low": (1, 2)}  # the paper's form: every component stored
SVD_RANK_BYTES = 1  # per (adapter, module): its rank
LORAQUANT_BOOK_BYTES = 2  # per (adapter, module): h and r
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


# ----------------------------------------------------------------------------------------------
# preparation: SVD of every (adapter, module) and every component at every width
# ----------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One (adapter, module): its components at every width of ``LEVELS`` and the Gram data
    that give the exact error of any choice of widths (0 = dropped) per component."""

    adapter: int
    module: str
    d_out: int
    d_in: int
    sigma: np.ndarray  # (k,) singular values, descending (k = the LoRA's rank)
    norm2: float  # ||dW||_F^2 from the factors
    cost: dict  # width -> bytes of one component (codes of b_j and a_j + their scales)
    p: np.ndarray  # (V, k): <dW, b^_j a^_j^T> for each width
    H: np.ndarray  # (V, k, V, k): (b^ . b^') * (a^ . a^') for every two (width, component)
    rows: dict | None = None  # width -> (b^ (k, d_out), a^ (k, d_in)) float32, if kept

    @property
    def k(self) -> int:
        return len(self.sigma)

    def error(self, widths) -> float:
        """Exact ||dW - sum_j b^_j a^_j^T||^2 with component j at ``widths[j]`` (0: dropped)."""
        w = np.asarray(widths)
        j = np.nonzero(w)[0]
        if len(j) == 0:
            return self.norm2
        v = np.array([LEVELS.index(int(x)) for x in w[j]])
        inner = self.p[v, j].sum()
        recon = self.H[v[:, None], j[:, None], v[None, :], j[None, :]].sum()
        return max(self.norm2 - 2 * inner + recon, 0.0)

    def prefix_errors(self, bits: int) -> np.ndarray:
        """(k + 1,) exact errors keeping the leading 0..k components at ``bits``."""
        v = LEVELS.index(bits)
        Hv = self.H[v, :, v, :]
        C = np.cumsum(np.cumsum(Hv, 0), 1)
        recon = np.concatenate([[0.0], np.diagonal(C)])
        inner = np.concatenate([[0.0], np.cumsum(self.p[v])])
        return np.maximum(self.norm2 - 2 * inner + recon, 0.0)

    def bytes(self, widths) -> int:
        return int(sum(self.cost[int(x)] for x in np.asarray(widths).tolist() if x))


@dataclass
class CollectionFactors:
    """Every (adapter, module) pair of a collection, prepared once for all baselines."""

    n: int  # adapters
    pairs: list[Pair]
    names: list[str] = field(default_factory=list)
    original_bytes: int = 0  # the LoRA factors of the originals in their own dtype
    group: int | None = lowbit.GROUP  # values per scale the rows were quantised with
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def energies(self) -> np.ndarray:
        E = np.zeros(self.n)
        for q in self.pairs:
            E[q.adapter] += q.norm2
        return E

    def per_adapter(self, pair_errors) -> np.ndarray:
        """Energy-weighted relative error of every adapter from the errors of all pairs
        (0 for an adapter with zero energy reproduced exactly, as lorazip.metrics.relative)."""
        err = np.zeros(self.n)
        for q, e in zip(self.pairs, pair_errors):
            err[q.adapter] += e
        E = self.energies
        return np.where(E > 0, err / np.where(E > 0, E, 1.0), np.where(err > 0, 1.0, 0.0))


def _svd_components(B: torch.Tensor, A: torch.Tensor):
    """Batched SVD of ``B A`` (B (n, d_out, r), A (n, r, d_in), float64) from the factors:
    returns U (n, d_out, r), sigma (n, r), V (n, d_in, r), sigma descending."""
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2), mode="reduced")
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.transpose(1, 2))
    return Qb @ Uc, S, Qa @ Vch.transpose(1, 2)


def scale_itemsize(scales) -> int:
    """Bytes a file spends on each scale lowbit returned: the dtype's size, except float32 arrays
    whose values are all bfloat16 numbers (low 16 bits zero), which a file stores as bfloat16."""
    s = np.asarray(scales)
    if s.dtype == np.float32 and s.size and not (s.view(np.uint32) & 0xFFFF).any():
        return 2
    return s.dtype.itemsize


def _quantised_rows(X: np.ndarray, owners: np.ndarray, bits: int, group):
    """Dequantised rows of X (N, L) at ``bits`` and the scale itemsize of each row's owner pair.

    Scales are per group of one row, so quantising all pairs of a module at once gives each row
    what quantising its pair alone gives, as long as the scales' storage dtype is the same for
    all; if lowbit widened it for the whole tensor (a float32 fallback), each pair is redone
    alone, so one pair's wide scales do not cost the others."""
    N, L = X.shape
    if bits == 16:
        h = X.astype(np.float16)
        if not np.isfinite(h).all():
            raise ValueError("a component overflows float16")
        return h.astype(np.float32), {int(o): 0 for o in np.unique(owners)}
    codes, scales = lowbit.quantize(torch.from_numpy(X), bits, group)
    size = scale_itemsize(scales)
    if size <= 2:
        return lowbit.dequantize(codes, scales, bits, group), {int(o): size for o in np.unique(owners)}
    out = np.empty((N, L), dtype=np.float32)
    sizes = {}
    for o in np.unique(owners):
        idx = np.nonzero(owners == o)[0]
        c, sc = lowbit.quantize(torch.from_numpy(X[idx]), bits, group)
        out[idx] = lowbit.dequantize(c, sc, bits, group)
        sizes[int(o)] = scale_itemsize(sc)
    return out, sizes


def prepare_module(B: torch.Tensor, A: torch.Tensor, ranks, adapters, module: str, *,
                   group: int | None = lowbit.GROUP, keep_rows: bool = False) -> list[Pair]:
    """The pairs of one module: B (n, d_out, r_max), A (n, r_max, d_in) with the scale folded in,
    ``ranks`` (n,) (0: the adapter lacks the module), ``adapters`` (n,) their collection indices."""
    B, A = B.to(torch.float64), A.to(torch.float64)
    n, d_out, r_max = B.shape
    d_in = A.shape[2]
    ranks = [int(x) for x in ranks]
    keep = [i for i in range(n) if ranks[i] > 0]
    if not keep:
        return []
    B, A = B[keep], A[keep]
    ranks = [ranks[i] for i in keep]
    adapters = [int(adapters[i]) for i in keep]
    n = len(keep)
    norm2 = ((B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))).sum(dim=(1, 2)).clamp_min(0)
    U, S, V = _svd_components(B, A)
    root = S.clamp_min(0).sqrt()
    brows = (U * root[:, None, :]).transpose(1, 2)  # (n, r_max, d_out): b_j as rows
    arows = (V * root[:, None, :]).transpose(1, 2)  # (n, r_max, d_in)
    sel = [(i, j) for i in range(n) for j in range(ranks[i])]  # each pair's own rank only
    si = torch.tensor([s[0] for s in sel])
    sj = torch.tensor([s[1] for s in sel])
    Xb = brows[si, sj].numpy()
    Xa = arows[si, sj].numpy()
    owners = si.numpy()
    nv = len(LEVELS)
    Bq = np.zeros((n, nv, r_max, d_out), dtype=np.float32)
    Aq = np.zeros((n, nv, r_max, d_in), dtype=np.float32)
    cost = [dict() for _ in range(n)]
    for v, bits in enumerate(LEVELS):
        qb, sb = _quantised_rows(Xb, owners, bits, group)
        qa, sa = _quantised_rows(Xa, owners, bits, group)
        Bq[owners, v, sj.numpy()] = qb
        Aq[owners, v, sj.numpy()] = qa
        for i in range(n):
            if bits == 16:
                cost[i][bits] = 2 * (d_out + d_in)
            else:
                cost[i][bits] = (lowbit.row_bytes(d_out, bits) + lowbit.row_bytes(d_in, bits)
                                 + lowbit.n_groups(d_out, group) * sb[i] + lowbit.n_groups(d_in, group) * sa[i])
    Bh = torch.from_numpy(Bq).to(torch.float64).reshape(n, nv * r_max, d_out)
    Ah = torch.from_numpy(Aq).to(torch.float64).reshape(n, nv * r_max, d_in)
    p = ((Bh @ B) * (Ah @ A.transpose(1, 2))).sum(-1)  # (n, V r): b^T B A a = (B^T b).(A a)
    H = (Bh @ Bh.transpose(1, 2)) * (Ah @ Ah.transpose(1, 2))  # (n, V r, V r)
    p = p.reshape(n, nv, r_max).numpy()
    H = H.reshape(n, nv, r_max, nv, r_max).numpy()
    out = []
    for i in range(n):
        k = ranks[i]
        rows = None
        if keep_rows:
            rows = {bits: (Bq[i, v, :k].copy(), Aq[i, v, :k].copy()) for v, bits in enumerate(LEVELS)}
        out.append(Pair(adapters[i], module, d_out, d_in, S[i, :k].numpy().copy(), float(norm2[i]), cost[i],
                        p[i, :, :k].copy(), H[i, :, :k, :, :k].copy(), rows))
    return out


def from_factors(factors, n: int, *, group: int | None = lowbit.GROUP, keep_rows: bool = False,
                 original_bytes: int | None = None) -> CollectionFactors:
    """Prepared pairs from plain factors: ``factors`` is a list of ``(adapter, module, B, A)``
    with B (d_out, r) and A (r, d_in) (scale folded in), each pair prepared alone."""
    pairs = []
    for a, name, B, A in factors:
        B, A = torch.as_tensor(B, dtype=torch.float64), torch.as_tensor(A, dtype=torch.float64)
        pairs += prepare_module(B[None], A[None], [B.shape[1]], [a], name, group=group, keep_rows=keep_rows)
    if original_bytes is None:
        original_bytes = sum(4 * (np.shape(B)[0] + np.shape(A)[1]) * np.shape(B)[1] for _, _, B, A in factors)
    return CollectionFactors(n, pairs, [str(i) for i in range(n)], int(original_bytes), group)


def original_bytes(coll) -> int:
    """Bytes of the originals' LoRA factors in their own dtype (from the safetensors headers;
    modules_to_save extras not counted)."""
    total = 0
    for a in coll.adapters:
        header = None
        if str(a.weights_file).endswith(".safetensors"):
            with open(a.weights_file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for spec in a.modules.values():
            for key in (spec.key_A, spec.key_B):
                if header is not None and key in header:
                    info = header[key]
                    total += math.prod(info["shape"]) * _ST_ITEMSIZE[info["dtype"]]
                else:  # pickled adapter: the adapter's widest dtype
                    item = max(_ST_ITEMSIZE.get(d, 4) for d in a.dtype.split("/"))
                    total += spec.rank * (spec.d_out if key == spec.key_B else spec.d_in) * item
    return total


def collection_factors(coll, *, group: int | None = lowbit.GROUP, keep_rows: bool = False,
                       progress=None) -> CollectionFactors:
    """Prepare every (adapter, module) pair of a :class:`lorazip.Collection`, module by module."""
    pairs = []
    for k, m in enumerate(coll.modules):
        f = coll.module_factors(m.name, dtype=torch.float64)
        pairs += prepare_module(f.B, f.A, f.ranks.tolist(), range(len(coll)), m.name, group=group,
                                keep_rows=keep_rows)
        if progress:
            progress(k + 1, len(coll.modules), m.name)
    return CollectionFactors(len(coll), pairs, coll.names, original_bytes(coll), group)


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------
def _result(cf: CollectionFactors, widths: list[np.ndarray], nbytes: int, **extra) -> dict:
    pair_err = [q.error(w) for q, w in zip(cf.pairs, widths)]
    e = cf.per_adapter(pair_err)
    return {"reachable": True, "bytes": int(nbytes), "mean": float(e.mean()), "max": float(e.max()),
            "per_adapter": e.tolist(), "widths": widths, **extra}


def svd_at_bits(cf: CollectionFactors, budget_bytes: int, bits: int) -> dict:
    """Per-adapter truncated SVD with every component at ``bits`` (2, 3, 4, 8 or 16), ranks spread
    greedily over all pairs by ``sigma_j^2 / E_i`` per byte until ``budget_bytes`` is used.

    Returns ``{"reachable", "bytes", "mean", "max", "per_adapter", "widths", "ranks"}``; widths:
    per pair, each component's width (0: not stored). The error is exact on the dequantised rows."""
    book = SVD_RANK_BYTES * len(cf.pairs)
    if budget_bytes < book:
        return {"reachable": False, "bytes": None, "mean": None, "max": None}
    E = cf.energies
    if ("svd_order", bits) not in cf._cache:
        gain, cost, pid, jj = [], [], [], []
        for t, q in enumerate(cf.pairs):
            keep = q.sigma > 0
            g = np.where(keep, q.sigma ** 2 / max(E[q.adapter], 1e-300), 0.0)[keep]
            gain.append(g)
            cost.append(np.full(len(g), q.cost[bits], dtype=np.int64))
            pid.append(np.full(len(g), t))
            jj.append(np.arange(len(g)))
        gain, cost, pid, jj = map(np.concatenate, (gain, cost, pid, jj))
        order = np.lexsort((jj, pid, -(gain / cost)))  # best ratio first; within a pair, j ascending
        cf._cache[("svd_order", bits)] = (cost[order], pid[order])
        cf._cache[("svd_prefix", bits)] = [q.prefix_errors(bits) for q in cf.pairs]
    cost, pid = cf._cache[("svd_order", bits)]
    ranks = np.zeros(len(cf.pairs), dtype=np.int64)
    left = budget_bytes - book
    # skip what does not fit: within a pair every component costs the same, so each pair's
    # stored components stay a prefix (and, in ratio order, more budget never removes gain)
    for c, t in zip(cost.tolist(), pid.tolist()):
        if c <= left:
            left -= c
            ranks[t] += 1
    prefix = cf._cache[("svd_prefix", bits)]
    pair_err = [prefix[t][ranks[t]] for t in range(len(cf.pairs))]
    e = cf.per_adapter(pair_err)
    widths = [np.where(np.arange(q.k) < ranks[t], bits, 0) for t, q in enumerate(cf.pairs)]
    nbytes = book + sum(int(ranks[t]) * q.cost[bits] for t, q in enumerate(cf.pairs))
    return {"reachable": True, "bytes": int(nbytes), "mean": float(e.mean()), "max": float(e.max()),
            "per_adapter": e.tolist(), "widths": widths, "ranks": ranks.tolist(),
            "components": int(ranks.sum())}


def loraquant_split(sigma: np.ndarray, rho: float) -> int:
    """LoRAQuant's h: the smallest number of leading components whose squared singular values
    reach ``rho`` of the total (at least 1, at most r)."""
    s2 = np.asarray(sigma, dtype=np.float64) ** 2
    tot = s2.sum()
    if tot <= 0:
        return 1
    h = int(np.searchsorted(np.cumsum(s2) / tot, rho - 1e-12)) + 1
    return max(1, min(h, len(s2)))


def loraquant_config(cf: CollectionFactors, rho: float, high: int, low: int) -> dict:
    """One LoRAQuant configuration on every pair: bytes and exact errors (cached)."""
    key = ("lq", rho, high, low)
    if key not in cf._cache:
        widths = []
        for q in cf.pairs:
            h = loraquant_split(q.sigma, rho)
            widths.append(np.where(np.arange(q.k) < h, high, low))
        nbytes = LORAQUANT_BOOK_BYTES * len(cf.pairs) + sum(q.bytes(w) for q, w in zip(cf.pairs, widths))
        cf._cache[key] = _result(cf, widths, nbytes, config={"rho": rho, "high": high, "low": low})
    return cf._cache[key]


def loraquant_style(cf: CollectionFactors, budget_bytes: int, grid: dict | None = None) -> dict:
    """The best LoRAQuant configuration of ``grid`` (rho x high bits x low bits, low 0 = tail
    dropped) whose bytes fit ``budget_bytes`` (the envelope); ``reachable`` False if none fits."""
    grid = grid or LORAQUANT_GRID
    best = None
    fits = 0
    for rho in grid["rho"]:
        for high in grid["high"]:
            for low in grid["low"]:
                if low and low >= high:
                    continue
                r = loraquant_config(cf, rho, high, low)
                if r["bytes"] <= budget_bytes:
                    fits += 1
                    if best is None or r["mean"] < best["mean"]:
                        best = r
    if best is None:
        return {"reachable": False, "bytes": None, "mean": None, "max": None, "configs_fitting": 0}
    return {**best, "configs_fitting": fits}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def run_lorazip(coll, budget: int) -> dict:
    import lorazip
    from lorazip.metrics import per_adapter

    t = time.perf_counter()
    try:
        art = lorazip.compress(coll, budget=int(budget), keep_extras=False, hash_sources=False)
    except lorazip.OptionError as exc:
        return {"reachable": False, "bytes": None, "mean": None, "max": None, "why": str(exc).splitlines()[0],
                "seconds": time.perf_counter() - t}
    e = per_adapter(*art.stats())
    return {"reachable": True, "bytes": int(art.serialized_size()), "mean": float(e.mean()), "max": float(e.max()),
            "storage_dtype": art.meta.get("storage_dtype"), "seconds": time.perf_counter() - t}


def _slim(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("widths", "per_adapter", "ranks")}


def evaluate_collection(source, fractions, *, with_lorazip: bool = True, group=lowbit.GROUP, log=print) -> dict:
    import lorazip

    coll = lorazip.load_collection(source)
    t0 = time.perf_counter()
    cf = collection_factors(coll, group=group)
    prep = time.perf_counter() - t0
    orig = cf.original_bytes
    log(f"{source}: {len(coll)} adapters, {len(coll.modules)} modules, {len(cf.pairs)} pairs, "
        f"original LoRA bytes {orig:,}; prepared in {prep:.1f}s")
    rows = []
    t_base = t_lz = 0.0
    for frac in fractions:
        budget = int(round(frac * orig))
        t = time.perf_counter()
        row = {"fraction": frac, "budget": budget}
        for bits in SVD_BITS:
            row[f"svd{bits}"] = _slim(svd_at_bits(cf, budget, bits))
        row["loraquant"] = _slim(loraquant_style(cf, budget))
        row["loraquant_no_drop"] = _slim(loraquant_style(cf, budget, LORAQUANT_NO_DROP))
        t_base += time.perf_counter() - t
        if with_lorazip:
            row["lorazip"] = run_lorazip(coll, budget)
            t_lz += row["lorazip"]["seconds"]
        rows.append(row)
        log(_md_row(row))
    return {"collection": str(source), "adapters": len(coll), "modules": len(coll.modules), "pairs": len(cf.pairs),
            "original_bytes": orig, "storage_dtype": coll.storage_dtype(), "rows": rows,
            "seconds": {"prepare": prep, "baselines": t_base, "lorazip": t_lz}}


METHODS = ["lorazip"] + [f"svd{b}" for b in SVD_BITS] + ["loraquant", "loraquant_no_drop"]
HEAD = ("| budget % | budget bytes | lorazip file bytes | lorazip | SVD@2 | SVD@3 | SVD@4 | SVD@8 | SVD@16 (fp16) "
        "| LoRAQuant-style, best of grid | LoRAQuant, tail kept (paper) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(r: dict | None) -> str:
    if r is None:
        return "not run"
    if not r.get("reachable"):
        return "not reachable"
    return f"{r['mean']:.4f} / {r['max']:.4f}"


def _fmt_lq(lq: dict) -> str:
    cfg = lq.get("config")
    return _fmt(lq) + (f" (rho {cfg['rho']}, {cfg['high']}/{cfg['low'] or 'drop'} bit, {lq['bytes']:,} B)" if cfg else "")


def _md_row(row: dict) -> str:
    lz = row.get("lorazip")
    cells = [f"{100 * row['fraction']:.2f}", f"{row['budget']:,}",
             f"{lz['bytes']:,}" if lz and lz.get("reachable") else "-", _fmt(lz)]
    cells += [_fmt(row[f"svd{b}"]) for b in SVD_BITS] + [_fmt_lq(row["loraquant"]), _fmt_lq(row["loraquant_no_drop"])]
    return "| " + " | ".join(cells) + " |"


def markdown(results: list[dict]) -> str:
    out = []
    for res in results:
        out.append(f"### {res['collection']}: {res['adapters']} adapters, {res['modules']} modules, "
                   f"original LoRA factors {res['original_bytes']:,} bytes ({res['storage_dtype']})\n")
        out.append("Mean / max per-adapter relative squared error. Baselines pay numbers + scales + "
                   "bookkeeping only; lorazip pays its whole file (header, metadata, statistics).\n")
        out.append(HEAD)
        out += [_md_row(r) for r in res["rows"]]
        s = res["seconds"]
        out.append(f"\nseconds: prepare {s['prepare']:.1f}, baselines {s['baselines']:.1f}, "
                   f"lorazip {s['lorazip']:.1f}\n")
    return "\n".join(out)


def plot(results: list[dict], path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(results), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    styles = {"lorazip": ("o-", "lorazip --budget (file bytes)"), "loraquant": ("*--", "LoRAQuant-style, best of grid"),
              "loraquant_no_drop": ("+--", "LoRAQuant, tail kept (paper)")}
    styles.update({f"svd{b}": ("x:" if b == 16 else ".:", f"per-adapter SVD @{b} bit" if b < 16 else
                               "per-adapter SVD @fp16") for b in SVD_BITS})
    for k, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), k + 1)
        for m in METHODS:
            pts = [(r[m]["bytes"], r[m]["mean"]) for r in res["rows"] if r.get(m, {}).get("reachable")]
            if pts:
                x, y = zip(*sorted(pts))
                ax.plot(np.array(x) / 1e6, np.maximum(y, 1e-8), styles[m][0], label=styles[m][1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes (MB)")
        ax.set_ylabel("mean rel. sq. error")
        ax.set_title(Path(res["collection"]).name + f" ({res['adapters']})", fontsize=9)
        if k == 0:
            ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", help="collections (default: the bundled one and the two fixture sets)")
    ap.add_argument("--budgets", type=int, default=8, help="log-spaced budgets (default 8)")
    ap.add_argument("--min-fraction", type=float, default=0.005)
    ap.add_argument("--max-fraction", type=float, default=0.30)
    ap.add_argument("--no-lorazip", action="store_true", help="baselines only")
    ap.add_argument("--json", help="write the JSON here (default: stdout, and the tables go to stderr)")
    ap.add_argument("--markdown", help="also write the markdown tables here")
    ap.add_argument("--plot", help="log-log error-vs-bytes plot (PNG; needs matplotlib)")
    ap.add_argument("--group", default=None,
                    help=f"values per scale for the baselines (default lowbit.GROUP = {lowbit.GROUP}; 'row': one per row)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    group = lowbit.GROUP if args.group is None else (None if args.group in ("row", "none", "None") else int(args.group))
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = args.sources or [str(p) for p in DEFAULT_COLLECTIONS if p.exists()]
    fractions = np.geomspace(args.min_fraction, args.max_fraction, args.budgets).tolist()
    t0 = time.perf_counter()
    results = [evaluate_collection(s, fractions, with_lorazip=not args.no_lorazip, group=group,
                                   log=lambda m: print(m, file=sys.stderr, flush=True)) for s in sources]
    doc = {"note": "errors: mean/max over adapters of sum_m ||dW - What||^2 / sum_m ||dW||^2 (exact); baselines' bytes: "
                   "packed codes + lowbit scales (as stored: bfloat16/float16 = 2 bytes) + bookkeeping (svd: 1 byte/pair rank; loraquant: 2 bytes/pair h, r), no "
                   "file header; lorazip's bytes: its whole serialized file (header, metadata, statistics)",
           "group": group, "loraquant_grid": LORAQUANT_GRID, "results": results,
           "seconds": time.perf_counter() - t0}
    md = markdown(results)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(md)
    else:
        print(json.dumps(doc, indent=1))
        print(md, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
