"""Shared + per-adapter residual parts and their allocator, against dense float64 references."""

from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.compress.allocate import allocate_mixed
from lorazip.compress.budget import compress_mixed
from lorazip.compress.curves import fit_module
from lorazip.metrics import squared_errors
from lorazip.solvers.residual import residual_factors
from helpers import svd_frontier, write_collection, write_planted_groups

allocate = importlib.import_module("lorazip.compress.allocate")

MODULES = {"m.q": (20, 12), "m.v": (9, 14), "m.o": (16, 16)}


def _dense(f):
    return f.B.double() @ f.A.double()


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_residual_factors_are_the_dense_truncated_svd_of_the_residual():
    n, d_out, d_in, r_i, r = 5, 13, 11, 3, 2
    B, A = _rand(n, d_out, r_i, seed=1), _rand(n, r_i, d_in, seed=2)
    U = torch.linalg.qr(_rand(d_out, r, seed=3))[0]
    V = torch.linalg.qr(_rand(d_in, r, seed=4))[0]
    S = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)
    k = torch.tensor([0, 1, 2, 3, 5])
    b, a = residual_factors(B, A, U, V, S, k)
    for i in range(n):
        R = B[i] @ A[i] - U @ S[i] @ V.T
        sv = torch.linalg.svdvals(R)
        got = (R - b[i] @ a[i]).square().sum()
        want = sv[int(k[i]):].square().sum()
        assert abs(float(got - want)) <= 1e-10 * float(R.square().sum())
    e2, _ = squared_errors(B, A, U[None], V[None], S, residual=(b, a))
    dense = torch.stack([(B[i] @ A[i] - U @ S[i] @ V.T - b[i] @ a[i]).square().sum() for i in range(n)])
    assert torch.allclose(e2, dense, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 9.0), shared=st.sampled_from([0, 2]),
       inside=st.booleans(), d_out=st.sampled_from([3, 17]))
def test_residual_svd_both_routes_match_dense(seed, spread, shared, inside, d_out):
    """The Gram route (well-conditioned stacked factors) and the QR route (columns scaled over up to
    9 decades, a shared part inside the adapter's own span: rank-deficient, or fewer rows than
    columns) give the dense residual's truncated SVD, within 1e-10 of its energy, with orthonormal
    singular vectors."""
    from lorazip.solvers import residual as res

    n, d_in, r_i = 6, 14, 4
    B, A = _rand(n, d_out, r_i, seed=seed % 1000), _rand(n, r_i, d_in, seed=seed % 1000 + 1)
    scale = torch.logspace(0, -spread, r_i, dtype=torch.float64)  # condition number up to 1e9
    B[::2] = B[::2] * scale  # every other adapter ill-conditioned: both routes in one batch
    U = torch.linalg.qr(_rand(d_out, max(shared, 1), seed=seed % 1000 + 2))[0][:, :shared]
    V = torch.linalg.qr(_rand(d_in, max(shared, 1), seed=seed % 1000 + 3))[0][:, :shared]
    if inside and shared:
        U = torch.linalg.qr(B[1] @ _rand(r_i, shared, seed=seed % 1000 + 4))[0]  # inside adapter 1's span
    S = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)
    P, s, Q = res.residual_svd(B, A, U, V, S)
    assert s.shape == (n, min(d_out, d_in, r_i + shared)) and P.shape[2] == Q.shape[2] == s.shape[1]
    L, Rt = res._stack_factors(B, A, U, V, S)  # the same decompositions from Grams the caller gives
    given = res.factor_svd(L, Rt, (L.transpose(1, 2) @ L, Rt.transpose(1, 2) @ Rt))
    assert all(torch.equal(x, y) for x, y in zip(given, (P, s, Q)))
    eye = torch.eye(r_i + shared, dtype=torch.float64)
    for i in range(n):
        R = B[i] @ A[i] - U @ S[i] @ V.T
        ref = torch.linalg.svdvals(R)
        m = min(len(ref), r_i + shared)
        assert torch.allclose(s[i, :m], ref[:m], rtol=0, atol=1e-10 * float(ref[0]) + 1e-300)
        keep = s[i] > 1e-6 * s[i, 0]  # directions of a (numerically) nonzero singular value
        for X in (P[i][:, keep], Q[i][:, keep]):
            assert torch.allclose(X.T @ X, eye[: int(keep.sum()), : int(keep.sum())], atol=1e-8)
        for k in range(m + 1):
            got = (R - (P[i, :, :k] * s[i, :k]) @ Q[i, :, :k].T).square().sum()
            assert abs(float(got - ref[k:].square().sum())) <= 1e-10 * float(R.square().sum()) + 1e-300


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 9.0), shared=st.sampled_from([0, 2]),
       clusters=st.booleans(), d_out=st.sampled_from([3, 17]))
