"""Ranks from a budget or an error target: exact bytes, target met, per-module >= uniform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.compress.allocate import allocate_shared as allocate
from lorazip.compress.budget import compress_shared
from lorazip.compress.curves import rank_curves
from lorazip.solvers import jd_full


def _write(folder: Path, state: dict, r: int) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "base_model_name_or_path": "tiny", "target_modules": ["easy", "hard"]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Module 'easy' lies in a shared rank-2 space; module 'hard' is iid rank 4: ranks should differ."""
    root = tmp_path_factory.mktemp("uneven")
    g = torch.Generator().manual_seed(0)
    d = 24
    Ue, Ve = torch.linalg.qr(torch.randn(d, 2, generator=g))[0], torch.linalg.qr(torch.randn(d, 2, generator=g))[0]
    for i in range(6):
        st = {}
        Be = torch.cat([Ue @ torch.randn(2, 2, generator=g), torch.zeros(d, 2)], 1)
        Ae = torch.cat([torch.randn(2, 2, generator=g) @ Ve.T, torch.zeros(2, d)], 0)
        for name, (B, A) in {
            "easy": (Be, Ae),
            "hard": (torch.randn(d, 4, generator=g), torch.randn(4, d, generator=g)),
        }.items():
            st[f"base_model.model.{name}.lora_A.weight"] = A
            st[f"base_model.model.{name}.lora_B.weight"] = B
        _write(root / f"a{i}", st, 4)
    return lorazip.load_collection(root)


def test_rank_curves_match_jd_full_and_decrease(uneven):
    curves = rank_curves(uneven, 8)
    for c in curves.contribution():  # per adapter errors may trade; the weighted mean may not rise
        assert bool((c[1:] <= c[:-1] + 1e-9).all())
    for j, m in enumerate(curves.modules):
        e = curves.errors[j]
        fac = uneven.module_factors(m)
        ref = jd_full(fac.B, fac.A, 8, tol=1e-10)
        rel = (e[:, -1] / curves.norms2[:, j]).mean()
        assert abs(float(rel) - (1 - ref.objective)) < 1e-3
    easy = curves.modules.index("easy")
    assert float((curves.errors[easy][:, 1] / curves.norms2[:, easy]).max()) < 1e-6  # rank 2 is exact there


def test_budget_is_respected_exactly(uneven, tmp_path):
    for budget in (12_000, 20_000, 40_000):
        art, rep = compress_shared(uneven, CompressOptions(budget=budget, storage_dtype="float32", hash_sources=False))
        path = art.save(tmp_path / f"b{budget}.lorazip.safetensors")
        assert path.stat().st_size <= budget
        assert path.stat().st_size == rep["artifact_bytes"]
    with pytest.raises(lorazip.OptionError, match="cannot hold"):
        compress_shared(uneven, CompressOptions(budget=600, hash_sources=False))


def test_target_error_is_met_with_fewer_numbers_than_uniform(uneven):
    art, rep = compress_shared(uneven, CompressOptions(target_error=0.3, storage_dtype="float32", hash_sources=False))
    mean = lorazip.evaluate(art)["errors"]["mean"]
    assert mean <= 0.3 * 1.01
    uni, rep_u = compress_shared(uneven, CompressOptions(target_error=0.3, uniform_rank=True, storage_dtype="float32", hash_sources=False))
    assert lorazip.evaluate(uni)["errors"]["mean"] <= 0.3 * 1.01
    params = lambda a: lorazip.evaluate(a)["storage"]["compressed_params"]  # noqa: E731
    assert params(art) <= params(uni)
    assert rep["ranks"]["easy"] <= 2 < rep["ranks"]["hard"]


@pytest.mark.parametrize("uniform_rank", [2, 3, 5])
def test_per_module_never_worse_than_uniform_at_equal_bytes(uneven, uniform_rank):
    uni = lorazip.compress(uneven, uniform_rank, storage_dtype="float32", hash_sources=False)
    budget = uni.serialized_size()
    per, _ = compress_shared(uneven, CompressOptions(budget=budget, storage_dtype="float32", hash_sources=False))
    assert per.serialized_size() <= budget
    assert lorazip.evaluate(per)["errors"]["mean"] <= lorazip.evaluate(uni)["errors"]["mean"] + 1e-9


def test_allocate_greedy_prefers_steep_curves(uneven):
    curves = rank_curves(uneven, 6)
    ranks = allocate(curves, len(uneven), target_error=1e-6)
    assert ranks["easy"] == 2


