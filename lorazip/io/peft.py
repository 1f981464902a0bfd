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

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# <module>.lora_A[.<adapter>].weight | <module>.lora_embedding_A[.<adapter>]
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?P<suffix>\.weight|\.bias)?$"
)
_PREFIX = "base_model.model."
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


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
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

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

        try:
            with safe_open(str(self.weights_file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # safetensors raises several types for corrupt data
            raise AdapterFormatError(f"{self.weights_file}: cannot read tensors: {_first_line(exc)}") from None

    def factors(self, module: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B, A)`` in ``dtype`` with ``M = B @ A`` (scale folded into ``B``).

        ``B``: (d_out, r_i), ``A``: (r_i, d_in). Raises on NaN/Inf.
        """
        spec = self.modules[module]
        t = self.read([spec.key_A, spec.key_B])
        a, b = t[spec.key_A].to(dtype), t[spec.key_B].to(dtype)
        for key, x in ((spec.key_A, a), (spec.key_B, b)):
            if not torch.isfinite(x).all():
                raise AdapterFormatError(f"{self.weights_file}: tensor {key} has NaN or Inf values")
        if spec.layout == "embedding":  # delta = (B_e A_e)^T = A_e^T B_e^T
            a, b = b.T, a.T
        return b * spec.scale, a

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.read(self.extras)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_config(path: Path) -> dict[str, Any]:
    """Parse and check ``adapter_config.json``; refuse anything that is not plain LoRA."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterFormatError(
            f"{cfg_path}: peft_type {peft_type!r} is not supported; lorazip compresses plain LoRA"
        )
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    if "r" not in cfg:
        raise AdapterFormatError(f"{cfg_path}: missing 'r' (the LoRA rank)")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFormatError(f"{cfg_path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(
            isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in pat.values()
        ):
            kind = "positive integers" if key == "rank_pattern" else "positive numbers"
            raise AdapterFormatError(f"{cfg_path}: '{key}' must map module patterns to {kind}")
    if cfg.get("lora_bias"):
        raise AdapterFormatError(f"{cfg_path}: lora_bias adapters are not supported")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFormatError(f"{cfg_path}: 'base_model_name_or_path' must be a string")
    return cfg


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a safetensors header and check it against the file size (no tensor data read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AdapterFormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise AdapterFormatError(f"{path}: corrupt safetensors header (length {n} > file size)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            ok = all(isinstance(s, int) and s >= 0 for s in shape) and 0 <= start <= end <= data_len
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterFormatError(f"{path}: corrupt safetensors entry for {key!r} (offsets/shape)")
        width = _DTYPES.get(dtype)
        if width is not None and end - start != numel * width:
            raise AdapterFormatError(f"{path}: tensor {key!r}: shape {shape} does not match its byte size")
        spans.append((start, end, key))
    spans.sort()
    for (s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise AdapterFormatError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    if spans and spans[-1][1] != data_len:
        raise AdapterFormatError(f"{path}: truncated or padded safetensors file (data size mismatch)")
    return header


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
        raise AdapterFormatError(f"{path}: cannot load pickled weights: {_first_line(exc)}") from None
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
        header = {k: {"dtype": _ST_DTYPE.get(v.dtype, str(v.dtype)), "shape": list(v.shape)} for k, v in state.items()}
    else:
        header = read_safetensors_header(weights)

    pairs: dict[str, dict[str, str]] = {}
    extras: list[str] = []
    dtypes = set()
    for key, info in header.items():
        m = _LORA_KEY.match(key)
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(f"{weights}: DoRA magnitude vector {key!r}; DoRA is not supported")
        if m is None:
            if ".lora_" in key:
                raise AdapterFormatError(f"{weights}: unsupported LoRA tensor {key!r}")
            extras.append(key)
            continue
        if m["suffix"] == ".bias":
            raise AdapterFormatError(f"{weights}: LoRA bias tensor {key!r} is not supported")
        kind = m["kind"]
        slot = pairs.setdefault(_module_name(m["module"]), {})
        if kind[-1] in slot:
            raise AdapterFormatError(f"{weights}: module {m['module']!r} has two {kind} tensors")
        slot[kind[-1]] = key
        slot["layout"] = "embedding" if "embedding" in kind else "linear"
        dtypes.add(info["dtype"])

    if not pairs:
        raise AdapterFormatError(f"{weights}: no LoRA tensors (lora_A / lora_B) found")
    modules: dict[str, LoraModule] = {}
    for mod, slot in sorted(pairs.items()):
        if "A" not in slot or "B" not in slot:
            missing = "lora_B" if "B" not in slot else "lora_A"
            raise AdapterFormatError(f"{weights}: module {mod!r} has no {missing} tensor")
        sa, sb = header[slot["A"]]["shape"], header[slot["B"]]["shape"]
        if len(sa) != 2 or len(sb) != 2:
            raise AdapterFormatError(
                f"{weights}: module {mod!r}: only 2-D LoRA factors are supported (got {sa}, {sb}; conv LoRA?)"
            )
        if slot["layout"] == "embedding":  # A_e: (r, num_embeddings), B_e: (dim, r)
            rank, d_out, d_in, r_b = sa[0], sa[1], sb[0], sb[1]
        else:  # A: (r, d_in), B: (d_out, r)
            rank, d_in, d_out, r_b = sa[0], sa[1], sb[0], sb[1]
        if rank != r_b or rank == 0:
            raise AdapterFormatError(f"{weights}: module {mod!r}: lora_A {sa} and lora_B {sb} ranks differ")
        r_cfg, alpha, scale = module_scale(cfg, mod)
        if r_cfg != rank:
            raise AdapterFormatError(
                f"{weights}: module {mod!r} has rank {rank} but the config (r / rank_pattern) says {r_cfg}"
            )
        modules[mod] = LoraModule(mod, slot["A"], slot["B"], rank, d_out, d_in, alpha, scale, slot["layout"])

    return Adapter(
        name=name or path.resolve().name,
        path=path,
        config=cfg,
        modules=modules,
        extras=sorted(extras),
        dtype="/".join(sorted(dtypes)),
        weights_file=weights,
        pickled=pickled,
        _state=state,
    )
