"""Error against budget on adapters that share a subspace of a dimension between powers of two.

    python benchmarks/planted_sweep.py [--from 20000 --to 70000 --step 2500] [--r-shared 24] [--json out.json]

Writes the tests' planted collection (``tests/helpers.write_planted_groups``: 64 adapters of rank 4
inside one rank-``r_shared`` subspace of 256 dimensions, 1% noise, seed 7) to a temporary folder and
compresses it at each budget (one torch thread, no source hashing), printing the mean error, the
shared rank chosen and the predicted error. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_planted_groups  # noqa: E402

import lorazip  # noqa: E402
from lorazip.metrics import per_adapter  # noqa: E402


def sweep(budgets, r_shared: int = 24) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_planted_groups(Path(tmp), (64,), d=256, r_shared=r_shared, seed=7, noise=0.01)
        coll = lorazip.load_collection(tmp)
        for b in budgets:
            art = lorazip.compress(coll, hash_sources=False, budget=int(b))
            a = art.allocation
            predicted = [t["predicted"] for t in a["clusters_tried"] if t.get("predicted") is not None]
            rows.append({"budget": int(b), "bytes": art.serialized_size(), "mean_error": float(per_adapter(*art.stats()).mean()),
                         "shared_rank": max(a["ranks"].values()), "shared_bits": (a.get("bits") or {}).get("shared"),
                         "predicted": predicted[-1] if predicted else None})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="lo", type=int, default=20_000)
    ap.add_argument("--to", dest="hi", type=int, default=70_000)
    ap.add_argument("--step", type=int, default=2_500)
    ap.add_argument("--r-shared", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = sweep(range(args.lo, args.hi + 1, args.step), args.r_shared)
    print("| budget | bytes | mean error | predicted | shared rank | shared bits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pred = "-" if r["predicted"] is None else f"{r['predicted']:.4g}"
        print(f"| {r['budget']:,} | {r['bytes']:,} | {r['mean_error']:.4g} | {pred} | {r['shared_rank']} | {r['shared_bits']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
