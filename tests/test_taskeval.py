"""Task-level evaluation (lorazip.taskeval, ``lorazip eval --base-model --data``).

A tiny randomly initialised Llama-style model (hidden 32, 2 layers) and a byte-level BPE
tokenizer are built and saved locally; two LoRA adapters (different ranks, rsLoRA, target
sets) are trained a few steps on their own texts so that they really lower the held-out loss.
Nothing is downloaded. One slow test uses the real SmolLM2-135M base and fortunes adapters
when they exist on this machine.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lorazip
from lorazip.cli.main import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorazip import taskeval  # noqa: E402
from helpers import tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TEXTS = {
    "t0": [f"the cat number {i} sat on the mat and purred {i % 3} times" for i in range(12)],
    "t1": [f"zzq {i} xylo vork {'ab' * (i % 4)} quux plim plom {i * 7}" for i in range(12)],
}
HELD_OUT = {k: v[8:] for k, v in TEXTS.items()}  # 4 texts each; trained on the first 8


@dataclass
class World:
    root: Path
    base_dir: Path
    src: Path
    data: Path
    full: Path  # artifact at full rank (exact)
    lossy: Path  # artifact at rank 1


def _tokenizer(out: Path):
    return tiny_tokenizer([t for v in TEXTS.values() for t in v], out)


def _train(base, tok, cfg, texts, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(map(len, enc))
    ids = torch.full((len(enc), L), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    labels = ids.masked_fill(mask == 0, -100)
    pm.train()
    for _ in range(25):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(str(out))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("taskeval")
    base_dir = root / "base"
    tok = _tokenizer(base_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(str(base_dir))
    src = root / "adapters"
    common = dict(task_type="CAUSAL_LM", lora_dropout=0.0)
    _train(base, tok, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **common),
           TEXTS["t0"][:8], src / "t0", seed=1)
    _train(base, tok, LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **common),
           TEXTS["t1"][:8], src / "t1", seed=2)
    data = root / "data"
    data.mkdir()
    for name, texts in HELD_OUT.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    coll = lorazip.load_collection(src)
    full, lossy = root / "full.lorazip.safetensors", root / "lossy.lorazip.safetensors"
    lorazip.compress(coll, 12, device="cpu").save(full)  # 12 = 4 + 8 = sum of ranks: exact
    lorazip.compress(coll, 1, device="cpu").save(lossy)
    return World(root, base_dir, src, data, full, lossy)


@pytest.fixture(scope="module")
def evaluator(world) -> taskeval.TaskEvaluator:
    return taskeval.TaskEvaluator(world.base_dir, world.data, batch_size=3)


def _direct_loss(model, tok, texts, max_length=128) -> float:
    """Reference: each text alone, unbatched, token-weighted mean NLL."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:max_length]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def _peft_model(base_dir: Path, folder: Path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    if folder is None:
        return base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


# ------------------------------------------------------------------- correctness
def test_losses_match_direct_peft(world, evaluator, tmp_path):
    rep = evaluator.evaluate(lorazip.load_artifact(world.lossy))
    assert rep["report_version"] == 1 and rep["kind"] == "task"
    assert [a["name"] for a in rep["adapters"]] == ["t0", "t1"] and rep["skipped"] == []
    assert rep["originals"] == "recorded"  # source paths recorded in the artifact still exist
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world.base_dir))
    exported = lorazip.export(lorazip.load_artifact(world.lossy), tmp_path / "exp")
    for a, exp in zip(rep["adapters"], exported):
        texts = HELD_OUT[a["name"]]
        assert a["n_texts"] == len(texts)
        want_base = _direct_loss(_peft_model(world.base_dir, None), tok, texts)
        want_orig = _direct_loss(_peft_model(world.base_dir, world.src / a["name"]), tok, texts)
        want_comp = _direct_loss(_peft_model(world.base_dir, exp), tok, texts)
        assert a["loss_base"] == pytest.approx(want_base, abs=1e-5)
        assert a["loss_original"] == pytest.approx(want_orig, abs=1e-5)
        assert a["loss_compressed"] == pytest.approx(want_comp, abs=1e-5)
        assert a["ppl_base"] == pytest.approx(math.exp(a["loss_base"]))
        # training really helped, so retention is well defined
        assert a["loss_original"] < a["loss_base"] - 0.05
        assert a["retention"] == pytest.approx(
            (a["loss_base"] - a["loss_compressed"]) / (a["loss_base"] - a["loss_original"]))
        assert a["error"] == pytest.approx(
            next(x["error"] for x in lorazip.evaluate(lorazip.load_artifact(world.lossy))["adapters"]
                 if x["name"] == a["name"]))


