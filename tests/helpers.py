"""Write small synthetic PEFT LoRA adapter folders for tests.

``write_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with random
factors (``lora_B`` nonzero, unlike PEFT's initialisation) and returns the dense deltas
``scale * B @ A`` (float64, ``(d_out, d_in)``) so tests can compare against them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

GPT2_LIKE = {
    "transformer.h.0.attn.c_attn": (24, 8),
    "transformer.h.0.mlp.c_proj": (8, 16),
    "transformer.h.1.attn.c_attn": (24, 8),
}


def _pattern_value(patterns: dict[str, Any] | None, module: str, default):
    """PEFT's get_pattern_key rule (re-implemented here on purpose, compared with PEFT in tests)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def write_adapter(
    path,
    modules: dict[str, tuple[int, int]],
    r: int = 4,
    alpha: float = 8,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    prefix: str = "base_model.model.",
    adapter_name_in_key: str | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config_overrides: dict[str, Any] | None = None,
    base_model: str | None = "tiny-base",
) -> dict[str, torch.Tensor]:
    """Write a PEFT LoRA folder at ``path``; return ``{module: dense delta}`` (float64)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    mid = f".{adapter_name_in_key}" if adapter_name_in_key else ""
    for name, (d_out, d_in) in modules.items():
        rr = int(_pattern_value(rank_pattern, name, r))
        aa = float(_pattern_value(alpha_pattern, name, alpha))
        scale = aa / math.sqrt(rr) if use_rslora else aa / rr
        A = (torch.randn(rr, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
        B = (torch.randn(d_out, rr, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
        tensors[f"{prefix}{name}.lora_A{mid}.weight"] = A.contiguous()
        tensors[f"{prefix}{name}.lora_B{mid}.weight"] = B.contiguous()
        deltas[name] = scale * (B.to(torch.float64) @ A.to(torch.float64))
    for key, t in (extra_tensors or {}).items():
        tensors[key] = t.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        # the modules of the LoRA tensors written, those among extra_tensors too (embedding LoRA)
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules} |
                                 {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in extra_tensors or {} if ".lora_" in k}),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
    }
    config.update(config_overrides or {})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return deltas


def write_collection(root, n: int = 3, modules=None, r: int = 4, alpha: float = 8, *, seed: int = 0, **kw):
    """``n`` adapters ``root/a0 .. root/a{n-1}``; returns ``{name: deltas}``."""
    modules = GPT2_LIKE if modules is None else modules
    return {
        f"a{i}": write_adapter(Path(root) / f"a{i}", modules, r, alpha, seed=seed + i, **kw) for i in range(n)
    }


# Six rank-8 adapters of three small modules (float32): the collection the low-bit tests compress
LOWBIT_MODULES = {"l.0.q": (64, 48), "l.0.v": (48, 64), "l.1.q": (64, 48)}
LOWBIT_BYTES = sum(8 * (a + b) * 4 * 6 for a, b in LOWBIT_MODULES.values())  # its LoRA factors' bytes


def lowbit_collection(root, seed: int):
    """The low-bit tests' collection, written at ``root`` and loaded."""
    import lorazip

    write_collection(root, n=6, modules=LOWBIT_MODULES, r=8, seed=seed)
    return lorazip.load_collection(root)


def lowbit_artifact(coll, fraction: float = 0.12):
    """``coll`` compressed at ``fraction`` of its bytes, where the allocation stores low-bit parts."""
    import lorazip

    got = lorazip.compress(coll, budget=int(fraction * LOWBIT_BYTES), hash_sources=False, keep_extras=False)
    assert got.allocation["bits"]["histogram"].keys() - {"8", "16", "32"}, "expected low-bit parts here"
    return got


def write_raw_safetensors(path, header: dict[str, Any], data: bytes) -> None:
    """Hand-craft a safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode("utf-8")
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tree_files(root) -> set[str]:
    """Every file and folder under ``root`` (relative paths), to check that nothing was written."""
    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def run_cli(capsys, *args):
    """Run the CLI in-process; return (rc, stdout, stderr)."""
    from lorazip.cli.main import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_error_line(err: str, *parts) -> None:
    """stderr is exactly one ``error:`` line (no traceback) containing every part."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for p in parts:
        assert str(p) in lines[0], (p, lines[0])


