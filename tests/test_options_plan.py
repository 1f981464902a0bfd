"""CompressOptions (every setting, checked once) and Plan (what a run stores)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import lorazip
from lorazip.compress import DEFAULT_RANK, DEFAULT_TARGET_ERROR
from lorazip.compress.allocate import Allocation
from lorazip.compress.options import CompressOptions
from lorazip.compress.plan import fixed_rank_plan
from lorazip.errors import OptionError
from helpers import write_collection


@pytest.mark.parametrize("settings, says", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(method="pca"), "unknown method 'pca'"),
    (dict(weighting="equal"), "unknown weighting 'equal'"),
    (dict(storage_dtype="int4"), "unknown dtype 'int4'"),
    (dict(extras_dtype="int2"), "unknown extras dtype 'int2'"),
    (dict(target_stat="median"), "target statistic must be mean or max"),
    (dict(budget=10, target_error=0.1), "a budget or a target error, not both"),
    (dict(target_error=1.5), "--target-error must be between 0 and 1"),
    (dict(budget=10, method="svd"), "allocates jd-full or jd-diag parts, not svd"),
    (dict(budget=10, clusters=2, method="jd-diag"), "drop --method jd-diag"),
    (dict(rank=4, clusters=2, method="jd-diag"), "clusters need method jd-clustered"),
    (dict(clusters="some"), "clusters must be a number or 'auto'"),
    (dict(clusters=0), "clusters must be a positive number"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(backend="jax"), "unknown backend 'jax'"),
    (dict(backend="numpy", method="jd-diag", rank=2), "runs jd-full only"),
    (dict(compute_dtype="float16"), "unknown compute dtype 'float16'"),
    (dict(max_iters=0), "max_iters must be >= 1"),
    (dict(budget=0), "budget must be a positive number of bytes"),
    (dict(budget=0.5), "budget must be a positive number of bytes"),
    (dict(budget="2MB"), "budget must be a positive number of bytes"),
    (dict(memory_limit=-1), "memory limit must be a positive number of bytes"),
    (dict(max_rank=0), "max_rank must be a positive integer"),
    (dict(max_rounds=0), "max_rounds must be a positive integer"),
    (dict(cache_bytes=-1), "cache_bytes must be a number of bytes >= 0"),
    (dict(calibration_lambda=-0.5), "calibration lambda must be a number >= 0"),
])
def test_each_bad_setting_is_one_error_naming_it(settings, says):
    with pytest.raises(OptionError, match=says):
        CompressOptions(**settings)


def test_unknown_settings_are_refused_by_name(tmp_path):
    with pytest.raises(OptionError, match="unknown compression option.*rnak"):
        CompressOptions.of(rnak=3)
    write_collection(tmp_path / "c", n=2, modules={"m.q": (8, 6)}, r=2)
    with pytest.raises(OptionError, match="rnak"):
        lorazip.compress(lorazip.load_collection(tmp_path / "c"), rnak=3)


def test_what_the_settings_mean():
    default = CompressOptions()
    assert default.is_default_run and default.goal == DEFAULT_TARGET_ERROR and default.allocates
    assert default.shared_rank == DEFAULT_RANK
    ranked = CompressOptions(rank=8)
    assert not ranked.allocates and ranked.goal is None and ranked.shared_rank == 8
    diag = CompressOptions(method="jd-diag")  # not jd-full: the fixed rank, not the default target
    assert not diag.allocates and diag.shared_rank == DEFAULT_RANK
    fixed = CompressOptions(budget=1000, rank=4).fixed(method="jd-clustered", clusters=3)
    assert (fixed.budget, fixed.target_error, fixed.rank, fixed.method, fixed.clusters) == (None, None, 4,
                                                                                             "jd-clustered", 3)
    assert CompressOptions(clusters="3").clusters == 3  # the CLI's string
    assert CompressOptions(budget=1.5e6).budget == 1_500_000  # bytes as a float: its whole part


def test_options_are_frozen_and_picklable():
    opts = CompressOptions(budget=5000, storage_dtype="int8", memory_limit=1 << 20)
    with pytest.raises(AttributeError):
        opts.budget = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(opts)) == opts  # what a Ray task receives


def test_keywords_and_an_options_object_give_the_same_artifact(tmp_path):
    write_collection(tmp_path / "c", n=4, modules={"l0.q": (12, 8), "l0.v": (8, 8)}, r=3, seed=4)
    coll = lorazip.load_collection(tmp_path / "c")
    a = lorazip.compress(coll, budget=2500, storage_dtype="float32", hash_sources=False)
    b = lorazip.compress(coll, options=CompressOptions(budget=2500, storage_dtype="float32", hash_sources=False))
    c = lorazip.compress(coll, options=CompressOptions(budget=99), budget=2500, storage_dtype="float32",
                         hash_sources=False)  # keywords over an options object
    pa, pb, pc = (x.save(tmp_path / f"{i}.lorazip.safetensors") for i, x in enumerate((a, b, c)))
    assert pa.read_bytes() == pb.read_bytes() == pc.read_bytes()
    with pytest.raises(OptionError, match="ranks per module apply to a fixed rank"):
        lorazip.compress(coll, budget=2500, ranks={"l0.q": 2})


def test_fixed_rank_plan_caps_each_module_and_says_why(tmp_path):
    # l.small: d_in 3 < rank (one side kept whole for jd-full); l.big at the asked rank; adapters of rank 2
    write_collection(tmp_path / "c", n=3, modules={"l.small": (10, 3), "l.big": (12, 9)}, r=2, seed=1)
    coll = lorazip.load_collection(tmp_path / "c")
    plan = fixed_rank_plan(coll, "jd-full", "float32", 4)
    got = {m.name: m for m in plan.modules}
    assert got["l.big"].rank == 4 and got["l.big"].capped is None and got["l.big"].one_side is None
    small = got["l.small"]
    assert small.one_side == (4, 3) and small.rank == 3 and "d_in = 3" in small.capped["reason"]
    square = {m.name: m for m in fixed_rank_plan(coll, "jd-diag", "float32", 4).modules}["l.small"]
    assert square.one_side is None and square.rank == 3  # diagonal cores are square
    assert fixed_rank_plan(coll, "jd-full", "float32", 4, ranks={"l.big": 2}).ranks == {"l.small": 3, "l.big": 2}
    with pytest.raises(OptionError, match="not in the collection"):
        fixed_rank_plan(coll, "jd-full", "float32", 4, ranks={"nope": 2})
    with pytest.raises(OptionError, match="between 1 and the number of adapters"):
        fixed_rank_plan(coll, "jd-clustered", "float32", 2, clusters=5)


def test_an_allocation_is_a_plan(tmp_path):
    from lorazip.compress.curves import fit_module
    from lorazip.compress.plan import Clusters

    write_collection(tmp_path / "c", n=3, modules={"l.q": (12, 8)}, r=2, seed=2)
    coll = lorazip.load_collection(tmp_path / "c")
    f = coll.module_factors("l.q")
    fit = fit_module(f.B, f.A, "l.q", 2, weighting="relative", seed=0, tol=1e-6, max_iters=100)
    alloc = Allocation({"l.q": 1}, {"l.q": np.array([2, 0, 1])}, 100, 0.1, "mix", errors=np.zeros(3),
                       bits={"l.q": np.array([4, 2, 8], dtype=np.uint8)})
    low = alloc.plan([fit], "bits")
    assert low.method == "jd-full" and low.storage_dtype == "bits" and low.kind == "mix" and low.groups is None
    assert low.modules[0].rank == 1 and low.modules[0].residual.tolist() == [2, 0, 1]
    assert low.modules[0].bits.tolist() == [4, 2, 8]
    assert alloc.plan([fit], "int8").modules[0].bits is None  # rows at the storage dtype
    import torch

    groups = Clusters(2, [torch.tensor([0, 1, 1])])
    on_groups = alloc.plan([fit], "float16", groups)
    assert on_groups.method == "jd-clustered" and on_groups.clusters == 2 and on_groups.groups is groups


def test_add_takes_the_options_and_refuses_what_does_not_apply(tmp_path):
    from lorazip.update import add_adapters

    write_collection(tmp_path / "c", n=4, modules={"l0.q": (12, 8)}, r=2, seed=6)
    paths = sorted((tmp_path / "c").iterdir())
    opts = CompressOptions(rank=2, hash_sources=False, storage_dtype="float32")
    art = lorazip.compress(lorazip.load_collection(paths[:3]), options=opts)
    by_kw, _ = add_adapters(art, paths[3:], hash_sources=False)
    by_opts, _ = add_adapters(art, paths[3:], options=opts)  # the run's own options: the plan is the artifact's
    a, b = (x.save(tmp_path / f"{i}.lorazip.safetensors") for i, x in enumerate((by_kw, by_opts)))
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(OptionError, match="budget do\\(es\\) not apply"):
        add_adapters(art, paths[3:], budget=1000)
    with pytest.raises(OptionError, match="max_iter do"):  # a misspelt setting is named
        add_adapters(art, paths[3:], options=opts, max_iter=3)
    from lorazip.update import _add_settings

    # the refit's solver settings: the artifact's (None) unless given, as keywords or in the options
    assert _add_settings(None, {}) == (True, True, None, None, None)
    assert _add_settings(CompressOptions(max_iters=3, keep_extras=False), {}) == (False, True, 3, None, None)
    assert _add_settings(None, {"tol": 1e-6, "compute_dtype": "float64"}) == (True, True, None, 1e-6, "float64")
