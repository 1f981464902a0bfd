"""Loading PEFT LoRA adapters: real fixtures, scaling rules, key layouts, dtypes, laziness, sources."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from helpers import GPT2_LIKE, edit_config, write_adapter, write_collection
from safetensors import safe_open

import lorazip
from lorazip.errors import AdapterFormatError, SourceError
from lorazip.io.peft import load_adapter, module_scale, parse_safetensors

GPT2 = "gpt2"
DBERT = "distilbert-base-uncased"
NITIN = "Nitin-Mane__LoRA-Lightweight-Fine-Tuning-Project-Overview"
SHUTTER = "ShutterStack__Lightweight-Fine-Tuning-to-a-Foundation-Model"
BRUCE = "BruceChanJianLe__lightweight-fine-tuning-foundation-model"
AANIL = "aanilgeo__Lightweight-Fine-Tuning-Project__checkpoint-96"
WINK = "winkitee__Lightweight-Fine-Tuning-Project__checkpoint-{}"


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ----------------------------------------------------------------------------------------------
# Real fixtures
# ----------------------------------------------------------------------------------------------


def test_gpt2_fixtures(fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / GPT2)
    assert len(coll) == 6
    assert coll.base_model == "gpt2"
    assert set(coll.names) == {NITIN, SHUTTER} | {WINK.format(s) for s in (125, 250, 500, 1000)}
    assert len(coll.modules) == 36  # 12 layers x (c_attn, attn.c_proj, mlp.c_proj)
    shapes = {m.name: (m.d_out, m.d_in) for m in coll.modules}
    for layer in range(12):
        assert shapes[f"transformer.h.{layer}.attn.c_attn"] == (2304, 768)  # fused QKV
        assert shapes[f"transformer.h.{layer}.attn.c_proj"] == (768, 768)  # suffix-matched "c_proj"
        assert shapes[f"transformer.h.{layer}.mlp.c_proj"] == (768, 3072)
    assert all(m.layout == "linear" for m in coll.modules)
    by_name = {a.name: a for a in coll.adapters}
    for a in coll.adapters:
        assert a.config["fan_in_fan_out"] is True
        assert a.extras == ["base_model.model.score.weight"]
        assert a.dtype == "F32"
    assert set(coll.extras()) == set(coll.names)
    shutter = by_name[SHUTTER]
    assert {(m.rank, m.alpha, m.scale) for m in shutter.modules.values()} == {(4, 16.0, 4.0)}
    assert {m.scale for m in by_name[NITIN].modules.values()} == {4.0}  # 32 / 8
    assert {m.scale for m in by_name[WINK.format(250)].modules.values()} == {2.0}  # 16 / 8
    assert len(by_name[NITIN].modules) == 36
    missing = coll.missing_modules()
    assert set(missing) == set(coll.names) - {NITIN}  # the others only adapt c_attn
    for name, mods in missing.items():
        assert len(mods) == 24 and all(m.endswith("c_proj") for m in mods)


def test_distilbert_fixtures(fixtures_dir):
    coll = lorazip.load_collection(fixtures_dir / DBERT)
    assert coll.names == [BRUCE, AANIL]
    assert coll.base_model == "distilbert-base-uncased"
    assert len(coll.modules) == 24  # union: 6 layers x {q, k, v, out}_lin
    assert all((m.d_out, m.d_in) == (768, 768) for m in coll.modules)
    bruce, aanil = coll.adapters
    assert len(bruce.modules) == 12 and len(aanil.modules) == 24
    assert {m.rank for m in bruce.modules.values()} == {8}
    assert {m.rank for m in aanil.modules.values()} == {16}
    assert {m.scale for m in bruce.modules.values()} == {2.0}
    assert {m.scale for m in aanil.modules.values()} == {2.0}
    assert coll.extras() == {
        BRUCE: [
            "base_model.model.classifier.bias", "base_model.model.classifier.weight",
            "base_model.model.pre_classifier.bias", "base_model.model.pre_classifier.weight",
        ]
    }
    assert aanil.config["fan_in_fan_out"] is False
    assert set(coll.missing_modules()) == {BRUCE}
    assert all(m.endswith(("k_lin", "out_lin")) for m in coll.missing_modules()[BRUCE])
    # mixed ranks are zero-padded to 16
    fac = coll.module_factors("distilbert.transformer.layer.0.attention.q_lin")
    assert fac.B.shape == (2, 768, 16) and fac.A.shape == (2, 16, 768)
    assert fac.ranks.tolist() == [8, 16]
    assert torch.all(fac.B[0, :, 8:] == 0) and torch.all(fac.A[0, 8:, :] == 0)
    fac = coll.module_factors("distilbert.transformer.layer.0.attention.k_lin")
    assert fac.ranks.tolist() == [0, 16] and torch.all(fac.B[0] == 0)


def test_checkpoint_trajectory(fixtures_dir):
    coll = lorazip.load_collection([fixtures_dir / GPT2 / WINK.format(250), fixtures_dir / GPT2 / WINK.format(500)])
    assert coll.names == [WINK.format(250), WINK.format(500)]
    a, b = coll.adapters
    assert list(a.modules) == list(b.modules) and len(a.modules) == 12
    for m in a.modules:
        assert (a.modules[m].d_out, a.modules[m].d_in, a.modules[m].rank) == (2304, 768, 8)
        assert (b.modules[m].d_out, b.modules[m].d_in, b.modules[m].rank) == (2304, 768, 8)
    fac = coll.module_factors("transformer.h.0.attn.c_attn")
    d0, d1 = fac.B[0] @ fac.A[0], fac.B[1] @ fac.A[1]
    assert d0.shape == d1.shape == (2304, 768)
    assert float((d0 - d1).norm()) > 0  # training moved the adapter


def test_fixture_factors_match_safetensors(fixtures_dir):
    folder = fixtures_dir / GPT2 / SHUTTER
    ad = load_adapter(folder)
    mod = "transformer.h.3.attn.c_attn"
    B, A = ad.factors(mod)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor(f"base_model.model.{mod}.lora_A.weight").double()
        b = f.get_tensor(f"base_model.model.{mod}.lora_B.weight").double()
    assert a.shape == (4, 768) and b.shape == (2304, 4)
    assert B.dtype == A.dtype == torch.float64
    assert _close(B @ A, 4.0 * (b @ a))
    assert float((b @ a).norm()) > 0


# ----------------------------------------------------------------------------------------------
# Scaling, patterns, key variants, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r,alpha,rslora,expected",
    [(4, 8, False, 2.0), (4, 16, False, 4.0), (8, 8, False, 1.0), (4, 8, True, 4.0), (16, 8, True, 2.0)],
)
def test_scale(tmp_path, r, alpha, rslora, expected):
    mods = {"layers.0.q_proj": (6, 5)}
    deltas = write_adapter(tmp_path / "a", mods, r=r, alpha=alpha, use_rslora=rslora, seed=1)
    ad = load_adapter(tmp_path / "a")
    spec = ad.modules["layers.0.q_proj"]
    assert spec.rank == r and spec.scale == pytest.approx(expected, rel=1e-15)
    assert spec.scale == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)
    B, A = ad.factors("layers.0.q_proj")
    assert _close(B @ A, deltas["layers.0.q_proj"])


def test_lora_alpha_default_is_8(tmp_path):
    write_adapter(tmp_path / "a", {"q": (4, 4)}, r=2, alpha=99, seed=0)
    cfg = tmp_path / "a" / "adapter_config.json"
    import json

    c = json.loads(cfg.read_text())
    del c["lora_alpha"]
    cfg.write_text(json.dumps(c))
    assert load_adapter(tmp_path / "a").modules["q"].scale == 4.0  # PEFT's default lora_alpha = 8


PATTERN_MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.21.self_attn.q_proj",
]
PATTERNS = [
    {"layers.1.self_attn.q_proj": 2},
    {"model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
    {r"layers\.1\.self_attn\.v_proj": 6},
    {"1.self_attn.q_proj": 2},
    {"q_proj": 2, "layers.11.self_attn.q_proj": 6},  # first matching key wins (PEFT's order)
    {"layers.11.self_attn.q_proj": 6, "q_proj": 2},
    {"self_attn": 6},  # does not match the end of any name: default
]


@pytest.mark.parametrize("rank_pattern", PATTERNS)
def test_rank_and_alpha_pattern_match_peft(tmp_path, rank_pattern):
    from peft.utils.other import get_pattern_key

    alpha_pattern = {k: 3 * v for k, v in rank_pattern.items()}
    mods = {m: (8, 6) for m in PATTERN_MODULES}
    deltas = write_adapter(
        tmp_path / "a", mods, r=4, alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, seed=3
    )
    ad = load_adapter(tmp_path / "a")
    for m in PATTERN_MODULES:
        # what PEFT's LoraModel._create_and_replace computes for this module
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), m), 4)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), m), 8)
        assert module_scale(ad.config, m) == (r, alpha, alpha / r), m
        spec = ad.modules[m]
        assert (spec.rank, spec.alpha, spec.scale) == (r, alpha, alpha / r)
        B, A = ad.factors(m)
        assert _close(B @ A, deltas[m])


def test_pattern_layer_1_does_not_match_layer_11(tmp_path):
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.q_proj": 2}, "alpha_pattern": {"layers.1.q_proj": 7}}
    assert module_scale(cfg, "model.layers.1.q_proj") == (2, 7.0, 3.5)
    assert module_scale(cfg, "model.layers.11.q_proj") == (4, 8.0, 2.0)
    assert module_scale(cfg, "model.layers.21.q_proj") == (4, 8.0, 2.0)
    assert module_scale({**cfg, "use_rslora": True}, "model.layers.1.q_proj") == (2, 7.0, 7 / math.sqrt(2))


@pytest.mark.parametrize(
    "prefix,adapter_name", [("base_model.model.", None), ("", None), ("base_model.model.", "default"), ("", "default")]
)
def test_key_variants(tmp_path, prefix, adapter_name):
    deltas = write_adapter(tmp_path / "a", GPT2_LIKE, seed=5, prefix=prefix, adapter_name_in_key=adapter_name)
    ad = load_adapter(tmp_path / "a")
    assert sorted(ad.modules) == sorted(GPT2_LIKE)  # prefix stripped, adapter name dropped
    assert ad.extras == []
    for m, (d_out, d_in) in GPT2_LIKE.items():
        assert (ad.modules[m].d_out, ad.modules[m].d_in, ad.modules[m].rank) == (d_out, d_in, 4)
        B, A = ad.factors(m)
        assert _close(B @ A, deltas[m])


@pytest.mark.parametrize("dtype,name", [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_dtypes(tmp_path, dtype, name):
    deltas = write_adapter(tmp_path / "a", GPT2_LIKE, seed=6, dtype=dtype)
    ad = load_adapter(tmp_path / "a")
    assert ad.dtype == name
    for m in GPT2_LIKE:
        B, A = ad.factors(m)
        assert B.dtype == A.dtype == torch.float64
        assert _close(B @ A, deltas[m])  # exact: the deltas are built from the rounded factors


def test_mixed_ranks_padded(tmp_path):
    d0 = write_adapter(tmp_path / "src" / "a", GPT2_LIKE, r=2, alpha=4, seed=1)
    d1 = write_adapter(tmp_path / "src" / "b", GPT2_LIKE, r=6, alpha=3, seed=2)
    d2 = write_adapter(tmp_path / "src" / "c", GPT2_LIKE, r=4, alpha=8, seed=3, use_rslora=True)
    coll = lorazip.load_collection(tmp_path / "src")
    assert coll.names == ["a", "b", "c"]
    for m, (d_out, d_in) in GPT2_LIKE.items():
        fac = coll.module_factors(m)
        assert fac.B.shape == (3, d_out, 6) and fac.A.shape == (3, 6, d_in)
        assert fac.ranks.tolist() == [2, 6, 4]
        assert torch.all(fac.B[0, :, 2:] == 0) and torch.all(fac.A[0, 2:] == 0)
        for i, d in enumerate((d0, d1, d2)):
            assert _close(fac.B[i] @ fac.A[i], d[m])
        assert torch.allclose(fac.norms2(), torch.stack([d[m].pow(2).sum() for d in (d0, d1, d2)]), rtol=1e-10)
    # a subset of adapters, in the order asked
    fac = coll.module_factors("transformer.h.0.attn.c_attn", [2, 0])
    assert fac.ranks.tolist() == [4, 2] and fac.B.shape[2] == 4
    assert _close(fac.B[0] @ fac.A[0], d2["transformer.h.0.attn.c_attn"])


def test_stacked_modules_on_huge_pages_read_the_same(tmp_path, monkeypatch):
    """A module's stacked factors mapped onto huge pages (every size here, by lowering the threshold)
    hold the same values as in an ordinary array, padding zeroed, in float32 and float64."""
    import lorazip.io.collection as collection

    write_adapter(tmp_path / "src" / "a", GPT2_LIKE, r=2, alpha=4, seed=1)
    write_adapter(tmp_path / "src" / "b", GPT2_LIKE, r=6, alpha=3, seed=2)
    coll = lorazip.load_collection(tmp_path / "src")
    for dtype in (torch.float32, torch.float64):
        plain = {m: coll.module_factors(m, dtype=dtype) for m in GPT2_LIKE}
        monkeypatch.setattr(collection, "_HUGE", 0)
        mapped = {m: coll.module_factors(m, dtype=dtype) for m in GPT2_LIKE}
        monkeypatch.undo()
        for m in GPT2_LIKE:
            assert torch.equal(plain[m].B, mapped[m].B) and torch.equal(plain[m].A, mapped[m].A)
            assert mapped[m].B.is_contiguous() and mapped[m].B.numpy().flags.writeable
    big = collection._empty((3, 1 << 20, 4), torch.float32)  # 48 MiB: past the threshold
    big[1, -1, 3] = 7.0
    assert big.shape == (3, 1 << 20, 4) and float(big[1, -1, 3]) == 7.0


def test_missing_module_is_zero_delta(tmp_path):
    full = write_adapter(tmp_path / "src" / "a", GPT2_LIKE, seed=1)
    part_mods = {"transformer.h.0.attn.c_attn": GPT2_LIKE["transformer.h.0.attn.c_attn"]}
    part = write_adapter(tmp_path / "src" / "b", part_mods, seed=2)
    coll = lorazip.load_collection(tmp_path / "src")
    assert [m.name for m in coll.modules] == sorted(GPT2_LIKE)
    assert coll.missing_modules() == {"b": ["transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn"]}
    fac = coll.module_factors("transformer.h.1.attn.c_attn")
    assert fac.ranks.tolist() == [4, 0]
    assert torch.all(fac.B[1] @ fac.A[1] == 0)
    assert _close(fac.B[0] @ fac.A[0], full["transformer.h.1.attn.c_attn"])
    assert fac.norms2()[1] == 0
    fac = coll.module_factors("transformer.h.0.attn.c_attn")
    assert _close(fac.B[1] @ fac.A[1], part["transformer.h.0.attn.c_attn"])


def test_extras_reported(tmp_path):
    extra = {"base_model.model.score.weight": torch.randn(3, 8)}
    write_adapter(tmp_path / "a", GPT2_LIKE, seed=1, extra_tensors=extra)
    ad = load_adapter(tmp_path / "a")
    assert ad.extras == ["base_model.model.score.weight"]
    assert sorted(ad.modules) == sorted(GPT2_LIKE)
    assert torch.equal(ad.extra_tensors()["base_model.model.score.weight"], extra["base_model.model.score.weight"])


def test_embedding_layout(tmp_path):
    """PEFT embedding LoRA: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r), delta (B A)^T."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    ea, eb = torch.randn(4, 20, generator=gen), torch.randn(6, 4, generator=gen)
    folder = tmp_path / "emb"
    write_adapter(folder, {"model.layers.0.q_proj": (6, 6)}, seed=1)
    from safetensors.torch import load_file

    st = load_file(str(folder / "adapter_model.safetensors"))
    st["base_model.model.model.embed_tokens.lora_embedding_A"] = ea
    st["base_model.model.model.embed_tokens.lora_embedding_B"] = eb
    save_file(st, str(folder / "adapter_model.safetensors"))
    edit_config(folder, target_modules=["embed_tokens", "q_proj"])
    ad = load_adapter(folder)
    spec = ad.modules["model.embed_tokens"]
    assert (spec.layout, spec.rank, spec.d_out, spec.d_in) == ("embedding", 4, 20, 6)
    B, A = ad.factors("model.embed_tokens")
    assert _close(B @ A, 2.0 * (eb.double() @ ea.double()).T)  # (num_embeddings, dim) like the weight
    for m in ("model.embed_tokens", "model.layers.0.q_proj"):  # one-factor re-reads of streamed modules
        B, A = ad.factors(m, torch.float32)
        assert torch.equal(ad.factor(m, "B", torch.float32), B) and torch.equal(ad.factor(m, "A", torch.float32), A)


