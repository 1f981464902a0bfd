"""The PEFT zoo: genuine PEFT adapters of nine tiny architectures (tests/zoo.py) through lorazip.

For every collection:

a. ``lorazip compress`` (the CLI, in-process) at a rank, at a budget (half the originals' LoRA bytes
   plus their non-LoRA tensors) and at an error target (``--target-error 0.05``): errors finite, budget and
   target met (the target also recomputed against the sources);
b. an artifact at full rank (the largest sum of adapter ranks of any module; float32 storage) is
   lossless, and every ``lorazip.export``-ed folder, loaded by ``PeftModel.from_pretrained`` on a
   fresh copy of the base, gives the logits of the original adapter to 1e-5 (relative to the
   logits' scale, computed in float32 and compared in float64). For the bf16 / fp16 collections
   the originals are the saved bf16 / fp16 values, which float32 storage reproduces exactly, so the
   tolerance is the same; the default ``--dtype auto`` (bases and cores in the adapters' own
   bf16 / fp16) is checked too, to 3e-2 of the logits' scale (bf16 rounding of the stored factors);
c. ``lorazip.apply`` + ``lorazip.serve.use_adapters`` serves a batch with a different adapter per
   row (and a base-model row) and each row equals PEFT with that row's exported adapter alone
   (1e-4 of the scale). lorazip serves the LoRA deltas only, not ``modules_to_save`` heads
   (documented in ``lorazip.apply``), so rows of adapters with heads compare the last hidden state
   before the head; every other row compares the logits;

plus: a DistilBERT collection with 2, 3 and 6 labels (heads of different shapes), with and without
LoRA on the heads (see ``zoo.make_classifier_collection``: the lora-on-heads layout is the one
PEFT <= 0.10 wrote, which the installed PEFT can neither write nor load, so its reference forward is
computed by hand and checked against what PEFT 0.10 computes); PEFT adapter kinds lorazip does not
compress (DoRA, IA3, LoHa, LoKr, AdaLoRA, LoRA with lora_bias) refused with one ``error:`` line that
names the feature; and LoRA options that change what an adapter computes (bias, exclude_modules,
regex targets, trainable tokens, aLoRA, PiSSA / OLoRA init): exported at full rank they must give
PEFT's forward of the original, or the CLI must refuse them with one line naming the option.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorazip  # noqa: E402
import zoo as Z  # noqa: E402
from helpers import assert_one_error_line, run_cli  # noqa: E402
from lorazip.serve import use_adapters  # noqa: E402

RANK = 4
TARGET = 0.05
EXACT = 1e-5  # export at full rank vs the original adapter, relative to the logits' scale
SERVE = 1e-4  # served row vs PEFT with the exported adapter
HALF = 2e-2  # export at full rank in bf16 / fp16 storage vs the original (measured: bf16 6e-3, fp16 4e-4)


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module", params=list(Z.BUILDERS))
def coll(request, zoo_root) -> Z.ZooCollection:
    return Z.BUILDERS[request.param](zoo_root)


def _scale(t: torch.Tensor) -> float:
    return max(1.0, float(t.abs().max()))


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    diff = float((got - want).abs().max())
    assert diff <= rel * _scale(want), f"{what}: max abs diff {diff:.3g} > {rel:g} x scale {_scale(want):.3g}"


def _union_rank(lcoll: lorazip.Collection) -> int:
    return max(sum(a.modules[m.name].rank for a in lcoll.adapters if m.name in a.modules) for m in lcoll.modules)


def _original_bytes(coll: Z.ZooCollection) -> int:
    return sum((coll.src / n / "adapter_model.safetensors").stat().st_size for n in coll.names)


def _budget(coll: Z.ZooCollection) -> int:
    """Half the originals' LoRA bytes, plus their non-LoRA tensors (kept as they are: PEFT saves a full
    copy of a targeted embedding with every adapter, which no budget of half the files could hold)."""
    from lorazip.io.peft import read_safetensors_header

    extras = 0
    for n in coll.names:
        for key, info in read_safetensors_header(coll.src / n / "adapter_model.safetensors").items():
            if ".lora_" not in key:
                extras += (info["data_offsets"][1] - info["data_offsets"][0])
    return extras + (_original_bytes(coll) - extras) // 2


def _artifact(coll: Z.ZooCollection, mode: str) -> lorazip.Artifact:
    """Compressed (library), saved and re-opened lazily; cached on the collection.
    full: lossless (full rank, float32 storage); full-auto: full rank, default storage (the adapters'
    dtype); rank: RANK; budget: :func:`_budget`."""
    if mode not in coll.cache:
        lcoll = lorazip.load_collection(coll.src)
        kw = dict(device="cpu", seed=0, hash_sources=False)
        if mode == "full":
            art = lorazip.compress(lcoll, _union_rank(lcoll), storage_dtype="float32", **kw)
        elif mode == "full-auto":
            art = lorazip.compress(lcoll, _union_rank(lcoll), **kw)
        elif mode == "rank":
            art = lorazip.compress(lcoll, RANK, **kw)
        elif mode == "budget":
            art = lorazip.compress(lcoll, budget=_budget(coll), **kw)
        else:
            raise ValueError(mode)
        folder = coll.src.parent / f"{coll.kind}-{mode}"
        folder.mkdir(exist_ok=True)
        coll.cache[mode] = lorazip.load_artifact(art.save(folder / "a.lorazip.safetensors", overwrite=True))
    return coll.cache[mode]


def _exported(coll: Z.ZooCollection, mode: str):
    """Folder with every adapter of the ``mode`` artifact exported as PEFT (float32)."""
    key = f"exported-{mode}"
    if key not in coll.cache:
        out = coll.src.parent / f"{coll.kind}-{mode}" / "exported"
        written = lorazip.export(_artifact(coll, mode), out, overwrite=True)
        assert sorted(p.name for p in written) == coll.names
        coll.cache[key] = out
    return coll.cache[key]


def _peft_outputs(coll: Z.ZooCollection, folder) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("peft", str(folder))
    if key not in coll.cache:
        coll.cache[key] = Z.outputs(Z.load_peft(coll.base, folder), coll.inputs)
    return coll.cache[key]


def _base_outputs(coll: Z.ZooCollection):
    if "base-out" not in coll.cache:
        coll.cache["base-out"] = Z.outputs(coll.base, coll.inputs)
    return coll.cache["base-out"]


# -- a. compress at a rank, a budget, a target -----------------------------------------------------
@pytest.mark.parametrize("mode", ["rank", "budget", "target"])
def test_compress_cli(coll, mode, tmp_path, capsys):
    out = tmp_path / f"{mode}.lorazip.safetensors"
    opt = {"rank": ["--rank", RANK], "budget": ["--budget", _budget(coll)], "target": ["--target-error", TARGET]}[mode]
    rc, stdout, stderr = run_cli(capsys, "compress", coll.src, "-o", out, *opt, "--json", "--device", "cpu")
    assert rc == 0, stderr
    rep = json.loads(stdout)
    assert [a["name"] for a in rep["adapters"]] == coll.names
    for k in ("mean", "median", "max", "min"):
        v = rep["errors"][k]
        assert isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1, (k, v)
    assert all(math.isfinite(a["error"]) and 0 <= a["error"] <= 1 for a in rep["adapters"])
    assert rep["storage"]["artifact_bytes"] == out.stat().st_size
    recomputed = lorazip.evaluate(lorazip.load_artifact(out), coll.src)["errors"]
    assert all(math.isfinite(recomputed[k]) for k in ("mean", "max"))
    assert abs(recomputed["mean"] - rep["errors"]["mean"]) <= 1e-6 + 1e-4 * rep["errors"]["mean"]
    if mode == "budget":
        assert out.stat().st_size <= _budget(coll)
    if mode == "target":
        assert rep["errors"]["mean"] <= TARGET + 1e-9
        assert recomputed["mean"] <= TARGET + 1e-6
    if mode == "rank":
        assert all(m["rank"] <= RANK for m in lorazip.load_artifact(out).modules)


# -- b. lossless export loads in PEFT and equals the originals -------------------------------------
def test_export_full_rank_matches_original_peft(coll):
    art = _artifact(coll, "full")
    assert lorazip.evaluate(art)["errors"]["max"] < 1e-10
    out = _exported(coll, "full")
    base_logits = _base_outputs(coll)[0]
    for name in coll.names:
        orig_cfg = json.loads((coll.src / name / "adapter_config.json").read_text())
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["task_type"] == orig_cfg["task_type"]
        assert cfg["base_model_name_or_path"] == str(coll.base_dir)
        assert cfg["fan_in_fan_out"] is bool(orig_cfg.get("fan_in_fan_out"))
        orig = _peft_outputs(coll, coll.src / name)[0]
        got = _peft_outputs(coll, out / name)[0]
        assert float((orig - base_logits).abs().max()) > 1e-3, f"{name}: the adapter does not change the model"
        _close(got, orig, EXACT, f"{coll.kind}/{name}: exported (full rank) vs original")


def test_export_full_rank_own_precision(coll):
    """Default storage (--dtype auto: the adapters' own precision). float32 collections stay exact;
    bf16 / fp16 ones store the bases and cores in bf16 / fp16, within HALF of the logits' scale."""
    art = _artifact(coll, "full-auto")
    out = _exported(coll, "full-auto")
    rel = EXACT if coll.adapter_dtype == torch.float32 else HALF
    if coll.adapter_dtype == torch.float32:
        assert lorazip.evaluate(art)["errors"]["max"] < 1e-10
    for name in coll.names:
        _close(_peft_outputs(coll, out / name)[0], _peft_outputs(coll, coll.src / name)[0], rel,
               f"{coll.kind}/{name}: exported ({art.meta.get('storage_dtype')} storage) vs original")


# -- c. a mixed batch served by lorazip equals PEFT row by row -------------------------------------
@pytest.mark.parametrize("mode", ["rank", "budget"])
def test_serve_mixed_batch_matches_peft(coll, mode):
    art = _artifact(coll, mode)
    out = _exported(coll, mode)
    n = len(coll.inputs["input_ids"])
    rows = (coll.names + [None] + coll.names)[:n]
    assert None in rows and set(coll.names) <= set(rows)
    model = lorazip.apply(copy.deepcopy(coll.base), art.path)
    with use_adapters(model, rows):
        logits, hidden = Z.outputs(model, coll.inputs)
    refs = {None: _base_outputs(coll)}
    for name in coll.names:
        refs[name] = _peft_outputs(coll, out / name)
    for j, name in enumerate(rows):
        k = 1 if name is not None and coll.heads[name] else 0  # heads are not served: compare before them
        what = f"{coll.kind}/{mode} row {j} ({name}): {'hidden state' if k else 'logits'}"
        _close((logits, hidden)[k][j], refs[name][k][j], SERVE, what)
        if name is not None:
            assert float((refs[name][k][j] - refs[None][k][j]).abs().max()) > 1e-3, f"{what}: adapter has no effect"


# -- DistilBERT classifiers with 2, 3 and 6 labels -------------------------------------------------
@pytest.mark.parametrize("lora_on_head", [False, True], ids=["heads-saved", "lora-on-heads"])
def test_classifier_collection_mixed_labels(tmp_path, lora_on_head):
    cc = Z.make_classifier_collection(tmp_path, labels=(2, 3, 6), lora_on_head=lora_on_head)
    lcoll = lorazip.load_collection(cc.src)
    assert lcoll.names == cc.names
    art = lorazip.compress(lcoll, _union_rank(lcoll), device="cpu", storage_dtype="float32", hash_sources=False)
    art = lorazip.load_artifact(art.save(tmp_path / "c.lorazip.safetensors"))
    assert lorazip.evaluate(art)["errors"]["max"] < 1e-10
    lorazip.export(art, tmp_path / "out")
    for name in cc.names:
        want = cc.reference(name)
        assert want.shape[-1] == cc.labels[name]
        got = Z.peft_logits(cc.bases[name], tmp_path / "out" / name, cc.inputs)
        _close(got, want, EXACT, f"{name} ({cc.labels[name]} labels): exported vs original")
    lossy = lorazip.compress(lcoll, 2, device="cpu", hash_sources=False)
    errs = lorazip.evaluate(lossy)["errors"]
    assert all(math.isfinite(errs[k]) for k in ("mean", "max"))


def test_legacy_head_layout_reference_is_what_peft_0_10_computes(tmp_path):
    """The reference of the lora-on-heads layout ignores ``modules_to_save.lora_*`` and
    ``original_module.lora_*`` (PEFT 0.7.1 / 0.10.0 do, checked by perturbing them) and uses the
    plain ``lora_*`` of the heads and their ``base_layer`` tensors: perturbing those changes it."""
    from safetensors.torch import load_file, save_file

    cc = Z.make_classifier_collection(tmp_path, labels=(3,), lora_on_head=True)
    folder = cc.src / "c3"
    ref = cc.reference("c3")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    for part, used in (("modules_to_save.lora_A", False), ("original_module.lora_A", False),
                       ("classifier.lora_A", True), ("classifier.base_layer.weight", True)):
        pert = {k: (v + 1.0 if part in k else v) for k, v in sd.items()}
        save_file(pert, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        changed = float((Z.legacy_head_logits(cc.bases["c3"], folder, cc.inputs) - ref).abs().max())
        assert (changed > 1e-3) is used, (part, changed)
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# -- PEFT adapter kinds lorazip does not compress --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    return Z.tiny_llama()


@pytest.mark.parametrize("kind", list(Z.UNSUPPORTED))
def test_unsupported_peft_kinds_one_error_line(tiny_llama, kind, tmp_path, capsys):
    folder = Z.make_unsupported(tiny_llama, kind, tmp_path / "src")
    feature = Z.UNSUPPORTED[kind]
    rc, _out, err = run_cli(capsys, "compress", folder, "-o", tmp_path / "x.lorazip.safetensors", "--rank", "2",
                            "--device", "cpu")
    assert rc == 1, err
    assert_one_error_line(err)
    assert feature in err.lower(), (feature, err)
    assert not (tmp_path / "x.lorazip.safetensors").exists()
    # next to plain LoRA adapters in one collection folder: the same refusal
    Z.make_adapters(tiny_llama, {"plain": Z._lora(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM")},
                    tmp_path / "src", seed=1)
    rc, _out, err = run_cli(capsys, "compress", tmp_path / "src", "-o", tmp_path / "y.lorazip.safetensors",
                            "--rank", "2", "--device", "cpu")
    assert rc == 1, err
    assert_one_error_line(err)
    assert feature in err.lower(), (feature, err)


# -- LoRA options that change what an adapter means: exact round trip, or one error line -----------
@pytest.fixture(scope="module")
def qwen2_variant_base(tmp_path_factory):
    return Z.tiny_qwen2(tmp_path_factory.mktemp("qwen2-variants") / "base")


@pytest.mark.parametrize("kind", list(Z.VARIANTS))
def test_lora_variant_round_trip_or_refused(qwen2_variant_base, kind, tmp_path, capsys):
    base = qwen2_variant_base
    folder = Z.make_variant(base, kind, tmp_path / "src")
    inputs = Z.variant_inputs()
    orig = Z.peft_logits(base, folder, inputs)
    assert float((orig - Z.outputs(base, inputs)[0]).abs().max()) > 1e-3
    out = tmp_path / "v.lorazip.safetensors"
    rank = max(json.loads((folder / "adapter_config.json").read_text())["r"], 1)
    rc, _o, err = run_cli(capsys, "compress", folder, "-o", out, "--rank", rank, "--dtype", "float32",
                          "--device", "cpu")
    if rc != 0:  # refused: one line naming the option
        assert rc == 1, err
        assert_one_error_line(err)
        assert Z.VARIANTS[kind][1] in err.lower(), err
        return
    lorazip.export(lorazip.load_artifact(out), tmp_path / "out")
    got = Z.peft_logits(base, tmp_path / "out" / kind, inputs)
    _close(got, orig, EXACT, f"{kind}: exported (full rank) vs original; lorazip neither kept the option "
                             f"nor refused the adapter")
