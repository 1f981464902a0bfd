"""A zoo of genuine PEFT adapter collections on tiny random-weight transformers models.

Every base model is built from a transformers config class (tiny dims, seeded, nothing
downloaded), saved with ``save_pretrained`` into a local folder, and its ``name_or_path`` points
there, so the adapters' ``base_model_name_or_path`` is that folder. Adapters are made by
``peft.get_peft_model`` + ``save_pretrained`` (safetensors), with every LoRA factor
(``lora_A`` / ``lora_B`` / ``lora_embedding_A`` / ``lora_embedding_B``) and every
``modules_to_save`` copy drawn at random from a seeded generator (PEFT initialises ``lora_B`` and
``lora_embedding_A`` to zero, which would make every adapter a no-op).

Builders (``BUILDERS``), one collection each, 3-5 adapters, with the options people use spread
over the adapters (different ``r``, ``rank_pattern`` / ``alpha_pattern``, rsLoRA,
``modules_to_save``, LoRA on heads, ``layers_to_transform``, mixed ``target_modules``,
bf16 / fp16 saved weights):

=========== ================================== =========== =========================================
kind        model                              task        notes
=========== ================================== =========== =========================================
llama       LlamaForCausalLM, GQA (4 q, 2 kv)  CAUSAL_LM   q/k/v/o, mlp, LoRA on lm_head, rsLoRA,
                                                           layers_to_transform, rank/alpha_pattern
gemma2      Gemma2ForCausalLM, GQA             CAUSAL_LM   saved in bfloat16 (model.to(bf16))
qwen2       Qwen2ForCausalLM (q/k/v biases)    CAUSAL_LM   saved in float16, "all-linear",
                                                           modules_to_save=["lm_head"]
gpt2        GPT2LMHeadModel (Conv1D)           CAUSAL_LM   fused c_attn, fan_in_fan_out, c_proj of
                                                           attn and mlp, layers_to_transform
bert-cls    BertForSequenceClassification      SEQ_CLS     classifier (+ pooler) in modules_to_save
distilbert  DistilBertForSequenceClassif.      SEQ_CLS     classifier + pre_classifier saved
bert-tok    BertForTokenClassification         TOKEN_CLS   classifier in modules_to_save
t5          T5ForConditionalGeneration         SEQ_2_SEQ   q/v, k/o, wi/wo, encoder and decoder
llama-emb   LlamaForCausalLM                   CAUSAL_LM   embed_tokens LoRA (lora_embedding_A/B),
                                                           LoRA factors in bfloat16
=========== ================================== =========== =========================================

Also: :func:`make_classifier_collection` (DistilBERT, adapters with 2 / 3 / 6 labels, LoRA on the
heads or not), :func:`make_unsupported` (DoRA, IA3, LoHa, LoKr, AdaLoRA, lora_bias: lorazip must
refuse them) and :func:`make_variant` (LoRA options such as trainable tokens, aLoRA, PiSSA: lorazip
must reproduce them after export or refuse them).

Written for peft 0.21 / transformers 5 (what the tests were run with), nothing downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

INPUT_ROWS = 6  # rows of every collection's input batch (>= adapters + 1 for a base-model row)
SEQ = 7


@dataclass
class ZooCollection:
    kind: str
    base: torch.nn.Module  # float32, eval mode; never modified (deep-copied for every use)
    base_dir: Path  # save_pretrained folder of the base: the adapters' base_model_name_or_path
    src: Path  # folder holding one PEFT folder per adapter
    names: list[str]  # sorted adapter names (= lorazip's order)
    inputs: dict[str, torch.Tensor]  # a batch of INPUT_ROWS rows
    adapter_dtype: torch.dtype = torch.float32  # dtype the adapters were saved in
    heads: dict[str, bool] = field(default_factory=dict)  # adapter -> has modules_to_save tensors
    cache: dict[str, Any] = field(default_factory=dict)


# -- helpers ---------------------------------------------------------------------------------------
@contextmanager
def _quiet():
    """PEFT / transformers notices (save_embedding_layers, deprecations) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def save_base(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``save_pretrained`` the base into ``folder`` and make the model's name_or_path point there
    (what ``from_pretrained(folder)`` would set; PEFT writes it as ``base_model_name_or_path``)."""
    model.save_pretrained(str(folder))
    model.config._name_or_path = str(folder)
    try:
        model.name_or_path = str(folder)
    except AttributeError:  # a read-only property in some transformers versions: the config is enough
        pass
    return model.eval()


@torch.no_grad()
def randomize(peft_model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded random values of a sensible scale for every LoRA factor and modules_to_save copy:
    ``A ~ N(0, 1/d_in)``, ``B ~ N(0, 0.05^2)`` (a delta of the order of the base weights)."""
    for name, p in peft_model.named_parameters():
        if "lora_embedding_A" in name:  # (r, num_embeddings)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "lora_embedding_B" in name:  # (dim, r)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        elif "lora_A" in name:  # (r, d_in)
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        elif "lora_B" in name:  # (d_out, r)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        elif "modules_to_save" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def make_adapters(base: torch.nn.Module, configs: dict[str, Any], out: Path, seed: int,
                  dtype: torch.dtype = torch.float32, cast: str = "model") -> dict[str, bool]:
    """One PEFT adapter of ``base`` per ``{name: peft config}`` saved under ``out/<name>`` (randomized);
    returns ``{name: has modules_to_save tensors}``. With a ``dtype`` other than float32, ``cast="model"``
    runs ``peft_model.to(dtype)`` before ``save_pretrained`` (a bf16 / fp16 training run: every saved
    tensor in ``dtype``, base layers PEFT saves along included), ``cast="lora"`` casts the LoRA factors only."""
    import peft

    gen = torch.Generator().manual_seed(seed)
    heads = {}
    for name, cfg in configs.items():
        with _quiet():
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            randomize(pm, gen)
            if dtype != torch.float32 and cast == "model":
                pm = pm.to(dtype)
            elif dtype != torch.float32:
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.data = p.data.to(dtype)
            pm.save_pretrained(str(out / name))
        heads[name] = any("modules_to_save" in n for n, _ in pm.named_parameters())
    return heads


