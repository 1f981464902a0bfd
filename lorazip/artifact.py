"""The lorazip artifact, format v3: one safetensors file of bases, cores and metadata.

Tensors (``<m>`` is a module name such as ``model.layers.0.self_attn.q_proj``):

* ``U/<m>``: (K, d_out, r) and ``V/<m>``: (K, d_in, r), the shared bases (K clusters);
* ``cores/<m>``: (n, r, r) full cores, or (n, r) diagonal ones;
* ``assign/<m>``: (n,) int32 cluster of each adapter (only when K > 1);
* ``stats/sq_error``, ``stats/norm2``: (n, m) float64, per (adapter, module) squared
  error at compression time and ``||M_i||^2`` (module order of the metadata);
* ``spectra/<m>``: (n, r_max) float32 singular values of each original delta;
* ``extras/<i>/<key>``: non-LoRA tensors of adapter i (``modules_to_save`` heads), as-is or
  converted by ``extras_dtype`` (``stats/extras_sq_error``, ``stats/extras_norm2``: (n,) their error);
* int8 storage (``storage_dtype = "int8"``, or int8 extras): ``<key>`` int8 plus ``qscale/<key>``,
  one float16/float32 scale per row (last axis); :meth:`Artifact.get` and the other readers
  return the dequantised float32 values (:mod:`lorazip.quantize`);
* format v2: ``resid_ranks/<m>`` (n,) int32 ``k_i``, ``resid_B/<m>`` (sum k_i, d_out) and
  ``resid_A/<m>`` (sum k_i, d_in): per-adapter residual parts ``b_i a_i`` added to
  ``U S_i V^T`` (rows ``o_i .. o_i + k_i - 1`` hold ``b_i^T`` / ``a_i``), only in modules with
  ``sum k_i > 0``; a module's shared rank may be 0 (empty U, V, cores). v1 files are read too.

These are the logical tensors every reader here sees. A v3 file packs some of them
(:mod:`lorazip.layout`: spectra, residual ranks, statistics, and every module's residual rows in
one flat ``resid_B`` / ``resid_A``), and reads of a few rows read only their bytes.

The header metadata holds ``format = "lorazip"``, ``format_version`` and ``lorazip``,
a JSON document (see docs/format.md). The module never knows which solver produced
the tensors. Writes are atomic; reads are lazy (one adapter's cores are a slice).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import ArtifactError, OutputError, first_line
from .layout import SHARED, Layout, lowbit_meta, shared_bit, shared_shapes
from .io.safetensors_header import (FLOAT_DTYPES, ST_DTYPES, ST_WIDTHS, RawReader, header_bytes, parse_header,
                                    parse_json, short)

if TYPE_CHECKING:
    import torch

# Reading an artifact's header (load_artifact, file_checksum, ``lorazip info`` / ``verify``) needs
# neither torch nor numpy; torch is imported by the functions and methods that build tensors.

FORMAT_NAME = "lorazip"
FORMAT_VERSION = 7  # 7: compact spectra, ranks and metadata of files with low-bit parts; 6: low-bit shared parts (shared_bits); 5: low-bit residual rows (lorazip.lowbit); 4: residual rows packed flat; 3: packed layout (lorazip.layout); 2: residual parts (resid_*), rank-0 modules; v1, v2 read
VERIFY_AUTO_BYTES = 64 * 2**20  # load_artifact checks the checksum of artifacts up to this size by default
# float tensors that must be finite
MUST_BE_FINITE = ("U/", "V/", "cores/", "stats/", "spectra/", "resid_B/", "resid_A/", "qscale/")
QSCALE = "qscale/"  # int8 storage: ``qscale/<key>``, the row scales of the int8 tensor ``<key>`` (lorazip.quantize)
QUANTISABLE = ("U/", "V/", "cores/", "resid_B/", "resid_A/", "extras/")  # keys that may be stored as int8
BITS = (1, 2, 3, 4, 8)  # lorazip.lowbit.BITS, checked without numpy
LOWBIT_GROUP = "row"  # low-bit rows have one scale per row (lorazip.lowbit.GROUP None; checked without numpy)
EXTRAS_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")  # original dtypes of converted extras


def __getattr__(name: str) -> Any:
    if name == "STORAGE_DTYPES":  # torch dtypes: built on first use, so importing this module stays cheap
        import torch

        value = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the safetensors header, without torch ----------------------------------------------------------
# One parser with lorazip.io.peft.parse_safetensors (lorazip.io.safetensors_header), raising ArtifactError.


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and check the header of the safetensors file ``path`` against the file (no tensor
    data is read): ``(tensors, metadata, data_start)``. A known dtype for every tensor, shapes
    that match byte sizes, offsets that tile the data exactly to the end of the file; anything
    else is an :class:`ArtifactError`."""
    return parse_header(path, ArtifactError)


class HeaderReader(RawReader):
    """An artifact file's checked header plus raw reads of its tensors' bytes (plain file I/O,
    no torch): what :func:`load_artifact`, :func:`file_checksum` and :func:`lorazip.verify` need."""

    def __init__(self, path: Path):
        super().__init__(path, ArtifactError)


_DRY_CHECKSUM = hashlib.sha256(b"dry assembly").hexdigest()  # a dry assembly's stand-in (hexadecimal, 64 digits)


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    import torch

    from .layout import Streamed

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if isinstance(t, Streamed):  # made a piece at a time (packed low-bit rows)
            for piece in t.pieces():
                h.update(memoryview(piece))
        elif t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return h.hexdigest()


