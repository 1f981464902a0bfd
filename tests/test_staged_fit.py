"""Pass 1 of a budget or target run fits rank 16 first and grows only modules that share directions."""

from __future__ import annotations

import pytest
import torch

import lorazip
from lorazip.compress import budget, curves
from lorazip.metrics import per_adapter

from helpers import write_collection, write_planted_groups


def _ranks_fitted(monkeypatch) -> list[tuple[int, int]]:
    """(rank asked, rank fitted) of every module fit of pass 1."""
    seen: list[tuple[int, int]] = []
    real = curves.fit_factors

    def spy(fac, name, R, **kw):
        fit = real(fac, name, R, **kw)
        seen.append((R, max(fit.shared)))
        return fit

    monkeypatch.setattr(curves, "fit_factors", spy)
    return seen


def _tensors(art) -> dict[str, torch.Tensor]:
    return {k: v for k, v in art.tensors().items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    write_planted_groups(root, (64,), d=256, r_shared=24, seed=7, noise=0.01)
    return lorazip.load_collection(root)


@pytest.fixture(scope="module")
def iid(tmp_path_factory):
    root = tmp_path_factory.mktemp("iid")
    write_collection(root, n=24, modules={"q": (64, 64), "v": (48, 64)}, r=4, seed=11)
    return lorazip.load_collection(root)


@pytest.mark.parametrize("kw", [dict(target_error=0.02), dict(budget=40_000)])
def test_shared_structure_is_fitted_to_the_top_rank_as_before(planted, monkeypatch, kw):
    seen = _ranks_fitted(monkeypatch)
    staged = lorazip.compress(planted, hash_sources=False, **kw)
    # rank 16 first; the module grows in the same task (its adapters share directions), fitted once
    assert len(seen) == len(planted.modules) and seen[0][0] == 16 and seen[0][1] > 16, seen
    monkeypatch.setattr(budget, "_FIRST_RANK", 10**6)  # every module fitted to its top at once
    whole = lorazip.compress(planted, hash_sources=False, **kw)
    assert staged.allocation["ranks"] == whole.allocation["ranks"] and max(whole.allocation["ranks"].values()) > 16
    a, b = _tensors(staged), _tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw", [dict(target_error=0.05), dict(budget=30_000)])
def test_no_shared_structure_costs_a_rank_16_fit(iid, monkeypatch, kw):
    seen = _ranks_fitted(monkeypatch)
    staged = lorazip.compress(iid, hash_sources=False, **kw)
    assert seen == [(16, 16), (16, 16)], seen  # each module once, at rank 16: nothing grew
    monkeypatch.setattr(budget, "_FIRST_RANK", 10**6)
    whole = lorazip.compress(iid, hash_sources=False, **kw)
    assert set(staged.allocation["ranks"].values()) == set(whole.allocation["ranks"].values()) == {0}
    torch.testing.assert_close(per_adapter(*staged.stats()), per_adapter(*whole.stats()), rtol=0, atol=0)


def test_shares_compares_with_unshared_directions(planted, iid):
    def fit(coll, name):
        f = coll.module_factors(name, dtype=torch.float32)
        return curves.fit_module(f.B, f.A, name, 16, weighting="relative", seed=0, tol=1e-4, max_iters=500)

    assert budget._shares(fit(planted, planted.modules[0].name), 16, "relative")
    for m in iid.modules:
        assert not budget._shares(fit(iid, m.name), 16, "relative")
