"""Calibration statistics: what inputs each adapted module of the base model sees.

A weight error counts every input direction the same, but a layer only ever sees inputs from a
small subspace of activations. :func:`calibrate` runs the base model (transformers) on
calibration text and accumulates, per module ``m``, the input second moment
``C_m = sum_t x_t x_t^T`` (``d_in x d_in``, float64) over the ``N_m`` tokens it saw, with forward
pre-hooks. Compression with these statistics (``lorazip.compress(..., calibration=stats)``,
:mod:`lorazip.compress.whiten`) then minimises the error of each module's *outputs*,
``||(M_i - M_hat_i) X_m||_F^2``, instead of its weights.

* Linear layers and GPT-2 ``Conv1D`` (its weight is ``(d_in, d_out)``; the input is the same
  ``x``), including fused projections such as ``c_attn``: the statistics are of the input, whatever
  the output layout.
* Embeddings: the input is a one-hot token id, so ``C`` is diagonal, the count of each id; it is
  stored as that vector.
* Modules that read the very same input tensor in a forward pass (``q_proj``, ``k_proj`` and
  ``v_proj`` of one layer; ``gate_proj`` and ``up_proj``) share one accumulator and one stored
  tensor, so memory and file follow the distinct inputs, not the modules.

The statistics file is safetensors (format ``lorazip-calibration`` v1, docs/calibration.md):
tensors ``C/<module>`` (d_in, d_in) float64 or ``counts/<module>`` (num_embeddings,) float64, and
a JSON ``lorazip_calibration`` header entry describing every module (kind, dimension, tokens,
which tensor holds its statistics), the data files with their sha256 and the settings. The
output is deterministic: the same model, text and settings give the same bytes (on one machine
and thread count; floating-point sums are not associative across BLAS schedules).

Needs transformers (the ``lorazip[eval]`` extra), imported lazily.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ArtifactError, LorazipError, OptionError, SourceError, ValidationError
from .models import check_dtype, load_base_model, load_tokenizer_for, position_limit, require_hf, resolve_device

FORMAT_NAME = "lorazip-calibration"
FORMAT_VERSION = 1
DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_SIZE = 8
_TEXT_SUFFIXES = (".txt", ".jsonl")
KINDS = ("linear", "embedding")


# ------------------------------------------------------------------------ the statistics
@dataclass(frozen=True)
class ModuleStats:
    """One module's entry: ``kind`` "linear" (``C`` is (dim, dim)) or "embedding" (``C`` is the
    diagonal, a (dim,) vector of token counts); ``dim`` is d_in, or the number of embeddings;
    ``tokens`` the tokens it saw; ``tensor`` the key of its statistics (shared by modules that
    read one input)."""

    name: str
    kind: str
    dim: int
    tokens: int
    tensor: str


class CalibrationStats:
    """Per-module input second moments from :func:`calibrate` or :func:`load_calibration`.

    Tensors are read lazily from the file, one module at a time (:meth:`moment`).
    """

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                 path: Path | None = None):
        self.meta, self._tensors, self.path = meta, tensors, path
        self.modules = {name: ModuleStats(name, e["kind"], e["dim"], e["tokens"], e["tensor"])
                        for name, e in meta["modules"].items()}
        self._sha256: str | None = None

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def n_tokens(self) -> int:
        return int(self.meta.get("n_tokens", 0))

    def moment(self, name: str) -> torch.Tensor:
        """``C`` of module ``name``: (d, d) float64, or (d,) token counts for an embedding."""
        entry = self.modules.get(name)
        if entry is None:
            raise KeyError(name)
        if self._tensors is not None:
            return self._tensors[entry.tensor]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            t = f.get_tensor(entry.tensor)
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{self.path}: tensor {entry.tensor} has non-finite values")
        return t

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return dict(self._tensors)
        keys = sorted({e.tensor for e in self.modules.values()})
        return {k: self.moment(next(n for n, e in self.modules.items() if e.tensor == k)) for k in keys}

    def _metadata(self) -> dict[str, str]:
        return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "lorazip_calibration": json.dumps(self.meta, sort_keys=True, separators=(",", ":"))}

    @property
    def sha256(self) -> str:
        """sha256 of the statistics file (of its bytes as :meth:`save` writes them, when in memory)."""
        if self._sha256 is None:
            if self._tensors is None and self.path is not None:
                from .io.files import sha256_file

                self._sha256 = sha256_file(self.path)
            else:
                import hashlib

                from .artifact import safetensors_header

                tensors = self.tensors()
                head, order = safetensors_header(tensors, self._metadata())
                h = hashlib.sha256(head)
                for key in order:
                    t = tensors[key].detach().cpu().contiguous()
                    if t.numel():
                        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
                self._sha256 = h.hexdigest()
        return self._sha256

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the statistics atomically (safetensors, deterministic bytes)."""
        from .artifact import atomic_path, save_safetensors

        final = Path(path)
        tensors = self.tensors()
        with atomic_path(final, overwrite) as tmp:
            save_safetensors(tensors, tmp, self._metadata(), final)
        self.path = final
        return final


