"""Clustered JD: planted clusters, dense references, monotone objective, K = 1 is JD-Full."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.metrics import relative, squared_errors
from lorazip.cli.parse import parse_size
from lorazip.compress.clusters import candidate_ks, choose_clusters
from lorazip.solvers import jd_full
from lorazip.solvers.linalg import orth
from lorazip.solvers.clustered import jd_clustered, kmeans

F64 = torch.float64


def planted_clusters(K, per, d_out, d_in, r, r_i, seed, noise=0.0, n_modules=2):
    """K groups; each group's adapters live in the group's own random basis pair (per module)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(per)
    perm = torch.randperm(K * per, generator=g)
    labels = labels[perm]
    mods = []
    for _ in range(n_modules):
        bases = [(orth(torch.randn(d_out, r, generator=g, dtype=F64)), orth(torch.randn(d_in, r, generator=g, dtype=F64)))
                 for _ in range(K)]
        B = torch.stack([bases[k][0] @ torch.randn(r, r_i, generator=g, dtype=F64) for k in labels.tolist()])
        A = torch.stack([torch.randn(r_i, r, generator=g, dtype=F64) @ bases[k][1].T for k in labels.tolist()])
        if noise:
            B = B + noise * torch.randn(B.shape, generator=g, dtype=F64)
            A = A + noise * torch.randn(A.shape, generator=g, dtype=F64)
        mods.append((B, A))
    return mods, labels


