"""Shared parts on K clusters of adapters plus per-adapter residual parts (``--budget --clusters``),
against dense float64 references: curves, planted clusters, stored errors, export, serving, update."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.artifact import load_artifact
from lorazip.compress.clusters import cluster_adapters
from lorazip.compress.allocate import Allocation, allocate_mixed
from lorazip.compress.budget import compress_mixed
from lorazip.compress.build import build_allocation
from lorazip.compress.curves import fit_module
from lorazip.compress.plan import Clusters
from helpers import svd_frontier, write_collection, write_planted_groups

MODULES = {"m.q": (20, 12), "m.v": (9, 14), "m.o": (16, 16)}


def _dense_errors(art, coll) -> np.ndarray:
    """Per-adapter energy-weighted relative error of ``U_k S_i V_k^T + b_i a_i`` against the
    originals, from dense float64 matrices (independent of lorazip's metrics)."""
    n = len(coll)
    err, tot = np.zeros(n), np.zeros(n)
    for mod in art.modules:
        f = coll.module_factors(mod["name"])
        M = f.B.double() @ f.A.double()
        U, V, cores, assign = art.module_factors(mod["name"])
        b, a, _ = art.module_residuals(mod["name"])
        U, V = U.double()[assign], V.double()[assign]
        R = U @ cores.double() @ V.transpose(1, 2) + b.double() @ a.double()
        err += (M - R).square().sum((1, 2)).numpy()
        tot += M.square().sum((1, 2)).numpy()
    return err / tot


def test_clustered_curves_match_dense_svd(tmp_path):
    labels = write_planted_groups(tmp_path / "c", (4, 3), d=24, r_shared=3, seed=1, noise=0.05)
    coll = lorazip.load_collection(tmp_path / "c")
    f = coll.module_factors("layer.q")
    assign = torch.tensor(labels)
    fit = fit_module(f.B, f.A, "layer.q", 5, weighting="relative", seed=0, tol=1e-10, max_iters=500, assign=assign)
    assert fit.K == 2 and fit.U.shape == (2, 24, 5) and torch.equal(fit.assign, assign)
    M = f.B.double() @ f.A.double()
    for r, sp in fit.spectra.items():
        X, Y = fit.XY[r]
        for i in range(len(coll)):
            k = labels[i]
            U, V = fit.U[k] @ X[k], fit.V[k] @ Y[k]
            assert torch.allclose(U.T @ U, torch.eye(r, dtype=U.dtype), atol=1e-10)  # orthonormal per cluster
            R = M[i] - U @ (U.T @ M[i] @ V) @ V.T
            want = torch.linalg.svdvals(R).square()
            L = min(len(want), sp.shape[1])
            tiny = 1e-10 * float(M[i].square().sum())
            assert torch.allclose(sp[i][:L], want[:L], rtol=1e-8, atol=tiny)
            assert abs(float(fit.shared[r][i]) - float(R.square().sum())) <= 1e-9 * float(M[i].square().sum())
    # the first cluster's curves are those of a fit on its adapters alone
    idx = torch.nonzero(assign == 0).flatten()
    alone = fit_module(f.B[idx], f.A[idx], "layer.q", 5, weighting="relative", seed=0, tol=1e-10, max_iters=500)
    assert torch.allclose(fit.shared[3][idx], alone.shared[3])


def test_planted_clusters_are_found_and_exact_where_one_basis_is_not(tmp_path):
    """Two groups, each in its own rank-2 subspace pair, every adapter with one direction of its
    own: exact with K = 2 bases of rank 2 plus a rank-1 residual per adapter, and nothing else
    is exact at those bytes."""
    labels = write_planted_groups(tmp_path / "p", (10, 10), d=48, r_shared=2, seed=0, own=1.0)
    coll = lorazip.load_collection(tmp_path / "p")
    groups = cluster_adapters(coll, 2, CompressOptions(rank=2))
    got = groups.assign[0].tolist()
    assert got == labels or got == [1 - x for x in labels]  # the planted groups, up to their order
    art, rep = compress_mixed(coll, CompressOptions(target_error=1e-9, storage_dtype="float32", hash_sources=False), groupings=[groups])  # the fewest bytes that are exact
    assert rep["n_clusters"] == 2 and rep["ranks"]["layer.q"] == 2
    assert rep["residual_ranks"]["layer.q"] == {"total": 20, "max": 1}
    assert float(_dense_errors(art, coll).max()) < 1e-9
    budget = art.serialized_size() + 64  # the metadata of a budget run differs by a few bytes
    # one shared basis with residuals cannot do it at these bytes, nor K = 2 bases alone
    one, _ = compress_mixed(coll, CompressOptions(budget=budget, storage_dtype="float32", hash_sources=False))
    assert float(lorazip.evaluate(one)["errors"]["mean"]) > 1e-3
    auto = lorazip.compress(coll, 2, clusters="auto", budget=budget, storage_dtype="float32", hash_sources=False)
    curve = {row["K"]: row for row in auto.cluster_choice["curve"]}
    assert curve[2]["mean"] > 1e-3
    assert auto.cluster_choice["chosen"] == "mix K=2" and auto.serialized_size() <= budget
    assert float(lorazip.evaluate(auto)["errors"]["max"]) < 1e-9
    assert auto.meta["method"] == "jd-clustered" and auto.meta["clustering"]["n_clusters"] == 2
    assert {t["K"] for t in auto.allocation["clusters_tried"]} >= {1, 2}
    # the library call with a fixed K does the same
    k2 = lorazip.compress(coll, 2, clusters=2, budget=budget, storage_dtype="float32", hash_sources=False)
    assert k2.allocation["n_clusters"] == 2 and float(lorazip.evaluate(k2)["errors"]["max"]) < 1e-9


@pytest.mark.parametrize("dtype,budget,residual", [("float32", 5000, True), ("float16", 3500, None),
                                                   ("int8", 3100, None)])
def test_stored_errors_are_exact_and_predicted(tmp_path, dtype, budget, residual):
    write_planted_groups(tmp_path / "c", (4, 4), d=32, r_shared=3, seed=4, noise=0.05)
    coll = lorazip.load_collection(tmp_path / "c")
    groups = cluster_adapters(coll, 2, CompressOptions(rank=3))
    art, rep = compress_mixed(coll, CompressOptions(budget=budget, storage_dtype=dtype, hash_sources=False), groupings=[groups])
    assert art.serialized_size() <= budget and rep["n_clusters"] == 2
    assert art.modules[0]["rank"] > 0 and art.modules[0]["n_clusters"] == 2
    if residual is not None:  # (the other dtypes' choice depends on the few header bytes of the paths)
        assert bool(rep["residual_ranks"]["layer.q"]["total"]) is residual
    path = art.save(tmp_path / "a.lorazip.safetensors")
    back = load_artifact(path)
    dense = _dense_errors(back, coll)
    rep_e = lorazip.evaluate(back)["adapters"]
    assert np.allclose([a["error"] for a in rep_e], dense, rtol=1e-7, atol=1e-12)
    if dtype == "float32":  # the prediction from the curves is what is stored, up to float32 rounding
        assert rep["predicted_mean_error"] == pytest.approx(float(dense.mean()), rel=1e-4, abs=1e-9)
    assert lorazip.verify(path)["problems"] == []
    recomputed = lorazip.evaluate(back, sources=tmp_path / "c")
    assert recomputed["errors"]["mean"] == pytest.approx(float(dense.mean()), rel=1e-7)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), frac=st.floats(0.05, 0.6), K=st.integers(2, 3))
