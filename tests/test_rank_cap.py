"""A rank larger than a module allows means "at most": small heads are stored exactly at their limit."""

from __future__ import annotations

import json

import pytest
import torch

import lorazip
from helpers import run_cli, write_collection

MODULES = {
    "encoder.layer.0.attention.q_lin": (768, 768),
    "encoder.layer.0.attention.v_lin": (768, 768),
    "pre_head": (6, 768),
    "classifier": (2, 768),
}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    write_collection(root / "src", n=3, modules=MODULES, r=4, seed=3)
    return root


def test_heads_of_2_and_6_outputs_are_capped_and_exact(heads):
    coll = lorazip.load_collection(heads / "src")
    art = lorazip.compress(coll, 8, hash_sources=False)
    mods = {m["name"]: m for m in art.modules}
    # the output side is kept whole; the input basis spans every adapter's rows (3 x 2 = 6 <= 8)
    assert (mods["classifier"]["rank_out"], mods["classifier"]["rank"]) == (2, 6)
    assert (mods["pre_head"]["rank_out"], mods["pre_head"]["rank"]) == (6, 8)
    assert mods["classifier"]["rank_capped"] == {
        "requested": 8, "rank": 6, "rank_out": 2, "reason": "d_out = 2: that side kept whole, the other at rank 6"}
    assert mods["pre_head"]["rank_capped"]["reason"].startswith("d_out = 6")
    assert mods["encoder.layer.0.attention.q_lin"]["rank"] == 8 and "rank_capped" not in mods[
        "encoder.layer.0.attention.q_lin"]
    sq, n2 = art.stats()
    j = [m["name"] for m in art.modules].index("classifier")
    assert float((sq[:, j] / n2[:, j]).max()) < 1e-10  # exact: the shared input basis holds every row
    # pre_head: 8 of the 12 input directions; the weighted error is the dense float64 optimum
    k = [m["name"] for m in art.modules].index("pre_head")
    f = coll.module_factors("pre_head")
    dense = [(f.B[i] @ f.A[i]) / float(n2[i, k]).__pow__(0.5) for i in range(3)]
    tail = torch.linalg.svdvals(torch.cat(dense))[8:].square().sum()
    assert abs(float((sq[:, k] / n2[:, k]).sum()) - float(tail)) < 1e-6 * float(tail)
    rep = lorazip.evaluate(art)
    by = {m["name"]: m for m in rep["modules"]}
    assert by["classifier"]["rank_capped"]["requested"] == 8 and "rank_capped" not in by["encoder.layer.0.attention.v_lin"]


def test_cli_reports_the_cap_once_and_in_json(heads, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "compress", heads / "src", "-o", tmp_path / "a.lorazip.safetensors", "--rank", "8",
                           "--json")
    assert rc == 0, err
    rep = json.loads(out)
    capped = {m["name"]: m["rank_capped"] for m in rep["modules"] if "rank_capped" in m}
    assert set(capped) == {"classifier", "pre_head"}
    assert err.count("capped") == 1 and "classifier" in err


def test_budget_allocator_respects_the_cap(heads, tmp_path):
    from lorazip.compress.curves import rank_curves

    coll = lorazip.load_collection(heads / "src")
    curves = rank_curves(coll, 16)
    by = dict(zip(curves.modules, curves.errors))
    assert by["classifier"].shape[1] == 2 and by["pre_head"].shape[1] == 6
    assert by["encoder.layer.0.attention.q_lin"].shape[1] == 12  # sum of ranks 3 x 4
