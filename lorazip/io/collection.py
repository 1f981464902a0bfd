"""A collection of LoRA adapters on one base model, read module by module.

``load_collection`` resolves sources (a folder of adapter folders, one adapter folder,
or a list of them) into :class:`Adapter` descriptions, validates that they form one
collection (one base model, one shape per module) *before* any tensor is read, and
returns a :class:`Collection`. Tensors stay on disk until :meth:`Collection.module_factors`
reads the factors of one module for all adapters, so memory follows one module, not
the whole collection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import AdapterFormatError, SourceError, ValidationError
from .base_models import canonical_base_model
from .files import find_adapter_dirs, resolve_sources  # noqa: F401 (find_adapter_dirs: imported from here too)
from .peft import Adapter, load_adapter


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module of the base model: name, matrix shape ``(d_out, d_in)``, layout.

    ``name`` is the module's key in the collection and the artifact. It is the model's module path
    unless adapters disagree on the module's shape (classifier heads with different label counts, a
    resized embedding): each shape is then its own *shape group*, keyed ``<path>@<d_out>x<d_in>``,
    with its own bases, and ``target`` holds the model's module path.
    """

    name: str
    d_out: int
    d_in: int
    layout: str = "linear"
    target: str | None = None

    @property
    def path(self) -> str:
        """The model's module path (``name`` unless the module is split by shape)."""
        return self.target or self.name

    def entry(self) -> dict:
        """The artifact metadata that says which module this is (``target`` only for shape groups)."""
        out = {"name": self.name, "d_out": self.d_out, "d_in": self.d_in, "layout": self.layout}
        if self.target is not None:
            out["target"] = self.target
        return out


_HUGE = 32 << 20  # bytes from which a stacked module is mapped on transparent huge pages where the system offers them


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; float32/64 ones allocated by NumPy (no torch operator). A large
    one is an anonymous mapping advised onto transparent huge pages (Linux ``madvise`` mode): its
    first writes fault a 2 MiB page at a time instead of a 4 KiB one, which was most of the time of
    reading a bfloat16 module of 1000 adapters into float32 (the page cache holds its bytes)."""
    if dtype in (torch.float32, torch.float64):
        import numpy as np

        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if nbytes >= _HUGE:
            huge = _huge_pages(nbytes)
            if huge is not None:
                return torch.from_numpy(np.frombuffer(huge, dtype=np_dtype).reshape(shape))
        return torch.from_numpy(np.empty(shape, dtype=np_dtype))
    return torch.empty(shape, dtype=dtype)


def _huge_pages(nbytes: int):
    """A private anonymous mapping of ``nbytes`` advised onto huge pages (freed with the last array
    on it), or None where the platform has no such advice."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):
        return None
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # advice refused (huge pages off): an ordinary mapping still serves
        pass
    return mm


@dataclass
class ModuleFactors:
    """Factors of one module for all adapters, zero-padded to the largest rank.

    ``B``: (n, d_out, r_max) with the scale folded in; ``A``: (n, r_max, d_in);
    ``ranks``: (n,) original ranks (0 where an adapter lacks the module).
    ``M_i = B[i] @ A[i]`` exactly; padding adds zero columns/rows only.
    """

    module: ModuleInfo
    B: torch.Tensor
    A: torch.Tensor
    ranks: torch.Tensor

    def norms2(self) -> torch.Tensor:
        """``||M_i||_F^2`` from r x r Grams: ``tr((B^T B)(A A^T))``, shape (n,)."""
        from ..solvers.linalg import factor_norms2

        return factor_norms2(self.B, self.A).clamp_min(0)


