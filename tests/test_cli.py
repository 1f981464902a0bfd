"""The lorazip CLI, run in-process through ``lorazip.cli.main.main`` (plus one real subprocess test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import GPT2_LIKE, assert_one_error_line, run_cli as run, write_collection
from safetensors.torch import load_file, save_file

import lorazip
from lorazip.cli.main import main

RANK = "4"




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A synthetic collection and its compressed artifact (rank 4, float32), shared by read-only tests."""
    root = tmp_path_factory.mktemp("cli")
    write_collection(root / "src", n=3, seed=0)
    art = root / "a.lorazip.safetensors"
    assert main(["compress", str(root / "src"), "-o", str(art), "--rank", RANK, "--device", "cpu"]) == 0
    return root / "src", art


def test_compress_writes_artifact(tmp_path, capsys):
    write_collection(tmp_path / "src", n=3, seed=0)
    out = tmp_path / "out" / "x.lorazip.safetensors"
    out.parent.mkdir()
    rc, stdout, stderr = run(capsys, "compress", tmp_path / "src", "-o", out, "--rank", RANK, "--device", "cpu")
    assert rc == 0, stderr
    assert stdout == ""  # without --json nothing goes to stdout
    assert "rel. sq. error" in stderr
    art = lorazip.load_artifact(out)
    assert art.names == ["a0", "a1", "a2"]
    assert [m["name"] for m in art.modules] == sorted(GPT2_LIKE)
    assert art.meta["rank"] == 4 and art.method == "jd-full"
    assert os.listdir(out.parent) == ["x.lorazip.safetensors"]  # no temp files left


def test_compress_without_sources_is_one_error_line(tmp_path, capsys):
    for extra in ([], ["--json"]):
        rc, _, err = run(capsys, "compress", "-o", tmp_path / "x.lorazip.safetensors", *extra)
        assert rc == 1
        assert_one_error_line(err, "no sources given")
        assert not (tmp_path / "x.lorazip.safetensors").exists()


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """``-o FILE/x`` (a file where a folder must be) is one error line before the collection is read."""
    import lorazip.io.collection as io_collection

    (tmp_path / "f").write_text("")
    monkeypatch.setattr(io_collection, "load_collection", lambda *a, **k: pytest.fail("read before the check"))
    rc, _, err = run(capsys, "compress", tmp_path / "nowhere", "-o", tmp_path / "f" / "sub" / "x.lorazip.safetensors")
    assert rc == 1
    assert_one_error_line(err, "is not a folder", tmp_path / "f")


def test_compress_json(tmp_path, capsys):
    write_collection(tmp_path / "src", n=3, seed=0, extra_tensors={"base_model.model.score.weight": torch.ones(2, 8)})
    out = tmp_path / "x.lorazip.safetensors"
    rc, stdout, stderr = run(capsys, "compress", tmp_path / "src", "-o", out, "--rank", RANK, "--json",
                             "--device", "cpu")
    assert rc == 0, stderr
    rep = json.loads(stdout)  # stdout holds the JSON document alone
    assert rep["report_version"] == 2
    for k in ("mean", "median", "max"):
        assert isinstance(rep["errors"][k], float) and 0 <= rep["errors"][k] <= 1
    assert rep["errors"]["median"] <= rep["errors"]["max"]
    assert rep["storage"]["ratio_params"] > 0
    assert rep["storage"]["artifact_bytes"] == out.stat().st_size
    sr = rep["baseline"]["svd_same_rank"]
    assert sr["rank"] == 4 and sr["mean"] == 0.0  # each adapter has rank 4: SVD at rank 4 is exact
    assert [a["name"] for a in rep["adapters"]] == ["a0", "a1", "a2"]
    assert all(0 <= a["error"] <= 1 for a in rep["adapters"])
    assert rep["n_adapters"] == 3 and rep["n_modules"] == 3
    assert rep["extras"] == {n: ["base_model.model.score.weight"] for n in ("a0", "a1", "a2")}
    assert rep["missing_modules"] == {}
    assert "note:" in stderr  # extras are reported on stderr


