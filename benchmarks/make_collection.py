"""Write a Lots-of-LoRAs-shaped synthetic collection to disk (cached between runs).

    python benchmarks/make_collection.py --n 100 --out benchmarks/.cache/lol-100 [--dtype bf16] [--planted 32]

Each adapter is a PEFT folder like `Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task*`:
rank 16, alpha 32, q_proj (4096x4096), k_proj and v_proj (1024x4096) in 32 layers (96
modules, 9,437,184 parameters, 37.7 MB in fp32). `--layers`/`--d-model`/`--d-kv` shrink it.
With `--planted R`, every module's factors are drawn inside one shared random basis of
rank R plus 1% noise (real adapters are far less structured; without it, factors are iid
Gaussian, the hardest case). Existing complete adapters are kept (resumable, seeded by index).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def module_shapes(layers: int, d_model: int, d_kv: int) -> list[tuple[str, int, int]]:
    out = []
    for layer in range(layers):
        for proj, d_out in (("q_proj", d_model), ("k_proj", d_kv), ("v_proj", d_kv)):
            out.append((f"model.layers.{layer}.self_attn.{proj}", d_out, d_model))
    return out


def write_adapter(folder: Path, index: int, shapes, rank: int, alpha: int, dtype, planted: int, bases) -> None:
    g = torch.Generator().manual_seed(1000 + index)
    state = {}
    for j, (name, d_out, d_in) in enumerate(shapes):
        if planted:
            Ub, Vb = bases[j]
            B = Ub @ torch.randn(planted, rank, generator=g) + 0.01 * torch.randn(d_out, rank, generator=g)
            A = torch.randn(rank, planted, generator=g) @ Vb.T + 0.01 * torch.randn(rank, d_in, generator=g)
        else:
            B = torch.randn(d_out, rank, generator=g) / rank**0.5
            A = torch.randn(rank, d_in, generator=g) / d_in**0.5
        state[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = (B * 0.01).to(dtype).contiguous()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "base_model_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "r": rank,
           "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj", "v_proj"], "task_type": "CAUSAL_LM",
           "fan_in_fan_out": False, "use_rslora": False}
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-kv", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--planted", type=int, default=0)
    args = ap.parse_args()
    shapes = module_shapes(args.layers, args.d_model, args.d_kv)
    bases = []
    if args.planted:
        g = torch.Generator().manual_seed(7)
        for _, d_out, d_in in shapes:
            bases.append((torch.linalg.qr(torch.randn(d_out, args.planted, generator=g))[0],
                          torch.linalg.qr(torch.randn(d_in, args.planted, generator=g))[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        folder = args.out / f"task{i:04d}"
        if (folder / "adapter_model.safetensors").is_file():
            continue
        write_adapter(folder, i, shapes, args.rank, args.alpha, DTYPES[args.dtype], args.planted, bases)
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{args.n}", flush=True)


if __name__ == "__main__":
    main()
