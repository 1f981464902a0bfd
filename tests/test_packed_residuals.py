"""Format v3, packed residual rows: all modules' ``resid_B/<m>`` / ``resid_A/<m>`` (and their int8
``qscale/...``) in one flat tensor per role, module by module, offsets from the metadata.

Round trips of the logical tensors in every storage dtype, reads of single row blocks (only their
bytes, through safetensors and through the plain-file reader), modules that keep their own tensors,
v3 files written before the packing (per-module tensors), corruption, export and serve unchanged on
a mixed-budget artifact, and the bytes saved.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GPT2_LIKE, make_peft_adapters, write_collection
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorazip
from lorazip.artifact import Artifact, load_artifact, safetensors_header, tensor_checksum, write_safetensors
from lorazip.errors import ArtifactError
from lorazip.layout import RESID, encode_meta, pack
from lorazip.quantize import QSCALE, to_storage
from lorazip.serve import use_adapters

DTYPES = ("float32", "float16", "bfloat16", "int8")
KS = {  # residual ranks per adapter (4 adapters); h.1.c_attn has none
    "transformer.h.0.attn.c_attn": [1, 3, 0, 2],
    "transformer.h.0.mlp.c_proj": [2, 0, 2, 1],
}


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    write_collection(root / "src", n=4, r=4, seed=3)
    return lorazip.load_collection(root / "src")


def with_residuals(art: Artifact, ks: dict[str, list[int]], seed: int = 0, *, own: dict[str, str] | None = None
                   ) -> Artifact:
    """``art`` (in memory) plus random residual rows of ranks ``ks[module]`` in its storage dtype
    (int8: float32 row scales, as lorazip writes them); ``own[module]`` stores that module's rows in
    another float dtype instead ("float16-scales": int8 rows with float16 scales)."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(art.tensors())
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    sd = meta["storage_dtype"]
    for mod in meta["modules"]:
        k = ks.get(mod["name"])
        if not k or not sum(k):
            continue
        total = sum(k)
        how = (own or {}).get(mod["name"])
        for role, dim in (("resid_B", "d_out"), ("resid_A", "d_in")):
            x = torch.randn(total, mod[dim], generator=g)
            if how == "float16-scales":
                st = to_storage(x, "int8", torch.float16)
            else:
                st = to_storage(x, how or sd, torch.float32)
            st.put(tensors, f"{role}/{mod['name']}")
        tensors[f"resid_ranks/{mod['name']}"] = torch.tensor(k, dtype=torch.int32)
        mod["residual"] = {"max_rank": max(k), "total_rank": total}
    return Artifact(meta, tensors=tensors)