# ----------------------------------------------------------------------------------------------
# Laziness
# ----------------------------------------------------------------------------------------------


def test_load_collection_reads_no_tensor_data(tmp_path, monkeypatch):
    extra = {"base_model.model.score.weight": torch.ones(2, 8)}
    deltas = write_collection(tmp_path / "src", n=2, seed=0, extra_tensors=extra)
    import safetensors
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("tensor data must not be read while loading")

    with monkeypatch.context() as mp:
        mp.setattr(safetensors, "safe_open", boom)
        mp.setattr(safetensors.torch, "load_file", boom)
        mp.setattr(safetensors.torch, "load", boom)
        mp.setattr(os, "preadv", boom)  # how factors are read (at the header's offsets)
        coll = lorazip.load_collection(tmp_path / "src")  # header only
        assert len(coll) == 2 and len(coll.modules) == 3
        assert coll.extras() == {n: ["base_model.model.score.weight"] for n in ("a0", "a1")}
        with pytest.raises(RuntimeError, match="must not be read"):
            coll.module_factors("transformer.h.0.attn.c_attn")
    fac = coll.module_factors("transformer.h.0.attn.c_attn")  # works once reading is allowed again
    assert _close(fac.B[1] @ fac.A[1], deltas["a1"]["transformer.h.0.attn.c_attn"])


