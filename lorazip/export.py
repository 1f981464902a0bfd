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

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifact import STORAGE_DTYPES, Artifact, save_safetensors
from .export_core import check_dtype, export_folders, peft_config, peft_parts


def _dtype(dtype: str) -> torch.dtype:
    check_dtype(dtype)
    return STORAGE_DTYPES[dtype]


class _TorchSource:
    """What :func:`lorazip.export_core.peft_parts` computes with: the artifact's readers (bases,
    cores and residual rows; int8 dequantised) and torch arithmetic; folders saved with
    :func:`lorazip.artifact.save_safetensors`."""

    maximum, cat = staticmethod(torch.maximum), staticmethod(torch.cat)

    def __init__(self, artifact: Artifact):
        self.artifact, self.path = artifact, artifact.path
        self.module_factors, self.module_residuals = artifact.module_factors, artifact.module_residuals

    def __enter__(self) -> "_TorchSource":
        self._reading = self.artifact.reader()  # the artifact file kept open for all the reads
        self._reading.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._reading.__exit__(*exc)

    def extra(self, key: str, orig: str | None) -> torch.Tensor | None:
        if key not in self.artifact._key_set():
            return None
        t = self.artifact.get(key)  # int8 extras: dequantised
        return t.to(getattr(torch, orig)) if orig else t

    @staticmethod
    def f64(x: torch.Tensor) -> torch.Tensor:
        return x.double()

    @staticmethod
    def absmax(x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(dim=(1, 2))

    @staticmethod
    def zeros(shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64)

    @staticmethod
    def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
        return x.to(STORAGE_DTYPES[dtype]).contiguous()

    @staticmethod
    def save(state: dict[str, torch.Tensor], tmp: Path, final: Path) -> None:
        save_safetensors(state, tmp, {"format": "pt"}, final)


def _peft_parts(
    artifact: Artifact, rows: list[int], dtype: str
) -> list[tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """LoRA tensors and per-module ranks of the adapters ``rows`` (:func:`lorazip.export_core.peft_parts`),
    with the artifact file kept open."""
    _dtype(dtype)
    with _TorchSource(artifact) as src:
        return peft_parts(src, artifact.meta, rows, dtype)


def to_peft(artifact: Artifact, name: str, *, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT state dict and ``adapter_config.json`` contents of adapter ``name``.

    Only the bases, this adapter's cores and its residual rows are read from disk. Module ``m``
    becomes a LoRA of rank ``r_m + k_i`` (``rank_pattern`` / ``alpha_pattern`` where it differs
    from the most common rank) with ``lora_alpha`` equal to its rank, so PEFT's scale is 1.
    """
    _dtype(dtype)
    i = artifact.index(name)
    ((state, ranks),) = _peft_parts(artifact, [i], dtype)
    return state, peft_config(artifact.meta, i, state, ranks)


def export(
    artifact: Artifact,
    outdir: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    memory_limit: int | None = None,
    empty: list[str] | None = None,
) -> list[Path]:
    """Write adapters as PEFT folders ``outdir/<name>/`` (all adapters when ``names`` is None).

    Each folder is written to a temporary folder and renamed into place, so a folder
    under its final name is always complete. Returns the folders written. Output folders are
    checked before anything is computed; the artifact is opened once, and each module's bases
    are read once for all the adapters (up to about 256 MiB of exported tensors at a time, or half of
    ``memory_limit`` bytes).
    ``lorazip export`` writes the same bytes without torch (:func:`lorazip.export_core.export_numpy`).
    An adapter stored at nothing in every module (a budget may leave one so) is written as a zero LoRA of
    rank 1 on its first module, which PEFT and vLLM load and which computes the base model; ``empty``
    (a list) is filled with their names.
    """
    return export_folders(artifact, outdir, names, dtype=dtype, overwrite=overwrite,
                          source=lambda rows: _TorchSource(artifact), memory_limit=memory_limit, empty=empty)