def same_partition(a, b):
    """Assignments equal up to relabelling."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def rel_errors(mods, res):
    out = []
    for j, (B, A) in enumerate(mods):
        e2, n2 = squared_errors(B, A, res.U[j], res.V[j], res.cores[j], res.assignment[j])
        out.append(relative(e2, n2))
    return torch.stack(out, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_clusters_are_recovered_exactly(seed):
    mods, labels = planted_clusters(3, 4, 30, 24, 4, 4, seed)
    res = jd_clustered([0, 1], lambda m: mods[m], 3, 4, tol=1e-12, seed=seed)
    assert same_partition(res.assignment[0], labels)
    assert float(rel_errors(mods, res).max()) < 1e-10


def test_planted_clusters_with_noise_error_at_noise_level():
    mods, labels = planted_clusters(3, 5, 40, 30, 4, 4, seed=3, noise=1e-3)
    res = jd_clustered([0, 1], lambda m: mods[m], 3, 4, tol=1e-10)
    assert same_partition(res.assignment[0], labels)
    assert float(rel_errors(mods, res).max()) < 1e-4


def test_clustered_matches_dense_reference_per_cluster():
    # With the assignment fixed, each cluster's bases must be the dense HOOI optimum of its members.
    mods, labels = planted_clusters(2, 4, 16, 12, 3, 2, seed=4, noise=0.05)
    res = jd_clustered([0, 1], lambda m: mods[m], 2, 3, tol=1e-12, max_iters=3000)
    for j, (B, A) in enumerate(mods):
        M = B @ A
        w = 1 / M.square().sum((1, 2))
        for k in range(2):
            idx = (res.assignment[j] == k).nonzero().flatten()
            Mk, wk = M[idx], w[idx]
            U = torch.linalg.svd(torch.cat(list(Mk * wk.sqrt()[:, None, None]), 1))[0][:, :3]
            for _ in range(300):
                V = torch.linalg.svd(torch.cat(list((Mk * wk.sqrt()[:, None, None]).transpose(1, 2) @ U), 1))[0][:, :3]
                U = torch.linalg.svd(torch.cat(list((Mk * wk.sqrt()[:, None, None]) @ V), 1))[0][:, :3]
            Uk = res.U[j][k]
            assert float(torch.linalg.norm(Uk @ Uk.T - U @ U.T)) < 1e-6


def test_k1_is_exactly_jd_full():
    mods, _ = planted_clusters(2, 3, 20, 15, 3, 2, seed=5, noise=0.1)
    res = jd_clustered([0, 1], lambda m: mods[m], 1, 3, tol=1e-9)
    for j, (B, A) in enumerate(mods):
        ref = jd_full(B, A, 3, tol=1e-9)
        assert torch.equal(res.U[j][0], ref.U) and torch.equal(res.V[j][0], ref.V)
        assert torch.equal(res.cores[j], ref.cores)


def test_k_larger_than_n_is_an_error(tmp_path):
    mods, _ = planted_clusters(2, 2, 10, 8, 2, 1, seed=6)
    with pytest.raises(ValueError, match="between 1 and the number of adapters"):
        jd_clustered([0], lambda m: mods[m], 5, 2)


def test_empty_clusters_are_reseeded():
    # 4 identical adapters + 1 different: k-means cannot make 3 distinct groups, reseeding must.
    mods, _ = planted_clusters(1, 4, 12, 10, 2, 1, seed=7, n_modules=1)
    B, A = mods[0]
    B = torch.cat([B[:1].expand(4, -1, -1), B[1:2]])
    A = torch.cat([A[:1].expand(4, -1, -1), A[1:2]])
    res = jd_clustered([0], lambda m: (B, A), 3, 2, tol=1e-10)
    sizes = torch.bincount(res.assignment[0], minlength=3)
    assert bool((sizes > 0).all())


prop = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@prop
@given(st.integers(2, 4), st.integers(0, 1000), st.floats(0.0, 0.5))
def test_objective_never_increases_between_rounds(K, seed, noise):
    mods, _ = planted_clusters(K, 3, 14, 10, 2, 2, seed, noise=noise)
    res = jd_clustered([0, 1], lambda m: mods[m], K, 2, tol=1e-8, seed=seed)
    h = torch.tensor(res.history)
    assert bool((h[1:] <= h[:-1] + 1e-10).all())


@prop
@given(st.integers(2, 4), st.integers(0, 1000))
def test_more_clusters_never_hurt_from_the_same_start(K, seed):
    g = torch.Generator().manual_seed(seed)
    mods = [(torch.randn(8, 12, 2, generator=g, dtype=F64), torch.randn(8, 2, 10, generator=g, dtype=F64))]
    one = jd_clustered([0], lambda m: mods[m], 1, 3, tol=1e-9, seed=seed)
    init = [(one.U[0][0], one.V[0][0])]
    many = jd_clustered([0], lambda m: mods[m], K, 3, tol=1e-9, seed=seed, init=init)
    assert many.history[-1] <= one.history[-1] + 1e-10


def test_per_module_assignment_differs_per_module():
    mods, labels = planted_clusters(2, 3, 16, 12, 3, 3, seed=8)
    # second module: a different grouping of the same adapters
    B2, A2 = mods[1]
    perm = torch.tensor([0, 1, 2, 3, 4, 5])
    res = jd_clustered([0, 1], lambda m: mods[m], 2, 3, per_module=True, tol=1e-10)
    assert len(res.assignment) == 2
    assert float(rel_errors(mods, res).max()) < 1e-10
    assert same_partition(res.assignment[0], labels)
    del B2, A2, perm


def test_kmeans_plus_plus_is_seeded_and_separates_blobs():
    g = torch.Generator().manual_seed(9)
    X = torch.cat([torch.randn(10, 3, generator=g, dtype=F64) + 10 * c for c in range(3)])
    a = kmeans(X, 3, generator=torch.Generator().manual_seed(1))
    b = kmeans(X, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert same_partition(a, torch.arange(3).repeat_interleave(10))


def test_parse_size_and_candidates():
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("50x", original_bytes=1000) == 20
    assert parse_size("2%", original_bytes=1000) == 20 and parse_size("0.5 %", original_bytes=10**6) == 5000
    for bad, says in (("lots", "cannot read"), ("0%", "positive"), ("0x", "positive")):
        with pytest.raises(lorazip.OptionError, match=says):
            parse_size(bad, original_bytes=1000)
    with pytest.raises(lorazip.OptionError, match="percentage but the original size is unknown"):
        parse_size("2%")
    assert candidate_ks(5) == [1, 2, 3, 4, 5]
    assert candidate_ks(40)[:9] == [1, 2, 3, 4, 6, 8, 12, 16, 24]


def test_real_fixtures_clustered_artifact_roundtrip(tmp_path, fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / "gpt2")
    one = lorazip.compress(coll, 4, method="jd-clustered", clusters=1, hash_sources=False)
    three = lorazip.compress(coll, 4, method="jd-clustered", clusters=3, hash_sources=False)
    e1, e3 = lorazip.evaluate(one)["errors"]["mean"], lorazip.evaluate(three)["errors"]["mean"]
    assert e3 < e1
    path = three.save(tmp_path / "k3.lorazip.safetensors")
    art = lorazip.load_artifact(path)
    rep = lorazip.evaluate(art, fixtures_dir / "gpt2")
    assert abs(rep["errors"]["mean"] - e3) < 1e-9
    assert sum(rep["clustering"]["sizes"]) == 6 and len(rep["clustering"]["sizes"]) == 3
    assert {a["cluster"] for a in rep["adapters"]} == {0, 1, 2}
    # export of an adapter from its own cluster reproduces the stored reconstruction
    name = art.names[0]
    state, cfg = lorazip.to_peft(art, name)
    U, V, cores, assign = art.module_factors(art.modules[0]["name"], [0])
    key = f"base_model.model.{art.modules[0]['name']}"
    got = state[key + ".lora_B.weight"].double() @ state[key + ".lora_A.weight"].double()
    want = U[int(assign[0])].double() @ cores[0].double() @ V[int(assign[0])].double().T
    assert torch.allclose(got, want, atol=1e-6)


def test_choose_k_by_target_and_budget(fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / "gpt2")
    art, curve, K = choose_clusters(coll, CompressOptions(rank=4, clusters="auto", target_error=0.15, hash_sources=False))
    assert curve[-1]["mean"] <= 0.15 and all(r["mean"] > 0.15 for r in curve[:-1]) and K == curve[-1]["K"]
    budget = curve[1]["bytes"]  # K = 2 fits, K = 3 does not
    art, curve2, K2 = choose_clusters(coll, CompressOptions(rank=4, clusters="auto", budget=budget, hash_sources=False))
    assert K2 == 2 and art.serialized_size() <= budget
    with pytest.raises(lorazip.OptionError, match="no K fits"):
        choose_clusters(coll, CompressOptions(rank=4, clusters="auto", budget=1000, hash_sources=False))


def test_clusters_auto_with_a_budget_keeps_the_better_of_k_and_the_mix(fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / "gpt2")
    budget = 600_000
    art = lorazip.compress(coll, 4, clusters="auto", budget=budget, hash_sources=False)
    sel = art.cluster_choice
    fits = [row for row in sel["curve"] if row["bytes"] <= budget]
    best = min(fits, key=lambda row: row["mean"])
    assert sel["chosen"] == best["K"] and art.serialized_size() <= budget
    assert lorazip.evaluate(art)["errors"]["mean"] == pytest.approx(best["mean"])


def test_cli_clusters_auto_json(tmp_path, fixtures_dir, capsys):
    from lorazip.cli.main import main

    out = tmp_path / "a.lorazip.safetensors"
    rc = main(["compress", str(fixtures_dir / "gpt2"), "-o", str(out), "--rank", "4", "--clusters", "auto",
               "--target-error", "0.25", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    sel = rep["k_selection"]
    rows = {row["K"]: row for row in sel["curve"]}
    assert "mix" in rows  # one shared basis with per-adapter residual parts is a candidate too
    chosen = rows[sel["chosen"]]
    assert chosen["mean"] <= 0.25 and rep["errors"]["mean"] == pytest.approx(chosen["mean"])
    meeting = [row for row in sel["curve"] if row["mean"] <= 0.25]
    assert chosen["bytes"] == min(row["bytes"] for row in meeting)  # the least storage meeting the target
    if sel["chosen"] != "mix":
        assert sel["chosen"] == rep["clustering"]["n_clusters"]
    rc = main(["compress", str(fixtures_dir / "gpt2"), "-o", str(tmp_path / "b.safetensors"), "--clusters", "9"])
    assert rc == 1 and "between 1 and the number of adapters" in capsys.readouterr().err