def test_unchecked_rereads_are_the_checked_values_and_a_changed_file_is_checked(tmp_path):
    """A build's second read (``checked=False``) gives the first read's values bit for bit, without
    the value checks; a weights file rewritten since load (NaN now) is checked as on a first read."""
    from safetensors.torch import load_file, save_file

    write_collection(tmp_path / "src", n=2, seed=0)
    coll = lorazip.load_collection(tmp_path / "src")
    name = coll.modules[0].name
    first = coll.module_factors(name, dtype=torch.float32, b_rows=True)
    again = coll.module_factors(name, dtype=torch.float32, b_rows=True, checked=False)
    assert torch.equal(first.B, again.B) and torch.equal(first.A, again.A)
    f = coll.adapters[1].weights_file
    st = load_file(str(f))
    key = next(k for k in st if "lora_A" in k and coll.adapters[1].modules[name].key_A == k)
    st[key] = st[key].clone()
    st[key][0, 0] = float("nan")
    save_file(st, str(f))
    os.utime(f, ns=(1, 1))  # another modification time, whatever the clock's resolution
    for checked in (True, False):
        with pytest.raises(AdapterFormatError, match="NaN or Inf"):
            coll.module_factors(name, dtype=torch.float32, checked=checked)


def test_module_factors_reads_only_that_module(tmp_path, monkeypatch):
    write_collection(tmp_path / "src", n=2, seed=0)
    coll = lorazip.load_collection(tmp_path / "src")
    wanted = set()  # (file offset, bytes) of the module's tensors, from each header
    for ad in coll.adapters:
        header, _, start = parse_safetensors(ad.weights_file)
        for key, info in header.items():
            if ".h.0.mlp.c_proj." in key:
                wanted.add((start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0]))
    real, asked = os.preadv, []

    def spy(fd, buffers, offset):
        asked.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    coll.module_factors("transformer.h.0.mlp.c_proj")
    assert set(asked) == wanted and len(asked) == 4  # lora_A and lora_B of two adapters, nothing else


