"""Built rows held in unnamed temporary files instead of memory (large default-mode runs).

A run with per-adapter parts builds an artifact about as large as what it stores: at 1000
Lots-of-LoRAs-shaped adapters and mean error 0.03, 9.4 GB of residual codes (one byte a number
until the file packs them). Held in memory they set the run's peak and make a collection a few
times larger impossible to compress on the same machine. When a build's rows exceed what the run
may hold (``memory_limit``, else a quarter of the memory available when the build starts), each
module's rows are written, as built, to an unnamed temporary file (``tempfile.TemporaryFile`` in
``TMPDIR``: removed by the system when the last tensor mapping it is gone, even if the process
dies) and mapped back copy-on-write: the same values in tensors every reader uses as before, whose
pages the kernel reads back when needed and drops under pressure. The allocator's step curves,
which only a re-aim reads again, go to such files too (:meth:`StepCurves.hold_in
<lorazip.compress.allocate.StepCurves.hold_in>`). The artifact's file, its statistics and every
digest are the same as from rows held in memory.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np
import torch

from ..errors import OutputError


class Spill:
    """Writes tensors to unnamed temporary files in ``directory`` (None: ``tempfile.gettempdir()``)
    and gives them back file-backed; ``bytes`` counts what it holds this way."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.bytes = 0
        self._held: dict[int, weakref.ref] = {}  # by id (a tensor's == compares values)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a tensor this spill gave back (already file-backed)."""
        ref = self._held.get(id(t))
        return ref is not None and ref() is t

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in a file-backed CPU tensor (the same dtype and shape; empty tensors as
        they are)."""
        if t.numel() == 0 or self.holds(t):
            return t
        src = t.detach().cpu().contiguous()
        odd = src.dtype == torch.bfloat16  # numpy has no bfloat16: its bytes as int16, viewed back below
        out = torch.from_numpy(self.hold_array((src.view(torch.int16) if odd else src).numpy()))
        out = out.view(torch.bfloat16) if odd else out
        key = id(out)
        self._held[key] = weakref.ref(out, lambda _, key=key, held=self._held: held.pop(key, None))
        return out

    def hold_array(self, arr: np.ndarray) -> np.ndarray:
        """``arr``'s values in a file-backed (copy-on-write) array of the same dtype and shape."""
        if arr.size == 0:
            return arr
        arr = np.ascontiguousarray(arr)
        where = self.directory or tempfile.gettempdir()
        try:
            with tempfile.TemporaryFile(dir=where, prefix="lorazip-rows-") as f:
                f.write(memoryview(arr.reshape(-1)).cast("B"))
                f.flush()
                mapped = np.memmap(f, dtype=arr.dtype, mode="c", shape=arr.shape)  # the mapping keeps the file
        except OSError as exc:
            raise OutputError(f"{where}: cannot hold {arr.nbytes:,} bytes of built rows there ({exc.strerror or exc}); "
                              "set TMPDIR to a directory with more room, or raise the memory limit") from exc
        self.bytes += arr.nbytes
        return mapped


_IN_MEMORY_FS = ("tmpfs", "ramfs")  # files there are memory themselves: spilling to them frees nothing


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (Linux: the longest mount point in /proc/mounts
    that contains it); None where that cannot be told."""
    try:
        with open("/proc/mounts") as f:
            mounts = [parts[1:3] for parts in map(str.split, f) if len(parts) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for point, fs in mounts:
        point = point.replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs
    return kind


def spill_for(nbytes: int, memory_limit: int | None, directory: str | None = None) -> Spill | None:
    """A :class:`Spill` to ``directory`` (None: ``tempfile.gettempdir()``, i.e. ``TMPDIR``) for a build
    whose rows take ``nbytes`` in memory, when they exceed ``memory_limit`` (else a quarter of the
    memory available now); None to hold them in memory: also where the system does not say how much
    is available, cannot map files this way, or the directory is itself in memory (tmpfs)."""
    from .build import keep_limit

    limit = memory_limit if memory_limit is not None else keep_limit()
    if os.name != "posix" or not limit or nbytes <= limit:
        return None
    where = directory or tempfile.gettempdir()
    if filesystem_type(where) in _IN_MEMORY_FS:
        return None
    return Spill(directory)
