"""Serve a compressed collection: one forward pass, a different adapter on every batch row.

With shared bases a request's adapter costs ``x -> V_k^T x`` (shared by every adapter of
cluster ``k``), ``S_a`` (an ``r x r`` core per adapter) and ``U_k`` (shared), instead of a full
``A_a, B_a`` pair per adapter. :class:`BatchedLoraLinear` wraps a base linear layer
(``nn.Linear`` or transformers' GPT-2 ``Conv1D``, whose weight is ``(d_in, d_out)``) and computes

    y = base(x) + U_k (S_a (V_k^T x))

for a batch whose rows use different adapters: one projection per cluster present in the
batch (a single matmul for the whole batch when K = 1), the cores gathered per row into a
``(batch, r, r)`` batched product (an elementwise product for diagonal cores), then ``U_k``.
Format-v2 residual parts add ``b_a (a_a x)`` per row: two batched products over the rows'
zero-padded ``(k, d_in)`` / ``(d_out, k)`` factors, gathered by adapter id (Punica / S-LoRA style).
Adapter id ``-1`` means no adapter (delta 0). Bases and cores are buffers: they follow the
base layer's device and move with ``.to()``.

Typical use with a transformers model::

    import lorazip
    from lorazip.serve import use_adapters, detach

    lorazip.apply(model, "demo.lorazip.safetensors", adapters=["en-art", "de-witze"])
    with use_adapters(model, ["en-art", "de-witze", None]):   # one entry per batch row
        logits = model(input_ids).logits                         # input_ids: (3, seq)
    detach(model)                                                # original modules back

Integer ids are positions in the list of loaded adapters (:func:`adapter_names`); they equal
the artifact's indices when all adapters are loaded. Not thread-safe: the adapter choice is
stored on the model, so serve one batch per model at a time.
"""

from __future__ import annotations

import itertools
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

from .artifact import Artifact, load_artifact, module_path
from .errors import OptionError, ValidationError
from .export_core import PREFIX

__all__ = [
    "apply", "detach", "HeadsNotServed", "use_adapters", "set_adapters", "adapter_names", "is_applied",
    "BatchedLoraLinear", "BatchedLoraEmbedding",
]

_ATTR = "_lorazip_serving"
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
_tokens = itertools.count()

AdapterId = Union[str, int, None]
AdapterIds = Union[AdapterId, Sequence[AdapterId], torch.Tensor]


# -- the adapter choice of one batch ------------------------------------------------------------
class _Batch:
    """Adapter ids of one batch: validated host copy, per-device copies, a token for caches.

    Ids are stored as gather indices: adapter ``a`` -> ``a``, no adapter (-1) -> ``n``, the
    all-zero core row every layer appends, so a plain ``index_select`` serves all rows.
    """

    __slots__ = ("ids", "broadcast", "active", "one", "token", "_dev")

    def __init__(self, ids: torch.Tensor, n: int, broadcast: bool, device_ids: torch.Tensor | None = None):
        self.ids = torch.where(ids < 0, n, ids)  # (L,) int64 on CPU; L = 1 when broadcast
        self.broadcast = broadcast
        self.active = bool((ids >= 0).any())
        # the adapter of every row when they all use the same one (its core can be folded), else None
        self.one = int(ids[0]) if len(ids) and int(ids[0]) >= 0 and bool((ids == ids[0]).all()) else None
        self.token = next(_tokens)
        self._dev: dict[torch.device, torch.Tensor] = {}
        if device_ids is not None:
            self._dev[device_ids.device] = torch.where(device_ids < 0, n, device_ids)

    def rows(self, batch: int, where: str) -> torch.Tensor:
        """Host gather indices for a batch of ``batch`` rows."""
        if self.broadcast:
            return self.ids.expand(batch)
        if self.ids.shape[0] != batch:
            raise OptionError(
                f"{where}: {self.ids.shape[0]} adapter ids were given for a batch of {batch} rows "
                "(give one id per row, or a single name/index for the whole batch)"
            )
        return self.ids

    def on(self, device: torch.device, batch: int) -> torch.Tensor:
        """Gather indices on ``device`` (copied once per batch and device)."""
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = self.ids.to(device, non_blocking=True)
        return t.expand(batch) if self.broadcast else t