def physical(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_unpacked_v3(art: Artifact, path: Path) -> Path:
    """``art`` as the v3 writer before the packing stored it: spectra, ranks and statistics packed,
    every module's residual rows (and int8 scales) under their own ``resid_B/<m>`` ... keys."""
    logical = art.tensors()
    tensors = pack(logical, art.meta)
    for role in RESID:
        tensors.pop(role, None)
        tensors.pop(QSCALE + role, None)
    for key, t in logical.items():
        if key.startswith(("resid_B/", "resid_A/", "qscale/resid_B/", "qscale/resid_A/")):
            tensors[key] = t.contiguous()
    doc = {k: v for k, v in art.meta.items() if k != "checksum"}
    doc["checksum"] = tensor_checksum(tensors)
    write_safetensors(tensors, path, {"format": "lorazip", "format_version": "3", "lorazip_z": encode_meta(doc)})
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same_logical(a: Artifact, b: Artifact) -> None:
    assert set(a.keys()) == set(b.keys())
    ta, tb = a.tensors(), b.tensors()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
        assert torch.equal(a.get(key), b.get(key)), key
    for mod in a.modules:
        for rows in (None, [3, 0], [2]):
            for x, y in zip(a.module_residuals(mod["name"], rows), b.module_residuals(mod["name"], rows)):
                assert x.dtype == y.dtype and torch.equal(x, y), (mod["name"], rows)


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sd", DTYPES)
def test_round_trip_of_the_logical_tensors(coll, tmp_path, sd):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype=sd, device="cpu", hash_sources=False), KS)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    phys = physical(path)
    assert not any(k.startswith(("resid_B/", "resid_A/", "qscale/resid_B/", "qscale/resid_A/")) for k in phys)
    widths = {m: GPT2_LIKE[m] for m in KS}  # (d_out, d_in)
    want = {"resid_B": sum(sum(k) * widths[m][0] for m, k in KS.items()),
            "resid_A": sum(sum(k) * widths[m][1] for m, k in KS.items())}
    for role, n in want.items():
        assert phys[role].shape == (n,) and phys[role].dtype == (torch.int8 if sd == "int8" else getattr(torch, sd))
        if sd == "int8":  # one float32 scale per row, the rows of all modules in the same order
            assert phys[QSCALE + role].shape == (sum(map(sum, KS.values())),)
            assert phys[QSCALE + role].dtype == torch.float32
        else:
            assert QSCALE + role not in phys
    # module by module in metadata order, each its (total_rank, d) block row-major
    logical = art.tensors()
    first = "transformer.h.0.attn.c_attn"
    assert torch.equal(phys["resid_B"][: 6 * 24], logical[f"resid_B/{first}"].reshape(-1))
    assert torch.equal(phys["resid_A"][6 * 8 :], logical["resid_A/transformer.h.0.mlp.c_proj"].reshape(-1))
    back = load_artifact(path, verify=True)
    assert_same_logical(art, back)
    assert lorazip.verify(path)["ok"]
    assert back.serialized_size() == path.stat().st_size == art.serialized_size()
    again = back.save(tmp_path / "b.lorazip.safetensors")  # read and written again: the same bytes
    assert sha256(again) == sha256(path)
    assert sha256(art.save(tmp_path / "c.lorazip.safetensors")) == sha256(path)  # deterministic


@pytest.mark.parametrize("sd,own", [("float16", "float32"), ("int8", "float16-scales"), ("int8", "float32")])
def test_a_module_in_another_dtype_keeps_its_own_tensors(coll, tmp_path, sd, own):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype=sd, device="cpu", hash_sources=False), KS,
                         own={"transformer.h.0.mlp.c_proj": own})
    path = art.save(tmp_path / "a.lorazip.safetensors")
    phys = physical(path)
    m = "transformer.h.0.mlp.c_proj"
    assert f"resid_B/{m}" in phys and f"resid_A/{m}" in phys
    assert (f"qscale/resid_B/{m}" in phys) is (own == "float16-scales")
    assert phys["resid_B"].shape == (6 * 24,)  # c_attn alone is packed
    assert_same_logical(art, load_artifact(path, verify=True))


def test_rows_of_one_adapter_read_only_their_bytes(coll, tmp_path, monkeypatch):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype="int8", device="cpu", hash_sources=False), KS)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    loaded = load_artifact(path)
    import safetensors

    real, sliced = safetensors.safe_open, []

    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            sliced.append((key, "all"))
            return self._f.get_tensor(key)

        def get_slice(self, key):
            sl = self._f.get_slice(key)

            class S:
                def __getitem__(s, item):
                    sliced.append((key, item.start, item.stop) if isinstance(item, slice) else (key, item))
                    return sl[item]

            return S()

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    m = "transformer.h.0.mlp.c_proj"  # after c_attn's 6 rows; (d_out, d_in) = (8, 16); ks = [2, 0, 2, 1]
    b, a, k = loaded.module_residuals(m, [2])
    assert k.tolist() == [2]
    resid = sorted(x for x in sliced if x[0].startswith(("resid_B", "resid_A", "qscale/resid")))
    assert resid == [("qscale/resid_A", 6 + 2, 6 + 4), ("qscale/resid_B", 6 + 2, 6 + 4),
                     ("resid_A", 6 * 8 + 2 * 16, 6 * 8 + 4 * 16), ("resid_B", 6 * 24 + 2 * 8, 6 * 24 + 4 * 8)]
    mem_b, mem_a, _ = art.module_residuals(m, [2])
    assert torch.equal(b, mem_b) and torch.equal(a, mem_a)
    sliced.clear()
    rows = loaded.get_rows(f"resid_A/{m}", [3, 1])  # rows of the logical (total_rank, d_in) tensor
    assert torch.equal(rows, art.get(f"resid_A/{m}")[[3, 1]])
    assert sorted(sliced) == [("qscale/resid_A", 6 + 1, 6 + 2), ("qscale/resid_A", 6 + 3, 6 + 4),
                              ("resid_A", 6 * 8 + 16, 6 * 8 + 2 * 16), ("resid_A", 6 * 8 + 3 * 16, 6 * 8 + 4 * 16)]
    with pytest.raises(IndexError, match="out of range"):  # past the module's rows, not into the next one's
        loaded.get_rows(f"resid_B/{m}", [5])
    with pytest.raises(IndexError, match="out of range"):
        loaded.get_rows("resid_B/transformer.h.0.attn.c_attn", [6])


