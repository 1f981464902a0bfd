"""Artifact -> standard PEFT LoRA adapters (in memory or as folders).

Adapter ``i`` is exported as a LoRA with ``B' = [U_k S_i, b_i]`` (d_out, r + k_i) and
``A' = [V_k^T; a_i]`` (r + k_i, d_in) (``k`` its cluster, ``b_i a_i`` its format-v2 residual
part, absent: ``k_i = 0``) and ``lora_alpha`` equal to the module's rank (``rank_pattern`` /
``alpha_pattern`` per module), so PEFT's scale is 1 and the delta is exactly the
reconstruction ``U_k S_i V_k^T + b_i a_i``; a module with ``r + k_i = 0`` is left out.
``fan_in_fan_out``, ``task_type``, the base model and ``modules_to_save`` tensors are carried
over from the original adapter, so PEFT and vLLM load the folder unchanged.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifact import STORAGE_DTYPES, Artifact, current_umask, module_path, save_safetensors
from .errors import ArtifactError, OptionError, OutputError
from .io.peft import short

_PREFIX = "base_model.model."
_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f]+$")  # no path separators, NUL or control characters


def _dtype(dtype: str) -> torch.dtype:
    floats = [d for d in STORAGE_DTYPES if d != "int8"]  # PEFT loads float LoRA factors only
    if dtype not in floats:
        raise OptionError(f"unknown dtype {dtype!r} for export; choose from {', '.join(floats)}")
    return STORAGE_DTYPES[dtype]


def _peft_parts(
    artifact: Artifact, rows: list[int], dtype: str
) -> list[tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """LoRA tensors and per-module ranks of the adapters ``rows``: one pass over the modules
    (bases read once per module, the cores and residual rows of all ``rows`` together), with the
    artifact file kept open. Adapter ``i``, module ``m`` (cluster ``c``): ``lora_B = [U_c S_i, b_i]``,
    ``lora_A = [V_c^T; a_i]``; a module where neither part has rank is left out (zero delta)."""
    tdtype = _dtype(dtype)
    finfo = torch.finfo(tdtype)
    metas = [artifact.meta["adapters"][i] for i in rows]
    parts: list[tuple[dict[str, torch.Tensor], dict[str, int]]] = [({}, {}) for _ in rows]
    with artifact.reader():
        for mod in artifact.modules:
            m = mod["name"]
            sel = [j for j, meta in enumerate(metas) if m in meta["ranks"]]
            if not sel:
                continue  # no requested adapter adapted this module: its delta is zero
            sub = [rows[j] for j in sel]
            U, V, cores, assign = artifact.module_factors(m, sub)
            b, a, ks = artifact.module_residuals(m, sub)
            r = V.shape[2]
            U, V, S = U.double(), V.double(), cores.double()
            if r and U.shape[2]:
                Us = U[0] if U.shape[0] == 1 else U[assign]  # (d_out, r_out) or (m, d_out, r_out)
                Bs = Us * S[:, None, :] if S.dim() == 2 else Us @ S  # (m, d_out, r)
                big = Bs.abs().amax(dim=(1, 2))
            else:  # rank 0 (or a zero-width side): the shared part is zero
                Bs = torch.zeros(len(sub), mod["d_out"], r, dtype=torch.float64)
                big = torch.zeros(len(sub), dtype=torch.float64)
            if r:
                big = torch.maximum(big, V.abs().amax(dim=(1, 2))[assign])
            if b.shape[2]:
                b, a = b.double(), a.double()
                big = torch.maximum(big, torch.maximum(b.abs().amax(dim=(1, 2)), a.abs().amax(dim=(1, 2))))
            ok = big <= finfo.max  # also False for NaN
            if not bool(ok.all()):
                j = sel[int((~ok).nonzero()[0])]
                raise ArtifactError(
                    f"{artifact.path or 'artifact'}: adapter {short(metas[j]['name'])}, module {short(m)}: "
                    f"the exported factors overflow {dtype} (damaged or hostile artifact)"
                )
            At = V.transpose(1, 2)  # (K, r, d_in)
            for t, j in enumerate(sel):
                k = int(ks[t])
                if r + k == 0:
                    continue  # nothing stored for this adapter here: zero delta, not exported
                Bp, Ap = Bs[t], At[int(assign[t])]
                if k:
                    Bp, Ap = torch.cat([Bp, b[t, :, :k]], 1), torch.cat([Ap, a[t, :k]], 0)
                state, ranks = parts[j]
                path = module_path(mod)  # a shape group is written under its module's path
                if mod.get("layout", "linear") == "embedding":
                    state[f"{_PREFIX}{path}.lora_embedding_A"] = Bp.T.to(tdtype).contiguous()
                    state[f"{_PREFIX}{path}.lora_embedding_B"] = Ap.T.to(tdtype).contiguous()
                else:
                    state[f"{_PREFIX}{path}.lora_A.weight"] = Ap.to(tdtype).contiguous()
                    state[f"{_PREFIX}{path}.lora_B.weight"] = Bp.to(tdtype).contiguous()
                ranks[path] = r + k
        for j, i in enumerate(rows):
            prefix = f"extras/{i}/"
            orig = metas[j].get("extras_dtypes", {})  # extras converted at compression (--extras-dtype)
            for key in metas[j].get("extras", []):
                if prefix + key in artifact._key_set():
                    t = artifact.get(prefix + key)  # int8 extras: dequantised
                    parts[j][0][key] = t.to(getattr(torch, orig[key])) if key in orig else t
    return parts


# the heads PEFT's task types add to modules_to_save when it loads an adapter (suffix-matched)
_TASK_SAVES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _config(artifact: Artifact, i: int, state: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, Any]:
    """``adapter_config.json`` of adapter ``i`` exported with the per-module ``ranks`` (scale 1 everywhere)."""
    meta = artifact.meta["adapters"][i]
    kept = [k for k in meta.get("extras", []) if k in state]
    orig = meta.get("config", {})
    saved = (orig.get("modules_to_save") or []) if kept else []
    task = None if meta.get("extras") and not kept else orig.get("task_type")
    if any(m.endswith(s) for m in ranks for s in [*saved, *_TASK_SAVES.get(task or "", ())]):
        # LoRA on a head that PEFT would also wrap as modules_to_save (older PEFT wrote such adapters;
        # current PEFT refuses to load them): a plain LoRA whose heads' saved weights load into the
        # LoRA layers' base_layer, as the old PEFT computed it
        task, saved = None, [s for s in saved if not any(m.endswith(s) for m in ranks)]
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else (artifact.meta.get("rank") or 1)
    pattern = {re.escape(m): rr for m, rr in ranks.items() if rr != r}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": artifact.meta.get("base_model") or orig.get("base_model_name_or_path"),
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


def to_peft(artifact: Artifact, name: str, *, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT state dict and ``adapter_config.json`` contents of adapter ``name``.

    Only the bases, this adapter's cores and its residual rows are read from disk. Module ``m``
    becomes a LoRA of rank ``r_m + k_i`` (``rank_pattern`` / ``alpha_pattern`` where it differs
    from the most common rank) with ``lora_alpha`` equal to its rank, so PEFT's scale is 1.
    """
    _dtype(dtype)
    i = artifact.index(name)
    ((state, ranks),) = _peft_parts(artifact, [i], dtype)
    return state, _config(artifact, i, state, ranks)


