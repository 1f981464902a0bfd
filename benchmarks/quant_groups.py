"""Which group size for low-bit rows: error against bits per number on real residual rows.

The rows lorazip stores at low bits are the per-adapter SVD components ``sqrt(sigma) u`` and
``sqrt(sigma) v`` of each (adapter, module) delta. For every collection given, this takes those
rows (every adapter, every module, every component), quantises them with
:func:`lorazip.lowbit.quantize` at 1, 2, 3, 4 and 8 bits with one bfloat16 scale per group of
32, 64, 128, 256 values or per row, and prints the energy-weighted relative squared error of the
rank-1 products ``x y^T`` (what a stored component contributes to the error) against the bits
spent per number, scales included. Usage::

    python benchmarks/quant_groups.py examples/fortunes/adapters ../shared/fixtures/real-adapters/gpt2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import lorazip
from lorazip import lowbit

GROUPS = (32, 64, 128, 256, None)


def component_rows(path: str, limit: int = 4000):
    """Rows ``x`` (d_out), ``y`` (d_in) and weights of the per-adapter SVD components of a collection,
    grouped by module shape; weights are sigma^2 over the adapter's energy in the module."""
    coll = lorazip.load_collection(path)
    out = []
    for info in coll.modules:
        f = coll.module_factors(info.name, dtype=torch.float64)
        B, A = f.B, f.A
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.transpose(1, 2))
        W, sv, Zh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))
        P, Q = Qb @ W, Qa @ Zh.transpose(1, 2)
        n2 = sv.square().sum(1, keepdim=True).clamp_min(1e-300)
        for i in range(B.shape[0]):
            for q in range(sv.shape[1]):
                if sv[i, q] > 1e-12 * sv[i, 0]:
                    root = sv[i, q].sqrt()
                    out.append((P[i, :, q] * root, Q[i, :, q] * root, float(sv[i, q] ** 2 / n2[i, 0])))
    out.sort(key=lambda t: -t[2])
    return out[:limit]


def measure(rows, bits: int, group: int | None) -> tuple[float, float]:
    err = tot = spent = count = 0.0
    by_shape: dict[tuple[int, int], list] = {}
    for x, y, w in rows:
        by_shape.setdefault((len(x), len(y)), []).append((x, y, w))
    for (do, di), items in by_shape.items():
        X = torch.stack([t[0] for t in items])
        Y = torch.stack([t[1] for t in items])
        w = torch.tensor([t[2] for t in items], dtype=torch.float64)
        res = []
        for M, d in ((X, do), (Y, di)):
            g = group or d
            codes, sc = lowbit.quantize(M, bits, g)
            res.append(torch.from_numpy(lowbit.dequantize(codes, sc, bits, g)).double())
            spent += len(items) * (lowbit.row_bytes(d, bits) + 2 * lowbit.n_groups(d, g)) * 8
            count += len(items) * d
        Xh, Yh = res
        e = ((X * X).sum(1) * (Y * Y).sum(1) - 2 * (X * Xh).sum(1) * (Y * Yh).sum(1)
             + (Xh * Xh).sum(1) * (Yh * Yh).sum(1)).clamp_min(0)
        s2 = (X * X).sum(1) * (Y * Y).sum(1)
        err += float((w * e / s2.clamp_min(1e-300)).sum())
        tot += float(w.sum())
    return err / tot, spent / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("collections", nargs="+")
    args = ap.parse_args()
    results = {}
    for path in args.collections:
        rows = component_rows(path)
        table = {}
        for b in lowbit.BITS:
            for g in GROUPS:
                e, bpn = measure(rows, b, g)
                table[f"{b}/{g or 'row'}"] = {"error": e, "bits_per_number": bpn}
        results[path] = table
        print(f"\n{path} ({len(rows)} components)")
        print("| bits | " + " | ".join(f"group {g or 'row'}" for g in GROUPS) + " |")
        print("|---|" + "---|" * len(GROUPS))
        for b in lowbit.BITS:
            cells = [table[f"{b}/{g or 'row'}"] for g in GROUPS]
            print(f"| {b} | " + " | ".join(f"{c['error']:.4f} @ {c['bits_per_number']:.2f}" for c in cells) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
