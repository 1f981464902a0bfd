"""The safetensors header, read and checked without torch or numpy.

One parser serves adapters (:func:`lorazip.io.peft.parse_safetensors`, raising
:class:`~lorazip.errors.AdapterFormatError`) and artifacts (:func:`lorazip.artifact.read_header`,
raising :class:`~lorazip.errors.ArtifactError`): the error class is a parameter, the checks and
messages are the same. :class:`RawReader` adds plain-file reads of a tensor's bytes on top of a
checked header. Nothing here imports torch, so ``lorazip info`` and ``lorazip verify`` start fast.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

# safetensors dtype -> (bytes per element, the torch dtype's name, which tensor_checksum hashes)
ST_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "torch.float64"), "F32": (4, "torch.float32"), "F16": (2, "torch.float16"),
    "BF16": (2, "torch.bfloat16"), "F8_E4M3": (1, "torch.float8_e4m3fn"), "F8_E5M2": (1, "torch.float8_e5m2"),
    "I64": (8, "torch.int64"), "I32": (4, "torch.int32"), "I16": (2, "torch.int16"), "I8": (1, "torch.int8"),
    "U64": (8, "torch.uint64"), "U32": (4, "torch.uint32"), "U16": (2, "torch.uint16"), "U8": (1, "torch.uint8"),
    "BOOL": (1, "torch.bool"),
}
ST_WIDTHS: dict[str, int] = {k: v[0] for k, v in ST_DTYPES.items()}  # bytes per element
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what LoRA factors, bases, cores and statistics may be stored as
INT_FORMATS = {"I8": "b", "I16": "h", "I32": "i", "I64": "q", "U8": "B", "U16": "H", "U32": "I", "U64": "Q"}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters (hostile files can hold megabyte-long values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {short(k)}")
        out[k] = v
    return out


def parse_json(text: str | bytes, *, unique_keys: bool = False) -> Any:
    """``json.loads`` that raises ``ValueError`` (with a short reason) on any invalid input.

    Deeply nested documents (which make the parser raise ``RecursionError``) and, with
    ``unique_keys``, objects that repeat a key are invalid.
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(str(exc)) from None


def decode_json(raw: bytes, invalid: Callable[[str], Exception], *, encoding: str = "utf-8",
                unique_keys: bool = False) -> Any:
    """:func:`parse_json` of ``raw`` decoded as ``encoding``; on bad input raises ``invalid(reason)``
    (reason ``"not UTF-8 text"`` or the parser's short reason)."""
    try:
        return parse_json(raw.decode(encoding), unique_keys=unique_keys)
    except UnicodeDecodeError:
        raise invalid("not UTF-8 text") from None
    except ValueError as exc:
        raise invalid(str(exc)) from None


def parse_header(
    path: Path, error: type[Exception], widths: Mapping[str, int] = ST_WIDTHS
) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and check a safetensors header against the file (no tensor data is read).

    Returns ``(tensors, metadata, data_start)``: the tensor entries (``dtype``, ``shape``,
    ``data_offsets``), the ``__metadata__`` string map, and the file offset of the data.
    Checks what safetensors itself checks before trusting a header: a known dtype (a key of
    ``widths``, bytes per element) for every tensor, shapes that match byte sizes exactly,
    offsets that tile the data without gaps or overlaps, and a data section that ends at the
    end of the file, so no claim in the header can cause an allocation larger than the file.
    Anything else raises ``error``.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise error(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise error(f"{path}: corrupt safetensors header (length {n} > file size)")
            text = f.read(n)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = decode_json(text, lambda why: error(f"{path}: corrupt safetensors header (not JSON: {why})"),
                         unique_keys=True)
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise error(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                isinstance(shape, list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in (start, end))
                and 0 <= start <= end <= data_len
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise error(f"{path}: corrupt safetensors entry for {short(key)} (offsets/shape)")
        width = widths.get(dtype) if isinstance(dtype, str) else None
        if width is None:
            raise error(f"{path}: tensor {short(key)} has unsupported dtype {short(dtype)}")
        if end - start != math.prod(shape) * width:
            raise error(f"{path}: tensor {short(key)}: shape {short(shape)} does not match its byte size")
        spans.append((start, end, key))
    spans.sort()
    pos = 0
    for s0, e0, k0 in spans:
        if s0 < pos:
            raise error(f"{path}: tensors {short(k0)} and another overlap")
        if s0 > pos:
            raise error(f"{path}: corrupt safetensors file (gap in the data before {short(k0)})")
        pos = e0
    if pos != data_len:
        raise error(f"{path}: truncated or padded safetensors file (data size mismatch)")
    return header, meta, 8 + n


def header_bytes(entries: Mapping[str, tuple[str, Any]], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix + JSON, space-padded to 8 bytes) of a safetensors file of
    tensors ``entries`` (name -> (safetensors dtype, shape)) and the order of their data, laid out as
    safetensors does it (wider dtypes first, then by name) but deterministic: ``__metadata__`` keys
    sorted (safetensors' own writer emits them in hash-map order, which differs from run to run)."""
    order = sorted(entries, key=lambda k: (-ST_WIDTHS[entries[k][0]], k))
    header: dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}} if metadata else {}
    pos = 0
    for key in order:
        dtype, shape = entries[key]
        n = math.prod(shape) * ST_WIDTHS[dtype]
        header[key] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


class RawReader:
    """A safetensors file's header, checked by :func:`parse_header`, plus raw reads of its
    tensors' bytes (plain file I/O, no mmap, no torch). Use as a context manager; every
    failure raises ``error``."""

    def __init__(self, path: Path, error: type[Exception], widths: Mapping[str, int] = ST_WIDTHS):
        self.path, self.error = Path(path), error
        self.header, self._meta, self._start = parse_header(self.path, error, widths)
        self._f = None

    def __enter__(self):
        try:
            self._f = open(self.path, "rb")
        except OSError as exc:
            raise self.error(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def read_bytes(self, key: str, first: int = 0, count: int | None = None) -> bytearray:
        """Raw bytes of tensor ``key`` (``count`` bytes from byte ``first``; all by default)."""
        start, end = self.header[key]["data_offsets"]
        count = end - start - first if count is None else count
        buf = bytearray(count)
        try:
            self._f.seek(self._start + start + first)
            got = self._f.readinto(buf)
        except OSError as exc:
            raise self.error(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if got != count:
            raise self.error(f"{self.path}: truncated while reading tensor {short(key)}")
        return buf

    def read_ints(self, key: str) -> tuple[int, ...]:
        """The values of an integer tensor (little-endian, as safetensors stores them)."""
        info = self.header[key]
        return struct.unpack(f"<{math.prod(info['shape'])}{INT_FORMATS[info['dtype']]}", self.read_bytes(key))
