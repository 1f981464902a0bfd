"""lorazip against the paper's own code, side by side on the same machine and collections.

    python benchmarks/paper_side_by_side.py --paper PATH SRC [SRC ...] [--rank 32] [--runs 2]
        [--threads N] [--json out.json]

``PATH`` is a clone of the paper's repository (github.com/bruel-gabrielsson/LoRALoLA); its
``compression.py`` is loaded from there, not copied. Its default joint method, JD-Full
(``full_lora_pca``: ten fixed sweeps, each a ``torch.svd_lowrank`` of the stacked projections per
side), has no command-line runner, so this script's child process is one: it reads every adapter's
``adapter_model.safetensors``, calls ``full_lora_pca`` per module (the repository's
``full_lora_pca_wrapper`` does the same but moves everything to CUDA), and writes every adapter
back as a PEFT folder (``lora_B = U Sigma_i``, ``lora_A = V^T``), as the runner of issue 25 did. Its
wall time is the child's, from start to exit (Python and torch start-up included). lorazip's is that
of ``lorazip compress SRC -o OUT --rank R --dtype float32``. The two alternate, ``--runs`` times
each, on each collection. Errors: each adapter's relative squared error over its modules (energy
weighted), mean over adapters, for both (the paper's code ignores ``lora_alpha``; on these collections
every adapter has the same scale, which relative errors do not see). ``--threads``: torch intra-op
threads of both (default: torch's own). Not a timed test: prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def paper_child(paper: str, src: str, out: str, rank: int, threads: int | None) -> None:
    """The runner of the paper's JD-Full: read, solve per module, write PEFT folders; errors after."""
    import torch
    from safetensors.torch import load_file, save_file

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)  # its initialisation draws from torch's global generator
    spec = importlib.util.spec_from_file_location("paper_compression", Path(paper) / "compression.py")
    comp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comp)
    folders = sorted(p.parent for p in Path(src).glob("*/adapter_model.safetensors"))
    states = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    modules = sorted({k.split(".lora_")[0] for k in states[0] if ".lora_A." in k})
    results = {}
    for m in modules:
        As = [s[f"{m}.lora_A.weight"].float() for s in states]
        Bs = [s[f"{m}.lora_B.weight"].float() for s in states]
        # its convention: delta = A B^T with A = lora_B (d_out, r), B = lora_A^T (d_in, r)
        U, V, sigmas = comp.full_lora_pca(Bs, [A.t() for A in As], rank, niter=10, display=False)
        results[m] = (U, V, sigmas)
    root = Path(out)
    for i, f in enumerate(folders):
        tensors = {}
        for m, (U, V, sigmas) in results.items():
            tensors[f"{m}.lora_B.weight"] = (U @ sigmas[i]).contiguous()
            tensors[f"{m}.lora_A.weight"] = V.t().contiguous()
        (root / f.name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / f.name / "adapter_model.safetensors"))
        cfg = json.loads((f / "adapter_config.json").read_text())
        cfg["r"] = rank
        (root / f.name / "adapter_config.json").write_text(json.dumps(cfg))
    t_err = time.perf_counter()  # errors below are not part of the tool's work
    from lorazip.metrics import per_adapter, squared_errors

    e2 = torch.zeros(len(states), len(modules), dtype=torch.float64)
    n2 = torch.zeros_like(e2)
    for j, (m, (U, V, sigmas)) in enumerate(results.items()):
        A = torch.stack([s[f"{m}.lora_A.weight"] for s in states]).double()
        B = torch.stack([s[f"{m}.lora_B.weight"] for s in states]).double()
        e2[:, j], n2[:, j] = squared_errors(B, A, U.double(), V.double(), torch.stack(sigmas).double())
    err = per_adapter(e2, n2).tolist()
    print(json.dumps({"error": sum(err) / len(err), "error_s": time.perf_counter() - t_err}))


def run_paper(paper: str, src: str, rank: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", "--paper", paper, "--rank", str(rank), src, "--out", out]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return {"wall_s": wall - got["error_s"], "error": got["error"]}


def run_lorazip(src: str, rank: int, threads: int | None) -> dict:
    import lorazip

    env = dict(os.environ)
    if threads:
        env["LORAZIP_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "a.lorazip.safetensors"
        cmd = [sys.executable, "-m", "cli.main", "compress", src, "-o", str(out), "--rank", str(rank),
               "--dtype", "float32"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - t0
        error = lorazip.evaluate(lorazip.load_artifact(out))["errors"]["mean"]
    return {"wall_s": wall, "error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--paper", required=True, help="a clone of github.com/bruel-gabrielsson/LoRALoLA")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        paper_child(a.paper, a.sources[0], a.out, a.rank, a.threads)
        return
    rows = []
    for src in a.sources:
        paper, ours = [], []
        for _ in range(a.runs):  # alternated, so drift of the machine touches both
            paper.append(run_paper(a.paper, src, a.rank, a.threads))
            ours.append(run_lorazip(src, a.rank, a.threads))
            print(f"{src}: paper {paper[-1]['wall_s']:.2f} s ({paper[-1]['error']:.6f}), "
                  f"lorazip {ours[-1]['wall_s']:.2f} s ({ours[-1]['error']:.6f})", file=sys.stderr, flush=True)
        rows.append({"source": src, "paper": paper, "lorazip": ours})
    if a.json:
        Path(a.json).write_text(json.dumps({"rank": a.rank, "threads": a.threads, "rows": rows}, indent=1))
    print("| collection | paper's code, JD-Full (s) | lorazip (s) | ratio (worst pairing .. best) "
          "| paper's error | lorazip's error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pw = sorted(x["wall_s"] for x in r["paper"])
        lw = sorted(x["wall_s"] for x in r["lorazip"])
        print(f"| {Path(r['source']).name} | {', '.join(f'{x:.1f}' for x in pw)} | {', '.join(f'{x:.2f}' for x in lw)} "
              f"| {min(pw) / max(lw):.1f}x .. {max(pw) / min(lw):.1f}x "
              f"| {r['paper'][0]['error']:.5f} | {r['lorazip'][0]['error']:.5f} |")


if __name__ == "__main__":
    main()
