"""Modules whose shape differs between adapters (heads of 2, 3 and 6 labels): one shape group each.

Synthetic adapters here; genuine PEFT classifiers of 2, 3 and 6 labels are in tests/test_zoo.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import run_cli as run
from helpers import write_adapter
from torch import nn

import lorazip
from lorazip.errors import ArtifactError, OptionError, ValidationError
from lorazip.serve import use_adapters
from lorazip.update import UpdateWarning

BODY = {"l.0.q": (16, 12), "l.1.q": (16, 12)}
LABELS = {"a2": 2, "b2": 2, "c3": 3, "d6": 6, "e3": 3}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Five adapters, LoRA on a 12 -> k classifier head with k = 2, 2, 3, 6, 3; their dense deltas."""
    root = tmp_path_factory.mktemp("heads")
    deltas = {}
    for i, (name, k) in enumerate(LABELS.items()):
        deltas[name] = write_adapter(root / "src" / name, {**BODY, "classifier": (k, 12)}, r=4, seed=10 + i)
    return root / "src", deltas


def _dense(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    B = state[f"base_model.model.{module}.lora_B.weight"].double()
    A = state[f"base_model.model.{module}.lora_A.weight"].double()
    return B @ A


def test_collection_keys_each_shape_apart(heads):
    src, _ = heads
    coll = lorazip.load_collection(src)
    assert [(m.name, m.path, m.d_out) for m in coll.modules if m.path == "classifier"] == [
        ("classifier@2x12", "classifier", 2), ("classifier@3x12", "classifier", 3), ("classifier@6x12", "classifier", 6)]
    assert [m.name for m in coll.modules if m.target is None] == ["l.0.q", "l.1.q"]
    assert coll.missing_modules() == {}  # an adapter in one shape group does not lack the module
    assert {p: [g.name for g in gs] for p, gs in coll.split_modules().items()} == {
        "classifier": ["classifier@2x12", "classifier@3x12", "classifier@6x12"]}
    by_name = {a.name: set(a.modules) for a in coll.adapters}
    assert by_name["d6"] == {"l.0.q", "l.1.q", "classifier@6x12"}
    # keys come from the module's real path, so keying again changes nothing
    coll.align(coll.modules)
    assert {a.name: set(a.modules) for a in coll.adapters} == by_name


@pytest.mark.parametrize("how", [dict(rank=16), dict(target_error=1e-6), dict(budget=10**6),
                                 dict(rank=16, clusters=2), dict(rank=4, method="svd")])
def test_every_mode_keeps_each_adapters_shape(heads, how):
    """Lossless settings: every adapter's export equals its original delta, at its own head shape."""
    src, deltas = heads
    art = lorazip.compress(lorazip.load_collection(src), hash_sources=False, **how)
    heads_meta = {m["name"]: m for m in art.modules if m.get("target") == "classifier"}
    assert set(heads_meta) == {"classifier@2x12", "classifier@3x12", "classifier@6x12"}
    for name, want in deltas.items():
        state, cfg = lorazip.to_peft(art, name)
        assert "classifier" in cfg["target_modules"] and not any("@" in k for k in state)
        for module, delta in want.items():
            got = _dense(state, module)
            assert got.shape == delta.shape
            assert torch.linalg.norm(got - delta) <= 1e-5 * torch.linalg.norm(delta), (name, module)
    assert lorazip.evaluate(art)["errors"]["max"] < 1e-8


def test_report_and_info_name_the_split(heads, tmp_path, capsys):
    src, _ = heads
    out = tmp_path / "x.lorazip.safetensors"
    rc, stdout, err = run(capsys, "compress", src, "-o", out, "--rank", "4", "--json")
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["split_modules"] == {"classifier": [
        {"name": "classifier@2x12", "d_out": 2, "d_in": 12, "adapters": 2},
        {"name": "classifier@3x12", "d_out": 3, "d_in": 12, "adapters": 2},
        {"name": "classifier@6x12", "d_out": 6, "d_in": 12, "adapters": 1}]}
    assert rep["missing_modules"] == {}
    assert all(a["missing_modules"] == [] for a in rep["adapters"])
    assert "adapters differ in the shape of 1 module(s)" in " ".join(err.split())
    rc, _, err = run(capsys, "info", out)  # the tables go to stderr, wrapped in their cells
    flat = " ".join(err.replace("│", " ").split())
    assert rc == 0 and "(1 split by shape, adapters differ: classifier 2x12, 3x12, 6x12)" in flat
    rc, stdout, _ = run(capsys, "info", out, "--json")
    assert json.loads(stdout)["split_modules"] == rep["split_modules"]


class _Tiny(nn.Module):
    """The base model of the synthetic adapters: l.0.q, l.1.q (12 -> 16) and a ``labels``-way head."""

    def __init__(self, labels: int):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.ModuleList([nn.Module(), nn.Module()])
        for blk in self.l:
            blk.q = nn.Linear(12, 16, dtype=torch.float64)
        self.classifier = nn.Linear(12, labels, dtype=torch.float64)

    def forward(self, x):
        return torch.cat([self.l[0].q(x), self.l[1].q(x), self.classifier(x)], -1)


def test_apply_serves_the_adapters_that_fit_the_model(heads):
    src, deltas = heads
    art = lorazip.compress(lorazip.load_collection(src), rank=16, hash_sources=False)
    model = _Tiny(3)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        base = [model.l[0].q(x), model.l[1].q(x), model.classifier(x)]
    lorazip.apply(model, art)  # default: every adapter whose shapes fit the 3-label model
    assert lorazip.serve.adapter_names(model) == ["c3", "e3"]
    with torch.no_grad(), use_adapters(model, ["e3", None, "c3"]):
        y = model(x)
    for row, name in enumerate(["e3", None, "c3"]):
        parts = [b[row] + (x[row] @ deltas[name][m].T if name else 0) for b, m in zip(base, ["l.0.q", "l.1.q", "classifier"])]
        torch.testing.assert_close(y[row], torch.cat(parts, -1), rtol=1e-5, atol=1e-5)  # float32 storage
    with pytest.raises(OptionError, match=r"'d6' was not loaded: it does not fit this model \(its classifier is 6 x 12"):
        lorazip.serve.set_adapters(model, ["d6"])
    lorazip.serve.detach(model)
    with pytest.raises(ValidationError, match=r"2 of the requested adapters do not fit this model: 'a2' .*'d6'"):
        lorazip.apply(model, art, adapters=["a2", "c3", "d6"])
    assert not lorazip.serve.is_applied(model)
    with pytest.raises(ValidationError, match=r"classifier: the model's layer is 5 x 12 .* 2 x 12 or 3 x 12 or 6 x 12"):
        lorazip.apply(_Tiny(5), art)


def test_add_joins_a_shape_group_or_starts_one(heads, tmp_path):
    src, deltas = heads
    first = [src / n for n in ("a2", "c3")]
    art = lorazip.compress(lorazip.load_collection(first), rank=16, hash_sources=False)
    new = {}
    for i, (name, k) in enumerate({"f3": 3, "g6": 6}.items()):
        new[name] = write_adapter(tmp_path / "new" / name, {**BODY, "classifier": (k, 12)}, r=4, seed=40 + i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, rep = lorazip.add_adapters(art, [tmp_path / "new"], refit=False)
    groups = {m["name"]: m for m in out.modules if m.get("target") == "classifier"}
    assert set(groups) == {"classifier@2x12", "classifier@3x12", "classifier@6x12"}
    assert out.meta["adapters"][2]["ranks"]["classifier@3x12"] == 4  # f3 joined the 3-label group
    assert "classifier@6x12" in out.meta["adapters"][3]["ranks"]      # g6 started its own group
    assert not out.get("cores/classifier@6x12")[:3].any()
    state, _ = lorazip.to_peft(out, "g6")
    want = new["g6"]["classifier"]
    assert torch.linalg.norm(_dense(state, "classifier") - want) <= 1e-5 * torch.linalg.norm(want)
    for old in ("a2", "c3"):  # what was stored stays bit for bit
        assert torch.equal(lorazip.to_peft(out, old)[0]["base_model.model.classifier.lora_B.weight"],
                           lorazip.to_peft(art, old)[0]["base_model.model.classifier.lora_B.weight"])
    saved = tmp_path / "grown.lorazip.safetensors"
    out.save(saved)
    back = lorazip.load_artifact(saved)
    assert [m["name"] for m in back.modules] == [m["name"] for m in out.modules]
    assert rep["added"][1]["missing_modules"] == []


def test_artifact_refuses_two_groups_of_one_shape(heads, tmp_path):
    from lorazip.artifact import check_meta

    src, _ = heads
    art = lorazip.compress(lorazip.load_collection(src), rank=4, hash_sources=False)
    path = art.save(tmp_path / "x.lorazip.safetensors")
    meta = lorazip.load_artifact(path).meta
    header = lorazip.load_artifact(path)._header if hasattr(art, "_header") else None
    bad = json.loads(json.dumps(meta))
    g3 = next(m for m in bad["modules"] if m["name"] == "classifier@3x12")
    g3["d_out"] = 2
    with pytest.raises(ArtifactError, match="are the same module 'classifier' with the same shape"):
        check_meta(bad, header or {}, path)
    bad = json.loads(json.dumps(meta))
    next(m for m in bad["modules"] if m["name"] == "classifier@3x12")["target"] = "classifier@3x12"
    with pytest.raises(ArtifactError, match="target must be a module path other than its name"):
        check_meta(bad, header or {}, path)


def test_errors_recomputed_after_add_started_a_group_are_the_recorded_ones(heads, tmp_path):
    """Sources of several shapes beside an artifact whose module was keyed by its path (one shape when
    compressed, another group added since) are keyed as the artifact keys them: the errors recomputed
    against all of them are those recorded (they were 0 for the first adapters' heads, a module missed)."""
    src, _ = heads
    art = lorazip.compress(lorazip.load_collection([src / "a2", src / "b2"]), rank=4, hash_sources=False)
    assert "classifier" in {m["name"] for m in art.modules}
    write_adapter(tmp_path / "new" / "g6", {**BODY, "classifier": (6, 12)}, r=4, seed=41)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpdateWarning)
        out, _ = lorazip.add_adapters(art, [tmp_path / "new"], refit=False)
    recorded = {a["name"]: a["error"] for a in lorazip.evaluate(out)["adapters"]}
    again = {a["name"]: a["error"] for a in lorazip.evaluate(out, [src / "a2", src / "b2", tmp_path / "new" / "g6"],
                                                             check_hashes=False)["adapters"]}
    assert again.keys() == recorded.keys() == {"a2", "b2", "g6"}
    for name in recorded:
        assert again[name] == pytest.approx(recorded[name], rel=1e-6, abs=1e-12), name
    assert min(recorded.values()) > 1e-3  # rank 4 of rank-4 bodies and heads shared by several: lossy


def test_apply_leaves_out_a_module_no_served_adapter_adapts(heads, tmp_path):
    """A module whose every shape group differs from the model's is not wrapped where none of the
    adapters served adapts it (an adapter of another base added with --base-model); serving an adapter
    that adapts it is still an error."""
    src, deltas = heads
    write_adapter(tmp_path / "body" / "p0", BODY, r=4, seed=50)  # no head at all
    art = lorazip.compress(lorazip.load_collection([src / "d6", tmp_path / "body" / "p0"]), rank=16,
                           hash_sources=False)
    model = _Tiny(3)  # the 3-label model: the artifact's head is 6 x 12 only
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        base = [model.l[0].q(x), model.l[1].q(x), model.classifier(x)]
    lorazip.apply(model, art, adapters=["p0"])
    assert isinstance(model.classifier, nn.Linear)  # not wrapped
    with torch.no_grad(), use_adapters(model, ["p0", None]):
        y = model(x)
    want = [b[0] + (x[0] @ deltas_of(tmp_path / "body" / "p0")[m].T if m != "classifier" else 0)
            for b, m in zip(base, ["l.0.q", "l.1.q", "classifier"])]
    torch.testing.assert_close(y[0], torch.cat(want, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], torch.cat([b[1] for b in base], -1))
    lorazip.serve.detach(model)
    with pytest.raises(ValidationError, match=r"classifier: the model's layer is 3 x 12 .* 6 x 12"):
        lorazip.apply(model, art, adapters=["d6"])


def deltas_of(folder):
    """The dense deltas of the adapter at ``folder`` (float64), as :func:`write_adapter` returned them."""
    ad = lorazip.io.peft.load_adapter(folder)
    return {m: (lambda B, A: B @ A)(*ad.factors(m)) for m in ad.modules}
