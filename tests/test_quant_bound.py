"""benchmarks/quant_bound.py: the rate-distortion bound of lorazip's low-bit rows (on Gaussian rows,
where the bound is known in closed form)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_bound.py"


@pytest.fixture(scope="module")
def qb():
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("quant_bound", _PATH)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(_PATH.parent))


@pytest.fixture(scope="module")
def gaussian_rows():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(512, generator=g) for _ in range(400)]


def test_gaussian_entropy_and_bound(qb, gaussian_rows):
    values = torch.cat(gaussian_rows).double().numpy()
    h = qb.differential_entropy(values)
    assert abs(h - qb.GAUSS_H) < 0.01  # 204,800 samples
    for b in (2, 3, 4):
        D = qb.fixed_rate(gaussian_rows, b)
        bound = h - 0.5 * math.log2(2 * math.pi * math.e * D)
        rate, step = qb.ecsq_rate(values, D)
        # the bound below the entropy-coded grid, which is below the fixed-rate code at 2-4 bits
        assert bound < rate < b
        assert abs(qb.ecsq(values, step)[0] - D) < 0.02 * D  # the bisection found that error
        # the best uniform grid for Gaussian values (Max, 1960): lorazip's per-row scales within 3% of it
        assert D < {2: 0.1188, 3: 0.03744, 4: 0.01154}[b] * 1.03


def test_worst_ratio_over_mixes(qb):
    h = qb.GAUSS_H
    points = [(0.36, 1), (0.12, 2), (0.035, 3), (0.0105, 4)]
    worst, at = qb.worst_ratio(h, points)
    at_points = [(h - 0.5 * math.log2(2 * math.pi * math.e * D)) / b for D, b in points]
    assert worst <= min(at_points) + 1e-12  # the widths themselves are mixes too
    assert 1 <= at <= 4 and 0 < worst < 1
