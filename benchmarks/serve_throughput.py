"""Serving throughput and adapter memory: lorazip's batched layer vs base, merged and gathered LoRA.

    python benchmarks/serve_throughput.py --device cpu --threads 1            # modest CPU sizes
    python benchmarks/serve_throughput.py --device cuda --json serve.json      # GPU defaults (d = 4096)

Two parts, each timed for four variants:

* **layer**: one ``d x d`` linear layer (Mistral-like d = 4096 on GPU, 1024 on CPU), ``n`` resident
  adapters of rank ``r``; a batch of ``batch`` rows x ``seq`` tokens.
* **model**: a whole forward pass of a tiny Llama built locally (no download), adapters on the
  attention projections.

Variants: ``base`` (the base model alone), ``merged`` (one adapter merged into the weights: zero
overhead, but one adapter per model), ``gathered`` (S-LoRA/Punica-style per-row LoRA in plain
PyTorch: gather ``A_a, B_a`` of every row, two ``torch.bmm``; the ``n`` exported rank-r pairs
``B_a = U S_a``, ``A_a = V^T`` resident), ``lorazip`` (:class:`lorazip.serve.BatchedLoraLinear`:
``V^T x`` shared, gathered ``r x r`` cores, ``U`` shared). Sweeps: the number of distinct adapters
in a batch (rows use adapters ``row % distinct``) at a fixed batch, and the batch size (every row
its own adapter). Variants are timed round-robin (``--reps`` calls each after warm-up; the best
call by default, ``--stat median`` for the median) so load drift on a shared machine hits them alike.

Memory: ``adapter_bytes`` are the bytes of adapter parameters resident (all ``n`` adapters);
on CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` while a variant runs, above what
was allocated before its adapter tensors were built (resident + transient working memory).

Prints Markdown tables; ``--json PATH`` writes every row plus the machine and settings.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

import lorazip
from lorazip.serve import BatchedLoraLinear, set_adapters

VARIANTS = ("base", "merged", "gathered", "lorazip")


# -- timing ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int,
                     stat: str = "min") -> dict[str, float]:
    """Seconds per call of each function (min or median over ``reps``), calls interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        _sync(device)
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: (min(v) if stat == "min" else statistics.median(v)) for k, v in times.items()}


def peak_bytes(build: Callable[[], Callable[[], object]], device: torch.device) -> int | None:
    """Peak CUDA memory of building a variant and running it once, above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn = build()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del fn
    return int(peak)


# -- synthetic collection ---------------------------------------------------------------------------
def orthonormal(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return q


def make_factors(d_out: int, d_in: int, r: int, n: int, gen: torch.Generator):
    """Shared bases and cores with LoRA-like scale (delta ~ 1e-2 of a unit-scale weight)."""
    U = orthonormal(d_out, r, gen).unsqueeze(0)
    V = orthonormal(d_in, r, gen).unsqueeze(0)
    cores = torch.randn(n, r, r, generator=gen) * (0.5 / math.sqrt(r))
    return U, V, cores


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class GatheredLoraLinear(nn.Module):
    """Per-row LoRA as S-LoRA/Punica compute it, in plain PyTorch: gather A_a, B_a per row, bmm twice."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, holder: dict):
        super().__init__()
        self.base, self.holder = base, holder
        self.register_buffer("A", A)  # (n, r, d_in)
        self.register_buffer("B", B)  # (n, d_out, r)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.holder["ids"] if ids is None else ids
        y = self.base(x)
        b = x.shape[0]
        x3 = x.reshape(b, -1, x.shape[-1])
        h = torch.bmm(x3, self.A.index_select(0, ids).transpose(1, 2))  # (b, T, r)
        # y + h B_a^T, the add fused as lorazip's layer fuses it
        out = torch.baddbmm(y.reshape(b, -1, y.shape[-1]), h, self.B.index_select(0, ids).transpose(1, 2))
        return out.reshape(y.shape)


def exported_pairs(U, V, cores, dtype, device):
    """The n rank-r LoRA pairs ``lorazip export`` writes: B_a = U S_a, A_a = V^T (stacked)."""
    B = (U[0] @ cores).to(device=device, dtype=dtype)  # (n, d_out, r)
    A = V[0].T.expand(cores.shape[0], -1, -1).to(device=device, dtype=dtype).contiguous()  # (n, r, d_in)
    return A, B


