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
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import AdapterFormatError, ArtifactError, OutputError

FORMAT_NAME = "lorazip"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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

        try:
            with safe_open(str(self.path), framework="pt") as f:
                yield f
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"{self.path}: cannot read tensors ({exc})") from None

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        with self._open() as f:
            return f.get_tensor(key)

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows of a tensor along dim 0 without reading the others (safetensors slicing)."""
        if self._tensors is not None:
            return self._tensors[key][rows]
        with self._open() as f:
            sl = f.get_slice(key)
            return torch.stack([sl[i : i + 1][0] for i in rows]) if rows else torch.empty(0)

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
        """Exact size in bytes of the file :meth:`save` would write."""
        from safetensors.torch import save

        tensors, header, _ = self._serialize_inputs()
        return len(save(tensors, metadata=header))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically to ``path`` (temp file in the same folder, fsync, rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, header, meta = self._serialize_inputs()
        with atomic_path(path, overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        self.meta, self.path = meta, path
        return path


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Open an artifact lazily after validating its header.

    Raises
    ------
    ArtifactError
        Missing, truncated or corrupt file, not a lorazip artifact, or a newer format version.
    """
    from .io.peft import read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        header = read_safetensors_header(path)
    except AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None
    meta_raw = _header_metadata(path)
    if meta_raw.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a lorazip artifact (no 'format: lorazip' in the header)")
    try:
        version = int(meta_raw.get("format_version", ""))
    except ValueError:
        raise ArtifactError(f"{path}: invalid format_version {meta_raw.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version} is newer than this lorazip reads ({FORMAT_VERSION}); upgrade lorazip"
        )
    try:
        meta = json.loads(meta_raw["lorazip"])
        names = [a["name"] for a in meta["adapters"]]
        modules = meta["modules"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: corrupt lorazip metadata") from None
    n = len(names)
    for mod in modules:
        name, r = mod.get("name"), mod.get("rank")
        k = mod.get("n_clusters", 1)
        want = {
            f"U/{name}": [k, mod.get("d_out"), r],
            f"V/{name}": [k, mod.get("d_in"), r],
        }
        for key, shape in want.items():
            if key not in header or header[key]["shape"] != shape:
                raise ArtifactError(f"{path}: tensor {key!r} missing or not of shape {shape}")
        cores = header.get(f"cores/{name}")
        if cores is None or cores["shape"][0] != n or cores["shape"][1:] not in ([r, r], [r]):
            raise ArtifactError(f"{path}: tensor 'cores/{name}' missing or not of shape ({n}, {r}, {r}) / ({n}, {r})")
    for key in ("stats/sq_error", "stats/norm2"):
        if key not in header or header[key]["shape"] != [n, len(modules)]:
            raise ArtifactError(f"{path}: tensor {key!r} missing or not of shape ({n}, {len(modules)})")
    return Artifact(meta, path=path)


def _header_metadata(path: Path) -> dict[str, str]:
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: corrupt safetensors metadata")
    return meta


def verify_checksum(artifact: Artifact) -> bool:
    """True when the tensors still hash to the checksum recorded at write time."""
    want = artifact.meta.get("checksum")
    return want is not None and tensor_checksum(artifact.tensors()) == want
