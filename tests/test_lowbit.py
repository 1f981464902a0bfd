"""Low-bit residual rows (format v5): the quantiser, packing, the bit allocation and every reader."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from helpers import run_cli as run
from helpers import LOWBIT_BYTES, LOWBIT_MODULES, lowbit_artifact, lowbit_collection, write_collection
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import lorazip
from lorazip import lowbit
from lorazip.evaluate import svd_at_bits
from lorazip.metrics import per_adapter

curves_mod = importlib.import_module("lorazip.compress.curves")
allocate_mod = importlib.import_module("lorazip.compress.allocate")


def _reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """float64 values of the codes, and a check that each is the nearest level for its scale."""
    h = (2**bits - 1) / 2
    s = scales.astype(np.float64)
    levels = (np.arange(2**bits) - h)[None, None, :] * s[:, :1, None]  # (N, 1, 2^b)
    nearest = np.abs(x[:, :, None] - levels).argmin(-1)
    dist = np.abs(x[:, :, None] - levels)
    picked = np.take_along_axis(dist, codes[:, :, None].astype(np.int64), -1)[..., 0]
    assert np.all(picked <= dist.min(-1) + 1e-6 * np.abs(x).max()), "a code is not the nearest level"
    assert nearest.shape == codes.shape
    return (codes.astype(np.float64) - h) * s[:, :1]


@pytest.mark.parametrize("bits", lowbit.BITS)
def test_quantiser_round_trip_against_float64(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(40, 96, generator=gen, dtype=torch.float64) * torch.logspace(-6, 2, 40, dtype=torch.float64)[:, None]
    codes, scales = lowbit.quantize(x, bits)
    assert codes.dtype == np.uint8 and codes.max() < 2**bits and scales.shape == (40, 1)
    assert np.array_equal(scales, torch.from_numpy(scales).to(torch.bfloat16).float().numpy())  # bfloat16 values
    ref = _reference(x.numpy(), codes, scales, bits)
    got = lowbit.dequantize(codes, scales, bits)
    assert np.allclose(got, ref, rtol=1e-6, atol=0)  # the reader's float32 values are the float64 ones, rounded
    rel = ((got - x.numpy()) ** 2).sum(1) / (x.numpy() ** 2).sum(1)
    gauss = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154, 8: 5e-5}[bits]  # the best uniform grid on N(0, 1)
    assert rel.mean() <= gauss * 1.25 + 1e-6  # every row scaled alike: its magnitude does not matter
    # never worse than the plain choice of scale (the largest value on the outermost level)
    amax = np.abs(x.numpy()).max(1, keepdims=True)
    naive_s = torch.from_numpy(2 * amax / (2**bits - 1)).to(torch.bfloat16).double().numpy()
    h = (2**bits - 1) / 2
    naive = (np.clip(np.round(x.numpy() / naive_s + h), 0, 2 * h) - h) * naive_s
    ours, plain = ((got - x.numpy()) ** 2).sum(1), ((naive - x.numpy()) ** 2).sum(1)
    assert (ours <= plain * 1.05).all() and (ours / plain).mean() <= 1.0 + 1e-3  # (float32 search: 8 bits ties)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 9), length=st.integers(1, 300), group=st.sampled_from([None, 32]),
       seed=st.integers(0, 2**31 - 1))
def test_quantiser_values_are_the_readers_bit_for_bit(n, length, group, seed):
    """The values the quantiser hands back with its codes (what the builds measure errors on) are what a
    reader decodes, bit for bit (signed zeros of zero rows included), at every width, rows of mixed widths
    and groups of a row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=gen) * torch.rand(n, 1, generator=gen)
    if n > 1:
        x[1] = 0
    widths = np.resize(np.array(lowbit.BITS), n)
    for bits in (widths, *lowbit.BITS):
        codes, scales, vals = lowbit.quantize(x, bits, group, values=True)
        want = lowbit.dequantize(codes, scales, bits, group)
        assert vals.dtype == np.float32 and np.array_equal(vals.view(np.uint32), want.view(np.uint32))
        again = lowbit.quantize(x, bits, group)
        assert np.array_equal(again[0], codes) and np.array_equal(again[1], scales)


