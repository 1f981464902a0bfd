"""Error against bytes: lorazip --budget versus per-adapter SVD and uniform JD-Full.

For every collection and every budget (log-spaced fractions of the LoRA bytes of the originals
in the storage dtype), this runs ``lorazip.compress(coll, budget=..., storage_dtype=<the
adapters' own>)`` (the same precision as the SVD it is compared with) and compares its mean
per-adapter error (energy-weighted relative squared Frobenius error, the figure lorazip
reports) with two alternatives a user has, each measured independently of lorazip's allocator:

* per-adapter truncated SVD: every (adapter, module) delta is formed densely and its exact
  singular values computed with numpy; ranks are spread greedily over all pairs by error
  removed per stored number, at the same bytes, three ways: ``svd_at_parts`` gets the numbers
  of the artifact's bases, cores and residual factors; ``svd_as_peft_folders`` gets the
  artifact's file bytes minus what its own PEFT folders spend on safetensors headers and
  adapter_config.json (what a user keeping truncated adapters really stores);
  ``svd_at_file`` gets the whole artifact file as bare factors (no headers at all: the
  strictest, unreachable in practice);
* uniform JD-Full: ``lorazip.compress(coll, rank=r)`` at the largest r whose file fits.

``lorazip_auto`` is the default ``lorazip.compress(coll, budget=...)``, which may store the parts
in int8 where that does better at the same bytes; ``svd_int8_at_file`` is its bound: per-adapter
SVD given the whole file at one byte a number (no row scales, no rounding error, no header).

Extras (``modules_to_save`` heads) are left out (``keep_extras=False``): the comparison is
about the LoRA part. Usage::

    python benchmarks/frontier.py --plot docs/frontier.png > frontier.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import lorazip

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = {
    "fortunes (27 SmolLM2)": [ROOT / "examples/fortunes/adapters"],
    "gpt2 (6 real)": [ROOT.parent / "shared/fixtures/real-adapters/gpt2"],
    "gpt2 checkpoints (4)": sorted((ROOT.parent / "shared/fixtures/real-adapters/gpt2").glob("winkitee*")),
    "distilbert (2 real)": [ROOT.parent / "shared/fixtures/real-adapters/distilbert-base-uncased"],
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def dense_spectra(coll):
    """Per (adapter, module) squared singular values of the dense delta, and d_in + d_out."""
    pairs = []
    for m in coll.modules:
        f = coll.module_factors(m.name)
        for i in range(len(coll)):
            if int(f.ranks[i]) == 0:
                continue
            M = (f.B[i] @ f.A[i]).numpy()
            pairs.append((i, m.d_in + m.d_out, np.linalg.svd(M, compute_uv=False) ** 2))
    return pairs


def svd_frontier(pairs, n, numbers: int) -> float:
    E = np.zeros(n)
    for i, _, s2 in pairs:
        E[i] += s2.sum()
    steps = [(s2[j] / E[i] / c, s2[j] / E[i], c, i) for i, c, s2 in pairs for j in range(min(len(s2), 4096))]
    steps.sort(key=lambda t: -t[0])
    err = np.ones(n)
    used = 0
    for _, g, c, i in steps:
        if used + c <= numbers:
            used += c
            err[i] -= g
    return float(np.mean(np.maximum(err, 0)))


def peft_overhead(coll) -> int:
    """Bytes the alternative spends besides factors: each adapter folder's safetensors header
    (same keys as the original's) and adapter_config.json."""
    import struct

    total = 0
    for a in coll.adapters:
        with open(a.weights_file, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
        total += (a.path / "adapter_config.json").stat().st_size
    return total


def parts_numbers(art) -> int:
    n = len(art.names)
    tot = 0
    for mod in art.modules:
        r = mod["rank"]
        r_out = mod.get("rank_out", r)
        tot += mod.get("n_clusters", 1) * (r * mod["d_in"] + r_out * mod["d_out"]) + n * r * r_out
        tot += mod.get("residual", {}).get("total_rank", 0) * (mod["d_in"] + mod["d_out"])
    return tot


def uniform_jd(coll, budget: int, cache: dict):
    best = None
    lo, hi = 1, 64
    while lo <= hi:
        r = (lo + hi) // 2
        if r not in cache:
            art = lorazip.compress(coll, r, keep_extras=False, hash_sources=False)
            cache[r] = (art.serialized_size(), lorazip.evaluate(art)["errors"]["mean"])
        if cache[r][0] <= budget:
            best, lo = (r, *cache[r]), r + 1
        else:
            hi = r - 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.01,0.02,0.05,0.1,0.2,0.5")
    ap.add_argument("--only", help="run only the collections whose name contains this")
    ap.add_argument("--plot", help="write the frontier plot (PNG) here")
    args = ap.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    rows = []
    for name, sources in COLLECTIONS.items():
        if args.only and args.only not in name:
            continue
        coll = lorazip.load_collection(sources)
        dtype = coll.storage_dtype()
        item = ITEMSIZE[dtype]
        lora_bytes = item * sum(spec.rank * (coll.module(m).d_in + coll.module(m).d_out)
                                for a in coll.adapters for m, spec in a.modules.items())
        pairs = dense_spectra(coll)
        overhead = peft_overhead(coll)
        cache: dict = {}
        for frac in fractions:
            budget = int(frac * lora_bytes)
            t0 = time.perf_counter()
            try:
                art = lorazip.compress(coll, budget=budget, keep_extras=False, hash_sources=False,
                                       storage_dtype=dtype)
                secs = time.perf_counter() - t0
                auto = lorazip.compress(coll, budget=budget, keep_extras=False, hash_sources=False)
            except lorazip.OptionError as exc:
                print(f"{name} at {frac}: {exc}", file=sys.stderr)
                continue
            size = art.serialized_size()
            err = lorazip.evaluate(art)["errors"]["mean"]
            svd_file = svd_frontier(pairs, len(coll), size // item)
            svd_folders = svd_frontier(pairs, len(coll), max(size - overhead, 0) // item)
            svd_parts = svd_frontier(pairs, len(coll), parts_numbers(art))
            svd_int8 = svd_frontier(pairs, len(coll), size)  # one byte a number, no scales, no rounding
            uni = uniform_jd(coll, size, cache)
            row = {"collection": name, "fraction": frac, "budget": budget, "bytes": size, "lorazip": err,
                   "lorazip_auto": lorazip.evaluate(auto)["errors"]["mean"], "svd_int8_at_file": svd_int8,
                   "auto_dtype": auto.meta["storage_dtype"],
                   "chosen": art.allocation["chosen"], "svd_at_file": svd_file, "svd_as_peft_folders": svd_folders, "svd_at_parts": svd_parts,
                   "uniform_rank": uni[0] if uni else None, "uniform": uni[2] if uni else None, "seconds": secs}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["collection"] for r in rows))
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        rs = [r for r in rows if r["collection"] == name]
        x = [r["bytes"] / 1e6 for r in rs]
        ax.plot(x, [r["lorazip"] for r in rs], "o-", label="lorazip --budget (mix), adapters' dtype")
        ax.plot(x, [r["lorazip_auto"] for r in rs], "*-", label="lorazip --budget, default (int8 where better)")
        ax.plot(x, [r["svd_as_peft_folders"] for r in rs], "s--", label="per-adapter SVD as PEFT folders, same bytes")
        ax.plot(x, [r["svd_at_file"] for r in rs], "x:", color="grey", label="per-adapter SVD, bare factors")
        if all("svd_int8_at_file" in r for r in rs):
            ax.plot(x, [max(r["svd_int8_at_file"], 1e-6) for r in rs], "+:", color="silver",
                    label="per-adapter SVD, bare factors at 1 byte a number (bound)")
        ax.plot(x, [r["uniform"] if r["uniform"] is not None else np.nan for r in rs], "^:",
                label="uniform JD-Full (--rank)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("artifact MB")
        ax.set_ylabel("mean rel. sq. error")
        ax.set_title(name, fontsize=9)
        if k == 0:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