def test_residual_rows_are_residual_factors_in_float32(seed, spread, shared, clusters, d_out):
    """The float32 rows of the builds below float32 storage (:func:`residual_rows`) are
    :func:`residual_factors`' parts (well-conditioned adapters through the Gram route with float32
    products, ill-conditioned ones through float64 QR; clusters; ranks 0 to full) within float32
    rounding of the residual's scale; stored low-bit and int8 (:func:`store_rows`), they give what
    :func:`store_residual` gives of the same values, and exact errors on them."""
    from lorazip.quantize import store_residual, store_rows
    from lorazip.solvers.residual import residual_rows

    n, d_in, r_i = 7, 14, 4
    B, A = _rand(n, d_out, r_i, seed=seed % 1000), _rand(n, r_i, d_in, seed=seed % 1000 + 1)
    B[::2] = B[::2] * torch.logspace(0, -spread, r_i, dtype=torch.float64)
    B, A = B.float().double(), A.float().double()  # what the builds read: float32 values
    K = 2 if clusters else 1
    U = torch.stack([torch.linalg.qr(_rand(d_out, max(shared, 1), seed=seed % 1000 + 2 + c))[0][:, :shared]
                     for c in range(K)])
    V = torch.stack([torch.linalg.qr(_rand(d_in, max(shared, 1), seed=seed % 1000 + 4 + c))[0][:, :shared]
                     for c in range(K)])
    assign = torch.arange(n) % K if clusters else None
    Ua, Va = (U[assign], V[assign]) if clusters else (U[0], V[0])
    S = (B.transpose(1, 2) @ Ua).transpose(1, 2) @ (A @ Va)
    k = torch.tensor([0, 1, 2, 3, 5, 6, 2])[:n].clamp_max(min(d_out, d_in, r_i + shared))  # at most the rank
    UU, VV = (U, V) if clusters else (U[0], V[0])
    b, a = residual_factors(B, A, UU, VV, S, k, assign)
    rb, ra = residual_rows(B, A, UU, VV, S, k, assign)
    assert rb.dtype == ra.dtype == torch.float32
    assert rb.shape == (n, b.shape[2], d_out) and ra.shape == a.shape
    for i in range(n):
        scale = float((B[i] @ A[i]).norm()) + 1e-30
        assert torch.allclose(rb[i].double().T @ ra[i].double(), b[i] @ a[i], rtol=0, atol=2e-5 * scale)
        assert not rb[i, int(k[i]):].any() and not ra[i, int(k[i]):].any()
    bits = torch.tensor([1, 2, 3, 4, 8] * 4, dtype=torch.uint8)[: int(k.sum())]
    for storage, bb in (("int8", None), ("int8", bits)):
        got = store_rows(rb, ra, k, storage, bb)
        want = store_residual(rb.transpose(1, 2).double(), ra.double(), k, storage, bb)
        for x, y in zip(got[:2], want[:2]):
            assert all(torch.equal(p, q) for p, q in zip(x, y))
        assert torch.equal(got[2].double(), want[2]) and torch.equal(got[3].double(), want[3])
        e2, _ = squared_errors(B, A, U, V, S, assign, residual=(got[2], got[3]))
        dense = torch.stack([(B[i] @ A[i] - Ua[i if clusters else slice(None)] @ S[i] @ Va[i if clusters else slice(None)].T
                              - got[2][i].double() @ got[3][i].double()).square().sum() for i in range(n)])
        assert torch.allclose(e2, dense, rtol=1e-9, atol=1e-12)