def test_a_file_changed_after_loading_is_read_through_its_own_header(tmp_path):
    deltas = write_collection(tmp_path / "src", n=2, seed=0)
    coll = lorazip.load_collection(tmp_path / "src")
    name = "transformer.h.0.mlp.c_proj"
    f = coll.adapters[1].weights_file
    os.utime(f, ns=(1, 1))  # the same bytes, another mtime (a copy elsewhere, as on a Ray worker): read by name
    assert _close(coll.module_factors(name).B[1] @ coll.module_factors(name).A[1], deltas["a1"][name])
    from safetensors.torch import load_file, save_file
    t = load_file(str(f))  # rewritten with one more tensor ahead of the others: every offset moved
    old_at = coll.adapters[1].modules[name].at_A
    save_file({"aaa.extra": torch.zeros(7), **t}, str(f), metadata={"format": "pt"})
    assert parse_safetensors(f)[0][coll.adapters[1].modules[name].key_A]["data_offsets"][0] + \
        parse_safetensors(f)[2] != old_at
    fac = coll.module_factors(name)
    assert _close(fac.B[1] @ fac.A[1], deltas["a1"][name])
    f.write_bytes(f.read_bytes() + b" ")  # and a file safetensors refuses is refused, naming it
    with pytest.raises(AdapterFormatError, match=str(f.name)):
        coll.module_factors(name)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def test_sources_folder_single_and_list(tmp_path):
    write_collection(tmp_path / "src", n=3, seed=0)
    assert lorazip.load_collection(tmp_path / "src").names == ["a0", "a1", "a2"]
    assert lorazip.load_collection(str(tmp_path / "src")).names == ["a0", "a1", "a2"]
    one = lorazip.load_collection(tmp_path / "src" / "a1")
    assert one.names == ["a1"] and len(one.modules) == 3
    lst = lorazip.load_collection([tmp_path / "src" / "a2", str(tmp_path / "src" / "a0")])
    assert lst.names == ["a2", "a0"]  # list order is kept


