"""Serving (lorazip.serve): mixed-adapter batches equal PEFT with each row's exported adapter.

Tiny randomly initialised GPT-2 (Conv1D, fan_in_fan_out, fused c_attn) and Llama-style
(q_proj / v_proj Linear, an embedding LoRA on embed_tokens) models and their PEFT adapters are
built locally; artifacts are compressed (jd-full, jd-diag, jd-clustered with K = 2), saved and
re-opened lazily; every batch mixes adapters row by row, including rows without one (-1/None).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import make_peft_adapters

import lorazip
from lorazip.serve import (
    BatchedLoraLinear, adapter_names, detach, is_applied, set_adapters, use_adapters,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass
class Zoo:
    kind: str
    base: torch.nn.Module  # never modified: deep-copied for every use
    src: Path
    names: list[str]
    ids: torch.Tensor  # (6, 5) token ids
    cache: dict = field(default_factory=dict)


def _gpt2(root: Path) -> Zoo:
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()
    common = dict(task_type="CAUSAL_LM", fan_in_fan_out=True, lora_dropout=0.0)
    configs = {
        "g0": LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, **common),
        "g1": LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=16, **common),
        "g2": LoraConfig(target_modules=["c_attn"], r=2, lora_alpha=8, use_rslora=True, **common),  # no c_proj
        "g3": LoraConfig(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=2, **common),
    }
    make_peft_adapters(base, configs, root / "gpt2", seed=1)
    ids = torch.randint(0, 100, (6, 5), generator=torch.Generator().manual_seed(5))
    return Zoo("gpt2", base, root / "gpt2", sorted(configs), ids)


def _llama(root: Path) -> Zoo:
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).eval()
    common = dict(task_type="CAUSAL_LM", lora_dropout=0.0)
    configs = {
        "l0": LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, **common),
        "l1": LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, **common),
        "l2": LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], r=2, lora_alpha=4, **common),
        "l3": LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4, **common),  # no v_proj
    }
    make_peft_adapters(base, configs, root / "llama", seed=2)
    ids = torch.randint(0, 100, (6, 5), generator=torch.Generator().manual_seed(6))
    return Zoo("llama", base, root / "llama", sorted(configs), ids)


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, Zoo]:
    root = tmp_path_factory.mktemp("serve-zoo")
    return {"gpt2": _gpt2(root), "llama": _llama(root)}


METHODS = {
    "jd-full": dict(method="jd-full"),
    "jd-diag": dict(method="jd-diag"),
    "clustered": dict(method="jd-clustered", clusters=2),
    "module-ranks": dict(method="jd-full"),  # per-module ranks: 2 on the first module, 1 on the last
    "low-bit": {},  # a budget: residual rows at 1-8 bits (format v5), dequantised when loaded
}


def _artifact(zoo: Zoo, method: str) -> lorazip.Artifact:
    """Compressed (lossy, rank 3), saved and re-opened lazily; cached per zoo."""
    key = ("art", method)
    if key not in zoo.cache:
        coll = lorazip.load_collection(zoo.src)
        kw = dict(METHODS[method])
        if method == "module-ranks":
            kw["ranks"] = {coll.modules[0].name: 2, coll.modules[-1].name: 1}
        if method == "low-bit":
            extras = sum(t.numel() * t.element_size() for a in coll.adapters if a.extras
                         for t in a.extra_tensors().values())
            lora = sum(s_.rank * (info.d_in + info.d_out) * 4 for a in coll.adapters
                       for name, s_ in a.modules.items() for info in coll.modules if info.name == name)
            for frac in (5, 8, 12):  # the largest budget at which bits win over float16 / int8
                art = lorazip.compress(coll, budget=extras + 6000 + lora // frac, hash_sources=False)
                if any(k.startswith("qbits/") for k in art.tensors()):
                    break
            assert any(k.startswith("qbits/") for k in art.tensors()), "no low-bit rows: the case tests nothing"
        else:
            art = lorazip.compress(coll, 3, device="cpu", hash_sources=False, **kw)
        folder = zoo.src.parent / f"{zoo.kind}-{method}"
        folder.mkdir()
        zoo.cache[key] = lorazip.load_artifact(art.save(folder / "a.lorazip.safetensors"))
    return zoo.cache[key]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_model(zoo: Zoo, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(zoo.base), str(folder)).eval()


def _reference(zoo: Zoo, method: str) -> dict:
    """{adapter name: logits of PEFT with the exported adapter, None: base model logits} on zoo.ids."""
    key = ("ref", method)
    if key not in zoo.cache:
        art = _artifact(zoo, method)
        out = zoo.src.parent / f"{zoo.kind}-{method}" / "exported"
        lorazip.export(art, out)
        ref = {None: _logits(zoo.base, zoo.ids)}
        for name in zoo.names:
            ref[name] = _logits(_peft_model(zoo, out / name), zoo.ids)
            assert float((ref[name] - ref[None]).abs().max()) > 1e-3  # the adapter changes the model
        zoo.cache[key] = ref
    return zoo.cache[key]


def _expected(ref: dict, names_per_row: list) -> torch.Tensor:
    return torch.stack([ref[name][j] for j, name in enumerate(names_per_row)])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_batch_matches_peft(zoos, kind, method):
    zoo = zoos[kind]
    art = _artifact(zoo, method)
    assert {m["n_clusters"] for m in art.modules} == ({2} if method == "clustered" else {1})
    uncapped = {m["rank"] for m in art.modules if "rank_capped" not in m}  # a cap: sum of adapter ranks < 3
    if method != "low-bit":
        assert uncapped == ({1, 2, 3} if method == "module-ranks" else {3})
    ref = _reference(zoo, method)
    model = lorazip.apply(copy.deepcopy(zoo.base), art)
    n = zoo.names
    rows = [n[0], n[1], None, n[2], n[3], n[1]]  # every row its own choice, one without adapter
    ids = [n[0], 1, -1, n[2], 3, n[1]]  # the same as names / indices / -1
    with use_adapters(model, ids):
        got = _logits(model, zoo.ids)
    want = _expected(ref, rows)
    assert torch.allclose(got, want, **TOL), float((got - want).abs().max())
    # as an integer tensor, and a permuted batch
    perm = [5, 3, 0, 2, 4, 1]
    with use_adapters(model, torch.tensor([[0, 1, -1, 2, 3, 1][p] for p in perm])):
        got_perm = _logits(model, zoo.ids[perm])
    assert torch.allclose(got_perm, want[perm], **TOL)
    # one adapter for the whole batch, and no adapter at all
    with use_adapters(model, n[2]):
        assert torch.allclose(_logits(model, zoo.ids), ref[n[2]], **TOL)
    assert torch.allclose(_logits(model, zoo.ids), ref[None], **TOL)


def test_generate_mixed_batch(zoos):
    """KV-cache decoding keeps each row's adapter: greedy tokens equal PEFT's per adapter."""
    zoo = zoos["llama"]
    art = _artifact(zoo, "clustered")
    _reference(zoo, "clustered")  # exports the folders
    out = zoo.src.parent / "llama-clustered" / "exported"
    prompt = zoo.ids[:4]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model = lorazip.apply(copy.deepcopy(zoo.base), art)
    rows = [zoo.names[2], None, zoo.names[0], zoo.names[3]]
    with torch.no_grad(), use_adapters(model, rows):
        got = model.generate(prompt, **kw)
    for j, name in enumerate(rows):
        ref_model = zoo.base if name is None else _peft_model(zoo, out / name)
        with torch.no_grad():
            want = ref_model.generate(prompt[j : j + 1], max_new_tokens=4, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones_like(prompt[j : j + 1]))
        assert torch.equal(got[j], want[0]), (name, got[j], want[0])


def test_subset_reads_only_requested_cores(zoos, monkeypatch):
    zoo = zoos["llama"]
    art = _artifact(zoo, "clustered")
    ref = _reference(zoo, "clustered")
    assert art._tensors is None  # lazy, reads from the file
    calls, full = [], []
    get_rows, get = lorazip.Artifact.get_rows, lorazip.Artifact.get
    monkeypatch.setattr(lorazip.Artifact, "get_rows", lambda self, k, r: calls.append((k, list(r))) or get_rows(self, k, r))
    monkeypatch.setattr(lorazip.Artifact, "get", lambda self, k: full.append(k) or get(self, k))
    model = lorazip.apply(copy.deepcopy(zoo.base), art, adapters=["l2", "l0"])
    monkeypatch.undo()
    cores = [c for c in calls if c[0].startswith("cores/")]
    assert len(cores) == len(art.modules)
    assert all(rows == [2, 0] for _, rows in calls)  # cores and assignment of l2, l0 only
    assert not [k for k in full if not k.startswith(("U/", "V/"))]  # nothing else read whole
    assert adapter_names(model) == ["l2", "l0"]
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, BatchedLoraLinear) and layer.cores.shape[0] == 3  # 2 adapters + the zero row
    rows = ["l0", None, "l2", "l2", "l0", None]
    with use_adapters(model, [1, -1, 0, "l2", "l0", None]):  # indices are positions in adapter_names
        got = _logits(model, zoo.ids)
    assert torch.allclose(got, _expected(ref, rows), **TOL)
    with pytest.raises(lorazip.OptionError, match="not loaded"):
        set_adapters(model, ["l1"] * 6)
    with pytest.raises(lorazip.OptionError, match="out of range"):
        set_adapters(model, [2] * 6)


def test_detach_restores_original_modules(zoos):
    zoo = zoos["gpt2"]
    model = copy.deepcopy(zoo.base)
    before = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model, zoo.ids)
    lorazip.apply(model, _artifact(zoo, "jd-full"))
    assert is_applied(model)
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), BatchedLoraLinear)
    set_adapters(model, [0, 1, 2, 3, -1, 0])
    assert not torch.allclose(_logits(model, zoo.ids), base_logits)
    assert detach(model) is model
    assert not is_applied(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_logits(model, zoo.ids), base_logits)
    with pytest.raises(lorazip.OptionError, match="no lorazip collection"):
        detach(model)
    lorazip.apply(model, _artifact(zoo, "jd-diag"))  # can be attached again
    detach(model)


def test_errors(zoos, tmp_path):
    g, ll = zoos["gpt2"], zoos["llama"]
    art = _artifact(g, "jd-full")
    model = copy.deepcopy(ll.base)
    before = dict(model.named_modules())
    with pytest.raises(lorazip.ValidationError, match=r"'transformer\.h\.0\.attn\.c_attn'.*not in the model"):
        lorazip.apply(model, art)
    assert dict(model.named_modules()) == before and not is_applied(model)  # nothing changed
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(lorazip.ValidationError, match=r"144 x 48 .* 96 x 32"):
        lorazip.apply(wider, art)
    model = copy.deepcopy(g.base)
    with pytest.raises(lorazip.ArtifactError, match="no adapter named 'nope'"):
        lorazip.apply(model, art, adapters=["g0", "nope"])
    with pytest.raises(lorazip.OptionError, match="twice"):
        lorazip.apply(model, art, adapters=["g0", "g0"])
    with pytest.raises(lorazip.OptionError, match="dtype"):
        lorazip.apply(model, art, dtype="int8")
    with pytest.raises(lorazip.ArtifactError):
        lorazip.apply(model, tmp_path / "missing.lorazip.safetensors")
    assert not is_applied(model)
    with pytest.raises(lorazip.OptionError, match="no lorazip collection"):
        set_adapters(model, [0])
    lorazip.apply(model, str(art.path))  # a path works too
    with pytest.raises(lorazip.OptionError, match="already attached"):
        lorazip.apply(model, art)
    with pytest.raises(lorazip.OptionError, match="unknown adapter 'x'"):
        set_adapters(model, ["g0", "x"])
    with pytest.raises(lorazip.OptionError, match="name, an integer index or None"):
        set_adapters(model, [0.5])
    with pytest.raises(lorazip.OptionError, match="integer tensor"):
        set_adapters(model, torch.zeros(6))
    with pytest.raises(lorazip.OptionError, match="3 adapter ids were given for a batch of 6 rows"):
        with use_adapters(model, [0, 1, 2]):
            _logits(model, g.ids)
    with use_adapters(model, [0] * 6):  # nested choices are restored on exit
        with use_adapters(model, None):
            inner = _logits(model, g.ids)
        outer = _logits(model, g.ids)
    assert torch.allclose(inner, _logits(model, g.ids)) and not torch.allclose(outer, inner)


def test_dtype_and_to(zoos):
    zoo = zoos["llama"]
    art = _artifact(zoo, "jd-full")
    ref = _reference(zoo, "jd-full")
    rows = [zoo.names[0], None, zoo.names[2], zoo.names[1], zoo.names[3], zoo.names[2]]
    model = lorazip.apply(copy.deepcopy(zoo.base), art, dtype=torch.float64)
    layer = model.get_submodule("model.embed_tokens")
    assert layer.U.dtype == layer.cores.dtype == torch.float64 and layer.weight.dtype == torch.float32
    with use_adapters(model, rows):
        assert torch.allclose(_logits(model, zoo.ids), _expected(ref, rows), **TOL)
    model = lorazip.apply(copy.deepcopy(zoo.base), art, dtype="bfloat16")
    with use_adapters(model, rows):
        got = _logits(model, zoo.ids)
    assert float((got - _expected(ref, rows)).abs().max()) < 5e-2
    model = lorazip.apply(copy.deepcopy(zoo.base), art).double()  # buffers follow .to()/.double()
    assert model.get_submodule("model.layers.1.self_attn.v_proj").V.dtype == torch.float64
    with use_adapters(model, rows):
        got = _logits(model, zoo.ids)
    assert got.dtype == torch.float64 and torch.allclose(got.float(), _expected(ref, rows), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(zoos):
    zoo = zoos["llama"]
    art = _artifact(zoo, "clustered")
    ref = _reference(zoo, "clustered")
    rows = [zoo.names[0], None, zoo.names[2], zoo.names[1], zoo.names[3], zoo.names[2]]
    model = lorazip.apply(copy.deepcopy(zoo.base), art).cuda()
    assert model.get_submodule("model.layers.0.self_attn.q_proj").cores.is_cuda
    with use_adapters(model, torch.tensor([0, -1, 2, 1, 3, 2], device="cuda")):
        got = _logits(model, zoo.ids.cuda()).cpu()
    assert torch.allclose(got, _expected(ref, rows), rtol=1e-4, atol=1e-4)


# -- the bare layer against dense references -------------------------------------------------------
def _dense_reference(W, bias, U, V, cores, assign, ids, x, conv1d=False):
    """float64 loop: base + U_k S_a V_k^T per row."""
    out = []
    for j, a in enumerate(ids.tolist()):
        y = x[j].double() @ (W.double() if conv1d else W.double().T) + bias.double()
        if a >= 0:
            k = int(assign[a])
            S = torch.diag(cores[a].double()) if cores.dim() == 2 else cores[a].double()
            y = y + x[j].double() @ (U[k].double() @ S @ V[k].double().T).T
        out.append(y)
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 3), diag=st.booleans(), conv1d=st.booleans(), seq=st.sampled_from([None, 1, 3]),
       batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_layer_matches_dense_reference(K, diag, conv1d, seq, batch, seed):
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r, n = 7, 5, 3, 4
    base = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g))
        base.bias.copy_(torch.randn(d_out, generator=g))
    U, V = torch.randn(K, d_out, r, generator=g), torch.randn(K, d_in, r, generator=g)
    cores = torch.randn((n, r) if diag else (n, r, r), generator=g)
    assign = torch.randint(0, K, (n,), generator=g)
    layer = BatchedLoraLinear(base, U, V, cores, assign if K > 1 else None)
    ids = torch.randint(-1, n, (batch,), generator=g)
    x = torch.randn((batch, d_in) if seq is None else (batch, seq, d_in), generator=g)
    got = layer(x, adapter_ids=ids)
    want = _dense_reference(base.weight, base.bias, U, V, cores, assign if K > 1 else torch.zeros(n), ids, x, conv1d)
    assert got.shape == base(x).shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), base(x))  # no ids: the base layer alone
    assert torch.equal(layer(x, adapter_ids=[-1] * batch), base(x))
    with pytest.raises(lorazip.OptionError, match="names need lorazip.apply"):
        layer(x, adapter_ids=["a"] * batch)
    # one adapter for the whole batch (its core folded into the output basis) = that id on every row
    a = int(torch.randint(0, n, (1,), generator=g))
    one = _dense_reference(base.weight, base.bias, U, V, cores, assign if K > 1 else torch.zeros(n),
                           torch.full((batch,), a), x, conv1d)
    assert torch.allclose(layer(x, adapter_ids=a).double(), one, rtol=1e-5, atol=1e-5)
    layer.double()  # the folded product follows the buffers
    assert torch.allclose(layer(x.double(), adapter_ids=a), one, rtol=1e-9, atol=1e-9)


def test_apply_warns_of_heads_it_does_not_serve(tmp_path):
    """Adapters carrying non-LoRA tensors (modules_to_save heads): apply serves their LoRA parts and says
    that their rows use the model's own head; adapters without any: no warning."""
    from helpers import write_collection
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorazip.serve import HeadsNotServed

    modules = {"transformer.h.0.attn.c_attn": (96, 32)}
    heads = {"base_model.model.score.modules_to_save.default.weight": torch.randn(3, 32)}
    write_collection(tmp_path / "h", n=2, modules=modules, seed=1, extra_tensors=heads, fan_in_fan_out=True)
    write_collection(tmp_path / "p", n=2, modules=modules, seed=1, fan_in_fan_out=True)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.warns(HeadsNotServed, match=r"does not serve \(score\)"):
        lorazip.apply(copy.deepcopy(base), lorazip.compress(lorazip.load_collection(tmp_path / "h"), rank=2))
    plain = {"base_model.model.classifier.weight": torch.randn(3, 32), "base_model.model.classifier.bias": torch.randn(3),
             "base_model.model.bert.pooler.dense.weight": torch.randn(32, 32)}
    write_collection(tmp_path / "c", n=1, modules=modules, seed=1, extra_tensors=plain, fan_in_fan_out=True)
    with pytest.warns(HeadsNotServed, match=r"does not serve \(bert\.pooler\.dense, classifier\)"):  # the modules
        lorazip.apply(copy.deepcopy(base), lorazip.compress(lorazip.load_collection(tmp_path / "c"), rank=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadsNotServed)
        lorazip.apply(copy.deepcopy(base), lorazip.compress(lorazip.load_collection(tmp_path / "p"), rank=2))
