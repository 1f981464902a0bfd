"""benchmarks/paper_side_by_side.py: its runner of the paper's JD-Full writes every adapter back as a
PEFT folder lorazip reads, and reports the errors of what it wrote (checked against a stand-in for the
paper's ``compression.py``, since the paper's repository is not part of lorazip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import write_collection
from safetensors.torch import load_file

import lorazip

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_side_by_side.py"

# full_lora_pca(A, B, r, niter, display) with the paper's convention delta = A B^T: bases from the
# stacked factors' leading singular vectors (a stand-in; the script only needs the signature)
STAND_IN = '''
import torch
def full_lora_pca(A, B, r, niter=10, display=True):
    U = torch.linalg.svd(torch.cat(A, 1), full_matrices=False)[0][:, :r]
    V = torch.linalg.svd(torch.cat(B, 1), full_matrices=False)[0][:, :r]
    return U, V, [U.t() @ a @ b.t() @ V for a, b in zip(A, B)]
'''


def test_runner_writes_peft_folders_and_their_errors(tmp_path):
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "compression.py").write_text(STAND_IN)
    write_collection(tmp_path / "coll", n=3, modules={"l0.q": (24, 20), "l1.v": (12, 20)}, r=3)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(_SCRIPT), "--child", "--paper", str(paper), "--rank", "4",
                          str(tmp_path / "coll"), "--out", str(out)], check=True, capture_output=True, text=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # what it wrote is a collection lorazip loads: the same adapters, every module at rank 4
    src, back = lorazip.load_collection(tmp_path / "coll"), lorazip.load_collection(out)
    assert [a.name for a in back.adapters] == [a.name for a in src.adapters]
    assert {m.rank for a in back.adapters for m in a.modules.values()} == {4}
    errs = []
    for a in src.adapters:  # dense: each adapter's relative squared error over its modules (unscaled deltas)
        orig = load_file(str(a.weights_file))
        wrote = load_file(str(out / a.name / "adapter_model.safetensors"))
        e2 = n2 = 0.0
        for k in orig:
            if ".lora_A." not in k:
                continue
            kb = k.replace(".lora_A.", ".lora_B.")
            M = orig[kb].double() @ orig[k].double()
            e2 += float((M - wrote[kb].double() @ wrote[k].double()).square().sum())
            n2 += float(M.square().sum())
        errs.append(e2 / n2)
    want = sum(errs) / len(errs)
    assert abs(got["error"] - want) < 1e-6 * want
    assert 0 < got["error"] < 1
