"""A re-aimed low-bit build keeps what did not change: only the adapters whose residual ranks or
bits changed are built again, and the artifact is the one a build from scratch gives, byte for byte."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lorazip
from lorazip.compress import budget
from lorazip.compress.build import FactorReads, build_allocation
from lorazip.compress.provenance import SourceHashes

from helpers import record_builds, write_collection, write_planted_groups


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    write_planted_groups(root, (24,), d=64, r_shared=8, seed=5, noise=0.05)
    return lorazip.load_collection(root)


@pytest.fixture(scope="module")
def iid(tmp_path_factory):
    root = tmp_path_factory.mktemp("iid")
    write_collection(root, n=21, modules={"q": (40, 24), "v": (24, 24), "o": (24, 40)}, r=4, seed=2)
    return lorazip.load_collection(root)


def _captured(coll, monkeypatch, **kw):
    """(fits, plan, opts) of the first real build of a compress run."""
    got = []
    real = budget.build_allocation

    def spy(collection, opts, fits, plan, *a, **k):
        if not k.get("dry") and not got:
            got.append((fits, plan, opts))
        return real(collection, opts, fits, plan, *a, **k)

    monkeypatch.setattr(budget, "build_allocation", spy)
    lorazip.compress(coll, hash_sources=False, **kw)
    monkeypatch.undo()
    return got[0]


def _changed(plan):
    """``plan`` with one adapter's last row dropped, one row's bits changed and one row added (in
    other modules where there are, else in other adapters); the other modules as they were."""
    mods = list(plan.modules)
    with_rows = [j for j, m in enumerate(mods) if m.bits is not None and len(m.bits)]
    assert with_rows
    for step in range(3):
        j = with_rows[step % len(with_rows)]
        m = mods[j]
        k, bits = np.array(m.residual), np.array(m.bits)
        start = np.concatenate([[0], np.cumsum(k)])
        nz = np.flatnonzero(k)
        i = int(nz[(step * len(nz)) // 3])
        if step == 0:  # drop adapter i's last row
            bits = np.delete(bits, start[i + 1] - 1)
            k[i] -= 1
        elif step == 1:  # another width for one of its rows
            bits[start[i]] = 2 if bits[start[i]] != 2 else 3
        else:  # one more row for the adapter with the fewest
            i = int(np.argmin(k))
            bits = np.insert(bits, start[i + 1], 2)
            k[i] += 1
        mods[j] = dataclasses.replace(m, residual=k, bits=bits.astype(np.uint8))
    return dataclasses.replace(plan, modules=tuple(mods)), sorted(set(with_rows[:3]))


def _counting_reads(coll, monkeypatch) -> list[str]:
    """The names of the modules whose factors are read from now on (until ``monkeypatch.undo()``)."""
    reads: list[str] = []
    real = type(coll).module_factors

    def counting(self, name, **k):
        reads.append(name)
        return real(self, name, **k)

    monkeypatch.setattr(type(coll), "module_factors", counting)
    return reads


def _bytes(art, path) -> bytes:
    art.save(path, overwrite=True)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["planted", "iid", "clusters"])
def test_a_rebuild_keeps_unchanged_adapters_and_equals_a_build_from_scratch(case, planted, two_groups, iid,
                                                                             monkeypatch, tmp_path):
    coll = {"iid": iid, "planted": planted, "clusters": two_groups}[case]
    kw = {"iid": dict(target_error=0.05), "planted": dict(target_error=0.002),
          "clusters": dict(target_error=0.002, clusters=2)}[case]
    fits, plan, opts = _captured(coll, monkeypatch, **kw)
    assert plan.storage_dtype == "bits"
    if case == "planted":
        assert any(m.rank > 0 for m in plan.modules)  # the shared part is kept, the residual against it
    if case == "clusters":
        assert plan.groups is not None and plan.groups.K == 2
    plan2, edited = _changed(plan)
    hashes = SourceHashes(coll, False, None)
    built: dict = {}
    build_allocation(coll, opts, fits, plan, hashes, target_error=0.05, built=built)
    assert set(built) >= set(edited)

    reads = _counting_reads(coll, monkeypatch)
    again = build_allocation(coll, opts, fits, plan2, hashes, target_error=0.05, before=built)
    assert sorted(reads) == sorted(coll.modules[j].name for j in edited)  # the others are not read
    monkeypatch.undo()
    fresh = build_allocation(coll, opts, fits, plan2, hashes, target_error=0.05)
    assert _bytes(again, tmp_path / "again.safetensors") == _bytes(fresh, tmp_path / "fresh.safetensors")
    before = build_allocation(coll, opts, fits, plan, hashes, target_error=0.05)
    assert _bytes(before, tmp_path / "before.safetensors") != _bytes(fresh, tmp_path / "fresh.safetensors")


def test_another_shared_part_is_built_from_scratch(planted, monkeypatch, tmp_path):
    fits, plan, opts = _captured(planted, monkeypatch, target_error=0.002)
    j = next(j for j, m in enumerate(plan.modules) if m.rank > 0)
    m = plan.modules[j]
    other = (2, 2) if tuple(m.shared_bits or (8, 8)) != (2, 2) else (3, 3)
    plan2 = dataclasses.replace(plan, modules=tuple(dataclasses.replace(x, shared_bits=other) if i == j else x
                                                    for i, x in enumerate(plan.modules)))
    hashes = SourceHashes(planted, False, None)
    built: dict = {}
    build_allocation(planted, opts, fits, plan, hashes, target_error=0.05, built=built)
    assert not built[j].same_shared(m.rank, other)
    again = build_allocation(planted, opts, fits, plan2, hashes, target_error=0.05, before=built)
    fresh = build_allocation(planted, opts, fits, plan2, hashes, target_error=0.05)
    assert _bytes(again, tmp_path / "a.safetensors") == _bytes(fresh, tmp_path / "b.safetensors")


def test_only_small_builds_are_kept_for_a_re_aim(small_fp32, optimistic_profile, monkeypatch, tmp_path):
    """A re-aimed build reuses the missed one's parts; one whose codes would take more than
    ``_KEEP_CODES`` (one byte a number, beside the packed file) is rebuilt from scratch instead,
    to the same artifact."""
    befores = record_builds(monkeypatch, "before")
    kept = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    assert len(befores) >= 2 and befores[0] is None and befores[1]  # missed, re-aimed on what it built
    befores.clear()
    monkeypatch.setattr(budget, "_KEEP_CODES", 0)
    scratch = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    assert len(befores) >= 2 and all(b is None for b in befores)
    assert _bytes(kept, tmp_path / "a.safetensors") == _bytes(scratch, tmp_path / "b.safetensors")


def test_parts_that_store_nothing_are_not_read_and_equal_a_full_build(iid, monkeypatch, tmp_path):
    """Without a shared part, an adapter storing no residual row is neither read nor built (its error
    is its norm, from pass 1), and a module storing nothing is not read at all: the artifact is the
    one the build that reads and computes everything (no pass-1 norms to take) gives, byte for byte."""
    fits, plan, opts = _captured(iid, monkeypatch, target_error=0.05)
    mods = list(plan.modules)
    assert all(m.rank == 0 for m in mods) and plan.storage_dtype == "bits"
    # module 0 stores nothing; in module 1 the first two adapters store nothing, the others as planned
    mods[0] = dataclasses.replace(mods[0], residual=np.zeros_like(mods[0].residual), bits=np.zeros(0, np.uint8))
    k, bits = np.array(mods[1].residual), np.array(mods[1].bits)
    assert k[2:].sum() > 0
    mods[1] = dataclasses.replace(mods[1], residual=np.concatenate([[0, 0], k[2:]]), bits=bits[k[:2].sum():])
    plan = dataclasses.replace(plan, modules=tuple(mods))
    hashes = SourceHashes(iid, False, None)

    reads = _counting_reads(iid, monkeypatch)
    quick = build_allocation(iid, opts, fits, plan, hashes, target_error=0.05)
    assert iid.modules[0].name not in reads and len(reads) == len(iid.modules) - 1
    monkeypatch.undo()
    full = build_allocation(iid, opts, [dataclasses.replace(f, own=None) for f in fits], plan, hashes,
                            target_error=0.05)
    assert _bytes(quick, tmp_path / "quick.safetensors") == _bytes(full, tmp_path / "full.safetensors")
    sq, n2 = quick.stats()
    assert bool((sq[:, 0] == n2[:, 0]).all()) and bool((sq[:2, 1] == n2[:2, 1]).all()) and bool((n2 > 0).all())


def test_reads_start_with_the_first_module_of_their_order(iid):
    """A reader starts on the first module of its order when made (a build first builds the modules
    that store nothing, reading none), and hands over the same factors a direct read gives."""
    import torch

    reads = FactorReads(iid, order=[1, 2])
    assert set(reads._next) == {1}
    got = reads.get(1)
    direct = iid.module_factors(iid.modules[1].name, dtype=torch.float32)
    assert torch.equal(got.B, direct.B) and torch.equal(got.A, direct.A)
    assert 2 in reads._next  # the next one read ahead
