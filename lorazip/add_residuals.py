"""Per-adapter residual parts for adapters added to an artifact (``lorazip add``).

An artifact built under a budget or a target stores, besides its shared parts, each adapter's own
low-rank residual (on small or diverse collections only that: shared rank 0 everywhere). An added
adapter is projected onto the shared bases (:mod:`lorazip.update`); here it also gets residual
parts, chosen the way compression chose them: the components of what the projection leaves (its
truncated SVD, from the factors) are taken by error removed per byte, each at the bits of the
module's bit levels where the artifact stores low-bit rows (else in its storage dtype), until the
adapter's error reaches the artifact's goal: its target error, else (a budget) the mean error of
the adapters already in it. The stored rows are rounded as every reader will see them and the
recorded errors are those of the rounded parts. An artifact without residual parts (``--rank``)
gets none.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import lowbit
from .artifact import STORAGE_DTYPES
from .metrics import module_weights, objective_errors, squared_errors
from .quantize import QBITS, QSCALE, store_residual
from .solvers.residual import residual_svd



def goal_error(meta: dict[str, Any], sq: torch.Tensor, n2: torch.Tensor) -> float | None:
    """The error an added adapter's residual parts aim at: the artifact's target error, else the mean
    error of its adapters (under the artifact's ``objective``); None for an artifact without
    per-adapter parts (a ``--rank`` run)."""
    alloc = meta.get("allocation") or {}
    if alloc.get("mode") != "mixed":
        return None
    if alloc.get("target_error") is not None:
        return float(alloc["target_error"])
    return float(objective_errors(sq.double(), n2.double(), meta.get("objective", "energy")).mean())


def _levels(mod: dict[str, Any], low: bool, storage: str) -> tuple[list, list]:
    """(bits, bytes, relative error) a residual component of this module may be stored at: those of
    an adapter's leading component and those of its others."""
    if low:
        return lowbit.class_levels(mod["d_out"], mod["d_in"], lowbit.stored_profile(mod))
    size = STORAGE_DTYPES[storage].itemsize
    one = [(8 * size, (mod["d_out"] + mod["d_in"]) * size, 0.0)]
    return one, one


def _choose(spectra: list[np.ndarray], levels: list[list], sq: np.ndarray, E: float, goal: float):
    """One adapter: per module the number of components and their levels, taken by error removed per
    byte (each module's steps in its components' order) until the predicted error is <= ``goal``."""
    steps = []  # (-gain per byte, module, component, level index)
    for j, (sv2, classes) in enumerate(zip(spectra, levels)):
        for q, s2 in enumerate(sv2):
            lv = classes[min(q, 1)]
            rho = [1.0] + [x[2] for x in lv]
            cost = [0.0] + [float(x[1]) for x in lv]
            for t in range(len(lv)):
                gain = s2 * (rho[t] - rho[t + 1])
                if gain > 0:
                    steps.append((-gain / (cost[t + 1] - cost[t]), j, q, t, gain))
    steps.sort(key=lambda s: (s[0], s[1], s[2], s[3]))
    err = float(sq.sum())
    level = [np.zeros(len(sv2), dtype=np.int64) for sv2 in spectra]
    for _, j, q, t, gain in steps:
        if err <= goal * E:
            break
        if level[j][q] != t or (t == 0 and q > 0 and level[j][q - 1] == 0):  # stored components: a prefix
            continue
        level[j][q] = t + 1
        err -= gain
    return level


def add_residuals(meta: dict[str, Any], tensors: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                  facs: list, bases: list, sq_new: torch.Tensor, norm_new: torch.Tensor, n_old: int,
                  goal: float) -> None:
    """Give the ``n_new`` added adapters residual parts, in place: ``tensors`` (the float view of the
    artifact the update computes on; low-bit rows go in as codes, from ``raw``), the modules'
    ``residual`` metadata and ``sq_new`` (n_new, M) (their exact errors). ``facs[j]``: the new
    adapters' factors of module j; ``bases[j]``: their bases ``(U, V, S)`` gathered per adapter."""
    mods = meta["modules"]
    storage = meta.get("storage_dtype") or "float32"
    low = any((m.get("residual") or {}).get("bits") for m in mods)
    n_new = sq_new.shape[0]
    svd = [residual_svd(B, A, *base) for (B, A), base in zip(facs, bases)]
    levels = [_levels(m, low, storage) for m in mods]
    objective = meta.get("objective", "energy")
    w = None if objective == "energy" else module_weights(norm_new.double(), objective).numpy()  # (n_new, M)
    E = norm_new.sum(1).numpy() if w is None else (norm_new.double().numpy() * w).sum(1)
    chosen = [np.zeros((n_new, s.shape[1]), dtype=np.int64) for _, s, _ in svd]
    for i in range(n_new):
        if E[i] <= 0:
            continue
        sp = [s[i].square().numpy() * (1.0 if w is None else w[i, j]) for j, (_, s, _) in enumerate(svd)]
        picked = _choose(sp, levels, sq_new[i].numpy() if w is None else sq_new[i].double().numpy() * w[i],
                         float(E[i]), goal)
        for j, lv in enumerate(picked):
            chosen[j][i] = lv
    for j, mod in enumerate(mods):
        if chosen[j].any():
            _store(mod, tensors, raw, facs[j], bases[j], svd[j], chosen[j], levels[j], low, storage, n_old, sq_new, j)


def _store(mod, tensors, raw, fac, base, svd, level, levels, low, storage, n_old, sq_new, j) -> None:
    """Module j's new residual rows (adapters' components with level > 0), appended and measured."""
    name = mod["name"]
    P, s, Q = svd
    B, A = fac
    ks = torch.from_numpy((level > 0).sum(1))
    k_max = int(ks.max())
    root = s[:, :k_max].clamp_min(0).sqrt()
    bp, ap = P[:, :, :k_max] * root[:, None, :], (Q[:, :, :k_max] * root[:, None, :]).transpose(1, 2)
    _, bits = lowbit.stored_bits(level, levels)
    sb, sa, bq, aq = store_residual(bp, ap, ks, storage, bits if low else None)
    U, V, S = base
    sq_new[:, j] = squared_errors(B, A, U, V, S, torch.arange(len(ks)), residual=(bq, aq))[0]
    res = mod.get("residual") or {"max_rank": 0, "total_rank": 0}
    rkey, bkey, akey = f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}"
    old_ks = tensors[rkey][:n_old] if rkey in tensors else torch.zeros(n_old, dtype=torch.int32)
    tensors[rkey] = torch.cat([old_ks.to(torch.int32), ks.to(torch.int32)]).contiguous()
    if low:
        had = res["total_rank"] > 0
        for key, new in ((bkey, sb), (akey, sa)):
            old_codes = raw[key] if had else torch.zeros(0, new.data.shape[1], dtype=torch.uint8)
            old_scale = raw[QSCALE + key] if had else torch.zeros(0, 1, dtype=torch.bfloat16)
            tensors[key] = torch.cat([old_codes, new.data]).contiguous()
            tensors[QSCALE + key] = torch.cat([old_scale, new.scale]).contiguous()
        old_bits = raw[QBITS + name] if had else torch.zeros(0, dtype=torch.uint8)
        tensors[QBITS + name] = torch.cat([old_bits, torch.from_numpy(bits)]).contiguous()
        all_bits = tensors[QBITS + name].numpy()
        mod["residual"] = {"max_rank": max(res["max_rank"], int(ks.max())), "total_rank": len(all_bits),
                           "bits": {"group": "row", "bytes": [lowbit.packed_bytes(mod["d_out"], all_bits),
                                                              lowbit.packed_bytes(mod["d_in"], all_bits)]}}
    else:  # float or int8 rows (int8: codes and float32 row scales, the others' kept as stored)
        had = res["total_rank"] > 0
        for key, new in ((bkey, sb), (akey, sa)):
            if new.scale is not None:
                prev = raw[key] if had else torch.zeros(0, new.data.shape[1], dtype=torch.int8)
                scale = raw[QSCALE + key].float() if had else torch.zeros(0)
                tensors[key] = torch.cat([prev, new.data]).contiguous()
                tensors[QSCALE + key] = torch.cat([scale, new.scale.float()]).contiguous()
            else:
                prev = tensors[key] if had else torch.zeros(0, new.data.shape[1], dtype=new.data.dtype)
                tensors[key] = torch.cat([prev, new.data.to(prev.dtype)]).contiguous()
        mod["residual"] = {"max_rank": max(res["max_rank"], int(ks.max())),
                           "total_rank": res["total_rank"] + int(ks.sum())}
