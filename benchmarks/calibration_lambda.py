#!/usr/bin/env python3
"""Choose the calibration regulariser lambda on held-out CALIBRATION text (never the eval data).

Split the calibration text in two halves A and B (``lorazip calibrate`` on each), compress with
the statistics of A at several lambda, and measure the activation error of each artifact on the
inputs of B (lambda = 0 there: the plain ``||(M - M_hat) X_B||^2``), against weight-space
compression measured the same way. A lambda that is too small overfits A's directions (B's inputs
leave them), a large one falls back to weight space.

    python benchmarks/calibration_lambda.py --adapters examples/fortunes/adapters \
        --fit /work/cache/statsA.safetensors --held-out /work/cache/statsB.safetensors
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import lorazip
from lorazip.compress.whiten import activation_errors, whiten_collection
from lorazip.metrics import per_adapter, relative


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--fit", required=True, help="statistics the compression uses (half A)")
    ap.add_argument("--held-out", required=True, help="statistics the errors are measured on (half B)")
    ap.add_argument("--lambdas", default="0,1e-4,1e-3,3e-3,1e-2,3e-2,1e-1,1")
    ap.add_argument("--configs", default="rank=8,budget=2MB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    coll = lorazip.load_collection(args.adapters)
    held = whiten_collection(coll, args.held_out, 0.0)
    fit0 = whiten_collection(coll, args.fit, 0.0)
    rows = []
    for cfg in args.configs.split(","):
        key, val = cfg.split("=")
        kw = {"rank": int(val)} if key == "rank" else {"budget": int(float(val.rstrip("MB")) * 1e6)}

        def measure(art, label, lam, cfg=cfg):
            e_b = float(per_adapter(*activation_errors(art, coll, held)).mean())
            e_a = float(per_adapter(*activation_errors(art, coll, fit0)).mean())
            e_w = float(lorazip.evaluate(art, [args.adapters])["errors"]["mean"]) if label == "weight" else \
                float(relative(art.get("stats/weight_sq_error"), art.get("stats/weight_norm2")).mean())
            row = {"config": cfg, "objective": label, "lambda": lam, "bytes": art.serialized_size(),
                   "act_error_heldout": e_b, "act_error_fit": e_a, "weight_error": e_w}
            rows.append(row)
            print(json.dumps(row), flush=True)

        t0 = time.perf_counter()
        measure(lorazip.compress(coll, device="cpu", **kw), "weight", None)
        for lam in (float(x) for x in args.lambdas.split(",")):
            measure(lorazip.compress(coll, device="cpu", calibration=args.fit, calibration_lambda=lam, **kw),
                    "activation", lam)
        print(f"# {cfg}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
