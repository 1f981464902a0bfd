"""Where the time of a budget or target run goes: pass 1, the allocation, the builds.

    python benchmarks/default_phases.py SRC [SRC ...] [--set rank=16] [--set budget=300000] [--json out.json]

For each collection, in a fresh child process each (so one run's memory does not carry over):
``lorazip.compress(coll, **settings)`` (no settings: the default, mean error 0.03 with the fewest
bytes) timed as a whole and by phase, with timers around pass 1 (``_MixedRun.fit``: every module
fit, growth included), the allocations (``_allocate_to_size``, one per storage precision and re-aim)
and the builds (``build_allocation``, real and dry), plus the artifact's bytes, its mean error and
the child's peak RSS. Phases of a fixed-rank run (``--set rank=16``) are not split: see
``time_breakdown.py``. Not a timed test: it prints a markdown table (and JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path


def child(src: str, settings: dict) -> dict:
    import importlib

    import lorazip
    from lorazip.metrics import per_adapter

    budget = importlib.import_module("lorazip.compress.budget")
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t
                calls[label] += 1

        setattr(owner, name, wrapper)

    timed(budget._MixedRun, "fit", "pass1_s")
    timed(budget, "_allocate_to_size", "allocation_s")
    timed(budget, "build_allocation", "builds_s")
    t0 = time.perf_counter()
    coll = lorazip.load_collection(src)
    t1 = time.perf_counter()
    art = lorazip.compress(coll, **settings)
    t2 = time.perf_counter()
    return {"source": src, "settings": settings, "headers_s": t1 - t0, "compress_s": t2 - t1, **spent,
            "calls": dict(calls), "artifact_bytes": art.serialized_size(),
            "mean_error": float(per_adapter(*art.stats()).mean()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def settings_from(items: list[str]) -> dict:
    """``KEY=VALUE`` items as ``lorazip.compress`` settings (a value: a Python literal or a string)."""
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="+")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a lorazip.compress setting (value: a Python literal or a string)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = settings_from(args.set)
    if args.child:
        print(json.dumps(child(args.src[0], settings)))
        return
    rows = []
    for src in args.src:
        cmd = [sys.executable, __file__, src, "--child"] + [f"--set={s}" for s in args.set]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{src}: {proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = ["compress_s", "pass1_s", "allocation_s", "builds_s", "artifact_bytes", "mean_error", "peak_rss_mb"]
    print("| collection | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        cells = [f"{r[k]:.5f}" if k == "mean_error" else f"{r.get(k, 0):,.2f}" if isinstance(r.get(k, 0), float)
                 else f"{r.get(k, 0):,}" for k in keys]
        print(f"| {Path(r['source']).name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
