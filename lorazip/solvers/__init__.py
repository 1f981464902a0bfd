"""Solvers: pure functions over the factors of one module (never files, never d x d products).

``solve_module`` dispatches by method name and returns bases shaped for the artifact,
``U``: (K, d_out, r), ``V``: (K, d_in, r), with an optional per-adapter assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jd_diag import jd_diag
from .jd_full import JDResult, jd_full
from .svd import individual_svd, spectra, truncation_errors

METHODS = ("jd-full", "jd-diag", "jd-clustered", "svd")

__all__ = [
    "METHODS", "ModuleSolution", "JDResult", "jd_full", "jd_diag", "individual_svd", "spectra",
    "truncation_errors", "solve_module",
]


@dataclass
class ModuleSolution:
    """Bases and cores of one module in artifact layout; ``assignment`` is None when K = 1."""

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    assignment: torch.Tensor | None
    n_iters: int
    converged: bool


def solve_module(method: str, B: torch.Tensor, A: torch.Tensor, rank: int, **kw) -> ModuleSolution:
    """Run ``method`` on one module's factors ``B`` (n, d_out, r_i), ``A`` (n, r_i, d_in)."""
    if method == "svd":
        res = individual_svd(B, A, rank)
        n = B.shape[0]
        return ModuleSolution(res.U, res.V, res.S, torch.arange(n), 1, True)
    solver = {"jd-full": jd_full, "jd-diag": jd_diag}[method]
    res = solver(B, A, rank, **kw)
    return ModuleSolution(res.U[None, ...], res.V[None, ...], res.cores, None, res.n_iters, res.converged)
