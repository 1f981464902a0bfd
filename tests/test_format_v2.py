"""Format v2: per-adapter residual parts ``b_i a_i`` and rank-0 modules.

v2 artifacts are built from a normal ``lorazip.compress`` artifact by adding, per module, the
truncated SVD of each adapter's dense residual ``M_i - U S_i V^T`` at chosen ranks ``k_i``, and by
turning one module into a rank-0 module (empty U, V, cores: the residual parts carry it all). They
are saved, re-opened lazily and then read (module_residuals), checked (check_meta), evaluated,
exported to PEFT (logits equal the dense reconstruction), served in mixed batches (equal PEFT with
the exported adapters), grown and shrunk (add / remove) and described (``lorazip info``).
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import GPT2_LIKE, make_peft_adapters, resave_artifact, run_cli, write_adapter, write_collection
from safetensors import safe_open
from safetensors.torch import save_file

import lorazip
from lorazip.artifact import FORMAT_VERSION, Artifact, load_artifact
from lorazip.errors import ArtifactError
from lorazip.metrics import squared_errors
from lorazip.serve import BatchedLoraEmbedding, BatchedLoraLinear, use_adapters

TOL = dict(rtol=1e-5, atol=1e-5)
PREFIX = "base_model.model."


# -- building v2 artifacts ---------------------------------------------------------------------------
def dense_original(coll: lorazip.Collection, module: str) -> torch.Tensor:
    """(n, d_out, d_in) float64 deltas of the collection's adapters (zero where not adapted)."""
    fac = coll.module_factors(module)
    return fac.B @ fac.A


def shared_recon(art: Artifact, module: str, rows: list[int] | None = None) -> torch.Tensor:
    U, V, cores, assign = art.module_factors(module, rows)
    S = cores.double()
    if S.dim() == 2:
        S = torch.diag_embed(S)
    U, V = U.double()[assign], V.double()[assign]
    return U @ S @ V.transpose(1, 2)


def dense_recon(art: Artifact, module: str, rows: list[int] | None = None) -> torch.Tensor:
    """The artifact's reconstruction ``U_c S_i V_c^T + b_i a_i`` (n, d_out, d_in), float64."""
    b, a, _ = art.module_residuals(module, rows)
    return shared_recon(art, module, rows) + b.double() @ a.double()


def make_v2(art: Artifact, coll: lorazip.Collection, ks: dict[str, list[int]], rank0: tuple[str, ...] = ()) -> Artifact:
    """In-memory v2 artifact: ``art`` with residual parts of ranks ``ks[module]`` (the truncated SVD
    of each dense residual) and the modules ``rank0`` turned into rank-0 modules; the recorded
    errors are recomputed with the residual parts."""
    tensors = {k: v.clone() for k, v in art.tensors().items()}
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    n = len(art.names)
    sq = tensors["stats/sq_error"].clone()
    for j, mod in enumerate(meta["modules"]):
        m = mod["name"]
        dt = tensors[f"U/{m}"].dtype
        if m in rank0:
            K = tensors[f"U/{m}"].shape[0]
            tensors[f"U/{m}"] = torch.zeros(K, mod["d_out"], 0, dtype=dt)
            tensors[f"V/{m}"] = torch.zeros(K, mod["d_in"], 0, dtype=dt)
            diag = tensors[f"cores/{m}"].dim() == 2
            tensors[f"cores/{m}"] = torch.zeros((n, 0) if diag else (n, 0, 0), dtype=dt)
            mod["rank"] = 0
            mod.pop("rank_out", None)
            mod.pop("rank_capped", None)
        tmp = Artifact(meta, tensors=tensors)
        M = dense_original(coll, m)
        R = M - shared_recon(tmp, m)
        k = ks.get(m, [0] * n)
        bs, as_ = [], []
        for i in range(n):
            if k[i]:
                P, sig, Qh = torch.linalg.svd(R[i], full_matrices=False)
                bs.append((P[:, : k[i]] * sig[: k[i]]).T.to(dt))  # b_i^T: (k_i, d_out)
                as_.append(Qh[: k[i]].to(dt))  # a_i: (k_i, d_in)
        if sum(k):
            tensors[f"resid_ranks/{m}"] = torch.tensor(k, dtype=torch.int32)
            tensors[f"resid_B/{m}"] = torch.cat(bs).contiguous()
            tensors[f"resid_A/{m}"] = torch.cat(as_).contiguous()
            mod["residual"] = {"max_rank": max(k), "total_rank": sum(k)}
        fac = coll.module_factors(m)
        tmp = Artifact(meta, tensors=tensors)  # a new one: the key set is cached
        U, V, cores, assign = tmp.module_factors(m)
        b, a, _ = tmp.module_residuals(m)
        sq[:, j] = squared_errors(fac.B, fac.A, U, V, cores, assign, residual=(b, a))[0].to(sq.dtype)
    tensors["stats/sq_error"] = sq
    return Artifact(meta, tensors=tensors)