def test_eval_recorded_and_recomputed_agree(built, capsys):
    src, art = built
    rc, out1, err1 = run(capsys, "eval", art, "--json")
    assert rc == 0, err1
    rc, out2, err2 = run(capsys, "eval", art, src, "--json")
    assert rc == 0, err2
    rec, rcp = json.loads(out1), json.loads(out2)
    assert rec["recomputed"] is False and rcp["recomputed"] is True
    assert rec["errors"]["mean"] > 1e-3  # lossy: 3 adapters x rank 4 into rank 4
    for k in ("mean", "median", "max", "min"):
        assert rec["errors"][k] == pytest.approx(rcp["errors"][k], abs=1e-9)
    for a, b in zip(rec["adapters"], rcp["adapters"]):
        assert a["name"] == b["name"] and a["error"] == pytest.approx(b["error"], abs=1e-9)
    for a, b in zip(rec["modules"], rcp["modules"]):
        assert a["mean_error"] == pytest.approx(b["mean_error"], abs=1e-9)
    assert "recomputed" in err2


def test_eval_names_source_adapters_the_artifact_does_not_hold(built, tmp_path, capsys):
    """After ``remove``, eval against the original folder leaves the removed adapter out of the errors and
    says so (JSON ``sources_not_in_artifact``, one note), as verify refuses it."""
    src, art = built
    fewer = tmp_path / "fewer.lorazip.safetensors"
    rc, _, err = run(capsys, "remove", art, "a1", "-o", fewer)
    assert rc == 0, err
    rc, out, err = run(capsys, "eval", fewer, src, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["sources_not_in_artifact"] == ["a1"] and [a["name"] for a in rep["adapters"]] == ["a0", "a2"]
    assert "1 source adapter(s) are not in the artifact, left out of the errors: a1" in err
    rc, out, err = run(capsys, "eval", art, src, "--json")
    assert rc == 0 and json.loads(out)["sources_not_in_artifact"] == [] and "not in the artifact" not in err
    assert "sources_not_in_artifact" not in json.loads(run(capsys, "eval", art, "--json")[1])


def test_eval_detects_modified_source(built, tmp_path, capsys):
    src, art = built
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    f = copy / "a1" / "adapter_model.safetensors"
    st = load_file(str(f))
    key = sorted(st)[0]
    st[key][0, 0] += 1.0
    save_file(st, str(f), metadata={"format": "pt"})
    rc, out, err = run(capsys, "eval", art, copy)
    assert rc == 1 and out == ""
    assert_one_error_line(err, "sha256", f)
    rc, _, err = run(capsys, "eval", art, copy / "a0")  # untouched files: fine
    assert rc == 0, err


def test_info_json(built, capsys):
    _src, art = built
    rc, out, err = run(capsys, "info", art, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["report_version"] == 1
    assert [a["name"] for a in d["adapters"]] == ["a0", "a1", "a2"]
    assert all(a["r"] == 4 and a["lora_alpha"] == 8 and a["n_modules"] == 3 for a in d["adapters"])
    assert [(m["name"], m["d_out"], m["d_in"], m["rank"]) for m in d["modules"]] == [
        (name, d_out, d_in, 4) for name, (d_out, d_in) in sorted(GPT2_LIKE.items())
    ]
    assert d["method"] == "jd-full" and d["bytes"] == art.stat().st_size
    rc, out, err = run(capsys, "info", art)
    assert rc == 0 and out == "" and "a1" in err


def test_export_one_adapter(built, tmp_path, capsys):
    _src, art = built
    out = tmp_path / "exp"
    rc, stdout, err = run(capsys, "export", art, out, "--adapter", "a1", "--json")
    assert rc == 0, err
    assert json.loads(stdout) == {"report_version": 1, "exported": [str(out / "a1")], "zero": [], "extras_left_out": []}
    assert os.listdir(out) == ["a1"]
    assert sorted(os.listdir(out / "a1")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "a1" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert cfg["target_modules"] == sorted(GPT2_LIKE)
    ad = lorazip.io.peft.load_adapter(out / "a1")
    assert sorted(ad.modules) == sorted(GPT2_LIKE) and {m.scale for m in ad.modules.values()} == {1.0}
    # the exported delta is the artifact's reconstruction
    a = lorazip.load_artifact(art)
    for m in GPT2_LIKE:
        U, V, cores, _ = a.module_factors(m, [1])
        B, A = ad.factors(m)
        assert torch.allclose(B @ A, U[0].double() @ cores[0].double() @ V[0].double().T, atol=1e-6)


def test_export_unknown_adapter(built, tmp_path, capsys):
    _src, art = built
    rc, out, err = run(capsys, "export", art, tmp_path / "exp", "--adapter", "nope")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "nope")
    assert not (tmp_path / "exp").exists()


def test_export_existing_without_overwrite(built, tmp_path, capsys):
    _src, art = built
    assert run(capsys, "export", art, tmp_path / "exp", "-a", "a0")[0] == 0
    before = (tmp_path / "exp" / "a0" / "adapter_model.safetensors").read_bytes()
    rc, _, err = run(capsys, "export", art, tmp_path / "exp", "-a", "a0")
    assert rc == 1
    assert_one_error_line(err, "already exists")
    assert (tmp_path / "exp" / "a0" / "adapter_model.safetensors").read_bytes() == before
    assert os.listdir(tmp_path / "exp") == ["a0"]
    assert run(capsys, "export", art, tmp_path / "exp", "-a", "a0", "--overwrite")[0] == 0


def test_compress_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    rc, out, err = run(capsys, "compress", tmp_path / "empty", "-o", tmp_path / "out" / "x.lorazip.safetensors")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "no adapter folders")
    assert os.listdir(tmp_path / "out") == []


def test_compress_existing_output(built, tmp_path, capsys):
    src, _art = built
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "x.lorazip.safetensors"
    target.write_bytes(b"keep me")
    rc, out, err = run(capsys, "compress", src, "-o", target, "--json")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "already exists", "--overwrite")
    assert target.read_bytes() == b"keep me"
    assert os.listdir(tmp_path / "out") == ["x.lorazip.safetensors"]
    rc, _, err = run(capsys, "compress", src, "-o", target, "--rank", "2", "--overwrite", "--device", "cpu")
    assert rc == 0, err
    assert lorazip.load_artifact(target).meta["rank"] == 2
    assert os.listdir(tmp_path / "out") == ["x.lorazip.safetensors"]


