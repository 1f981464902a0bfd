"""int8 storage (``--dtype int8``, ``--extras-dtype int8``): symmetric per-row quantisation with one
scale per row (lorazip.quantize), exact recorded errors on the dequantised factors, the bytes, the
budget allocator, extras, export through real PEFT, serving, update, info and verify."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import lorazip
from helpers import run_cli, write_collection
from lorazip.quantize import dequantize_rows, quantize_rows, round_to_storage, to_storage

# recorded errors come from float32 products where an error is >= 0.5 (lorazip.compress.measure):
# exact to 3e-5 of themselves there, to float64 rounding elsewhere
FLOAT32_MIN_ERROR_REL = 3e-5
MODS = {"m.a": (96, 64), "m.b": (64, 128)}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    write_collection(root / "src", n=6, modules=MODS, r=8)
    return root / "src"


@pytest.fixture(scope="module")
def coll(src):
    return lorazip.load_collection(src)


def _saved(art: lorazip.Artifact, path: Path) -> lorazip.Artifact:
    return lorazip.load_artifact(art.save(path, overwrite=True), verify=True)


# -- quantise / dequantise ------------------------------------------------------------------------

def test_quantize_rows_round_trip_and_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 16, generator=gen, dtype=torch.float64)
    x[0, 3] = 0  # a zero row
    x[1, 7] *= 1e-6  # a tiny one (its scale is a float16 subnormal)
    x[2, 1] *= 1e3
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and int(q.abs().max()) == 127
    assert s.dtype == torch.float16 and s.shape == x.shape[:-1]
    assert float(s[0, 3]) == 0 and bool((s.double() >= x.abs().amax(-1) / 127).all())  # rounded up
    xh = dequantize_rows(q, s)
    assert xh.dtype == torch.float32
    assert bool(((x - xh.double()).abs() <= s.double()[..., None] / 2 + 1e-12).all())  # |x - x_hat| <= scale / 2
    assert bool((xh[0, 3] == 0).all())
    rel = ((x - xh.double()).square().sum(-1) / x.square().sum(-1).clamp_min(1e-300))[3:]  # Gaussian rows
    assert 1e-6 < float(rel.mean()) < 1e-4
    q2, s2 = quantize_rows(xh)  # stored values quantise to themselves (update re-stores rows unchanged)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    assert torch.equal(round_to_storage(x, "int8"), xh.double())
    assert torch.equal(round_to_storage(x, "float16"), x.half().double())
    assert torch.equal(round_to_storage(x, "float32"), x.float().double())
    big = quantize_rows(x * 1e7)[1]  # scales beyond float16's range
    assert big.dtype == torch.float32
    assert quantize_rows(x, torch.float32)[1].dtype == torch.float32
    empty = to_storage(torch.zeros(3, 5, 0), "int8")
    assert empty.data.dtype == torch.int8 and empty.scale is None and empty.values.shape == (3, 5, 0)


# -- exact errors, bytes, checksums -----------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(method="jd-full"), dict(method="jd-diag"), dict(method="svd"),
                                dict(method="jd-clustered", clusters=2), dict(budget=26_000)],
                         ids=["jd-full", "jd-diag", "svd", "clustered", "budget"])
def test_recorded_errors_exact_on_dequantised_factors(coll, src, tmp_path, kw):
    art = lorazip.compress(coll, 6, storage_dtype="int8", device="cpu", **kw)
    assert art.meta["storage_dtype"] == "int8"
    raw = art.tensors()
    for key in (k for k in raw if k.startswith(("U/", "V/", "cores/", "resid_B/", "resid_A/"))):
        assert raw[key].dtype == torch.int8
        if raw[key].numel():  # an empty one (rank-0 module) has no scales
            assert raw[f"qscale/{key}"].shape == raw[key].shape[:-1]
        else:
            assert f"qscale/{key}" not in raw
    assert not any(k.startswith(("qscale/stats", "qscale/spectra", "qscale/assign", "qscale/resid_ranks"))
                   for k in raw)
    if "budget" in kw:
        assert art.serialized_size() <= kw["budget"]
        assert any("residual" in m for m in art.modules)  # residual rows quantised too
    loaded = _saved(art, tmp_path / "a.lorazip.safetensors")
    assert lorazip.verify(loaded.path)["problems"] == []
    U = loaded.get(f"U/{loaded.modules[0]['name']}")
    assert U.dtype == torch.float32  # readers get dequantised values
    rec, again = lorazip.evaluate(loaded), lorazip.evaluate(loaded, src)
    assert again["recomputed"]
    for a, b in zip(rec["adapters"], again["adapters"]):
        assert a["error"] == pytest.approx(b["error"], rel=FLOAT32_MIN_ERROR_REL, abs=1e-15)
    assert rec["errors"]["mean"] > 0


def test_int8_about_half_of_float16(tmp_path):
    write_collection(tmp_path / "big", n=8, modules={"m.a": (384, 256), "m.b": (256, 384)}, r=16)
    coll = lorazip.load_collection(tmp_path / "big")
    arts = {sd: lorazip.compress(coll, 16, storage_dtype=sd, device="cpu", hash_sources=False)
            for sd in ("float16", "int8")}
    parts = {sd: sum(t.numel() * t.element_size() for k, t in a.tensors().items()
                     if k.startswith(("U/", "V/", "cores/", "qscale/"))) for sd, a in arts.items()}
    assert parts["int8"] / parts["float16"] == pytest.approx((1 + 2 / 16) / 2, rel=1e-3)  # a byte + scales per 16
    size = {sd: a.serialized_size() for sd, a in arts.items()}
    assert size["int8"] < 0.65 * size["float16"]  # plus statistics, spectra and the header
    e = {sd: lorazip.evaluate(a)["errors"]["mean"] for sd, a in arts.items()}
    assert e["float16"] < e["int8"] < e["float16"] + 1e-3  # quantisation adds ~1e-4 of the energy at most


def test_budget_int8_beats_float16(coll, tmp_path):
    budget = 24_000
    arts = {sd: lorazip.compress(coll, budget=budget, storage_dtype=sd, hash_sources=False)
            for sd in ("float16", "int8")}
    err = {}
    for sd, art in arts.items():
        path = art.save(tmp_path / f"{sd}.lorazip.safetensors")
        assert path.stat().st_size <= budget
        err[sd] = lorazip.evaluate(lorazip.load_artifact(path))["errors"]["mean"]
    assert err["int8"] < 0.7 * err["float16"], err


def test_budget_int8_per_module_allocator(coll, tmp_path):
    """The shared-only allocator (compress_shared: jd-diag here) counts one byte per number for int8."""
    art = lorazip.compress(coll, budget=12_000, method="jd-diag", storage_dtype="int8", hash_sources=False)
    assert art.serialized_size() <= 12_000 and art.meta["storage_dtype"] == "int8"
    f16 = lorazip.compress(coll, budget=12_000, method="jd-diag", storage_dtype="float16", hash_sources=False)
    assert sum(m["rank"] for m in art.modules) > sum(m["rank"] for m in f16.modules)


def test_bad_qscale_is_refused(coll, tmp_path):
    art = lorazip.compress(coll, 4, storage_dtype="int8", device="cpu", hash_sources=False)
    name = art.modules[0]["name"]
    for change, part in [
        (lambda t: t.__setitem__(f"qscale/U/{name}", t[f"qscale/U/{name}"][:, :-1].contiguous()), "qscale/U"),
        (lambda t: t.pop(f"qscale/cores/{name}"), "qscale/cores"),
        (lambda t: t.__setitem__("qscale/stats/norm2", torch.ones(6, dtype=torch.float16)), "no int8 tensor"),
    ]:
        tensors = dict(art.tensors())
        change(tensors)
        bad = lorazip.Artifact(dict(art.meta), tensors=tensors).save(tmp_path / "bad.lorazip.safetensors",
                                                                      overwrite=True)
        with pytest.raises(lorazip.ArtifactError, match=part):
            lorazip.load_artifact(bad)


def test_update_int8(coll, src, tmp_path):
    """add / remove keep an int8 artifact int8, old rows bit for bit, errors exact."""
    base = lorazip.load_collection([src / f"a{i}" for i in range(4)])
    art = _saved(lorazip.compress(base, 5, storage_dtype="int8", device="cpu"), tmp_path / "a.lorazip.safetensors")
    raw = art.tensors()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lorazip.update.UpdateWarning)  # random adapters share little
        grown, _ = lorazip.add_adapters(art, [src / "a4", src / "a5"])
    g = _saved(grown, tmp_path / "g.lorazip.safetensors")
    new = g.tensors()
    for key in raw:
        if key.startswith(("U/", "qscale/U/", "V/", "qscale/V/")):
            assert torch.equal(new[key], raw[key]), key
        if key.startswith(("cores/", "qscale/cores/")):
            assert new[key].dtype == raw[key].dtype and torch.equal(new[key][:4], raw[key]), key
    rec, again = lorazip.evaluate(g), lorazip.evaluate(g, src)
    for a, b in zip(rec["adapters"], again["adapters"]):
        assert a["error"] == pytest.approx(b["error"], rel=FLOAT32_MIN_ERROR_REL, abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lorazip.update.UpdateWarning)
        refit, _ = lorazip.add_adapters(art, [src / "a4", src / "a5"], refit=True)  # new bases, stored as int8
    r = _saved(refit, tmp_path / "r.lorazip.safetensors")
    assert r.tensors()[f"U/{r.modules[0]['name']}"].dtype == torch.int8
    for a, b in zip(lorazip.evaluate(r)["adapters"], lorazip.evaluate(r, src)["adapters"]):
        assert a["error"] == pytest.approx(b["error"], rel=FLOAT32_MIN_ERROR_REL, abs=1e-15)
    small, _ = lorazip.remove_adapters(g, ["a1"])
    s = _saved(small, tmp_path / "s.lorazip.safetensors")
    name = s.modules[0]["name"]
    assert torch.equal(s.tensors()[f"qscale/cores/{name}"], new[f"qscale/cores/{name}"][[0, 2, 3, 4, 5]])
    rec, again = lorazip.evaluate(s), lorazip.evaluate(s, src)
    for a, b in zip(rec["adapters"], again["adapters"]):
        assert a["error"] == pytest.approx(b["error"], rel=FLOAT32_MIN_ERROR_REL, abs=1e-15)


# -- extras -----------------------------------------------------------------------------------------

HEAD = "base_model.model.pre_classifier"


def _with_heads(root: Path, n: int = 3) -> Path:
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        extras = {f"{HEAD}.weight": 0.05 * torch.randn(256, 256, generator=gen),
                  f"{HEAD}.bias": 0.05 * torch.randn(256, generator=gen)}
        from helpers import write_adapter

        write_adapter(root / f"h{i}", MODS, 4, 8, seed=i, extra_tensors=extras)
    return root


def test_extras_int8(tmp_path, capsys):
    src = _with_heads(tmp_path / "heads")
    coll = lorazip.load_collection(src)
    plain = lorazip.compress(coll, 4, device="cpu", hash_sources=False)
    art = lorazip.compress(coll, 4, device="cpu", hash_sources=False, extras_dtype="int8")
    raw = art.tensors()
    assert raw[f"extras/0/{HEAD}.weight"].dtype == torch.int8
    assert raw[f"qscale/extras/0/{HEAD}.weight"].shape == (256,)
    assert raw[f"extras/0/{HEAD}.bias"].dtype == torch.float32  # 1-D biases stay as they are
    assert art.meta["extras_dtype"] == "int8"
    assert art.meta["adapters"][0]["extras_dtypes"] == {f"{HEAD}.weight": "float32"}
    assert art.serialized_size() < plain.serialized_size() - 3 * 256 * 256 * 2.9  # ~3 of 4 bytes saved
    loaded = _saved(art, tmp_path / "x.lorazip.safetensors")
    rep = lorazip.evaluate(loaded)
    ex = rep["extras_error"]
    assert ex["dtype"] == "int8" and ex["n_adapters"] == 3 and 0 < ex["mean"] <= ex["max"] < 1e-3
    # reported apart: the LoRA errors are those of the plain artifact
    assert rep["errors"] == lorazip.evaluate(plain)["errors"]
    assert lorazip.evaluate(plain)["extras_error"] is None
    # the recorded figure is the error of what a reader gets
    want = []
    for i, a in enumerate(coll.adapters):
        orig = a.extra_tensors()
        x, xh = orig[f"{HEAD}.weight"].double(), loaded.get(f"extras/{i}/{HEAD}.weight").double()
        want.append(float((x - xh).square().sum()) / sum(float(t.double().square().sum()) for t in orig.values()))
    assert ex["max"] == pytest.approx(max(want), rel=1e-9) and ex["mean"] == pytest.approx(sum(want) / 3, rel=1e-9)
    orig, got = coll.adapters[1].extra_tensors(), loaded.get(f"extras/1/{HEAD}.weight")
    # export writes them back in their own dtype
    lorazip.export(loaded, tmp_path / "out", ["h1"])
    back = lorazip.io.peft.load_adapter(tmp_path / "out" / "h1").extra_tensors()
    assert back[f"{HEAD}.weight"].dtype == torch.float32 and torch.equal(back[f"{HEAD}.weight"], got)
    assert torch.equal(back[f"{HEAD}.bias"], orig[f"{HEAD}.bias"])
    # float16 extras: biases too
    half = lorazip.compress(coll, 4, device="cpu", hash_sources=False, extras_dtype="float16")
    assert half.tensors()[f"extras/0/{HEAD}.bias"].dtype == torch.float16
    with pytest.raises(lorazip.OptionError, match="extras dtype"):
        lorazip.compress(coll, 4, device="cpu", extras_dtype="int4")
    # the CLI: --dtype int8 --extras-dtype int8, one "extras error" row, and info reads it
    out = tmp_path / "cli.lorazip.safetensors"
    rc, so, se = run_cli(capsys, "compress", src, "-o", out, "--rank", 4, "--dtype", "int8", "--extras-dtype", "int8",
                         "--json")
    assert rc == 0, se
    rep = json.loads(so)
    assert rep["storage_dtype"] == "int8" and rep["extras_error"]["max"] < 1e-3
    assert se.count("extras error") == 1
    rc, so, se = run_cli(capsys, "info", out, "--json")
    assert rc == 0 and json.loads(so)["storage_dtype"] == "int8"
    rc, so, se = run_cli(capsys, "compress", src, "-o", tmp_path / "p.lorazip.safetensors", "--rank", 4)
    assert rc == 0 and "extras error" not in se


# -- export through PEFT, serving ---------------------------------------------------------------------

def _make_peft(base, configs, out: Path, seed: int, heads: bool) -> None:
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(seed)
    for name, cfg in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            with torch.no_grad():
                for pname, p in pm.named_parameters():
                    if "lora_" in pname or (heads and "modules_to_save" in pname):
                        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            pm.save_pretrained(str(out / name))


def _peft_model(base, folder: Path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def test_export_int8_loads_in_peft(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=32, num_labels=3)
    base = transformers.DistilBertForSequenceClassification(cfg).eval()
    configs = {f"d{i}": LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"], r=4, lora_alpha=8,
                                   lora_dropout=0.0) for i in range(3)}
    _make_peft(base, configs, tmp_path / "src", seed=3, heads=True)
    coll = lorazip.load_collection(tmp_path / "src")
    art = _saved(lorazip.compress(coll, 3, device="cpu", storage_dtype="int8", extras_dtype="int8"),
                 tmp_path / "a.lorazip.safetensors")
    lorazip.export(art, tmp_path / "out")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for i, name in enumerate(art.names):
        with torch.no_grad():
            got = _peft_model(base, tmp_path / "out" / name)(**inputs).logits
        model = copy.deepcopy(base)  # base + the artifact's dequantised reconstruction and heads
        params = dict(model.named_parameters())
        with torch.no_grad():
            for mod in art.modules:
                U, V, cores, _ = art.module_factors(mod["name"], [i])
                params[f"{mod['name']}.weight"] += (U[0].double() @ cores[0].double() @ V[0].double().T).float()
            for key in art.meta["adapters"][i]["extras"]:
                params[key[len("base_model.model."):]].copy_(art.get(f"extras/{i}/{key}"))
            want = model.eval()(**inputs).logits
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
        with torch.no_grad():
            orig = _peft_model(base, tmp_path / "src" / name)(**inputs).logits
        assert float((got - orig).abs().max()) > 1e-6  # lossy (rank 3 of 12), but close
        assert float((got - orig).abs().max()) < 0.5 * float(orig.abs().max())


def test_serve_int8_matches_exported_peft(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig

    from lorazip.serve import use_adapters

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg).eval()
    configs = {f"l{i}": LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                   lora_alpha=8, lora_dropout=0.0) for i in range(3)}
    _make_peft(base, configs, tmp_path / "src", seed=2, heads=False)
    coll = lorazip.load_collection(tmp_path / "src")
    for kw in (dict(rank=3), dict(budget=20_000)):  # shared parts; shared and residual parts
        art = lorazip.compress(coll, storage_dtype="int8", hash_sources=False, **({"device": "cpu"} if "rank" in kw
                                                                                  else {}), **kw)
        art = _saved(art, tmp_path / "a.lorazip.safetensors")
        out = tmp_path / f"exp{len(kw)}{next(iter(kw))}"
        lorazip.export(art, out)
        ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(7))
        model = lorazip.apply(copy.deepcopy(base), art)
        with torch.no_grad(), use_adapters(model, [2, 0, 1]):
            got = model(input_ids=ids).logits
        for j, name in enumerate(["l2", "l0", "l1"]):
            with torch.no_grad():
                want = _peft_model(base, out / name)(input_ids=ids[j : j + 1]).logits[0]
            assert torch.allclose(got[j], want, rtol=1e-5, atol=1e-5), float((got[j] - want).abs().max())
