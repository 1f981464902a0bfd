"""How fast the low-bit quantiser is: ``lorazip.lowbit.quantize`` on rows like a build's.

    python benchmarks/quantiser_speed.py [--rows 20000] [--length 4096] [--threads 1] [--calls 6]

Rows of ``--length`` Gaussian values with a spread per row (a few with an outlier), each at 2, 3 or 4
bits (the widths that search their scale), quantised with their values handed back as a build asks
(``values=True``); prints every call's seconds, the best, numbers per second, the mean relative squared
error and a digest of the codes and scales (to compare commits: the same digest is the same output).
Not a timed test. Compare commits by running it with ``PYTHONPATH`` set to a worktree of each, in turns.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lorazip import lowbit

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.length, generator=gen) * torch.rand(args.rows, 1, generator=gen)
    x[::50, 7] *= 20  # a few rows with one outlier
    bits = np.random.default_rng(0).choice([2, 3, 4], args.rows)
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        codes, scales, vals = lowbit.quantize(x, bits, values=True)
        times.append(time.perf_counter() - t)
    err = float(((torch.from_numpy(vals) - x) ** 2).sum() / (x**2).sum())
    digest = hashlib.sha256(codes.tobytes() + scales.tobytes()).hexdigest()[:16]
    print("calls: " + ", ".join(f"{t:.3f}" for t in times) + " s")
    print(f"best {min(times):.3f} s ({x.numel() / min(times) / 1e6:.0f} M numbers/s, {torch.get_num_threads()} "
          f"thread(s)); mean relative squared error {err:.6f}; digest {digest}")


if __name__ == "__main__":
    main()