def row_ids(batch: int, distinct: int) -> torch.Tensor:
    return torch.arange(batch) % distinct


# -- part (i): one layer ------------------------------------------------------------------------------
def bench_layer(args, device, dtype, gen) -> list[dict]:
    d, r, n = args.d, args.rank, args.n_adapters
    base = nn.Linear(d, d, bias=False).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=gen).div_(math.sqrt(d)).to(dtype))
    U, V, cores = make_factors(d, d, r, n, gen)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight += (U[0] @ cores[0] @ V[0].T).to(device=device, dtype=dtype)
    A, B = exported_pairs(U, V, cores, dtype, device)
    gathered = GatheredLoraLinear(base, A, B, {})
    layer = BatchedLoraLinear(base, U, V, cores, dtype=dtype)
    mem = {"base": 0, "merged": 0, "gathered": nbytes(A, B), "lorazip": layer.adapter_bytes()}

    # correctness of both per-row paths on a small mixed batch
    x = torch.randn(4, 2, d, generator=gen).to(device=device, dtype=dtype)
    ids = torch.tensor([0, n - 1, 1, 0])
    with torch.inference_mode():
        a, b = gathered(x, ids.to(device)), layer(x, adapter_ids=ids)
    err = float((a.float() - b.float()).abs().max() / a.float().abs().max())
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"gathered and lorazip disagree: {err}"

    rows = []
    for batch, distinct in settings(args):
        x = torch.randn(batch, args.seq, d, generator=gen).to(device=device, dtype=dtype)
        ids = row_ids(batch, distinct)
        fns = {
            "base": lambda: base(x),
            "merged": lambda: merged(x),
            "gathered": lambda: gathered(x, ids.to(device, non_blocking=True)),
            "lorazip": lambda: layer(x, adapter_ids=ids),
        }
        t = time_round_robin(fns, device, args.reps, args.warmup, args.stat)
        peaks = {}
        if device.type == "cuda":
            peaks = {
                "base": peak_bytes(lambda: (lambda: base(x)), device),
                "merged": peak_bytes(lambda: (lambda: merged(x)), device),
                "gathered": peak_bytes(lambda: _fresh_gathered(base, U, V, cores, dtype, device, x, ids), device),
                "lorazip": peak_bytes(lambda: _fresh_lorazip(base, U, V, cores, dtype, x, ids), device),
            }
        rows.append(_row("layer", batch, args.seq, distinct, t, mem, peaks))
        print_progress(rows[-1])
    return rows


def _fresh_gathered(base, U, V, cores, dtype, device, x, ids):
    A, B = exported_pairs(U, V, cores, dtype, device)
    g = GatheredLoraLinear(base, A, B, {})
    return lambda: g(x, ids.to(device))


def _fresh_lorazip(base, U, V, cores, dtype, x, ids):
    layer = BatchedLoraLinear(base, U, V, cores, dtype=dtype)
    return lambda: layer(x, adapter_ids=ids)