def edit_config(folder, **changes) -> None:
    """Change fields of ``folder/adapter_config.json`` (a value of ``...`` removes the field)."""
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def read_doc(header_meta: dict[str, str]) -> dict[str, Any]:
    """The ``lorazip`` metadata document of an artifact header (v3: ``lorazip_z``; v1/v2: ``lorazip``)."""
    from lorazip.layout import META_Z, decode_meta

    if META_Z in header_meta:
        return json.loads(decode_meta(header_meta[META_Z]))
    return json.loads(header_meta["lorazip"])


def write_doc(header_meta: dict[str, str], doc: Any) -> None:
    """Store ``doc`` (a dict, or raw text as is) back under the key it came from."""
    from lorazip.layout import META_Z, encode_meta

    if META_Z in header_meta:
        if isinstance(doc, str):  # raw (possibly invalid) text: compress it as given
            import base64
            import zlib

            header_meta[META_Z] = base64.b64encode(zlib.compress(doc.encode("utf-8"))).decode("ascii")
        else:
            header_meta[META_Z] = encode_meta(doc)
    else:
        header_meta["lorazip"] = doc if isinstance(doc, str) else json.dumps(doc)


def resave_artifact(path, dst, *, meta_edit=None, tensor_edit=None):
    """A copy of the artifact file ``path`` at ``dst`` with its metadata document (checksum dropped)
    edited in place by ``meta_edit(doc)`` and its stored tensors by ``tensor_edit(tensors)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = read_doc(meta)
    doc.pop("checksum", None)
    if meta_edit:
        meta_edit(doc)
    if tensor_edit:
        tensor_edit(tensors)
    write_doc(meta, doc)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def record_builds(monkeypatch, argument: str) -> list:
    """The ``argument`` keyword of every (not dry) ``build_allocation`` a budget or target run makes,
    in order, as the returned list fills."""
    from lorazip.compress import budget

    seen: list = []
    real = budget.build_allocation

    def spy(*a, **k):
        if not k.get("dry"):
            seen.append(k.get(argument))
        return real(*a, **k)

    monkeypatch.setattr(budget, "build_allocation", spy)
    return seen


def tiny_tokenizer(texts, out: Path):
    """A 300-token byte-level BPE tokenizer trained on ``texts`` (with <unk>, <pad>, <eos>), saved
    to ``out`` as a transformers fast tokenizer: what the tiny local models of the tests read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(str(out))
    return fast


def make_peft_adapters(base, configs: dict, out: Path, seed: int) -> None:
    """Save one PEFT adapter of ``base`` per ``{name: LoraConfig}`` under ``out/<name>``, every
    LoRA factor and ``modules_to_save`` head drawn at random (PEFT initialises lora_B and
    lora_embedding_A to zero), from one generator seeded with ``seed``, in ``configs`` order."""
    import copy
    import warnings

    import peft

    gen = torch.Generator().manual_seed(seed)
    for name, cfg in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT notices, e.g. "save_embedding_layers" for embed_tokens
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            with torch.no_grad():
                for pname, p in pm.named_parameters():
                    if "lora_" in pname or "modules_to_save" in pname:
                        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            pm.save_pretrained(str(out / name))


def svd_frontier(coll, numbers: int) -> float:
    """Independent of lorazip's allocator: each (adapter, module) truncated by dense SVD, ranks
    spread greedily over all pairs by error removed per stored number; mean per-adapter error."""
    n = len(coll)
    E = np.zeros(n)
    steps = []
    for m in coll.modules:
        f = coll.module_factors(m.name)
        M = f.B.double() @ f.A.double()
        for i in range(n):
            sv2 = torch.linalg.svdvals(M[i]).square().numpy()
            E[i] += sv2.sum()
            steps.append((i, m.d_in + m.d_out, sv2))
    err = E.copy()
    gains = sorted(((sv2[j] / E[i] / cost, i, cost, sv2[j]) for i, cost, sv2 in steps for j in range(len(sv2))),
                   reverse=True)
    used = 0
    for _, i, cost, g in gains:  # spectra descend, so a pair's steps come in order
        if used + cost <= numbers:
            used += cost
            err[i] -= g
    return float(np.mean(err / E))


