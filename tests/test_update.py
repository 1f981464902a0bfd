"""Growing and shrinking artifacts: lorazip.add_adapters / remove_adapters and `lorazip add/remove`."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GPT2_LIKE, assert_one_error_line, run_cli as run, write_adapter, write_collection
from safetensors.torch import load_file, save_file

import lorazip
from lorazip.errors import ArtifactError, OptionError, SourceError, ValidationError
from lorazip.update import UpdateWarning, add_adapters, remove_adapters

RANK = 4
PREFIX = "base_model.model."




def _build(root: Path, n: int = 3, **kw) -> Path:
    write_collection(root / "src", n=n, seed=0)
    art = lorazip.compress(lorazip.load_collection(root / "src"), RANK, device="cpu", **kw)
    path = root / "a.lorazip.safetensors"
    art.save(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """3 synthetic float32 adapters compressed with jd-full at rank 4 (read-only: copy before writing)."""
    root = tmp_path_factory.mktemp("upd")
    return _build(root)


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / path.name
    shutil.copy(path, dst)
    return dst


def write_shaped(path: Path, art: lorazip.Artifact, *, seed: int, mode: str, cluster: int = 0, modules=None) -> None:
    """A float32 PEFT adapter (r = 4, alpha = 4: scale 1) in the span of the artifact's bases of
    ``cluster`` (``mode="span"``), or orthogonal to them (``mode="orth"``)."""
    modules = GPT2_LIKE if modules is None else modules
    write_adapter(path, modules, r=4, alpha=4, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for m, (d_out, d_in) in modules.items():
        U, V = art.get(f"U/{m}")[cluster].double(), art.get(f"V/{m}")[cluster].double()
        r = U.shape[1]
        if mode == "span":
            B = U @ torch.randn(r, 4, generator=gen, dtype=torch.float64)
            A = torch.randn(4, r, generator=gen, dtype=torch.float64) @ V.T
        else:
            B = (torch.eye(d_out, dtype=torch.float64) - U @ U.T) @ torch.randn(d_out, 4, generator=gen, dtype=torch.float64)
            A = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B.float().contiguous()
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A.float().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def _rows_equal(old: lorazip.Artifact, new: lorazip.Artifact, pairs: list[tuple[int, int]]) -> None:
    """Every per-adapter row of ``old`` listed in ``pairs`` (old index, new index) is bit-identical in ``new``."""
    for mod in old.modules:
        m = mod["name"]
        a, b = old.get(f"cores/{m}"), new.get(f"cores/{m}")
        assert all(torch.equal(a[i], b[j]) for i, j in pairs), m
        a, b = old.get(f"spectra/{m}"), new.get(f"spectra/{m}")  # may be zero-padded wider
        w = a.shape[1]
        assert all(torch.equal(a[i], b[j][:w]) and not b[j][w:].any() for i, j in pairs), m
        if f"assign/{m}" in old.keys():
            assert all(int(old.get(f"assign/{m}")[i]) == int(new.get(f"assign/{m}")[j]) for i, j in pairs)
    for key in ("stats/sq_error", "stats/norm2"):
        for i, j in pairs:
            assert torch.equal(old.get(key)[i], new.get(key)[j])
    for i, j in pairs:
        assert old.meta["adapters"][i] == new.meta["adapters"][j]


def _bases_equal(old: lorazip.Artifact, new: lorazip.Artifact) -> None:
    for mod in old.modules:
        for key in (f"U/{mod['name']}", f"V/{mod['name']}"):
            assert torch.equal(old.get(key), new.get(key)), key


# -- add ------------------------------------------------------------------------------------------

def test_add_in_span_is_exact_and_keeps_everything_else(built, tmp_path):
    art = lorazip.load_artifact(built)
    write_shaped(tmp_path / "new" / "inspan", art, seed=7, mode="span")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no threshold warning
        out, rep = add_adapters(built, [tmp_path / "new" / "inspan"])
    assert rep["added"][0]["name"] == "inspan"
    assert rep["added"][0]["error"] < 1e-10 and not rep["added"][0]["above_threshold"]
    assert rep["warnings"] == [] and rep["n_adapters"] == 4
    _bases_equal(art, out)
    _rows_equal(art, out, [(0, 0), (1, 1), (2, 2)])
    assert out.meta["storage_dtype"] == art.meta["storage_dtype"] == "float32"
    assert all(out.get(f"cores/{m['name']}").dtype == torch.float32 for m in out.modules)
    meta = out.meta["adapters"][3]
    assert meta["source"]["path"] == str((tmp_path / "new" / "inspan").resolve())
    assert len(meta["source"]["files"]["adapter_model.safetensors"]["sha256"]) == 64
    assert meta["config"]["r"] == 4 and meta["ranks"] == {m: 4 for m in GPT2_LIKE}
    dst = tmp_path / "grown.lorazip.safetensors"
    out.save(dst)
    again = lorazip.load_artifact(dst, verify=True)
    assert again.names == ["a0", "a1", "a2", "inspan"]
    ev = lorazip.evaluate(again, [built.parent / "src", tmp_path / "new"])  # recomputed from the originals
    assert ev["adapters"][3]["error"] < 1e-10
    recorded = lorazip.evaluate(again)
    for a, b in zip(ev["adapters"], recorded["adapters"]):
        assert a["error"] == pytest.approx(b["error"], abs=1e-9)


def test_add_orthogonal_reports_error_one_and_warns(built, tmp_path):
    art = lorazip.load_artifact(built)
    write_shaped(tmp_path / "new" / "orth", art, seed=8, mode="orth")
    with pytest.warns(UpdateWarning, match="above the threshold 0.6"):
        _, rep = add_adapters(art, [tmp_path / "new" / "orth"])
    assert rep["added"][0]["error"] > 0.99 and rep["added"][0]["above_threshold"]
    assert len(rep["warnings"]) == 1 and "orth" in rep["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = add_adapters(art, [tmp_path / "new" / "orth"], threshold=1.5)  # configurable
    assert not rep["added"][0]["above_threshold"] and rep["warnings"] == []


def test_add_to_clustered_picks_the_cluster_that_fits(tmp_path):
    path = _build(tmp_path, n=4, method="jd-clustered", clusters=2)
    art = lorazip.load_artifact(path)
    for k in (0, 1):
        write_shaped(tmp_path / "new" / f"c{k}", art, seed=20 + k, mode="span", cluster=k)
    out, rep = add_adapters(art, [tmp_path / "new" / "c0", tmp_path / "new" / "c1"])
    assert [a["cluster"] for a in rep["added"]] == [0, 1]
    assert all(a["error"] < 1e-10 for a in rep["added"])
    _bases_equal(art, out)
    _rows_equal(art, out, [(i, i) for i in range(4)])
    for mod in out.modules:
        assert out.get(f"assign/{mod['name']}")[4:].tolist() == [0, 1]


@pytest.mark.parametrize("method", ["jd-diag", "svd"])
def test_add_other_methods_reports_exact_errors(tmp_path, method):
    path = _build(tmp_path, n=3, method=method)
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, seed=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, rep = add_adapters(path, [tmp_path / "new" / "b0"])
    out.save(tmp_path / "o.lorazip.safetensors")
    ev = lorazip.evaluate(lorazip.load_artifact(tmp_path / "o.lorazip.safetensors"), [tmp_path / "src", tmp_path / "new"])
    assert ev["adapters"][3]["error"] == pytest.approx(rep["added"][0]["error"], abs=1e-9)
    if method == "svd":  # its own truncated SVD at rank 4 = r: exact
        assert rep["added"][0]["error"] < 1e-10
    state, _ = lorazip.to_peft(out, "b0")
    assert state


def test_add_keeps_float16_storage(tmp_path):
    path = _build(tmp_path, n=3, storage_dtype="float16")
    art = lorazip.load_artifact(path)
    write_shaped(tmp_path / "new" / "s", art, seed=9, mode="span")
    out, rep = add_adapters(art, [tmp_path / "new" / "s"])
    assert out.meta["storage_dtype"] == "float16"
    assert all(out.get(f"cores/{m['name']}").dtype == torch.float16 for m in out.modules)
    assert rep["added"][0]["error"] < 1e-5  # core rounding to fp16 only
    out.save(tmp_path / "o.lorazip.safetensors")
    ev = lorazip.evaluate(lorazip.load_artifact(tmp_path / "o.lorazip.safetensors"), [tmp_path / "src", tmp_path / "new"])
    assert ev["adapters"][3]["error"] == pytest.approx(rep["added"][0]["error"], rel=1e-6, abs=1e-12)


def test_add_module_rules(built, tmp_path):
    # an adapter lacking a module: zero delta there
    part = {k: GPT2_LIKE[k] for k in list(GPT2_LIKE)[:2]}
    write_adapter(tmp_path / "n1" / "partial", part, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, rep = add_adapters(built, [tmp_path / "n1" / "partial"])
    missing = list(GPT2_LIKE)[2]
    assert rep["added"][0]["missing_modules"] == [missing]
    assert missing not in out.meta["adapters"][3]["ranks"]
    j = [m["name"] for m in out.modules].index(missing)
    assert out.get("stats/norm2")[3, j] == 0 and out.get("stats/sq_error")[3, j] == 0
    assert not out.get(f"cores/{missing}")[3].any()
    state, _ = lorazip.to_peft(out, "partial")
    assert not any(missing in k for k in state)
    # a module the artifact lacks
    write_adapter(tmp_path / "n2" / "extra", {**GPT2_LIKE, "transformer.h.2.attn.c_attn": (24, 8)}, seed=4)
    with pytest.raises(ValidationError, match=r"module 'transformer.h.2.attn.c_attn' is not in the artifact"):
        add_adapters(built, [tmp_path / "n2" / "extra"])
    # a module of another shape starts a shape group of its own: bases fitted on the new adapter
    deltas = write_adapter(tmp_path / "n3" / "wide", {**GPT2_LIKE, "transformer.h.0.mlp.c_proj": (8, 32)}, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, rep = add_adapters(built, [tmp_path / "n3" / "wide"])
    group = "transformer.h.0.mlp.c_proj@8x32"
    mod = next(m for m in out.modules if m["name"] == group)
    assert mod["target"] == "transformer.h.0.mlp.c_proj" and (mod["d_out"], mod["d_in"]) == (8, 32)
    assert out.meta["adapters"][-1]["ranks"] == {**{m: 4 for m in GPT2_LIKE if m != "transformer.h.0.mlp.c_proj"}, group: 4}
    assert rep["added"][0]["missing_modules"] == []
    assert not out.get(f"cores/{group}")[:3].any()  # the 3 adapters already stored do not adapt that shape
    state, _ = lorazip.to_peft(out, "wide")  # exported under the model's module path, at its own shape
    B, A = (state[f"base_model.model.transformer.h.0.mlp.c_proj.lora_{p}.weight"].double() for p in "BA")
    want = deltas["transformer.h.0.mlp.c_proj"]
    assert B.shape[0] == 8 and A.shape[1] == 32
    assert torch.linalg.norm(B @ A - want) <= 1e-5 * torch.linalg.norm(want)  # rank 4 of a rank-4 delta: exact
    key = "base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"
    assert torch.equal(lorazip.to_peft(out, "a1")[0][key], lorazip.to_peft(lorazip.load_artifact(built), "a1")[0][key])
    # another base model, unless overridden
    write_adapter(tmp_path / "n4" / "other", GPT2_LIKE, seed=6, base_model="other-base")
    with pytest.raises(ValidationError, match="differs from the artifact's 'tiny-base'"):
        add_adapters(built, [tmp_path / "n4" / "other"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, _ = add_adapters(built, [tmp_path / "n4" / "other"], base_model="tiny-base")
    assert out.names[-1] == "other" and out.meta["base_model"] == "tiny-base"


def test_duplicate_and_unknown_names(built, tmp_path):
    write_adapter(tmp_path / "dup" / "a1", GPT2_LIKE, seed=77)
    with pytest.raises(ValidationError, match="adapter name 'a1' is already in the artifact"):
        add_adapters(built, [tmp_path / "dup" / "a1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, _ = add_adapters(built, [tmp_path / "dup" / "a1"], names=["a1-v2"])
    assert out.names[-1] == "a1-v2"
    with pytest.raises(ArtifactError, match="no adapter named 'zz'"):
        remove_adapters(built, ["zz"])
    with pytest.raises(OptionError, match="named twice"):
        remove_adapters(built, ["a0", "a0"])
    with pytest.raises(OptionError, match="cannot remove every adapter"):
        remove_adapters(built, ["a0", "a1", "a2"])
    with pytest.raises(OptionError, match="threshold"):
        add_adapters(built, [tmp_path / "dup" / "a1"], threshold=-1)


# -- refit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"method": "jd-clustered", "clusters": 2}])
def test_refit_is_never_worse_than_projection(tmp_path, kw):
    path = _build(tmp_path, n=4, **kw)
    art = lorazip.load_artifact(path)
    write_shaped(tmp_path / "new" / "orth", art, seed=11, mode="orth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        proj, rep_p = add_adapters(art, [tmp_path / "new" / "orth"])
        fit, rep_f = add_adapters(art, [tmp_path / "new" / "orth"], refit=True)
    assert rep_f["objective"]["projection"] == pytest.approx(rep_p["objective"]["projection"])
    assert rep_f["objective"]["refit"] <= rep_p["objective"]["projection"] + 1e-12
    # the refit maximises the weighted objective; the mean per-adapter error (modules summed by energy)
    # follows it up to what the objective gains: here the initial bases are already near the optimum
    assert rep_f["errors"]["mean"] <= rep_p["errors"]["mean"] + 1e-4
    assert rep_f["added"][0]["error"] < rep_p["added"][0]["error"]
    assert fit.names == proj.names == ["a0", "a1", "a2", "a3", "orth"]
    fit.save(tmp_path / "fit.lorazip.safetensors")
    again = lorazip.load_artifact(tmp_path / "fit.lorazip.safetensors", verify=True)
    ev = lorazip.evaluate(again, [tmp_path / "src", tmp_path / "new"])  # stats are exact errors of what is stored
    for a, b in zip(ev["adapters"], lorazip.evaluate(again)["adapters"]):
        assert a["error"] == pytest.approx(b["error"], abs=1e-9)


def test_refit_needs_the_original_files(tmp_path):
    path = _build(tmp_path, n=3)
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, seed=60)
    weights = tmp_path / "src" / "a1" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(saved[:-4] + b"\0\0\0\0")
    with pytest.raises(ValidationError, match=r"a1.*sha256 differs.*--refit"):
        add_adapters(path, [tmp_path / "new" / "b0"], refit=True)
    weights.write_bytes(saved)
    shutil.move(tmp_path / "src" / "a2", tmp_path / "moved")
    with pytest.raises(SourceError, match=r"original of adapter 'a2' is missing"):
        add_adapters(path, [tmp_path / "new" / "b0"], refit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, _ = add_adapters(path, [tmp_path / "new" / "b0"])  # projection needs no originals
    assert out.names[-1] == "b0"


# -- remove -----------------------------------------------------------------------------------------

def test_remove_keeps_other_rows_and_renumbers_extras(tmp_path):
    root = tmp_path
    for i in range(3):
        extra = {"base_model.model.score.weight": torch.full((2, 8), float(i))} if i == 2 else None
        write_adapter(root / "src" / f"a{i}", GPT2_LIKE, seed=i, extra_tensors=extra)
    art = lorazip.compress(lorazip.load_collection(root / "src"), RANK, device="cpu")
    art.save(root / "a.lorazip.safetensors")
    art = lorazip.load_artifact(root / "a.lorazip.safetensors")
    out, rep = remove_adapters(art, ["a1"])
    assert rep["removed"] == ["a1"] and out.names == ["a0", "a2"]
    _bases_equal(art, out)
    _rows_equal(art, out, [(0, 0), (2, 1)])
    assert torch.equal(out.get("extras/1/base_model.model.score.weight"), art.get("extras/2/base_model.model.score.weight"))
    assert not any(k.startswith("extras/2/") for k in out.keys())
    out.save(root / "b.lorazip.safetensors")
    state, _ = lorazip.to_peft(lorazip.load_artifact(root / "b.lorazip.safetensors"), "a2")
    assert torch.equal(state["base_model.model.score.weight"], torch.full((2, 8), 2.0))


def test_remove_then_add_back(built, tmp_path):
    art = lorazip.load_artifact(built)
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, seed=70)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        first, _ = add_adapters(art, [tmp_path / "new" / "b0"])
        dropped, _ = remove_adapters(first, ["b0"])
        again, _ = add_adapters(dropped, [tmp_path / "new" / "b0"])
    _rows_equal(art, dropped, [(0, 0), (1, 1), (2, 2)])
    for mod in art.modules:  # the re-added adapter gets bit-identical cores
        assert torch.equal(first.get(f"cores/{mod['name']}")[3], again.get(f"cores/{mod['name']}")[3])
    assert torch.equal(first.get("stats/sq_error")[3], again.get("stats/sq_error")[3])
    # an adapter of the original compression comes back with (nearly) its original cores
    less, _ = remove_adapters(art, ["a0"])
    back, rep = add_adapters(less, [built.parent / "src" / "a0"])
    assert back.names == ["a1", "a2", "a0"]
    for mod in art.modules:
        m = mod["name"]
        torch.testing.assert_close(back.get(f"cores/{m}")[2], art.get(f"cores/{m}")[0], rtol=1e-4, atol=1e-5)
    assert rep["added"][0]["error"] == pytest.approx(float(lorazip.evaluate(art)["adapters"][0]["error"]), abs=1e-6)


def test_add_real_adapter_to_real_collection(fixtures_dir, tmp_path):
    folders = sorted(p for p in (fixtures_dir / "gpt2").iterdir() if p.is_dir())
    art = lorazip.compress(lorazip.load_collection(folders[:-1]), 4, device="cpu", max_iters=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, rep = add_adapters(art, [folders[-1]])
    assert out.names[-1] == folders[-1].name
    out.save(tmp_path / "o.lorazip.safetensors")
    ev = lorazip.evaluate(lorazip.load_artifact(tmp_path / "o.lorazip.safetensors"), folders)
    assert ev["adapters"][-1]["error"] == pytest.approx(rep["added"][0]["error"], abs=1e-9)


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_add_and_remove(built, tmp_path, capsys):
    path = _copy(built, tmp_path)
    art = lorazip.load_artifact(path)
    write_shaped(tmp_path / "new" / "orth", art, seed=12, mode="orth")
    rc, out, err = run(capsys, "add", path, tmp_path / "new" / "orth", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["operation"] == "add" and rep["added"][0]["above_threshold"]
    assert "warning:" in err and "orth" in err
    assert lorazip.load_artifact(path).names == ["a0", "a1", "a2", "orth"]  # in place
    assert sorted(os.listdir(tmp_path)) == ["a.lorazip.safetensors", "new"]  # no temp files
    rc, out, err = run(capsys, "remove", path, "orth", "a0", "--json", "-o", tmp_path / "small.lorazip.safetensors")
    assert rc == 0, err
    assert json.loads(out)["removed"] == ["orth", "a0"]
    assert lorazip.load_artifact(tmp_path / "small.lorazip.safetensors").names == ["a1", "a2"]
    assert lorazip.load_artifact(path).names == ["a0", "a1", "a2", "orth"]  # -o leaves the input alone
    rc, out, err = run(capsys, "remove", path, "a1", "-o", tmp_path / "small.lorazip.safetensors")
    assert rc == 1 and out == ""
    assert_one_error_line(err, "already exists")


def test_cli_bad_input(built, tmp_path, capsys):
    path = _copy(built, tmp_path)
    before = path.read_bytes()
    for args, part in (
        (("add", path, tmp_path / "nope"), "no such folder"),
        (("remove", path, "zz"), "no adapter named 'zz'"),
        (("add", path, built.parent / "src" / "a0"), "already in the artifact"),
        (("add", tmp_path / "missing.lorazip.safetensors", built.parent / "src"), "no such artifact file"),
    ):
        rc, out, err = run(capsys, *args)
        assert rc == 1 and out == "", err
        assert_one_error_line(err, part)
    assert path.read_bytes() == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_failed_write_leaves_artifact_intact(built, tmp_path, capsys, monkeypatch, exc):
    path = _copy(built, tmp_path)
    before = path.read_bytes()
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, seed=80)
    import lorazip.artifact as artifact_mod

    def broken(tensors, tmp, metadata, final):
        Path(tmp).write_bytes(b"partial")
        if exc is OSError:
            raise lorazip.OutputError(f"{final}: cannot write (No space left on device)")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_mod, "save_safetensors", broken)
    rc, out, err = run(capsys, "add", path, tmp_path / "new" / "b0")
    assert rc == (130 if exc is KeyboardInterrupt else 1)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.lorazip.safetensors", "new"]
    rc, out, err = run(capsys, "remove", path, "a0")
    assert rc == (130 if exc is KeyboardInterrupt else 1)
    assert path.read_bytes() == before


@pytest.mark.parametrize("kw", [{"rank": 2}, {"budget": 60_000}])
def test_removing_the_adapter_of_the_largest_rank_keeps_the_spectra_packed(tmp_path, kw):
    """The spectra of the other adapters lose the columns only the removed one had: the file keeps them
    in its packed form (one tensor; codes with low-bit parts), no tensor per module, so it shrinks."""
    from safetensors import safe_open

    for i, r in enumerate((2, 4, 16)):
        write_adapter(tmp_path / "src" / f"a{i}", GPT2_LIKE, r=r, seed=i)
    art = lorazip.compress(lorazip.load_collection(tmp_path / "src"), hash_sources=False, **kw)
    art.save(tmp_path / "a.lorazip.safetensors")
    out, _ = remove_adapters(tmp_path / "a.lorazip.safetensors", ["a2"])
    out.save(tmp_path / "b.lorazip.safetensors")
    with safe_open(str(tmp_path / "b.lorazip.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("spectra/")]
    assert (tmp_path / "b.lorazip.safetensors").stat().st_size < (tmp_path / "a.lorazip.safetensors").stat().st_size
    back = lorazip.load_artifact(tmp_path / "b.lorazip.safetensors")
    for mod in back.modules:  # the kept adapters' spectra as they were
        key = f"spectra/{mod['name']}"
        assert torch.equal(back.get(key), art.get(key)[:2, :4])


def test_adding_an_adapter_of_a_rank_above_a_module_s_side_keeps_the_spectra_packed(tmp_path):
    """An added adapter whose rank is above a module's smaller side has fewer singular values there than
    its rank: the spectra are padded to the largest rank, packed in one tensor, not a tensor per module."""
    from safetensors import safe_open

    mods = {"l0.q": (32, 48), "l0.k": (16, 48)}
    for i in range(3):
        write_adapter(tmp_path / "src" / f"a{i}", mods, r=4, seed=i)
    write_adapter(tmp_path / "new" / "big", mods, r=24, seed=9)  # 24 > 16, l0.k's smaller side
    art = lorazip.compress(lorazip.load_collection(tmp_path / "src"), rank=2, hash_sources=False)
    art.save(tmp_path / "a.lorazip.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, _ = add_adapters(tmp_path / "a.lorazip.safetensors", [tmp_path / "new"])
    out.save(tmp_path / "b.lorazip.safetensors")
    with safe_open(str(tmp_path / "b.lorazip.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("spectra/")]
    back = lorazip.load_artifact(tmp_path / "b.lorazip.safetensors")
    sv = back.get("spectra/l0.k")
    assert sv.shape == (4, 24) and not sv[3, 16:].any() and sv[3, :16].all()
    assert torch.equal(sv[:3, :4], art.get("spectra/l0.k")[:, :4])