class Collection:
    """Adapters of one base model, with lazy per-module access to their factors.

    Attributes
    ----------
    adapters : list[Adapter]
        In collection order; ``names`` gives their names.
    modules : list[ModuleInfo]
        Union of the adapted modules, sorted by name.
    base_model : str | None
    """

    def __init__(self, adapters: list[Adapter], base_model: str | None = None):
        if not adapters:
            raise SourceError("no adapters given")
        self.adapters = adapters
        self.base_model = base_model if base_model is not None else _common_base(adapters)
        self.modules = _module_union(adapters)
        self._index = {m.name: m for m in self.modules}

    def align(self, known: Sequence[ModuleInfo] | Sequence[dict]) -> None:
        """Key the modules as ``known`` (an artifact's modules, as :class:`ModuleInfo` or its metadata's
        module dicts) does: an adapter whose module has the shape of a known group joins it; a new
        shape of a known module starts its own group."""
        known = [ModuleInfo(m["name"], m["d_out"], m["d_in"], m.get("layout", "linear"), m.get("target"))
                 if isinstance(m, dict) else m for m in known]
        self.modules = _module_union(self.adapters, known)
        self._index = {m.name: m for m in self.modules}

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def __len__(self) -> int:
        return len(self.adapters)

    def module(self, name: str) -> ModuleInfo:
        return self._index[name]

    def missing_modules(self) -> dict[str, list[str]]:
        """Adapter name -> module paths of the collection it does not adapt (zero delta there);
        a module the adapter adapts in another shape group is not missing."""
        paths = sorted({m.path for m in self.modules})
        out = {}
        for a in self.adapters:
            have = {s.name for s in a.modules.values()}
            miss = [p for p in paths if p not in have]
            if miss:
                out[a.name] = miss
        return out

    def split_modules(self) -> dict[str, list[ModuleInfo]]:
        """Module path -> its shape groups, for the modules whose adapters differ in shape."""
        out: dict[str, list[ModuleInfo]] = {}
        for m in self.modules:
            if m.target is not None:
                out.setdefault(m.target, []).append(m)
        return out

    def extras(self) -> dict[str, list[str]]:
        """Adapter name -> non-LoRA tensors (e.g. ``modules_to_save`` heads), not compressed."""
        return {a.name: a.extras for a in self.adapters if a.extras}

    def storage_dtype(self) -> str:
        """The widest floating dtype of the adapters' LoRA tensors: float16, bfloat16 or float32."""
        kinds = {k for a in self.adapters for k in a.dtype.split("/")}
        if kinds == {"F16"}:
            return "float16"
        if kinds == {"BF16"}:
            return "bfloat16"
        return "float32"

    def shared_ranks(self, name: str, rank: int) -> tuple[int, int]:
        """``(r_out, r_in)`` of a shared basis pair for a requested ``rank``: each side at most
        ``min(rank, its dimension, sum of adapter ranks)``; square unless ``rank`` exceeds the
        module's small side, which is then kept whole (exact; see :mod:`lorazip.solvers.one_side`)."""
        info = self._index[name]
        total = sum(a.modules[name].rank for a in self.adapters if name in a.modules)
        r = max(min(rank, total), 1)
        small = min(info.d_out, info.d_in)
        if r <= small:
            return r, r
        # the other side spans the stacked updates: rank <= (adapters with the module) x small side
        r = min(r, small * sum(name in a.modules for a in self.adapters))
        return min(r, info.d_out), min(r, info.d_in)

    def max_rank(self, name: str) -> int:
        """The largest rank any adapter has in module ``name``."""
        return max((a.modules[name].rank for a in self.adapters if name in a.modules), default=1)

    def module_factors(
        self, name: str, indices: Iterable[int] | None = None, dtype: torch.dtype = torch.float64,
        width: int | None = None, b_rows: bool = False, checked: bool = True,
    ) -> ModuleFactors:
        """Read the factors of module ``name`` for all adapters (or ``indices``) in ``dtype``,
        zero-padded to the largest rank among them (or to ``width``, if larger). ``b_rows``: ``B``
        (n, d_out, r) is the transpose of an (n, r, d_out) array, so that each ``B_i^T`` is rows of
        one (n r, d_out) matrix, the layout the JD solvers' sums over adapters take (a view then,
        not a copy of the module: :attr:`~lorazip.solvers.factors.Chunk.Bt2`). ``checked=False``: a
        re-read of values checked before (:meth:`~lorazip.io.peft.Adapter.factors`)."""
        info = self._index[name]
        idx = list(range(len(self.adapters))) if indices is None else list(indices)
        ranks = [self.adapters[i].modules[name].rank if name in self.adapters[i].modules else 0 for i in idx]
        r_max = max(max(ranks, default=0), width or 0, 1)
        if b_rows:  # written once; only padding is zeroed
            B = _empty((len(idx), r_max, info.d_out), dtype).transpose(1, 2)
        else:
            B = _empty((len(idx), info.d_out, r_max), dtype)
        A = _empty((len(idx), r_max, info.d_in), dtype)
        # float32/64: the padding zeroed through NumPy (and the factors read by it, Adapter.factors), so a
        # read in a background thread runs no torch operator beside the solver
        Bz, Az = (B.numpy(), A.numpy()) if dtype in (torch.float32, torch.float64) else (B, A)
        for j, i in enumerate(idx):
            if ranks[j] == r_max:  # read straight into place
                self.adapters[i].factors(name, dtype, out=(B[j], A[j]), checked=checked)
                continue
            if ranks[j]:
                self.adapters[i].factors(name, dtype, out=(B[j, :, : ranks[j]], A[j, : ranks[j], :]), checked=checked)
            Bz[j, :, ranks[j] :] = 0
            Az[j, ranks[j] :, :] = 0
        return ModuleFactors(info, B, A, torch.tensor(ranks, dtype=torch.int64))

    def module_factor(
        self, name: str, indices: Iterable[int], part: str, dtype: torch.dtype, width: int
    ) -> torch.Tensor:
        """One factor (``part`` "B" or "A") of module ``name`` for ``indices``, zero-padded to
        rank ``width``, read without value checks (:meth:`module_factors` checks on first read)."""
        info = self._index[name]
        idx = list(indices)
        shape = (len(idx), info.d_out, width) if part == "B" else (len(idx), width, info.d_in)
        out = torch.zeros(shape, dtype=dtype)
        for j, i in enumerate(idx):
            ad = self.adapters[i]
            if name in ad.modules:
                x = ad.factor(name, part, dtype)
                if part == "B":
                    out[j, :, : x.shape[1]] = x
                else:
                    out[j, : x.shape[0], :] = x
        return out


