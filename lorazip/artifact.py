"""The lorazip artifact, format v1: one safetensors file of bases, cores and metadata.

Tensors (``<m>`` is a module name such as ``model.layers.0.self_attn.q_proj``):

* ``U/<m>``: (K, d_out, r) and ``V/<m>``: (K, d_in, r), the shared bases (K clusters);
* ``cores/<m>``: (n, r, r) full cores, or (n, r) diagonal ones;
* ``assign/<m>``: (n,) int32 cluster of each adapter (only when K > 1);
* ``stats/sq_error``, ``stats/norm2``: (n, m) float64, per (adapter, module) squared
  error at compression time and ``||M_i||^2`` (module order of the metadata);
* ``spectra/<m>``: (n, r_max) float32 singular values of each original delta;
* ``extras/<i>/<key>``: non-LoRA tensors of adapter i (``modules_to_save`` heads), as-is.

The header metadata holds ``format = "lorazip"``, ``format_version`` and ``lorazip``,
a JSON document (see docs/format.md). The module never knows which solver produced
the tensors. Writes are atomic; reads are lazy (one adapter's cores are a slice).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ArtifactError, OutputError
from .io.peft import FLOAT_DTYPES, ST_TORCH, SafetensorsReader, parse_json, short, utf8_path

_TORCH_ST = {v: k for k, v in ST_TORCH.items()}

FORMAT_NAME = "lorazip"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VERIFY_AUTO_BYTES = 64 * 2**20  # load_artifact checks the checksum of artifacts up to this size by default
_CHECKED = ("U/", "V/", "cores/", "stats/", "spectra/")  # float tensors that must hold finite values


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_checksum(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """:func:`tensor_checksum` of the tensors stored in a safetensors file, computed from the raw
    bytes on disk (streamed; no tensor is built), so it costs one sequential read of the file."""
    with SafetensorsReader(Path(path), ArtifactError) as f:
        h = hashlib.sha256()
        for key in sorted(f.header):
            info = f.header[key]
            h.update(f"{key}|{ST_TORCH[info['dtype']]}|{tuple(info['shape'])}|".encode())
            start, end = info["data_offsets"]
            for first in range(0, end - start, chunk):
                h.update(f.read_bytes(key, first, min(chunk, end - start - first)))
        return h.hexdigest()


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
    if not parent.is_dir():
        raise OutputError(f"{final}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror})") from None
    tmp = Path(tmp)
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
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix + JSON, space-padded to 8 bytes) of a safetensors file and
    the order of the tensors' data, laid out as safetensors does it (wider dtypes first, then by
    name) but deterministic: ``__metadata__`` keys sorted (safetensors' own writer emits them in
    hash-map order, which differs from run to run)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}} if metadata else {}
    pos = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _TORCH_ST:
            raise OutputError(f"tensor {short(key)}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _TORCH_ST[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file with plain file I/O (streamed, any path, byte-for-byte deterministic)."""
    head, order = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key in order:
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
        if self._tensors is not None:
            return list(self._tensors)
        with self._open() as f:
            return list(f.keys())

    @contextmanager
    def _open(self):
        from safetensors import safe_open

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
            raise ArtifactError(f"{self.path}: cannot read tensors ({_first_line(exc)})") from None

    def _finite(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Refuse NaN/Inf in bases, cores and statistics read from a file (a hostile or damaged artifact)."""
        if key.startswith(_CHECKED) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{self.path}: tensor {short(key)} has NaN or Inf values")
        return t

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        with self._open() as f:
            return self._finite(key, f.get_tensor(key))

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows of a tensor along dim 0 without reading the others (safetensors slicing)."""
        if self._tensors is not None:
            return self._tensors[key][rows]
        with self._open() as f:
            sl = f.get_slice(key)
            return self._finite(key, torch.stack([sl[i : i + 1][0] for i in rows])) if rows else torch.empty(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return self._tensors
        with self._open() as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def module_factors(self, module: str, rows: list[int] | None = None):
        """``(U, V, cores, assignment)`` of a module; cores and assignment for ``rows`` only."""
        n = len(self.names)
        rows = list(range(n)) if rows is None else rows
        U, V = self.get(f"U/{module}"), self.get(f"V/{module}")
        cores = self.get_rows(f"cores/{module}", rows)
        if f"assign/{module}" in self._key_set():
            assign = self.get_rows(f"assign/{module}", rows).long()
        else:
            assign = torch.zeros(len(rows), dtype=torch.long)
        return U, V, cores, assign

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sq_error, norm2), each (n, m) float64, recorded at compression."""
        return self.get("stats/sq_error"), self.get("stats/norm2")

    def nbytes_tensors(self) -> int:
        return sum(t.numel() * t.element_size() for k, t in self.tensors().items())

    # -- writing ----------------------------------------------------------
    def _serialize_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        meta = dict(self.meta)
        meta["checksum"] = tensor_checksum(tensors)
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "lorazip": json.dumps(meta)}
        return tensors, header, meta

    def serialized_size(self) -> int:
        """Exact size in bytes of the file :meth:`save` would write (no data is serialized)."""
        tensors, header, _ = self._serialize_inputs()
        head, _order = safetensors_header(tensors, header)
        return len(head) + sum(t.numel() * t.element_size() for t in tensors.values())

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically to ``path`` (temp file in the same folder, fsync, rename).

        Interrupted (KeyboardInterrupt, SystemExit) or failing writes remove the temp file;
        a file under the final name is always complete.
        """
        path = Path(path)
        tensors, header, meta = self._serialize_inputs()
        with atomic_path(path, overwrite) as tmp:
            save_safetensors(tensors, tmp, header, path)
        self.meta, self.path = meta, path
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
    with SafetensorsReader(path, ArtifactError) as reader:
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
        if "lorazip" not in meta_raw:
            raise ArtifactError(f"{path}: corrupt lorazip metadata (no 'lorazip' document)")
        try:
            meta = parse_json(meta_raw["lorazip"])
        except ValueError as exc:
            raise ArtifactError(f"{path}: corrupt lorazip metadata ({exc})") from None
        check_meta(meta, header, path)
        _check_assignments(reader, meta, path)
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
    return Artifact(meta, path=path)


# -- metadata schema ------------------------------------------------------------------------

def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _opt(v: Any, kind) -> bool:
    return v is None or isinstance(v, kind)


def check_meta(meta: Any, header: dict[str, dict[str, Any]], path: Path | str = "artifact") -> None:
    """Check the ``lorazip`` metadata document (types of every field lorazip reads) and that the
    tensors it describes exist with the right shapes and dtypes. Raises :class:`ArtifactError`
    naming the first bad field, so nothing downstream meets a KeyError or TypeError."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: corrupt lorazip metadata ({what})")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    if not isinstance(meta.get("method"), str):
        raise bad("'method' must be a string")
    if not _is_int(meta.get("rank"), 1):
        raise bad("'rank' must be a positive integer")
    for key in ("lorazip_version", "base_model", "weighting", "storage_dtype", "checksum"):
        if not _opt(meta.get(key), str):
            raise bad(f"'{key}' must be a string")
    if not _opt(meta.get("solver"), dict):
        raise bad("'solver' must be an object")
    cl = meta.get("clustering")
    if cl is not None:
        if not isinstance(cl, dict) or not _is_int(cl.get("n_clusters", 1), 1):
            raise bad("'clustering' must be an object with a positive 'n_clusters'")
        if cl.get("n_clusters", 1) > 1 and not (
            isinstance(cl.get("per_module"), bool) and _is_int(cl.get("rounds"))
            and isinstance(cl.get("converged"), bool)
        ):
            raise bad("'clustering' needs 'per_module', 'rounds' and 'converged'")

    modules, adapters = meta.get("modules"), meta.get("adapters")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise bad("'modules' must be a list of objects")
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        raise bad("'adapters' must be a list of objects")
    if not adapters:
        raise bad("no adapters")
    seen: set[str] = set()
    for j, mod in enumerate(modules):
        name = mod.get("name")
        if not isinstance(name, str) or not name or name in seen:
            raise bad(f"modules[{j}].name must be a unique non-empty string")
        seen.add(name)
        for key in ("d_out", "d_in", "rank"):
            if not _is_int(mod.get(key), 1):
                raise bad(f"modules[{j}].{key} must be a positive integer")
        if not _is_int(mod.get("n_clusters", 1), 1):
            raise bad(f"modules[{j}].n_clusters must be a positive integer")
        if mod.get("layout", "linear") not in ("linear", "embedding"):
            raise bad(f"modules[{j}].layout must be 'linear' or 'embedding'")
    names: set[str] = set()
    for i, a in enumerate(adapters):
        name = a.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"adapters[{i}].name must be a non-empty string")
        if name in names:
            raise bad(f"adapter name {short(name)} is used twice")
        names.add(name)
        ranks = a.get("ranks")
        if not isinstance(ranks, dict) or not all(_is_int(r) for r in ranks.values()):
            raise bad(f"adapters[{i}].ranks must map module names to ranks")
        src = a.get("source")
        files = src.get("files") if isinstance(src, dict) else None
        if not isinstance(files, dict) or not _opt(src.get("path"), str):
            raise bad(f"adapters[{i}].source must hold 'path' and 'files'")
        for fname, f in files.items():
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\x00" in fname:
                raise bad(f"adapters[{i}].source.files names {short(fname)}, not a plain file name")
            if not isinstance(f, dict) or not _is_int(f.get("bytes")) or not _opt(f.get("sha256"), str):
                raise bad(f"adapters[{i}].source.files[{short(fname)}] must hold 'bytes' and 'sha256'")
        if not isinstance(a.get("config", {}), dict):
            raise bad(f"adapters[{i}].config must be an object")
        extras = a.get("extras", [])
        if not isinstance(extras, list) or not all(isinstance(x, str) for x in extras):
            raise bad(f"adapters[{i}].extras must be a list of strings")

    n = len(adapters)

    def tensor(key: str, shapes: list[list[Any]], dtypes: tuple[str, ...]) -> None:
        info = header.get(key)
        if info is None or info["shape"] not in shapes:
            want = " or ".join(str(tuple(s)) for s in shapes)
            raise ArtifactError(f"{path}: tensor {short(key)} missing or not of shape {want}")
        if info["dtype"] not in dtypes:
            raise ArtifactError(
                f"{path}: tensor {short(key)} has dtype {info['dtype']}, expected {' or '.join(dtypes)}"
            )

    ints = ("I32", "I64", "I16", "I8", "U8", "U16", "U32", "U64")
    for mod in modules:
        name, r, k = mod["name"], mod["rank"], mod.get("n_clusters", 1)
        tensor(f"U/{name}", [[k, mod["d_out"], r]], FLOAT_DTYPES)
        tensor(f"V/{name}", [[k, mod["d_in"], r]], FLOAT_DTYPES)
        tensor(f"cores/{name}", [[n, r, r], [n, r]], FLOAT_DTYPES)
        spectra = header.get(f"spectra/{name}")
        if spectra is None or len(spectra["shape"]) != 2 or spectra["shape"][0] != n:
            raise ArtifactError(f"{path}: tensor {short(f'spectra/{name}')} missing or not of shape ({n}, r_max)")
        tensor(f"spectra/{name}", [spectra["shape"]], FLOAT_DTYPES)
        if f"assign/{name}" in header or k > 1:
            tensor(f"assign/{name}", [[n]], ints)
    for key in ("stats/sq_error", "stats/norm2"):
        tensor(key, [[n, len(modules)]], FLOAT_DTYPES)


def _check_assignments(reader: SafetensorsReader, meta: dict[str, Any], path: Path) -> None:
    """Cluster indices must name one of the module's K bases (read: n small integers per module)."""
    for mod in meta["modules"]:
        key = f"assign/{mod['name']}"
        if key in reader.header:
            a = reader.get_tensor(key).long()
            k = mod.get("n_clusters", 1)
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k):
                raise ArtifactError(f"{path}: tensor {short(key)} has cluster indices outside 0..{k - 1}")


def verify_checksum(artifact: Artifact) -> bool:
    """True when the tensors still hash to the checksum recorded at write time."""
    want = artifact.meta.get("checksum")
    if want is None:
        return False
    if artifact._tensors is None and artifact.path is not None:
        return file_checksum(artifact.path) == want
    return tensor_checksum(artifact.tensors()) == want
