"""lorazip.analyze (compressibility before compressing), its figures, and `lorazip analyze` / `eval --plot`."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import write_collection

import lorazip
from lorazip.analyze import analyze, plot_analysis, plot_eval
from lorazip.cli.main import main
from lorazip.errors import OptionError

PNG = b"\x89PNG\r\n\x1a\n"
RANKS = [1, 2, 4, 8]


def run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("an")
    write_collection(root / "src", n=4, seed=0)
    return root / "src"


@pytest.fixture(scope="module")
def report(coll_dir):
    return analyze(lorazip.load_collection(coll_dir), RANKS, [1, 2], target_error=0.3)


def test_error_falls_with_rank_and_never_beats_per_adapter_svd(report):
    json.dumps(report)  # plain JSON types only
    curve = report["rank_curve"]
    assert [row["rank"] for row in curve] == RANKS
    means = [row["shared"]["mean"] for row in curve]
    assert all(b <= a + 1e-9 for a, b in zip(means, means[1:])), means
    assert means[0] > 0.5 and means[-1] < 0.2
    for row in curve:
        assert row["shared"]["mean"] >= row["svd"]["mean"] - 1e-9
        assert row["shared"]["min"] >= row["svd"]["min"] - 1e-9
        assert row["kept_shared"] <= row["kept_svd"] + 1e-9
    for mod in report["modules"]:
        assert all(b <= a + 1e-9 for a, b in zip(mod["shared"], mod["shared"][1:])), mod["name"]
        assert all(s >= v - 1e-9 for s, v in zip(mod["shared"], mod["svd"])), mod["name"]
        assert len(mod["spectra"]["median"]) == 4  # rank-4 adapters
        assert all(lo <= med <= hi for lo, med, hi in zip(mod["spectra"]["min"], mod["spectra"]["median"], mod["spectra"]["max"]))
        assert mod["ranks"] == [min(r, mod["d_out"], mod["d_in"]) for r in RANKS]
    assert set(report["module_types"]) == {"c_attn", "c_proj"}
    params = [row["params"] for row in curve]
    assert params == sorted(params)


def test_cluster_curve_and_pick(report):
    ks = {(row["rank"], row["K"]) for row in report["cluster_curve"]}
    assert ks == {(r, k) for r in RANKS for k in (1, 2)}
    for row in report["cluster_curve"]:
        assert 0 <= row["mean"] <= row["max"] <= 1 + 1e-9
        if row["K"] == 1:  # K = 1 is the shared curve
            assert row["mean"] == report["rank_curve"][RANKS.index(row["rank"])]["shared"]["mean"]
    pick = report["pick"]
    assert pick is not None and pick["mean"] <= 0.3
    meeting = [row for row in report["cluster_curve"] if row["mean"] <= 0.3]
    assert pick["params"] == min(row["params"] for row in meeting)  # least storage meeting the target
    svd = report["pick_svd"]
    assert svd["mean"] <= 0.3
    assert all(row["svd"]["mean"] > 0.3 for row in report["rank_curve"] if row["rank"] < svd["rank"])


def test_unreachable_target_and_options(coll_dir):
    coll = lorazip.load_collection(coll_dir)
    rep = analyze(coll, [1], [1, 9], target_error=0.0)  # K > n is skipped
    assert rep["pick"] is None and {row["K"] for row in rep["cluster_curve"]} == {1}
    with pytest.raises(OptionError, match="ranks"):
        analyze(coll, [0, 2])
    with pytest.raises(OptionError, match="target-error"):
        analyze(coll, [1], [1], target_error=2)
    with pytest.raises(OptionError, match="weighting"):
        analyze(coll, [1], [1], weighting="nope")


def test_plots_without_display(report, coll_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    out = plot_analysis(report, tmp_path / "analysis.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 1000
    art = lorazip.compress(lorazip.load_collection(coll_dir), 4, device="cpu")
    art.save(tmp_path / "a.lorazip.safetensors")
    art = lorazip.load_artifact(tmp_path / "a.lorazip.safetensors")
    out = plot_eval(art, tmp_path / "eval.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 1000
    out = plot_eval(art, tmp_path / "eval2.png", [coll_dir])  # recomputed against the originals
    assert out.read_bytes().startswith(PNG)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # matplotlib missing
    with pytest.raises(OptionError, match=r"lorazip\[plot\]"):
        plot_analysis(report, tmp_path / "x.png")


def test_cli_analyze_and_eval_plot(coll_dir, tmp_path, capsys):
    png = tmp_path / "a.png"
    rc, out, err = run(capsys, "analyze", coll_dir, "--ranks", "1,2,4", "--clusters", "1,2", "--target-error", "0.5",
                       "--json", "--plot", png)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["ranks"] == [1, 2, 4] and rep["pick"]["mean"] <= 0.5
    assert "error vs rank" in err and "pick for mean error" in err
    assert png.read_bytes().startswith(PNG)
    rc, out, err = run(capsys, "analyze", coll_dir, "--ranks", "2", "--clusters", "1")
    assert rc == 0 and out == "", err
    art = tmp_path / "a.lorazip.safetensors"
    assert main(["compress", str(coll_dir), "-o", str(art), "--rank", "4", "--device", "cpu"]) == 0
    rc, out, err = run(capsys, "eval", art, "--plot", tmp_path / "e.png", "--json")
    assert rc == 0, err
    assert json.loads(out)["n_adapters"] == 4
    assert (tmp_path / "e.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    "args, part",
    [
        (["--ranks", "1,x"], "--ranks must be a comma-separated list"),
        (["--ranks", "0"], "--ranks must be positive"),
        (["--clusters", ""], "--clusters must be"),
        (["--target-error", "3"], "--target-error must be between 0 and 1"),
        (["--weighting", "odd"], "unknown weighting"),
    ],
)
def test_cli_analyze_bad_input(coll_dir, capsys, args, part):
    rc, out, err = run(capsys, "analyze", coll_dir, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 1 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error:") and part in lines[0], err


def test_cli_analyze_missing_source(tmp_path, capsys):
    rc, out, err = run(capsys, "analyze", tmp_path / "nope")
    assert rc == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_per_adapter_svd_counts_each_adapters_own_modules_and_rank(tmp_path, capsys):
    """Per-adapter SVD at rank ``r`` stores ``min(r, r_i) (d_in + d_out)`` in each module an adapter adapts
    (adapters of ranks 2 and 6, one without a module): never more than the adapters' own factors; a pick
    of shared parts storing more than those is flagged, in the JSON and in one note."""
    mods = {"l0.q": (12, 10), "l0.v": (10, 12)}
    write_collection(tmp_path / "src", n=2, modules=mods, r=2, seed=1)
    write_collection(tmp_path / "big", n=1, modules={"l0.q": (12, 10)}, r=6, seed=5)
    (tmp_path / "big" / "a0").rename(tmp_path / "src" / "b0")
    coll = lorazip.load_collection(tmp_path / "src")
    rep = analyze(coll, [1, 4, 8], [1, 3], target_error=0.05, frontier=False)
    assert rep["original_params"] == 2 * 2 * 22 * 2 + 6 * 22
    for row in rep["rank_curve"]:
        want = sum(min(row["rank"], r) * 22 for r in (2, 2, 2, 2, 6))  # two adapters x two modules, and b0's one
        assert row["svd_params"] == want <= rep["original_params"]
    pick = rep["pick"]
    assert pick is not None and pick["larger_than_originals"] == (pick["params"] > rep["original_params"])
    assert pick["larger_than_originals"]  # three adapters sharing nothing: shared parts cost more here
    rc, _, err = run(capsys, "analyze", tmp_path / "src", "--ranks", "1,4,8", "--clusters", "1,3",
                     "--target-error", "0.05", "--no-frontier")
    assert rc == 0 and "stores more numbers than the adapters' own factors" in err
