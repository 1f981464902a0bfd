"""Rich tables for the CLI: summaries of evaluation reports and artifact descriptions."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lorazip
from lorazip.artifact import split_modules
from lorazip.artifact import storage_summary as storage  # no torch: `lorazip info` reads the header only


def _b(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    if lo == hi:
        return str(lo)
    return f"{lo}-{hi} (median {sorted(values)[len(values) // 2]})"


def rank_summary(rep: dict[str, Any]) -> str:
    """Shared ranks over modules as one number or a range, plus residual ranks where present."""
    mods = rep.get("modules") or []
    if not mods:
        return str(rep.get("rank"))
    text = _span([m["rank"] for m in mods])
    resid = [m["residual"]["max_rank"] for m in mods if m.get("residual")]
    if resid:
        text = f"shared {text}, residual up to {max(resid)} in {len(resid)} module(s)"
    return text


def bits_total(bits: dict[str, Any]) -> int:
    return sum(bits["histogram"].values())


def print_compress(con: Console, rep: dict[str, Any], output) -> None:
    """Everything ``lorazip compress`` prints after writing ``output``."""
    if "k_selection" in rep:
        print_curve(con, rep["k_selection"])
    if "rank_allocation" in rep:
        print_allocation(con, rep["rank_allocation"])
    print_summary(con, rep, title=f"lorazip compress -> {output}")
    print_notes(con, rep)
    if "ray" in rep:
        print_ray(con, rep["ray"])


def print_summary(con: Console, rep: dict[str, Any], title: str) -> None:
    t = Table(title=escape(title), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    e, st, base = rep["errors"], rep["storage"], rep["baseline"]
    t.add_row("adapters x modules", f"{rep['n_adapters']} x {rep['n_modules']}")
    dtype = storage_words(rep["storage_dtype"], _low_bits(rep.get("bits")), (rep.get("bits") or {}).get("shared"),
                          [m["rank"] for m in rep.get("modules") or []])
    t.add_row("method / rank", f"{rep['method']} / {rank_summary(rep)}  (weighting {rep['weighting']}, {dtype})")
    we = rep.get("weight_errors")
    label = "activation error" if rep.get("metric") == "activation" else "rel. sq. error"
    t.add_row(label + (" (optimised)" if we else ""),
              f"mean {e['mean']:.4f}  median {e['median']:.4f}  max {e['max']:.4f}")
    ob = rep.get("objective")
    if ob:  # a budget or target run under another objective: the error it bounded
        t.add_row(f"{ob['name']} objective", f"mean {ob['mean']:.4f}  median {ob['median']:.4f}  max {ob['max']:.4f}  "
                  "(what --budget / --target-error minimised or bounded)")
    if we:  # calibration: the error of the outputs on the calibration inputs, and the weight error
        t.add_row("weight error", f"mean {we['mean']:.4f}  median {we['median']:.4f}  max {we['max']:.4f}")
    ex = rep.get("extras_error")
    if ex:  # extras converted by --extras-dtype: their error, apart from the LoRA error
        t.add_row("extras error", f"mean {ex['mean']:.3g}  max {ex['max']:.3g}  ({ex['dtype']}, "
                  f"{ex['n_adapters']} adapter(s))")
    sr, sm = base["svd_same_rank"], base["svd_matched_storage"]
    if sr.get("per_pair"):  # ranks chosen per module (and per adapter): the SVD at each pair's own rank
        why = ": they reach the adapters' own, so it is exact; the error above is the rounding's" \
            if sr["max"] == 0 else ""
        t.add_row("SVD, same ranks", f"mean {sr['mean']:.4f}  max {sr['max']:.4f}  (each adapter x module at "
                  f"its stored rank, mean {sr['mean_rank']:.1f}, before rounding{why})")
    else:
        t.add_row("SVD, same rank", f"mean {sr['mean']:.4f}  max {sr['max']:.4f}  (rank {sr['rank']}, per adapter)")
    if "scheme" in sm:  # the best of per-adapter SVD at 2-16 bits and LoRAQuant-style mixed precision
        how = f"best of {len(sm.get('alternatives', {}))} at these bytes: {sm['scheme']}"
    else:
        how = f"greedy ranks over {sm['pairs']} adapter x module pairs" if "pairs" in sm else \
            f"rank {sm['rank']} per adapter"
        if sm.get("precision") == "int8":
            how += ", int8 rounding as the artifact's"
    t.add_row("SVD, same storage", f"mean {sm['mean']:.4f}  max {sm['max']:.4f}  ({how})")
    bits = rep.get("bits")
    if bits and bits.get("histogram"):
        hist = "  ".join(f"{b}-bit {n / max(bits_total(bits), 1):.0%}" for b, n in bits["histogram"].items())
        nothing = f", {bits['pairs_at_nothing']} of {bits['pairs']} adapter x module pairs stored at nothing" \
            if bits.get("pairs_at_nothing") else ""
        t.add_row("bits", f"{bits['bits_per_number']:.2f} per number  ({hist}{nothing})")
    t.add_row("numbers", f"{st['original_params']:,} -> {st['compressed_params']:,}  ({st['ratio_params']:.1f}x)")
    t.add_row("bytes", f"{_b(st['original_bytes'])} -> {_b(st['artifact_bytes'])}  ({st['ratio_bytes']:.1f}x, "
              f"{_b(st['bytes_per_adapter'])} per adapter)")
    if "timing" in rep:
        t.add_row("time", f"{rep['timing']['total_s']:.2f} s")
    cl = rep.get("clustering")
    if cl and cl.get("n_clusters", 1) > 1:
        sizes = f", sizes {cl['sizes']}" if cl.get("sizes") else ""
        t.add_row("clusters", f"K = {cl['n_clusters']}{' per module' if cl['per_module'] else ''}, "
                  f"{cl['rounds']} round(s){'' if cl['converged'] else ' (not converged)'}{sizes}")
    if rep.get("recomputed"):
        t.add_row("errors", "recomputed against the original adapters")
    con.print(t)


def names(items: list[str], most: int = 5) -> str:
    """``a, b, c`` (the first ``most`` names, then `` ...``), escaped for rich."""
    return escape(", ".join(items[:most]) + (" ..." if len(items) > most else ""))


def print_notes(con: Console, rep: dict[str, Any]) -> None:
    if rep.get("sources_not_in_artifact"):
        left = rep["sources_not_in_artifact"]
        con.print(f"note: {len(left)} source adapter(s) are not in the artifact, left out of the errors: {names(left)}")
    bits = rep.get("bits") or {}
    if bits.get("adapters_at_nothing"):
        gone = bits["adapters_at_nothing"]
        con.print(f"note: {len(gone)} adapter(s) stored at nothing in every module (error 1: the base model's "
                  f"outputs; export writes them as zero LoRAs): {names(gone)}")
    if bits.get("zero_update"):
        zero = bits["zero_update"]
        con.print(f"note: {len(zero)} adapter(s) have a zero update in every module (LoRA B or A all zero: "
                  f"untrained?); their error is 0 and counts in the statistics: {names(zero)}")
    capped = [m for m in rep.get("modules", []) if "rank_capped" in m]
    if capped:
        parts = [f"{escape(m['name'])} {m['rank_capped']['requested']} -> "
                 + (f"{m['rank_out']} x {m['rank']}" if "rank_out" in m else str(m["rank"]))
                 + f" ({m['rank_capped']['reason']})" for m in capped[:3]]
        con.print(f"note: rank capped in {len(capped)} module(s) that allow less: {'; '.join(parts)}"
                  f"{' ...' if len(capped) > 3 else ''}")
    split = rep.get("split_modules") or {}
    if split:
        parts = [escape(path) + " (" + ", ".join(f"{g['d_out']}x{g['d_in']}: {g['adapters']}" for g in groups) + ")"
                 for path, groups in list(split.items())[:3]]
        con.print(f"note: adapters differ in the shape of {len(split)} module(s), each shape compressed on its "
                  f"own (shape: adapters): {'; '.join(parts)}{' ...' if len(split) > 3 else ''}")
    missing = rep.get("missing_modules") or {}
    if missing:
        con.print(f"note: {len(missing)} adapter(s) lack some modules (zero delta there), "
                  f"e.g. {escape(next(iter(missing)))}: {len(next(iter(missing.values())))} module(s)")
    extras = rep.get("extras") or {}
    if extras:
        keys = sorted({k for v in extras.values() for k in v})
        ex = rep.get("extras_error")
        how = f"stored as {ex['dtype']}" if ex else "stored uncompressed (--extras-dtype int8 shrinks them)"
        if not rep.get("extras_kept", True):
            how = ("left out (--no-extras: exported adapters lack them and PEFT keeps the base model's; "
                   "the ratio compares without them)")
        con.print(f"note: {len(extras)} adapter(s) carry non-LoRA tensors, {how}: {names(keys, most=4)}")
        if rep.get("extras_kept", True) and any(k.endswith("base_layer.weight") for k in keys):
            con.print("note: the *.base_layer.weight tensors are the embedding weights PEFT saves with a LoRA on an "
                      "embedding, one copy per adapter: --no-extras drops them, and PEFT then uses the base model's "
                      "own (the same unless its vocabulary was resized)")


def print_worst(con: Console, rep: dict[str, Any], top: int) -> None:
    if top <= 0:
        return
    rows = sorted(rep["adapters"], key=lambda a: -a["error"])[:top]
    t = Table(title=f"worst {len(rows)} adapters", title_justify="left")
    for col in ("adapter", "rel. sq. error", "SVD same rank", "missing modules"):
        t.add_column(col)
    for a in rows:
        t.add_row(escape(a["name"]), f"{a['error']:.4f}", f"{a['svd_same_rank_error']:.4f}", str(len(a["missing_modules"])))
    con.print(t)


def _residual_ranges(art: lorazip.Artifact) -> dict[str, tuple[int, int]]:
    """``{module: (min k_i, max k_i)}`` for the modules with residual parts (format v2); reads only
    the small ``resid_ranks/<m>`` tensors (with plain file reads: no torch for a file)."""
    mods = [mod["name"] for mod in art.modules if mod.get("residual")]
    if not mods:
        return {}
    if art.path is None or art._tensors is not None:
        return {name: (int(t.min()), int(t.max())) for name in mods for t in [art.get(f"resid_ranks/{name}")]}
    from lorazip.artifact import HeaderReader, residual_ranks

    with HeaderReader(art.path) as f:
        table = residual_ranks(f, art.meta, art._layout)
    return {name: (min(table[name]), max(table[name])) for name in mods}


def describe(art: lorazip.Artifact) -> dict[str, Any]:
    """Plain-dict description of an artifact (what ``lorazip info --json`` prints)."""
    m = art.meta
    res = _residual_ranges(art)
    return {
        "report_version": 1,
        "artifact": str(art.path),
        "bytes": os.path.getsize(art.path) if art.path else None,
        "lorazip_version": m.get("lorazip_version"),
        "base_model": m.get("base_model"),
        "method": m["method"],
        "rank": m.get("rank"),
        "weighting": m.get("weighting"),
        "storage_dtype": m.get("storage_dtype"),
        "solver": m.get("solver"),
        "storage": storage(art),
        "adapters": [
            {"name": a["name"], "source": a["source"].get("path"), "r": a.get("config", {}).get("r"),
             "lora_alpha": a.get("config", {}).get("lora_alpha"), "n_modules": len(a["ranks"])}
            for a in m["adapters"]
        ],
        "split_modules": split_modules(m["modules"], m["adapters"]),
        "modules": [{**{k: mod.get(k) for k in ("name", "d_out", "d_in", "layout", "rank", "n_clusters", "iters", "converged")},
                     **({"target": mod["target"]} if "target" in mod else {}),
                     **({"shared_bits": mod["shared_bits"]} if mod.get("shared_bits") else {}),
                     **({"residual": {"min_rank": res[mod["name"]][0], "max_rank": res[mod["name"]][1],
                                      "total_rank": mod["residual"]["total_rank"],
                                      **({"bits": mod["residual"]["bits"]} if mod["residual"].get("bits") else {})}}
                        if mod["name"] in res else {})}
                    for mod in m["modules"]],
    }


def print_info(con: Console, d: dict[str, Any]) -> None:
    st = d["storage"]
    t = Table(title=escape(f"lorazip info {d['artifact']}"), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("base model", escape(str(d["base_model"])))
    low = any((m.get("residual") or {}).get("bits") for m in d.get("modules", []))
    shared = sorted({"/".join(map(str, m["shared_bits"])) for m in d.get("modules", []) if m.get("shared_bits")})
    dtype = storage_words(d["storage_dtype"], low, shared, [m["rank"] for m in d.get("modules", [])])
    t.add_row("method / rank", f"{d['method']} / {d['rank']}  ({dtype}, weighting {d['weighting']})")
    t.add_row("adapters", str(len(d["adapters"])))
    split = d.get("split_modules") or {}
    t.add_row("modules", str(len(d["modules"])) + (
        f"  ({len(split)} split by shape, adapters differ: "
        + "; ".join(f"{escape(p)} " + ", ".join(f"{g['d_out']}x{g['d_in']}" for g in gs) for p, gs in split.items())
        + ")" if split else ""))
    t.add_row("bytes", f"{_b(d['bytes'] or 0)}  ({st['ratio_bytes']:.1f}x smaller than the originals)")
    t.add_row("numbers", f"{st['compressed_params']:,}  ({st['ratio_params']:.1f}x fewer)")
    con.print(t)
    a = Table(title="adapters", title_justify="left")
    for col in ("name", "r", "alpha", "modules", "source"):
        a.add_column(col)
    for row in d["adapters"][:50]:
        a.add_row(escape(row["name"]), str(row["r"]), str(row["lora_alpha"]), str(row["n_modules"]), escape(str(row["source"])))
    con.print(a)
    if len(d["adapters"]) > 50:
        con.print(f"... and {len(d['adapters']) - 50} more (use --json for all)")
    mt = Table(title="modules", title_justify="left")
    for col in ("module", "d_out x d_in", "rank", "K", "sweeps"):
        mt.add_column(col)
    for mod in d["modules"][:40]:
        res = mod.get("residual")  # format v2: per-adapter residual ranks k_i
        sb = mod.get("shared_bits")  # format v6: bits of the bases / of the cores
        rank = str(mod["rank"]) + (f" at {sb[0]}/{sb[1]} bits" if sb else "") + (
            f", res {res['min_rank']}-{res['max_rank']}" if res else "")
        sweeps = str(mod["iters"]) if mod["rank"] else "-"  # a rank-0 module stores no solved part
        mt.add_row(escape(mod["name"]), f"{mod['d_out']} x {mod['d_in']}", rank, str(mod["n_clusters"]), sweeps)
    con.print(mt)
    if len(d["modules"]) > 40:
        con.print(f"... and {len(d['modules']) - 40} more (use --json for all)")


def print_curve(con: Console, sel: dict[str, Any]) -> None:
    """Error-vs-K table of ``--clusters auto``; the chosen K is marked."""
    goal = (f"target {sel['target_stat']} error <= {sel['target_error']}" if sel["target_error"] is not None
            else f"budget {sel['budget']}")
    t = Table(title=f"choosing K ({goal})", title_justify="left")
    for col in ("K", "mean error", "median", "max error", "numbers", "bytes", ""):
        t.add_column(col)
    for row in sel["curve"]:
        t.add_row(str(row["K"]), f"{row['mean']:.4f}", f"{row['median']:.4f}", f"{row['max']:.4f}",
                  f"{row['params']:,}", _b(row["bytes"]), "<- chosen" if row["K"] == sel["chosen"] else "")
    con.print(t)


def print_allocation(con: Console, alloc: dict[str, Any]) -> None:
    """What --budget / --target-error chose and why: shared ranks as a histogram, residual ranks."""
    from collections import Counter

    counts = Counter(alloc["ranks"].values())
    goal = f"budget {alloc['budget_bytes']:,} bytes" if alloc.get("budget_bytes") else \
        f"target {alloc.get('target_stat', 'mean')} error {alloc['target_error']}"
    shared = ", ".join(f"rank {r} x {c}" for r, c in sorted(counts.items()))
    line = f"{alloc['mode']} allocation for {goal}: shared {shared}"
    if alloc.get("n_clusters", 1) > 1:
        line += f" (on each of K = {alloc['n_clusters']} groups' bases)"
    if alloc.get("residual_ranks"):
        total = sum(v["total"] for v in alloc["residual_ranks"].values())
        top = max((v["max"] for v in alloc["residual_ranks"].values()), default=0)
        line += f"; residual rank {total:,} in all (up to {top} per adapter and module)"
    con.print(line + f"; artifact {_b(alloc['artifact_bytes'])}")
    if alloc.get("chosen"):
        con.print(f"chose {alloc['chosen']}: {alloc['why']}")
    tried = [t for t in alloc.get("clusters_tried", []) if t.get("predicted") is not None]
    deferred = [t for t in alloc.get("clusters_tried", []) if t.get("needs_more_than_bytes") is not None
                or t.get("predicted_at_least") is not None]
    if len(tried) + len(deferred) > 1:
        how = storage_words(alloc.get("storage_dtype"), _low_bits(alloc.get("bits")),
                            (alloc.get("bits") or {}).get("shared"), list(alloc["ranks"].values()))
        con.print(f"stored as {how}; tried (predicted {alloc.get('target_stat', 'mean')} "
                  "error): " + ", ".join([f"K = {t['K']} {t.get('dtype', '')} {_predicted(t['predicted'])}"
                                          + (" (re-aimed)" if t.get("retarget") is not None else "") for t in tried]
                                         + [f"K = {t['K']} {t['dtype']} not allocated ({_deferred_why(t)})"
                                            for t in deferred]))


def _predicted(e: float) -> str:
    """A candidate's predicted error; 1 (or more) is a candidate that stores nothing in the bytes."""
    return f"{e:.4g}" if e < 1 else "1 (stores nothing)"


