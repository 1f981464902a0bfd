"""Low-bit shared bases and cores (format v6, module metadata ``shared_bits``): the packed layout,
every reader (Artifact, the torch-free export), add / remove, verification, the report's bytes."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, read_doc, run_cli, with_low_bit_shared, write_doc
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorazip
from lorazip import lowbit
from lorazip.artifact import file_checksum, load_artifact
from lorazip.errors import ArtifactError
from lorazip.evaluate import evaluate, recompute_errors, storage_bits
from lorazip.export_core import export_numpy
from lorazip.layout import LOWBIT, shared_bit
from lorazip.quantize import QSCALE
from lorazip.update import add_adapters, remove_adapters

MODULES = {"l.0.q": (32, 24), "l.0.v": (24, 32), "l.1.q": (32, 24)}
ROLES = ("U", "V", "cores")


def write_shared(root, n: int, seed: int, groups: int = 1, noise: float = 0.02) -> None:
    """PEFT folders whose rank-4 updates of each module live in ``groups`` shared 3-dim subspace
    pairs (adapter i in group i % groups), plus ``noise``: a shared part pays off."""
    g = torch.Generator().manual_seed(seed)
    bases = {m: [(torch.linalg.qr(torch.randn(do, 3, generator=g))[0], torch.linalg.qr(torch.randn(di, 3, generator=g))[0])
                 for _ in range(groups)] for m, (do, di) in MODULES.items()}
    for i in range(n):
        t = {}
        for m, (do, di) in MODULES.items():
            U, V = bases[m][i % groups]
            t[f"base_model.model.{m}.lora_B.weight"] = (U @ torch.randn(3, 4, generator=g)
                                                        + noise * torch.randn(do, 4, generator=g)).contiguous()
            t[f"base_model.model.{m}.lora_A.weight"] = (torch.randn(4, 3, generator=g) @ V.T).contiguous()
        folder = root / f"a{i:02d}"
        folder.mkdir(parents=True)
        save_file(t, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q", "v"], "base_model_name_or_path": "t"}))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared") / "src"
    write_shared(root, 24, seed=1)
    return root


@pytest.fixture(scope="module")
def base(src):
    """A budget artifact (int8 storage, low-bit residual rows) with a shared part in every module."""
    full = sum(4 * (a + b) * 4 * 24 for a, b in MODULES.values())
    art = lorazip.compress(lorazip.load_collection(src), budget=int(0.2 * full), hash_sources=False,
                           keep_extras=False)
    assert art.meta["storage_dtype"] == "int8" and all(m["rank"] > 0 for m in art.modules)
    assert any((m.get("residual") or {}).get("bits") for m in art.modules), "expected low-bit residual rows"
    return art


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Two clusters (K = 2) at a fixed rank in int8, with their sources."""
    root = tmp_path_factory.mktemp("clustered") / "src"
    write_shared(root, 12, seed=2, groups=2)
    art = lorazip.compress(lorazip.load_collection(root), rank=3, storage_dtype="int8", clusters=2,
                           hash_sources=False, keep_extras=False)
    assert all(m.get("n_clusters") == 2 for m in art.modules)
    return art


def _int8_shared(art):
    """``art`` with every module's bases and cores in int8 with row scales (no ``shared_bits``)."""
    from lorazip.artifact import Artifact
    from lorazip.quantize import to_storage

    meta = json.loads(json.dumps(art.meta))
    tensors = dict(art.tensors())
    for mod in meta["modules"]:
        if mod.pop("shared_bits", None):
            for role in ROLES:
                key = f"{role}/{mod['name']}"
                values = art.get(key)
                del tensors[QSCALE + key]
                to_storage(values, "int8").put(tensors, key)
    return Artifact(meta, tensors=tensors)


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].contiguous().reshape(-1).view(torch.uint8)), k


