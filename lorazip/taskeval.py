"""Task-level evaluation: does each compressed adapter still do its task?

Reconstruction error (``lorazip.evaluate``) is a proxy. This module measures what users care
about on held-out text: for every adapter of an artifact that has a data file
``DATA_DIR/<name>.jsonl`` (one JSON object per line with a ``"text"`` field), the held-out
loss of

* the base model alone,
* the base model with the ORIGINAL adapter (PEFT folder; by default the source path recorded
  in the artifact, when it still exists),
* the base model with the COMPRESSED adapter (``lorazip.to_peft``, loaded into PEFT in memory),

and the *retention* ``(loss_base - loss_compressed) / (loss_base - loss_original)``: the
fraction of the original adapter's loss improvement that the compressed one keeps (1.0 = all).

Loss protocol (the same as ``examples/fortunes/build_collection.py``): token-weighted mean
next-token negative log-likelihood in nats over the texts, each text tokenized on its own
without special tokens and truncated to ``max_length`` tokens (every token but the first is
predicted; texts of fewer than 2 tokens are skipped), computed in float32.

The base model is loaded once; each adapter is injected with PEFT, evaluated and unloaded
(``unload()`` restores the untouched base modules), so swapping costs milliseconds.
Base and original losses are cached in a :class:`TaskEvaluator`, so evaluating several
artifacts of one collection (a rank sweep) only recomputes the compressed losses.

Needs the optional extra ``lorazip[eval]`` (transformers + peft), imported lazily; the base model
and tokenizer are loaded by :mod:`lorazip.models`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .artifact import Artifact
from .errors import AdapterFormatError, OptionError, SourceError, ValidationError, first_line
from .metrics import summary
from .models import (causal_lm_or_error, check_dtype, load_base_model, load_tokenizer_for, position_limit,
                     quiet_warnings, require_hf, resolve_device)
from .models import MissingDependencyError  # noqa: F401  (raised here: importable from taskeval as before)

REPORT_VERSION = 1
DEFAULT_MAX_LENGTH = 128


# ----------------------------------------------------------------------------- data
def read_texts(path: str | os.PathLike, max_texts: int | None = None) -> list[str]:
    """Texts of a JSONL file: one JSON object per line with a string ``"text"``; blank lines skipped.

    The first ``max_texts`` texts (file order) are returned when given.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such data file")
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise SourceError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
                texts.append(obj["text"])
                if max_texts is not None and len(texts) >= max_texts:
                    break
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8 text") from None
    if not texts:
        raise SourceError(f"{path}: no texts")
    return texts


@dataclass(frozen=True)
class Loss:
    """Token-weighted mean NLL (nats) over ``n_texts`` texts totalling ``n_tokens`` predicted tokens."""

    loss: float
    n_tokens: int
    n_texts: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


def mean_nll(model, encoded: list[list[int]], *, pad_id: int = 0, batch_size: int = 16, device="cpu") -> Loss:
    """Token-weighted mean next-token NLL of ``model`` over token-id lists (each its own sequence).

    Sequences are sorted by length and batched with right padding and an attention mask;
    logits are cast to float32 before the cross-entropy.
    """
    seqs = sorted((e for e in encoded if len(e) >= 2), key=len)
    if not seqs:
        raise ValidationError("no text has at least 2 tokens")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            L = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, e in enumerate(chunk):
                ids[r, : len(e)] = torch.tensor(e, dtype=torch.long)
                mask[r, : len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:]
            m = mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
            ).view_as(tgt)
            total += float(nll[m].double().sum())
            count += int(m.sum())
    model.train(was_training)
    return Loss(total / count, count, len(seqs))


