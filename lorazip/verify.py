"""Integrity check of an artifact: its tensors against the recorded checksum, and optionally
the original adapter files against the sha256 recorded for each at compression time.

``verify`` never raises for a mismatch: it returns a report (``report_version`` 1) whose
``problems`` list holds one line per problem (empty when all is well). It raises
:class:`~lorazip.errors.ArtifactError` only when the file cannot be read as an artifact at
all, and :class:`~lorazip.errors.SourceError` for sources that do not exist.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from .artifact import file_checksum, load_artifact
from .errors import SourceError

REPORT_VERSION = 1

# ``lorazip verify`` reads the artifact's header and hashes files: it imports neither torch nor
# numpy. lorazip.io.collection and lorazip.io.peft import torch, so the two pure-Python pieces
# verify needs from them are repeated here (tests/test_cli_startup.py checks they agree).
CONFIG_NAME = "adapter_config.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def _find_adapter_dirs(root: Path) -> list[Path]:
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


def _names_for(dirs: list[tuple[Path, Path]], hub: list[str | None]) -> list[str]:
    """Adapter names: folder (or Hub repo) names; on clashes, paths from above the source
    root (or ``org--name``) joined by '--'."""
    base = [repo.split("/")[-1] if repo else d.name for (d, _root), repo in zip(dirs, hub)]
    out = []
    for (d, root), repo, b in zip(dirs, hub, base):
        if base.count(b) == 1:
            out.append(b)
        elif repo:
            out.append(repo.replace("/", "--"))
        elif d == root:  # adapter folders given directly: add their parent folder's name
            out.append("--".join(d.resolve().parts[-2:]))
        else:
            out.append("--".join(d.relative_to(root.parent).parts))
    return out


def _resolve_sources(sources) -> list[tuple[str, Path]]:
    """Sources (adapter folders, folders of adapters, Hub downloads) as ``(name, adapter_dir)``
    pairs, named and checked as :func:`lorazip.io.collection.resolve_sources` does it."""
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "commit"):
        sources = [sources]
    pairs: list[tuple[Path, Path]] = []
    hub: list[str | None] = []
    for src in sources:
        if hasattr(src, "commit") and hasattr(src, "ref"):  # a Hub download (lorazip.io.hub.DownloadedAdapter)
            pairs.append((Path(src.path), Path(src.path)))
            hub.append(src.ref.repo_id)
            continue
        root = Path(src)
        if not root.exists():
            raise SourceError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise SourceError(f"{root}: not a folder (give an adapter folder or a folder of adapters)")
        dirs = _find_adapter_dirs(root)
        if not dirs:
            raise SourceError(f"{root}: no adapter folders (no {CONFIG_NAME} found)")
        pairs.extend((d, root) for d in dirs)
        hub.extend(None for _ in dirs)
    real: dict[str, Path] = {}
    for d, _root in pairs:
        key = os.path.realpath(d)
        if key in real:
            raise SourceError(f"{d}: the same adapter is listed twice (also as {real[key]})")
        real[key] = d
    names = _names_for(pairs, hub)
    seen: dict[str, Path] = {}
    for name, (d, _root) in zip(names, pairs):
        if name in seen:
            raise SourceError(f"{d}: adapter name {name!r} is used twice (also {seen[name]})")
        seen[name] = d
    return [(name, d) for name, (d, _r) in zip(names, pairs)]


def verify(
    artifact_path: str | os.PathLike,
    sources: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Check an artifact's tensor checksum and, given ``sources``, the source files' sha256.

    Parameters
    ----------
    artifact_path : the artifact file.
    sources : adapter folders or folders of adapters (as for :func:`lorazip.load_collection`);
        each is matched to the artifact's adapter of the same name, and every file recorded
        for it (``adapter_config.json``, ``adapter_model.safetensors``) is hashed and compared.

    Returns
    -------
    dict with ``ok`` (bool), ``problems`` (list of one-line strings), ``checksum``
    (``{ok, expected, actual}``), ``files`` (one entry per source file checked:
    ``{adapter, file, ok, expected, actual}``, ``actual`` None when the file is missing),
    ``not_checked`` (artifact adapters no source was given for; not a problem).
    """
    path = Path(artifact_path)
    art = load_artifact(path, verify=False)  # structure and metadata; raises ArtifactError
    problems: list[str] = []
    want = art.meta.get("checksum")
    got = file_checksum(path)
    if want is None:
        problems.append(f"{path}: no checksum recorded in the artifact")
    elif got != want:
        problems.append(f"{path}: tensor checksum mismatch: the tensors were changed after the artifact was written")
    files: list[dict[str, Any]] = []
    not_checked = list(art.names)
    if sources is not None:
        by_name = {a["name"]: a for a in art.meta["adapters"]}
        for name, folder in _resolve_sources(sources):
            meta = by_name.get(name)
            if meta is None:
                problems.append(f"{folder}: adapter {name!r} is not in the artifact")
                continue
            if name in not_checked:
                not_checked.remove(name)
            for fname, rec in sorted(meta["source"]["files"].items()):
                f = Path(folder) / fname
                expected = rec.get("sha256")
                entry = {"adapter": name, "file": str(f), "expected": expected, "actual": None, "ok": False}
                files.append(entry)
                if not f.is_file():
                    problems.append(f"{f}: missing (the artifact was made from a file of that name)")
                    continue
                try:
                    entry["actual"] = sha256_file(f)
                except OSError as exc:
                    problems.append(f"{f}: cannot read ({exc.strerror or exc})")
                    continue
                if expected is None:
                    problems.append(f"{f}: no sha256 recorded in the artifact (compressed without source hashes)")
                elif entry["actual"] != expected:
                    problems.append(f"{f}: sha256 differs from the file compressed into the artifact")
                else:
                    entry["ok"] = True
    return {
        "report_version": REPORT_VERSION,
        "artifact": str(path),
        "ok": not problems,
        "checksum": {"ok": want is not None and got == want, "expected": want, "actual": got},
        "files": files,
        "not_checked": not_checked if sources is not None else [],
        "problems": problems,
    }
