"""The bytes-vs-error frontier of `lorazip analyze`: shared only, per-adapter SVD only, and the mix."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, write_collection

import lorazip
from lorazip.analyze import analyze, plot_analysis
from lorazip.compress.allocate import allocate_mixed
from lorazip.compress.curves import fit_module
from lorazip.errors import OptionError

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = {"numbers", "bytes", "mix", "shared_only", "per_adapter", "bits"}


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fr")
    write_collection(root / "src", n=5, seed=3)
    return root / "src"


@pytest.fixture(scope="module")
def report(coll_dir):
    return analyze(lorazip.load_collection(coll_dir), [1, 2, 4], [1])


def test_frontier_rows(report):
    json.dumps(report["frontier"])  # plain JSON types only
    rows = report["frontier"]
    assert len(rows) >= 8
    assert all(set(row) == KEYS for row in rows)
    numbers = [row["numbers"] for row in rows]
    assert numbers == sorted(set(numbers))
    assert numbers[-1] == report["original_params"]  # 1% .. 100% of the originals' numbers
    assert numbers[0] == pytest.approx(0.01 * report["original_params"], abs=1)
    assert all(row["bytes"] == 4 * row["numbers"] for row in rows)  # float32 adapters
    # with 1-8 bits the same bytes hold more: the bits line is below the float32 mix until both are exact
    both = [row for row in rows if row["bits"] is not None and row["mix"] is not None and row["mix"] > 1e-3]
    assert both and all(row["bits"] <= row["mix"] + 1e-9 for row in both)
    mix = [row["mix"] for row in rows]
    assert all(b <= a for a, b in zip(mix, mix[1:])), mix  # more bytes never cost error
    for row in rows:
        others = [row[k] for k in ("shared_only", "per_adapter") if row[k] is not None]
        assert 0 <= row["mix"] <= 1 + 1e-9
        assert all(row["mix"] <= v + 1e-12 for v in others), row
    assert rows[-1]["per_adapter"] < 1e-9 and rows[-1]["mix"] < 1e-9  # every adapter's own full SVD fits
    assert report["solver"]["frontier_max_rank"] == 64


def test_frontier_matches_allocate_mixed(coll_dir, report):
    """A point is the allocation of ``compress --budget`` at that number of stored values."""
    import torch

    coll = lorazip.load_collection(coll_dir)
    fits = []
    for info in coll.modules:
        f = coll.module_factors(info.name, dtype=torch.float64)
        R = min(64, min(coll.shared_ranks(info.name, 64)))
        fits.append(fit_module(f.B, f.A, info.name, R, weighting="relative", seed=0, tol=1e-3, max_iters=50))
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    row = report["frontier"][-3]
    alloc = allocate_mixed(fits, E, numbers=row["numbers"], stat="mean")
    assert row["mix"] <= alloc.predicted + 1e-12
    assert row["mix"] == pytest.approx(alloc.predicted, abs=1e-6)
    assert row["per_adapter"] <= alloc.alternatives["per-adapter SVD"] + 1e-12


def test_frontier_off_and_options(coll_dir):
    coll = lorazip.load_collection(coll_dir)
    rep = analyze(coll, [1], [1], frontier=False)
    assert rep["frontier"] is None and "frontier_max_rank" not in rep["solver"]
    small = analyze(coll, [1], [1], frontier_max_rank=1)
    full = analyze(coll, [1], [1])
    for a, b in zip(small["frontier"], full["frontier"]):
        assert a["numbers"] == b["numbers"]
        assert a["per_adapter"] == pytest.approx(b["per_adapter"])  # no shared part: no change
    with pytest.raises(OptionError, match="max rank"):
        analyze(coll, [1], [1], frontier_max_rank=0)


def test_plot_has_frontier_panel(report, tmp_path):
    out = plot_analysis(report, tmp_path / "f.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 1000
    out = plot_analysis({**report, "frontier": None}, tmp_path / "g.png")  # three panels, as before
    assert out.read_bytes().startswith(PNG)


def test_cli_frontier_json_table_and_plot(coll_dir, tmp_path, capsys):
    png = tmp_path / "a.png"
    rc, out, err = run_cli(capsys, "analyze", coll_dir, "--ranks", "1,2", "--clusters", "1", "--json", "--plot", png)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["frontier"] and all(set(row) == KEYS for row in rep["frontier"])
    assert "mean error vs bytes" in err
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000
    rc, out, err = run_cli(capsys, "analyze", coll_dir, "--ranks", "1", "--clusters", "1", "--json", "--no-frontier")
    assert rc == 0, err
    assert json.loads(out)["frontier"] is None and "mean error vs bytes" not in err
