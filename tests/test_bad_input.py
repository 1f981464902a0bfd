"""Bad inputs raise the right LorazipError subclass, name the file and the problem, and write nothing."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import edit_config, tree_files, write_doc, write_adapter, write_collection, write_raw_safetensors
from safetensors.torch import load_file, save_file

import lorazip
from lorazip.errors import (
    AdapterFormatError,
    ArtifactError,
    LorazipError,
    OptionError,
    OutputError,
    SourceError,
    ValidationError,
)
from lorazip.io.peft import load_adapter

MOD = {"model.layers.0.q_proj": (6, 5)}
KEY_A = "base_model.model.model.layers.0.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.q_proj.lora_B.weight"


def expect(exc_type, fn, *parts, root=None, one_line=True):
    """Run ``fn``; check the exception type, that its message holds every part, and that ``root`` is unchanged."""
    before = tree_files(root) if root is not None else None
    with pytest.raises(exc_type) as ei:
        fn()
    assert isinstance(ei.value, LorazipError)
    msg = str(ei.value)
    if one_line:  # the CLI prints it as one "error:" line
        assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, f"{p!r} not in {msg!r}"
    if root is not None:
        assert tree_files(root) == before, "something was written"
    return msg


def edit_tensors(folder: Path, fn):
    path = folder / "adapter_model.safetensors"
    st = load_file(str(path))
    fn(st)
    save_file(st, str(path))


@pytest.fixture
def one(tmp_path):
    """A valid single adapter at tmp_path/src/a (and its deltas)."""
    folder = tmp_path / "src" / "a"
    write_adapter(folder, MOD, seed=0)
    return folder


# ----------------------------------------------------------------------------------------------
# Sources and configs
# ----------------------------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    expect(SourceError, lambda: lorazip.load_collection(tmp_path / "empty"), tmp_path / "empty", "no adapter folders",
           root=tmp_path)


def test_folder_without_adapters(tmp_path):
    (tmp_path / "junk" / "sub").mkdir(parents=True)
    (tmp_path / "junk" / "README.md").write_text("hi")
    (tmp_path / "junk" / "sub" / "model.safetensors").write_bytes(b"\0" * 16)
    expect(SourceError, lambda: lorazip.load_collection(tmp_path / "junk"), "junk", "adapter_config.json",
           root=tmp_path)


def test_missing_source_and_file_source(tmp_path, one):
    expect(SourceError, lambda: lorazip.load_collection(tmp_path / "nope"), "nope", "no such file")
    expect(SourceError, lambda: lorazip.load_collection(one / "adapter_config.json"), "adapter_config.json",
           "not a folder")
    expect(SourceError, lambda: lorazip.load_collection([]), "no adapters")


def test_missing_config(tmp_path, one):
    (one / "adapter_config.json").unlink()
    expect(SourceError, lambda: lorazip.load_collection(one), one, "adapter_config.json", root=tmp_path)
    expect(AdapterFormatError, lambda: load_adapter(one), one, "no adapter_config.json", root=tmp_path)


def test_missing_weights(tmp_path, one):
    (one / "adapter_model.safetensors").unlink()
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one, "no adapter_model.safetensors",
           root=tmp_path)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_invalid_json_config(tmp_path, one, text):
    (one / "adapter_config.json").write_bytes(text.encode("latin-1"))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "invalid JSON",
           root=tmp_path)


def test_config_not_an_object(tmp_path, one):
    (one / "adapter_config.json").write_text("[1, 2]")
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "JSON object")


def test_config_without_r(tmp_path, one):
    edit_config(one, r=...)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "missing 'r'",
           root=tmp_path)


@pytest.mark.parametrize("r", [0, -4, 2.5, "4", True, None])
def test_bad_r(tmp_path, one, r):
    edit_config(one, r=r)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json",
           "'r' must be a positive integer", root=tmp_path)


@pytest.mark.parametrize("alpha", [-8, 0, "8", float("nan")])
def test_bad_alpha(tmp_path, one, alpha):
    cfg = one / "adapter_config.json"
    c = json.loads(cfg.read_text())
    c["lora_alpha"] = alpha
    cfg.write_text(json.dumps(c))  # json writes NaN for nan, which Python's json reads back
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), cfg, "'lora_alpha' must be a positive number",
           root=tmp_path)


@pytest.mark.parametrize("pattern", [{"q_proj": 0}, {"q_proj": -1}, ["q_proj"], {"q_proj": "2"}])
def test_bad_rank_pattern(tmp_path, one, pattern):
    edit_config(one, rank_pattern=pattern)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "rank_pattern")


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "ADALORA", 3])
def test_not_lora(tmp_path, one, peft_type):
    edit_config(one, peft_type=peft_type)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json",
           f"peft_type {peft_type!r} is not supported", root=tmp_path)


def test_lowercase_lora_peft_type_accepted(one):
    edit_config(one, peft_type="lora")
    assert len(lorazip.load_collection(one)) == 1


def test_use_dora(tmp_path, one):
    edit_config(one, use_dora=True)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "DoRA",
           root=tmp_path)


def test_dora_magnitude_tensor(tmp_path, one):
    key = "base_model.model.model.layers.0.q_proj.lora_magnitude_vector"
    edit_tensors(one, lambda st: st.__setitem__(key, torch.ones(6)))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "lora_magnitude_vector", "DoRA", root=tmp_path)


def test_lora_bias_config(tmp_path, one):
    edit_config(one, lora_bias=True)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_config.json", "lora_bias")


def test_lora_bias_tensor_message(tmp_path, one):
    key = "base_model.model.model.layers.0.q_proj.lora_B.bias"
    edit_tensors(one, lambda st: st.__setitem__(key, torch.zeros(6)))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "bias tensor")


def test_lora_bias_tensor_with_adapter_name(tmp_path, one):
    key = "base_model.model.model.layers.0.q_proj.lora_B.default.bias"
    edit_tensors(one, lambda st: st.__setitem__(key, torch.zeros(6)))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "bias tensor", key)


def test_rank_disagrees_with_config(tmp_path, one):
    edit_config(one, r=8)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "model.layers.0.q_proj", "rank 4", "says 8")


def test_lora_a_b_rank_mismatch(tmp_path, one):
    edit_tensors(one, lambda st: st.__setitem__(KEY_B, torch.randn(6, 3)))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "ranks differ")


def test_missing_lora_b(tmp_path, one):
    edit_tensors(one, lambda st: st.pop(KEY_B))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "no lora_B tensor")


def test_conv_lora_refused(tmp_path, one):
    def conv(st):
        st[KEY_A] = torch.randn(4, 5, 3, 3)
        st[KEY_B] = torch.randn(6, 4, 1, 1)

    edit_tensors(one, conv)
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors", "2-D")


def test_no_lora_tensors(tmp_path, one):
    save_file({"base_model.model.score.weight": torch.ones(2, 2)}, str(one / "adapter_model.safetensors"))
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), one / "adapter_model.safetensors",
           "no LoRA tensors")


# ----------------------------------------------------------------------------------------------
# Corrupt safetensors files
# ----------------------------------------------------------------------------------------------


def _header_entry(shape, start, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def test_truncated_safetensors(tmp_path, one):
    f = one / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, root=tmp_path)
    assert "truncated" in msg or "corrupt" in msg


def test_truncated_inside_header(tmp_path, one):
    f = one / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, "corrupt safetensors header")
    f.write_bytes(b"\x01\x02")
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, "truncated")


def test_truncated_data_tail(tmp_path, one):
    f = one / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])  # header intact, last 4 data bytes gone
    msg = expect(AdapterFormatError, lambda: lorazip.load_collection(one), f)
    assert "corrupt" in msg or "truncated" in msg


def test_header_huge_shape(tmp_path, one):
    f = one / "adapter_model.safetensors"
    write_raw_safetensors(
        f, {KEY_A: _header_entry([4, 5], 0, 80), KEY_B: _header_entry([600000, 400000], 80, 176)}, b"\0" * 176
    )
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, KEY_B, "does not match its byte size",
           root=tmp_path)


def test_header_offsets_out_of_range(tmp_path, one):
    f = one / "adapter_model.safetensors"
    write_raw_safetensors(
        f, {KEY_A: _header_entry([4, 5], 0, 80), KEY_B: _header_entry([6, 4], 10**12, 10**12 + 96)}, b"\0" * 176
    )
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, KEY_B, "offsets", root=tmp_path)


def test_header_length_beyond_file(tmp_path, one):
    f = one / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, "corrupt safetensors header")


def test_header_not_json(tmp_path, one):
    f = one / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 5) + b"{nope")
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, "not JSON")


def test_header_overlapping_offsets(tmp_path, one):
    f = one / "adapter_model.safetensors"
    write_raw_safetensors(
        f, {KEY_A: _header_entry([4, 5], 0, 80), KEY_B: _header_entry([6, 4], 40, 136)}, b"\0" * 136
    )
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, "overlap", root=tmp_path)


def test_header_negative_shape(tmp_path, one):
    f = one / "adapter_model.safetensors"
    write_raw_safetensors(
        f, {KEY_A: _header_entry([-4, -5], 0, 80), KEY_B: _header_entry([6, 4], 80, 176)}, b"\0" * 176
    )
    expect(AdapterFormatError, lambda: lorazip.load_collection(one), f, KEY_A)


# ----------------------------------------------------------------------------------------------
# Collections
# ----------------------------------------------------------------------------------------------


def test_shape_mismatch_across_adapters_is_a_shape_group(tmp_path):
    """Adapters that disagree on a module's shape are not bad input: each shape is a group of its
    own (tests/test_shape_groups.py); nothing is refused and no file is written."""
    write_adapter(tmp_path / "src" / "a", {"layers.0.q_proj": (6, 5)}, seed=0)
    write_adapter(tmp_path / "src" / "b", {"layers.0.q_proj": (6, 7)}, seed=1)
    before = tree_files(tmp_path)
    coll = lorazip.load_collection(tmp_path / "src")
    assert [(m.name, m.path) for m in coll.modules] == [
        ("layers.0.q_proj@6x5", "layers.0.q_proj"), ("layers.0.q_proj@6x7", "layers.0.q_proj")]
    assert tree_files(tmp_path) == before


def test_different_base_models(tmp_path):
    write_adapter(tmp_path / "src" / "a", MOD, seed=0, base_model="org/model-a")
    write_adapter(tmp_path / "src" / "b", MOD, seed=1, base_model="org/model-b")
    write_adapter(tmp_path / "src" / "c", MOD, seed=2, base_model=None)
    expect(ValidationError, lambda: lorazip.load_collection(tmp_path / "src"), "org/model-a", "org/model-b",
           tmp_path / "src" / "b", "--base-model", root=tmp_path)
    coll = lorazip.load_collection(tmp_path / "src", base_model="org/model-x")
    assert coll.base_model == "org/model-x" and len(coll) == 3


def test_trailing_slash_base_models_agree(tmp_path):
    write_adapter(tmp_path / "src" / "a", MOD, seed=0, base_model="org/model")
    write_adapter(tmp_path / "src" / "b", MOD, seed=1, base_model="org/model/")
    assert lorazip.load_collection(tmp_path / "src").base_model == "org/model"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_nan_inf_weights_raise_at_compress(tmp_path, bad, key):
    write_adapter(tmp_path / "src" / "a", MOD, seed=0)
    write_adapter(tmp_path / "src" / "b", MOD, seed=1)

    def poke(st):
        st[key][0, 0] = bad

    edit_tensors(tmp_path / "src" / "b", poke)
    coll = lorazip.load_collection(tmp_path / "src")  # header only: fine
    expect(AdapterFormatError, lambda: lorazip.compress(coll, 2, device="cpu"),
           tmp_path / "src" / "b" / "adapter_model.safetensors", key, "NaN or Inf", root=tmp_path)


def test_pickle_refused_then_allowed(tmp_path):
    folder = tmp_path / "src" / "p"
    deltas = write_adapter(folder, MOD, seed=0)
    st = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(st, folder / "adapter_model.bin")
    expect(AdapterFormatError, lambda: lorazip.load_collection(folder), folder / "adapter_model.bin", "pickle",
           "--allow-pickle", root=tmp_path)
    coll = lorazip.load_collection(folder, allow_pickle=True)
    ad = coll.adapters[0]
    assert ad.pickled and ad.weights_file.name == "adapter_model.bin"
    B, A = ad.factors("model.layers.0.q_proj")
    assert torch.allclose(B @ A, deltas["model.layers.0.q_proj"], rtol=0, atol=1e-12)
    art = lorazip.compress(coll, 2, device="cpu")
    assert art.names == ["p"]


def _unsafe_pickle(tmp_path) -> Path:
    folder = tmp_path / "src" / "p"
    write_adapter(folder, MOD, seed=0)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": object()}, folder / "adapter_model.bin")  # not loadable with weights_only=True
    return folder


def test_pickle_with_code_refused_even_when_allowed(tmp_path):
    folder = _unsafe_pickle(tmp_path)
    expect(AdapterFormatError, lambda: lorazip.load_collection(folder, allow_pickle=True),
           folder / "adapter_model.bin", "cannot load pickled weights", one_line=False)


def test_pickle_refusal_message_is_one_line(tmp_path):
    folder = _unsafe_pickle(tmp_path)
    expect(AdapterFormatError, lambda: lorazip.load_collection(folder, allow_pickle=True), folder / "adapter_model.bin")


# ----------------------------------------------------------------------------------------------
# Options and outputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def coll(tmp_path):
    write_collection(tmp_path / "src", n=2, seed=0)  # smallest module: 8 x 16
    return lorazip.load_collection(tmp_path / "src")


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_not_positive(coll, rank):
    expect(OptionError, lambda: lorazip.compress(coll, rank, device="cpu"), "rank must be a positive integer")


def test_rank_above_module_dims_is_capped_not_refused(coll):
    art = lorazip.compress(coll, 9, device="cpu")  # "rank 9" means "at most 9"
    mods = {m["name"]: m for m in art.modules}
    assert mods["transformer.h.0.attn.c_attn"]["rank"] == 8  # sum of the two adapters' ranks 4 + 4
    assert mods["transformer.h.0.attn.c_attn"]["rank_capped"] == {
        "requested": 9, "rank": 8, "reason": "min(d_out, d_in) = 8"}
    assert float(art.stats()[0].max()) < 1e-8  # stored at its limit, hence exact
    assert lorazip.compress(coll, 8, device="cpu", max_iters=5).meta["rank"] == 8  # the limit itself is fine


@pytest.mark.parametrize(
    "kw,part",
    [({"method": "pca"}, "unknown method"), ({"weighting": "x"}, "unknown weighting"),
     ({"storage_dtype": "int4"}, "unknown dtype"), ({"device": "tpu"}, "unknown device")],
)
def test_bad_options(coll, kw, part):
    expect(OptionError, lambda: lorazip.compress(coll, 2, **kw), part)


def test_output_exists_without_overwrite(tmp_path, coll):
    art = lorazip.compress(coll, 2, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "x.lorazip.safetensors"
    target.write_bytes(b"precious")
    expect(OutputError, lambda: art.save(target), target, "already exists", "--overwrite", root=out)
    assert target.read_bytes() == b"precious"
    art.save(target, overwrite=True)
    assert lorazip.load_artifact(target).names == ["a0", "a1"]
    assert sorted(os.listdir(out)) == ["x.lorazip.safetensors"]


def _unwritable(tmp_path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    return Path("/proc")  # root ignores permission bits; nothing can be created in /proc


def test_unwritable_output_folder(tmp_path, coll):
    art = lorazip.compress(coll, 2, device="cpu")
    ro = _unwritable(tmp_path)
    before = set(os.listdir(ro))
    target = ro / "lorazip-test.lorazip.safetensors"
    expect(OutputError, lambda: art.save(target), target, "cannot write")
    assert not target.exists() and set(os.listdir(ro)) == before
    expect(OutputError, lambda: art.save(ro / "no" / "such" / "x.safetensors"), "cannot create folder")
    assert set(os.listdir(ro)) == before
    expect(OutputError, lambda: lorazip.export(art, ro / "lorazip-test-export"), "lorazip-test-export")


def test_export_existing_folder_without_overwrite(tmp_path, coll):
    art = lorazip.compress(coll, 2, device="cpu")
    out = tmp_path / "exp"
    (out / "a1").mkdir(parents=True)
    expect(OutputError, lambda: lorazip.export(art, out, ["a1"]), out / "a1", "already exists")
    assert os.listdir(out) == ["a1"] and os.listdir(out / "a1") == []
    expect(ArtifactError, lambda: lorazip.export(art, out, ["nope"]), "no adapter named 'nope'")
    assert os.listdir(out) == ["a1"]


# ----------------------------------------------------------------------------------------------
# Artifacts
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def artifact_file(tmp_path, coll):
    path = tmp_path / "a.lorazip.safetensors"
    lorazip.compress(coll, 2, device="cpu").save(path)
    return path


def test_truncated_artifact(tmp_path, artifact_file):
    data = artifact_file.read_bytes()
    bad = tmp_path / "trunc.lorazip.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    msg = expect(ArtifactError, lambda: lorazip.load_artifact(bad), bad)
    assert "truncated" in msg or "corrupt" in msg
    bad.write_bytes(data[:-3])
    expect(ArtifactError, lambda: lorazip.load_artifact(bad), bad)
    bad.write_bytes(b"")
    expect(ArtifactError, lambda: lorazip.load_artifact(bad), bad, "truncated")


def test_missing_artifact(tmp_path):
    expect(ArtifactError, lambda: lorazip.load_artifact(tmp_path / "none.safetensors"), "none.safetensors",
           "no such artifact")


def test_not_a_lorazip_artifact(tmp_path, coll):
    f = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(f), metadata={"format": "pt"})
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "not a lorazip artifact")
    # a PEFT adapter is not an artifact either
    a0 = coll.adapters[0].weights_file
    expect(ArtifactError, lambda: lorazip.load_artifact(a0), a0, "not a lorazip artifact")


def _resave(src: Path, dst: Path, meta_edit=None, tensor_edit=None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_newer_format_version(tmp_path, artifact_file):
    from lorazip.artifact import FORMAT_VERSION

    newer = str(FORMAT_VERSION + 1)
    f = _resave(artifact_file, tmp_path / f"v{newer}.safetensors", lambda m: m.__setitem__("format_version", newer))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "newer", "upgrade")


def test_bad_format_version_and_metadata(tmp_path, artifact_file):
    f = _resave(artifact_file, tmp_path / "vx.safetensors", lambda m: m.__setitem__("format_version", "one"))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "format_version")
    f = _resave(artifact_file, tmp_path / "meta.safetensors", lambda m: write_doc(m, "{broken"))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "corrupt lorazip metadata")
    f = _resave(artifact_file, tmp_path / "b64.safetensors", lambda m: m.__setitem__("lorazip_z", "{broken"))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "corrupt lorazip metadata", "base64")


def test_metadata_zlib_bomb_refused(tmp_path, artifact_file):
    import base64
    import zlib

    from lorazip.layout import MAX_META

    bomb = base64.b64encode(zlib.compress(b" " * (MAX_META + 1), 9)).decode("ascii")  # ~260 KB compressed
    f = _resave(artifact_file, tmp_path / "bomb.safetensors", lambda m: m.__setitem__("lorazip_z", bomb))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "corrupt lorazip metadata", "larger than")


def test_artifact_missing_tensor(tmp_path, artifact_file):
    f = _resave(artifact_file, tmp_path / "missing.safetensors",
                tensor_edit=lambda t: t.pop("cores/transformer.h.0.attn.c_attn"))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "cores/transformer.h.0.attn.c_attn")
    f = _resave(artifact_file, tmp_path / "stats.safetensors", tensor_edit=lambda t: t.pop("stats"))  # packed (v3)
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "stats/sq_error")
    f = _resave(artifact_file, tmp_path / "stats2.safetensors",
                tensor_edit=lambda t: t.update(stats=t["stats"][:, 1:].clone()))
    expect(ArtifactError, lambda: lorazip.load_artifact(f), f, "tensor 'stats' not of shape")


def test_first_line_of_an_error_keeps_what_a_colon_introduces():
    """An error whose first line only introduces the next (torch's state-dict errors) keeps that line too."""
    from lorazip.errors import first_line

    exc = RuntimeError("Error(s) in loading state_dict for M:\n\tsize mismatch for a.weight: shape [2] vs [3].\nmore")
    assert first_line(exc) == "Error(s) in loading state_dict for M: size mismatch for a.weight: shape [2] vs [3]."
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(ValueError("")) == "ValueError"
