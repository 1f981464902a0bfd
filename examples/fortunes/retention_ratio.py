#!/usr/bin/env python3
"""Task retention against compression ratio: which ratio keeps 99% (and 95%) of the task gain.

Every configuration compresses the fortunes collection with ``--budget`` at each ratio (the
originals' bytes divided by the ratio) and once with the default target (no ``--budget``); each
artifact is evaluated on the HELD-OUT texts (``data/<name>.jsonl``) with :mod:`lorazip.taskeval`:
retention ``(loss_base - loss_compressed) / (loss_base - loss_original)`` per adapter.

A configuration is ``label:dtype:objective``:

* ``dtype``: ``auto`` (bits allocated with the ranks, the default) or a fixed storage precision
  (``int8``: what a budget stored before bits; ``float16``);
* ``objective``: how the allocator weighs errors.

  - ``energy``: lorazip's objective, each adapter's relative squared error over all its modules
    together, ``sum_m ||E_im||^2 / sum_m ||dW_im||^2`` (modules with more energy count more);
  - ``module``: every adapted module alike, ``mean_m ||E_im||^2 / ||dW_im||^2``;
  - ``sqrt``: between the two, module ``m`` weighted by ``||dW_im||``.

  The two other objectives are measured without changing lorazip: each adapter's ``lora_B`` is
  scaled per module by ``||dW_im||^-p`` (p = 1 or 1/2) in a copy of the collection (so the
  energy-weighted objective of the copy is the other objective of the originals), the copy is
  compressed, and every exported module is scaled back by ``||dW_im||^p`` before it is evaluated.
  The exact weight errors of these artifacts are measured against the originals.

Writes a JSON file with every point, Markdown tables and a plot (mean retention against ratio).

    python examples/fortunes/retention_ratio.py --ratios 10,15,20,30,50,100 \\
        --configs auto:auto:energy,int8:int8:energy,module:auto:module --max-texts 16

Runs of several configurations can be split over processes (``--json`` each) and merged with
``--merge A.json B.json ...``. One torch thread; about 2 minutes per artifact (27 adapters x 16
texts of SmolLM2-135M) on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
POWERS = {"energy": 0.0, "sqrt": 0.5, "module": 1.0}
LEVELS = (0.99, 0.95)
_MODULE = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=str(HERE / "adapters"))
    ap.add_argument("--data", default=str(HERE / "data"), help="held-out texts, <name>.jsonl")
    ap.add_argument("--base-model", default="/work/cache/smollm2-135m-instruct")
    ap.add_argument("--ratios", default="10,15,20,30,50,100", help="compression ratios (originals' bytes / budget)")
    ap.add_argument("--configs", default="auto:auto:energy,int8:int8:energy")
    ap.add_argument("--targets", default="", help="also these --target-error values (energy objective only)")
    ap.add_argument("--no-default", action="store_true", help="skip the default-target artifact of each config")
    ap.add_argument("--max-texts", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", default="/tmp/lorazip-retention-ratio",
                    help="scaled copies of the collection (reused when present: remove it if the adapters change)")
    ap.add_argument("--json", default=str(REPO / "docs" / "retention_ratio.json"))
    ap.add_argument("--png", default=str(REPO / "docs" / "retention_ratio.png"))
    ap.add_argument("--md", default=None)
    ap.add_argument("--merge", nargs="*", default=None, help="only merge these JSON files, then tabulate and plot")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


# ------------------------------------------------------------------- the reweighted copies
def _pairs(state):
    """{module path: (A key, B key)} of a PEFT state dict."""
    out: dict[str, dict[str, str]] = {}
    for k in state:
        m = _MODULE.match(k)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = k
    return {m: (d["A"], d["B"]) for m, d in out.items() if len(d) == 2}


def module_norms(folder: Path) -> dict[str, float]:
    """``||B A||_F`` of every LoRA module of a PEFT folder (the adapter's scale is the same for all its
    modules here, and a per-adapter factor does not change a relative objective)."""
    from safetensors.torch import load_file

    from lorazip.solvers.linalg import factor_norms2

    st = load_file(str(folder / "adapter_model.safetensors"))
    return {m: float(factor_norms2(st[kb].double()[None], st[ka].double()[None])[0].clamp_min(0).sqrt())
            for m, (ka, kb) in _pairs(st).items()}


def scaled_copy(src: Path, dst: Path, p: float) -> dict[str, float]:
    """Copy of adapter folder ``src`` with module m's ``lora_B`` times ``||B_m A_m||^-p``; returns the
    factors to scale the exported modules back with (``||B_m A_m||^p``)."""
    from safetensors.torch import load_file, save_file

    norms = module_norms(src)
    back = {m: (n ** p if n > 0 else 1.0) for m, n in norms.items()}
    if (dst / "adapter_model.safetensors").is_file():
        return back
    st = load_file(str(src / "adapter_model.safetensors"))
    for m, (_, kb) in _pairs(st).items():
        st[kb] = (st[kb].double() / back[m]).to(st[kb].dtype)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(st, str(tmp / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", tmp / "adapter_config.json")
    tmp.rename(dst)
    return back


def unscaled(state, back: dict[str, float]):
    """A copy of an exported PEFT state with each module's ``lora_B`` scaled back."""
    out = dict(state)
    for m, (_, kb) in _pairs(state).items():
        out[kb] = state[kb] * back.get(m, 1.0)
    return out