def _ids(vocab: int, seed: int, rows: int = INPUT_ROWS, seq: int = SEQ, low: int = 1) -> torch.Tensor:
    return torch.randint(low, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _lm_inputs(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    ids = _ids(vocab, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _lora(**kw):
    from peft import LoraConfig

    kw.setdefault("lora_dropout", 0.0)
    return LoraConfig(**kw)


# -- the collections -------------------------------------------------------------------------------
def build_llama(root: Path) -> ZooCollection:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    base = save_base(LlamaForCausalLM(cfg), root / "base-llama")
    lm = dict(task_type="CAUSAL_LM")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    configs = {
        "qkvo-r4": _lora(target_modules=attn, r=4, lora_alpha=8, **lm),
        "mlp-r8": _lora(target_modules=attn + ["gate_proj", "up_proj", "down_proj"], r=8, lora_alpha=16,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 4}, **lm),
        "rslora-layer1": _lora(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, use_rslora=True,
                               layers_to_transform=[1], **lm),
        "lmhead-r4": _lora(target_modules=["q_proj", "v_proj", "lm_head"], r=4, lora_alpha=4, **lm),
    }
    heads = make_adapters(base, configs, root / "llama", seed=1)
    return ZooCollection("llama", base, root / "base-llama", root / "llama", sorted(configs), _lm_inputs(128, 11),
                         heads=heads)


def build_gemma2(root: Path) -> ZooCollection:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       sliding_window=4)
    base = save_base(Gemma2ForCausalLM(cfg), root / "base-gemma2")
    lm = dict(task_type="CAUSAL_LM")
    configs = {
        "g-attn-r4": _lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, **lm),
        "g-mlp-r2": _lora(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], r=2,
                          lora_alpha=8, **lm),
        "g-pattern": _lora(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                           rank_pattern={"model.layers.0.self_attn.q_proj": 6},
                           alpha_pattern={"model.layers.0.self_attn.q_proj": 3}, **lm),
    }
    heads = make_adapters(base, configs, root / "gemma2", seed=2, dtype=torch.bfloat16)
    return ZooCollection("gemma2", base, root / "base-gemma2", root / "gemma2", sorted(configs),
                         _lm_inputs(128, 12), adapter_dtype=torch.bfloat16, heads=heads)