def test_nested_residual_spectra_match_dense_svd(tmp_path):
    write_collection(tmp_path / "c", n=4, modules=MODULES, r=3, seed=5)
    coll = lorazip.load_collection(tmp_path / "c")
    f = coll.module_factors("m.q")
    fit = fit_module(f.B, f.A, "m.q", 6, weighting="relative", seed=0, tol=1e-10, max_iters=500)
    M = _dense(f)
    for r, sp in fit.spectra.items():
        X, Y = fit.XY[r]
        U, V = fit.U @ X, fit.V @ Y
        for i in range(4):
            R = M[i] - U @ (U.T @ M[i] @ V) @ V.T
            want = torch.linalg.svdvals(R).square()
            L = min(len(want), sp.shape[1])  # the residual has rank <= r_i + R: the rest is zero
            tiny = 1e-10 * float(M[i].square().sum())
            assert torch.allclose(sp[i][:L], want[:L], rtol=1e-8, atol=tiny)
            assert float(want[L:].sum()) <= tiny
            assert abs(float(fit.shared[r][i]) - float(R.square().sum())) <= 1e-9 * float(M[i].square().sum())


def _mixed_numbers(art) -> int:
    tot = 0
    for mod in art.modules:
        r = mod["rank"]
        tot += r * (mod["d_in"] + mod["d_out"]) + len(art.names) * r * r
        tot += mod.get("residual", {}).get("total_rank", 0) * (mod["d_in"] + mod["d_out"])
    return tot


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), frac=st.floats(0.05, 0.6))
def test_never_worse_than_per_adapter_svd_at_equal_numbers(tmp_path_factory, seed, frac):
    root = tmp_path_factory.mktemp("mix")
    write_collection(root / "c", n=4, modules=MODULES, r=4, seed=seed)
    coll = lorazip.load_collection(root / "c")
    full = sum(4 * (d_in + d_out) * len(coll) for d_out, d_in in MODULES.values())
    fits = []
    for m in coll.modules:
        f = coll.module_factors(m.name)
        fits.append(fit_module(f.B, f.A, m.name, min(coll.shared_ranks(m.name, 8)), weighting="relative",
                               seed=0, tol=1e-8, max_iters=500))
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    numbers = int(frac * full)
    alloc = allocate_mixed(fits, E, numbers=numbers)
    assert alloc.numbers <= numbers
    assert alloc.predicted <= 1.02 * svd_frontier(coll, numbers) + 1e-12
    # and never worse than uniform JD-Full at the same numbers (from its exact curve)
    for r in range(8, 0, -1):
        rk = [min(r, max(f.shared)) for f in fits]
        size = sum(k * f.dim + len(E) * k * k for f, k in zip(fits, rk))
        if size <= numbers:
            uni = np.mean(sum(f.shared[k].numpy() for f, k in zip(fits, rk)) / E)
            assert alloc.predicted <= uni + 1e-12
            break


def _fitted(coll):
    """Pass 1 of every module of ``coll`` to its largest shared rank (at most 8): the fits, each
    adapter's energy and the allocator's step curves."""
    fits = [fit_module(f.B, f.A, m.name, min(coll.shared_ranks(m.name, 8)), weighting="relative", seed=0,
                       tol=1e-8, max_iters=500) for m in coll.modules for f in [coll.module_factors(m.name)]]
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    return fits, E, allocate.StepCurves(fits, E)


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), target=st.floats(0.02, 0.5), lower=st.floats(0.5, 0.999),
       stat=st.sampled_from(["mean", "max"]))
