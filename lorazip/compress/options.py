"""The settings of a compression run, validated once (:class:`CompressOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..artifact import STORAGE_DTYPES
from ..errors import OptionError
from ..quantize import EXTRAS_DTYPES
from ..solvers import METHODS
from ..solvers.linalg import WEIGHTINGS


@dataclass(frozen=True)
class CompressOptions:
    """Settings of a compression run (see :func:`compress`)."""

    rank: int = 16
    method: str = "jd-full"
    weighting: str = "relative"
    device: str = "auto"
    storage_dtype: str = "auto"
    seed: int = 0
    max_iters: int = 500
    tol: float = 1e-4
    compute_dtype: str = "float32"
    extras_dtype: str = "auto"

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise OptionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.weighting not in WEIGHTINGS:
            raise OptionError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.storage_dtype not in STORAGE_DTYPES and self.storage_dtype != "auto":
            raise OptionError(f"unknown dtype {self.storage_dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("device 'cuda' requested but CUDA is not available")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise OptionError(f"unknown compute dtype {self.compute_dtype!r}; choose float64 or float32")
        if self.max_iters < 1 or not self.tol > 0:
            raise OptionError("max_iters must be >= 1 and tol > 0")
        check_extras_dtype(self.extras_dtype)


def check_extras_dtype(extras_dtype: str) -> None:
    if extras_dtype not in EXTRAS_DTYPES:
        raise OptionError(f"unknown extras dtype {extras_dtype!r}; choose from {', '.join(EXTRAS_DTYPES)}")


COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ModuleJob:
    """The settings a module task needs (picklable: a Ray task takes it as an argument)."""

    method: str
    weighting: str
    storage_dtype: str
    compute_dtype: str
    seed: int
    max_iters: int
    tol: float
    backend: str = "torch"
    device: str = "auto"
