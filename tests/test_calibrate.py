"""Calibration statistics (lorazip.calibrate, ``lorazip calibrate``) on tiny local models.

Tiny randomly initialised Llama and GPT-2 models and a byte-level BPE tokenizer are built and
saved in a temporary folder; adapters are PEFT LoRAs with random (nonzero) factors. Nothing is
downloaded. The statistics are checked against hooks of our own on unpadded single sequences,
the GPT-2 ``Conv1D`` orientation and embeddings against PEFT's own delta weights applied to the
real inputs.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_tokenizer

import lorazip
from lorazip.calibrate import load_calibration, windows

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXTS = [f"the cat number {i} sat on the mat and purred {i % 3} times, then {'slept ' * (i % 4)}" for i in range(24)]


@dataclass
class World:
    root: Path
    llama: Path
    gpt2: Path
    llama_adapters: Path
    gpt2_adapters: Path
    data: Path


def _tokenizer(out: Path):
    return tiny_tokenizer(TEXTS, out)


def _adapters(model, cfg, out: Path, n: int = 3) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            torch.manual_seed(100 + i)
            pm = peft.get_peft_model(copy.deepcopy(model), cfg)
            pm.save_pretrained(str(out / f"a{i}"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("calibrate")
    llama, gpt2 = root / "llama", root / "gpt2"
    tok = _tokenizer(llama)
    tok.save_pretrained(str(gpt2))
    torch.manual_seed(0)
    lcfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    lm = LlamaForCausalLM(lcfg).eval()
    lm.save_pretrained(str(llama))
    gcfg = GPT2Config(n_embd=24, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    gm = GPT2LMHeadModel(gcfg).eval()
    gm.save_pretrained(str(gpt2))
    common = dict(lora_dropout=0.0, init_lora_weights=False)
    _adapters(lm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                  **common), root / "llama-adapters")
    _adapters(gm, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                                  **common), root / "gpt2-adapters")
    data = root / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return World(root, llama, gpt2, root / "llama-adapters", root / "gpt2-adapters", data)


def _inputs(model_dir: Path, names: list[str], wins: list[list[int]]) -> dict[str, list[torch.Tensor]]:
    """Reference: every window alone (no padding), the input of each module captured by a hook."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1])
                                                                                if a[0].is_floating_point()
                                                                                else a[0].detach().reshape(-1)))
             for n in names]
    with torch.no_grad():
        for w in wins:
            model(input_ids=torch.tensor([w]))
    for h in hooks:
        h.remove()
    return got


def _encode(world_dir: Path, texts: list[str], max_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world_dir))
    return windows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], max_length, None)


# ------------------------------------------------------------------------ statistics
def test_llama_moments_equal_unpadded_reference(world):
    stats = lorazip.calibrate(world.llama, world.data, adapters=world.llama_adapters, max_length=9, batch_size=5)
    names = sorted(lorazip.load_collection(world.llama_adapters).modules, key=lambda m: m.name)
    assert sorted(stats.modules) == [m.name for m in names]
    wins = _encode(world.llama, TEXTS, 9)
    assert stats.n_tokens == sum(map(len, wins)) and stats.meta["n_windows"] == len(wins)
    ref = _inputs(world.llama, list(stats.modules), wins)
    for name, e in stats.modules.items():
        X = torch.cat(ref[name]).double()
        assert e.tokens == X.shape[0] == stats.n_tokens and e.kind == "linear" and e.dim == X.shape[1]
        assert torch.allclose(stats.moment(name), X.T @ X, rtol=1e-5, atol=1e-6), name
    # q, k and v of a layer read one input: one tensor for the three
    layer0 = {stats.modules[f"model.layers.0.self_attn.{p}_proj"].tensor for p in "qkv"}
    assert layer0 == {"C/model.layers.0.self_attn.q_proj"}
    assert len({e.tensor for e in stats.modules.values()}) == 4  # (q, k, v) and down_proj, 2 layers


