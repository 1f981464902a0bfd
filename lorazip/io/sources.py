"""Turn what a user names (local folders, Hub repo ids, Hub searches, collections, lists)
into loadable sources: local paths and verified Hub downloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SourceError
from . import hub
from .files import local_parent


@dataclass
class GatheredSources:
    """Local folders and Hub downloads, in the order named; ``skipped`` lists failed repos."""

    sources: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def hub_adapters(self) -> list[hub.DownloadedAdapter]:
        return [s for s in self.sources if isinstance(s, hub.DownloadedAdapter)]


def gather_sources(
    specs: Sequence[str] = (),
    *,
    hub_author: str | None = None,
    hub_search: str | None = None,
    hub_collection: str | None = None,
    hub_list: str | Path | None = None,
    token: str | None = None,
    skip_failed: bool = False,
    max_workers: int = 8,
    offline: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GatheredSources:
    """Resolve every named source; Hub repos are downloaded (cached, verified) in parallel.

    A positional spec that exists on disk is a local folder; otherwise it must look like
    a Hub repo id (``org/name`` or ``org/name@rev``); where one that is also a missing entry of a
    local folder (``runs/x`` beside a folder ``runs``: perhaps a mistyped path) fails to download,
    the error says that no such local folder exists either.
    """
    local: list[tuple[int, Path]] = []
    refs: list[tuple[int, hub.HubRef]] = []
    for i, spec in enumerate(specs):
        if Path(spec).exists():
            local.append((i, Path(spec)))
        elif hub.looks_like_hub_ref(spec):
            refs.append((i, hub.parse_hub_ref(spec)))
        else:
            raise SourceError(f"{spec}: no such folder, and not a Hub repo id (org/name[@revision])")
    pos = len(specs)
    extra: list[hub.HubRef] = []
    if hub_author or hub_search:
        extra += hub.search_hub(hub_author, hub_search, token=token)
    if hub_collection:
        extra += hub.collection_refs(hub_collection, token=token)
    if hub_list:
        extra += hub.read_ref_list(hub_list)
    refs += [(pos + j, r) for j, r in enumerate(extra)]
    first: dict[hub.HubRef, int] = {}
    for i, r in refs:
        first.setdefault(r, i)
    refs = [(i, r) for r, i in first.items()]
    if not local and not refs:
        raise SourceError("no sources given: name adapter folders, Hub repos, or a Hub search")
    ordered: list[tuple[int, object]] = list(local)
    out = GatheredSources()
    if refs:
        try:
            report = hub.download_adapters(
                [r for _, r in refs], token=token, skip_failed=skip_failed, max_workers=max_workers,
                offline=offline, progress=progress,
            )
        except SourceError as exc:
            for i, r in refs:
                if i < len(specs) and local_parent(specs[i]) and str(exc).startswith(r.repo_id):
                    raise SourceError(f"{specs[i]}: no such local folder, and as a Hub repo: {exc}") from None
            raise
        by_ref = {a.ref: a for a in report.adapters}
        ordered += [(i, by_ref[r]) for i, r in refs if r in by_ref]
        out.skipped = [(str(r.repo_id) + (f"@{r.revision}" if r.revision else ""), why) for r, why in report.skipped]
    out.sources = [s for _, s in sorted(ordered, key=lambda t: t[0])]
    if not out.sources:
        raise SourceError("every Hub repo failed to download; nothing to compress")
    return out
