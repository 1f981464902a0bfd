"""What export does, without torch: the plan, the folders, and a NumPy run of it.

:mod:`lorazip.export` (torch) and ``lorazip export`` (the command line, NumPy: no torch import, so
it starts in a fraction of the time) share everything here:

* :func:`export_folders`: the checks (dtype, adapter names, output folders), the chunks of about
  256 MiB of exported tensors, and for each adapter its folder written atomically;
* :func:`peft_parts`: adapter ``i``, module ``m`` (cluster ``c``) becomes ``lora_B = [U_c S_i, b_i]``,
  ``lora_A = [V_c^T; a_i]`` (``lora_embedding_A/B`` transposed for embeddings) under the module's
  path, rank ``r + k_i``; extras (``modules_to_save``) back in their original dtypes. It runs on a
  *source*: the torch one in :mod:`lorazip.export` (the :class:`~lorazip.artifact.Artifact`'s
  readers, torch arithmetic) or :class:`NumpySource` here (plain file reads, NumPy arithmetic);
* :func:`peft_config`: ``adapter_config.json`` (scale 1 everywhere).

:class:`NumpySource` writes the same bytes as the torch export: it computes in float64 as torch
does and rounds to the output dtype as torch does (float64 -> float32 -> float16 / bfloat16, round
to nearest even; bfloat16 bits computed here, NumPy has no such dtype). It reads format versions
:data:`FAST_VERSIONS` and the tensor kinds :meth:`NumpySource.values` knows (float, int8 with row
scales); for anything else it raises :class:`Unsupported` before a folder is touched, and the
command line exports with torch instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import lowbit

from .artifact import MUST_BE_FINITE, QSCALE, QUANTISABLE, Artifact, current_umask, module_path
from .errors import ArtifactError, OptionError, OutputError
from .io.safetensors_header import ST_WIDTHS, RawReader, header_bytes, short
from .layout import shared_span, shared_widths

PREFIX = "base_model.model."
_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f]+$")  # no path separators, NUL or control characters
# export dtypes (PEFT loads float LoRA factors only): the largest finite value and bytes per number
EXPORT_MAX = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}
_WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2}
CHUNK_BYTES = 256 << 20  # export builds the adapters of one chunk in memory, then writes them (measured:
# 256 MiB chunks export 128 Lots-of-LoRAs-shaped adapters in 1.9 s at 336 MB peak, 1 GiB ones in 2.4-3.7 s at 1.1 GB)

# the artifact format versions NumpySource reads (v5: low-bit residual rows, v6: low-bit shared parts; lorazip.lowbit,
# unpacked here)
FAST_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
# the physical tensors of the formats it reads: these names, and names under these prefixes
_KNOWN_NAMES = ("spectra", "stats", "resid_ranks", "resid_B", "resid_A", "qscale/resid_B", "qscale/resid_A",
                "qbits", "lowbit/resid_B", "lowbit/resid_A",  # v5: low-bit rows (lorazip.lowbit)
                "lowbit/U", "lowbit/V", "lowbit/cores")  # v6: low-bit shared parts (module metadata shared_bits)
_KNOWN_PREFIXES = ("U/", "V/", "cores/", "assign/", "spectra/", "stats/", "resid_ranks/", "resid_B/", "resid_A/",
                   "qscale/", "extras/", "qbits/")


class Unsupported(Exception):
    """The NumPy export cannot read this artifact (a newer format version, a tensor kind it does
    not know): export with torch (:func:`lorazip.export.export`). Raised before anything is written."""


def check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_MAX:
        raise OptionError(f"unknown dtype {dtype!r} for export; choose from {', '.join(EXPORT_MAX)}")


def check_name(name: str) -> None:
    """Adapter names come from the artifact (a file from a stranger): one plain folder name only."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name.startswith(".."):
        raise ArtifactError(
            f"adapter name {short(name)} cannot be used as a folder name (it could write outside the output folder)"
        )