def test_sources_nested(tmp_path):
    write_adapter(tmp_path / "root" / "team1" / "x1", GPT2_LIKE, seed=1)
    write_adapter(tmp_path / "root" / "team1" / "deep" / "x2", GPT2_LIKE, seed=2)
    write_adapter(tmp_path / "root" / "team2" / "x3", GPT2_LIKE, seed=3)
    # checkpoints inside an adapter folder are not separate adapters
    write_adapter(tmp_path / "root" / "team2" / "x3" / "checkpoint-10", GPT2_LIKE, seed=4)
    (tmp_path / "root" / "empty").mkdir()
    coll = lorazip.load_collection(tmp_path / "root")
    assert coll.names == ["x2", "x1", "x3"]  # sorted walk: team1/deep before team1/x1
    assert [a.path for a in coll.adapters] == [
        tmp_path / "root" / "team1" / "deep" / "x2", tmp_path / "root" / "team1" / "x1",
        tmp_path / "root" / "team2" / "x3",
    ]


def test_duplicate_base_names_in_one_folder(tmp_path):
    write_adapter(tmp_path / "root" / "a" / "x", GPT2_LIKE, seed=1)
    write_adapter(tmp_path / "root" / "b" / "x", GPT2_LIKE, seed=2)
    write_adapter(tmp_path / "root" / "c" / "y", GPT2_LIKE, seed=3)
    coll = lorazip.load_collection(tmp_path / "root")
    assert coll.names == ["root--a--x", "root--b--x", "y"]
    assert len(set(coll.names)) == 3


