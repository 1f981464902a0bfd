"""The mixed allocator (``--budget`` / ``--target-error``) under ``--memory-limit`` (modules read a
chunk of adapters at a time on every pass) and on the NumPy backend: the same choice and errors
as in memory, within float32 solver noise, and never more than a chunk read at once."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.compress.streaming import MemoryPlan
from helpers import write_planted_groups
from test_mixed_clusters import _dense_errors


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_planted_groups(root / "c", (24,), d=48, r_shared=4, seed=7, noise=0.05)
    return lorazip.load_collection(root / "c")


def _reads(coll, monkeypatch) -> list[int]:
    """Record how many adapters every factor read of the collection covers."""
    seen: list[int] = []
    real_all, real_one = type(coll).module_factors, type(coll).module_factor

    def all_(self, name, indices=None, *a, **kw):
        seen.append(len(self.adapters) if indices is None else len(indices))
        return real_all(self, name, indices, *a, **kw)

    def one(self, name, indices, *a, **kw):
        seen.append(len(indices))
        return real_one(self, name, indices, *a, **kw)

    monkeypatch.setattr(type(coll), "module_factors", all_)
    monkeypatch.setattr(type(coll), "module_factor", one)
    return seen


@pytest.mark.parametrize("stat", ["mean", "max"])
def test_streamed_budget_matches_in_memory(coll, monkeypatch, stat):
    budget = 9000
    mem = lorazip.compress(coll, budget=budget, target_stat=stat, storage_dtype="float32", hash_sources=False)
    assert mem.allocation["ranks"]["layer.q"] > 0 and mem.allocation["residual_ranks"]["layer.q"]["total"] > 0
    limit = 3 * 4 * 4 * 96 * 8  # room for 8 of the 24 adapters' float32 factors at once, per chunk
    plan = MemoryPlan.make(coll, 4, limit, "jd-full")
    assert plan.chunk and plan.chunk[0] < len(coll)
    seen = _reads(coll, monkeypatch)
    art = lorazip.compress(coll, budget=budget, target_stat=stat, storage_dtype="float32", hash_sources=False,
                           memory_limit=limit)
    assert seen and max(seen) <= plan.chunk[0]  # the module was never read whole
    assert art.serialized_size() <= budget
    assert art.allocation["ranks"] == mem.allocation["ranks"]
    got, want = _dense_errors(art, coll), _dense_errors(mem, coll)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-7)
    rep = lorazip.evaluate(art)
    assert np.allclose([a["error"] for a in rep["adapters"]], got, rtol=1e-7, atol=1e-12)  # recorded = stored


def test_streamed_target_error_is_met(coll):
    limit = 3 * 4 * 4 * 96 * 8
    art = lorazip.compress(coll, target_error=0.01, storage_dtype="float32", hash_sources=False, memory_limit=limit)
    assert float(_dense_errors(art, coll).mean()) <= 0.01 + 1e-9


def test_numpy_backend_matches_torch(coll):
    torch_art = lorazip.compress(coll, budget=9000, storage_dtype="float32", hash_sources=False)
    np_art = lorazip.compress(coll, budget=9000, storage_dtype="float32", hash_sources=False, backend="numpy")
    assert np_art.allocation["ranks"] == torch_art.allocation["ranks"]
    assert np.allclose(_dense_errors(np_art, coll), _dense_errors(torch_art, coll), rtol=1e-4, atol=1e-7)


def test_clusters_need_modules_in_memory(coll):
    from lorazip.compress.budget import compress_mixed
    from lorazip.compress.plan import Clusters

    groups = Clusters(2, [torch.arange(len(coll)) % 2])
    with pytest.raises(lorazip.OptionError, match="keep a module's factors in memory"):
        compress_mixed(coll, CompressOptions(budget=9000, memory_limit=3 * 4 * 4 * 96 * 8), groupings=[groups])