def test_full_rank_retention_is_one(world, evaluator):
    rep = evaluator.evaluate(lorazip.load_artifact(world.full))
    for a in rep["adapters"]:
        assert a["error"] < 1e-10
        assert a["retention"] == pytest.approx(1.0, abs=1e-4)
        assert a["loss_compressed"] == pytest.approx(a["loss_original"], abs=1e-5)
    assert rep["summary"]["n_retention_ge_0.99"] == 2


def test_lossy_rank_loses_some_retention(world, evaluator):
    full = evaluator.evaluate(lorazip.load_artifact(world.full))
    lossy = evaluator.evaluate(lorazip.load_artifact(world.lossy))
    # base / original losses are cached, identical across artifacts of one collection
    for f, l in zip(full["adapters"], lossy["adapters"]):
        assert (f["loss_base"], f["loss_original"]) == (l["loss_base"], l["loss_original"])
    assert max(a["error"] for a in lossy["adapters"]) > 0.05
    assert min(a["retention"] for a in lossy["adapters"]) < 0.999
    s = lossy["summary"]
    assert s["retention"]["min"] == min(a["retention"] for a in lossy["adapters"])
    assert s["n_with_retention"] == 2


def test_evaluate_tasks_function_and_given_originals(world):
    rep = taskeval.evaluate_tasks(world.full, world.base_dir, world.data, originals=world.src, max_texts=2,
                                  names=["t1"])
    assert rep["originals"] == "given" and rep["protocol"]["max_texts"] == 2
    (a,) = rep["adapters"]
    assert a["name"] == "t1" and a["n_texts"] == 2
    assert a["retention"] == pytest.approx(1.0, abs=1e-4)


def test_without_originals_retention_is_none(world, tmp_path):
    import shutil

    src = tmp_path / "adapters"
    shutil.copytree(world.src, src)
    art = lorazip.compress(lorazip.load_collection(src), 2, device="cpu")
    art.save(tmp_path / "a.lorazip.safetensors")
    shutil.rmtree(src)  # recorded source paths no longer exist
    rep = taskeval.evaluate_tasks(tmp_path / "a.lorazip.safetensors", world.base_dir, world.data, max_texts=1)
    assert rep["originals"] == "none"
    assert all(a["loss_original"] is None and a["retention"] is None for a in rep["adapters"])
    assert rep["summary"]["retention"] is None


def test_retention_helper():
    assert taskeval.retention(4.0, 3.0, 3.5) == 0.5
    assert taskeval.retention(4.0, None, 3.5) is None
    assert taskeval.retention(4.0, 4.1, 3.5) is None  # the original does not help: undefined


