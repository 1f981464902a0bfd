"""Modules larger than memory: solvers as reductions over chunks of adapters, and `--memory-limit`."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.compress.streaming import MemoryPlan
from lorazip.errors import OptionError
from lorazip.io.collection import Collection
from lorazip.solvers import Factors, jd_diag, jd_full
from lorazip.solvers.jd_diag import jd_diag_factors
from lorazip.solvers.jd_full import jd_full_factors
from tests.helpers import assert_one_error_line, run_cli, write_adapter, write_collection
from tests.test_solvers import random_factors

F64 = torch.float64


def chunked(B, A, chunk, reads=None):
    """``Factors`` that re-slice ``B, A`` on every pass (one factor per read, as from disk)."""

    def read(start, stop, part):
        if reads is not None:
            reads.append((stop - start, part))
        return (B if part == "B" else A)[start:stop].clone()

    return Factors.from_reader(B.shape[0], B.shape[1], A.shape[2], B.shape[2], read, chunk, like=B[:0])


def span_distance(X, Y):
    return float(torch.linalg.norm(X @ X.T - Y @ Y.T))


@pytest.mark.parametrize("chunk", [1, 2, 5, 11])
def test_chunked_jd_full_equals_in_memory(chunk):
    B, A = random_factors(11, 30, 24, 5, seed=3, ranks=[5, 2, 3, 5, 1, 4, 5, 5, 2, 3, 5])
    ref = jd_full(B, A, 4, tol=1e-12, max_iters=3000)
    reads: list[tuple[int, str]] = []
    res = jd_full_factors(chunked(B, A, chunk, reads), 4, tol=1e-12, max_iters=3000)
    assert max(size for size, _ in reads) <= chunk
    # per chunk: both factors for the norms, 5 single-factor passes for the start (V: B's Grams, a
    # range of A and its Rayleigh-Ritz; U: a range of B and its Rayleigh-Ritz; one more for a power
    # iteration while n r_i < d_in, not here: 11 x 5 >= 24), then 4 per sweep
    per_pass = -(-11 // chunk)
    assert len(reads) == per_pass * (2 + 5 + 4 * res.n_iters)
    # 4 adapters of rank 5 with d_in = 24: 20 < 24, one power iteration (one more read); the data-driven
    # start alone (its 3 largest energies could hold twice what it holds: the singular values of every
    # adapter are made, from both factors read again, and the single-adapter start is not taken)
    wide = []
    wres = jd_full_factors(chunked(B[:4], A[:4], chunk, wide), 3, tol=1e-12, max_iters=3000, second_start=False)
    both = []
    wboth = jd_full_factors(chunked(B[:4], A[:4], chunk, both), 3, tol=1e-12, max_iters=3000)
    assert len(both) == len(wide) + 2 * -(-4 // chunk) and torch.equal(wboth.U, wres.U)
    assert len(wide) == -(-4 // chunk) * (2 + 6 + 4 * wres.n_iters)
    assert abs(res.objective - ref.objective) < 1e-10
    assert span_distance(res.U, ref.U) < 1e-6 and span_distance(res.V, ref.V) < 1e-6
    assert float(torch.linalg.norm(res.U.T @ res.U - torch.eye(4, dtype=F64))) < 1e-12
    # same fixed point: the optimal cores for these bases
    S = (B.transpose(1, 2) @ res.U).transpose(1, 2) @ (A @ res.V)
    assert torch.allclose(res.cores, S, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_jd_diag_equals_in_memory(chunk):
    B, A = random_factors(9, 20, 16, 4, seed=4)
    ref = jd_diag(B, A, 3, tol=1e-12, max_iters=400)
    res = jd_diag_factors(chunked(B, A, chunk), 3, tol=1e-12, max_iters=400)
    assert abs(res.objective - ref.objective) < 1e-8
    assert res.cores.shape == (9, 3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), chunk=st.integers(1, 9), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_chunked_reduction_is_the_same_sum(n, chunk, r, seed):
    """Any chunking gives the in-memory iterates up to rounding (same start, same sweeps)."""
    B, A = random_factors(n, 12, 10, 4, seed=seed)
    ref = jd_full(B, A, r, tol=1e-6, max_iters=20)
    res = jd_full_factors(chunked(B, A, chunk), r, tol=1e-6, max_iters=20)
    assert res.n_iters == ref.n_iters or abs(res.objective - ref.objective) < 1e-9
    assert abs(res.objective - ref.objective) < 1e-9


def test_memory_plan_streams_only_modules_over_a_third_of_the_limit(tmp_path):
    write_collection(tmp_path / "c", n=4, modules={"m.big": (64, 48), "m.small": (8, 6)}, r=4)
    coll = lorazip.load_collection(tmp_path / "c")
    big = 4 * 4 * (64 + 48) * 4  # n r (d_out + d_in) float32 bytes
    plan = MemoryPlan.make(coll, 4, 3 * big - 1, "jd-full")
    j = [m.name for m in coll.modules].index("m.big")
    assert plan.chunk == {j: (3 * big - 1) // (4 * big // 4)}
    assert MemoryPlan.make(coll, 4, 3 * big, "jd-full").chunk == {}
    assert MemoryPlan.make(coll, 4, None, "jd-full").chunk == {}
    with pytest.raises(OptionError, match="m.big"):
        MemoryPlan.make(coll, 4, big, "svd")
    with pytest.raises(OptionError, match="jd-clustered keeps a module's factors in memory"):
        MemoryPlan.make(coll, 4, big, "jd-clustered")
    with pytest.raises(OptionError, match="below what one adapter of module m.big needs"):
        MemoryPlan.make(coll, 4, 1000, "jd-full")


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
def test_compress_under_a_memory_limit_matches_in_memory(tmp_path, monkeypatch, method):
    mods = {"l0.q": (40, 32), "l0.v": (16, 32), "l1.q": (40, 32)}
    write_collection(tmp_path / "c", n=7, modules=mods, r=4, rank_pattern={"l1.q": 2}, seed=11)
    write_adapter(tmp_path / "c" / "a7", {"l0.q": (40, 32), "l1.q": (40, 32)}, r=2, seed=30)  # mixed ranks, no l0.v
    coll = lorazip.load_collection(tmp_path / "c")
    ref = lorazip.compress(coll, 3, method=method, compute_dtype="float64", tol=1e-10, hash_sources=False)
    calls: dict[str, list[int]] = {m: [] for m in mods}
    orig = Collection.module_factors

    def spy(self, name, indices=None, *a, **k):
        calls[name].append(len(self) if indices is None else len(list(indices)))
        return orig(self, name, indices, *a, **k)

    monkeypatch.setattr(Collection, "module_factors", spy)
    limit = 4 * 3 * 4 * (40 + 32) * 8  # float64: three adapters of the largest module per chunk
    got = lorazip.compress(coll, 3, method=method, compute_dtype="float64", tol=1e-10, hash_sources=False,
                           memory_limit=limit)
    # l0.q and l0.v stream, never more than one chunk of adapters at once (fewer bytes per
    # adapter: larger chunks); l1.q (rank 2) fits in a third of the limit and is read once
    assert max(calls["l0.q"]) == 3 and max(calls["l0.v"]) == limit // (4 * 4 * (16 + 32) * 8) == 4
    assert calls["l1.q"] == [8]
    e_ref, e_got = ref.get("stats/sq_error"), got.get("stats/sq_error")
    assert torch.allclose(e_got, e_ref, rtol=1e-7, atol=1e-12)
    for m in mods:
        assert torch.allclose(got.get(f"spectra/{m}"), ref.get(f"spectra/{m}"), rtol=1e-5, atol=1e-7)
        assert got.get(f"cores/{m}").shape == ref.get(f"cores/{m}").shape
    assert lorazip.evaluate(got)["errors"]["mean"] == pytest.approx(lorazip.evaluate(ref)["errors"]["mean"], rel=1e-7)


def test_streamed_numpy_backend_matches_torch(tmp_path):
    write_collection(tmp_path / "c", n=5, modules={"m.q": (24, 20)}, r=3, seed=2)
    coll = lorazip.load_collection(tmp_path / "c")
    limit = 4 * 2 * 3 * (24 + 20) * 8
    kw = dict(compute_dtype="float64", tol=1e-10, hash_sources=False, memory_limit=limit)
    a = lorazip.compress(coll, 2, **kw)
    b = lorazip.compress(coll, 2, backend="numpy", **kw)
    assert torch.allclose(a.get("stats/sq_error"), b.get("stats/sq_error"), rtol=1e-9, atol=1e-14)


def test_cli_memory_limit(tmp_path, capsys):
    write_collection(tmp_path / "c", n=4, r=4, seed=5)
    out = tmp_path / "x.lorazip.safetensors"
    rc, stdout, err = run_cli(capsys, "compress", tmp_path / "c", "-o", out, "--rank", "2", "--memory-limit", "40KB",
                              "--json")
    assert rc == 0, err
    assert json.loads(stdout)["errors"]["mean"] < 1
    rc, _, err = run_cli(capsys, "compress", tmp_path / "c", "-o", tmp_path / "y", "--memory-limit", "lots")
    assert rc == 1
    assert_one_error_line(err, "cannot read memory limit 'lots'")
    rc, _, err = run_cli(capsys, "compress", tmp_path / "c", "-o", tmp_path / "y", "--memory-limit", "2KB",
                         "--clusters", "2", "--rank", "2")
    assert rc == 1
    assert_one_error_line(err, "jd-clustered keeps a module's factors in memory")
    assert not (tmp_path / "y").exists()


def test_budget_under_a_memory_limit_streams_the_rank_curves(tmp_path, monkeypatch):
    from lorazip.compress.budget import compress_shared
    from lorazip.compress.curves import rank_curves

    mods = {"l0.q": (40, 32), "l0.v": (16, 32)}
    write_collection(tmp_path / "c", n=6, modules=mods, r=4, seed=8)
    coll = lorazip.load_collection(tmp_path / "c")
    ref = rank_curves(coll, 6, tol=1e-8)
    calls: list[int] = []
    orig = Collection.module_factors

    def spy(self, name, indices=None, *a, **k):
        calls.append(len(self) if indices is None else len(list(indices)))
        return orig(self, name, indices, *a, **k)

    monkeypatch.setattr(Collection, "module_factors", spy)
    limit = 4 * 2 * 4 * (40 + 32) * 4  # float32: two adapters of l0.q per chunk
    got = rank_curves(coll, 6, tol=1e-8, memory_limit=limit)
    assert max(calls) <= 3
    for e_ref, e_got in zip(ref.errors, got.errors):  # float32 fits; chunked sums round differently
        assert torch.allclose(e_got, e_ref, rtol=1e-3, atol=1e-6)
    monkeypatch.undo()
    art, alloc = compress_shared(coll, CompressOptions(budget=40_000, memory_limit=limit, hash_sources=False))
    assert art.serialized_size() <= 40_000


def test_a_streamed_chunk_holds_one_copy_of_b():
    """Once the transposed copy exists, a chunk read from disk keeps B only as a view of it."""
    B, A = random_factors(5, 12, 10, 3, seed=9)
    for ch in chunked(B, A, 2):
        Bt2 = ch.Bt2
        assert torch.equal(ch.B, B[ch.start : ch.stop]) and ch.B.data_ptr() == Bt2.data_ptr()
    ch = next(iter(Factors.stacked(B, A)))
    ch.Bt2
    assert ch.B is B  # in memory the caller's array stays as it is
