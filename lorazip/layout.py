"""Format v3 on disk: the artifact's logical tensors packed into few physical ones.

:class:`~lorazip.artifact.Artifact` and everything built on it see *logical* tensors
(``spectra/<m>``, ``resid_ranks/<m>``, ``resid_B/<m>``, ``U/<m>`` ... as in format v2). A v3 file
stores them with less fixed overhead, which matters for small budgets and small collections:

* the ``lorazip`` metadata document is zlib-compressed and base64-encoded under ``lorazip_z``
  (JSON of many adapters' configs and ranks compresses 20x); format v7 (files with low-bit parts)
  writes ``x:`` and base85 of its LZMA instead, each adapter's ``ranks`` a list in module order
  (:func:`encode_meta`; 1.6x smaller again on the bundled collection);
* ``spectra``: one 1-D float32 tensor holding, module by module (metadata order) and adapter by
  adapter, the first ``r_im`` singular values of each delta, ``r_im`` the adapter's LoRA rank
  there (``adapters[i].ranks``; 0 where it lacks the module). The rest of a logical
  ``(n, r_max)`` row is zero by construction. A module whose spectra do not have that shape is
  stored as its own ``spectra/<m>`` tensor, as in v2;
  Format v7 (files with low-bit parts) stores uint8 codes instead, :func:`code_spectra`: for
  each pair, the norms of its spectrum's tails ``sqrt(sum_{j>=k} s_j^2)``, k = 2..r, relative to
  the delta's norm ``sqrt(stats/norm2)``, on a log scale of 20 codes an octave: every truncation
  error within 3.5%, in ``r - 1`` bytes where bfloat16 took ``2 r``;
* ``resid_ranks``: one ``(n, M)`` int16 (int32 when needed; v7: uint8 when every rank is below 256)
  table of the residual ranks ``k_i``
  of every module (0 where none); the logical ``resid_ranks/<m>`` (n,) int32 tensors exist for
  the modules with ``residual`` metadata;
* ``resid_B`` / ``resid_A``: one 1-D tensor each, in the storage dtype, holding module by module
  (metadata order, the modules with ``residual`` metadata) the row-major ``(total_rank, d_out)``
  / ``(total_rank, d_in)`` logical ``resid_B/<m>`` / ``resid_A/<m>``; a module's offset is the
  sum of ``total_rank * d`` over the modules before it, so no index is stored. With int8 storage
  ``qscale/resid_B`` / ``qscale/resid_A`` (1-D float32, ``sum total_rank``) hold the row scales
  the same way (the logical ``qscale/resid_B/<m>``). A module whose residual tensors have another
  dtype or shape (or float16 row scales) keeps its own ``resid_B/<m>`` etc., as in v2 (and in v3
  files written before this packing, which read unchanged);
* ``stats``: one ``(2, P)`` float64 tensor, ``stats/sq_error`` and ``stats/norm2`` at the ``P``
  (adapter, module) pairs where the adapter has the module (``r_im > 0``), module by module and
  adapter by adapter; both are zero elsewhere (a missing module is a zero delta, stored as zero).
  Statistics that are not zero there stay as the two (n, M) tensors of v2;
* the empty ``U``, ``V`` and ``cores`` of rank-0 modules are not stored.

Nothing here needs torch to plan a read: :class:`Layout` maps a logical key to the physical
bytes (rows of a packed residual are read by offset, nothing else), and :func:`pack` (torch)
turns logical tensors into physical ones for writing.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import TYPE_CHECKING, Any

from .io.safetensors_header import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

META_Z = "lorazip_z"
SPECTRA = "spectra"
RANKS = "resid_ranks"
STATS = "stats"
STAT_KEYS = ("stats/sq_error", "stats/norm2")
QSCALE = "qscale/"  # int8 row scales (lorazip.quantize)
QBITS = "qbits"  # format v5: bits of every low-bit residual row, module by module (uint8)
LOWBIT = "lowbit/"  # format v5: ``lowbit/resid_B`` ... the packed codes of low-bit residual rows (uint8)
RESID = {"resid_B": "d_out", "resid_A": "d_in"}  # packed residual rows: b_i^T, a_i; their row width
SHARED = ("U", "V", "cores")  # format v6: shared parts of the modules with ``shared_bits``, in ``lowbit/U`` ...
PACKED = (SPECTRA, RANKS, STATS, QBITS, *RESID, *(QSCALE + k for k in RESID), *(LOWBIT + k for k in RESID),
          *(QSCALE + LOWBIT + k for k in RESID), *(LOWBIT + k for k in SHARED),
          *(QSCALE + LOWBIT + k for k in SHARED))  # physical keys that are no logical ones
MAX_META = 256 * 2**20  # decompressed metadata larger than this is refused (a zlib bomb)
_EMPTY_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8"}


def encode_meta(meta: dict[str, Any], compact: bool = False) -> str:
    """The metadata document as stored under ``lorazip_z``: base64 of zlib (level 9) of its JSON; with
    ``compact`` (format v7), ``x:`` and base85 of LZMA ("alone" format, preset 9e, a dictionary no
    larger than the text, at least 4 KiB) of its JSON with
    each adapter's ``ranks`` a list in module order (0 where it lacks the module; see :func:`expand_ranks`)."""
    if not compact:
        raw = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")
    import lzma

    names = {m["name"]: j for j, m in enumerate(meta["modules"])}
    adapters = []
    for a in meta["adapters"]:
        ranks = a.get("ranks")
        if isinstance(ranks, dict) and all(k in names and type(r) is int and r > 0 for k, r in ranks.items()):
            row = [0] * len(names)
            for k, r in ranks.items():
                row[names[k]] = r
            a = {**a, "ranks": row}
        adapters.append(a)
    raw = json.dumps({**meta, "adapters": adapters}, separators=(",", ":")).encode("utf-8")
    window = 1 << max(12, (len(raw) - 1).bit_length())  # the dictionary a reader allocates: no larger than the text
    filters = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": window}]
    return "x:" + base64.b85encode(lzma.compress(raw, format=lzma.FORMAT_ALONE, filters=filters)).decode("ascii")