def file_checksum(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """:func:`tensor_checksum` of the tensors stored in a safetensors file, computed from the raw
    bytes on disk (streamed; no tensor is built), so it costs one sequential read of the file."""
    with HeaderReader(Path(path)) as f:
        h = hashlib.sha256()
        for key in sorted(f.header):
            info = f.header[key]
            h.update(f"{key}|{ST_DTYPES[info['dtype']][1]}|{tuple(info['shape'])}|".encode())
            start, end = info["data_offsets"]
            for first in range(0, end - start, chunk):
                h.update(f.read_bytes(key, first, min(chunk, end - start - first)))
        return h.hexdigest()


def extras_kept(artifact: "Artifact") -> set[int]:
    """The adapters (indices) whose non-LoRA tensors the artifact stores (none after ``--no-extras``);
    from the tensor keys alone (no torch)."""
    return {int(k.split("/")[1]) for k in artifact.keys() if k.startswith("extras/")}


def storage_summary(artifact: "Artifact") -> dict[str, Any]:
    """Numbers and bytes: originals versus the artifact's bases and cores. Reads the metadata
    alone (no tensor, no torch), so ``lorazip info`` can report it; ``lorazip.evaluate.storage``."""
    n = len(artifact.names)
    orig = 0
    for a in artifact.meta["adapters"]:
        for mod in artifact.modules:
            orig += a["ranks"].get(mod["name"], 0) * (mod["d_in"] + mod["d_out"])
    comp = 0
    for mod in artifact.modules:
        r, k = mod["rank"], mod.get("n_clusters", 1)
        r_out = mod.get("rank_out", r)  # a head kept whole on its small side: rectangular cores
        core = r if artifact.method in ("jd-diag", "svd") else r_out * r
        comp += k * (r * mod["d_in"] + r_out * mod["d_out"]) + n * core
        comp += (mod.get("residual") or {}).get("total_rank", 0) * (mod["d_in"] + mod["d_out"])  # b_i, a_i (v2)
    orig_bytes = sum(
        f["bytes"] for a in artifact.meta["adapters"] for name, f in a["source"]["files"].items()
        if not name.endswith(".json")
    )
    if any(a.get("extras_bytes") for a in artifact.meta["adapters"]):  # heads left out (--no-extras) are
        # compared with nothing: the originals' bytes are then those of what the artifact represents
        kept = extras_kept(artifact)
        orig_bytes -= sum(a.get("extras_bytes", 0) for i, a in enumerate(artifact.meta["adapters"]) if i not in kept)
    art_bytes = os.path.getsize(artifact.path) if artifact.path else artifact.nbytes_tensors()
    return {
        "original_params": orig,
        "compressed_params": comp,
        "ratio_params": orig / comp if comp else 0.0,
        "original_bytes": orig_bytes,
        "artifact_bytes": art_bytes,
        "ratio_bytes": orig_bytes / art_bytes if art_bytes else 0.0,
        "bytes_per_adapter": art_bytes / n if n else 0.0,
    }


def current_umask() -> int:
    """The process umask (read from /proc where possible, so no thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync and rename it into place."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    parent = final.parent if str(final.parent) else Path(".")
    made = _make_parents(final, parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(f"{final}: cannot write ({exc.strerror})") from None
    tmp = Path(tmp)
    done = False
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, final)
        try:
            dfd = os.open(parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
        done = True
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
        if not done:
            _remove_empty(made)


def missing_folders(final: Path, parent: Path | None = None) -> list[Path]:
    """The folders above ``final`` (from ``parent``, by default its own) that do not exist yet,
    deepest first; :class:`OutputError` where the nearest existing one is not a folder (a file
    there: checked before a long run, not after it)."""
    made = []
    p = Path(final).parent if parent is None else parent
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{final}: {p} is not a folder")
    return made


def _make_parents(final: Path, parent: Path) -> list[Path]:
    """Create the missing folders above ``final`` (as ``hf download --local-dir`` does); returns
    them, deepest first, so that a failed write can remove them again."""
    made = missing_folders(final, parent)
    for d in reversed(made):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_empty(made)
            raise OutputError(f"{final}: cannot create folder {d} ({exc.strerror or exc})") from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders :func:`_make_parents` created (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes of a safetensors file of ``tensors`` and the order of their data
    (:func:`lorazip.io.safetensors_header.header_bytes`: deterministic, as lorazip writes every file)."""
    from .io.peft import ST_TORCH

    torch_st = {v: k for k, v in ST_TORCH.items()}
    for key, t in tensors.items():
        if t.dtype not in torch_st:
            raise OutputError(f"tensor {short(key)}: dtype {t.dtype} cannot be stored in safetensors")
    return header_bytes({k: (torch_st[t.dtype], t.shape) for k, t in tensors.items()}, metadata)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file with plain file I/O (streamed, any path, byte-for-byte deterministic)."""
    import torch

    from .layout import Streamed

    head, order = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key in order:
            if isinstance(tensors[key], Streamed):  # made and written a piece at a time
                for piece in tensors[key].pieces():
                    f.write(piece.data)
                continue
            t = tensors[key].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def save_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str], final: Path) -> None:
    """:func:`write_safetensors` with write errors (disk full, file too large) as :class:`OutputError` on ``final``."""
    try:
        write_safetensors(tensors, tmp, metadata)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None


class Artifact:
    """A compressed collection: metadata plus tensors held in memory or read lazily from a file.

    Build one with :func:`lorazip.compress`, open one with :func:`load_artifact`.
    """

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, path: Path | None = None):
        self.meta = meta
        self.path = path
        self._tensors = tensors
        self.allocation: dict[str, Any] | None = None  # what a budget / target chose (not saved)
        self.cluster_choice: dict[str, Any] | None = None  # the error-vs-K curve of clusters="auto" (not saved)
        self._handle = None  # the open file while in a ``with artifact.reader():`` block
        self._layout = None  # format v3 file: where the logical tensors are (lorazip.layout.Layout)
        self._entries: dict[str, dict[str, Any]] | None = None  # a file's logical header (dtype, shape)
        # a dry assembly (its parts zeros, for its size alone): the checksum recorded in its metadata
        # is a stand-in of the same length, not a pass over its bytes (see :meth:`serialized_size`)
        self.dry = False

    # -- metadata views -------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.meta["adapters"]]

    @property
    def modules(self) -> list[dict[str, Any]]:
        return self.meta["modules"]

    @property
    def method(self) -> str:
        return self.meta["method"]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ArtifactError(f"{self.path or 'artifact'}: no adapter named {name!r}") from None

    # -- tensors ----------------------------------------------------------
    def keys(self) -> list[str]:
        """The logical tensor keys (format v3 packs some of them; see :mod:`lorazip.layout`)."""
        if self._tensors is not None:
            return list(self._tensors)
        if self._layout is not None:
            return self._layout.keys()
        with self._open() as f:
            return list(f.keys())

    def _read(self, f, key: str) -> torch.Tensor:
        """Logical tensor ``key`` in its stored form from the open file ``f``."""
        if self._layout is not None and key in self._layout.virtual:
            return self._finite(key, self._layout.read(key, f))
        return self._finite(key, f.get_tensor(key))

    @contextmanager
    def _open(self):
        from safetensors import safe_open

        from .io.peft import SafetensorsReader, utf8_path

        held = getattr(self, "_handle", None)
        if held is not None:  # inside reader(): reuse the open file
            try:
                yield held
            except ArtifactError:
                raise
            except Exception as exc:
                raise ArtifactError(f"{self.path}: cannot read tensors ({first_line(exc)})") from None
            return
        if not utf8_path(self.path):  # safetensors opens UTF-8 paths only
            with SafetensorsReader(self.path, ArtifactError) as f:
                yield f
            return
        try:
            with safe_open(str(self.path), framework="pt") as f:
                yield f
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"{self.path}: cannot read tensors ({first_line(exc)})") from None

    @contextmanager
    def reader(self) -> Iterator["Artifact"]:
        """Keep the artifact file open for the reads in the block: :meth:`get`, :meth:`get_rows`,
        :meth:`module_factors` and :meth:`module_residuals` then share one handle instead of
        opening the file for every tensor. Nests; a no-op for in-memory artifacts."""
        if self._tensors is not None or getattr(self, "_handle", None) is not None:
            yield self
            return
        from contextlib import ExitStack

        from safetensors import safe_open

        from .io.peft import SafetensorsReader, utf8_path

        stack = ExitStack()
        try:
            if utf8_path(self.path):
                handle = stack.enter_context(safe_open(str(self.path), framework="pt"))
            else:  # safetensors opens UTF-8 paths only
                handle = stack.enter_context(SafetensorsReader(self.path, ArtifactError))
        except ArtifactError:
            stack.close()
            raise
        except Exception as exc:
            stack.close()
            raise ArtifactError(f"{self.path}: cannot read tensors ({first_line(exc)})") from None
        self._handle = handle
        try:
            yield self
        finally:
            self._handle = None
            stack.close()

    def _finite(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Refuse NaN/Inf in bases, cores and statistics read from a file (a hostile or damaged artifact)."""
        import torch

        if key.startswith(MUST_BE_FINITE) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{self.path}: tensor {short(key)} has NaN or Inf values")
        return t

    def _has(self, key: str) -> bool:
        return key in self._tensors if self._tensors is not None else key in self._key_set()

    def _quantised(self, key: str) -> bool:
        """An int8 tensor with row scales ``qscale/<key>`` (format: docs/format.md, int8 storage)."""
        return not key.startswith(QSCALE) and self._has(QSCALE + key)

    def _dequantised(self, key: str, t: torch.Tensor, scale: torch.Tensor | None,
                     bits: torch.Tensor | None = None) -> torch.Tensor:
        """float32 values of the int8 rows ``t`` with their ``scale`` (low-bit rows: uint8 codes with
        their group scales and per-row ``bits``); an empty int8 base, core or residual tensor
        (stored without scales) as an empty float32 one; anything else as is."""
        import torch

        from .quantize import dequantize_lowbit, dequantize_rows

        if scale is not None and t.dtype == torch.uint8 and self._shared_bits(key):
            return self._shared_values(key, t, scale)
        if scale is not None and t.dtype == torch.uint8:
            if bits is None or scale.shape[0] != t.shape[0] or bits.shape[0] != t.shape[0]:
                raise ArtifactError(f"{self.path or 'artifact'}: low-bit tensor {short(key)} without matching "
                                    "scales and bits")
            return dequantize_lowbit(t, scale, bits)
        if scale is not None:
            if tuple(scale.shape) != tuple(t.shape[:-1]):
                raise ArtifactError(
                    f"{self.path or 'artifact'}: tensor {short(QSCALE + key)} does not match {short(key)}")
            return dequantize_rows(t, scale)
        if t.numel() == 0 and t.dtype == torch.int8 and key.startswith(QUANTISABLE[:-1]):
            return t.float()
        return t

    def _shared_bits(self, key: str) -> int | None:
        """The bit width of a low-bit shared tensor ``U/<m>``, ``V/<m>`` or ``cores/<m>`` (its module's
        ``shared_bits``, format v6); None for any other key."""
        role, _, name = key.partition("/")
        if role not in SHARED:
            return None
        sb = next((m.get("shared_bits") for m in self.modules if m["name"] == name), None)
        return shared_bit(role, sb) if sb else None

    def _shared_values(self, key: str, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 values (logical shape) of low-bit shared codes ``t`` with their row ``scale``."""
        import torch

        from .lowbit import shared_values

        if tuple(scale.shape) != (*t.shape[:-1], 1):
            raise ArtifactError(f"{self.path or 'artifact'}: tensor {short(QSCALE + key)} does not match "
                                f"{short(key)} (one scale per row)")
        role = key.split("/", 1)[0]
        return torch.from_numpy(shared_values(t.numpy(), scale.float().numpy(), self._shared_bits(key), role))

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``; int8 tensors with row scales come back dequantised, in float32
        (:meth:`tensors` gives the stored form)."""
        if self._tensors is not None:
            t = self._tensors[key]
        else:
            with self._open() as f:
                t = self._read(f, key)
        scale = bits = None
        if self._quantised(key):
            scale = self.get(QSCALE + key)
            if self._lowbit(key):
                bits = self.get(_bits_key(key))
        return self._dequantised(key, t, scale, bits)

    def _lowbit(self, key: str) -> bool:
        """A residual tensor whose rows are low-bit codes (format v5: ``qbits/<m>`` gives their bits)."""
        return key.startswith(("resid_B/", "resid_A/")) and self._has(_bits_key(key))

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows of a tensor along dim 0 without reading the others (safetensors slicing); int8
        rows dequantised as in :meth:`get`."""
        import torch

        if self._tensors is not None:
            t = self._tensors[key][rows]
            bits = self._tensors[_bits_key(key)][rows] if self._lowbit(key) else None
            return self._dequantised(key, t, self._tensors[QSCALE + key][rows] if self._quantised(key) else None,
                                     bits)
        if not len(rows):
            return torch.empty(0)
        blocks = self._read_spans(key, [(int(i), int(i) + 1) for i in rows])
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _read_spans(self, key: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Row blocks ``t[a:b]`` (dim 0) of tensor ``key`` for each ``(a, b)`` in ``spans`` (b > a),
        reading adjacent blocks with one slice and nothing outside them; int8 blocks dequantised
        with the same rows of their scales."""
        blocks = self._read_raw_spans(key, spans)
        if self._quantised(key):
            scales = self._read_raw_spans(QSCALE + key, spans)
            if self._lowbit(key):
                bits = self._read_raw_spans(_bits_key(key), spans)
                return [self._dequantised(key, t, s, b) for t, s, b in zip(blocks, scales, bits)]
            return [self._dequantised(key, t, s) for t, s in zip(blocks, scales)]
        return [self._dequantised(key, t, None) for t in blocks]

    def _read_raw_spans(self, key: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        runs: list[list[int]] = []
        where: list[tuple[int, int]] = []  # (run, offset in the run) of each span
        for a, b in spans:
            if a < 0 or b <= a:
                raise IndexError(f"tensor {short(key)}: bad row range {a}..{b}")
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
            where.append((len(runs) - 1, a - runs[-1][0]))
        if self._tensors is not None:
            t = self._tensors[key]
            read = [t[a:b] for a, b in runs]
        elif self._layout is not None and self._layout.row_reads(key):  # packed residual rows: their bytes only
            with self._open() as f:
                read = [self._finite(key, self._layout.read_rows(key, f, a, b)) for a, b in runs]
        elif self._layout is not None and key in self._layout.virtual:  # small: read whole, then sliced
            with self._open() as f:
                t = self._read(f, key)
            read = [t[a:b] for a, b in runs]
        else:
            with self._open() as f:
                sl = f.get_slice(key)
                read = [self._finite(key, sl[a:b]) for a, b in runs]
        for (a, b), t in zip(runs, read):
            if t.shape[0] != b - a:
                raise IndexError(f"tensor {short(key)}: rows {a}..{b - 1} out of range")
        return [read[j][o : o + b - a] for (j, o), (a, b) in zip(where, spans)]

    def tensor_size(self, key: str) -> tuple[int, int]:
        """``(elements, bytes per element)`` of logical tensor ``key`` as stored, without reading it
        (from the header for an artifact opened from a file)."""
        if self._tensors is not None:
            t = self._tensors[key]
            return t.numel(), t.element_size()
        info = self._entries[key]
        return math.prod(info["shape"]), ST_WIDTHS[info["dtype"]]

    def raw(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in its stored form (int8 or low-bit codes, not dequantised)."""
        if self._tensors is not None:
            return self._tensors[key]
        with self._open() as f:
            return self._read(f, key)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor in its stored form (int8 tensors and their ``qscale/`` scales as written)."""
        if self._tensors is not None:
            return self._tensors
        with self._open() as f:
            return {k: self._read(f, k) for k in self.keys()}

    def module_factors(self, module: str, rows: list[int] | None = None):
        """``(U, V, cores, assignment)`` of a module; cores and assignment for ``rows`` only."""
        import torch

        n = len(self.names)
        rows = list(range(n)) if rows is None else rows
        U, V = self.get(f"U/{module}"), self.get(f"V/{module}")
        cores = self.get_rows(f"cores/{module}", rows)
        if f"assign/{module}" in self._key_set():
            assign = self.get_rows(f"assign/{module}", rows).long()
        else:
            assign = torch.zeros(len(rows), dtype=torch.long)
        return U, V, cores, assign

    def _module(self, module: str) -> dict[str, Any]:
        for mod in self.modules:
            if mod["name"] == module:
                return mod
        raise ArtifactError(f"{self.path or 'artifact'}: no module named {short(module)}")

    def module_residuals(self, module: str, rows: list[int] | None = None):
        """``(b, a, ranks)``: the per-adapter residual parts of a module (format v2) for ``rows``
        (default: all adapters), zero-padded to the largest rank ``k_max`` among them:
        ``b`` (len(rows), d_out, k_max), ``a`` (len(rows), k_max, d_in), ``ranks`` (len(rows),) int64
        (``k_i``); the reconstruction is ``U S_i V^T + b[j] @ a[j]``. ``k_max`` is 0 when the module
        (or these rows) has none. Reads the ranks and the row blocks of ``rows`` only."""
        import torch

        mod = self._module(module)
        n = len(self.names)
        rows = list(range(n)) if rows is None else [int(i) for i in rows]
        d_out, d_in = mod["d_out"], mod["d_in"]
        kr, kb, ka = f"resid_ranks/{module}", f"resid_B/{module}", f"resid_A/{module}"

        def none(ks: torch.Tensor):
            dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # int8: float32, as get() returns
            dtype = dtypes.get(self.meta.get("storage_dtype"), torch.float32)
            return torch.zeros(len(rows), d_out, 0, dtype=dtype), torch.zeros(len(rows), 0, d_in, dtype=dtype), ks

        if kr not in self._key_set() or not rows:
            return none(torch.zeros(len(rows), dtype=torch.long))
        with self.reader():
            k_all = self.get(kr).long().reshape(-1)
            if any(not 0 <= i < n for i in rows):
                raise IndexError(f"module {short(module)}: adapter rows out of range 0..{n - 1}")
            offs = (torch.cumsum(k_all, 0) - k_all).tolist()
            ks = k_all[rows]
            spans = [(offs[i], offs[i] + int(k_all[i])) for i in rows if int(k_all[i]) > 0]
            if not spans:
                return none(ks)
            bs, as_ = self._read_spans(kb, spans), self._read_spans(ka, spans)
        k_max = int(ks.max())
        b = torch.zeros(len(rows), d_out, k_max, dtype=bs[0].dtype)
        a = torch.zeros(len(rows), k_max, d_in, dtype=as_[0].dtype)
        it = iter(zip(bs, as_))
        for j, k in enumerate(ks.tolist()):
            if k > 0:
                bj, aj = next(it)
                b[j, :, :k] = bj.T
                a[j, :k] = aj
        return b, a, ks

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sq_error, norm2), each (n, m) float64, recorded at compression."""
        return self.get("stats/sq_error"), self.get("stats/norm2")

    def nbytes_tensors(self) -> int:
        """Bytes of tensor data as written (the packed layout of format v3)."""
        from .layout import pack

        return sum(t.numel() * t.element_size() for t in pack(self.tensors(), self.meta).values())

    # -- writing ----------------------------------------------------------
    def _serialize_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        """The physical tensors (:func:`lorazip.layout.pack`), header metadata and metadata of the file."""
        from .layout import encode_meta, pack

        logical = self.tensors()
        # packing and the checksum cost a pass over every byte: done once while nothing changes (each
        # tensor's identity, shape, dtype and in-place version, and the metadata, are compared)
        key = (json.dumps(self.meta, sort_keys=True, default=str),
               tuple((k, id(v), v.data_ptr(), tuple(v.shape), v.dtype, v._version) for k, v in sorted(logical.items())))
        memo = getattr(self, "_serialized", None)
        if memo is not None and memo[0] == key:
            return memo[1]
        tensors = {k: v.contiguous() for k, v in pack(logical, self.meta, self.dry).items()}
        meta = dict(self.meta)
        meta["checksum"] = _DRY_CHECKSUM if self.dry else tensor_checksum(tensors)
        version = written_version(meta)
        header = {"format": FORMAT_NAME, "format_version": str(version), "lorazip_z": encode_meta(meta, version >= 7)}
        self._serialized = (key, (tensors, header, meta))
        return tensors, header, meta

    def serialized_size(self) -> int:
        """Exact size in bytes of the file :meth:`save` would write (no data is serialized). Of a
        :attr:`dry` assembly, whose checksum is a stand-in: exact but for the compressed metadata,
        where one 64-digit hexadecimal string stands for another (a byte or two either way)."""
        tensors, header, _ = self._serialize_inputs()
        head, _order = safetensors_header(tensors, header)
        return len(head) + sum(t.numel() * t.element_size() for t in tensors.values())

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically to ``path`` (temp file in the same folder, fsync, rename).

        Interrupted (KeyboardInterrupt, SystemExit) or failing writes remove the temp file;
        a file under the final name is always complete.
        """
        path = Path(path)
        if self.dry:
            raise ValueError("a dry assembly (zeros in place of its parts) is not written")
        tensors, header, meta = self._serialize_inputs()
        with atomic_path(path, overwrite) as tmp:
            save_safetensors(tensors, tmp, header, path)
        self.meta, self.path = meta, path
        self._serialized = None  # its packed copies are not needed again
        return path


def load_artifact(path: str | os.PathLike, *, verify: bool | None = None) -> Artifact:
    """Open an artifact lazily after validating its header and metadata.

    Parameters
    ----------
    verify
        Check the tensors against the checksum recorded at write time (one sequential read
        of the file). ``None`` (default) checks artifacts up to ``VERIFY_AUTO_BYTES`` (64 MiB)
        and skips larger ones (use :func:`lorazip.verify` for those).

    Raises
    ------
    ArtifactError
        Missing, truncated or corrupt file, not a lorazip artifact, a newer format version,
        metadata of the wrong shape or types, tensors that disagree with the metadata, or
        (when verified) tensors changed after writing.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact file")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file")
    with HeaderReader(path) as reader:
        header, meta_raw = reader.header, reader.metadata()
        if meta_raw.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{path}: not a lorazip artifact (no 'format: lorazip' in the header)")
        raw_version = meta_raw.get("format_version", "")
        if not (raw_version.isascii() and raw_version.isdigit()) or int(raw_version) < 1:
            raise ArtifactError(f"{path}: invalid format_version {short(raw_version)}")
        version = int(raw_version)
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: format version {version} is newer than this lorazip reads ({FORMAT_VERSION}); upgrade lorazip"
            )
        meta = read_meta(meta_raw, path, version)
        layout = None
        if version >= 3:
            check_meta(meta, {}, path, schema_only=True)
            try:
                layout = Layout(header, meta)
            except ValueError as exc:
                raise ArtifactError(f"{path}: {exc}") from None
        check_meta(meta, layout.logical_header(header) if layout else header, path)
        _check_assignments(reader, meta, path, layout)
    data_bytes = sum(e - s for s, e in (h["data_offsets"] for h in header.values()))
    if verify or (verify is None and data_bytes <= VERIFY_AUTO_BYTES):
        want = meta.get("checksum")
        if want is None:
            if verify:
                raise ArtifactError(f"{path}: no checksum recorded in the artifact; cannot verify it")
        elif file_checksum(path) != want:
            raise ArtifactError(
                f"{path}: checksum mismatch: the tensors were changed after the artifact was written "
                "(damaged or edited file)"
            )
    art = Artifact(meta, path=path)
    art._layout = layout
    art._entries = layout.logical_header(header) if layout else header
    return art


def written_version(meta: dict[str, Any]) -> int:
    """The format version a file of ``meta`` is written in: the oldest that holds it (7 with low-bit
    parts, whose spectra, residual ranks and metadata are stored compactly; else 4), so that older
    lorazip versions read what they can and refuse the rest with "upgrade lorazip"."""
    return 7 if lowbit_meta(meta) else 4


def _bits_key(key: str) -> str:
    """``qbits/<m>`` of a residual key ``resid_B/<m>`` / ``resid_A/<m>``."""
    return "qbits/" + key.split("/", 1)[1]


def read_meta(meta_raw: dict[str, str], path: Path | str, version: int) -> Any:
    """The ``lorazip`` metadata document of a header: plain JSON (v1, v2) or ``lorazip_z`` (v3; v7: ranks as lists, expanded)."""
    from .layout import META_Z, decode_meta, expand_ranks

    key = META_Z if version >= 3 else "lorazip"
    if key not in meta_raw:
        raise ArtifactError(f"{path}: corrupt lorazip metadata (no '{key}' document)")
    try:
        doc = parse_json(decode_meta(meta_raw[key]) if key == META_Z else meta_raw[key])
        if version >= 7:
            expand_ranks(doc)
        return doc
    except ValueError as exc:
        raise ArtifactError(f"{path}: corrupt lorazip metadata ({exc})") from None


# -- metadata schema ------------------------------------------------------------------------

def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _opt(v: Any, kind) -> bool:
    return v is None or isinstance(v, kind)


def module_path(mod: dict[str, Any]) -> str:
    """The model's module path of an artifact module entry: its ``target`` for a shape group
    (``classifier@3x768``, see :class:`lorazip.io.collection.ModuleInfo`), else its name."""
    return mod.get("target") or mod["name"]


def missing_modules(modules: list[dict[str, Any]], ranks: dict[str, int]) -> list[str]:
    """Module paths an adapter does not adapt in any shape group."""
    have = {module_path(m) for m in modules if m["name"] in ranks}
    return sorted({module_path(m) for m in modules} - have)


def split_modules(modules: list[dict[str, Any]], adapters: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Module path -> its shape groups (key, shape, adapters in it), for modules whose adapters
    differ in shape (each shape is compressed on its own: its own bases and cores)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in modules:
        if "target" in m:
            n = sum(m["name"] in a["ranks"] for a in adapters)
            out.setdefault(m["target"], []).append({"name": m["name"], "d_out": m["d_out"], "d_in": m["d_in"],
                                                    "adapters": n})
    return out


def check_meta(meta: Any, header: dict[str, dict[str, Any]], path: Path | str = "artifact", *,
               schema_only: bool = False) -> None:
    """Check the ``lorazip`` metadata document (types of every field lorazip reads) and that the
    tensors it describes exist with the right shapes and dtypes in ``header`` (the logical
    entries; not checked with ``schema_only``). Raises :class:`ArtifactError` naming the first
    bad field, so nothing downstream meets a KeyError or TypeError."""
    _check_document_fields(meta, path)
    modules, adapters = meta.get("modules"), meta.get("adapters")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise _corrupt(path, "'modules' must be a list of objects")
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        raise _corrupt(path, "'adapters' must be a list of objects")
    if not adapters:
        raise _corrupt(path, "no adapters")
    _check_module_entries(modules, path)
    _check_shared_bits(meta, path)
    _check_adapter_entries(adapters, path)
    if schema_only:
        return
    check = _HeaderCheck(header, path)
    check.scales()
    for mod in modules:
        check.module(mod, len(adapters), meta.get("method", ""))
    for key in ("stats/sq_error", "stats/norm2"):
        check.tensor(key, [[len(adapters), len(modules)]], FLOAT_DTYPES)
    for key in ("stats/extras_sq_error", "stats/extras_norm2"):  # extras converted by extras_dtype
        if key in header:
            check.tensor(key, [[len(adapters)]], FLOAT_DTYPES)


def _corrupt(path: Path | str, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: corrupt lorazip metadata ({what})")


def _check_document_fields(meta: Any, path: Path | str) -> None:
    """The document's own fields: method, rank, the strings, solver and clustering."""
    if not isinstance(meta, dict):
        raise _corrupt(path, "not a JSON object")
    if not isinstance(meta.get("method"), str):
        raise _corrupt(path, "'method' must be a string")
    mods_raw = meta.get("modules")
    v2_parts = isinstance(mods_raw, list) and any(  # rank-0 modules or residual parts (format v2)
        isinstance(m, dict) and (m.get("rank") == 0 or m.get("residual") is not None) for m in mods_raw
    )
    if not (_is_int(meta.get("rank"), 1) or (_is_int(meta.get("rank")) and v2_parts)):
        raise _corrupt(path, "'rank' must be a positive integer (0 only with rank-0 modules or residual parts)")
    for key in ("lorazip_version", "base_model", "weighting", "storage_dtype", "extras_dtype", "checksum"):
        if not _opt(meta.get(key), str):
            raise _corrupt(path, f"'{key}' must be a string")
    if not _opt(meta.get("solver"), dict):
        raise _corrupt(path, "'solver' must be an object")
    cl = meta.get("clustering")
    if cl is not None:
        if not isinstance(cl, dict) or not _is_int(cl.get("n_clusters", 1), 1):
            raise _corrupt(path, "'clustering' must be an object with a positive 'n_clusters'")
        if cl.get("n_clusters", 1) > 1 and not (
            isinstance(cl.get("per_module"), bool) and _is_int(cl.get("rounds"))
            and isinstance(cl.get("converged"), bool)
        ):
            raise _corrupt(path, "'clustering' needs 'per_module', 'rounds' and 'converged'")


def _check_module_entries(modules: list[dict[str, Any]], path: Path | str) -> None:
    """Every module entry, unique names, and shape groups of one module path differing in shape."""
    seen: set[str] = set()
    for j, mod in enumerate(modules):
        name = mod.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise _corrupt(path, f"modules[{j}].name must be a unique non-empty string")
        seen.add(name)
        _check_module_entry(j, mod, path)
    paths: dict[tuple, str] = {}
    for mod in modules:  # two shape groups of one module path must differ in shape
        key = (module_path(mod), mod.get("layout", "linear"), mod["d_out"], mod["d_in"])
        if key in paths:
            raise _corrupt(path, f"modules {short(paths[key])} and {short(mod['name'])} are the same module "
                                 f"{short(key[0])} with the same shape")
        paths[key] = mod["name"]


def _check_module_entry(j: int, mod: dict[str, Any], path: Path | str) -> None:
    """Module ``j``'s fields other than its name: dimensions, rank, residual, quant, clusters, layout, target."""
    for key in ("d_out", "d_in"):
        if not _is_int(mod.get(key), 1):
            raise _corrupt(path, f"modules[{j}].{key} must be a positive integer")
    if not _is_int(mod.get("rank")):
        raise _corrupt(path, f"modules[{j}].rank must be a non-negative integer")
    res = mod.get("residual")
    if res is not None and not (
        isinstance(res, dict) and _is_int(res.get("max_rank"), 1) and _is_int(res.get("total_rank"), 1)
        and res["max_rank"] <= res["total_rank"]
    ):
        raise _corrupt(path, f"modules[{j}].residual must be an object with positive 'max_rank' <= 'total_rank'")
    for key, low, high, what in (("quant", 0, 4, "relative errors"), ("quant_rest", 1, 1e4, "ratios >= 1")):
        quant = mod.get(key)
        if quant is not None and not (isinstance(quant, list) and len(quant) == 5 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high for x in quant)):
            raise _corrupt(path, f"modules[{j}].{key} must be five {what} (at 1, 2, 3, 4 and 8 bits)")
    bits = (res or {}).get("bits")
    if bits is not None and not (
        isinstance(bits, dict) and bits.get("group") == LOWBIT_GROUP and isinstance(bits.get("bytes"), list)
        and len(bits["bytes"]) == 2 and all(_is_int(b, 1) for b in bits["bytes"])
    ):
        raise _corrupt(path, f"modules[{j}].residual.bits must be an object with 'group' {LOWBIT_GROUP} and two "
                             "positive 'bytes'")
    if not _is_int(mod.get("n_clusters", 1), 1):
        raise _corrupt(path, f"modules[{j}].n_clusters must be a positive integer")
    if mod.get("layout", "linear") not in ("linear", "embedding"):
        raise _corrupt(path, f"modules[{j}].layout must be 'linear' or 'embedding'")
    if "target" in mod and not (isinstance(mod["target"], str) and mod["target"] and mod["target"] != mod["name"]):
        raise _corrupt(path, f"modules[{j}].target must be a module path other than its name (a shape group's module)")


def _check_shared_bits(meta: dict[str, Any], path: Path | str) -> None:
    """``shared_bits``: two widths of :data:`BITS` (bases, cores), on modules of rank > 0 of an
    artifact stored in int8 only (format v5)."""
    for j, mod in enumerate(meta["modules"]):
        sb = mod.get("shared_bits")
        if sb is None:
            continue
        if not (isinstance(sb, list) and len(sb) == 2 and all(_is_int(b) and b in BITS for b in sb)):
            raise _corrupt(path, f"modules[{j}].shared_bits must be two bit widths among "
                                 f"{', '.join(map(str, BITS))} (bases, cores)")
        if mod["rank"] == 0:
            raise _corrupt(path, f"modules[{j}].shared_bits on a module of rank 0 (no shared part)")
        if meta.get("storage_dtype") != "int8":
            raise _corrupt(path, f"modules[{j}].shared_bits in an artifact whose storage_dtype is not int8")


def _check_adapter_entries(adapters: list[dict[str, Any]], path: Path | str) -> None:
    """Every adapter entry: a unique name, ranks, source files, config and extras."""
    names: set[str] = set()
    for i, a in enumerate(adapters):
        name = a.get("name")
        if not isinstance(name, str) or not name:
            raise _corrupt(path, f"adapters[{i}].name must be a non-empty string")
        if name in names:
            raise _corrupt(path, f"adapter name {short(name)} is used twice")
        names.add(name)
        ranks = a.get("ranks")
        if not isinstance(ranks, dict) or not all(_is_int(r) for r in ranks.values()):
            raise _corrupt(path, f"adapters[{i}].ranks must map module names to ranks")
        _check_source(i, a.get("source"), path)
        if not isinstance(a.get("config", {}), dict):
            raise _corrupt(path, f"adapters[{i}].config must be an object")
        extras = a.get("extras", [])
        if not isinstance(extras, list) or not all(isinstance(x, str) for x in extras):
            raise _corrupt(path, f"adapters[{i}].extras must be a list of strings")
        orig = a.get("extras_dtypes", {})
        if not isinstance(orig, dict) or not all(v in EXTRAS_DTYPE_NAMES for v in orig.values()):
            raise _corrupt(path, f"adapters[{i}].extras_dtypes must map extras to {', '.join(EXTRAS_DTYPE_NAMES)}")


def _check_source(i: int, src: Any, path: Path | str) -> None:
    """Adapter ``i``'s source record: a path and plain file names with their bytes and sha256."""
    files = src.get("files") if isinstance(src, dict) else None
    if not isinstance(files, dict) or not _opt(src.get("path"), str):
        raise _corrupt(path, f"adapters[{i}].source must hold 'path' and 'files'")
    for fname, f in files.items():
        if fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\x00" in fname:
            raise _corrupt(path, f"adapters[{i}].source.files names {short(fname)}, not a plain file name")
        if not isinstance(f, dict) or not _is_int(f.get("bytes")) or not _opt(f.get("sha256"), str):
            raise _corrupt(path, f"adapters[{i}].source.files[{short(fname)}] must hold 'bytes' and 'sha256'")


_INT_DTYPES = ("I32", "I64", "I16", "I8", "U8", "U16", "U32", "U64")


class _HeaderCheck:
    """The tensors of a header (logical entries) against the shapes and dtypes the metadata implies."""

    def __init__(self, header: dict[str, dict[str, Any]], path: Path | str):
        self.header, self.path = header, path

    def tensor(self, key: str, shapes: list[list[Any]], dtypes: tuple[str, ...]) -> None:
        info = self.header.get(key)
        if info is None or info["shape"] not in shapes:
            want = " or ".join(str(tuple(s)) for s in shapes)
            raise ArtifactError(f"{self.path}: tensor {short(key)} missing or not of shape {want}")
        if info["dtype"] not in dtypes:
            raise ArtifactError(
                f"{self.path}: tensor {short(key)} has dtype {info['dtype']}, expected {' or '.join(dtypes)}"
            )

    def stored(self, key: str, shapes: list[list[Any]]) -> None:
        """A float tensor, or (int8 storage) an int8 one whose ``qscale/`` companion has its shape
        less the last axis (no companion for an empty tensor), or low-bit codes (uint8, format v5)
        with bfloat16 group scales."""
        info = self.header.get(key)
        if info is not None and info["dtype"] == "U8" and key.startswith(("resid_B/", "resid_A/")):
            self.tensor(key, shapes, ("U8",))
            self.tensor(_bits_key(key), [shapes[0][:1]], ("U8",))
            return self.tensor(QSCALE + key, [[shapes[0][0], 1]], ("BF16",))
        if info is None or info["dtype"] != "I8":
            return self.tensor(key, shapes, FLOAT_DTYPES)
        self.tensor(key, shapes, ("I8",))
        if QSCALE + key in self.header or math.prod(info["shape"]):
            self.tensor(QSCALE + key, [info["shape"][:-1]], ("F16", "F32"))

    def scales(self) -> None:
        """Row scales belong to an int8 base, core, residual or extras tensor."""
        for key, info in self.header.items():
            if key.startswith(QSCALE):
                base = self.header.get(key[len(QSCALE):])
                if (not key[len(QSCALE):].startswith(QUANTISABLE) or base is None
                        or base["dtype"] not in ("I8", "U8")):
                    raise ArtifactError(
                        f"{self.path}: tensor {short(key)} has no int8 tensor {short(key[len(QSCALE):])} to scale")
                if key[len(QSCALE):].startswith("extras/"):
                    self.stored(key[len(QSCALE):], [base["shape"]])

    def shared(self, mod: dict[str, Any], n: int, method: str) -> None:
        """The low-bit bases and cores of a module with ``shared_bits``: uint8 codes of
        :func:`lorazip.layout.shared_shapes` (cores: full or diagonal) and bfloat16 row scales."""
        for role, shape in shared_shapes(mod, n, method).items():
            key = f"{role}/{mod['name']}"
            shapes = [shape]
            if role == "cores":
                shapes = [[n, mod.get("rank_out", mod["rank"]), mod["rank"]]] + (
                    [[n, mod["rank"]]] if mod.get("rank_out", mod["rank"]) == mod["rank"] else [])
            self.tensor(key, shapes, ("U8",))
            self.tensor(QSCALE + key, [self.header[key]["shape"][:-1] + [1]], ("BF16",))

    def module(self, mod: dict[str, Any], n: int, method: str = "") -> None:
        """A module's bases, cores, spectra, assignment and residual parts, for ``n`` adapters."""
        name, r, k = mod["name"], mod["rank"], mod.get("n_clusters", 1)
        r_out = mod.get("rank_out", r)
        if not _is_int(r_out):
            raise _corrupt(self.path, f"module {short(name)}: rank_out must be a non-negative integer")
        if mod.get("shared_bits"):
            self.shared(mod, n, method)
        else:
            self.stored(f"U/{name}", [[k, mod["d_out"], r_out]])
            self.stored(f"V/{name}", [[k, mod["d_in"], r]])
            self.stored(f"cores/{name}", [[n, r_out, r]] + ([[n, r]] if r_out == r else []))
        spectra = self.header.get(f"spectra/{name}")
        if spectra is None or len(spectra["shape"]) != 2 or spectra["shape"][0] != n:
            raise ArtifactError(f"{self.path}: tensor {short(f'spectra/{name}')} missing or not of shape ({n}, r_max)")
        self.tensor(f"spectra/{name}", [spectra["shape"]], FLOAT_DTYPES)
        if f"assign/{name}" in self.header or k > 1:
            self.tensor(f"assign/{name}", [[n]], _INT_DTYPES)
        rkeys = (f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}")
        res = mod.get("residual")
        if res is None and any(key in self.header for key in rkeys):
            raise _corrupt(self.path, f"module {short(name)}: residual tensors without 'residual' metadata")
        if res is not None:  # format v2: b_i^T / a_i row blocks, k_i rows each (sum: total_rank)
            self.tensor(rkeys[0], [[n]], _INT_DTYPES)
            self.stored(rkeys[1], [[res["total_rank"], mod["d_out"]]])
            self.stored(rkeys[2], [[res["total_rank"], mod["d_in"]]])


def residual_ranks(reader: HeaderReader, meta: dict[str, Any], layout=None) -> dict[str, list[int]]:
    """``{module: [k_i]}`` for the modules with residual parts, read without torch (v2 or v3 layout)."""
    if layout is not None:
        return layout.read_ranks(reader)
    return {mod["name"]: list(reader.read_ints(f"resid_ranks/{mod['name']}")) for mod in meta["modules"]
            if f"resid_ranks/{mod['name']}" in reader.header}


def _check_assignments(reader: HeaderReader, meta: dict[str, Any], path: Path, layout=None) -> None:
    """Cluster indices must name one of the module's K bases, and residual ranks must be >= 0 and
    add up to the module's ``residual`` metadata (read: n small integers per module)."""
    resid = residual_ranks(reader, meta, layout)
    for mod in meta["modules"]:
        key = f"assign/{mod['name']}"
        if key in reader.header:
            a = reader.read_ints(key)
            k = mod.get("n_clusters", 1)
            if a and (min(a) < 0 or max(a) >= k):
                raise ArtifactError(f"{path}: tensor {short(key)} has cluster indices outside 0..{k - 1}")
        key = f"resid_ranks/{mod['name']}"
        if mod["name"] in resid and not mod.get("residual"):
            if any(resid[mod["name"]]):
                raise ArtifactError(f"{path}: tensor 'resid_ranks' gives residual ranks to module "
                                    f"{short(mod['name'])}, which has no 'residual' metadata")
        elif mod["name"] in resid:
            ks, res = resid[mod["name"]], mod["residual"]
            if min(ks) < 0 or sum(ks) != res["total_rank"] or max(ks) != res["max_rank"]:
                raise ArtifactError(
                    f"{path}: tensor {short(key)} does not match the module's residual metadata (ranks >= 0 "
                    f"adding up to total_rank {res['total_rank']}, the largest max_rank {res['max_rank']})"
                )


def verify_checksum(artifact: Artifact) -> bool:
    """True when the tensors still hash to the checksum recorded at write time."""
    want = artifact.meta.get("checksum")
    if want is None:
        return False
    if artifact._tensors is None and artifact.path is not None:
        return file_checksum(artifact.path) == want
    from .layout import pack

    return tensor_checksum(pack(artifact.tensors(), artifact.meta)) == want
