#!/usr/bin/env python3
"""Task retention at equal bytes: activation-aware (``--calibration``) vs weight-space compression.

For every budget, the fortunes collection is compressed twice with ``--budget`` (the mixed
allocator: shared bases plus per-adapter residual parts): once minimising the weight error, once
the activation error on the calibration statistics (``lorazip calibrate`` on
``calibration.jsonl``, training-split text). Both artifacts are then evaluated on the HELD-OUT
texts (``data/<name>.jsonl``, never the calibration text) with ``lorazip.taskeval``: retention
``(loss_base - loss_compressed) / (loss_base - loss_original)`` per adapter; base and original
losses are computed once. Writes a JSON file with every point, a PNG (retention loss vs bytes,
both objectives) and Markdown tables.

    python examples/fortunes/calibration_curve.py --stats /work/cache/fortunes-stats.safetensors \
        --budgets 0.6MB,1.2MB,2.4MB,4.8MB --max-texts 16

One torch thread; ~4.5 s per (adapter, artifact) evaluation of 16 texts of SmolLM2-135M on a
shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=str(HERE / "adapters"))
    ap.add_argument("--data", default=str(HERE / "data"), help="held-out texts, <name>.jsonl")
    ap.add_argument("--base-model", default="/work/cache/smollm2-135m-instruct")
    ap.add_argument("--stats", default="/work/cache/fortunes-stats.safetensors", help="lorazip calibrate output")
    ap.add_argument("--calibration-lambda", type=float, default=None, help="default: lorazip's")
    ap.add_argument("--budgets", default="0.6MB,1.2MB,2.4MB,4.8MB")
    ap.add_argument("--max-texts", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="only the first N adapters (sorted by name)")
    ap.add_argument("--png", default=str(REPO / "docs" / "calibration.png"))
    ap.add_argument("--json", default=str(REPO / "docs" / "calibration.json"))
    ap.add_argument("--md", default=None)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def _bytes(text: str) -> int:
    t = text.strip().upper()
    for unit, mult in (("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def markdown(res: dict) -> str:
    out = ["| budget | objective | bytes | weight error | activation error | mean retention | median | min | "
           "retention loss (mean 1 - r) | loss ratio act/weight |", "| --- " * 10 + "|"]
    by = {}
    for row in res["rows"]:
        by.setdefault(row["budget"], {})[row["objective"]] = row
    for b in sorted(by):
        for obj in ("weight", "activation"):
            r = by[b][obj]
            ratio = r["retention_loss"] / by[b]["weight"]["retention_loss"] if obj == "activation" else None
            out.append(f"| {b / 1e6:.1f} MB | {obj} | {r['bytes']:,} | {r['weight_error']['mean']:.3f} | "
                       f"{r['activation_error']['mean']:.3f} | {r['retention']['mean']:.4f} | "
                       f"{r['retention']['median']:.4f} | {r['retention']['min']:.4f} | {r['retention_loss']:.4f} | "
                       + (f"{ratio:.2f} |" if ratio is not None else "|"))
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for obj, style in (("weight", "o-"), ("activation", "s-")):
        rows = sorted((r for r in res["rows"] if r["objective"] == obj), key=lambda r: r["bytes"])
        x = [r["bytes"] / 1e6 for r in rows]
        axes[0].plot(x, [r["retention_loss"] for r in rows], style, label=f"{obj}-space objective")
        axes[1].plot(x, [r["retention"]["mean"] for r in rows], style, label=f"{obj}-space objective")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axes[0].set_yscale("log")
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[0].set_yticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    axes[0].yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[0].set_ylabel("retention loss, mean of 1 - retention")
    axes[1].set_ylabel("mean retention")
    ticks = sorted({r["budget"] / 1e6 for r in res["rows"]})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("artifact bytes (MB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"fortunes, {res['n_adapters']} adapters x {res['max_texts']} held-out texts: "
                 "--budget with and without --calibration", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import lorazip
    from lorazip.compress.whiten import activation_errors, whiten_collection
    from lorazip.metrics import per_adapter, summary
    from lorazip.taskeval import TaskEvaluator

    names = sorted(p.name for p in Path(args.adapters).iterdir() if (p / "adapter_model.safetensors").is_file()
                   and (Path(args.data) / f"{p.name}.jsonl").is_file())[: args.limit]
    coll = lorazip.load_collection([str(Path(args.adapters) / n) for n in names])
    lam = args.calibration_lambda
    measure = whiten_collection(coll, args.stats, 0.0)  # activation error of any artifact, lambda = 0
    ev = TaskEvaluator(args.base_model, args.data, max_texts=args.max_texts, max_length=args.max_length,
                       batch_size=args.batch_size)
    t0 = time.perf_counter()
    rows = []
    for b in (_bytes(x) for x in args.budgets.split(",")):
        for obj in ("weight", "activation"):
            kw = {"calibration": args.stats, "calibration_lambda": lam} if obj == "activation" else {}
            t1 = time.perf_counter()
            art = lorazip.compress(coll, budget=b, device="cpu", **kw)
            t_c = time.perf_counter() - t1
            rep = lorazip.evaluate(art)
            werr = rep["weight_errors"] if obj == "activation" else rep["errors"]
            aerr = per_adapter(*activation_errors(art, coll, measure)).tolist()
            task = ev.evaluate(art, originals=[str(Path(args.adapters) / n) for n in names])
            ret = {a["name"]: a["retention"] for a in task["adapters"]}
            act = dict(zip(art.names, aerr))
            wts = {a["name"]: a["weight_error" if obj == "activation" else "error"] for a in rep["adapters"]}
            vals = [v for v in ret.values() if v is not None]
            row = {"budget": b, "objective": obj, "bytes": art.serialized_size(), "compress_s": t_c,
                   "chosen": (art.allocation or {}).get("chosen"), "weight_error": werr,
                   "activation_error": summary(aerr), "retention": summary(vals),
                   "retention_loss": statistics.fmean(1 - v for v in vals),
                   "adapters": [{"name": a["name"], "retention": a["retention"], "loss_base": a["loss_base"],
                                 "loss_original": a["loss_original"], "loss_compressed": a["loss_compressed"],
                                 "activation_error": act[a["name"]], "weight_error": wts[a["name"]]}
                                for a in task["adapters"]],
                   }
            rows.append(row)
            print(f"{b / 1e6:.2f} MB {obj:10s} bytes {row['bytes']:,} weight {werr['mean']:.4f} "
                  f"act {row['activation_error']['mean']:.4f} retention {row['retention']['mean']:.4f} "
                  f"loss {row['retention_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "n_adapters": len(names),
           "adapters": names, "max_texts": args.max_texts, "max_length": args.max_length,
           "stats": {"path": args.stats, "sha256": lorazip.load_calibration(args.stats).sha256},
           "calibration_lambda": lam, "seconds": time.perf_counter() - t0, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, args.png)
    md = markdown(res)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
