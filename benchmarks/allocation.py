"""Per-module rank allocation versus one uniform rank, at equal bytes of the artifact.

    python benchmarks/allocation.py examples/fortunes/adapters --ranks 2 4 8 [--max-rank 32]

For each uniform rank r: compress at r, take its exact artifact size as the budget, compress
again with `--budget` (per-module greedy allocation), and print both errors as a Markdown row.
"""

from __future__ import annotations

import argparse
import time

import torch

import lorazip
from lorazip.compress.options import CompressOptions
from lorazip.compress.budget import compress_shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--max-rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    coll = lorazip.load_collection(args.sources)
    print(f"{len(coll)} adapters, {len(coll.modules)} modules")
    print("| uniform rank | bytes | uniform mean / max error | per-module mean / max error | per-module ranks (min-max) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in args.ranks:
        t = time.perf_counter()
        uni = lorazip.compress(coll, r, hash_sources=False)
        budget = uni.serialized_size()
        per, rep = compress_shared(coll, CompressOptions(budget=budget, max_rank=args.max_rank, hash_sources=False))
        eu, ep = lorazip.evaluate(uni)["errors"], lorazip.evaluate(per)["errors"]
        rs = rep["ranks"].values()
        print(f"| {r} | {budget:,} | {eu['mean']:.4f} / {eu['max']:.4f} | {ep['mean']:.4f} / {ep['max']:.4f} | "
              f"{min(rs)}-{max(rs)} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