def test_clustered_mix_never_worse_than_per_adapter_svd(tmp_path_factory, seed, frac, K):
    root = tmp_path_factory.mktemp("cmix")
    write_collection(root / "c", n=5, modules=MODULES, r=4, seed=seed)
    coll = lorazip.load_collection(root / "c")
    assign = torch.arange(5) % K
    fits = []
    for m in coll.modules:
        f = coll.module_factors(m.name)
        fits.append(fit_module(f.B, f.A, m.name, min(coll.shared_ranks(m.name, 6)), weighting="relative",
                               seed=0, tol=1e-8, max_iters=500, assign=assign))
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    full = sum(4 * (d_in + d_out) * len(coll) for d_out, d_in in MODULES.values())
    numbers = int(frac * full)
    alloc = allocate_mixed(fits, E, numbers=numbers)
    shared = sum(K * r * f.dim + 5 * r * r for f, r in zip(fits, alloc.ranks.values()))
    assert alloc.numbers == shared + sum(int(k.sum()) * f.dim for f, k in zip(fits, alloc.residual.values()))
    assert alloc.numbers <= numbers
    assert alloc.predicted <= 1.02 * svd_frontier(coll, numbers) + 1e-12


@pytest.mark.filterwarnings("ignore::lorazip.update.UpdateWarning")
def test_update_and_cli_on_a_clustered_mix(tmp_path, capsys):
    from helpers import run_cli

    write_collection(tmp_path / "c", n=6, modules=MODULES, r=4, seed=8)
    write_collection(tmp_path / "new", n=1, modules=MODULES, r=4, seed=99)
    out = tmp_path / "a.lorazip.safetensors"
    rc, stdout, stderr = run_cli(capsys, "compress", tmp_path / "c", "-o", out, "--rank", "3", "--clusters", "2",
                                 "--budget", "14KB", "--json")
    assert rc == 0 and "K = 2 groups' bases" in " ".join(stderr.split())
    rep = json.loads(stdout)
    assert rep["rank_allocation"]["n_clusters"] == 2 and rep["clustering"]["n_clusters"] == 2
    art = load_artifact(out)
    coll = lorazip.load_collection(tmp_path / "c")
    before = _dense_errors(art, coll)
    smaller, _ = lorazip.remove_adapters(art, [art.names[1]])
    keep = [i for i in range(6) if i != 1]
    assert np.allclose([a["error"] for a in lorazip.evaluate(smaller)["adapters"]], before[keep], rtol=1e-7)
    bigger, _ = lorazip.add_adapters(art, tmp_path / "new" / "a0", names=["extra"], hash_sources=False)
    assert bigger.names[-1] == "extra"
    got = lorazip.evaluate(bigger)["adapters"]
    assert np.allclose([a["error"] for a in got[:6]], before, rtol=1e-7)


