"""Where the time of one ``lorazip compress`` goes, next to the time it takes to read the collection.

    python benchmarks/time_breakdown.py SRC [SRC ...] [--rank 16] [--cold] [--json out.json]

For each collection, in one fresh process each (so start-up counts): the I/O floor (every weights
file read once, 16 MiB at a time, just before: warm page cache where the collection fits in memory),
then ``lorazip.compress(coll,
rank=R, timings=t)`` split into its phases: start-up (``import lorazip`` and torch), reading the
headers (``load_collection``), waiting for factor reads (``read_s``), solver sweeps (``solve_s``),
the exact-error pass (``error_s``), waiting for the sources' sha256 and assembling (``hash_s``: the
hashing itself overlaps the solve in a thread), what is left of the compress call (the module loop's
own work), and writing the artifact; wall time from the parent, peak RSS from the child's rusage.
``--cold``: the collection's weights files leave the page cache (``posix_fadvise(DONTNEED)`` on each,
which needs no privilege, unlike dropping the whole cache) before the floor and again before the run,
so both read from the disk (or whatever caches it below this machine); the cached bytes at each start
are reported (``cached_gb_floor``, ``cached_gb_run``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def floor_seconds(src: Path) -> tuple[float, int]:
    """Seconds to read every ``adapter_model.safetensors`` under ``src`` once, and the bytes read."""
    files = sorted(src.rglob("adapter_model.safetensors"))
    t0, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                block = fh.read(16 << 20)
                if not block:
                    break
                total += len(block)
    return time.perf_counter() - t0, total


def evict(src: Path) -> None:
    """Drop the clean cached pages of every weights file under ``src`` (Linux; elsewhere nothing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f in sorted(src.rglob("adapter_model.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(src: Path) -> int | None:
    """Bytes of the weights files under ``src`` in the page cache (``mincore`` on a mapping of each),
    None where that cannot be asked (not Linux)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page, total = mmap.PAGESIZE, 0
    for f in sorted(src.rglob("adapter_model.safetensors")):
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
            if not ok:
                return None
            total += min(sum(v & 1 for v in vec) * page, size)
        finally:
            os.close(fd)
    return total


def child(src: str, rank: int, out: str) -> dict:
    """One run, in this (fresh) process."""
    t0 = time.perf_counter()
    import lorazip  # noqa: F401 - start-up: lorazip and torch
    import torch  # noqa: F401  (start-up includes it)

    t1 = time.perf_counter()
    coll = lorazip.load_collection(src)
    t2 = time.perf_counter()
    timings: dict[str, float] = {}
    art = lorazip.compress(coll, rank=rank, timings=timings)
    t3 = time.perf_counter()
    art.save(out, overwrite=True)
    t4 = time.perf_counter()
    phases = {k: timings.get(k, 0.0) for k in ("read_s", "solve_s", "error_s", "hash_s")}
    return {"startup_s": t1 - t0, "headers_s": t2 - t1, **phases,
            "loop_other_s": (t3 - t2) - sum(phases.values()), "write_s": t4 - t3, "total_s": t4 - t0,
            "n": len(coll), "modules": len(coll.modules), "artifact_bytes": os.path.getsize(out),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cold", action="store_true", help="drop the collection's pages from the cache before "
                                                        "the floor and before the run")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return
    rows = []
    for src in args.sources:
        cold = {}
        if args.cold:
            evict(src)
            cold["cached_gb_floor"] = (cached_bytes(src) or 0) / 1e9
        floor, nbytes = floor_seconds(src)
        out = Path("/tmp") / f"breakdown-{src.name}.lorazip.safetensors"
        if args.cold:
            evict(src)
            cold["cached_gb_run"] = (cached_bytes(src) or 0) / 1e9
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "x", "--child", str(src), str(args.rank), str(out)],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{src}: the run failed (exit {proc.returncode})")
        row = {"source": str(src), "gb": nbytes / 1e9, "floor_s": floor, "wall_s": wall, **cold, **json.loads(stdout)}
        row["x_floor"] = row["wall_s"] / floor if floor else None
        rows.append(row)
        out.unlink(missing_ok=True)
        print(json.dumps(row), flush=True)
    keys = ["gb"] + (["cached_gb_floor", "cached_gb_run"] if args.cold else []) + [
        "floor_s", "startup_s", "headers_s", "read_s", "solve_s", "error_s", "hash_s", "loop_other_s", "write_s",
        "wall_s", "x_floor", "peak_rss_mb"]
    print("| collection | n | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {Path(r['source']).name} | {r['n']} | " + " | ".join(
            f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