def _expected_values(art, key: str) -> np.ndarray:
    """Values of a low-bit shared tensor from its stored codes and scales (lorazip.lowbit)."""
    role, name = key.split("/", 1)
    mod = next(m for m in art.modules if m["name"] == name)
    bits = shared_bit(role, mod["shared_bits"])
    return lowbit.shared_values(art.raw(key).numpy(), art.raw(QSCALE + key).float().numpy(), bits, role)


WIDTHS = {"2": (2, 2), "3": (3, 3), "4": (4, 4), "8": (8, 8), "mixed": ([4, 2, 8], [3, 1, 4])}


@pytest.mark.parametrize("widths", WIDTHS)
def test_write_open_round_trip_bit_for_bit(base, widths, tmp_path):
    art = with_low_bit_shared(base, *WIDTHS[widths])
    path = art.save(tmp_path / "s.lorazip.safetensors")
    assert path.stat().st_size == art.serialized_size()
    back = load_artifact(path, verify=True)
    _same_tensors(art.tensors(), back.tensors())
    assert back.meta["checksum"] == file_checksum(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "7"
        keys = set(f.keys())
        assert {LOWBIT + r for r in ROLES} | {QSCALE + LOWBIT + r for r in ROLES} <= keys
        assert not any(k.startswith(("U/", "V/", "cores/", "qscale/U/", "qscale/cores/")) for k in keys)
        for role in ROLES:  # each row at its module's width, on a byte boundary, one bfloat16 scale per row
            want = sum(t.shape[:-1].numel() * lowbit.row_bytes(t.shape[-1], shared_bit(role, m["shared_bits"]))
                       for m in art.modules for t in [art.raw(f"{role}/{m['name']}")])
            assert f.get_slice(LOWBIT + role).get_shape() == [want]
            assert f.get_slice(QSCALE + LOWBIT + role).get_dtype() == "BF16"
    for m in back.modules:
        assert m["shared_bits"] == [shared_bit(r, m["shared_bits"]) for r in ("U", "cores")]
    # the errors recorded are those of the stored values
    _, sq, _ = recompute_errors(back, [str(p) for p in sorted({a["source"]["path"] for a in back.meta["adapters"]})],
                                False, False)
    assert torch.allclose(sq, back.stats()[0], rtol=1e-6, atol=1e-12)


def test_values_and_row_reads(base, tmp_path):
    art = with_low_bit_shared(base, 3, 2)
    back = load_artifact(art.save(tmp_path / "s.lorazip.safetensors"))
    rows = [5, 0, 6, 7, 23]
    for a in (art, back):
        for m in a.modules:
            name, r = m["name"], m["rank"]
            for role, shape in (("U", (1, m["d_out"], r)), ("V", (1, m["d_in"], r)), ("cores", (24, r, r))):
                key = f"{role}/{name}"
                got = a.get(key)
                assert got.dtype == torch.float32 and tuple(got.shape) == shape
                assert np.array_equal(got.numpy(), _expected_values(a, key))
            cores = a.get_rows(f"cores/{name}", rows)
            assert torch.equal(cores, a.get(f"cores/{name}")[rows])
            U, V, S, assign = a.module_factors(name, rows)
            assert torch.equal(U, a.get(f"U/{name}")) and torch.equal(S, cores) and assign.tolist() == [0] * 5
    # reading some adapters' cores reads those adapters' bytes only
    name = back.modules[1]["name"]
    reads = []
    with back.reader():
        real = back._handle

        class Spy:
            def get_slice(self, key):
                sl = real.get_slice(key)

                class Rec:
                    def __getitem__(self, s):
                        reads.append((key, s.start, s.stop))
                        return sl[s]
                return Rec()

            def __getattr__(self, k):
                return getattr(real, k)

        back._handle = Spy()
        got = back.get_rows(f"cores/{name}", [6])
        back._handle = real
    assert torch.equal(got, art.get(f"cores/{name}")[[6]])
    r, per = back.modules[1]["rank"], None
    per = r * lowbit.row_bytes(r, 2)
    code_reads = [(a, b) for k, a, b in reads if k == LOWBIT + "cores"]
    scale_reads = [(a, b) for k, a, b in reads if k == QSCALE + LOWBIT + "cores"]
    assert len(code_reads) == 1 and code_reads[0][1] - code_reads[0][0] == per
    assert len(scale_reads) == 1 and scale_reads[0][1] - scale_reads[0][0] == r


def _dense(art, i: int, name: str) -> np.ndarray:
    """Adapter i's delta in module ``name`` from the stored codes (float64): U S V^T + b a."""
    U, V = _expected_values(art, f"U/{name}"), _expected_values(art, f"V/{name}")
    S = _expected_values(art, f"cores/{name}")[i]
    k = int(art.get(f"assign/{name}")[i]) if f"assign/{name}" in art.keys() else 0
    S = np.diag(S) if S.ndim == 1 else S
    d = U[k].astype(np.float64) @ S.astype(np.float64) @ V[k].astype(np.float64).T
    b, a, ks = art.module_residuals(name, [i])
    return d + b[0].double().numpy() @ a[0].double().numpy()


@pytest.mark.parametrize("which", ["budget", "clustered"])
def test_export_numpy_and_torch_equal_the_dense_reconstruction(base, clustered, which, tmp_path, capsys):
    art = with_low_bit_shared(base if which == "budget" else clustered, [4, 2], [3, 8])
    path = art.save(tmp_path / "s.lorazip.safetensors")
    back = load_artifact(path)
    torch_dirs = lorazip.export(back, tmp_path / "torch")
    numpy_dirs = export_numpy(load_artifact(path), tmp_path / "numpy")
    rc, _, err = run_cli(capsys, "export", path, tmp_path / "cli")
    assert rc == 0, err
    for t_dir, n_dir in zip(torch_dirs, numpy_dirs):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (t_dir / f).read_bytes() == (n_dir / f).read_bytes() == (tmp_path / "cli" / t_dir.name / f).read_bytes()
        i = back.names.index(t_dir.name)
        cfg = json.loads((t_dir / "adapter_config.json").read_text())
        state = load_file(str(t_dir / "adapter_model.safetensors"))
        for m in back.modules:
            B = state[f"base_model.model.{m['name']}.lora_B.weight"].double().numpy()
            A = state[f"base_model.model.{m['name']}.lora_A.weight"].double().numpy()
            scale = cfg.get("alpha_pattern", {}).get(m["name"], cfg["lora_alpha"]) / cfg.get(
                "rank_pattern", {}).get(m["name"], cfg["r"])
            want = _dense(back, i, m["name"])
            assert np.allclose(scale * B @ A, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_clustered_round_trip_and_values(clustered, tmp_path):
    art = with_low_bit_shared(clustered, 4, 4)
    back = load_artifact(art.save(tmp_path / "k2.lorazip.safetensors"), verify=True)
    _same_tensors(art.tensors(), back.tensors())
    for m in back.modules:
        U = back.get(f"U/{m['name']}")
        assert U.shape == (2, m["d_out"], 3) and np.array_equal(U.numpy(), _expected_values(back, f"U/{m['name']}"))
        assert torch.equal(back.get_rows(f"U/{m['name']}", [1]), U[[1]])


def test_remove_then_add_round_trips(base, src, tmp_path):
    art = with_low_bit_shared(base, 4, 3)
    path = art.save(tmp_path / "s.lorazip.safetensors")
    gone = [art.names[3], art.names[10]]
    keep = [i for i in range(len(art.names)) if art.names[i] not in gone]
    small, _ = remove_adapters(path, gone)
    for m in art.modules:
        for role in ("U", "V"):  # the bases bit for bit, the kept adapters' core rows bit for bit
            for key in (f"{role}/{m['name']}", f"{QSCALE}{role}/{m['name']}"):
                assert torch.equal(small.raw(key), art.raw(key))
        for key in (f"cores/{m['name']}", f"{QSCALE}cores/{m['name']}"):
            assert torch.equal(small.raw(key), art.raw(key)[keep])
        assert small.modules[[x["name"] for x in small.modules].index(m["name"])]["shared_bits"] == [4, 3]
    small_path = small.save(tmp_path / "small.lorazip.safetensors")
    big, _rep = add_adapters(small_path, [str(src / n) for n in gone], hash_sources=False)
    big_back = load_artifact(big.save(tmp_path / "big.lorazip.safetensors"), verify=True)
    _same_tensors(big.tensors(), big_back.tensors())
    n_small = len(small.names)
    for m in art.modules:
        name = m["name"]
        for key in (f"U/{name}", f"V/{name}", f"{QSCALE}U/{name}"):
            assert torch.equal(big_back.raw(key), art.raw(key))
        for key in (f"cores/{name}", f"{QSCALE}cores/{name}"):
            assert torch.equal(big_back.raw(key)[:n_small], small.raw(key))
        codes = big_back.raw(f"cores/{name}")[n_small:]
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**3  # the new cores at the module's b_cores
        assert big_back.raw(f"{QSCALE}cores/{name}").dtype == torch.bfloat16
    # errors recorded for the added adapters are those of the stored values
    srcs = [str(src / n) for n in big_back.names]
    rows, sq, _ = recompute_errors(big_back, srcs, False, False)
    assert torch.allclose(sq, big_back.stats()[0][rows], rtol=1e-5, atol=1e-12)


def test_refit_stores_bases_and_cores_at_their_widths(base, src, tmp_path):
    art = with_low_bit_shared(base, 4, 3)
    small, _ = remove_adapters(art.save(tmp_path / "s.lorazip.safetensors"), [art.names[0]])
    small.meta["adapters"] = [dict(a, source=dict(a["source"], path=str(src / a["name"]))) for a in small.meta["adapters"]]
    big, _ = add_adapters(small, [str(src / art.names[0])], refit=True, hash_sources=False, max_iters=5)
    back = load_artifact(big.save(tmp_path / "refit.lorazip.safetensors"), verify=True)
    for m in back.modules:
        if not m.get("shared_bits"):
            continue
        for role in ROLES:
            codes = back.raw(f"{role}/{m['name']}")
            assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** shared_bit(role, m["shared_bits"])
    rows, sq, _ = recompute_errors(back, [str(src / n) for n in back.names], False, False)
    assert torch.allclose(sq, back.stats()[0][rows], rtol=1e-5, atol=1e-12)


def test_verify_eval_and_info(base, src, tmp_path, capsys):
    art = with_low_bit_shared(base, 4, 3)
    path = art.save(tmp_path / "s.lorazip.safetensors")
    rc, _, err = run_cli(capsys, "verify", path)
    assert rc == 0 and "ok" in err
    rc, out, err = run_cli(capsys, "eval", path)
    assert rc == 0, err
    assert "shared parts at 4/3 bits" in out + err
    rc, out, err = run_cli(capsys, "eval", path, src, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["bits"]["shared"] == ["4/3"] and rep["recomputed"]
    assert abs(rep["errors"]["mean"] - float(evaluate(load_artifact(path))["errors"]["mean"])) < 1e-5
    rc, out, err = run_cli(capsys, "info", path)
    assert rc == 0 and "shared parts" in out + err and "4/3 bits" in out + err, err  # (a table cell may wrap)
    ranked = [m for m in art.meta["modules"] if m["rank"]]
    assert (out + err).count(" at 4/3 bits") >= min(len(ranked), 40)  # each module's row in the modules table
    plain = load_artifact(_int8_shared(base).save(tmp_path / "plain.lorazip.safetensors"))
    assert "shared parts" not in "".join(run_cli(capsys, "eval", plain.path)[1:])


def test_report_bytes_are_the_files_parts(base, tmp_path):
    art = with_low_bit_shared(base, [4, 2, 8], [3, 1, 4])
    path = art.save(tmp_path / "s.lorazip.safetensors")
    for a in (art, load_artifact(path)):
        got = storage_bits(a)
        with safe_open(str(path), framework="pt") as f:
            parts = [k for k in f.keys() if k.startswith((LOWBIT, QSCALE + LOWBIT, "qbits"))]
            assert set(parts) == {p + r for p in (LOWBIT, QSCALE + LOWBIT) for r in (*ROLES, "resid_B", "resid_A")} | {"qbits"}
            nbytes = sum(f.get_slice(k).get_shape()[0] * (2 if k.startswith(QSCALE) else 1) for k in parts)
        assert got["bytes"] == nbytes
        hist = {int(b): n for b, n in got["histogram"].items()}
        for m, (bb, cb) in zip(a.modules, [(4, 3), (2, 1), (8, 4)]):  # bases and cores at their widths
            assert m["shared_bits"] == [bb, cb]
        shared_numbers = {}
        for m in a.modules:
            for role in ROLES:
                w = shared_bit(role, m["shared_bits"])
                shared_numbers[w] = shared_numbers.get(w, 0) + a.raw(f"{role}/{m['name']}").numel()
        for w, count in shared_numbers.items():
            assert hist.get(w, 0) >= count
        assert got["numbers"] == sum(hist.values())


def _edit_mod(doc, j, **fields):
    doc["modules"][j].update(fields)


CORRUPT = {  # name: (edit of the physical tensors and the metadata document, what the error names)
    "codes one byte short": (lambda t, doc: t.update({LOWBIT + "cores": t[LOWBIT + "cores"][:-1].clone()}),
                             "'lowbit/cores' missing or not of shape"),
    "scales missing": (lambda t, doc: t.pop(QSCALE + LOWBIT + "U"), "'qscale/lowbit/U' missing"),
    "scales not bfloat16": (lambda t, doc: t.update({QSCALE + LOWBIT + "V": t[QSCALE + LOWBIT + "V"].half()}),
                            "'qscale/lowbit/V' missing or not of shape"),
    "a width of 5 bits": (lambda t, doc: _edit_mod(doc, 1, shared_bits=[5, 3]), "modules[1].shared_bits must be"),
    "one width": (lambda t, doc: _edit_mod(doc, 0, shared_bits=[4]), "modules[0].shared_bits must be"),
    "a width not an int": (lambda t, doc: _edit_mod(doc, 0, shared_bits=[4, "3"]), "modules[0].shared_bits must be"),
    "another width": (lambda t, doc: _edit_mod(doc, 2, shared_bits=[2, 3]), "'lowbit/U' missing or not of shape"),
    "no shared_bits": (lambda t, doc: [m.pop("shared_bits") for m in doc["modules"]],
                       "stored, but no module has shared_bits"),
    "on a rank-0 module": (lambda t, doc: _edit_mod(doc, 0, rank=0), "modules[0].shared_bits on a module of rank 0"),
    "float16 storage": (lambda t, doc: doc.update(storage_dtype="float16"), "storage_dtype is not int8"),
}


@pytest.mark.parametrize("what", CORRUPT)
def test_corrupt_files_are_refused_with_one_clear_error(base, what, tmp_path, capsys):
    path = with_low_bit_shared(base, 4, 3).save(tmp_path / "s.lorazip.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    doc = read_doc(header)
    edit, message = CORRUPT[what]
    edit(tensors, doc)
    write_doc(header, doc)
    bad = tmp_path / "bad.lorazip.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ArtifactError, match="bad.lorazip.safetensors") as exc:
        load_artifact(bad, verify=False)
    assert message in str(exc.value)
    rc, out, err = run_cli(capsys, "export", bad, tmp_path / "out")
    assert rc != 0
    assert_one_error_line(err, message)


def test_stored_rows_come_back_bit_for_bit_even_where_quantising_again_differs():
    """requantized (what add stores) gives rows it has seen their stored codes back, not what
    quantising their values again would give; changed rows at the module's width."""
    from lorazip.quantize import SharedLowBit, SharedRows, dequantized, requantized, to_shared_lowbit

    meta = {"modules": [{"name": "m", "rank": 2, "d_out": 4, "d_in": 4, "shared_bits": [2, 2]}]}
    codes = torch.tensor([[[1, 2], [2, 2]], [[1, 1], [2, 1]]], dtype=torch.uint8)  # the middle levels only
    scale = torch.full((2, 2, 1), 0.75, dtype=torch.bfloat16)
    raw = {"cores/m": codes, QSCALE + "cores/m": scale}
    view = dequantized(raw, meta)
    assert torch.equal(view["cores/m"], SharedLowBit(codes, scale, 2, "cores").values)
    again = to_shared_lowbit(view["cores/m"], 2, "cores")
    assert not torch.equal(again.data, codes)  # quantising the values again chooses other codes
    rows = SharedRows()
    rows.learn_all(raw, meta)
    new = rows.round(torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(0)), 2, "cores")
    grown = {"cores/m": torch.cat([view["cores/m"], new])}
    out = requantized(grown, view, raw, "int8", meta, rows)
    assert torch.equal(out["cores/m"][:2], codes) and torch.equal(out[QSCALE + "cores/m"][:2], scale)
    assert torch.equal(SharedLowBit(out["cores/m"], out[QSCALE + "cores/m"], 2, "cores").values, grown["cores/m"])
    unchanged = requantized(dict(view), view, raw, "int8", meta)  # the view's own tensor: the raw one back
    assert unchanged["cores/m"] is codes


def test_baseline_of_the_same_bytes_counts_shared_parts_at_their_bits(clustered, monkeypatch):
    """The per-adapter SVD baseline 'in the artifact's storage' gets the artifact's bytes in int8
    numbers, not its numbers (which low-bit shared parts store in fewer bytes)."""
    ev = importlib.import_module("lorazip.evaluate")

    art = with_low_bit_shared(clustered, 2, 2)
    seen = []
    real = ev.svd_matched_storage
    monkeypatch.setattr(ev, "svd_matched_storage", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    evaluate(art)
    assert seen == [storage_bits(art)["bytes"]] and seen[0] < ev.storage(art)["compressed_params"]


@pytest.mark.parametrize("method", ["jd-diag", "svd"])
def test_diagonal_cores_round_trip_and_export(src, method, tmp_path):
    """Diagonal cores ((n, r) codes, (n, 1) scales; jd-diag, and svd's per-adapter bases)."""
    art = lorazip.compress(lorazip.load_collection(src), rank=3, method=method, storage_dtype="int8",
                           hash_sources=False, keep_extras=False)
    art = with_low_bit_shared(art, 3, 4)
    path = art.save(tmp_path / "d.lorazip.safetensors")
    back = load_artifact(path, verify=True)
    _same_tensors(art.tensors(), back.tensors())
    name = back.modules[0]["name"]
    assert back.raw(f"cores/{name}").shape == (24, 3) and back.raw(f"{QSCALE}cores/{name}").shape == (24, 1)
    assert np.array_equal(back.get_rows(f"cores/{name}", [4, 2]).numpy(), _expected_values(back, f"cores/{name}")[[4, 2]])
    lorazip.export(back, tmp_path / "torch", back.names[:3])
    export_numpy(load_artifact(path), tmp_path / "numpy", back.names[:3])
    for n in back.names[:3]:
        assert (tmp_path / "torch" / n / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "numpy" / n / "adapter_model.safetensors").read_bytes()
        state = load_file(str(tmp_path / "torch" / n / "adapter_model.safetensors"))
        B = state[f"base_model.model.{name}.lora_B.weight"].double().numpy()
        A = state[f"base_model.model.{name}.lora_A.weight"].double().numpy()
        want = _dense(back, back.names.index(n), name)
        assert np.allclose(B @ A, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