def weight_errors(state, folder: Path) -> float:
    """The energy-weighted relative squared error of an exported state against an original folder."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SystemExit(f"{folder}: rank_pattern / alpha_pattern are not handled by this script")
    st = load_file(str(folder / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    got = {m: (state[ka].double(), state[kb].double()) for m, (ka, kb) in _pairs(state).items()}
    err = tot = 0.0
    for m, (ka, kb) in _pairs(st).items():
        D = s * (st[kb].double() @ st[ka].double())
        tot += float((D * D).sum())
        if m in got:
            D = D - got[m][1] @ got[m][0]
        err += float((D * D).sum())
    return err / tot if tot > 0 else 0.0


@contextlib.contextmanager
def quantisation_weighed(gamma: float):
    """The allocator's predicted quantisation errors (residual components' profiles, shared parts'
    measurements) times ``gamma`` while the block runs: an objective that counts an error made by
    rounding ``gamma`` times an error made by truncation. Only the choice changes: the artifact's
    errors are measured as always."""
    if gamma == 1:
        yield
        return
    import numpy as np

    from lorazip import lowbit
    from lorazip.compress import allocate, curves

    levels, squant = allocate.bit_levels, curves.ModuleFit.shared_quant

    def bit_levels(fit):
        return lowbit.class_levels(fit.d_out, fit.d_in, np.minimum(gamma * lowbit.profile_rows(fit.quant), 1.0))

    def shared_quant(self, r):
        q = squant(self, r)
        return None if q is None else gamma * q

    allocate.bit_levels, curves.ModuleFit.shared_quant = bit_levels, shared_quant
    try:
        yield
    finally:
        allocate.bit_levels, curves.ModuleFit.shared_quant = levels, squant


# ------------------------------------------------------------------------------ analysis
def ratio_at(points: list[tuple[float, float]], level: float) -> float | None:
    """The largest compression ratio at which mean retention is still >= ``level``: the measured points
    (ratio, retention) sorted by ratio, interpolated linearly in log ratio between the last point at
    or above the level (with every point of a smaller ratio above it too) and the next one."""
    pts = sorted(points)
    if not pts or pts[0][1] < level:
        return None
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if v1 < level:
            t = (v0 - level) / (v0 - v1)
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return pts[-1][0]


def _budget(b: int | None, target: float | None = None) -> str:
    if target is not None:
        return f"target {target:g}"
    return "default" if b is None else f"{b / 1e6:.2f} MB"


def markdown(res: dict) -> str:
    out = ["| config | dtype | objective | budget | ratio | bytes | weight error | pairs at nothing | bits/number | "
           "mean retention | median | min | >= 0.99 | >= 0.95 |", "| --- " * 14 + "|"]
    for row in res["rows"]:
        r = row["retention"]
        n = len(row["adapters"])
        ge = lambda lv: sum(a["retention"] is not None and a["retention"] >= lv for a in row["adapters"])  # noqa: E731
        out.append(f"| {row['config']} | {row['dtype']} | {row['objective']} | "
                   f"{_budget(row['budget'], row.get('target'))} | "
                   f"{row['ratio']:.1f}x | {row['bytes']:,} | {row['weight_error']['mean']:.4f} | "
                   f"{row['pairs_at_nothing']} | {row['bits_per_number'] if row['bits_per_number'] is None else format(row['bits_per_number'], '.2f')} | "
                   f"{r['mean']:.4f} | {r['median']:.4f} | {r['min']:.4f} | {ge(0.99)}/{n} | {ge(0.95)}/{n} |")
    out += ["", "| config | largest ratio with mean retention >= 0.99 | >= 0.95 |", "| --- | --- | --- |"]
    for cfg, lv in thresholds(res).items():
        f = lambda v: "below the smallest ratio" if v is None else f"{v:.1f}x"  # noqa: E731
        out.append(f"| {cfg} | {f(lv['0.99'])} | {f(lv['0.95'])} |")
    pairs = paired(res)
    if pairs:
        out += ["", "| config | against | ratio | retention difference (mean over adapters) | standard error | "
                "adapters better |", "| --- " * 6 + "|"]
        for p in pairs:
            out.append(f"| {p['config']} | {p['against']} | {p['ratio']:.0f}x | {p['mean_difference']:+.4f} | "
                       f"{p['standard_error']:.4f} | {p['better']}/{p['n']} |")
    return "\n".join(out)


def paired(res: dict) -> list[dict]:
    """Each configuration against the first at the same budget: the mean over adapters of the difference
    in retention and its standard error (the same texts and originals, so the pairs share their noise)."""
    cfgs = list(dict.fromkeys(r["config"] for r in res["rows"]))
    by = {(r["config"], r["budget"]): r for r in res["rows"] if r["budget"] is not None}
    out = []
    for cfg in cfgs[1:]:
        for (c, b), row in sorted(by.items(), key=lambda kv: -kv[0][1]):
            ref = by.get((cfgs[0], b))
            if c != cfg or ref is None:
                continue
            mine = {a["name"]: a["retention"] for a in row["adapters"]}
            d = [mine[a["name"]] - a["retention"] for a in ref["adapters"]
                 if a["retention"] is not None and mine.get(a["name"]) is not None]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            out.append({"config": cfg, "against": cfgs[0], "budget": b, "ratio": res["original_bytes"] / b,
                        "mean_difference": statistics.fmean(d), "standard_error": se,
                        "better": sum(x > 0 for x in d), "n": len(d)})
    return out


def thresholds(res: dict) -> dict:
    out = {}
    for cfg in dict.fromkeys(r["config"] for r in res["rows"]):
        pts = [(r["ratio"], r["retention"]["mean"]) for r in res["rows"] if r["config"] == cfg]
        out[cfg] = {f"{lv:g}": ratio_at(pts, lv) for lv in LEVELS}
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, cfg in enumerate(dict.fromkeys(r["config"] for r in res["rows"])):
        rows = sorted((r for r in res["rows"] if r["config"] == cfg and r["budget"] is not None),
                      key=lambda r: r["ratio"])
        dflt = [r for r in res["rows"] if r["config"] == cfg and r["budget"] is None]
        style = "os^vDx"[k % 6] + "-"
        x = [r["ratio"] for r in rows]
        line, = axes[0].plot(x, [r["retention"]["mean"] for r in rows], style, label=cfg)
        axes[1].plot(x, [1 - r["retention"]["mean"] for r in rows], style, label=cfg, color=line.get_color())
        for d in dflt:
            axes[0].plot([d["ratio"]], [d["retention"]["mean"]], "*", ms=12, color=line.get_color())
            axes[1].plot([d["ratio"]], [1 - d["retention"]["mean"]], "*", ms=12, color=line.get_color())
    for lv in LEVELS:
        axes[0].axhline(lv, color="grey", lw=0.8, ls="--")
        axes[1].axhline(1 - lv, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("mean retention")
    axes[1].set_ylabel("retention loss (1 - mean retention)")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ticks = sorted({round(res["original_bytes"] / r["budget"]) for r in res["rows"] if r["budget"] is not None})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compression ratio (originals' bytes / artifact bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fortunes, {res['n_adapters']} adapters x {res['max_texts']} held-out texts "
                 "(stars: the default and --target-error runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------- run
def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import lorazip
    from lorazip.export import to_peft
    from lorazip.metrics import summary
    from lorazip.taskeval import TaskEvaluator

    src = Path(args.adapters)
    names = sorted(p.name for p in src.iterdir() if (p / "adapter_model.safetensors").is_file()
                   and (Path(args.data) / f"{p.name}.jsonl").is_file())
    folders = [src / n for n in names]
    orig_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    ev = TaskEvaluator(args.base_model, args.data, max_texts=args.max_texts, max_length=args.max_length,
                       batch_size=args.batch_size)
    ratios = [float(x) for x in args.ratios.split(",") if x]
    targets = [float(x) for x in args.targets.split(",") if x]
    rows, t0 = [], time.perf_counter()
    for spec in args.configs.split(","):
        label, dtype, objective = spec.split(":")
        p, gamma = (0.0, float(objective[1:])) if objective.startswith("q") else (POWERS[objective], 1.0)
        if p:
            work = Path(args.work) / f"p{p:g}"
            back = {n: scaled_copy(src / n, work / n, p) for n in names}
            coll = lorazip.load_collection([str(work / n) for n in names])
        else:
            back = None
            coll = lorazip.load_collection([str(f) for f in folders])
        plain = not p and gamma == 1
        runs = ([] if args.no_default or not plain else [(None, None)]) + [(None, t) for t in targets if plain] \
            + [(orig_bytes / r, None) for r in ratios]
        for b, target in runs:
            t1 = time.perf_counter()
            kw = {"target_error": target} if target is not None else {} if b is None else {"budget": int(b)}
            with quantisation_weighed(gamma):
                art = lorazip.compress(coll, storage_dtype=dtype, device="cpu", **kw)
            t_c = time.perf_counter() - t1
            size = art.serialized_size()
            bits = (lorazip.evaluate(art).get("bits") or {})
            adapters = []
            for n, folder in zip(names, folders):
                state, config = to_peft(art, n, dtype="float32")
                if back is not None:
                    state = unscaled(state, back[n])
                lb, lo = ev.base_loss(n), ev.original_loss(n, folder)
                lc = ev.peft_loss(n, state, config)
                ret = (lb.loss - lc.loss) / (lb.loss - lo.loss) if lo.loss < lb.loss else None
                adapters.append({"name": n, "retention": ret, "loss_base": lb.loss, "loss_original": lo.loss,
                                 "loss_compressed": lc.loss, "weight_error": weight_errors(state, folder)})
            vals = [a["retention"] for a in adapters if a["retention"] is not None]
            row = {"config": label, "dtype": dtype, "objective": objective, "budget": None if b is None else int(b),
                   "target": target,
                   "ratio": orig_bytes / size, "bytes": size, "compress_s": t_c,
                   "weight_error": summary([a["weight_error"] for a in adapters]),
                   "pairs_at_nothing": bits.get("pairs_at_nothing"), "bits_per_number": bits.get("bits_per_number"),
                   "retention": summary(vals), "adapters": adapters}
            rows.append(row)
            print(f"{label:10s} {_budget(b, target)} {size:,} B ({row['ratio']:.1f}x) "
                  f"weight error {row['weight_error']['mean']:.4f} retention {row['retention']['mean']:.4f} "
                  f"(min {row['retention']['min']:.4f}) [{time.perf_counter() - t0:.0f} s]", flush=True)
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "n_adapters": len(names),
            "adapters": names, "original_bytes": orig_bytes, "max_texts": args.max_texts,
            "max_length": args.max_length, "seconds": time.perf_counter() - t0, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        res = dict(parts[0], rows=[r for p in parts for r in p["rows"]], seconds=sum(p["seconds"] for p in parts))
    else:
        res = run(args)
    res["thresholds"] = thresholds(res)
    res["paired"] = paired(res)
    Path(args.json).write_text(json.dumps(res, indent=1))
    plot(res, args.png)
    md = markdown(res)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
