"""Base models and tokenizers: the transformers side of task evaluation and calibration.

:mod:`lorazip.taskeval` and :mod:`lorazip.calibrate` load a causal LM and its tokenizer the same
way: from a ``save_pretrained`` folder or a Hub id (through the normal Hugging Face cache), in
one of :data:`DTYPES`, on a device that :func:`resolve_device` checks, with transformers'
progress bars and warnings silenced; a model that cannot be loaded is a ``SourceError``.

transformers (and peft) are optional (``lorazip[eval]``): :func:`require_hf` imports them or
raises :class:`MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .errors import LorazipError, OptionError, SourceError, first_line
from .io.files import local_parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model compute dtypes


class MissingDependencyError(LorazipError):
    """An optional dependency (``lorazip[eval]``: transformers, peft) is not installed."""


def require_hf(purpose: str, names: tuple[str, ...] = ("transformers", "peft")) -> tuple:
    """Import the modules ``names``, or raise :class:`MissingDependencyError` saying that
    ``purpose`` needs the missing ones and naming the extra to install."""
    missing = []
    mods = {}
    for name in names:
        try:
            mods[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"{purpose} needs {' and '.join(missing)}: pip install 'lorazip[eval]'")
    return tuple(mods[name] for name in names)


def check_dtype(dtype: str) -> None:
    """Raise OptionError unless ``dtype`` names one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def resolve_device(device: str) -> str:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``, checked; the
    device to use."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise OptionError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda: CUDA is not available")
    return device


def load_model(transformers, ident: str, dtype: torch.dtype):
    """The causal LM of a folder or a Hub id (``AutoModelForCausalLM``) in ``dtype``, loaded
    quietly; SourceError for a missing folder or a model that cannot be loaded."""
    p = Path(ident)
    if not p.exists() and (ident.startswith((".", "/", "~")) or ident.count("/") != 1):
        raise SourceError(f"{ident}: no such base model folder")
    if local_parent(ident):  # `models/x` beside a folder `models`
        raise SourceError(f"{ident}: no such base model folder (not taken as a Hub id: ./{ident.split('/', 1)[0]} "
                          "is a local folder)")
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # lorazip reports progress itself
    try:
        with quiet_warnings():
            return transformers.AutoModelForCausalLM.from_pretrained(ident, **{_dtype_kwarg(transformers): dtype})
    except Exception as exc:
        raise SourceError(f"{ident}: cannot load the base model ({first_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_base_model(transformers, base_model, tokenizer, dtype: str) -> tuple:
    """``(model, model id)``: ``base_model`` loaded in ``DTYPES[dtype]`` when it is a folder or a
    Hub id; an already loaded model as it is (then ``tokenizer`` is required, OptionError without),
    with the id it was loaded from, or "(in memory)"."""
    if isinstance(base_model, (str, os.PathLike)):
        model_id = str(base_model)
        return load_model(transformers, model_id, DTYPES[dtype]), model_id
    if tokenizer is None:
        raise OptionError("pass the tokenizer along with an already loaded base model")
    return base_model, getattr(getattr(base_model, "config", None), "_name_or_path", None) or "(in memory)"


def load_tokenizer_for(transformers, tokenizer, model_id: str):
    """``tokenizer`` (a folder, a Hub id or a loaded tokenizer) or, when None, the one of the
    model ``model_id``, loaded."""
    tok = tokenizer if tokenizer is not None else model_id
    return load_tokenizer(transformers, tok) if isinstance(tok, (str, os.PathLike)) else tok


def _dtype_kwarg(transformers) -> str:
    """``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_tokenizer(transformers, ident):
    """The tokenizer of a folder or a Hub id (``AutoTokenizer``); SourceError if it cannot be loaded."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(ident))
    except Exception as exc:
        raise SourceError(f"{ident}: cannot load the tokenizer ({first_line(exc)})") from None


class quiet_warnings(warnings.catch_warnings):
    """Silence library warnings (PEFT / transformers deprecations) around model surgery."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("ignore")
        return self


def position_limit(model) -> int | None:
    """The longest sequence ``model`` takes (its config's ``max_position_embeddings`` or ``n_positions``;
    None where it states none, as models with rotary positions may not)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def causal_lm_or_error(model, ident: str) -> None:
    """SourceError where ``model`` was saved as something other than a causal language model (a
    sequence or token classifier loaded as one gets a random prediction head: its loss means nothing)."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise SourceError(f"{ident}: a {archs[0]}, not a causal language model: task evaluation measures the "
                          "loss of next-token prediction, which its head does not make")
