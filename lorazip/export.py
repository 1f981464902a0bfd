"""Artifact -> standard PEFT LoRA adapters (in memory or as folders).

Adapter ``i`` is exported as a rank-r LoRA with ``B' = U_k S_i`` and ``A' = V_k^T``
(``k`` its cluster) and ``lora_alpha = r``, so PEFT's scale is 1 and the delta is exactly
the reconstruction ``U_k S_i V_k^T``. ``fan_in_fan_out``, ``task_type``, the base model and
``modules_to_save`` tensors are carried over from the original adapter, so PEFT and vLLM
load the folder unchanged.
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

from .artifact import STORAGE_DTYPES, Artifact, current_umask, save_safetensors
from .errors import ArtifactError, OptionError, OutputError
from .io.peft import short

_PREFIX = "base_model.model."
_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f]+$")  # no path separators, NUL or control characters


def to_peft(artifact: Artifact, name: str, *, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT state dict and ``adapter_config.json`` contents of adapter ``name``.

    Only the bases and this adapter's cores are read from disk.
    """
    if dtype not in STORAGE_DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    tdtype = STORAGE_DTYPES[dtype]
    i = artifact.index(name)
    meta = artifact.meta["adapters"][i]
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for mod in artifact.modules:
        m = mod["name"]
        if m not in meta["ranks"]:
            continue  # the original adapter did not adapt this module: its delta is zero
        U, V, cores, assign = artifact.module_factors(m, [i])
        k = int(assign[0])
        Uk, Vk, S = U[k].double(), V[k].double(), cores[0].double()
        Bp = Uk * S if S.dim() == 1 else Uk @ S  # (d_out, r)
        Ap = Vk.T  # (r, d_in)
        finfo = torch.finfo(tdtype)
        if not (Bp.abs().max() <= finfo.max and Ap.abs().max() <= finfo.max):  # also False for NaN
            raise ArtifactError(
                f"{artifact.path or 'artifact'}: adapter {short(name)}, module {short(m)}: "
                f"the exported factors overflow {dtype} (damaged or hostile artifact)"
            )
        if mod.get("layout", "linear") == "embedding":
            state[f"{_PREFIX}{m}.lora_embedding_A"] = Bp.T.to(tdtype).contiguous()
            state[f"{_PREFIX}{m}.lora_embedding_B"] = Ap.T.to(tdtype).contiguous()
        else:
            state[f"{_PREFIX}{m}.lora_A.weight"] = Ap.to(tdtype).contiguous()
            state[f"{_PREFIX}{m}.lora_B.weight"] = Bp.to(tdtype).contiguous()
        ranks[m] = mod["rank"]
    prefix = f"extras/{i}/"
    kept = [k for k in meta.get("extras", []) if prefix + k in artifact._key_set()]
    for key in kept:
        state[key] = artifact.get(prefix + key)

    orig = meta.get("config", {})
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else artifact.meta.get("rank", 1)
    pattern = {re.escape(m): rr for m, rr in ranks.items() if rr != r}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": artifact.meta.get("base_model") or orig.get("base_model_name_or_path"),
        "revision": orig.get("revision"),
        # PEFT's classification task types add their head to modules_to_save on load; if the
        # heads were not stored (--no-extras), export a plain LoRA so PEFT does not look for them.
        "task_type": None if meta.get("extras") and not kept else orig.get("task_type"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(orig.get("fan_in_fan_out", False)),
        "modules_to_save": orig.get("modules_to_save") if kept else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return state, config


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
    under its final name is always complete. Returns the folders written.
    """
    names = list(dict.fromkeys(artifact.names if names is None else names))  # each adapter once
    for name in names:
        artifact.index(name)
        _check_name(name)
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create folder ({exc.strerror})") from None
    written = []
    for name in names:
        final = out / name
        if final.is_symlink() or final.resolve().parent != out.resolve():
            raise OutputError(f"{final}: is a symbolic link or leads outside {out}; refusing to replace it")
        if final.exists() and not overwrite:
            raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
        state, config = to_peft(artifact, name, dtype=dtype)
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
        written.append(final)
    return written
