"""Built rows held in temporary files (lorazip.compress.spill): the same artifact, byte for byte,
as rows held in memory; the rows really file-backed; a directory without room is one clear error."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import lorazip
from lorazip.compress import budget as budget_mod
from lorazip.compress import spill as spill_mod
from lorazip.compress.spill import Spill, spill_for
from lorazip.errors import OutputError
from helpers import record_builds, write_planted_groups


def _mapping_of(t: torch.Tensor) -> str:
    """The /proc/self/maps line holding ``t``'s first byte."""
    at = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= at < hi:
                return line
    raise AssertionError("no mapping holds the tensor")


def _file_backed(t: torch.Tensor) -> bool:
    return int(_mapping_of(t).split()[4]) != 0  # the inode: 0 for anonymous memory


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("spill")
    write_planted_groups(root / "c", (12, 12), d=64, r_shared=3, seed=11, noise=0.3, own=1.0)
    return lorazip.load_collection(root / "c")


def _digest(art, path) -> str:
    art.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hold_gives_the_same_values_file_backed():
    sp = Spill()
    for t in (torch.randint(0, 255, (37, 129), dtype=torch.uint8), torch.randn(5, 7, dtype=torch.float16),
              torch.randn(3, 4), torch.randn(6, 5).to(torch.bfloat16)):
        got = sp.hold(t)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        assert _file_backed(got) and not _file_backed(t)
        assert sp.holds(got) and sp.hold(got) is got  # held once
    assert sp.bytes == 37 * 129 + 5 * 7 * 2 + 3 * 4 * 4 + 6 * 5 * 2
    empty = torch.zeros(0, 8, dtype=torch.uint8)
    assert sp.hold(empty) is empty


def test_spill_only_past_the_limit(tmp_path):
    assert spill_for(1000, memory_limit=1000) is None
    assert isinstance(spill_for(1001, memory_limit=1000, directory=str(tmp_path)), Spill)


def test_no_spill_to_a_directory_in_memory(tmp_path, monkeypatch):
    assert spill_mod.filesystem_type("/proc/self") == "proc"
    monkeypatch.setattr(spill_mod, "filesystem_type", lambda path: "tmpfs")
    assert spill_for(10**9, memory_limit=1000, directory=str(tmp_path)) is None  # it would free nothing


@pytest.mark.parametrize("settings", [{}, {"budget": 20_000, "storage_dtype": "bfloat16"}],
                         ids=["default, low-bit rows", "budget, bfloat16 rows"])
def test_spilled_build_is_the_same_file(coll, tmp_path, monkeypatch, settings):
    mem = lorazip.compress(coll, hash_sources=False, **settings)
    assert any(m.get("residual") for m in mem.modules), "the run stores per-adapter rows"
    made: list[Spill] = []

    def always(nbytes, memory_limit):
        made.append(Spill())
        return made[-1]

    monkeypatch.setattr(budget_mod, "spill_for", always)
    art = lorazip.compress(coll, hash_sources=False, **settings)
    assert made and made[-1].bytes > 0
    held = _logical_rows(art)
    assert held and all(_file_backed(t) for t in held)
    assert _digest(art, tmp_path / "spilled.lorazip.safetensors") == _digest(mem, tmp_path / "mem.lorazip.safetensors")
    assert torch.equal(art.stats()[0], mem.stats()[0])


def _logical_rows(art) -> list[torch.Tensor]:
    """The residual rows of an artifact in memory, as it holds them."""
    return [t for k, t in art.tensors().items() if k.startswith(("resid_B/", "resid_A/"))]


def test_a_directory_without_room_is_one_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(OutputError, match=str(missing)):
        Spill(str(missing)).hold(torch.ones(4, 4))


def test_spilled_under_a_memory_limit(coll, monkeypatch):
    seen: list = []
    real = spill_mod.spill_for

    def record(nbytes, memory_limit):
        seen.append((nbytes, memory_limit, real(nbytes, memory_limit)))
        return seen[-1][2]

    monkeypatch.setattr(budget_mod, "spill_for", record)
    limit = 10_000  # room for one adapter's factors, below the build's rows (10,368 bytes of codes)
    art = lorazip.compress(coll, hash_sources=False, memory_limit=limit)
    assert seen and all(lim == limit for _, lim, _ in seen), seen
    spilled = [s for nb, _, s in seen if nb > limit]
    assert spilled and all(isinstance(s, Spill) and s.bytes > 0 for s in spilled)
    assert all(_file_backed(t) for t in _logical_rows(art))


def test_a_re_aim_reads_spilled_curves(small_fp32, optimistic_profile, monkeypatch, tmp_path):
    """With every step array of the allocator's curves and every built row held in files (a large
    run), a target missed by rounding is re-aimed on the file-backed curves: the same file as a run
    held in memory."""
    from lorazip.compress import allocate

    builds = record_builds(monkeypatch, "spill")
    mem = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    assert len(builds) >= 2, "the target is missed once and re-aimed"
    builds.clear()
    held: list[int] = []
    real_hold = allocate.StepCurves.hold_in

    def hold_all(self, spill, least=1 << 20):
        real_hold(self, spill, least=0)
        held.append(sum(isinstance(getattr(row, "gains"), np.memmap) for rows in self.opts for row in rows))

    monkeypatch.setattr(allocate.StepCurves, "hold_in", hold_all)
    monkeypatch.setattr(budget_mod, "spill_for", lambda nbytes, memory_limit: Spill())
    art = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    assert len(builds) >= 2 and all(isinstance(s, Spill) for s in builds) and held and all(held)
    assert _digest(art, tmp_path / "spilled.lorazip.safetensors") == _digest(mem, tmp_path / "mem.lorazip.safetensors")
