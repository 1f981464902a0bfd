"""Low-bit storage of rows: 1, 2, 3, 4 or 8-bit codes, one scale per group of a row, bit-packed.

A row ``x`` of length ``L`` is cut into groups of ``g`` values (the last one may be shorter;
lorazip stores one group per row, :data:`GROUP` None: on the residual rows of real collections
a scale per 32-256 values removes 5-20% of the error for 0.06-0.5 more bits per number, less
than those bits buy as precision; benchmarks/quant_groups.py, docs/benchmarks.md). Each group has a scale ``s`` and each value a code
``u`` in ``0 .. 2^b - 1``; a reader gets ``(u - (2^b - 1) / 2) * s`` in float32. The grid is
symmetric around zero without a zero level ("mid-rise"): all ``2^b`` codes are used, which is
what makes 1 bit (``±s/2``, a sign and a scale) and 2 bits (``±s/2, ±3s/2``) worth storing.

The scale of a group is chosen for the smallest squared error of that group, not from its
largest value: a few clipping levels are tried (around the best one for Gaussian values of the
group's spread, and the group's maximum), the best is refined by least squares (the optimal scale for the codes it gives),
then rounded to the scale's dtype, and the codes are taken again for the rounded scale, so
what a reader computes is exactly what the error was measured on. Scales are bfloat16: residual
rows of small adapters have scales far below float16's normal range, and 8 bits of mantissa in
a scale cost nothing (the codes are chosen for the rounded scale).

Packing: the codes of a row, least significant bit first, fill ``ceil(L * b / 8)`` bytes (rows
start on a byte boundary, so any row can be read alone); rows of different widths follow one
another. Everything here but :func:`quantize` is numpy, so readers need no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .layout import row_bytes  # noqa: F401 (one definition, numpy-free for lorazip info; used here and imported from here)

if TYPE_CHECKING:
    import torch

BITS = (1, 2, 3, 4, 8)  # code widths a row may have
# Relative squared error of a rank-1 part x y^T with both rows stored at each of BITS, measured on the
# bundled collection's per-adapter SVD components (benchmarks/quant_groups.py): the model where an
# artifact records no profile of its own (module metadata "quant")
DEFAULT_QUANT = (0.5286, 0.1836, 0.0558, 0.0165, 0.0001)
GROUP = None  # values per scale; None: one scale per row (chosen by measurement: benchmarks/quant_groups.py)
_GAUSS_CLIP = {2: 1.494, 3: 2.051, 4: 2.513, 8: 4.0}  # outermost level / rms of the best uniform grid of a Gaussian
_CLIP_OF = np.array([_GAUSS_CLIP.get(w, 0.0) for w in range(9)], dtype=np.float32)  # by width, for rows of several


def n_groups(length: int, group: int | None) -> int:
    """Scales per row of ``length`` values with groups of ``group`` (None: one per row)."""
    if not length:
        return 0
    return 1 if group is None else max(1, -(-int(length) // int(group)))


def packed_bytes(length: int, bits) -> int:
    """Bytes of rows of ``length`` values with the given per-row ``bits`` (any iterable)."""
    return int(row_offsets(length, bits)[-1])


def _levels(bits: int) -> float:
    return (2 ** int(bits) - 1) / 2.0


def quantize(x: "torch.Tensor", bits, group: int | None = GROUP, values: bool = False):
    """Codes and scales of the rows of ``x`` (N, L) at ``bits`` (an int, or (N,) per row):
    ``(codes (N, L) uint8, scales (N, G) float32)``, numpy; the scales are bfloat16 values (what
    the file stores) and a reader gets :func:`dequantize` of the two. ``values``: also those float32
    values (N, L), the same bit for bit, made from the codes while they are at hand."""
    import torch

    x = x.detach().to("cpu", torch.float32)
    if x.dim() != 2:
        raise ValueError("low-bit storage quantises rows: a 2-D tensor")
    if not all_finite(x):
        raise ValueError("cannot quantise NaN or Inf values")
    N, L = x.shape
    b = np.broadcast_to(np.asarray(bits, dtype=np.int64), (N,)).copy()
    known = np.isin(b, BITS)
    if not known.all():
        raise ValueError(f"bits must be among {BITS}, got {sorted(set(b[~known].tolist()))}")
    G = n_groups(L, group)
    codes = np.zeros((N, L), dtype=np.uint8)
    scales = np.zeros((N, G), dtype=np.float32)
    vals = np.zeros((N, L), dtype=np.float32) if values else None
    if N == 0 or L == 0:
        return (codes, scales, vals) if values else (codes, scales)
    pad = G * int(group) - L if G > 1 else 0
    xg = (torch.nn.functional.pad(x, (0, pad)) if pad else x).reshape(N, G, -1)  # (N, G, g)
    mask = None  # with no padding every value counts (multiplying by ones would change nothing)
    if pad:
        mask = torch.ones(L + pad, dtype=torch.float32)
        mask[L:] = 0
        mask = mask.reshape(G, -1)
    step = max(1, _CHUNK // max(xg[0].numel(), 1))
    klass = np.where(b == 1, 0, np.where(b == 8, 2, 1))  # 1 and 8 bits need no clip search; 2, 3 and 4 bits search together
    for k, widths in enumerate(((1,), (2, 3, 4), (8,))):
        idx = np.nonzero(klass == k)[0]
        for lo in range(0, len(idx), step):  # a few rows at a time: the clip search holds _CLIPS copies
            sel = idx[lo : lo + step]
            whole = len(sel) == N  # every row: the block is x itself (no gathered copy)
            part = xg if whole else xg[torch.from_numpy(sel)]
            bw = widths[0] if len(widths) == 1 else (b if whole else b[sel])
            h = _half(bw)
            s = _best_scales(part, mask, bw, h).to(torch.bfloat16).float()  # the codes are taken for the stored scale
            if not bool(torch.isfinite(s).all()):
                raise ValueError("group scales overflow bfloat16")
            scales[sel] = s.numpy()
            q = _codes(part, s, h)
            codes[sel] = q.reshape(len(sel), -1)[:, :L].to(torch.uint8).numpy()
            if values:  # dequantize's arithmetic, in float32: (code - h) * scale
                vals[sel] = q.sub_(h).mul_(s[..., None]).reshape(len(sel), -1)[:, :L].numpy()
    return (codes, scales, vals) if values else (codes, scales)


def all_finite(x: "torch.Tensor") -> bool:
    """Whether every value of ``x`` is finite: its sum is (NaN and Inf reach the sum), else, since
    a sum of finite values may overflow, a check of each value."""
    import torch

    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


_CHUNK = 1 << 19  # values per block of the scale search (the same results at any size; 2 MB blocks stay in
# cache through its passes, and fewer calls than smaller ones: 10% faster than 4 MB at 576-4096 values a row)
_REFINE = 2  # least-squares refinements of a group's scale


def _half(bits) -> "float | torch.Tensor":
    """``(2^b - 1) / 2``: a float for one width, or per row (N, 1, 1) float32 for widths (N,) of rows
    (N, G, g) (the same float32 values either way, so the arithmetic below is the same)."""
    import torch

    if isinstance(bits, (int, np.integer)):
        return _levels(bits)
    return torch.from_numpy(((2.0 ** np.asarray(bits, dtype=np.float64) - 1) / 2).astype(np.float32))[:, None, None]


def _codes(xg: "torch.Tensor", s: "torch.Tensor", h) -> "torch.Tensor":
    """Nearest codes (same shape as ``xg`` (N, G, g)) for scales ``s`` (N, G) with half-ranges ``h``
    (:func:`_half`: one width, or one per row); a 0 scale gives the code of -s/2."""
    import torch

    safe = torch.where(s > 0, s, 1.0)[..., None]
    return _clamped((xg / safe).add_(h).round_(), h)  # in place: one block allocated, not three


def _clamped(q: "torch.Tensor", h) -> "torch.Tensor":
    """``q`` clamped to the codes ``0 .. 2h`` in place (``h`` one half-range or one per row)."""
    import torch

    return q.clamp_(0, 2 * h) if not torch.is_tensor(h) else torch.minimum(q.clamp_min_(0), 2 * h, out=q)


def _sums(lv: "torch.Tensor", x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(l.l, l.x)`` over the last axis of levels ``lv`` (overwritten) and values ``x`` (broadcast
    against them): the first without the products' array (``torch.linalg.vecdot`` writes them first,
    and takes twice as long), the second in ``lv``'s place."""
    import torch

    return torch.einsum("...k,...k->...", lv, lv), lv.mul_(x).sum(-1)