def build_qwen2(root: Path) -> ZooCollection:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = save_base(Qwen2ForCausalLM(cfg), root / "base-qwen2")
    lm = dict(task_type="CAUSAL_LM")
    configs = {
        "q-all-linear": _lora(target_modules="all-linear", r=4, lora_alpha=8, **lm),
        "q-qv-r8": _lora(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=8, use_rslora=True, **lm),
        "q-head": _lora(target_modules=["q_proj", "k_proj", "v_proj"], r=2, lora_alpha=4,
                        modules_to_save=["lm_head"], **lm),
    }
    heads = make_adapters(base, configs, root / "qwen2", seed=3, dtype=torch.float16)
    return ZooCollection("qwen2", base, root / "base-qwen2", root / "qwen2", sorted(configs), _lm_inputs(128, 13),
                         adapter_dtype=torch.float16, heads=heads)


def build_gpt2(root: Path) -> ZooCollection:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32)
    base = save_base(GPT2LMHeadModel(cfg), root / "base-gpt2")
    common = dict(task_type="CAUSAL_LM", fan_in_fan_out=True)
    configs = {
        "gpt-attn-proj": _lora(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, **common),
        "gpt-fc-r8": _lora(target_modules=["c_attn", "c_proj", "c_fc"], r=8, lora_alpha=16,
                           rank_pattern={"mlp.c_proj": 2}, **common),
        "gpt-layer0": _lora(target_modules=["c_attn"], r=2, lora_alpha=8, use_rslora=True,
                            layers_to_transform=[0], layers_pattern="h", **common),
    }
    heads = make_adapters(base, configs, root / "gpt2", seed=4)
    ids = _ids(128, 14)
    return ZooCollection("gpt2", base, root / "base-gpt2", root / "gpt2", sorted(configs),
                         {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, heads=heads)


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, **kw)


def build_bert_cls(root: Path) -> ZooCollection:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = save_base(BertForSequenceClassification(_bert_config(num_labels=3)), root / "base-bert-cls")
    cls = dict(task_type="SEQ_CLS")
    configs = {
        "b-qv-r4": _lora(target_modules=["query", "value"], r=4, lora_alpha=8, **cls),
        "b-dense-r6": _lora(target_modules=["query", "key", "value", "dense"], r=6, lora_alpha=12,
                            alpha_pattern={"output.dense": 3}, **cls),
        "b-pooler": _lora(target_modules=["query", "value"], r=2, lora_alpha=2, use_rslora=True,
                          modules_to_save=["pooler"], **cls),  # pooler + (auto) classifier saved
    }
    heads = make_adapters(base, configs, root / "bert-cls", seed=5)
    return ZooCollection("bert-cls", base, root / "base-bert-cls", root / "bert-cls", sorted(configs),
                         _lm_inputs(128, 15), heads=heads)


def _distilbert_config(num_labels: int):
    from transformers import DistilBertConfig

    return DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                            max_position_embeddings=32, num_labels=num_labels)


