#!/usr/bin/env python3
"""Task retention versus reconstruction error on the real fortunes collection.

Compresses the adapters in ``--adapters`` (every complete PEFT folder that has held-out data in
``--data``) with JD-Full at several shared ranks and with jd-clustered at a few K, and measures
for every (configuration, adapter) the reconstruction error recorded in the artifact and the
task retention ``(loss_base - loss_compressed) / (loss_base - loss_original)`` on held-out text
(``lorazip.taskeval``; base and original losses are computed once and cached).

Writes a JSON file with every point, a PNG plot (retention vs error scatter; retention vs rank),
and prints Markdown tables (per configuration; error thresholds).

    python examples/fortunes/retention_curve.py --limit 12            # docs/task_eval.md (~23 min)
    python examples/fortunes/retention_curve.py --limit 8 --ranks 1,4,16 --clusters "" --max-texts 8   # quick

One torch thread. On a shared 2-core CPU one evaluation of 32 texts (<= 128 tokens) of
SmolLM2-135M takes ~9 s, so the default sweep (9 configurations) over 12 adapters takes
~23 min: 12 x (2 + 9) evaluations, base and original losses being computed once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=str(HERE / "adapters"), help="folder of adapter folders")
    ap.add_argument("--data", default=str(HERE / "data"), help="folder of <name>.jsonl held-out texts")
    ap.add_argument("--base-model", default="/work/cache/smollm2-135m-instruct", help="float32 base model folder")
    ap.add_argument("--max-texts", type=int, default=32, help="first N held-out texts per adapter")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ranks", default="1,2,4,8,16,32", help="JD-Full shared ranks")
    ap.add_argument("--clusters", default="2,4,8", help="jd-clustered K values ('' for none)")
    ap.add_argument("--cluster-rank", type=int, default=4, help="shared rank of the jd-clustered runs")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N adapters in build_collection.py's order (the docs use 12)")
    ap.add_argument("--min-adapters", type=int, default=8, help="refuse to run with fewer adapters")
    ap.add_argument("--png", default=str(REPO / "docs" / "retention.png"))
    ap.add_argument("--json", default=str(REPO / "docs" / "retention.json"))
    ap.add_argument("--md", default=None, help="also write the Markdown tables here")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def build_order() -> dict[str, int]:
    """Adapter name -> position in build_collection.py's CATEGORIES (the order adapters are built in)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_collection", HERE / "build_collection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {name: i for i, (name, _pkg, _path) in enumerate(mod.CATEGORIES)}


def thresholds(points: list[dict], levels=(0.99, 0.95, 0.9)) -> list[dict]:
    """For each retention level: the largest error e such that every point with error <= e keeps
    at least that retention, and how many points below the paper's 0.6 keep it."""
    pts = sorted((p["error"], p["retention"]) for p in points if p["retention"] is not None)
    out = []
    for lvl in levels:
        safe = 0.0
        for e, r in pts:
            if r < lvl:
                break
            safe = e
        first_fail = next((e for e, r in pts if r < lvl), None)
        below = [r for e, r in pts if e <= 0.6]
        out.append({
            "level": lvl,
            "max_safe_error": safe,  # all points up to this error keep >= level
            "first_failing_error": first_fail,
            "frac_ok_below_0.6": (sum(r >= lvl for r in below) / len(below)) if below else None,
            "n_below_0.6": len(below),
        })
    return out


BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0)