def test_a_seeded_target_search_meets_the_lower_target_in_as_few_numbers(tmp_path_factory, seed, target, lower,
                                                                          stat):
    """A re-aim's search starts from the missed allocation (a lower target): it meets the new target,
    in the fewest numbers to within the search's tolerance (1/2000 of them), as the search from scratch."""
    root = tmp_path_factory.mktemp("seeded")
    write_collection(root / "c", n=5, modules=MODULES, r=4, seed=seed)
    fits, E, curves = _fitted(lorazip.load_collection(root / "c"))
    first = allocate_mixed(fits, E, target_error=target, stat=stat, curves=curves)
    goal = first.predicted * lower
    scratch = allocate_mixed(fits, E, target_error=goal, stat=stat, curves=curves)
    seeded = allocate_mixed(fits, E, target_error=goal, stat=stat, curves=curves,
                            seed=(first.numbers, first.predicted))
    if scratch.predicted > goal:  # nothing meets it: both give the most there is
        assert seeded.predicted == scratch.predicted
        return
    assert seeded.predicted <= goal and seeded.numbers >= first.numbers
    tol = max(seeded.numbers, scratch.numbers) // 2000 + 1  # each search's own tolerance
    assert seeded.numbers <= scratch.numbers + 2 * tol


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), target=st.floats(0.005, 0.6), planted=st.booleans())
def test_a_target_search_from_the_per_adapter_curve_meets_it_in_as_few_numbers(tmp_path_factory, monkeypatch,
                                                                                seed, target, planted):
    """The first search of a mean target starts from the numbers at which per-adapter parts alone meet
    it (an upper end every allocation meets): it meets the target in the fewest numbers to within the
    search's tolerance, as the search from every part at its most does, with or without shared bases."""
    root = tmp_path_factory.mktemp("percurve")
    if planted:
        write_planted_groups(root / "c", (8,), d=24, r_shared=4, seed=seed, noise=0.05)
    else:
        write_collection(root / "c", n=5, modules=MODULES, r=4, seed=seed)
    fits, E, curves = _fitted(lorazip.load_collection(root / "c"))
    got = allocate_mixed(fits, E, target_error=target, curves=curves)
    with monkeypatch.context() as m:
        m.setattr(allocate, "_per_adapter_meets", lambda *a: None)
        ref = allocate_mixed(fits, E, target_error=target, curves=curves)
    if ref.predicted > target:  # nothing meets it
        assert got.predicted == ref.predicted
        return
    assert got.predicted <= target
    tol = max(got.numbers, ref.numbers) // 2000 + 1
    assert got.numbers <= ref.numbers + 2 * tol


def test_planted_shared_bases_are_chosen_and_exact(tmp_path):
    write_planted_groups(tmp_path / "p", (30,), d=64, r_shared=3, seed=0)  # one group
    coll = lorazip.load_collection(tmp_path / "p")
    # shared rank 3 costs 3*128 + 30*9 numbers; per-adapter SVD needs 30*3*128 for the same error
    art, rep = compress_mixed(coll, CompressOptions(budget=40_000, storage_dtype="float32", hash_sources=False))
    assert rep["ranks"]["layer.q"] == 3
    assert float(lorazip.evaluate(art)["errors"]["max"]) < 1e-9
    assert art.serialized_size() <= 40_000


def test_budget_is_respected_and_report_is_exact(tmp_path):
    write_collection(tmp_path / "c", n=5, modules=MODULES, r=4, seed=9)
    coll = lorazip.load_collection(tmp_path / "c")
    for budget in (9_000, 20_000):
        art, rep = compress_mixed(coll, CompressOptions(budget=budget, storage_dtype="float32", hash_sources=False))
        assert art.serialized_size() <= budget
        got = lorazip.evaluate(art)["errors"]["mean"]
        assert math.isclose(got, rep["predicted_mean_error"], rel_tol=1e-4, abs_tol=1e-7)


