"""The array-namespace layer: the same JD-Full code on torch, NumPy (and CuPy when present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorazip
from lorazip.backend import namespace, to_backend, to_torch
from lorazip.solvers import jd_full
from lorazip.solvers.linalg import orth


def _factors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 40, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, 30, generator=g, dtype=torch.float64)


def test_numpy_and_torch_run_the_same_solver():
    B, A = _factors()
    rt = jd_full(B, A, 5, tol=1e-10)
    rn = jd_full(B.numpy(), A.numpy(), 5, tol=1e-10)
    assert isinstance(rn.U, np.ndarray)
    assert rt.n_iters == rn.n_iters
    assert np.abs(rt.U.numpy() - rn.U).max() < 1e-10
    assert np.abs(rt.cores.numpy() - rn.cores).max() < 1e-10
    assert abs(rt.objective - rn.objective) < 1e-12


def test_layer_helpers_round_trip():
    x = torch.randn(5, 3, dtype=torch.float64)
    xn = to_backend(x, "numpy")
    assert namespace(xn).__name__.endswith("numpy")
    assert torch.equal(to_torch(xn), x)
    q = orth(xn)
    assert np.allclose(q.T @ q, np.eye(3), atol=1e-12)
    with pytest.raises(lorazip.OptionError):
        to_backend(x, "tpu")


def test_compress_with_numpy_backend_matches_torch(fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / "gpt2" / "winkitee__Lightweight-Fine-Tuning-Project__checkpoint-250")
    coll2 = lorazip.load_collection([fixtures_dir / "gpt2" / n for n in (
        "winkitee__Lightweight-Fine-Tuning-Project__checkpoint-250", "winkitee__Lightweight-Fine-Tuning-Project__checkpoint-500")])
    for c in (coll, coll2):
        a = lorazip.compress(c, 4, hash_sources=False)
        b = lorazip.compress(c, 4, backend="numpy", hash_sources=False)
        assert abs(lorazip.evaluate(a)["errors"]["mean"] - lorazip.evaluate(b)["errors"]["mean"]) < 1e-6
    with pytest.raises(lorazip.OptionError, match="jd-full only"):
        lorazip.compress(coll, 4, backend="numpy", method="jd-diag")


def _cupy_ready() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _cupy_ready(), reason="needs CuPy and a CUDA GPU")
def test_cupy_matches_torch():
    B, A = _factors(1)
    rt = jd_full(B, A, 5, tol=1e-10)
    rc = jd_full(to_backend(B, "cupy"), to_backend(A, "cupy"), 5, tol=1e-10)
    assert float(np.abs(rt.U.numpy() - to_torch(rc.U).numpy()).max()) < 1e-8