# -- the plan: which modules, which rows, which keys ------------------------------------------------

def peft_parts(src, meta: dict[str, Any], rows: list[int], dtype: str) -> list[tuple[dict, dict[str, int]]]:
    """LoRA tensors and per-module ranks of the adapters ``rows``, computed by ``src`` (its readers,
    array operations and cast to the export dtype): one pass over the modules, bases read once per
    module, the cores and residual rows of all ``rows`` together. Adapter ``i``, module ``m`` (cluster
    ``c``): ``lora_B = [U_c S_i, b_i]``, ``lora_A = [V_c^T; a_i]`` in float64, then cast; a module
    where neither part has rank is left out (zero delta), an adapter with no part anywhere is a zero LoRA
    of rank 1 on its first module (its ranks a :class:`ZeroFilled`), and factors beyond the dtype's
    range are one :class:`ArtifactError`."""
    limit = EXPORT_MAX[dtype]
    metas = [meta["adapters"][i] for i in rows]
    parts: list[tuple[dict, dict[str, int]]] = [({}, {}) for _ in rows]
    first: dict[int, dict[str, Any]] = {}  # each adapter's first module (for one stored at nothing anywhere)
    for mod in meta["modules"]:
        m = mod["name"]
        sel = [j for j, am in enumerate(metas) if m in am["ranks"]]
        for j in sel:
            first.setdefault(j, mod)
        if not sel:
            continue  # no requested adapter adapted this module: its delta is zero
        sub = [rows[j] for j in sel]
        U, V, cores, assign = src.module_factors(m, sub)
        b, a, ks = src.module_residuals(m, sub)
        r = V.shape[2]
        U, V, S = src.f64(U), src.f64(V), src.f64(cores)
        if r and U.shape[2]:
            Us = U[0] if U.shape[0] == 1 else U[assign]  # (d_out, r_out) or (m, d_out, r_out)
            Bs = Us * S[:, None, :] if S.ndim == 2 else Us @ S  # (m, d_out, r)
            big = src.absmax(Bs)
        else:  # rank 0 (or a zero-width side): the shared part is zero
            Bs = src.zeros((len(sub), mod["d_out"], r))
            big = src.zeros((len(sub),))
        if r:
            big = src.maximum(big, src.absmax(V)[assign])
        if b.shape[2]:
            b, a = src.f64(b), src.f64(a)
            big = src.maximum(big, src.maximum(src.absmax(b), src.absmax(a)))
        ok = (big <= limit).tolist()  # also False for NaN
        if not all(ok):
            j = sel[ok.index(False)]
            raise ArtifactError(
                f"{src.path or 'artifact'}: adapter {short(metas[j]['name'])}, module {short(m)}: "
                f"the exported factors overflow {dtype} (damaged or hostile artifact)"
            )
        At = V.swapaxes(1, 2)  # (K, r, d_in)
        for t, j in enumerate(sel):
            k = int(ks[t])
            if r + k == 0:
                continue  # nothing stored for this adapter here: zero delta, not exported
            Bp, Ap = Bs[t], At[int(assign[t])]
            if k:
                Bp, Ap = src.cat([Bp, b[t, :, :k]], 1), src.cat([Ap, a[t, :k]], 0)
            _put(parts[j], mod, Bp, Ap, src, dtype)
    for j, mod in first.items():
        if not parts[j][1]:  # stored at nothing in every module: a zero LoRA of rank 1 on its first one (PEFT
            # refuses a LoRA with no target module; this one computes the base model, as the artifact does)
            parts[j] = (parts[j][0], ZeroFilled())
            _put(parts[j], mod, src.zeros((mod["d_out"], 1)), src.zeros((1, mod["d_in"])), src, dtype)
    for j, i in enumerate(rows):
        orig = metas[j].get("extras_dtypes", {})  # extras converted at compression (--extras-dtype)
        for key in metas[j].get("extras", []):
            t = src.extra(f"extras/{i}/{key}", orig.get(key))
            if t is not None:
                parts[j][0][key] = t
    return parts