def test_target_error_is_met_with_max_stat(tmp_path):
    write_collection(tmp_path / "c", n=5, modules=MODULES, r=4, seed=2)
    coll = lorazip.load_collection(tmp_path / "c")
    art, rep = compress_mixed(coll, CompressOptions(target_error=0.2, target_stat="max", storage_dtype="float32", hash_sources=False))
    assert lorazip.evaluate(art)["errors"]["max"] <= 0.2 + 1e-6
    smaller, _ = compress_mixed(coll, CompressOptions(target_error=0.4, target_stat="max", storage_dtype="float32", hash_sources=False))
    assert smaller.serialized_size() <= art.serialized_size()


def test_budget_runs_are_deterministic(tmp_path):
    write_collection(tmp_path / "c", n=4, modules=MODULES, r=4, seed=4)
    coll = lorazip.load_collection(tmp_path / "c")
    a, _ = compress_mixed(coll, CompressOptions(budget=12_000, hash_sources=False))
    b, _ = compress_mixed(coll, CompressOptions(budget=12_000, hash_sources=False))
    assert a.tensors().keys() == b.tensors().keys()
    for key, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[key]), key


def test_a_budget_below_the_kept_heads_says_so(tmp_path):
    heads = {"base_model.model.classifier.modules_to_save.default.weight": torch.randn(64, 64)}
    write_collection(tmp_path / "c", n=2, modules=MODULES, r=4, seed=1, extra_tensors=heads)
    coll = lorazip.load_collection(tmp_path / "c")
    with pytest.raises(lorazip.OptionError, match="modules_to_save") as err:
        compress_mixed(coll, CompressOptions(budget=20_000, hash_sources=False))
    # whole bytes, and the two ways out by their flags
    assert re.search(r"\(\d[\d,]* bytes, of which", str(err.value)) and ".0 bytes" not in str(err.value)
    assert "--extras-dtype int8" in str(err.value) and "--no-extras" in str(err.value)
    with pytest.raises(lorazip.OptionError, match="modules_to_save") as err:  # int8 already: one way out
        compress_mixed(coll, CompressOptions(budget=6_000, extras_dtype="int8", hash_sources=False))
    assert "--extras-dtype" not in str(err.value) and "--no-extras" in str(err.value)
    art, _ = compress_mixed(coll, CompressOptions(budget=20_000, keep_extras=False, hash_sources=False))
    assert art.serialized_size() <= 20_000


