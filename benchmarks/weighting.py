"""Compare the relative and absolute weightings on a collection (mean / median / max error).

    python benchmarks/weighting.py SRC [SRC...] --ranks 4 8 16

Prints one Markdown table row per (weighting, rank); used to choose the default weighting
(docs/method.md).
"""

from __future__ import annotations

import argparse
import time

import lorazip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--method", default="jd-full")
    args = ap.parse_args()
    coll = lorazip.load_collection(args.sources)
    print(f"{len(coll)} adapters, {len(coll.modules)} modules")
    print("| weighting | rank | mean rel. err | median | max | time (s) |")
    print("|---|---|---|---|---|---|")
    for rank in args.ranks:
        for weighting in ("relative", "absolute"):
            t = time.perf_counter()
            art = lorazip.compress(coll, rank, method=args.method, weighting=weighting, hash_sources=False)
            dt = time.perf_counter() - t
            e = lorazip.evaluate(art)["errors"]
            print(f"| {weighting} | {rank} | {e['mean']:.4f} | {e['median']:.4f} | {e['max']:.4f} | {dt:.1f} |")


if __name__ == "__main__":
    main()