def _deferred_why(t: dict[str, Any]) -> str:
    """Why a precision was not allocated: what it needs under a target, what it cannot beat under a budget."""
    if t.get("needs_more_than_bytes") is not None:
        return f"needs over {_b(t['needs_more_than_bytes'])}"
    return f"at least {t['predicted_at_least']:.4g} with the whole budget"


def storage_words(dtype: str, low: bool, shared: list[str] | None, shared_ranks: list[int]) -> str:
    """How an artifact's numbers are stored, in words: its storage dtype, unless every module's shared
    rank is 0 and the rows are low-bit (nothing is stored in that dtype), then "residual rows at 1-8
    bits" where they are (``low``), then the widths of low-bit shared parts (``shared``, "4/3")."""
    words = [] if low and not shared and shared_ranks and not any(shared_ranks) else [dtype]
    if low:
        words.append("residual rows at 1-8 bits")
    return " + ".join(words) + _shared_note(shared)


def _low_bits(bits: dict[str, Any] | None) -> bool:
    """Whether an artifact stores residual rows at 1-8 bits (its report says so, or, where it does
    not, its bits histogram has numbers below 8 bits)."""
    if bits and "low_residual" in bits:
        return bool(bits["low_residual"])
    return bool(bits) and any(int(b) < 8 for b in bits.get("histogram", {}))