def _resolve(ids: AdapterIds, names: Sequence[str] | None, n: int,
             all_names: dict[str, str] | Sequence[str] | None = None) -> _Batch | None:
    """Names / indices / None / -1 (or an integer tensor) -> a validated :class:`_Batch`.

    ``names`` are the loaded adapters (None for a bare layer: indices only), ``n`` their number.
    """
    if ids is None:
        return None
    device_ids = None
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise OptionError(f"adapter ids must be an integer tensor, got {ids.dtype}")
        broadcast = ids.dim() == 0
        if ids.dim() > 1:
            raise OptionError(f"adapter ids must have shape (batch,), got {tuple(ids.shape)}")
        flat = ids.reshape(-1).long()
        if flat.device.type != "cpu":
            device_ids = flat
        host = flat.detach().cpu()
    else:
        broadcast = isinstance(ids, (str, int))
        seq = [ids] if broadcast else list(ids)
        index = {name: i for i, name in enumerate(names or [])}
        out = []
        for v in seq:
            if v is None:
                out.append(-1)
            elif isinstance(v, str):
                if names is None:
                    raise OptionError(f"adapter {v!r}: names need lorazip.apply; pass indices to a bare layer")
                if v not in index:
                    if isinstance(all_names, dict) and all_names.get(v):
                        raise OptionError(f"adapter {v!r} was not loaded: it does not fit this model ({all_names[v]})")
                    if all_names is not None and v in all_names:
                        raise OptionError(
                            f"adapter {v!r} is in the artifact but was not loaded; "
                            "pass it in apply(..., adapters=[...])"
                        )
                    shown = ", ".join(repr(x) for x in names[:8]) + (", ..." if n > 8 else "")
                    raise OptionError(f"unknown adapter {v!r}; loaded adapters: {shown}")
                out.append(index[v])
            elif isinstance(v, int) and not isinstance(v, bool):
                out.append(v)
            elif isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point:
                out.append(int(v))
            else:
                raise OptionError(f"an adapter id must be a name, an integer index or None, got {v!r}")
        host = torch.tensor(out, dtype=torch.long)
    bad = (host < -1) | (host >= n)
    if bool(bad.any()):
        raise OptionError(
            f"adapter index {int(host[bad][0])} out of range: {n} adapters are loaded (use -1 or None for none)"
        )
    return _Batch(host, n, broadcast, device_ids)


class _Serving:
    """What :func:`apply` attached to a model: adapter names, wrapped layers, current batch."""

    def __init__(self, names: list[str], all_names: dict[str, str], source: str):
        self.names = names
        self.all_names = all_names  # every adapter of the artifact -> why it does not fit the model ("" if it does)
        self.source = source
        self.layers: dict[str, tuple[nn.Module, nn.Module]] = {}  # name -> (wrapper, original)
        self.batch: _Batch | None = None


