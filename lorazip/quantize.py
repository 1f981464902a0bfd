"""Symmetric per-row int8 storage (``--dtype int8``, ``--extras-dtype int8``).

A float tensor ``<key>`` of shape (..., L) is stored as ``<key>``, int8 of the same shape, and
``qscale/<key>``, shape (...,): one scale per row (the last axis) ``s = max|row| / 127`` (0 for a
zero row), rounded *up* to the scale's dtype so that ``|x / s| <= 127``; the stored values are
``q = round(x / s)`` and a reader gets ``q * s`` (computed in float32: exact for float16 scales).
Every value is then within ``s / 2`` of the original.

Scales are float16 unless one would exceed float16's range (rows with values above ~8.3e6),
then float32; writers may ask for float32 (residual rows and extras, whose rows are long, so
the two extra bytes are nothing and small magnitudes keep full precision). A tensor with no
elements is stored as an empty int8 tensor without ``qscale``.

The solvers round through :func:`to_storage` / :func:`round_to_storage` and measure their
errors on the dequantised values, so recorded errors are exact for what a reader gets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .layout import shared_widths
from .lowbit import all_finite

QSCALE = "qscale/"  # prefix of the scale tensor of an int8 tensor
QBITS = "qbits/"  # ``qbits/<m>``: bits of each low-bit residual row of module m (lorazip.lowbit)
QUANTISED = ("U/", "V/", "cores/", "resid_B/", "resid_A/", "extras/")  # keys that may be stored as int8
FLOAT_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXTRAS_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
_F16_MAX = float(torch.finfo(torch.float16).max)
_INT = {torch.float16: torch.int16, torch.float32: torch.int32}


def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` (float64, >= 0) in ``dtype``, rounded up to the next representable value where the
    conversion rounded down (so ``x / scale`` never exceeds 127)."""
    out = s.to(dtype)
    low = out.double() < s
    if bool(low.any()):  # positive finite numbers: the next one up is the next bit pattern
        bumped = (out.view(_INT[dtype]) + 1).view(dtype)
        out = torch.where(low, bumped, out)
    return out