def _shared_note(shared: list[str] | None) -> str:
    """", shared parts at 4/3 bits" for the widths "bases/cores" of low-bit shared parts; "" for none."""
    return f", shared parts at {', '.join(shared)} bits" if shared else ""


def print_added(con: Console, rep: dict[str, Any]) -> None:
    """Errors of the adapters ``lorazip add`` appended (flagged above the threshold)."""
    how = "refit on all adapters" if rep["refit"] else "projected onto the existing bases"
    if rep.get("residual_goal") is not None and not rep["refit"]:
        how += f", with their own residual parts up to error {rep['residual_goal']:.3g}"
    con.print(f"{escape(str(rep.get('output')))}: added {len(rep['added'])} adapter(s), {how}", highlight=False)
    t = Table()
    for col in ("adapter", "rel. sq. error", "projection", "cluster", ""):
        t.add_column(col)
    for a in rep["added"]:
        t.add_row(escape(a["name"]), f"{a['error']:.4f}", f"{a['projection_error']:.4f}", str(a.get("cluster", "-")),
                  f"[red]> {rep['threshold']:g}[/red]" if a["above_threshold"] else "")
    con.print(t)
    obj, e = rep["objective"], rep["errors"]
    line = f"{rep['n_adapters']} adapters: mean error {e['mean']:.4f}, max {e['max']:.4f}; weighted objective {obj['projection']:.4f}"
    if obj.get("refit") is not None:
        line += f" (projection) -> {obj['refit']:.4f} (refit)"
    con.print(line)


