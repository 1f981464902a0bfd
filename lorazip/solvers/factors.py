"""One module's LoRA factors for ``n`` adapters, visited a chunk of adapters at a time.

Every JD solver step is a sum over adapters, so the solvers are written as reductions over
chunks. In memory, one chunk holds every adapter (and its derived layouts are kept between
passes); under a memory limit (:func:`lorazip.compress` with ``memory_limit``), each pass
reads the chunks again, so memory is bounded by one chunk whatever ``n`` is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from ..backend import mT, namespace

Reader = Callable[[int, int], tuple[Any, Any]]


class Chunk:
    """Factors of adapters ``start .. start + c``: ``B`` (c, d_out, r), ``A`` (c, r, d_in).

    ``A2`` and ``Bt2`` are the same numbers as ``(c r, d)`` matrices (row ``i r + k`` is
    ``A_i[k]`` or ``B_i[:, k]``), the layout in which a sum over adapters is one matrix product.
    """

    __slots__ = ("start", "B", "A", "_Bt2")

    def __init__(self, start: int, B, A):
        self.start, self.B, self.A = start, B, A
        self._Bt2 = None

    @property
    def stop(self) -> int:
        return self.start + self.B.shape[0]

    @property
    def rank(self) -> int:
        return self.B.shape[2]

    @property
    def A2(self):
        c, r, d_in = self.A.shape
        return namespace(self.A).reshape(self.A, (c * r, d_in))

    @property
    def Bt2(self):
        if self._Bt2 is None:  # one transposed copy per chunk, kept while the chunk lives
            c, d_out, r = self.B.shape
            self._Bt2 = namespace(self.B).reshape(mT(self.B), (c * r, d_out))
        return self._Bt2


class Factors:
    """The factors of one module for ``n`` adapters; iterate to visit them chunk by chunk.

    Build with :meth:`stacked` (arrays in memory, one chunk) or :meth:`from_reader`
    (``read(start, stop) -> (B, A)`` called on every pass, ``chunk`` adapters at a time).
    """

    def __init__(self, n: int, d_out: int, d_in: int, *, read: Reader | None = None, chunk: int = 0,
                 stacked: Chunk | None = None, like=None):
        self.n, self.d_out, self.d_in = n, d_out, d_in
        self._read, self.chunk, self._stacked = read, chunk, stacked
        self.like = stacked.B if stacked is not None else like  # fixes backend, device and dtype

    @classmethod
    def stacked(cls, B, A) -> "Factors":
        """All adapters in memory: ``B`` (n, d_out, r), ``A`` (n, r, d_in)."""
        n, d_out, _ = B.shape
        return cls(n, d_out, A.shape[2], chunk=n, stacked=Chunk(0, B, A))

    @classmethod
    def from_reader(cls, n: int, d_out: int, d_in: int, read: Reader, chunk: int, like) -> "Factors":
        """Adapters read ``chunk`` at a time by ``read(start, stop)`` on every pass; ``like`` is an
        array of the dtype and device that ``read`` returns."""
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        return cls(n, d_out, d_in, read=read, chunk=chunk, like=like)

    @property
    def in_memory(self) -> bool:
        return self._stacked is not None

    def __iter__(self) -> Iterator[Chunk]:
        if self._stacked is not None:
            yield self._stacked
            return
        for s in range(0, self.n, self.chunk):
            B, A = self._read(s, min(self.n, s + self.chunk))
            yield Chunk(s, B, A)

    def split(self, size: int) -> Iterator[Chunk]:
        """Visit the adapters in chunks of at most ``size`` (views when in memory)."""
        for ch in self:
            for s in range(0, ch.B.shape[0], size):
                if s == 0 and ch.B.shape[0] <= size:
                    yield ch
                else:
                    yield Chunk(ch.start + s, ch.B[s : s + size], ch.A[s : s + size])
