"""benchmarks/time_breakdown.py --cold: the collection's pages leave the page cache, and what is cached
is measured (a cold floor and a cold run need both)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "time_breakdown.py"


def _load():
    spec = importlib.util.spec_from_file_location("time_breakdown", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and mincore: Linux")
def test_evict_drops_the_weights_pages(tmp_path):
    tb = _load()
    for i in range(2):
        d = tmp_path / f"a{i}"
        d.mkdir()
        with open(d / "adapter_model.safetensors", "wb") as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())  # clean pages: only those can be dropped
    seconds, nbytes = tb.floor_seconds(tmp_path)
    assert nbytes == 2 << 20 and seconds >= 0
    cached = tb.cached_bytes(tmp_path)
    if cached is None or cached == 0:
        pytest.skip("this filesystem does not keep or report cached pages")
    assert cached <= 2 << 20
    tb.evict(tmp_path)
    assert tb.cached_bytes(tmp_path) == 0