def print_analysis(con: Console, rep: dict[str, Any]) -> None:
    """Tables of ``lorazip analyze``: error vs rank, error vs K, module types, and the pick."""
    t = Table(title=f"error vs rank: {rep['n_adapters']} adapters x {rep['n_modules']} modules "
                    f"({rep['original_params']:,} numbers)", title_justify="left")
    for col in ("rank", "shared mean", "shared max", "SVD mean", "kept shared / SVD", "numbers", "ratio"):
        t.add_column(col)
    for row in rep["rank_curve"]:
        kept = row["kept_shared"] / row["kept_svd"] if row["kept_svd"] > 0 else 1.0
        t.add_row(str(row["rank"]), f"{row['shared']['mean']:.4f}", f"{row['shared']['max']:.4f}",
                  f"{row['svd']['mean']:.4f}", f"{kept:.3f}", f"{row['params']:,}", f"{row['ratio_params']:.1f}x")
    con.print(t)
    if any(row["K"] > 1 for row in rep["cluster_curve"]):
        ks = sorted({row["K"] for row in rep["cluster_curve"]})
        cell = {(row["rank"], row["K"]): row for row in rep["cluster_curve"]}
        c = Table(title="mean error vs clusters K (jd-clustered)", title_justify="left")
        c.add_column("rank")
        for k in ks:
            c.add_column(f"K={k}")
        for r in sorted({row["rank"] for row in rep["cluster_curve"]}):
            c.add_row(str(r), *(f"{cell[(r, k)]['mean']:.4f}" if (r, k) in cell else "-" for k in ks))
        con.print(c)
    m = Table(title="shared / per-adapter SVD mean error by module type", title_justify="left")
    m.add_column("type")
    m.add_column("modules")
    for r in rep["ranks"]:
        m.add_column(f"r={r}")
    for name, info in sorted(rep["module_types"].items()):
        m.add_row(escape(name), str(info["n_modules"]),
                  *(f"{s:.3f} / {v:.3f}" for s, v in zip(info["shared"], info["svd"])))
    con.print(m)
    if rep.get("target_error") is not None:
        p, ps = rep.get("pick"), rep.get("pick_svd")
        if p:
            con.print(f"pick for mean error <= {rep['target_error']}: rank {p['rank']}, K = {p['K']} "
                      f"(mean {p['mean']:.4f}, {p['params']:,} numbers, {p['ratio_params']:.1f}x smaller)")
            if p.get("larger_than_originals"):
                con.print(f"note: that stores more numbers than the adapters' own factors ({rep['original_params']:,}): "
                          "shared parts do not pay here at this error; compress with --target-error (the allocator "
                          "keeps per-adapter parts where they cost less) or keep the originals")
        else:
            con.print(f"no rank / K tried meets mean error <= {rep['target_error']}: try larger --ranks or --clusters")
        if ps:
            con.print(f"per-adapter SVD would need rank {ps['rank']} ({ps['params']:,} numbers)")
    if rep.get("frontier"):
        orig = rep["original_params"] or 1
        f = Table(title="mean error vs bytes (shared only, per-adapter SVD only, the mix at the adapters' "
                  "precision, and with 1-8 bits: --budget)", title_justify="left")
        for col in ("numbers", "bytes", "% orig.", "shared", "per-adapter", "mix", "mix, bits"):
            f.add_column(col)
        for row in rep["frontier"]:
            f.add_row(f"{row['numbers']:,}", f"{row['bytes']:,}", f"{100 * row['numbers'] / orig:.1f}%",
                      *(f"{row[k]:.4f}" if row.get(k) is not None else "-"
                        for k in ("shared_only", "per_adapter", "mix", "bits")))
        con.print(f)


def print_ray(con: Console, ray: dict[str, Any]) -> None:
    """One line per Ray worker: tasks and busy seconds (``--json``: ``ray.workers``)."""
    con.print(f"ray ({escape(str(ray['address']))}, {ray['cluster_cpus']} CPUs): {ray['tasks']} tasks, "
              f"{ray['busy_s']:.1f} s busy on {len(ray['workers'])} worker(s)", highlight=False)
    for w in ray["workers"]:
        con.print(f"  {escape(w['worker'])}: {w['tasks']} tasks, {w['busy_s']:.1f} s", highlight=False)