def decode_meta(text: str) -> str:
    """The JSON text of a ``lorazip_z`` value (either encoding of :func:`encode_meta`; a v7 document's
    ``ranks`` are still lists: :func:`expand_ranks`); ``ValueError`` (short reason) when it is not one."""
    if text.startswith("x:"):
        import lzma

        try:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=2 * MAX_META)
            raw = d.decompress(base64.b85decode(text[2:].encode("ascii")), MAX_META)
            if not d.eof:
                raise ValueError(f"truncated LZMA stream, or larger than {MAX_META >> 20} MiB")
            return raw.decode("utf-8")
        except (UnicodeError, ValueError, lzma.LZMAError) as exc:
            raise ValueError(f"not base85 of LZMA-compressed UTF-8 ({exc})") from None
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        d = zlib.decompressobj()
        raw = d.decompress(packed, MAX_META)
        if d.unconsumed_tail:
            raise ValueError(f"larger than {MAX_META >> 20} MiB")
        if not d.eof:
            raise ValueError("truncated zlib stream")
        return raw.decode("utf-8")
    except (UnicodeError, binascii.Error, zlib.error) as exc:
        raise ValueError(f"not base64 of zlib-compressed UTF-8 ({exc})") from None


def expand_ranks(meta: Any) -> None:
    """In place: each adapter's ``ranks`` given as a list in module order (format v7) made the
    ``{module: rank}`` of every module it has; ``ValueError`` (short reason) when a list is not one
    non-negative integer per module. Documents of other shapes are left to the metadata checks."""
    if not isinstance(meta, dict) or not isinstance(meta.get("adapters"), list) \
            or not isinstance(meta.get("modules"), list):
        return
    names = [m.get("name") if isinstance(m, dict) else None for m in meta["modules"]]
    for i, a in enumerate(meta["adapters"]):
        ranks = a.get("ranks") if isinstance(a, dict) else None
        if not isinstance(ranks, list):
            continue
        if len(ranks) != len(names) or not all(type(r) is int and r >= 0 for r in ranks) \
                or not all(isinstance(nm, str) for nm in names):
            raise ValueError(f"adapters[{i}].ranks: a list that is not one non-negative integer per module "
                             f"({len(names)})")
        a["ranks"] = {nm: r for nm, r in zip(names, ranks) if r}


def lora_ranks(meta: dict[str, Any]) -> list[list[int]]:
    """``r[j][i]``: adapter i's LoRA rank in module j (0 where it lacks it)."""
    return [[a["ranks"].get(mod["name"], 0) for a in meta["adapters"]] for mod in meta["modules"]]


def _empty_shapes(mod: dict[str, Any], n: int) -> dict[str, list[int]]:
    name, k = mod["name"], mod.get("n_clusters", 1)
    return {f"U/{name}": [k, mod["d_out"], 0], f"V/{name}": [k, mod["d_in"], 0], f"cores/{name}": [n, 0, 0]}