def _best_scales(xg: "torch.Tensor", mask: "torch.Tensor | None", bits, h) -> "torch.Tensor":
    """Per group (N, G) the scale with the least squared error among a few clipping levels (all
    tried at once), then :data:`_REFINE` least-squares refinements (the best scale for the codes it gives;
    alternating codes and scale never increases the error). ``mask`` (G, g) zeroes the padding of
    the last group (None: no padding); ``h``: :func:`_half` of ``bits``.

    For codes ``u`` (levels ``l = u - h``) at scale ``c`` the error is ``c^2 l.l - 2 c l.x + x.x``: each
    clipping level's error, and the first refinement (``l.x / l.l`` of the best level's codes), come
    from the two sums of its levels, without the dequantised values."""
    import torch

    def masked(t: "torch.Tensor") -> "torch.Tensor":
        return t if mask is None else t * mask

    one = isinstance(bits, (int, np.integer))
    hg = h if one else h[..., 0]  # per group: (N, 1) against (N, G)
    a = masked(xg.abs())
    cnt = float(xg.shape[-1]) if mask is None else mask.sum(-1).clamp_min(1)
    amax = a.amax(-1)
    mean = a.sum(-1) / cnt
    if one and bits == 1:  # ±s/2: the optimal s/2 is the mean magnitude (the codes are the signs)
        return 2 * mean
    if one and bits == 8:  # 255 levels: clipping gains nothing measurable; the largest value on the outermost level
        return amax / h
    rms = (masked(xg * xg).sum(-1) / cnt).sqrt()
    clip = _GAUSS_CLIP[bits] if one else torch.from_numpy(_CLIP_OF[np.asarray(bits)])[:, None]
    c0 = torch.minimum(rms * clip, amax)  # the best clip for Gaussian values, and near it
    cand = torch.stack([c0 * 0.8, c0, torch.minimum(c0 * 1.25, amax), amax]) / hg  # (C, N, G)
    # every level's codes in one (C, N, G, g) block, in place (the scale search is most of a low-bit
    # build); rows of 2, 3 and 4 bits in one block, each with its own levels
    lv = masked(_clamped((xg[None] / cand.clamp_min(1e-30)[..., None]).add_(h).round_(), h).sub_(h))
    den, num = _sums(lv, xg)  # (C, N, G)
    del lv
    best = (cand * (cand * den - 2 * num)).argmin(0, keepdim=True)  # the error less x.x
    s, den, num = (t.gather(0, best)[0] for t in (cand, den, num))
    for it in range(_REFINE):  # for fixed codes the error is a parabola in the scale: its minimum, in closed form
        if it:
            den, num = _sums(masked(_codes(xg, s, h).sub_(h)), xg)
        ls = num / den.clamp_min(1e-30)
        s = torch.where((den > 0) & (ls > 0), ls, s)
    return s.masked_fill_(amax <= 0, 0.0)