_CHUNK_BYTES = 1 << 30  # export builds the adapters of one chunk in memory, then writes them


def _chunks(artifact: Artifact, rows: list[int], dtype: str) -> list[list[int]]:
    """``rows`` split so that the exported tensors of one chunk take at most about ``_CHUNK_BYTES``."""
    width = torch.empty(0, dtype=_dtype(dtype)).element_size()
    out: list[list[int]] = []
    size = 0
    for i in rows:
        meta = artifact.meta["adapters"][i]
        need = width * sum(
            (mod["rank"] + (mod.get("residual") or {}).get("max_rank", 0)) * (mod["d_in"] + mod["d_out"])
            for mod in artifact.modules if mod["name"] in meta["ranks"]
        )
        if not out or size + need > _CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += need
    return out


def _check_name(name: str) -> None:
    """Adapter names come from the artifact (a file from a stranger): one plain folder name only."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name.startswith(".."):
        raise ArtifactError(
            f"adapter name {short(name)} cannot be used as a folder name (it could write outside the output folder)"
        )


def export(
    artifact: Artifact,
    outdir: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> list[Path]:
    """Write adapters as PEFT folders ``outdir/<name>/`` (all adapters when ``names`` is None).

    Each folder is written to a temporary folder and renamed into place, so a folder
    under its final name is always complete. Returns the folders written. Output folders are
    checked before anything is computed; the artifact is opened once, and each module's bases
    are read once for all the adapters (up to about 1 GiB of exported tensors at a time).
    """
    _dtype(dtype)
    names = list(dict.fromkeys(artifact.names if names is None else names))  # each adapter once
    for name in names:
        artifact.index(name)
        _check_name(name)
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create folder ({exc.strerror})") from None
    for name in names:
        _check_final(out, name, overwrite)
    written = []
    with artifact.reader():
        for chunk in _chunks(artifact, [artifact.index(n) for n in names], dtype):
            parts = _peft_parts(artifact, chunk, dtype)
            for i, (state, ranks) in zip(chunk, parts):
                name = artifact.names[i]
                written.append(_write_folder(out, name, state, _config(artifact, i, state, ranks), overwrite))
    return written


def _check_final(out: Path, name: str, overwrite: bool) -> Path:
    final = out / name
    if final.is_symlink() or final.resolve().parent != out.resolve():
        raise OutputError(f"{final}: is a symbolic link or leads outside {out}; refusing to replace it")
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    return final


def _write_folder(
    out: Path, name: str, state: dict[str, torch.Tensor], config: dict[str, Any], overwrite: bool
) -> Path:
    """Write ``out/name/`` atomically (temporary folder, fsync, rename; an old folder is replaced)."""
    final = _check_final(out, name, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    aside = None
    try:
        save_safetensors(state, tmp / "adapter_model.safetensors", {"format": "pt"}, final)
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
