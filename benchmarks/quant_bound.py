"""How far lorazip's low-bit rows are from the best any quantiser of them could do.

The rows lorazip stores at low bits are per-adapter SVD components ``sqrt(sigma) u`` and
``sqrt(sigma) v`` (:func:`quant_groups.component_rows`: the leading components of every adapter
and module). Scaled to unit rms, each is quantised with :func:`lorazip.lowbit.quantize` at 1, 2,
3 and 4 bits (one bfloat16 scale per row, what the files store), giving a distortion ``D_b``
(mean squared error per value). Against it:

* **entropy-coded scalar quantisation** (ECSQ): a uniform grid with a zero level, its step chosen
  so that the distortion is ``D_b``, the codes costing their empirical entropy (ideal entropy
  coding of the pooled values): what a practical variable-length coder would reach;
* **the rate-distortion bound** of a memoryless source with the rows' value distribution: the
  Shannon lower bound ``h - log2(2 pi e D) / 2`` with ``h`` the rows' differential entropy,
  estimated from a histogram of the pooled values (``H(codes) + log2(step)`` at a step of 0.01);
  for Gaussian values it is ``log2(1 / D) / 2``. No quantiser, scalar or vector, with any
  coder, stores such values at distortion ``D_b`` in fewer bits per number.

The ratio ``bound / b`` is the most by which better coding could shrink the codes of a file at the
same error (scales and the rest of the file aside). Between two widths lorazip's allocation mixes
rows of both (its rate is linear in the distortion between ``(D_b, b)`` and ``(D_b+1, b + 1)``),
while the bound is convex in the distortion, so the smallest ratio over every distortion from
``D_4`` to ``D_1`` (``worst_ratio``) is the bound for any mix of 1-4-bit rows. Usage::

    python benchmarks/quant_bound.py examples/fortunes/adapters [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_groups import component_rows  # noqa: E402

from lorazip import lowbit  # noqa: E402

WIDTHS = (1, 2, 3, 4)
GAUSS_H = 0.5 * math.log2(2 * math.pi * math.e)  # differential entropy of a unit Gaussian, bits


def unit_rows(rows) -> list[torch.Tensor]:
    """Every stored row (both sides of each component) scaled to unit rms, float32."""
    out = []
    for x, y, _ in rows:
        for v in (x, y):
            v = v.float()
            rms = v.square().mean().sqrt()
            if float(rms) > 0:
                out.append(v / rms)
    return out


def fixed_rate(rows: list[torch.Tensor], bits: int) -> float:
    """Mean squared error per value of lorazip's ``bits``-bit rows (unit-rms rows, per-row scales)."""
    err = count = 0.0
    by_len: dict[int, list[torch.Tensor]] = {}
    for v in rows:
        by_len.setdefault(len(v), []).append(v)
    for vs in by_len.values():
        X = torch.stack(vs)
        codes, scales = lowbit.quantize(X, bits)
        Xh = torch.from_numpy(lowbit.dequantize(codes, scales, bits))
        err += float((Xh.double() - X.double()).square().sum())
        count += X.numel()
    return err / count


def _entropy(q: np.ndarray) -> float:
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ecsq(values: np.ndarray, step: float) -> tuple[float, float]:
    """(distortion, entropy in bits) of a uniform grid of ``step`` with a zero level."""
    q = np.round(values / step)
    return float(np.square(q * step - values).mean()), _entropy(q)


def ecsq_rate(values: np.ndarray, distortion: float) -> tuple[float, float]:
    """(rate, step) of entropy-coded uniform quantisation at ``distortion`` (bisection on the step)."""
    lo, hi = 1e-3, 8.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if ecsq(values, mid)[0] > distortion:
            hi = mid
        else:
            lo = mid
    return ecsq(values, lo)[1], lo


def differential_entropy(values: np.ndarray, step: float = 0.01) -> float:
    """Estimate of the differential entropy (bits) of the values' distribution."""
    return _entropy(np.round(values / step)) + math.log2(step)


def worst_ratio(h: float, points: list[tuple[float, int]], steps: int = 200) -> tuple[float, float]:
    """(least bound / rate, the rate there) over distortions between the widths' ``(D_b, b)`` points,
    the rate of a mix of rows at two adjacent widths linear in the distortion between them."""
    best = (math.inf, 0.0)
    for (d0, b0), (d1, b1) in zip(points, points[1:]):
        for k in range(steps + 1):
            t = k / steps
            D, rate = d0 + t * (d1 - d0), b0 + t * (b1 - b0)
            bound = max(0.0, h - 0.5 * math.log2(2 * math.pi * math.e * D))
            best = min(best, (bound / rate, rate))
    return best


def evaluate(path: str, limit: int) -> dict:
    rows = unit_rows(component_rows(path, limit))
    values = torch.cat(rows).numpy().astype(np.float64)
    h = differential_entropy(values)
    table = []
    for b in WIDTHS:
        D = fixed_rate(rows, b)
        rate, step = ecsq_rate(values, D)
        bound = max(0.0, h - 0.5 * math.log2(2 * math.pi * math.e * D))
        table.append({"bits": b, "distortion": D, "ecsq_bits": rate, "ecsq_step": step, "bound_bits": bound,
                      "gaussian_bound_bits": max(0.0, 0.5 * math.log2(1 / D)), "bound_over_bits": bound / b})
    worst = worst_ratio(h, [(r["distortion"], r["bits"]) for r in table])
    return {"source": path, "rows": len(rows), "worst_ratio": worst[0], "worst_at_bits": worst[1], "values": int(values.size), "kurtosis":
            float(np.mean(values ** 4) / np.mean(values ** 2) ** 2), "differential_entropy": h,
            "gaussian_entropy": GAUSS_H, "widths": table}


def markdown(res: dict) -> str:
    lines = [f"{res['source']}: {res['rows']} rows, {res['values']:,} values, kurtosis {res['kurtosis']:.2f}, "
             f"differential entropy {res['differential_entropy']:.3f} bits (unit Gaussian {GAUSS_H:.3f})", "",
             "| bits | lorazip's distortion | ECSQ at that distortion (bits) | bound (bits) | bound / bits |",
             "|---|---|---|---|---|"]
    for r in res["widths"]:
        lines.append(f"| {r['bits']} | {r['distortion']:.4f} | {r['ecsq_bits']:.2f} | {r['bound_bits']:.2f} | "
                     f"{r['bound_over_bits']:.2f} |")
    lines += ["", f"least bound / rate over mixes of 1-4-bit rows: {res['worst_ratio']:.3f} "
              f"(at {res['worst_at_bits']:.2f} bits a number)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("collections", nargs="+")
    ap.add_argument("--limit", type=int, default=4000, help="leading components per collection (default 4000)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = [evaluate(p, args.limit) for p in args.collections]
    for res in results:
        print(markdown(res) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
