"""Integrity check of an artifact: its tensors against the recorded checksum, and optionally
the original adapter files against the sha256 recorded for each at compression time.

``verify`` never raises for a mismatch: it returns a report (``report_version`` 1) whose
``problems`` list holds one line per problem (empty when all is well). It raises
:class:`~lorazip.errors.ArtifactError` only when the file cannot be read as an artifact at
all, and :class:`~lorazip.errors.SourceError` for sources that do not exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .artifact import file_checksum, load_artifact
from .io.files import resolve_sources, sha256_file  # torch-free: ``lorazip verify`` imports neither torch nor numpy

REPORT_VERSION = 1


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
        for name, folder, _prov in resolve_sources(sources):
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
