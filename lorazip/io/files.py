"""Adapter folders and files, without torch: finding and naming the adapters of a source, and
hashing files. :func:`lorazip.load_collection` and :func:`lorazip.verify` (which must not import
torch, for ``lorazip verify``) both name sources here, so they always agree.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from ..errors import SourceError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# real path -> (the file's identity when its hashing was queued, the digest to come): see hash_early
_early: dict[str, tuple[tuple[int, int, int, int], Future]] = {}


def hash_early(paths) -> None:
    """Start hashing ``paths`` now, in order, in a daemon thread (hashlib releases the GIL): a later
    :func:`sha256_file` of one of them takes this digest, waiting for it if it is not ready, instead
    of reading the file again, as long as the file has the identity (device, inode, size, modification
    time) it had when queued. The CLI calls it before importing torch, which keeps one core busy for
    about a second while the other would be idle."""
    queued = []
    for p in paths:
        key = os.path.realpath(p)
        try:
            ident = _identity(os.stat(key))
        except OSError:
            continue
        if key not in _early:
            _early[key] = (ident, Future())
            queued.append(key)

    def run():
        for key in queued:
            fut = _early[key][1]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(_sha256(key))
                except BaseException as e:  # reported (by hashing again) when the digest is asked for
                    fut.set_exception(e)

    if queued:
        threading.Thread(target=run, name="lorazip-hash-early", daemon=True).start()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path`` (from :func:`hash_early` where it hashed this very file)."""
    if _early:
        key = os.path.realpath(path)
        got = _early.get(key)
        if got is not None:
            ident, fut = got
            try:
                digest = fut.result()
                if _identity(os.stat(key)) == ident:
                    return digest
            except Exception:
                pass  # hashed again below, which raises the error where it still happens
    return _sha256(path, chunk)


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def find_adapter_dirs(root: Path) -> list[Path]:
    """Adapter folders at or below ``root`` (sorted; symlink loops are not followed twice)."""
    if _is_adapter_dir(root):
        return [root]
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, _files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        if _is_adapter_dir(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames[:] = []  # an adapter folder is a leaf (checkpoints inside are not adapters)
    return found


def _names_for(dirs: list[tuple[Path, Path]], prov: list[dict]) -> list[str]:
    """Adapter names: folder (or Hub repo) names; on clashes, paths from above the source
    root (or ``org--name``) joined by '--'."""
    base = [p["hub"]["repo_id"].split("/")[-1] if p else d.name for (d, _root), p in zip(dirs, prov)]
    out = []
    for (d, root), p, b in zip(dirs, prov, base):
        if base.count(b) == 1:
            out.append(b)
        elif p:
            out.append(p["hub"]["repo_id"].replace("/", "--"))
        elif d == root:  # adapter folders given directly: add their parent folder's name
            out.append("--".join(d.resolve().parts[-2:]))
        else:
            out.append("--".join(d.relative_to(root.parent).parts))
    return out


def resolve_sources(sources) -> list[tuple[str, Path, dict]]:
    """Expand sources into ``(name, adapter_dir, provenance)`` triples, in a stable order.

    A source is a local folder (an adapter, or a folder of adapters) or a
    :class:`~lorazip.io.hub.DownloadedAdapter` (named after its repo; provenance records
    the repo id, requested revision and resolved commit).
    """
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "commit"):
        sources = [sources]
    pairs: list[tuple[Path, Path]] = []
    prov: list[dict] = []
    for src in sources:
        if hasattr(src, "commit") and hasattr(src, "ref"):  # a Hub download
            repo = src.ref.repo_id
            pairs.append((Path(src.path), Path(src.path)))
            prov.append({"hub": {"repo_id": repo, "revision": src.ref.revision, "commit": src.commit}})
            continue
        root = Path(src)
        if not root.exists():
            raise SourceError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise SourceError(f"{root}: not a folder (give an adapter folder or a folder of adapters)")
        dirs = find_adapter_dirs(root)
        if not dirs:
            raise SourceError(f"{root}: no adapter folders (no {CONFIG_NAME} found)")
        pairs.extend((d, root) for d in dirs)
        prov.extend({} for _ in dirs)
    real: dict[str, Path] = {}
    for d, _root in pairs:
        key = os.path.realpath(d)
        if key in real:
            raise SourceError(f"{d}: the same adapter is listed twice (also as {real[key]})")
        real[key] = d
    names = _names_for(pairs, prov)
    seen: dict[str, Path] = {}
    for name, (d, _root) in zip(names, pairs):
        if name in seen:
            raise SourceError(f"{d}: adapter name {name!r} is used twice (also {seen[name]})")
        seen[name] = d
    return [(name, d, p) for name, (d, _r), p in zip(names, pairs, prov)]


def local_parent(spec: str) -> bool:
    """Whether ``spec`` (``a/b``, perhaps ``@rev``), which does not exist, starts with an existing local
    folder: a mistyped path rather than a Hub id (``runs/x`` beside a folder ``runs``)."""
    head = spec.split("@", 1)[0].split("/", 1)[0]
    return bool(head) and "://" not in spec and not Path(spec).exists() and Path(head).is_dir()