def dequantize(codes: np.ndarray, scales: np.ndarray, bits, group: int | None = GROUP) -> np.ndarray:
    """float32 values (N, L) of ``codes`` (N, L) with ``scales`` (N, G) at per-row ``bits``."""
    N, L = codes.shape
    b = np.broadcast_to(np.asarray(bits, dtype=np.int64), (N,))
    h = ((2.0 ** b - 1) / 2).astype(np.float32)[:, None]
    s = np.asarray(scales, dtype=np.float32)
    G = s.shape[1] if s.ndim == 2 else 0
    per_value = np.repeat(s, group, axis=1)[:, :L] if G > 1 else (s if G else np.zeros((N, 1), np.float32))
    return ((codes.astype(np.float32) - h) * per_value).astype(np.float32)


def pack(codes: np.ndarray, bits) -> np.ndarray:
    """The rows of ``codes`` (N, L) uint8 at per-row ``bits``, packed one after the other (1-D uint8)."""
    N, L = codes.shape
    b = np.broadcast_to(np.asarray(bits, dtype=np.int64), (N,))
    offs = row_offsets(L, b)
    out = np.zeros(int(offs[-1]), dtype=np.uint8)
    for w in sorted(set(b.tolist())):
        idx = np.nonzero(b == w)[0]
        for lo in range(0, len(idx), _block_rows(L)):  # rows of one width have one size: a block lands at once
            part = idx[lo : lo + _block_rows(L)]
            rows = codes[part]
            if rows.max(initial=0) >= 2 ** w:
                raise ValueError(f"a code does not fit in {w} bits")
            packed = _pack_width(rows, w)
            for at, (s, e) in _runs(part, offs, row_bytes(L, w)):
                out[at] = packed[s:e].reshape(-1)
    return out


