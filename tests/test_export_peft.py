"""Export round trip through real PEFT: adapters made by peft -> compress -> save -> load -> export ->
``PeftModel.from_pretrained`` gives the outputs of the base model with ``W + U S_i V^T``.

Tiny randomly initialised GPT-2 (Conv1D, fan_in_fan_out, fused c_attn, suffix-matched c_proj) and
DistilBERT (Linear, SEQ_CLS heads in modules_to_save, an embedding LoRA, rank_pattern, rsLoRA,
mixed ranks and target sets) are built locally; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import make_peft_adapters

import lorazip

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."


@dataclass
class Zoo:
    kind: str
    base: torch.nn.Module  # never wrapped: deep-copied for every use
    src: Path  # folder of the PEFT-saved adapters
    names: list[str]
    inputs: dict[str, torch.Tensor]
    conv1d: bool  # weights stored (d_in, d_out)


def _gpt2(root: Path) -> Zoo:
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    base = GPT2LMHeadModel(cfg).eval()
    common = dict(task_type="CAUSAL_LM", fan_in_fan_out=True, lora_dropout=0.0)
    configs = {
        "g0": LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, **common),
        "g1": LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=16, **common),
        "g2": LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8, use_rslora=True, **common),
    }
    make_peft_adapters(base, configs, root / "gpt2", seed=1)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    return Zoo("gpt2", base, root / "gpt2", sorted(configs), {"input_ids": ids}, conv1d=True)


def _distilbert(root: Path) -> Zoo:
    from peft import LoraConfig
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32,
                           num_labels=3)
    base = DistilBertForSequenceClassification(cfg).eval()
    common = dict(task_type="SEQ_CLS", lora_dropout=0.0)
    configs = {
        "d0": LoraConfig(target_modules=["q_lin", "v_lin"], r=4, lora_alpha=8,
                         rank_pattern={"layer.1.attention.q_lin": 2}, alpha_pattern={"layer.1.attention.q_lin": 6},
                         **common),
        "d1": LoraConfig(target_modules=["q_lin", "k_lin", "v_lin", "out_lin"], r=8, lora_alpha=16, **common),
        "d2": LoraConfig(target_modules=["q_lin", "v_lin", "word_embeddings"], r=4, lora_alpha=4, use_rslora=True,
                         **common),
    }
    make_peft_adapters(base, configs, root / "distilbert", seed=2)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(6))
    return Zoo("distilbert", base, root / "distilbert", sorted(configs),
               {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, conv1d=False)


@pytest.fixture(scope="module", params=["gpt2", "distilbert"])
def zoo(request, tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp(f"zoo-{request.param}")
    return _gpt2(root) if request.param == "gpt2" else _distilbert(root)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


def _peft_logits(zoo: Zoo, folder: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(zoo.base), str(folder)).eval()
    return _logits(pm, zoo.inputs)


def _recon(art: lorazip.Artifact, module: str, i: int) -> torch.Tensor:
    U, V, cores, assign = art.module_factors(module, [i])
    k = int(assign[0])
    S = cores[0].double()
    S = torch.diag(S) if S.dim() == 1 else S
    return U[k].double() @ S @ V[k].double().T  # (d_out, d_in) in the layer's y = W x orientation


def _merged_logits(zoo: Zoo, art: lorazip.Artifact, name: str, extras_from: Path) -> torch.Tensor:
    """Base model with W + reconstructed delta on every module the adapter adapts, plus its saved heads."""
    i = art.index(name)
    meta = art.meta["adapters"][i]
    model = copy.deepcopy(zoo.base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for mod in art.modules:
            if mod["name"] not in meta["ranks"]:
                continue
            delta = _recon(art, mod["name"], i)
            w = params[f"{mod['name']}.weight"]
            if mod["layout"] == "embedding":
                assert w.shape == delta.shape  # (num_embeddings, dim)
                w += delta.to(w.dtype)
            elif zoo.conv1d:
                assert w.shape == delta.T.shape  # Conv1D stores (d_in, d_out)
                w += delta.T.to(w.dtype)
            else:
                assert w.shape == delta.shape
                w += delta.to(w.dtype)
        from safetensors.torch import load_file

        saved = load_file(str(extras_from / "adapter_model.safetensors"))
        for key in meta["extras"]:
            params[key[len(PREFIX):]].copy_(saved[key])
    return _logits(model.eval(), zoo.inputs)


def _union_rank(coll: lorazip.Collection) -> int:
    return max(sum(a.modules[m.name].rank for a in coll.adapters if m.name in a.modules) for m in coll.modules)


@pytest.mark.parametrize("mode", ["exact", "lossy"])
def test_export_round_trip_through_peft(zoo, tmp_path, mode):
    coll = lorazip.load_collection(zoo.src)
    assert coll.names == zoo.names
    rank = _union_rank(coll) if mode == "exact" else 3
    assert rank == (12 if zoo.kind == "gpt2" else 16) or mode == "lossy"
    art = lorazip.compress(coll, rank, device="cpu", seed=0)
    path = art.save(tmp_path / "z.lorazip.safetensors")
    art = lorazip.load_artifact(path)
    rep = lorazip.evaluate(art, zoo.src)
    if mode == "exact":
        assert rep["errors"]["max"] < 1e-10
    else:
        assert rep["errors"]["min"] > 1e-4
    out = tmp_path / "exported"
    written = lorazip.export(art, out)
    assert [p.name for p in written] == zoo.names
    base_logits = _logits(zoo.base, zoo.inputs)
    for name in zoo.names:
        got = _peft_logits(zoo, out / name)
        want = _merged_logits(zoo, art, name, zoo.src / name)
        assert float((got - base_logits).abs().max()) > 1e-3  # the adapter really changes the model
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
        orig = _peft_logits(zoo, zoo.src / name)
        if mode == "exact":
            assert torch.allclose(got, orig, rtol=1e-5, atol=1e-5), float((got - orig).abs().max())
        else:
            assert float((got - orig).abs().max()) > 1e-6


def test_exported_config(zoo, tmp_path):
    coll = lorazip.load_collection(zoo.src)
    art = lorazip.compress(coll, 4, device="cpu")
    out = tmp_path / "exported"
    lorazip.export(art, out, names=[zoo.names[-1], zoo.names[0]])
    assert sorted(p.name for p in out.iterdir()) == sorted([zoo.names[-1], zoo.names[0]])
    for name in (zoo.names[0], zoo.names[-1]):
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        orig_cfg = json.loads((zoo.src / name / "adapter_config.json").read_text())
        ad = coll.adapters[coll.names.index(name)]
        assert cfg["peft_type"] == "LORA"
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 4
        assert cfg["use_rslora"] is False and cfg["use_dora"] is False
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        assert cfg["target_modules"] == sorted(ad.modules)
        assert cfg["fan_in_fan_out"] is (zoo.kind == "gpt2")
        assert cfg["task_type"] == orig_cfg["task_type"]
        exported = lorazip.io.peft.load_adapter(out / name)
        assert sorted(exported.modules) == sorted(ad.modules)
        assert {m.rank for m in exported.modules.values()} == {4}
        assert {m.scale for m in exported.modules.values()} == {1.0}
        assert {m.layout for m in exported.modules.values()} == {m.layout for m in ad.modules.values()}
        if zoo.kind == "distilbert":
            assert cfg["modules_to_save"] == orig_cfg["modules_to_save"]
            assert exported.extras == ad.extras == [
                "base_model.model.classifier.bias", "base_model.model.classifier.weight",
                "base_model.model.pre_classifier.bias", "base_model.model.pre_classifier.weight",
            ]
            got, want = exported.extra_tensors(), ad.extra_tensors()
            assert all(torch.equal(got[k], want[k]) for k in want)
        else:
            assert exported.extras == []


def test_export_dtype_and_reload(zoo, tmp_path):
    """bfloat16 export loads in PEFT and stays close to the float32 export."""
    coll = lorazip.load_collection(zoo.src)
    art = lorazip.compress(coll, 4, device="cpu")
    name = zoo.names[1]
    lorazip.export(art, tmp_path / "f32", [name])
    lorazip.export(art, tmp_path / "bf16", [name], dtype="bfloat16")
    ad = lorazip.io.peft.load_adapter(tmp_path / "bf16" / name)
    assert ad.dtype == "BF16"
    a = _peft_logits(zoo, tmp_path / "f32" / name)
    b = _peft_logits(zoo, tmp_path / "bf16" / name)
    assert float((a - b).abs().max()) < 5e-2 * max(1.0, float(a.abs().max()))


def test_export_without_extras(zoo, tmp_path, request):
    """keep_extras=False (CLI --no-extras): the exported folder has no head tensors and must still load in PEFT."""
    coll = lorazip.load_collection(zoo.src)
    art = lorazip.compress(coll, 4, device="cpu", keep_extras=False)
    assert not any(k.startswith("extras/") for k in art.tensors())
    name = zoo.names[0]
    lorazip.export(art, tmp_path / "x", [name])
    exported = lorazip.io.peft.load_adapter(tmp_path / "x" / name)
    assert exported.extras == []
    cfg = json.loads((tmp_path / "x" / name / "adapter_config.json").read_text())
    assert not cfg["modules_to_save"]
    got = _peft_logits(zoo, tmp_path / "x" / name)
    assert got.shape == _logits(zoo.base, zoo.inputs).shape


def test_gpt2_seq_cls_score_head_round_trip(tmp_path):
    """GPT2ForSequenceClassification with modules_to_save=["score"]: the head travels through the artifact."""
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, num_labels=2, pad_token_id=0)
    base = GPT2ForSequenceClassification(cfg).eval()
    common = dict(task_type="SEQ_CLS", fan_in_fan_out=True, target_modules=["c_attn"], modules_to_save=["score"])
    configs = {"s0": LoraConfig(r=4, lora_alpha=8, **common), "s1": LoraConfig(r=2, lora_alpha=8, **common)}
    make_peft_adapters(base, configs, tmp_path / "src", seed=3)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(7))
    zoo = Zoo("gpt2-cls", base, tmp_path / "src", ["s0", "s1"], {"input_ids": ids}, conv1d=True)
    coll = lorazip.load_collection(zoo.src)
    assert coll.extras() == {"s0": ["base_model.model.score.weight"], "s1": ["base_model.model.score.weight"]}
    art = lorazip.load_artifact(lorazip.compress(coll, 6, device="cpu").save(tmp_path / "a.lorazip.safetensors"))
    lorazip.export(art, tmp_path / "out")
    for name in zoo.names:
        cfgj = json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())
        orig_cfg = json.loads((zoo.src / name / "adapter_config.json").read_text())
        assert "score" in cfgj["modules_to_save"] and cfgj["modules_to_save"] == orig_cfg["modules_to_save"]
        assert cfgj["fan_in_fan_out"] is True
        got = _peft_logits(zoo, tmp_path / "out" / name)
        orig = _peft_logits(zoo, zoo.src / name)
        want = _merged_logits(zoo, art, name, zoo.src / name)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got, orig, rtol=1e-5, atol=1e-5)  # rank 6 = 4 + 2: exact


def test_real_gpt2_fixtures_export(fixtures_dir, tmp_path):
    """Real PEFT files (fused c_attn, fan_in_fan_out, score head): exported deltas equal the originals at exact rank."""
    from safetensors.torch import load_file

    g = fixtures_dir / "gpt2"
    names = ["ShutterStack__Lightweight-Fine-Tuning-to-a-Foundation-Model",
             "winkitee__Lightweight-Fine-Tuning-Project__checkpoint-250"]
    coll = lorazip.load_collection([g / n for n in names])
    art = lorazip.compress(coll, 12, device="cpu", hash_sources=False)  # ranks 4 + 8
    assert lorazip.evaluate(art)["errors"]["max"] < 1e-10
    out = tmp_path / "out"
    lorazip.export(art, out)
    for ad in coll.adapters:
        cfg = json.loads((out / ad.name / "adapter_config.json").read_text())
        assert cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] == "gpt2"
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]
        assert cfg["target_modules"] == sorted(ad.modules) and len(cfg["target_modules"]) == 12
        exp = lorazip.io.peft.load_adapter(out / ad.name)
        orig_st, exp_st = load_file(str(ad.weights_file)), load_file(str(exp.weights_file))
        key = "base_model.model.score.weight"
        assert torch.equal(exp_st[key], orig_st[key])
        for m in ("transformer.h.0.attn.c_attn", "transformer.h.11.attn.c_attn"):
            spec = ad.modules[m]
            want = spec.scale * (orig_st[spec.key_B].double() @ orig_st[spec.key_A].double())
            B, A = exp.factors(m)
            assert B.shape == (2304, 12) and A.shape == (12, 768)
            assert float((B @ A - want).norm() / want.norm()) < 5e-6  # float32 solve, fp32 storage