def build_distilbert(root: Path) -> ZooCollection:
    from transformers import DistilBertForSequenceClassification

    torch.manual_seed(0)
    base = save_base(DistilBertForSequenceClassification(_distilbert_config(3)), root / "base-distilbert")
    cls = dict(task_type="SEQ_CLS")
    configs = {
        "d-qv-r4": _lora(target_modules=["q_lin", "v_lin"], r=4, lora_alpha=8,
                         rank_pattern={"layer.1.attention.q_lin": 2}, alpha_pattern={"layer.1.attention.q_lin": 6},
                         **cls),
        "d-all-r8": _lora(target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], r=8,
                          lora_alpha=16, **cls),
        "d-layer0": _lora(target_modules=["q_lin", "v_lin"], r=2, lora_alpha=4, layers_to_transform=[0],
                          layers_pattern="layer", **cls),
    }
    heads = make_adapters(base, configs, root / "distilbert", seed=6)
    return ZooCollection("distilbert", base, root / "base-distilbert", root / "distilbert", sorted(configs),
                         _lm_inputs(128, 16), heads=heads)


def build_bert_tok(root: Path) -> ZooCollection:
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    base = save_base(BertForTokenClassification(_bert_config(num_labels=5)), root / "base-bert-tok")
    tok = dict(task_type="TOKEN_CLS")
    configs = {
        "t-qv-r4": _lora(target_modules=["query", "value"], r=4, lora_alpha=8, **tok),
        "t-qkv-r2": _lora(target_modules=["query", "key", "value"], r=2, lora_alpha=8, use_rslora=True, **tok),
        "t-ffn-r4": _lora(target_modules=["query", "value", "intermediate.dense", "output.dense"], r=4,
                          lora_alpha=4, rank_pattern={"intermediate.dense": 8}, **tok),
    }
    heads = make_adapters(base, configs, root / "bert-tok", seed=7)
    return ZooCollection("bert-tok", base, root / "base-bert-tok", root / "bert-tok", sorted(configs),
                         _lm_inputs(128, 17), heads=heads)


def build_t5(root: Path) -> ZooCollection:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    base = save_base(T5ForConditionalGeneration(cfg), root / "base-t5")
    s2s = dict(task_type="SEQ_2_SEQ_LM")
    configs = {
        "t5-qv-r4": _lora(target_modules=["q", "v"], r=4, lora_alpha=8, **s2s),
        "t5-ffn-r2": _lora(target_modules=["q", "v", "wi", "wo"], r=2, lora_alpha=4, **s2s),
        "t5-ko-r4": _lora(target_modules=["k", "o"], r=4, lora_alpha=4, use_rslora=True,
                          rank_pattern={"decoder.block.1.layer.1.EncDecAttention.o": 6}, **s2s),
    }
    heads = make_adapters(base, configs, root / "t5", seed=8)
    ids = _ids(128, 18)
    dec = _ids(128, 28, seq=5)
    return ZooCollection("t5", base, root / "base-t5", root / "t5", sorted(configs),
                         {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec},
                         heads=heads)


def build_llama_emb(root: Path) -> ZooCollection:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    base = save_base(LlamaForCausalLM(cfg), root / "base-llama-emb")
    lm = dict(task_type="CAUSAL_LM")
    configs = {
        "e-embed-only": _lora(target_modules=["embed_tokens"], r=4, lora_alpha=8, **lm),
        "e-embed-qv": _lora(target_modules=["embed_tokens", "q_proj", "v_proj"], r=2, lora_alpha=4, **lm),
        "e-qv-r8": _lora(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=8, **lm),
        "e-embed-rs": _lora(target_modules=["embed_tokens", "o_proj"], r=8, lora_alpha=8, use_rslora=True,
                            rank_pattern={"embed_tokens": 3}, **lm),
    }
    # LoRA factors in bf16; the embedding PEFT saves along (save_embedding_layers="auto") stays float32,
    # an exact copy of the base's (with cast="model" it would be the bf16-rounded embedding, which PEFT
    # then loads over the base's, and which lorazip.serve does not apply: it serves LoRA deltas only)
    heads = make_adapters(base, configs, root / "llama-emb", seed=9, dtype=torch.bfloat16, cast="lora")
    return ZooCollection("llama-emb", base, root / "base-llama-emb", root / "llama-emb", sorted(configs),
                         _lm_inputs(96, 19), adapter_dtype=torch.bfloat16, heads=heads)