def binned(points: list[dict], edges=BINS) -> list[dict]:
    """Retention statistics of the (configuration, adapter) points by reconstruction-error bin."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rs = [p["retention"] for p in points if p["retention"] is not None and lo <= p["error"] < hi]
        if rs:
            out.append({"lo": lo, "hi": hi, "n": len(rs), "mean": sum(rs) / len(rs), "min": min(rs),
                        "frac_ge_0.99": sum(r >= 0.99 for r in rs) / len(rs),
                        "frac_ge_0.9": sum(r >= 0.9 for r in rs) / len(rs)})
    return out


def markdown(res: dict) -> str:
    lines = [
        f"Retention vs reconstruction error, {res['n_adapters']} adapters x {res['max_texts']} held-out texts "
        f"(max {res['max_length']} tokens), {res['date']}.",
        "",
        "| config | params | mean error | max error | mean retention | median | min retention | >= 0.99 | >= 0.9 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in res["configs"]:
        s = c["summary"]
        lines.append(
            f"| {c['label']} | {c['compressed_params']:,} | {c['mean_error']:.3f} | {c['max_error']:.3f} | "
            f"{s['mean']:.3f} | {s['median']:.3f} | {s['min']:.3f} | {c['n_ge_0.99']}/{c['n']} | {c['n_ge_0.9']}/{c['n']} |"
        )
    lines += ["", "| retention level | all points with error <= e keep it, e = | first point below the level at error | share of points with error <= 0.6 that keep it |",
              "| --- | --- | --- | --- |"]
    for t in res["thresholds"]:
        ff = "-" if t["first_failing_error"] is None else f"{t['first_failing_error']:.3f}"
        fr = "-" if t["frac_ok_below_0.6"] is None else f"{t['frac_ok_below_0.6']:.0%} of {t['n_below_0.6']}"
        lines.append(f"| >= {t['level']} | {t['max_safe_error']:.3f} | {ff} | {fr} |")
    lines += ["", "| error bin | points | mean retention | min retention | >= 0.99 | >= 0.9 |",
              "| --- | --- | --- | --- | --- | --- |"]
    for b in res["bins"]:
        lines.append(f"| [{b['lo']:.2f}, {b['hi']:.2f}) | {b['n']} | {b['mean']:.3f} | {b['min']:.3f} | "
                     f"{b['frac_ge_0.99']:.0%} | {b['frac_ge_0.9']:.0%} |")
    lines += ["", "| adapter | loss base | loss original | " + " | ".join(c["label"] for c in res["configs"]) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in res["configs"]) + " |"]
    for name in res["adapters"]:
        b = res["base"][name]
        cells = []
        for c in res["configs"]:
            p = next(p for p in c["points"] if p["name"] == name)
            cells.append(f"{p['retention']:.3f} ({p['error']:.2f})" if p["retention"] is not None else "-")
        lines.append(f"| {name} | {b['loss_base']:.3f} | {b['loss_original']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: retention (reconstruction error).")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    jd = [c for c in res["configs"] if c["clusters"] == 1]
    cl = [c for c in res["configs"] if c["clusters"] > 1]
    cmap = plt.get_cmap("viridis")
    for k, c in enumerate(jd):
        xs = [p["error"] for p in c["points"] if p["retention"] is not None]
        ys = [p["retention"] for p in c["points"] if p["retention"] is not None]
        ax.scatter(xs, ys, s=22, color=cmap(k / max(len(jd) - 1, 1)), label=c["label"], alpha=0.85)
    for k, c in enumerate(cl):
        xs = [p["error"] for p in c["points"] if p["retention"] is not None]
        ys = [p["retention"] for p in c["points"] if p["retention"] is not None]
        ax.scatter(xs, ys, s=34, marker="^", facecolors="none", edgecolors=plt.get_cmap("autumn")(k / max(len(cl), 1)),
                   label=c["label"])
    ax.axvline(0.6, color="grey", ls="--", lw=1)
    ax.text(0.605, 0.02, "0.6 (paper)", color="grey", fontsize=8, transform=ax.get_xaxis_transform())
    for lvl, ls in ((0.99, ":"), (0.9, "-.")):
        ax.axhline(lvl, color="black", ls=ls, lw=0.8)
        ax.text(1.0, lvl, f" {lvl}", va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_xlabel("relative squared reconstruction error (per adapter)")
    ax.set_ylabel("task retention (share of the adapter's loss gain kept)")
    ax.set_title(f"fortunes: {res['n_adapters']} SmolLM2-135M adapters, {res['max_texts']} held-out texts each",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)

    ranks = [c["rank"] for c in jd]
    ax2.plot(ranks, [c["summary"]["mean"] for c in jd], "o-", label="mean retention")
    ax2.plot(ranks, [c["summary"]["min"] for c in jd], "s--", label="min retention")
    ax2.plot(ranks, [1 - c["mean_error"] for c in jd], "x:", label="1 - mean error")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ranks)
    ax2.set_xticklabels([str(r) for r in ranks])
    ax2.set_xlabel("JD-Full shared rank")
    ax2.axhline(0.99, color="black", ls=":", lw=0.8)
    ax2.set_title("retention vs rank (JD-Full)", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import lorazip
    from lorazip.evaluate import storage
    from lorazip.io.collection import resolve_sources
    from lorazip.taskeval import TaskEvaluator

    t_all = time.time()
    data = Path(args.data)
    found = [(n, d) for n, d, _p in resolve_sources(args.adapters)]
    found = [(n, d) for n, d in found if (data / f"{n}.jsonl").is_file()]
    if args.limit is not None:
        order = build_order()
        found = sorted(found, key=lambda nd: (order.get(nd[0], len(order)), nd[0]))[: args.limit]
    # collection order = name order, as when compressing the folder (k-means++ seeding depends on it)
    use = [str(d) for n, d in sorted(found)]
    if len(use) < args.min_adapters:
        print(f"only {len(use)} adapters with data in {args.adapters} (need {args.min_adapters}); "
              "wait for build_collection.py or pass --min-adapters", file=sys.stderr)
        return 1
    coll = lorazip.load_collection(use)
    print(f"{len(coll)} adapters: {', '.join(coll.names)}", file=sys.stderr)
    ev = TaskEvaluator(args.base_model, data, max_texts=args.max_texts, max_length=args.max_length,
                       batch_size=args.batch_size, device="cpu")
    plans = [("jd-full", r, 1) for r in _ints(args.ranks)] + [
        ("jd-clustered", args.cluster_rank, k) for k in _ints(args.clusters)]
    configs = []
    base = {}
    for method, rank, k in plans:
        label = f"rank {rank}" if k == 1 else f"rank {rank}, K={k}"
        t0 = time.time()
        kw = {"clusters": k} if k > 1 else {}
        art = lorazip.compress(coll, rank, method=method, device="cpu", seed=0, **kw)
        t_c = time.time() - t0
        rep = ev.evaluate(art, originals=use)
        pts = [{k2: a[k2] for k2 in ("name", "error", "retention", "loss_compressed")} for a in rep["adapters"]]
        for a in rep["adapters"]:
            base[a["name"]] = {"loss_base": a["loss_base"], "loss_original": a["loss_original"],
                               "n_texts": a["n_texts"], "n_tokens": a["n_tokens"]}
        rets = [p["retention"] for p in pts if p["retention"] is not None]
        errs = [p["error"] for p in pts]
        st = storage(art)
        c = {
            "label": label, "method": method, "rank": rank, "clusters": k, "compress_s": t_c,
            "eval_s": rep["timing"]["eval_s"], "compressed_params": st["compressed_params"],
            "ratio_params": st["ratio_params"], "mean_error": sum(errs) / len(errs), "max_error": max(errs),
            "summary": rep["summary"]["retention"], "n": len(rets),
            "n_ge_0.99": sum(r >= 0.99 for r in rets), "n_ge_0.9": sum(r >= 0.9 for r in rets), "points": pts,
        }
        configs.append(c)
        s = c["summary"]
        print(f"[{time.time() - t_all:6.0f}s] {label}: mean error {c['mean_error']:.3f}, retention mean "
              f"{s['mean']:.3f} min {s['min']:.3f} (compress {t_c:.1f}s, eval {c['eval_s']:.0f}s)", file=sys.stderr)
    points = [p for c in configs for p in c["points"]]
    res = {
        "report_version": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
        "lorazip_version": lorazip.__version__, "torch": torch.__version__,
        "base_model": args.base_model, "adapters_dir": args.adapters, "data_dir": str(data),
        "n_adapters": len(coll), "adapters": coll.names, "max_texts": args.max_texts,
        "max_length": args.max_length, "base": base, "configs": configs,
        "thresholds": thresholds(points), "bins": binned(points), "total_s": time.time() - t_all,
    }
    md = markdown(res)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.png)
    if args.md:
        Path(args.md).write_text(md)
    sys.stdout.write(md)
    print(f"wrote {args.json} and {args.png} in {res['total_s'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