def test_compress_creates_missing_output_folders(built, tmp_path, capsys):
    src, _art = built
    target = tmp_path / "nope" / "deeper" / "x.lorazip.safetensors"
    rc, _, err = run(capsys, "compress", src, "-o", target, "--rank", "2", "--device", "cpu")
    assert rc == 0, err
    assert lorazip.load_artifact(target).meta["rank"] == 2
    # a path through a file is one error, and the folders made on the way are removed again
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, "compress", src, "-o", tmp_path / "file" / "x.lorazip.safetensors", "--rank", "2",
                     "--device", "cpu")
    assert rc == 1
    assert_one_error_line(err, "is not a folder")
    assert sorted(os.listdir(tmp_path)) == ["file", "nope"]


def test_compress_nan_input(tmp_path, capsys):
    write_collection(tmp_path / "src", n=2, seed=0)
    f = tmp_path / "src" / "a1" / "adapter_model.safetensors"
    st = load_file(str(f))
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    st[key][3, 1] = float("nan")
    save_file(st, str(f))
    (tmp_path / "out").mkdir()
    rc, out, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "out" / "x.lorazip.safetensors",
                       "--rank", "2", "--device", "cpu")
    assert rc == 1 and out == ""
    assert_one_error_line(err, f, key, "NaN")
    assert os.listdir(tmp_path / "out") == []


def test_bad_option_value(built, tmp_path, capsys):
    src, _art = built
    rc, _, err = run(capsys, "compress", src, "-o", tmp_path / "x.safetensors", "--rank", "0")
    assert rc == 1
    assert_one_error_line(err, "rank")
    rc, _, err = run(capsys, "compress", src, "-o", tmp_path / "x.safetensors", "--method", "magic")
    assert rc == 1
    assert_one_error_line(err, "unknown method")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args", [["compress", "src", "-o", "x", "--rank", "abc"], ["frobnicate"], ["info"]]
)
def test_usage_errors_exit_2(capsys, args):
    rc, _, err = run(capsys, *args)
    assert rc == 2
    assert "Traceback" not in err