def _peft_folder_overhead(coll) -> int:
    """What keeping each adapter as its own PEFT folder spends besides factors: the safetensors
    header of its weights file (same keys as the original's) and its adapter_config.json."""
    import struct

    total = 0
    for a in coll.adapters:
        with open(a.weights_file, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
        total += (a.path / "adapter_config.json").stat().st_size
    return total


@pytest.mark.parametrize("seed", [3, 11])
def test_never_worse_than_the_alternatives_at_equal_file_bytes(tmp_path, seed):
    """At the artifact's file size: per-adapter truncated SVD kept as PEFT folders (dense SVD,
    greedy ranks over the bytes those folders leave for factors) and uniform JD-Full (the largest
    rank whose file fits), both measured independently of the allocator, from 3% to 60% of the
    original LoRA bytes."""
    write_collection(tmp_path / "c", n=6, modules=MODULES, r=4, seed=seed)
    coll = lorazip.load_collection(tmp_path / "c")
    item = 4  # float32 fixtures
    lora_bytes = item * sum(4 * (d_in + d_out) * len(coll) for d_out, d_in in MODULES.values())
    overhead = _peft_folder_overhead(coll)
    uniform = {}
    for r in range(1, 9):
        art = lorazip.compress(coll, r, storage_dtype="float32", hash_sources=False)
        uniform[r] = (art.serialized_size(), lorazip.evaluate(art)["errors"]["mean"])
    for frac in np.geomspace(0.03, 0.6, 6):
        budget = int(frac * lora_bytes) + overhead
        try:
            art = lorazip.compress(coll, budget=budget, storage_dtype="float32", hash_sources=False)
        except lorazip.OptionError:  # pragma: no cover - the artifact's own header does not fit
            raise AssertionError(f"nothing fits {budget} bytes, though PEFT folders could hold their headers")
        size = art.serialized_size()
        assert size <= budget
        err = lorazip.evaluate(art)["errors"]["mean"]
        svd = svd_frontier(coll, max(size - overhead, 0) // item)
        assert err <= 1.02 * svd + 1e-9, (frac, err, svd)
        fits = [e for s, e in uniform.values() if s <= size]
        if fits:
            assert err <= min(fits) + 1e-9, (frac, err, min(fits))


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("groupings", [1, 2])
@pytest.mark.parametrize("limit", [0, 1 << 40])
def test_pass_one_reads_are_kept_for_the_next_grouping_with_the_same_result(tmp_path, monkeypatch, limit, groupings,
                                                                            small):
    """With several groupings (candidate clusterings), or factors small in all, pass 1 keeps the
    factors it read (within a memory limit): the next grouping's pass 1 and pass 2 take them instead
    of reading every module again. With one grouping of large factors nothing is kept (pass 2 reads
    again, from the page cache). The artifact is the same either way."""
    import sys

    budget = sys.modules["lorazip.compress.budget"]  # lorazip.compress is also the function compress

    write_collection(tmp_path / "c", n=4, modules=MODULES, r=4, seed=5)
    coll = lorazip.load_collection(tmp_path / "c")
    opts = CompressOptions(budget=12_000, hash_sources=False, storage_dtype="float32")
    ref, _ = compress_mixed(coll, opts)
    calls = []
    real = type(coll).module_factors

    def counting(self, name, *a, **k):
        calls.append(name)
        return real(self, name, *a, **k)

    monkeypatch.setattr(type(coll), "module_factors", counting)
    monkeypatch.setattr(budget, "keep_limit", lambda: limit)
    monkeypatch.setattr(budget, "_KEEP_ALL", 1 << 40 if small else 0)
    art, _ = compress_mixed(coll, opts, groupings=[None] * groupings)
    kept = limit and (groupings > 1 or small)
    assert len(calls) == len(MODULES) * (1 if kept else groupings + 1)  # each pass 1, then pass 2
    assert ref.tensors().keys() == art.tensors().keys()
    for key, t in ref.tensors().items():
        assert torch.equal(t, art.tensors()[key]), key


def test_residual_spectra_of_rank_deficient_factors_match_dense_svd(tmp_path):
    """Zero-padded (mixed-rank) factors and adapters inside the shared subspace make the small
    Grams singular: the Cholesky factor falls back to a square root there, the spectra stay exact."""
    from lorazip.solvers.residual import nested_residual_spectra

    g = torch.Generator().manual_seed(3)
    n, d, R = 6, 20, 5
    U = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64))[0]
    B = torch.randn(n, d, 4, generator=g, dtype=torch.float64)
    A = torch.randn(n, 4, d, generator=g, dtype=torch.float64)
    B[0, :, 2:] = 0  # a rank-2 adapter padded to rank 4
    A[0, 2:] = 0
    A[1] = torch.randn(4, R, generator=g, dtype=torch.float64) @ V.T  # inside span V
    S = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)
    eye = torch.eye(R, dtype=torch.float64)
    XY = {r: (eye[:, :r], eye[:, :r]) for r in (0, 1, 3, 5)}
    sp = nested_residual_spectra(B, A, U, V, S, XY)
    for r, (X, Y) in XY.items():
        Ur, Vr = U @ X, V @ Y
        for i in range(n):
            M = B[i] @ A[i]
            want = torch.linalg.svdvals(M - Ur @ (Ur.T @ M @ Vr) @ Vr.T).square()
            L = min(len(want), sp[r].shape[1])
            assert torch.allclose(sp[r][i, :L], want[:L], rtol=1e-8, atol=1e-10 * float(M.square().sum()))


