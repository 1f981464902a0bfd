"""Adapters added to an artifact with per-adapter parts get their own residual parts (lorazip add)."""

from __future__ import annotations

import pytest
import torch
from helpers import write_collection

import lorazip
from lorazip.metrics import per_adapter
from lorazip.update import add_adapters

MODULES = {"l.0.q": (64, 48), "l.0.v": (48, 64), "l.1.q": (64, 48)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("addres")
    write_collection(root / "old", n=5, modules=MODULES, r=8, seed=11)
    write_collection(root / "new", n=2, modules=MODULES, r=8, seed=12)
    for p in list((root / "new").iterdir()):
        p.rename(root / "new" / f"new_{p.name}")
    return root


def _errors(art):
    return per_adapter(*art.stats()).tolist()


@pytest.mark.parametrize("dtype", ["auto", "float16", "int8"])
def test_added_adapters_reach_the_target(src, tmp_path, dtype):
    old = lorazip.load_collection(src / "old")
    art = lorazip.compress(old, target_error=0.05, storage_dtype=dtype, hash_sources=False, keep_extras=False)
    low = any(k.startswith("qbits/") for k in art.tensors())
    assert low == (dtype == "auto")
    out, rep = add_adapters(art, src / "new", hash_sources=False)
    errs = _errors(out)
    for row in rep["added"]:
        assert row["projection_error"] > 0.5  # the shared part alone (rank 0 here) keeps nothing of them
        assert row["error"] <= 0.05 * 1.15 and not row["above_threshold"]
    assert not rep["warnings"]
    # the adapters already in it keep their parts and errors bit for bit
    assert errs[:5] == _errors(art)
    for mod in art.modules:
        b, a, ks = art.module_residuals(mod["name"])
        b2, a2, ks2 = out.module_residuals(mod["name"], list(range(5)))
        assert torch.equal(ks, ks2) and torch.equal(b, b2[:, :, : b.shape[2]]) and torch.equal(a, a2[:, : a.shape[1]])
    # the recorded errors are those of what is stored: recomputed against the originals, and after a round trip
    back = lorazip.load_artifact(out.save(tmp_path / f"grown-{dtype}.lorazip.safetensors"))
    rec = lorazip.evaluate(back, sources=[src / "old", src / "new"])
    assert [a["error"] for a in rec["adapters"]] == pytest.approx(errs, rel=1e-5, abs=1e-9)
    assert any(k.startswith("qbits/") for k in back.tensors()) == low


def test_rank_artifacts_get_no_residual(src):
    art = lorazip.compress(lorazip.load_collection(src / "old"), 4, hash_sources=False, keep_extras=False)
    out, rep = add_adapters(art, src / "new", hash_sources=False)
    assert not any(k.startswith("resid_") for k in out.tensors())
    assert all(row["error"] == row["projection_error"] for row in rep["added"])


def test_budget_artifacts_aim_at_their_mean_error(src):
    old = lorazip.load_collection(src / "old")
    full = sum(8 * (a + b) * 4 * 5 for a, b in MODULES.values())
    art = lorazip.compress(old, budget=int(0.3 * full), hash_sources=False, keep_extras=False)
    mean_before = sum(_errors(art)) / 5
    out, rep = add_adapters(art, src / "new", hash_sources=False)
    for row in rep["added"]:
        assert row["error"] <= mean_before * 1.3  # near exact here: the 8-bit model is looser
