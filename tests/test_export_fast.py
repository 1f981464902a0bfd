"""``lorazip export`` without torch (lorazip.export_core.export_numpy) writes the bytes the torch
export writes: ``adapter_model.safetensors`` byte for byte and the same ``adapter_config.json``, for
artifacts of every kind (storage float32 / float16 / bfloat16 / int8; --rank, --budget with residual
rows, two clusters, jd-diag, svd; shape groups; embedding LoRA; extras converted by --extras-dtype;
rank-0 modules; format v1, v2 and v3 files), every export dtype and a chosen subset of adapters.

Also: the command line's export imports no torch (checked in a fresh interpreter, as
tests/test_cli_startup.py does); an artifact the NumPy reader does not know is exported with
torch instead, and nothing is written twice; bad artifacts give the torch export's one error;
bfloat16 and float16 rounding are torch's.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GPT2_LIKE, lowbit_artifact, lowbit_collection, run_cli, write_adapter, write_collection
from test_cli_startup import _child, _run_main
from test_format_v2 import _write_unpacked, make_v2
from test_packed_residuals import with_residuals, write_unpacked_v3

import lorazip
from lorazip import export_core
from lorazip.artifact import Artifact, load_artifact, tensor_checksum, write_safetensors
from lorazip.errors import ArtifactError, OptionError, OutputError
from lorazip.export_core import EXPORT_MAX, Unsupported, bfloat16_bits, export_numpy, to_raw
from lorazip.layout import encode_meta

EMB = "model.embed_tokens"


def _embedding_lora(r: int, vocab: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{EMB}.lora_embedding_A": torch.randn(r, vocab, generator=g),
            f"base_model.model.{EMB}.lora_embedding_B": torch.randn(dim, r, generator=g)}


@pytest.fixture(scope="module")
def colls(tmp_path_factory):
    """Three collections: GPT-2-like modules (one adapter lacks one; a rank pattern; fan_in_fan_out),
    the same with an embedding LoRA and modules_to_save heads (float32 weight, float16 bias, an
    int64 tensor), and classifier heads of 2, 3 and 6 labels (shape groups)."""
    root = tmp_path_factory.mktemp("fast")
    plain = root / "plain"
    write_collection(plain, n=3, r=4, seed=0, fan_in_fan_out=True)
    write_adapter(plain / "a3", {k: v for k, v in GPT2_LIKE.items() if "c_proj" not in k}, r=3, seed=9,
                  rank_pattern={"transformer.h.1.attn.c_attn": 2})
    heads = root / "heads"
    for i in range(4):
        g = torch.Generator().manual_seed(50 + i)
        extra = {"base_model.model.score.weight": torch.randn(3, 8, generator=g) * 0.1,
                 "base_model.model.score.bias": (torch.randn(3, generator=g) * 0.1).half(),
                 "base_model.model.score.steps": torch.arange(3, dtype=torch.int64) + i,
                 **_embedding_lora(2 + i % 2, 40, 8, 60 + i)}
        write_adapter(heads / f"h{i}", GPT2_LIKE, r=4, seed=20 + i, extra_tensors=extra,
                      config_overrides={"modules_to_save": ["score"], "task_type": "SEQ_CLS",
                                        "rank_pattern": {EMB: 2 + i % 2}})
    groups = root / "groups"
    body = {"l.0.q": (16, 12), "l.1.q": (16, 12)}
    for i, (name, k) in enumerate({"a2": 2, "b2": 2, "c3": 3, "d6": 6, "e3": 3}.items()):
        write_adapter(groups / name, {**body, "classifier": (k, 12)}, r=4, seed=10 + i)
    return {name: lorazip.load_collection(root / name) for name in ("plain", "heads", "groups")}


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_exports(path: Path, out: Path, names=None, dtypes=("float32", "float16", "bfloat16")) -> None:
    """The torch export and the NumPy export of the artifact file ``path`` write the same files."""
    art = load_artifact(path)
    for dtype in dtypes:
        want = lorazip.export(art, out / f"torch-{dtype}", names, dtype=dtype)
        got = export_numpy(art, out / f"numpy-{dtype}", names, dtype=dtype)
        assert [p.name for p in got] == [p.name for p in want]
        a, b = _tree(out / f"torch-{dtype}"), _tree(out / f"numpy-{dtype}")
        assert a == b and len(a) == 2 * len(want), (path.name, dtype)
        for folder in got:  # and the files are what they should be (not two equal wrong exports)
            state, cfg = lorazip.to_peft(art, folder.name, dtype=dtype)
            assert json.loads((folder / "adapter_config.json").read_text()) == json.loads(json.dumps(cfg))
            from safetensors.torch import load_file

            back = load_file(str(folder / "adapter_model.safetensors"))
            assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# name: (collection, compress options); "budget": times the size of the rank-1 artifact of that storage
KINDS = {
    "rank-float32": ("plain", dict(rank=2, storage_dtype="float32")),
    "rank-float16": ("plain", dict(rank=2, storage_dtype="float16")),
    "rank-bfloat16": ("plain", dict(rank=2, storage_dtype="bfloat16")),
    "rank-int8": ("plain", dict(rank=2, storage_dtype="int8")),
    "budget-float32": ("plain", dict(budget=1.5, storage_dtype="float32")),
    "budget-int8": ("plain", dict(budget=1.5, storage_dtype="int8")),
    "clusters-2": ("plain", dict(rank=2, clusters=2)),
    "clusters-2-budget": ("plain", dict(budget=1.8, clusters=2, rank=2, storage_dtype="float16")),
    "jd-diag": ("plain", dict(rank=3, method="jd-diag")),
    "svd": ("plain", dict(rank=3, method="svd", storage_dtype="bfloat16")),
    "extras-int8": ("heads", dict(rank=3, extras_dtype="int8")),
    "extras-bfloat16": ("heads", dict(rank=3, extras_dtype="bfloat16", storage_dtype="int8")),
    "extras-float16-budget": ("heads", dict(budget=1.5, extras_dtype="float16", storage_dtype="float16")),
    "extras-as-stored": ("heads", dict(rank=2)),
    "groups-rank": ("groups", dict(rank=16)),
    "groups-budget-int8": ("groups", dict(budget=1.5, storage_dtype="int8")),
    "groups-clusters": ("groups", dict(rank=3, clusters=2, storage_dtype="bfloat16")),
}


def _compress(coll: lorazip.Collection, **how) -> Artifact:
    opts = dict(device="cpu", hash_sources=False, max_iters=30)
    if "budget" in how:
        one = lorazip.compress(coll, 1, **opts, **{k: v for k, v in how.items() if k.endswith("dtype")})
        how = {**how, "budget": int(how["budget"] * one.serialized_size())}
    return lorazip.compress(coll, **opts, **how)


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_bytes_as_the_torch_export(colls, tmp_path, kind):
    coll, how = KINDS[kind]
    art = _compress(colls[coll], **how)
    if "budget" in kind:
        assert any(m.get("residual") for m in art.modules), "no residual rows: the case tests nothing"
    if "extras" in kind:
        assert art.meta["adapters"][0]["extras"] and any(m.get("layout") == "embedding" for m in art.modules)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    _same_exports(path, tmp_path)
    names = art.names[::-2]  # a subset, in another order
    _same_exports(path, tmp_path / "subset", names, dtypes=("float16",))


def test_cli_export_writes_the_torch_exports_bytes(colls, tmp_path, capsys):
    art = _compress(colls["heads"], budget=1.5, storage_dtype="int8", extras_dtype="int8")
    path = art.save(tmp_path / "a.lorazip.safetensors")
    for dtype in ("float32", "bfloat16"):
        lorazip.export(load_artifact(path), tmp_path / f"lib-{dtype}", ["h3", "h0"], dtype=dtype)
        rc, out, err = run_cli(capsys, "export", path, tmp_path / f"cli-{dtype}", "-a", "h3", "-a", "h0",
                               "--dtype", dtype, "--json")
        assert rc == 0, err
        assert json.loads(out)["exported"] == [str(tmp_path / f"cli-{dtype}" / n) for n in ("h3", "h0")]
        assert _tree(tmp_path / f"cli-{dtype}") == _tree(tmp_path / f"lib-{dtype}")


# -- older format versions and rank-0 modules ----------------------------------------------------------

def test_older_formats_and_rank0_modules(colls, tmp_path):
    coll = colls["plain"]
    v1 = lorazip.compress(coll, 2, device="cpu", hash_sources=False)
    ks = {"transformer.h.0.attn.c_attn": [1, 3, 0, 2], "transformer.h.0.mlp.c_proj": [4, 0, 2, 0]}
    v2 = make_v2(v1, coll, ks, rank0=("transformer.h.0.mlp.c_proj",))  # a rank-0 module: residual rows only
    files = {"v1": tmp_path / "v1.safetensors", "v2": tmp_path / "v2.safetensors",
             "current": v2.save(tmp_path / "v2-now.lorazip.safetensors")}
    _write_unpacked(v1, files["v1"], "1")
    _write_unpacked(v2, files["v2"], "2")
    for sd in ("float16", "int8"):  # v3 as written before the residual rows were packed
        art = with_residuals(lorazip.compress(coll, 2, storage_dtype=sd, device="cpu", hash_sources=False), ks)
        files[f"v3-{sd}"] = write_unpacked_v3(art, tmp_path / f"v3-{sd}.safetensors")
    for name, path in files.items():
        load_artifact(path, verify=True)
        _same_exports(path, tmp_path / name)


# -- what the NumPy reader does not know: torch exports it ---------------------------------------------

def _edited(src: Path, dst: Path, edit) -> Path:
    """``src`` with its physical tensors edited by ``edit`` (checksum recomputed, so the file loads)."""
    from safetensors import safe_open

    from lorazip.layout import decode_meta

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(tensors)
    doc = json.loads(decode_meta(meta["lorazip_z"]))
    doc["checksum"] = tensor_checksum(tensors)
    meta["lorazip_z"] = encode_meta(doc)
    write_safetensors(tensors, dst, meta)
    return dst


@pytest.fixture(scope="module")
def artifact_file(colls, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-file")
    art = _compress(colls["heads"], budget=1.5, storage_dtype="int8", extras_dtype="int8")
    return art.save(root / "a.lorazip.safetensors")


def test_unknown_tensors_or_versions_are_exported_with_torch(artifact_file, tmp_path, monkeypatch, capsys):
    # a tensor no format the NumPy reader knows has (lorazip reads it and does not use it)
    future = _edited(artifact_file, tmp_path / "future.lorazip.safetensors",
                     lambda t: t.__setitem__("future/codes", torch.zeros(4, dtype=torch.uint8)))
    art = load_artifact(future, verify=True)
    with pytest.raises(Unsupported, match="future/codes"):
        export_numpy(art, tmp_path / "numpy")
    assert not (tmp_path / "numpy").exists()  # refused before anything was created
    lorazip.export(art, tmp_path / "lib")
    rc, _, err = run_cli(capsys, "export", future, tmp_path / "cli")
    assert rc == 0 and "exported 4 adapter(s)" in err, err
    assert _tree(tmp_path / "cli") == _tree(tmp_path / "lib")
    # a fresh interpreter: the fallback imports torch and writes the same bytes
    got = _run_main(["export", str(future), str(tmp_path / "child")])
    assert got["rc"] == 0 and "torch" in got["loaded"], got
    assert _tree(tmp_path / "child") == _tree(tmp_path / "lib")
    # a format version the NumPy reader does not list
    monkeypatch.setattr(export_core, "FAST_VERSIONS", ())
    with pytest.raises(Unsupported, match="format version"):
        export_numpy(load_artifact(artifact_file), tmp_path / "numpy")
    rc, _, err = run_cli(capsys, "export", artifact_file, tmp_path / "cli-version")
    assert rc == 0, err
    lorazip.export(load_artifact(artifact_file), tmp_path / "lib-version")
    assert _tree(tmp_path / "cli-version") == _tree(tmp_path / "lib-version")
    with pytest.raises(Unsupported, match="in memory"):  # an artifact not read from a file
        export_numpy(Artifact(art.meta, tensors=art.tensors()), tmp_path / "m")


def test_low_bit_rows_are_exported_without_torch(tmp_path, capsys):
    """Format v5 (low-bit residual rows): the NumPy reader unpacks and dequantises them; the same bytes
    as the torch export, every export dtype, a subset of adapters, and no torch in the command."""
    art = lowbit_artifact(lowbit_collection(tmp_path / "src", seed=5))
    path = art.save(tmp_path / "v5.lorazip.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "lowbit/resid_B" in f.keys(), "no low-bit rows: the case tests nothing"
    for dtype in ("float32", "float16", "bfloat16"):
        export_numpy(load_artifact(path), tmp_path / f"numpy-{dtype}", dtype=dtype)
        lorazip.export(load_artifact(path), tmp_path / f"lib-{dtype}", dtype=dtype)
        assert _tree(tmp_path / f"numpy-{dtype}") == _tree(tmp_path / f"lib-{dtype}")
    names = [art.names[4], art.names[1]]
    export_numpy(load_artifact(path), tmp_path / "numpy-sub", names=names)
    lorazip.export(load_artifact(path), tmp_path / "lib-sub", names=names)
    assert _tree(tmp_path / "numpy-sub") == _tree(tmp_path / "lib-sub")
    got = _run_main(["export", str(path), str(tmp_path / "child")])
    assert got["rc"] == 0 and "torch" not in got["loaded"], got
    assert _tree(tmp_path / "child") == _tree(tmp_path / "lib-float32")


# -- no torch --------------------------------------------------------------------------------------------

def test_cli_export_does_not_import_torch(artifact_file, tmp_path):
    got = _run_main(["export", str(artifact_file), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert got["rc"] == 0 and "torch" not in got["loaded"], got
    lorazip.export(load_artifact(artifact_file), tmp_path / "lib", dtype="bfloat16")
    assert _tree(tmp_path / "out") == _tree(tmp_path / "lib")
    got = _run_main(["export", str(artifact_file), str(tmp_path / "out")])  # an error: one line, still no torch
    assert got["rc"] == 1 and "torch" not in got["loaded"], got


def test_export_core_imports_no_torch():
    got = _child(
        """
        import json, sys
        import lorazip.export_core
        print(json.dumps({"loaded": [m for m in ("torch", "numpy") if m in sys.modules]}))
        """
    )
    assert "torch" not in got["loaded"]


# -- errors: the torch export's ----------------------------------------------------------------------------

def _error(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


def test_same_errors(artifact_file, tmp_path):
    art = load_artifact(artifact_file)
    (tmp_path / "t" / "h1").mkdir(parents=True)
    (tmp_path / "n" / "h1").mkdir(parents=True)
    for kw in (dict(names=["nope"]), dict(dtype="int8"), dict(names=["h1"])):
        t = _error(lambda: lorazip.export(art, tmp_path / "t", **kw))
        n = _error(lambda: export_numpy(art, tmp_path / "n", **kw))
        assert t[0] in (ArtifactError, OptionError, OutputError)
        assert (t[0], t[1].replace("/t/", "/x/")) == (n[0], n[1].replace("/n/", "/x/"))
    evil = copy.deepcopy(art.meta)
    evil["adapters"][1]["name"] = "../evil"
    for fn in (lorazip.export, export_numpy):
        bad = Artifact(evil, path=art.path)
        bad._layout = art._layout
        assert _error(lambda: fn(bad, tmp_path / "e")) == (
            ArtifactError, "adapter name '../evil' cannot be used as a folder name (it could write outside the "
                           "output folder)")


@pytest.mark.parametrize("what", ["nan-U", "nan-scale", "nan-resid", "overflow-float16"])
def test_bad_artifacts_give_the_same_error(colls, tmp_path, what):
    m = "transformer.h.0.attn.c_attn"
    if what == "nan-scale":
        src = lorazip.compress(colls["plain"], 2, storage_dtype="int8", device="cpu", hash_sources=False)
        edit = lambda t: t[f"qscale/V/{m}"].view(-1)[1].fill_(float("nan"))  # noqa: E731
    elif what == "nan-resid":
        src = _compress(colls["plain"], budget=1.5, storage_dtype="float32")
        edit = lambda t: t["resid_A"].view(-1)[-1].fill_(float("inf"))  # noqa: E731
    else:
        src = lorazip.compress(colls["plain"], 2, storage_dtype="float32", device="cpu", hash_sources=False)
        value = float("nan") if what == "nan-U" else 1e5
        edit = lambda t: t[f"U/{m}"].view(-1)[3].fill_(value)  # noqa: E731
    path = _edited(src.save(tmp_path / "src.lorazip.safetensors"), tmp_path / "bad.lorazip.safetensors", edit)
    dtype = "float16" if what.startswith("overflow") else "float32"
    art = load_artifact(path, verify=True)
    t = _error(lambda: lorazip.export(art, tmp_path / "t", dtype=dtype))
    n = _error(lambda: export_numpy(art, tmp_path / "n", dtype=dtype))
    assert t == n and t[0] is ArtifactError, (t, n)
    assert ("overflow float16" in t[1]) if what.startswith("overflow") else ("has NaN or Inf values" in t[1])
    assert not any((tmp_path / "n").iterdir())  # nothing written: the first adapter has the module


# -- rounding ---------------------------------------------------------------------------------------------

def test_rounding_is_torchs():
    rng = np.random.default_rng(0)
    f32 = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4028235e38], dtype=np.float32)
    f32 = np.concatenate([f32, specials])
    want = torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = bfloat16_bits(f32)
    nan = np.isnan(f32)
    assert np.array_equal(got[~nan], want[~nan]) and (got[nan] & 0x7FFF > 0x7F80).all()
    # float64 -> float16 / bfloat16: through float32 first, as torch converts (not rounded once)
    x = rng.standard_normal(1_000_000) * np.exp(rng.uniform(-25, 11, 1_000_000))
    x = np.concatenate([x, [1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40, 65504.0, 2**-24, 2**-25 * 1.0000001]])
    for dtype in ("float16", "bfloat16", "float32"):
        raw = to_raw(x, dtype)
        t = torch.from_numpy(x).to(getattr(torch, dtype)).contiguous()
        assert raw.shape == tuple(t.shape)
        assert bytes(memoryview(raw.data).cast("B")) == t.view(torch.uint8).numpy().tobytes(), dtype
    for name, limit in EXPORT_MAX.items():
        assert limit == torch.finfo(getattr(torch, name)).max


def test_a_memory_limit_writes_in_chunks_and_the_same_bytes(colls, tmp_path, capsys, monkeypatch):
    """``--memory-limit`` splits the adapters into chunks of about half of it (one adapter at least)
    and writes the same folders as one chunk."""
    art = _compress(colls["heads"], budget=1.5, storage_dtype="int8")
    path = art.save(tmp_path / "a.lorazip.safetensors")
    meta, rows = load_artifact(path).meta, list(range(len(art.names)))
    one = export_core.chunks(meta, rows, "float32")
    assert one == [rows]
    tiny = export_core.chunks(meta, rows, "float32", export_core.chunk_bytes(2))  # 1 byte: one adapter each
    assert tiny == [[i] for i in rows]
    seen: list[list[int]] = []
    real = export_core.peft_parts
    monkeypatch.setattr(export_core, "peft_parts", lambda src, m, chunk, dt: (seen.append(list(chunk)),
                                                                              real(src, m, chunk, dt))[1])
    rc, _, err = run_cli(capsys, "export", path, tmp_path / "small", "--memory-limit", "2")
    assert rc == 0, err
    assert seen == [[i] for i in rows]
    lorazip.export(load_artifact(path), tmp_path / "whole")
    assert _tree(tmp_path / "small") == _tree(tmp_path / "whole")
    with pytest.raises(OptionError, match="memory limit must be a positive number"):
        export_numpy(load_artifact(path), tmp_path / "bad", memory_limit=0)


def test_an_adapter_stored_at_nothing_exports_as_a_zero_lora(tmp_path, capsys):
    """An adapter the artifact stores at nothing in every module (here its update is zero: PEFT's
    initialisation, B = 0) is written as a zero LoRA of rank 1 on its first module, which PEFT loads
    (a folder with no target module it refuses), by both exports, byte for byte; the CLI names it, and
    compress's report lists it among the adapters with a zero update."""
    from safetensors.numpy import load_file

    src = tmp_path / "src"
    write_collection(src, n=3, seed=3)
    zero = {k: np.zeros_like(v) if ".lora_B." in k else v
            for k, v in load_file(str(src / "a1" / "adapter_model.safetensors")).items()}
    from safetensors.numpy import save_file

    save_file(zero, str(src / "a1" / "adapter_model.safetensors"), metadata={"format": "pt"})
    art_path = tmp_path / "z.lorazip.safetensors"
    rc, _, err = run_cli(capsys, "compress", str(src), "-o", str(art_path))
    assert rc == 0 and "zero update in every module" in err and "a1" in err
    art = load_artifact(art_path)
    assert lorazip.evaluate(art)["bits"]["zero_update"] == ["a1"]
    empty_np, empty_t = [], []
    export_numpy(art, tmp_path / "np", empty=empty_np)
    lorazip.export(art, tmp_path / "t", empty=empty_t)
    assert empty_np == empty_t == ["a1"]
    for name in ("a0", "a1", "a2"):
        assert (tmp_path / "np" / name / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "t" / name / "adapter_model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "np" / "a1" / "adapter_config.json").read_text())
    first = min(art.meta["adapters"][1]["ranks"], key=[m["name"] for m in art.modules].index)
    assert cfg["target_modules"] == [first] and cfg["r"] == 1
    tensors = load_file(str(tmp_path / "np" / "a1" / "adapter_model.safetensors"))
    assert len(tensors) == 2 and all(not t.any() for t in tensors.values())
    rc, _, err = run_cli(capsys, "export", str(art_path), str(tmp_path / "cli"))
    assert rc == 0 and "stored at nothing in every module" in err and "a1" in err
    rc, _, err = run_cli(capsys, "eval", str(art_path))  # eval says it too
    assert rc == 0 and "zero update in every module" in err and "a1" in err
    # the report names adapters stored at nothing where they do have an update (a budget left them out)
    gone = tmp_path / "gone.lorazip.safetensors"
    from helpers import resave_artifact

    def edit(t):  # every error made the norm: each adapter with an update is then stored at nothing
        key = "stats" if "stats" in t else None
        if key:
            t[key][0] = t[key][1]
        else:
            t["stats/sq_error"][:] = t["stats/norm2"]

    resave_artifact(art_path, gone, tensor_edit=edit)
    bits = lorazip.evaluate(load_artifact(gone))["bits"]
    assert bits["adapters_at_nothing"] == ["a0", "a2"] and bits["zero_update"] == ["a1"]


def test_heads_left_out_are_said_and_not_counted(tmp_path, capsys):
    """``--no-extras``: the report says the heads are left out (not "stored uncompressed") and its ratio
    compares with the originals less them; export names the adapters whose heads it cannot write."""
    heads = {"base_model.model.classifier.modules_to_save.default.weight": torch.randn(32, 64)}
    write_collection(tmp_path / "src", n=2, seed=4, extra_tensors=heads)
    art_path = tmp_path / "h.lorazip.safetensors"
    rc, out, err = run_cli(capsys, "compress", str(tmp_path / "src"), "-o", str(art_path), "--rank", "2",
                           "--no-extras", "--json")
    rep = json.loads(out)
    files = sum((tmp_path / "src" / a / "adapter_model.safetensors").stat().st_size for a in ("a0", "a1"))
    assert rc == 0 and "left out (--no-extras" in err and "stored uncompressed" not in err
    assert rep["storage"]["original_bytes"] == files - 2 * 32 * 64 * 4
    rc, _, err = run_cli(capsys, "export", str(art_path), str(tmp_path / "out"))
    assert rc == 0 and "had non-LoRA tensors" in err and "a0, a1" in err
    kept = tmp_path / "k.lorazip.safetensors"
    rc, out, _ = run_cli(capsys, "compress", str(tmp_path / "src"), "-o", str(kept), "--rank", "2", "--json")
    assert json.loads(out)["storage"]["original_bytes"] == files  # heads kept: the files whole
    rc, _, err = run_cli(capsys, "export", str(kept), str(tmp_path / "out2"))
    assert rc == 0 and "had non-LoRA tensors" not in err


def test_embedding_weights_peft_saves_are_named(tmp_path, capsys):
    """A LoRA on an embedding makes PEFT save the embedding's weights in every adapter: compress says what
    those are and how to drop them (not once they are dropped)."""
    saved = {"base_model.model.transformer.wte.base_layer.weight": torch.randn(50, 16)}
    write_collection(tmp_path / "src", n=2, seed=5, extra_tensors=saved)
    rc, _, err = run_cli(capsys, "compress", str(tmp_path / "src"), "-o", str(tmp_path / "a.lorazip.safetensors"),
                         "--rank", "2")
    assert rc == 0 and "base_layer.weight tensors are the embedding weights PEFT saves" in " ".join(err.split())
    rc, _, err = run_cli(capsys, "compress", str(tmp_path / "src"), "-o", str(tmp_path / "b.lorazip.safetensors"),
                         "--rank", "2", "--no-extras")
    assert rc == 0 and "PEFT saves" not in " ".join(err.split())