def _common_base(adapters: list[Adapter]) -> str | None:
    """The one base model the adapters' configs name (``None`` if none names one).

    Ids that the Hub treats as one model count as one (``gpt2`` and ``openai-community/gpt2``,
    see :mod:`lorazip.io.base_models`): if every adapter spells it the same way, that spelling
    is kept; if spellings differ, the canonical (organisation-prefixed) id is used.
    """
    bases: dict[str, tuple[str, Adapter]] = {}  # canonical id -> (first spelling, its adapter)
    spellings: set[str] = set()
    for a in adapters:
        if a.base_model:
            name = a.base_model.rstrip("/")
            spellings.add(name)
            bases.setdefault(canonical_base_model(name), (name, a))
    if len(bases) > 1:
        (b0, a0), (b1, a1) = list(bases.values())[:2]
        raise ValidationError(
            f"{a1.path}: base model {b1!r} differs from {b0!r} ({a0.path}); "
            "compress one base model at a time or pass --base-model to override"
        )
    if not bases:
        return None
    return spellings.pop() if len(spellings) == 1 else next(iter(bases))


def shape_key(path: str, d_out: int, d_in: int, layout: str = "linear") -> str:
    """The key of one shape group of module ``path``: ``classifier@3x768`` (``...-embedding`` for an
    embedding of the same shape as a linear layer of that name, which no real model has)."""
    return f"{path}@{d_out}x{d_in}" + ("-embedding" if layout == "embedding" else "")


def _module_union(adapters: list[Adapter], known: Sequence[ModuleInfo] = ()) -> list[ModuleInfo]:
    """The collection's modules, one per (module path, shape); re-keys each adapter's ``modules``.

    A module path whose adapters all share one shape keeps its path as key. Where shapes differ,
    each shape is a group keyed by :func:`shape_key`. ``known`` (an artifact's modules, for
    ``add``) fixes the keys of the groups it already has.
    """
    fixed = {(m.path, m.layout, m.d_out, m.d_in): m for m in known}
    shapes: dict[str, dict[tuple, ModuleInfo]] = {}
    for m in known:
        shapes.setdefault(m.path, {})[(m.layout, m.d_out, m.d_in)] = m
    for a in adapters:
        for spec in a.modules.values():
            shapes.setdefault(spec.name, {}).setdefault((spec.layout, spec.d_out, spec.d_in), None)
    infos: dict[tuple, ModuleInfo] = {}
    for path, groups in shapes.items():
        for (layout, d_out, d_in), have in groups.items():
            if have is None:
                key = path if len(groups) == 1 else shape_key(path, d_out, d_in, layout)
                have = ModuleInfo(key, d_out, d_in, layout, None if key == path else path)
            infos[(path, layout, d_out, d_in)] = fixed.get((path, layout, d_out, d_in), have)
    used: set[str] = set()
    for a in adapters:
        a.modules = {infos[(s.name, s.layout, s.d_out, s.d_in)].name: s for s in a.modules.values()}
        used.update(a.modules)
    return sorted((i for i in infos.values() if i.name in used), key=lambda i: i.name)
def load_collection(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    base_model: str | None = None,
    allow_pickle: bool = False,
) -> Collection:
    """Load adapters from local sources and validate them as one collection.

    Parameters
    ----------
    sources
        A folder of adapter folders, one adapter folder, a Hub download
        (:func:`lorazip.io.hub.download_adapters`), or a list of them.
    base_model
        Override the base model (allows adapters whose configs name different bases).
    allow_pickle
        Load ``adapter_model.bin`` with ``torch.load(weights_only=True)``.

    Raises
    ------
    SourceError, AdapterFormatError, ValidationError
    """
    adapters = []
    for name, path, prov in resolve_sources(sources):
        try:
            adapter = load_adapter(path, name, allow_pickle=allow_pickle)
            adapter.source.update(prov)
            adapters.append(adapter)
        except AdapterFormatError:
            raise
        except OSError as exc:
            raise AdapterFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return Collection(adapters, base_model=base_model)
