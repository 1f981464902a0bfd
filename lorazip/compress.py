"""Compress a :class:`Collection` module by module into an :class:`Artifact`.

For each module: read the factors of all adapters, run the chosen solver on the chosen
device, round the bases and cores to the storage dtype, and measure the exact error of
what will be stored (from Gram matrices of the rounded factors). Only one module's
factors are in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import __version__
from .artifact import STORAGE_DTYPES, Artifact
from .errors import OptionError
from .io.collection import Collection
from .io.peft import sha256_file
from .metrics import squared_errors
from .solvers import METHODS, solve_module
from .solvers._linalg import WEIGHTINGS

# Config fields carried into the artifact so export can rebuild a faithful PEFT config.
_CONFIG_FIELDS = (
    "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "fan_in_fan_out", "task_type", "modules_to_save", "revision",
)


@dataclass(frozen=True)
class CompressOptions:
    """Settings of a compression run (see :func:`compress`)."""

    rank: int = 16
    method: str = "jd-full"
    weighting: str = "relative"
    device: str = "auto"
    storage_dtype: str = "float32"
    seed: int = 0
    max_iters: int = 500
    tol: float = 1e-6

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise OptionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.weighting not in WEIGHTINGS:
            raise OptionError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise OptionError(f"unknown dtype {self.storage_dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("device 'cuda' requested but CUDA is not available")
        if self.max_iters < 1 or not self.tol > 0:
            raise OptionError("max_iters must be >= 1 and tol > 0")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _adapter_meta(adapter, hash_sources: bool) -> dict[str, Any]:
    files = {}
    for f in adapter.files():
        files[f.name] = {"sha256": sha256_file(f) if hash_sources else None, "bytes": f.stat().st_size}
    src = {"path": str(adapter.path.resolve()), "files": files}
    src.update(adapter.source)  # e.g. Hub repo id and commit
    return {
        "name": adapter.name,
        "source": src,
        "config": {k: adapter.config[k] for k in _CONFIG_FIELDS if k in adapter.config},
        "dtype": adapter.dtype,
        "ranks": {m: spec.rank for m, spec in adapter.modules.items()},
        "extras": adapter.extras,
    }


def compress(
    collection: Collection,
    rank: int = 16,
    *,
    method: str = "jd-full",
    weighting: str = "relative",
    device: str = "auto",
    storage_dtype: str = "float32",
    seed: int = 0,
    max_iters: int = 500,
    tol: float = 1e-6,
    keep_extras: bool = True,
    hash_sources: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> Artifact:
    """Jointly compress every module of ``collection``.

    Parameters
    ----------
    collection : Collection from :func:`lorazip.load_collection`.
    rank : shared rank r (per module, at most ``min(d_out, d_in)``).
    method : "jd-full" (full r x r cores), "jd-diag" (diagonal cores) or "svd"
        (per-adapter truncated SVD, the baseline).
    weighting : "relative" (each adapter counts equally) or "absolute".
    device : "auto", "cpu" or "cuda"; the same code runs on both.
    storage_dtype : "float32", "float16" or "bfloat16" for the stored bases and cores.
    seed, max_iters, tol : solver settings (seeded, deterministic on CPU).
    keep_extras : store non-LoRA tensors (``modules_to_save``) so export reproduces them.
    progress : called as ``progress(done, total, module_name)`` after each module.

    Returns
    -------
    Artifact, in memory; ``.save(path)`` writes it.

    Raises
    ------
    OptionError for invalid settings (including a rank larger than a module allows).
    """
    opts = CompressOptions(rank, method, weighting, device, storage_dtype, seed, max_iters, tol)
    opts.check()
    for m in collection.modules:
        if rank > min(m.d_out, m.d_in):
            raise OptionError(
                f"rank {rank} is larger than module {m.name} allows (min(d_out, d_in) = {min(m.d_out, m.d_in)})"
            )
    dev = resolve_device(device)
    sdtype = STORAGE_DTYPES[storage_dtype]
    n, n_mod = len(collection), len(collection.modules)
    tensors: dict[str, torch.Tensor] = {}
    sq_error = torch.zeros(n, n_mod, dtype=torch.float64)
    norm2 = torch.zeros(n, n_mod, dtype=torch.float64)
    modules_meta = []
    for j, info in enumerate(collection.modules):
        fac = collection.module_factors(info.name)
        B, A = fac.B.to(dev), fac.A.to(dev)
        sol = solve_module(method, B, A, rank, weighting=weighting, seed=seed, max_iters=max_iters, tol=tol)
        U = sol.U.to(sdtype).cpu()
        V = sol.V.to(sdtype).cpu()
        cores = sol.cores.to(sdtype).cpu()
        assign = None if sol.assignment is None else sol.assignment.to(torch.int32).cpu()
        e2, nn2 = squared_errors(fac.B, fac.A, U, V, cores, None if assign is None else assign.long())
        sq_error[:, j], norm2[:, j] = e2, nn2
        tensors[f"U/{info.name}"] = U.contiguous()
        tensors[f"V/{info.name}"] = V.contiguous()
        tensors[f"cores/{info.name}"] = cores.contiguous()
        if assign is not None:
            tensors[f"assign/{info.name}"] = assign
        from .solvers.svd import spectra

        tensors[f"spectra/{info.name}"] = spectra(fac.B, fac.A).float()
        modules_meta.append(
            {
                "name": info.name, "d_out": info.d_out, "d_in": info.d_in, "layout": info.layout,
                "rank": rank, "n_clusters": int(U.shape[0]), "iters": sol.n_iters, "converged": sol.converged,
            }
        )
        if progress:
            progress(j + 1, n_mod, info.name)
    tensors["stats/sq_error"] = sq_error
    tensors["stats/norm2"] = norm2
    adapters_meta = [_adapter_meta(a, hash_sources) for a in collection.adapters]
    if keep_extras:
        for i, a in enumerate(collection.adapters):
            for key, t in (a.extra_tensors() if a.extras else {}).items():
                tensors[f"extras/{i}/{key}"] = t.contiguous()
    meta = {
        "lorazip_version": __version__,
        "base_model": collection.base_model,
        "method": method,
        "rank": rank,
        "weighting": weighting,
        "storage_dtype": storage_dtype,
        "solver": {"max_iters": max_iters, "tol": tol, "seed": seed, "device": dev.type},
        "modules": modules_meta,
        "adapters": adapters_meta,
    }
    return Artifact(meta, tensors=tensors)
