"""Measure one compression end to end: phases, peak RSS, error, and the I/O floor.

    python benchmarks/run_compress.py benchmarks/.cache/lol-100 --rank 16 [--compute-dtype float32] [--record]

Runs in child processes (so peak RSS is the compression's own): first the I/O floor (read
every byte of the adapter files once, after dropping the page cache when permitted), then
`lorazip.compress` + save. Prints JSON; `--record` appends a row to docs/benchmarks.md with
the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def io_floor(src: Path) -> dict:
    files = sorted(src.rglob("*.safetensors"))
    t = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                total += len(chunk)
    return {"bytes": total, "seconds": time.perf_counter() - t}


def child_compress(args) -> dict:
    import torch

    import lorazip
    from lorazip.cli.parse import parse_size

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    coll = lorazip.load_collection(args.src)
    t_load = time.perf_counter() - t0
    timings: dict = {}
    t1 = time.perf_counter()
    art = lorazip.compress(coll, args.rank, method=args.method, compute_dtype=args.compute_dtype,
                           device=args.device, hash_sources=not args.no_hash, timings=timings,
                           memory_limit=parse_size(args.memory_limit, what="memory limit") if args.memory_limit else None)
    t_compress = time.perf_counter() - t1
    t2 = time.perf_counter()
    out = Path(args.out)
    art.save(out, overwrite=True)
    t_write = time.perf_counter() - t2
    rep = lorazip.evaluate(lorazip.load_artifact(out))
    return {
        "n_adapters": len(coll), "n_modules": len(coll.modules), "validate_s": t_load, "compress_s": t_compress,
        **timings, "write_s": t_write, "total_s": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "errors": rep["errors"], "storage": rep["storage"], "threads": torch.get_num_threads(),
    }


def record_row(doc: Path, heading: str, row: str) -> None:
    """Insert ``row`` at the end of the first table under ``heading`` (other sections untouched)."""
    lines = doc.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    at = start + 1
    while at < len(lines) and not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row)
    doc.write_text("".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="jd-full")
    ap.add_argument("--compute-dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-hash", action="store_true", help="skip sha256 of the sources")
    ap.add_argument("--memory-limit", help="passed to lorazip.compress (e.g. 64MB): stream larger modules")
    ap.add_argument("--out", default="/tmp/bench.lorazip.safetensors")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child", choices=["io", "compress"])
    args = ap.parse_args()
    if args.child == "io":
        print(json.dumps(io_floor(Path(args.src))))
        return
    if args.child == "compress":
        print(json.dumps(child_compress(args)))
        return

    def run(kind: str) -> dict:
        cold = drop_caches()
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", kind]
        cmd = [c for c in cmd if c != "--record"]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        res["cold_cache"] = cold
        return res

    io = run("io")
    comp = run("compress")
    result = {"command": "python benchmarks/run_compress.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
              "io_floor": io, "compress": comp,
              "over_io_floor_s": comp["total_s"] - io["seconds"]}
    print(json.dumps(result, indent=2))
    if args.record:
        e, st = comp["errors"], comp["storage"]
        row = (f"| {result['date']} | `{result['command']}` | {comp['n_adapters']} x {comp['n_modules']} | "
               f"{io['bytes'] / 1e9:.2f} GB, {io['seconds']:.1f} s{'' if io['cold_cache'] else ' (warm)'} | "
               f"{comp['total_s']:.1f} s (read wait {comp['read_s']:.1f}, solve {comp['solve_s']:.1f}, "
               f"errors {comp['error_s']:.1f}, sha256 {comp.get('hash_s', 0):.1f}, write {comp['write_s']:.1f}) | {comp['peak_rss_mb']:.0f} MB | "
               f"{e['mean']:.4f} / {e['max']:.4f} | {st['ratio_bytes']:.1f}x | {comp['threads']} |\n")
        record_row(ROOT / "docs" / "benchmarks.md", "## Compression scaling", row)


if __name__ == "__main__":
    main()
