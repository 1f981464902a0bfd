"""Shared test setup: one torch thread, tests/ on sys.path, and the real PEFT adapter fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The test machine's cores are shared: torch's intra-op thread pool then spins and makes the
# solvers' many tiny QRs/eighs ~40x slower. One thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # make tests/helpers.py importable whatever the import mode
    sys.path.insert(0, str(TESTS_DIR))

FIXTURES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real-adapters"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures/real-adapters (read-only: never write there)."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"real adapter fixtures not found at {FIXTURES_DIR}")
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def small_fp32(tmp_path_factory):
    """12 float32 adapters of two small modules (with :func:`optimistic_profile`, a target of 0.01 misses
    by rounding once: a re-aim)."""
    import lorazip
    from helpers import write_collection

    root = tmp_path_factory.mktemp("small-fp32")
    write_collection(root, n=12, modules={"q": (40, 24), "v": (24, 24)}, r=4, seed=2)
    return lorazip.load_collection(root)


@pytest.fixture
def optimistic_profile(monkeypatch):
    """Residual quantisation profiles 20% under what is measured: a bits build then misses a target
    (its exact error is over the prediction), as builds did before the profile had two classes."""
    import importlib

    curves = importlib.import_module("lorazip.compress.curves")
    real = curves._quant_profile_steps  # what quant_profile and pass 1's batched measurements run

    def optimistic(*a, **k):
        return 0.8 * (yield from real(*a, **k))

    monkeypatch.setattr(curves, "_quant_profile_steps", optimistic)


@pytest.fixture(scope="session")
def two_groups(tmp_path_factory):
    """28 adapters in two planted groups (rank-6 subspaces of d = 48, noise 0.05)."""
    import lorazip
    from helpers import write_planted_groups

    root = tmp_path_factory.mktemp("two-groups")
    write_planted_groups(root, (16, 12), d=48, r_shared=6, seed=5, noise=0.05)
    return lorazip.load_collection(root)