BUILDERS: dict[str, Callable[[Path], ZooCollection]] = {
    "llama": build_llama,
    "gemma2": build_gemma2,
    "qwen2": build_qwen2,
    "gpt2": build_gpt2,
    "bert-cls": build_bert_cls,
    "distilbert": build_distilbert,
    "bert-tok": build_bert_tok,
    "t5": build_t5,
    "llama-emb": build_llama_emb,
}


# -- DistilBERT classifiers with different label counts --------------------------------------------
@dataclass
class ClassifierCollection:
    src: Path
    base_dir: Path
    names: list[str]
    bases: dict[str, torch.nn.Module]  # adapter -> its base model (num_labels of that adapter)
    labels: dict[str, int]
    inputs: dict[str, torch.Tensor]
    lora_on_head: bool
    reference: Callable[[str], torch.Tensor]  # adapter -> logits of the original adapter (float64)


def _distilbert_base(num_labels: int) -> torch.nn.Module:
    """Same backbone (seed 0) whatever ``num_labels``: the head is initialised last."""
    from transformers import DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(_distilbert_config(num_labels)).eval()


def make_classifier_collection(tmp: Path, labels=(2, 3, 6), lora_on_head: bool = False) -> ClassifierCollection:
    """DistilBERT SEQ_CLS adapters ``c<k>`` with ``k`` labels each, all of one base folder (a fine-tune of
    ``distilbert`` with a fresh ``k``-way head, as ``from_pretrained(base, num_labels=k)`` does).

    ``lora_on_head=False``: genuine PEFT adapters, LoRA on q_lin / v_lin (+ ffn on some), the heads
    (classifier ``(k, 32)`` and pre_classifier) in ``modules_to_save``: same module set, different
    head shapes. The reference is PEFT's own forward.

    ``lora_on_head=True``: 'classifier' and 'pre_classifier' in ``target_modules`` as well. PEFT >= 0.13
    (and the installed 0.21) refuses to create or load that (``TypeError: modules_to_save cannot be
    applied to modules of type lora.Linear``: SEQ_CLS puts the heads in modules_to_save); PEFT <= 0.10
    (checked with 0.7.1 and 0.10.0) wrote it and Hub adapters of that layout exist. The files are
    written here in exactly that layout (keys verified against peft 0.7.1 / 0.10.0 output)::

        classifier.base_layer.{weight,bias}            the trained head (modules_to_save copy)
        classifier.lora_{A,B}.weight                   LoRA of the modules_to_save copy: USED
        classifier.modules_to_save.lora_{A,B}.weight   the same tensors again: not used on load
        classifier.original_module.lora_{A,B}.weight   LoRA of the frozen original head: not used

    (same for pre_classifier), and the reference is what PEFT 0.10 computes for it: head weight =
    ``base_layer.weight + scale * lora_B @ lora_A``, backbone LoRA merged as usual.
    """
    from safetensors.torch import load_file, save_file

    tmp = Path(tmp)
    base_dir = tmp / "base-distilbert-backbone"
    if not base_dir.exists():
        save_base(_distilbert_base(2), base_dir)
    src = tmp / ("classifiers-lora-head" if lora_on_head else "classifiers")
    bases, names, lab = {}, [], {}
    gen = torch.Generator().manual_seed(21 + int(lora_on_head))
    backbone = ["q_lin", "v_lin"]
    for j, k in enumerate(labels):
        name = f"c{k}"
        names.append(name)
        lab[name] = k
        base = _distilbert_base(k)
        base.config._name_or_path = str(base_dir)
        base.name_or_path = str(base_dir)
        bases[name] = base
        targets = backbone + (["lin1"] if j % 2 else [])
        r = 4 if j % 2 == 0 else 2
        if not lora_on_head:
            cfg = _lora(task_type="SEQ_CLS", target_modules=targets, r=r, lora_alpha=8)
            make_adapters(base, {name: cfg}, src, seed=100 + j)
            continue
        # LoRA on the heads: LoRA layers from PEFT (task_type None: no modules_to_save), then the
        # state dict rearranged into the layout PEFT <= 0.10 saved for SEQ_CLS heads in target_modules.
        import peft

        cfg = _lora(target_modules=targets + ["pre_classifier", "classifier"], r=r, lora_alpha=8)
        with _quiet():
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            randomize(pm, gen)
            pm.save_pretrained(str(src / name))
        path = src / name / "adapter_model.safetensors"
        sd = load_file(str(path))
        P = "base_model.model."
        for head, d_out in (("pre_classifier", 32), ("classifier", k)):
            sd[f"{P}{head}.base_layer.weight"] = torch.randn(d_out, 32, generator=gen) * 0.1
            sd[f"{P}{head}.base_layer.bias"] = torch.randn(d_out, generator=gen) * 0.1
            for part in ("A", "B"):
                t = sd[f"{P}{head}.lora_{part}.weight"]
                sd[f"{P}{head}.modules_to_save.lora_{part}.weight"] = t.clone()
                sd[f"{P}{head}.original_module.lora_{part}.weight"] = torch.randn(t.shape, generator=gen) * 0.05
        save_file(sd, str(path), metadata={"format": "pt"})
        conf_path = src / name / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf.update(task_type="SEQ_CLS", modules_to_save=None)  # as PEFT 0.7-0.10 wrote it
        conf_path.write_text(json.dumps(conf, indent=2))

    ids = _ids(128, 31)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def reference(name: str) -> torch.Tensor:
        folder = src / name
        if not lora_on_head:
            return peft_logits(bases[name], folder, inputs)
        return legacy_head_logits(bases[name], folder, inputs)

    return ClassifierCollection(src, base_dir, names, bases, lab, inputs, lora_on_head, reference)