def test_plain_file_reader_reads_the_same(coll, tmp_path):
    """A path safetensors cannot open (not UTF-8) is read with lorazip's own reader: same tensors."""
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype="int8", device="cpu", hash_sources=False), KS)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/b\xff.lorazip.safetensors"))
    shutil.copyfile(path, odd)
    assert_same_logical(load_artifact(path), load_artifact(odd, verify=True))


# -- files written before the packing --------------------------------------------------------------

@pytest.mark.parametrize("sd", DTYPES)
def test_unpacked_v3_files_read_the_same(coll, tmp_path, sd):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype=sd, device="cpu", hash_sources=False), KS)
    new = load_artifact(art.save(tmp_path / "new.lorazip.safetensors"), verify=True)
    old_path = write_unpacked_v3(art, tmp_path / "old.lorazip.safetensors")
    phys = physical(old_path)
    assert "resid_B" not in phys and f"resid_B/{next(iter(KS))}" in phys
    assert (f"qscale/resid_A/{next(iter(KS))}" in phys) is (sd == "int8")
    old = load_artifact(old_path, verify=True)
    assert lorazip.verify(old_path)["ok"]
    assert_same_logical(old, new)
    assert lorazip.evaluate(old)["errors"] == lorazip.evaluate(new)["errors"]
    assert old_path.stat().st_size > new.path.stat().st_size  # per-module header entries
    # saved again, an old file is written in the packed layout, byte for byte as a new one
    assert sha256(old.save(tmp_path / "again.lorazip.safetensors")) == sha256(new.path)


# -- corruption ------------------------------------------------------------------------------------

def _resave(src: Path, dst: Path, edit) -> Path:
    """``src`` with its physical tensors edited and the checksum made to match (a self-consistent file)."""
    from helpers import read_doc, write_doc

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    doc = read_doc(meta)
    doc["checksum"] = tensor_checksum(tensors)
    write_doc(meta, doc)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("sd", ["float16", "int8"])