@pytest.mark.parametrize("method,core_shape", [("jd-diag", (3, 4)), ("svd", (3, 4))])
def test_methods(built, tmp_path, capsys, method, core_shape):
    src, _art = built
    out = tmp_path / f"{method}.lorazip.safetensors"
    rc, stdout, err = run(capsys, "compress", src, "-o", out, "--rank", RANK, "--method", method, "--json",
                          "--device", "cpu")
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == method
    art = lorazip.load_artifact(out)
    assert art.method == method
    U, V, cores, assign = art.module_factors("transformer.h.0.attn.c_attn")
    assert tuple(cores.shape) == core_shape
    rc, out2, err = run(capsys, "eval", out, src, "--json")
    assert rc == 0, err
    rcp = json.loads(out2)
    assert rcp["errors"]["mean"] == pytest.approx(rep["errors"]["mean"], rel=3e-5)  # float32 products at errors >= 0.5
    if method == "svd":  # one basis per adapter: exact at each adapter's own rank
        assert U.shape[0] == 3 and assign.tolist() == [0, 1, 2]
        assert rep["errors"]["max"] < 1e-10


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes(built, tmp_path, capsys, dtype):
    src, art32 = built
    out = tmp_path / f"{dtype}.lorazip.safetensors"
    rc, _, err = run(capsys, "compress", src, "-o", out, "--rank", RANK, "--dtype", dtype, "--device", "cpu")
    assert rc == 0, err
    art = lorazip.load_artifact(out)
    assert art.meta["storage_dtype"] == dtype
    assert art.get("U/transformer.h.0.attn.c_attn").dtype == getattr(torch, dtype)
    assert out.stat().st_size < art32.stat().st_size
    rc, o16, err = run(capsys, "eval", out, src, "--json")
    assert rc == 0, err
    rc, o32, err = run(capsys, "eval", art32, src, "--json")
    assert rc == 0, err
    rc, rec, err = run(capsys, "eval", out, "--json")
    assert rc == 0, err
    e16, e32, erec = (json.loads(x)["errors"]["mean"] for x in (o16, o32, rec))
    assert e16 == pytest.approx(erec, abs=1e-9)  # recorded = recomputed, also for rounded factors
    assert abs(e16 - e32) < (2e-3 if dtype == "float16" else 2e-2)


def test_console_script_subprocess(tmp_path):
    exe = shutil.which("lorazip")
    if exe is None:
        pytest.skip("lorazip console script not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    for cmd in ("compress", "eval", "info", "export"):
        assert cmd in res.stdout
    write_collection(tmp_path / "src", n=3, seed=0)
    out = tmp_path / "x.lorazip.safetensors"
    res = subprocess.run(
        [exe, "compress", str(tmp_path / "src"), "-o", str(out), "--rank", "2", "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["report_version"] == 2 and rep["n_adapters"] == 3
    assert lorazip.load_artifact(out).names == ["a0", "a1", "a2"]
    res = subprocess.run([exe, "compress", str(tmp_path / "src"), "-o", str(out)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 1 and res.stdout == ""
    assert_one_error_line(res.stderr, "already exists")


def test_a_candidate_storing_nothing_is_said_so():
    from lorazip.cli.report import _predicted

    assert _predicted(0.029871) == "0.02987" and _predicted(1.0) == "1 (stores nothing)"


def test_compress_refuses_a_folder_output_and_too_many_clusters_before_any_work(tmp_path, capsys):
    write_collection(tmp_path / "src", n=3, seed=2)
    (tmp_path / "od").mkdir()
    rc, out, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "od", "--overwrite")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "is a folder")
    rc, out, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "x.lorazip.safetensors", "--clusters", "9")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "--clusters 9", "(3)")  # no preamble before it
    assert not (tmp_path / "x.lorazip.safetensors").exists()


def test_rank_with_a_budget_or_target_is_refused_unless_clusters_group_at_it(tmp_path, capsys):
    write_collection(tmp_path / "src", n=4, seed=3)
    for extra in (["--target-error", "0.1"], ["--budget", "20%"]):
        rc, out, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "x.lorazip.safetensors",
                           "--rank", "4", *extra)
        assert rc == 1 and out == ""
        assert_one_error_line(err, "--rank fixes the shared rank", "--max-rank")
    rc, _, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "k.lorazip.safetensors", "--rank", "2",
                     "--clusters", "2", "--target-error", "0.3")  # the rank the clusters group at
    assert rc == 0, err


def test_svd_at_the_stored_ranks_says_why_it_is_exact(tmp_path, capsys):
    """Where the stored ranks reach the adapters' own, per-adapter SVD at them is exact: the report says
    so (the artifact's error is then its rounding's), not a bare 0.0000."""
    write_collection(tmp_path / "src", n=3, seed=6)
    rc, _, err = run(capsys, "compress", tmp_path / "src", "-o", tmp_path / "t.lorazip.safetensors",
                     "--target-error", "0.0005")
    assert rc == 0, err
    flat = " ".join(err.split())
    assert "SVD, same ranks" in flat and "max 0.0000" in flat and "so it is exact" in flat
