#!/usr/bin/env python3
"""Write ``calibration.jsonl``: calibration text for ``lorazip calibrate`` on this collection.

The text is taken from the TRAINING split of every category (``build_collection.py``'s
deterministic split), never from the held-out texts in ``data/`` that ``lorazip eval
--base-model --data`` measures retention on: per category, ``--per-category`` training
fortunes drawn with ``random.Random("calibration:<name>")``, and any text that also occurs
(whitespace- and case-insensitively) among the held-out texts of any category is left out.
Licences: those of the Debian fortunes packages, see ``LICENSE-data`` (the same texts the
adapters were trained on).

Usage (needs the .deb packages that build_collection.py downloads; resumable, offline after that):

    python examples/fortunes/build_calibration.py            # writes examples/fortunes/calibration.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import build_collection as bc


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/work/cache", help="downloads and extracted packages (as build_collection.py)")
    ap.add_argument("--per-category", type=int, default=16, help="training fortunes per category")
    ap.add_argument("--out", default=os.path.join(HERE, "calibration.jsonl"))
    args = ap.parse_args()
    cats = bc.load_categories(bc.ensure_debs(args.cache))
    held = {_key(t) for c in cats for t in c["heldout"]}
    for name in os.listdir(os.path.join(HERE, "data")):  # and whatever the data folder holds
        with open(os.path.join(HERE, "data", name), encoding="utf-8") as f:
            held |= {_key(json.loads(line)["text"]) for line in f if line.strip()}
    rows, dropped = [], 0
    for c in cats:
        pool = [t for t in c["train"] if _key(t) not in held]
        dropped += len(c["train"]) - len(pool)
        pick = random.Random(f"calibration:{c['name']}").sample(pool, min(args.per_category, len(pool)))
        rows += [{"text": t, "category": c["name"]} for t in pick]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        f.write(body)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(rows)} training fortunes of {len(cats)} categories "
          f"({dropped} training texts that also occur among held-out texts left out)")


if __name__ == "__main__":
    main()