# -- small synthetic collection (no PEFT needed) -----------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4 adapters on GPT2_LIKE modules (one lacks mlp.c_proj); rank-2 compression plus residual parts,
    c_proj of layer 0 a rank-0 module, h.1.c_attn without residual parts."""
    root = tmp_path_factory.mktemp("v2-small")
    write_collection(root / "src", n=3, r=4, seed=0)
    write_adapter(root / "src" / "a3", {k: v for k, v in GPT2_LIKE.items() if "c_proj" not in k}, r=3, seed=9)
    coll = lorazip.load_collection(root / "src")
    art = lorazip.compress(coll, 2, device="cpu", hash_sources=False)
    ks = {"transformer.h.0.attn.c_attn": [1, 3, 0, 2], "transformer.h.0.mlp.c_proj": [4, 0, 2, 0]}
    v2 = make_v2(art, coll, ks, rank0=("transformer.h.0.mlp.c_proj",))
    path = v2.save(root / "v2.lorazip.safetensors")
    return dict(root=root, coll=coll, ks=ks, path=path, art=load_artifact(path), v1=art)


def test_header_and_metadata(small):
    art = small["art"]
    with safe_open(str(small["path"]), framework="pt") as f:
        assert f.metadata()["format_version"] == "4" and FORMAT_VERSION == 7  # 7 only with low-bit parts
        keys = set(f.keys())
    # format v3 packs the residual ranks into one (n, M) table, all spectra into one tensor and the
    # residual rows of all modules into one flat tensor per role (module by module, metadata order)
    assert {k for k in keys if k.startswith("resid_")} == {"resid_ranks", "resid_B", "resid_A"}
    assert not any(k.startswith("qscale/") for k in keys)  # float storage: no row scales
    with safe_open(str(small["path"]), framework="pt") as f:
        assert f.get_slice("resid_B").get_shape() == [6 * 24 + 6 * 8]  # c_attn (24 x 8), c_proj (8 x 16)
        assert f.get_slice("resid_A").get_shape() == [6 * 8 + 6 * 16]
    assert "spectra" in keys and not any(k.startswith("spectra/") for k in keys)
    assert not any(k.endswith("/transformer.h.0.mlp.c_proj") and k.startswith(("U/", "V/", "cores/")) for k in keys)
    logical = set(art.keys())  # what the library sees: the v2 keys
    assert {f"resid_ranks/{m}" for m in small["ks"]} <= logical and "resid_ranks" not in logical
    assert {f"{p}/{m}" for p in ("resid_B", "resid_A") for m in small["ks"]} <= logical
    assert not {"resid_B", "resid_A"} & logical
    assert {f"spectra/{m['name']}" for m in art.modules} <= logical and "spectra" not in logical
    assert "U/transformer.h.0.mlp.c_proj" in logical
    mods = {m["name"]: m for m in art.modules}
    assert mods["transformer.h.0.mlp.c_proj"]["rank"] == 0
    assert mods["transformer.h.0.attn.c_attn"]["residual"] == {"max_rank": 3, "total_rank": 6}
    assert "residual" not in mods["transformer.h.1.attn.c_attn"]
    U, V, cores, assign = art.module_factors("transformer.h.0.mlp.c_proj")
    assert U.shape == (1, 8, 0) and V.shape == (1, 16, 0) and cores.shape == (4, 0, 0)
    assert lorazip.verify(small["path"])["ok"]


def test_module_residuals(small):
    art, ks = small["art"], small["ks"]
    m = "transformer.h.0.attn.c_attn"
    b, a, k = art.module_residuals(m)
    assert b.shape == (4, 24, 3) and a.shape == (4, 3, 8) and k.tolist() == ks[m] and k.dtype == torch.int64
    for i, ki in enumerate(ks[m]):  # zero-padded past k_i
        assert not b[i, :, ki:].any() and not a[i, ki:].any()
    b2, a2, k2 = art.module_residuals(m, [3, 0])
    assert k2.tolist() == [2, 1] and b2.shape == (2, 24, 2)
    assert torch.equal(b2[0], b[3, :, :2]) and torch.equal(a2[1, :1], a[0, :1]) and not b2[1, :, 1:].any()
    b3, a3, k3 = art.module_residuals(m, [2])  # an adapter without residual part: k_max = 0
    assert b3.shape == (1, 24, 0) and a3.shape == (1, 0, 8) and k3.tolist() == [0]
    b4, a4, k4 = art.module_residuals("transformer.h.1.attn.c_attn", [1, 2])  # a module without any
    assert b4.shape == (2, 24, 0) and a4.shape == (2, 0, 8) and k4.tolist() == [0, 0]
    mem = make_v2(small["v1"], small["coll"], ks, rank0=("transformer.h.0.mlp.c_proj",))  # in memory: the same
    for mm in ks:
        for x, y in zip(mem.module_residuals(mm, [1, 3]), art.module_residuals(mm, [1, 3])):
            assert torch.equal(x, y)
    with pytest.raises(ArtifactError, match="no module named"):
        art.module_residuals("nope")
    # the residual parts are what makes the errors small: reconstruction = original there
    coll = small["coll"]
    full = dense_recon(art, "transformer.h.0.mlp.c_proj")
    orig = dense_original(coll, "transformer.h.0.mlp.c_proj")
    assert torch.allclose(full[0], orig[0], atol=1e-5)  # k_0 = 4 = the adapter's rank: exact
    assert torch.allclose(full[1], torch.zeros_like(full[1]))  # rank 0, k_1 = 0: zero delta


def test_reads_only_the_needed_row_blocks(small, monkeypatch):
    art = load_artifact(small["path"])
    import safetensors

    real = safetensors.safe_open
    opened, sliced = [], []

    class Spy:
        def __init__(self, *a, **k):
            opened.append(a)
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            return self._f.get_tensor(key)

        def get_slice(self, key):
            sl = self._f.get_slice(key)

            class S:
                def __getitem__(s, item):
                    if isinstance(item, slice):
                        sliced.append((key, item.start, item.stop))
                    return sl[item]

            return S()

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    m = "transformer.h.0.attn.c_attn"  # first in the packed resid_B / resid_A; rows of 24 / 8 values
    art.module_residuals(m, [3, 1])  # ks = [1, 3, 0, 2]: offsets 0, 1, 4, 4
    parts = lambda: sorted(x for x in sliced if x[0].startswith(("resid_B", "resid_A")))  # noqa: E731
    assert parts() == sorted([("resid_B", 4 * 24, 6 * 24), ("resid_B", 1 * 24, 4 * 24),
                              ("resid_A", 4 * 8, 6 * 8), ("resid_A", 1 * 8, 4 * 8)])
    sliced.clear()
    art.module_residuals(m, [0, 1])  # adjacent blocks: one slice each
    assert parts() == [("resid_A", 0, 4 * 8), ("resid_B", 0, 4 * 24)]
    sliced.clear()
    art.module_residuals("transformer.h.0.mlp.c_proj", [2])  # ks = [4, 0, 2, 0]: rows 4..5, after c_attn's 6
    assert parts() == [("resid_A", 6 * 8 + 4 * 16, 6 * 8 + 6 * 16), ("resid_B", 6 * 24 + 4 * 8, 6 * 24 + 6 * 8)]
    opened.clear()
    with art.reader():
        for mod in art.modules:
            art.module_factors(mod["name"])
            art.module_residuals(mod["name"])
    assert len(opened) == 1  # one open file for all the reads


def _write_unpacked(art, path: Path, version: str) -> dict:
    """``art`` as a v1/v2 file: every logical tensor under its own key, plain JSON metadata."""
    from lorazip.artifact import tensor_checksum

    tensors = {k: v.contiguous() for k, v in art.tensors().items()}
    doc = {k: v for k, v in art.meta.items() if k != "checksum"}
    doc["checksum"] = tensor_checksum(tensors)
    meta = {"format": "lorazip", "format_version": version, "lorazip": json.dumps(doc)}
    save_file(tensors, str(path), metadata=meta)
    return meta


def test_v1_files_still_read(small, tmp_path):
    meta = _write_unpacked(small["v1"], tmp_path / "old.safetensors", "1")
    art = load_artifact(tmp_path / "old.safetensors", verify=True)
    b, a, k = art.module_residuals("transformer.h.0.attn.c_attn")
    assert b.shape[2] == 0 and k.tolist() == [0] * 4
    meta["format_version"] = str(FORMAT_VERSION + 1)
    save_file(load_artifact(tmp_path / "old.safetensors").tensors(), str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(ArtifactError, match="newer"):
        load_artifact(tmp_path / "new.safetensors")


def test_v2_files_still_read_and_match_v3(small, tmp_path):
    v3 = small["art"]
    _write_unpacked(v3, tmp_path / "v2.safetensors", "2")
    v2 = load_artifact(tmp_path / "v2.safetensors", verify=True)
    assert set(v2.keys()) == set(v3.keys())
    for key in v3.keys():
        assert torch.equal(v2.get(key), v3.get(key)), key
    assert lorazip.evaluate(v2)["errors"] == lorazip.evaluate(v3)["errors"]
    assert lorazip.verify(tmp_path / "v2.safetensors")["ok"]
    # saved again, a v2 artifact becomes v3 with the same logical tensors and a smaller file
    again = v2.save(tmp_path / "again.lorazip.safetensors")
    assert again.stat().st_size < (tmp_path / "v2.safetensors").stat().st_size
    back = load_artifact(again, verify=True)
    for key in v3.keys():
        assert torch.equal(back.get(key), v3.get(key)), key


M0 = "transformer.h.0.attn.c_attn"


def _mod(doc, name=M0):
    return next(m for m in doc["modules"] if m["name"] == name)


@pytest.mark.parametrize("what,kw,message", [
    ("total_rank in meta", dict(meta_edit=lambda d: _mod(d)["residual"].update(total_rank=7)),
     "tensor 'resid_B' of shape (192,) F32: the residual rows of 2 module(s) (total_rank x d_out each, from "
     "their residual metadata) need shape (216,)"),
    ("max_rank in meta", dict(meta_edit=lambda d: _mod(d)["residual"].update(max_rank=2)),
     "does not match the module's residual metadata"),
    ("residual meta not an object", dict(meta_edit=lambda d: _mod(d).update(residual=[1])),
     "modules[0].residual must be an object"),
    ("residual meta removed", dict(meta_edit=lambda d: _mod(d).pop("residual")),
     "tensor 'resid_B' of shape (192,) F32: the residual rows of 1 module(s)"),
    ("residual meta removed, own tensors", dict(meta_edit=lambda d: _mod(d).pop("residual"), tensor_edit=lambda t: t.update(
        {f"resid_B/{M0}": t["resid_B"][:144].reshape(6, 24), "resid_B": t["resid_B"][144:],
         f"resid_A/{M0}": t["resid_A"][:48].reshape(6, 8), "resid_A": t["resid_A"][48:]})), "residual tensors without"),
    # format v3: the ranks are column j of the (n, M) table "resid_ranks" (M0 is modules[0])
    ("ranks sum", dict(tensor_edit=lambda t: t["resid_ranks"][:, 0].copy_(torch.tensor([1, 3, 1, 2]))),
     "does not match the module's residual metadata"),
    ("negative rank", dict(tensor_edit=lambda t: t["resid_ranks"][:, 0].copy_(torch.tensor([-1, 3, 2, 2]))),
     "does not match the module's residual metadata"),
    ("ranks missing", dict(tensor_edit=lambda t: t.pop("resid_ranks")), "'resid_ranks' missing or not of shape (4, 3)"),
    ("ranks float", dict(tensor_edit=lambda t: t.update({"resid_ranks": t["resid_ranks"].float()})),
     "int16/int32"),
    ("ranks of a module without residual", dict(tensor_edit=lambda t: t["resid_ranks"][:, 2].fill_(1)),
     "which has no 'residual' metadata"),
    # format v3: the rows of all modules are one flat tensor per role (c_attn 6 x 24 then c_proj 6 x 8 in resid_B)
    ("A truncated", dict(tensor_edit=lambda t: t.update({"resid_A": t["resid_A"][:-16].clone()})),
     "tensor 'resid_A' of shape (128,) F32: the residual rows of 2 module(s) (total_rank x d_in each"),
    ("B too long", dict(tensor_edit=lambda t: t.update({"resid_B": torch.cat([t["resid_B"], torch.zeros(8)])})),
     "need shape (192,)"),
    ("B missing", dict(tensor_edit=lambda t: t.pop("resid_B")), "tensor 'resid_B' missing: the residual rows"),
    ("B not flat", dict(tensor_edit=lambda t: t.update({"resid_B": t["resid_B"].reshape(8, 24)})),
     "tensor 'resid_B' of shape (8, 24) F32"),
    ("B int", dict(tensor_edit=lambda t: t.update({"resid_B": t["resid_B"].to(torch.int32)})), "a float or int8 dtype"),
    ("scales of float rows", dict(tensor_edit=lambda t: t.update({"qscale/resid_B": torch.ones(12)})),
     "tensor 'qscale/resid_B' scales 'resid_B', which is not int8"),
    ("int8 rows without scales", dict(tensor_edit=lambda t: t.update({"resid_A": t["resid_A"].to(torch.int8)})),
     "tensor 'qscale/resid_A' missing or not of shape (12,)"),
    ("own scales of packed rows", dict(tensor_edit=lambda t: t.update({f"qscale/resid_B/{M0}": torch.ones(6)})),
     f"tensor 'qscale/resid_B/{M0}' stored without 'resid_B/{M0}'"),
    ("packed rows of no module", dict(meta_edit=lambda d: [m.pop("residual", None) for m in d["modules"]],
                                      tensor_edit=lambda t: t.pop("resid_A")),
     "tensor 'resid_B' stored, but no module keeps its residual rows there"),
    # a module may keep its own resid_B/<m> (an older v3 file); its shape is checked as in v2
    ("B width", dict(tensor_edit=lambda t: t.update({f"resid_B/{M0}": torch.zeros(6, 23), "resid_B": t["resid_B"][144:]})),
     "not of shape (6, 24)"),
    ("negative module rank", dict(meta_edit=lambda d: _mod(d).update(rank=-1)),
     "modules[0].rank must be a non-negative integer"),
])
def test_bad_residual_parts(small, tmp_path, what, kw, message):
    bad = resave_artifact(small["path"], tmp_path / "bad.safetensors", **kw)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_artifact(bad)


def test_rank_zero_top_level_and_nan(small, tmp_path):
    ok = resave_artifact(small["path"], tmp_path / "r0.safetensors", meta_edit=lambda d: d.update(rank=0))
    assert load_artifact(ok).meta["rank"] == 0  # allowed in artifacts with rank-0 modules / residual parts
    v1 = small["v1"].save(tmp_path / "v1.lorazip.safetensors")
    bad = resave_artifact(v1, tmp_path / "v1r0.safetensors", meta_edit=lambda d: d.update(rank=0))
    with pytest.raises(ArtifactError, match="'rank' must be a positive integer"):
        load_artifact(bad)

    def nan(t):
        t["resid_A"][4 * 8] = float("nan")  # row 4 of M0's a rows (M0 is first in the packed resid_A)

    bad = load_artifact(resave_artifact(small["path"], tmp_path / "nan.safetensors", tensor_edit=nan))
    bad.module_residuals(M0, [0, 1])  # rows 0..3: finite
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        bad.module_residuals(M0, [3])


def test_evaluate_and_storage(small):
    art, coll = small["art"], small["coll"]
    recorded = lorazip.evaluate(art)
    recomputed = lorazip.evaluate(art, small["root"] / "src")
    assert recomputed["recomputed"]
    for x, y in zip(recorded["adapters"], recomputed["adapters"]):
        assert math.isclose(x["error"], y["error"], rel_tol=1e-6, abs_tol=1e-9)
    v1 = lorazip.evaluate(small["v1"])
    assert recorded["errors"]["mean"] < v1["errors"]["mean"]  # the residual parts help
    st, st1 = recorded["storage"], v1["storage"]
    d = {m["name"]: m["d_in"] + m["d_out"] for m in art.modules}
    c_proj = "transformer.h.0.mlp.c_proj"
    shared_c_proj = 2 * d[c_proj] + 4 * 2 * 2  # rank 2 bases + 4 full 2x2 cores, gone at rank 0
    want = st1["compressed_params"] - shared_c_proj + 6 * d[M0] + 6 * d[c_proj]
    assert st["compressed_params"] == want
    from lorazip.cli.report import storage as header_storage

    assert header_storage(art) == st
    mod = {m["name"]: m for m in recorded["modules"]}
    assert mod[M0]["residual"] == {"max_rank": 3, "total_rank": 6}
    assert "residual" not in mod["transformer.h.1.attn.c_attn"]
    # the recomputed errors equal the exact dense ones
    M = dense_original(coll, M0)
    R = dense_recon(art, M0)
    j = [m["name"] for m in art.modules].index(M0)
    e = ((M - R) ** 2).sum(dim=(1, 2))
    sq, _ = art.stats()
    assert torch.allclose(sq[:, j].double(), e, rtol=1e-6, atol=1e-9)


def test_info_shows_residual_ranks(small, capsys):
    rc, out, _ = run_cli(capsys, "info", small["path"], "--json")
    assert rc == 0
    mods = {m["name"]: m for m in json.loads(out)["modules"]}
    assert mods[M0]["residual"] == {"min_rank": 0, "max_rank": 3, "total_rank": 6}
    assert mods["transformer.h.0.mlp.c_proj"]["rank"] == 0
    assert "residual" not in mods["transformer.h.1.attn.c_attn"]
    rc, _, err = run_cli(capsys, "info", small["path"])  # tables go to stderr
    assert rc == 0 and "res 0-3" in err and "res 0-4" in err and err.count("res ") == 2, err


def test_remove_adapters_drops_row_blocks(small, tmp_path):
    art = small["art"]
    out, _ = lorazip.remove_adapters(art, ["a1"])
    path = out.save(tmp_path / "rm.lorazip.safetensors")
    new = load_artifact(path)
    keep = [0, 2, 3]
    for mod in art.modules:
        for x, y in zip(new.module_residuals(mod["name"]), art.module_residuals(mod["name"], keep)):
            assert torch.equal(x[..., : y.shape[-1]] if x.dim() == 3 else x, y)
        assert torch.allclose(dense_recon(new, mod["name"]), dense_recon(art, mod["name"], keep))
    mods = {m["name"]: m for m in new.modules}
    assert mods[M0]["residual"] == {"max_rank": 2, "total_rank": 3}
    assert mods["transformer.h.0.mlp.c_proj"]["residual"] == {"max_rank": 4, "total_rank": 6}
    # removing every adapter with a residual part in a module drops its residual tensors
    out2, _ = lorazip.remove_adapters(new, ["a0", "a3"])  # left: a2 (k = 0 in c_attn, 2 in c_proj)
    new2 = load_artifact(out2.save(tmp_path / "rm2.lorazip.safetensors"))
    mods = {m["name"]: m for m in new2.modules}
    assert "residual" not in mods[M0] and f"resid_B/{M0}" not in new2.keys()
    assert mods["transformer.h.0.mlp.c_proj"]["residual"] == {"max_rank": 2, "total_rank": 2}
    assert torch.allclose(dense_recon(new2, M0), dense_recon(art, M0, [2]))


def test_add_adapters_gets_rank_zero_residual(small, tmp_path):
    art = small["art"]
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, r=2, seed=21)
    out, rep = lorazip.add_adapters(art, tmp_path / "new", hash_sources=False, threshold=10)
    new = load_artifact(out.save(tmp_path / "add.lorazip.safetensors"))
    assert new.names == ["a0", "a1", "a2", "a3", "b0"]
    for mod in art.modules:
        m = mod["name"]
        b, a, k = new.module_residuals(m)
        b0, a0, k0 = art.module_residuals(m)
        assert k.tolist() == k0.tolist() + [0]
        assert torch.equal(b[:4], b0) and torch.equal(a[:4], a0) and not b[4].any()
        assert new._module(m).get("residual") == mod.get("residual")
    # the rank-0 module gives the new adapter a zero delta there; its error says so
    j = [m["name"] for m in new.modules].index("transformer.h.0.mlp.c_proj")
    sq, nn = new.stats()
    assert math.isclose(float(sq[4, j]), float(nn[4, j]), rel_tol=1e-6)
    rep_eval = lorazip.evaluate(new, [small["root"] / "src", tmp_path / "new"])
    for x, y in zip(lorazip.evaluate(new)["adapters"], rep_eval["adapters"]):
        assert math.isclose(x["error"], y["error"], rel_tol=1e-6, abs_tol=1e-9)


def test_refit_drops_residual_parts(small, tmp_path):
    art = small["art"]
    write_adapter(tmp_path / "new" / "b0", GPT2_LIKE, r=2, seed=21)
    out, rep = lorazip.add_adapters(art, tmp_path / "new", refit=True, hash_sources=False, threshold=10, max_iters=20)
    new = load_artifact(out.save(tmp_path / "refit.lorazip.safetensors"))
    mods = {m["name"]: m for m in new.modules}
    assert "residual" not in mods[M0] and not [k for k in new.keys() if k.startswith("resid_") and M0 in k]
    assert mods["transformer.h.0.mlp.c_proj"]["rank"] == 0  # not refit: keeps its residual parts
    assert new.module_residuals("transformer.h.0.mlp.c_proj")[2].tolist() == [4, 0, 2, 0, 0]
    rec = lorazip.evaluate(new, [small["root"] / "src", tmp_path / "new"])
    for x, y in zip(lorazip.evaluate(new)["adapters"], rec["adapters"]):
        assert math.isclose(x["error"], y["error"], rel_tol=1e-6, abs_tol=1e-9)


# -- export through PEFT, serving ------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@dataclass
class Zoo:
    kind: str
    base: torch.nn.Module
    src: Path
    names: list[str]
    ids: torch.Tensor
    conv1d: bool
    art: Artifact | None = None
    out: Path | None = None
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
        "g2": LoraConfig(target_modules=["c_attn"], r=2, lora_alpha=8, use_rslora=True, **common),
        "g3": LoraConfig(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=2, **common),
    }
    make_peft_adapters(base, configs, root / "gpt2", seed=1)
    ids = torch.randint(0, 100, (6, 5), generator=torch.Generator().manual_seed(5))
    return Zoo("gpt2", base, root / "gpt2", sorted(configs), ids, conv1d=True)


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
        "l3": LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4, **common),
    }
    make_peft_adapters(base, configs, root / "llama", seed=2)
    ids = torch.randint(0, 100, (6, 5), generator=torch.Generator().manual_seed(6))
    return Zoo("llama", base, root / "llama", sorted(configs), ids, conv1d=False)


def _residual_plan(coll: lorazip.Collection, rank0: str, plain: str) -> dict[str, list[int]]:
    """Mixed residual ranks: (i + j) % 3 where adapter i adapts module j, none in module ``plain``;
    the rank-0 module gets the adapter's full rank for even i and 0 for odd i."""
    ks = {}
    for j, m in enumerate(coll.modules):
        if m.name == plain:
            continue
        ks[m.name] = [
            (((a.modules[m.name].rank if i % 2 == 0 else 0) if m.name == rank0 else (i + j) % 3)
             if m.name in a.modules else 0)
            for i, a in enumerate(coll.adapters)
        ]
    return ks


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def zoo(request, tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp(f"v2-{request.param}")
    z = _gpt2(root) if request.param == "gpt2" else _llama(root)
    coll = lorazip.load_collection(z.src)
    art = lorazip.compress(coll, 2, device="cpu", hash_sources=False)
    rank0 = "model.embed_tokens" if z.kind == "llama" else "transformer.h.1.attn.c_attn"
    plain = "model.layers.0.self_attn.v_proj" if z.kind == "llama" else "transformer.h.0.mlp.c_proj"
    ks = _residual_plan(coll, rank0, plain)
    if z.kind == "llama":  # a rank-0 linear module too, with an adapter that adapts it but gets k = 0
        ks["model.layers.1.self_attn.v_proj"] = [2, 0, 1, 0]
        rank0s = (rank0, "model.layers.1.self_attn.v_proj")
    else:
        rank0s = (rank0,)
    z.art = load_artifact(make_v2(art, coll, ks, rank0=rank0s).save(root / f"{z.kind}.lorazip.safetensors"))
    assert {m["name"] for m in z.art.modules if m["rank"] == 0} == set(rank0s)
    z.out = root / "exported"
    lorazip.export(z.art, z.out)
    return z


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft(zoo: Zoo, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(zoo.base), str(zoo.out / name)).eval()


def _merged(zoo: Zoo, name: str):
    """Base model with W + (U S V^T + b a) of adapter ``name`` on every module it adapts."""
    art = zoo.art
    i = art.index(name)
    model = copy.deepcopy(zoo.base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for mod in art.modules:
            if mod["name"] not in art.meta["adapters"][i]["ranks"]:
                continue
            delta = dense_recon(art, mod["name"], [i])[0]
            w = params[f"{mod['name']}.weight"]
            w += (delta.T if zoo.conv1d and mod["layout"] != "embedding" else delta).to(w.dtype)
    return model.eval()


def test_export_v2_through_peft(zoo):
    art = zoo.art
    base = _logits(zoo.base, zoo.ids)
    for name in zoo.names:
        i = art.index(name)
        cfg = json.loads((zoo.out / name / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
        exported = lorazip.io.peft.load_adapter(zoo.out / name)
        want_ranks = {}
        for mod in art.modules:
            m = mod["name"]
            if m not in art.meta["adapters"][i]["ranks"]:
                continue
            k = int(art.module_residuals(m, [i])[2][0])
            if mod["rank"] + k:
                want_ranks[m] = mod["rank"] + k
        assert cfg["target_modules"] == sorted(want_ranks)
        assert {m: s.rank for m, s in exported.modules.items()} == want_ranks
        assert {s.scale for s in exported.modules.values()} == {1.0}
        for m, spec in exported.modules.items():  # the exported delta is the reconstruction
            B, A = exported.factors(m)
            assert torch.allclose(B.double() @ A.double(), dense_recon(art, m, [i])[0], atol=1e-5)
        got = _logits(_peft(zoo, name), zoo.ids)
        zoo.cache[name] = got
        assert float((got - base).abs().max()) > 1e-3
        want = _logits(_merged(zoo, name), zoo.ids)
        assert torch.allclose(got, want, **TOL), float((got - want).abs().max())
    # to_peft gives the same tensors as the folders
    from safetensors.torch import load_file

    from lorazip.export import to_peft

    state, config = to_peft(art, zoo.names[0])

    saved = load_file(str(zoo.out / zoo.names[0] / "adapter_model.safetensors"))
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert config == json.loads((zoo.out / zoo.names[0] / "adapter_config.json").read_text())


def test_export_excluded_module(zoo):
    """A module an adapter adapts but where it has neither shared rank nor residual part is left out."""
    art, left_out = zoo.art, 0
    for i, name in enumerate(zoo.names):
        cfg = json.loads((zoo.out / name / "adapter_config.json").read_text())
        for mod in art.modules:
            if mod["name"] in art.meta["adapters"][i]["ranks"]:
                k = int(art.module_residuals(mod["name"], [i])[2][0])
                assert (mod["name"] in cfg["target_modules"]) is (mod["rank"] + k > 0)
                left_out += mod["rank"] + k == 0
    assert left_out  # g1, g3 in the rank-0 c_attn of layer 1; l1 in the rank-0 v_proj of layer 1


def test_serve_v2_mixed_batch_matches_peft(zoo):
    ref = {None: _logits(zoo.base, zoo.ids)}
    for name in zoo.names:
        ref[name] = zoo.cache.get(name)
        if ref[name] is None:
            ref[name] = _logits(_peft(zoo, name), zoo.ids)
    model = lorazip.apply(copy.deepcopy(zoo.base), zoo.art)
    layers = [mm for mm in model.modules() if isinstance(mm, (BatchedLoraLinear, BatchedLoraEmbedding))]
    assert any(layer.residual_rank for layer in layers) and any(not layer.shared for layer in layers)
    assert any(not layer.residual_rank for layer in layers)
    n = zoo.names
    rows = [n[0], n[1], None, n[2], n[3], n[1]]
    with use_adapters(model, rows):
        got = _logits(model, zoo.ids)
    want = torch.stack([ref[name][j] for j, name in enumerate(rows)])
    assert torch.allclose(got, want, **TOL), float((got - want).abs().max())
    with use_adapters(model, n[2]):  # one adapter for the whole batch
        assert torch.allclose(_logits(model, zoo.ids), ref[n[2]], **TOL)
    with torch.enable_grad():  # the out-of-place path (autograd on) gives the same
        with use_adapters(model, rows):
            got2 = model(input_ids=zoo.ids).logits.detach()
    assert torch.allclose(got2, want, **TOL)
    # a subset of adapters: only their residual rows are loaded
    sub = lorazip.apply(copy.deepcopy(zoo.base), zoo.art, adapters=[n[3], n[0]])
    with use_adapters(sub, [1, 0, None, n[3], 0, 1]):
        got = _logits(sub, zoo.ids)
    rows = [n[0], n[3], None, n[3], n[3], n[0]]
    assert torch.allclose(got, torch.stack([ref[name][j] for j, name in enumerate(rows)]), **TOL)
    assert torch.allclose(_logits(model, zoo.ids), ref[None], **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serve_v2_cuda_matches_cpu(zoo):
    rows = [zoo.names[0], None, zoo.names[2], zoo.names[1], zoo.names[3], zoo.names[2]]
    ids = [-1 if r is None else zoo.names.index(r) for r in rows]
    cpu = lorazip.apply(copy.deepcopy(zoo.base), zoo.art)
    with use_adapters(cpu, rows):
        want = _logits(cpu, zoo.ids)
    model = lorazip.apply(copy.deepcopy(zoo.base), zoo.art).cuda()
    layer = next(mm for mm in model.modules() if isinstance(mm, (BatchedLoraLinear, BatchedLoraEmbedding))
                 and mm.residual_rank)
    assert layer.res_in.is_cuda and layer.res_out.is_cuda
    with use_adapters(model, torch.tensor(ids, device="cuda")):
        got = _logits(model, zoo.ids.cuda()).cpu()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())


# -- the bare layers against dense references --------------------------------------------------------
def _residual_factors(n, d_out, d_in, kmax, g):
    ks = torch.randint(0, kmax + 1, (n,), generator=g)
    ks[0] = kmax
    b = torch.randn(n, d_out, kmax, generator=g)
    a = torch.randn(n, kmax, d_in, generator=g)
    for i, k in enumerate(ks.tolist()):
        b[i, :, k:] = 0
        a[i, k:] = 0
    return b, a


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("K", [1, 2])
def test_linear_layer_residual(conv1d, r, K):
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(7 + r + K)
    d_in, d_out, n = 7, 5, 4
    base = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
    U, V = torch.randn(K, d_out, r, generator=g), torch.randn(K, d_in, r, generator=g)
    cores = torch.randn(n, r, r, generator=g)
    assign = torch.randint(0, K, (n,), generator=g)
    b, a = _residual_factors(n, d_out, d_in, 3, g)
    layer = BatchedLoraLinear(base, U, V, cores, assign, residual=(b, a))
    assert layer.residual_rank == 3 and layer.shared is (r > 0)
    ids = torch.tensor([0, -1, 3, 1, 2, 0])
    x = torch.randn(6, 4, d_in, generator=g)
    with torch.no_grad():
        got = layer(x, adapter_ids=ids)
        want = base(x).double()
        for j, i in enumerate(ids.tolist()):
            if i >= 0:
                M = U[assign[i]].double() @ cores[i].double() @ V[assign[i]].double().T + b[i].double() @ a[i].double()
                want[j] += x[j].double() @ M.T
    assert torch.allclose(got.double(), want, **TOL)
    assert layer.adapter_bytes() == 4 * (U.numel() + V.numel() + (n + 1) * (r * r + 3 * (d_in + d_out)))
    with pytest.raises(lorazip.OptionError, match="residual parts must be"):
        BatchedLoraLinear(base, U, V, cores, assign, residual=(b[:, :4], a))


@pytest.mark.parametrize("r", [0, 2])
def test_embedding_layer_residual(r):
    g = torch.Generator().manual_seed(11 + r)
    vocab, dim, n = 13, 6, 3
    base = torch.nn.Embedding(vocab, dim)
    U, V = torch.randn(1, vocab, r, generator=g), torch.randn(1, dim, r, generator=g)
    cores = torch.randn(n, r, generator=g)  # diagonal cores
    b, a = _residual_factors(n, vocab, dim, 2, g)
    layer = BatchedLoraEmbedding(base, U, V, cores, residual=(b, a))
    ids = torch.tensor([2, -1, 0, 1])
    tok = torch.randint(0, vocab, (4, 5), generator=g)
    with torch.no_grad():
        got = layer(tok, adapter_ids=ids)
        want = base(tok).double()
        for j, i in enumerate(ids.tolist()):
            if i >= 0:
                M = U[0].double() @ torch.diag(cores[i].double()) @ V[0].double().T + b[i].double() @ a[i].double()
                want[j] += M[tok[j]]
    assert torch.allclose(got.double(), want, **TOL)