@torch.no_grad()
def legacy_head_logits(base: torch.nn.Module, folder: Path, inputs) -> torch.Tensor:
    """What PEFT <= 0.10 computes for a SEQ_CLS adapter with its heads also in target_modules: every
    plain ``<m>.lora_A/B`` merged into ``m`` (scale from the config), the heads replaced by their
    ``base_layer`` tensors first; ``modules_to_save.lora_*`` / ``original_module.lora_*`` ignored."""
    from safetensors.torch import load_file

    from lorazip.io.peft import module_scale

    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    sd = {k.removeprefix("base_model.model."): v.double() for k, v in
          load_file(str(Path(folder) / "adapter_model.safetensors")).items()}
    model = copy.deepcopy(base).double()
    params = dict(model.named_parameters())
    for key, t in sd.items():
        if ".base_layer." in key:
            params[key.replace(".base_layer", "")].copy_(t)
    for key, A in sd.items():
        if not key.endswith(".lora_A.weight") or ".modules_to_save." in key or ".original_module." in key:
            continue
        mod = key[: -len(".lora_A.weight")]
        B = sd[f"{mod}.lora_B.weight"]
        _, _, scale = module_scale(cfg, mod)
        params[f"{mod}.weight"] += scale * (B @ A)
    return model(**inputs).logits