def test_auto_dtype_stores_int8_only_where_it_does_better(tmp_path):
    """``storage_dtype="auto"`` under a budget or target sizes the adapters' own precision and int8
    on the same curves; int8 is kept only when what it stores is better (budget) or smaller while
    meeting the target; a given dtype is kept as given."""
    mods = {"m.q": (64, 48), "m.v": (48, 64)}
    write_collection(tmp_path / "c", n=5, modules=mods, r=8, seed=21, dtype=torch.float16)
    coll = lorazip.load_collection(tmp_path / "c")
    assert coll.storage_dtype() == "float16"
    full = sum(8 * (d_in + d_out) * 2 * 5 for d_out, d_in in mods.values())  # fp16 LoRA bytes

    def mean(art):
        return float(lorazip.evaluate(art)["errors"]["mean"])

    mid = int(0.5 * full)
    auto = lorazip.compress(coll, budget=mid, hash_sources=False)
    fp16 = lorazip.compress(coll, budget=mid, storage_dtype="float16", hash_sources=False)
    assert fp16.meta["storage_dtype"] == "float16" and fp16.allocation["dtypes"].keys() == {"float16"}
    assert auto.meta["storage_dtype"] == "int8" and auto.allocation["storage_dtype"] == "int8"
    assert auto.serialized_size() <= mid and mean(auto) < mean(fp16)
    # room for every adapter's own factors in float16: near exact there, int8's rounding is not
    big = 3 * full
    auto = lorazip.compress(coll, budget=big, hash_sources=False)
    assert auto.meta["storage_dtype"] == "float16" and mean(auto) < 1e-5
    assert set(auto.allocation["dtypes"]) == {"float16", "bits"}
    # a target: the fewer bytes that meet it, exactly
    t_auto = lorazip.compress(coll, target_error=0.05, hash_sources=False)
    t_fp16 = lorazip.compress(coll, target_error=0.05, storage_dtype="float16", hash_sources=False)
    assert mean(t_auto) <= 0.05 and mean(t_fp16) <= 0.05
    assert t_auto.meta["storage_dtype"] == "int8" and t_auto.serialized_size() < t_fp16.serialized_size()
    near = lorazip.compress(coll, target_error=1e-4, hash_sources=False)  # below int8's room: not tried
    assert near.meta["storage_dtype"] == "float16" and mean(near) <= 1e-4


def test_build_takes_norms_and_spectra_from_pass_one_with_the_same_result(tmp_path, monkeypatch):
    """Pass 1 keeps each adapter's norm and singular values (``ModuleFit.own``, from the float32
    factors' Grams); the build takes them instead of making the Grams again: the same artifact, bit
    for bit, as a build that makes them (a fit without ``own``, as from factors of another dtype)."""
    import dataclasses
    import sys

    budget = sys.modules["lorazip.compress.budget"]
    build = sys.modules["lorazip.compress.build"]
    write_collection(tmp_path / "c", n=5, modules=MODULES, r=4, seed=9)
    coll = lorazip.load_collection(tmp_path / "c")
    opts = CompressOptions(target_error=0.05, hash_sources=False)
    calls = []
    real_spectra = build.spectra_from_grams
    monkeypatch.setattr(build, "spectra_from_grams", lambda *a: calls.append(1) or real_spectra(*a))
    art, _ = compress_mixed(coll, opts)
    assert not calls  # every module's build took pass 1's
    real_fit = budget.fit_module_task
    monkeypatch.setattr(budget, "fit_module_task",
                        lambda *a, **k: dataclasses.replace(real_fit(*a, **k), own=None))
    ref, _ = compress_mixed(coll, opts)
    assert len(calls) >= len(MODULES)
    assert ref.tensors().keys() == art.tensors().keys()
    for key, t in ref.tensors().items():
        assert torch.equal(t, art.tensors()[key]), key
