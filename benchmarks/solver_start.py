"""JD-Full's start: time and error of the ascent from each start, module by module.

    python benchmarks/solver_start.py SRC --rank R [--modules N] [--threads T]

Compares lorazip's start (``V`` from a randomized range of ``sum w_i M_i^T M_i``, ``U`` from one of
the U-step's operator for that ``V``; :func:`lorazip.solvers.jd_full._start`; replaced by the span of
the best single-adapter components where those hold twice as much,
:func:`lorazip.solvers.jd_full._individual_start`) with the data-driven start alone and with the
former one (both bases from their Gram operators with two power iterations each), over the first N
modules of SRC read in float32, at ``tol = 1e-4``. Prints per module and in total: seconds, sweeps
and the weighted error ``1 - objective`` (lower is better).
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import lorazip
from lorazip.solvers.factors import Factors

J = importlib.import_module("lorazip.solvers.jd_full")  # the module (lorazip.solvers.jd_full is also a function)


def former_start(fac, wc, rank, generator, n_power):
    """Both bases from their Gram operators, two power iterations each (lorazip before 2026-12-06)."""
    V, L, _ = J._init_side(fac, "A", J._grams(fac, "B", wc), fac.d_in, rank, generator, 2)
    U, K, _ = J._init_side(fac, "B", J._grams(fac, "A", wc), fac.d_out, rank, generator, 2)
    return U, K, V, L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modules", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    coll = lorazip.load_collection(args.source)
    # name -> (start, the single-adapter start allowed)
    starts = {"lorazip": (J._start, True), "data-driven": (J._start, False), "former": (former_start, False)}
    total = {k: [0.0, 0, 0.0] for k in starts}
    for m in coll.modules[: args.modules]:
        f = coll.module_factors(m.name, dtype=torch.float32)
        fac = Factors.stacked(f.B, f.A)
        _ = next(iter(fac)).Bt2  # the transposed copy, made once (as in a run)
        row = []
        for name, (start, individual) in starts.items():
            saved, J._start = J._start, start
            try:
                t0 = time.perf_counter()  # (second_start=False: no single-adapter start, nor a second ascent)
                res = J.jd_full_factors(fac, min(args.rank, fac.d_in, fac.d_out), tol=1e-4, second_start=individual)
                dt = time.perf_counter() - t0
            finally:
                J._start = saved
            total[name][0] += dt
            total[name][1] += res.n_iters
            total[name][2] += 1 - res.objective
            row.append(f"{name} {dt:.3f} s, {res.n_iters} sweeps, error {1 - res.objective:.6f}")
        print(f"{m.name}: " + " | ".join(row))
    for name, (dt, it, err) in total.items():
        print(f"total {name}: {dt:.2f} s, {it} sweeps, summed error {err:.6f}")


if __name__ == "__main__":
    main()