class ZeroFilled(dict):
    """The per-module ranks of an adapter stored at nothing anywhere, exported as a zero LoRA (:func:`peft_parts`)."""


def _put(part: tuple[dict, dict[str, int]], mod: dict[str, Any], Bp, Ap, src, dtype: str) -> None:
    """Adapter's module ``mod`` with factors ``Bp`` (d_out, r), ``Ap`` (r, d_in) into its ``(state, ranks)``."""
    state, ranks = part
    path = module_path(mod)  # a shape group is written under its module's path
    if mod.get("layout", "linear") == "embedding":
        state[f"{PREFIX}{path}.lora_embedding_A"] = src.cast(Bp.T, dtype)
        state[f"{PREFIX}{path}.lora_embedding_B"] = src.cast(Ap.T, dtype)
    else:
        state[f"{PREFIX}{path}.lora_A.weight"] = src.cast(Ap, dtype)
        state[f"{PREFIX}{path}.lora_B.weight"] = src.cast(Bp, dtype)
    ranks[path] = Bp.shape[1]


# the heads PEFT's task types add to modules_to_save when it loads an adapter (suffix-matched)
_TASK_SAVES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def peft_config(meta: dict[str, Any], i: int, state, ranks: dict[str, int]) -> dict[str, Any]:
    """``adapter_config.json`` of adapter ``i`` exported with the per-module ``ranks`` (scale 1
    everywhere); ``state`` (its exported tensors' keys) tells which extras were kept."""
    ameta = meta["adapters"][i]
    kept = [k for k in ameta.get("extras", []) if k in state]
    orig = ameta.get("config", {})
    saved = (orig.get("modules_to_save") or []) if kept else []
    task = None if ameta.get("extras") and not kept else orig.get("task_type")
    if any(m.endswith(s) for m in ranks for s in [*saved, *_TASK_SAVES.get(task or "", ())]):
        # LoRA on a head that PEFT would also wrap as modules_to_save (older PEFT wrote such adapters;
        # current PEFT refuses to load them): a plain LoRA whose heads' saved weights load into the
        # LoRA layers' base_layer, as the old PEFT computed it
        task, saved = None, [s for s in saved if not any(m.endswith(s) for m in ranks)]
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else (meta.get("rank") or 1)
    pattern = {re.escape(m): rr for m, rr in ranks.items() if rr != r}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": meta.get("base_model") or orig.get("base_model_name_or_path"),
        "revision": orig.get("revision"),
        # PEFT's classification task types add their head to modules_to_save on load; if the
        # heads were not stored (--no-extras), export a plain LoRA so PEFT does not look for them.
        "task_type": task,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(orig.get("fan_in_fan_out", False)),
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }


def chunk_bytes(memory_limit: int | None) -> int:
    """Bytes of exported tensors one chunk may hold: :data:`CHUNK_BYTES`, or half of ``memory_limit``
    (the other half for the artifact's parts and the writes)."""
    if memory_limit is None:
        return CHUNK_BYTES
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0:
        raise OptionError(f"memory limit must be a positive number of bytes, got {memory_limit!r}")
    return memory_limit // 2


def chunks(meta: dict[str, Any], rows: list[int], dtype: str, limit: int = CHUNK_BYTES) -> list[list[int]]:
    """``rows`` split so that the exported tensors of one chunk take at most about ``limit`` bytes
    (one adapter per chunk at least)."""
    out: list[list[int]] = []
    size = 0
    for i in rows:
        ranks = meta["adapters"][i]["ranks"]
        need = _WIDTH[dtype] * sum(
            (mod["rank"] + (mod.get("residual") or {}).get("max_rank", 0)) * (mod["d_in"] + mod["d_out"])
            for mod in meta["modules"] if mod["name"] in ranks
        )
        if not out or size + need > limit:
            out.append([])
            size = 0
        out[-1].append(i)
        size += need
    return out