def test_inconsistent_packed_rows_are_one_clear_error(coll, tmp_path, sd):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype=sd, device="cpu", hash_sources=False), KS)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    n_b = 6 * 24 + 5 * 8
    cases = {
        "short": (lambda t: t.update(resid_B=t["resid_B"][:-8].clone()),
                  f"tensor 'resid_B' of shape ({n_b - 8},)"),
        "long": (lambda t: t.update(resid_A=torch.cat([t["resid_A"], t["resid_A"][:16]])),
                 f"need shape ({6 * 8 + 5 * 16},)"),
    }
    if sd == "int8":
        cases["scales short"] = (lambda t: t.update({"qscale/resid_B": t["qscale/resid_B"][:-1].clone()}),
                                 "tensor 'qscale/resid_B' missing or not of shape (11,)")
        cases["scales missing"] = (lambda t: t.pop("qscale/resid_A"), "tensor 'qscale/resid_A' missing")
    for name, (edit, message) in cases.items():
        bad = _resave(path, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(ArtifactError) as exc:
            load_artifact(bad)
        text = str(exc.value)
        assert text.startswith(f"{bad}: ") and message in text and "\n" not in text, (name, text)
        with pytest.raises(ArtifactError, match=re.escape(message)):
            lorazip.verify(bad)


def test_damaged_packed_rows_fail_the_checksum_and_a_cut_file_is_refused(coll, tmp_path):
    art = with_residuals(lorazip.compress(coll, 2, storage_dtype="float16", device="cpu", hash_sources=False), KS)
    path = art.save(tmp_path / "a.lorazip.safetensors")
    tensors = physical(path)
    head, order = safetensors_header(tensors, {})  # where resid_B's bytes are (same layout, no metadata)
    raw = bytearray(path.read_bytes())
    header_len = len(raw) - sum(t.numel() * t.element_size() for t in tensors.values())
    pos = header_len + sum(tensors[k].numel() * tensors[k].element_size() for k in order[: order.index("resid_B")])
    raw[pos + 10] ^= 0x40  # one bit of one residual value
    bad = tmp_path / "flipped.lorazip.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(bad, verify=True)
    report = lorazip.verify(bad)
    assert not report["ok"] and "checksum mismatch" in report["problems"][0]
    cut = tmp_path / "cut.lorazip.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=re.escape(str(cut))):
        load_artifact(cut)


# -- export and serve on a mixed-budget artifact ---------------------------------------------------

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("packed-gpt2")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()
    common = dict(task_type="CAUSAL_LM", fan_in_fan_out=True, lora_dropout=0.0, target_modules=["c_attn", "c_proj"])
    configs = {f"g{i}": LoraConfig(r=4, lora_alpha=8, **common) for i in range(4)}
    make_peft_adapters(base, configs, root / "src", seed=4)
    return base, lorazip.load_collection(root / "src"), root


@pytest.mark.parametrize("sd", ["float32", "int8"])
def test_export_and_serve_unchanged_on_a_mixed_budget_artifact(gpt2, tmp_path, sd):
    base, coll, _root = gpt2
    full = lorazip.compress(coll, 4, storage_dtype=sd, device="cpu", hash_sources=False).serialized_size()
    art = lorazip.compress(coll, budget=full // 3, storage_dtype=sd, device="cpu", hash_sources=False)
    assert any("residual" in m for m in art.modules)
    new = load_artifact(art.save(tmp_path / "new.lorazip.safetensors"), verify=True)
    old = load_artifact(write_unpacked_v3(art, tmp_path / "old.lorazip.safetensors"), verify=True)
    assert new.path.stat().st_size < old.path.stat().st_size
    assert_same_logical(old, new)
    lorazip.export(new, tmp_path / "new")
    lorazip.export(old, tmp_path / "old")
    for name in new.names:
        a = load_file(str(tmp_path / "new" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "old" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (tmp_path / "new" / name / "adapter_config.json").read_bytes() == (
            tmp_path / "old" / name / "adapter_config.json").read_bytes()
    ids = torch.randint(0, 100, (5, 6), generator=torch.Generator().manual_seed(1))
    rows = ["g2", None, "g0", "g3", "g1"]
    out = {}
    for label, a in (("new", new), ("old", old)):
        model = lorazip.apply(copy.deepcopy(base), a.path)
        with torch.no_grad(), use_adapters(model, rows):
            out[label] = model(input_ids=ids).logits
    assert torch.equal(out["new"], out["old"])
    with warnings.catch_warnings():  # the served rows are the exported adapters' outputs
        warnings.simplefilter("ignore")
        import peft

        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "new" / "g3")).eval()
        with torch.no_grad():
            want = pm(input_ids=ids[3:4]).logits
    assert torch.allclose(out["new"][3:4], want, rtol=1e-4, atol=1e-4)