class Layout:
    """Where a v3 file keeps each logical tensor: ``virtual`` maps the logical keys that are not
    physical tensors to how they are read (``("spectra", start, ranks, width)``,
    ``("ranks", column)``, ``("stats", row, ranks)``, ``("rows", physical, start, rows, width)``,
    ``("lowbit", ...)`` (low-bit residual rows), ``("shared", physical, start, shape, bits)`` (low-bit
    shared parts: codes at ``bits``, or their bfloat16 scales where ``bits`` is None)
    or ``("empty", dtype, shape)``); ``entries`` are their logical header entries (dtype, shape),
    for :func:`lorazip.artifact.check_meta`. Raises ``ValueError`` (a short reason) when a packed
    tensor is missing or does not have the shape the metadata implies."""

    def __init__(self, header: dict[str, dict[str, Any]], meta: dict[str, Any]):
        n, mods = len(meta["adapters"]), meta["modules"]
        self.modules = mods
        self.virtual: dict[str, tuple] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        ranks = lora_ranks(meta)
        self.spectra_coded = header.get(SPECTRA, {}).get("dtype") == "U8"  # v7: code_spectra
        self._norm2 = None  # (n, M) stats/norm2 of a v7 file, once its spectra are read
        pos = 0
        for j, mod in enumerate(mods):
            key = f"spectra/{mod['name']}"
            if key in header:
                continue
            rs = ranks[j]
            self.virtual[key] = ("spectra", pos, rs, max(rs, default=0), j)
            self.entries[key] = {"dtype": "F32", "shape": [n, max(rs, default=0)]}
            pos += coded_length(rs) if self.spectra_coded else sum(rs)
        self.spectra_len = pos
        if (pos or self.spectra_coded and any(map(any, ranks))) and (
                SPECTRA not in header or header[SPECTRA]["dtype"] not in ("F32", "BF16", "U8")
                or header[SPECTRA]["shape"] != [pos]):
            raise ValueError(f"tensor 'spectra' missing or not of shape ({pos},) float32 (or bfloat16, uint8)")
        if self.spectra_coded and STATS not in header and STAT_KEYS[1] not in header:
            raise ValueError("tensor 'spectra' holds uint8 codes, but no 'stats' give the norms they are relative to")
        if any(mod.get("residual") for mod in mods):
            info = header.get(RANKS)
            if info is None or info["shape"] != [n, len(mods)] or info["dtype"] not in ("I16", "I32", "U8"):
                raise ValueError(f"tensor 'resid_ranks' missing or not of shape ({n}, {len(mods)}) int16/int32/uint8")
            for j, mod in enumerate(mods):
                if mod.get("residual"):
                    key = f"resid_ranks/{mod['name']}"
                    self.virtual[key] = ("ranks", j)
                    self.entries[key] = {"dtype": "I32", "shape": [n]}
        if STATS in header:
            pairs = sum(r > 0 for rs in ranks for r in rs)
            if header[STATS]["shape"] != [2, pairs] or header[STATS]["dtype"] not in ("F64", "F32"):
                raise ValueError(f"tensor 'stats' not of shape (2, {pairs}) float64 (or float32)")
            for row, key in enumerate(STAT_KEYS):
                if key in header:
                    raise ValueError(f"tensor {key!r} stored twice (also in 'stats')")
                self.virtual[key] = ("stats", row, ranks)
                self.entries[key] = {"dtype": "F64", "shape": [n, len(mods)]}
        self._place_lowbit(header)
        self._place_shared(header, meta)
        for role, dim in RESID.items():
            self._place_residuals(header, role, dim)
        dtype = _EMPTY_DTYPES.get(meta.get("storage_dtype"), "F32")
        for mod in mods:
            if mod["rank"] == 0:
                for key, shape in _empty_shapes(mod, n).items():
                    if key not in header:
                        self.virtual[key] = ("empty", dtype, shape)
                        self.entries[key] = {"dtype": dtype, "shape": shape}
        self.physical = set(header)

    def _place_lowbit(self, header: dict[str, dict[str, Any]]) -> None:
        """Format v5: the modules whose residual metadata has ``bits`` keep their rows' bits in
        ``qbits``, their packed codes in ``lowbit/resid_B`` / ``lowbit/resid_A`` and their
        bfloat16 group scales in ``qscale/lowbit/...``, module after module. Logical tensors:
        ``qbits/<m>`` (total_rank,) uint8, ``resid_B/<m>`` (total_rank, d_out) uint8 codes and
        ``qscale/resid_B/<m>`` (total_rank, 1) bfloat16, one scale per row (likewise for ``resid_A``).
        Reads the metadata only (no numpy: ``lorazip info`` plans reads with it)."""
        mods = [m for m in self.modules if (m.get("residual") or {}).get("bits")]
        rows = 0
        pos = {role: 0 for role in RESID}
        spos = {role: 0 for role in RESID}
        for mod in mods:
            res, name = mod["residual"], mod["name"]
            info = res["bits"]
            total = res["total_rank"]
            self.virtual[f"qbits/{name}"] = ("rows", QBITS, rows, total, None)
            self.entries[f"qbits/{name}"] = {"dtype": "U8", "shape": [total]}
            for role, dim, nbytes in zip(RESID, RESID.values(), info["bytes"]):
                G = 1  # info["group"] == "row", checked with the metadata
                key = f"{role}/{name}"
                self.virtual[key] = ("lowbit", LOWBIT + role, pos[role], total, mod[dim], f"qbits/{name}", nbytes)
                self.entries[key] = {"dtype": "U8", "shape": [total, mod[dim]]}
                self.virtual[QSCALE + key] = ("rows", QSCALE + LOWBIT + role, spos[role], total, G)
                self.entries[QSCALE + key] = {"dtype": "BF16", "shape": [total, G]}
                pos[role] += nbytes
                spos[role] += total * G
            rows += total
        want = {QBITS: (rows, "U8")}
        for role in RESID:
            want[LOWBIT + role] = (pos[role], "U8")
            want[QSCALE + LOWBIT + role] = (spos[role], "BF16")
        _check_packed(header, want, bool(mods), "low-bit residual rows",
                      f"the low-bit residual rows of {len(mods)} module(s), from their residual metadata")

    def _place_shared(self, header: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
        """Format v6: the modules with ``shared_bits`` keep their bases' and cores' codes in
        ``lowbit/U``, ``lowbit/V``, ``lowbit/cores`` (each row packed at the module's width on a byte
        boundary) and their bfloat16 row scales in ``qscale/lowbit/...``, module after module.
        Logical tensors: ``U/<m>`` (K, r_out, d_out) uint8 codes, ``qscale/U/<m>`` (K, r_out, 1)
        bfloat16 (``V/<m>`` likewise with r and d_in; ``cores/<m>`` (n, r_out, r), or (n, r) diagonal,
        with (n, r_out, 1) or (n, 1) scales). Metadata only, like :meth:`_place_lowbit`."""

        mods = [m for m in self.modules if m.get("shared_bits")]
        pos = {role: 0 for role in SHARED}
        spos = {role: 0 for role in SHARED}
        for mod in mods:
            for role, shape in shared_shapes(mod, len(meta["adapters"]), meta.get("method", "")).items():
                key, bits = f"{role}/{mod['name']}", shared_bit(role, mod["shared_bits"])
                rows = _prod(shape[:-1])
                self.virtual[key] = ("shared", LOWBIT + role, pos[role], shape, bits)
                self.entries[key] = {"dtype": "U8", "shape": shape}
                self.virtual[QSCALE + key] = ("shared", QSCALE + LOWBIT + role, spos[role], shape[:-1] + [1], None)
                self.entries[QSCALE + key] = {"dtype": "BF16", "shape": shape[:-1] + [1]}
                pos[role] += rows * row_bytes(shape[-1], bits)
                spos[role] += rows
        for role in SHARED:
            _check_packed(header, {LOWBIT + role: (pos[role], "U8"), QSCALE + LOWBIT + role: (spos[role], "BF16")},
                          bool(mods), "shared_bits",
                          f"the low-bit shared {role} of {len(mods)} module(s), from their metadata and shared_bits")

    def _place_residuals(self, header: dict[str, dict[str, Any]], role: str, dim: str) -> None:
        """Logical ``<role>/<m>`` (and int8 ``qscale/<role>/<m>``) of the modules with ``residual``
        metadata that are not stored under their own key: consecutive blocks of ``<role>``."""
        placed, pos, rows = [], 0, 0
        for mod in self.modules:
            res, key = mod.get("residual"), f"{role}/{mod['name']}"
            if not res or key in header or res.get("bits"):
                continue
            if QSCALE + key in header:
                raise ValueError(f"tensor {QSCALE + key!r} stored without {key!r} (whose rows are in {role!r})")
            placed.append((key, pos, rows, res["total_rank"], mod[dim]))
            pos += res["total_rank"] * mod[dim]
            rows += res["total_rank"]
        info, scales = header.get(role), header.get(QSCALE + role)
        if not placed:
            if info is not None or scales is not None:
                raise ValueError(f"tensor {role!r} stored, but no module keeps its residual rows there")
            return
        if info is None or info["shape"] != [pos] or info["dtype"] not in (*FLOAT_DTYPES, "I8"):
            got = "missing" if info is None else f"of shape {tuple(info['shape'])} {info['dtype']}"
            raise ValueError(f"tensor {role!r} {got}: the residual rows of {len(placed)} module(s) (total_rank x "
                             f"{dim} each, from their residual metadata) need shape ({pos},), a float or int8 dtype")
        quantised = info["dtype"] == "I8"
        if quantised and (scales is None or scales["shape"] != [rows] or scales["dtype"] not in ("F16", "F32")):
            raise ValueError(f"tensor {QSCALE + role!r} missing or not of shape ({rows},) float16/float32 (the row "
                             f"scales of the int8 {role!r})")
        if not quantised and scales is not None:
            raise ValueError(f"tensor {QSCALE + role!r} scales {role!r}, which is not int8")
        for key, start, row0, total, width in placed:
            self.virtual[key] = ("rows", role, start, total, width)
            self.entries[key] = {"dtype": info["dtype"], "shape": [total, width]}
            if quantised:
                self.virtual[QSCALE + key] = ("rows", QSCALE + role, row0, total, None)
                self.entries[QSCALE + key] = {"dtype": scales["dtype"], "shape": [total]}

    def logical_header(self, header: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {k: v for k, v in header.items() if k not in PACKED}
        out.update(self.entries)
        return out

    def keys(self) -> list[str]:
        return sorted((self.physical - set(PACKED)) | set(self.virtual))

    def row_reads(self, key: str) -> bool:
        """Whether :meth:`read_rows` reads rows of ``key`` by offset (a packed residual tensor)."""
        return self.virtual.get(key, ("",))[0] in ("rows", "lowbit", "shared")

    def read_rows(self, key: str, handle, a: int, b: int) -> "torch.Tensor":
        """Rows ``a..b-1`` (fewer past the end, like a slice) of the packed logical tensor ``key``,
        reading only their bytes (low-bit rows: unpacked to one uint8 code per value)."""
        if self.virtual[key][0] == "lowbit":
            return self._read_lowbit(key, handle, a, b)
        if self.virtual[key][0] == "shared":
            return self._read_shared(key, handle, a, b)
        _, phys, start, total, width = self.virtual[key]
        a, b = min(max(a, 0), total), min(max(b, a), total)
        w = width or 1
        flat = handle.get_slice(phys)[start + a * w : start + b * w]
        return flat.reshape(b - a, width) if width else flat.reshape(b - a)

    def _read_lowbit(self, key: str, handle, a: int, b: int) -> "torch.Tensor":
        import numpy as np
        import torch

        from .lowbit import checked_offsets, unpack

        _, phys, start, total, width, bits_key, nbytes = self.virtual[key]
        a, b = min(max(a, 0), total), min(max(b, a), total)
        bits = self.read_rows(bits_key, handle, 0, total).numpy().astype(np.int64)
        try:
            offs = checked_offsets(width, bits, nbytes)
        except ValueError as exc:
            raise ValueError(f"tensor {key!r}: {exc}") from None
        raw = handle.get_slice(phys)[start + int(offs[a]) : start + int(offs[b])]
        return torch.from_numpy(unpack(raw.numpy(), bits[a:b], width))

    def _read_shared(self, key: str, handle, a: int, b: int) -> "torch.Tensor":
        """Items ``a..b-1`` (dim 0) of a low-bit shared tensor: their bytes only, codes unpacked."""
        import numpy as np
        import torch

        from .lowbit import unpack

        _, phys, start, shape, bits = self.virtual[key]
        a, b = min(max(a, 0), shape[0]), min(max(b, a), shape[0])
        lo, hi = shared_span(shape, bits, start, a, b)
        raw = handle.get_slice(phys)[lo:hi]
        if bits is None:
            return raw.reshape(b - a, *shape[1:])
        rows = (b - a) * _prod(shape[1:-1])
        return torch.from_numpy(unpack(raw.numpy(), np.full(rows, bits), shape[-1]).reshape(b - a, *shape[1:]))

    def read(self, key: str, handle) -> "torch.Tensor":
        """Logical tensor ``key`` from an open safetensors handle (``get_slice``: reads its bytes only)."""
        import torch

        how = self.virtual[key]
        if how[0] == "lowbit":
            return self._read_lowbit(key, handle, 0, how[3])
        if how[0] == "shared":
            return self._read_shared(key, handle, 0, how[3][0])
        if how[0] == "spectra":
            _, start, rs, width, j = how
            if self.spectra_coded:
                if self._norm2 is None:  # read once: every module's spectra are coded against it
                    self._norm2 = (self.read(STAT_KEYS[1], handle) if STAT_KEYS[1] in self.virtual
                                   else handle.get_slice(STAT_KEYS[1])[:].double())
                norm2 = self._norm2[:, j]
                codes = handle.get_slice(SPECTRA)[start : start + coded_length(rs)] if coded_length(rs) else \
                    torch.zeros(0, dtype=torch.uint8)
                return decode_spectra(codes, norm2, rs, width).float()
            out = torch.zeros(len(rs), width, dtype=torch.float32)
            total = sum(rs)
            if total:
                flat = handle.get_slice(SPECTRA)[start : start + total].float()
                pos = 0
                for i, r in enumerate(rs):
                    out[i, :r] = flat[pos : pos + r]
                    pos += r
            return out
        if how[0] == "ranks":  # all rows, then the column: lorazip's plain-file reader slices rows only
            return handle.get_slice(RANKS)[:][:, how[1]].reshape(-1).to(torch.int32)
        if how[0] == "stats":
            _, row, ranks = how
            mask = torch.tensor(ranks).T > 0  # (n, M): module-major order of the pairs is mask.T's
            out = torch.zeros(mask.shape, dtype=torch.float64)
            out.T[mask.T] = handle.get_slice(STATS)[row : row + 1].reshape(-1).double()
            return out
        if how[0] == "rows":
            return self.read_rows(key, handle, 0, how[3])
        from .io.peft import ST_TORCH

        return torch.empty(how[2], dtype=ST_TORCH[how[1]])

    def read_ranks(self, reader) -> dict[str, list[int]]:
        """``{module: [k_i]}`` of every module (the columns of ``resid_ranks``, metadata order), from
        a :class:`~lorazip.io.safetensors_header.RawReader` (no torch); ``{}`` when none has any."""
        if RANKS not in reader.header:
            return {}
        table = reader.read_ints(RANKS)
        n, m = reader.header[RANKS]["shape"]
        return {mod["name"]: list(table[j::m]) for j, mod in enumerate(self.modules)}


def _check_packed(header: dict[str, dict[str, Any]], want: dict[str, tuple[int, str]], used: bool, what: str,
                  whose: str) -> None:
    """Packed 1-D tensors ``want`` (``{key: (length, dtype)}``) are in ``header`` as the metadata
    implies when ``used``, and absent otherwise; else one ``ValueError`` naming the tensor."""
    for key, (size, dtype) in want.items():
        info = header.get(key)
        if not used:
            if info is not None:
                raise ValueError(f"tensor {key!r} stored, but no module has {what}")
        elif info is None or info["shape"] != [size] or info["dtype"] != dtype:
            raise ValueError(f"tensor {key!r} missing or not of shape ({size},) {dtype} ({whose})")


def lowbit_meta(meta: dict[str, Any]) -> bool:
    """Whether an artifact has low-bit residual rows (format v5) or low-bit shared parts (v6)."""
    return any((m.get("residual") or {}).get("bits") or m.get("shared_bits") for m in meta["modules"])


def shared_bit(role: str, shared_bits) -> int:
    """The width of ``role`` ("U", "V", "cores") of a module with ``shared_bits`` [bases, cores]."""
    return int(shared_bits[1] if role == "cores" else shared_bits[0])


def shared_widths(meta: dict[str, Any] | None) -> dict[str, int]:
    """``{key: bits}`` of the low-bit shared tensors (``U/<m>``, ``V/<m>``, ``cores/<m>``) of the
    modules whose metadata has ``shared_bits`` (format v6); empty without ``meta``."""
    return {f"{role}/{m['name']}": shared_bit(role, m["shared_bits"]) for m in (meta or {}).get("modules", [])
            if m.get("shared_bits") for role in SHARED}


def shared_shapes(mod: dict[str, Any], n: int, method: str) -> dict[str, list[int]]:
    """Shapes of the low-bit codes of a module with ``shared_bits``: bases one basis vector per row,
    ``U`` (K, r_out, d_out), ``V`` (K, r, d_in); ``cores`` (n, r_out, r), or (n, r) diagonal
    (methods jd-diag and svd). The row scales have the shape less the last axis, plus 1."""
    r, k = mod["rank"], mod.get("n_clusters", 1)
    r_out = mod.get("rank_out", r)
    cores = [n, r] if method in ("jd-diag", "svd") else [n, r_out, r]
    return {"U": [k, r_out, mod["d_out"]], "V": [k, r, mod["d_in"]], "cores": cores}


def shared_span(shape: list[int], bits: int | None, start: int, a: int, b: int) -> tuple[int, int]:
    """Offsets (in the physical tensor's elements: bytes of codes, or scales where ``bits`` is None)
    of items ``a..b-1`` (dim 0) of a low-bit shared tensor of logical ``shape`` placed at ``start``."""

    per = _prod(shape[1:-1]) * (1 if bits is None else row_bytes(shape[-1], bits))
    return start + a * per, start + b * per


def row_bytes(length: int, bits: int) -> int:
    """Bytes of one packed row of ``length`` values at ``bits`` bits (:mod:`lorazip.lowbit`; here, without
    numpy, so that ``lorazip info`` plans reads with it)."""
    return (int(length) * int(bits) + 7) // 8


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def round_small(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    """In place: the spectra and statistics of an artifact with low-bit parts as its file stores them
    (statistics float32; spectra as :func:`code_spectra` codes where :func:`pack` codes them, else
    bfloat16), so the artifact in memory equals what its file reads back."""
    import torch

    if not lowbit_meta(meta):
        return
    for key in STAT_KEYS:
        if key in tensors:
            tensors[key] = tensors[key].float().double()
    norm2 = _norm2(tensors, meta)
    ranks = lora_ranks(meta)
    n = len(meta["adapters"])
    for j, mod in enumerate(meta["modules"]):
        key = f"spectra/{mod['name']}"
        t = tensors.get(key)
        if t is None or not t.is_floating_point():
            continue
        if norm2 is not None and _packable(t, ranks[j], n):
            tensors[key] = decode_spectra(code_spectra(t, norm2[:, j], ranks[j]), norm2[:, j], ranks[j],
                                          t.shape[1]).float()
        else:
            tensors[key] = t.to(torch.bfloat16).float()


SPECTRA_STEPS = 20  # v7 spectra: codes an octave of a tail's norm (a tail's energy within 2**(1/20) - 1 = 3.5%)


def coded_length(rs: list[int]) -> int:
    """Codes :func:`code_spectra` stores for a module whose adapters have LoRA ranks ``rs``."""
    return sum(r - 1 for r in rs if r > 0)


def code_spectra(sv: "torch.Tensor", norm2: "torch.Tensor", rs: list[int]) -> "torch.Tensor":
    """uint8 codes of one module's spectra ``sv`` (n, r_max) (format v7), ``norm2`` (n,) its deltas'
    squared norms, ``rs`` their LoRA ranks: for each adapter with ``r = rs[i] > 0``, adapter after
    adapter, the ``r - 1`` tails ``t_k = sqrt(sum_{j>=k} s_j^2 / norm2)``, k = 2..r (``t_1 = 1``), as
    ``c = 255 + round(20 log2 t_k)`` clamped to 0..255, 0 for a zero tail (or norm). Singular values
    only feed the SVD baselines, whose errors are tails: :func:`decode_spectra` gives every tail
    within 1.75% (its energy within 3.5%) from ``2**-12.7`` up (an energy of 2.4e-8 of the delta's;
    below, 0 or the smallest code), and coding decoded values gives their codes back."""
    import torch

    n, width = sv.shape
    r = torch.tensor(rs, dtype=torch.long).reshape(n, 1)
    s2 = sv.double().square()
    tails = torch.flip(torch.cumsum(torch.flip(s2, [1]), 1), [1])[:, 1:]  # (n, w - 1): sum_{j >= k} s_j^2, k >= 2
    e = norm2.double().reshape(n, 1)
    t = torch.where(e > 0, (tails / torch.where(e > 0, e, 1.0)).clamp(0, 1), 0.0).sqrt()
    c = (torch.round(torch.log2(torch.where(t > 0, t, 1.0)) * SPECTRA_STEPS) + 255).clamp(0, 255)
    keep = torch.arange(max(width - 1, 0)).reshape(1, -1) < r - 1  # k = 2 .. r of each adapter, in order
    return torch.where(t > 0, c, 0.0)[keep].to(torch.uint8)


def decode_spectra(codes: "torch.Tensor", norm2: "torch.Tensor", rs: list[int], width: int) -> "torch.Tensor":
    """(n, width) float64 singular values of one module's :func:`code_spectra` codes: from the tails
    ``t_1 = 1, t_2 .. t_r, t_{r+1} = 0``, ``s_k = sqrt(norm2 (t_k^2 - t_{k+1}^2))`` (zero past ``r``)."""
    import torch

    n = len(rs)
    r = torch.tensor(rs, dtype=torch.long).reshape(n, 1)
    c = codes.double()
    t = torch.zeros(n, width + 1, dtype=torch.float64)  # t_1 .. t_{width + 1}; zero from t_{r + 1} on
    t[:, 0] = 1.0
    t[:, 1:width][torch.arange(max(width - 1, 0)).reshape(1, -1) < r - 1] = torch.where(
        c > 0, torch.exp2((c - 255) / SPECTRA_STEPS), 0.0)
    e = t.square()
    out = ((e[:, :-1] - e[:, 1:]).clamp_min(0) * norm2.double().reshape(n, 1)).sqrt()
    return torch.where(torch.arange(width).reshape(1, -1) < r, out, 0.0)


def _norm2(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> "torch.Tensor | None":
    """(n, M) float64 squared norms of the deltas (``stats/norm2``) that v7 spectra are coded against,
    None where the artifact has no such statistics (its spectra are then stored in bfloat16)."""
    import torch

    t = tensors.get(STAT_KEYS[1])
    if t is None or t.dtype != torch.float64 or tuple(t.shape) != (len(meta["adapters"]), len(meta["modules"])):
        return None
    return t.clamp_min(0)


def _packable(t: "torch.Tensor", rs: list[int], n: int) -> bool:
    """Whether :func:`pack` puts logical spectra ``t`` (of a module with LoRA ranks ``rs``) in ``spectra``."""
    import torch

    return t.dtype == torch.float32 and tuple(t.shape) == (n, max(rs, default=0))


def pack(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any], dry: bool = False) -> dict[str, "torch.Tensor"]:
    """Physical tensors of a v3 file for the logical ``tensors`` of an artifact with ``meta``
    (``dry``: the spectra's codes as zeros, their number alone counts: a dry assembly's size).

    Spectra whose row ``i`` is longer than adapter ``i``'s rank keep only their first ``r_im``
    values (the rest are zero; :func:`trim_spectra` zeroes them when an artifact is built). With
    low-bit parts (format v7) the spectra are :func:`code_spectra` codes (tails against ``stats/norm2``)
    (bfloat16 without it), the statistics float32 and the residual ranks uint8 where they fit."""
    import torch

    n, mods = len(meta["adapters"]), meta["modules"]
    out = dict(tensors)
    ranks = lora_ranks(meta)
    small = lowbit_meta(meta)  # format v7: spectra coded (else bfloat16), statistics float32, ranks uint8
    norm2 = _norm2(tensors, meta) if small else None
    parts = []
    for j, mod in enumerate(mods):
        key = f"spectra/{mod['name']}"
        t = tensors.get(key)
        rs = ranks[j]
        if t is None or not _packable(t, rs, n):
            continue  # kept as its own tensor
        if norm2 is not None:
            parts.append(torch.zeros(coded_length(rs), dtype=torch.uint8) if dry else code_spectra(t, norm2[:, j], rs))
        else:
            parts.extend(t[i, :r] for i, r in enumerate(rs) if r)
        del out[key]
    if norm2 is not None and parts:
        out[SPECTRA] = torch.cat(parts)
    elif parts:
        out[SPECTRA] = torch.cat(parts).to(torch.bfloat16 if small else torch.float32).contiguous()
    if any(mod.get("residual") for mod in mods):
        table = torch.zeros(n, len(mods), dtype=torch.int64)
        for j, mod in enumerate(mods):
            key = f"resid_ranks/{mod['name']}"
            if mod.get("residual") and key in out:
                table[:, j] = out.pop(key).reshape(-1).long()
        top = int(table.abs().max()) if table.numel() else 0
        byte = small and top < 256 and not (table < 0).any()  # v7: one byte a rank
        out[RANKS] = table.to(torch.uint8 if byte else torch.int32 if top >= 2**15 else torch.int16)
    if all(k in out for k in STAT_KEYS) and ranks:
        mask = torch.tensor(ranks).T > 0  # (n, M)
        sq, n2 = out[STAT_KEYS[0]], out[STAT_KEYS[1]]
        if all(t.dtype == torch.float64 and t.shape == mask.shape and not t[~mask].any() for t in (sq, n2)):
            out[STATS] = torch.stack([sq.T[mask.T], n2.T[mask.T]]).to(torch.float32 if small else torch.float64)
            out[STATS] = out[STATS].contiguous()
            del out[STAT_KEYS[0]], out[STAT_KEYS[1]]
    _pack_lowbit(out, meta)
    _pack_shared(out, meta)
    _pack_residuals(out, meta)
    for mod in mods:
        if mod["rank"] == 0:
            for key, shape in _empty_shapes(mod, n).items():
                t = out.get(key)
                if t is not None and list(t.shape) == shape and _dtype_name(t) == _EMPTY_DTYPES.get(
                        meta.get("storage_dtype"), "F32"):
                    del out[key]
    return out


class Streamed:
    """A flat uint8 tensor of the file made a piece at a time when it is hashed or written
    (:func:`lorazip.artifact.tensor_checksum`, :func:`lorazip.artifact.write_safetensors`): its size
    is known without making it. The low-bit residual rows (``lowbit/resid_B`` / ``lowbit/resid_A``)
    are packed so, module by module, from the artifact's codes: at 1000 adapters the packed rows are
    gigabytes, and holding them beside the codes was a run's peak."""

    def __init__(self, size: int, pieces):
        import torch

        self.dtype, self.shape, self._pieces = torch.uint8, (int(size),), pieces

    def numel(self) -> int:
        return self.shape[0]

    def element_size(self) -> int:
        return 1

    def contiguous(self) -> "Streamed":
        return self

    def pieces(self):
        """The bytes, in order: 1-D uint8 arrays."""
        return self._pieces()

    def materialize(self) -> "torch.Tensor":
        """The whole tensor (what a reader of the file gets)."""
        import numpy as np
        import torch

        parts = list(self.pieces())
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8))


def _packed_pieces(items):
    """Each module's rows packed (:func:`lorazip.lowbit.pack`): ``items`` of (codes, bits)."""
    import numpy as np

    from .lowbit import pack as pack_rows

    for codes, b in items:
        yield pack_rows(codes.numpy() & ((1 << b) - 1).astype(np.uint8)[:, None], b)  # dry: any bytes


def _pack_lowbit(out: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    """Move the low-bit residual rows of the modules whose residual metadata has ``bits`` into
    the flat ``qbits``, ``lowbit/resid_B`` / ``lowbit/resid_A`` (codes packed by
    :func:`lorazip.lowbit.pack`, module by module when the flat tensor is read: :class:`Streamed`)
    and ``qscale/lowbit/...``, in place."""
    import functools

    import numpy as np
    import torch

    from .lowbit import packed_bytes

    mods = [m for m in meta["modules"] if (m.get("residual") or {}).get("bits")]
    if not mods:
        return
    bits_all, scales = [], {r: [] for r in RESID}
    widths = [out[f"qbits/{mod['name']}"].reshape(-1).numpy().astype(np.int64) for mod in mods]
    items: dict[str, list] = {r: [] for r in RESID}
    size = dict.fromkeys(RESID, 0)
    for mod, b in zip(mods, widths):
        bits_all.append(out.pop(f"qbits/{mod['name']}").reshape(-1).to(torch.uint8))
        for role in RESID:
            key = f"{role}/{mod['name']}"
            codes = out.pop(key)
            size[role] += packed_bytes(codes.shape[-1], b)
            items[role].append((codes, b))
            scales[role].append(out.pop(QSCALE + key).to(torch.bfloat16).reshape(-1))
    out[QBITS] = torch.cat(bits_all).contiguous()
    for role in RESID:
        out[LOWBIT + role] = Streamed(size[role], functools.partial(_packed_pieces, items[role]))
        out[QSCALE + LOWBIT + role] = torch.cat(scales[role]).contiguous()


def _pack_shared(out: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    """Move the low-bit bases and cores of the modules with ``shared_bits`` (codes ``U/<m>`` ... and
    their ``qscale/`` row scales, :class:`lorazip.quantize.SharedLowBit`) into the flat ``lowbit/U``,
    ``lowbit/V``, ``lowbit/cores`` (rows packed by :func:`lorazip.lowbit.pack`) and
    ``qscale/lowbit/...``, in place. ``ValueError`` when one is not of the shape its metadata implies."""
    import numpy as np
    import torch

    from .lowbit import pack as pack_rows

    mods = [m for m in meta["modules"] if m.get("shared_bits")]
    if not mods:
        return
    data, scales = {r: [] for r in SHARED}, {r: [] for r in SHARED}
    for mod in mods:
        for role, shape in shared_shapes(mod, len(meta["adapters"]), meta.get("method", "")).items():
            key, bits = f"{role}/{mod['name']}", shared_bit(role, mod["shared_bits"])
            codes, scale = out.get(key), out.get(QSCALE + key)
            if (codes is None or codes.dtype != torch.uint8 or list(codes.shape) != shape or scale is None
                    or list(scale.shape) != shape[:-1] + [1]):
                raise ValueError(f"tensor {key!r} (shared_bits {mod['shared_bits']}) is not uint8 codes of shape "
                                 f"{tuple(shape)} with {QSCALE + key!r} of shape {tuple(shape[:-1] + [1])}")
            del out[key], out[QSCALE + key]
            rows = codes.reshape(-1, shape[-1]).numpy() & np.uint8((1 << bits) - 1)  # dry: any bytes
            data[role].append(torch.from_numpy(pack_rows(rows, np.full(len(rows), bits))))
            scales[role].append(scale.to(torch.bfloat16).reshape(-1))
    for role in SHARED:
        out[LOWBIT + role] = torch.cat(data[role]).contiguous()
        out[QSCALE + LOWBIT + role] = torch.cat(scales[role]).contiguous()


def _pack_residuals(out: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    """Move the modules' ``resid_B/<m>`` / ``resid_A/<m>`` (and int8 ``qscale/...``) into the flat
    ``resid_B`` / ``resid_A`` (``qscale/resid_B`` ...), in place. A module's tensors are packed when
    they have the storage dtype and the shape of its ``residual`` metadata (int8: float32 row
    scales, the ones lorazip writes); others stay under their own keys, where a reader finds them."""
    import torch

    from .io.peft import ST_TORCH

    want = ST_TORCH[_EMPTY_DTYPES.get(meta.get("storage_dtype"), "F32")]
    for role, dim in RESID.items():
        data, scales = [], []
        for mod in meta["modules"]:
            res, key = mod.get("residual"), f"{role}/{mod['name']}"
            t, s = out.get(key), out.get(QSCALE + key)
            if not res or t is None or t.dtype != want or tuple(t.shape) != (res["total_rank"], mod[dim]):
                continue
            if want == torch.int8:
                if s is None or s.dtype != torch.float32 or tuple(s.shape) != (res["total_rank"],):
                    continue
                scales.append(out.pop(QSCALE + key).reshape(-1))
            elif s is not None:
                continue
            data.append(out.pop(key).reshape(-1))
        if data:
            out[role] = torch.cat(data).contiguous()
        if scales:
            out[QSCALE + role] = torch.cat(scales).contiguous()


def trim_spectra(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    """Zero each logical spectrum beyond its adapter's LoRA rank (round-off of a padded factor), and
    make it as wide as the largest of those ranks (removing the adapter of the largest rank leaves
    columns no adapter has; adding one of a rank above the module's smaller side, whose singular values
    are fewer than its rank, leaves too few), in place: an artifact in memory then equals what its file
    reads back, and its spectra are of the shape :func:`pack` packs (one tensor, or codes in format v7),
    not a tensor per module."""
    import torch

    n = len(meta["adapters"])
    for j, mod in enumerate(meta["modules"]):
        key = f"spectra/{mod['name']}"
        t = tensors.get(key)
        if t is None or t.shape[0] != n:
            continue
        rs = torch.tensor([a["ranks"].get(mod["name"], 0) for a in meta["adapters"]])
        t[torch.arange(t.shape[1])[None, :] >= rs[:, None]] = 0
        width = int(rs.max()) if n else 0
        if t.shape[1] > width:
            tensors[key] = t[:, :width].contiguous()
        elif t.shape[1] < width:
            tensors[key] = torch.cat([t, t.new_zeros(n, width - t.shape[1])], 1)


def _dtype_name(t: "torch.Tensor") -> str:
    from .io.peft import TORCH_ST

    return TORCH_ST.get(t.dtype, "")