# ---------------------------------------------------------------------- evaluator
class TaskEvaluator:
    """A base model loaded once, held-out texts per adapter, and cached base/original losses.

    Parameters
    ----------
    base_model
        Folder of a transformers causal LM (``save_pretrained``), a Hub id, or an already
        loaded ``PreTrainedModel`` (then ``tokenizer`` is required).
    data_dir
        Folder of ``<adapter name>.jsonl`` files.
    tokenizer
        Tokenizer folder/id or object; default: the base model's folder.
    max_texts, max_length, batch_size
        First ``max_texts`` texts of each file; truncation in tokens; sequences per forward.
    device, dtype
        ``auto | cpu | cuda``; compute dtype of the base model (float32 by default).
    """

    def __init__(
        self,
        base_model,
        data_dir: str | os.PathLike,
        *,
        tokenizer=None,
        max_texts: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        transformers, self._peft = require_hf("task-level evaluation")
        if max_texts is not None and max_texts <= 0:
            raise OptionError(f"max_texts must be positive, got {max_texts}")
        if max_length < 2:
            raise OptionError(f"max_length must be at least 2, got {max_length}")
        if batch_size <= 0:
            raise OptionError(f"batch_size must be positive, got {batch_size}")
        check_dtype(dtype)
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise SourceError(f"{self.data_dir}: no such data folder")
        self.max_texts, self.max_length, self.batch_size = max_texts, max_length, batch_size
        self.device = resolve_device(device)
        self.dtype = dtype
        t0 = time.perf_counter()
        self.model, self.base_model_id = load_base_model(transformers, base_model, tokenizer, dtype)
        causal_lm_or_error(self.model, self.base_model_id)
        self.max_length = min(max_length, position_limit(self.model) or max_length)  # texts the model takes
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer_for(transformers, tokenizer, self.base_model_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.load_s = time.perf_counter() - t0
        self._encoded: dict[str, list[list[int]]] = {}
        self._base: dict[str, Loss] = {}
        self._orig: dict[tuple[str, str], Loss] = {}

    # -- data ------------------------------------------------------------
    def data_file(self, name: str) -> Path:
        return self.data_dir / f"{name}.jsonl"

    def has_data(self, name: str) -> bool:
        return self.data_file(name).is_file()

    def encoded(self, name: str) -> list[list[int]]:
        """Token ids of the adapter's held-out texts (no special tokens, truncated), cached."""
        if name not in self._encoded:
            texts = read_texts(self.data_file(name), self.max_texts)
            self._encoded[name] = [
                list(self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length]) for t in texts
            ]
        return self._encoded[name]

    def _loss(self, model, name: str) -> Loss:
        return mean_nll(model, self.encoded(name), pad_id=self.pad_id, batch_size=self.batch_size, device=self.device)

    # -- the three losses ---------------------------------------------------
    def base_loss(self, name: str) -> Loss:
        if name not in self._base:
            self._base[name] = self._loss(self.model, name)
        return self._base[name]

    def original_loss(self, name: str, folder: str | os.PathLike, *, allow_pickle: bool = False) -> Loss:
        """Loss with a PEFT adapter folder, loaded with ``PeftModel.from_pretrained`` (cached by path)."""
        folder = Path(folder)
        key = (name, os.path.realpath(folder))
        if key not in self._orig:
            if not (folder / "adapter_model.safetensors").is_file():
                if not (folder / "adapter_model.bin").is_file():
                    raise AdapterFormatError(f"{folder}: no adapter_model.safetensors")
                if not allow_pickle:
                    raise AdapterFormatError(f"{folder}/adapter_model.bin: pickled weights are refused "
                                             "(they can run code); pass --allow-pickle to load them")
            with quiet_warnings():
                try:
                    pm = self._peft.PeftModel.from_pretrained(self.model, str(folder), is_trainable=False)
                except Exception as exc:
                    raise AdapterFormatError(f"{folder}: PEFT cannot load this adapter into the base model "
                                             f"({first_line(exc)})") from None
            try:
                self._orig[key] = self._loss(pm, name)
            finally:
                self.model = pm.unload()
        return self._orig[key]

    def peft_loss(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Loss:
        """Loss with an in-memory PEFT LoRA (``state`` and ``config`` as ``lorazip.to_peft`` returns)."""
        cfg = self._peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
        with quiet_warnings():
            pm = self._peft.get_peft_model(self.model, cfg)
        try:
            state = {k: v.to(self.device) for k, v in state.items()}
            res = self._peft.set_peft_model_state_dict(pm, state)
            unexpected = list(getattr(res, "unexpected_keys", []) or [])
            missing = [k for k in getattr(res, "missing_keys", []) or [] if "lora_" in k]
            if unexpected or missing:
                raise ValidationError(
                    f"adapter {name!r}: PEFT did not take the compressed weights "
                    f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
                )
            return self._loss(pm, name)
        finally:
            self.model = pm.unload()

    def compressed_loss(self, artifact: Artifact, name: str) -> Loss:
        from .export import to_peft

        state, config = to_peft(artifact, name, dtype="float32")
        return self.peft_loss(name, state, config)

    # -- a whole artifact ------------------------------------------------------
    def evaluate(
        self,
        artifact: Artifact,
        originals: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        *,
        names: Sequence[str] | None = None,
        check_hashes: bool = True,
        allow_pickle: bool = False,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> dict[str, Any]:
        """Task report of ``artifact`` (see :func:`evaluate_tasks`)."""
        from .evaluate import evaluate as recon_evaluate

        t0 = time.perf_counter()
        wanted = list(artifact.names if names is None else names)
        for n in wanted:
            artifact.index(n)
        todo = [n for n in wanted if self.has_data(n)]
        skipped = [{"name": n, "reason": f"no data file {self.data_file(n)}"} for n in wanted if not self.has_data(n)]
        if names is not None and skipped:
            raise SourceError(skipped[0]["reason"])
        if not todo:
            raise SourceError(
                f"{self.data_dir}: no data file for any adapter of the artifact "
                f"(expected <name>.jsonl, e.g. {self.data_file(wanted[0]).name})"
            )
        orig_dirs, orig_note = _original_dirs(artifact, originals, check_hashes)
        recon = {a["name"]: a["error"] for a in recon_evaluate(artifact)["adapters"]}
        rows = []
        for k, name in enumerate(todo):
            if progress:
                progress(k, len(todo), name)
            lb = self.base_loss(name)
            folder = orig_dirs.get(name)
            lo = self.original_loss(name, folder, allow_pickle=allow_pickle) if folder is not None else None
            lc = self.compressed_loss(artifact, name)
            rows.append(_row(name, lb, lo, lc, recon.get(name), folder))
        if progress:
            progress(len(todo), len(todo), "")
        return {
            "report_version": REPORT_VERSION,
            "kind": "task",
            "artifact": str(artifact.path) if artifact.path else None,
            "method": artifact.method,
            "rank": artifact.meta.get("rank"),
            "n_clusters": (artifact.meta.get("clustering") or {}).get("n_clusters", 1),
            "storage_dtype": artifact.meta.get("storage_dtype"),
            "base_model": self.base_model_id,
            "data_dir": str(self.data_dir),
            "protocol": {
                "loss": "token-weighted mean next-token NLL (nats), each text alone, no special tokens",
                "max_length": self.max_length,
                "max_texts": self.max_texts,
                "batch_size": self.batch_size,
                "device": self.device,
                "dtype": self.dtype,
            },
            "originals": orig_note,
            "n_adapters": len(rows),
            "adapters": rows,
            "skipped": skipped,
            "summary": _summary(rows),
            "timing": {"load_s": self.load_s, "eval_s": time.perf_counter() - t0},
        }


def evaluate_tasks(
    artifact: Artifact | str | os.PathLike,
    base_model,
    data_dir: str | os.PathLike,
    originals: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    max_texts: int | None = None,
    *,
    names: Sequence[str] | None = None,
    tokenizer=None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    check_hashes: bool = True,
    allow_pickle: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Held-out loss of base / original / compressed adapter and retention, per adapter.

    Parameters
    ----------
    artifact
        An :class:`~lorazip.Artifact` or the path of one.
    base_model
        Folder of the base causal LM (transformers ``save_pretrained``) or a loaded model.
    data_dir
        Folder with ``<adapter name>.jsonl``; adapters without a file are listed in ``skipped``.
    originals
        Original adapter folders (a folder of adapter folders, or a list); default: the source
        paths recorded in the artifact, where they still exist. Their sha256 must match the
        artifact's record unless ``check_hashes=False``. Without an original, the adapter's
        ``loss_original`` and ``retention`` are ``None``.
    max_texts
        Use only the first N texts of each file.

    Returns
    -------
    dict
        ``report_version`` 1, documented in docs/task_eval.md.

    Raises
    ------
    MissingDependencyError
        transformers or peft is not installed (``pip install 'lorazip[eval]'``).
    SourceError, OptionError, ValidationError, AdapterFormatError
        Missing data folder/files, bad JSONL, bad options, originals that differ from the
        compressed files, adapters PEFT cannot load.
    """
    from .artifact import load_artifact

    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    ev = TaskEvaluator(base_model, data_dir, tokenizer=tokenizer, max_texts=max_texts, max_length=max_length,
                       batch_size=batch_size, device=device, dtype=dtype)
    return ev.evaluate(art, originals, names=names, check_hashes=check_hashes, allow_pickle=allow_pickle,
                       progress=progress)


# ------------------------------------------------------------------------- helpers
def retention(loss_base: float, loss_original: float | None, loss_compressed: float) -> float | None:
    """``(base - compressed) / (base - original)``; ``None`` when the original does not improve on the base."""
    if loss_original is None:
        return None
    gain = loss_base - loss_original
    if not gain > 0:
        return None
    return (loss_base - loss_compressed) / gain


def _row(name: str, lb: Loss, lo: Loss | None, lc: Loss, error: float | None, folder) -> dict[str, Any]:
    return {
        "name": name,
        "n_texts": lb.n_texts,
        "n_tokens": lb.n_tokens,
        "loss_base": lb.loss,
        "loss_original": lo.loss if lo else None,
        "loss_compressed": lc.loss,
        "ppl_base": lb.perplexity,
        "ppl_original": lo.perplexity if lo else None,
        "ppl_compressed": lc.perplexity,
        "retention": retention(lb.loss, lo.loss if lo else None, lc.loss),
        "error": error,
        "original": str(folder) if folder is not None else None,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ret = [r["retention"] for r in rows if r["retention"] is not None]
    out: dict[str, Any] = {
        "n_with_retention": len(ret),
        "retention": summary(ret) if ret else None,
        "n_retention_ge_0.99": sum(v >= 0.99 for v in ret),
        "n_retention_ge_0.9": sum(v >= 0.9 for v in ret),
        "loss_base_mean": summary([r["loss_base"] for r in rows])["mean"],
        "loss_compressed_mean": summary([r["loss_compressed"] for r in rows])["mean"],
    }
    lo = [r["loss_original"] for r in rows if r["loss_original"] is not None]
    out["loss_original_mean"] = summary(lo)["mean"] if lo else None
    return out


def _original_dirs(artifact: Artifact, originals, check_hashes: bool) -> tuple[dict[str, Path], str]:
    """Adapter name -> original folder, and where they came from (``given``, ``recorded``)."""
    from .io.collection import resolve_sources
    from .io.peft import CONFIG_NAME, sha256_file

    dirs: dict[str, Path] = {}
    if originals is not None:
        found = {name: Path(d) for name, d, _prov in resolve_sources(originals)}
        dirs = {n: found[n] for n in artifact.names if n in found}
        if not dirs:
            raise ValidationError(
                f"none of the original adapters ({', '.join(list(found)[:3])}...) are in the artifact"
            )
        note = "given"
    else:
        for a in artifact.meta["adapters"]:
            p = (a.get("source") or {}).get("path")
            if p and (Path(p) / CONFIG_NAME).is_file():
                dirs[a["name"]] = Path(p)
        note = "recorded" if dirs else "none"
    if check_hashes:
        for name, d in dirs.items():
            meta = artifact.meta["adapters"][artifact.index(name)]
            for fname, info in (meta.get("source") or {}).get("files", {}).items():
                f = d / fname
                want = info.get("sha256")
                if want and f.is_file() and sha256_file(f) != want:
                    raise ValidationError(
                        f"{f}: sha256 differs from the file compressed into the artifact "
                        "(not the original of this adapter)"
                    )
    return dirs, note


def table(rep: dict[str, Any], title: str | None = None):
    """A rich table of a task report (what ``lorazip eval --base-model`` prints)."""
    from rich.markup import escape
    from rich.table import Table

    def f(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)

    t = Table(title=escape(title or f"task evaluation: {rep['artifact']}"), title_justify="left")
    t.add_column("adapter", no_wrap=True)
    for col in ("texts", "base", "original", "compressed", "retention", "rec. err"):
        t.add_column(col, justify="right", no_wrap=True)
    for a in rep["adapters"]:
        t.add_row(escape(a["name"]), str(a["n_texts"]), f(a["loss_base"]), f(a["loss_original"]),
                  f(a["loss_compressed"]), f(a["retention"], "{:.3f}"), f(a["error"]))
    s = rep["summary"]
    head = "losses: mean token NLL (nats) of the base model, original and compressed adapter"
    if s["retention"]:
        r = s["retention"]
        t.caption = head + (f"\nretention mean {r['mean']:.3f}, median {r['median']:.3f}, min {r['min']:.3f}; "
                     f">= 0.99: {s['n_retention_ge_0.99']}/{s['n_with_retention']}, "
                     f">= 0.9: {s['n_retention_ge_0.9']}/{s['n_with_retention']}")
    else:
        t.caption = head + "\nno originals found: retention needs --originals (or the recorded source folders)"
    t.caption_justify = "left"
    return t
