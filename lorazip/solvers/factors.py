"""One module's LoRA factors for ``n`` adapters, visited a chunk of adapters at a time.

Every JD solver step is a sum over adapters, so the solvers are written as reductions over
chunks. In memory, one chunk holds every adapter (and its derived layouts are kept between
passes); under a memory limit (:func:`lorazip.compress` with ``memory_limit``), each pass
reads the chunks again, so memory is bounded by one chunk whatever ``n`` is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from ..backend import mT, namespace

Reader = Callable[[int, int, str], Any]


CHUNK_BYTES = 8 << 20  # float64 factors per chunk of adapters: 8 adapters at Lots-of-LoRAs shapes (4096 + 4096, rank 16)


def float64_chunk(d_out: int, d_in: int, rank: int, least: int = 8) -> int:
    """Adapters per chunk where a module's factors are converted to float64 a few adapters at a time
    (kept in cache): as many as :data:`CHUNK_BYTES` hold, at least ``least`` (8 at Lots-of-LoRAs
    shapes: pass 1's products of 1000 adapters' q and k modules 10-30% faster than 16; the builds ask
    for at least 16, where 8 measured the same; every adapter of a small module, whose chunks were a
    loop of small operators: the bundled collection's 27 in one chunk, not two). Every part computed
    per chunk is per adapter, so the chunk changes values only in their last bits: a product over the
    chunk (``A V``: one matrix product of its ``chunk * rank`` rows) may round differently with the
    chunk's size (measured: 1024 x 4096 at rank 8, chunks of 4 against 8 or more), and so may a batched
    product of one or two adapters (the last chunk of a module). The chunks are fixed by the shapes, so
    a run is deterministic."""
    return max(least, CHUNK_BYTES // (8 * max(rank, 1) * (d_out + d_in)))


class Chunk:
    """Factors of adapters ``start .. start + size``: ``B`` (size, d_out, rank), ``A`` (size, rank, d_in).

    ``A2`` and ``Bt2`` are the same numbers as ``(size rank, d)`` matrices (row ``i rank + k`` is
    ``A_i[k]`` or ``B_i[:, k]``), the layout in which a sum over adapters is one matrix product.
    A streamed chunk reads ``A`` or ``B`` on first use, so a pass that needs one factor reads one.
    """

    __slots__ = ("start", "size", "rank", "_B", "_A", "_Bt2", "_load", "_GB", "_GA")

    def __init__(self, start: int, B=None, A=None, *, size: int = 0, rank: int = 0,
                 load: Callable[[str], Any] | None = None):
        self.start, self._B, self._A, self._Bt2, self._load = start, B, A, None, load
        self._GB = self._GA = None
        self.size = B.shape[0] if B is not None else size
        self.rank = B.shape[2] if B is not None else rank

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def B(self):
        if self._B is None:
            self._B = self._load("B")
        return self._B

    @property
    def A(self):
        if self._A is None:
            self._A = self._load("A")
        return self._A

    @property
    def A2(self):
        return namespace(self.A).reshape(self.A, (self.size * self.rank, self.A.shape[2]))

    @property
    def Bt2(self):
        if self._Bt2 is None:  # one transposed copy per chunk, kept while the chunk lives
            xp, d_out = namespace(self.B), self.B.shape[1]
            self._Bt2 = xp.reshape(mT(self.B), (self.size * self.rank, d_out))
            if self._load is not None:  # a chunk read from disk: B becomes a view of the copy
                self._B = mT(xp.reshape(self._Bt2, (self.size, self.rank, d_out)))
        return self._Bt2

    @property
    def GB(self):
        """``B_i^T B_i`` (size, rank, rank), computed once per chunk (norms, the solver's start and
        the error pass all take it)."""
        if self._GB is None:
            Bt = namespace(self.Bt2).reshape(self.Bt2, (self.size, self.rank, self.Bt2.shape[1]))
            self._GB = Bt @ mT(Bt)
        return self._GB

    @property
    def GA(self):
        """``A_i A_i^T`` (size, rank, rank), computed once per chunk."""
        if self._GA is None:
            self._GA = self.A @ mT(self.A)
        return self._GA


class Factors:
    """The factors of one module for ``n`` adapters; iterate to visit them chunk by chunk.

    Build with :meth:`stacked` (arrays in memory, one chunk) or :meth:`from_reader`
    (``read(start, stop, part)`` called on every pass, ``chunk`` adapters at a time).
    """

    def __init__(self, n: int, d_out: int, d_in: int, *, read: Reader | None = None, chunk: int = 0,
                 rank: int = 0, stacked: Chunk | None = None, like=None):
        self.n, self.d_out, self.d_in, self.rank = n, d_out, d_in, rank
        self._read, self.chunk, self._stacked = read, chunk, stacked
        self.like = stacked.B if stacked is not None else like  # fixes backend, device and dtype

    @classmethod
    def stacked(cls, B, A) -> "Factors":
        """All adapters in memory: ``B`` (n, d_out, r), ``A`` (n, r, d_in)."""
        n, d_out, r = B.shape
        return cls(n, d_out, A.shape[2], chunk=n, rank=r, stacked=Chunk(0, B, A))

    @classmethod
    def from_reader(cls, n: int, d_out: int, d_in: int, rank: int, read: Reader, chunk: int, like) -> "Factors":
        """Adapters read ``chunk`` at a time on every pass: ``read(start, stop, part)`` returns ``B``
        (stop - start, d_out, rank) for part ``"B"`` and ``A`` (stop - start, rank, d_in) for ``"A"``;
        ``like`` is an array of the dtype and device it returns."""
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        return cls(n, d_out, d_in, read=read, chunk=chunk, rank=rank, like=like)

    @property
    def B(self):
        """All adapters' ``B`` (n, d_out, r) of factors held in memory."""
        return self._held().B

    @property
    def A(self):
        """All adapters' ``A`` (n, r, d_in) of factors held in memory."""
        return self._held().A

    def _held(self) -> Chunk:
        if self._stacked is None:
            raise ValueError("streamed factors are read a chunk at a time: iterate over them")
        return self._stacked

    @property
    def in_memory(self) -> bool:
        return self._stacked is not None

    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk, without reading it."""
        return [(s, min(self.n, s + self.chunk)) for s in range(0, self.n, self.chunk)]

    def __iter__(self) -> Iterator[Chunk]:
        if self._stacked is not None:
            yield self._stacked
            return
        for s, e in self.spans():
            yield Chunk(s, size=e - s, rank=self.rank, load=lambda part, s=s, e=e: self._read(s, e, part))

    def converted(self, to: Callable[[Any], Any]) -> "Factors":
        """The same factors with every array passed through ``to`` (e.g. to another backend)."""
        if self._stacked is not None:
            return Factors.stacked(to(self._stacked.B), to(self._stacked.A))
        return Factors.from_reader(self.n, self.d_out, self.d_in, self.rank,
                                   lambda s, e, part: to(self._read(s, e, part)), self.chunk, to(self.like))

    def split(self, size: int) -> Iterator[Chunk]:
        """Visit the adapters in chunks of at most ``size`` (views when in memory)."""
        for ch in self:
            if ch.size <= size:
                yield ch
                continue
            for s in range(0, ch.size, size):
                yield Chunk(ch.start + s, ch.B[s : s + size], ch.A[s : s + size])
