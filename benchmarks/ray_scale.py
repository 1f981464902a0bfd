"""Compression on Ray against the single-process run: wall time, per-task overhead, same bytes.

    python benchmarks/make_collection.py --n 100 --out benchmarks/.cache/lol-100
    python benchmarks/ray_scale.py benchmarks/.cache/lol-100 --workers 1 2 [--rank 16] [--json out.json]
    python benchmarks/ray_scale.py benchmarks/.cache/lol-100 --workers 2 --clusters 2 [--cache-bytes 0]

Each configuration runs in its own child process (one torch thread in the driver and in every Ray
task, like ``LORAZIP_THREADS=1``): first the single-process ``lorazip.compress``, then, per worker
count, a fresh local Ray instance (``RayExecutor(workers=k)``; its start-up is timed apart) running
one task per module (with ``--clusters K``, one per module and clustering step; ``--cache-bytes``
bounds the module factors kept between the steps, in Ray's object store, and ``module_reads``
counts the reads of a module by a task). The artifacts' sha256 must all match. The overhead per task is measured
twice: on the run itself (``k x wall - busy``, spread over the tasks: scheduling, transfers and
idle cores at the end) and with no-op tasks on the same instance (the round trip alone). Not a
timed test: it prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _noop_task(collection, j, *, clock):
    """A task that reads and solves nothing: what remains is Ray's round trip."""
    return j


def child(args) -> dict:
    import torch

    import lorazip

    torch.set_num_threads(1)
    coll = lorazip.load_collection(args.src)
    out: dict = {"mode": args.mode, "workers": args.k, "modules": len(coll.modules), "adapters": len(coll)}
    path = Path(args.artifact)
    timings: dict = {}
    kw = dict(clusters=args.clusters, cache_bytes=args.cache_bytes)
    if args.mode == "local":
        t = time.perf_counter()
        art = lorazip.compress(coll, args.rank, timings=timings, **kw)
        out["compress_s"] = time.perf_counter() - t
    else:
        from lorazip.compress.executor import RayExecutor, map_modules

        t = time.perf_counter()
        with RayExecutor(workers=args.k) as ex:
            out["start_s"] = time.perf_counter() - t
            t = time.perf_counter()
            art = lorazip.compress(coll, args.rank, executor=ex, timings=timings, **kw)
            out["compress_s"] = time.perf_counter() - t
            rep = ex.report()
            busy = rep["busy_s"]
            out["tasks"] = rep["tasks"]
            out["module_reads"] = rep["module_reads"]
            out["busy_s"] = busy
            out["overhead_per_task_s"] = (args.k * out["compress_s"] - busy) / rep["tasks"]
            out["workers_report"] = rep["workers"]
            n_noop = 200
            t = time.perf_counter()
            for _ in map_modules(ex, _noop_task, coll, [(j,) for j in range(n_noop)],
                                 labels=[str(j) for j in range(n_noop)], phase="noop"):
                pass
            out["noop_round_trip_s"] = (time.perf_counter() - t) / n_noop * args.k  # per task and worker
    t = time.perf_counter()
    art.save(path, overwrite=True)
    out["save_s"] = time.perf_counter() - t
    out["timings"] = timings
    out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    out["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clusters", type=int, default=1)
    ap.add_argument("--cache-bytes", type=int, default=2 << 30, help="factors kept between clustering steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "LORAZIP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    runs = []
    for mode, k in [("local", 0)] + [("ray", k) for k in args.workers]:
        art = Path(f"/tmp/ray_scale_{os.getpid()}_{mode}{k}.lorazip.safetensors")
        cmd = [sys.executable, __file__, str(args.src), "--child", "--mode", mode, "--k", str(k), "--rank",
               str(args.rank), "--artifact", str(art), "--clusters", str(args.clusters), "--cache-bytes",
               str(args.cache_bytes)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{mode} {k}: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["process_s"] = time.perf_counter() - t
        runs.append(res)
        print(json.dumps({k2: v for k2, v in res.items() if k2 != "workers_report"}), flush=True)
    same = len({r["sha256"] for r in runs}) == 1
    summary = {"src": str(args.src), "rank": args.rank, "clusters": args.clusters, "cache_bytes": args.cache_bytes,
               "identical": same, "runs": runs,
               "speedup_vs_local": {f"ray{r['workers']}": runs[0]["compress_s"] / r["compress_s"]
                                    for r in runs[1:]}}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({"identical": same, "speedup_vs_local": summary["speedup_vs_local"]}))
    if not same:
        sys.exit("the artifacts differ")


if __name__ == "__main__":
    main()
