"""Provenance of a compressed collection: where each adapter came from and what it was.

Shared by :func:`lorazip.compress` and :mod:`lorazip.update` so that an artifact grown with
``add`` records its adapters exactly as compression does.
"""

from __future__ import annotations

from typing import Any

from ..io.collection import Collection
from ..io.peft import sha256_file

# Config fields carried into the artifact so export can rebuild a faithful PEFT config.
_CONFIG_FIELDS = (
    "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "fan_in_fan_out", "task_type", "modules_to_save", "revision",
)


class SourceHashes:
    """sha256 of every source file, computed in a background thread while modules are solved
    (hashlib releases the GIL), so the extra read of the sources overlaps the solve."""

    def __init__(self, collection: Collection, enabled: bool):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorazip-hash") if enabled else None
        self._jobs = {f: self._pool.submit(sha256_file, f) for a in collection.adapters for f in a.files()} \
            if self._pool else {}

    def get(self, path) -> str | None:
        return self._jobs[path].result() if self._pool else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def adapter_meta(adapter, hashes: SourceHashes) -> dict[str, Any]:
    """What the artifact records of one adapter: name, source files (sha256, bytes), config, ranks."""
    files = {}
    for f in adapter.files():
        files[f.name] = {"sha256": hashes.get(f), "bytes": f.stat().st_size}
    src = {"path": str(adapter.path.resolve()), "files": files}
    src.update(adapter.source)  # e.g. Hub repo id and commit
    return {
        "name": adapter.name,
        "source": src,
        "config": {k: adapter.config[k] for k in _CONFIG_FIELDS if k in adapter.config},
        "dtype": adapter.dtype,
        "ranks": {m: spec.rank for m, spec in adapter.modules.items()},
        "extras": adapter.extras,
    }