def _runs(part: np.ndarray, offs: np.ndarray, nbytes: int):
    """Where rows ``part`` (ascending) of ``nbytes`` packed bytes each lie in the packed buffer: each run
    of consecutive rows as one slice (``(slice, (first, end))`` in ``part``), or, where runs are short
    (on average under 4 rows), one flat index of every byte for the whole block (one assignment
    instead of many small ones). Either way ``buf[at]`` is the rows ``first .. end - 1``, row after row."""
    brk = np.flatnonzero(np.diff(part) != 1) + 1
    if 4 * (len(brk) + 1) > len(part):
        yield (offs[part][:, None] + np.arange(nbytes)).reshape(-1), (0, len(part))
        return
    for s, e in zip([0, *brk.tolist()], [*brk.tolist(), len(part)]):
        at = int(offs[part[s]])
        yield slice(at, at + (e - s) * nbytes), (s, e)


def _block_rows(length: int) -> int:
    """Rows packed or unpacked at a time (about 4 M values)."""
    return max(1, (1 << 22) // max(int(length), 1))


def _pack_width(codes: np.ndarray, w: int) -> np.ndarray:
    """(n, row_bytes(L, w)) packed bytes of codes (n, L) at ``w`` bits, least significant bit first:
    at 1, 2 and 4 bits each byte holds ``8 / w`` whole values; at 3 bits each 8 values are the three
    low bytes of the little-endian 32-bit word ``sum_j code_j << 3 j``; at 8 bits the codes are the bytes."""
    n, L = codes.shape
    if w == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per = 8 // w if w != 3 else 8  # values per byte, or per 3 bytes
    groups = -(-L // per)
    if L == groups * per:
        grouped = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, groups, per)
    else:
        padded = np.zeros((n, groups * per), dtype=np.uint8)  # zero codes past the end: zero bits
        padded[:, :L] = codes
        grouped = padded.reshape(n, groups, per)
    c = [grouped[..., j] for j in range(per)]
    if w == 3:  # the word's three bytes, each made in uint8 (a quarter of the memory traffic of the word)
        word = np.empty((n, groups, 3), dtype=np.uint8)
        word[..., 0] = c[0] | (c[1] << 3) | (c[2] << 6)
        word[..., 1] = (c[2] >> 2) | (c[3] << 1) | (c[4] << 4) | (c[5] << 7)
        word[..., 2] = (c[5] >> 1) | (c[6] << 2) | (c[7] << 5)
    else:
        word = c[0].copy()
        for j in range(1, per):  # a few whole-array operations (a reduction over a short axis is slow)
            word |= c[j] << np.uint8(w * j)
    return word.reshape(n, -1)[:, : row_bytes(L, w)]


def _unpack_width(rows: np.ndarray, w: int, L: int) -> np.ndarray:
    """Codes (n, L) of packed rows (n, row_bytes(L, w)) at ``w`` bits (:func:`_pack_width` undone)."""
    n = rows.shape[0]
    if w == 8:
        return rows.reshape(n, L).astype(np.uint8)
    per = 8 if w == 3 else 8 // w
    groups = -(-L // per)
    width = groups * (3 if w == 3 else 1)  # packed bytes of the padded row
    if rows.shape[1] == width:
        flat = np.ascontiguousarray(rows, dtype=np.uint8)
    else:
        flat = np.zeros((n, width), dtype=np.uint8)
        flat[:, : rows.shape[1]] = rows
    codes = np.empty((n, groups, per), dtype=np.uint8)
    if w == 3:
        b0, b1, b2 = (flat.reshape(n, groups, 3)[..., j] for j in range(3))
        codes[..., 0] = b0 & 7
        codes[..., 1] = (b0 >> 3) & 7
        codes[..., 2] = (b0 >> 6) | ((b1 & 1) << 2)
        codes[..., 3] = (b1 >> 1) & 7
        codes[..., 4] = (b1 >> 4) & 7
        codes[..., 5] = (b1 >> 7) | ((b2 & 3) << 1)
        codes[..., 6] = (b2 >> 2) & 7
        codes[..., 7] = b2 >> 5
    else:
        mask = np.uint8((1 << w) - 1)
        for j in range(per):
            codes[..., j] = (flat >> np.uint8(w * j)) & mask
    return codes.reshape(n, groups * per)[:, :L]


def unpack(buf: np.ndarray, bits, length: int) -> np.ndarray:
    """Codes (N, length) uint8 of rows packed by :func:`pack` at per-row ``bits`` (N,)."""
    b = np.asarray(bits, dtype=np.int64).reshape(-1)
    N = len(b)
    offs = row_offsets(length, b)
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if len(buf) != int(offs[-1]):
        raise ValueError(f"{len(buf)} packed bytes, but rows of {length} values at these bits need {int(offs[-1])}")
    out = np.zeros((N, length), dtype=np.uint8)
    for w in sorted(set(b.tolist())):
        idx = np.nonzero(b == w)[0]
        nbytes = row_bytes(length, w)
        for lo in range(0, len(idx), _block_rows(length)):
            part = idx[lo : lo + _block_rows(length)]
            rows = np.empty((len(part), nbytes), dtype=np.uint8)
            for at, (s, e) in _runs(part, offs, nbytes):
                rows[s:e] = buf[at].reshape(e - s, nbytes)
            out[part] = _unpack_width(rows, w, length)
    return out


def read_rows(buf: np.ndarray, scales: np.ndarray, bits, length: int, group: int | None = GROUP) -> np.ndarray:
    """float32 rows (N, length) from packed bytes, their scales (N, G) and per-row bits (N,)."""
    b = np.asarray(bits, dtype=np.int64).reshape(-1)
    return dequantize(unpack(buf, b, length), scales, b, group)


def row_offsets(length: int, bits) -> np.ndarray:
    """Byte offset of every row and the end (N + 1,) for rows of ``length`` values at ``bits``."""
    b = np.asarray(bits, dtype=np.int64).reshape(-1)
    return np.concatenate([[0], np.cumsum((length * b + 7) // 8)]).astype(np.int64)


def checked_offsets(length: int, bits, nbytes: int) -> np.ndarray:
    """:func:`row_offsets` of rows whose packed size a file records as ``nbytes``; ``ValueError``
    (a short reason) when a width is not one of :data:`BITS` or the sizes disagree."""
    b = np.asarray(bits, dtype=np.int64).reshape(-1)
    if not set(b.tolist()) <= set(BITS):
        raise ValueError(f"bit widths other than {', '.join(map(str, BITS))}")
    offs = row_offsets(length, b)
    if int(offs[-1]) != nbytes:
        raise ValueError(f"rows that need {int(offs[-1])} bytes at their bits, {nbytes} recorded")
    return offs


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers given as their uint16 bit patterns (numpy has no bfloat16)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def levels(d_out: int, d_in: int, quant) -> list[tuple[int, int, float]]:
    """The bit widths worth storing a residual component ``x y^T`` (rows of ``d_out`` and ``d_in``
    values) at: ``(bits, bytes, relative error)`` on the lower convex hull of (bytes, error) from
    (0 bytes, error 1), so that each step up buys less error per byte than the one before (the
    allocator's greedy is then optimal). ``quant``: the relative error at each of :data:`BITS`;
    bytes: both packed rows, their two bfloat16 scales and one byte of the bit table."""
    pts = [(0, 0, 1.0)] + [(b, row_bytes(d_out, b) + row_bytes(d_in, b) + 2 * 2 + 1, float(min(max(rho, 0.0), 1.0)))
                           for b, rho in zip(BITS, quant)]
    hull = [pts[0]]
    for p in pts[1:]:
        if p[2] >= hull[-1][2]:
            continue  # more bytes, no less error
        while len(hull) >= 2:  # drop a point above the segment from its predecessor to p
            (_, c0, e0), (_, c1, e1) = hull[-2], hull[-1]
            if (e0 - e1) * (p[1] - c1) <= (e1 - p[2]) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull[1:]


# A residual component's class by its position in its adapter's spectrum: the leading one, the second,
# the 3rd-4th, the 5th-8th, and the rest (class c holds positions BANDS[c - 1] .. BANDS[c] - 1). Later
# singular vectors quantise worse (at 4 bits, the bundled collection: 0.0161, 0.0197, 0.0214, 0.0224,
# 0.0237 of the energy; DistilBERT 0.0156 to 0.0252): with one class for all but the leading one,
# measured on the rows of the largest shares (mostly second components), real collections were
# predicted 0.5-6.6% under their built error and most target runs built twice.
BANDS = (1, 2, 4, 8)
N_CLASSES = len(BANDS) + 1


def component_class(position) -> np.ndarray:
    """The class (0 .. N_CLASSES - 1) of residual components at ``position`` (0: an adapter's leading one)."""
    return np.searchsorted(np.asarray(BANDS), np.asarray(position), side="right")


def position_classes(count: int, classes: int) -> np.ndarray:
    """(count,) the class of each of an adapter's first ``count`` components where a profile has
    ``classes`` of them (two: the leading one and the others): :func:`component_class`, the last
    class holding every later one."""
    return np.minimum(component_class(np.arange(count)), classes - 1)


def profile_rows(quant) -> np.ndarray:
    """A residual quantisation profile as (N_CLASSES, len(BITS)): the relative error of the components
    of each class (:func:`component_class`) at each width. Fewer rows serve the later classes with
    their last one: one row (an artifact written before the classes, or :data:`DEFAULT_QUANT`) serves
    all, two (a file's ``quant`` and ``quant_rest``) the leading components and the others."""
    q = np.asarray(quant, dtype=np.float64)
    q = q[None] if q.ndim == 1 else q
    return np.concatenate([q, np.repeat(q[-1:], N_CLASSES - len(q), 0)]) if len(q) < N_CLASSES else q


def profile_meta(quant) -> tuple[list[float], list[float]]:
    """A profile as module metadata stores it: ``quant``, the leading components' relative errors (3
    significant digits), and ``quant_rest``, the second components' over those (ratios >= 1, 2
    significant digits; 1 where the leading error is 0), which readers take for every later one: about
    the bytes of one row at 4 digits, which small budgets feel (the later classes' rows are not kept)."""
    lead, rest = profile_rows(quant)[:2]  # the second components' (the classes after it are not stored)
    ratio = np.where(lead > 0, rest / np.where(lead > 0, lead, 1.0), 1.0)
    return [float(f"{x:.3g}") for x in lead], [float(f"{max(x, 1.0):.2g}") for x in ratio]


def stored_profile(mod: dict) -> np.ndarray:
    """(2, len(BITS)) profile of a module from its metadata (:func:`profile_meta`): ``quant`` for the
    leading components and ``quant`` times ``quant_rest`` for the others (``quant`` alone: both, as
    artifacts before the two classes wrote it), else :data:`DEFAULT_QUANT`."""
    lead = np.asarray(mod.get("quant") or DEFAULT_QUANT, dtype=np.float64)
    ratio = np.asarray(mod.get("quant_rest") or np.ones(len(BITS)), dtype=np.float64)
    return np.stack([lead, lead * ratio])


def class_levels(d_out: int, d_in: int, quant) -> tuple[list, ...]:
    """:func:`levels` of the residual components of each class (:func:`component_class`) of a module
    with profile ``quant`` (:func:`profile_rows`)."""
    return tuple(levels(d_out, d_in, row) for row in profile_rows(quant))


def stored_bits(level: np.ndarray, levels: tuple[list, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Residual ranks (n,) and the bits of every stored row (adapter by adapter, component by
    component) of ``level`` (n, cap): each component's level (0: not stored) in ``levels`` (those of
    each class, :func:`component_class`; two: the leading component's and the others'). Stored
    components are a prefix of each adapter's: the allocator's order guarantees it (the classes'
    profiles never decrease with the position), and a component left out before a stored one (a tie
    broken the other way by rounding) is raised to its class's first level."""
    n, cap = level.shape
    ranks = np.where(level > 0, np.arange(1, cap + 1)[None, :], 0).max(1, initial=0) if cap else np.zeros(n, int)
    width = np.zeros((len(levels), 1 + max((len(lv) for lv in levels), default=0)), dtype=np.uint8)
    for c, lv in enumerate(levels):
        width[c, 1 : 1 + len(lv)] = [x[0] for x in lv]
    if not ranks.sum():
        return ranks, np.zeros(0, dtype=np.uint8)
    inside = np.arange(cap)[None, :] < ranks[:, None]
    lv = np.where(inside, np.maximum(level, 1), 0)
    cls = np.broadcast_to(position_classes(cap, len(levels))[None, :], lv.shape)
    bits = width[cls, lv][inside]  # row-major: adapter by adapter, component by component
    return ranks, bits.astype(np.uint8)


# -- shared bases and cores at one bit width (format v6, module metadata ``shared_bits``) ----------

def shared_values(codes: np.ndarray, scales: np.ndarray, bits: int, role: str) -> np.ndarray:
    """float32 values of a low-bit shared tensor in its logical shape: bases ``U`` / ``V`` are
    stored one basis vector per row, ``codes`` (K, r, d) -> (K, d, r); cores ``codes`` (n, r_out,
    r_in) row by row -> (n, r_out, r_in). ``scales``: (..., rows, 1), one per row."""
    lead, L = codes.shape[:-1], codes.shape[-1]
    flat = dequantize(codes.reshape(-1, L), np.asarray(scales, dtype=np.float32).reshape(-1, 1), int(bits))
    out = flat.reshape(*lead, L)
    return np.ascontiguousarray(np.swapaxes(out, -1, -2)) if role != "cores" else out
