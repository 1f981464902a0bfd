"""The exact-error pass (lorazip.compress.measure) against a dense float64 reference."""

from __future__ import annotations

import torch

from lorazip.compress.measure import FLOAT32_MIN_ERROR, round_and_measure
from lorazip.solvers.factors import Factors
from lorazip.solvers.linalg import orth


def _module(n=24, d_out=96, d_in=80, r_i=6, r=5, seed=0):
    """Adapters half of which lie in a shared rank-``r`` part (errors near 0), half iid (errors near 1)."""
    g = torch.Generator().manual_seed(seed)
    P, Q = orth(torch.randn(d_out, r, generator=g, dtype=torch.float64)), orth(torch.randn(d_in, r, generator=g, dtype=torch.float64))
    B, A = torch.randn(n, d_out, r_i, generator=g, dtype=torch.float64), torch.randn(n, r_i, d_in, generator=g, dtype=torch.float64)
    half = n // 2
    B[:half] = P @ torch.randn(half, r, r_i, generator=g, dtype=torch.float64) + 1e-3 * B[:half]
    A[:half] = torch.randn(half, r_i, r, generator=g, dtype=torch.float64) @ Q.T + 1e-3 * A[:half]
    return B.float(), A.float(), P.float(), Q.float()


def _dense(B, A, U, V, S):
    """Squared errors and norms of ``M_i - U S_i V^T`` from the d x d matrices, float64."""
    M = B.double() @ A.double()
    R = M - U.double() @ S.double() @ V.double().T
    return R.square().sum((1, 2)), M.square().sum((1, 2))


def test_float32_pass_matches_dense_float64():
    B, A, P, Q = _module()
    for dtype in ("float16", "int8", "float32"):
        Us, Vs, cs, e2, n2, sv = round_and_measure(Factors.stacked(B, A), P[None], Q[None], None, None, True, dtype, 4)
        S = cs.values if hasattr(cs, "values") else cs
        ref_e2, ref_n2 = _dense(B, A, Us.values[0], Vs.values[0], S)
        rel = e2 / n2
        assert (rel < 0.01).sum() >= 12 and (rel > FLOAT32_MIN_ERROR).sum() >= 10  # both paths are taken
        low = rel < FLOAT32_MIN_ERROR  # measured again in float64
        assert torch.allclose(e2[low], ref_e2[low], rtol=1e-9, atol=0)
        assert torch.allclose(e2[~low], ref_e2[~low], rtol=3e-5, atol=0)
        assert torch.allclose(n2, ref_n2, rtol=1e-6)
        # the spectra are those of each M_i
        ref_sv = torch.linalg.svdvals(B.double() @ A.double())[:, : sv.shape[1]]
        assert torch.allclose(sv, ref_sv, rtol=1e-5, atol=1e-5 * float(ref_sv.max()))


def test_cores_are_least_squares_for_the_stored_bases():
    """The refined cores minimise the error for the bases as stored (not exactly orthonormal)."""
    B, A, P, Q = _module(seed=1)
    Us, Vs, cs, e2, n2, _ = round_and_measure(Factors.stacked(B, A), P[None], Q[None], None, None, True, "float32", 4)
    U, V = Us.values[0].double(), Vs.values[0].double()
    M = B.double() @ A.double()
    best = torch.linalg.pinv(U) @ M @ torch.linalg.pinv(V).T
    assert torch.allclose(cs.values.double(), best, rtol=1e-4, atol=1e-5 * float(best.abs().max()))
    # any other core does worse: the optimum of the stored bases' cores, perturbed
    ref_e2, _ = _dense(B, A, U, V, best)
    worse, _ = _dense(B, A, U, V, best + 1e-3 * torch.randn(best.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert torch.all(e2 <= ref_e2 * (1 + 3e-5) + 1e-12) and torch.all(worse > ref_e2)


def test_float64_factors_stay_float64():
    B, A, P, Q = _module(seed=2)
    B, A = B.double(), A.double()
    Us, Vs, cs, e2, n2, _ = round_and_measure(Factors.stacked(B, A), P[None], Q[None], None, None, True, "float16", 4)
    ref_e2, _ = _dense(B, A, Us.values[0], Vs.values[0], cs.values)
    assert torch.allclose(e2, ref_e2, rtol=1e-9)
