"""A refactor of compression changes no artifact: every mode against the digests recorded before it
(tests/same_artifacts.py; rerun ``python tests/same_artifacts.py --record`` only for an intended change)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def test_every_mode_gives_the_recorded_artifact():
    recorded = json.loads((HERE / "data" / "artifact_sha256.json").read_text())
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"digests recorded with torch {recorded['torch']}, not {torch.__version__}")
    try:
        import ray  # noqa: F401
    except ImportError:
        recorded["modes"] = {k: v for k, v in recorded["modes"].items() if not k.startswith("ray-")}
    proc = subprocess.run([sys.executable, str(HERE / "same_artifacts.py"), "--check"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