def test_duplicate_base_names_in_a_list(tmp_path):
    write_adapter(tmp_path / "p" / "a" / "x", GPT2_LIKE, seed=1)
    write_adapter(tmp_path / "p" / "b" / "x", GPT2_LIKE, seed=2)
    coll = lorazip.load_collection([tmp_path / "p" / "a" / "x", tmp_path / "p" / "b" / "x"])
    assert len(set(coll.names)) == 2
    assert all(n.endswith("x") for n in coll.names)
    assert [a.path for a in coll.adapters] == [tmp_path / "p" / "a" / "x", tmp_path / "p" / "b" / "x"]


def test_same_adapter_twice_is_an_error(tmp_path):
    write_collection(tmp_path / "src", n=2, seed=0)
    a0 = tmp_path / "src" / "a0"
    with pytest.raises(SourceError, match="a0"):
        lorazip.load_collection([a0, a0])
    with pytest.raises(SourceError):
        lorazip.load_collection([tmp_path / "src", tmp_path / "src"])


def test_same_adapter_twice_via_folder_and_direct(tmp_path):
    write_collection(tmp_path / "src", n=2, seed=0)
    with pytest.raises(SourceError, match="a0"):
        lorazip.load_collection([tmp_path / "src", tmp_path / "src" / "a0"])
    (tmp_path / "link").symlink_to(tmp_path / "src" / "a1")
    with pytest.raises(SourceError, match="a1"):
        lorazip.load_collection([tmp_path / "src" / "a1", tmp_path / "link"])


def test_fixture_copy_keeps_names(fixtures_dir, tmp_path):
    """A copied real adapter loads like the original (path does not matter, contents do)."""
    src = fixtures_dir / GPT2 / SHUTTER
    dst = tmp_path / "copy" / "shutter"
    shutil.copytree(src, dst)
    a, b = load_adapter(src), load_adapter(dst)
    assert b.name == "shutter" and a.modules == b.modules and a.extras == b.extras


def test_fixtures_untouched_and_match_provenance(fixtures_dir):
    """The read-only fixtures still hash to provenance.json, and lorazip agrees with its r / alpha / tensor counts."""
    import json

    from lorazip.io.peft import sha256_file

    prov = json.loads((fixtures_dir / "provenance.json").read_text())
    assert len(prov) == 8
    for entry in prov:
        folder = fixtures_dir / entry["path"]
        assert sha256_file(folder / "adapter_model.safetensors") == entry["sha256"], entry["path"]
        ad = load_adapter(folder)
        assert {m.rank for m in ad.modules.values()} == {entry["r"]}
        assert {m.alpha for m in ad.modules.values()} == {float(entry["lora_alpha"])}
        assert 2 * len(ad.modules) + len(ad.extras) == entry["n_tensors"]


@pytest.mark.parametrize("stored", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["linear", "embedding"])
def test_numpy_read_path_gives_torchs_values_and_runs_no_torch_operator(tmp_path, stored, layout):
    """float32 / float64 factors are read and converted by NumPy alone (a read in a background thread then
    starts no second OpenMP team beside a solver's): bit for bit what the torch path gives, with and
    without ``out``, and no torch operator but views and wrapping runs."""
    from safetensors.torch import save_file
    from torch.overrides import TorchFunctionMode

    gen = torch.Generator().manual_seed(3)
    if layout == "linear":
        write_adapter(tmp_path / "a", {"l.0.q": (24, 40)}, r=5, alpha=7, seed=4, dtype=stored)
        name = "l.0.q"
    else:
        (tmp_path / "a").mkdir()
        save_file({"base_model.model.emb.lora_embedding_A": torch.randn(5, 30, generator=gen).to(stored),
                   "base_model.model.emb.lora_embedding_B": torch.randn(12, 5, generator=gen).to(stored)},
                  str(tmp_path / "a" / "adapter_model.safetensors"))
        (tmp_path / "a" / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 5, "lora_alpha": 7, "target_modules": ["emb"], "base_model_name_or_path": "x"}')
        name = "emb"
    ad = load_adapter(tmp_path / "a")
    spec = ad.modules[name]

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    stored = ad.read([spec.key_A, spec.key_B])  # torch, by name
    if layout == "linear":
        sa, sb = stored[spec.key_A], stored[spec.key_B]
    else:  # embedding: delta = (B_e A_e)^T, so A = B_e^T and B = A_e^T
        sa, sb = stored[spec.key_B].T, stored[spec.key_A].T
    for dtype in (torch.float32, torch.float64):
        want_a = sa.to(dtype)  # what torch's conversion and in-dtype scaling give (the reader before)
        want_b = torch.empty(spec.d_out, spec.rank, dtype=dtype).copy_(sb).mul_(spec.scale)
        with Calls() as calls:
            b, a = ad.factors(name, dtype)
            out = (torch.zeros(2, spec.d_out, spec.rank + 1, dtype=dtype)[1, :, : spec.rank],
                   torch.zeros(spec.rank + 2, spec.d_in, dtype=dtype)[1 : spec.rank + 1])
            b2, a2 = ad.factors(name, dtype, out=out)
        assert b.dtype == a.dtype == dtype
        for got in (b, b2):
            assert torch.equal(got, want_b)
        for got in (a, a2):
            assert torch.equal(got, want_a)
        assert b2 is out[0] and a2 is out[1]
        computing = {n for n in calls.names if not n.startswith(("__get__", "__set__"))} - {
            "numpy", "from_numpy", "zeros", "__getitem__", "empty", "__init__"}
        assert not computing, computing


