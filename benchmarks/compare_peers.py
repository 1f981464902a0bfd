"""lorazip against the peer tools lorashare and vlora-dev, on the same collections, at equal bytes.

    python benchmarks/compare_peers.py [--collections gpt2,fortunes,peers-8,peers-8-p16]
        [--lorashare-k 8,32] [--vlora-k auto,1] [--threads 1] [--json peers.json] [--markdown peers.md]

Peers (install them beside lorazip without letting pip touch torch:
``pip install --no-deps lorashare==0.1.3 vlora-dev==1.0.0``; what else they import is small pure Python):

* **lorashare 0.1.3** (PyPI ``lorashare``, "SHARE method", arXiv 2602.06043). Per module and side
  (A, B): the n adapters' factors, oriented tall (d x r_i), are concatenated into d x (n r), centred,
  and the d x d covariance is eigendecomposed (``torch.linalg.eigh``); the top-k eigenvectors are the
  shared components (one k for every module), each adapter keeps loadings ``C^T A^T``, ``C^T B``
  (k x r, float32) and is rebuilt as ``B' = C_B C_B^T B``, ``A' = A C_A C_A^T`` (the mean is not
  added back). Refuses adapters with different ranks or target modules. Requires torch >= 1.13,
  safetensors >= 0.3, peft >= 0.6, transformers >= 4.30, huggingface-hub >= 0.19 (peft and
  transformers only for ``apply``). Called as ``SHAREModel.from_adapters({name: path},
  num_components=k, device="cpu").save_pretrained(out)``; default k = 32.
* **vlora-dev 1.0.0** (PyPI ``vlora-dev``, import ``vlora``, "one shared basis", also after
  arXiv 2602.06043). Per module and side: each adapter's factor is flattened to one vector (r d),
  the n x (r d) matrix is centred and SVD'd across adapters, and k right singular vectors are kept
  (``auto``: the k explaining 60 % of the first module's variance, then the same k everywhere);
  an adapter is ``mean + loadings @ components``, so storage is (k + 1) r (d_in + d_out) numbers per
  module plus singular values and k loadings per adapter and side. Keeps the adapters' dtype.
  Refuses mixed ranks; keeps only the modules every adapter has (others are dropped with a warning).
  Requires torch >= 2.0, numpy >= 1.21, safetensors >= 0.4, click >= 8, packaging >= 21. Called as
  the ``vlora compress`` CLI does: ``SharedSubspace.from_adapters([load_adapter(p)...],
  task_ids=..., num_components=k or None).save(out)``; default k = auto.

What is measured, per collection and tool setting, each run in its own child process (``--threads``
torch threads, ``OMP_NUM_THREADS`` likewise): wall and CPU seconds of load + compress + save (after
the imports), the child's own peak RSS (``VmHWM``; ``getrusage().ru_maxrss`` inherits the parent's
RSS across fork + exec on Linux, see :func:`peak_rss_mb`; importing torch alone is much of it, shown
apart), and the bytes on disk of everything the tool wrote (lorashare's copied
``classifier_head.safetensors`` are counted apart: lorazip runs with ``keep_extras=False`` and is
matched to the LoRA part). Errors of every tool are measured here, the same way for all, against
the original factors read by lorazip (scale ``alpha / r`` folded in, the peers' reconstructions get
the same scale): per (adapter, module) ``||M - M'||_F^2`` exactly from the factors
(``|| [B, -B'] [A; A'] ||^2`` through r x r Grams, never d x d; checked against dense matrices where
they are small), aggregated as lorazip's report does (``lorazip.metrics``: per adapter
``sum_m err_im / sum_m ||M_im||^2``, then mean / median / max over adapters). lorazip's rows give
``lorazip.evaluate`` recomputed against the originals; the helper's numbers for the same artifact
are recorded beside them as a check.

lorazip is run at the peer's bytes two ways: ``--budget`` (``lorazip.compress.budget.compress_shared``, ranks per
module from the error curves, artifact <= the peer's bytes) and ``--rank R`` (the largest uniform rank,
capped at n r, whose artifact fits). A tool that refuses a collection is recorded with its reason;
a heterogeneous collection is then also run on its largest subset of equal rank and target modules.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
COLLECTIONS = {
    "gpt2": ROOT.parent / "shared" / "fixtures" / "real-adapters" / "gpt2",
    "fortunes": ROOT / "examples" / "fortunes" / "adapters",
    "peers-8": CACHE / "peers-8",
    "peers-8-p16": CACHE / "peers-8-p16",
}
SYNTHETIC = {  # make_collection.py arguments (Lots-of-LoRAs shapes: d 4096, kv 1024, rank 16, 2 layers)
    "peers-8": ["--n", "8", "--layers", "2"],
    "peers-8-p16": ["--n", "8", "--layers", "2", "--planted", "16"],
}
HEADS = "classifier_head.safetensors"  # lorashare's copies of modules_to_save tensors
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.\w+)?\.weight$")


# ---------------------------------------------------------------- child processes


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` where Linux has it. ``getrusage(RUSAGE_SELF).ru_maxrss``
    (and ``RUSAGE_CHILDREN`` in the parent) carries the parent's RSS at fork across ``exec`` on Linux,
    so a child started by a large parent would report at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t_imp = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "lorashare":
        from lorashare import SHAREModel
    elif kind == "vlora":
        from vlora import SharedSubspace, load_adapter
    else:
        import lorazip
        from lorazip.compress.budget import compress_shared
        from lorazip.compress.options import CompressOptions
    import_s = time.perf_counter() - t_imp
    rss_import = peak_rss_mb()
    out = Path(spec["out"])
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res: dict = {"status": "ok"}
    try:
        if kind == "lorashare":
            share = SHAREModel.from_adapters(spec["adapters"], num_components=spec["k"], device="cpu")
            share.save_pretrained(out)
            res["k"] = share.config.num_components
        elif kind == "vlora":
            names = list(spec["adapters"])
            adapters = [load_adapter(spec["adapters"][n]) for n in names]
            k = None if spec["k"] == "auto" else int(spec["k"])
            sub = SharedSubspace.from_adapters(adapters, task_ids=names, num_components=k)
            sub.save(out)
            res["k"] = sub.num_components
        elif kind == "lorazip-budget":
            coll = lorazip.load_collection(spec["dirs"])
            art, rep = compress_shared(coll, CompressOptions(budget=spec["budget"], max_rank=spec["max_rank"], keep_extras=False))
            art.save(out, overwrite=True)
            res["ranks"] = rep["ranks"]
        else:  # lorazip-rank
            coll = lorazip.load_collection(spec["dirs"])
            ranks = spec["ranks"]
            art = lorazip.compress(coll, max(ranks.values()), ranks=ranks, keep_extras=False)
            art.save(out, overwrite=True)
            res["ranks"] = ranks
    except Exception as exc:  # a tool refusing a collection is a result, not a crash
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        res = {"status": "error", "reason": f"{type(exc).__name__}: {msg}"[:300]}
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res.update(
        wall_s=time.perf_counter() - t0,
        cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        peak_rss_mb=peak_rss_mb(),
        ru_maxrss_mb=ru1.ru_maxrss / 1024,
        import_rss_mb=rss_import,
        import_s=import_s,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(res))


def run_child(spec: dict, workdir: Path, timeout: float) -> dict:
    spec_path = workdir / f"spec-{os.getpid()}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    finally:
        spec_path.unlink(missing_ok=True)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"child exited {proc.returncode}: {tail}"[:300]}


def run_best(spec: dict, workdir: Path, timeout: float, repeat: int) -> dict:
    """Run ``repeat`` times; keep the fastest run's result (peak RSS: the largest seen)."""
    runs = [run_child(spec, workdir, timeout) for _ in range(max(repeat, 1))]
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["wall_s"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    best["runs_wall_s"] = [r["wall_s"] for r in ok]
    return best


# ---------------------------------------------------------------- errors, the same for every tool


def factor_errors(B, A, Bh, Ah):
    """``(||B A - Bh Ah||_F^2, ||B A||_F^2)`` from the factors alone (float64, r x r Grams)."""
    import torch

    B, A = B.double(), A.double()
    Bc = torch.cat([B, -Bh.double()], 1)
    Ac = torch.cat([A, Ah.double()], 0)
    err = float(((Bc.T @ Bc) * (Ac @ Ac.T)).sum())
    norm = float(((B.T @ B) * (A @ A.T)).sum())
    return max(err, 0.0), norm


def error_report(coll, recon, *, scaled: bool = False, dense_limit: int = 1 << 22) -> dict:
    """Errors of reconstructions ``recon[i][layer_key] = (A', B')`` against the originals of ``coll``,
    aggregated like lorazip's report. ``A', B'`` are raw PEFT factors (the original module's scale is
    applied to them) unless ``scaled`` (the delta is ``B' A'`` as given)."""
    import torch

    from lorazip.metrics import per_adapter, summary

    n, mods = len(coll), coll.modules
    err2 = torch.zeros(n, len(mods), dtype=torch.float64)
    norm2 = torch.zeros_like(err2)
    dense_gap = 0.0
    missing = 0
    for j, info in enumerate(mods):
        for i, ad in enumerate(coll.adapters):
            spec = ad.modules.get(info.name)
            if spec is None:
                continue  # zero delta; the peers have nothing there either
            B, A = ad.factors(info.name, torch.float64)
            key = _LORA_KEY.match(spec.key_A)
            got = recon[i].get(key.group(1) if key else spec.key_A) or recon[i].get(info.name)
            if got is None:
                missing += 1
                Bh = torch.zeros(B.shape[0], 1, dtype=torch.float64)
                Ah = torch.zeros(1, A.shape[1], dtype=torch.float64)
            else:
                a, b = got[0].double(), got[1].double()
                if spec.layout == "embedding":
                    a, b = b.T, a.T
                Bh, Ah = (b if scaled else b * spec.scale), a
            err2[i, j], norm2[i, j] = factor_errors(B, A, Bh, Ah)
            if B.shape[0] * A.shape[1] <= dense_limit:
                dense = float((B @ A - Bh @ Ah).square().sum())
                dense_gap = max(dense_gap, abs(dense - float(err2[i, j])) / max(float(norm2[i, j]), 1e-300))
    adapter = per_adapter(err2, norm2)
    return {"errors": summary(adapter.tolist()), "per_adapter": adapter.tolist(),
            "modules_missing_in_reconstruction": missing, "dense_check_max_rel_gap": dense_gap}


def peer_reconstructions(kind: str, out: Path, names: list[str]) -> list[dict]:
    """``[{layer_key: (A', B')}]`` per adapter, read back from what the tool saved."""
    recon = []
    if kind == "lorashare":
        from lorashare import SHAREModel

        share = SHAREModel.from_pretrained(out)
        for name in names:
            sd, cur = share.reconstruct(name), defaultdict(dict)
            for key, t in sd.items():
                m = _LORA_KEY.match(key)
                if m:
                    cur[m.group(1)][m.group(2)] = t
            recon.append({k: (v["A"], v["B"]) for k, v in cur.items() if "A" in v and "B" in v})
    else:
        from vlora import SharedSubspace

        sub = SharedSubspace.load(out)
        for name in names:
            w = sub.reconstruct(name)
            recon.append({layer: (w.lora_a[layer], w.lora_b[layer]) for layer in w.layer_names})
    return recon


def lorazip_reconstructions(art) -> list[dict]:
    """The artifact's factors as ``[{module: (A', B')}]``, scale included (for the helper cross-check)."""

    recon = [dict() for _ in art.names]
    for mod in art.modules:
        U, V, cores, assign = art.module_factors(mod["name"])
        U = U if U.dim() == 3 else U[None]
        V = V if V.dim() == 3 else V[None]
        for i in range(len(art.names)):
            k, S = int(assign[i]), cores[i].double()
            Bh = U[k].double() * S if S.dim() == 1 else U[k].double() @ S
            recon[i][mod["name"]] = (V[k].double().T, Bh)
    return recon


# ---------------------------------------------------------------- collections


def dir_bytes(path: Path, skip: str | None = None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != skip)


def adapter_dirs(root: Path) -> list[Path]:
    from lorazip.io.collection import find_adapter_dirs

    return find_adapter_dirs(root)


def same_config_subset(dirs: list[Path]) -> list[Path] | None:
    """The largest group of adapters with equal rank, target modules and base model (what both
    peers require), if the collection is not already one such group."""
    groups: dict = defaultdict(list)
    for d in dirs:
        c = json.loads((d / "adapter_config.json").read_text())
        tm = c.get("target_modules")
        tm = tuple(sorted(tm)) if isinstance(tm, list) else tm
        groups[(c.get("r"), tm, c.get("base_model_name_or_path"),
                json.dumps(c.get("rank_pattern") or {}, sort_keys=True))].append(d)
    best = max(groups.values(), key=len)
    return best if 2 <= len(best) < len(dirs) else None


def uniform_ranks(coll, budget: int, overhead: int, itemsize: int) -> dict[str, int] | None:
    """The largest uniform rank (capped per module at min(d_out, d_in, n * r_max)) fitting ``budget``."""
    n = len(coll)
    caps = {}
    for m in coll.modules:
        r_max = max((a.modules[m.name].rank for a in coll.adapters if m.name in a.modules), default=1)
        caps[m.name] = min(m.d_out, m.d_in, n * r_max)

    def size(r):
        dims = {m: coll.module(m).d_in + coll.module(m).d_out for m in caps}
        return overhead + itemsize * sum(min(r, c) * dims[m] + n * min(r, c) ** 2 for m, c in caps.items())

    best = None
    for r in range(1, max(caps.values()) + 1):
        if size(r) > budget:
            break
        best = r
    return None if best is None else {m: min(best, c) for m, c in caps.items()}


# ---------------------------------------------------------------- main


def fmt_err(e: dict | None) -> str:
    return "-" if not e else f"{e['mean']:.4f} / {e['median']:.4f} / {e['max']:.4f}"


def collections_to_run(spec: str) -> list[tuple[str, list[Path]]]:
    """``[(name, adapter folders)]``; a heterogeneous collection is followed by its same-config subset."""
    todo = []
    for item in spec.split(","):
        name, _, path = item.partition("=")
        root = Path(path) if path else COLLECTIONS[name]
        if name in SYNTHETIC and not path and not root.is_dir():
            cmd = [sys.executable, str(ROOT / "benchmarks" / "make_collection.py"), *SYNTHETIC[name]]
            subprocess.run([*cmd, "--out", str(root)], check=True)
        if not root.is_dir():
            print(f"skip {name}: {root} not found", file=sys.stderr)
            continue
        dirs = adapter_dirs(root)
        todo.append((name, dirs))
        sub = same_config_subset(dirs)
        if sub:
            todo.append((f"{name} (same-config subset)", sub))
    return todo


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_collection(cname: str, dirs: list[Path], settings: list[tuple[str, str]], args) -> dict:
    import torch

    import lorazip
    from lorazip.artifact import STORAGE_DTYPES

    coll = lorazip.load_collection(dirs)
    n = len(coll)
    real = {os.path.realpath(d): i for i, d in enumerate(dirs)}
    peer_names = [f"a{real[os.path.realpath(a.path)]:03d}" for a in coll.adapters]
    adapters = {peer_names[i]: str(a.path) for i, a in enumerate(coll.adapters)}
    src = [str(d) for d in dirs]
    storage_dtype = coll.storage_dtype()
    itemsize = torch.tensor([], dtype=STORAGE_DTYPES[storage_dtype]).element_size()
    # Bytes besides bases and cores (header, statistics, spectra), from a rank-1 artifact.
    probe = lorazip.compress(coll, 1, keep_extras=False)
    overhead = probe.serialized_size() - itemsize * sum(m.d_in + m.d_out + n for m in coll.modules)
    info = {
        "collection": cname, "n_adapters": n, "n_modules": len(coll.modules),
        "ranks": sorted({m.rank for a in coll.adapters for m in a.modules.values()}),
        "storage_dtype": storage_dtype,
        "original_bytes": sum((Path(a.path) / "adapter_model.safetensors").stat().st_size
                              for a in coll.adapters),
        "runs": [],
    }
    log(f"== {cname}: {n} adapters x {len(coll.modules)} modules")
    cdir = args.workdir / re.sub(r"[^\w.-]+", "_", cname)
    cdir.mkdir(parents=True, exist_ok=True)

    def lorazip_run(label: str, spec: dict, peer: str | None) -> dict:
        out = Path(spec["out"])
        spec = {**spec, "dirs": src, "threads": args.threads}
        res = run_best(spec, args.workdir, args.timeout, args.repeat)
        row = {"tool": "lorazip", "setting": label, "matched_to": peer, **res}
        if res["status"] == "ok":
            art = lorazip.load_artifact(out)
            rep = lorazip.evaluate(art, src)  # recomputed against the originals
            ranks = [m["rank"] for m in art.modules]
            row.update(bytes=out.stat().st_size, errors=rep["errors"], rank_range=[min(ranks), max(ranks)])
            by_name = {a["name"]: a["error"] for a in rep["adapters"]}
            helper = error_report(coll, lorazip_reconstructions(art), scaled=True)["per_adapter"]
            gap = max(abs(helper[i] - by_name[coll.names[i]]) for i in range(n))
            row["helper_vs_evaluate_max_abs_gap"] = gap
            row.pop("ranks", None)
        log(f"   {label}: {res['status']} {res.get('wall_s', 0):.1f}s {fmt_err(row.get('errors'))}")
        return row

    for kind, k in settings:
        label = f"{kind} k={k}"
        out = cdir / f"{kind}-k{k}"
        shutil.rmtree(out, ignore_errors=True)  # bytes on disk: only this run's files
        spec = {"kind": kind, "k": k if k == "auto" else int(k), "adapters": adapters, "out": str(out),
                "threads": args.threads}
        res = run_best(spec, args.workdir, args.timeout, args.repeat)
        row = {"tool": kind, "setting": label, **res}
        if res["status"] == "ok":
            row.update(bytes=dir_bytes(out, skip=HEADS), bytes_total=dir_bytes(out))
            row.update(error_report(coll, peer_reconstructions(kind, out, peer_names)))
        log(f"   {label}: {res['status']} {res.get('wall_s', 0):.1f}s {res.get('reason', '')} "
            f"{fmt_err(row.get('errors'))}")
        same = next((x for x in info["runs"] if res["status"] == "ok" and x["tool"] == kind
                     and x["status"] == "ok" and (x["k"], x["bytes"]) == (row["k"], row["bytes"])), None)
        if same:
            row["same_as"] = same["setting"]
        info["runs"].append(row)
        if res["status"] != "ok" or same:
            continue  # nothing to match (or the same output as an earlier setting, matched there)
        budget = row["bytes"]
        ranks = uniform_ranks(coll, budget, overhead, itemsize)
        if ranks is None:
            info["runs"].append({"tool": "lorazip", "setting": "--budget", "matched_to": label,
                                 "status": "error", "reason": "the peer's bytes cannot hold rank 1"})
            continue
        cap = max(min(m.d_out, m.d_in, n * max(info["ranks"])) for m in coll.modules)
        max_rank = min(cap, max(2 * max(ranks.values()), 8), args.max_rank_limit)
        zout = cdir / f"lorazip-budget-{kind}-k{k}.lorazip.safetensors"
        info["runs"].append(lorazip_run(f"--budget {budget}", {
            "kind": "lorazip-budget", "budget": budget, "max_rank": max_rank, "out": str(zout)}, label))
        zout = cdir / f"lorazip-rank-{kind}-k{k}.lorazip.safetensors"
        while True:
            r_row = lorazip_run(f"--rank {max(ranks.values())}",
                                {"kind": "lorazip-rank", "ranks": ranks, "out": str(zout)}, label)
            r = max(ranks.values()) - 1
            if r_row["status"] != "ok" or r_row["bytes"] <= budget or r < 1:
                break
            ranks = {m: min(v, r) for m, v in ranks.items()}  # over budget (overhead misestimated)
        info["runs"].append(r_row)
    if not any(r["status"] == "ok" for r in info["runs"]):  # no peer ran: lorazip alone, for reference
        ranks = {m.name: min(8, m.d_out, m.d_in) for m in coll.modules}
        zout = cdir / "lorazip-rank8.lorazip.safetensors"
        info["runs"].append(lorazip_run("--rank 8 (reference)",
                                        {"kind": "lorazip-rank", "ranks": ranks, "out": str(zout)}, None))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collections", default="gpt2,fortunes,peers-8,peers-8-p16",
                    help=f"comma-separated: {', '.join(COLLECTIONS)}, or name=path")
    ap.add_argument("--lorashare-k", default="8,32", help="lorashare num_components ('auto' allowed)")
    ap.add_argument("--vlora-k", default="auto,1", help="vlora num_components ('auto' = its default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest is kept")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    ap.add_argument("--max-rank-limit", type=int, default=128, help="upper bound on --budget's max_rank")
    ap.add_argument("--workdir", type=Path, default=CACHE / "compare-peers")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return

    from importlib.metadata import PackageNotFoundError, version

    import torch

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    versions = {}
    for pkg in ("lorazip", "lorashare", "vlora-dev"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    settings = [("lorashare", k) for k in args.lorashare_k.split(",") if k]
    settings += [("vlora", k) for k in args.vlora_k.split(",") if k]
    load_start = os.getloadavg()
    todo = collections_to_run(args.collections)
    results = [run_collection(name, dirs, settings, args) for name, dirs in todo]
    doc = {
        "command": "python benchmarks/compare_peers.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "versions": versions, "threads": args.threads, "collections": results,
    }
    md = markdown(doc)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    if args.markdown:
        args.markdown.write_text(md)


def _ranks(r: dict) -> str:
    lo, hi = r["rank_range"]
    return str(lo) if lo == hi else f"{lo}-{hi}"


def markdown(doc: dict) -> str:
    """Two tables: every run, then each peer setting beside lorazip at its bytes."""
    runs = ["| collection | tool, setting | k / lorazip ranks | bytes (ratio to originals) | wall s | CPU s "
            "| peak RSS MB (after imports) | error mean / median / max |", "|---|---|---|---|---|---|---|---|"]
    verdict = ["| collection | peer, setting | peer wall / CPU s | lorazip --budget wall / CPU s "
               "| speed-up wall / CPU | lorazip --rank R wall / CPU s | speed-up wall / CPU "
               "| mean error peer / --budget / --rank | max error peer / --budget / --rank |",
               "|---|---|---|---|---|---|---|---|---|"]
    for c in doc["collections"]:
        ranks = "/".join(map(str, c["ranks"]))
        head = f"{c['collection']} ({c['n_adapters']} x {c['n_modules']}, r {ranks})"
        peers: dict[str, dict] = {}
        for r in c["runs"]:
            if r["tool"] == "lorazip":
                setting = f"lorazip {r['setting']}" + (f" (= {r['matched_to']})" if r["matched_to"] else "")
            else:
                setting = r["setting"] + (f" (same output as {r['same_as']})" if r.get("same_as") else "")
            if r["status"] != "ok":
                reason = r["reason"].replace("|", "/")
                runs.append(f"| {head} | {setting} | - | - | - | - | - | cannot run: {reason} |")
                continue
            if r["tool"] == "lorazip":
                kr = _ranks(r)
                if r["matched_to"] in peers:
                    peers[r["matched_to"]]["budget" if r["setting"].startswith("--budget") else "rank"] = r
            else:
                kr = str(r.get("k"))
                if not r.get("same_as"):
                    peers[r["setting"]] = {"peer": r}
            heads = r.get("bytes_total", r["bytes"]) - r["bytes"]
            size = f"{r['bytes']:,}" + (f" (+{heads:,} heads)" if heads else "")
            runs.append(f"| {head} | {setting} | {kr} | {size} ({c['original_bytes'] / r['bytes']:.2f}x) "
                        f"| {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
                        f"| {r['peak_rss_mb']:.0f} ({r['import_rss_mb']:.0f}) "
                        f"| {fmt_err(r['errors'])} |")
        for label, p in peers.items():
            pe, b, k = p["peer"], p.get("budget"), p.get("rank")

            def secs(x):
                return f"{x['wall_s']:.2f} / {x['cpu_s']:.2f}" if x else "-"

            def speed(x):
                if not x:
                    return "-"
                return f"{pe['wall_s'] / x['wall_s']:.3g}x / {pe['cpu_s'] / max(x['cpu_s'], 1e-9):.3g}x"

            def err(stat):
                return " / ".join(f"{x['errors'][stat]:.4f}" if x else "-" for x in (pe, b, k))

            rank = f" (R = {k['rank_range'][1]})" if k else ""
            verdict.append(f"| {c['collection']} | {label} | {secs(pe)} | {secs(b)} | {speed(b)} "
                           f"| {secs(k)}{rank} | {speed(k)} | {err('mean')} | {err('max')} |")
    return "\n".join(runs) + "\n\n" + "\n".join(verdict) + "\n"


if __name__ == "__main__":
    main()