def test_gpt2_conv1d_fused_c_attn_and_embedding_against_peft(world, tmp_path):
    """Activation errors recorded by ``compress --calibration`` equal ``sum_t ||x_t dW||^2 / N`` with PEFT's
    own delta weights (Conv1D layout, fused c_attn) applied to the real inputs, and for the token
    embedding ``sum_t ||dE[id_t]||^2 / N``."""
    stats = lorazip.calibrate(world.gpt2, world.data, adapters=world.gpt2_adapters, max_length=16, batch_size=4)
    assert stats.modules["transformer.wte"].kind == "embedding"
    coll = lorazip.load_collection(world.gpt2_adapters)
    assert stats.moment("transformer.wte").shape == (coll.module("transformer.wte").d_out,)  # one count per id
    assert stats.modules["transformer.h.0.attn.c_attn"].dim == coll.module("transformer.h.0.attn.c_attn").d_in
    art = lorazip.compress(coll, 2, calibration=stats, calibration_lambda=0.0, device="cpu", storage_dtype="float32",
                           compute_dtype="float64")
    wins = _encode(world.gpt2, TEXTS, 16)
    names = [m["name"] for m in art.modules]
    ref = _inputs(world.gpt2, names, wins)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(world.gpt2)).eval()
    sq = art.stats()[0].double()
    for i, name in enumerate(art.names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orig = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(world.gpt2_adapters / name))
            state, cfg = lorazip.to_peft(art, name, dtype="float32")
            comp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{k: v for k, v in cfg.items()
                                                                                 if k != "peft_type"}))
            peft.set_peft_model_state_dict(comp, state)
        o_mods, c_mods = dict(orig.named_modules()), dict(comp.named_modules())
        for j, mod in enumerate(names):
            key = f"base_model.model.{mod}"
            dW = (o_mods[key].get_delta_weight("default") - c_mods[key].get_delta_weight("default")).double()
            if mod.endswith("wte"):  # embedding: rows picked by token ids, delta (num_embeddings, dim)
                ids = torch.cat(ref[mod])
                act = float(dW[ids].square().sum()) / ids.numel()
            else:  # Conv1D: weight (d_in, d_out), y = x W, so the delta's output is x dW
                X = torch.cat(ref[mod]).double()
                act = float((X @ dW).square().sum()) / X.shape[0]
            assert float(sq[i, j]) == pytest.approx(act, rel=1e-5, abs=1e-9), (name, mod)