def test_module_factors_of_mixed_ranks_run_no_torch_operator(tmp_path):
    """A module's stacked factors (zero padding included) in float32 are made with NumPy alone."""
    from torch.overrides import TorchFunctionMode

    write_adapter(tmp_path / "a", {"l.0.q": (24, 40)}, r=3, seed=1)
    write_adapter(tmp_path / "b", {"l.0.q": (24, 40)}, r=6, seed=2)
    coll = lorazip.load_collection([tmp_path / "a", tmp_path / "b"])
    want = coll.module_factors("l.0.q", dtype=torch.float64)

    class Calls(TorchFunctionMode):
        names: set = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Calls.names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Calls():
        got = coll.module_factors("l.0.q", dtype=torch.float32)
    assert torch.allclose(got.B, want.B.float(), rtol=1e-6, atol=0) and torch.equal(got.A, want.A.float())
    assert not got.B[0, :, 3:].any() and not got.A[0, 3:].any()
    computing = {n for n in Calls.names if not n.startswith(("__get__", "__set__"))} - {
        "numpy", "from_numpy", "__getitem__", "tensor", "__init__"}
    assert not computing, computing


def test_hash_early_digests_are_those_of_the_files(tmp_path, monkeypatch):
    """``hash_early`` hashes in the background; ``sha256_file`` takes its digest for the same file,
    and hashes again a file changed since (or never queued, or gone when queued)."""
    import hashlib
    import time

    from lorazip.io import files

    monkeypatch.setattr(files, "_early", {})
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(300_000 + i))
        paths.append(p)
    files.hash_early(paths + [tmp_path / "missing.bin"])
    assert set(files._early) == {os.path.realpath(p) for p in paths}
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [files.sha256_file(p) for p in paths] == want
    calls = []
    real = files._sha256
    monkeypatch.setattr(files, "_sha256", lambda path, chunk=1 << 20: calls.append(path) or real(path, chunk))
    assert files.sha256_file(paths[0]) == want[0] and not calls  # the early digest, no second read
    time.sleep(0.01)
    paths[1].write_bytes(b"changed")  # a new size and modification time: hashed again
    assert files.sha256_file(paths[1]) == hashlib.sha256(b"changed").hexdigest() and len(calls) == 1
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    assert files.sha256_file(other) == hashlib.sha256(b"x").hexdigest()


def test_cli_records_the_sources_sha256_when_hashed_early(tmp_path):
    """The CLI hashes local sources before torch loads; the artifact records the files' own digests."""
    import hashlib
    import subprocess
    import sys

    write_collection(tmp_path / "coll", n=3, modules={"l0.q": (16, 12)}, r=2)
    out = tmp_path / "a.lorazip.safetensors"
    subprocess.run([sys.executable, "-m", "cli.main", "compress", str(tmp_path / "coll"), "-o", str(out), "--rank", "2"],
                   check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    art = lorazip.load_artifact(out)
    for a in art.meta["adapters"]:
        folder = tmp_path / "coll" / a["name"]
        for name, rec in a["source"]["files"].items():
            assert rec["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_b_rows_reads_the_same_values_in_the_solvers_layout(tmp_path, dtype):
    """``b_rows``: the same ``B`` (padding of lower ranks included), the transpose of an (n, r, d_out)
    array, so that the chunk's ``B_i^T`` rows are a view of it, not a copy of the module."""
    from lorazip.solvers.factors import Factors

    for i, r in enumerate((2, 4, 3)):
        write_adapter(tmp_path / f"a{i}", GPT2_LIKE, r=r, seed=i)
    coll = lorazip.load_collection(tmp_path)
    for name in GPT2_LIKE:
        plain, rows = coll.module_factors(name, dtype=dtype), coll.module_factors(name, dtype=dtype, b_rows=True)
        assert torch.equal(plain.B, rows.B) and torch.equal(plain.A, rows.A)
        assert rows.B.transpose(1, 2).is_contiguous()
        chunk = Factors.stacked(rows.B, rows.A)._held()
        assert chunk.Bt2.data_ptr() == rows.B.data_ptr()  # no copy


# ----------------------------------------------------------------------------------------------
# Which modules a config targets (PEFT's check_target_module_exists)
# ----------------------------------------------------------------------------------------------

_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.v_proj",
          "model.layers.1.mlp.experts.0.down_proj", "encoder.block.1.layer.0.SelfAttention.q",
          "decoder.block.0.layer.1.EncDecAttention.k", "score", "classifier.dense", "transformer.h.2.attn.c_attn"]
_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 11], "layers_pattern": "layers"},
    {"target_modules": ["q", "k"], "layers_to_transform": [1], "layers_pattern": ["block"]},
    {"target_modules": ["q_proj", "k"], "layers_to_transform": [], "layers_pattern": ""},
    {"target_modules": r".*\.(0|11)\..*(q_proj|v_proj)"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj", "score", "dense"], "exclude_modules": ["v_proj"],
     "modules_to_save": ["classifier"]},  # (current PEFT excludes the head's LoRA; lorazip reads it: below)
    {"target_modules": ["q_proj", "c_attn"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["model.layers.1.self_attn.q_proj"], "layers_to_transform": [0]},  # a whole name: no layer test
]


