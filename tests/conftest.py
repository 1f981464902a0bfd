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