# -- the folders ---------------------------------------------------------------------------------------

def export_folders(
    artifact: Artifact,
    outdir: str | os.PathLike,
    names: Sequence[str] | None,
    *,
    dtype: str,
    overwrite: bool,
    source: Callable[[list[int]], Any],
    memory_limit: int | None = None,
    empty: list[str] | None = None,
) -> list[Path]:
    """Write adapters as PEFT folders ``outdir/<name>/`` (all adapters when ``names`` is None), each
    atomically (:func:`write_folder`); returns the folders written. Dtype, names and output folders
    are checked before anything is computed; ``source(rows)`` is a context manager giving what
    :func:`peft_parts` computes with and a ``save(state, tmp, final)`` for the weights file (it is
    entered before any folder is created, so an :class:`Unsupported` one leaves no trace). Adapters are
    built and written a chunk at a time (:func:`chunk_bytes` of ``memory_limit``). ``empty``: filled with
    the names of adapters the artifact stores at nothing in every module, written as a zero LoRA of rank 1
    on their first module (PEFT loads no LoRA without a target module; this one computes the base model,
    as the artifact does)."""
    check_dtype(dtype)
    limit = chunk_bytes(memory_limit)
    names = list(dict.fromkeys(artifact.names if names is None else names))  # each adapter once
    for name in names:
        artifact.index(name)
        check_name(name)
    rows = [artifact.index(n) for n in names]
    with source(rows) as src:
        out = Path(outdir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create folder ({exc.strerror})") from None
        for name in names:
            check_final(out, name, overwrite)
        written = []
        for chunk in chunks(artifact.meta, rows, dtype, limit):
            for i, (state, ranks) in zip(chunk, peft_parts(src, artifact.meta, chunk, dtype)):
                if empty is not None and isinstance(ranks, ZeroFilled):
                    empty.append(artifact.names[i])
                written.append(write_folder(out, artifact.names[i], lambda tmp, final: src.save(state, tmp, final),
                                            peft_config(artifact.meta, i, state, ranks), overwrite))
    return written


def check_final(out: Path, name: str, overwrite: bool) -> Path:
    final = out / name
    if final.is_symlink() or final.resolve().parent != out.resolve():
        raise OutputError(f"{final}: is a symbolic link or leads outside {out}; refusing to replace it")
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    return final


def write_folder(out: Path, name: str, save: Callable[[Path, Path], None], config: dict[str, Any],
                 overwrite: bool) -> Path:
    """Write ``out/name/`` atomically (temporary folder, fsync, rename; an old folder is replaced):
    ``save(path, final)`` writes ``adapter_model.safetensors`` at ``path``, then ``adapter_config.json``."""
    final = check_final(out, name, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    aside = None
    try:
        save(tmp / "adapter_model.safetensors", final)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mask = current_umask()
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~mask)  # safetensors writes 0600 files
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders; give the usual modes
        if final.exists():
            # Move the old folder aside and the new one in: two renames, so a folder under the
            # final name is always complete (old or new); the old one is deleted afterwards.
            aside = out / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.old"
            os.replace(final, aside)
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    finally:
        if aside is not None and aside.exists():
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
            else:  # interrupted between the renames: put the old folder back
                os.replace(aside, final)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- NumPy --------------------------------------------------------------------------------------------

class Raw(NamedTuple):
    """A tensor to write: safetensors dtype, shape, and its bytes (a C-contiguous array or a buffer)."""

    dtype: str
    shape: tuple[int, ...]
    data: Any


def bfloat16_bits(x):
    """float32 array -> uint16 bfloat16 bits, rounded to nearest even as torch does (NaN: 0x7FC0)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def to_raw(x, dtype: str) -> Raw:
    """Float array ``x`` in ``dtype`` (float64/float32/float16/bfloat16) as torch's ``x.to(dtype)``
    gives it: float64 goes through float32 first (torch's double -> half / bfloat16 conversions do)."""
    with np.errstate(over="ignore", invalid="ignore"):  # torch casts out-of-range values to inf silently
        if dtype == "float64":
            out, code = np.ascontiguousarray(x, dtype=np.float64), "F64"
        elif dtype == "float32":
            out, code = np.ascontiguousarray(x, dtype=np.float32), "F32"
        elif dtype == "float16":
            out, code = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16), "F16"
        elif dtype == "bfloat16":
            out, code = bfloat16_bits(x), "BF16"
        else:
            raise ValueError(f"no export dtype {dtype!r}")
    return Raw(code, tuple(out.shape), out)


def write_raw(state: dict[str, Raw], path: Path, final: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``state`` laid out as :func:`lorazip.artifact.write_safetensors` lays out
    torch tensors (same header, same order: the same bytes); write errors as :class:`OutputError`."""
    head, order = header_bytes({k: (v.dtype, v.shape) for k, v in state.items()},
                               {"format": "pt"} if metadata is None else metadata)
    try:
        with open(path, "wb") as f:
            f.write(head)
            for key in order:
                data = state[key].data
                if len(data):
                    f.write(memoryview(data).cast("B"))
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None


_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1"}  # BF16: decoded to float32
_FLOATS = ("F64", "F32", "F16", "BF16")
_INTS = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
_VIRTUAL = ("rows", "ranks", "empty", "lowbit", "shared")  # the lorazip.layout kinds NumpySource reads (spectra, stats: not needed)


class NumpySource:
    """An artifact file read with plain file reads into NumPy arrays, plus the NumPy arithmetic
    :func:`peft_parts` needs. Logical tensors as :class:`~lorazip.artifact.Artifact` sees them
    (format v3 and later: through its :class:`~lorazip.layout.Layout`), int8 ones dequantised,
    bfloat16 ones as float32 (the same values), NaN/Inf refused as the Artifact's readers refuse them.

    Construction checks that every tensor the export of ``rows`` reads is of a kind :meth:`values`
    knows, else raises :class:`Unsupported`."""

    def __init__(self, artifact: Artifact, rows: list[int]):
        if artifact._tensors is not None or artifact.path is None:
            raise Unsupported("an artifact in memory")
        self.path = artifact.path
        self.layout = getattr(artifact, "_layout", None)
        self.modules = {mod["name"]: mod for mod in artifact.modules}
        self.widths = shared_widths(artifact.meta)  # v6 low-bit shared parts: {key: bits}
        self._reader = RawReader(self.path, ArtifactError)
        self.header = self._reader.header
        self._table = None  # the (n, M) residual ranks of a packed file, once read
        version = self._reader.metadata().get("format_version", "")
        if not (version.isascii() and version.isdigit()) or int(version) not in FAST_VERSIONS:
            raise Unsupported(f"format version {short(version)}")
        if self.layout is None and int(version) >= 3:
            raise Unsupported("a packed file without its layout")
        for key in self.header:
            if key not in _KNOWN_NAMES and not key.startswith(_KNOWN_PREFIXES):
                raise Unsupported(f"tensor {short(key)}")
        self.keys = set(self.layout.keys()) if self.layout is not None else set(self.header)
        self._check(artifact.meta, rows)

    # -- what is read, and whether it can be --------------------------------------------------------
    def _how(self, key: str) -> tuple:
        """``("phys", dtype)`` for a tensor stored under its own key, else the layout's plan of it."""
        if self.layout is not None and key in self.layout.virtual:
            return self.layout.virtual[key]
        return ("phys", self.header[key]["dtype"])

    def _dtype(self, key: str) -> str:
        how = self._how(key)
        if how[0] in ("phys", "empty"):
            return how[1]
        if how[0] == "ranks":
            return self.header["resid_ranks"]["dtype"]
        if how[0] == "lowbit":  # v5: packed codes, unpacked to one uint8 per value
            return "U8"
        if how[0] == "shared":  # v6 shared parts: codes (unpacked), or their bfloat16 row scales
            return "U8" if how[4] is not None else "BF16"
        return self.header[how[1]]["dtype"] if how[0] == "rows" else ""

    def _readable(self, key: str, kinds: tuple[str, ...]) -> None:
        how = self._how(key)
        if how[0] != "phys" and how[0] not in _VIRTUAL:
            raise Unsupported(f"tensor {short(key)} stored as {short(how[0])}")
        if self._dtype(key) not in kinds:
            raise Unsupported(f"tensor {short(key)} of dtype {short(self._dtype(key))}")

    def _check(self, meta: dict[str, Any], rows: list[int]) -> None:
        for mod in meta["modules"]:
            m = mod["name"]
            low = f"qbits/{m}" in self.keys  # v5 low-bit residual rows: uint8 codes, bfloat16 row scales
            for key in (f"U/{m}", f"V/{m}", f"cores/{m}", f"resid_B/{m}", f"resid_A/{m}"):
                lowbit_rows = (low and key.startswith("resid_")) or key in self.widths
                if key in self.keys:
                    self._readable(key, ("U8",) if lowbit_rows else _FLOATS + ("I8",))
                if QSCALE + key in self.keys:
                    self._readable(QSCALE + key, ("BF16",) if lowbit_rows else ("F16", "F32"))
            if low:
                self._readable(f"qbits/{m}", ("U8",))
            for key in (f"assign/{m}", f"resid_ranks/{m}"):
                if key in self.keys:
                    self._readable(key, _INTS)
        for i in rows:
            ameta = meta["adapters"][i]
            for key in ameta.get("extras", []):
                key = f"extras/{i}/{key}"
                if key not in self.keys:
                    continue
                if QSCALE + key in self.keys:
                    self._readable(key, ("I8",))
                    self._readable(QSCALE + key, ("F16", "F32"))
                elif key[len(f"extras/{i}/"):] in ameta.get("extras_dtypes", {}):
                    self._readable(key, _FLOATS + ("I8",))
                elif self._how(key)[0] != "phys":
                    raise Unsupported(f"tensor {short(key)} not stored under its own key")

    # -- reads --------------------------------------------------------------------------------------
    def __enter__(self) -> "NumpySource":
        self._reader.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._reader.__exit__(*exc)

    @staticmethod
    def _decode(dtype: str, buf, shape: list[int]) -> np.ndarray:
        if dtype == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32).reshape(shape)
        return np.frombuffer(buf, dtype=_NP_DTYPES[dtype]).reshape(shape)

    def _rows(self, key: str, a: int | None = None, b: int | None = None):
        """Logical tensor ``key`` as stored (rows ``a..b-1`` of its first axis, or all), reading
        only those bytes; NaN/Inf in a base, core, residual or scale tensor is an ArtifactError."""
        how = self._how(key)
        kind = how[0]
        if kind == "phys":
            dtype, shape = how[1], self.header[key]["shape"]
            if a is None:
                arr = self._decode(dtype, self._reader.read_bytes(key), shape)
            else:
                row = math.prod(shape[1:]) * ST_WIDTHS[dtype]
                arr = self._decode(dtype, self._reader.read_bytes(key, a * row, (b - a) * row), [b - a, *shape[1:]])
        elif kind == "rows":  # packed residual rows (or their scales): flat, ``width`` numbers a row
            _, phys, start, total, width = how
            a, b = (0, total) if a is None else (a, b)
            w, dtype = width or 1, self.header[phys]["dtype"]
            size = ST_WIDTHS[dtype]
            buf = self._reader.read_bytes(phys, (start + a * w) * size, (b - a) * w * size)
            arr = self._decode(dtype, buf, [b - a, width] if width else [b - a])
        elif kind == "ranks":  # one column of the (n, M) table
            if self._table is None:
                self._table = self._decode(self._dtype(key), self._reader.read_bytes("resid_ranks"),
                                           self.header["resid_ranks"]["shape"])
            arr = self._table[:, how[1]].astype(np.int64)[slice(a, b)]
        elif kind == "empty":
            arr = np.empty(how[2], dtype=np.float32 if how[1] == "BF16" else _NP_DTYPES[how[1]])
        elif kind == "lowbit":  # v5: bit-packed codes, each row on a byte boundary (lorazip.lowbit)
            _, phys, start, total, width, bits_key, nbytes = how
            a, b = (0, total) if a is None else (a, b)
            bits = self._rows(bits_key).astype(np.int64)
            try:
                offs = lowbit.checked_offsets(width, bits, nbytes)
            except ValueError as exc:
                raise ArtifactError(f"{self.path}: tensor {short(key)}: {exc}") from None
            buf = np.frombuffer(self._reader.read_bytes(phys, start + int(offs[a]), int(offs[b] - offs[a])), "u1")
            arr = lowbit.unpack(buf, bits[a:b], width)
        elif kind == "shared":  # v6 shared parts: rows of one width, each on a byte boundary
            _, phys, start, shape, bits = how
            a, b = (0, shape[0]) if a is None else (a, b)
            lo, hi = shared_span(shape, bits, start, a, b)
            if bits is None:  # the bfloat16 row scales
                arr = self._decode("BF16", self._reader.read_bytes(phys, 2 * lo, 2 * (hi - lo)), [b - a, *shape[1:]])
            else:
                buf = np.frombuffer(self._reader.read_bytes(phys, lo, hi - lo), "u1")
                rows = (b - a) * math.prod(shape[1:-1])
                arr = lowbit.unpack(buf, np.full(rows, bits), shape[-1]).reshape(b - a, *shape[1:])
        else:  # pragma: no cover - refused by _check
            raise Unsupported(f"tensor {short(key)} stored as {short(kind)}")
        if key.startswith(MUST_BE_FINITE) and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ArtifactError(f"{self.path}: tensor {short(key)} has NaN or Inf values")
        return arr

    def _take(self, key: str, rows: list[int] | None):
        """Rows ``rows`` (in that order; all when None) of ``key``, adjacent ones read together."""
        if rows is None:
            return self._rows(key)
        runs: list[list[int]] = []
        for i in rows:
            if runs and runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, i + 1])
        parts = [self._rows(key, a, b) for a, b in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def values(self, key: str, rows: list[int] | None = None):
        """What a reader of ``key`` gets (rows ``rows``, or all): float tensors as stored, int8 ones
        times their row scales in float32 (lorazip.quantize), empty int8 bases as float32. The one
        place that turns a stored tensor into numbers: a new storage kind is decoded here."""
        q = self._take(key, rows)
        if key in self.widths:  # v6 low-bit shared parts: codes and one bfloat16 scale per row
            s = self._take(QSCALE + key, rows)
            if tuple(s.shape) != (*q.shape[:-1], 1):
                raise ArtifactError(f"{self.path}: tensor {short(QSCALE + key)} does not match {short(key)}")
            return lowbit.shared_values(q, s, self.widths[key], key.split("/", 1)[0])
        bits_key = "qbits/" + key.split("/", 1)[1]
        if q.dtype == np.uint8 and QSCALE + key in self.keys and bits_key in self.keys:  # v5 low-bit rows
            return lowbit.dequantize(q, self._take(QSCALE + key, rows), self._take(bits_key, rows))
        if QSCALE + key in self.keys:
            s = self._take(QSCALE + key, rows)
            if tuple(s.shape) != tuple(q.shape[:-1]):
                raise ArtifactError(f"{self.path}: tensor {short(QSCALE + key)} does not match {short(key)}")
            return q.astype(np.float32) * s.astype(np.float32)[..., None]
        if q.size == 0 and q.dtype == np.int8 and key.startswith(QUANTISABLE[:-1]):
            return q.astype(np.float32)
        return q

    def module_factors(self, m: str, rows: list[int]):
        """``(U, V, cores, assignment)`` as :meth:`lorazip.artifact.Artifact.module_factors` gives them."""
        U, V = self.values(f"U/{m}"), self.values(f"V/{m}")
        cores = self.values(f"cores/{m}", rows)
        key = f"assign/{m}"
        assign = self._take(key, rows).astype(np.int64) if key in self.keys else np.zeros(len(rows), dtype=np.int64)
        return U, V, cores, assign

    def module_residuals(self, m: str, rows: list[int]):
        """``(b, a, ks)`` as :meth:`lorazip.artifact.Artifact.module_residuals` gives them (zero-padded to
        the largest ``k_i`` of ``rows``; zero width when none has rows): the stored rows of ``rows``
        read in one pass (adjacent blocks together), then scattered into place."""
        d_out, d_in = self.modules[m]["d_out"], self.modules[m]["d_in"]
        ks = np.zeros(len(rows), dtype=np.int64)
        if f"resid_ranks/{m}" in self.keys and rows:
            k_all = self._rows(f"resid_ranks/{m}").astype(np.int64).reshape(-1)
            ks = k_all[rows]
        k_max = int(ks.max(initial=0))
        if not k_max:
            return np.zeros((len(rows), d_out, 0)), np.zeros((len(rows), 0, d_in)), ks
        which = np.repeat(np.arange(len(rows)), ks)  # the adapter (position in rows) of each stored row
        col = np.arange(len(which)) - np.repeat(np.cumsum(ks) - ks, ks)  # its place among that adapter's
        stored = (np.repeat((np.cumsum(k_all) - k_all)[rows], ks) + col).tolist()  # its row in resid_B / resid_A
        B, A = self.values(f"resid_B/{m}", stored), self.values(f"resid_A/{m}", stored)
        b = np.zeros((len(rows), d_out, k_max), dtype=B.dtype)
        a = np.zeros((len(rows), k_max, d_in), dtype=A.dtype)
        b[which, :, col] = B
        a[which, col] = A
        return b, a, ks

    def extra(self, key: str, orig: str | None):
        """Extras tensor ``key`` (None when not stored): converted ones back in their original dtype
        ``orig``, dequantised int8 ones in float32, the others byte for byte as stored."""
        if key not in self.keys:
            return None
        if orig is None and QSCALE + key not in self.keys:
            info = self.header[key]
            return Raw(info["dtype"], tuple(info["shape"]), self._reader.read_bytes(key))
        return to_raw(self.values(key), orig or "float32")

    # -- arithmetic (what torch does in lorazip.export) -------------------------------------------------
    maximum, cat = staticmethod(np.maximum), staticmethod(np.concatenate)
    cast = staticmethod(to_raw)

    @staticmethod
    def f64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64)

    @staticmethod
    def absmax(x: np.ndarray) -> np.ndarray:
        return np.abs(x).max(axis=(1, 2))

    @staticmethod
    def zeros(shape) -> np.ndarray:
        return np.zeros(shape, dtype=np.float64)

    def save(self, state: dict[str, Raw], tmp: Path, final: Path) -> None:
        write_raw(state, tmp, final)


def export_numpy(
    artifact: Artifact,
    outdir: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    memory_limit: int | None = None,
    empty: list[str] | None = None,
) -> list[Path]:
    """:func:`lorazip.export.export` without torch, for an artifact opened from a file: the same
    folders, byte for byte. Raises :class:`Unsupported` (nothing written) for artifacts it cannot
    read; export those with torch."""

    return export_folders(artifact, outdir, names, dtype=dtype, overwrite=overwrite,
                          source=lambda rows: NumpySource(artifact, rows), memory_limit=memory_limit, empty=empty)