# ------------------------------------------------------------------------ errors
def test_missing_data_folder_and_files(world, evaluator, tmp_path):
    with pytest.raises(lorazip.SourceError, match="no such data folder"):
        taskeval.TaskEvaluator(world.base_dir, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    ev = taskeval.TaskEvaluator(evaluator.model, empty, tokenizer=evaluator.tokenizer)
    with pytest.raises(lorazip.SourceError, match=r"no data file for any adapter.*t0\.jsonl"):
        ev.evaluate(lorazip.load_artifact(world.full))
    (empty / "t0.jsonl").write_text(json.dumps({"text": "the cat sat"}) + "\n")
    rep = ev.evaluate(lorazip.load_artifact(world.full))
    assert [a["name"] for a in rep["adapters"]] == ["t0"]
    assert rep["skipped"] == [{"name": "t1", "reason": f"no data file {empty / 't1.jsonl'}"}]
    with pytest.raises(lorazip.SourceError, match="t1.jsonl"):
        ev.evaluate(lorazip.load_artifact(world.full), names=["t1"])


def test_bad_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    with pytest.raises(lorazip.SourceError, match=r"x\.jsonl:3: expected a JSON object"):
        taskeval.read_texts(p)
    assert taskeval.read_texts(p, max_texts=1) == ["ok"]
    p.write_text('{"text": "ok"\n')
    with pytest.raises(lorazip.SourceError, match=r"x\.jsonl:1: not valid JSON"):
        taskeval.read_texts(p)
    p.write_text("\n")
    with pytest.raises(lorazip.SourceError, match="no texts"):
        taskeval.read_texts(p)


def test_missing_base_model_and_options(world, tmp_path, monkeypatch):
    with pytest.raises(lorazip.SourceError, match="no such base model folder"):
        taskeval.TaskEvaluator(tmp_path / "nobase", world.data)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/nope` beside a folder `models`: a missing folder, not a Hub id
    with pytest.raises(lorazip.SourceError, match=r"models/nope: no such base model folder \(not taken as a Hub id"):
        taskeval.TaskEvaluator("models/nope", world.data)
    with pytest.raises(lorazip.OptionError, match="max_texts"):
        taskeval.TaskEvaluator(world.base_dir, world.data, max_texts=0)


def test_original_that_differs_is_refused(world, tmp_path):
    import shutil

    other = tmp_path / "orig"
    shutil.copytree(world.src / "t1", other / "t0")  # t1's files under t0's name
    with pytest.raises(lorazip.ValidationError, match="sha256 differs"):
        taskeval.evaluate_tasks(world.full, world.base_dir, world.data, originals=other, max_texts=1)


def test_missing_transformers_gives_clear_error(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(taskeval.MissingDependencyError, match=r"transformers.*lorazip\[eval\]"):
        taskeval.evaluate_tasks(world.full, world.base_dir, world.data)
    assert issubclass(taskeval.MissingDependencyError, lorazip.LorazipError)


# --------------------------------------------------------------------------- CLI
def _run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_task_eval_json(world, capsys):
    rc, out, err = _run(capsys, "eval", world.lossy, "--base-model", world.base_dir, "--data", world.data,
                        "--max-texts", "2", "--batch-size", "2", "--device", "cpu", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kind"] == "task" and rep["n_adapters"] == 2 and rep["protocol"]["max_texts"] == 2
    assert "retention" in err and "t0" in err and "t1" in err


def test_cli_task_eval_needs_both_options(world, capsys):
    rc, out, err = _run(capsys, "eval", world.lossy, "--data", world.data)
    assert rc == 1 and out == ""
    assert err.strip().startswith("error:") and "--base-model" in err
    rc, out, err = _run(capsys, "eval", world.lossy, "--base-model", world.base_dir, "--data", world.root / "nope")
    assert rc == 1 and "no such data folder" in err and "Traceback" not in err


# ---------------------------------------------------------------- the real base
REAL_BASE = Path("/work/cache/smollm2-135m-instruct")
FORTUNES = REPO / "examples" / "fortunes"


@pytest.mark.slow
def test_real_smollm2_adapter_lowers_held_out_loss(tmp_path):
    """The dequantized GGUF base of examples/fortunes (built by build_collection.py) + one real adapter."""
    adapters = sorted(p for p in (FORTUNES / "adapters").glob("*") if (p / "adapter_model.safetensors").is_file()) \
        if (FORTUNES / "adapters").is_dir() else []
    adapters = [p for p in adapters if (FORTUNES / "data" / f"{p.name}.jsonl").is_file()]
    if not REAL_BASE.is_dir() or not adapters:
        pytest.skip(f"needs {REAL_BASE} and a built adapter in {FORTUNES / 'adapters'}")
    torch.set_num_threads(1)
    one = adapters[0]
    art = lorazip.compress(lorazip.load_collection(one), 32, device="cpu")  # >= its rank: exact
    rep = taskeval.evaluate_tasks(art, REAL_BASE, FORTUNES / "data", originals=one, max_texts=4)
    (a,) = rep["adapters"]
    assert a["n_texts"] == 4
    assert a["loss_original"] < a["loss_base"]
    assert a["retention"] == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------- examples/fortunes/retention_ratio.py
def _retention_ratio():
    sys.path.insert(0, str(REPO / "examples" / "fortunes"))
    try:
        import retention_ratio
    finally:
        sys.path.pop(0)
    return retention_ratio


def test_retention_ratio_reweighted_copies_round_trip(world, tmp_path):
    """The copies weighing every module alike: each module of the copy has unit energy, and a lossless
    compression of the copy scaled back reproduces every original delta (error 0 against the originals)."""
    rr = _retention_ratio()
    back = {n: rr.scaled_copy(world.src / n, tmp_path / n, 1.0) for n in ("t0", "t1")}
    for n in back:
        assert all(v == pytest.approx(1.0, rel=1e-5) for v in rr.module_norms(tmp_path / n).values())
        assert len(back[n]) == {"t0": 4, "t1": 8}[n]  # 2 layers x its target modules
    art = lorazip.compress(lorazip.load_collection([str(tmp_path / n) for n in back]), 12, device="cpu")
    from lorazip.export import to_peft

    for n in back:
        state, _ = to_peft(art, n, dtype="float32")
        assert rr.weight_errors(rr.unscaled(state, back[n]), world.src / n) < 1e-9
        assert rr.weight_errors(state, world.src / n) > 1e-3  # not scaled back: not the original


def test_retention_ratio_threshold_interpolation():
    rr = _retention_ratio()
    pts = [(10.0, 0.995), (20.0, 0.985), (40.0, 0.95)]
    assert rr.ratio_at(pts, 0.99) == pytest.approx(math.exp(math.log(10) + 0.5 * math.log(2)))
    assert rr.ratio_at(pts, 0.95) == 40.0  # the last point is on the level
    assert rr.ratio_at(pts, 0.999) is None  # below the smallest ratio already
    assert rr.ratio_at([(10.0, 0.999)], 0.99) == 10.0


def test_retention_ratio_run(world, tmp_path):
    """End to end on the tiny world: every configuration's artifacts evaluated, the weight errors of the
    reweighted configuration measured against the originals, the tables and the plot written."""
    rr = _retention_ratio()
    args = rr.parse_args(["--adapters", str(world.src), "--data", str(world.data), "--base-model",
                          str(world.base_dir), "--ratios", "3", "--targets", "0.2", "--configs",
                          "e:auto:energy,m:auto:module,q:auto:q2", "--work", str(tmp_path / "w"),
                          "--batch-size", "3"])
    res = rr.run(args)
    rows = {(r["config"], r["budget"] is None, r["target"]): r for r in res["rows"]}
    assert set(rows) == {("e", True, None), ("e", True, 0.2), ("e", False, None), ("m", False, None),
                         ("q", False, None)}
    assert rows["e", True, 0.2]["weight_error"]["mean"] <= 0.2 + 1e-9
    for r in res["rows"]:
        assert len(r["adapters"]) == 2 and 0 < r["weight_error"]["mean"] < 1
        assert all(math.isfinite(a["loss_compressed"]) for a in r["adapters"])
        if r["budget"] is not None:
            assert r["bytes"] <= r["budget"]
    e, m = rows["e", False, None], rows["m", False, None]
    assert [a["loss_original"] for a in e["adapters"]] == [a["loss_original"] for a in m["adapters"]]
    res["thresholds"], res["paired"] = rr.thresholds(res), rr.paired(res)
    assert {p["config"] for p in res["paired"]} == {"m", "q"} and all(p["n"] <= 2 for p in res["paired"])
    rr.plot(res, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0 and "| m | e |" in rr.markdown(res)


def test_base_model_limits_and_kind(world, tmp_path):
    """Texts are cut to the positions the base model takes (its max_position_embeddings, below
    --max-length); a base saved as a classifier is refused (its head predicts no next token)."""
    import shutil

    short = tmp_path / "short"
    shutil.copytree(world.base_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8}))
    assert taskeval.TaskEvaluator(short, world.data, max_length=128).max_length == 8
    assert taskeval.TaskEvaluator(world.base_dir, world.data, max_length=32).max_length == 32
    (short / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(lorazip.SourceError, match="a LlamaForSequenceClassification, not a causal language model"):
        taskeval.TaskEvaluator(short, world.data)