def load_calibration(path: str | os.PathLike) -> CalibrationStats:
    """Open a statistics file written by :func:`calibrate` (header checked, tensors read lazily)."""
    from .io.safetensors_header import parse_header

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such calibration file")
    header, metadata, _ = parse_header(path, ArtifactError)
    if (metadata or {}).get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a lorazip calibration file (run `lorazip calibrate` to make one)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: calibration format version {metadata.get('format_version')!r} is not "
                            f"supported (this lorazip reads version {FORMAT_VERSION})")
    try:
        meta = json.loads(metadata.get("lorazip_calibration", ""))
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: corrupt calibration metadata (not JSON)") from None
    mods = meta.get("modules") if isinstance(meta, dict) else None
    if not isinstance(mods, dict) or not mods:
        raise ArtifactError(f"{path}: corrupt calibration metadata (no modules)")
    for name, e in mods.items():
        ok = isinstance(e, dict) and e.get("kind") in KINDS and isinstance(e.get("dim"), int) and e["dim"] > 0 \
            and isinstance(e.get("tokens"), int) and e["tokens"] >= 0 and isinstance(e.get("tensor"), str)
        if not ok:
            raise ArtifactError(f"{path}: corrupt calibration metadata (module {name!r})")
        shape = [e["dim"], e["dim"]] if e["kind"] == "linear" else [e["dim"]]
        info = header.get(e["tensor"])
        if info is None or info["shape"] != shape or info["dtype"] != "F64":
            raise ArtifactError(f"{path}: tensor {e['tensor']} of module {name!r} missing or not float64 {tuple(shape)}")
    return CalibrationStats(meta, path=path)


