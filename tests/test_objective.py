"""The objective of a budget or target run (``objective``: energy, sqrt, module): how each adapter's
modules are weighed. Exact against a dense reference; the allocator's choice under each objective."""

from __future__ import annotations

import pytest
import torch

import lorazip
from lorazip.errors import OptionError
from lorazip.metrics import module_weights, objective_errors, per_adapter

from helpers import run_cli, write_adapter

MODULES = {"l.0.q": (48, 40), "l.0.k": (24, 40), "l.1.q": (48, 40), "l.1.k": (24, 40)}


def _collection(root, n: int = 6):
    """``n`` rank-6 adapters whose k modules hold 1/100 of the energy of their q modules."""
    for i in range(n):
        write_adapter(root / f"a{i}", MODULES, r=6, alpha=12, alpha_pattern={"k": 1.2}, seed=10 + i)
    return lorazip.load_collection(root)


def test_objective_errors_against_dense_reference():
    gen = torch.Generator().manual_seed(0)
    n2 = torch.rand(5, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 100.0, 0.01, 3.0])
    n2[0, 1] = 0.0  # a module the adapter does not have
    err = n2 * torch.rand(5, 4, generator=gen, dtype=torch.float64)
    err[0, 1] = 0.0
    assert torch.allclose(objective_errors(err, n2, "energy"), per_adapter(err, n2), rtol=0, atol=0)
    for i in range(5):
        has = n2[i] > 0
        rel = err[i, has] / n2[i, has]
        assert float(objective_errors(err, n2, "module")[i]) == pytest.approx(float(rel.mean()), rel=1e-12)
        ref = float((err[i, has] / n2[i, has].sqrt()).sum() / n2[i, has].sqrt().sum())
        assert float(objective_errors(err, n2, "sqrt")[i]) == pytest.approx(ref, rel=1e-12)
    assert module_weights(n2, "module")[0, 1] == 0 and torch.all(module_weights(n2, "energy") == 1)
    with pytest.raises(KeyError):
        module_weights(n2, "nope")


def test_module_objective_stores_the_weak_modules(tmp_path):
    """At the same bytes the energy objective leaves the weak k modules at nothing; weighing every
    module alike stores them, at a lower module-alike error (what it minimises) and a higher energy error."""
    coll = _collection(tmp_path)
    budget = 5000  # 11% of the factors' bytes
    got = {}
    for obj in ("energy", "sqrt", "module"):
        art = lorazip.compress(coll, budget=budget, objective=obj, hash_sources=False, device="cpu")
        assert art.serialized_size() <= budget
        sq, n2 = art.stats()
        k = [j for j, m in enumerate(art.modules) if m["name"].endswith(".k")]
        nothing_k = int((sq[:, k] >= n2[:, k] * (1 - 1e-9)).sum())
        got[obj] = (nothing_k, objective_errors(sq, n2, "module").mean().item(), per_adapter(sq, n2).mean().item(),
                    objective_errors(sq, n2, obj).mean().item(), art)
    assert got["energy"][0] == 12  # every k module of every adapter at error 1
    assert got["module"][0] == 0 and 0 < got["sqrt"][0] < 12
    assert got["module"][1] < got["energy"][1] and got["module"][2] > got["energy"][2]
    assert got["energy"][1] > got["sqrt"][1] > got["module"][1]
    for obj in ("sqrt", "module"):  # the allocator's prediction is the built artifact's objective error
        art = got[obj][4]
        assert art.allocation["objective"] == obj and art.meta["objective"] == obj
        assert art.allocation["predicted_mean_error"] == pytest.approx(got[obj][3], rel=0.05)
    assert "objective" not in got["energy"][4].meta and "objective" not in got["energy"][4].allocation


def test_target_bounds_the_objective_error(tmp_path):
    coll = _collection(tmp_path)
    art = lorazip.compress(coll, target_error=0.1, objective="module", hash_sources=False, device="cpu")
    sq, n2 = art.stats()
    mean = objective_errors(sq, n2, "module").mean().item()
    assert mean <= 0.1 + 1e-12
    path = tmp_path / "m.lorazip.safetensors"
    art.save(path)
    rep = lorazip.evaluate(lorazip.load_artifact(path))
    assert rep["objective"]["name"] == "module" and rep["objective"]["mean"] == pytest.approx(mean, rel=1e-6)
    plain = lorazip.compress(coll, target_error=0.1, hash_sources=False, device="cpu")
    assert "objective" not in lorazip.evaluate(plain)
    psq, pn2 = plain.stats()  # the energy target leaves the weak modules' relative errors above it
    assert per_adapter(psq, pn2).mean().item() <= 0.1 + 1e-12 < objective_errors(psq, pn2, "module").mean().item()


def test_energy_objective_is_the_default_byte_for_byte(tmp_path):
    coll = _collection(tmp_path)
    a = lorazip.compress(coll, budget=9000, hash_sources=False, device="cpu")
    b = lorazip.compress(coll, budget=9000, objective="energy", hash_sources=False, device="cpu")
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and a.meta == b.meta


def test_objective_refused_where_nothing_weighs_modules(tmp_path, capsys):
    coll = _collection(tmp_path / "c", n=3)
    for settings in ({"rank": 4}, {"budget": 9000, "method": "jd-diag"}, {"budget": 9000, "uniform_rank": True}):
        with pytest.raises(OptionError, match="objective sqrt"):
            lorazip.compress(coll, objective="sqrt", **settings)
    with pytest.raises(OptionError, match="unknown objective"):
        lorazip.compress(coll, budget=9000, objective="tasks")
    code, out, err = run_cli(capsys, "compress", str(tmp_path / "c"), "-o", str(tmp_path / "x.lorazip.safetensors"),
                             "--rank", "4", "--objective", "module")
    assert code != 0 and "objective module" in err and not (tmp_path / "x.lorazip.safetensors").exists()


def test_added_adapters_follow_the_objective(tmp_path):
    """``lorazip add`` gives an added adapter residual parts until its error under the artifact's
    objective reaches the artifact's goal (the target): its weak modules are stored too."""
    from lorazip.update import add_adapters

    coll = _collection(tmp_path / "c")
    art = lorazip.compress(coll, target_error=0.1, objective="module", hash_sources=False, device="cpu")
    path = tmp_path / "m.lorazip.safetensors"
    art.save(path)
    write_adapter(tmp_path / "new", MODULES, r=6, alpha=12, alpha_pattern={"k": 1.2}, seed=99)
    out, _ = add_adapters(lorazip.load_artifact(path), [str(tmp_path / "new")])
    sq, n2 = out.stats()
    assert out.meta["objective"] == "module"
    assert objective_errors(sq, n2, "module")[-1].item() <= 0.1 * 1.05  # rounding of the stored rows
    k = [j for j, m in enumerate(out.modules) if m["name"].endswith(".k")]
    assert bool((sq[-1, k] < n2[-1, k]).all())


def test_objective_on_clusters(tmp_path):
    """K groups with residual parts: the derived fixed-rank clustering runs without the objective, the
    allocation on the groups' fits under it."""
    coll = _collection(tmp_path)
    got = {obj: lorazip.compress(coll, budget=5000, objective=obj, clusters=2, hash_sources=False, device="cpu")
           for obj in ("energy", "module")}
    assert got["module"].meta["objective"] == "module" and got["module"].serialized_size() <= 5000
    mod = {obj: objective_errors(*art.stats(), "module").mean().item() for obj, art in got.items()}
    assert mod["module"] < mod["energy"]