def test_output_is_deterministic_and_max_tokens_is_exact(world, tmp_path):
    a = lorazip.calibrate(world.llama, world.data, adapters=world.llama_adapters, max_tokens=50, max_length=8)
    b = lorazip.calibrate(world.llama, world.data, adapters=world.llama_adapters, max_tokens=50, max_length=8,
                          batch_size=3)
    assert a.n_tokens == 50 and all(e.tokens == 50 for e in a.modules.values())
    a.save(tmp_path / "a.safetensors")
    c = lorazip.calibrate(world.llama, world.data, adapters=world.llama_adapters, max_tokens=50, max_length=8)
    c.save(tmp_path / "c.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert load_calibration(tmp_path / "a.safetensors").sha256 == a.sha256
    for name in a.modules:  # batching changes the padding, not the statistics
        assert torch.allclose(a.moment(name), b.moment(name), rtol=1e-9, atol=1e-9)
    with pytest.raises(lorazip.OutputError, match="exists"):
        c.save(tmp_path / "c.safetensors")
    # windows longer than the model's positions (max_position_embeddings 64) are cut to them
    long = lorazip.calibrate(world.llama, world.data, adapters=world.llama_adapters, max_tokens=50, max_length=10_000)
    assert long.meta["max_length"] == 64


def test_every_module_by_default_and_text_files(world, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text(" ".join(TEXTS[:6]))
    (tmp_path / "docs" / "two.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[6:9]))
    stats = lorazip.calibrate(world.llama, tmp_path / "docs", max_length=16)
    assert stats.meta["n_documents"] == 4 and len(stats.meta["data"]) == 2
    kinds = {n: e.kind for n, e in stats.modules.items()}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
    assert {"model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.o_proj"} <= set(kinds)
    # gate and up share their input; the embedding counts every token once
    assert stats.modules["model.layers.1.mlp.up_proj"].tensor == stats.modules["model.layers.1.mlp.gate_proj"].tensor
    counts = stats.moment("model.embed_tokens")
    assert float(counts.sum()) == stats.n_tokens
    only = lorazip.calibrate(world.llama, tmp_path / "docs" / "one.txt", modules=["model.layers.0.mlp.down_proj"])
    assert list(only.modules) == ["model.layers.0.mlp.down_proj"] and only.meta["n_documents"] == 1


def test_modules_the_base_model_lacks_and_bad_inputs(world, tmp_path):
    with pytest.raises(lorazip.ValidationError, match="not in the base model"):
        lorazip.calibrate(world.llama, world.data, adapters=world.gpt2_adapters)
    with pytest.raises(lorazip.ValidationError, match="not in the base model"):
        lorazip.calibrate(world.llama, world.data, modules=["model.layers.7.self_attn.q_proj"])
    with pytest.raises(lorazip.ValidationError, match="LayerNorm|RMSNorm|not a Linear"):
        lorazip.calibrate(world.llama, world.data, modules=["model.layers.0.input_layernorm"])
    from helpers import write_adapter

    q = lorazip.load_collection(world.llama_adapters).modules[0]
    write_adapter(tmp_path / "odd" / "a", {q.name: (q.d_out + 3, q.d_in)}, seed=0)  # another shape, one name
    with pytest.raises(lorazip.ValidationError, match=rf"see a linear {q.d_out + 3}x{q.d_in} \(d_out x d_in\), the "
                       rf"base model has a Linear of {q.d_out}x{q.d_in} \(linear\)"):
        lorazip.calibrate(world.llama, world.data, adapters=tmp_path / "odd")
    with pytest.raises(lorazip.SourceError, match="no such file"):
        lorazip.calibrate(world.llama, tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(lorazip.SourceError, match=r"\.txt or \.jsonl"):
        lorazip.calibrate(world.llama, tmp_path / "x.csv")
    with pytest.raises(lorazip.OptionError, match="max_tokens"):
        lorazip.calibrate(world.llama, world.data, max_tokens=0)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(lorazip.ArtifactError):
        load_calibration(tmp_path / "bad.safetensors")


def test_missing_transformers_gives_clear_error(world, monkeypatch):
    from lorazip.models import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"calibration needs transformers: pip install 'lorazip\[eval\]'"):
        lorazip.calibrate(world.llama, world.data)


def test_cli_calibrate_then_compress(world, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    rc, out, err = run_cli(capsys, "calibrate", world.llama, "--data", world.data, "--adapters", world.llama_adapters,
                           "-o", stats, "--max-tokens", "120", "--max-length", "10", "--device", "cpu", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["n_tokens"] == 120 and rep["n_modules"] == 8 and rep["n_tensors"] == 4
    assert "calibrated 8 module(s)" in err
    rc, out, err = run_cli(capsys, "calibrate", world.llama, "--data", world.data, "-o", stats)
    assert rc == 1 and "already exists" in err
    art = tmp_path / "a.lorazip.safetensors"
    rc, out, err = run_cli(capsys, "compress", world.llama_adapters, "-o", art, "--rank", "2", "--calibration", stats,
                           "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["metric"] == "activation" and rep["calibration"]["sha256"] == load_calibration(stats).sha256
    rc, out, err = run_cli(capsys, "compress", world.gpt2_adapters, "-o", tmp_path / "g.lorazip.safetensors",
                           "--calibration", stats)
    assert rc == 1 and "no entry for module" in err