@pytest.mark.parametrize("cfg", _CONFIGS)
def test_targeted_modules_are_peft_s(cfg):
    """lorazip's reading of target_modules, layers_to_transform / layers_pattern and exclude_modules is
    PEFT's ``check_target_module_exists`` on every name (PEFT 0.22 and later); LoRA on a head in
    modules_to_save, which current PEFT never creates and PEFT up to 0.12 saved, is read."""
    peft_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from types import SimpleNamespace

    from lorazip.io.peft import _targeted

    full = SimpleNamespace(**{"target_modules": None, "layers_to_transform": None, "layers_pattern": None,
                              "exclude_modules": None, "target_parameters": None, **cfg, "modules_to_save": None})
    for name in _NAMES:
        want = peft_utils.check_target_module_exists(full, name)
        want = bool(want) and type(want).__name__ != "_ExcludedModule"
        if cfg["target_modules"] == "all-linear":
            want = True  # PEFT expands it against the model's linear layers first; lorazip keeps every module
        assert _targeted(cfg, name) == want, (cfg, name)


def test_lora_tensors_the_config_does_not_target_are_one_error(tmp_path):
    """Tensors of modules the config does not select (a layer outside layers_to_transform, a module
    outside target_modules): PEFT would ignore them and other loaders apply them, so the adapter is
    refused, naming the weights file, one such module and the config's selection; a config selecting
    them loads."""
    mods = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.1.self_attn.q_proj": (8, 8),
            "model.layers.0.self_attn.v_proj": (8, 8)}
    write_adapter(tmp_path / "a", mods, seed=0, config_overrides={"layers_to_transform": [0]})
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: LoRA tensors of 1 module\(s\) its "
                       r"config does not target \(target_modules \['q_proj', 'v_proj'\], layers_to_transform \[0\]\), "
                       r"e\.g\. 'model\.layers\.1\.self_attn\.q_proj': PEFT ignores them"):
        load_adapter(tmp_path / "a")
    edit_config(tmp_path / "a", layers_to_transform=[0, 1])
    assert len(load_adapter(tmp_path / "a").modules) == 3
    edit_config(tmp_path / "a", target_modules=["q_proj"], layers_to_transform=...)
    with pytest.raises(AdapterFormatError, match=r"e\.g\. 'model\.layers\.0\.self_attn\.v_proj'"):
        load_adapter(tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=r".*\.(q|v)_proj")
    assert len(load_adapter(tmp_path / "a").modules) == 3
    edit_config(tmp_path / "a", layers_to_transform="0")
    with pytest.raises(AdapterFormatError, match="'layers_to_transform' must be an integer or a list of integers"):
        load_adapter(tmp_path / "a")
    # an expert's LoRA in a layer outside layers_to_transform whose expert index is in it: PEFT before
    # huggingface/peft#3318 read the last number as the layer and wrote such adapters: read
    write_adapter(tmp_path / "m", {"model.layers.1.mlp.experts.0.up_proj": (8, 8)}, seed=0,
                  config_overrides={"layers_to_transform": [0]})
    assert list(load_adapter(tmp_path / "m").modules) == ["model.layers.1.mlp.experts.0.up_proj"]
    # LoRA on a head that is also in modules_to_save (PEFT <= 0.12 saved such adapters): read
    write_adapter(tmp_path / "h", {"model.layers.0.q_proj": (8, 8), "score": (3, 8)}, seed=0,
                  config_overrides={"modules_to_save": ["score"]})
    assert sorted(load_adapter(tmp_path / "h").modules) == ["model.layers.0.q_proj", "score"]