# -- export through PEFT and serving in mixed batches --------------------------------------------
def _forced(coll, groups, rank: int, k_of):
    """Pass 2 of the mixed allocator at a forced allocation: shared ``rank`` per module on
    ``groups``, residual rank ``k_of(i, j)`` for adapter i in module j (0 where it lacks it)."""
    from lorazip.compress.provenance import SourceHashes

    fits, resid = [], {}
    for j, m in enumerate(coll.modules):
        f = coll.module_factors(m.name)
        fit = fit_module(f.B, f.A, m.name, min(coll.shared_ranks(m.name, 4)), weighting="relative", seed=0,
                         tol=1e-8, max_iters=200, assign=groups.assign[j])
        fits.append(fit)
        has = [m.name in a.modules for a in coll.adapters]
        resid[m.name] = np.array([min(k_of(i, j), fit.residual_cap(rank)) if has[i] else 0 for i in range(len(coll))])
    alloc = Allocation({f.name: rank for f in fits}, resid, 0, 0.0, "forced", errors=np.zeros(len(coll)))
    opts = CompressOptions(weighting="relative", seed=0, tol=1e-8, max_iters=200)
    return build_allocation(coll, opts, fits, alloc.plan(fits, "float32", groups), SourceHashes(coll, False),
                            target_error=None)


def test_export_and_serve_clustered_mix_match_peft(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    v2 = sys.modules.get("test_format_v2")
    if v2 is None:
        import test_format_v2 as v2
    from lorazip.serve import use_adapters

    z = v2._gpt2(tmp_path)
    coll = lorazip.load_collection(z.src)
    groups = Clusters(2, [torch.tensor([0, 1, 1, 0])] * len(coll.modules))
    # these random adapters share nothing, so the allocator keeps per-adapter parts only: force
    # shared rank 2 on both clusters and residual ranks (i + j) % 3 to test the format downstream
    art = _forced(coll, groups, 2, lambda i, j: (i + j) % 3)
    assert all(m["rank"] == 2 and m["n_clusters"] == 2 for m in art.modules)
    assert any(m.get("residual") for m in art.modules)
    assert np.allclose([a["error"] for a in lorazip.evaluate(art)["adapters"]], _dense_errors(art, coll), rtol=1e-7)
    z.art = load_artifact(art.save(tmp_path / "k2.lorazip.safetensors"))
    z.out = tmp_path / "exported"
    lorazip.export(z.art, z.out)
    ref = {None: v2._logits(z.base, z.ids)}
    for name in z.names:
        got = v2._logits(v2._peft(z, name), z.ids)
        want = v2._logits(v2._merged(z, name), z.ids)
        assert torch.allclose(got, want, **v2.TOL), float((got - want).abs().max())
        ref[name] = got
    model = lorazip.apply(copy.deepcopy(z.base), z.art)
    rows = [z.names[0], z.names[1], None, z.names[2], z.names[3], z.names[1]]
    with use_adapters(model, rows):
        got = v2._logits(model, z.ids)
    want = torch.stack([ref[name][j] for j, name in enumerate(rows)])
    assert torch.allclose(got, want, **v2.TOL), float((got - want).abs().max())


def test_fixed_k_with_a_budget_refuses_what_it_cannot_combine(tmp_path):
    write_collection(tmp_path / "c", n=4, modules=MODULES, r=4, seed=2)
    coll = lorazip.load_collection(tmp_path / "c")
    art = lorazip.compress(coll, 2, clusters=2, budget=8000, memory_limit=1 << 30, hash_sources=False)
    assert art.allocation["n_clusters"] == 2  # a memory limit every module fits is no obstacle
    for kw in ({"uniform_rank": True}, {"method": "jd-diag"}):
        with pytest.raises(lorazip.OptionError, match="clusters"):
            lorazip.compress(coll, 2, clusters=2, budget=8000, **kw)
    with pytest.raises(lorazip.OptionError, match="between 1 and the number of adapters"):
        lorazip.compress(coll, 2, clusters=9, budget=8000)
