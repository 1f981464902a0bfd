"""Compressing modules larger than memory: which modules stream, and chunked reads.

Every solver pass is a sum over adapters (:class:`~lorazip.solvers.factors.Factors`), so a
module whose factors do not fit a memory limit is read from disk a chunk of adapters at a time
on every pass. :class:`MemoryPlan` decides, per module, from the limit.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import OptionError
from ..io.collection import Collection
from ..solvers.factors import Factors

_IN_MEMORY_FACTOR = 3  # a module solved in memory: its factors, a transposed copy, float64 error chunks
_STREAM_FACTOR = 4  # a streamed chunk: the chunk, its transposed copy, its float64 copy in the error pass


@dataclass
class MemoryPlan:
    """Which modules are solved in memory and which stream from disk in chunks of adapters.

    Under ``limit`` (bytes for module factors and their working copies), a module whose factors
    need more than ``limit / 3`` is streamed: every solver pass reads it again, ``chunk[j]``
    adapters at a time, so memory no longer grows with the number of adapters.
    """

    limit: int | None
    module_bytes: list[int]
    chunk: dict[int, int]

    @classmethod
    def make(cls, collection: Collection, itemsize: int, limit: int | None, method: str) -> "MemoryPlan":
        n = len(collection)
        sizes = [n * collection.max_rank(m.name) * (m.d_in + m.d_out) * itemsize for m in collection.modules]
        chunk: dict[int, int] = {}
        if limit is None:
            return cls(None, sizes, chunk)
        if limit <= 0:
            raise OptionError(f"memory limit must be positive, got {limit} bytes")
        for j, size in enumerate(sizes):
            if _IN_MEMORY_FACTOR * size <= limit:
                continue
            name = collection.modules[j].name
            if method in ("svd", "jd-clustered"):
                raise OptionError(
                    f"{method} keeps a module's factors in memory: module {name} needs "
                    f"{_IN_MEMORY_FACTOR * size / 2**20:.0f} MiB and the memory limit is {limit / 2**20:.0f} MiB; "
                    "raise the limit or use jd-full or jd-diag, which stream a module in chunks"
                )
            per_adapter = _STREAM_FACTOR * (size // n)
            if per_adapter > limit:
                raise OptionError(
                    f"memory limit {limit / 2**20:.1f} MiB is below what one adapter of module {name} needs "
                    f"({per_adapter / 2**20:.1f} MiB)"
                )
            chunk[j] = limit // per_adapter
        return cls(limit, sizes, chunk)

    def prefetch(self, j: int) -> bool:
        """Whether module ``j + 1`` may be read while ``j`` is solved."""
        if j + 1 >= len(self.module_bytes) or j + 1 in self.chunk:
            return False
        return self.limit is None or _IN_MEMORY_FACTOR * self.module_bytes[j] + self.module_bytes[j + 1] <= self.limit

    def cache_bytes(self, default: int) -> int:
        return default if self.limit is None else min(default, self.limit // 2)


def streamed_factors(
    collection: Collection, name: str, chunk: int, dtype: torch.dtype, device: torch.device | str = "cpu",
    to: Callable | None = None,
) -> Factors:
    """Module ``name`` as :class:`Factors` read ``chunk`` adapters at a time on every pass, zero-padded
    to the module's largest rank, on ``device`` (then converted by ``to``, e.g. to NumPy).

    The first read of a chunk reads both factors and checks their values; later passes read only
    the factor they use, unchecked. The other factor of a first read is held until asked for
    (at most one chunk's worth).
    """
    to = to or (lambda t: t)
    width = collection.max_rank(name)
    info = collection.module(name)
    checked: set[int] = set()
    held: dict[tuple[int, str], torch.Tensor] = {}

    def read(start: int, stop: int, part: str):
        if (start, part) in held:
            return held.pop((start, part))
        if start in checked:
            return to(collection.module_factor(name, range(start, stop), part, dtype, width).to(device))
        f = collection.module_factors(name, range(start, stop), dtype, width=width)
        checked.add(start)
        held.clear()
        other = "A" if part == "B" else "B"
        held[(start, other)] = to((f.A if other == "A" else f.B).to(device))
        return to((f.B if part == "B" else f.A).to(device))

    like = to(torch.empty(0, dtype=dtype, device=device))
    return Factors.from_reader(len(collection), info.d_out, info.d_in, width, read, chunk, like=like)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the last module back to the OS (glibc ``malloc_trim``), so the
    resident size follows the working set instead of the largest module seen; a no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
