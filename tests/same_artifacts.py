"""Every compression mode on one small collection, digested: the byte-identity check of a refactor.

``python tests/same_artifacts.py --record`` writes ``tests/data/artifact_sha256.json`` from the
current code; ``--check`` (run by ``tests/test_same_artifacts.py``) rebuilds every mode and compares. A digest is the
sha256 of the artifact's tensors, header and (decompressed) metadata with the collection's folder
written as ``<root>`` (the file records source paths). ``python tests/same_artifacts.py SRC...`` prints the digests of the modes for other
collections (the bundled adapters, the fixture sets) to compare by hand before and after a change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import write_collection  # noqa: E402

import lorazip  # noqa: E402
from lorazip.layout import decode_meta  # noqa: E402

# One intra-op thread: a reduction split over another number of threads may round differently in the
# last bits, and the digests must not depend on how many cores the machine running them has.
torch.set_num_threads(1)

RECORD = Path(__file__).parent / "data" / "artifact_sha256.json"
MODULES = {"l0.q": (40, 24), "l0.v": (24, 24), "l1.q": (40, 24), "l1.v": (24, 24), "l2.o": (24, 40)}
BUDGET = 9_000
MEM = 3 * 4 * 2 * 40 * 24 * 8  # a memory limit that streams every module in chunks of adapters

# name -> keyword arguments of lorazip.compress ("calibration" is replaced by the statistics)
MODES: dict[str, dict] = {
    "rank": dict(rank=4),
    "rank-int8": dict(rank=4, storage_dtype="int8"),
    "rank-float16": dict(rank=4, storage_dtype="float16", compute_dtype="float64"),
    "default": dict(),
    "budget": dict(budget=BUDGET),
    "budget-float16": dict(budget=BUDGET, storage_dtype="float16"),
    "budget-int8": dict(budget=BUDGET, storage_dtype="int8"),
    "target-mean": dict(target_error=0.1),
    "target-max": dict(target_error=0.2, target_stat="max"),
    "clusters": dict(rank=4, clusters=2),
    "clusters-per-module": dict(rank=4, clusters=2, per_module_clusters=True),
    "clusters-budget": dict(budget=BUDGET, clusters=2),
    "clusters-auto": dict(target_error=0.1, clusters="auto"),
    "clusters-auto-budget": dict(budget=BUDGET, clusters="auto"),
    "jd-diag": dict(rank=4, method="jd-diag"),
    "jd-diag-budget": dict(budget=BUDGET, method="jd-diag"),
    "jd-diag-target": dict(target_error=0.2, method="jd-diag"),
    "svd": dict(rank=4, method="svd"),
    "uniform-budget": dict(budget=BUDGET, uniform_rank=True),
    "uniform-target": dict(target_error=0.1, uniform_rank=True),
    "memory-limit": dict(rank=4, memory_limit=MEM),
    "memory-limit-target": dict(target_error=0.1, memory_limit=MEM),
    "calibration": dict(rank=4, calibration=True),
    "calibration-budget": dict(budget=BUDGET, calibration=True),
    "calibration-memory-limit": dict(budget=BUDGET, calibration=True, memory_limit=MEM),
}
# an artifact of the first 8 adapters, then the last 2 added (the shared bases kept, or refitted)
ADD_MODES = {"add-rank": (dict(rank=4), {}), "add-budget": (dict(budget=BUDGET), {}),
             "add-refit": (dict(rank=4), dict(refit=True))}
RAY_MODES = {"ray-budget": dict(budget=BUDGET), "ray-clusters": dict(rank=4, clusters=2)}


def make_collection(root: Path) -> Path:
    write_collection(root / "src", n=10, modules=MODULES, r=6, seed=3)
    return root / "src"


def calibration_stats(collection):
    """Deterministic input moments for every module of ``collection`` (in memory)."""
    from lorazip.calibrate import CalibrationStats

    gen = torch.Generator().manual_seed(7)
    meta, tensors = {"modules": {}, "base_model": "tiny-base", "n_tokens": 64}, {}
    for m in collection.modules:
        X = torch.randn(64, m.d_in, generator=gen, dtype=torch.float64)
        key = f"moment/{m.name}"
        tensors[key] = X.T @ X / 64
        meta["modules"][m.name] = {"kind": "linear", "dim": m.d_in, "tokens": 64, "tensor": key}
    return CalibrationStats(meta, tensors=tensors)


def digest(art, root: Path, tmp: Path) -> str:
    """sha256 of the saved artifact, ``root`` written as ``<root>`` in its header and metadata."""
    data = art.save(tmp / "a.lorazip.safetensors", overwrite=True).read_bytes()
    n = int.from_bytes(data[:8], "little")  # the header's padding depends on the paths' length: left out
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    meta["lorazip_z"] = decode_meta(meta["lorazip_z"])
    text = json.dumps([header, meta], sort_keys=True).replace(str(root), "<root>")
    return hashlib.sha256(text.encode() + b"\0" + data[8 + n:]).hexdigest()


def scaled(kw: dict, coll) -> dict:
    """The mode's settings for another collection: a budget of 10% of its bytes, a memory limit that
    streams its largest module."""
    kw = dict(kw)
    if "budget" in kw:
        kw["budget"] = sum(a.weights_file.stat().st_size for a in coll.adapters) // 10
    if "memory_limit" in kw:
        kw["memory_limit"] = 2 * max(4 * len(coll) * coll.max_rank(m.name) * (m.d_in + m.d_out) for m in coll.modules)
    return kw


def build(name: str, src: Path, tmp: Path, executor=None, scale: bool = False) -> str:
    kw = dict({**MODES, **RAY_MODES}[name])
    coll = lorazip.load_collection(src)
    if scale:
        kw = scaled(kw, coll)
    if kw.pop("calibration", False):
        kw["calibration"] = calibration_stats(coll)
    art = lorazip.compress(coll, executor=executor, **kw) if executor else lorazip.compress(coll, **kw)
    return digest(art, src.parent, tmp)


def build_add(name: str, src: Path, tmp: Path) -> str:
    from lorazip.update import add_adapters

    kw, add_kw = ADD_MODES[name]
    paths = sorted(p for p in src.iterdir() if p.is_dir())
    art = lorazip.compress(lorazip.load_collection(paths[:8]), **kw)
    out, _ = add_adapters(art, paths[8:], **add_kw)
    return digest(out, src.parent, tmp)


def _one(name: str, root: Path) -> str:
    """Digest of one mode, built in a fresh process: one process for every mode lets what an earlier
    mode leaves behind (caches, the allocator's heap) move the last bits of a later one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAZIP_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--one", name, str(root)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return proc.stdout.strip()


def record() -> dict:
    # one fixed folder: the file records the sources' paths, and a budget holds the whole file, so the
    # length of the path moves what fits
    root = Path(tempfile.gettempdir()) / "lorazip-same-artifacts"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        make_collection(root)
        names = list(MODES) + list(ADD_MODES)
        try:
            import ray  # noqa: F401

            names += list(RAY_MODES)
        except ImportError:
            pass
        with ThreadPoolExecutor(2) as pool:
            out = {"torch": torch.__version__, "modes": dict(zip(names, pool.map(lambda n: _one(n, root), names)))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _build_one(name: str, root: Path) -> str:
    src, tmp = root / "src", root / f"out-{name}"
    tmp.mkdir()
    if name in ADD_MODES:
        return build_add(name, src, tmp)
    if name in RAY_MODES:
        from lorazip.compress.executor import RayExecutor

        with RayExecutor(workers=1) as ex:
            return build(name, src, tmp, ex)
    return build(name, src, tmp)


def check() -> int:
    """Rebuild every recorded mode; print and count those whose digest differs."""
    want = json.loads(RECORD.read_text())
    got = record()
    bad = [name for name in sorted(want["modes"]) if got["modes"].get(name) != want["modes"][name]]
    for name in bad:
        print(f"{name}: {got['modes'].get(name)} != recorded {want['modes'][name]}")
    return len(bad)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(_build_one(sys.argv[2], Path(sys.argv[3])))
        sys.exit(0)
    if sys.argv[1:] == ["--check"]:
        sys.exit(1 if check() else 0)
    if sys.argv[1:] == ["--record"]:
        RECORD.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
        print(RECORD.read_text())
    else:
        for arg in sys.argv[1:]:
            with tempfile.TemporaryDirectory() as d:
                for name in MODES:
                    try:
                        print(arg, name, build(name, Path(arg).resolve(), Path(d), scale=True), flush=True)
                    except Exception as exc:  # noqa: BLE001 - a mode that does not apply to a collection
                        print(arg, name, "error:", type(exc).__name__, str(exc)[:100], flush=True)
