"""Reading one PEFT LoRA adapter folder: config, key layout, scaling, lazy tensors.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``.
This module parses the config (refusing anything that is not plain LoRA), reads only
the safetensors *header* to learn which modules are adapted and with which shapes, and
hands out the factors of one module on demand. PEFT's own behaviour is the spec:
keys ``base_model.model.<module>.lora_A[.<adapter>].weight``, scaling ``alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), ``rank_pattern`` / ``alpha_pattern`` matched with
PEFT's ``get_pattern_key`` rule, ``lora_embedding_A/B`` for embeddings.

The delta of a module is always returned in the ``(d_out, d_in)`` orientation of the
layer's matrix ``y = W x``: ``M = B @ A`` with the scale folded into ``B``. For GPT-2
``Conv1D`` layers (``fan_in_fan_out``) the stored weight is the transpose of that
matrix, but PEFT's ``lora_A`` / ``lora_B`` already follow the ``y = W x`` convention,
so only the flag is recorded (and written back on export).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AdapterFormatError, first_line
from .files import CONFIG_NAME, WEIGHTS_NAME, sha256_file  # noqa: F401 (sha256_file: imported from here too)
from .safetensors_header import (  # noqa: F401 (parse_json: imported from here too)
    FLOAT_DTYPES, ST_DTYPES, RawReader, decode_json, parse_header, parse_json, short,
)

PICKLE_NAME = "adapter_model.bin"

# <module>.lora_A[.<adapter>].weight | <module>.lora_embedding_A[.<adapter>]
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?P<suffix>\.weight|\.bias)?$"
)
_PREFIX = "base_model.model."
_MAX_NORM2 = 1e150  # bound on ||B||^2 ||A||^2 of one module (real adapters: below 1e6)
_MAX_NORM2_F32 = 1e30  # the same with float32 compute (float32 overflows at 3.4e38)
_MAX_CONFIG = 16 * 1024 * 1024  # a PEFT config is a few KB; refuse absurd ones before parsing them
# Every safetensors dtype lorazip reads that this torch has, with its torch dtype (ST_DTYPES names it).
ST_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, attr.removeprefix("torch."))
    for name, (_width, attr) in ST_DTYPES.items()
    if hasattr(torch, attr.removeprefix("torch."))
}
_DTYPES = {k: ST_DTYPES[k][0] for k in ST_TORCH}  # bytes per element
TORCH_ST = {v: k for k, v in ST_TORCH.items()}  # torch dtype -> safetensors name


@dataclass(frozen=True)
class LoraModule:
    """Where one adapted module's factors live in an adapter file.

    ``rank`` is the LoRA rank r_i; ``scale`` the factor s_i; ``layout`` is ``"linear"``
    (Linear and Conv1D) or ``"embedding"`` (``lora_embedding_A/B``, delta transposed).
    """

    name: str
    key_A: str
    key_B: str
    rank: int
    d_out: int
    d_in: int
    alpha: float
    scale: float
    layout: str
    at_A: int | None = None  # file offsets of the two tensors' bytes (None: pickled weights)
    at_B: int | None = None
    dtype_A: str = ""
    dtype_B: str = ""


@dataclass
class Adapter:
    """One PEFT LoRA adapter, described from its config and safetensors header only."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extras: list[str]
    dtype: str
    weights_file: Path
    pickled: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    extras_bytes: int = 0  # bytes of the non-LoRA tensors (``extras``) in the weights file
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _stat: tuple[int, int] | None = field(default=None, repr=False)  # (size, mtime_ns) of the weights at load

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def files(self) -> list[Path]:
        return [self.path / CONFIG_NAME, self.weights_file]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (only those) from the weights file."""
        if self._state is not None:
            return {k: self._state[k] for k in keys}
        from safetensors import safe_open

        if not utf8_path(self.weights_file):  # safetensors only opens UTF-8 paths
            with SafetensorsReader(self.weights_file) as f:
                return {k: f.get_tensor(k) for k in keys}
        try:
            with safe_open(str(self.weights_file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # safetensors raises several types for corrupt data
            raise AdapterFormatError(f"{self.weights_file}: cannot read tensors: {first_line(exc)}") from None

    def factors(self, module: str, dtype: torch.dtype = torch.float64,
                out: tuple[torch.Tensor, torch.Tensor] | None = None,
                checked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B, A)`` in ``dtype`` with ``M = B @ A`` (scale folded into ``B``).

        ``B``: (d_out, r_i), ``A``: (r_i, d_in). Raises on NaN/Inf and on values whose squares overflow.
        ``out``: CPU tensors of those shapes and ``dtype`` to write them into (no temporaries).
        ``checked=False``: a re-read of values read and checked before (a build's second pass) skips
        those checks where the file is the one read at load (same size and modification time), a
        third of the time of a bfloat16 read; a file changed since is checked as on a first read.

        Read and converted with NumPy (float32 / float64; the values torch's conversion gives): no
        torch operator runs, so a read in a background thread does not start a second OpenMP team
        beside a solver's (on two cores that slowed the solver by 30-50%)."""
        spec = self.modules[module]
        t, as_loaded = self._stored(spec, [spec.key_A, spec.key_B])
        check = checked or not as_loaded
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked, and refused, below
            if check:
                # Sums of squares of the stored values in float64 (an exact conversion): one pass that NaN
                # or Inf would make non-finite; isfinite runs only then, to name the problem.
                ss = [float(np.square(t[key], dtype=np.float64).sum()) for key in (spec.key_A, spec.key_B)]
                if not all(map(math.isfinite, ss)):
                    for key in (spec.key_A, spec.key_B):
                        if not np.isfinite(t[key]).all():
                            raise AdapterFormatError(f"{self.weights_file}: tensor {key} has NaN or Inf values")
            b_out, a_out = (None, None) if out is None else out
            b = _oriented(spec, "B", t[_stored_key(spec, "B")], dtype, b_out)
            a = _oriented(spec, "A", t[_stored_key(spec, "A")], dtype, a_out)
            if not check:
                return b, a
            # ||M||^2 <= ||B||^2 ||A||^2: refuse values whose squares overflow (finite but absurd, e.g. 1e200),
            # which would turn norms, weights and errors into inf/NaN downstream.
            bound = ss[0] * ss[1] * float(spec.scale) * float(spec.scale)  # (inf, not OverflowError)
            if max(t[k].itemsize for k in t) > _itemsize(dtype) and math.isfinite(bound):
                # a cast to a narrower dtype may overflow on its own
                bound = float(np.square(_values(b), dtype=np.float64).sum()) * float(
                    np.square(_values(a), dtype=np.float64).sum())
        if not math.isfinite(bound) or bound > (_MAX_NORM2 if dtype == torch.float64 else _MAX_NORM2_F32):
            raise AdapterFormatError(
                f"{self.weights_file}: module {short(module)}: values too large "
                f"(|B|^2 |A|^2 = {bound:.3g} overflows {str(dtype).replace('torch.', '')})"
            )
        return b, a

    def factor(self, module: str, part: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """One factor of :meth:`factors` (``part`` "B" or "A"), reading only its tensor and
        without the value checks: for re-reads of a module already read once."""
        spec = self.modules[module]
        key = _stored_key(spec, part)
        with np.errstate(over="ignore", invalid="ignore"):
            return _oriented(spec, part, self._stored(spec, [key])[0][key], dtype)

    def _stored(self, spec: LoraModule, keys: list[str]) -> tuple[dict[str, np.ndarray], bool]:
        """A module's factor tensors ``keys`` as stored, as NumPy arrays (bfloat16 and float8 widened
        to float32, exactly), read at the offsets the header gave at load (one open and a positioned
        read each: no header parsed again, 5x faster than ``safe_open`` on 1000 small files). A weights
        file whose size or modification time differs from what it was at load (rewritten, or another
        copy at the same path, as on a Ray worker with its own Hub cache) is read by name through its
        own header, as checked then; pickled weights come from their loaded state. Also whether the
        values are those of load (read at its offsets, or the loaded state), not of a changed file."""
        raw = self._read_raw(spec, keys) if {spec.dtype_A, spec.dtype_B} <= _NP_STORED.keys() else None
        if raw is not None:
            return {key: _np_values(buf, dt, shape) for key, (buf, dt, shape) in raw.items()}, True
        return {key: _tensor_values(x) for key, x in self.read(keys).items()}, self._state is not None

    def _read_raw(self, spec: LoraModule, keys: list[str]) -> dict[str, tuple[np.ndarray, str, list[int]]] | None:
        """``{key: (bytes, dtype, shape)}`` of factor tensors as stored, read at the offsets of load;
        None where those may not hold (pickled weights, no offsets, a file changed since load)."""
        if self._state is not None or spec.at_A is None or self._stat is None:
            return None
        try:
            fd = os.open(self.weights_file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise AdapterFormatError(f"{self.weights_file}: cannot read ({exc.strerror or exc})") from None
        try:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self._stat:  # offsets from load may not hold
                return None
            out = {}
            for key in keys:
                at, dt = (spec.at_A, spec.dtype_A) if key == spec.key_A else (spec.at_B, spec.dtype_B)
                shape = [spec.rank, spec.d_in] if key == spec.key_A else [spec.d_out, spec.rank]
                if spec.layout == "embedding":  # A_e (r, num_embeddings) and B_e (dim, r) as stored
                    shape = [spec.rank, spec.d_out] if key == spec.key_A else [spec.d_in, spec.rank]
                buf = np.empty(math.prod(shape) * _DTYPES[dt], dtype=np.uint8)  # (not zero-filled: read over)
                try:
                    got = os.preadv(fd, [buf], at) if len(buf) else 0
                except OSError as exc:
                    raise AdapterFormatError(f"{self.weights_file}: cannot read ({exc.strerror or exc})") from None
                if got != len(buf):
                    raise AdapterFormatError(f"{self.weights_file}: truncated while reading tensor {short(key)}")
                out[key] = (buf, dt, shape)
            return out
        finally:
            os.close(fd)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors (``modules_to_save`` heads), as stored; refuses NaN/Inf in them."""
        tensors = self.read(self.extras)
        for key, x in tensors.items():  # (float8 has no isfinite: checked as float32)
            if x.is_floating_point() and not torch.isfinite(x if x.element_size() > 1 else x.float()).all():
                raise AdapterFormatError(f"{self.weights_file}: tensor {short(key)} has NaN or Inf values")
        return tensors


_NP_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}  # factors NumPy reads and converts
_NP_STORED = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # read by NumPy (bfloat16: its bits)


def _stored_bytes(header: dict[str, Any], keys) -> int:
    """Bytes the tensors ``keys`` take in a safetensors file, from its header (0 for those it does not place:
    pickled weights)."""
    total = 0
    for k in keys:
        offsets = header.get(k, {}).get("data_offsets") if isinstance(header.get(k), dict) else None
        if isinstance(offsets, (list, tuple)) and len(offsets) == 2:
            total += int(offsets[1]) - int(offsets[0])
    return total


def _np_values(buf: np.ndarray, dt: str, shape: list[int]) -> np.ndarray:
    """A stored tensor's values as a NumPy array (bfloat16 widened to float32 exactly)."""
    x = np.frombuffer(buf, dtype=_NP_STORED[dt]).reshape(shape)
    if dt == "BF16":  # one pass, no uint32 temporary
        return np.left_shift(x, 16, dtype=np.uint32).view(np.float32)
    return x


def _tensor_values(x: torch.Tensor) -> np.ndarray:
    """A tensor read by name (or from pickled weights) as NumPy: float16/32/64 as they are, bfloat16
    through its bits, float8 and the rest widened to float32 (exact for float8)."""
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return (x.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if x.dtype in (torch.float16, torch.float32, torch.float64):
        return x.numpy()
    return x.float().numpy()


def _stored_key(spec, part: str) -> str:
    """The tensor holding factor ``part`` ("A" or "B") of ``M = B A``: embedding LoRA stores
    ``delta = (B_e A_e)^T``, so there ``A = B_e^T`` and ``B = A_e^T``."""
    if spec.layout == "embedding":
        return spec.key_B if part == "A" else spec.key_A
    return spec.key_A if part == "A" else spec.key_B


def _oriented(spec, part: str, x: np.ndarray, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The stored values ``x`` of factor ``part`` as ``A`` (r, d_in) or ``B`` (d_out, r) in ``dtype``,
    scale folded into ``B`` (multiplied in ``dtype``, as torch's ``mul_`` does); written into ``out``
    where given. float32 / float64 with NumPy alone; another dtype through float64, then torch."""
    if spec.layout == "embedding":
        x = x.T
    want = _NP_FLOATS.get(dtype)
    if want is None:  # (no lorazip caller asks for one)
        y = torch.from_numpy(np.array(x, dtype=np.float64) * (float(spec.scale) if part == "B" else 1.0)).to(dtype)
        return y if out is None else out.copy_(y)
    y = np.empty(x.shape, dtype=want) if out is None else out.numpy()
    np.copyto(y, x, casting="unsafe")
    if part == "B":
        np.multiply(y, want(spec.scale), out=y)
    return torch.from_numpy(y) if out is None else out


def _values(t: torch.Tensor) -> np.ndarray:
    """A CPU float tensor's values as NumPy (no torch operator for float32 / float64)."""
    return t.numpy() if t.dtype in _NP_FLOATS else t.double().numpy()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype not in _NP_FLOATS else np.dtype(_NP_FLOATS[dtype]).itemsize


def utf8_path(path: Path) -> bool:
    """True when ``path`` can be handed to safetensors (which accepts UTF-8 paths only)."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in a folder name (surrogate escapes)
        return False


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# Config fields lorazip reads (beyond r, lora_alpha, peft_type and the patterns): allowed types.
_CONFIG_TYPES = (
    ("use_rslora", _is_bool, "true or false"),
    ("use_dora", _is_bool, "true or false"),
    ("lora_bias", _is_bool, "true or false"),
    ("fan_in_fan_out", _is_bool, "true or false"),
    ("base_model_name_or_path", lambda v: isinstance(v, str), "a string"),
    ("revision", lambda v: isinstance(v, str), "a string"),
    ("task_type", lambda v: isinstance(v, str), "a string"),
    ("target_modules", lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    ("modules_to_save", _is_str_list, "a list of strings"),
    ("exclude_modules", lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    ("layers_to_transform", lambda v: _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
     "an integer or a list of integers"),
    ("layers_pattern", lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
)


# Config fields that make an adapter more than its LoRA factors (PEFT options lorazip cannot carry).
_CHANGES_MEANING = (
    ("trainable_token_indices", "trainable token rows of an embedding"),
    ("alora_invocation_tokens", "activated LoRA: the update starts at invocation tokens"),
    ("target_parameters", "LoRA on parameters, not modules"),
    ("layer_replication", "replicated layers"),
    ("use_qalora", "QALoRA"),
)
# init_lora_weights under which PEFT re-derives the base weights on load (PiSSA, OLoRA, CorDA, LoftQ)
_REDERIVED_INITS = ("pissa", "olora", "corda", "loftq")


def read_config(path: Path) -> dict[str, Any]:
    """Parse and check ``adapter_config.json``; refuse anything that is not plain LoRA.

    Every field lorazip reads or carries into the artifact is type-checked (``null`` is
    allowed where PEFT allows it), so nothing downstream meets a value of the wrong type.
    """
    cfg_path = path / CONFIG_NAME
    cfg = _read_config_json(path, cfg_path)
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterFormatError(
            f"{cfg_path}: peft_type {short(peft_type)} is not supported; lorazip compresses plain LoRA"
        )
    for key, ok, kind in _CONFIG_TYPES:
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise AdapterFormatError(f"{cfg_path}: '{key}' must be {kind}, got {short(value)}")
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    _check_rank_and_alpha(cfg, cfg_path)
    if cfg.get("lora_bias"):
        raise AdapterFormatError(f"{cfg_path}: lora_bias adapters are not supported")
    for key, what in _CHANGES_MEANING:
        if cfg.get(key):
            raise AdapterFormatError(f"{cfg_path}: '{key}' ({what}) is not supported; lorazip compresses plain LoRA")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0].lower() in _REDERIVED_INITS:
        raise AdapterFormatError(
            f"{cfg_path}: init_lora_weights {init!r}: PEFT changes the base weights when it loads this adapter, "
            "so its factors alone are not its update; save it as plain LoRA first (PEFT's "
            "path_initial_model_for_weight_conversion) and compress that"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        _check_regex(targets, f"{cfg_path}: 'target_modules' {short(targets)}")
    return cfg


def _read_config_json(path: Path, cfg_path: Path) -> dict[str, Any]:
    """The config file's JSON object (at most ``_MAX_CONFIG`` bytes)."""
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME}")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(_MAX_CONFIG + 1)
    except OSError as exc:
        raise AdapterFormatError(f"{cfg_path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > _MAX_CONFIG:
        raise AdapterFormatError(f"{cfg_path}: larger than {_MAX_CONFIG // 2**20} MiB; not a PEFT adapter config")
    cfg = decode_json(raw, lambda why: AdapterFormatError(f"{cfg_path}: invalid JSON ({why})"), encoding="utf-8-sig")
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    return cfg


def _check_rank_and_alpha(cfg: dict[str, Any], cfg_path: Path) -> None:
    """``r``, ``lora_alpha`` and their per-module patterns (valid regular expressions)."""
    if "r" not in cfg:
        raise AdapterFormatError(f"{cfg_path}: missing 'r' (the LoRA rank)")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{cfg_path}: 'r' must be a positive integer, got {short(r)}")
    alpha = cfg.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFormatError(f"{cfg_path}: 'lora_alpha' must be a positive number, got {short(alpha)}")
    for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(
            isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in pat.values()
        ):
            kind = "positive integers" if key == "rank_pattern" else "positive numbers"
            raise AdapterFormatError(f"{cfg_path}: '{key}' must map module patterns to {kind}")
        for pattern in pat:
            _check_regex(pattern, f"{cfg_path}: '{key}' key {short(pattern)}")


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        raise AdapterFormatError(f"{what} is not a valid regular expression") from None


def _targeted(cfg: dict[str, Any], module: str) -> bool:
    """PEFT's ``check_target_module_exists``: whether PEFT puts a LoRA layer on ``module`` under ``cfg``:
    ``exclude_modules`` (a regex or names) never; ``target_modules`` a regex (``"all-linear"``: every
    module, which ones are linear needs the model) or names, matched whole or as the name's end, and
    then, with ``layers_to_transform``, only in those layers (the first ``<layers_pattern>.<index>.`` of
    the name, or the first numbered segment without a pattern; or the last, as earlier PEFT read it).
    Unlike current PEFT, a head in ``modules_to_save`` may carry LoRA: PEFT up to 0.12 wrote such
    adapters, read as it computed them."""
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, str) and _fullmatch(excluded, module):
        return False
    if isinstance(excluded, list) and (module in excluded or any(module.endswith(f".{e}") for e in excluded)):
        return False
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        return targets == "all-linear" or _fullmatch(targets, module)
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers, pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if layers is None or layers == []:
        return True
    # the layer index: the first numbered segment (PEFT since huggingface/peft#3318) or the last (PEFT
    # before it: a greedy match, which in a mixture of experts took the expert's index); either one
    # selecting the module accepts it (an adapter an older PEFT wrote is not refused)
    found = []
    for lazy in ("?", ""):
        if not pattern:
            found.append(re.match(rf".*{lazy}\.[^.]*\.(?P<idx>\d+)\.", module))
        else:
            found.append(next((m for p in ([pattern] if isinstance(pattern, str) else pattern)
                               if (m := _match(rf"(?:^|.*{lazy}\.){p}\.(?P<idx>\d+)\.", module))), None))
    wanted = [layers] if isinstance(layers, int) else layers
    return any(m is not None and int(m.group("idx")) in wanted for m in found)


def _selection(cfg: dict[str, Any]) -> str:
    """The config fields that select the modules, as the refusal names them."""
    return ", ".join(f"{k} {short(cfg[k])}" for k in ("target_modules", "layers_to_transform", "layers_pattern",
                                                         "exclude_modules") if cfg.get(k))


def _match(pattern: str, text: str):
    """``re.match``, None for a pattern that is no regular expression (PEFT would fail on it)."""
    try:
        return re.match(pattern, text)
    except (re.error, RecursionError, OverflowError):
        return None


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except (re.error, RecursionError, OverflowError):
        return False


def parse_safetensors(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and check a safetensors header against the file (no tensor data is read).

    Returns ``(tensors, metadata, data_start)``: the tensor entries (``dtype``, ``shape``,
    ``data_offsets``), the ``__metadata__`` string map, and the file offset of the data.
    Checks what safetensors itself checks before trusting a header: a known dtype for
    every tensor, shapes that match byte sizes exactly, offsets that tile the data
    without gaps or overlaps, and a data section that ends at the end of the file, so
    no claim in the header can cause an allocation larger than the file
    (:func:`lorazip.io.safetensors_header.parse_header`, raising :class:`AdapterFormatError`).
    """
    return parse_header(path, AdapterFormatError, _DTYPES)


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors header, checked against the file (see :func:`parse_safetensors`)."""
    return parse_safetensors(path)[0]


class SafetensorsReader(RawReader):
    """A small safetensors reader on plain file reads (no mmap), over a header checked by
    :func:`parse_safetensors`. Used where safetensors cannot open the path (not UTF-8) and to
    hash an artifact's tensor bytes without building tensors. Same interface as the parts of
    ``safetensors.safe_open`` lorazip uses: ``keys``, ``metadata``, ``get_tensor``, ``get_slice``.
    """

    def __init__(self, path: Path, error: type[Exception] = AdapterFormatError):
        super().__init__(path, error, _DTYPES)

    def keys(self) -> list[str]:
        return sorted(self.header)

    def _tensor(self, key: str, buf: bytearray, shape: list[int]) -> torch.Tensor:
        dtype = ST_TORCH[self.header[key]["dtype"]]
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def get_tensor(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise self.error(f"{self.path}: no tensor named {short(key)}")
        return self._tensor(key, self.read_bytes(key), self.header[key]["shape"])

    def get_slice(self, key: str) -> "_RowSlice":
        if key not in self.header:
            raise self.error(f"{self.path}: no tensor named {short(key)}")
        return _RowSlice(self, key)


class _RowSlice:
    """``reader.get_slice(key)[a:b]``: rows ``a..b`` of dim 0, reading only their bytes."""

    def __init__(self, reader: SafetensorsReader, key: str):
        self.reader, self.key = reader, key
        self.shape = reader.header[key]["shape"]

    def __getitem__(self, item) -> torch.Tensor:
        if not isinstance(item, slice) or item.step not in (None, 1) or not self.shape:
            raise TypeError("only row slices [a:b] are supported")
        a, b, _ = item.indices(self.shape[0])
        b = max(a, b)
        row = math.prod(self.shape[1:]) * _DTYPES[self.reader.header[self.key]["dtype"]]
        buf = self.reader.read_bytes(self.key, a * row, (b - a) * row)
        return self.reader._tensor(self.key, buf, [b - a, *self.shape[1:]])


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: first pattern key that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scale(cfg: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) PEFT uses for ``module`` under this config."""
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def _module_name(key_module: str) -> str:
    return key_module[len(_PREFIX):] if key_module.startswith(_PREFIX) else key_module


_WRAPPED = (".modules_to_save", ".original_module")


def _unwrap_saved_heads(pairs: dict[str, dict[str, str]]) -> None:
    """LoRA on a module that is also in ``modules_to_save`` (PEFT up to 0.12 wrote it; newer PEFT refuses
    it): the file holds ``<m>.lora_A/B``, ``<m>.modules_to_save.lora_A/B`` and
    ``<m>.original_module.lora_A/B``. PEFT's forward uses ``<m>.lora_*`` (on the saved head
    ``<m>.base_layer``); the copies are not used (checked by perturbing them, tests/test_zoo.py).
    Read it that way, in place: the wrapped copies are dropped; a ``modules_to_save`` copy without
    plain factors stands for ``<m>`` (it is the active one), an ``original_module`` copy is unused."""
    for mod in [m for m in pairs if m.endswith(_WRAPPED)]:
        slot = pairs.pop(mod)
        base, _, kind = mod.rpartition(".")
        if kind == "modules_to_save" and base not in pairs:
            pairs[base] = slot


def _weights_path(path: Path, allow_pickle: bool) -> tuple[Path, bool]:
    st = path / WEIGHTS_NAME
    if st.is_file():
        return st, False
    pk = path / PICKLE_NAME
    if pk.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{pk}: pickled weights are refused (they can run code); convert to safetensors "
                "or pass --allow-pickle to load with torch.load(weights_only=True)"
            )
        return pk, True
    raise AdapterFormatError(f"{path}: no {WEIGHTS_NAME}")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFormatError(f"{path}: cannot load pickled weights: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors")
    return state


def load_adapter(path: str | os.PathLike, name: str | None = None, *, allow_pickle: bool = False) -> Adapter:
    """Describe one PEFT LoRA adapter folder (config + header; tensors stay on disk).

    Raises
    ------
    AdapterFormatError
        The config is missing/invalid/not plain LoRA, the weights are missing, corrupt,
        pickled (unless ``allow_pickle``), or keys and shapes are inconsistent.
    """
    path = Path(path)
    cfg = read_config(path)
    weights, pickled = _weights_path(path, allow_pickle)
    state = None
    if pickled:
        state = _load_pickle(weights)
        header = {k: {"dtype": TORCH_ST.get(v.dtype, str(v.dtype)), "shape": list(v.shape)} for k, v in state.items()}
    else:
        try:
            st = os.stat(weights)
        except OSError as exc:
            raise AdapterFormatError(f"{weights}: cannot read ({exc.strerror or exc})") from None
        header, _, data_start = parse_safetensors(weights)

    pairs, extras, dtypes = _lora_pairs(header, weights)
    _unwrap_saved_heads(pairs)
    if not pairs:
        raise AdapterFormatError(f"{weights}: no LoRA tensors (lora_A / lora_B) found")
    modules = {mod: _lora_module(cfg, header, weights, mod, slot, None if pickled else data_start)
               for mod, slot in sorted(pairs.items())}
    targets = cfg.get("target_modules")
    untargeted = [mod for mod in modules if not _targeted(cfg, mod)] if targets else []
    if untargeted and len(untargeted) == len(modules):
        # PEFT would wrap other modules and ignore every tensor of the file: the adapter would load as a no-op.
        raise AdapterFormatError(
            f"{path / CONFIG_NAME}: target_modules {short(targets)} match none of the modules adapted in "
            f"{weights.name} (e.g. {short(next(iter(modules)))})"
        )
    if untargeted:
        # PEFT ignores these tensors (no LoRA layer there: "unexpected keys"); other loaders may apply them
        raise AdapterFormatError(
            f"{weights}: LoRA tensors of {len(untargeted)} module(s) its config does not target "
            f"({_selection(cfg)}), e.g. {short(untargeted[0])}: PEFT ignores them, other loaders may apply "
            "them; correct the config or remove those tensors"
        )

    return Adapter(
        name=name or path.resolve().name,
        path=path,
        config=cfg,
        modules=modules,
        extras=sorted(extras),
        extras_bytes=_stored_bytes(header, extras),
        dtype="/".join(sorted(dtypes)),
        weights_file=weights,
        pickled=pickled,
        _state=state,
        _stat=None if pickled else (st.st_size, st.st_mtime_ns),
    )


def _lora_pairs(header: dict[str, dict[str, Any]], weights: Path) -> tuple[dict[str, dict[str, str]], list[str], set[str]]:
    """``(pairs, extras, dtypes)`` of a weights header: per module name its ``A`` and ``B`` keys and
    layout, the keys of the other (non-LoRA) tensors, and the float dtypes of the factors."""
    pairs: dict[str, dict[str, str]] = {}
    extras: list[str] = []
    dtypes = set()
    for key, info in header.items():
        m = _LORA_KEY.match(key)
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(f"{weights}: DoRA magnitude vector {short(key)}; DoRA is not supported")
        if m is None:
            if ".lora_" in key:
                raise AdapterFormatError(f"{weights}: unsupported LoRA tensor {short(key)}")
            extras.append(key)
            continue
        if m["suffix"] == ".bias":
            raise AdapterFormatError(f"{weights}: LoRA bias tensor {short(key)} is not supported")
        kind = m["kind"]
        slot = pairs.setdefault(_module_name(m["module"]), {})
        if kind[-1] in slot:
            raise AdapterFormatError(f"{weights}: module {short(m['module'])} has two {kind} tensors")
        if info["dtype"] not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"{weights}: LoRA tensor {short(key)} has dtype {info['dtype']}; "
                f"only {', '.join(FLOAT_DTYPES)} factors are supported"
            )
        slot[kind[-1]] = key
        slot["layout"] = "embedding" if "embedding" in kind else "linear"
        dtypes.add(info["dtype"])
    return pairs, extras, dtypes


def _lora_module(cfg: dict[str, Any], header: dict[str, dict[str, Any]], weights: Path, mod: str,
                 slot: dict[str, str], data_start: int | None = None) -> LoraModule:
    """Module ``mod`` from its two factors' shapes, checked against each other and the config's rank."""
    if "A" not in slot or "B" not in slot:
        missing = "lora_B" if "B" not in slot else "lora_A"
        raise AdapterFormatError(f"{weights}: module {short(mod)} has no {missing} tensor")
    sa, sb = header[slot["A"]]["shape"], header[slot["B"]]["shape"]
    if len(sa) != 2 or len(sb) != 2:
        raise AdapterFormatError(
            f"{weights}: module {short(mod)}: only 2-D LoRA factors are supported "
            f"(got {short(sa)}, {short(sb)}; conv LoRA?)"
        )
    if slot["layout"] == "embedding":  # A_e: (r, num_embeddings), B_e: (dim, r)
        rank, d_out, d_in, r_b = sa[0], sa[1], sb[0], sb[1]
    else:  # A: (r, d_in), B: (d_out, r)
        rank, d_in, d_out, r_b = sa[0], sa[1], sb[0], sb[1]
    if rank == 0 or r_b == 0:
        raise AdapterFormatError(f"{weights}: module {short(mod)}: rank 0 (lora_A {sa}, lora_B {sb})")
    if rank != r_b:
        raise AdapterFormatError(f"{weights}: module {short(mod)}: lora_A {sa} and lora_B {sb} ranks differ")
    r_cfg, alpha, scale = module_scale(cfg, mod)
    if r_cfg != rank:
        raise AdapterFormatError(
            f"{weights}: module {short(mod)} has rank {rank} but the config (r / rank_pattern) says {short(r_cfg)}"
        )
    at = {} if data_start is None else \
        {f"at_{p}": data_start + header[slot[p]]["data_offsets"][0] for p in "AB"}
    return LoraModule(mod, slot["A"], slot["B"], rank, d_out, d_in, alpha, scale, slot["layout"], **at,
                      dtype_A=header[slot["A"]]["dtype"], dtype_B=header[slot["B"]]["dtype"])