# -- forward passes --------------------------------------------------------------------------------
def load_peft(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    import peft

    with _quiet():
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state before the head) in float64."""
    out = model(**inputs, output_hidden_states=True)
    hs = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) is not None else out.hidden_states
    return out.logits.double(), hs[-1].double()


def peft_logits(base: torch.nn.Module, folder: Path, inputs) -> torch.Tensor:
    return outputs(load_peft(base, folder), inputs)[0]


# -- PEFT adapters lorazip does not compress --------------------------------------------------------
UNSUPPORTED = {  # kind -> what the one error line must name (case-insensitive)
    "dora": "dora",
    "dora-no-flag": "dora",  # use_dora removed from the config: only the magnitude tensors tell
    "ia3": "ia3",
    "loha": "loha",
    "lokr": "lokr",
    "adalora": "adalora",
    "lora-bias": "lora_bias",
}


def make_unsupported(base: torch.nn.Module, kind: str, out: Path, seed: int = 0) -> Path:
    """A genuine PEFT adapter of an unsupported kind saved at ``out/<kind>``; returns the folder."""
    import peft

    targets = ["q_proj", "v_proj"]
    lm = dict(task_type="CAUSAL_LM")
    if kind in ("dora", "dora-no-flag"):
        cfg = _lora(target_modules=targets, r=4, lora_alpha=8, use_dora=True, **lm)
    elif kind == "ia3":
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], **lm)
    elif kind == "loha":
        cfg = peft.LoHaConfig(target_modules=targets, r=4, alpha=8, **lm)
    elif kind == "lokr":
        cfg = peft.LoKrConfig(target_modules=targets, r=4, alpha=8, **lm)
    elif kind == "adalora":
        cfg = peft.AdaLoraConfig(target_modules=targets, init_r=6, target_r=4, total_step=10, **lm)
    elif kind == "lora-bias":
        cfg = _lora(target_modules=targets, r=4, lora_alpha=8, lora_bias=True, **lm)
    else:
        raise ValueError(kind)
    folder = Path(out) / kind
    with _quiet():
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        pm.save_pretrained(str(folder))
    if kind == "dora-no-flag":
        conf = json.loads((folder / "adapter_config.json").read_text())
        conf.pop("use_dora")
        (folder / "adapter_config.json").write_text(json.dumps(conf))
    return folder


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64)).eval()


# -- LoRA options that change what an adapter means -------------------------------------------------
# kind -> (LoraConfig options on top of LoRA on q_proj / v_proj, r=4; the word a refusal must name).
# lorazip must either reproduce PEFT's forward after export or refuse the adapter with one error line.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "bias-all": ({"bias": "all"}, "bias"),  # base biases saved along (extras)
    "bias-lora-only": ({"bias": "lora_only"}, "bias"),
    "exclude-modules": ({"exclude_modules": ["model.layers.0.self_attn.v_proj"]}, "exclude"),
    "regex-targets": ({"target_modules": r".*\.(q_proj|v_proj)"}, "target"),
    # trained rows of the embedding, saved as ...embed_tokens.token_adapter.trainable_tokens_delta
    "trainable-tokens": ({"trainable_token_indices": {"embed_tokens": [1, 5, 9]}}, "trainable_token"),
    # activated LoRA: the delta applies only from the invocation tokens on
    "alora": ({"alora_invocation_tokens": [5]}, "alora"),
    # PiSSA / OLoRA initialisation saved as is: PEFT re-derives the residual base weights on load
    "pissa": ({"init_lora_weights": "pissa"}, "pissa"),
    "olora": ({"init_lora_weights": "olora"}, "olora"),
}
VARIANT_INVOCATION = 5  # the token id put in every input row (for aLoRA)


def tiny_qwen2(folder: Path) -> torch.nn.Module:
    """A tiny Qwen2 (q/k/v have biases), saved to ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_base(Qwen2ForCausalLM(cfg), folder)


def variant_inputs() -> dict[str, torch.Tensor]:
    inp = _lm_inputs(128, 41)
    inp["input_ids"][:, 3] = VARIANT_INVOCATION
    return inp


def make_variant(base: torch.nn.Module, kind: str, out: Path, seed: int = 0) -> Path:
    """A PEFT LoRA adapter with the option ``VARIANTS[kind]`` saved at ``out/<kind>``, every trainable
    tensor moved off its initial value (random, seeded)."""
    import peft

    options = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8, **VARIANTS[kind][0]}
    folder = Path(out) / kind
    with _quiet():
        pm = peft.get_peft_model(copy.deepcopy(base), _lora(task_type="CAUSAL_LM", **options))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        pm.save_pretrained(str(folder))
    return folder
