"""One array-namespace layer so the JD solvers run unchanged on torch, NumPy and CuPy.

Solvers call ``xp = namespace(x)`` and use only Array-API functions on ``xp`` (through
``array-api-compat``) plus the few helpers here, so torch on CPU or CUDA, NumPy and CuPy run
the same code. The CLI's ``--backend cupy`` moves a module's factors to CuPy before solving
(for users whose torch has no CUDA); results come back as torch tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import OptionError

BACKENDS = ("torch", "numpy", "cupy")


def namespace(*arrays: Any):
    """The Array-API namespace of ``arrays`` (torch, numpy or cupy, wrapped by array-api-compat)."""
    import array_api_compat

    return array_api_compat.array_namespace(*arrays)


def is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def to_backend(t: torch.Tensor, backend: str):
    """Move a torch tensor to ``backend`` ("torch" leaves it as is)."""
    if backend == "torch":
        return t
    if backend == "numpy":
        return t.detach().cpu().numpy()
    if backend == "cupy":
        try:
            import cupy
        except ImportError:
            raise OptionError("--backend cupy needs CuPy: pip install 'lorazip[cupy]' (and a CUDA GPU)") from None
        return cupy.asarray(t.detach().cpu().numpy())
    raise OptionError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def to_torch(x: Any) -> torch.Tensor:
    """Back to torch (CPU for numpy/cupy arrays)."""
    if is_torch(x):
        return x
    if type(x).__module__.startswith("cupy"):
        x = x.get()
    return torch.from_numpy(np.ascontiguousarray(x))


def randn(xp, like, shape: tuple[int, ...], generator: torch.Generator):
    """Seeded standard normals on ``like``'s backend, device and dtype (drawn by torch on CPU in
    float32 whatever the dtype, so every backend and dtype sees the same numbers for the same seed;
    five times faster than drawing float64, and a random start needs no more digits)."""
    z = torch.randn(*shape, generator=generator, dtype=torch.float32)
    if is_torch(like):
        return z.to(device=like.device, dtype=like.dtype)
    return xp.asarray(to_backend(z, "cupy" if type(like).__module__.startswith("cupy") else "numpy"), dtype=like.dtype)


def mT(x):
    """Swap the last two axes."""
    xp = namespace(x)
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else xp.swapaxes(x, -1, -2)


def diagonal(x):
    xp = namespace(x)
    return xp.linalg.diagonal(x)


def finfo_tiny(x) -> float:
    return float(namespace(x).finfo(x.dtype).smallest_normal)