def _search_reference(x: np.ndarray, bits: int) -> np.ndarray:
    """float64 errors per row of the documented scale search done plainly: each clipping level's codes
    and dequantised values, the least error's level, two least-squares refinements, the scale rounded
    to bfloat16 and the codes taken again."""
    h = (2**bits - 1) / 2
    a = np.abs(x)
    amax, rms = a.max(1), np.sqrt((x * x).mean(1))

    def levels(s):
        return np.clip(np.round(x / np.where(s > 0, s, 1.0)[:, None] + h), 0, 2 * h) - h

    if bits == 1:
        s = 2 * a.mean(1)
    elif bits == 8:
        s = amax / h
    else:
        c0 = np.minimum(rms * lowbit._GAUSS_CLIP[bits], amax)
        cand = np.stack([c0 * 0.8, c0, np.minimum(c0 * 1.25, amax), amax]) / h
        err = np.stack([((levels(c) * c[:, None] - x) ** 2).sum(1) for c in cand])
        s = cand[err.argmin(0), np.arange(len(x))]
        for _ in range(2):
            lv = levels(s)
            den, num = (lv * lv).sum(1), (lv * x).sum(1)
            ls = num / np.maximum(den, 1e-30)
            s = np.where((den > 0) & (ls > 0), ls, s)
    s = torch.from_numpy(np.where(amax > 0, s, 0.0)).to(torch.bfloat16).double().numpy()
    return ((levels(s) * s[:, None] - x) ** 2).sum(1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), length=st.integers(2, 400), seed=st.integers(0, 2**31 - 1),
       tail=st.sampled_from(["gauss", "laplace", "outlier"]))
def test_quantiser_scale_search_against_a_plain_float64_one(n, length, seed, tail):
    """The search's clipping levels are compared by the error's closed form (``c^2 l.l - 2 c l.x``) and
    its first refinement is read off the same sums: each row's error is the plain search's (levels
    compared on their dequantised values, in float64), to float32's precision."""
    rng = np.random.default_rng(seed)
    x = {"gauss": rng.standard_normal, "laplace": rng.laplace,
         "outlier": rng.standard_normal}[tail]((n, length)) * rng.uniform(0.01, 10, (n, 1))
    if tail == "outlier":
        x[:, rng.integers(length)] *= 25
    x = x.astype(np.float32).astype(np.float64)
    for bits in lowbit.BITS:
        codes, scales = lowbit.quantize(torch.from_numpy(x), bits)
        got = ((lowbit.dequantize(codes, scales, bits).astype(np.float64) - x) ** 2).sum(1)
        want = _search_reference(x, bits)
        assert np.all(got <= want * (1 + 2e-3) + 1e-12 * (x * x).sum(1)), (bits, got / want)