# -- the layers -----------------------------------------------------------------------------------
class _BatchedLora(nn.Module):
    """Shared state of the batched layers: bases, cores (with a zero row for id -1), assignment."""

    layout = "linear"

    def __init__(self, base: nn.Module, U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor,
                 assign: torch.Tensor | None = None, *, name: str = "", dtype: torch.dtype | None = None,
                 residual: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if U.dim() != 3 or V.dim() != 3 or U.shape[0] != V.shape[0]:
            raise OptionError(f"{name or 'layer'}: bases must be (K, d_out, r_out) and (K, d_in, r)")
        K, _, r_out = U.shape
        r = V.shape[2]
        n = cores.shape[0]
        if cores.shape[1:] not in ((r_out, r),) + (((r,),) if r_out == r else ()):
            raise OptionError(f"{name or 'layer'}: cores must be (n, {r_out}, {r}) or (n, {r}), got {tuple(cores.shape)}")
        assign = torch.zeros(n, dtype=torch.long) if assign is None else assign.reshape(-1).long().cpu()
        if assign.shape[0] != n or (n and (int(assign.min()) < 0 or int(assign.max()) >= K)):
            raise OptionError(f"{name or 'layer'}: assignment must be ({n},) with values in [0, {K})")
        self.base = base
        self.name = name
        self.n_adapters, self.n_clusters, self.rank = n, K, r
        self.diagonal = cores.dim() == 2
        ref = _reference_tensor(base)
        dtype = dtype or (ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32)
        device = ref.device if ref is not None else torch.device("cpu")
        zero = torch.zeros((1,) + tuple(cores.shape[1:]), dtype=cores.dtype)
        # Non-persistent buffers: they move with .to() / .half() but do not change the model's state_dict.
        self.register_buffer("U", U.to(device=device, dtype=dtype).contiguous(), persistent=False)
        self.register_buffer("V", V.to(device=device, dtype=dtype).contiguous(), persistent=False)
        # Row n is all zeros: rows without an adapter (id -1, gather index n) get a zero core.
        self.register_buffer("cores", torch.cat([cores.cpu(), zero]).to(device=device, dtype=dtype), persistent=False)
        # Host copy of the assignment (row n = -1: rows without an adapter join no cluster).
        self._assign = torch.cat([assign, torch.tensor([-1])])
        self.shared = r > 0 and r_out > 0  # rank-0 modules (format v2) have no shared part
        # Per-adapter residual parts b_a a_a (format v2), zero-padded to the largest rank k, with a
        # zero row n for id -1; kept in the orientation the layer multiplies in (_residual_buffers).
        self.residual_rank = 0
        res_in = res_out = None
        if residual is not None and residual[0].shape[-1] > 0:
            b, a = residual
            if (b.dim() != 3 or a.dim() != 3 or b.shape[0] != n or a.shape[0] != n or b.shape[2] != a.shape[1]
                    or b.shape[1] != U.shape[1] or a.shape[2] != V.shape[1]):
                raise OptionError(
                    f"{name or 'layer'}: residual parts must be (n, {U.shape[1]}, k) and (n, k, {V.shape[1]}), "
                    f"got {tuple(b.shape)} and {tuple(a.shape)}"
                )
            k = b.shape[2]
            b = torch.cat([b.cpu(), b.new_zeros((1,) + tuple(b.shape[1:])).cpu()])
            a = torch.cat([a.cpu(), a.new_zeros((1,) + tuple(a.shape[1:])).cpu()])
            res_in, res_out = (t.to(device=device, dtype=dtype).contiguous() for t in self._residual_buffers(b, a))
            self.residual_rank = k
        self.register_buffer("res_in", res_in, persistent=False)
        self.register_buffer("res_out", res_out, persistent=False)
        self._serving: _Serving | None = None
        self._groups_key: Any = None
        self._groups: list[tuple[int, torch.Tensor | None]] = []
        self._fold_key: Any = None
        self._fold: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that inspects module.weight (dtype, tying) sees the base's
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def adapter_bytes(self) -> int:
        """Bytes of adapter parameters resident in this layer (bases + cores + residual parts)."""
        parts = (self.U, self.V, self.cores, self.res_in, self.res_out)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def extra_repr(self) -> str:
        kind = "diag" if self.diagonal else "full"
        res = f", residual={self.residual_rank}" if self.residual_rank else ""
        return (f"name={self.name!r}, adapters={self.n_adapters}, clusters={self.n_clusters}, rank={self.rank}, "
                f"cores={kind}{res}")

    # ids of this call: explicit argument, else what use_adapters / set_adapters chose
    def _batch(self, adapter_ids) -> _Batch | None:
        if adapter_ids is not None:
            if isinstance(adapter_ids, _Batch):
                return adapter_ids
            st = self._serving
            return _resolve(adapter_ids, st.names if st else None, self.n_adapters, st.all_names if st else None)
        return self._serving.batch if self._serving is not None else None

    def _cluster_groups(self, batch: _Batch, rows: torch.Tensor, device: torch.device):
        """[(k, row indices on device or None for all rows)] for the clusters present (host-side, no sync)."""
        key = (batch.token, device, rows.shape[0])
        if self._groups_key != key:
            k_rows = self._assign[rows]
            present = [int(k) for k in torch.unique(k_rows) if int(k) >= 0]
            if len(present) == 1:  # rows without an adapter have zero cores: computing them is harmless
                groups = [(present[0], None)]
            else:
                groups = [(k, (k_rows == k).nonzero().flatten().to(device, non_blocking=True)) for k in present]
            self._groups_key, self._groups = key, groups
        return self._groups

    def _folded(self, a: int) -> torch.Tensor:
        """Adapter ``a``'s core times the output basis, (r, d_out): what a batch whose rows all use
        ``a`` multiplies by, in one product instead of a gather, a batched product and the basis
        (cached for the last adapter; rebuilt when the buffers move or change)."""
        key = (a, self.U.data_ptr(), self.cores.data_ptr(), self.U.dtype, self.U._version, self.cores._version)
        if self._fold_key != key:
            S, out = self.cores[a], self._out_basis(0)
            W = S[:, None] * out if self.diagonal else (S.T if self._transpose_core else S) @ out
            self._fold_key, self._fold = key, W.contiguous()
        return self._fold

    def _core_product(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """Row-wise core product: h (b, T, r) times S (b, r, r), or diagonals (b, r) elementwise."""
        if self.diagonal:
            return h * S.unsqueeze(1)
        return torch.bmm(h, S.transpose(1, 2) if self._transpose_core else S)

    # Subclasses: the input-side projection (b', T, r) of cluster k and the output basis (r, d_out).
    _transpose_core = True

    def _project(self, inp: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def _out_basis(self, k: int) -> torch.Tensor:
        raise NotImplementedError

    # Subclasses: residual buffers from b (n+1, d_out, k), a (n+1, k, d_in), and the input side
    # (b', T, k) of the rows' residual parts (gather indices ``idx`` on the device).
    def _residual_buffers(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _residual_project(self, inp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_delta(self, y: torch.Tensor, inp: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """``y`` plus every row's delta; ``inp`` is (b, T, ...) (features or token ids)."""
        b = inp.shape[0]
        host = batch.rows(b, self.name or "layer")
        d_out = y.shape[-1]
        # Accumulate into the base output itself when nothing needs it unchanged (no autograd, same dtype).
        inplace = y.dtype == self.U.dtype and y.is_contiguous() and not (torch.is_grad_enabled() and y.requires_grad)
        acc = y.view(b, -1, d_out) if inplace else None
        groups: list[tuple[int, torch.Tensor | None]] = []
        if self.shared and batch.one is not None and self.n_clusters == 1:  # one adapter for every row: its
            h = self._project(inp, 0)                                         # core folded into the output basis
            W = self._folded(batch.one)
            if acc is None:
                acc = (h.reshape(-1, h.shape[-1]) @ W).view(b, -1, d_out)
            else:
                acc.view(-1, d_out).addmm_(h.reshape(-1, h.shape[-1]), W)
        elif self.shared:
            S = self.cores.index_select(0, batch.on(self.cores.device, b))  # (b, r, r) or (b, r); 0 rows for id -1
            groups = [(0, None)] if self.n_clusters == 1 else self._cluster_groups(batch, host, inp.device)
        for k, rows in groups:
            if rows is None:  # all rows (those without an adapter have zero cores)
                z = self._core_product(self._project(inp, k), S)  # (b, T, r)
                if acc is None:
                    acc = z @ self._out_basis(k)
                else:
                    acc.view(-1, d_out).addmm_(z.reshape(-1, z.shape[-1]), self._out_basis(k))
            else:
                z = self._core_product(self._project(inp.index_select(0, rows), k), S.index_select(0, rows))
                if acc is None:
                    acc = z.new_zeros(b, z.shape[1], d_out)
                acc.index_add_(0, rows, z @ self._out_basis(k))
        if self.res_in is not None:
            # Residual parts, gathered per row (zero-padded to k; row n is zero for id -1), as
            # Punica / S-LoRA serve mixed ranks: y += b_a (a_a x) as two batched products.
            idx = batch.on(self.res_in.device, b)
            h = self._residual_project(inp, idx)  # (b, T, k)
            R = self.res_out.index_select(0, idx)  # (b, k, d_out)
            if acc is None:
                acc = torch.bmm(h, R)
            elif inplace:
                acc.baddbmm_(h, R)
            else:
                acc = acc + torch.bmm(h, R)
        if inplace or acc is None:
            return y
        return y + acc.reshape(y.shape).to(y.dtype)


class BatchedLoraLinear(_BatchedLora):
    """``y = base(x) + U_k S_a V_k^T x`` with adapter ``a`` (cluster ``k``) chosen per batch row.

    Parameters
    ----------
    base : ``nn.Linear`` (weight ``(d_out, d_in)``) or transformers ``Conv1D`` (weight ``(d_in, d_out)``).
    U, V : ``(K, d_out, r)`` and ``(K, d_in, r)`` bases.
    cores : ``(n, r, r)`` full or ``(n, r)`` diagonal cores.
    assign : ``(n,)`` cluster of each adapter (all 0 when omitted).
    dtype : dtype of the stored bases/cores and of the adapter computation (default: the base's).

    ``forward(x, adapter_ids=None)``: ``x`` is ``(batch, ..., d_in)``; ``adapter_ids`` is ``(batch,)``
    (indices, ``-1`` = none), broadcast over the other dimensions; without it, the ids chosen with
    :func:`use_adapters` / :func:`set_adapters` are used (none: the base layer alone).

    Cost per batch: one ``(b T, d_in) x (d_in, r)`` matmul per cluster present, a ``(b, r, r)``
    batched product, one ``(b T, r) x (r, d_out)`` matmul per cluster accumulated into the base output.
    """

    def __init__(self, base: nn.Module, U, V, cores, assign=None, *, name: str = "", dtype=None, residual=None):
        d_out, d_in = linear_shape(base, name)
        if U.shape[1] != d_out or V.shape[1] != d_in:
            raise ValidationError(
                f"{name or 'layer'}: the model's layer is {d_out} x {d_in} (d_out x d_in) but the adapters are "
                f"{U.shape[1]} x {V.shape[1]}"
            )
        super().__init__(base, U, V, cores, assign, name=name, dtype=dtype, residual=residual)
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x: torch.Tensor, adapter_ids: AdapterIds | None = None) -> torch.Tensor:
        y = self.base(x)
        batch = self._batch(adapter_ids)
        if batch is None or not batch.active:
            return y
        if x.dim() < 2:
            raise OptionError(f"{self.name or 'layer'}: input must be (batch, ..., d_in), got {tuple(x.shape)}")
        return self._add_delta(y, x.reshape(x.shape[0], -1, x.shape[-1]).to(self.U.dtype), batch)

    def _project(self, inp: torch.Tensor, k: int) -> torch.Tensor:
        b, T, d_in = inp.shape  # one (b T, d_in) x (d_in, r) matmul over all rows and tokens
        return torch.mm(inp.reshape(b * T, d_in), self.V[k]).view(b, T, -1)

    def _out_basis(self, k: int) -> torch.Tensor:
        return self.U[k].T

    def _residual_buffers(self, b, a):
        return a.transpose(1, 2), b.transpose(1, 2)  # a^T (n+1, d_in, k), b^T (n+1, k, d_out)

    def _residual_project(self, inp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.bmm(inp, self.res_in.index_select(0, idx))  # (b, T, d_in) x (b, d_in, k)


class BatchedLoraEmbedding(_BatchedLora):
    """Embedding counterpart (artifact layout ``embedding``): table row ``t`` gets ``U_k[t] S_a V_k^T``."""

    layout = "embedding"
    _transpose_core = False

    def __init__(self, base: nn.Module, U, V, cores, assign=None, *, name: str = "", dtype=None, residual=None):
        if not isinstance(base, nn.Embedding):
            raise ValidationError(f"{name or 'layer'}: the artifact adapts an embedding but the model has {type(base).__name__}")
        if (U.shape[1], V.shape[1]) != (base.num_embeddings, base.embedding_dim):
            raise ValidationError(
                f"{name or 'layer'}: the model's embedding is {base.num_embeddings} x {base.embedding_dim} but the "
                f"adapters are {U.shape[1]} x {V.shape[1]}"
            )
        super().__init__(base, U, V, cores, assign, name=name, dtype=dtype, residual=residual)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim

    def forward(self, idx: torch.Tensor, adapter_ids: AdapterIds | None = None) -> torch.Tensor:
        y = self.base(idx)
        batch = self._batch(adapter_ids)
        if batch is None or not batch.active:
            return y
        if idx.dim() < 1:
            raise OptionError(f"{self.name or 'layer'}: input must be (batch, ...) token ids")
        return self._add_delta(y, idx.reshape(idx.shape[0], -1), batch)

    def _project(self, inp: torch.Tensor, k: int) -> torch.Tensor:
        return nn.functional.embedding(inp, self.U[k])  # rows U_k[t]: (b, T, r)

    def _out_basis(self, k: int) -> torch.Tensor:
        return self.V[k].T

    def _residual_buffers(self, b, a):
        return b, a  # rows b_a[t] (n+1, num_embeddings, k) are looked up; a (n+1, k, dim)

    def _residual_project(self, inp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        vocab, k = self.res_in.shape[1], self.res_in.shape[2]
        return nn.functional.embedding(inp + idx[:, None] * vocab, self.res_in.view(-1, k))  # (b, T, k)


# -- helpers ---------------------------------------------------------------------------------------
def _reference_tensor(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    return next(itertools.chain(module.parameters(), module.buffers()), None)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight ``(d_in, d_out)``), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_shape(module: nn.Module, name: str = "") -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported linear layer; ValidationError for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in)
    raise ValidationError(
        f"{name or 'module'}: cannot attach adapters to {type(module).__name__} "
        "(supported: torch.nn.Linear, transformers Conv1D, torch.nn.Embedding)"
    )


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise OptionError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise OptionError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")


def _serving(model: nn.Module) -> _Serving:
    st = getattr(model, _ATTR, None)
    if not isinstance(st, _Serving):
        raise OptionError("no lorazip collection is attached to this model (call lorazip.apply first)")
    return st


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _model_shape(model: nn.Module, mod: dict, base: str | None) -> tuple[nn.Module, tuple[int, int]]:
    """The model's module for the artifact module ``mod`` and its ``(d_out, d_in)``."""
    m = module_path(mod)
    try:
        sub = model.get_submodule(m)
    except AttributeError:
        raise ValidationError(
            f"module {m!r} of the artifact is not in the model ({type(model).__name__}); "
            f"the artifact was made for base model {base!r}"
        ) from None
    if mod.get("layout", "linear") == "embedding":
        if not isinstance(sub, nn.Embedding):
            raise ValidationError(f"{m}: the artifact adapts an embedding but the model has {type(sub).__name__}")
        return sub, (sub.num_embeddings, sub.embedding_dim)
    return sub, linear_shape(sub, m)


def _targets(model: nn.Module, artifact: Artifact, names: list[str]) -> tuple[list[tuple[dict, nn.Module]], dict[str, str]]:
    """The artifact's modules to serve on ``model``, each with the model's module it wraps, and the
    adapters of ``names`` that do not fit the model (name -> why).

    A module split into shape groups (heads of different label counts) is served in the group
    whose shape is the model's; adapters that adapt it in another shape cannot run on this model.
    A module with no group of the model's shape (or not in the model) is an error where a served
    adapter adapts it, and left unwrapped where none does.
    """
    base = artifact.meta.get("base_model")
    by_path: dict[str, list[dict]] = {}
    for mod in artifact.modules:
        by_path.setdefault(module_path(mod), []).append(mod)
    ranks = {a: artifact.meta["adapters"][artifact.index(a)].get("ranks", {}) for a in names}
    out, wrong = [], {}
    for path, group in by_path.items():
        used = any(mod["name"] in ranks[a] for mod in group for a in names)
        try:
            sub, shape = _model_shape(model, group[0], base)
        except ValidationError:
            if used:
                raise
            continue  # a module none of the served adapters adapts (another base's, added with --base-model)
        fits = [mod for mod in group if (mod["d_out"], mod["d_in"]) == shape]
        if not fits and not used:
            continue
        if not fits:
            raise ValidationError(
                f"{path}: the model's layer is {shape[0]} x {shape[1]} (d_out x d_in) but the artifact's is "
                + " or ".join(f"{g['d_out']} x {g['d_in']}" for g in group)
                + f"; the artifact was made for base model {base!r}"
            )
        out.append((fits[0], sub))
        for mod in group:
            if mod is not fits[0]:
                for a in names:
                    if mod["name"] in ranks[a]:
                        wrong.setdefault(a, f"its {path} is {mod['d_out']} x {mod['d_in']}, the model's {shape[0]} x {shape[1]}")
    return out, wrong


# -- public API ------------------------------------------------------------------------------------
def apply(
    model: nn.Module,
    artifact: Artifact | str | os.PathLike,
    adapters: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Attach a compressed collection to ``model`` (in place) and return the model.

    Every module recorded in the artifact (e.g. ``model.layers.0.self_attn.q_proj``) is replaced
    by a :class:`BatchedLoraLinear` (or :class:`BatchedLoraEmbedding`) wrapping it. Only the bases
    and the cores of ``adapters`` (default: all, in artifact order) are read; the cores are read
    with :meth:`Artifact.get_rows`, so other adapters' bytes are not touched. ``dtype`` (a torch
    dtype or ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"``) is the dtype bases and
    cores are kept in; default each base layer's dtype. They are placed on each layer's device.

    Modules an adapter did not adapt get a zero core (delta 0), as in :func:`lorazip.export`.
    Where adapters differ in a module's shape (heads with different label counts), the shape group
    that matches the model is served: by default only the adapters that fit the model are loaded
    (asking for another says why it cannot run), and requesting one that does not fit is an error.
    Non-LoRA tensors stored with the adapters (``modules_to_save`` heads) are not served: where the
    served adapters carry some, a :class:`HeadsNotServed` warning names them (their rows get the model's
    own head; export the adapters to PEFT to use theirs).

    Raises
    ------
    ArtifactError : unknown adapter name or unreadable artifact.
    ValidationError : a module of the artifact is missing in the model, has another type or shape,
        or a requested adapter does not fit the model's shapes.
    OptionError : bad ``adapters`` / ``dtype``, or a collection is already attached.
    """
    if isinstance(artifact, (str, os.PathLike)):
        artifact = load_artifact(artifact)
    if getattr(model, _ATTR, None) is not None:
        raise OptionError("a lorazip collection is already attached to this model; call lorazip.serve.detach first")
    tdtype = _resolve_dtype(dtype)
    names = _requested(artifact, adapters)
    # Resolve and check every target before reading tensors or changing the model.
    targets, unfit = _targets(model, artifact, names)
    names = _fitting(names, unfit, explicit=adapters is not None)
    serving = _Serving(names, {a: unfit.get(a, "") for a in artifact.names}, str(artifact.path or "<in memory>"))
    wrappers = _wrap_targets(artifact, targets, names, tdtype, serving)
    for m, (layer, _) in wrappers.items():
        _set_submodule(model, m, layer)
    serving.layers = wrappers
    setattr(model, _ATTR, serving)
    _warn_heads(artifact, names)
    return model


class HeadsNotServed(UserWarning):
    """Adapters served by :func:`apply` carry non-LoRA tensors (``modules_to_save`` heads) it does not serve."""


def _warn_heads(artifact: Artifact, names: list[str]) -> None:
    """A :class:`HeadsNotServed` warning where adapters ``names`` carry non-LoRA tensors."""
    metas = [artifact.meta["adapters"][artifact.index(n)] for n in names]
    carry = [m["name"] for m in metas if m.get("extras")]
    if carry:
        keys = sorted({_head_name(k) for m in metas for k in m.get("extras", [])})
        warnings.warn(f"{len(carry)} served adapter(s) carry non-LoRA tensors that lorazip.apply does not serve "
                      f"({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}): their rows use the model's own "
                      f"head there, not theirs; export them (lorazip export) for PEFT to use them "
                      f"(e.g. {', '.join(carry[:3])})", HeadsNotServed, stacklevel=2)


def _head_name(key: str) -> str:
    """The module a non-LoRA tensor belongs to, as the model names it: ``base_model.model.classifier.weight``
    (or its ``modules_to_save.default`` copy) -> ``classifier``."""
    name = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
    for wrapper in (".original_module", ".modules_to_save."):
        if wrapper in name:
            name = name.split(wrapper, 1)[0]
    return name.removeprefix(PREFIX)


def _requested(artifact: Artifact, adapters: Sequence[str] | str | None) -> list[str]:
    """The adapter names to serve (default: all), each in the artifact once."""
    if isinstance(adapters, str):
        adapters = [adapters]
    names = list(artifact.names if adapters is None else adapters)
    if not names:
        raise OptionError("no adapters requested")
    rows = [artifact.index(n) for n in names]  # ArtifactError for unknown names
    if len(set(rows)) != len(rows):
        dup = next(n for n in names if names.count(n) > 1)
        raise OptionError(f"adapter {dup!r} requested twice")
    return names


def _fitting(names: list[str], unfit: dict[str, str], explicit: bool) -> list[str]:
    """``names`` less those that do not fit the model: an error when they were asked for
    (``explicit``) or when none fits."""
    if unfit and explicit:
        raise ValidationError(
            f"{len(unfit)} of the requested adapters do not fit this model: "
            + "; ".join(f"{a!r} ({why})" for a, why in unfit.items())
        )
    if unfit:  # by default every adapter that fits is served; asking for another names why it cannot run
        names = [a for a in names if a not in unfit]
        if not names:
            raise ValidationError("no adapter of the artifact fits this model: "
                                  + "; ".join(f"{a!r} ({why})" for a, why in unfit.items()))
    return names


def _wrap_targets(artifact: Artifact, targets, names: list[str], tdtype: torch.dtype | None,
                  serving: _Serving) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{module path: (wrapper, wrapped module)}``: each target wrapped with the bases and the
    ``names`` adapters' cores (and residual parts) of its module, read in one pass over the file."""
    rows = [artifact.index(n) for n in names]
    metas = [artifact.meta["adapters"][i] for i in rows]
    wrappers: dict[str, tuple[nn.Module, nn.Module]] = {}
    with artifact.reader():  # one open file for all the reads
        for mod, sub in targets:
            m = mod["name"]
            U, V, cores, assign = artifact.module_factors(m, rows)
            b, a, _ks = artifact.module_residuals(m, rows)  # k_max = 0 (nothing read) without residual parts
            missing = [j for j, ad in enumerate(metas) if "ranks" in ad and m not in ad["ranks"]]
            if missing:  # the original adapter did not adapt this module: its delta is zero
                cores = cores.clone()
                cores[missing] = 0
                if b.shape[2]:
                    b, a = b.clone(), a.clone()
                    b[missing], a[missing] = 0, 0
            cls = BatchedLoraEmbedding if mod.get("layout", "linear") == "embedding" else BatchedLoraLinear
            path = module_path(mod)
            layer = cls(sub, U, V, cores, assign, name=path, dtype=tdtype, residual=(b, a) if b.shape[2] else None)
            layer._serving = serving
            wrappers[path] = (layer, sub)
    return wrappers


def detach(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very objects :func:`apply` wrapped) and forget the collection."""
    st = _serving(model)
    for m, (_layer, original) in st.layers.items():
        _set_submodule(model, m, original)
    st.layers, st.batch = {}, None
    delattr(model, _ATTR)
    return model


def is_applied(model: nn.Module) -> bool:
    """True when :func:`apply` attached a collection to ``model``."""
    return isinstance(getattr(model, _ATTR, None), _Serving)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the loaded adapters; integer adapter ids index this list."""
    return list(_serving(model).names)


def set_adapters(model: nn.Module, ids: AdapterIds) -> None:
    """Choose the adapter of every batch row for the following forward passes.

    ``ids``: one entry per batch row (names, indices into :func:`adapter_names`, ``None`` or ``-1``
    for the base model), an integer tensor of shape ``(batch,)`` (may live on the model's device),
    or a single name / index for the whole batch. ``None`` (not in a list) clears the choice: the
    model then runs without adapters.
    """
    st = _serving(model)
    st.batch = _resolve(ids, st.names, len(st.names), st.all_names)


@contextmanager
def use_adapters(model: nn.Module, ids: AdapterIds) -> Iterator[None]:
    """Context manager form of :func:`set_adapters`; the previous choice is restored on exit."""
    st = _serving(model)
    batch = _resolve(ids, st.names, len(st.names), st.all_names)
    prev, st.batch = st.batch, batch
    try:
        yield
    finally:
        st.batch = prev