# -- part (ii): a tiny Llama's whole forward pass ----------------------------------------------------
def tiny_llama(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = args.model_hidden
    cfg = LlamaConfig(
        hidden_size=h, intermediate_size=args.model_intermediate or int(8 * h / 3 // 64 * 64 or 64),
        num_hidden_layers=args.model_layers, num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 128), vocab_size=args.model_vocab, max_position_embeddings=max(64, args.model_seq),
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def synthetic_artifact(model, targets, r, n, gen) -> lorazip.Artifact:
    """An in-memory artifact (K = 1, full cores) for ``targets`` of ``model``; nothing is written."""
    tensors, modules = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            U, V, cores = make_factors(mod.out_features, mod.in_features, r, n, gen)
            tensors[f"U/{name}"], tensors[f"V/{name}"], tensors[f"cores/{name}"] = U, V, cores
            modules.append({"name": name, "d_out": mod.out_features, "d_in": mod.in_features, "layout": "linear",
                            "rank": r, "n_clusters": 1})
    adapters = [{"name": f"a{i}", "ranks": {m["name"]: r for m in modules}} for i in range(n)]
    meta = {"method": "jd-full", "rank": r, "base_model": "tiny-llama", "modules": modules, "adapters": adapters}
    return lorazip.Artifact(meta, tensors=tensors)


def gathered_model(model, art, dtype, device, holder):
    m = copy.deepcopy(model)
    for mod in art.modules:
        name = mod["name"]
        U, V, cores, _ = art.module_factors(name)
        A, B = exported_pairs(U, V, cores, dtype, device)
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, GatheredLoraLinear(m.get_submodule(name), A, B, holder))
    return m


def merged_model(model, art, dtype, device):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in art.modules:
            U, V, cores, _ = art.module_factors(mod["name"], [0])
            m.get_submodule(mod["name"]).weight += (U[0] @ cores[0] @ V[0].T).to(device=device, dtype=dtype)
    return m


def bench_model(args, device, dtype, gen) -> list[dict]:
    targets = set(args.targets.split(","))
    base = tiny_llama(args, device, dtype)
    art = synthetic_artifact(base, targets, args.rank, args.n_adapters, gen)
    merged = merged_model(base, art, dtype, device)
    holder: dict = {}
    gathered = gathered_model(base, art, dtype, device, holder)
    served = lorazip.apply(copy.deepcopy(base), art)
    mem_lz = sum(m.adapter_bytes() for m in served.modules() if isinstance(m, BatchedLoraLinear))
    mem_g = sum(nbytes(m.A, m.B) for m in gathered.modules() if isinstance(m, GatheredLoraLinear))
    mem = {"base": 0, "merged": 0, "gathered": mem_g, "lorazip": mem_lz}

    # correctness: lorazip and gathered agree on a small mixed batch; adapter 0 rows match merged
    ids = torch.tensor([0, args.n_adapters - 1, 0, 1])
    tok = torch.randint(0, args.model_vocab, (4, 8), generator=gen).to(device)
    with torch.inference_mode():
        holder["ids"] = ids.to(device)
        set_adapters(served, ids)
        a, b, c = gathered(tok).logits.float(), served(tok).logits.float(), merged(tok).logits.float()
    scale = float(a.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert float((a - b).abs().max()) < tol * scale, "gathered and lorazip disagree"
    assert float((b[[0, 2]] - c[[0, 2]]).abs().max()) < tol * scale, "lorazip and merged disagree on adapter 0"

    rows = []
    for batch, distinct in settings(args, model=True):
        tok = torch.randint(0, args.model_vocab, (batch, args.model_seq), generator=gen).to(device)
        ids = row_ids(batch, distinct)

        def run_gathered():
            holder["ids"] = ids.to(device, non_blocking=True)
            return gathered(tok)

        def run_lorazip():
            set_adapters(served, ids)
            return served(tok)

        fns = {"base": lambda: base(tok), "merged": lambda: merged(tok), "gathered": run_gathered, "lorazip": run_lorazip}
        t = time_round_robin(fns, device, args.reps, args.warmup, args.stat)
        peaks = {}
        if device.type == "cuda":  # adapters resident already: peak working memory above the resident state
            peaks = {k: peak_bytes(lambda fn=fn: fn, device) for k, fn in fns.items()}
            peaks = {k: v + mem[k] for k, v in peaks.items()}
        rows.append(_row("model", batch, args.model_seq, distinct, t, mem, peaks))
        print_progress(rows[-1])
    return rows


# -- sweeps and output ----------------------------------------------------------------------------------
def settings(args, model: bool = False) -> list[tuple[int, int]]:
    """(batch, distinct): distinct sweep at the fixed batch, then the batch sweep (every row its own adapter)."""
    fixed = args.model_batch if model else args.batch
    out = [(fixed, min(dd, fixed, args.n_adapters)) for dd in args.distinct]
    out += [(b, min(b, args.n_adapters)) for b in (args.model_batches if model else args.batches)]
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def _row(part, batch, seq, distinct, t, mem, peaks) -> dict:
    tokens = batch * seq
    return {
        "part": part, "batch": batch, "seq": seq, "distinct": distinct,
        "tokens_per_s": {k: tokens / t[k] for k in VARIANTS},
        "seconds": {k: t[k] for k in VARIANTS},
        "adapter_bytes": mem,
        "peak_bytes": peaks or None,
    }


def print_progress(row: dict) -> None:
    tps = row["tokens_per_s"]
    print(f"  {row['part']} batch={row['batch']} distinct={row['distinct']}: "
          + ", ".join(f"{k} {tps[k]:,.0f} tok/s" for k in VARIANTS), flush=True)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| part | batch x seq | distinct | base tok/s | merged tok/s | gathered tok/s | lorazip tok/s "
        "| lorazip/base | lorazip/merged | lorazip/gathered | adapter MiB gathered / lorazip | peak MiB gathered / lorazip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, m, p = r["tokens_per_s"], r["adapter_bytes"], r["peak_bytes"] or {}
        lines.append(
            f"| {r['part']} | {r['batch']} x {r['seq']} | {r['distinct']} | {t['base']:,.0f} | {t['merged']:,.0f} "
            f"| {t['gathered']:,.0f} | {t['lorazip']:,.0f} | {t['lorazip'] / t['base']:.2f} "
            f"| {t['lorazip'] / t['merged']:.2f} | {t['lorazip'] / t['gathered']:.2f} "
            f"| {_mib(m['gathered'])} / {_mib(m['lorazip'])} | {_mib(p.get('gathered'))} / {_mib(p.get('lorazip'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (CUDA default) or bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n-adapters", type=int, default=1000, help="adapters resident")
    ap.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 64, 512, 1000])
    ap.add_argument("--d", type=int, default=None, help="layer width (default 4096 on CUDA, 1024 on CPU)")
    ap.add_argument("--batch", type=int, default=1000, help="rows of the layer distinct-adapter sweep")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64, 256], help="layer batch sweep")
    ap.add_argument("--seq", type=int, default=1, help="tokens per row in the layer part (1 = decode)")
    ap.add_argument("--model-hidden", type=int, default=None, help="tiny Llama width (default 2048 CUDA, 256 CPU)")
    ap.add_argument("--model-layers", type=int, default=None, help="default 8 CUDA, 4 CPU")
    ap.add_argument("--model-intermediate", type=int, default=None)
    ap.add_argument("--model-vocab", type=int, default=None, help="default 32000 CUDA, 1000 CPU")
    ap.add_argument("--model-batch", type=int, default=1000)
    ap.add_argument("--model-batches", type=int, nargs="*", default=[1, 8, 64, 256])
    ap.add_argument("--model-seq", type=int, default=None, help="tokens per row (default 1 CUDA: decode; 4 CPU)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 20 CUDA, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--stat", choices=["min", "median"], default="min",
                    help="per-call time: best of --reps (default; robust to other jobs on a shared machine) or median")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = dev.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype or ("float16" if cuda else "float32")]
    args.d = args.d or (4096 if cuda else 1024)
    args.model_hidden = args.model_hidden or (2048 if cuda else 256)
    args.model_layers = args.model_layers or (8 if cuda else 4)
    args.model_vocab = args.model_vocab or (32000 if cuda else 1000)
    args.model_seq = args.model_seq or (1 if cuda else 4)
    args.reps = args.reps or (20 if cuda else 5)
    gen = torch.Generator().manual_seed(args.seed)

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                               f"{os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "args": {k: v for k, v in vars(args).items() if k != "json_path"},
    }
    print(f"# serve throughput: {info['device']}, torch {info['torch']}, {info['threads']} threads, {info['dtype']}",
          flush=True)
    rows = []
    if not args.skip_layer:
        print(f"layer: d = {args.d}, r = {args.rank}, {args.n_adapters} adapters resident", flush=True)
        rows += bench_layer(args, dev, dtype, gen)
    if not args.skip_model:
        print(f"model: tiny Llama hidden {args.model_hidden}, {args.model_layers} layers, vocab {args.model_vocab}, "
              f"adapters on {args.targets}", flush=True)
        rows += bench_model(args, dev, dtype, gen)
    print()
    print(markdown(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json_path}")


if __name__ == "__main__":
    main()