def test_quantiser_edge_rows():
    x = torch.zeros(3, 10, dtype=torch.float64)
    x[1, 4] = 3.0
    x[2] = -1e-30
    for bits in lowbit.BITS:
        codes, scales = lowbit.quantize(x, bits)
        got = lowbit.dequantize(codes, scales, bits)
        assert np.all(got[0] == 0) and np.isfinite(got).all()
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = torch.ones(4, 9)
        y[2, 5] = bad
        with pytest.raises(ValueError, match="NaN"):
            lowbit.quantize(y, 2)
    big = torch.full((2, 4), 3e38)  # finite values whose float32 sum overflows: not refused
    big[0, 0] = 1.0
    codes, scales = lowbit.quantize(big, 8)
    assert np.isfinite(lowbit.dequantize(codes, scales, 8)).all()
    with pytest.raises(ValueError, match="bits"):
        lowbit.quantize(torch.ones(2, 2), 5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), length=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_packing_round_trips_bit_for_bit(n, length, seed):
    rng = np.random.default_rng(seed)
    bits = rng.choice(lowbit.BITS, size=n)
    codes = np.stack([rng.integers(0, 2**b, size=length) for b in bits]).astype(np.uint8) if n else \
        np.zeros((0, length), np.uint8)
    buf = lowbit.pack(codes, bits)
    assert buf.dtype == np.uint8 and len(buf) == sum((length * int(b) + 7) // 8 for b in bits)
    assert len(buf) == lowbit.packed_bytes(length, bits) == lowbit.row_offsets(length, bits)[-1]
    assert np.array_equal(lowbit.unpack(buf, bits, length), codes)
    offs = lowbit.row_offsets(length, bits)
    for i in range(n):  # any row alone, from its own bytes
        assert np.array_equal(lowbit.unpack(buf[offs[i] : offs[i + 1]], bits[i : i + 1], length)[0], codes[i])


@pytest.mark.parametrize("length", [1, 3, 7, 8, 9, 16, 17, 23, 64, 101])
@pytest.mark.parametrize("order", ["interleaved", "runs", "mixed"])
def test_packed_layout_is_least_significant_bit_first(length, order):
    """The file's layout, bit by bit: a row's codes in order, each code's bits from the least
    significant, filling bytes from their least significant bit (numpy's little bit order). Rows of
    one width interleaved with others, in long runs, and both (the packer's two ways of placing a block)."""
    rng = np.random.default_rng(length)
    bits = {"interleaved": np.array(lowbit.BITS * 3), "runs": np.repeat(lowbit.BITS, 9),
            "mixed": np.concatenate([np.repeat(lowbit.BITS, 6), lowbit.BITS * 2, [3] * 11])}[order]
    codes = (rng.integers(0, 256, size=(len(bits), length)) & ((1 << bits) - 1)[:, None]).astype(np.uint8)
    rows = [np.packbits(((c[:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1), bitorder="little")
            for c, b in zip(codes, bits)]
    assert np.array_equal(lowbit.pack(codes, bits), np.concatenate(rows))
    assert np.array_equal(lowbit.unpack(np.concatenate(rows), bits, length), codes)


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return lowbit_collection(tmp_path_factory.mktemp("lowbit") / "src", seed=5)


@pytest.fixture(scope="module")
def art(coll):
    return lowbit_artifact(coll)


def test_budget_held_on_the_file_and_errors_exact(art, coll, tmp_path):
    budget = art.allocation["budget_bytes"]
    path = art.save(tmp_path / "a.lorazip.safetensors")
    assert path.stat().st_size == art.serialized_size() <= budget
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "7"  # low-bit parts: compact spectra, ranks, metadata
        assert {"qbits", "lowbit/resid_B", "lowbit/resid_A"} <= set(f.keys())
        assert f.get_slice("spectra").get_dtype() == "U8" and f.get_slice("resid_ranks").get_dtype() == "U8"
        assert f.metadata()["lorazip_z"].startswith("x:")
    back = lorazip.load_artifact(path)
    for key, t in art.tensors().items():  # the file reads back as what was built
        assert torch.equal(back.raw(key), t), key
    # the recorded errors are those of the dequantised values, recomputed against the originals
    rec = lorazip.evaluate(back, sources=[a.path for a in coll.adapters])
    assert rec["errors"]["mean"] == pytest.approx(float(per_adapter(*art.stats()).mean()), rel=1e-6)
    rep = lorazip.evaluate(back)
    assert rep["bits"]["bits_per_number"] < 8 and rep["bits"]["pairs"] == 18
    from lorazip.evaluate import storage_bits

    assert storage_bits(back) == storage_bits(art) == art.allocation["bits"]  # from the header, as built
    sm = rep["baseline"]["svd_matched_storage"]
    assert {"SVD at 2 bits", "SVD at 4 bits", "SVD at 16 bits"} <= set(sm["alternatives"])
    assert rep["errors"]["mean"] <= sm["mean"] * 1.05  # at or ahead of the best per-adapter alternative


def test_dry_assembly_sizes_the_file_without_its_bytes(coll, monkeypatch, tmp_path):
    """A budget's dry assemblies (zeros for parts, a stand-in checksum, spectra codes not made) give
    the size of the same assembly made in full to within the budget's slack, and are never written."""
    budget = importlib.import_module("lorazip.compress.budget")
    build = importlib.import_module("lorazip.compress.build")
    real, sizes = build.build_allocation, []

    def spy(*a, **k):
        art = real(*a, **k)
        if k.get("dry"):
            full = real(*a, **k)
            full.dry = False  # the same zeros, with the checksum, the spectra's codes and the rounding
            sizes.append((art.serialized_size(), full.serialized_size()))
            with pytest.raises(ValueError, match="dry assembly"):
                art.save(tmp_path / "dry.lorazip.safetensors")
        return art

    monkeypatch.setattr(budget, "build_allocation", spy)
    lorazip.compress(coll, budget=LOWBIT_BYTES, hash_sources=False)
    assert sizes and all(abs(a - b) <= budget._SLACK // 2 for a, b in sizes), sizes
    assert not (tmp_path / "dry.lorazip.safetensors").exists()


def test_predicted_quantisation_error_matches_the_exact_one(art):
    predicted = art.allocation["predicted_mean_error"]
    exact = float(per_adapter(*art.stats()).mean())
    assert exact == pytest.approx(predicted, rel=0.15)


def test_packed_rows_are_made_a_module_at_a_time_and_write_the_same_file(art, tmp_path):
    """The flat packed rows of the file are made module by module while they are hashed and written
    (never held whole beside the codes); the file equals one written from the whole tensors."""
    from lorazip.artifact import tensor_checksum, write_safetensors
    from lorazip.layout import LOWBIT, Streamed, encode_meta, pack

    streamed = pack(art.tensors(), art.meta)
    flat = {k: v for k, v in streamed.items() if isinstance(v, Streamed)}
    assert set(flat) == {LOWBIT + "resid_B", LOWBIT + "resid_A"}
    mods = [m for m in art.modules if (m.get("residual") or {}).get("bits")]
    for key, t in flat.items():
        pieces = list(t.pieces())
        assert len(pieces) == len(mods) and sum(len(p) for p in pieces) == t.numel()
        role = key[len(LOWBIT):]
        for mod, piece in zip(mods, pieces):
            codes = art.tensors()[f"{role}/{mod['name']}"].numpy()
            assert np.array_equal(piece, lowbit.pack(codes, art.tensors()[f"qbits/{mod['name']}"].numpy()))
    whole = {k: (v.materialize() if isinstance(v, Streamed) else v) for k, v in streamed.items()}
    assert tensor_checksum(whole) == tensor_checksum(streamed)
    path = art.save(tmp_path / "s.lorazip.safetensors")
    doc = dict(art.meta)
    header = {"format": "lorazip", "format_version": str(lorazip.artifact.written_version(doc)),
              "lorazip_z": encode_meta(doc, True)}
    write_safetensors(whole, tmp_path / "w.safetensors", header)
    assert (tmp_path / "w.safetensors").read_bytes() == path.read_bytes()
    assert path.stat().st_size == art.serialized_size()


def test_rows_read_alone_equal_the_whole(art, tmp_path):
    back = lorazip.load_artifact(art.save(tmp_path / "r.lorazip.safetensors"))
    for mod in back.modules:
        b, a, ks = back.module_residuals(mod["name"])
        b_mem, a_mem, ks_mem = art.module_residuals(mod["name"])
        assert torch.equal(b, b_mem) and torch.equal(a, a_mem) and torch.equal(ks, ks_mem)
        for rows in ([0], [5, 2], [1, 3, 4]):
            bs, as_, k = back.module_residuals(mod["name"], rows)
            for j, i in enumerate(rows):
                kk = int(k[j])
                assert torch.equal(bs[j, :, :kk], b[i, :, :kk]) and torch.equal(as_[j, :kk], a[i, :kk])


def test_export_matches_the_dense_reconstruction(art, coll):
    name = art.names[2]
    state, config = lorazip.to_peft(art, name)
    i = art.index(name)
    for mod in art.modules:
        m = mod["name"]
        U, V, cores, _ = art.module_factors(m, [i])
        b, a, _ = art.module_residuals(m, [i])
        dense = U[0].double() @ cores[0].double() @ V[0].double().T + b[0].double() @ a[0].double()
        keyB = next(k for k in state if k.endswith(f"{m}.lora_B.weight"))
        keyA = keyB.replace("lora_B", "lora_A")
        got = state[keyB].double() @ state[keyA].double()
        assert torch.allclose(got, dense, atol=1e-6 * float(dense.abs().max()))


def test_remove_and_add_keep_the_stored_rows(art, coll, tmp_path):
    from lorazip.update import add_adapters, remove_adapters

    out, _ = remove_adapters(art, [art.names[1]])
    for m in [mod["name"] for mod in art.modules]:
        b, a, ks = art.module_residuals(m, [0, 2, 3, 4, 5])
        b2, a2, ks2 = out.module_residuals(m)
        assert torch.equal(ks, ks2) and torch.equal(b, b2) and torch.equal(a, a2)
    back = lorazip.load_artifact(out.save(tmp_path / "removed.lorazip.safetensors"))
    assert back.names == [n for n in art.names if n != art.names[1]]
    root = tmp_path / "new"
    write_collection(root, n=2, modules=LOWBIT_MODULES, r=8, seed=99)
    for p in list(root.iterdir()):
        p.rename(root / f"new_{p.name}")
    added, _ = add_adapters(art, root)
    for m in [mod["name"] for mod in art.modules]:
        b, a, _ = art.module_residuals(m)
        b2, a2, _ = added.module_residuals(m, list(range(len(art.names))))
        assert torch.equal(b, b2[:, :, : b.shape[2]]) and torch.equal(a, a2[:, : a.shape[1]])
    lorazip.load_artifact(added.save(tmp_path / "added.lorazip.safetensors"))


def test_target_met_on_the_exact_error(coll):
    for target in (0.02, 0.1):
        got = lorazip.compress(coll, target_error=target, hash_sources=False, keep_extras=False)
        assert float(per_adapter(*got.stats()).mean()) <= target
        assert "bits" in {d["dtype"] for d in got.allocation["clusters_tried"]}


def test_max_statistic_with_bits(coll):
    """--target-stat max: the worst adapter gets the next step per byte first; budget and target hold."""
    full = LOWBIT_BYTES
    got = lorazip.compress(coll, budget=int(0.12 * full), target_stat="max", hash_sources=False, keep_extras=False)
    assert got.serialized_size() <= int(0.12 * full) and "qbits/l.0.q" in got.tensors()
    errs = per_adapter(*got.stats())
    mean_run = lorazip.compress(coll, budget=int(0.12 * full), hash_sources=False, keep_extras=False)
    assert float(errs.max()) <= float(per_adapter(*mean_run.stats()).max()) * 1.05
    t = lorazip.compress(coll, target_error=0.1, target_stat="max", hash_sources=False, keep_extras=False)
    assert float(per_adapter(*t.stats()).max()) <= 0.1


def test_fixed_dtype_fixes_the_bits(coll):
    full = LOWBIT_BYTES
    got = lorazip.compress(coll, budget=int(0.2 * full), storage_dtype="int8", hash_sources=False, keep_extras=False)
    assert got.allocation["bits"]["histogram"].keys() <= {"8"}
    assert not any(k.startswith("qbits/") for k in got.tensors())


def _fits(coll):
    E = None
    fits = []
    for info in coll.modules:
        f = coll.module_factors(info.name, dtype=torch.float32)
        fits.append(curves_mod.fit_module(f.B, f.A, info.name, 0, weighting="relative", seed=0, tol=1e-6,
                                     max_iters=100))
    E = torch.stack([f.norms2 for f in fits], 1).sum(1).numpy()
    return fits, E


@settings(max_examples=25, deadline=None)
@given(frac=st.floats(0.02, 0.9))
def test_allocation_never_worse_than_one_precision(coll, frac):
    """At any budget the bit allocation (per-adapter parts: shared rank 0) predicts no more error than
    per-adapter SVD at the best single precision with the same error model and bytes (lorazip also
    pays one byte per stored row for its bit table, given to it on top). The same model: the baselines
    know a module's leading and second components' profile (what files record), so the allocator is given
    those two classes too (every later component at the second's)."""
    fits, E = _fits(coll)
    for f in fits:
        f.quant = f.quant[:2]
    curves = allocate_mod.StepCurves(fits, E, bits=True)
    total = curves.max_size()
    budget = frac * total
    spectra = [f.spectra[0].sqrt().float() for f in fits]
    mods = [{"d_out": f.d_out, "d_in": f.d_in, "quant": [float(x) for x in f.quant[0]],  # the same profile,
             "quant_rest": [float(b / a) if a > 0 else 1.0 for a, b in zip(*f.quant)]} for f in fits]  # unrounded
    norms2 = torch.stack([f.norms2 for f in fits], 1)
    best_single = min(svd_at_bits(spectra, mods, norms2, budget, b)["mean"] for b in (1, 2, 3, 4, 8))
    rows_max = budget / min(lv[1] for f in fits for cls in curves_mod.bit_levels(f) for lv in cls)
    alloc = allocate_mod.allocate_mixed(fits, E, numbers=budget + rows_max, curves=curves)
    step = max(float((f.spectra[0][:, 0] / torch.from_numpy(E)).max()) for f in fits) / len(E)  # one component
    assert alloc.predicted <= best_single + step + 1e-9


def test_reports_show_the_bits(art, tmp_path, capsys):
    path = art.save(tmp_path / "rep.lorazip.safetensors")
    rc, out, err = run(capsys, "eval", path, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    hist = rep["bits"]["histogram"]
    assert sum(hist.values()) > 0 and rep["bits"]["pairs_at_nothing"] >= 0
    rc, out, err = run(capsys, "eval", path)
    text = " ".join((out + err).split())
    assert rc == 0 and "per number" in text and "SVD, same storage" in text
    rc, out, err = run(capsys, "info", path)
    assert rc == 0 and "residual rows at 1-8 bits" in " ".join((out + err).split())
    rc, out, err = run(capsys, "info", path, "--json")
    assert rc == 0 and any(m.get("residual", {}).get("bits") for m in json.loads(out)["modules"])


def test_corrupt_lowbit_metadata_is_one_error(art, tmp_path):
    from helpers import read_doc, write_doc
    from safetensors.torch import save_file

    from lorazip.errors import ArtifactError

    path = art.save(tmp_path / "c.lorazip.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = read_doc(meta)
    doc.pop("checksum", None)
    mod = next(m for m in doc["modules"] if (m.get("residual") or {}).get("bits"))
    mod["residual"]["bits"]["bytes"][0] += 1  # the packed rows no longer add up
    write_doc(meta, doc)
    bad = tmp_path / "bad.lorazip.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ArtifactError, match="lowbit/resid_B"):
        lorazip.load_artifact(bad)
    mod["residual"]["bits"]["bytes"][0] -= 1
    mod["residual"]["bits"]["group"] = 64
    write_doc(meta, doc)
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ArtifactError, match="residual.bits"):
        lorazip.load_artifact(bad)
    # a bit table that disagrees with the packed bytes (sizes intact): one error from either reader
    mod["residual"]["bits"]["group"] = "row"
    write_doc(meta, doc)
    tensors["qbits"] = tensors["qbits"].clone()
    tensors["qbits"][0] = 5
    save_file(tensors, str(bad), metadata=meta)
    art_bad = lorazip.load_artifact(bad, verify=False)
    with pytest.raises(ArtifactError, match="bit widths"):
        art_bad.module_residuals(mod["name"])
    from lorazip.export_core import export_numpy

    with pytest.raises(ArtifactError, match="bit widths"):
        export_numpy(art_bad, tmp_path / "out")


@pytest.mark.parametrize("group", [None, 64])
def test_rows_of_mixed_widths_are_quantised_as_if_alone(group):
    """2, 3 and 4-bit rows share one clip search (each with its own levels): every row's codes and
    scales are those it gets quantised on its own, at its own width."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(90, 200, generator=g) * torch.rand(90, 1, generator=g) ** 3
    x[:2] = 0
    bits = np.array(lowbit.BITS)[torch.randint(0, len(lowbit.BITS), (90,), generator=g).numpy()]
    codes, scales = lowbit.quantize(x, bits, group)
    for i in range(0, 90, 7):
        c, s = lowbit.quantize(x[i : i + 1], int(bits[i]), group)
        np.testing.assert_array_equal(codes[i : i + 1], c)
        np.testing.assert_array_equal(scales[i : i + 1], s)


def test_storage_words_name_only_what_is_stored():
    """The reports' storage wording: no storage dtype where every shared rank is 0 and the rows are low-bit
    (nothing is stored in it), the dtype wherever shared parts are, the low-bit shared parts' widths."""
    from lorazip.cli.report import storage_words

    assert storage_words("int8", True, None, [0, 0]) == "residual rows at 1-8 bits"
    assert storage_words("int8", True, None, [0, 2]) == "int8 + residual rows at 1-8 bits"
    assert storage_words("int8", True, ["4/3"], [0, 2]) == "int8 + residual rows at 1-8 bits, shared parts at 4/3 bits"
    assert storage_words("float16", False, None, [0, 0]) == "float16"
    assert storage_words("float16", False, None, [16]) == "float16"
