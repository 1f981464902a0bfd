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
    """sha256 of every source file, computed while modules are solved: in a background thread
    here (hashlib releases the GIL), so the extra read of the sources overlaps the solve, or, with
    a Ray ``executor``, by the workers, each task of its next map hashing a share of the files
    after its module (reading them where they are; the driver only collects the digests). A file
    no task hashed (a run stopped early) is hashed here when asked for."""

    def __init__(self, collection: Collection, enabled: bool, executor=None):
        from concurrent.futures import ThreadPoolExecutor

        self.enabled = enabled
        self._files = [f for a in collection.adapters for f in a.files()] if enabled else []
        self._done: dict[Any, str] = {}
        self._pool, self._jobs = None, {}
        if enabled and executor is not None and hasattr(executor, "hash_sources"):
            executor.hash_sources(self)
        elif enabled:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorazip-hash")
            self._jobs = {f: self._pool.submit(sha256_file, f) for f in self._files}

    def pending(self) -> list:
        """The files not hashed yet (none when a local thread hashes them)."""
        return [] if self._pool is not None else [f for f in self._files if f not in self._done]

    def put(self, path, digest: str) -> None:
        """The sha256 of ``path``, computed elsewhere (a Ray worker)."""
        self._done[path] = digest

    def get(self, path) -> str | None:
        if not self.enabled:
            return None
        if path in self._done:
            return self._done[path]
        if path in self._jobs:
            return self._jobs[path].result()
        self._done[path] = sha256_file(path)  # no worker hashed it
        return self._done[path]

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
        **({"extras_bytes": adapter.extras_bytes} if adapter.extras and adapter.extras_bytes else {}),
    }