def test_per_module_ranks_round_trip_through_artifact_and_export(uneven, tmp_path):
    art = lorazip.compress(uneven, 2, ranks={"hard": 5}, storage_dtype="float32", hash_sources=False)
    path = art.save(tmp_path / "r.lorazip.safetensors")
    back = lorazip.load_artifact(path)
    assert {m["name"]: m["rank"] for m in back.modules} == {"easy": 2, "hard": 5}
    state, cfg = lorazip.to_peft(back, back.names[0])
    assert cfg["r"] in (2, 5) and len(cfg["rank_pattern"]) == 1
    assert state["base_model.model.hard.lora_A.weight"].shape == (5, 24)
    capped = lorazip.compress(uneven, 2, ranks={"hard": 99}, hash_sources=False)  # "at most 99"
    hard = next(m for m in capped.modules if m["name"] == "hard")
    assert hard["rank_capped"]["requested"] == 99 and hard["rank"] == hard["rank_capped"]["rank"] < 99


def test_cli_budget_json(uneven, tmp_path, capsys):
    from lorazip.cli.main import main

    src = uneven.adapters[0].path.parent
    out = tmp_path / "c.lorazip.safetensors"
    rc = main(["compress", str(src), "-o", str(out), "--budget", "20KB", "--dtype", "float32", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert out.stat().st_size <= 20_000 and rep["rank_allocation"]["mode"] == "mixed"
    rc = main(["compress", str(src), "-o", str(tmp_path / "d.safetensors"), "--budget", "2x"])
    assert rc == 0 and (tmp_path / "d.safetensors").stat().st_size <= sum(
        a.weights_file.stat().st_size for a in uneven.adapters) / 2


def test_nested_fit_of_small_cores_matches_jd_full():
    """The rank curves' nested fits (exact alternating eigen-steps on R x R operators) reach the
    JD-Full optimum of the same small cores, never lose to their warm start, and recover exact
    low-rank structure."""
    from lorazip.compress.curves import nested_kept

    g = torch.Generator().manual_seed(4)
    n, R = 12, 10
    S = torch.randn(n, R, R, generator=g, dtype=torch.float64)
    w = 1 / S.square().sum((1, 2))
    eye = torch.eye(R, dtype=torch.float64).expand_as(S)
    X0 = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))[0]
    ww = w[:, None, None]  # the warm start rank_curves uses: the HOSVD order of the cores
    W = torch.linalg.eigh((ww * S @ S.transpose(1, 2)).sum(0))[1].flip(1)
    Z = torch.linalg.eigh((ww * S.transpose(1, 2) @ S).sum(0))[1].flip(1)
    for r in (1, 3, 6):
        kept = nested_kept(S, w, W[:, :r], Z[:, :r], tol=1e-12, max_iters=5000)
        ref = jd_full(S, eye, r, weights=w, tol=1e-12, max_iters=5000)
        total = float((w * S.square().sum((1, 2))).sum())
        assert float((w * kept).sum()) / total >= ref.objective * 0.99
        start = float((w * (W[:, :r].T @ S @ Z[:, :r]).square().sum((1, 2))).sum())
        assert float((w * kept).sum()) >= start
    Ub = torch.linalg.qr(torch.randn(R, 3, generator=g, dtype=torch.float64))[0]
    planted = Ub @ torch.randn(n, 3, 3, generator=g, dtype=torch.float64) @ Ub.T
    kept = nested_kept(planted, torch.ones(n, dtype=torch.float64), X0[:, :3], X0[:, :3], tol=1e-14)
    assert torch.allclose(kept, planted.square().sum((1, 2)), rtol=1e-10)


def test_nested_fit_kept_energies_are_those_of_its_bases():
    """The energies nested_fit reports (leading blocks of one rotated core for the ranks it does not
    refine, direct products for those it does) are ||X_r^T S_i Y_r||^2 of the bases it returns."""
    from lorazip.compress.curves import nested_fit

    g = torch.Generator().manual_seed(7)
    n, R = 9, 8
    S = torch.randn(n, R, R, generator=g, dtype=torch.float64) * torch.logspace(0, -2, R, dtype=torch.float64)
    w = 1 / S.square().sum((1, 2))
    XY, kept = nested_fit(S, w, R, refine={2, 5})
    assert sorted(XY) == sorted(kept) == list(range(R + 1))
    for r, (X, Y) in XY.items():
        assert torch.allclose(kept[r], (X.T @ S @ Y).square().sum((1, 2)), rtol=1e-12, atol=1e-15), r


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 7, 1000, 1 << 16, (1 << 16) + 5]), steps=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_steps_by_adapter_are_the_stable_sort(n, steps, seed):
    """Each adapter's steps in their global order (the allocator's ``by_adapter``, a radix sort where
    the adapters' indices fit 16 bits) are the stable argsort of the steps' adapters, ties in order."""
    from lorazip.compress.allocate import by_adapter

    who = np.random.default_rng(seed).integers(0, min(n, 50) if seed % 2 else n, steps).astype(np.int32)
    assert np.array_equal(by_adapter(who, n), np.argsort(who, kind="stable"))
