"""Solvers: pure functions over the factors of one module (never files, never d x d products).

``solve_module`` dispatches by method name and returns bases shaped for the artifact,
``U``: (K, d_out, r), ``V``: (K, d_in, r), with an optional per-adapter assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .factors import Factors
from .jd_diag import jd_diag, jd_diag_factors
from .jd_full import JDResult, jd_full, jd_full_factors
from .svd import individual_svd, spectra, truncation_errors

METHODS = ("jd-full", "jd-diag", "jd-clustered", "svd")

__all__ = [
    "METHODS", "ModuleSolution", "JDResult", "Factors", "jd_full", "jd_diag", "individual_svd", "spectra",
    "truncation_errors", "solve_module", "solve_factors",
]


@dataclass
class ModuleSolution:
    """Bases and cores of one module in artifact layout; ``assignment`` is None when K = 1; ``spectra``:
    each adapter's singular values where the solver made them (:attr:`JDResult.spectra`)."""

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    assignment: torch.Tensor | None
    n_iters: int
    converged: bool
    spectra: torch.Tensor | None = None


def solve_module(method: str, B: torch.Tensor, A: torch.Tensor, rank: int, **kw) -> ModuleSolution:
    """Run ``method`` on one module's factors ``B`` (n, d_out, r_i), ``A`` (n, r_i, d_in)."""
    return solve_factors(method, Factors.stacked(B, A), rank, **kw)


def solve_factors(method: str, fac: Factors, rank: int, **kw) -> ModuleSolution:
    """Run ``method`` on one module's :class:`Factors` (in memory, or streamed for jd-full and jd-diag)."""
    if method == "svd":
        if not fac.in_memory:
            raise ValueError("svd needs the module's factors in memory")
        ch = next(iter(fac))
        res = individual_svd(ch.B, ch.A, rank)
        return ModuleSolution(res.U, res.V, res.S, torch.arange(fac.n), 1, True)
    solver = {"jd-full": jd_full_factors, "jd-diag": jd_diag_factors}[method]
    res = solver(fac, rank, **kw)
    return ModuleSolution(res.U[None, ...], res.V[None, ...], res.cores, None, res.n_iters, res.converged,
                          res.spectra)