def write_planted_groups(root: Path, sizes: tuple[int, ...], d: int, r_shared: int, seed: int, noise: float = 0.0,
                  own: float = 0.0) -> list[int]:
    """Adapters in groups; group g's rank-4 updates live in its own r_shared-dim subspace pair
    (plus ``noise``; with ``own``, one of the 4 directions is the adapter's own, of norm ``own``).
    Returns the group of each adapter, in the order of their folder names."""
    g = torch.Generator().manual_seed(seed)
    labels = []
    i = 0
    for grp, size in enumerate(sizes):
        U = torch.linalg.qr(torch.randn(d, r_shared, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(d, r_shared, generator=g, dtype=torch.float64))[0]
        for _ in range(size):
            B = U @ torch.randn(r_shared, 4, generator=g, dtype=torch.float64)
            A = torch.randn(4, r_shared, generator=g, dtype=torch.float64) @ V.T
            if own:  # orthogonal to the group's subspaces: the residual of the shared part is rank 1
                b, a = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(2))
                b, a = b - U @ (U.T @ b), a - V @ (V.T @ a)
                B[:, 3], A[3] = own * b / b.norm(), a / a.norm()  # energy own^2
            B = B + noise * torch.randn(B.shape, generator=g, dtype=torch.float64)
            folder = root / f"p{i:02d}"
            folder.mkdir(parents=True)
            save_file({"base_model.model.layer.q.lora_A.weight": A.float().contiguous(),
                       "base_model.model.layer.q.lora_B.weight": B.float().contiguous()},
                      str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            (folder / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q"], "base_model_name_or_path": "t"}))
            labels.append(grp)
            i += 1
    return labels


def with_low_bit_shared(art, bases_bits, cores_bits):
    """A new in-memory artifact: ``art`` (int8 storage, in memory or opened) with the bases and cores
    of its modules of rank > 0 stored at low bits (format v5 ``shared_bits``) from their current
    values (:func:`lorazip.quantize.to_shared_lowbit`), and ``stats/sq_error`` recomputed exactly
    for the new stored values against the originals (the adapters' recorded source folders).
    ``bases_bits`` / ``cores_bits``: a width, or a list of widths taken module by module (cycled)."""
    import copy

    from lorazip.artifact import Artifact
    from lorazip.evaluate import recompute_errors
    from lorazip.layout import round_small
    from lorazip.quantize import QSCALE, to_shared_lowbit

    def width(spec, j):
        return int(spec) if isinstance(spec, int) else int(spec[j % len(spec)])

    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    tensors = dict(art.tensors())
    shared = [mod for mod in meta["modules"] if mod["rank"] > 0]
    for j, mod in enumerate(shared):
        mod["shared_bits"] = [width(bases_bits, j), width(cores_bits, j)]
        for role, bits in (("U", mod["shared_bits"][0]), ("V", mod["shared_bits"][0]), ("cores", mod["shared_bits"][1])):
            key = f"{role}/{mod['name']}"
            values = art.get(key)
            tensors.pop(QSCALE + key, None)
            to_shared_lowbit(values, bits, role).put(tensors, key)
    out = Artifact(meta, tensors=tensors)
    rows, sq, _ = recompute_errors(out, [a["source"]["path"] for a in meta["adapters"]], False, False)
    assert rows == list(range(len(out.names)))
    tensors["stats/sq_error"] = sq.to(tensors["stats/sq_error"].dtype)
    round_small(tensors, meta)
    return Artifact(meta, tensors=tensors)