def quantize_rows(t: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` int8 of ``t``'s shape, ``scale`` of shape ``t.shape[:-1]`` (float16, or
    float32 when a scale would overflow float16; or ``scale_dtype``), with ``t ~ q * scale[..., None]``."""
    x = t.detach().to("cpu", torch.float64)
    if x.dim() == 0:
        raise ValueError("int8 storage needs at least one dimension (rows along the last axis)")
    if not all_finite(x):
        raise ValueError("cannot quantise NaN or Inf values")
    amax = x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
    s = amax / 127
    big = float(s.max()) > _F16_MAX if s.numel() else False
    if scale_dtype is None:
        scale_dtype = torch.float32 if big else torch.float16
    elif scale_dtype == torch.float16 and big:
        raise ValueError("row scales overflow float16; quantise with float32 scales")
    if scale_dtype not in _INT:
        raise ValueError(f"scales are float16 or float32, not {scale_dtype}")
    scale = _round_up(s, scale_dtype)
    sc = scale.double()[..., None]
    q = torch.where(sc > 0, x / torch.where(sc > 0, sc, 1.0), 0.0).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale[..., None]`` (what every reader of an int8 tensor gets)."""
    return q.float() * scale.float()[..., None]


class Stored(NamedTuple):
    """A tensor as stored: ``data`` (storage dtype, or int8) and, for int8, its row ``scale``."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def values(self) -> torch.Tensor:
        """What a reader gets: ``data`` itself for float storage, the float32 dequantised values for int8."""
        if self.data.dtype != torch.int8:
            return self.data
        return self.data.float() if self.scale is None else dequantize_rows(self.data, self.scale)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def put(self, tensors: dict[str, torch.Tensor], key: str) -> None:
        """Add ``key`` (and ``qscale/<key>`` for int8) to ``tensors``."""
        tensors[key] = self.data.contiguous()
        if self.scale is not None:
            tensors[QSCALE + key] = self.scale.contiguous()


class LowBit(NamedTuple):
    """Residual rows at 1-8 bits (:mod:`lorazip.lowbit`): ``data`` uint8 codes (N, L), ``scale``
    bfloat16 group scales (N, G), ``bits`` uint8 (N,) per row (kept under ``qbits/<m>``)."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: torch.Tensor

    @property
    def values(self) -> torch.Tensor:
        return dequantize_lowbit(self.data, self.scale, self.bits)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def put(self, tensors: dict[str, torch.Tensor], key: str) -> None:
        _put_coded(tensors, key, self)


def _put_coded(tensors: dict[str, torch.Tensor], key: str, part) -> None:
    """``key`` and ``qscale/<key>``: the codes and scales of a low-bit part (:class:`LowBit`, :class:`SharedLowBit`)."""
    tensors[key] = part.data.contiguous()
    tensors[QSCALE + key] = part.scale.contiguous()


class SharedLowBit(NamedTuple):
    """Shared bases or cores at one bit width (format v6, module metadata ``shared_bits``): ``data``
    uint8 codes, one per value, bases one basis vector per row ((K, r, d) for ``U`` (K, d, r)),
    cores row by row ((n, r_out, r_in)); ``scale`` bfloat16 (..., rows, 1), one per row."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    role: str  # "U", "V" or "cores"

    @property
    def values(self) -> torch.Tensor:
        """float32 values in the logical shape ((K, d, r) for bases)."""
        from .lowbit import shared_values

        return torch.from_numpy(shared_values(self.data.numpy(), self.scale.float().numpy(), self.bits, self.role))

    @property
    def shape(self) -> torch.Size:
        """The logical shape (bases: the codes' last two axes swapped back)."""
        s = self.data.shape
        return s if self.role == "cores" else torch.Size((*s[:-2], s[-1], s[-2]))

    def put(self, tensors: dict[str, torch.Tensor], key: str) -> None:
        _put_coded(tensors, key, self)


def to_shared_lowbit(t: torch.Tensor, bits: int, role: str) -> SharedLowBit:
    """Bases ``t`` (K, d, r) (``role`` "U" or "V", each basis vector a row) or cores (n, r_out, r_in)
    (``role`` "cores", row by row) at ``bits``, one bfloat16 scale per row (:func:`lorazip.lowbit.quantize`)."""
    from . import lowbit

    rows = t.transpose(-1, -2) if role != "cores" else t
    lead, L = rows.shape[:-1], rows.shape[-1]
    codes, scales = lowbit.quantize(rows.reshape(-1, L), int(bits))
    return SharedLowBit(torch.from_numpy(codes).reshape(*lead, L), torch.from_numpy(scales).to(torch.bfloat16)
                        .reshape(*lead, 1), int(bits), role)


def dry_shared_lowbit(shape, bits: int, role: str) -> SharedLowBit:
    """Zero codes and scales of :func:`to_shared_lowbit`'s shapes for a tensor of logical ``shape``."""
    shape = tuple(int(d) for d in shape)
    rows = shape[:-2] + (shape[-1], shape[-2]) if role != "cores" else shape
    return SharedLowBit(torch.zeros(rows, dtype=torch.uint8), torch.zeros(rows[:-1] + (1,), dtype=torch.bfloat16),
                        int(bits), role)


def dequantize_lowbit(codes: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 values of low-bit rows (:func:`lorazip.lowbit.dequantize`, one scale per row)."""
    from . import lowbit

    N, L = codes.shape
    if N == 0:
        return torch.zeros(0, L)
    return torch.from_numpy(lowbit.dequantize(codes.numpy(), scale.float().numpy(), bits.numpy()))


def to_lowbit(t: torch.Tensor, bits, values: bool = False):
    """Rows of ``t`` (N, L) at per-row ``bits`` (N,) (:func:`lorazip.lowbit.quantize`); ``values``:
    ``(LowBit, what a reader gets back)``, the float32 values from the quantiser itself (those of
    :attr:`LowBit.values`, bit for bit, without decoding the codes again)."""
    from . import lowbit

    b = np.asarray(bits, dtype=np.uint8).reshape(-1)
    codes, scales, *vals = lowbit.quantize(t, b.astype(np.int64), values=values)
    part = LowBit(torch.from_numpy(codes), torch.from_numpy(scales).to(torch.bfloat16), torch.from_numpy(b.copy()))
    return (part, torch.from_numpy(vals[0])) if values else part


def to_storage(t: torch.Tensor, storage_dtype: str, scale_dtype: torch.dtype | None = None) -> Stored:
    """``t`` in ``storage_dtype`` ("float32", "float16", "bfloat16" or "int8"; ``scale_dtype``: int8 only)."""
    if storage_dtype == "int8":
        if t.numel() == 0:
            return Stored(torch.empty(t.shape, dtype=torch.int8))
        return Stored(*quantize_rows(t, scale_dtype))
    if storage_dtype not in FLOAT_STORAGE:
        raise ValueError(f"unknown storage dtype {storage_dtype!r}")
    return Stored(t.detach().to(FLOAT_STORAGE[storage_dtype]).cpu())


def dry_storage(shape, storage_dtype: str, scale_dtype: torch.dtype = torch.float16) -> Stored:
    """Zero tensors of the shapes and dtypes :func:`to_storage` gives (to measure a file's size; zeros,
    not uninitialised memory: the size of an assembly must not depend on whatever bytes were there)."""
    shape = tuple(int(d) for d in shape)
    if storage_dtype != "int8":
        return Stored(torch.zeros(shape, dtype=FLOAT_STORAGE[storage_dtype]))
    data = torch.zeros(shape, dtype=torch.int8)
    return Stored(data, torch.zeros(shape[:-1], dtype=scale_dtype) if data.numel() else None)


def cat_stored(parts: list) -> "Stored | LowBit | SharedLowBit":
    """Concatenate stored chunks along dim 0 (int8 scales widened to float32 if the chunks differ)."""
    data = torch.cat([p.data for p in parts])
    if isinstance(parts[0], LowBit):
        return LowBit(data, torch.cat([p.scale for p in parts]), torch.cat([p.bits for p in parts]))
    if isinstance(parts[0], SharedLowBit):  # cores, chunk by chunk of adapters, at one width
        return SharedLowBit(data, torch.cat([p.scale for p in parts]), parts[0].bits, parts[0].role)
    scales = [p.scale for p in parts if p.scale is not None]
    if not scales:
        return Stored(data)
    dtype = torch.float32 if any(s.dtype == torch.float32 for s in scales) else torch.float16
    return Stored(data, torch.cat([s.to(dtype) for s in scales]))


def store_residual(bp: torch.Tensor, ap: torch.Tensor, k: torch.Tensor, storage_dtype: str, bits=None):
    """Per-adapter residual parts as stored: ``b_i^T`` / ``a_i`` row blocks of ``k_i`` rows (the
    first ``k_i`` columns of ``bp[i]`` (d_out, m), rows of ``ap[i]`` (m, d_in)) in ``storage_dtype``
    (int8: float32 row scales), or, given ``bits`` (sum k_i,) per row, at those bits
    (:class:`LowBit`), and what a reader gets back, zero-padded again like ``bp``, ``ap``.

    Returns ``(bs, as_, bp_stored, ap_stored)``, ``bs`` / ``as_`` :class:`Stored` (sum k_i, d)."""
    kept = torch.arange(bp.shape[2])[None, :] < k.reshape(-1, 1)  # (n, m): adapter i's first k_i columns
    rows_b = bp.transpose(1, 2)[kept]  # adapter by adapter, k_i rows each
    rows_a = ap[kept]
    if bits is not None:
        bs, as_ = to_lowbit(rows_b, bits), to_lowbit(rows_a, bits)
    else:
        bs = to_storage(rows_b, storage_dtype, torch.float32)
        as_ = to_storage(rows_a, storage_dtype, torch.float32)
    bq, aq = torch.zeros_like(bp), torch.zeros_like(ap)
    bq.transpose(1, 2)[kept] = bs.values.to(bq.dtype)
    aq[kept] = as_.values.to(aq.dtype)
    return bs, as_, bq, aq


def store_rows(rb: torch.Tensor, ra: torch.Tensor, k: torch.Tensor, storage_dtype: str, bits=None):
    """:func:`store_residual` of parts given as rows (:func:`~lorazip.solvers.residual.residual_rows`):
    ``rb`` (n, m, d_out) the ``b_i^T``, ``ra`` (n, m, d_in) the ``a_i``, adapter ``i``'s first ``k_i``
    rows stored. Returns ``(bs, as_, bq, aq)`` with what a reader gets back in float32, zero-padded:
    ``bq`` (n, d_out, m) (a transposed view of rows), ``aq`` (n, m, d_in)."""
    n, m = rb.shape[0], rb.shape[1]
    kept = torch.arange(m)[None, :] < k.reshape(-1, 1)
    every = bool(kept.all())  # every adapter keeps m rows: the rows are the tensors themselves
    rows_b = rb.reshape(n * m, rb.shape[2]) if every else rb[kept]
    rows_a = ra.reshape(n * m, ra.shape[2]) if every else ra[kept]
    if bits is not None:
        (bs, vb), (as_, va) = to_lowbit(rows_b, bits, values=True), to_lowbit(rows_a, bits, values=True)
    else:
        bs = to_storage(rows_b, storage_dtype, torch.float32)
        as_ = to_storage(rows_a, storage_dtype, torch.float32)
        vb, va = bs.values.float(), as_.values.float()
    if every:
        bq, aq = vb.reshape(rb.shape), va.reshape(ra.shape)
    else:
        bq, aq = torch.zeros_like(rb), torch.zeros_like(ra)
        bq[kept], aq[kept] = vb, va
    return bs, as_, bq.transpose(1, 2), aq


def round_to_storage(t: torch.Tensor, storage_dtype: str, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values a reader gets back after storing ``t`` in ``storage_dtype``, as float64."""
    return to_storage(t, storage_dtype, scale_dtype).values.double()


def dequantized(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` with every int8 tensor that has a ``qscale/`` companion replaced by its float32
    values, the companions dropped (the view :mod:`lorazip.update` computes on). Low-bit shared
    parts need the artifact's ``meta`` (their widths: ``shared_bits``)."""
    from .lowbit import shared_values

    widths = shared_widths(meta)
    out = {}
    for key, t in tensors.items():
        if key.startswith(QSCALE):
            continue
        scale = tensors.get(QSCALE + key)
        if scale is not None and t.dtype == torch.uint8 and key in widths:  # low-bit shared parts
            out[key] = torch.from_numpy(shared_values(t.numpy(), scale.float().numpy(), widths[key],
                                                      key.split("/", 1)[0]))
        elif scale is not None and t.dtype == torch.uint8:  # low-bit residual rows
            if QBITS + key.split("/", 1)[1] not in tensors:
                raise ValueError(f"low-bit tensor {key!r} without its widths (qbits, or the metadata's shared_bits)")
            out[key] = dequantize_lowbit(t, scale, tensors[QBITS + key.split("/", 1)[1]])
        elif scale is not None:
            out[key] = dequantize_rows(t, scale)
        elif t.dtype == torch.int8 and t.numel() == 0 and key.startswith(QUANTISED[:-1]):
            out[key] = t.float()
        else:
            out[key] = t
    return out


def requantized(tensors: dict[str, torch.Tensor], view: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                storage_dtype: str, meta: dict | None = None, shared: "SharedRows | None" = None
                ) -> dict[str, torch.Tensor]:
    """Store again what was computed on the :func:`dequantized` ``view`` of ``raw``: tensors still the
    view's objects get their raw int8 data and scales back (bit for bit); changed bases and cores
    are quantised (per row: rows that were already stored come back unchanged). Tensors already
    in stored form (``qscale/`` keys and their int8 data) pass through. Low-bit shared parts (the
    modules of ``meta`` with ``shared_bits``) are stored at their widths through ``shared``: rows
    it has seen (stored, or rounded by :meth:`SharedRows.round`) get those codes and scales back."""
    widths = shared_widths(meta)
    shared = shared if shared is not None else SharedRows()
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key in out:
            continue
        if key.startswith(QSCALE):
            out[key] = t
        elif key in view and t is view[key] and key in raw and raw[key] is not t:
            out[key] = raw[key]
            if QSCALE + key in raw:
                out[QSCALE + key] = raw[QSCALE + key]
        elif key in widths and t.is_floating_point():
            shared.store(t, widths[key], key.split("/", 1)[0]).put(out, key)
        elif storage_dtype == "int8" and key.startswith(QUANTISED[:-1]) and t.is_floating_point():
            to_storage(t, "int8", torch.float32 if key.startswith("resid_") else None).put(out, key)
        else:
            out[key] = t
    return out


class SharedRows:
    """Rows of low-bit shared parts already stored, by their float32 values: storing values that
    came from such rows (the artifact's own, or ones :meth:`round` gave) gives back the same codes
    and scale bit for bit (quantising the dequantised values again need not)."""

    def __init__(self):
        self._rows: dict[tuple[int, bytes], tuple[np.ndarray, torch.Tensor]] = {}

    @staticmethod
    def _value_rows(t: torch.Tensor, role: str) -> torch.Tensor:
        rows = t.transpose(-1, -2) if role != "cores" else t
        return rows.detach().to(torch.float32).reshape(-1, rows.shape[-1]).contiguous()

    def learn(self, s: SharedLowBit) -> None:
        """Remember the rows of the stored ``s`` (codes and scale by their values)."""
        L = s.data.shape[-1]
        codes, scales = s.data.reshape(-1, L).numpy(), s.scale.reshape(-1, 1)
        for i, v in enumerate(self._value_rows(s.values, s.role).numpy()):
            self._rows[(s.bits, v.tobytes())] = (codes[i], scales[i])

    def learn_all(self, raw: dict[str, torch.Tensor], meta: dict) -> None:
        """Remember every low-bit shared part of an artifact's stored tensors ``raw``."""
        for key, bits in shared_widths(meta).items():
            if key in raw and QSCALE + key in raw:
                self.learn(SharedLowBit(raw[key], raw[QSCALE + key], bits, key.split("/", 1)[0]))

    def round(self, t: torch.Tensor, bits: int, role: str) -> torch.Tensor:
        """float32 values of ``t`` stored at ``bits`` (:func:`to_shared_lowbit`), remembered."""
        s = to_shared_lowbit(t, bits, role)
        self.learn(s)
        return s.values

    def store(self, t: torch.Tensor, bits: int, role: str) -> SharedLowBit:
        """``t`` (logical shape) at ``bits``: rows seen before as they were stored, the others quantised."""
        rows = self._value_rows(t, role)
        N, L = rows.shape
        codes = np.zeros((N, L), dtype=np.uint8)
        scales = torch.zeros(N, 1, dtype=torch.bfloat16)
        fresh = []
        for i, v in enumerate(rows.numpy()):
            hit = self._rows.get((int(bits), v.tobytes()))
            if hit is None:
                fresh.append(i)
            else:
                codes[i], scales[i] = hit
        if fresh:
            from . import lowbit

            c, sc = lowbit.quantize(rows[fresh], int(bits))
            codes[fresh], scales[fresh] = c, torch.from_numpy(sc).to(torch.bfloat16)
        shape = tuple(t.shape[:-2]) + (t.shape[-1], t.shape[-2]) if role != "cores" else tuple(t.shape)
        return SharedLowBit(torch.from_numpy(codes).reshape(shape), scales.reshape(*shape[:-1], 1), int(bits), role)


# -- extras (modules_to_save heads) ---------------------------------------------------------------

def _converts(t: torch.Tensor, extras_dtype: str) -> bool:
    """Whether ``--extras-dtype`` applies to ``t``: floating tensors of 2+ dims; 1-D ones for
    float16 / bfloat16 only; never a no-op (same dtype) nor int8 of a 1-byte float."""
    if extras_dtype == "auto" or not t.is_floating_point() or t.dim() == 0:
        return False
    if t.dim() == 1 and extras_dtype not in ("float16", "bfloat16"):
        return False
    if extras_dtype == "int8":
        return t.element_size() > 1 and t.numel() > 0
    return t.dtype != FLOAT_STORAGE[extras_dtype]


def store_extras(tensors: dict[str, torch.Tensor], i: int, extras: dict[str, torch.Tensor], extras_dtype: str
                 ) -> tuple[float, float, dict[str, str]]:
    """Put adapter ``i``'s non-LoRA tensors into ``tensors`` as ``extras/<i>/<key>``, converted to
    ``extras_dtype`` (see :func:`_converts`; "auto" keeps them as they came). Returns the squared
    error ``sum ||X - X_hat||^2`` and ``sum ||X||^2`` over the adapter's extras (float64) and the
    original dtypes of the converted tensors (``{key: "float32"}``, for export)."""
    from .errors import OptionError

    sq = n2 = 0.0
    orig: dict[str, str] = {}
    for key, t in extras.items():
        name = f"extras/{i}/{key}"
        if not _converts(t, extras_dtype):
            tensors[name] = t.contiguous()
            if t.is_floating_point():
                n2 += float(t.double().square().sum())
            continue
        x = t.double()
        if extras_dtype == "float16" and float(x.abs().max()) > _F16_MAX:
            raise OptionError(f"extras tensor {key} of adapter {i} overflows float16: use --extras-dtype "
                              "bfloat16 or int8")
        st = to_storage(t, extras_dtype, torch.float32)
        st.put(tensors, name)
        sq += float((x - st.values.double()).square().sum())
        n2 += float(x.square().sum())
        orig[key] = str(t.dtype).replace("torch.", "")
    return sq, n2, orig