# ----------------------------------------------------------------------------- text
def _text_files(data: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise SourceError("no calibration text given")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in _TEXT_SUFFIXES)
            if not found:
                raise SourceError(f"{p}: no .txt or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in _TEXT_SUFFIXES:
                raise SourceError(f"{p}: calibration text must be .txt or .jsonl (or a folder of them)")
            files.append(p)
        else:
            raise SourceError(f"{p}: no such file or folder")
    return files


def read_documents(data: Sequence[str | os.PathLike] | str | os.PathLike) -> tuple[list[str], list[Path]]:
    """Documents of the calibration text and the files they came from: a ``.txt`` file is one
    document, a ``.jsonl`` file one per line (its ``"text"`` field); a folder: its ``.txt`` and
    ``.jsonl`` files, recursively, in sorted order."""
    from .taskeval import read_texts

    docs: list[str] = []
    files = _text_files(data)
    for f in files:
        if f.suffix == ".jsonl":
            docs += read_texts(f)
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise SourceError(f"{f}: not UTF-8 text") from None
            if text.strip():
                docs.append(text)
    if not docs:
        raise SourceError("the calibration text is empty")
    return docs, files


def windows(encoded: list[list[int]], max_length: int, max_tokens: int | None) -> list[list[int]]:
    """Every document's token ids cut into consecutive windows of at most ``max_length``, in order,
    until ``max_tokens`` tokens (the last window cut short to land on it exactly)."""
    out: list[list[int]] = []
    left = max_tokens if max_tokens is not None else math.inf
    for ids in encoded:
        for s in range(0, len(ids), max_length):
            w = ids[s : s + max_length]
            if len(w) > left:
                w = w[: int(left)]
            if w:
                out.append(w)
                left -= len(w)
            if left <= 0:
                return out
    return out


# ------------------------------------------------------------------------ which modules
def _kind_dim(mod, conv1d) -> tuple[str, int, int] | None:
    """(kind, dim, d_other) of a module lorazip can calibrate: Linear / Conv1D (d_in, d_out),
    Embedding (num_embeddings, embedding_dim); None for anything else."""
    if isinstance(mod, torch.nn.Linear):
        return "linear", mod.in_features, mod.out_features
    if conv1d is not None and isinstance(mod, conv1d):  # GPT-2: weight (d_in, d_out), y = x W + b
        return "linear", mod.weight.shape[0], mod.weight.shape[1]
    if isinstance(mod, torch.nn.Embedding):
        return "embedding", mod.num_embeddings, mod.embedding_dim
    return None


def target_modules(model, transformers, adapters=None, modules: Sequence[str] | None = None,
                   allow_pickle: bool = False) -> dict[str, tuple[str, int]]:
    """``{module name: (kind, dim)}`` to calibrate: the modules an adapter collection adapts
    (``adapters``: its sources, names as lorazip reads them from the PEFT keys), the named
    ``modules``, or every Linear, Conv1D and Embedding module of ``model``.

    Raises :class:`~lorazip.errors.ValidationError` for a module the base model lacks or whose
    kind or shape differs from the adapters'.
    """
    try:
        from transformers.pytorch_utils import Conv1D as conv1d
    except ImportError:  # pragma: no cover - very old transformers
        conv1d = None
    named = dict(model.named_modules())
    found: dict[str, tuple[str, int]] = {}
    if adapters is None and modules is None:
        for name, mod in named.items():
            kd = _kind_dim(mod, conv1d)
            if kd is not None and name:
                found[name] = kd[:2]
        if not found:
            raise ValidationError("the base model has no Linear, Conv1D or Embedding modules")
        return found
    wanted: dict[str, Any] = {}
    if adapters is not None:
        from .io.collection import Collection, load_collection

        coll = adapters if isinstance(adapters, Collection) else load_collection(adapters, allow_pickle=allow_pickle)
        wanted.update({m.name: m for m in coll.modules})
    for name in modules or []:
        wanted.setdefault(name, None)
    example = next((n for n, m in named.items() if _kind_dim(m, conv1d) is not None and n), None)
    for name, info in wanted.items():
        mod = named.get(name)
        if mod is None:
            hint = f" (its modules are named like {example!r})" if example else ""
            raise ValidationError(f"module {name!r} is not in the base model{hint}: calibrate the base model "
                                  "the adapters were trained on")
        kd = _kind_dim(mod, conv1d)
        if kd is None:
            raise ValidationError(f"module {name!r} of the base model is a {type(mod).__name__}, not a Linear, "
                                  "Conv1D or Embedding")
        kind, dim, other = kd
        if info is not None:
            layout = "embedding" if info.layout == "embedding" else "linear"
            # lorazip's embedding delta is (num_embeddings, embedding_dim): d_out is the token side
            want = (info.d_in, info.d_out) if layout == "linear" else (info.d_out, info.d_in)
            if layout != kind or (dim, other) != want:
                shape = f"{other}x{dim}" if kind == "linear" else f"{dim}x{other}"  # as lorazip writes d_out x d_in
                raise ValidationError(
                    f"module {name!r}: the adapters see a {layout} {info.d_out}x{info.d_in} (d_out x d_in), the "
                    f"base model has a {type(mod).__name__} of {shape} ({kind}): calibrate the base model the "
                    "adapters were trained on")
        found[name] = (kind, dim)
    return found


# ------------------------------------------------------------------------- accumulation
class _Accumulator:
    """Forward pre-hooks that add ``x^T x`` (or token counts) of every non-padding position."""

    def __init__(self, model, targets: dict[str, tuple[str, int]], device):
        self.targets, self.device = targets, device
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.leader: dict[str, str] = {}  # module -> the module whose accumulator holds its input
        self.mask: torch.Tensor | None = None
        self._last: tuple[Any, str] | None = None
        self._handles = []
        named = dict(model.named_modules())
        for name, (kind, dim) in targets.items():
            hook = self._embedding_hook(name, dim) if kind == "embedding" else self._linear_hook(name, dim)
            self._handles.append(named[name].register_forward_pre_hook(hook, with_kwargs=True))

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask, self._last = mask.bool(), None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._last, self.mask = [], None, None

    @staticmethod
    def _input(args, kwargs):
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None

    def _rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The positions of ``x`` that are real tokens, as (N, dim) rows."""
        m = self.mask
        if m is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(m.shape):
            return x[m]
        if m is not None and x.dim() == 2 and x.shape[0] == m.numel():
            return x[m.reshape(-1)]
        return x.reshape(-1, dim)  # a module that sees other positions (e.g. only the last ones)

    def _linear_hook(self, name: str, dim: int):
        def hook(_mod, args, kwargs):
            x = self._input(args, kwargs)
            last = self._last
            lead = last[1] if last is not None and last[0] is x else name
            if self.leader.setdefault(name, lead) != lead:
                raise LorazipError(f"module {name!r} shares its input with {self.leader[name]!r} in some forward "
                                   "passes but not in others; calibrate its modules one at a time (modules=[...])")
            self._last = (x, lead)
            if lead != name:
                return
            rows = self._rows(x.detach(), dim).to(self.device, torch.float64)
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
                self.tokens[name] = 0
            acc.addmm_(rows.T, rows)
            self.tokens[name] += rows.shape[0]
            return
        return hook

    def _embedding_hook(self, name: str, dim: int):
        def hook(_mod, args, kwargs):
            ids = self._input(args, kwargs).detach()
            m = self.mask
            if m is not None and ids.dim() == m.dim() and ids.shape != m.shape:
                try:
                    ids = ids.expand(m.shape)  # position ids of shape (1, seq)
                except RuntimeError:
                    pass
            ids = ids[m] if m is not None and ids.shape == m.shape else ids.reshape(-1)
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(dim, dtype=torch.float64, device=self.device)
                self.tokens[name] = 0
            acc += torch.bincount(ids.to(self.device).long(), minlength=dim)[:dim].double()
            self.tokens[name] += ids.numel()
        return hook


def calibrate(
    base_model,
    data: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    adapters=None,
    modules: Sequence[str] | None = None,
    tokenizer=None,
    max_tokens: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    dtype: str = "float32",
    allow_pickle: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> CalibrationStats:
    """Input second moments of the base model's modules on calibration text.

    Parameters
    ----------
    base_model : folder of a transformers causal LM (``save_pretrained``), a Hub id (through the
        normal Hugging Face cache), or an already loaded ``PreTrainedModel`` (then pass ``tokenizer``).
    data : a ``.txt`` file (one document), a ``.jsonl`` file (one ``{"text": ...}`` per line), a
        folder of them, or a list of those.
    adapters : an adapter collection (sources or a :class:`~lorazip.io.collection.Collection`):
        calibrate the modules it adapts (recommended). ``modules``: module names instead (or as
        well). Neither: every Linear, Conv1D and Embedding module of the base model.
    max_tokens : stop after this many tokens (default: all of the text).
    max_length : tokens per window; each document, tokenized without special tokens, is cut into
        consecutive windows of this length (each window is one sequence of a batch).
    batch_size, device, dtype : windows per forward pass; ``auto | cpu | cuda``; the model's
        compute dtype (float32 by default; the statistics are always accumulated in float64).
    progress : called as ``progress(tokens_done, tokens_total, "tokens")``.

    Returns
    -------
    CalibrationStats in memory; ``.save(path)`` writes it.

    Raises
    ------
    MissingDependencyError without transformers; SourceError for missing or unreadable text or
    model; ValidationError for modules the base model lacks; OptionError for bad settings.
    """
    (transformers,) = require_hf("calibration", ("transformers",))
    _check_settings(max_tokens, max_length, batch_size, dtype)
    dev = resolve_device(device)
    docs, files = read_documents(data)
    model, model_id = load_base_model(transformers, base_model, tokenizer, dtype)
    max_length = min(max_length, position_limit(model) or max_length)  # windows the model takes
    tok = load_tokenizer_for(transformers, tokenizer, model_id)
    targets = target_modules(model, transformers, adapters, modules, allow_pickle)
    encoded = [list(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    wins = windows(encoded, max_length, max_tokens)
    total = sum(map(len, wins))
    if total == 0:
        raise SourceError("the calibration text has no tokens")
    acc = _accumulate(model, tok, targets, wins, total, batch_size, dev, progress)
    return _assemble(acc, targets, model_id, files, len(docs), len(wins), total, max_length, max_tokens, dtype)


def _check_settings(max_tokens: int | None, max_length: int, batch_size: int, dtype: str) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens <= 0):
        raise OptionError(f"max_tokens must be positive, got {max_tokens}")
    if max_length < 1:
        raise OptionError(f"max_length must be at least 1, got {max_length}")
    if batch_size <= 0:
        raise OptionError(f"batch_size must be positive, got {batch_size}")
    check_dtype(dtype)


def _accumulate(model, tok, targets: dict[str, tuple[str, int]], wins: list[list[int]], total: int,
                batch_size: int, dev: str, progress) -> _Accumulator:
    """Run the model on ``dev`` over the windows, in length-sorted batches (little padding), with
    the accumulating hooks on ``targets``; the model's training mode is restored after."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    was_training = model.training
    model.to(dev).eval()
    acc = _Accumulator(model, targets, dev)
    kwargs = _forward_kwargs(model, targets)
    order = sorted(range(len(wins)), key=lambda i: len(wins[i]))
    done = 0
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                ids, mask = _padded_batch([wins[i] for i in order[s : s + batch_size]], pad)
                ids, mask = ids.to(dev), mask.to(dev)
                acc.start_batch(mask)
                model(input_ids=ids, attention_mask=mask, **kwargs)
                done += int(mask.sum())
                if progress:
                    progress(done, total, "tokens")
    finally:
        acc.close()
        model.train(was_training)
    return acc


def _forward_kwargs(model, targets) -> dict[str, Any]:
    """Forward-pass options: no KV cache, and logits of the last position only when the output
    head is not calibrated (no full-vocabulary logits for nothing)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hooked = {id(m) for n, m in model.named_modules() if n in targets}
    if out_emb is not None and id(out_emb) not in hooked:
        import inspect

        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # the head is not calibrated: skip the full-vocabulary logits
    return kwargs


def _padded_batch(chunk: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (right-padded with ``pad``) and the attention mask of a batch of windows."""
    L = max(map(len, chunk))
    ids = torch.full((len(chunk), L), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), L), dtype=torch.long)
    for r, w in enumerate(chunk):
        ids[r, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[r, : len(w)] = 1
    return ids, mask


def _assemble(acc: _Accumulator, targets, model_id, files, n_docs, n_windows, n_tokens, max_length, max_tokens,
              dtype) -> CalibrationStats:
    from .io.files import sha256_file

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(targets):
        kind, dim = targets[name]
        lead = acc.leader.get(name, name)
        key = f"{'C' if kind == 'linear' else 'counts'}/{lead}"
        if lead in acc.sums and key not in tensors:
            t = acc.sums[lead].cpu()
            if kind == "linear":
                t = 0.5 * (t + t.T)  # exactly symmetric (the sums are, up to rounding)
            tensors[key] = t.contiguous()
        if key not in tensors:
            raise ValidationError(f"module {name!r} saw no input on the calibration text: is it used by the "
                                  "model's forward pass?")
        entries[name] = {"kind": kind, "dim": dim, "tokens": int(acc.tokens[lead]), "tensor": key,
                         **({"shares_input_with": lead} if lead != name else {})}
    meta = {
        "lorazip_version": __version__,
        "base_model": model_id,
        "data": [{"file": str(f), "sha256": sha256_file(f)} for f in files],
        "n_documents": n_docs,
        "n_windows": n_windows,
        "n_tokens": int(n_tokens),
        "max_length": max_length,
        "max_tokens": max_tokens,
        "model_dtype": dtype,
        "modules": entries,
    }
    return CalibrationStats(meta, tensors=tensors)


def stats_from_moments(moments: dict[str, tuple[torch.Tensor, int]], *, base_model: str | None = None,
                       kinds: dict[str, str] | None = None) -> CalibrationStats:
    """Statistics from second moments computed elsewhere: ``{module: (C, tokens)}`` with ``C``
    (d, d) for a linear module or (d,) token counts for an embedding (``kinds[module]`` =
    "embedding"; default: by the shape of ``C``)."""
    tensors, entries = {}, {}
    for name in sorted(moments):
        C, tokens = moments[name]
        kind = (kinds or {}).get(name, "linear" if C.dim() == 2 else "embedding")
        if kind not in KINDS or C.dim() != (2 if kind == "linear" else 1) or (kind == "linear" and C.shape[0] != C.shape[1]):
            raise OptionError(f"module {name!r}: a {kind} second moment must be (d, d) (linear) or (d,) (embedding)")
        key = f"{'C' if kind == 'linear' else 'counts'}/{name}"
        tensors[key] = C.detach().to(torch.float64).cpu().contiguous()
        entries[name] = {"kind": kind, "dim": int(C.shape[0]), "tokens": int(tokens), "tensor": key}
    meta = {"lorazip_version": __version__, "base_model": base_model, "data": [], "n_documents": 0,
            "n_windows": 0, "n_tokens": max((e["tokens"] for e in entries.values()), default=0),
            "max_length": None, "max_tokens": None, "model_dtype": None, "modules": entries}
    return CalibrationStats(meta, tensors=tensors)
