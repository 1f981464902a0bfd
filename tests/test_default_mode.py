"""The default compression (no rank, budget or target): a quality target met with the fewest bytes."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from helpers import run_cli as run
from helpers import write_collection

import lorazip
from lorazip.compress import DEFAULT_RANK, DEFAULT_TARGET_ERROR
from lorazip.metrics import per_adapter

budget = importlib.import_module("lorazip.compress.budget")
MODULES = {f"l.{i}.q": (48, 40) for i in range(4)}


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """Five float32 adapters (rank 8) of four modules."""
    root = tmp_path_factory.mktemp("f32") / "src"
    write_collection(root, n=5, modules=MODULES, r=8, seed=3)
    return root


def test_library_default_is_the_target(f32):
    coll = lorazip.load_collection(f32)
    art = lorazip.compress(coll, hash_sources=False)
    assert art.allocation["target_error"] == DEFAULT_TARGET_ERROR and art.allocation["target_stat"] == "mean"
    assert float(per_adapter(*art.stats()).mean()) <= DEFAULT_TARGET_ERROR
    fixed = lorazip.compress(coll, DEFAULT_RANK, hash_sources=False)  # a rank is the paper's fixed-rank mode
    assert fixed.allocation is None and all(m["rank"] <= DEFAULT_RANK for m in fixed.modules)
    assert lorazip.compress(coll, method="jd-diag", hash_sources=False).meta["rank"] == DEFAULT_RANK


def test_cli_default_says_what_it_does(f32, tmp_path, capsys):
    out = tmp_path / "d.lorazip.safetensors"
    rc, stdout, err = run(capsys, "compress", f32, "-o", out, "--json")
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["rank_allocation"]["target_error"] == DEFAULT_TARGET_ERROR
    assert rep["errors"]["mean"] <= DEFAULT_TARGET_ERROR
    assert f"no --rank, --budget or --target-error: the least storage for mean error {DEFAULT_TARGET_ERROR}" in \
        " ".join(err.split())
    # every row means something: at a target the per-adapter SVD baseline is taken at each pair's stored rank
    sr = rep["baseline"]["svd_same_rank"]
    assert sr["per_pair"] and sr["mean"] <= rep["errors"]["mean"] + 1e-9 and sr["mean_rank"] > 0
    assert rep["baseline"]["svd_matched_storage"]["mean"] >= rep["errors"]["mean"] - 1e-4


def test_target_takes_the_fewest_bytes_for_float32_adapters(f32):
    """float32 adapters: a target is not stored in float32 when int8 (or float16) meets it in fewer bytes."""
    coll = lorazip.load_collection(f32)
    for target in (0.01, 0.05, 0.2):
        art = lorazip.compress(coll, target_error=target, hash_sources=False)
        assert art.meta["storage_dtype"] != "float32", target
        assert float(per_adapter(*art.stats()).mean()) <= target
        tried = {d["dtype"] for d in art.allocation["clusters_tried"]}
        assert tried == {"float32", "float16", "bits"}


def test_a_target_missed_by_rounding_is_aimed_lower(f32, monkeypatch):
    """When int8's exact error misses the target (its rounding larger than the room left for it), the
    allocation is aimed lower by the miss and int8 is kept if that still needs fewer bytes."""
    built: list[str] = []
    real = budget.build_allocation

    def missing_once(collection, opts, fits, plan, *args, **kw):
        art = real(collection, opts, fits, plan, *args, **kw)
        dt = plan.storage_dtype
        built.append(dt)
        if dt == built[0] and built.count(dt) == 1:  # as if the rounding cost 0.01 of every adapter
            sq, nn = art.stats()
            art.stats = lambda: (sq + 0.01 * nn, nn)
        return art

    monkeypatch.setattr(budget, "build_allocation", missing_once)
    art = lorazip.compress(lorazip.load_collection(f32), target_error=0.05, hash_sources=False)
    assert built[0] == built[1] != "float32" and art.meta["storage_dtype"] == "int8"
    assert any(d.get("retarget") is not None for d in art.allocation["clusters_tried"])
    assert float(per_adapter(*art.stats()).mean()) <= 0.05


def test_a_small_miss_is_re_aimed_below_the_prediction(small_fp32, monkeypatch):
    """A build predicted under its goal (an allocation's steps are discrete) that misses the target by
    a hair is re-aimed below what it was predicted to reach, so the next allocation changes: lowering
    the goal by the miss alone left it where it was (the same allocation three times, then a float16
    artifact three times larger)."""
    real, built = budget.build_allocation, []

    def just_over(collection, opts, fits, plan, *args, **kw):
        art = real(collection, opts, fits, plan, *args, **kw)
        if not kw.get("dry"):
            built.append(plan.storage_dtype)
            if len(built) == 1:  # the first build: exactly 1e-4 (relative) over the target
                sq, nn = art.stats()
                c = 0.01 * (1 + 1e-4) / float(per_adapter(sq, nn).mean())
                art.stats = lambda: (sq * c, nn)
        return art

    monkeypatch.setattr(budget, "build_allocation", just_over)
    art = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    tried = [t for t in art.allocation["clusters_tried"] if t["dtype"] == "bits"]
    assert built == ["bits", "bits"] and art.meta["storage_dtype"] == "int8"  # bits, re-aimed once
    assert tried[1]["retarget"] < tried[0]["predicted"] and tried[1]["numbers"] > tried[0]["numbers"]
    assert float(per_adapter(*art.stats()).mean()) <= 0.01


def test_fits_and_curves_are_released_before_the_artifact_is_packed(small_fp32, monkeypatch):
    """Packing the built artifact (its size, then the file) holds its codes and the packed tensors at
    once; the pass-1 fits and the allocator's step curves (about half the codes' memory at 1000
    adapters) are gone by then."""
    import gc
    import weakref

    from lorazip.artifact import Artifact
    from lorazip.compress import allocate

    made, alive = [], {}
    real_init, real_size = allocate.StepCurves.__init__, Artifact.serialized_size

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(weakref.ref(self))

    def size(self):
        gc.collect()
        alive.setdefault(id(self), sum(r() is not None for r in made))
        return real_size(self)

    monkeypatch.setattr(allocate.StepCurves, "__init__", init)
    monkeypatch.setattr(Artifact, "serialized_size", size)
    art = lorazip.compress(small_fp32, target_error=0.05, hash_sources=False)
    assert made and alive[id(art)] == 0


def test_a_precision_needing_twice_the_bytes_of_bits_is_not_allocated(small_fp32):
    """Under a target, float32 and float16 are only probed at twice bits' bytes: they miss there,
    bits meets the target, and they are never allocated (the report says what they need)."""
    art = lorazip.compress(small_fp32, target_error=0.05, hash_sources=False)
    assert art.meta["storage_dtype"] == "int8" and "qbits/q" in art.tensors()
    assert art.allocation["dtypes"]["float16"] is None and art.allocation["dtypes"]["float32"] is None
    bits = next(t for t in art.allocation["clusters_tried"] if t["dtype"] == "bits")
    for t in art.allocation["clusters_tried"]:
        if t["dtype"] != "bits":
            assert t["needs_more_than_bytes"] == 2 * bits["numbers"]


def test_a_deferred_precision_is_allocated_and_built_when_bits_miss(small_fp32, optimistic_profile, monkeypatch):
    """With no re-aim allowed, a bits build that misses the target by its rounding hands over to the
    deferred precisions: they are allocated then, and the smaller of them that meets it is kept."""
    retargets = budget._RETARGETS
    monkeypatch.setattr(budget, "_RETARGETS", 0)
    art = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)
    assert per_adapter(*art.stats()).mean() <= 0.01 + 1e-12
    assert art.meta["storage_dtype"] == "float16"
    assert art.allocation["dtypes"]["float16"] is not None and art.allocation["dtypes"]["float32"] is not None
    monkeypatch.setattr(budget, "_RETARGETS", retargets)
    aimed = lorazip.compress(small_fp32, target_error=0.01, hash_sources=False)  # re-aimed bits meet it
    assert aimed.meta["storage_dtype"] == "int8" and aimed.serialized_size() < art.serialized_size()


@pytest.mark.parametrize("kw", [dict(target_error=0.01, clusters="auto"), dict(target_error=0.01)])
def test_deferring_a_precision_never_changes_the_artifact(two_groups, monkeypatch, tmp_path, kw):
    """Whatever is deferred (nothing, everything, or some groupings' float precisions and not
    others'), the artifact is the one of allocating every precision."""
    def run(name, misses):
        if misses is not None:
            monkeypatch.setattr(budget, "_misses", misses)
        art = lorazip.compress(two_groups, hash_sources=False, **kw)
        art.save(tmp_path / name, overwrite=True)
        return (tmp_path / name).read_bytes(), art

    real = budget._misses
    every, _ = run("every", lambda *a: False)
    calls = iter(range(10**6))
    mixed, _ = run("mixed", lambda *a: next(calls) % 2 == 0 and real(*a))
    calls = iter(range(10**6))  # deferred where it would not miss: another grouping's real one must resolve it
    forced, _ = run("forced", lambda *a: next(calls) in (0, 3))
    monkeypatch.setattr(budget, "_misses", real)
    default, _ = run("default", None)
    assert every == mixed == forced == default


def test_the_report_says_which_precisions_were_not_allocated(small_fp32, tmp_path, capsys):
    out = tmp_path / "d.lorazip.safetensors"
    src = small_fp32.adapters[0].path.parent
    rc, stdout, err = run(capsys, "compress", src, "-o", out, "--target-error", "0.05")
    text = " ".join((stdout + err).split())
    assert rc == 0, err
    assert "float16 not allocated (needs over" in text and "float32 not allocated (needs over" in text


def _tensors(art):
    return {k: v.clone() for k, v in art.tensors().items()}


def test_a_precision_that_cannot_beat_bits_under_a_budget_is_not_allocated(small_fp32, monkeypatch):
    """Under a budget, float32 and float16 are first bounded by one allocation of the whole budget's
    numbers: above bits' prediction there, they are never allocated (no dry assemblies), the report
    says their bound, and the artifact is the one a run allocating every precision gives."""
    nbytes = 3000
    art = lorazip.compress(small_fp32, budget=nbytes, hash_sources=False)
    assert art.meta["storage_dtype"] == "int8" and "qbits/q" in art.tensors()
    assert art.allocation["dtypes"]["float16"] is None and art.allocation["dtypes"]["float32"] is None
    bits = next(t for t in art.allocation["clusters_tried"] if t["dtype"] == "bits")
    floors = {t["dtype"]: t["predicted_at_least"] for t in art.allocation["clusters_tried"] if t["dtype"] != "bits"}
    assert set(floors) == {"float16", "float32"} and min(floors.values()) > bits["predicted"]
    monkeypatch.setattr(budget, "_floor", lambda *a, **k: float("-inf"))  # every precision allocated
    every = lorazip.compress(small_fp32, budget=nbytes, hash_sources=False)
    assert all(every.allocation["dtypes"][d] >= floors[d] for d in floors)  # the floors are bounds
    a, b = _tensors(art), _tensors(every)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_deferred_precision_is_built_when_bits_come_out_above_its_floor(small_fp32, monkeypatch):
    """A bits build whose exact error lands above a deferred precision's floor hands over: the
    deferred precisions are allocated (with dry assemblies: the budget holds) and built, and the
    best built one is kept."""
    real = budget.build_allocation
    built = []

    def worse_bits(*a, **kw):
        art = real(*a, **kw)
        plan = a[3]
        if not kw.get("dry"):
            built.append(plan.storage_dtype)
            if plan.storage_dtype == "bits":
                sq, nn = art.stats()
                art.stats = lambda: (nn.clone(), nn)  # every adapter at error 1
        return art

    monkeypatch.setattr(budget, "build_allocation", worse_bits)
    art = lorazip.compress(small_fp32, budget=3000, hash_sources=False)
    assert built[0] == "bits" and len(built) >= 2 and art.meta["storage_dtype"] in ("float16", "float32")
    assert art.allocation["dtypes"]["float16"] is not None and art.serialized_size() <= 3000
    assert float(per_adapter(*art.stats()).mean()) < 1
